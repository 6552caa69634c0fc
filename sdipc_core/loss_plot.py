"""A loss curve drawn with PIL, returned as a ComfyUI IMAGE tensor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PLOT_WIDTH = 640
PLOT_HEIGHT = 360
MARGIN_LEFT = 64
MARGIN_RIGHT = 16
MARGIN_TOP = 32
MARGIN_BOTTOM = 40
SMOOTHING_WINDOW = 10
"""Steps averaged by the running-mean line drawn over the raw losses."""


def draw_loss_curve(losses: Sequence[float], title: str = "training loss") -> Image.Image:
    """Return an RGB plot of per-step losses with a running mean, axis ranges and `title` on top."""
    image = Image.new("RGB", (PLOT_WIDTH, PLOT_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = PLOT_WIDTH - MARGIN_RIGHT, PLOT_HEIGHT - MARGIN_BOTTOM

    draw.text((left, 8), title, fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    if not losses:
        draw.text((left + 8, (top + bottom) // 2), "no finished steps", fill="gray", font=font)
        return image

    low, high = min(losses), max(losses)
    span = high - low if high > low else 1.0

    def point(step: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (step / max(len(losses) - 1, 1))
        y = bottom - (bottom - top) * ((value - low) / span)
        return x, y

    raw = [point(step, value) for step, value in enumerate(losses)]
    smoothed = [point(step, value) for step, value in enumerate(_running_mean(losses, SMOOTHING_WINDOW))]
    if len(raw) == 1:
        draw.ellipse([raw[0][0] - 2, raw[0][1] - 2, raw[0][0] + 2, raw[0][1] + 2], fill="steelblue")
    else:
        draw.line(raw, fill="lightsteelblue", width=1)
        draw.line(smoothed, fill="navy", width=2)

    draw.text((4, top - 6), f"{high:.4g}", fill="black", font=font)
    draw.text((4, bottom - 6), f"{low:.4g}", fill="black", font=font)
    draw.text((left, bottom + 8), "step 1", fill="black", font=font)
    draw.text((right - 60, bottom + 8), f"step {len(losses)}", fill="black", font=font)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """Return a PIL image as a ComfyUI IMAGE tensor, [1, H, W, 3] float in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).unsqueeze(0)


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    means, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        means.append(total / min(index + 1, window))
    return means
