"""The random-weight stand-ins load in ComfyUI's own loaders and match the published layouts."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workflows import stand_in_models
from workflows.stand_in_models import (
    CHECKPOINT_FILE_NAME,
    CHECKPOINT_TEXT_PREFIX,
    CLIP_FILE_NAME,
    clip_text_shapes,
    clip_vision_shapes,
    fill_tensor,
    openai_clip_shapes,
    unet_shapes,
    vae_shapes,
    write_openai_clip_vit_l14,
    write_sd15_checkpoint,
)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def _without_position_ids(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {key: shape for key, shape in shapes.items() if not key.endswith("position_ids")}


@pytest.fixture(scope="module")
def comfy(comfyui_in_process: Path) -> dict[str, ModuleType]:
    """Return ComfyUI's modules that load models, imported in this process."""
    names = ["nodes", "comfy.sd", "comfy.utils", "comfy.model_detection", "comfy.clip_vision"]
    return {name: importlib.import_module(name) for name in names}


@pytest.fixture(scope="module")
def loaded_checkpoint(comfy: dict[str, ModuleType], stand_in_model_dir: Path) -> tuple:
    """Return (model, clip, vae) from ComfyUI's checkpoint loader."""
    model, clip, vae, _ = comfy["comfy.sd"].load_checkpoint_guess_config(
        str(stand_in_model_dir / CHECKPOINT_FILE_NAME), output_vae=True, output_clip=True
    )
    return model, clip, vae


@pytest.fixture(scope="module")
def loaded_clip_vision(comfy: dict[str, ModuleType], stand_in_model_dir: Path):
    """Return the CLIP file loaded by ComfyUI's CLIPVisionLoader code."""
    return comfy["comfy.clip_vision"].load(str(stand_in_model_dir / CLIP_FILE_NAME))


@pytest.mark.comfyui
def test_checkpoint_detected_as_sd15(comfy: dict[str, ModuleType], stand_in_model_dir: Path) -> None:
    state_dict = comfy["comfy.utils"].load_torch_file(str(stand_in_model_dir / CHECKPOINT_FILE_NAME))
    model_config = comfy["comfy.model_detection"].model_config_from_unet(state_dict, "model.diffusion_model.")

    assert type(model_config).__name__ == "SD15"
    assert model_config.unet_config["channel_mult"] == [1]
    assert model_config.unet_config["num_res_blocks"] == [1]


@pytest.mark.comfyui
def test_checkpoint_keys_fill_comfyui_modules(loaded_checkpoint: tuple) -> None:
    model, clip, vae = loaded_checkpoint
    text_keys = {
        key.removeprefix("clip_l.transformer."): shape
        for key, shape in _shapes(clip.cond_stage_model).items()
        if key.startswith("clip_l.transformer.text_model.")
    }

    assert _shapes(model.model.diffusion_model) == unet_shapes()
    assert _shapes(vae.first_stage_model) == vae_shapes()
    assert text_keys == _without_position_ids(clip_text_shapes())


@pytest.mark.comfyui
def test_checkpoint_text_encode_shape(comfy: dict[str, ModuleType], loaded_checkpoint: tuple) -> None:
    _, clip, _ = loaded_checkpoint

    (conditioning,) = comfy["nodes"].CLIPTextEncode().encode(clip, "a photo of a dog")
    tokens = conditioning[0][0]

    assert tokens.shape == (1, 77, 768)
    assert torch.isfinite(tokens).all()


@pytest.mark.comfyui
def test_checkpoint_samples_finite_image(comfy: dict[str, ModuleType], loaded_checkpoint: tuple) -> None:
    nodes = comfy["nodes"]
    model, clip, vae = loaded_checkpoint
    (positive,) = nodes.CLIPTextEncode().encode(clip, "a photo of a dog")
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    (latent,) = nodes.EmptyLatentImage().generate(96, 64, 1)

    (samples,) = nodes.KSampler().sample(model, 0, 2, 7.0, "euler", "normal", positive, negative, latent)
    (image,) = nodes.VAEDecode().decode(vae, samples)

    assert image.shape == (1, 64, 96, 3)
    assert torch.isfinite(image).all()
    assert image.std() > 0.01, "a constant image means the decoder weights are degenerate"


@pytest.mark.comfyui
def test_clip_file_accepted_by_clip_vision_loader(loaded_clip_vision) -> None:
    assert loaded_clip_vision is not None
    assert _shapes(loaded_clip_vision.model) == {
        **_without_position_ids(clip_vision_shapes()),
        "visual_projection.weight": (768, 1024),
    }


@pytest.mark.comfyui
def test_clip_vision_encode_gives_768_embeds(comfy: dict[str, ModuleType], loaded_clip_vision) -> None:
    images = torch.rand(2, 96, 128, 3)

    (output,) = comfy["nodes"].CLIPVisionEncode().encode(loaded_clip_vision, images, "center")

    assert output["image_embeds"].shape == (2, 768)
    assert torch.isfinite(output["image_embeds"]).all()


def test_clip_layout_matches_transformers_clip_model() -> None:
    transformers = pytest.importorskip("transformers")
    text_config = transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
    )
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=768,
    )
    config = transformers.CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=768
    )
    with torch.device("meta"):
        model = transformers.CLIPModel(config)
    # The published file also stores the position_ids buffers, which current transformers does not save.
    expected = {**_shapes(model), **{name: tuple(buffer.shape) for name, buffer in model.named_buffers()}}

    assert openai_clip_shapes() == expected


def test_text_tower_same_in_both_files(stand_in_model_dir: Path) -> None:
    with (
        safe_open(str(stand_in_model_dir / CHECKPOINT_FILE_NAME), framework="pt") as checkpoint,
        safe_open(str(stand_in_model_dir / CLIP_FILE_NAME), framework="pt") as clip,
    ):
        for key in clip_text_shapes():
            assert torch.equal(checkpoint.get_tensor(CHECKPOINT_TEXT_PREFIX + key), clip.get_tensor(key)), key


def test_stand_in_files_declare_random_weights(stand_in_model_dir: Path) -> None:
    for name in (CHECKPOINT_FILE_NAME, CLIP_FILE_NAME):
        with safe_open(str(stand_in_model_dir / name), framework="pt") as handle:
            assert handle.metadata()["stand_in"] == stand_in_models.STAND_IN_MARKER


def test_fill_tensor_depends_on_seed_and_name() -> None:
    shape = (8, 4)

    first = fill_tensor("layer.weight", shape, seed=0)

    assert torch.equal(first, fill_tensor("layer.weight", shape, seed=0))
    assert not torch.equal(first, fill_tensor("layer.weight", shape, seed=1))
    assert not torch.equal(first, fill_tensor("other.weight", shape, seed=0))
    assert first.dtype == torch.float16


def test_fill_tensor_norms_and_biases() -> None:
    assert torch.equal(fill_tensor("norm.weight", (3,), seed=0), torch.ones(3, dtype=torch.float16))
    assert torch.equal(fill_tensor("norm.bias", (3,), seed=0), torch.zeros(3, dtype=torch.float16))
    assert torch.equal(fill_tensor("embeddings.position_ids", (1, 4), seed=0), torch.arange(4).reshape(1, 4))


def test_write_keeps_current_stand_in(stand_in_model_dir: Path) -> None:
    path = stand_in_model_dir / CHECKPOINT_FILE_NAME
    modified = path.stat().st_mtime_ns

    write_sd15_checkpoint(path)

    assert path.stat().st_mtime_ns == modified


def test_write_keeps_existing_real_model(tmp_path: Path) -> None:
    path = tmp_path / CLIP_FILE_NAME
    save_file({"text_projection.weight": torch.zeros(2, 2)}, str(path))

    with pytest.raises(FileExistsError, match="not a random-weight stand-in"):
        write_openai_clip_vit_l14(path)

    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["text_projection.weight"]
