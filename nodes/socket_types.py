"""Names shared by the pack's nodes."""

CATEGORY = "conditioning/SD-IPC"

SDIPC_PROJECTION = "SDIPC_PROJECTION"
"""Socket type carrying `sdipc_core.CLIPProjections`."""
