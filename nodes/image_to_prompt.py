"""Node that turns CLIP vision outputs into SD-IPC image-variation conditioning."""

from __future__ import annotations

from ..sdipc_core import (
    DEFAULT_END_TOKEN_NORM,
    DEFAULT_SINGULAR_VALUE_TOLERANCE,
    check_same_vision_tower,
    convert_image_embeds,
    variation_prompt,
)
from .comfy_clip import measure_end_token_norm, start_token_state
from .socket_types import CATEGORY, SDIPC_PROJECTION

SCALE_SOURCES = ("fixed", "measured from CLIP")


def converted_image_embeds(clip, clip_vision_output, projection, scale: float, scale_source: str, tolerance: float):
    """Return `f_cnvrt` for every image of a CLIP_VISION_OUTPUT, after checking its provenance."""
    image_embeds = clip_vision_output["image_embeds"]
    check_same_vision_tower(projection, image_embeds, clip_vision_output["last_hidden_state"])
    if scale_source == "measured from CLIP":
        scale = measure_end_token_norm(clip)
    return convert_image_embeds(image_embeds, projection.text_projection, scale=scale, tolerance=tolerance)


class SDIPCImageToPrompt:
    DESCRIPTION = (
        "SD-IPC image variation: turns each image's CLIP embedding into a prompt with no training. "
        "The embedding goes through the pseudo-inverse of CLIP's text projection, is scaled to the norm of an "
        "end-token state, and fills every position after the start token. A batch of N images gives a "
        "conditioning batch of N: set the latent batch size to N for one variation per image."
    )
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("A [N, 77, 768] prompt per image, usable as positive or negative conditioning by any sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP of a Stable Diffusion 1.x checkpoint; it gives the start-token state."}),
                "clip_vision_output": (
                    "CLIP_VISION_OUTPUT",
                    {"tooltip": "From CLIP Vision Encode, with the OpenAI CLIP ViT-L/14 vision model."},
                ),
                "projection": (SDIPC_PROJECTION, {"tooltip": "From Load SD-IPC Projection, read from the same CLIP file."}),
                "scale": (
                    "FLOAT",
                    {
                        "default": DEFAULT_END_TOKEN_NORM,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "tooltip": "Norm of the converted end-token state. 27.5 is typical for SD 1.x; lower weakens the image's influence.",
                    },
                ),
                "scale_source": (
                    list(SCALE_SOURCES),
                    {
                        "default": "fixed",
                        "tooltip": "fixed: use the scale above. measured from CLIP: use the mean end-token norm of this text encoder on a few captions.",
                    },
                ),
            },
            "optional": {
                "tolerance": (
                    "FLOAT",
                    {
                        "default": DEFAULT_SINGULAR_VALUE_TOLERANCE,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "Singular values of the text projection at or below this are dropped from its pseudo-inverse.",
                        "advanced": True,
                    },
                ),
            },
        }

    def convert(self, clip, clip_vision_output, projection, scale, scale_source, tolerance=DEFAULT_SINGULAR_VALUE_TOLERANCE):
        h_sos = start_token_state(clip)
        f_cnvrt = converted_image_embeds(clip, clip_vision_output, projection, scale, scale_source, tolerance)
        prompt = variation_prompt(h_sos, f_cnvrt)
        return ([[prompt, {"pooled_output": f_cnvrt}]],)
