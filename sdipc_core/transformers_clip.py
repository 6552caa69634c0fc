"""SD-IPC from a transformers `CLIPModel`, for scripts and notebooks outside ComfyUI."""

from __future__ import annotations

import torch

from .conversion import DEFAULT_END_TOKEN_NORM, DEFAULT_SINGULAR_VALUE_TOLERANCE, PROMPT_LENGTH, convert_image_embeds, variation_prompt


@torch.no_grad()
def image_embeds_from_clip_model(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Return `f_img = W_i p` for preprocessed images, shape [N, joint_dim]."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


@torch.no_grad()
def start_token_state(model: torch.nn.Module) -> torch.Tensor:
    """Return `h_sos`, the text encoder's final-layer-norm state at the start token, shape [hidden]."""
    start_token_id = model.config.text_config.bos_token_id
    input_ids = torch.tensor([[start_token_id]], device=model.text_projection.weight.device)
    return model.text_model(input_ids=input_ids).last_hidden_state[0, 0]


@torch.no_grad()
def image_variation_prompts(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    *,
    scale: float = DEFAULT_END_TOKEN_NORM,
    tolerance: float = DEFAULT_SINGULAR_VALUE_TOLERANCE,
    length: int = PROMPT_LENGTH,
) -> torch.Tensor:
    """Return SD-IPC image-variation prompts for preprocessed images, shape [N, length, hidden]."""
    f_img = image_embeds_from_clip_model(model, pixel_values)
    f_cnvrt = convert_image_embeds(f_img, model.text_projection.weight, scale=scale, tolerance=tolerance)
    return variation_prompt(start_token_state(model), f_cnvrt, length=length)
