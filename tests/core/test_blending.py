"""Mixing image embeddings before conversion, interpolating them, and mixing prompts."""

import logging
import math

import pytest
import torch

from sdipc_core import SDIPCError, convert_image_embeds, projections_from_clip_model
from sdipc_core.blending import (
    blend_image_embeds,
    clamp_factor,
    interpolate_image_embeds,
    interpolation_factors,
    lerp,
    match_batch_sizes,
    mix_pooled,
    mix_prompts,
    slerp,
)

from clip_fixtures import tiny_clip_model


def embeddings(count: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, size, generator=torch.Generator().manual_seed(seed))


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cosine = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return math.acos(cosine.item())


def test_match_batch_sizes_repeats_single_entry():
    first, second = match_batch_sizes(torch.ones(1, 3), torch.zeros(4, 3))

    assert first.shape == (4, 3)
    assert second.shape == (4, 3)


def test_match_batch_sizes_tiles_divisor_batch():
    first = torch.tensor([[0.0], [1.0]])

    repeated, _ = match_batch_sizes(first, torch.zeros(6, 1))

    assert repeated.flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]


def test_match_batch_sizes_rejects_uneven_batches():
    with pytest.raises(SDIPCError, match="batch of 2 and the image a batch of 3"):
        match_batch_sizes(torch.zeros(2, 1), torch.zeros(3, 1), ("text", "image"))


def test_average_matches_direct_formula():
    f_img = embeddings(3, seed=1)
    weights = [0.5, 2.0, 1.5]

    mixed = blend_image_embeds(f_img, weights, "average")

    expected = (0.5 * f_img[0] + 2.0 * f_img[1] + 1.5 * f_img[2]) / 4.0
    assert mixed.shape == (1, 24)
    assert torch.allclose(mixed[0], expected, atol=1e-6)


def test_normalized_average_matches_direct_formula():
    f_img = embeddings(2, seed=2) * torch.tensor([[1.0], [50.0]])
    weights = [1.0, 3.0]

    mixed = blend_image_embeds(f_img, weights, "normalized average")

    unit = [f_img[i] / f_img[i].norm() for i in range(2)]
    expected = (1.0 * unit[0] + 3.0 * unit[1]) / 4.0
    assert torch.allclose(mixed[0], expected, atol=1e-6)


def test_normalized_average_ignores_embedding_length():
    f_img = embeddings(2, seed=3)
    stretched = f_img * torch.tensor([[1.0], [100.0]])

    plain = blend_image_embeds(f_img, [1.0, 1.0], "normalized average")
    long_second = blend_image_embeds(stretched, [1.0, 1.0], "normalized average")

    assert torch.allclose(plain, long_second, atol=1e-6)


def test_weighted_sum_matches_direct_formula():
    f_img = embeddings(2, seed=4)

    mixed = blend_image_embeds(f_img, [1.0, -0.5], "weighted sum")

    assert torch.allclose(mixed[0], f_img[0] - 0.5 * f_img[1], atol=1e-6)


@pytest.mark.parametrize("mode", ["average", "normalized average", "weighted sum"])
def test_single_unit_weight_reproduces_that_image(mode):
    f_img = embeddings(4, seed=5)

    mixed = blend_image_embeds(f_img, [0.0, 0.0, 1.0, 0.0], mode)

    expected = f_img[2] / f_img[2].norm() if mode == "normalized average" else f_img[2]
    assert torch.allclose(mixed[0], expected, atol=1e-6)


def test_single_unit_weight_converts_to_that_image_prompt():
    model = tiny_clip_model(seed=6)
    W_t = projections_from_clip_model(model).text_projection
    f_img = embeddings(3, seed=7)

    mixed = blend_image_embeds(f_img, [0.0, 1.0, 0.0], "normalized average")

    assert torch.allclose(convert_image_embeds(mixed, W_t), convert_image_embeds(f_img[1:2], W_t), atol=1e-5)


def test_average_and_weighted_sum_convert_alike():
    model = tiny_clip_model(seed=8)
    W_t = projections_from_clip_model(model).text_projection
    f_img = embeddings(3, seed=9)
    weights = [0.2, 1.0, 0.7]

    average = convert_image_embeds(blend_image_embeds(f_img, weights, "average"), W_t)
    weighted_sum = convert_image_embeds(blend_image_embeds(f_img, weights, "weighted sum"), W_t)

    assert torch.allclose(average, weighted_sum, atol=1e-5)


@pytest.mark.parametrize("mode", ["average", "normalized average"])
def test_averages_reject_weights_summing_to_zero(mode):
    with pytest.raises(SDIPCError, match="sum to 0.*weighted sum"):
        blend_image_embeds(embeddings(2, seed=10), [1.0, -1.0], mode)


def test_weighted_sum_allows_difference_of_images():
    f_img = embeddings(2, seed=11)

    mixed = blend_image_embeds(f_img, [1.0, -1.0], "weighted sum")

    assert torch.allclose(mixed[0], f_img[0] - f_img[1], atol=1e-6)


def test_blend_rejects_images_that_cancel_out():
    same_twice = embeddings(1, seed=12).repeat(2, 1)

    with pytest.raises(SDIPCError, match="cancel out"):
        blend_image_embeds(same_twice, [1.0, -1.0], "weighted sum")


def test_blend_rejects_all_zero_weights():
    with pytest.raises(SDIPCError, match="All blend weights are 0"):
        blend_image_embeds(embeddings(2, seed=13), [0.0, 0.0], "weighted sum")


def test_blend_rejects_wrong_weight_count():
    with pytest.raises(SDIPCError, match="2 weights for 3 images"):
        blend_image_embeds(embeddings(3, seed=14), [1.0, 1.0], "average")


def test_blend_rejects_unknown_mode():
    with pytest.raises(SDIPCError, match="Unknown blend mode"):
        blend_image_embeds(embeddings(1, seed=15), [1.0], "median")


@pytest.mark.parametrize("interpolate", [lerp, slerp])
def test_interpolation_endpoints_reproduce_inputs(interpolate):
    a, b = embeddings(2, seed=16)

    assert torch.allclose(interpolate(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(interpolate(a, b, 1.0), b, atol=1e-6)


def test_slerp_keeps_norm():
    a, b = embeddings(2, seed=17)
    b = b * (a.norm() / b.norm())

    for t in torch.linspace(0, 1, 11).tolist():
        assert slerp(a, b, t).norm().item() == pytest.approx(a.norm().item(), rel=1e-5), t


def test_slerp_moves_norm_linearly_for_unequal_norms():
    a, b = embeddings(2, seed=18)
    b = b * (3.0 * a.norm() / b.norm())

    for t in (0.25, 0.5, 0.75):
        expected = (1 - t) * a.norm() + t * b.norm()
        assert slerp(a, b, t).norm().item() == pytest.approx(expected.item(), rel=1e-5), t


def test_slerp_takes_equal_angle_steps():
    a, b = embeddings(2, seed=19)
    points = [slerp(a, b, t) for t in torch.linspace(0, 1, 5).tolist()]

    steps = [angle(points[i], points[i + 1]) for i in range(4)]

    assert steps == pytest.approx([angle(a, b) / 4] * 4, rel=1e-4)


def test_lerp_takes_unequal_angle_steps():
    a, b = embeddings(2, seed=19)
    b = b * (5.0 * a.norm() / b.norm())
    points = [lerp(a, b, t) for t in torch.linspace(0, 1, 5).tolist()]

    steps = [angle(points[i], points[i + 1]) for i in range(4)]

    assert max(steps) > 1.5 * min(steps)


def test_slerp_of_parallel_inputs_keeps_direction():
    a = embeddings(1, seed=20)[0]

    halfway = slerp(a, 2.0 * a, 0.5)

    assert torch.allclose(halfway, 1.5 * a, atol=1e-5)


def test_slerp_rejects_opposite_inputs():
    a = embeddings(1, seed=21)[0]

    with pytest.raises(SDIPCError, match="opposite directions"):
        slerp(a, -a, 0.5)


def test_factor_outside_unit_range_is_clamped_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="sdipc_core.blending"):
        high = clamp_factor(1.5)
        low = clamp_factor(-0.2)

    assert high == 1.0
    assert low == 0.0
    assert len(caplog.records) == 2
    assert "outside [0, 1]" in caplog.records[0].getMessage()


def test_interpolation_with_clamped_factor_gives_endpoint(caplog):
    a, b = embeddings(2, seed=22)

    with caplog.at_level(logging.WARNING, logger="sdipc_core.blending"):
        result = interpolate_image_embeds(a[None], b[None], [1.7], "spherical")

    assert torch.allclose(result[0], b, atol=1e-6)
    assert "1.7" in caplog.text


def test_interpolation_factors_cover_zero_to_one():
    assert interpolation_factors(5, factor=0.3) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert interpolation_factors(1, factor=0.3) == [0.3]


def test_interpolation_factors_reject_zero_steps():
    with pytest.raises(SDIPCError, match="at least 1"):
        interpolation_factors(0, factor=0.5)


def test_interpolation_batches_pair_by_pair():
    a = embeddings(2, seed=23)
    b = embeddings(2, seed=24)
    factors = [0.0, 0.5, 1.0]

    result = interpolate_image_embeds(a, b, factors, "linear")

    assert result.shape == (6, 24)
    for pair in range(2):
        for step, t in enumerate(factors):
            assert torch.allclose(result[pair * 3 + step], (1 - t) * a[pair] + t * b[pair], atol=1e-6)


def test_interpolation_repeats_single_image_against_batch():
    a = embeddings(1, seed=25)
    b = embeddings(3, seed=26)

    result = interpolate_image_embeds(a, b, [0.0], "spherical")

    assert torch.allclose(result, a.expand(3, -1), atol=1e-6)


def test_mix_prompts_repeats_image_over_chunks():
    text = torch.randn(1, 154, 8)
    image = torch.randn(2, 77, 8)

    mixed = mix_prompts(text, image, image_weight=0.3)

    assert mixed.shape == (2, 154, 8)
    for index in range(2):
        for position in (0, 5, 76, 77, 100, 153):
            expected = 0.7 * text[0, position] + 0.3 * image[index, position % 77]
            assert torch.allclose(mixed[index, position], expected, atol=1e-6), (index, position)


def test_mix_prompts_endpoints_reproduce_inputs():
    text = torch.randn(1, 77, 8)
    image = torch.randn(1, 77, 8)

    assert torch.equal(mix_prompts(text, image, 0.0), text)
    assert torch.equal(mix_prompts(text, image, 1.0), image)


def test_mix_prompts_rejects_lengths_that_do_not_tile():
    with pytest.raises(SDIPCError, match="not a multiple"):
        mix_prompts(torch.zeros(1, 77, 8), torch.zeros(1, 154, 8), 0.5)


def test_mix_pooled_uses_available_output():
    pooled = torch.randn(1, 8)

    assert mix_pooled(None, pooled, 0.5) is pooled
    assert mix_pooled(pooled, None, 0.5) is pooled
    assert mix_pooled(None, None, 0.5) is None
