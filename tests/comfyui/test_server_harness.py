"""The ComfyUI server harness runs API workflows in a real server and reports ComfyUI's errors."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from workflows.comfy_server import PACK_FOLDER_NAME, PACK_ROOT, ComfyServer, PromptExecutionError, PromptRejectedError
from workflows.stand_in_models import CHECKPOINT_FILE_NAME, CLIP_FILE_NAME

pytestmark = pytest.mark.comfyui


def text_to_image_workflow(width: int, height: int, steps: int, prefix: str) -> dict[str, Any]:
    """Return a Load Checkpoint -> CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage graph."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_FILE_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a dog", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 0,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_text_to_image_png_has_requested_size(comfy_server: ComfyServer) -> None:
    workflow = text_to_image_workflow(width=128, height=64, steps=2, prefix="harness_size")

    images = comfy_server.run(workflow, timeout=300)

    assert len(images) == 1
    assert images[0].is_file()
    with Image.open(images[0]) as image:
        assert image.format == "PNG"
        assert image.size == (128, 64)


def test_pack_linked_and_imported(comfy_server: ComfyServer) -> None:
    pack_link = comfy_server.base_directory / "custom_nodes" / PACK_FOLDER_NAME
    import_lines = [line for line in comfy_server.read_log().splitlines() if line.rstrip().endswith(str(pack_link))]

    assert pack_link.is_symlink()
    assert pack_link.resolve() == PACK_ROOT
    assert import_lines, "ComfyUI's import-time list does not mention the pack"
    assert "IMPORT FAILED" not in import_lines[0], comfy_server.read_log()


def test_object_info_lists_stand_in_models(comfy_server: ComfyServer) -> None:
    checkpoint_info = comfy_server.object_info("CheckpointLoaderSimple")["CheckpointLoaderSimple"]
    clip_vision_info = comfy_server.object_info("CLIPVisionLoader")["CLIPVisionLoader"]

    assert CHECKPOINT_FILE_NAME in checkpoint_info["input"]["required"]["ckpt_name"][0]
    assert CLIP_FILE_NAME in clip_vision_info["input"]["required"]["clip_name"][0]


def test_queue_reports_validation_error(comfy_server: ComfyServer) -> None:
    workflow = text_to_image_workflow(width=64, height=64, steps=1, prefix="harness_invalid")
    workflow["1"]["inputs"]["ckpt_name"] = "missing.safetensors"

    with pytest.raises(PromptRejectedError) as raised:
        comfy_server.queue(workflow)

    assert "Value not in list: ckpt_name: 'missing.safetensors'" in str(raised.value)
    assert "node 1 (CheckpointLoaderSimple)" in str(raised.value)
    assert raised.value.response["node_errors"]["1"]["class_type"] == "CheckpointLoaderSimple"


def test_wait_reports_node_exception(comfy_server: ComfyServer) -> None:
    (comfy_server.input_directory / "not_an_image.png").write_text("not an image")
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "not_an_image.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness_broken"}},
    }

    with pytest.raises(PromptExecutionError) as raised:
        comfy_server.run(workflow, timeout=120)

    assert raised.value.node_type == "LoadImage"
    assert raised.value.node_id == "1"
    assert "cannot identify image file" in raised.value.exception_message
    assert "node 1 (LoadImage) failed" in str(raised.value)


def test_server_log_records_executed_prompt(comfy_server: ComfyServer) -> None:
    comfy_server.run(text_to_image_workflow(width=64, height=64, steps=1, prefix="harness_log"), timeout=300)

    log = comfy_server.read_log()

    assert "Prompt executed in" in log
    assert f"To see the GUI go to: {comfy_server.url}" in log
