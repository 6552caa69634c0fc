"""Reading and writing safetensors files, with errors that name the file and the fix.

Only safetensors is supported: pickle-based formats (.ckpt, .pt, .bin) can run code when loaded,
so they are rejected with a message instead of being opened.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ModelFileError

_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> dict:
    """Return the JSON header of a safetensors file, raising ModelFileError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Model file not found: {path}")

    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(path, "it is shorter than a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > _MAX_HEADER_BYTES:
            # Pickles and zipped PyTorch checkpoints land here: their first bytes read as a huge length.
            if prefix.startswith((b"\x80", b"PK")):
                raise _not_safetensors(path, "it starts like a pickle or a zipped PyTorch checkpoint")
            raise _not_safetensors(path, "its first bytes are not a safetensors header length")
        header_bytes = file.read(header_size)
    if not header_bytes.startswith(b"{"):
        raise _not_safetensors(path, "its header is not a JSON object")
    if len(header_bytes) < header_size:
        raise _truncated(path)

    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_safetensors(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")

    data_size = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if path.stat().st_size < 8 + header_size + data_size:
        raise _truncated(path)
    return header


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Return every tensor name in a safetensors file with its shape, without reading the data."""
    header = read_header(path)
    return {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}


def load_tensors(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Load the named tensors from a safetensors file onto the CPU."""
    read_header(path)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as file:
            return {key: file.get_tensor(key) for key in keys}
    except SafetensorError as error:
        raise ModelFileError(f"Could not read {path}: {error}. Download the file again.") from error


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU."""
    return load_tensors(path, tensor_shapes(path).keys())


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the string metadata stored in a safetensors header."""
    return dict(read_header(path).get("__metadata__", {}))


def save_atomic(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    before_replace: Callable[[], None] | None = None,
) -> Path:
    """Write tensors to a safetensors file so that readers see either the old file or the whole new one.

    The data goes to a temporary file in the target folder first and is renamed into place, so an
    interrupted save leaves no partial file. `before_replace` runs just before the rename; raising in
    it (for example on an interrupt request) abandons the save.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists. Choose another file name, or enable overwrite to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)

    contiguous = {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        save_file(contiguous, temporary_name, metadata=metadata)
        with open(temporary_name, "rb") as file:
            os.fsync(file.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temporary_name, path)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return path


def _not_safetensors(path: Path, reason: str) -> ModelFileError:
    hint = (
        " It looks like a pickle checkpoint, which this package never opens because loading one can run code."
        if path.suffix.lower() in _PICKLE_SUFFIXES
        else ""
    )
    return ModelFileError(
        f"{path} is not a safetensors file: {reason}.{hint} Use the .safetensors release of the model "
        "(for CLIP ViT-L/14: model.safetensors from openai/clip-vit-large-patch14)."
    )


def _truncated(path: Path) -> ModelFileError:
    return ModelFileError(
        f"{path} is truncated: the file is shorter than its safetensors header declares. "
        "The download was probably interrupted; download the file again."
    )
