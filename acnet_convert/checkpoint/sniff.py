"""Telling checkpoint formats apart by their first bytes, not their extension.

Files get renamed, and ``.pth``/``.bin``/``.h5`` are used loosely, so the
extension only feeds the messages.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import BinaryIO

from acnet_convert.errors import BadCheckpointError

__all__ = ["FORMAT_NAMES", "MAX_HEADER_BYTES", "ZIP_MAGIC", "extension_note", "sniff_format"]

logger = logging.getLogger(__name__)

# What sniff_format returns, and how messages describe it.
FORMAT_NAMES = {
    "pth-zip": "a PyTorch zip checkpoint",
    "pth-legacy": "a legacy PyTorch (pickle) checkpoint",
    "hdf5": "HDF5 data",
    "safetensors": "safetensors data",
    "pdparams": "a pickle (Paddle .pdparams)",
    "keras": "a Keras 3 .keras archive",
}

# A zip archive starts with a local file header, or (empty) with the end record.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# The safetensors reference implementation refuses headers above this size too.
MAX_HEADER_BYTES = 100_000_000
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_PICKLE_PROTO = 0x80
# torch's legacy MAGIC_NUMBER 0x1950a86a20f9469cfc6c, pickled as LONG1 (10 bytes, little-endian).
_TORCH_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LFS_POINTER = b"version https://git-lfs"

# Extension -> the formats it usually holds (for notes only).
_EXPECTED = {
    ".pth": ("pth-zip", "pth-legacy"),
    ".pt": ("pth-zip", "pth-legacy"),
    ".ckpt": ("pth-zip", "pth-legacy"),
    ".tar": ("pth-zip", "pth-legacy"),
    ".h5": ("hdf5",),
    ".hdf5": ("hdf5",),
    ".safetensors": ("safetensors",),
    ".pdparams": ("pdparams",),
    ".keras": ("keras",),
}
_SUPPORTED = (
    "PyTorch .pth (zip or legacy pickle), HDF5 (upstream ACNet, Keras 2 or Keras 3), "
    "Keras 3 .keras, safetensors or Paddle .pdparams"
)


def sniff_format(path: Path) -> str:
    """Which format ``path`` holds, judged from its content.

    Returns:
        ``"pth-zip"``, ``"pth-legacy"``, ``"hdf5"``, ``"safetensors"``, ``"pdparams"`` or ``"keras"``.

    Raises:
        BadCheckpointError: the path is missing, a directory, unreadable or
            empty, or its content is none of the supported formats.

    Example:
        >>> sniff_format(Path("resnet56_acnet.pth"))  # doctest: +SKIP
        'pth-zip'
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(32)
            kind = _sniff(head, size)
            if kind is None:
                kind = _hdf5_after_userblock(handle, size)
    except IsADirectoryError as err:
        raise BadCheckpointError(f"{path}: is a directory, not a checkpoint file") from err
    except FileNotFoundError as err:
        raise BadCheckpointError(f"{path}: does not exist") from err
    except PermissionError as err:
        raise BadCheckpointError(f"{path}: cannot be read (permission denied)") from err
    except OSError as err:
        if err.errno == errno.EISDIR:
            raise BadCheckpointError(f"{path}: is a directory, not a checkpoint file") from err
        raise BadCheckpointError(f"{path}: cannot be read ({err.strerror or err})") from err
    if size == 0:
        raise BadCheckpointError(f"{path}: is empty (0 bytes); was the download or save cut short?")
    if kind is None:
        raise BadCheckpointError(_unknown_message(path, head))
    if kind == "pth-zip" and _is_keras_archive(path):
        kind = "keras"
    note = extension_note(path, kind)
    if note:
        logger.info("%s", note)
    return kind


def extension_note(path: Path, kind: str) -> str | None:
    """A note when the extension suggests another format than the content, else None.

    >>> extension_note(Path("model.pth"), "hdf5")
    'model.pth: has extension .pth but holds HDF5 data'
    """
    expected = _EXPECTED.get(path.suffix.lower())
    if expected is None or kind in expected:
        return None
    return f"{path}: has extension {path.suffix} but holds {FORMAT_NAMES[kind]}"


def _sniff(head: bytes, size: int) -> str | None:
    if head.startswith(ZIP_MAGIC):
        return "pth-zip"
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES) and head[8:9] == b"{":
            return "safetensors"
    # torch.save's legacy format is a pickle (PROTO opcode) whose first object is its magic
    # number; any other pickle is read as Paddle's .pdparams (a dict of numpy arrays).
    if len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5:
        return "pth-legacy" if _TORCH_LEGACY_MAGIC in head[:32] else "pdparams"
    return None


def _is_keras_archive(path: Path) -> bool:
    """A zip with Keras 3's config.json and model.weights.h5 (a torch archive has neither)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, NotImplementedError, OSError, ValueError):  # damaged: not Keras
        return False
    return {"config.json", "model.weights.h5"} <= names


def _hdf5_after_userblock(handle: BinaryIO, size: int) -> str | None:
    """HDF5 also puts its signature at 512, 1024, 2048, ... after a user block."""
    offset = 512
    while offset + len(_HDF5_MAGIC) <= size:
        handle.seek(offset)
        if handle.read(len(_HDF5_MAGIC)) == _HDF5_MAGIC:
            return "hdf5"
        offset *= 2
    return None


def _unknown_message(path: Path, head: bytes) -> str:
    if head.startswith(_LFS_POINTER):
        return (
            f"{path}: is a Git LFS pointer, not the checkpoint itself; "
            "run 'git lfs pull' to fetch the real file"
        )
    expected = _EXPECTED.get(path.suffix.lower())
    hint = ""
    if expected:
        wanted = " or ".join(sorted({FORMAT_NAMES[k] for k in expected}))
        hint = f"; it has extension {path.suffix} but does not start like {wanted}"
    return (
        f"{path}: content not recognised (first bytes {head[:8].hex(' ')}){hint}. "
        f"Supported formats: {_SUPPORTED}; the file may be truncated or corrupt"
    )
