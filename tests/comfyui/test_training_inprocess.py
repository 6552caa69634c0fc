"""SD-IPC adapter training in a real ComfyUI process, on the random-weight stand-in models.

One fine-tuning run on two photos with the full-size stand-in CLIP ViT-L/14 is shared by the
tests of its outputs. The other runs use a tiny CLIP vision model built from ComfyUI's own class,
so that each takes a few seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.comfyui

DREAMBOOTH = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambooth"
TRAINING_SIZE = 64
ATTENTION_BLOCKS = ("input_blocks.1.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1")
KEY_AND_VALUE_WEIGHTS = {
    f"diffusion_model.{block}.transformer_blocks.0.attn2.{projection}.weight"
    for block in ATTENTION_BLOCKS
    for projection in ("to_k", "to_v")
}
TINY_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 56,
    "intermediate_size": 128, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 4,
    "num_channels": 3, "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 32,
}  # fmt: skip


def load_photos(subject: str, count: int, size: int = TRAINING_SIZE) -> torch.Tensor:
    """Return `count` DreamBooth photos of `subject` as a ComfyUI IMAGE batch [count, size, size, 3]."""
    paths = sorted((DREAMBOOTH / subject).glob("*.jpg"))[:count]
    if len(paths) < count:
        pytest.skip(f"fewer than {count} photos of '{subject}' in {DREAMBOOTH}")
    pixels = [np.asarray(Image.open(path).convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for path in paths]
    return torch.from_numpy(np.stack(pixels))


def run_node(pack, name: str, function: str, **inputs):
    """Call a trainer node as ComfyUI does: every input wrapped in a list, under inference mode."""
    node = pack.NODE_CLASS_MAPPINGS[name]()
    with torch.inference_mode():
        return getattr(node, function)(**{key: [value] for key, value in inputs.items()})


def training_inputs(sd15, clip_vision, projection, images, **overrides) -> dict:
    model, clip, vae = sd15
    inputs = dict(
        model=model, clip=clip, clip_vision=clip_vision, projection=projection, vae=vae, images=images,
        save_name="", steps=2, learning_rate=1e-2, rank=4, batch_size=2, seed=0, vision_prompt_tokens=0,
        resolution=TRAINING_SIZE, text_prompts="", text_weight=0.0, gradient_checkpointing=False,
    )  # fmt: skip
    inputs.update(overrides)
    return inputs


def fixed_batch_loss(model, latents: torch.Tensor, cond: torch.Tensor, draws: int = 8) -> float:
    """Return the mean ε-prediction loss of `model` on fixed timesteps and noise (seed 123)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    generator = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.inference_mode():
        for _ in range(draws):
            timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator).float()
            noise = torch.randn(latents.shape, generator=generator)
            sigma = model.model.model_sampling.sigma(timesteps)
            noisy = model.model.model_sampling.noise_scaling(sigma, noise, latents)
            denoised = model.model.apply_model(noisy, sigma, c_crossattn=cond)
            total += (((noisy - denoised) / sigma.view(-1, 1, 1, 1) - noise) ** 2).mean().item()
    return total / draws


def sample(comfy_nodes, model, clip, seed: int = 7) -> torch.Tensor:
    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a dog")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = comfy_nodes.EmptyLatentImage().generate(TRAINING_SIZE, TRAINING_SIZE, 1)[0]
    return comfy_nodes.KSampler().sample(model, seed, 2, 1.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def model_folders(comfy_nodes, tmp_path_factory):
    """Point ComfyUI's loras and vision-prompt folders at empty temporary folders for this module."""
    import folder_paths

    root = tmp_path_factory.mktemp("models")
    folders = {"loras": root / "loras", "sdipc_vision_prompts": root / "sdipc_vision_prompts"}
    saved = {name: folder_paths.folder_names_and_paths.get(name) for name in folders}
    for name, folder in folders.items():
        folder.mkdir()
        extensions = {".safetensors", ".ckpt"} if name == "loras" else {".safetensors"}
        folder_paths.folder_names_and_paths[name] = ([str(folder)], extensions)
    yield folders
    for name, entry in saved.items():
        if entry is not None:
            folder_paths.folder_names_and_paths[name] = entry


@pytest.fixture
def empty_folders(model_folders):
    """The module's model folders, emptied before the test."""
    for folder in model_folders.values():
        for path in files_under(folder):
            path.unlink()
    return model_folders


@pytest.fixture(scope="module")
def projection(pack, clip_file):
    return pack.nodes.projection_loader.load_cached_projections(str(clip_file))


@pytest.fixture(scope="module")
def tiny_vision(pack, tmp_path_factory):
    """(CLIP_VISION, projection) of a three-layer CLIP vision model built with ComfyUI's ClipVisionModel."""
    import comfy.clip_vision

    config_path = tmp_path_factory.mktemp("tiny_vision") / "config.json"
    config_path.write_text(json.dumps(TINY_VISION_CONFIG))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        clip_vision = comfy.clip_vision.ClipVisionModel(str(config_path))
        state_dict = {key: torch.randn(tensor.shape, generator=generator) * 0.1 for key, tensor in clip_vision.get_sd().items()}
        clip_vision.load_sd(state_dict)

    left, _ = torch.linalg.qr(torch.randn(768, 32, generator=generator))
    text_projection = (left * torch.linspace(1.0, 2.0, 32)).T.contiguous()
    vision = clip_vision.model
    projection = pack.sdipc_core.CLIPProjections(
        text_projection=text_projection,
        visual_projection=vision.visual_projection.weight.detach().float().clone(),
        vision_post_layernorm=(
            vision.vision_model.post_layernorm.weight.detach().float().clone(),
            vision.vision_model.post_layernorm.bias.detach().float().clone(),
        ),
        source="tiny test CLIP",
    )
    return clip_vision, projection


@pytest.fixture(scope="module")
def finetuned(pack, sd15, clip_vision, projection, model_folders):
    """Outputs of one SD-IPC-FT run: six steps on two dog photos, with two text prompts, saved to disk."""
    photos = load_photos("dog", 2)
    inputs = training_inputs(
        sd15, clip_vision, projection, photos, save_name="tests/finetune", steps=6,
        text_prompts="a photo of a dog\na dog sitting on grass", text_weight=0.5,
    )  # fmt: skip
    return run_node(pack, "SDIPCTrainAdapter", "train", **inputs), photos


def test_training_lowers_loss_on_fixed_batch(pack, comfy_nodes, sd15, clip_vision, projection, finetuned):
    model, clip, vae = sd15
    (trained_model, *_), photos = finetuned
    with torch.inference_mode():
        vision_output = clip_vision.encode_image(photos)
        cond = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]().convert(clip, vision_output, projection, 27.5, "fixed")[0][0][0]
        latents = model.model.process_latent_in(vae.encode(photos))

    before = fixed_batch_loss(model, latents, cond)
    after = fixed_batch_loss(trained_model, latents, cond)

    assert after < before
    assert fixed_batch_loss(model, latents, cond) == before


def test_only_cross_attention_weights_change(sd15, finetuned):
    import comfy.model_management

    model = sd15[0]
    trained_model = finetuned[0][0]
    comfy.model_management.load_models_gpu([model])
    base = {key: tensor.clone() for key, tensor in model.model.state_dict().items()}

    comfy.model_management.load_models_gpu([trained_model])
    changed = {key for key, tensor in trained_model.model.state_dict().items() if not torch.equal(tensor, base[key])}
    comfy.model_management.load_models_gpu([model])

    assert set(trained_model.patches) == KEY_AND_VALUE_WEIGHTS
    assert changed == KEY_AND_VALUE_WEIGHTS


def test_outputs_and_saved_metadata(pack, sd15, clip_vision, finetuned, model_folders):
    (_model, trained_clip_vision, adapter, loss_plot), _photos = finetuned
    lora, metadata = pack.sdipc_core.adapter_files.load_lora_file(model_folders["loras"] / "tests" / "finetune.safetensors")

    assert trained_clip_vision is clip_vision
    assert loss_plot.shape == (1, 360, 640, 3)
    assert metadata == adapter.metadata
    assert (metadata.method, metadata.rank, metadata.steps, metadata.targets) == ("SD-IPC-FT", 4, 6, ("to_k", "to_v"))
    assert metadata.model_family == "SD15"
    assert {f"{name}.weight" for name in lora} == KEY_AND_VALUE_WEIGHTS
    for name, weights in adapter.lora.items():
        assert torch.equal(lora[name].up, weights.up)
        assert torch.equal(lora[name].down, weights.down)


def test_saved_file_loads_in_stock_lora_loader(comfy_nodes, sd15, finetuned):
    model, clip, _vae = sd15
    trained_model = finetuned[0][0]

    stock = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "tests/finetune.safetensors", 1.0)[0]
    base_samples = sample(comfy_nodes, model, clip)
    stock_samples = sample(comfy_nodes, stock, clip)
    trained_samples = sample(comfy_nodes, trained_model, clip)

    assert set(stock.patches) == KEY_AND_VALUE_WEIGHTS
    assert not torch.allclose(stock_samples, base_samples, atol=1e-3)
    assert torch.allclose(stock_samples, trained_samples, atol=1e-5)


def test_apply_node_strength_is_linear(pack, sd15, finetuned):
    import comfy.model_management

    model = sd15[0]
    apply = pack.NODE_CLASS_MAPPINGS["SDIPCApplyAdapter"]()
    key = sorted(KEY_AND_VALUE_WEIGHTS)[0]

    def weight_at(strength: float) -> torch.Tensor:
        patched = apply.apply(model, "tests/finetune.safetensors", strength)[0]
        comfy.model_management.load_models_gpu([patched])
        weight = patched.model.state_dict()[key].clone()
        comfy.model_management.load_models_gpu([model])
        return weight

    comfy.model_management.load_models_gpu([model])
    base = model.model.state_dict()[key].clone()
    delta_one = weight_at(1.0) - base

    assert apply.apply(model, "tests/finetune.safetensors", 0.0)[0] is model
    assert delta_one.abs().max() > 0
    assert torch.allclose(weight_at(-2.0) - base, -2.0 * delta_one, atol=1e-5)


def test_existing_file_stops_before_training(pack, sd15, tiny_vision, empty_folders):
    target = empty_folders["loras"] / "tests" / "taken.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"keep me")
    clip_vision, projection = tiny_vision

    with pytest.raises(FileExistsError, match="enable overwrite"):
        run_node(pack, "SDIPCTrainAdapter", "train", **training_inputs(sd15, clip_vision, projection, load_photos("dog", 2), save_name="tests/taken"))

    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("interrupt_at_step", [2, 3])
def test_interrupt_leaves_no_file(pack, sd15, tiny_vision, empty_folders, interrupt_at_step):
    import comfy.model_management
    import comfy.utils

    clip_vision, projection = tiny_vision

    def press_interrupt(value, total, preview, node_id=None):
        if value == interrupt_at_step:
            comfy.model_management.interrupt_current_processing(True)

    # Step 3 of 3 is the last: the interrupt then arrives while the adapter is being saved.
    comfy.utils.set_progress_bar_global_hook(press_interrupt)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(pack, "SDIPCTrainAdapter", "train", **training_inputs(sd15, clip_vision, projection, load_photos("dog", 2), save_name="tests/interrupted", steps=3))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)

    assert files_under(empty_folders["loras"]) == []


def test_nan_loss_keeps_last_good_adapter(pack, sd15, tiny_vision, empty_folders, monkeypatch):
    clip_vision, projection = tiny_vision
    photos = load_photos("dog", 2)
    one_step = run_node(pack, "SDIPCTrainAdapter", "train", **training_inputs(sd15, clip_vision, projection, photos, steps=1))[2]

    glue = pack.nodes.comfy_training
    finite_loss = glue.denoising_loss
    calls = []

    def loss_that_turns_nan(*args):
        calls.append(1)
        loss = finite_loss(*args)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(glue, "denoising_loss", loss_that_turns_nan)
    outputs = run_node(pack, "SDIPCTrainAdapter", "train", **training_inputs(sd15, clip_vision, projection, photos, steps=5, save_name="tests/nan"))
    adapter = outputs[2]
    _, metadata = pack.sdipc_core.adapter_files.load_lora_file(empty_folders["loras"] / "tests" / "nan.safetensors")

    assert adapter.metadata.steps == 1
    assert "at step 3" in adapter.metadata.extra["stop_reason"]
    assert metadata.steps == 1
    for name, weights in one_step.lora.items():
        assert torch.allclose(adapter.lora[name].up, weights.up, atol=1e-6)
        assert torch.allclose(adapter.lora[name].down, weights.down, atol=1e-6)


def test_nan_loss_at_first_step_raises(pack, sd15, tiny_vision, empty_folders, monkeypatch):
    clip_vision, projection = tiny_vision
    glue = pack.nodes.comfy_training
    finite_loss = glue.denoising_loss
    monkeypatch.setattr(glue, "denoising_loss", lambda *args: finite_loss(*args) * float("nan"))

    with pytest.raises(ValueError, match="first step"):
        run_node(pack, "SDIPCTrainAdapter", "train", **training_inputs(sd15, clip_vision, projection, load_photos("dog", 2), save_name="tests/nan_first"))

    assert files_under(empty_folders["loras"]) == []


def test_zero_images_rejected(pack, sd15, tiny_vision):
    clip_vision, projection = tiny_vision

    with pytest.raises(ValueError, match="No training images"):
        run_node(pack, "SDIPCTrainAdapter", "train", **training_inputs(sd15, clip_vision, projection, torch.zeros(0, 64, 64, 3)))


def test_mixed_sizes_need_a_resize_mode(pack, sd15, tiny_vision):
    clip_vision, projection = tiny_vision
    node = pack.NODE_CLASS_MAPPINGS["SDIPCTrainAdapter"]()
    images = [torch.rand(1, 64, 64, 3), torch.rand(2, 80, 96, 3)]
    inputs = {key: [value] for key, value in training_inputs(sd15, clip_vision, projection, None, resize_mode="none").items()}
    inputs["images"] = images

    with pytest.raises(ValueError, match="'crop' or 'stretch'"):
        with torch.inference_mode():
            node.train(**inputs)

    prepared = pack.sdipc_core.training.prepare_images(images, 64, "crop")
    assert prepared.shape == (3, 64, 64, 3)


def test_rank_larger_than_layer_rejected(pack, sd15, tiny_vision):
    clip_vision, projection = tiny_vision

    with pytest.raises(ValueError, match="Rank 321 does not fit"):
        run_node(pack, "SDIPCTrainAdapter", "train", **training_inputs(sd15, clip_vision, projection, load_photos("dog", 2), rank=321))


def test_vision_prompt_tuning_round_trip(pack, comfy_nodes, sd15, tiny_vision, empty_folders):
    clip_vision, projection = tiny_vision
    photos = load_photos("dog", 2)
    with torch.inference_mode():
        before = clip_vision.encode_image(photos)

    outputs = run_node(
        pack, "SDIPCTrainAdapter", "train",
        **training_inputs(sd15, clip_vision, projection, photos, steps=2, vision_prompt_tokens=2, save_name="tests/tuned"),
    )  # fmt: skip
    tuned = outputs[1]
    reloaded = pack.NODE_CLASS_MAPPINGS["SDIPCApplyVisionPrompts"]().apply(clip_vision, "tests/tuned.safetensors")[0]
    with torch.inference_mode():
        tuned_output = tuned.encode_image(photos)
        reloaded_output = reloaded.encode_image(photos)
        after = clip_vision.encode_image(photos)
        conditioning = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]().convert(sd15[1], tuned_output, projection, 27.5, "fixed")[0]

    assert files_under(empty_folders["sdipc_vision_prompts"]) == [empty_folders["sdipc_vision_prompts"] / "tests" / "tuned.safetensors"]
    assert outputs[2].metadata.vision_prompt_tokens == 2
    assert tuned_output["last_hidden_state"].shape == before["last_hidden_state"].shape
    assert tuned_output["penultimate_hidden_states"].shape == before["penultimate_hidden_states"].shape
    assert not torch.allclose(tuned_output["image_embeds"], before["image_embeds"], atol=1e-4)
    assert torch.equal(reloaded_output["image_embeds"], tuned_output["image_embeds"])
    assert torch.equal(after["image_embeds"], before["image_embeds"])
    assert conditioning[0][0].shape == (2, 77, 768)


def test_customize_subject_preset(pack, sd15, tiny_vision, empty_folders):
    clip_vision, projection = tiny_vision
    defaults = pack.NODE_CLASS_MAPPINGS["SDIPCCustomizeSubject"].INPUT_TYPES()["required"]
    inputs = training_inputs(sd15, clip_vision, projection, load_photos("dog", 3), save_name="tests/subject", class_name="dog", text_weight=1.0)
    del inputs["text_prompts"]

    adapter = run_node(pack, "SDIPCCustomizeSubject", "customize", **inputs)[2]

    assert defaults["steps"][1]["default"] == 30
    assert adapter.metadata.method == "SD-IPC-CT"
    assert (empty_folders["loras"] / "tests" / "subject.safetensors").is_file()


def test_apply_node_rejects_other_model_family(pack, sd15, empty_folders):
    files = pack.sdipc_core.adapter_files
    name = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    sd2_shaped = files.TrainedAdapter(
        lora={name: pack.sdipc_core.lora.init_lora_weights(320, 1024, rank=4, alpha=4.0)},
        metadata=files.AdapterMetadata("SD-IPC-FT", "0" * 16, "SD20", 4, 4.0, ("to_k",), 10),
    )
    files.save_lora_file(sd2_shaped, empty_folders["loras"] / "sd2.safetensors")

    with pytest.raises(ValueError, match=r"\[320, 1024\].*\[320, 768\]"):
        pack.NODE_CLASS_MAPPINGS["SDIPCApplyAdapter"]().apply(sd15[0], "sd2.safetensors", 1.0)


def test_apply_node_rejects_pickle_checkpoint(pack, sd15, empty_folders):
    (empty_folders["loras"] / "old.ckpt").write_bytes(b"PK\x03\x04" + b"\x00" * 64)

    with pytest.raises(ValueError, match="not a safetensors file"):
        pack.NODE_CLASS_MAPPINGS["SDIPCApplyAdapter"]().apply(sd15[0], "old.ckpt", 1.0)
