"""End-token prompt constructions, checked against direct per-position computations."""

import pytest
import torch

from sdipc_core import SDIPCError, convert_image_embeds, projections_from_clip_model, variation_prompt
from sdipc_core.errors import ProjectionMismatchError
from sdipc_core.end_tokens import (
    TokenLayout,
    end_tokens_only_prompt,
    image_at_end_tokens_prompt,
    image_end_token_state,
    masked_words_prompt,
    text_edited_pooled,
    text_edited_prompt,
)

from clip_fixtures import tiny_clip_model

START, END = 49406, 49407
LENGTH = 77


def chunk_ids(words: list[int]) -> list[int]:
    """Return one 77-token chunk as SD 1.x's tokenizer pads it: start, words, end, end padding."""
    return [START, *words, END] + [END] * (LENGTH - len(words) - 2)


def first_end(ids: list[int]) -> int:
    return next(position for position, token in enumerate(ids) if position > 0 and token == END)


@pytest.fixture(scope="module")
def model():
    return tiny_clip_model(seed=20)


def encode(model, chunks: list[list[int]]) -> torch.Tensor:
    """Encode chunks one by one and concatenate them along the token axis, as ComfyUI does."""
    with torch.no_grad():
        states = [model.text_model(input_ids=torch.tensor([ids])).last_hidden_state for ids in chunks]
    return torch.cat(states, dim=1)


def layout_of(chunks: list[list[int]]) -> TokenLayout:
    return TokenLayout(tuple(len(ids) for ids in chunks), tuple(first_end(ids) for ids in chunks))


def converted_images(model, count: int, seed: int) -> torch.Tensor:
    projections = projections_from_clip_model(model)
    f_img = torch.randn(count, projections.joint_dim, generator=torch.Generator().manual_seed(seed))
    return convert_image_embeds(f_img, projections.text_projection, scale=27.5, use_cache=False)


def test_layout_marks_start_word_and_end_positions():
    full_chunk = [START, *range(1000, 1075), END]
    short_chunk = chunk_ids([500, 501, 502])
    layout = layout_of([full_chunk, short_chunk])

    assert layout.length == 2 * LENGTH
    assert layout.start_mask.nonzero().flatten().tolist() == [0, LENGTH]
    assert layout.word_mask.nonzero().flatten().tolist() == list(range(1, 76)) + [LENGTH + 1, LENGTH + 2, LENGTH + 3]
    assert layout.end_mask.nonzero().flatten().tolist() == [76] + list(range(LENGTH + 4, 2 * LENGTH))
    assert layout.has_words


def test_layout_of_empty_prompt_has_no_words():
    layout = TokenLayout.single_chunk(1)

    assert not layout.has_words
    assert layout.end_mask.sum().item() == 76


def test_layout_rejects_end_token_outside_chunk():
    with pytest.raises(SDIPCError, match="outside a chunk"):
        TokenLayout((77,), (78,))


def test_text_edited_prompt_matches_direct_formula(model):
    chunks = [chunk_ids([320, 1125, 539, 320, 1929])]
    c_text = encode(model, chunks)
    f_cnvrt = converted_images(model, 1, seed=21)
    alpha = 0.6

    prompt = text_edited_prompt(c_text, f_cnvrt, layout_of(chunks), alpha)

    ids = chunks[0]
    k = first_end(ids)
    for position in range(LENGTH):
        if position < k:
            expected = c_text[0, position]
        else:
            expected = f_cnvrt[0] + alpha * c_text[0, position]
        assert torch.allclose(prompt[0, position], expected, atol=1e-6), position


def test_text_edited_alpha_zero_gives_image_and_words(model):
    chunks = [chunk_ids([320, 1125])]
    c_text = encode(model, chunks)
    f_cnvrt = converted_images(model, 1, seed=22)

    prompt = text_edited_prompt(c_text, f_cnvrt, layout_of(chunks), alpha=0.0)

    assert torch.equal(prompt[0, :3], c_text[0, :3])
    assert torch.equal(prompt[0, 3:], f_cnvrt[0].expand(LENGTH - 3, -1))


def test_text_edited_handles_every_chunk(model):
    full_chunk = [START, *range(2000, 2075), END]
    second_chunk = chunk_ids([320, 1125, 539])
    chunks = [full_chunk, second_chunk]
    c_text = encode(model, chunks)
    f_cnvrt = converted_images(model, 1, seed=23)

    prompt = text_edited_prompt(c_text, f_cnvrt, layout_of(chunks), alpha=0.5)

    assert prompt.shape == (1, 2 * LENGTH, c_text.shape[-1])
    assert torch.equal(prompt[0, :76], c_text[0, :76])
    assert torch.allclose(prompt[0, 76], f_cnvrt[0] + 0.5 * c_text[0, 76])
    assert torch.equal(prompt[0, LENGTH : LENGTH + 4], c_text[0, LENGTH : LENGTH + 4])
    expected_end = f_cnvrt[0] + 0.5 * c_text[0, LENGTH + 4 :]
    assert torch.allclose(prompt[0, LENGTH + 4 :], expected_end)


def test_text_edited_repeats_text_for_image_batch(model):
    chunks = [chunk_ids([320, 1125])]
    c_text = encode(model, chunks)
    f_cnvrt = converted_images(model, 3, seed=24)

    prompt = text_edited_prompt(c_text, f_cnvrt, layout_of(chunks), alpha=0.6)

    assert prompt.shape[0] == 3
    for index in range(3):
        assert torch.equal(prompt[index, :3], c_text[0, :3])
        assert torch.allclose(prompt[index, 3], f_cnvrt[index] + 0.6 * c_text[0, 3])


def test_text_edited_rejects_uneven_batches(model):
    chunks = [chunk_ids([320])]
    c_text = encode(model, chunks).repeat(2, 1, 1)
    f_cnvrt = converted_images(model, 3, seed=25)

    with pytest.raises(SDIPCError, match="batch of 2 .* batch of 3"):
        text_edited_prompt(c_text, f_cnvrt, layout_of(chunks))


def test_text_edited_rejects_empty_prompt(model):
    chunks = [chunk_ids([])]
    c_text = encode(model, chunks)

    with pytest.raises(SDIPCError, match="needs a prompt with words"):
        text_edited_prompt(c_text, converted_images(model, 1, seed=26), layout_of(chunks))


def test_text_edited_rejects_other_width():
    layout = TokenLayout.single_chunk(3)

    with pytest.raises(ProjectionMismatchError, match="1024 dimensions"):
        text_edited_prompt(torch.zeros(1, LENGTH, 768), torch.zeros(1, 1024), layout)


def test_text_edited_rejects_layout_of_other_prompt(model):
    c_text = encode(model, [chunk_ids([320])])

    with pytest.raises(SDIPCError, match="cover 154 positions"):
        text_edited_prompt(c_text, converted_images(model, 1, seed=27), TokenLayout((77, 77), (2, 2)))


def test_text_edited_pooled_adds_alpha_times_text():
    pooled_text = torch.randn(1, 8)
    f_cnvrt = torch.randn(2, 8)

    pooled = text_edited_pooled(pooled_text, f_cnvrt, alpha=0.25)

    assert torch.allclose(pooled, f_cnvrt + 0.25 * pooled_text)
    assert torch.equal(text_edited_pooled(None, f_cnvrt), f_cnvrt)


def test_end_tokens_only_copies_first_end_state(model):
    full_chunk = [START, *range(3000, 3075), END]
    second_chunk = chunk_ids([320, 1125, 539, 320])
    chunks = [full_chunk, second_chunk]
    c_text = encode(model, chunks)

    prompt = end_tokens_only_prompt(c_text, layout_of(chunks))

    for offset, ids in ((0, full_chunk), (LENGTH, second_chunk)):
        eos = c_text[0, offset + first_end(ids)]
        assert torch.equal(prompt[0, offset], c_text[0, offset])
        for position in range(1, LENGTH):
            assert torch.equal(prompt[0, offset + position], eos), (offset, position)


def test_end_tokens_only_rejects_empty_prompt(model):
    chunks = [chunk_ids([])]

    with pytest.raises(SDIPCError, match="needs a prompt with words"):
        end_tokens_only_prompt(encode(model, chunks), layout_of(chunks))


def test_masked_words_zeroes_word_positions_only(model):
    chunks = [chunk_ids([320, 1125, 539])]
    c_text = encode(model, chunks)

    prompt = masked_words_prompt(c_text, layout_of(chunks))

    assert torch.equal(prompt[0, 0], c_text[0, 0])
    assert torch.count_nonzero(prompt[0, 1:4]).item() == 0
    assert torch.equal(prompt[0, 4:], c_text[0, 4:])


def test_image_at_end_tokens_blends_by_weight(model):
    chunks = [chunk_ids([320, 1125])]
    c_text = encode(model, chunks)
    f_cnvrt = converted_images(model, 2, seed=28)

    prompt = image_at_end_tokens_prompt(c_text, f_cnvrt, layout_of(chunks), image_weight=0.25)

    for index in range(2):
        assert torch.equal(prompt[index, :3], c_text[0, :3])
        for position in range(3, LENGTH):
            expected = 0.75 * c_text[0, position] + 0.25 * f_cnvrt[index]
            assert torch.allclose(prompt[index, position], expected, atol=1e-6), (index, position)


def test_image_at_end_tokens_full_weight_is_edit(model):
    chunks = [chunk_ids([320, 1125])]
    c_text = encode(model, chunks)
    f_cnvrt = converted_images(model, 1, seed=29)
    layout = layout_of(chunks)

    placed = image_at_end_tokens_prompt(c_text, f_cnvrt, layout, image_weight=1.0)
    edited = text_edited_prompt(c_text, f_cnvrt, layout, alpha=0.0)

    assert torch.equal(placed, edited)


def test_image_at_end_tokens_accepts_empty_prompt(model):
    chunks = [chunk_ids([])]
    c_text = encode(model, chunks)
    f_cnvrt = converted_images(model, 1, seed=30)

    prompt = image_at_end_tokens_prompt(c_text, f_cnvrt, layout_of(chunks), image_weight=1.0)

    assert torch.equal(prompt, variation_prompt(c_text[0, 0], f_cnvrt))


def test_image_end_token_state_reads_variation_prompt():
    h_sos = torch.randn(16)
    f_cnvrt = torch.randn(3, 16)

    recovered = image_end_token_state(variation_prompt(h_sos, f_cnvrt))

    assert torch.equal(recovered, f_cnvrt)


def test_image_end_token_state_rejects_text_encoding(model):
    c_text = encode(model, [chunk_ids([320, 1125])])

    with pytest.raises(SDIPCError, match="not an SD-IPC image-variation prompt"):
        image_end_token_state(c_text)
