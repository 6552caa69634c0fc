"""Nodes that build prompts from a text's end tokens: text-edited variation, end-token modes, image as negative."""

from __future__ import annotations

from ..sdipc_core import SDIPCError
from ..sdipc_core.blending import mix_pooled, mix_prompts
from ..sdipc_core.end_tokens import (
    DEFAULT_TEXT_EDIT_ALPHA,
    end_tokens_only_prompt,
    image_at_end_tokens_prompt,
    image_end_token_state,
    masked_words_prompt,
    text_edited_pooled,
    text_edited_prompt,
)
from .comfy_clip import check_sd1_clip, encode_prompt_with_layout
from .socket_types import CATEGORY

END_TOKEN_MODES = ("end tokens only", "mask words", "image at end tokens")

_IMAGE_PROMPT_TOOLTIP = "The converted image: the output of SD-IPC Image to Prompt or of an SD-IPC blend node."
_TEXT_TOOLTIP = "The prompt, with CLIP Text Encode's syntax: (word:1.2) weights, embeddings, any length."
_CLIP_INPUT = ("CLIP", {"tooltip": "The CLIP of a Stable Diffusion 1.x checkpoint, to encode the text."})
_TEXT_INPUT = ("STRING", {"default": "", "multiline": True, "dynamicPrompts": True, "tooltip": _TEXT_TOOLTIP})


def pair_entries(first: list, second: list, names: tuple[str, str]) -> list[tuple]:
    """Return the entries of two conditioning lists in pairs. A single entry pairs with every entry of the other list."""
    if len(first) == len(second):
        return list(zip(first, second))
    if len(first) == 1:
        return [(first[0], entry) for entry in second]
    if len(second) == 1:
        return [(entry, second[0]) for entry in first]
    raise SDIPCError(
        f"The {names[0]} has {len(first)} conditioning entries and the {names[1]} {len(second)}, so they cannot be "
        "paired. Connect a conditioning with one entry (not one joined by Conditioning Combine) to one of them."
    )


class SDIPCTextEditedVariation:
    DESCRIPTION = (
        "SD-IPC text-edited variation: an image variation steered by a text edit. The text is encoded as CLIP Text "
        "Encode does. Its start and word tokens stay, and every end-token position of every 77-token chunk becomes "
        "the converted image plus alpha times the text's own end-token state. N images give N prompts."
    )
    CATEGORY = CATEGORY
    FUNCTION = "construct"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The edit prompt with the image in its end tokens, [N, 77·chunks, 768], for a sampler's positive input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": _CLIP_INPUT,
                "text": _TEXT_INPUT,
                "image_prompt": ("CONDITIONING", {"tooltip": _IMAGE_PROMPT_TOOLTIP}),
                "alpha": (
                    "FLOAT",
                    {
                        "default": DEFAULT_TEXT_EDIT_ALPHA,
                        "min": 0.0,
                        "max": 2.0,
                        "step": 0.01,
                        "tooltip": "Weight of the text's end-token states added to the image. 0: the end tokens are the image "
                        "alone and the text acts only through its words. Higher follows the text more.",
                    },
                ),
            }
        }

    def construct(self, clip, text, image_prompt, alpha):
        text_conditioning, layout = encode_prompt_with_layout(clip, text)

        output = []
        for text_entry, image_entry in pair_entries(text_conditioning, image_prompt, ("text", "image_prompt")):
            f_cnvrt = image_end_token_state(image_entry[0])
            prompt = text_edited_prompt(text_entry[0], f_cnvrt, layout, alpha)
            pooled = text_edited_pooled(text_entry[1].get("pooled_output"), f_cnvrt, alpha)
            output.append([prompt, {**text_entry[1], "pooled_output": pooled}])
        return (output,)


class SDIPCEndTokenPrompt:
    DESCRIPTION = (
        "SD-IPC end-token constructions on a text prompt, chunk by chunk. "
        "end tokens only: [start, end, …, end], the start token followed by the prompt's first end-token state at "
        "every position. mask words: the word positions are set to zero (start and end tokens stay); a zero state "
        "adds no content in SD 1.x cross-attention. image at end tokens: the end-token positions become "
        "(1 - image_weight)·text + image_weight·image, words unchanged."
    )
    CATEGORY = CATEGORY
    FUNCTION = "construct"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The constructed prompt, [N, 77·chunks, 768].",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": _CLIP_INPUT,
                "text": _TEXT_INPUT,
                "mode": (
                    list(END_TOKEN_MODES),
                    {
                        "default": END_TOKEN_MODES[0],
                        "tooltip": "end tokens only: end-token state everywhere after the start token. mask words: word "
                        "positions zeroed. image at end tokens: the image_prompt mixed into the end-token positions.",
                    },
                ),
                "image_weight": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Mode image at end tokens only: 1 replaces the text's end tokens by the image, 0 keeps them.",
                    },
                ),
            },
            "optional": {
                "image_prompt": ("CONDITIONING", {"tooltip": "Needed by mode image at end tokens. " + _IMAGE_PROMPT_TOOLTIP}),
            },
        }

    def construct(self, clip, text, mode, image_weight, image_prompt=None):
        if mode not in END_TOKEN_MODES:
            raise SDIPCError(f"Unknown mode {mode!r}. Use one of: {', '.join(END_TOKEN_MODES)}.")
        if mode == "image at end tokens" and image_prompt is None:
            raise SDIPCError("Mode 'image at end tokens' needs an image: connect SD-IPC Image to Prompt to image_prompt.")
        text_conditioning, layout = encode_prompt_with_layout(clip, text)

        if mode != "image at end tokens":
            construction = end_tokens_only_prompt if mode == "end tokens only" else masked_words_prompt
            return ([[construction(cond, layout), dict(options)] for cond, options in text_conditioning],)

        output = []
        for text_entry, image_entry in pair_entries(text_conditioning, image_prompt, ("text", "image_prompt")):
            f_cnvrt = image_end_token_state(image_entry[0])
            prompt = image_at_end_tokens_prompt(text_entry[0], f_cnvrt, layout, image_weight)
            pooled = mix_pooled(text_entry[1].get("pooled_output"), f_cnvrt, image_weight)
            output.append([prompt, {**text_entry[1], "pooled_output": pooled}])
        return (output,)


class SDIPCImageAsNegativePrompt:
    DESCRIPTION = (
        "Uses an image as the negative prompt, to steer generation away from it. The result is the empty prompt's "
        "encoding (the usual negative) moved towards the image prompt by strength: "
        "empty + strength·(image - empty). Strength 1 gives the image prompt itself, 0 the empty prompt."
    )
    CATEGORY = CATEGORY
    FUNCTION = "construct"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("negative",)
    OUTPUT_TOOLTIPS = ("Negative conditioning, [N, 77, 768]; join it with a text negative through Conditioning Combine if needed.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The CLIP of a Stable Diffusion 1.x checkpoint, to encode the empty prompt."}),
                "image_prompt": ("CONDITIONING", {"tooltip": "The image to avoid. " + _IMAGE_PROMPT_TOOLTIP}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "How far the negative moves from the empty prompt towards the image prompt: 0 empty, 1 the image.",
                    },
                ),
            }
        }

    def construct(self, clip, image_prompt, strength):
        check_sd1_clip(clip)
        empty, empty_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)

        output = []
        for cond, options in image_prompt:
            negative = mix_prompts(empty, cond, strength)
            pooled = mix_pooled(empty_pooled, options.get("pooled_output"), strength)
            output.append([negative, {**options, "pooled_output": pooled} if pooled is not None else dict(options)])
        return (output,)
