"""The zip container of ``torch.save`` files: record spans on read, aligned records on write.

torch stores every record uncompressed, with its data aligned to 64 bytes so
it can be mapped straight into memory; :class:`ZipWriter` writes the same
(zip64 where sizes or offsets need it), and :func:`member_span` finds where a
stored record's bytes lie in a file being read.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from acnet_convert.errors import BadCheckpointError

from ..base import RawBytes
from ..rawio import copy_range, crc32_range, read_range

__all__ = ["ZipWriter", "member_span"]

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_END_RECORD = struct.Struct("<IHHHHIIH")
_END_RECORD64 = struct.Struct("<IQHHIIQQQQ")
_END_LOCATOR64 = struct.Struct("<IIQI")
_ALIGNMENT = 64  # torch aligns every record's data to 64 bytes
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, so output is reproducible


def member_span(path: Path, member: zipfile.ZipInfo, fd: int, size: int) -> tuple[int, int]:
    """Where a stored record's bytes start in the file (``fd``, ``size`` bytes), and how many."""
    where = f"{path}: record '{member.filename}'"
    if member.compress_type != zipfile.ZIP_STORED:
        raise BadCheckpointError(
            f"{where} is compressed (zip method {member.compress_type}); torch stores "
            "tensors uncompressed: unzip and re-zip it with 'zip -0', or save it again"
        )
    if member.flag_bits & 0x1:
        raise BadCheckpointError(f"{where} is encrypted")
    start = member.header_offset
    if start + _LOCAL_HEADER.size > size:
        raise BadCheckpointError(f"{where} starts past the end of the file; it is truncated")
    # pread, not the mmap: a touched page of a mapping counts towards our
    # resident size, and the kernel maps its neighbours along with it.
    header = _LOCAL_HEADER.unpack(read_range(RawBytes(fd, start, _LOCAL_HEADER.size)))
    if header[0] != 0x04034B50:
        raise BadCheckpointError(
            f"{where}: no zip header where the directory says; the file is corrupt"
        )
    data_offset = start + _LOCAL_HEADER.size + header[9] + header[10]
    if data_offset + member.file_size > size:
        raise BadCheckpointError(
            f"{where} runs past the end of the file ({size} bytes); the file is truncated"
        )
    return data_offset, member.file_size


@dataclass(frozen=True)
class _ZipEntry:
    name: bytes
    offset: int
    size: int
    crc: int


class ZipWriter:
    """Writes stored (uncompressed) zip records with 64-byte aligned data, zip64 when needed."""

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp
        self._pos = 0
        self._entries: list[_ZipEntry] = []

    def _write(self, data: bytes | memoryview) -> None:
        self._fp.write(data)
        self._pos += len(data)

    def record(self, name: str, data: bytes | memoryview | RawBytes) -> None:
        """One stored record; ``RawBytes`` are copied file to file, not read into memory."""
        raw = name.encode("ascii")
        if isinstance(data, RawBytes):
            size = data.length
            crc = data.crc32 if data.crc32 is not None else crc32_range(data)
        else:
            size = len(data)
            crc = zlib.crc32(data)
        offset = self._pos
        extra = b""
        size32 = size
        zip64 = size >= _ZIP64_LIMIT
        if zip64:
            extra = struct.pack("<HHQQ", 0x0001, 16, size, size)
            size32 = 0xFFFFFFFF
        # Pad with an extra field (id 'FB', as torch's writer does) so the data
        # starts on a 64-byte boundary and can be mapped straight into memory.
        unpadded = offset + _LOCAL_HEADER.size + len(raw) + len(extra) + 4
        pad = -unpadded % _ALIGNMENT
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        version = 45 if zip64 else 20
        self._write(
            _LOCAL_HEADER.pack(
                0x04034B50, version, 0, 0, 0, _DOS_DATE, crc, size32, size32, len(raw), len(extra)
            )
        )
        self._write(raw)
        self._write(extra)
        if isinstance(data, RawBytes):
            self._fp.flush()
            copy_range(data, self._fp.fileno(), self._pos)
            self._pos += size
            self._fp.seek(self._pos)
        else:
            self._write(data)
        self._entries.append(_ZipEntry(raw, offset, size, crc))

    def finish(self) -> None:
        """Write the central directory and the end records."""
        cd_offset = self._pos
        for entry in self._entries:
            self._write(_central_header(entry))
        cd_size = self._pos - cd_offset
        count = len(self._entries)
        if count >= 0xFFFF or cd_offset >= _ZIP64_LIMIT or cd_size >= _ZIP64_LIMIT:
            end64 = self._pos
            # signature, size of the rest, versions made by/needed, disk numbers,
            # entries on this disk and in all, directory size and offset
            record64 = _END_RECORD64.pack(
                0x06064B50, _END_RECORD64.size - 12, 45, 45, 0, 0,
                count, count, cd_size, cd_offset,
            )  # fmt: skip
            self._write(record64)
            self._write(_END_LOCATOR64.pack(0x07064B50, 0, end64, 1))
        # signature, disk numbers, entries on this disk and in all, directory
        # size and offset (saturated: the zip64 record holds the true ones), comment length
        record = _END_RECORD.pack(
            0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
            min(cd_size, 0xFFFFFFFF), min(cd_offset, 0xFFFFFFFF), 0,
        )  # fmt: skip
        self._write(record)


def _central_header(entry: _ZipEntry) -> bytes:
    """An entry's central-directory record: header, name, and zip64 extra field if needed."""
    fields: list[int] = []
    size32 = entry.size
    offset32 = entry.offset
    if entry.size >= _ZIP64_LIMIT:
        fields += [entry.size, entry.size]
        size32 = 0xFFFFFFFF
    if entry.offset >= _ZIP64_LIMIT:
        fields.append(entry.offset)
        offset32 = 0xFFFFFFFF
    extra = b""
    if fields:
        extra = struct.pack(f"<HH{len(fields)}Q", 0x0001, 8 * len(fields), *fields)
    version = 45 if fields else 20
    # signature, versions made by/needed, flags, method, time, date, CRC, sizes,
    # name and extra lengths, comment length, disk, attributes, local header offset
    header = _CENTRAL_HEADER.pack(
        0x02014B50, version, version, 0, 0, 0, _DOS_DATE, entry.crc, size32, size32,
        len(entry.name), len(extra), 0, 0, 0, 0, offset32,
    )  # fmt: skip
    return header + entry.name + extra
