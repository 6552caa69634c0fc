"""ComfyUI tier, in process: ComfyUI's own loaders and nodes, the pack loaded the way ComfyUI loads it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
DREAMBOOTH = REPO_ROOT.parent / "shared" / "data" / "dreambooth"


def _load_photos(subject: str, count: int, size: int = 224) -> torch.Tensor:
    paths = sorted((DREAMBOOTH / subject).glob("*.jpg"))[:count]
    if len(paths) < count:
        pytest.skip(f"fewer than {count} photos of '{subject}' in {DREAMBOOTH}")
    pixels = [np.asarray(Image.open(path).convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for path in paths]
    return torch.from_numpy(np.stack(pixels))


@pytest.fixture(scope="session")
def load_photos():
    """Return a function giving `count` photos of a DreamBooth subject as an IMAGE batch [count, size, size, 3]."""
    return _load_photos


@pytest.fixture(scope="session")
def comfy_nodes(comfyui_in_process):
    """ComfyUI's `nodes` module, imported from COMFYUI_ROOT with the CPU forced."""
    import nodes

    if not nodes.NODE_CLASS_MAPPINGS.get("CLIPVisionEncode"):
        pytest.fail(f"{comfyui_in_process}/nodes.py has no CLIPVisionEncode; is COMFYUI_ROOT a ComfyUI checkout?")
    return nodes


@pytest.fixture(scope="session")
def pack(comfy_nodes):
    """The pack's module, loaded by ComfyUI's own custom-node loader."""
    loaded = asyncio.run(comfy_nodes.load_custom_node(str(REPO_ROOT)))
    assert loaded, "ComfyUI failed to load the pack; its log above says why"
    return sys.modules[str(REPO_ROOT).replace(".", "_x_")]


@pytest.fixture(scope="session")
def sd15(comfy_nodes, stand_in_model_dir):
    """(MODEL, CLIP, VAE) from the stand-in SD 1.5 checkpoint, loaded by ComfyUI's checkpoint loader."""
    import comfy.sd

    checkpoint = stand_in_model_dir / "v1-5-pruned-emaonly.safetensors"
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)[:3]
    return model, clip, vae


@pytest.fixture(scope="session")
def clip_file(stand_in_model_dir) -> Path:
    return stand_in_model_dir / "clip-vit-large-patch14.safetensors"


@pytest.fixture(scope="session")
def clip_vision(comfy_nodes, clip_file):
    import comfy.clip_vision

    return comfy.clip_vision.load(str(clip_file))
