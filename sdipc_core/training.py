"""The parts of SD-IPC-FT and SD-IPC-CT training that need no ComfyUI: data, sampling, loss, rollback.

One training step draws a batch of reference images, a timestep and Gaussian noise per image, and
minimises

    loss = L(c_img) + text_weight · L(c_txt),    L(c) = ‖ε_θ(x_t, t, c) − ε‖²

where `c_img` is the converted image prompt of each image and `c_txt` a text prompt for it (the
text term keeps the U-Net following ordinary prompts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import SDIPCError

NUM_TRAIN_TIMESTEPS = 1000
"""Discrete timesteps of Stable Diffusion 1.x's noise schedule, drawn uniformly during training."""

LATENT_DOWNSCALE = 8
"""Pixels per latent position in the SD 1.x VAE along each side."""

RESIZE_MODES = ("crop", "stretch", "none")
"""crop: scale the shorter side to the resolution, then centre-crop a square. stretch: scale to a
square, ignoring the aspect ratio. none: keep every image's size; they must all match."""


def prepare_images(images: torch.Tensor | Sequence[torch.Tensor], resolution: int, resize_mode: str) -> torch.Tensor:
    """Return the images as one [N, H, W, 3] batch in [0, 1], resized as `resize_mode` specifies.

    `images` is one ComfyUI IMAGE tensor [N, H, W, C] or a list of them (or of single [H, W, C]
    images) whose sizes may differ. An alpha channel is dropped.
    """
    if resize_mode not in RESIZE_MODES:
        raise SDIPCError(f"Invalid resize mode {resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}.")
    singles = _split_images(images)
    if not singles:
        raise SDIPCError("No training images: the image input is empty. Connect at least one image (a folder of ~100 for fine-tuning, 3-6 photos of one subject for customization).")

    if resize_mode == "none":
        sizes = sorted({tuple(image.shape[:2]) for image in singles})
        if len(sizes) > 1:
            raise SDIPCError(
                f"The training images have {len(sizes)} different sizes ({', '.join(f'{w}x{h}' for h, w in sizes[:4])}); "
                "with resize mode 'none' they must all match. Choose resize mode 'crop' or 'stretch'."
            )
        height, width = sizes[0]
        if height % LATENT_DOWNSCALE or width % LATENT_DOWNSCALE:
            raise SDIPCError(
                f"The training images are {width}x{height}, but the VAE needs sides divisible by {LATENT_DOWNSCALE}. "
                "Choose resize mode 'crop' or 'stretch'."
            )
        return torch.stack(singles).clamp(0.0, 1.0)

    if resolution % LATENT_DOWNSCALE:
        raise SDIPCError(f"Training resolution {resolution} is not divisible by {LATENT_DOWNSCALE}. Pick a multiple of 64, such as 512.")
    return torch.stack([_resize(image, resolution, resize_mode) for image in singles]).clamp(0.0, 1.0)


def split_prompts(text: str) -> list[str]:
    """Return the non-empty lines of a multi-line prompt input, one prompt per line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def prompts_for_images(prompts: Sequence[str], num_images: int) -> list[str]:
    """Return one text prompt per image: prompt i for image i when the counts match, else the prompts in turn."""
    if not prompts:
        return []
    return [prompts[index % len(prompts)] for index in range(num_images)]


@dataclass(frozen=True)
class TrainingBatch:
    """The random draws of one training step."""

    indices: torch.Tensor
    """Images in the batch, [B]."""
    timesteps: torch.Tensor
    """Integer timesteps in [0, NUM_TRAIN_TIMESTEPS), float, [B]."""
    noise: torch.Tensor
    """Standard normal noise, [B, *latent_shape]."""


def sample_batch(
    generator: torch.Generator,
    dataset_size: int,
    batch_size: int,
    latent_shape: Sequence[int],
    num_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> TrainingBatch:
    """Draw a batch of distinct images (at most `dataset_size`), timesteps and noise from `generator`."""
    count = min(batch_size, dataset_size)
    indices = torch.randperm(dataset_size, generator=generator)[:count]
    timesteps = torch.randint(0, num_timesteps, (count,), generator=generator).float()
    noise = torch.randn((count, *latent_shape), generator=generator)
    return TrainingBatch(indices=indices, timesteps=timesteps, noise=noise)


def denoising_loss(noisy: torch.Tensor, denoised: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Return the ε-prediction MSE of a denoiser that returned `denoised` for `noisy = x_0 + sigma · noise`.

    ComfyUI's models return the denoised estimate; `(noisy - denoised) / sigma` is the noise they
    predicted, which for an ε-prediction model is exactly its raw output.
    """
    sigma = sigma.reshape(-1, *([1] * (noisy.ndim - 1))).to(noisy)
    predicted_noise = (noisy - denoised) / sigma
    return F.mse_loss(predicted_noise.float(), noise.float())


def combined_loss(image_loss: torch.Tensor, text_loss: torch.Tensor | None, text_weight: float) -> torch.Tensor:
    """Return `image_loss + text_weight · text_loss`, or `image_loss` when there is no text term."""
    if text_loss is None or text_weight == 0.0:
        return image_loss
    return image_loss + text_weight * text_loss


class LastGoodParameters:
    """A copy of trainable parameters from the last step whose loss was finite, to roll back to."""

    def __init__(self, parameters: Iterable[torch.Tensor]):
        self.parameters = list(parameters)
        self.saved: list[torch.Tensor] | None = None
        self.steps = 0

    def record(self, steps: int) -> None:
        """Copy the current parameters, which contain `steps` optimizer updates."""
        self.saved = [parameter.detach().clone() for parameter in self.parameters]
        self.steps = steps

    def restore(self) -> int:
        """Copy the recorded values back into the parameters; return how many updates they contain."""
        if self.saved is None:
            raise RuntimeError("No parameters were recorded.")
        with torch.no_grad():
            for parameter, saved in zip(self.parameters, self.saved):
                parameter.copy_(saved)
        return self.steps


def _split_images(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Return every image as an [H, W, 3] float tensor."""
    if isinstance(images, torch.Tensor):
        images = [images]
    singles = []
    for item in images:
        if item is None:
            continue
        batch = item if item.ndim == 4 else item.unsqueeze(0)
        if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
            raise SDIPCError(f"An image input has shape {list(item.shape)}, but ComfyUI images are [batch, height, width, channels].")
        for image in batch:
            image = image.float()
            if image.shape[-1] == 1:
                image = image.expand(-1, -1, 3)
            singles.append(image[..., :3])
    return singles


def _resize(image: torch.Tensor, resolution: int, resize_mode: str) -> torch.Tensor:
    """Return one [H, W, 3] image resized to [resolution, resolution, 3]."""
    height, width = image.shape[:2]
    pixels = image.movedim(-1, 0).unsqueeze(0)
    if resize_mode == "stretch":
        size = (resolution, resolution)
    else:
        scale = resolution / min(height, width)
        size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    if size != (height, width):
        pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)

    top = (pixels.shape[2] - resolution) // 2
    left = (pixels.shape[3] - resolution) // 2
    pixels = pixels[:, :, top:top + resolution, left:left + resolution]
    return pixels.squeeze(0).movedim(0, -1)
