"""Random-weight stand-ins for the model files the shipped workflows load.

The files have the exact key layout of a single-file Stable Diffusion 1.5 checkpoint and of the
OpenAI CLIP ViT-L/14 checkpoint on Hugging Face (``openai/clip-vit-large-patch14``,
``model.safetensors``), so ComfyUI's own loaders accept them. Their weights are random: they let a
workflow run end to end without downloads, and every image they produce looks like noise.

The SD1.5 U-Net is shrunk to one resolution level with one residual block and one transformer
block, which ComfyUI 0.3.64 still detects as SD15 and samples quickly on a CPU. The VAE and the
CLIP towers are full size because ComfyUI builds them from fixed configs and leaves weights that a
file lacks uninitialised.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

CHECKPOINT_FILE_NAME = "v1-5-pruned-emaonly.safetensors"
CLIP_FILE_NAME = "clip-vit-large-patch14.safetensors"
CHECKPOINT_TEXT_PREFIX = "cond_stage_model.transformer."

# Bump when a layout or the fill rule changes, so cached files of an older version get rewritten.
LAYOUT_VERSION = "1"
STAND_IN_MARKER = "random weights, not a trained model"

Shape = tuple[int, ...]

# SD1.5 values that ComfyUI's SD15 detection requires (comfy/supported_models.py, class SD15).
UNET_MODEL_CHANNELS = 320
UNET_TIME_EMBED_DIM = 4 * UNET_MODEL_CHANNELS
UNET_CONTEXT_DIM = 768
LATENT_CHANNELS = 4

# OpenAI CLIP ViT-L/14 at 224 px.
TEXT_WIDTH, TEXT_LAYERS, TEXT_VOCAB, TEXT_POSITIONS = 768, 12, 49408, 77
VISION_WIDTH, VISION_LAYERS, VISION_PATCH, VISION_POSITIONS = 1024, 24, 14, 257
PROJECTION_DIM = 768
LOGIT_SCALE = math.log(100.0)

EMBEDDING_STD = 0.02


@dataclass(frozen=True)
class StandInModels:
    """Paths of a stand-in checkpoint and CLIP file, stored under the names the workflows use."""

    checkpoint: Path
    clip: Path

    def model_folders(self) -> dict[str, dict[str, Path]]:
        """Return the files keyed by ComfyUI model folder and by the file name ComfyUI lists."""
        return {
            "checkpoints": {self.checkpoint.name: self.checkpoint},
            "clip_vision": {self.clip.name: self.clip},
        }


def _linear(prefix: str, out_features: int, in_features: int, bias: bool = True) -> dict[str, Shape]:
    shapes = {f"{prefix}.weight": (out_features, in_features)}
    if bias:
        shapes[f"{prefix}.bias"] = (out_features,)
    return shapes


def _conv(prefix: str, out_channels: int, in_channels: int, kernel: int) -> dict[str, Shape]:
    return {
        f"{prefix}.weight": (out_channels, in_channels, kernel, kernel),
        f"{prefix}.bias": (out_channels,),
    }


def _norm(prefix: str, channels: int) -> dict[str, Shape]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}


def _unet_res_block(prefix: str, in_channels: int, out_channels: int) -> dict[str, Shape]:
    shapes = {
        **_norm(f"{prefix}.in_layers.0", in_channels),
        **_conv(f"{prefix}.in_layers.2", out_channels, in_channels, 3),
        **_linear(f"{prefix}.emb_layers.1", out_channels, UNET_TIME_EMBED_DIM),
        **_norm(f"{prefix}.out_layers.0", out_channels),
        **_conv(f"{prefix}.out_layers.3", out_channels, out_channels, 3),
    }
    if in_channels != out_channels:
        shapes.update(_conv(f"{prefix}.skip_connection", out_channels, in_channels, 1))
    return shapes


def _unet_attention(prefix: str, channels: int, context_dim: int) -> dict[str, Shape]:
    return {
        **_linear(f"{prefix}.to_q", channels, channels, bias=False),
        **_linear(f"{prefix}.to_k", channels, context_dim, bias=False),
        **_linear(f"{prefix}.to_v", channels, context_dim, bias=False),
        **_linear(f"{prefix}.to_out.0", channels, channels),
    }


def _unet_spatial_transformer(prefix: str, channels: int) -> dict[str, Shape]:
    """Return a depth-1 SpatialTransformer with 1x1-conv projections, the SD 1.x form."""
    block = f"{prefix}.transformer_blocks.0"
    feed_forward_dim = 4 * channels
    return {
        **_norm(f"{prefix}.norm", channels),
        **_conv(f"{prefix}.proj_in", channels, channels, 1),
        **_unet_attention(f"{block}.attn1", channels, channels),
        **_linear(f"{block}.ff.net.0.proj", 2 * feed_forward_dim, channels),
        **_linear(f"{block}.ff.net.2", channels, feed_forward_dim),
        **_unet_attention(f"{block}.attn2", channels, UNET_CONTEXT_DIM),
        **_norm(f"{block}.norm1", channels),
        **_norm(f"{block}.norm2", channels),
        **_norm(f"{block}.norm3", channels),
        **_conv(f"{prefix}.proj_out", channels, channels, 1),
    }


def unet_shapes() -> dict[str, Shape]:
    """Return the key shapes of a one-level SD1.5 U-Net (channel_mult [1], one res block)."""
    channels = UNET_MODEL_CHANNELS
    shapes = {
        **_linear("time_embed.0", UNET_TIME_EMBED_DIM, channels),
        **_linear("time_embed.2", UNET_TIME_EMBED_DIM, UNET_TIME_EMBED_DIM),
        **_conv("input_blocks.0.0", channels, LATENT_CHANNELS, 3),
        **_unet_res_block("input_blocks.1.0", channels, channels),
        **_unet_spatial_transformer("input_blocks.1.1", channels),
        **_unet_res_block("middle_block.0", channels, channels),
        **_unet_spatial_transformer("middle_block.1", channels),
        **_unet_res_block("middle_block.2", channels, channels),
    }

    # Each output block concatenates one skip connection: from input_blocks.1, then input_blocks.0.
    for index in range(2):
        shapes.update(_unet_res_block(f"output_blocks.{index}.0", 2 * channels, channels))
        shapes.update(_unet_spatial_transformer(f"output_blocks.{index}.1", channels))

    shapes.update(_norm("out.0", channels))
    shapes.update(_conv("out.2", LATENT_CHANNELS, channels, 3))
    return shapes


def _vae_res_block(prefix: str, in_channels: int, out_channels: int) -> dict[str, Shape]:
    shapes = {
        **_norm(f"{prefix}.norm1", in_channels),
        **_conv(f"{prefix}.conv1", out_channels, in_channels, 3),
        **_norm(f"{prefix}.norm2", out_channels),
        **_conv(f"{prefix}.conv2", out_channels, out_channels, 3),
    }
    if in_channels != out_channels:
        shapes.update(_conv(f"{prefix}.nin_shortcut", out_channels, in_channels, 1))
    return shapes


def _vae_middle(prefix: str, channels: int) -> dict[str, Shape]:
    shapes = {
        **_vae_res_block(f"{prefix}.block_1", channels, channels),
        **_norm(f"{prefix}.attn_1.norm", channels),
        **_vae_res_block(f"{prefix}.block_2", channels, channels),
    }
    for projection in ("q", "k", "v", "proj_out"):
        shapes.update(_conv(f"{prefix}.attn_1.{projection}", channels, channels, 1))
    return shapes


def vae_shapes() -> dict[str, Shape]:
    """Return the key shapes of the SD 1.x KL-f8 VAE (ch 128, ch_mult 1,2,4,4, two res blocks)."""
    level_channels = [128, 256, 512, 512]
    shapes = _conv("encoder.conv_in", level_channels[0], 3, 3)

    in_channels = level_channels[0]
    for level, out_channels in enumerate(level_channels):
        for block in range(2):
            shapes.update(_vae_res_block(f"encoder.down.{level}.block.{block}", in_channels, out_channels))
            in_channels = out_channels
        if level < len(level_channels) - 1:
            shapes.update(_conv(f"encoder.down.{level}.downsample.conv", out_channels, out_channels, 3))
    shapes.update(_vae_middle("encoder.mid", level_channels[-1]))
    shapes.update(_norm("encoder.norm_out", level_channels[-1]))
    shapes.update(_conv("encoder.conv_out", 2 * LATENT_CHANNELS, level_channels[-1], 3))

    shapes.update(_conv("decoder.conv_in", level_channels[-1], LATENT_CHANNELS, 3))
    shapes.update(_vae_middle("decoder.mid", level_channels[-1]))
    in_channels = level_channels[-1]
    for level in reversed(range(len(level_channels))):
        out_channels = level_channels[level]
        for block in range(3):
            shapes.update(_vae_res_block(f"decoder.up.{level}.block.{block}", in_channels, out_channels))
            in_channels = out_channels
        if level > 0:
            shapes.update(_conv(f"decoder.up.{level}.upsample.conv", out_channels, out_channels, 3))
    shapes.update(_norm("decoder.norm_out", level_channels[0]))
    shapes.update(_conv("decoder.conv_out", 3, level_channels[0], 3))

    shapes.update(_conv("quant_conv", 2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1))
    shapes.update(_conv("post_quant_conv", LATENT_CHANNELS, LATENT_CHANNELS, 1))
    return shapes


def _clip_encoder(prefix: str, width: int, layers: int) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for index in range(layers):
        layer = f"{prefix}.encoder.layers.{index}"
        for projection in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.update(_linear(f"{layer}.self_attn.{projection}", width, width))
        shapes.update(_norm(f"{layer}.layer_norm1", width))
        shapes.update(_linear(f"{layer}.mlp.fc1", 4 * width, width))
        shapes.update(_linear(f"{layer}.mlp.fc2", width, 4 * width))
        shapes.update(_norm(f"{layer}.layer_norm2", width))
    return shapes


def clip_text_shapes() -> dict[str, Shape]:
    """Return the key shapes of the CLIP ViT-L/14 text tower, Hugging Face ``text_model.*`` names."""
    return {
        "text_model.embeddings.token_embedding.weight": (TEXT_VOCAB, TEXT_WIDTH),
        "text_model.embeddings.position_embedding.weight": (TEXT_POSITIONS, TEXT_WIDTH),
        "text_model.embeddings.position_ids": (1, TEXT_POSITIONS),
        **_clip_encoder("text_model", TEXT_WIDTH, TEXT_LAYERS),
        **_norm("text_model.final_layer_norm", TEXT_WIDTH),
    }


def clip_vision_shapes() -> dict[str, Shape]:
    """Return the key shapes of the CLIP ViT-L/14 vision tower at 224 px, ``vision_model.*`` names."""
    return {
        "vision_model.embeddings.class_embedding": (VISION_WIDTH,),
        "vision_model.embeddings.patch_embedding.weight": (VISION_WIDTH, 3, VISION_PATCH, VISION_PATCH),
        "vision_model.embeddings.position_embedding.weight": (VISION_POSITIONS, VISION_WIDTH),
        "vision_model.embeddings.position_ids": (1, VISION_POSITIONS),
        # "layrnorm" is the spelling of the published checkpoint.
        **_norm("vision_model.pre_layrnorm", VISION_WIDTH),
        **_clip_encoder("vision_model", VISION_WIDTH, VISION_LAYERS),
        **_norm("vision_model.post_layernorm", VISION_WIDTH),
    }


def openai_clip_shapes() -> dict[str, Shape]:
    """Return the key shapes of ``openai/clip-vit-large-patch14`` ``model.safetensors``."""
    return {
        "logit_scale": (),
        **clip_text_shapes(),
        **clip_vision_shapes(),
        "text_projection.weight": (PROJECTION_DIM, TEXT_WIDTH),
        "visual_projection.weight": (PROJECTION_DIM, VISION_WIDTH),
    }



def sd15_checkpoint_shapes() -> dict[str, Shape]:
    """Return the key shapes of the stand-in single-file SD1.5 checkpoint."""
    shapes = {f"model.diffusion_model.{key}": shape for key, shape in unet_shapes().items()}
    shapes.update({f"first_stage_model.{key}": shape for key, shape in vae_shapes().items()})
    shapes.update({f"{CHECKPOINT_TEXT_PREFIX}{key}": shape for key, shape in clip_text_shapes().items()})
    return shapes


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def fill_tensor(name: str, shape: Shape, seed: int) -> torch.Tensor:
    """Return the stand-in value of one tensor: position ids count up, norms are 1, biases 0.

    Matrices and conv kernels are normal with std 1/sqrt(fan_in), embeddings normal with std
    0.02, both stored as fp16. The values depend only on ``seed`` and ``name``, so a tensor with the
    same name in two files (the text tower) gets the same values.
    """
    if name.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if name == "logit_scale":
        return torch.tensor(LOGIT_SCALE, dtype=torch.float32)
    if len(shape) == 1 and name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if len(shape) == 1 and name.endswith(".weight"):
        return torch.ones(shape, dtype=torch.float16)

    if "embedding" in name:
        std = EMBEDDING_STD
    else:
        std = 1.0 / math.sqrt(math.prod(shape[1:]))
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return torch.randn(shape, generator=generator).mul_(std).to(torch.float16)


def _metadata(layout: str, seed: int) -> dict[str, str]:
    return {
        "format": "pt",
        "stand_in": STAND_IN_MARKER,
        "stand_in_layout": layout,
        "stand_in_layout_version": LAYOUT_VERSION,
        "stand_in_seed": str(seed),
    }


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, Shape]] | None:
    """Return the metadata and key shapes of a safetensors file, or None if it cannot be parsed."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        return None
    return metadata, shapes


def _is_current(path: Path, layout: str, seed: int, shapes: dict[str, Shape]) -> bool:
    """Return whether ``path`` is a stand-in with this layout, version and seed.

    Raise FileExistsError if ``path`` is a readable safetensors file that this module did not write,
    so that real weights are never overwritten.
    """
    if not path.exists():
        return False
    header = _read_header(path)
    if header is None:
        logger.warning("Replacing unreadable file %s with a new stand-in", path)
        return False

    metadata, file_shapes = header
    if metadata.get("stand_in") != STAND_IN_MARKER:
        raise FileExistsError(
            f"{path} exists and is not a random-weight stand-in, so it is not overwritten. "
            "Pass another path or cache folder."
        )
    return metadata == _metadata(layout, seed) and file_shapes == shapes


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary_name, metadata=metadata)
        os.chmod(temporary_name, 0o644)
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def _write_stand_in(
    path: Path,
    layout: str,
    description: str,
    shapes: dict[str, Shape],
    seed: int,
    seed_name: dict[str, str] | None = None,
) -> Path:
    """Write a stand-in unless a current one exists, and return its path."""
    path = Path(path)
    if _is_current(path, layout, seed, shapes):
        logger.info("Using the cached random-weight stand-in %s at %s", description, path)
        return path

    started = time.perf_counter()
    seed_name = seed_name or {}
    tensors = {key: fill_tensor(seed_name.get(key, key), shape, seed) for key, shape in shapes.items()}
    _write_atomically(path, tensors, _metadata(layout, seed))
    logger.info(
        "Wrote a random-weight stand-in %s to %s in %.1f s. It is not a trained model: images made "
        "with it look like noise.",
        description,
        path,
        time.perf_counter() - started,
    )
    return path


def write_sd15_checkpoint(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a random-weight single-file SD1.5 checkpoint with a small U-Net, and return its path.

    Keys are ``model.diffusion_model.*``, ``first_stage_model.*`` and
    ``cond_stage_model.transformer.text_model.*``. The text encoder equals the text tower of
    ``write_openai_clip_vit_l14`` with the same seed. An existing stand-in with the same seed is
    kept, and FileExistsError is raised if ``path`` contains a model that is not a stand-in.
    """
    shapes = sd15_checkpoint_shapes()
    seed_name = {
        key: key.removeprefix(CHECKPOINT_TEXT_PREFIX) for key in shapes if key.startswith(CHECKPOINT_TEXT_PREFIX)
    }
    return _write_stand_in(Path(path), "sd15-checkpoint-one-level-unet", "SD1.5 checkpoint", shapes, seed, seed_name)


def write_openai_clip_vit_l14(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a random-weight OpenAI CLIP ViT-L/14 file in the Hugging Face layout, and return its path.

    An existing stand-in with the same seed is kept, and FileExistsError is raised if ``path``
    contains a model that is not a stand-in.
    """
    return _write_stand_in(Path(path), "openai-clip-vit-l14", "CLIP ViT-L/14", openai_clip_shapes(), seed)


def ensure_stand_in_models(directory: str | os.PathLike[str], *, seed: int = 0) -> StandInModels:
    """Write both stand-ins into ``directory`` under the file names the workflows reference."""
    directory = Path(directory)
    return StandInModels(
        checkpoint=write_sd15_checkpoint(directory / CHECKPOINT_FILE_NAME, seed=seed),
        clip=write_openai_clip_vit_l14(directory / CLIP_FILE_NAME, seed=seed),
    )
