"""Nodes that train SD-IPC adapters: SD-IPC-FT on a set of images, SD-IPC-CT on one subject's photos."""

from __future__ import annotations

from ..sdipc_core import DEFAULT_END_TOKEN_NORM, DEFAULT_SINGULAR_VALUE_TOLERANCE
from ..sdipc_core.adapter_files import METHOD_CUSTOMIZE, METHOD_FINETUNE
from ..sdipc_core.loss_plot import draw_loss_curve, image_to_tensor
from ..sdipc_core.lora import parse_targets
from ..sdipc_core.training import RESIZE_MODES, prepare_images, split_prompts
from .adapters import SDIPC_ADAPTER, check_can_save, save_adapter
from .comfy_training import (
    PromptTunedClipVision,
    TrainingSettings,
    encode_training_data,
    model_with_adapter,
    targeted_modules,
    train_adapter,
)
from .socket_types import CATEGORY, SDIPC_PROJECTION

TARGET_CHOICES = ("to_k, to_v", "to_q, to_k, to_v", "to_k, to_v, to_out", "to_q, to_k, to_v, to_out")
DTYPE_CHOICES = ("auto", "bf16", "fp32")
SUBJECT_PROMPT_TEMPLATE = "a photo of a {}"


def _int_input(default, low, high, tooltip, step=1):
    return ("INT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip})


def _float_input(default, low, high, step, tooltip, advanced=False):
    options = {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip}
    if advanced:
        options["advanced"] = True
    return ("FLOAT", options)


def _model_inputs() -> dict:
    return {
        "model": ("MODEL", {"tooltip": "The Stable Diffusion 1.x model whose cross-attention layers get the adapter."}),
        "clip": ("CLIP", {"tooltip": "The CLIP of the same SD 1.x checkpoint; it gives the start-token state and encodes the text prompts."}),
        "clip_vision": ("CLIP_VISION", {"tooltip": "The OpenAI CLIP ViT-L/14 vision model (Load CLIP Vision)."}),
        "projection": (SDIPC_PROJECTION, {"tooltip": "From Load SD-IPC Projection, read from the same CLIP file."}),
        "vae": ("VAE", {"tooltip": "The VAE of the checkpoint; it encodes the images into training latents."}),
        "images": ("IMAGE", {"tooltip": "The reference images. A list of batches of different sizes is accepted and resized as resize_mode specifies."}),
    }


def _training_inputs(steps, learning_rate, rank, batch_size, vision_prompt_tokens, save_name) -> dict:
    return {
        "save_name": ("STRING", {"default": save_name, "tooltip": "Saved as models/loras/<name>.safetensors (vision prompts: models/sdipc_vision_prompts/<name>.safetensors). Empty: do not save."}),
        "steps": _int_input(steps, 1, 100000, "Optimizer updates."),
        "learning_rate": _float_input(learning_rate, 1e-7, 1.0, 1e-6, "AdamW learning rate of the LoRA factors."),
        "rank": _int_input(rank, 1, 256, "Rank of each adapter; it must not exceed the smaller side of any adapted layer (320 in SD 1.x)."),
        "batch_size": _int_input(batch_size, 1, 64, "Images per step (at most the number of images). The text term doubles the U-Net batch."),
        "seed": _int_input(0, 0, 0xFFFFFFFFFFFFFFFF, "Seed of the adapter initialisation, the batches, timesteps and noise."),
        "vision_prompt_tokens": _int_input(vision_prompt_tokens, 0, 100, "Learned prompt tokens per CLIP vision layer (SD-IPC-FT's 'C' part; the reference uses 50). 0 leaves the vision encoder unchanged and trains much faster."),
        "resolution": _int_input(512, 64, 2048, "Side of the square training images in pixels, a multiple of 64.", step=64),
    }


def _advanced_inputs() -> dict:
    return {
        "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace existing files of the save name. Off: an existing file stops the node before training."}),
        "targets": (list(TARGET_CHOICES), {"default": TARGET_CHOICES[0], "tooltip": "Projections of every attn2 (cross-attention) layer that get adapters. Keys and values read the prompt."}),
        "alpha": _float_input(-1.0, -1.0, 1024.0, 0.5, "LoRA alpha; the weight change is scaled by alpha / rank. -1 uses the rank (scale 1).", advanced=True),
        "resize_mode": (list(RESIZE_MODES), {"default": "crop", "tooltip": "crop: scale the shorter side to the resolution and centre-crop. stretch: scale to a square. none: keep the images' own size (all must match)."}),
        "vision_prompt_learning_rate": _float_input(1e-3, 1e-7, 1.0, 1e-6, "AdamW learning rate of the vision prompts.", advanced=True),
        "training_dtype": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "Compute dtype of the U-Net during training. auto: bf16 where the GPU supports it, else fp32."}),
        "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute activations in the backward pass instead of storing them: less memory, more compute."}),
        "scale": _float_input(DEFAULT_END_TOKEN_NORM, 0.0, 100.0, 0.1, "Norm of the converted end-token state, as in SD-IPC Image to Prompt.", advanced=True),
        "tolerance": _float_input(DEFAULT_SINGULAR_VALUE_TOLERANCE, 0.0, 10.0, 0.01, "Singular values of the text projection at or below this are dropped from its pseudo-inverse.", advanced=True),
    }


def _first(value):
    """Return the single value of a widget input that ComfyUI passes as a list (INPUT_IS_LIST)."""
    return value[0] if isinstance(value, list) else value


class SDIPCTrainAdapter:
    DESCRIPTION = (
        "SD-IPC-FT: fine-tunes low-rank adapters on the U-Net's cross-attention (attn2) layers so that converted image "
        "prompts reproduce the reference images more faithfully, optionally with learned prompt tokens in the CLIP "
        "vision encoder. Loss: denoising loss with each image's converted prompt, plus text_weight times the denoising "
        "loss with the text prompts. Saves a LoRA that Load LoRA also reads."
    )
    CATEGORY = CATEGORY
    FUNCTION = "train"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("MODEL", "CLIP_VISION", SDIPC_ADAPTER, "IMAGE")
    RETURN_NAMES = ("model", "clip_vision", "adapter", "loss_plot")
    OUTPUT_TOOLTIPS = (
        "The input model with the trained adapter applied at strength 1.",
        "The vision model with the learned prompt tokens, for CLIP Vision Encode; the input vision model when vision_prompt_tokens is 0.",
        "The trained adapter, for Save SD-IPC Adapter.",
        "The training loss per step, with a running mean.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        required = {**_model_inputs(), **_training_inputs(1000, 1e-4, 16, 4, 16, "sdipc/finetune")}
        required["text_prompts"] = ("STRING", {"multiline": True, "default": "", "tooltip": "Regularisation prompts, one per line: one per image in order when the counts match, else used in turn. Prompts are cut to 75 tokens. Empty: no text term."})
        required["text_weight"] = _float_input(1.0, 0.0, 10.0, 0.05, "Weight of the text-prompt denoising loss.")
        return {"required": required, "optional": _advanced_inputs()}

    def train(self, images, text_prompts, **inputs):
        return run_training(METHOD_FINETUNE, images, split_prompts(_first(text_prompts)), inputs)


class SDIPCCustomizeSubject:
    DESCRIPTION = (
        "SD-IPC-CT: adapts the U-Net's cross-attention to one subject from 3-6 photos in about 30 steps, starting from "
        "the converted image prompt. The text term uses 'a photo of a <class_name>' so the model keeps following "
        "text. Afterwards, prompt with the subject's converted image prompt plus an edit text to place it in new scenes."
    )
    CATEGORY = CATEGORY
    FUNCTION = "customize"
    INPUT_IS_LIST = True
    RETURN_TYPES = SDIPCTrainAdapter.RETURN_TYPES
    RETURN_NAMES = SDIPCTrainAdapter.RETURN_NAMES
    OUTPUT_TOOLTIPS = SDIPCTrainAdapter.OUTPUT_TOOLTIPS

    @classmethod
    def INPUT_TYPES(cls):
        required = {**_model_inputs(), **_training_inputs(30, 5e-4, 8, 2, 0, "sdipc/subject")}
        required["class_name"] = ("STRING", {"default": "dog", "tooltip": "The subject's class word; the text term trains on 'a photo of a <class_name>'. Empty: no text term."})
        required["text_weight"] = _float_input(1.0, 0.0, 10.0, 0.05, "Weight of the class-prompt denoising loss.")
        return {"required": required, "optional": _advanced_inputs()}

    def customize(self, images, class_name, **inputs):
        class_name = _first(class_name).strip()
        prompts = [SUBJECT_PROMPT_TEMPLATE.format(class_name)] if class_name else []
        return run_training(METHOD_CUSTOMIZE, images, prompts, inputs)


def run_training(method: str, images: list, text_prompts: list[str], inputs: dict):
    """Check the inputs, train, save, and return the outputs of either trainer node.

    `images` is the list of IMAGE tensors ComfyUI passes with INPUT_IS_LIST; every other input is a
    one-element list, and optional inputs may be absent.
    """
    values = {name: _first(value) for name, value in inputs.items()}
    model, clip, clip_vision, projection, vae = (values[name] for name in ("model", "clip", "clip_vision", "projection", "vae"))
    save_name = values["save_name"].strip()
    overwrite = values.get("overwrite", False)
    rank = values["rank"]
    alpha = values.get("alpha", -1.0)

    settings = TrainingSettings(
        method=method,
        steps=values["steps"],
        learning_rate=values["learning_rate"],
        rank=rank,
        alpha=float(rank) if alpha <= 0 else alpha,
        batch_size=values["batch_size"],
        seed=values["seed"],
        targets=parse_targets(values.get("targets", TARGET_CHOICES[0])),
        text_weight=values["text_weight"],
        vision_prompt_tokens=values["vision_prompt_tokens"],
        vision_prompt_learning_rate=values.get("vision_prompt_learning_rate", 1e-3),
        training_dtype=values.get("training_dtype", "auto"),
        gradient_checkpointing=values.get("gradient_checkpointing", True),
        scale=values.get("scale", DEFAULT_END_TOKEN_NORM),
        tolerance=values.get("tolerance", DEFAULT_SINGULAR_VALUE_TOLERANCE),
    )
    pixels = prepare_images(images, values["resolution"], values.get("resize_mode", "crop"))
    if save_name:
        check_can_save(save_name, settings.vision_prompt_tokens > 0, overwrite)
    targeted_modules(model, settings)

    data = encode_training_data(model, clip, clip_vision, projection, vae, pixels, text_prompts, settings)
    result = train_adapter(model, clip_vision, projection, data, settings)
    if save_name:
        save_adapter(result.adapter, save_name, overwrite)

    title = f"{method}: {len(result.losses)} steps, rank {rank}"
    if result.stop_reason:
        title += f" (stopped: {result.stop_reason})"
    trained_clip_vision = clip_vision if result.prompt_tuning is None else PromptTunedClipVision(clip_vision, result.prompt_tuning)
    return (
        model_with_adapter(model, result.adapter),
        trained_clip_vision,
        result.adapter,
        image_to_tensor(draw_loss_curve(result.losses, title)),
    )
