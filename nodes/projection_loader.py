"""Node that loads the CLIP text projection (and vision projection) SD-IPC needs."""

from __future__ import annotations

import logging
import os

import folder_paths
import torch

from ..sdipc_core import CLIPProjections, load_projections
from .socket_types import CATEGORY, SDIPC_PROJECTION

logger = logging.getLogger(__name__)

# Folders searched, in order, for projection files: the full OpenAI CLIP file usually sits in
# clip_vision (where Load CLIP Vision also reads it), a clip_l.safetensors in text_encoders.
PROJECTION_FOLDERS = ("clip_vision", "text_encoders")

_loaded: dict[str, tuple[tuple[int, int], CLIPProjections]] = {}


def projection_file_names() -> list[str]:
    """Return the model files a projection can be read from, without duplicates."""
    names: list[str] = []
    for folder in PROJECTION_FOLDERS:
        names.extend(name for name in folder_paths.get_filename_list(folder) if name not in names)
    return names


def resolve_projection_path(name: str) -> str:
    """Return the full path of a file listed by `projection_file_names`."""
    for folder in PROJECTION_FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise FileNotFoundError(
        f"Projection file '{name}' was not found in models/clip_vision or models/text_encoders. "
        "Put the OpenAI CLIP ViT-L/14 file (model.safetensors from openai/clip-vit-large-patch14) in models/clip_vision."
    )


def load_cached_projections(path: str) -> CLIPProjections:
    """Load projections from `path`, reusing the previous result while the file is unchanged."""
    stat = os.stat(path)
    signature = (stat.st_mtime_ns, stat.st_size)
    cached = _loaded.get(path)
    if cached is not None and cached[0] == signature:
        return cached[1]

    # ComfyUI runs nodes under torch.inference_mode. The cached tensors are made outside it, so that
    # later nodes can still use them in autograd (adapter training) and modify copies of them.
    with torch.inference_mode(False):
        projections = load_projections(path)
    _loaded[path] = (signature, projections)
    logger.info(
        "SD-IPC: loaded text projection %s%s from %s",
        tuple(projections.text_projection.shape),
        "" if projections.visual_projection is None else " and vision projection",
        path,
    )
    return projections


class SDIPCProjectionLoader:
    DESCRIPTION = (
        "Loads CLIP's text projection W_t (and vision projection W_i, where the file has it) for SD-IPC. "
        "Pick the full OpenAI CLIP ViT-L/14 file, the same one Load CLIP Vision uses, or a clip_l text "
        "encoder file. Most SD 1.x checkpoints do not carry the trained projection, so it comes from here."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (SDIPC_PROJECTION,)
    RETURN_NAMES = ("projection",)
    OUTPUT_TOOLTIPS = ("The CLIP projections, for SD-IPC Image to Prompt and the other SD-IPC nodes.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "projection_name": (
                    projection_file_names(),
                    {"tooltip": "A safetensors file from models/clip_vision or models/text_encoders that contains text_projection.weight."},
                ),
            }
        }

    def load(self, projection_name: str):
        return (load_cached_projections(resolve_projection_path(projection_name)),)
