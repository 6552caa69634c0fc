"""Deep prompt tuning of a vision transformer: prompt placement, shapes, gradients, files."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from sdipc_core.errors import SDIPCError
from sdipc_core.prompt_tuning import VisionPromptTuning, run_layers_with_prompts

HIDDEN = 16
TOKENS = 3


class TokenMixingLayer(torch.nn.Module):
    """A layer that adds a linear map of the mean token to every token, so the class token reads the prompts."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return x + self.linear(x.mean(dim=1, keepdim=True))


class RecordingLayer(torch.nn.Module):
    """A layer that stores its input and adds a fixed per-layer offset."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return x + self.offset


def embedded_input(batch: int = 2, patches: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1 + patches, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_without_prompts_layers_run_unchanged():
    layers = [RecordingLayer(1.0), RecordingLayer(2.0)]
    x = embedded_input()

    last, penultimate = run_layers_with_prompts(x, layers, None, keep_layer=-2)

    assert torch.allclose(last, x + 3.0)
    assert torch.allclose(penultimate, x + 1.0)


def test_layers_get_own_prompts_after_class():
    layers = [RecordingLayer(1.0), RecordingLayer(2.0), RecordingLayer(3.0)]
    prompts = VisionPromptTuning(len(layers), TOKENS, HIDDEN, prompt_dim=8).eval()
    x = embedded_input()

    run_layers_with_prompts(x, layers, prompts)

    for index, layer in enumerate(layers):
        assert layer.seen.shape == (2, 1 + TOKENS + 4, HIDDEN)
        assert torch.allclose(layer.seen[:, 1:1 + TOKENS], prompts.layer_prompts(index, 2, x).detach())
    assert torch.equal(layers[0].seen[:, :1], x[:, :1])
    assert torch.equal(layers[0].seen[:, 1 + TOKENS:], x[:, 1:])
    assert torch.allclose(layers[2].seen[:, 1 + TOKENS:], x[:, 1:] + 3.0)


def test_prompt_positions_are_removed_from_outputs():
    layers = [RecordingLayer(0.5), RecordingLayer(0.5)]
    prompts = VisionPromptTuning(2, TOKENS, HIDDEN, prompt_dim=8).eval()
    x = embedded_input()

    last, penultimate = run_layers_with_prompts(x, layers, prompts, keep_layer=-2)

    assert last.shape == x.shape
    assert penultimate.shape == x.shape
    assert torch.allclose(last, x + 1.0)


def test_prompts_change_a_real_clip_class_token():
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    model = CLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    # transformers 5 exposes the vision transformer's parts on CLIPVisionModel itself.
    vision = getattr(model, "vision_model", model)
    embedded = vision.pre_layrnorm(vision.embeddings(pixels))
    layers = [lambda x, layer=layer: layer(x, None) for layer in vision.encoder.layers]
    prompts = VisionPromptTuning(2, TOKENS, HIDDEN, prompt_dim=8).eval()

    with torch.no_grad():
        plain, _ = run_layers_with_prompts(embedded, layers, None)
        tuned, _ = run_layers_with_prompts(embedded, layers, prompts)
        reference = model(pixel_values=pixels).last_hidden_state

    assert torch.allclose(plain, reference, atol=1e-5)
    assert tuned.shape == plain.shape
    assert not torch.allclose(tuned[:, 0], plain[:, 0], atol=1e-3)


def test_gradient_reaches_every_prompt_parameter():
    layers = [TokenMixingLayer(), TokenMixingLayer()]
    prompts = VisionPromptTuning(2, TOKENS, HIDDEN, prompt_dim=8).train()

    last, _ = run_layers_with_prompts(embedded_input(), layers, prompts)
    last[:, 0].sum().backward()

    for name, parameter in prompts.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_dropout_only_in_training():
    prompts = VisionPromptTuning(1, 50, HIDDEN, prompt_dim=8, dropout=0.5)
    like = torch.zeros(1)

    prompts.eval()
    first, second = prompts.layer_prompts(0, 1, like), prompts.layer_prompts(0, 1, like)
    assert torch.equal(first, second)

    prompts.train()
    assert not torch.equal(prompts.layer_prompts(0, 1, like), prompts.layer_prompts(0, 1, like))


def test_layer_prompts_are_layer_normalised():
    prompts = VisionPromptTuning(2, TOKENS, HIDDEN, prompt_dim=8).eval()

    tokens = prompts.layer_prompts(1, 1, torch.zeros(1))[0]

    assert torch.allclose(tokens.mean(dim=-1), torch.zeros(TOKENS), atol=1e-5)
    # Slightly below 1: LayerNorm's epsilon is not negligible next to the small initial variance.
    assert torch.allclose(tokens.var(dim=-1, unbiased=False), torch.ones(TOKENS), atol=0.1)


def test_state_dict_round_trip():
    prompts = VisionPromptTuning(3, TOKENS, HIDDEN, prompt_dim=8, generator=torch.Generator().manual_seed(1)).eval()

    restored = VisionPromptTuning.from_state_dict(prompts.state_dict()).eval()

    assert (restored.num_layers, restored.num_tokens, restored.hidden_size) == (3, TOKENS, HIDDEN)
    for index in range(3):
        assert torch.equal(restored.layer_prompts(index, 1, torch.zeros(1)), prompts.layer_prompts(index, 1, torch.zeros(1)))


def test_foreign_state_dict_is_rejected():
    with pytest.raises(SDIPCError, match="does not contain vision prompts"):
        VisionPromptTuning.from_state_dict({"weight": torch.zeros(2, 2)}, source="other.safetensors")


def test_prompts_for_another_encoder_are_rejected():
    prompts = VisionPromptTuning(24, TOKENS, 1024, prompt_dim=8)

    with pytest.raises(SDIPCError, match="24 layers of width 1024"):
        prompts.check_fits(32, 1280, "vit_l_prompts.safetensors")
    with pytest.raises(SDIPCError, match="for 24 layers but the encoder has 2"):
        run_layers_with_prompts(torch.zeros(1, 5, 1024), [torch.nn.Identity(), torch.nn.Identity()], prompts)
