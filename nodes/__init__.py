"""ComfyUI nodes of the SD-IPC pack: thin adapters from ComfyUI types to sdipc_core."""

from .image_to_prompt import SDIPCImageToPrompt
from .projection_loader import SDIPCProjectionLoader

NODE_CLASS_MAPPINGS = {
    "SDIPCProjectionLoader": SDIPCProjectionLoader,
    "SDIPCImageToPrompt": SDIPCImageToPrompt,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SDIPCProjectionLoader": "Load SD-IPC Projection",
    "SDIPCImageToPrompt": "SD-IPC Image to Prompt (Variation)",
}
