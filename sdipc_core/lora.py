"""Low-rank adapters on a Stable Diffusion U-Net's cross-attention projections.

A LoRA adapter replaces a linear weight `W` [out, in] by

    W' = W + strength · (alpha / rank) · up @ down,    up: [out, rank], down: [rank, in]

SD-IPC-FT adapts only the cross-attention layers (`attn2`), whose keys and values read the prompt,
so that the U-Net learns to follow converted image prompts. Adapters are stored under ComfyUI's
native LoRA key names: for the module `diffusion_model.<path>.attn2.to_k` the file contains
`diffusion_model.<path>.attn2.to_k.lora_up.weight`, `….lora_down.weight` and `….alpha`, which
ComfyUI's LoraLoader and LoraLoaderModelOnly map onto the model without conversion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import SDIPCError

CROSS_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
"""The projections of a cross-attention layer an adapter can target; `to_out` is the linear `to_out.0`."""

DEFAULT_TARGETS = ("to_k", "to_v")
"""The key and value projections, the ones that read the prompt."""

DIFFUSION_MODEL_PREFIX = "diffusion_model."

UP_SUFFIX = ".lora_up.weight"
DOWN_SUFFIX = ".lora_down.weight"
ALPHA_SUFFIX = ".alpha"

_CROSS_ATTENTION_MODULE = re.compile(r"(^|\.)attn2\.(to_q|to_k|to_v|to_out\.0)$")


class AdapterMismatchError(SDIPCError):
    """An adapter does not fit the model it is applied to, or its file is incomplete."""


@dataclass(frozen=True)
class LoraWeights:
    """The low-rank factors of one adapted linear layer."""

    up: torch.Tensor
    """[out_features, rank]."""
    down: torch.Tensor
    """[rank, in_features]."""
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Return the projection names of a target list such as "to_k, to_v", in canonical order."""
    names = [name.strip() for name in targets.split(",")] if isinstance(targets, str) else [name.strip() for name in targets]
    names = [name.removesuffix(".0") for name in names if name]
    unknown = sorted(set(names) - set(CROSS_ATTENTION_PROJECTIONS))
    if unknown or not names:
        raise SDIPCError(
            f"Invalid cross-attention targets {unknown or names}: choose one or more of "
            f"{', '.join(CROSS_ATTENTION_PROJECTIONS)}."
        )
    return tuple(name for name in CROSS_ATTENTION_PROJECTIONS if name in names)


def is_cross_attention_projection(module_name: str, targets: Iterable[str] = CROSS_ATTENTION_PROJECTIONS) -> bool:
    """Return whether `module_name` is one of the targeted projections of a cross-attention layer."""
    match = _CROSS_ATTENTION_MODULE.search(module_name)
    return match is not None and match.group(2).removesuffix(".0") in set(targets)


def cross_attention_modules(module_names: Iterable[str], targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Return the module names that are targeted cross-attention projections, sorted."""
    targets = tuple(targets)
    return sorted(name for name in module_names if is_cross_attention_projection(name, targets))


def lora_keys(module_name: str) -> tuple[str, str, str]:
    """Return the file keys (up, down, alpha) of the adapter on `module_name`, in ComfyUI's native format."""
    return module_name + UP_SUFFIX, module_name + DOWN_SUFFIX, module_name + ALPHA_SUFFIX


def check_rank(rank: int, weight_shape: tuple[int, ...], module_name: str) -> None:
    """Raise SDIPCError unless a rank-`rank` adapter fits a linear weight of `weight_shape`."""
    max_rank = min(weight_shape[0], math.prod(weight_shape[1:]))
    if rank < 1 or rank > max_rank:
        raise SDIPCError(
            f"Rank {rank} does not fit the layer {module_name} with weight shape {list(weight_shape)}: "
            f"the rank must be between 1 and {max_rank}, the smaller side of the weight. Lower the rank."
        )


def init_lora_weights(
    out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator | None = None
) -> LoraWeights:
    """Return new adapter factors: `down` random (Kaiming uniform), `up` zero, so the delta starts at zero."""
    down = torch.empty(rank, in_features)
    bound = 1.0 / math.sqrt(in_features)
    down.uniform_(-bound, bound, generator=generator)
    return LoraWeights(up=torch.zeros(out_features, rank), down=down, alpha=float(alpha))


def lora_delta(weights: LoraWeights, strength: float = 1.0) -> torch.Tensor:
    """Return the weight change `strength · (alpha / rank) · up @ down`, [out_features, in_features]."""
    scale = strength * weights.alpha / weights.rank
    return scale * (weights.up.float() @ weights.down.float())


def apply_lora(weight: torch.Tensor, weights: LoraWeights, strength: float = 1.0) -> torch.Tensor:
    """Return `weight` plus the adapter's delta at `strength`, in the weight's dtype."""
    return (weight.float() + lora_delta(weights, strength).reshape(weight.shape)).to(weight.dtype)


def lora_state_dict(adapters: Mapping[str, LoraWeights]) -> dict[str, torch.Tensor]:
    """Return the tensors of adapters keyed by module name, under ComfyUI's native LoRA keys."""
    tensors = {}
    for module_name, weights in sorted(adapters.items()):
        up_key, down_key, alpha_key = lora_keys(module_name)
        tensors[up_key] = weights.up.detach().float().contiguous()
        tensors[down_key] = weights.down.detach().float().contiguous()
        tensors[alpha_key] = torch.tensor(float(weights.alpha))
    return tensors


def adapters_from_state_dict(tensors: Mapping[str, torch.Tensor], source: str = "adapter") -> dict[str, LoraWeights]:
    """Return the adapters of a native-format LoRA state dict keyed by module name, checking each is complete."""
    module_names = sorted(key.removesuffix(UP_SUFFIX) for key in tensors if key.endswith(UP_SUFFIX))
    if not module_names:
        raise AdapterMismatchError(
            f"{source} contains no '*{UP_SUFFIX}' tensors, so it is not a LoRA in ComfyUI's native format."
        )

    adapters = {}
    for module_name in module_names:
        up_key, down_key, alpha_key = lora_keys(module_name)
        if down_key not in tensors:
            raise AdapterMismatchError(f"{source} has {up_key} but lacks {down_key}; the file is incomplete. Train or save it again.")
        up, down = tensors[up_key], tensors[down_key]
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise AdapterMismatchError(
                f"{source}: {up_key} {list(up.shape)} and {down_key} {list(down.shape)} are not the factors of one "
                "low-rank adapter (expected [out, rank] and [rank, in])."
            )
        alpha = float(tensors[alpha_key].item()) if alpha_key in tensors else float(down.shape[0])
        adapters[module_name] = LoraWeights(up=up, down=down, alpha=alpha)

    unexpected = sorted(key for key in tensors if not any(key.startswith(name + ".") for name in module_names))
    if unexpected:
        raise AdapterMismatchError(
            f"{source} has tensors that belong to no adapter, for example {unexpected[0]}; it is not a "
            "cross-attention adapter file."
        )
    return adapters


def check_adapters_fit(
    adapters: Mapping[str, LoraWeights], weight_shapes: Mapping[str, tuple[int, ...]], source: str, model_description: str
) -> None:
    """Raise AdapterMismatchError unless every adapter names a module of the model with a matching weight shape.

    `weight_shapes` maps module names (with the `diffusion_model.` prefix) to the shape of their weight.
    """
    for module_name, weights in sorted(adapters.items()):
        shape = weight_shapes.get(module_name)
        if shape is None:
            raise AdapterMismatchError(
                f"{source} adapts {module_name}, which {model_description} does not have. The adapter was made "
                "for another model family; apply it to the kind of checkpoint it was trained on (an SD 1.x "
                "checkpoint for SD-IPC adapters)."
            )
        expected = (weights.up.shape[0], weights.down.shape[1])
        if (shape[0], math.prod(shape[1:])) != expected:
            raise AdapterMismatchError(
                f"{source} was made for a layer of shape {list(expected)} at {module_name}, but {model_description} "
                f"has {list(shape)} there. The adapter belongs to another model family (SD 1.x cross-attention reads "
                "768-dimensional prompts, SD 2.x 1024, SDXL 2048); use the checkpoint family it was trained on."
            )
