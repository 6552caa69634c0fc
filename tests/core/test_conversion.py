"""The closed-form SD-IPC conversion and the image-variation prompt."""

import pytest
import torch

from sdipc_core import (
    DEFAULT_END_TOKEN_NORM,
    PROMPT_LENGTH,
    cached_pseudo_inverse,
    convert_image_embeds,
    end_token_norm,
    projections_from_clip_model,
    truncated_pseudo_inverse,
    variation_prompt,
)
from sdipc_core.errors import ProjectionMismatchError
from sdipc_core.transformers_clip import image_variation_prompts

from clip_fixtures import tiny_clip_model, well_conditioned


def test_round_trip_parallel_to_image_embedding():
    W_t = well_conditioned(64, seed=1)
    f_img = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))

    f_cnvrt = convert_image_embeds(f_img, W_t)
    projected_back = f_cnvrt @ W_t.T

    cosine = torch.nn.functional.cosine_similarity(projected_back, f_img, dim=-1)
    assert cosine.min().item() >= 0.999


def _matrix_with_singular_values(values: list[float], seed: int) -> torch.Tensor:
    """Return a float64 matrix with exactly these singular values, rotated by signed permutations."""
    generator = torch.Generator().manual_seed(seed)
    size = len(values)
    left = torch.eye(size, dtype=torch.float64)[torch.randperm(size, generator=generator)]
    right = torch.eye(size, dtype=torch.float64)[torch.randperm(size, generator=generator)]
    signs = torch.where(torch.rand(size, generator=generator) > 0.5, 1.0, -1.0).double()
    return left @ torch.diag(torch.tensor(values, dtype=torch.float64) * signs) @ right.T


def test_truncation_drops_values_at_or_below_tolerance():
    W_t = _matrix_with_singular_values([2.0, 1.0, 0.5, 0.25, 0.125, 0.0625], seed=3)

    pinv = truncated_pseudo_inverse(W_t, tolerance=0.25)

    inverse_values = torch.linalg.svdvals(pinv.double())
    kept = sorted((1.0 / inverse_values[inverse_values > 1e-6]).tolist())
    assert kept == pytest.approx([0.5, 1.0, 2.0], rel=1e-6)


def test_truncation_at_default_tolerance_on_rotated_matrix():
    left, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    singular_values = torch.tensor([2.0, 1.0, 0.5, 0.31, 0.29, 0.1], dtype=torch.float64)
    W_t = left @ torch.diag(singular_values) @ right.T

    pinv = truncated_pseudo_inverse(W_t)

    assert torch.linalg.matrix_rank(pinv.double(), atol=1e-6).item() == 4


def test_zero_tolerance_gives_full_inverse():
    W_t = well_conditioned(16, seed=5)

    pinv = truncated_pseudo_inverse(W_t, tolerance=0.0)

    assert torch.allclose(pinv @ W_t, torch.eye(16), atol=1e-4)


def test_pseudo_inverse_is_cached_per_matrix():
    W_t = well_conditioned(16, seed=6)

    first = cached_pseudo_inverse(W_t, 0.3)
    second = cached_pseudo_inverse(W_t, 0.3)

    assert first is second


def test_pseudo_inverse_cache_notices_in_place_change():
    W_t = well_conditioned(16, seed=7)
    before = cached_pseudo_inverse(W_t, 0.3)

    W_t.mul_(2.0)
    after = cached_pseudo_inverse(W_t, 0.3)

    assert after is not before
    assert torch.allclose(after, before / 2.0, atol=1e-5)


def test_converted_embedding_has_requested_norm():
    W_t = well_conditioned(32, seed=8)
    f_img = torch.randn(4, 32, generator=torch.Generator().manual_seed(9)) * 7.0

    default_scale = convert_image_embeds(f_img, W_t).norm(dim=-1)
    custom_scale = convert_image_embeds(f_img, W_t, scale=12.0).norm(dim=-1)

    assert torch.allclose(default_scale, torch.full((4,), DEFAULT_END_TOKEN_NORM))
    assert torch.allclose(custom_scale, torch.full((4,), 12.0))


def test_variation_prompt_layout():
    h_sos = torch.randn(32)
    f_cnvrt = torch.randn(3, 32)

    prompt = variation_prompt(h_sos, f_cnvrt)

    assert prompt.shape == (3, PROMPT_LENGTH, 32)
    for index in range(3):
        assert torch.equal(prompt[index, 0], h_sos)
        assert torch.equal(prompt[index, 1:], f_cnvrt[index].expand(PROMPT_LENGTH - 1, 32))


def test_variation_prompt_rejects_mismatched_width():
    with pytest.raises(ProjectionMismatchError, match="Stable Diffusion 1.x"):
        variation_prompt(torch.randn(1024), torch.randn(2, 768))


def test_conversion_rejects_wrong_embedding_size():
    with pytest.raises(ProjectionMismatchError, match="1024 dimensions"):
        convert_image_embeds(torch.randn(1, 1024), torch.randn(768, 768))


def test_end_token_norm_averages_from_first_end_token():
    hidden_states = torch.zeros(2, 5, 3)
    hidden_states[0, 2:, 0] = 4.0  # first prompt: end tokens from position 2, norm 4
    hidden_states[1, 4:, 0] = 10.0  # second prompt: end token at position 4, norm 10
    hidden_states[:, :2, 1] = 100.0  # start and word tokens must not count

    measured = end_token_norm(hidden_states, [2, 4])

    assert measured == pytest.approx((4.0 * 3 + 10.0) / 4)


def test_pack_matches_reference_from_clip_model_outputs():
    model = tiny_clip_model(seed=10)
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))

    with torch.no_grad():
        vision_output = model.vision_model(pixel_values=pixel_values)
        f_img = model.visual_projection(vision_output.pooler_output)
        start_token = torch.tensor([[model.config.text_config.bos_token_id]])
        h_sos = model.text_model(input_ids=start_token).last_hidden_state[0, 0]
        W_t = model.text_projection.weight.double()
        pinv = torch.linalg.pinv(W_t, atol=0.3)
        h = f_img.double() @ pinv.T
        f_cnvrt = 27.5 * h / h.norm(dim=-1, keepdim=True)
        reference = torch.cat([h_sos.double().expand(3, 1, -1), f_cnvrt.unsqueeze(1).expand(3, 76, -1)], dim=1)

    prompts = image_variation_prompts(model, pixel_values)

    assert prompts.shape == (3, 77, 32)
    assert torch.allclose(prompts.double(), reference, atol=1e-5)


def test_projections_from_clip_model_use_linear_layout():
    model = tiny_clip_model(seed=12, joint_dim=24, text_hidden=32, vision_hidden=48)

    projections = projections_from_clip_model(model)

    assert projections.joint_dim == 24
    assert projections.text_hidden_size == 32
    assert projections.vision_hidden_size == 48
