"""Mixing images (and images with text) into one SD-IPC prompt.

Images are mixed as CLIP image embeddings `f_img` in the joint space, before conversion, so the mix is
converted like a single image. The conversion rescales its result to the norm `s`, which makes the
overall length of a mixed `f_img` irrelevant: only its direction reaches the prompt. Image and text
are mixed later, as whole prompts in the text encoder's space.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .errors import SDIPCError

logger = logging.getLogger(__name__)

BLEND_MODES = ("average", "normalized average", "weighted sum")
"""average: Σ w_i f_i / Σ w_i. normalized average: the same over f_i / ‖f_i‖. weighted sum: Σ w_i f_i."""

INTERPOLATION_METHODS = ("linear", "spherical")

_ZERO_WEIGHT_SUM = 1e-6
"""Weight sums closer to zero than this are rejected by the modes that divide by the sum."""

_CANCELLED_NORM = 1e-4
"""A mix whose norm is below this fraction of its largest input's norm has no usable direction."""

_PARALLEL_SINE = 1e-6
"""Below this sine of the angle between two embeddings, spherical interpolation has no unique arc."""


def match_batch_sizes(
    first: torch.Tensor, second: torch.Tensor, names: tuple[str, str] = ("first input", "second input")
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return both tensors with the same batch size, the smaller batch repeated to fit the larger.

    Batch [a0, a1] against a batch of 4 becomes [a0, a1, a0, a1], as ComfyUI repeats batches. The
    smaller size must be 1 or divide the larger one, and any other pair raises SDIPCError.
    """
    first_size, second_size = first.shape[0], second.shape[0]
    if first_size == second_size:
        return first, second

    smaller, larger = sorted((first_size, second_size))
    if smaller == 0 or larger % smaller != 0:
        raise SDIPCError(
            f"The {names[0]} has a batch of {first_size} and the {names[1]} a batch of {second_size}. "
            "One batch must have 1 entry or divide the other evenly; give both the same number of images or prompts."
        )

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        repeats = larger // tensor.shape[0]
        return tensor.repeat(repeats, *([1] * (tensor.dim() - 1)))

    return repeat(first), repeat(second)


def blend_image_embeds(f_img: torch.Tensor, weights: Sequence[float] | torch.Tensor, mode: str = "average") -> torch.Tensor:
    """Return the weighted mix of a batch of image embeddings, shape [1, joint_dim].

    `f_img` is [N, joint_dim] and `weights` has N entries. A negative weight subtracts an image
    ("this image minus that style"). Mode "average" divides by the weight sum, so weights (1, -0.5)
    give 2·f_1 - f_2, which points the same way as f_1 - 0.5·f_2.
    """
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if weights.numel() != f_img.shape[0]:
        raise SDIPCError(f"Got {weights.numel()} weights for {f_img.shape[0]} images. Give one weight per image.")
    if mode not in BLEND_MODES:
        raise SDIPCError(f"Unknown blend mode {mode!r}. Use one of: {', '.join(BLEND_MODES)}.")

    embeddings = f_img.double()
    if mode == "normalized average":
        norms = embeddings.norm(dim=-1, keepdim=True)
        if (norms == 0).any():
            raise SDIPCError("An image embedding is all zeros, so it cannot be normalized. Check the CLIP vision input.")
        embeddings = embeddings / norms

    if not (weights != 0).any():
        raise SDIPCError("All blend weights are 0. Give at least one image a non-zero weight.")

    mixed = (weights.unsqueeze(-1) * embeddings).sum(dim=0, keepdim=True)

    if mode in ("average", "normalized average"):
        weight_sum = weights.sum().item()
        if abs(weight_sum) < _ZERO_WEIGHT_SUM:
            raise SDIPCError(
                f"The blend weights {weights.tolist()} sum to 0, and mode {mode!r} divides by their sum. "
                "Change the weights, or use mode 'weighted sum' for a difference of images such as (1, -1)."
            )
        mixed = mixed / weight_sum

    largest_norm = embeddings.norm(dim=-1).max().item()
    if mixed.norm().item() < _CANCELLED_NORM * largest_norm:
        raise SDIPCError(
            f"The weighted images cancel out (weights {weights.tolist()}): the mix is almost zero and has no direction "
            "to convert. Change the weights, or check that the subtracted image differs from the others."
        )
    return mixed.to(f_img.dtype)


def clamp_factor(factor: float) -> float:
    """Return `factor` clamped to [0, 1], logging a warning when it was outside."""
    clamped = min(max(float(factor), 0.0), 1.0)
    if clamped != factor:
        logger.warning("SD-IPC: interpolation factor %s is outside [0, 1], so %s is used.", factor, clamped)
    return clamped


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Return `(1 - t)·a + t·b`."""
    return (1.0 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Return the spherical interpolation of `a` and `b` along their last dimension.

    The direction moves along the great circle from a/‖a‖ to b/‖b‖ at constant angular speed, and the
    norm moves linearly from ‖a‖ to ‖b‖. Inputs of equal norm therefore keep that norm at every t.
    Parallel inputs reduce to their shared direction. Opposite inputs raise SDIPCError, because no
    single arc joins them.
    """
    a64, b64 = a.double(), b.double()
    norm_a = a64.norm(dim=-1, keepdim=True)
    norm_b = b64.norm(dim=-1, keepdim=True)
    if (norm_a == 0).any() or (norm_b == 0).any():
        raise SDIPCError("Spherical interpolation needs non-zero embeddings, but one input is all zeros. Use linear.")

    unit_a, unit_b = a64 / norm_a, b64 / norm_b
    cosine = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    angle = torch.arccos(cosine)
    sine = torch.sin(angle)
    if ((sine < _PARALLEL_SINE) & (cosine < 0)).any():
        raise SDIPCError(
            "The two image embeddings point in opposite directions, so spherical interpolation has no unique path. "
            "Use linear interpolation."
        )

    parallel = sine < _PARALLEL_SINE
    safe_sine = torch.where(parallel, torch.ones_like(sine), sine)
    direction = (torch.sin((1.0 - t) * angle) * unit_a + torch.sin(t * angle) * unit_b) / safe_sine
    direction = torch.where(parallel, unit_a, direction)

    norm = (1.0 - t) * norm_a + t * norm_b
    return (direction * norm).to(a.dtype)


def interpolation_factors(steps: int, factor: float) -> list[float]:
    """Return the factors to interpolate at: `[factor]` (clamped) for one step, else 0 to 1 in `steps` even steps."""
    if steps < 1:
        raise SDIPCError(f"Invalid steps {steps}: it must be at least 1.")
    if steps == 1:
        return [clamp_factor(factor)]
    return [index / (steps - 1) for index in range(steps)]


def interpolate_image_embeds(
    f_img_a: torch.Tensor, f_img_b: torch.Tensor, factors: Sequence[float], method: str = "linear"
) -> torch.Tensor:
    """Return interpolations between paired image embeddings, shape [pairs · len(factors), joint_dim].

    Batches are paired after `match_batch_sizes`. The rows come pair by pair: all factors of the first
    pair, then all factors of the next. Factors outside [0, 1] are clamped, with a warning.
    """
    if method not in INTERPOLATION_METHODS:
        raise SDIPCError(f"Unknown interpolation method {method!r}. Use one of: {', '.join(INTERPOLATION_METHODS)}.")
    a, b = match_batch_sizes(f_img_a, f_img_b, ("first image input", "second image input"))
    interpolate = slerp if method == "spherical" else lerp

    steps = [interpolate(a, b, clamp_factor(factor)) for factor in factors]
    return torch.stack(steps, dim=1).reshape(-1, a.shape[-1])


def mix_prompts(text_prompt: torch.Tensor, image_prompt: torch.Tensor, image_weight: float) -> torch.Tensor:
    """Return `(1 - w)·text_prompt + w·image_prompt` at every position, w = `image_weight`.

    `text_prompt` is [B, L, hidden] with L a multiple of the image prompt's length, because ComfyUI
    concatenates the 77-token chunks of long prompts. The image prompt is repeated along the token
    axis to cover every chunk. Batch sizes follow `match_batch_sizes`.
    """
    text_length, image_length = text_prompt.shape[1], image_prompt.shape[1]
    if text_prompt.shape[-1] != image_prompt.shape[-1]:
        raise SDIPCError(
            f"The text prompt has {text_prompt.shape[-1]}-dimensional states and the image prompt {image_prompt.shape[-1]}. "
            "Make both with the CLIP of the same Stable Diffusion 1.x checkpoint."
        )
    if text_length % image_length != 0:
        raise SDIPCError(
            f"The text prompt has {text_length} tokens, not a multiple of the image prompt's {image_length}. "
            "Connect an image prompt of one 77-token chunk, straight from an SD-IPC node."
        )

    text, image = match_batch_sizes(text_prompt, image_prompt.to(text_prompt), ("text prompt", "image prompt"))
    image = image.repeat(1, text_length // image_length, 1)
    return lerp(text, image, image_weight)


def mix_pooled(text_pooled: torch.Tensor | None, image_pooled: torch.Tensor | None, image_weight: float) -> torch.Tensor | None:
    """Return the pooled output matching `mix_prompts`: the lerp when both exist, else whichever exists."""
    if text_pooled is None or image_pooled is None:
        return image_pooled if text_pooled is None else text_pooled
    text, image = match_batch_sizes(text_pooled, image_pooled.to(text_pooled), ("text pooled output", "image pooled output"))
    return lerp(text, image, image_weight)

