"""Exceptions raised by sdipc_core, each with a message that names the input and the fix."""


class SDIPCError(ValueError):
    """Base class for every input error this package raises."""


class ModelFileError(SDIPCError):
    """A model file is missing, unreadable, not safetensors, or lacks the expected tensors."""


class ProjectionMismatchError(SDIPCError):
    """Tensors from different CLIP models, or of incompatible sizes, were combined."""
