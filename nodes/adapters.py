"""Nodes that save and apply SD-IPC adapters: cross-attention LoRAs and vision-encoder prompts."""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePath

import folder_paths

import comfy.model_management

from ..sdipc_core import SDIPCError
from ..sdipc_core.adapter_files import (
    TrainedAdapter,
    load_lora_file,
    load_vision_prompts_file,
    save_lora_file,
    save_vision_prompts_file,
)
from ..sdipc_core.lora import check_adapters_fit
from ..sdipc_core.prompt_tuning import VisionPromptTuning
from .comfy_training import PromptTunedClipVision, check_sd1_model, model_fingerprint, model_with_adapter
from .socket_types import CATEGORY

logger = logging.getLogger(__name__)

SDIPC_ADAPTER = "SDIPC_ADAPTER"
"""Socket type carrying `sdipc_core.adapter_files.TrainedAdapter`."""

LORA_FOLDER = "loras"
VISION_PROMPTS_FOLDER = "sdipc_vision_prompts"
"""ComfyUI model folder (models/sdipc_vision_prompts) for prompt-tuned vision encoder files."""

SAFETENSORS_SUFFIX = ".safetensors"

if VISION_PROMPTS_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[VISION_PROMPTS_FOLDER] = (
        [os.path.join(folder_paths.models_dir, VISION_PROMPTS_FOLDER)],
        {SAFETENSORS_SUFFIX},
    )


def adapter_paths(save_name: str) -> tuple[Path, Path]:
    """Return where `save_name` puts the LoRA (models/loras) and the vision prompts (models/sdipc_vision_prompts)."""
    name = save_name.strip().removesuffix(SAFETENSORS_SUFFIX)
    parts = PurePath(name).parts
    if not name or PurePath(name).is_absolute() or ".." in parts:
        raise SDIPCError(
            f"Invalid save name {save_name!r}: give a relative name such as 'sdipc/my_subject', which is saved "
            "as models/loras/sdipc/my_subject.safetensors."
        )
    lora_folder = Path(folder_paths.get_folder_paths(LORA_FOLDER)[0])
    prompts_folder = Path(folder_paths.get_folder_paths(VISION_PROMPTS_FOLDER)[0])
    return lora_folder / (name + SAFETENSORS_SUFFIX), prompts_folder / (name + SAFETENSORS_SUFFIX)


def check_can_save(save_name: str, with_vision_prompts: bool, overwrite: bool) -> None:
    """Raise FileExistsError before training if saving under `save_name` would replace a file without `overwrite`."""
    if overwrite:
        return
    lora_path, prompts_path = adapter_paths(save_name)
    for path in (lora_path, prompts_path) if with_vision_prompts else (lora_path,):
        if path.exists():
            raise FileExistsError(f"{path} already exists. Choose another save name, or enable overwrite to replace it.")


def save_adapter(adapter: TrainedAdapter, save_name: str, overwrite: bool) -> list[Path]:
    """Write the adapter's files atomically; return their paths.

    An interrupt request abandons the save before any file is renamed into place, and a failure
    while writing the LoRA removes the vision-prompt file written just before it.
    """
    lora_path, prompts_path = adapter_paths(save_name)
    check_interrupt = comfy.model_management.throw_exception_if_processing_interrupted
    check_interrupt()

    written = []
    if adapter.vision_prompts is not None:
        written.append(save_vision_prompts_file(adapter, prompts_path, overwrite=overwrite, before_replace=check_interrupt))
    try:
        written.append(save_lora_file(adapter, lora_path, overwrite=overwrite, before_replace=check_interrupt))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    for path in written:
        logger.info("SD-IPC: saved %s", path)
    return written


class SDIPCSaveAdapter:
    DESCRIPTION = (
        "Saves an SD-IPC adapter: the cross-attention LoRA to models/loras (loadable by Load LoRA and by "
        "Apply SD-IPC Adapter) and, when the vision encoder was prompt-tuned, its prompts to "
        "models/sdipc_vision_prompts under the same name."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter": (SDIPC_ADAPTER, {"tooltip": "From Train SD-IPC Adapter or Customize Subject."}),
                "save_name": ("STRING", {"default": "sdipc/adapter", "tooltip": "Path under models/loras without the extension, for example sdipc/my_style."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace existing files of that name. Off: an existing file stops the save with an error."}),
            }
        }

    def save(self, adapter, save_name, overwrite):
        paths = save_adapter(adapter, save_name, overwrite)
        return {"ui": {"text": [str(path) for path in paths]}}


class SDIPCApplyAdapter:
    DESCRIPTION = (
        "Applies an SD-IPC cross-attention adapter from models/loras to a Stable Diffusion 1.x model. "
        "Unlike Load LoRA it checks the file: it must be an SD-IPC adapter whose layers all exist in this "
        "model with the same shapes. Strength scales the change linearly; negative values invert it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the adapter applied, for KSampler and the other samplers.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Stable Diffusion 1.x model, normally the one the adapter was trained on."}),
                "adapter_name": (folder_paths.get_filename_list(LORA_FOLDER), {"tooltip": "An adapter file saved by the SD-IPC trainer, from models/loras."}),
                "strength": (
                    "FLOAT",
                    {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Multiplier of the adapter's weight change. 0 leaves the model unchanged; negative values invert the change."},
                ),
            }
        }

    def apply(self, model, adapter_name, strength):
        path = folder_paths.get_full_path_or_raise(LORA_FOLDER, adapter_name)
        adapters, metadata = load_lora_file(path)
        check_adapters_fit(adapters, check_sd1_model(model), path, "the connected MODEL")

        family, model_hash = model_fingerprint(model)
        if metadata.model_family != family:
            logger.warning("SD-IPC: %s was trained on a %s model and is applied to a %s model.", path, metadata.model_family, family)
        elif metadata.base_model_hash != model_hash:
            logger.info("SD-IPC: %s was trained on another %s checkpoint (hash %s, this one %s).", path, family, metadata.base_model_hash, model_hash)
        if metadata.vision_prompt_tokens:
            logger.info("SD-IPC: %s was trained with vision prompts; load them with Apply SD-IPC Vision Prompts for the intended results.", path)

        if strength == 0:
            return (model,)
        return (model_with_adapter(model, TrainedAdapter(lora=adapters, metadata=metadata), strength),)


class SDIPCApplyVisionPrompts:
    DESCRIPTION = (
        "Adds prompt-tuned vision prompts, saved by the SD-IPC trainer, to a CLIP vision model. Encode images "
        "with the result in CLIP Vision Encode, then convert them with SD-IPC Image to Prompt as usual."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("CLIP_VISION",)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The CLIP vision model with the learned prompt tokens; it shares the input's weights.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "The OpenAI CLIP ViT-L/14 vision model the prompts were trained with."}),
                "prompts_name": (folder_paths.get_filename_list(VISION_PROMPTS_FOLDER), {"tooltip": "A vision-prompt file from models/sdipc_vision_prompts."}),
            }
        }

    def apply(self, clip_vision, prompts_name):
        path = folder_paths.get_full_path_or_raise(VISION_PROMPTS_FOLDER, prompts_name)
        state_dict, metadata = load_vision_prompts_file(path)
        prompt_tuning = VisionPromptTuning.from_state_dict(state_dict, source=path)
        logger.info("SD-IPC: loaded %d vision prompt tokens per layer (%s) from %s", prompt_tuning.num_tokens, metadata.method, path)
        return (PromptTunedClipVision(clip_vision, prompt_tuning, source=path),)
