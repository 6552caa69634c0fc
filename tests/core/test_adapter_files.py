"""SD-IPC adapter files: atomic safetensors with metadata, read back bit-exactly."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdipc_core.adapter_files import (
    KIND_CROSS_ATTENTION_LORA,
    METHOD_CUSTOMIZE,
    AdapterMetadata,
    TrainedAdapter,
    base_model_hash,
    load_lora_file,
    load_vision_prompts_file,
    save_lora_file,
    save_vision_prompts_file,
)
from sdipc_core.errors import ModelFileError
from sdipc_core.lora import LoraWeights
from sdipc_core.prompt_tuning import VisionPromptTuning

MODULES = (
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v",
    "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0",
)


def trained_adapter(with_prompts: bool = False) -> TrainedAdapter:
    generator = torch.Generator().manual_seed(0)
    lora = {
        name: LoraWeights(up=torch.randn(320, 4, generator=generator), down=torch.randn(4, 768, generator=generator), alpha=4.0)
        for name in MODULES
    }
    metadata = AdapterMetadata(
        method=METHOD_CUSTOMIZE,
        base_model_hash="0123456789abcdef",
        model_family="SD15",
        rank=4,
        alpha=4.0,
        targets=("to_k", "to_v", "to_out"),
        steps=30,
        vision_prompt_tokens=3 if with_prompts else 0,
    )
    prompts = VisionPromptTuning(2, 3, 16, prompt_dim=8).state_dict() if with_prompts else None
    return TrainedAdapter(lora=lora, metadata=metadata, vision_prompts=prompts)


def test_save_then_load_is_bit_exact(tmp_path):
    adapter = trained_adapter()

    path = save_lora_file(adapter, tmp_path / "subject.safetensors")
    loaded, metadata = load_lora_file(path)

    assert metadata == adapter.metadata
    assert loaded.keys() == adapter.lora.keys()
    for name, weights in adapter.lora.items():
        assert torch.equal(loaded[name].up, weights.up)
        assert torch.equal(loaded[name].down, weights.down)
        assert loaded[name].alpha == weights.alpha


def test_file_uses_native_keys_and_sdipc_metadata(tmp_path):
    path = save_lora_file(trained_adapter(), tmp_path / "subject.safetensors")

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        header = handle.metadata()

    expected = {f"{name}.{suffix}" for name in MODULES for suffix in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert keys == expected
    assert header["sdipc.kind"] == KIND_CROSS_ATTENTION_LORA
    assert header["sdipc.method"] == "SD-IPC-CT"
    assert header["sdipc.base_model_hash"] == "0123456789abcdef"
    assert header["sdipc.rank"] == "4"
    assert header["sdipc.targets"] == "to_k,to_v,to_out"
    assert header["sdipc.steps"] == "30"


def test_existing_file_is_kept_without_overwrite(tmp_path):
    path = save_lora_file(trained_adapter(), tmp_path / "subject.safetensors")
    before = path.read_bytes()

    with pytest.raises(FileExistsError, match="overwrite"):
        save_lora_file(trained_adapter(), path)

    assert path.read_bytes() == before


def test_overwrite_replaces_file(tmp_path):
    path = save_lora_file(trained_adapter(), tmp_path / "subject.safetensors")
    changed = trained_adapter()
    changed.lora[MODULES[0]] = LoraWeights(up=torch.ones(320, 4), down=torch.ones(4, 768), alpha=4.0)

    save_lora_file(changed, path, overwrite=True)

    assert torch.equal(load_lora_file(path)[0][MODULES[0]].up, torch.ones(320, 4))


def test_interrupted_save_leaves_no_file(tmp_path):
    class Interrupted(Exception):
        pass

    def interrupt():
        raise Interrupted()

    with pytest.raises(Interrupted):
        save_lora_file(trained_adapter(), tmp_path / "subject.safetensors", before_replace=interrupt)

    assert list(tmp_path.iterdir()) == []


def test_pickle_checkpoint_is_rejected_unopened(tmp_path):
    path = tmp_path / "adapter.ckpt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)

    with pytest.raises(ModelFileError, match="not a safetensors file"):
        load_lora_file(path)


def test_lora_without_sdipc_metadata_is_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({f"{MODULES[0]}.lora_up.weight": torch.zeros(320, 4), f"{MODULES[0]}.lora_down.weight": torch.zeros(4, 768)}, str(path))

    with pytest.raises(ModelFileError, match="Load LoRA"):
        load_lora_file(path)


def test_vision_prompts_round_trip(tmp_path):
    adapter = trained_adapter(with_prompts=True)

    path = save_vision_prompts_file(adapter, tmp_path / "subject.safetensors")
    state_dict, metadata = load_vision_prompts_file(path)

    assert metadata.vision_prompt_tokens == 3
    assert state_dict.keys() == adapter.vision_prompts.keys()
    for key, tensor in adapter.vision_prompts.items():
        assert torch.equal(state_dict[key], tensor)
    assert VisionPromptTuning.from_state_dict(state_dict).num_tokens == 3


def test_vision_prompt_file_is_not_a_lora(tmp_path):
    path = save_vision_prompts_file(trained_adapter(with_prompts=True), tmp_path / "prompts.safetensors")

    with pytest.raises(ModelFileError, match="vision prompts, not cross-attention LoRA"):
        load_lora_file(path)


def test_hash_ignores_fp16_or_fp32_loading():
    weights = {"diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(64, 768).half()}
    as_float32 = {name: tensor.float() for name, tensor in weights.items()}

    assert base_model_hash(weights) == base_model_hash(as_float32)
    assert len(base_model_hash(weights)) == 16


def test_hash_changes_with_weights_and_ignores_other_layers():
    name = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    weights = {name: torch.randn(64, 768), "diffusion_model.out.2.weight": torch.randn(4, 320, 3, 3)}
    changed_elsewhere = {**weights, "diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}
    changed_key = {**weights, name: weights[name] + 1.0}

    assert base_model_hash(weights) == base_model_hash(changed_elsewhere)
    assert base_model_hash(weights) != base_model_hash(changed_key)


def test_hash_needs_cross_attention():
    with pytest.raises(ModelFileError, match="attn2"):
        base_model_hash({"diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)})


def test_any_header_length_loads(tmp_path):
    """Safetensors header lengths are multiples of 8, so about one file in 32 starts with byte 0x80."""
    import dataclasses
    import struct

    for padding in range(512):
        adapter = trained_adapter()
        adapter.metadata = dataclasses.replace(adapter.metadata, extra={"note": "x" * padding})
        path = save_lora_file(adapter, tmp_path / "padded.safetensors", overwrite=True)
        (header_size,) = struct.unpack("<Q", path.read_bytes()[:8])
        if header_size % 256 == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length whose first byte is 0x80")

    loaded, metadata = load_lora_file(path)

    assert metadata.extra == {"note": "x" * padding}
    assert torch.equal(loaded[MODULES[0]].up, adapter.lora[MODULES[0]].up)
