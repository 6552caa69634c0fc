"""SD-IPC adapter files: cross-attention LoRAs and vision-encoder prompts, as safetensors with metadata.

Both kinds are written atomically with `save_atomic` and read only as safetensors. The LoRA file
uses ComfyUI's native key names (see `lora.py`), so ComfyUI's stock LoRA loaders read it too. Its
`sdipc.*` metadata records the base model, the method and the training settings.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelFileError
from .lora import (
    CROSS_ATTENTION_PROJECTIONS,
    LoraWeights,
    adapters_from_state_dict,
    is_cross_attention_projection,
    lora_state_dict,
)
from .safetensors_io import load_state_dict, read_metadata, save_atomic

FORMAT_VERSION = "1"

KIND_CROSS_ATTENTION_LORA = "cross-attention LoRA"
KIND_VISION_PROMPTS = "vision prompts"

METHOD_FINETUNE = "SD-IPC-FT"
METHOD_CUSTOMIZE = "SD-IPC-CT"

_PREFIX = "sdipc."


@dataclass(frozen=True)
class AdapterMetadata:
    """Training record of an adapter file, stored as `sdipc.*` safetensors metadata."""

    method: str
    """METHOD_FINETUNE or METHOD_CUSTOMIZE."""
    base_model_hash: str
    """`base_model_hash` of the U-Net it was trained on."""
    model_family: str
    """ComfyUI's model class of that U-Net, for example "SD15"."""
    rank: int
    alpha: float
    targets: tuple[str, ...]
    steps: int
    """Optimizer updates the stored weights contain."""
    vision_prompt_tokens: int = 0
    """Prompt tokens per vision-encoder layer trained with the adapter; 0 when the encoder was not tuned."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Further `sdipc.*` entries, such as why training stopped early."""

    def to_strings(self, kind: str) -> dict[str, str]:
        """Return the metadata as the string dictionary a safetensors header stores."""
        strings = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "method": self.method,
            "base_model_hash": self.base_model_hash,
            "model_family": self.model_family,
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "targets": ",".join(self.targets),
            "steps": str(self.steps),
            "vision_prompt_tokens": str(self.vision_prompt_tokens),
            **self.extra,
        }
        return {_PREFIX + key: value for key, value in strings.items()}

    @classmethod
    def from_strings(cls, strings: Mapping[str, str], source: str, kind: str) -> "AdapterMetadata":
        """Parse `sdipc.*` metadata, raising ModelFileError if it is missing or of another kind."""
        values = {key[len(_PREFIX):]: value for key, value in strings.items() if key.startswith(_PREFIX)}
        if "kind" not in values:
            raise ModelFileError(
                f"{source} has no SD-IPC metadata, so it was not written by the SD-IPC trainer. Load other LoRA "
                "files with ComfyUI's Load LoRA node instead."
            )
        if values["kind"] != kind:
            raise ModelFileError(f"{source} contains SD-IPC {values['kind']}, not {kind}. Pick the matching file.")

        known = {"format_version", "kind", "method", "base_model_hash", "model_family", "rank", "alpha", "targets", "steps", "vision_prompt_tokens"}
        try:
            return cls(
                method=values["method"],
                base_model_hash=values["base_model_hash"],
                model_family=values["model_family"],
                rank=int(values["rank"]),
                alpha=float(values["alpha"]),
                targets=tuple(name for name in values["targets"].split(",") if name),
                steps=int(values["steps"]),
                vision_prompt_tokens=int(values.get("vision_prompt_tokens", "0")),
                extra={key: value for key, value in values.items() if key not in known},
            )
        except (KeyError, ValueError) as error:
            raise ModelFileError(f"{source} has invalid SD-IPC metadata ({error}). Train or save the adapter again.") from None


@dataclass
class TrainedAdapter:
    """An adapter as the trainer produces it: cross-attention LoRA weights, optional vision prompts, metadata."""

    lora: dict[str, LoraWeights]
    """Adapters keyed by module name, `diffusion_model.<path>.attn2.<projection>`."""
    metadata: AdapterMetadata
    vision_prompts: dict[str, torch.Tensor] | None = None
    """`VisionPromptTuning.state_dict()`, when the vision encoder was prompt-tuned."""


def base_model_hash(weights: Mapping[str, torch.Tensor]) -> str:
    """Return a 16-hex-digit SHA-256 fingerprint of a U-Net's cross-attention key weights.

    `weights` maps weight names to tensors; only `…attn2.to_k.weight` entries are hashed (a few MB
    for SD 1.x), by name, shape and value rounded to float16. The rounding makes the hash the same
    whether a checkpoint stored in fp16 or fp32 is loaded in fp16 or fp32; a model loaded in bf16 or
    fp8 hashes differently.
    """
    digest = hashlib.sha256()
    names = sorted(name for name in weights if name.endswith("attn2.to_k.weight"))
    if not names:
        raise ModelFileError("The model has no cross-attention layers (attn2.to_k), so it is not a Stable Diffusion U-Net.")
    for name in names:
        tensor = weights[name].detach().to(device="cpu", dtype=torch.float16).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_lora_file(
    adapter: TrainedAdapter,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    before_replace: Callable[[], None] | None = None,
) -> Path:
    """Write the adapter's cross-attention LoRA to `path` atomically; return the path."""
    metadata = adapter.metadata.to_strings(KIND_CROSS_ATTENTION_LORA)
    return save_atomic(lora_state_dict(adapter.lora), path, metadata=metadata, overwrite=overwrite, before_replace=before_replace)


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, LoraWeights], AdapterMetadata]:
    """Read an SD-IPC cross-attention LoRA file; non-safetensors files raise ModelFileError unopened."""
    metadata = AdapterMetadata.from_strings(read_metadata(path), str(path), KIND_CROSS_ATTENTION_LORA)
    adapters = adapters_from_state_dict(load_state_dict(path), source=str(path))
    other_layers = sorted(name for name in adapters if not is_cross_attention_projection(name))
    if other_layers:
        raise ModelFileError(
            f"{path} adapts layers other than cross-attention projections, for example {other_layers[0]}; "
            f"SD-IPC adapters only target attn2.{{{', '.join(CROSS_ATTENTION_PROJECTIONS)}}}."
        )
    return adapters, metadata


def save_vision_prompts_file(
    adapter: TrainedAdapter,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    before_replace: Callable[[], None] | None = None,
) -> Path:
    """Write the adapter's vision-encoder prompts to `path` atomically; return the path."""
    if adapter.vision_prompts is None:
        raise ValueError("This adapter has no vision prompts to save.")
    metadata = adapter.metadata.to_strings(KIND_VISION_PROMPTS)
    return save_atomic(adapter.vision_prompts, path, metadata=metadata, overwrite=overwrite, before_replace=before_replace)


def load_vision_prompts_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterMetadata]:
    """Read an SD-IPC vision-prompt file; non-safetensors files raise ModelFileError unopened."""
    metadata = AdapterMetadata.from_strings(read_metadata(path), str(path), KIND_VISION_PROMPTS)
    return load_state_dict(path), metadata
