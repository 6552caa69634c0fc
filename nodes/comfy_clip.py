"""Reading what SD-IPC needs from ComfyUI's CLIP text encoder objects."""

from __future__ import annotations

import numbers
import weakref

import torch

from ..sdipc_core import SDIPCError, end_token_norm
from ..sdipc_core.end_tokens import TokenLayout
from ..sdipc_core.projection import SD1_TEXT_HIDDEN_SIZE

END_TOKEN_ID = 49407
"""CLIP's `<|endoftext|>` token, which SD 1.x's tokenizer also uses as padding."""

# id(clip) -> (weak reference to the CLIP object, (patches uuid, output layer), h_sos)
_start_token_states: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}

SCALE_REFERENCE_PROMPTS = (
    "a photo of a dog",
    "a painting of a mountain landscape at sunset",
    "a close-up photo of a red sneaker on a wooden floor",
    "an illustration of a city street in the rain",
    "a portrait of a woman wearing a hat",
    "a bowl of fruit on a kitchen table",
)
"""Captions encoded to measure the typical end-token norm of a loaded text encoder."""


def check_sd1_clip(clip) -> None:
    """Raise SDIPCError unless `clip` is a Stable Diffusion 1.x (CLIP ViT-L/14 only) text encoder."""
    encoder_names = sorted(clip.tokenize("").keys())
    if encoder_names != ["l"]:
        raise SDIPCError(
            f"The CLIP input is not Stable Diffusion 1.x's: it has the text encoders {encoder_names}, "
            "but SD-IPC needs the single CLIP ViT-L/14 encoder ['l']. Connect the CLIP output of an "
            "SD 1.x checkpoint (for example v1-5-pruned-emaonly.safetensors)."
        )


def start_token_state(clip) -> torch.Tensor:
    """Return `h_sos`, the text encoder's state at the start token, shape [hidden].

    The state depends only on the encoder's weights and output layer, so it is cached per CLIP
    object and recomputed when a LoRA patch or CLIP Set Last Layer changes those.
    """
    key = (getattr(clip.patcher, "patches_uuid", None), getattr(clip, "layer_idx", None))
    cached = _start_token_states.get(id(clip))
    if cached is not None and cached[0]() is clip and cached[1] == key:
        return cached[2]

    check_sd1_clip(clip)
    cond = clip.encode_from_tokens(clip.tokenize(""))
    if cond.shape[-1] != SD1_TEXT_HIDDEN_SIZE:
        raise SDIPCError(
            f"The CLIP input gives {cond.shape[-1]}-dimensional states, but Stable Diffusion 1.x uses "
            f"{SD1_TEXT_HIDDEN_SIZE}. Connect the CLIP output of an SD 1.x checkpoint."
        )
    h_sos = cond[0, 0]
    clip_id = id(clip)
    _start_token_states[clip_id] = (weakref.ref(clip, lambda _: _start_token_states.pop(clip_id, None)), key, h_sos)
    return h_sos


def measure_end_token_norm(clip, prompts: tuple[str, ...] = SCALE_REFERENCE_PROMPTS) -> float:
    """Return the mean norm of the end-token states that `clip` gives for a few ordinary captions."""
    states, first_end_tokens = [], []
    for prompt in prompts:
        tokens = clip.tokenize(prompt)
        states.append(clip.encode_from_tokens(tokens)[:1])
        first_end_tokens.append(end_token_layout(tokens).first_end_tokens[0])
    return end_token_norm(torch.cat(states), first_end_tokens)


def end_token_layout(tokens: dict) -> TokenLayout:
    """Return the positions of the start, word and end tokens in `clip.tokenize(text)` output, chunk by chunk.

    Textual-inversion embeddings appear in the tokens as tensors and count as words.
    """
    chunk_lengths, first_end_tokens = [], []
    for chunk in tokens["l"]:
        first_end = len(chunk)
        for position, pair in enumerate(chunk):
            token = pair[0]
            if position > 0 and isinstance(token, numbers.Integral) and token == END_TOKEN_ID:
                first_end = position
                break
        chunk_lengths.append(len(chunk))
        first_end_tokens.append(first_end)
    return TokenLayout(tuple(chunk_lengths), tuple(first_end_tokens))


def encode_prompt_with_layout(clip, text: str) -> tuple[list, TokenLayout]:
    """Return CLIPTextEncode's conditioning for `text` and the token layout of its chunks.

    The text is tokenized and encoded as CLIP Text Encode does it, so prompt weights, textual
    inversion and prompts longer than 77 tokens behave the same.
    """
    check_sd1_clip(clip)
    tokens = clip.tokenize(text)
    layout = end_token_layout(tokens)
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    for cond, _ in conditioning:
        if cond.shape[1] != layout.length:
            raise SDIPCError(
                f"The CLIP input encoded {layout.length} tokens into {cond.shape[1]} positions, so end-token positions "
                "cannot be located. Connect the CLIP output of a Stable Diffusion 1.x checkpoint."
            )
    return conditioning, layout
