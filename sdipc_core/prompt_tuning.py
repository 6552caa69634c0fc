"""Deep visual prompt tuning of a CLIP vision encoder, the "C" half of SD-IPC-FT.

Learned prompt tokens sit right after the class token at every layer of the vision transformer,
which is the "deep" variant of visual prompt tuning. The first layer receives `[CLS, P_0, patches]`.
Before each later layer `l`, the prompt positions are overwritten with that layer's own prompts `P_l`. Every `P_l` comes from a per-layer embedding through one linear layer shared by all layers,
then dropout and a LayerNorm. The SD-IPC reference setting is 50 tokens per layer with dropout 0.1.
The class token, and with it the image embedding, is read as usual, and the prompt positions are
removed from the hidden states returned, so the output keeps the encoder's usual shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import SDIPCError

DEFAULT_PROMPT_DIM = 256
"""Width of the per-layer prompt embeddings before the shared linear layer."""

DEFAULT_PROMPT_DROPOUT = 0.1

PROMPT_EMBEDDING_STD = 0.02


class VisionPromptTuning(nn.Module):
    """Learned prompt tokens for every layer of a vision transformer.

    Parameters: `prompt_embeddings` [layers, tokens, prompt_dim], the shared `projection`
    (prompt_dim → hidden_size) and the output `norm`.
    """

    def __init__(
        self,
        num_layers: int,
        num_tokens: int,
        hidden_size: int,
        prompt_dim: int = DEFAULT_PROMPT_DIM,
        dropout: float = DEFAULT_PROMPT_DROPOUT,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if num_layers < 1 or num_tokens < 1:
            raise SDIPCError(f"Vision prompt tuning needs at least one layer and one token, got {num_layers} and {num_tokens}.")
        self.prompt_embeddings = nn.Parameter(torch.empty(num_layers, num_tokens, prompt_dim))
        self.projection = nn.Linear(prompt_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

        with torch.no_grad():
            self.prompt_embeddings.normal_(0.0, PROMPT_EMBEDDING_STD, generator=generator)
            bound = (6.0 / (prompt_dim + hidden_size)) ** 0.5
            self.projection.weight.uniform_(-bound, bound, generator=generator)
            self.projection.bias.zero_()

    @property
    def num_layers(self) -> int:
        return self.prompt_embeddings.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.prompt_embeddings.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.projection.out_features

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], source: str = "vision prompts") -> "VisionPromptTuning":
        """Return the module a `state_dict()` was taken from, with its sizes read from the tensor shapes."""
        expected = {"prompt_embeddings", "projection.weight", "projection.bias", "norm.weight", "norm.bias"}
        if set(state_dict) != expected:
            raise SDIPCError(
                f"{source} does not contain vision prompts: expected the tensors {sorted(expected)}, found {sorted(state_dict)}."
            )
        num_layers, num_tokens, prompt_dim = state_dict["prompt_embeddings"].shape
        hidden_size = state_dict["projection.weight"].shape[0]
        module = cls(num_layers, num_tokens, hidden_size, prompt_dim=prompt_dim)
        module.load_state_dict({key: tensor.float() for key, tensor in state_dict.items()})
        return module

    def layer_prompts(self, layer: int, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """Return the prompt tokens for layer `layer`, [batch, tokens, hidden], in `like`'s dtype and device."""
        prompts = self.norm(self.dropout(self.projection(self.prompt_embeddings[layer])))
        return prompts.to(like).unsqueeze(0).expand(batch_size, -1, -1)

    def check_fits(self, num_layers: int, hidden_size: int, source: str) -> None:
        """Raise SDIPCError unless these prompts were made for an encoder of this depth and width."""
        if (self.num_layers, self.hidden_size) != (num_layers, hidden_size):
            raise SDIPCError(
                f"{source} contains prompts for a vision encoder with {self.num_layers} layers of width {self.hidden_size}, "
                f"but the CLIP vision model has {num_layers} layers of width {hidden_size}. Use the CLIP vision model "
                "the prompts were trained with (OpenAI CLIP ViT-L/14 for SD 1.x)."
            )


def run_layers_with_prompts(
    hidden_states: torch.Tensor,
    layers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    prompt_tuning: VisionPromptTuning | None,
    keep_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a vision transformer's layers with prompt tokens after the class token.

    `hidden_states` is the embedded and pre-normalised input, [batch, 1 + patches, hidden], with
    the class token first. Returns the last layer's output and, when `keep_layer` is given (negative
    counts from the end), that layer's output, both without the prompt positions. With no
    `prompt_tuning` the layers run unchanged.
    """
    num_prompts = 0 if prompt_tuning is None else prompt_tuning.num_tokens
    if prompt_tuning is not None and prompt_tuning.num_layers != len(layers):
        raise SDIPCError(
            f"The vision prompts are for {prompt_tuning.num_layers} layers but the encoder has {len(layers)}. "
            "Use the CLIP vision model the prompts were trained with."
        )
    if keep_layer is not None and keep_layer < 0:
        keep_layer += len(layers)

    batch = hidden_states.shape[0]
    x = hidden_states
    kept = None
    for index, layer in enumerate(layers):
        if prompt_tuning is not None:
            prompts = prompt_tuning.layer_prompts(index, batch, x)
            rest = x[:, 1:] if index == 0 else x[:, 1 + num_prompts:]
            x = torch.cat([x[:, :1], prompts, rest], dim=1)

        x = layer(x)

        if index == keep_layer:
            kept = _without_prompts(x, num_prompts)
    return _without_prompts(x, num_prompts), kept


def _without_prompts(x: torch.Tensor, num_prompts: int) -> torch.Tensor:
    if num_prompts == 0:
        return x
    return torch.cat([x[:, :1], x[:, 1 + num_prompts:]], dim=1)
