"""Prompt-construction and blending nodes with ComfyUI's real CLIP, CLIP vision and sampler."""

import pytest
import torch

pytestmark = pytest.mark.comfyui

END_TOKEN = 49407
WEIGHTED_TEXT = "a photo of a (dog:1.3) on a beach"
# 75 one-token words fill the first chunk, so its only end-token position is 76; the rest spill into a second chunk.
LONG_TEXT = " ".join(["dog"] * 75) + " a (red:1.2) ball in the grass"


def first_end_tokens(clip, text: str) -> list[int]:
    """Return the first end-token index of every 77-token chunk, read straight from ComfyUI's tokens."""
    return [[pair[0] for pair in chunk].index(END_TOKEN, 1) for chunk in clip.tokenize(text)["l"]]


def encode_text(comfy_nodes, clip, text: str) -> torch.Tensor:
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


def node(pack, name: str):
    return pack.NODE_CLASS_MAPPINGS[name]()


@pytest.fixture(scope="module", autouse=True)
def inference_mode():
    """Run every node call under torch.inference_mode, as ComfyUI's executor does."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def projection(pack, clip_file):
    # NOTE: loaded outside inference mode, because cached_pseudo_inverse reads W_t._version, which
    # inference tensors lack. test_projection_loaded_in_inference_mode_converts covers that path.
    with torch.inference_mode(False):
        return pack.nodes.projection_loader.load_cached_projections(str(clip_file))


@pytest.fixture(scope="module")
def dog_output(comfy_nodes, clip_vision, load_photos):
    return comfy_nodes.CLIPVisionEncode().encode(clip_vision, load_photos("dog", 2), "center")[0]


@pytest.fixture(scope="module")
def cat_output(comfy_nodes, clip_vision, load_photos):
    return comfy_nodes.CLIPVisionEncode().encode(clip_vision, load_photos("cat", 1), "center")[0]


@pytest.fixture(scope="module")
def clip(sd15):
    return sd15[1]


@pytest.fixture(scope="module")
def dog_prompt(pack, clip, dog_output, projection):
    return node(pack, "SDIPCImageToPrompt").convert(clip, dog_output, projection, 27.5, "fixed")[0]


@pytest.fixture(scope="module")
def cat_prompt(pack, clip, cat_output, projection):
    return node(pack, "SDIPCImageToPrompt").convert(clip, cat_output, projection, 27.5, "fixed")[0]


def test_projection_loaded_in_inference_mode_converts(pack, clip, clip_file, cat_output):
    # ComfyUI's executor runs every node, the projection loader included, under torch.inference_mode.
    pack.nodes.projection_loader._loaded.clear()
    with torch.inference_mode():
        projection = pack.nodes.projection_loader.load_cached_projections(str(clip_file))
        conditioning = node(pack, "SDIPCBlendImages").blend(
            clip, projection, "average", 27.5, "fixed", clip_vision_output_1=cat_output,
            weight_1=1.0, weight_2=1.0, weight_3=1.0, weight_4=1.0,
        )[0]

    assert conditioning[0][0].shape == (1, 77, 768)
    assert not projection.text_projection.is_inference()


def test_text_edit_positions_match_clip_text_encode(comfy_nodes, pack, clip, dog_prompt):
    text_states = encode_text(comfy_nodes, clip, WEIGHTED_TEXT)
    f_cnvrt = dog_prompt[0][0][:, 1]
    (k,) = first_end_tokens(clip, WEIGHTED_TEXT)

    prompt = node(pack, "SDIPCTextEditedVariation").construct(clip, WEIGHTED_TEXT, dog_prompt, 0.6)[0][0][0]

    assert prompt.shape == (2, 77, 768)
    for index in range(2):
        assert torch.equal(prompt[index, :k], text_states[0, :k])
        expected_end = f_cnvrt[index] + 0.6 * text_states[0, k:]
        assert torch.allclose(prompt[index, k:], expected_end, atol=1e-5)


def test_text_edit_keeps_prompt_weights(comfy_nodes, pack, clip, dog_prompt):
    unweighted = encode_text(comfy_nodes, clip, WEIGHTED_TEXT.replace("(dog:1.3)", "dog"))
    dog_position = 5

    prompt = node(pack, "SDIPCTextEditedVariation").construct(clip, WEIGHTED_TEXT, dog_prompt, 0.6)[0][0][0]

    assert torch.equal(prompt[0, dog_position], encode_text(comfy_nodes, clip, WEIGHTED_TEXT)[0, dog_position])
    assert not torch.allclose(prompt[0, dog_position], unweighted[0, dog_position])


def test_text_edit_alpha_zero(comfy_nodes, pack, clip, dog_prompt):
    (k,) = first_end_tokens(clip, WEIGHTED_TEXT)

    prompt = node(pack, "SDIPCTextEditedVariation").construct(clip, WEIGHTED_TEXT, dog_prompt, 0.0)[0][0][0]

    assert torch.equal(prompt[:, k:], dog_prompt[0][0][:, k:])


def test_text_edit_handles_every_chunk_of_long_prompt(comfy_nodes, pack, clip, dog_prompt):
    text_states = encode_text(comfy_nodes, clip, LONG_TEXT)
    f_cnvrt = dog_prompt[0][0][:, 1]
    first_ends = first_end_tokens(clip, LONG_TEXT)
    assert first_ends[0] == 76

    prompt = node(pack, "SDIPCTextEditedVariation").construct(clip, LONG_TEXT, dog_prompt, 0.6)[0][0][0]

    assert prompt.shape == (2, 77 * len(first_ends), 768)
    for chunk, k in enumerate(first_ends):
        start, end = 77 * chunk, 77 * (chunk + 1)
        assert torch.equal(prompt[:, start : start + k], text_states[:, start : start + k].expand(2, -1, -1))
        expected_end = f_cnvrt.unsqueeze(1) + 0.6 * text_states[:, start + k : end]
        assert torch.allclose(prompt[:, start + k : end], expected_end, atol=1e-5)


def test_text_edit_rejects_empty_text(pack, clip, dog_prompt):
    with pytest.raises(ValueError, match="needs a prompt with words"):
        node(pack, "SDIPCTextEditedVariation").construct(clip, "  ", dog_prompt, 0.6)


def test_text_edit_rejects_text_encoding_as_image(comfy_nodes, pack, clip):
    text_conditioning = comfy_nodes.CLIPTextEncode().encode(clip, "a cat")[0]

    with pytest.raises(ValueError, match="not an SD-IPC image-variation prompt"):
        node(pack, "SDIPCTextEditedVariation").construct(clip, WEIGHTED_TEXT, text_conditioning, 0.6)


def test_end_tokens_only_mode(comfy_nodes, pack, clip):
    text_states = encode_text(comfy_nodes, clip, LONG_TEXT)
    first_ends = first_end_tokens(clip, LONG_TEXT)

    prompt = node(pack, "SDIPCEndTokenPrompt").construct(clip, LONG_TEXT, "end tokens only", 1.0)[0][0][0]

    for chunk, k in enumerate(first_ends):
        start = 77 * chunk
        assert torch.equal(prompt[0, start], text_states[0, start])
        assert torch.equal(prompt[0, start + 1 : start + 77], text_states[0, start + k].expand(76, -1))


def test_mask_words_mode(comfy_nodes, pack, clip):
    text_states = encode_text(comfy_nodes, clip, WEIGHTED_TEXT)
    (k,) = first_end_tokens(clip, WEIGHTED_TEXT)

    prompt = node(pack, "SDIPCEndTokenPrompt").construct(clip, WEIGHTED_TEXT, "mask words", 1.0)[0][0][0]

    assert torch.equal(prompt[0, 0], text_states[0, 0])
    assert torch.count_nonzero(prompt[0, 1:k]).item() == 0
    assert torch.equal(prompt[0, k:], text_states[0, k:])


def test_image_at_end_tokens_mode(comfy_nodes, pack, clip, cat_prompt):
    text_states = encode_text(comfy_nodes, clip, WEIGHTED_TEXT)
    f_cnvrt = cat_prompt[0][0][0, 1]
    (k,) = first_end_tokens(clip, WEIGHTED_TEXT)

    conditioning = node(pack, "SDIPCEndTokenPrompt").construct(clip, WEIGHTED_TEXT, "image at end tokens", 0.25, cat_prompt)[0]

    prompt = conditioning[0][0]
    assert torch.equal(prompt[0, :k], text_states[0, :k])
    assert torch.allclose(prompt[0, k:], 0.75 * text_states[0, k:] + 0.25 * f_cnvrt, atol=1e-5)


def test_image_at_end_tokens_needs_image(pack, clip):
    with pytest.raises(ValueError, match="needs an image"):
        node(pack, "SDIPCEndTokenPrompt").construct(clip, WEIGHTED_TEXT, "image at end tokens", 1.0)


def test_image_as_negative_moves_from_empty_prompt(comfy_nodes, pack, clip, cat_prompt):
    empty = encode_text(comfy_nodes, clip, "")
    image = cat_prompt[0][0]
    negative = node(pack, "SDIPCImageAsNegativePrompt")

    full = negative.construct(clip, cat_prompt, 1.0)[0][0][0]
    none = negative.construct(clip, cat_prompt, 0.0)[0][0][0]
    half = negative.construct(clip, cat_prompt, 0.5)[0][0][0]

    assert torch.allclose(full, image, atol=1e-6)
    assert torch.allclose(none, empty, atol=1e-6)
    assert torch.allclose(half, 0.5 * (empty + image), atol=1e-6)


def test_blend_with_one_weight_reproduces_that_image(pack, clip, projection, dog_output, cat_output, cat_prompt):
    blend = node(pack, "SDIPCBlendImages")

    conditioning = blend.blend(
        clip, projection, "average", 27.5, "fixed",
        clip_vision_output_1=dog_output, weight_1=0.0,
        clip_vision_output_2=cat_output, weight_2=1.0, weight_3=1.0, weight_4=1.0,
    )[0]

    assert conditioning[0][0].shape == (1, 77, 768)
    assert torch.allclose(conditioning[0][0], cat_prompt[0][0], atol=1e-5)


def test_blend_image_weights_pick_one_image_of_batch(pack, clip, projection, dog_output, dog_prompt, cat_output):
    blend = node(pack, "SDIPCBlendImages")

    conditioning = blend.blend(
        clip, projection, "normalized average", 27.5, "fixed", image_weights="0, 1, 0",
        clip_vision_output_1=dog_output, weight_1=1.0,
        clip_vision_output_2=cat_output, weight_2=1.0, weight_3=1.0, weight_4=1.0,
    )[0]

    assert torch.allclose(conditioning[0][0][0], dog_prompt[0][0][1], atol=1e-5)


def test_blend_rejects_weights_summing_to_zero(pack, clip, projection, dog_output, cat_output):
    blend = node(pack, "SDIPCBlendImages")

    with pytest.raises(ValueError, match="sum to 0"):
        blend.blend(
            clip, projection, "average", 27.5, "fixed",
            clip_vision_output_1=dog_output, weight_1=0.5,
            clip_vision_output_2=cat_output, weight_2=-1.0, weight_3=1.0, weight_4=1.0,
        )


def test_blend_rejects_image_weight_count_mismatch(pack, clip, projection, dog_output):
    with pytest.raises(ValueError, match="3 weights but 2 images"):
        node(pack, "SDIPCBlendImages").blend(
            clip, projection, "average", 27.5, "fixed", image_weights="1, 2, 3",
            clip_vision_output_1=dog_output, weight_1=1.0, weight_2=1.0, weight_3=1.0, weight_4=1.0,
        )


def test_blend_rejects_images_of_another_vision_tower(pack, clip, projection, dog_output):
    foreign = {"image_embeds": torch.randn(1, 768), "last_hidden_state": torch.randn(1, 257, 1024)}

    with pytest.raises(ValueError, match="not made by the vision tower"):
        node(pack, "SDIPCBlendImages").blend(
            clip, projection, "average", 27.5, "fixed",
            clip_vision_output_1=dog_output, weight_1=1.0,
            clip_vision_output_2=foreign, weight_2=1.0, weight_3=1.0, weight_4=1.0,
        )


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolation_steps_run_from_first_to_second_image(pack, clip, projection, cat_output, dog_output, cat_prompt, dog_prompt, method):
    first_dog = {"image_embeds": dog_output["image_embeds"][:1], "last_hidden_state": dog_output["last_hidden_state"][:1]}

    conditioning = node(pack, "SDIPCInterpolateImages").interpolate(
        clip, projection, cat_output, first_dog, method, 0.5, 5, 27.5, "fixed"
    )[0]

    prompt = conditioning[0][0]
    assert prompt.shape == (5, 77, 768)
    assert torch.allclose(prompt[0], cat_prompt[0][0][0], atol=1e-4)
    assert torch.allclose(prompt[4], dog_prompt[0][0][0], atol=1e-4)
    cosine_to_dog = torch.nn.functional.cosine_similarity(prompt[:, 1], dog_prompt[0][0][0, 1].expand(5, -1), dim=-1)
    assert (cosine_to_dog.diff() > 0).all()


def test_interpolation_factor_out_of_range_is_clamped(pack, clip, projection, cat_output, cat_prompt, caplog):
    conditioning = node(pack, "SDIPCInterpolateImages").interpolate(
        clip, projection, cat_output, cat_output, "linear", -0.5, 1, 27.5, "fixed"
    )[0]

    assert torch.allclose(conditioning[0][0], cat_prompt[0][0], atol=1e-5)
    assert "outside [0, 1]" in caplog.text


def test_mix_image_and_text_over_long_prompt(comfy_nodes, pack, clip, dog_prompt):
    text_conditioning = comfy_nodes.CLIPTextEncode().encode(clip, LONG_TEXT)[0]
    text_states = text_conditioning[0][0]

    mixed = node(pack, "SDIPCMixImageAndText").mix(text_conditioning, dog_prompt, 0.3)[0]

    prompt = mixed[0][0]
    image = dog_prompt[0][0].repeat(1, text_states.shape[1] // 77, 1)
    assert prompt.shape == (2, text_states.shape[1], 768)
    assert torch.allclose(prompt, 0.7 * text_states + 0.3 * image, atol=1e-5)


def first_image(clip_vision_output) -> dict:
    return {key: clip_vision_output[key][:1] for key in ("image_embeds", "last_hidden_state")}


def test_single_image_conditioning_nodes_chain(
    comfy_nodes, pack, sd15, projection, dog_output, cat_output, cat_prompt
):
    model, clip, _vae = sd15
    dog = first_image(dog_output)
    one_dog_prompt = node(pack, "SDIPCImageToPrompt").convert(clip, dog, projection, 27.5, "fixed")[0]
    edited = node(pack, "SDIPCTextEditedVariation").construct(clip, LONG_TEXT, one_dog_prompt, 0.6)[0]
    blended = node(pack, "SDIPCBlendImages").blend(
        clip, projection, "weighted sum", 27.5, "fixed",
        clip_vision_output_1=dog, weight_1=1.0,
        clip_vision_output_2=cat_output, weight_2=-0.5, weight_3=1.0, weight_4=1.0,
    )[0]
    end_tokens = node(pack, "SDIPCEndTokenPrompt").construct(clip, WEIGHTED_TEXT, "image at end tokens", 1.0, cat_prompt)[0]
    negative = node(pack, "SDIPCImageAsNegativePrompt").construct(clip, cat_prompt, 0.7)[0]

    combined = comfy_nodes.ConditioningCombine().combine(edited, blended)[0]
    averaged = comfy_nodes.ConditioningAverage().addWeighted(combined, end_tokens, 0.8)[0]
    concatenated = comfy_nodes.ConditioningConcat().concat(averaged, blended)[0]
    timed = comfy_nodes.ConditioningSetTimestepRange().set_range(concatenated, 0.0, 0.8)[0]
    positive = comfy_nodes.ConditioningSetArea().append(timed, 64, 64, 0, 0, 1.0)[0]
    latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]

    samples = comfy_nodes.KSampler().sample(model, 0, 1, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]

    assert [entry[0].shape for entry in positive] == [(1, 77 * 2 + 77, 768), (1, 77 + 77, 768)]
    assert samples.shape == (1, 4, 8, 8)
    assert torch.isfinite(samples).all()


def test_batched_outputs_drive_ksampler_batch(comfy_nodes, pack, sd15, projection, dog_output, dog_prompt, cat_prompt):
    model, clip, _vae = sd15
    edited = node(pack, "SDIPCTextEditedVariation").construct(clip, WEIGHTED_TEXT, dog_prompt, 0.6)[0]
    interpolated = node(pack, "SDIPCInterpolateImages").interpolate(
        clip, projection, dog_output, dog_output, "spherical", 0.5, 1, 27.5, "fixed"
    )[0]
    negative = node(pack, "SDIPCImageAsNegativePrompt").construct(clip, cat_prompt, 1.0)[0]

    combined = comfy_nodes.ConditioningCombine().combine(edited, interpolated)[0]
    averaged = comfy_nodes.ConditioningAverage().addWeighted(combined, cat_prompt, 0.7)[0]
    timed = comfy_nodes.ConditioningSetTimestepRange().set_range(averaged, 0.2, 1.0)[0]
    positive = comfy_nodes.ConditioningSetArea().append(timed, 64, 64, 0, 0, 1.0)[0]
    latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 2)[0]

    samples = comfy_nodes.KSampler().sample(model, 0, 1, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]

    assert [entry[0].shape[0] for entry in positive] == [2, 2]
    assert samples.shape == (2, 4, 8, 8)
    assert torch.isfinite(samples).all()
