"""ComfyUI nodes of the SD-IPC pack: thin adapters from ComfyUI types to sdipc_core."""

from .adapters import SDIPCApplyAdapter, SDIPCApplyVisionPrompts, SDIPCSaveAdapter
from .blending import SDIPCBlendImages, SDIPCInterpolateImages, SDIPCMixImageAndText
from .image_to_prompt import SDIPCImageToPrompt
from .projection_loader import SDIPCProjectionLoader
from .prompt_construction import SDIPCEndTokenPrompt, SDIPCImageAsNegativePrompt, SDIPCTextEditedVariation
from .training import SDIPCCustomizeSubject, SDIPCTrainAdapter

NODE_CLASS_MAPPINGS = {
    "SDIPCProjectionLoader": SDIPCProjectionLoader,
    "SDIPCImageToPrompt": SDIPCImageToPrompt,
    "SDIPCTextEditedVariation": SDIPCTextEditedVariation,
    "SDIPCEndTokenPrompt": SDIPCEndTokenPrompt,
    "SDIPCImageAsNegativePrompt": SDIPCImageAsNegativePrompt,
    "SDIPCBlendImages": SDIPCBlendImages,
    "SDIPCInterpolateImages": SDIPCInterpolateImages,
    "SDIPCMixImageAndText": SDIPCMixImageAndText,
    "SDIPCTrainAdapter": SDIPCTrainAdapter,
    "SDIPCCustomizeSubject": SDIPCCustomizeSubject,
    "SDIPCSaveAdapter": SDIPCSaveAdapter,
    "SDIPCApplyAdapter": SDIPCApplyAdapter,
    "SDIPCApplyVisionPrompts": SDIPCApplyVisionPrompts,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SDIPCProjectionLoader": "Load SD-IPC Projection",
    "SDIPCImageToPrompt": "SD-IPC Image to Prompt (Variation)",
    "SDIPCTextEditedVariation": "SD-IPC Text-Edited Variation",
    "SDIPCEndTokenPrompt": "SD-IPC End-Token Prompt",
    "SDIPCImageAsNegativePrompt": "SD-IPC Image as Negative Prompt",
    "SDIPCBlendImages": "SD-IPC Blend Images to Prompt",
    "SDIPCInterpolateImages": "SD-IPC Interpolate Images to Prompt",
    "SDIPCMixImageAndText": "SD-IPC Mix Image and Text Prompts",
    "SDIPCTrainAdapter": "Train SD-IPC Adapter (SD-IPC-FT)",
    "SDIPCCustomizeSubject": "Customize Subject (SD-IPC-CT)",
    "SDIPCSaveAdapter": "Save SD-IPC Adapter",
    "SDIPCApplyAdapter": "Apply SD-IPC Adapter",
    "SDIPCApplyVisionPrompts": "Apply SD-IPC Vision Prompts",
}
