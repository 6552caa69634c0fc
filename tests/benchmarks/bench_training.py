"""Benchmark: SD-IPC's cross-attention trainer against ComfyUI's TrainLoraNode, in one process.

Prints, and asserts nothing about time:
1. per-step time (median gap between optimizer steps, first step excluded) and peak memory of both
   trainers at the same rank, steps, batch size, dtype and image size on the same model, and the
   ratios SD-IPC / TrainLoraNode. SD-IPC runs without its text term here, so that both push the
   same batch through the U-Net. A second SD-IPC row adds the text term, which doubles the U-Net
   batch. The images are encoded (VAE, CLIP vision, text) before the measured calls of both. With
   --vision-prompts N, a further SD-IPC row also trains N prompt tokens per layer of the full-size
   stand-in CLIP ViT-L/14 vision encoder.
2. the wall time of one SD-IPC-CT run with the Customize Subject node's defaults (30 steps, batch 2,
   rank 8), including its image encoding, on photos of one subject.

Peak memory on a CPU is the peak resident set size (RSS) of the process during the call minus the
RSS just before it (after glibc's malloc_trim returned freed heap pages), sampled every 5 ms by a
thread (psutil). On CUDA it is `torch.cuda.max_memory_allocated` minus the allocation before the call.

Run: python tests/benchmarks/bench_training.py [--steps N] [--batch-size N] [--rank N] [--size PX]
     [--ct-size PX] [--vision-prompts N] [--no-checkpointing] [--device cpu|cuda]
The random-weight stand-in U-Net has one resolution level (320 channels), far smaller than SD 1.5's,
so absolute times are far below a real model's, and other processes on the machine add noise.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFYUI_ROOT = Path(os.environ.get("COMFYUI_ROOT", "/opt/ComfyUI"))
MODEL_CACHE = Path(os.environ.get("SDIPC_TEST_CACHE", "~/.cache/sdipc/stand_in_models")).expanduser()
PHOTOS = REPO_ROOT.parent / "shared" / "data" / "dreambooth" / "dog"
RSS_SAMPLE_INTERVAL_S = 0.005


class PeakMemory:
    """Context manager measuring the peak memory added while it is active, in MiB."""

    def __init__(self, device):
        self.device = device
        self.peak_mib = 0.0

    def __enter__(self):
        import psutil
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        self.process = psutil.Process()
        _release_free_heap()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(RSS_SAMPLE_INTERVAL_S)

    def __exit__(self, *exc_info):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.baseline) / 2**20
            return
        self.running = False
        self.thread.join()
        self.peak_mib = (self.peak - self.baseline) / 2**20


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`), so that the RSS baseline excludes memory a previous run freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class StepTimer:
    """Records the time of every optimizer step taken while it is active, through torch's global hook."""

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times = []
        self.handle = register_optimizer_step_post_hook(lambda *args: self.times.append(time.perf_counter()))
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()

    def per_step_s(self) -> float:
        gaps = [later - earlier for earlier, later in zip(self.times, self.times[1:])]
        return statistics.median(gaps) if gaps else float("nan")


def load_comfyui(device: str):
    sys.path.insert(0, str(COMFYUI_ROOT))
    sys.path.append(str(REPO_ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(REPO_ROOT))):
        raise RuntimeError(f"ComfyUI could not load the pack from {REPO_ROOT}; its log says why.")
    return nodes, sys.modules[str(REPO_ROOT).replace(".", "_x_")]


def load_photos(count: int, size: int):
    import numpy as np
    import torch
    from PIL import Image

    paths = sorted(PHOTOS.glob("*.jpg"))[:count]
    if len(paths) < count:
        raise FileNotFoundError(f"Need {count} photos in {PHOTOS}, found {len(paths)}.")
    pixels = [np.asarray(Image.open(path).convert("RGB").resize((size, size)), dtype=np.float32) / 255.0 for path in paths]
    return torch.from_numpy(np.stack(pixels))


def measure(device, function):
    """Run `function` and return (per-step seconds, peak MiB, wall seconds)."""
    with StepTimer() as timer, PeakMemory(device) as memory:
        started = time.perf_counter()
        function()
        wall = time.perf_counter() - started
    return timer.per_step_s(), memory.peak_mib, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="training image side in pixels")
    parser.add_argument("--ct-size", type=int, default=64, help="image side of the SD-IPC-CT run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off in both trainers")
    parser.add_argument("--vision-prompts", type=int, default=0, help="also time SD-IPC with this many vision prompt tokens per layer")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    nodes, pack = load_comfyui(arguments.device)
    import comfy.clip_vision
    import comfy.model_management
    import comfy.sd
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    sys.path.append(str(REPO_ROOT))
    from workflows.stand_in_models import ensure_stand_in_models

    stand_ins = ensure_stand_in_models(MODEL_CACHE)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(stand_ins.checkpoint), output_vae=True, output_clip=True)[:3]
    clip_vision = comfy.clip_vision.load(str(stand_ins.clip))
    projection = pack.nodes.projection_loader.load_cached_projections(str(stand_ins.clip))
    device = comfy.model_management.get_torch_device()
    dtype = "bf16" if device.type == "cuda" else "fp32"
    checkpointing = not arguments.no_checkpointing
    images = load_photos(arguments.images, arguments.size)
    glue = pack.nodes.comfy_training

    def settings(steps: int, text_weight: float, vision_prompt_tokens: int = 0):
        return glue.TrainingSettings(
            method="SD-IPC-FT", steps=steps, learning_rate=1e-4, rank=arguments.rank, alpha=float(arguments.rank),
            batch_size=arguments.batch_size, seed=0, targets=("to_k", "to_v"), text_weight=text_weight,
            vision_prompt_tokens=vision_prompt_tokens, vision_prompt_learning_rate=1e-3, training_dtype=dtype,
            gradient_checkpointing=checkpointing, scale=27.5, tolerance=0.3,
        )  # fmt: skip

    # The images and prompts are encoded outside the measured calls, as TrainLoraNode receives latents.
    with torch.inference_mode():
        data = glue.encode_training_data(model, clip, clip_vision, projection, vae, images, ["a photo of a dog"], settings(1, 1.0))

    def sdipc(steps: int, text_weight: float, vision_prompt_tokens: int = 0):
        with torch.inference_mode():
            glue.train_adapter(model, clip_vision, projection, data, settings(steps, text_weight, vision_prompt_tokens))

    with torch.inference_mode():
        latents = {"samples": vae.encode(images)}
        positive = nodes.CLIPTextEncode().encode(clip, "a photo of a dog")[0]

    def comfyui(steps: int):
        with torch.inference_mode():
            TrainLoraNode().train(
                model, latents, positive, arguments.batch_size, steps, 1, 1e-4, arguments.rank, "AdamW", "MSE", 0,
                dtype, dtype, "LoRA", checkpointing, "[None]",
            )  # fmt: skip

    # Warm-up: the first call of each pays one-off costs (the pseudo-inverse, kernel selection).
    sdipc(2, 0.0)
    comfyui(2)

    rows = {
        "SD-IPC, image term only": measure(device, lambda: sdipc(arguments.steps, 0.0)),
        "ComfyUI TrainLoraNode": measure(device, lambda: comfyui(arguments.steps)),
        "SD-IPC, image + text term": measure(device, lambda: sdipc(arguments.steps, 1.0)),
    }
    if arguments.vision_prompts:
        name = f"SD-IPC, {arguments.vision_prompts} vision prompts"
        rows[name] = measure(device, lambda: sdipc(arguments.steps, 0.0, arguments.vision_prompts))

    print(f"\nDevice {device}, dtype {dtype}, gradient checkpointing {checkpointing}; {arguments.images} images of "
          f"{arguments.size} px, batch {arguments.batch_size}, rank {arguments.rank}, {arguments.steps} steps; stand-in U-Net.")  # fmt: skip
    print(f"{'trainer':28} {'s/step':>8} {'peak MiB':>9} {'call s':>8}")
    for name, (per_step, peak, wall) in rows.items():
        print(f"{name:28} {per_step:8.3f} {peak:9.1f} {wall:8.2f}")
    ours, theirs = rows["SD-IPC, image term only"], rows["ComfyUI TrainLoraNode"]
    print(f"ratio SD-IPC / TrainLoraNode: time per step {ours[0] / theirs[0]:.2f}, peak memory {ours[1] / max(theirs[1], 1e-9):.2f}")

    ct_photos = load_photos(arguments.images, arguments.ct_size)
    customize = pack.NODE_CLASS_MAPPINGS["SDIPCCustomizeSubject"]()
    defaults = {name: spec[1]["default"] for name, spec in customize.INPUT_TYPES()["required"].items() if len(spec) > 1 and "default" in spec[1]}
    inputs = {**defaults, "model": model, "clip": clip, "clip_vision": clip_vision, "projection": projection, "vae": vae,
              "images": ct_photos, "save_name": "", "resolution": arguments.ct_size}  # fmt: skip
    with torch.inference_mode():
        per_step, peak, wall = measure(device, lambda: customize.customize(**{name: [value] for name, value in inputs.items()}))
    print(f"SD-IPC-CT defaults ({defaults['steps']} steps, batch {defaults['batch_size']}, rank {defaults['rank']}) on "
          f"{arguments.images} photos of {arguments.ct_size} px: {wall:.1f} s in all, {per_step:.3f} s/step, peak {peak:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
