"""Cross-attention LoRA maths and ComfyUI's native LoRA key names."""

import pytest
import torch

from sdipc_core.errors import SDIPCError
from sdipc_core.lora import (
    AdapterMismatchError,
    LoraWeights,
    adapters_from_state_dict,
    apply_lora,
    check_adapters_fit,
    check_rank,
    cross_attention_modules,
    init_lora_weights,
    lora_delta,
    lora_keys,
    lora_state_dict,
    parse_targets,
)

# Transformer blocks of the SD 1.5 U-Net (ComfyUI's openaimodel layout, context_dim 768), written
# out by hand: input levels 1-3 have two each, the middle block one, output levels 0-2 three each.
SD15_TRANSFORMERS = {
    "input_blocks.1.1": 320, "input_blocks.2.1": 320,
    "input_blocks.4.1": 640, "input_blocks.5.1": 640,
    "input_blocks.7.1": 1280, "input_blocks.8.1": 1280,
    "middle_block.1": 1280,
    "output_blocks.3.1": 1280, "output_blocks.4.1": 1280, "output_blocks.5.1": 1280,
    "output_blocks.6.1": 640, "output_blocks.7.1": 640, "output_blocks.8.1": 640,
    "output_blocks.9.1": 320, "output_blocks.10.1": 320, "output_blocks.11.1": 320,
}  # fmt: skip


def sd15_attention_weights(context_dim: int = 768) -> dict[str, tuple[int, int]]:
    """Return {module name: weight shape} of every attention projection of an SD 1.5 U-Net."""
    shapes = {}
    for block, channels in SD15_TRANSFORMERS.items():
        prefix = f"diffusion_model.{block}.transformer_blocks.0"
        for attention, key_width in (("attn1", channels), ("attn2", context_dim)):
            shapes[f"{prefix}.{attention}.to_q"] = (channels, channels)
            shapes[f"{prefix}.{attention}.to_k"] = (channels, key_width)
            shapes[f"{prefix}.{attention}.to_v"] = (channels, key_width)
            shapes[f"{prefix}.{attention}.to_out.0"] = (channels, channels)
    return shapes


def comfyui_unet_lora_key_map(weight_names) -> dict[str, str]:
    """Return ComfyUI's generic U-Net LoRA key map: `diffusion_model.<path>` → `diffusion_model.<path>.weight`.

    Written from the documented format that ComfyUI's LoRA loader accepts without conversion.
    """
    return {name.removesuffix(".weight"): name for name in weight_names if name.endswith(".weight")}


def random_weights(out_features, in_features, rank, alpha, seed=0) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    return LoraWeights(
        up=torch.randn(out_features, rank, generator=generator),
        down=torch.randn(rank, in_features, generator=generator),
        alpha=alpha,
    )


def test_new_adapter_leaves_weight_unchanged():
    weight = torch.randn(320, 768)
    adapter = init_lora_weights(320, 768, rank=8, alpha=8.0, generator=torch.Generator().manual_seed(0))

    assert torch.count_nonzero(adapter.up) == 0
    assert torch.count_nonzero(adapter.down) > 0
    assert torch.equal(apply_lora(weight, adapter), weight)


def test_new_adapter_leaves_layer_output_unchanged():
    layer = torch.nn.Linear(768, 320, bias=False)
    inputs = torch.randn(2, 77, 768)
    adapter = init_lora_weights(320, 768, rank=4, alpha=4.0)

    adapted = torch.nn.functional.linear(inputs, apply_lora(layer.weight.detach(), adapter, strength=3.0))

    assert torch.equal(adapted, layer(inputs).detach())


def test_delta_is_alpha_over_rank_times_product():
    adapter = random_weights(16, 24, rank=4, alpha=2.0)

    expected = 0.5 * adapter.up @ adapter.down

    assert torch.allclose(lora_delta(adapter), expected, atol=1e-6)


@pytest.mark.parametrize("strength", [0.0, 0.5, 2.0, -1.0, -3.5])
def test_delta_scales_linearly_with_strength(strength):
    adapter = random_weights(16, 24, rank=4, alpha=4.0)

    assert torch.allclose(lora_delta(adapter, strength), strength * lora_delta(adapter), atol=1e-5)


def test_negative_strength_inverts_the_change():
    weight = torch.randn(16, 24)
    adapter = random_weights(16, 24, rank=2, alpha=2.0)

    there = apply_lora(weight, adapter, strength=1.0)
    back = apply_lora(there, adapter, strength=-1.0)

    assert torch.allclose(back, weight, atol=1e-5)


def test_default_targets_are_keys_and_values_of_attn2():
    modules = cross_attention_modules(sd15_attention_weights())

    assert len(modules) == 32
    assert all(".attn2." in name for name in modules)
    assert {name.rsplit(".", 1)[1] for name in modules} == {"to_k", "to_v"}


def test_output_target_is_the_linear_of_to_out():
    modules = cross_attention_modules(sd15_attention_weights(), parse_targets("to_q, to_out"))

    assert len(modules) == 32
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0" in modules
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_q" in modules
    assert not any(".attn1." in name for name in modules)


def test_parse_targets_rejects_unknown_names():
    with pytest.raises(SDIPCError, match="to_x"):
        parse_targets("to_k, to_x")
    with pytest.raises(SDIPCError):
        parse_targets("")


def test_keys_are_comfyui_native_names():
    module = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"

    assert lora_keys(module) == (
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_up.weight",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_down.weight",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.alpha",
    )


def test_every_saved_key_maps_onto_an_sd15_weight():
    shapes = sd15_attention_weights()
    key_map = comfyui_unet_lora_key_map(f"{name}.weight" for name in shapes)
    adapters = {name: init_lora_weights(*shapes[name], rank=4, alpha=4.0) for name in cross_attention_modules(shapes)}

    tensors = lora_state_dict(adapters)

    assert len(tensors) == 3 * 32
    for key in tensors:
        module = key.removesuffix(".lora_up.weight").removesuffix(".lora_down.weight").removesuffix(".alpha")
        assert module in key_map, key
        assert key_map[module] == module + ".weight"


def test_rank_larger_than_layer_is_rejected():
    check_rank(320, (320, 768), "attn2.to_k")

    with pytest.raises(SDIPCError, match="between 1 and 320"):
        check_rank(321, (320, 768), "attn2.to_k")


def test_state_dict_round_trip_keeps_factors():
    adapters = {"diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v": random_weights(1280, 768, rank=8, alpha=4.0)}

    restored = adapters_from_state_dict(lora_state_dict(adapters))

    (name, original), = adapters.items()
    assert torch.equal(restored[name].up, original.up)
    assert torch.equal(restored[name].down, original.down)
    assert restored[name].alpha == 4.0


def test_missing_down_factor_is_rejected():
    tensors = lora_state_dict({"diffusion_model.a.attn2.to_k": random_weights(8, 8, rank=2, alpha=2.0)})
    del tensors["diffusion_model.a.attn2.to_k.lora_down.weight"]

    with pytest.raises(AdapterMismatchError, match="lora_down"):
        adapters_from_state_dict(tensors)


def test_adapter_for_sd2_rejected_by_sd15_shapes():
    sd2_shapes = sd15_attention_weights(context_dim=1024)
    name = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    adapters = {name: init_lora_weights(*sd2_shapes[name], rank=4, alpha=4.0)}

    with pytest.raises(AdapterMismatchError, match=r"\[320, 1024\].*\[320, 768\]"):
        check_adapters_fit(adapters, sd15_attention_weights(), "sd2_adapter.safetensors", "the MODEL")


def test_adapter_for_missing_layer_rejected():
    adapters = {"diffusion_model.input_blocks.9.1.transformer_blocks.0.attn2.to_k": init_lora_weights(320, 768, rank=4, alpha=4.0)}

    with pytest.raises(AdapterMismatchError, match="input_blocks.9.1"):
        check_adapters_fit(adapters, sd15_attention_weights(), "other.safetensors", "the MODEL")
