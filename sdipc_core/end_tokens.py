"""End-token prompt constructions: text-edited image variation and its relatives.

Ding et al., "The CLIP Model is Secretly an Image-to-Prompt Converter" (NeurIPS 2023), find that
Stable Diffusion 1.x follows the end-token states of a prompt far more than its word states. Every
construction here keeps the start token of each 77-token chunk and rewrites word or end-token
positions of an encoded prompt `c_text`:

    text-edited variation   c[j] = f_cnvrt + α·c_text[j]           at end-token positions j
    end tokens only         c[j] = c_text[k]  for j = 1..76        ([sos, eos, …, eos])
    masked words            c[j] = 0          at word positions
    image at end tokens     c[j] = (1 - w)·c_text[j] + w·f_cnvrt   at end-token positions j

k is the chunk's first end token. Positions k..76 are the end token and the end-token padding the
tokenizer adds, so a chunk filled with words may have a single end-token position, 76.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .blending import match_batch_sizes
from .conversion import PROMPT_LENGTH
from .errors import ProjectionMismatchError, SDIPCError

DEFAULT_TEXT_EDIT_ALPHA = 0.6
"""α, the weight of the text's own end-token states in a text-edited variation."""

_VARIATION_PROMPT_TOLERANCE = 1e-3
"""Relative difference allowed between the end-token positions of an image-variation prompt."""


@dataclass(frozen=True)
class TokenLayout:
    """Positions of the start, word and end tokens in an encoded prompt of one or more chunks.

    Chunk i has `chunk_lengths[i]` positions: the start token at its first position, words up to
    position `first_end_tokens[i] - 1` within the chunk, and end tokens from `first_end_tokens[i]` on.
    A chunk without an end token has `first_end_tokens[i] == chunk_lengths[i]`.
    """

    chunk_lengths: tuple[int, ...]
    first_end_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.chunk_lengths or len(self.chunk_lengths) != len(self.first_end_tokens):
            raise SDIPCError(
                f"A token layout needs one first-end-token index per chunk, but {len(self.first_end_tokens)} were "
                f"given for {len(self.chunk_lengths)} chunks."
            )
        for length, first_end in zip(self.chunk_lengths, self.first_end_tokens):
            if not 1 <= first_end <= length:
                raise SDIPCError(f"First end token at {first_end} is outside a chunk of {length} positions.")

    @classmethod
    def single_chunk(cls, first_end_token: int, length: int = PROMPT_LENGTH) -> "TokenLayout":
        """Return the layout of a one-chunk prompt whose first end token is at `first_end_token`."""
        return cls((length,), (first_end_token,))

    @property
    def length(self) -> int:
        return sum(self.chunk_lengths)

    @property
    def has_words(self) -> bool:
        return any(first_end > 1 for first_end in self.first_end_tokens)

    @property
    def chunk_offsets(self) -> list[int]:
        offsets = [0]
        for length in self.chunk_lengths[:-1]:
            offsets.append(offsets[-1] + length)
        return offsets

    @cached_property
    def end_mask(self) -> torch.Tensor:
        """Boolean [length], true at the end token and end-token padding of every chunk."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        for offset, length, first_end in zip(self.chunk_offsets, self.chunk_lengths, self.first_end_tokens):
            mask[offset + first_end : offset + length] = True
        return mask

    @cached_property
    def word_mask(self) -> torch.Tensor:
        """Boolean [length], true at the word positions of every chunk."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        for offset, first_end in zip(self.chunk_offsets, self.first_end_tokens):
            mask[offset + 1 : offset + first_end] = True
        return mask

    @cached_property
    def start_mask(self) -> torch.Tensor:
        """Boolean [length], true at the start token of every chunk."""
        mask = torch.zeros(self.length, dtype=torch.bool)
        mask[self.chunk_offsets] = True
        return mask


def text_edited_prompt(
    c_text: torch.Tensor, f_cnvrt: torch.Tensor, layout: TokenLayout, alpha: float = DEFAULT_TEXT_EDIT_ALPHA
) -> torch.Tensor:
    """Return the text-edited variation prompt, `f_cnvrt + α·c_text[j]` at every end-token position j.

    `c_text` is the encoded edit text [B, L, hidden] and `f_cnvrt` the converted images [N, hidden];
    batches follow `match_batch_sizes`. Start and word positions keep the text's states, prompt
    weights included. With α = 0 the end tokens are the image alone.
    """
    _check_prompt(c_text, layout)
    _require_words(layout, "A text-edited variation", "use the plain image-variation prompt")
    _require_end_tokens(layout)
    c_text, f_cnvrt = _match_image_to_prompt(c_text, f_cnvrt)

    prompt = c_text.clone()
    end = layout.end_mask.to(c_text.device)
    prompt[:, end] = f_cnvrt.unsqueeze(1) + alpha * c_text[:, end]
    return prompt


def text_edited_pooled(pooled_text: torch.Tensor | None, f_cnvrt: torch.Tensor, alpha: float = DEFAULT_TEXT_EDIT_ALPHA) -> torch.Tensor:
    """Return the pooled output matching `text_edited_prompt`, `f_cnvrt + α·pooled_text`, or `f_cnvrt` without one.

    SD 1.x's CLIP pools the first end-token state, so this is the edited prompt's first end-token state.
    """
    if pooled_text is None:
        return f_cnvrt
    pooled_text, f_cnvrt = match_batch_sizes(pooled_text, f_cnvrt.to(pooled_text), ("text pooled output", "image input"))
    return f_cnvrt + alpha * pooled_text


def end_tokens_only_prompt(c_text: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Return `[sos, eos, …, eos]`: each chunk's first end-token state at every position after its start token."""
    _check_prompt(c_text, layout)
    _require_words(layout, "An end-tokens-only prompt")
    _require_end_tokens(layout)

    prompt = c_text.clone()
    for offset, length, first_end in zip(layout.chunk_offsets, layout.chunk_lengths, layout.first_end_tokens):
        eos = c_text[:, offset + first_end].unsqueeze(1)
        prompt[:, offset + 1 : offset + length] = eos.expand(-1, length - 1, -1)
    return prompt


def masked_words_prompt(c_text: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Return the prompt with every word position set to zero; start and end tokens are kept.

    In SD 1.x cross-attention the key and value projections have no bias, so a zero state adds no
    content, though it still takes a share of the attention (its logit is 0).
    """
    _check_prompt(c_text, layout)
    _require_words(layout, "Masking words")

    prompt = c_text.clone()
    prompt[:, layout.word_mask.to(c_text.device)] = 0.0
    return prompt


def image_at_end_tokens_prompt(
    c_text: torch.Tensor, f_cnvrt: torch.Tensor, layout: TokenLayout, image_weight: float = 1.0
) -> torch.Tensor:
    """Return the prompt with `(1 - w)·c_text[j] + w·f_cnvrt` at every end-token position j.

    Start and word positions keep the text's states. An empty prompt is allowed. It has no words, so
    every position after the start token becomes the blend with the image.
    """
    _check_prompt(c_text, layout)
    _require_end_tokens(layout)
    c_text, f_cnvrt = _match_image_to_prompt(c_text, f_cnvrt)

    prompt = c_text.clone()
    end = layout.end_mask.to(c_text.device)
    prompt[:, end] = (1.0 - image_weight) * c_text[:, end] + image_weight * f_cnvrt.unsqueeze(1)
    return prompt


def image_end_token_state(image_prompt: torch.Tensor) -> torch.Tensor:
    """Return `f_cnvrt` [N, hidden] from image-variation prompts `[h_sos, f_cnvrt × (L - 1)]`.

    Raises SDIPCError when the positions after the start token differ, which means the prompt is not
    an image-variation prompt (a text encoding, or one already mixed with text).
    """
    if image_prompt.dim() != 3 or image_prompt.shape[1] < 2:
        raise SDIPCError(
            f"The image prompt has shape {tuple(image_prompt.shape)}, but SD-IPC's image conversion returns [N, 77, hidden]."
        )

    f_cnvrt = image_prompt[:, 1]
    with torch.no_grad():
        deviation = (image_prompt[:, 1:].float() - f_cnvrt.float().unsqueeze(1)).norm(dim=-1).max().item()
        allowed = _VARIATION_PROMPT_TOLERANCE * max(f_cnvrt.float().norm(dim=-1).max().item(), 1.0)
    if deviation > allowed:
        raise SDIPCError(
            "The image prompt is not an SD-IPC image-variation prompt: its positions after the start token differ "
            f"(by up to {deviation:.3g}). Use an image prompt as SD-IPC's image conversion or image blending "
            "returns it, not a text encoding or a prompt already mixed with text."
        )
    return f_cnvrt


def _check_prompt(c_text: torch.Tensor, layout: TokenLayout) -> None:
    if c_text.dim() != 3 or c_text.shape[1] != layout.length:
        raise SDIPCError(
            f"The encoded prompt has shape {tuple(c_text.shape)} but its tokens cover {layout.length} positions. "
            "Encode the prompt with the same CLIP and text the tokens came from."
        )


def _require_words(layout: TokenLayout, construction: str, alternative: str = "") -> None:
    if not layout.has_words:
        fix = f"Type a prompt, or {alternative}." if alternative else "Type a prompt."
        raise SDIPCError(f"{construction} needs a prompt with words, but the prompt is empty. {fix}")


def _require_end_tokens(layout: TokenLayout) -> None:
    if not layout.end_mask.any():
        raise SDIPCError("The prompt has no end-token positions. Use a CLIP text encoder that ends prompts with an end token.")


def _match_image_to_prompt(c_text: torch.Tensor, f_cnvrt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if f_cnvrt.shape[-1] != c_text.shape[-1]:
        raise ProjectionMismatchError(
            f"The converted image has {f_cnvrt.shape[-1]} dimensions but the text encoder's states have "
            f"{c_text.shape[-1]}. Use the CLIP of a Stable Diffusion 1.x checkpoint with the CLIP ViT-L/14 projection."
        )
    return match_batch_sizes(c_text, f_cnvrt.to(c_text), ("text prompt", "image input"))
