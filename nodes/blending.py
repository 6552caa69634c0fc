"""Nodes that mix several images, or an image and a text, into SD-IPC prompts."""

from __future__ import annotations

import math

import torch

from ..sdipc_core import (
    DEFAULT_SINGULAR_VALUE_TOLERANCE,
    SDIPCError,
    check_same_vision_tower,
    convert_image_embeds,
    variation_prompt,
)
from ..sdipc_core.blending import (
    BLEND_MODES,
    INTERPOLATION_METHODS,
    blend_image_embeds,
    interpolate_image_embeds,
    interpolation_factors,
    mix_pooled,
    mix_prompts,
)
from .comfy_clip import measure_end_token_norm, start_token_state
from .image_to_prompt import SDIPCImageToPrompt
from .prompt_construction import pair_entries
from .socket_types import CATEGORY, SDIPC_PROJECTION

BLEND_INPUTS = 4
"""CLIP_VISION_OUTPUT sockets on the blend node; more images fit in a batch on any socket."""

MAX_INTERPOLATION_STEPS = 256


def _conversion_inputs() -> tuple[dict, dict]:
    """Return the scale and tolerance inputs of SD-IPC Image to Prompt, so the blend nodes convert alike."""
    inputs = SDIPCImageToPrompt.INPUT_TYPES()
    required = {name: inputs["required"][name] for name in ("scale", "scale_source")}
    return required, dict(inputs["optional"])


def checked_image_embeds(projection, clip_vision_output, name: str) -> torch.Tensor:
    """Return `f_img` of a CLIP_VISION_OUTPUT after checking it came from the projection's vision tower."""
    if clip_vision_output is None:
        raise SDIPCError(f"{name} is not connected. Connect the output of CLIP Vision Encode.")
    image_embeds = clip_vision_output["image_embeds"]
    check_same_vision_tower(projection, image_embeds, clip_vision_output["last_hidden_state"])
    return image_embeds


def image_prompt_from_embeds(clip, projection, f_img, scale, scale_source, tolerance) -> list:
    """Return the image-variation conditioning of image embeddings, as SD-IPC Image to Prompt builds it."""
    h_sos = start_token_state(clip)
    if scale_source == "measured from CLIP":
        scale = measure_end_token_norm(clip)
    f_cnvrt = convert_image_embeds(f_img, projection.text_projection, scale=scale, tolerance=tolerance)
    return [[variation_prompt(h_sos, f_cnvrt), {"pooled_output": f_cnvrt}]]


def parse_image_weights(text: str, image_count: int) -> list[float]:
    """Return the comma-separated weights in `text`, one per image."""
    entries = [entry.strip() for entry in text.replace("\n", ",").split(",") if entry.strip()]
    weights = []
    for entry in entries:
        try:
            weight = float(entry)
        except ValueError:
            raise SDIPCError(f"image_weights entry {entry!r} is not a number. Write numbers separated by commas, e.g. 1, 0.5, -0.3.") from None
        if not math.isfinite(weight):
            raise SDIPCError(f"image_weights entry {entry!r} is not a finite number.")
        weights.append(weight)

    if len(weights) != image_count:
        raise SDIPCError(
            f"image_weights has {len(weights)} weights but {image_count} images are connected. Give one weight per image, "
            "in socket order with each batch in its own order, or clear image_weights to use weight_1 to weight_4."
        )
    return weights


class SDIPCBlendImages:
    DESCRIPTION = (
        "Mixes several images into one SD-IPC prompt. The CLIP image embeddings are mixed before conversion: "
        "average divides the weighted sum by the weight sum, normalized average does the same after scaling every "
        "embedding to length 1 (so no image dominates by its length), weighted sum does not divide. A negative "
        "weight subtracts an image, e.g. weights 1 and -0.5 for 'this image minus that style'. Every image of a "
        "batched input gets that input's weight unless image_weights lists one weight per image."
    )
    CATEGORY = CATEGORY
    FUNCTION = "blend"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("image_prompt",)
    OUTPUT_TOOLTIPS = ("One image-variation prompt [1, 77, 768] for the mix, usable wherever SD-IPC Image to Prompt's output is.",)

    @classmethod
    def INPUT_TYPES(cls):
        conversion_required, conversion_optional = _conversion_inputs()
        weight = {
            "default": 1.0,
            "min": -10.0,
            "max": 10.0,
            "step": 0.01,
            "tooltip": "Weight of every image on this input; negative subtracts it.",
        }
        required = {
            "clip": ("CLIP", {"tooltip": "The CLIP of a Stable Diffusion 1.x checkpoint; it gives the start-token state."}),
            "projection": (SDIPC_PROJECTION, {"tooltip": "From Load SD-IPC Projection, read from the same CLIP file as the vision model."}),
            "mode": (
                list(BLEND_MODES),
                {
                    "default": BLEND_MODES[0],
                    "tooltip": "average: Σ w·f / Σ w. normalized average: Σ w·(f/|f|) / Σ w. weighted sum: Σ w·f, "
                    "which allows weights summing to 0, such as 1 and -1.",
                },
            ),
            "clip_vision_output_1": ("CLIP_VISION_OUTPUT", {"tooltip": "From CLIP Vision Encode, with the OpenAI CLIP ViT-L/14 vision model."}),
        }
        optional = {}
        for index in range(1, BLEND_INPUTS + 1):
            if index > 1:
                optional[f"clip_vision_output_{index}"] = ("CLIP_VISION_OUTPUT", {"tooltip": "Another image or batch to mix in."})
            required[f"weight_{index}"] = ("FLOAT", dict(weight))
        required.update(conversion_required)
        optional["image_weights"] = (
            "STRING",
            {
                "default": "",
                "multiline": False,
                "tooltip": "Optional: one comma-separated weight per image, in socket order and batch order "
                "(e.g. 1, 0.5, -0.3). When set, it replaces weight_1 to weight_4.",
            },
        )
        optional.update(conversion_optional)
        return {"required": required, "optional": optional}

    def blend(self, clip, projection, mode, scale, scale_source, image_weights="", tolerance=DEFAULT_SINGULAR_VALUE_TOLERANCE, **inputs):
        embeddings, weights = [], []
        for index in range(1, BLEND_INPUTS + 1):
            clip_vision_output = inputs.get(f"clip_vision_output_{index}")
            if clip_vision_output is None:
                continue
            f_img = checked_image_embeds(projection, clip_vision_output, f"clip_vision_output_{index}")
            embeddings.append(f_img)
            weights.extend([inputs[f"weight_{index}"]] * f_img.shape[0])

        if not embeddings:
            raise SDIPCError("No image is connected. Connect CLIP Vision Encode to clip_vision_output_1.")
        f_img = torch.cat(embeddings)
        if image_weights.strip():
            weights = parse_image_weights(image_weights, f_img.shape[0])

        mixed = blend_image_embeds(f_img, weights, mode)
        return (image_prompt_from_embeds(clip, projection, mixed, scale, scale_source, tolerance),)


class SDIPCInterpolateImages:
    DESCRIPTION = (
        "Interpolates between two images in CLIP's image-embedding space and converts the result to SD-IPC prompts. "
        "linear mixes the embeddings; spherical follows the arc between their directions at constant angle and "
        "moves the length linearly (so equal-length embeddings keep their length). With steps above 1 it returns "
        "a batch of prompts from the first image (factor 0) to the second (factor 1), for smooth sequences."
    )
    CATEGORY = CATEGORY
    FUNCTION = "interpolate"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("image_prompt",)
    OUTPUT_TOOLTIPS = (
        "Image-variation prompts [pairs·steps, 77, 768], pair by pair; set the latent batch size to match.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        conversion_required, conversion_optional = _conversion_inputs()
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP of a Stable Diffusion 1.x checkpoint; it gives the start-token state."}),
                "projection": (SDIPC_PROJECTION, {"tooltip": "From Load SD-IPC Projection, read from the same CLIP file as the vision model."}),
                "clip_vision_output_a": ("CLIP_VISION_OUTPUT", {"tooltip": "The first image (factor 0), from CLIP Vision Encode."}),
                "clip_vision_output_b": ("CLIP_VISION_OUTPUT", {"tooltip": "The second image (factor 1), from CLIP Vision Encode."}),
                "method": (
                    list(INTERPOLATION_METHODS),
                    {"default": "spherical", "tooltip": "linear: straight line between the embeddings. spherical: arc between their directions."},
                ),
                "factor": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "0 gives the first image, 1 the second. Values from a link outside [0, 1] are clamped, with a "
                        "warning in the log. Ignored when steps is above 1.",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": MAX_INTERPOLATION_STEPS,
                        "tooltip": "1: one prompt at factor. K above 1: K prompts at factors 0, 1/(K-1), …, 1.",
                    },
                ),
                **conversion_required,
            },
            "optional": conversion_optional,
        }

    def interpolate(
        self,
        clip,
        projection,
        clip_vision_output_a,
        clip_vision_output_b,
        method,
        factor,
        steps,
        scale,
        scale_source,
        tolerance=DEFAULT_SINGULAR_VALUE_TOLERANCE,
    ):
        f_img_a = checked_image_embeds(projection, clip_vision_output_a, "clip_vision_output_a")
        f_img_b = checked_image_embeds(projection, clip_vision_output_b, "clip_vision_output_b")

        f_img = interpolate_image_embeds(f_img_a, f_img_b, interpolation_factors(steps, factor), method)
        return (image_prompt_from_embeds(clip, projection, f_img, scale, scale_source, tolerance),)


class SDIPCMixImageAndText:
    DESCRIPTION = (
        "Mixes an image prompt and a text prompt position by position: (1 - image_weight)·text + image_weight·image. "
        "Unlike Conditioning Average it repeats the image prompt over every 77-token chunk of a long text prompt "
        "and keeps N images as N prompts. Pooled outputs are mixed the same way."
    )
    CATEGORY = CATEGORY
    FUNCTION = "mix"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The mixed prompt, [N, 77·chunks, 768], with the text's other conditioning settings.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_conditioning": ("CONDITIONING", {"tooltip": "A text prompt, from CLIP Text Encode."}),
                "image_prompt": ("CONDITIONING", {"tooltip": "The output of SD-IPC Image to Prompt or an SD-IPC blend node."}),
                "image_weight": (
                    "FLOAT",
                    {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "0 gives the text alone, 1 the image alone."},
                ),
            }
        }

    def mix(self, text_conditioning, image_prompt, image_weight):
        output = []
        for text_entry, image_entry in pair_entries(text_conditioning, image_prompt, ("text_conditioning", "image_prompt")):
            prompt = mix_prompts(text_entry[0], image_entry[0], image_weight)
            options = dict(text_entry[1])
            pooled = mix_pooled(options.get("pooled_output"), image_entry[1].get("pooled_output"), image_weight)
            if pooled is not None:
                options["pooled_output"] = pooled
            output.append([prompt, options])
        return (output,)
