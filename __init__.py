"""SD-IPC for ComfyUI: CLIP image embeddings turned into Stable Diffusion 1.x prompts, with no training."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
