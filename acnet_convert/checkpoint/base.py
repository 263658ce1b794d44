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
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from acnet_convert import dtypes

__all__ = [
    "CheckpointReader",
    "Container",
    "ProducedMismatchError",
    "RawBytes",
    "TensorInfo",
    "check_produced",
    "check_raw",
    "contiguous_strides",
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
    zip record that holds just this tensor), else None.
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
