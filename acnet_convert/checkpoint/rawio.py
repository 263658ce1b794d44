"""Copying, checksumming and comparing tensor bytes between open files.

A tensor that passes through a conversion unchanged is copied file to file
with ``os.copy_file_range`` where the kernel offers it (the bytes never enter
the process), else with ``pread``/``pwrite`` through a bounded buffer. Reads
for checksums and comparisons also go through one small reused buffer. So
none of this adds a tensor's size to the process's memory, and pages of an
``mmap`` are never touched (they would count towards its resident size).
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Iterator

import numpy as np

from acnet_convert.errors import BadCheckpointError

from .base import RawBytes

__all__ = [
    "CHUNK",
    "array_bytes",
    "copy_range",
    "crc32_range",
    "iter_chunks",
    "pread_into",
    "read_exactly",
    "read_range",
    "same_bytes",
    "write_range",
]

CHUNK = 1 << 20
# errnos after which copy_file_range cannot work for this pair of files (other
# filesystems, old kernels, special files): copy through a buffer instead.
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ETXTBSY}
_kernel_copy = hasattr(os, "copy_file_range")


def _short(raw: RawBytes, missing: int) -> BadCheckpointError:
    return BadCheckpointError(
        f"{missing} of {raw.length} bytes at offset {raw.offset} could not be read; "
        "the file was truncated while it was being read"
    )


def array_bytes(array: np.ndarray) -> memoryview:
    """An array's elements as bytes, in C order (copied only when not contiguous)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def copy_range(raw: RawBytes, out_fd: int, out_offset: int) -> None:
    """Copy ``raw``'s bytes into ``out_fd`` at ``out_offset`` (the file position is not used)."""
    global _kernel_copy
    done = 0
    while done < raw.length:
        count = raw.length - done
        if _kernel_copy:
            try:
                # copy_file_range accepts at most ssize_t bytes per call; 1 GiB keeps it portable.
                copied = os.copy_file_range(
                    raw.fd, out_fd, min(count, 1 << 30), raw.offset + done, out_offset + done
                )
            except OSError as err:
                if err.errno not in _NO_KERNEL_COPY:
                    raise
                if err.errno == errno.ENOSYS:
                    _kernel_copy = False
                _copy_through_buffer(raw, done, out_fd, out_offset)
                return
        else:
            _copy_through_buffer(raw, done, out_fd, out_offset)
            return
        if copied == 0:
            raise _short(raw, count)
        done += copied


def _copy_through_buffer(raw: RawBytes, start: int, out_fd: int, out_offset: int) -> None:
    position = start
    for chunk in iter_chunks(RawBytes(raw.fd, raw.offset + start, raw.length - start)):
        write_range(out_fd, chunk, out_offset + position)
        position += len(chunk)


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """One positioned read into ``view``: the number of bytes read (0 at the end of the file)."""
    if _HAVE_PREADV:
        return os.preadv(fd, [view], offset)
    data = _pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def _seek_read(fd: int, length: int, offset: int) -> bytes:
    # Where os.pread is missing (Windows); the descriptors here are not shared between threads.
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, length)


def _seek_write(fd: int, data: bytes | memoryview, offset: int) -> int:
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


_HAVE_PREADV = hasattr(os, "preadv")
_pread = getattr(os, "pread", _seek_read)
_pwrite = getattr(os, "pwrite", _seek_write)


def _fill(raw: RawBytes, view: memoryview, done: int) -> None:
    """Read exactly ``len(view)`` bytes of ``raw`` from ``done`` on into ``view``."""
    filled = 0
    while filled < len(view):
        got = pread_into(raw.fd, view[filled:], raw.offset + done + filled)
        if got == 0:
            raise _short(raw, raw.length - done - filled)
        filled += got


def read_exactly(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the bytes of ``fd`` from ``offset`` on; a short file is an error.

    Raises:
        BadCheckpointError: the file ends before ``view`` is full.
    """
    _fill(RawBytes(fd, offset, len(view)), view, 0)


def iter_chunks(raw: RawBytes, chunk: int = CHUNK) -> Iterator[memoryview]:
    """``raw``'s bytes in order, ``chunk`` at a time, as views of one reused buffer.

    Each view is valid until the next one is produced.
    """
    view = memoryview(bytearray(min(chunk, raw.length)))
    done = 0
    while done < raw.length:
        want = min(len(view), raw.length - done)
        _fill(raw, view[:want], done)
        yield view[:want]
        done += want


def read_range(raw: RawBytes) -> bytes:
    """``raw``'s bytes as one new bytes object (for slices that are meant to be held)."""
    parts = [b""]
    done = 0
    while done < raw.length:
        part = _pread(raw.fd, raw.length - done, raw.offset + done)
        if not part:
            raise _short(raw, raw.length - done)
        parts.append(part)
        done += len(part)
    return parts[-1] if len(parts) <= 2 else b"".join(parts)


def write_range(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset`` (the file position is not used)."""
    view = memoryview(data).cast("B")
    while view:
        written = _pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def crc32_range(raw: RawBytes) -> int:
    """The CRC-32 (as zip computes it) of ``raw``'s bytes."""
    crc = 0
    for chunk in iter_chunks(raw):
        crc = zlib.crc32(chunk, crc)
    return crc


def same_bytes(a: RawBytes, b: RawBytes, chunk: int = CHUNK) -> bool:
    """Whether two ranges hold the same bytes, compared a chunk at a time."""
    if a.length != b.length:
        return False
    mine, theirs = bytearray(min(chunk, a.length)), bytearray(min(chunk, a.length))
    done = 0
    while done < a.length:
        want = min(len(mine), a.length - done)
        if want < len(mine):
            del mine[want:], theirs[want:]
        _fill(a, memoryview(mine), done)
        _fill(b, memoryview(theirs), done)
        if mine != theirs:  # bytearray comparison is a memcmp; memoryview's is not
            return False
        done += want
    return True
