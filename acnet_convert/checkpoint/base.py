"""What every checkpoint reader offers, whatever the file format.

A reader indexes the file on open (names, dtypes, shapes, where the bytes are)
and reads one tensor at a time on request, so a conversion never has to hold a
whole checkpoint in memory. Names are the state-dict keys after the container
has been unwrapped (``{'model': sd}``, ``module.`` prefixes, ...).

Where a tensor's stored bytes are exactly its little-endian, C-order elements,
a reader can also say where they lie (:meth:`CheckpointReader.raw`), so that a
writer copies them file to file in the kernel instead of pulling them through
memory.
"""

from __future__ import annotations

import math
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import BadCheckpointError

__all__ = [
    "CheckpointReader",
    "Container",
    "ProducedMismatchError",
    "RawBytes",
    "TensorInfo",
    "check_produced",
    "check_raw",
    "check_shape",
    "contiguous_strides",
    "open_regular",
    "require_regular_file",
]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, canonical dtype name (see :mod:`acnet_convert.dtypes`) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class Container:
    """How the state dict sat in the file, so a writer can put it back the same way.

    ``wrapper_key`` is ``'model'`` or ``'state_dict'`` (None for a raw state
    dict); ``prefix`` is what was stripped from every key (``'module.'``,
    ``'_orig_mod.'``, or both); ``extras`` holds the other top-level entries
    of plain data (``iteration``, ``epoch``, ...) in file order, and
    ``dropped`` the names of the entries that hold more than plain data
    (optimizer and scheduler state), which no writer puts back. ``wrapper_first``
    records whether the state dict came before the extras.
    """

    wrapper_key: str | None = None
    prefix: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()
    keys_order: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return (
            "raw state dict"
            if self.wrapper_key is None
            else f"{{'{self.wrapper_key}': state dict}}"
        )


@dataclass(frozen=True)
class RawBytes:
    """``length`` bytes at ``offset`` of the open file ``fd``: a tensor's elements as stored.

    Only valid while the reader that handed it out is open. ``crc32`` is the
    CRC-32 of exactly these bytes where the file already records it (a .pth
    zip record that holds just this tensor), else None; a reader hands it out
    only after checking the bytes against it.
    """

    fd: int
    offset: int
    length: int
    crc32: int | None = None


class CheckpointReader(ABC):
    """An open checkpoint: an ordered index of tensors plus one-at-a-time reads.

    Subclasses fill ``tensors`` (ordered as in the file), ``container`` and
    ``metadata`` on open, and raise :class:`~acnet_convert.errors.BadCheckpointError`
    for anything unreadable, naming the file.
    """

    format: str = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.container = Container()
        self.metadata: dict[str, str] = {}

    @abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The tensor's elements as a C-contiguous array of its storage dtype.

        bfloat16 comes back as uint16 bit patterns. The array may be a
        read-only view into the file; copy it before changing it.
        """

    def raw(self, name: str) -> RawBytes | None:
        """Where the tensor's bytes lie, if they are exactly its little-endian C-order elements.

        None when they are not (strided, big-endian, compressed, not in the
        file at all) or the tensor is empty; callers then use :meth:`read`.
        """
        return None

    def writer_state(self, replaced: Mapping[str, str]) -> object | None:
        """State private to this reader's format that its writer needs to keep the
        source's own bookkeeping (Keras' layer list), once each input key of
        ``replaced`` is replaced by the output key it maps to; None where there
        is none. Callers hand it to :func:`~acnet_convert.checkpoint.write_checkpoint`
        unopened.
        """
        return None

    def close(self) -> None:  # noqa: B027 - readers without resources need nothing here
        """Release the file."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Sizes stay far below what numpy's and int64 index arithmetic can hold.
MAX_TENSOR_BYTES = 2**62


def check_shape(where: str, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse a shape numpy could not even describe, zero-size ones included.

    ``(0, 2**62)`` holds no element, but numpy refuses to create it, so every
    dimension, and the product of the non-zero ones, must stay below 2**62 bytes.

    Raises:
        BadCheckpointError: the shape is impossibly large.
    """
    nonzero = math.prod(n for n in shape if n)
    if any(n >= MAX_TENSOR_BYTES for n in shape) or nonzero * itemsize >= MAX_TENSOR_BYTES:
        raise BadCheckpointError(
            f"{where}: shape {tuple(shape)} is impossibly large; the file is corrupt"
        )


def require_regular_file(path: Path) -> int:
    """The size of ``path``, refusing anything but an existing regular file (or a link to one).

    A FIFO would block every open or read forever, a device (``/dev/zero``)
    never ends, and a directory is not a checkpoint: all are refused before
    anything opens them.

    Raises:
        BadCheckpointError: missing, unreadable, or not a regular file.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        raise BadCheckpointError(f"{path}: cannot open: it does not exist") from err
    except OSError as err:
        raise BadCheckpointError(f"{path}: cannot open: {err.strerror or err}") from err
    if stat.S_ISDIR(info.st_mode):
        raise BadCheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(info.st_mode)
            else "a device"
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "a socket"
            if stat.S_ISSOCK(info.st_mode)
            else "not a regular file"
        )
        raise BadCheckpointError(
            f"{path}: is {kind}, not a regular file; save the checkpoint to a file first"
        )
    return info.st_size


def open_regular(path: Path) -> IO[bytes]:
    """``open(path, "rb")``, refusing a non-regular file even if it was swapped in after a check.

    The open itself does not block on a FIFO (``O_NONBLOCK``); the type is then
    checked on the open descriptor.

    Raises:
        BadCheckpointError: not a regular file.
        OSError: the file cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadCheckpointError(f"{path}: is not a regular file; save it to a file first")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --- checks every writer makes on what it is handed ---------------------------


class ProducedMismatchError(TypeError, ValueError):
    """What a writer was handed does not match its TensorInfo (a bug in the producer)."""


def check_raw(info: TensorInfo, raw: RawBytes) -> None:
    """Raise :class:`ProducedMismatchError` unless ``raw`` holds exactly as many bytes as ``info`` needs."""
    if raw.length != info.nbytes:
        raise ProducedMismatchError(
            f"tensor '{info.name}': produced {raw.length} raw bytes, expected {info.nbytes}"
        )


def check_produced(info: TensorInfo, array: np.ndarray) -> np.ndarray:
    """``array`` as C-contiguous and little-endian, after checking it matches ``info`` exactly.

    Raises:
        ProducedMismatchError: type, dtype, shape or byte count differ (a bug in the
            producer); it is both a TypeError and a ValueError.
    """
    expected = dtypes.numpy_dtype(info.dtype)
    if not isinstance(array, np.ndarray) or array.dtype.newbyteorder("=") != expected.newbyteorder(
        "="
    ):
        got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ProducedMismatchError(
            f"tensor '{info.name}': produced {got}, expected {expected} ({info.dtype})"
        )
    if array.shape != info.shape:
        raise ProducedMismatchError(
            f"tensor '{info.name}': produced shape {array.shape}, expected {info.shape}"
        )
    if array.dtype != expected:
        array = array.astype(expected)
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    if array.nbytes != info.nbytes:
        raise ProducedMismatchError(
            f"tensor '{info.name}': produced {array.nbytes} bytes, expected {info.nbytes}"
        )
    return array


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides in elements, as torch computes them (zero-size dimensions count as 1)."""
    strides: list[int] = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
