"""The CLIP projections SD-IPC needs, read from the model files users have.

`W_t` (text projection) maps the text encoder's end-token state into CLIP's joint space and `W_i`
(visual projection) maps the vision tower's pooled output there. Files are recognised by their
tensor names and shapes, never by their file names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelFileError, ProjectionMismatchError
from .safetensors_io import load_tensors, tensor_shapes

SD1_TEXT_HIDDEN_SIZE = 768

# Linear layout (transformers, ComfyUI): weight is [out, in], used as x @ W.T.
_TEXT_PROJECTION_LINEAR = "text_projection.weight"
_VISUAL_PROJECTION_LINEAR = "visual_projection.weight"
# Parameter layout (original OpenAI / open_clip checkpoints): matrix is [in, out], used as x @ P.
_TEXT_PROJECTION_PARAMETER = "text_projection"
_VISUAL_PROJECTION_PARAMETER = "visual.proj"

_POST_LAYERNORM_NAMES = (
    ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"),
    ("visual.ln_post.weight", "visual.ln_post.bias"),
)

_GET_FILE_HINT = (
    "Use the full OpenAI CLIP ViT-L/14 checkpoint (model.safetensors from openai/clip-vit-large-patch14) "
    "or a CLIP-L text encoder file such as clip_l.safetensors."
)


@dataclass(frozen=True, eq=False)
class CLIPProjections:
    """The projection matrices of one CLIP model, in the linear layout [out_features, in_features]."""

    text_projection: torch.Tensor
    """`W_t`, [joint_dim, text_hidden_size]."""
    visual_projection: torch.Tensor | None = None
    """`W_i`, [joint_dim, vision_hidden_size], when the source carries the vision tower's projection."""
    vision_post_layernorm: tuple[torch.Tensor, torch.Tensor] | None = None
    """Weight and bias of the vision tower's final layer norm, used to check where image embeddings came from."""
    source: str = "unknown source"

    @property
    def joint_dim(self) -> int:
        return self.text_projection.shape[0]

    @property
    def text_hidden_size(self) -> int:
        return self.text_projection.shape[1]

    @property
    def vision_hidden_size(self) -> int | None:
        return None if self.visual_projection is None else self.visual_projection.shape[1]


def load_projections(path: str | os.PathLike) -> CLIPProjections:
    """Read `W_t` (and `W_i` where present) from a safetensors model file."""
    path = Path(path)
    shapes = tensor_shapes(path)
    text_key = _find_text_projection_key(shapes, path)
    visual_key = _find_unique_key(shapes, (_VISUAL_PROJECTION_LINEAR, _VISUAL_PROJECTION_PARAMETER), path)
    layernorm_keys = _find_post_layernorm_keys(shapes)

    wanted = [text_key] + ([visual_key] if visual_key else []) + list(layernorm_keys or ())
    tensors = load_tensors(path, wanted)
    return projections_from_state_dict(tensors, source=str(path))


def projections_from_state_dict(state_dict: dict[str, torch.Tensor], source: str = "state dict") -> CLIPProjections:
    """Build CLIPProjections from a state dict in any supported layout and key prefix."""
    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    text_key = _find_text_projection_key(shapes, source)
    text_projection = _as_linear(state_dict[text_key], text_key)
    _reject_placeholder(text_projection, text_key, source)

    visual_key = _find_unique_key(shapes, (_VISUAL_PROJECTION_LINEAR, _VISUAL_PROJECTION_PARAMETER), source)
    visual_projection = None if visual_key is None else _as_linear(state_dict[visual_key], visual_key)
    if visual_projection is not None and visual_projection.shape[0] != text_projection.shape[0]:
        raise ModelFileError(
            f"{source}: {visual_key} projects to {visual_projection.shape[0]} dimensions but {text_key} to "
            f"{text_projection.shape[0]}; they do not belong to one CLIP model. {_GET_FILE_HINT}"
        )

    layernorm_keys = _find_post_layernorm_keys(shapes)
    post_layernorm = None
    if layernorm_keys is not None:
        post_layernorm = (state_dict[layernorm_keys[0]].float(), state_dict[layernorm_keys[1]].float())

    return CLIPProjections(
        text_projection=text_projection,
        visual_projection=visual_projection,
        vision_post_layernorm=post_layernorm,
        source=source,
    )


def projections_from_clip_model(model: torch.nn.Module) -> CLIPProjections:
    """Take the projections from a transformers `CLIPModel`, for use outside ComfyUI."""
    post_layernorm = model.vision_model.post_layernorm
    return CLIPProjections(
        text_projection=model.text_projection.weight.detach().float(),
        visual_projection=model.visual_projection.weight.detach().float(),
        vision_post_layernorm=(post_layernorm.weight.detach().float(), post_layernorm.bias.detach().float()),
        source=type(model).__name__,
    )


def check_image_embeds(projections: CLIPProjections, image_embeds: torch.Tensor, what: str = "image embedding") -> None:
    """Raise ProjectionMismatchError unless `image_embeds` lives in the projection's joint space."""
    if image_embeds.shape[-1] != projections.joint_dim:
        raise ProjectionMismatchError(
            f"The {what} has {image_embeds.shape[-1]} dimensions but the text projection from {projections.source} "
            f"expects {projections.joint_dim}. The CLIP vision model and the projection must be the same CLIP: for "
            "Stable Diffusion 1.x load the OpenAI CLIP ViT-L/14 file in both Load CLIP Vision and the projection loader "
            "(a ViT-H or ViT-bigG vision model gives 1024 or 1280 dimensions)."
        )


def check_same_vision_tower(
    projections: CLIPProjections,
    image_embeds: torch.Tensor,
    last_hidden_state: torch.Tensor,
    *,
    min_cosine: float = 0.99,
) -> None:
    """Raise ProjectionMismatchError if `image_embeds` did not come from the projection file's vision tower.

    The check recomputes `W_i · LayerNorm(last_hidden_state[:, 0])` with the file's own weights and
    compares it with the given embedding. It is skipped when the file has no vision tower weights.
    """
    check_image_embeds(projections, image_embeds)
    if projections.visual_projection is None or projections.vision_post_layernorm is None:
        return
    if last_hidden_state.shape[-1] != projections.vision_hidden_size:
        raise ProjectionMismatchError(
            f"The CLIP vision model has hidden size {last_hidden_state.shape[-1]} but {projections.source} has "
            f"{projections.vision_hidden_size}. Load the same CLIP file in Load CLIP Vision and the projection loader."
        )

    weight, bias = projections.vision_post_layernorm
    class_token = last_hidden_state[:, 0].float()
    pooled = torch.nn.functional.layer_norm(class_token, weight.shape, weight.to(class_token), bias.to(class_token))
    expected = pooled @ projections.visual_projection.to(class_token).T
    cosine = torch.nn.functional.cosine_similarity(expected, image_embeds.float(), dim=-1).min().item()
    if cosine < min_cosine:
        raise ProjectionMismatchError(
            f"The image embeddings were not made by the vision tower of {projections.source} (cosine {cosine:.3f} "
            f"against its own projection). Load the same CLIP file in Load CLIP Vision and the projection loader."
        )


def _find_text_projection_key(shapes: dict[str, tuple[int, ...]], source) -> str:
    candidates = [
        key
        for key, shape in shapes.items()
        if len(shape) == 2
        and (key.endswith(_TEXT_PROJECTION_LINEAR) or key == _TEXT_PROJECTION_PARAMETER or key.endswith("." + _TEXT_PROJECTION_PARAMETER))
    ]
    if not candidates:
        raise ModelFileError(
            f"{source} has no text_projection tensor, so it cannot give SD-IPC its text projection W_t. "
            f"Most Stable Diffusion checkpoints and vision-only CLIP files lack it. {_GET_FILE_HINT}"
        )

    # Files that bundle several text encoders (SDXL: CLIP-L and CLIP-G) are narrowed to the SD 1.x one.
    if len(candidates) > 1:
        sd1_candidates = [key for key in candidates if SD1_TEXT_HIDDEN_SIZE in shapes[key]]
        if len(sd1_candidates) == 1:
            return sd1_candidates[0]
        raise ModelFileError(f"{source} has several text projections ({', '.join(sorted(candidates))}). {_GET_FILE_HINT}")
    return candidates[0]


def _find_unique_key(shapes: dict[str, tuple[int, ...]], suffixes: tuple[str, ...], source) -> str | None:
    candidates = [key for key, shape in shapes.items() if len(shape) == 2 and any(key == s or key.endswith("." + s) for s in suffixes)]
    if len(candidates) > 1:
        raise ModelFileError(f"{source} has several tensors named like {suffixes[0]}: {', '.join(sorted(candidates))}.")
    return candidates[0] if candidates else None


def _find_post_layernorm_keys(shapes: dict[str, tuple[int, ...]]) -> tuple[str, str] | None:
    for weight_name, bias_name in _POST_LAYERNORM_NAMES:
        weight_keys = [key for key in shapes if key == weight_name or key.endswith("." + weight_name)]
        bias_keys = [key for key in shapes if key == bias_name or key.endswith("." + bias_name)]
        if len(weight_keys) == 1 and len(bias_keys) == 1:
            return weight_keys[0], bias_keys[0]
    return None


def _as_linear(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """Return the matrix in the linear layout [out_features, in_features] as float32."""
    matrix = tensor.detach().float()
    if not key.endswith(".weight"):
        matrix = matrix.T
    return matrix.contiguous()


def _reject_placeholder(text_projection: torch.Tensor, key: str, source) -> None:
    """Reject the identity matrix that some checkpoints store in place of the trained W_t."""
    rows, columns = text_projection.shape
    if rows == columns and torch.equal(text_projection, torch.eye(rows, dtype=text_projection.dtype)):
        raise ModelFileError(
            f"{source}: {key} is an identity matrix, a placeholder that some checkpoints store instead of the "
            f"trained CLIP text projection. {_GET_FILE_HINT}"
        )
