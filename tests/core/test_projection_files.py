"""Reading W_t and W_i from the file layouts users have, and the errors for files that cannot work."""

import pytest
import torch
from safetensors.torch import save_file

from sdipc_core import check_image_embeds, check_same_vision_tower, load_projections
from sdipc_core.errors import ModelFileError, ProjectionMismatchError
from sdipc_core.safetensors_io import save_atomic

from clip_fixtures import tiny_clip_model


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_full_openai_clip_layout(tmp_path):
    model = tiny_clip_model(seed=1)
    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)

    projections = load_projections(path)

    assert torch.equal(projections.text_projection, model.text_projection.weight.detach())
    assert torch.equal(projections.visual_projection, model.visual_projection.weight.detach())
    assert projections.vision_post_layernorm is not None
    assert projections.source == str(path)


def test_clip_l_text_encoder_layout(tmp_path):
    W_t = _random(768, 768, seed=2)
    path = tmp_path / "clip_l.safetensors"
    save_file({"text_model.final_layer_norm.weight": torch.ones(768), "text_projection.weight": W_t}, path)

    projections = load_projections(path)

    assert torch.equal(projections.text_projection, W_t)
    assert projections.visual_projection is None


@pytest.mark.parametrize(
    "prefix",
    ["clip_l.transformer.", "cond_stage_model.transformer.", "text_encoders.clip_l.transformer."],
)
def test_comfyui_prefixed_layouts(tmp_path, prefix):
    W_t = _random(768, 768, seed=3)
    path = tmp_path / "prefixed.safetensors"
    save_file({f"{prefix}text_projection.weight": W_t, f"{prefix}text_model.final_layer_norm.bias": torch.zeros(768)}, path)

    projections = load_projections(path)

    assert torch.equal(projections.text_projection, W_t)


def test_original_openai_parameter_layout_is_transposed(tmp_path):
    text_parameter = _random(768, 768, seed=4)  # used as x @ P, so W_t = P.T
    visual_parameter = _random(1024, 768, seed=5)
    path = tmp_path / "openai_original.safetensors"
    save_file({"text_projection": text_parameter, "visual.proj": visual_parameter}, path)

    projections = load_projections(path)

    assert torch.equal(projections.text_projection, text_parameter.T)
    assert torch.equal(projections.visual_projection, visual_parameter.T)


def test_sdxl_style_file_picks_the_768_projection(tmp_path):
    W_t = _random(768, 768, seed=6)
    path = tmp_path / "two_encoders.safetensors"
    save_file(
        {
            "clip_l.transformer.text_projection.weight": W_t,
            "clip_g.transformer.text_projection.weight": _random(1280, 1280, seed=7),
        },
        path,
    )

    projections = load_projections(path)

    assert torch.equal(projections.text_projection, W_t)


def test_file_without_text_projection(tmp_path):
    path = tmp_path / "clip_vision_only.safetensors"
    save_file({"vision_model.post_layernorm.weight": torch.ones(1024), "visual_projection.weight": _random(768, 1024)}, path)

    with pytest.raises(ModelFileError, match="no text_projection") as error:
        load_projections(path)

    assert str(path) in str(error.value)
    assert "openai/clip-vit-large-patch14" in str(error.value)


def test_identity_placeholder_is_rejected(tmp_path):
    path = tmp_path / "checkpoint_placeholder.safetensors"
    save_file({"cond_stage_model.transformer.text_projection.weight": torch.eye(768)}, path)

    with pytest.raises(ModelFileError, match="identity matrix"):
        load_projections(path)


def test_pickle_checkpoint_is_rejected_without_loading(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle protocol 4 header

    with pytest.raises(ModelFileError, match="not a safetensors file") as error:
        load_projections(path)

    assert "pickle" in str(error.value)


def test_truncated_file_is_reported(tmp_path):
    complete = tmp_path / "complete.safetensors"
    save_file({"text_projection.weight": _random(768, 768, seed=8)}, complete)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(complete.read_bytes()[:-1000])

    with pytest.raises(ModelFileError, match="truncated") as error:
        load_projections(truncated)

    assert "download the file again" in str(error.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_projections(tmp_path / "absent.safetensors")


def test_vit_h_embeddings_are_rejected(tmp_path):
    path = tmp_path / "clip_l.safetensors"
    save_file({"text_projection.weight": _random(768, 768, seed=9)}, path)
    projections = load_projections(path)

    with pytest.raises(ProjectionMismatchError, match="1024 dimensions") as error:
        check_image_embeds(projections, torch.randn(2, 1024))

    assert "ViT-L/14" in str(error.value)


def test_embeddings_from_another_vision_tower_are_rejected(tmp_path):
    own_model = tiny_clip_model(seed=10)
    other_model = tiny_clip_model(seed=11)
    path = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in own_model.state_dict().items()}, path)
    projections = load_projections(path)
    pixel_values = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        own_output = own_model.vision_model(pixel_values=pixel_values)
        other_output = other_model.vision_model(pixel_values=pixel_values)
        own_embeds = own_model.visual_projection(own_output.pooler_output)
        other_embeds = other_model.visual_projection(other_output.pooler_output)

    check_same_vision_tower(projections, own_embeds, own_output.last_hidden_state)
    with pytest.raises(ProjectionMismatchError, match="were not made by the vision tower"):
        check_same_vision_tower(projections, other_embeds, other_output.last_hidden_state)


def test_atomic_save_never_overwrites_by_default(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_atomic({"a": torch.zeros(2)}, path)
    original = path.read_bytes()

    with pytest.raises(FileExistsError, match="enable overwrite"):
        save_atomic({"a": torch.ones(2)}, path)

    assert path.read_bytes() == original


def test_atomic_save_abandoned_leaves_no_file(tmp_path):
    path = tmp_path / "adapter.safetensors"

    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.zeros(2)}, path, before_replace=interrupt)

    assert list(tmp_path.iterdir()) == []
