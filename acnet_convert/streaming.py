"""Moving tensors slab by slab: the source a block is read from, and the sinks fused tensors go to.

A conversion never holds the whole input or output (see DESIGN.md).
:class:`SlabSource` reads a planned block's tensors a slab of output
channels at a time; the fused tensors go to a :class:`FusedSink`: a
:class:`MemorySink` (a dict, for :func:`~acnet_convert.convert.fuse_state`)
or a :class:`ScratchSink` (an unnamed file beside the output, for
:func:`~acnet_convert.convert.fuse_checkpoint`); an :class:`OutputFeed`
then hands the writer each output tensor, as bytes to copy where it can.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from acnet_convert import dtypes
from acnet_convert.blocks import load_block
from acnet_convert.checkpoint import CheckpointReader, RawBytes, TensorInfo
from acnet_convert.checkpoint.rawio import array_bytes, read_range, write_range
from acnet_convert.fusion import BlockTensors
from acnet_convert.plan import PlannedBlock

__all__ = ["FusedSink", "MemorySink", "OutputFeed", "ScratchSink", "SlabSource"]

RowWriter = Callable[[slice, np.ndarray], None]

# Output channels are loaded, fused and checked in slabs of about this many
# float64 bytes of square kernel, so a block's working set stays a few MiB
# however wide the layer is. Smaller slabs cost more in per-call overhead;
# larger ones save little time and add to the peak resident size.
_SLAB_BYTES = 512 << 10
# A block with a sequential (DBB 1x1 -> kxk) branch composes each slab by a matrix product,
# whose per-call cost (BLAS threads waking) favours fewer, larger slabs: 1 MiB measured
# 0.62x the file in peak RSS on DBB ResNet-18 (0.5 MiB: 0.57x at about 1.8x the time).
_SEQ_SLAB_BYTES = 1 << 20


class SlabSource:
    """A checkpoint's blocks in float64 (checked by :func:`load_block`), a slab of channels at a time.

    Fusing and checking are separable per output channel (each BN scales one
    channel; the 1-D kernels add into that channel's square kernel), so fusing
    slab by slab gives bit for bit what fusing the whole block gives. Kernel
    rows are read straight from the file where the reader knows their bytes
    (OIHW: a slab of output channels is one run of bytes); per-channel vectors
    and kernels stored otherwise are read whole, once per block. Reads go by
    ``pread`` where they can, so no page of a reader's mmap becomes resident.
    """

    def __init__(
        self,
        reader: CheckpointReader,
        source: str,
        kernel_order: str,
        bn_eps: Mapping[str, float] | None = None,
    ) -> None:
        self._reader = reader
        self._source = source
        self._order = kernel_order
        self._bn_eps = bn_eps
        self._whole: dict[str, np.ndarray] = {}
        self._raws: dict[str, RawBytes | None] = {}

    def slabs(self, block: PlannedBlock, eps: float) -> Iterator[tuple[slice, BlockTensors]]:
        """``(rows, tensors)`` for each slab of ``block``'s output channels, in order."""
        g = block.geometry
        # a sequential branch composes by a matrix product per slab: fewer, larger ones
        slab_bytes = _SLAB_BYTES if g.streamable else _SEQ_SLAB_BYTES
        rows_per_slab = max(1, slab_bytes // (8 * g.in_per_group * g.kh * g.kw))
        try:
            yield from self._slabs(block, eps, rows_per_slab)
        finally:  # a block's whole tensors are read once per block, and kept no longer
            self._whole.clear()
            self._raws.clear()

    def _slabs(
        self, block: PlannedBlock, eps: float, rows_per_slab: int
    ) -> Iterator[tuple[slice, BlockTensors]]:
        out_channels = block.geometry.out_channels
        for start in range(0, out_channels, rows_per_slab):
            rows = slice(start, min(start + rows_per_slab, out_channels))

            def read(key: str, rows: slice = rows) -> np.ndarray:
                return self._rows_of(key, rows)

            tensors = load_block(
                block.spec,
                self._reader.tensors,
                read,
                eps,
                self._source,
                self._order,
                first_channel=start,
                read_whole=self._read_whole,
                bn_eps=self._bn_eps,
            )
            yield rows, tensors

    def _rows_of(self, key: str, rows: slice) -> np.ndarray:
        info = self._reader.tensors[key]
        kernel = len(info.shape) == 4
        if key not in self._raws:
            self._raws[key] = self._reader.raw(key)
        raw = self._raws[key]
        if raw is not None and kernel and self._order == "OIHW":
            row = info.nbytes // info.shape[0]
            count = rows.stop - rows.start
            part = RawBytes(raw.fd, raw.offset + rows.start * row, count * row)
            stored = np.frombuffer(read_range(part), dtype=dtypes.numpy_dtype(info.dtype))
            return stored.reshape((count, *info.shape[1:]))
        values = self._read_whole(key)
        return values[..., rows] if kernel and self._order == "HWIO" else values[rows]

    def _read_whole(self, key: str) -> np.ndarray:
        """The whole tensor, read once per block (a sequential branch's 1x1 conv serves
        every slab)."""
        if key not in self._whole:
            info = self._reader.tensors[key]
            if key not in self._raws:
                self._raws[key] = self._reader.raw(key)
            raw = self._raws[key]
            if raw is not None:
                stored = np.frombuffer(read_range(raw), dtype=dtypes.numpy_dtype(info.dtype))
                self._whole[key] = stored.reshape(info.shape)
            else:
                self._whole[key] = self._reader.read(key)
        return self._whole[key]


class FusedSink(Protocol):
    """Where fused tensors go as they are made."""

    def rows(self, key: str, info: TensorInfo) -> RowWriter | None:
        """A writer of the kernel ``key`` slab by slab (OIHW), or None to be handed it whole."""

    def put(self, key: str, value: np.ndarray) -> None:
        """Store a whole tensor."""

    def same_as(self, key: str, primary: str) -> None:
        """``key`` holds what ``primary`` holds (an alias block's output)."""


class MemorySink:
    """Fused tensors in a dict in memory (``values``)."""

    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}

    def rows(self, key: str, info: TensorInfo) -> RowWriter | None:
        return None

    def put(self, key: str, value: np.ndarray) -> None:
        self.values[key] = value

    def same_as(self, key: str, primary: str) -> None:
        self.values[key] = self.values[primary]


class ScratchSink:
    """Fused tensors in an unnamed temporary file beside the output, as :class:`RawBytes` (``raw``).

    The writer copies them from there in the kernel, the read-back check
    compares the output with them byte for byte, and at no point is more of
    them in memory than a slab of one block.
    """

    def __init__(self, folder: Path) -> None:
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed in close()
        self._fd = self._file.fileno()
        self._end = 0
        self.raw: dict[str, RawBytes] = {}

    def _reserve(self, key: str, length: int) -> int:
        start = self._end
        self.raw[key] = RawBytes(self._fd, start, length)
        self._end += length
        return start

    def rows(self, key: str, info: TensorInfo) -> RowWriter | None:
        start = self._reserve(key, info.nbytes)
        row = info.nbytes // info.shape[0]

        def put_rows(rows: slice, slab: np.ndarray) -> None:
            write_range(self._fd, array_bytes(slab), start + rows.start * row)

        return put_rows

    def put(self, key: str, value: np.ndarray) -> None:
        data = array_bytes(value)
        write_range(self._fd, data, self._reserve(key, len(data)))

    def same_as(self, key: str, primary: str) -> None:
        self.raw[key] = self.raw[primary]

    def close(self) -> None:
        """Delete the file (use the sink in ``contextlib.closing``)."""
        self._file.close()


class OutputFeed:
    """Hands a writer each output tensor, in order, and remembers what it should find in the file.

    Fused tensors and pass-through tensors go as :class:`RawBytes` (from the
    scratch file, or from the source where its reader knows them) to be
    copied file to file; other pass-through tensors go as the arrays the
    reader returns. ``origins`` maps each pass-through output key to its input key.
    """

    def __init__(
        self,
        reader: CheckpointReader,
        origins: Mapping[str, str],
        fused: Mapping[str, RawBytes],
    ) -> None:
        self._reader = reader
        self._origins = origins
        self._fused = fused
        # output key -> the bytes it copies, or (crc32, length) of the array handed over
        self.expected: dict[str, RawBytes | tuple[int, int]] = {}

    def __call__(self, name: str) -> np.ndarray | RawBytes:
        raw = self._fused.get(name)
        if raw is None:
            raw = self._reader.raw(self._origins[name])
        if raw is not None:
            self.expected[name] = raw
            return raw
        value = self._reader.read(self._origins[name])
        data = array_bytes(value)
        self.expected[name] = (zlib.crc32(data), len(data))
        return value
