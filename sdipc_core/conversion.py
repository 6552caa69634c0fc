"""SD-IPC: closed-form conversion of CLIP image embeddings into text-encoder prompts.

Ding et al., "The CLIP Model is Secretly an Image-to-Prompt Converter", NeurIPS 2023. CLIP aligns
`f_img = W_i p` with `f_txt = W_t h_eos`, so the truncated pseudo-inverse of the text projection maps
an image embedding to a state close to the end-token state a matching caption would have had:

    f_cnvrt = s · normalize(W_t⁺ f_img)

and the image-variation prompt is the start-token state followed by `f_cnvrt` at every other position.
"""

from __future__ import annotations

import weakref

import torch

from .errors import ProjectionMismatchError

DEFAULT_SINGULAR_VALUE_TOLERANCE = 0.3
"""Singular values of `W_t` at or below this are dropped from the pseudo-inverse; the SD-IPC authors' inference code uses 0.3."""

DEFAULT_END_TOKEN_NORM = 27.5
"""Typical norm of an SD 1.x end-token state, the default scale `s` of the converted prompt."""

PROMPT_LENGTH = 77
"""Token positions in one CLIP text-encoder prompt (one start token, up to 75 words, end tokens)."""

# id(W_t) -> (weak reference to W_t, (tolerance, version), pseudo-inverse). Keyed by id because tensors
# compare element-wise, which rules out WeakKeyDictionary; the weak reference detects a reused id.
_pinv_cache: dict[int, tuple[weakref.ref, tuple[float, int], torch.Tensor]] = {}


def truncated_pseudo_inverse(W_t: torch.Tensor, tolerance: float = DEFAULT_SINGULAR_VALUE_TOLERANCE) -> torch.Tensor:
    """Return the pseudo-inverse of `W_t` with singular values at or below `tolerance` dropped.

    Computed in float64 through an explicit SVD, so that the cut is exact at the tolerance
    (`torch.linalg.pinv(atol=...)` keeps values equal to the tolerance).
    """
    U, S, Vh = torch.linalg.svd(W_t.double(), full_matrices=False)
    kept = S > tolerance
    inverse_values = torch.where(kept, 1.0 / torch.where(kept, S, torch.ones_like(S)), torch.zeros_like(S))
    return ((Vh.T * inverse_values) @ U.T).to(torch.float32)


def cached_pseudo_inverse(W_t: torch.Tensor, tolerance: float = DEFAULT_SINGULAR_VALUE_TOLERANCE) -> torch.Tensor:
    """Return `truncated_pseudo_inverse(W_t, tolerance)`, computed once per matrix and tolerance.

    The cache keeps a weak reference to the matrix and is keyed by its in-place version counter, so a matrix that
    is freed or modified gets a fresh inverse.
    """
    # Inference tensors (made under torch.inference_mode, as in ComfyUI's executor) have no version
    # counter and cannot be modified in place outside that mode, so their version is constant.
    version = 0 if W_t.is_inference() else W_t._version
    key = (float(tolerance), version)
    cached = _pinv_cache.get(id(W_t))
    if cached is not None and cached[0]() is W_t and cached[1] == key:
        return cached[2]

    pinv = truncated_pseudo_inverse(W_t, tolerance)
    matrix_id = id(W_t)
    _pinv_cache[matrix_id] = (weakref.ref(W_t, lambda _: _pinv_cache.pop(matrix_id, None)), key, pinv)
    return pinv


def convert_image_embeds(
    image_embeds: torch.Tensor,
    W_t: torch.Tensor,
    *,
    scale: float = DEFAULT_END_TOKEN_NORM,
    tolerance: float = DEFAULT_SINGULAR_VALUE_TOLERANCE,
    use_cache: bool = True,
) -> torch.Tensor:
    """Return `f_cnvrt = scale · normalize(W_t⁺ f_img)` for a batch of image embeddings.

    `image_embeds` is `f_img = W_i p`, shape [N, joint_dim], unnormalised (ComfyUI's
    `CLIP_VISION_OUTPUT["image_embeds"]`). The result has shape [N, text_hidden_size].
    """
    if image_embeds.shape[-1] != W_t.shape[0]:
        raise ProjectionMismatchError(
            f"Image embeddings have {image_embeds.shape[-1]} dimensions but the text projection maps to "
            f"{W_t.shape[0]}. Use a vision model and a projection from the same CLIP."
        )

    W_t_pinv = cached_pseudo_inverse(W_t, tolerance) if use_cache else truncated_pseudo_inverse(W_t, tolerance)
    h = image_embeds.float() @ W_t_pinv.to(image_embeds.device).T
    return scale * torch.nn.functional.normalize(h, dim=-1)


def variation_prompt(h_sos: torch.Tensor, f_cnvrt: torch.Tensor, length: int = PROMPT_LENGTH) -> torch.Tensor:
    """Return the image-variation prompt `[h_sos, f_cnvrt × (length - 1)]`, shape [N, length, hidden].

    `h_sos` is the text encoder's start-token state ([hidden] or [1, hidden]); it is the same for
    every prompt because the encoder's attention is causal.
    """
    if h_sos.shape[-1] != f_cnvrt.shape[-1]:
        raise ProjectionMismatchError(
            f"The text encoder's states have {h_sos.shape[-1]} dimensions but the converted image prompt has "
            f"{f_cnvrt.shape[-1]}. Use the CLIP of a Stable Diffusion 1.x checkpoint with the CLIP ViT-L/14 projection."
        )

    batch = f_cnvrt.shape[0]
    start = h_sos.reshape(1, 1, -1).to(f_cnvrt).expand(batch, 1, -1)
    end_tokens = f_cnvrt.unsqueeze(1).expand(batch, length - 1, -1)
    return torch.cat([start, end_tokens], dim=1)


def end_token_norm(hidden_states: torch.Tensor, first_end_token_index: torch.Tensor | list[int]) -> float:
    """Return the mean norm of the end-token states of encoded prompts, a measured scale `s`.

    `hidden_states` is [B, length, hidden]; positions from each prompt's first end token onward are
    averaged.
    """
    positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)
    first = torch.as_tensor(first_end_token_index, device=hidden_states.device).reshape(-1, 1)
    mask = positions.unsqueeze(0) >= first
    norms = hidden_states.float().norm(dim=-1)
    return (norms[mask].mean()).item()
