"""SD-IPC for ComfyUI: CLIP image embeddings turned into Stable Diffusion 1.x prompts, with no training."""

import importlib.util

# The nodes need ComfyUI's modules. Outside ComfyUI (pytest collecting this folder, or a script that
# only wants sdipc_core) the package still imports, with no nodes registered.
if importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

# ComfyUI serves this folder at /extensions/<pack folder>/. Its editor (frontend 1.27) reads a node's
# help page from docs/<NodeClassName>/<locale>.md there, falling back to docs/<NodeClassName>.md.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
