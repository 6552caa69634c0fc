"""SD-IPC Image to Prompt with ComfyUI's real CLIP, CLIP vision and sampler."""

import pytest
import torch

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def projection(pack, clip_file):
    return pack.nodes.projection_loader.load_cached_projections(str(clip_file))


@pytest.fixture(scope="module")
def vision_output(comfy_nodes, clip_vision, load_photos):
    photos = load_photos("dog", 3)
    return comfy_nodes.CLIPVisionEncode().encode(clip_vision, photos, "center")[0]


def test_conditioning_shape_and_start_token(comfy_nodes, pack, sd15, vision_output, projection):
    _model, clip, _vae = sd15
    node = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]()

    conditioning = node.convert(clip, vision_output, projection, 27.5, "fixed")[0]

    assert len(conditioning) == 1
    prompt, extras = conditioning[0]
    assert prompt.shape == (3, 77, 768)
    empty_prompt = comfy_nodes.CLIPTextEncode().encode(clip, "")[0][0][0]
    for index in range(3):
        assert torch.allclose(prompt[index, 0], empty_prompt[0, 0], atol=1e-6)
    assert torch.allclose(prompt[:, 1:].norm(dim=-1), torch.full((3, 76), 27.5), atol=1e-3)
    assert extras["pooled_output"].shape == (3, 768)


def test_each_image_gets_its_own_prompt(pack, sd15, vision_output, projection):
    _model, clip, _vae = sd15
    node = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]()

    prompt = node.convert(clip, vision_output, projection, 27.5, "fixed")[0][0][0]

    assert not torch.allclose(prompt[0, 1], prompt[1, 1])
    assert not torch.allclose(prompt[1, 1], prompt[2, 1])


def test_measured_scale_comes_from_the_text_encoder(comfy_nodes, pack, sd15, vision_output, projection):
    _model, clip, _vae = sd15
    node = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]()
    tokens = clip.tokenize("a photo of a dog")
    encoded = clip.encode_from_tokens(tokens)[0]
    first_end = [pair[0] for pair in tokens["l"][0]].index(49407, 1)
    reference_norm = encoded[first_end:].norm(dim=-1).mean().item()

    prompt = node.convert(clip, vision_output, projection, 27.5, "measured from CLIP")[0][0][0]

    measured = prompt[0, 1].norm().item()
    assert measured != pytest.approx(27.5, abs=1e-3)
    assert measured == pytest.approx(reference_norm, rel=0.25)


def test_conditioning_drives_ksampler(comfy_nodes, pack, sd15, vision_output, projection):
    model, clip, _vae = sd15
    positive = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]().convert(clip, vision_output, projection, 27.5, "fixed")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 3)[0]

    samples = comfy_nodes.KSampler().sample(model, 0, 1, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]

    assert samples.shape == (3, 4, 8, 8)
    assert torch.isfinite(samples).all()


def test_clip_that_is_not_sd1_is_rejected(comfy_nodes, pack, clip_file, vision_output, projection):
    import comfy.sd

    # The same CLIP-L weights loaded as an SD3 text encoder: a real CLIP object with other encoders.
    sd3_clip = comfy.sd.load_clip(ckpt_paths=[str(clip_file)], clip_type=comfy.sd.CLIPType.SD3)
    node = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]()

    with pytest.raises(ValueError, match="not Stable Diffusion 1.x's") as error:
        node.convert(sd3_clip, vision_output, projection, 27.5, "fixed")

    assert "SD 1.x checkpoint" in str(error.value)


def test_vision_output_from_another_clip_is_rejected(pack, sd15, vision_output, projection):
    _model, clip, _vae = sd15
    node = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]()
    wrong_output = {
        "image_embeds": torch.randn(3, 1024),
        "last_hidden_state": torch.randn(3, 257, 1280),
    }

    with pytest.raises(ValueError, match="1024 dimensions") as error:
        node.convert(clip, wrong_output, projection, 27.5, "fixed")

    assert "ViT-L/14" in str(error.value)


def test_start_token_follows_clip_set_last_layer(comfy_nodes, pack, sd15, vision_output, projection):
    _model, clip, _vae = sd15
    node = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]()
    node.convert(clip, vision_output, projection, 27.5, "fixed")  # caches the last layer's start token
    penultimate_clip = comfy_nodes.CLIPSetLastLayer().set_last_layer(clip, -2)[0]

    prompt = node.convert(penultimate_clip, vision_output, projection, 27.5, "fixed")[0][0][0]

    expected = comfy_nodes.CLIPTextEncode().encode(penultimate_clip, "")[0][0][0][0, 0]
    last_layer = comfy_nodes.CLIPTextEncode().encode(clip, "")[0][0][0][0, 0]
    assert torch.allclose(prompt[0, 0], expected, atol=1e-6)
    assert not torch.allclose(expected, last_layer)
