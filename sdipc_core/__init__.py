"""SD-IPC in plain torch: CLIP image embeddings turned into Stable Diffusion 1.x prompts.

Nothing in this package imports ComfyUI; the pack's nodes adapt ComfyUI types to these functions.
"""

from .conversion import (
    DEFAULT_END_TOKEN_NORM,
    DEFAULT_SINGULAR_VALUE_TOLERANCE,
    PROMPT_LENGTH,
    cached_pseudo_inverse,
    convert_image_embeds,
    end_token_norm,
    truncated_pseudo_inverse,
    variation_prompt,
)
from .errors import ModelFileError, ProjectionMismatchError, SDIPCError
from .projection import (
    CLIPProjections,
    check_image_embeds,
    check_same_vision_tower,
    load_projections,
    projections_from_clip_model,
    projections_from_state_dict,
)
