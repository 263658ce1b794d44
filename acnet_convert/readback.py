"""Reading a written checkpoint back before it is renamed into place.

:func:`confirm_written` opens the temporary output and compares its index
and every tensor with what the conversion meant to write, so a writer bug
or an I/O fault never becomes a deployed file.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from acnet_convert.checkpoint import CheckpointReader, RawBytes, TensorInfo, open_checkpoint
from acnet_convert.checkpoint.rawio import array_bytes, crc32_range, read_range, same_bytes
from acnet_convert.errors import BadCheckpointError

__all__ = ["confirm_written"]


def confirm_written(
    tmp: Path,
    output: Path,
    expected: Sequence[TensorInfo],
    landed: Mapping[str, RawBytes | tuple[int, int]],
) -> None:
    """Read the written file back: every tensor listed as meant, and every byte as meant.

    The index (names, dtypes, shapes) is compared in full, and so is every
    tensor that was handed over as bytes (fused tensors from the scratch
    file, pass-through tensors from the source), byte for byte through two
    small buffers: one read of the output and of what it copied, mostly from
    the page cache, without holding a tensor. Where both sides are zip
    records whose CRC-32 the readers have just checked (a .pth copied into a
    .pth), equal CRCs stand for the byte comparison. A tensor handed over as an
    array (a pass-through tensor whose bytes the reader could not point to:
    strided, big-endian, chunked) is compared by the CRC-32 taken as it went
    to the writer, instead of keeping it: that catches a writer bug or an
    I/O fault (odds of missing a random corruption: 1 in 2**32), which is
    what this check is for.
    """
    try:
        with open_checkpoint(tmp) as written:
            # HDF5 lists datasets by name, not in writing order: compare as mappings.
            got = {t.name: (t.dtype, t.shape) for t in written.tensors.values()}
            want = {t.name: (t.dtype, t.shape) for t in expected}
            if got != want:
                differ = sorted(set(got.items()) ^ set(want.items()))
                raise BadCheckpointError(
                    f"{output}: the written file does not list the expected tensors (first difference: {differ[0][0]})"
                )
            for info in expected:
                if not _landed_intact(written, info.name, landed.get(info.name)):
                    raise BadCheckpointError(f"{output}: tensor '{info.name}' did not land intact")
    except BadCheckpointError as err:
        raise BadCheckpointError(f"{output}: reading the output back failed: {err}") from err


def _landed_intact(
    written: CheckpointReader, name: str, meant: RawBytes | tuple[int, int] | None
) -> bool:
    if meant is None:
        return False
    stored = written.raw(name)
    if isinstance(meant, RawBytes):
        if stored is not None and stored.crc32 is not None and meant.crc32 is not None:
            # Both records were checked against their CRC-32 as the readers handed them
            # out, so equal CRCs and lengths say what a byte comparison would, without
            # reading the source a second time.
            return stored.length == meant.length and stored.crc32 == meant.crc32
        if stored is not None:
            return same_bytes(meant, stored)
        return bytes(array_bytes(written.read(name))) == read_range(meant)
    crc, length = meant
    if stored is not None:
        return stored.length == length and crc32_range(stored) == crc
    data = array_bytes(written.read(name))
    return len(data) == length and zlib.crc32(data) == crc
