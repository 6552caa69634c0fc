"""Every shipped API workflow runs through the real ComfyUI server and writes its images."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.comfyui

API_WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows" / "api").glob("*.json"))
TEST_SIZE = 128
TEST_STEPS = 2
TRAINING_STEPS = 2
TIMEOUT_S = 900.0
TRAINING_NODES = ("SDIPCTrainAdapter", "SDIPCCustomizeSubject")


def shrink_for_test(workflow: dict) -> dict:
    """Return a copy with the test tier's small settings: 128 px, 2 sampler steps, 2 training steps at 64 px."""
    small = copy.deepcopy(workflow)
    for node in small.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = TEST_SIZE
        elif node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = TEST_STEPS
        elif node["class_type"] in TRAINING_NODES:
            inputs.update(steps=TRAINING_STEPS, resolution=64, batch_size=1, vision_prompt_tokens=min(inputs["vision_prompt_tokens"], 2))
            # A fresh name per run: the trainers never replace an existing adapter file.
            inputs["save_name"] = f"test/{inputs['save_name'].replace('/', '_')}_{uuid.uuid4().hex[:8]}"
    return small


def expected_image_count(workflow: dict) -> int:
    return sum(node["inputs"]["batch_size"] for node in workflow.values() if node["class_type"] == "EmptyLatentImage")


def test_workflows_found():
    assert any(path.stem == "sdipc_image_variation" for path in API_WORKFLOWS)


@pytest.mark.parametrize("workflow_path", API_WORKFLOWS, ids=lambda path: path.stem)
def test_workflow_runs_and_writes_images(comfy_server, workflow_path):
    workflow = shrink_for_test(json.loads(workflow_path.read_text(encoding="utf-8")))

    outputs = comfy_server.run(workflow, timeout=TIMEOUT_S)

    pngs = [Path(path) for path in outputs if str(path).endswith(".png")]
    assert len(pngs) == expected_image_count(workflow)
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (TEST_SIZE, TEST_SIZE)
    for node in workflow.values():
        if node["class_type"] in TRAINING_NODES:
            adapter = comfy_server.input_directory.parent / "models" / "loras" / f"{node['inputs']['save_name']}.safetensors"
            assert adapter.is_file(), f"{node['class_type']} saved no adapter at {adapter}"
