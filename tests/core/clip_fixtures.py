"""Small random-weight transformers CLIP models for the core tier."""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel

CLIP_VOCAB_SIZE = 49408  # the real vocabulary, so the real start and end token ids are valid


def tiny_clip_model(seed: int = 0, joint_dim: int = 24, text_hidden: int = 32, vision_hidden: int = 48) -> CLIPModel:
    """Return a small CLIPModel with random weights, in eval mode."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=text_hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=joint_dim,
    )
    return CLIPModel(config).eval()


def well_conditioned(size: int, seed: int = 0, smallest: float = 0.5, largest: float = 2.0) -> torch.Tensor:
    """Return a random square matrix whose singular values lie in [smallest, largest]."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    singular_values = torch.linspace(smallest, largest, size)
    return left @ torch.diag(singular_values) @ right.T
