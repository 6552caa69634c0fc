"""Benchmark: what SD-IPC adds to an image-variation run, in the same process as ComfyUI.

Prints two figures and asserts nothing about time:
1. the conversion cost per image beyond CLIPVisionEncode (median ms), with the pseudo-inverse of
   W_t cached and recomputed, for the core conversion alone and for the whole node call (which
   also encodes the empty prompt for the start-token state);
2. the ratio of KSampler time with SD-IPC conditioning to KSampler time with ordinary text
   conditioning, on the same model, alternating the two so that drift affects both alike.

Run: python tests/benchmarks/bench_conversion.py [--repeats N] [--size PX] [--steps N]
It uses the random-weight stand-in models with a small U-Net, so sampling times are far below a
real SD 1.5 U-Net's. The ratio is what carries over.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFYUI_ROOT = Path(os.environ.get("COMFYUI_ROOT", "/opt/ComfyUI"))
PHOTO = REPO_ROOT.parent / "shared" / "data" / "dreambooth" / "dog" / "00.jpg"


def median_ms(function, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def load_comfyui():
    sys.path.insert(0, str(COMFYUI_ROOT))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import nodes

    pack = importlib_pack()
    return nodes, pack


def importlib_pack():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sdipc_pack", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sdipc_pack"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per figure (default 20)")
    parser.add_argument("--sampler-repeats", type=int, default=6, help="KSampler runs per conditioning (default 6)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels for the sampler runs (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps (default 4)")
    parser.add_argument("--models", type=Path, default=Path.home() / ".cache" / "sdipc" / "stand_in_models")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from PIL import Image
    import numpy as np

    sys.path.insert(0, str(REPO_ROOT / "workflows"))
    from stand_in_models import ensure_stand_in_models

    models = ensure_stand_in_models(arguments.models)
    nodes, pack = load_comfyui()
    import comfy.clip_vision
    import comfy.sd
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    from sdipc_pack.sdipc_core import convert_image_embeds, load_projections, variation_prompt
    from sdipc_pack.sdipc_core.conversion import _pinv_cache

    torch.set_grad_enabled(False)
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(models.checkpoint), output_vae=True, output_clip=True)[:3]
    clip_vision = comfy.clip_vision.load(str(models.clip))
    projections = load_projections(models.clip)
    photo = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float32) / 255.0
    image = torch.from_numpy(photo)[None]
    vision_output = nodes.CLIPVisionEncode().encode(clip_vision, image, "center")[0]
    image_embeds = vision_output["image_embeds"]
    W_t = projections.text_projection

    def convert_uncached():
        _pinv_cache.clear()
        variation_prompt(torch.zeros(768), convert_image_embeds(image_embeds, W_t))

    def convert_cached():
        variation_prompt(torch.zeros(768), convert_image_embeds(image_embeds, W_t))

    image_to_prompt = pack.NODE_CLASS_MAPPINGS["SDIPCImageToPrompt"]()

    def node_cached():
        image_to_prompt.convert(clip, vision_output, projections, 27.5, "fixed")

    def node_uncached():
        _pinv_cache.clear()
        image_to_prompt.convert(clip, vision_output, projections, 27.5, "fixed")

    convert_cached()
    print(f"SD-IPC conversion per image beyond CLIPVisionEncode (median of {arguments.repeats}, ms):")
    print(f"  core conversion, pseudo-inverse cached:     {median_ms(convert_cached, arguments.repeats):8.3f}")
    print(f"  core conversion, pseudo-inverse recomputed: {median_ms(convert_uncached, arguments.repeats):8.3f}")
    print(f"  whole node call, pseudo-inverse cached:     {median_ms(node_cached, arguments.repeats):8.3f}")
    print(f"  whole node call, pseudo-inverse recomputed: {median_ms(node_uncached, arguments.repeats):8.3f}")

    sdipc_conditioning = image_to_prompt.convert(clip, vision_output, projections, 27.5, "fixed")[0]
    text_conditioning = nodes.CLIPTextEncode().encode(clip, "a photo of a dog on the grass")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(arguments.size, arguments.size, 1)[0]
    sampler = nodes.KSampler()

    def sample(positive):
        sampler.sample(model, 0, arguments.steps, 7.5, "euler", "normal", positive, negative, latent, denoise=1.0)

    sample(text_conditioning)  # warm-up: loads the model and fills caches
    text_times, sdipc_times = [], []
    for repeat in range(arguments.sampler_repeats):
        # Alternate which conditioning goes first, so that an order effect cancels out.
        pair = [(text_times, text_conditioning), (sdipc_times, sdipc_conditioning)]
        for timings, conditioning in pair if repeat % 2 == 0 else reversed(pair):
            timings.append(median_ms(lambda: sample(conditioning), 1))
    text_median = statistics.median(text_times)
    sdipc_median = statistics.median(sdipc_times)
    print(f"KSampler, {arguments.size} px, {arguments.steps} steps, median of {arguments.sampler_repeats} alternating runs:")
    print(f"  text conditioning:   {text_median:8.1f} ms")
    print(f"  SD-IPC conditioning: {sdipc_median:8.1f} ms")
    print(f"  ratio SD-IPC / text: {sdipc_median / text_median:8.3f}")


if __name__ == "__main__":
    main()
