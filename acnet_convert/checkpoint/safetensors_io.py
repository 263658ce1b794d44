"""Reading and writing ``.safetensors`` files without the safetensors package.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header length ``N``, ``N`` bytes of a UTF-8 JSON object mapping each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data buffer that follows) plus an optional ``"__metadata__"`` of str -> str,
then the data buffer.

We parse it ourselves because the package's numpy API has no bfloat16 and
because a file from the internet must be checked before anything large is
allocated: every size and offset in the header is validated against the file's
real size first, and tensor bytes are then read with ``pread`` into new arrays.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import reprlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import BadCheckpointError

from .base import (
    CheckpointReader,
    Container,
    RawBytes,
    TensorInfo,
    check_produced,
    check_raw,
    check_shape,
    open_regular,
    require_regular_file,
)
from .containers import strip_prefix
from .rawio import copy_range, read_exactly
from .sniff import MAX_HEADER_BYTES

__all__ = [
    "MAX_HEADER_BYTES",
    "SafetensorsReader",
    "check_produced",
    "check_raw",
    "write_safetensors",
]

# safetensors dtype code <-> canonical name (acnet_convert.dtypes).
_CODE_TO_DTYPE = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_DTYPE_TO_CODE = {name: code for code, name in _CODE_TO_DTYPE.items()}
_METADATA_KEY = "__metadata__"


class SafetensorsReader(CheckpointReader):
    """An open ``.safetensors`` file: the header is validated on open, tensors are read by pread.

    Reads go through ``pread`` rather than a memory map, so a file that is
    truncated while it is open is a clear error, not a SIGBUS.

    Example:
        >>> with SafetensorsReader(Path("model.safetensors")) as reader:  # doctest: +SKIP
        ...     weight = reader.read("conv1.square_conv.weight")

    Raises:
        BadCheckpointError: the file is missing, truncated, or its header is
            malformed or inconsistent with its size (names the file and key).
    """

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._fd: int | None = None  # reads, copies and checksums by pread
        # Stripped name -> (absolute byte offset in the file, numpy storage dtype).
        self._where: dict[str, tuple[int, np.dtype[Any]]] = {}
        try:
            require_regular_file(path)
            with open_regular(path) as handle:
                file_size = os.fstat(handle.fileno()).st_size
                header_len, header = _read_header(handle, file_size, path)
                entries = _parse_header(header, file_size - 8 - header_len, path)
                self._index(entries, 8 + header_len)
                self._fd = os.dup(handle.fileno())
        except OSError as err:
            raise BadCheckpointError(
                f"{path}: cannot be read as safetensors: {err.strerror or err}"
            ) from err

    def _index(self, entries: dict[str, Any], data_start: int) -> None:
        raw_meta = entries.pop(_METADATA_KEY, None)
        self.metadata = dict(raw_meta) if raw_meta else {}
        if not entries:
            raise BadCheckpointError(f"{self.path}: the safetensors file holds no tensors")
        # File order is data-offset order; an empty tensor sorts before the
        # tensor that starts where it sits, and ties keep the header's order.
        ordered = sorted(entries.items(), key=lambda item: (item[1][2], item[1][3]))
        prefix, names = strip_prefix([name for name, _ in ordered], self.path)
        self.container = Container(prefix=prefix)
        for name, (_, (dtype, shape, begin, _end)) in zip(names, ordered, strict=True):
            self.tensors[name] = TensorInfo(name=name, dtype=dtype, shape=shape)
            self._where[name] = (data_start + begin, dtypes.numpy_dtype(dtype))

    def __enter__(self) -> SafetensorsReader:
        return self

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new read-only, C-contiguous array of its storage dtype.

        bfloat16 comes back as uint16 bit patterns.

        Raises:
            BadCheckpointError: the file is now shorter than its header says
                (truncated while open).
            KeyError: no tensor of that name (a caller bug: names come from ``tensors``).
        """
        info = self.tensors[name]
        offset, np_dtype = self._where[name]
        array = np.empty(info.shape, dtype=np_dtype)
        if info.numel:
            if self._fd is None:
                raise ValueError(f"{self.path}: the reader is closed")
            try:
                read_exactly(self._fd, array.reshape(-1).view(np.uint8).data, offset)
            except BadCheckpointError as err:
                raise BadCheckpointError(f"{self.path}: tensor '{name}': {err}") from err
        array.flags.writeable = False
        return array

    def raw(self, name: str) -> RawBytes | None:
        """Where the tensor's bytes lie: safetensors stores every tensor little-endian, C order."""
        info = self.tensors[name]
        if info.numel == 0 or self._fd is None:
            return None
        return RawBytes(self._fd, self._where[name][0], info.nbytes)

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_header(handle: Any, file_size: int, path: Path) -> tuple[int, bytes]:
    """The header length and bytes, checked against the file size before reading."""
    if file_size < 8:
        raise BadCheckpointError(
            f"{path}: only {file_size} bytes, too short for a safetensors header "
            "(the file is truncated or not safetensors)"
        )
    header_len = int.from_bytes(handle.read(8), "little")
    if header_len > file_size - 8:
        raise BadCheckpointError(
            f"{path}: the safetensors header claims {header_len} bytes but only "
            f"{file_size - 8} follow; the file is truncated or not safetensors"
        )
    if header_len > MAX_HEADER_BYTES:
        raise BadCheckpointError(
            f"{path}: the safetensors header claims {header_len} bytes, more than the "
            f"{MAX_HEADER_BYTES} the format allows; the file is corrupt"
        )
    header = handle.read(header_len)
    if len(header) != header_len:
        raise BadCheckpointError(f"{path}: the file ended inside the safetensors header")
    return header_len, header


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated name could hide one tensor behind another."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _parse_header(header: bytes, buffer_size: int, path: Path) -> dict[str, Any]:
    """Validate the header against the data buffer's size.

    Returns name -> (canonical dtype, shape, begin, end) for each tensor, plus the
    metadata dict under ``__metadata__`` when present. Nothing here allocates
    more than the header itself.
    """
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadCheckpointError(
            f"{path}: the safetensors header is not valid UTF-8 (byte {err.start}); "
            "the file is corrupt or not safetensors"
        ) from err
    try:
        parsed = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKeyError as err:
        raise BadCheckpointError(
            f"{path}: key '{err.key}' appears twice in the safetensors header; the file is corrupt"
        ) from err
    except (json.JSONDecodeError, RecursionError) as err:
        raise BadCheckpointError(
            f"{path}: the safetensors header is not valid JSON ({err}); "
            "the file is corrupt or not safetensors"
        ) from err
    if not isinstance(parsed, dict):
        raise BadCheckpointError(
            f"{path}: the safetensors header is a JSON {type(parsed).__name__}, not an object"
        )
    result: dict[str, Any] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in parsed.items():
        if key == _METADATA_KEY:
            result[key] = _check_metadata(entry, path)
            continue
        dtype, shape, begin, end = _check_entry(key, entry, buffer_size, path)
        result[key] = (dtype, shape, begin, end)
        if end > begin:
            spans.append((begin, end, key))
    spans.sort()
    for (_, prev_end, prev_key), (begin, _, key) in itertools.pairwise(spans):
        if begin < prev_end:
            raise BadCheckpointError(
                f"{path}: tensor '{key}' overlaps tensor '{prev_key}' in the data buffer; "
                "the file is corrupt or crafted"
            )
    return result


def _check_metadata(entry: Any, path: Path) -> dict[str, str]:
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise BadCheckpointError(
            f"{path}: '{_METADATA_KEY}' is a JSON {type(entry).__name__}, not an object of strings"
        )
    for meta_key, value in entry.items():
        if not isinstance(value, str):
            raise BadCheckpointError(
                f"{path}: metadata key '{meta_key}' holds a {type(value).__name__}, "
                "but safetensors metadata values must be strings"
            )
    return dict(entry)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(
    key: str, entry: Any, buffer_size: int, path: Path
) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's dtype, shape and offsets, each checked before use."""
    where = f"{path}: tensor '{key}'"
    if not isinstance(entry, dict):
        raise BadCheckpointError(
            f"{where}: header entry is a JSON {type(entry).__name__}, not an object"
        )
    missing = [field for field in ("dtype", "shape", "data_offsets") if field not in entry]
    if missing:
        raise BadCheckpointError(f"{where}: header entry lacks {', '.join(missing)}")
    code = entry["dtype"]
    if not isinstance(code, str) or code not in _CODE_TO_DTYPE:
        raise BadCheckpointError(
            f"{where}: dtype {code!r} is not supported (supported: {', '.join(_CODE_TO_DTYPE)}); "
            "convert the tensor to one of them before saving"
        )
    dtype = _CODE_TO_DTYPE[code]
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise BadCheckpointError(
            f"{where}: shape {reprlib.repr(shape)} is not a list of non-negative integers"
        )
    if 0 in shape:  # no bytes to check it against; numpy must still be able to make it
        check_shape(where, tuple(shape), dtypes.itemsize(dtype))
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise BadCheckpointError(
            f"{where}: data_offsets {reprlib.repr(offsets)} is not a pair of integers"
        )
    begin, end = offsets
    if not 0 <= begin <= end <= buffer_size:
        raise BadCheckpointError(
            f"{where}: data_offsets [{begin}, {end}] fall outside the {buffer_size}-byte "
            "data buffer; the file is truncated or corrupt"
        )
    # Python ints: a crafted shape of 10**12 elements costs nothing to check.
    nbytes = math.prod(shape) * dtypes.itemsize(dtype)
    if end - begin != nbytes:
        raise BadCheckpointError(
            f"{where}: shape {shape} of {code} needs {nbytes} bytes but data_offsets "
            f"[{begin}, {end}] hold {end - begin}; the file is corrupt"
        )
    return dtype, tuple(shape), begin, end


def write_safetensors(
    path: Path,
    tensors: Sequence[TensorInfo],
    produce: Callable[[str], np.ndarray | RawBytes],
    metadata: dict[str, str],
    prefix: str = "",
) -> None:
    """Write a ``.safetensors`` file, one tensor in memory at a time.

    The header is computed from ``tensors`` first (names ``prefix + name``, data
    in the given order, padded with spaces to a multiple of 8 bytes as the
    reference writer does), then ``produce(name)`` is called once per tensor, in
    order, and its bytes go straight to the file. It writes ``path`` in place;
    callers that need all-or-nothing output wrap it in
    :func:`acnet_convert.atomic.atomic_output`.

    Args:
        path: where to write.
        tensors: names (unprefixed), canonical dtypes and shapes, in file order.
        produce: returns the tensor's elements in its storage dtype
            (bfloat16 as uint16 bit patterns), or :class:`RawBytes` to copy
            file to file.
        metadata: the ``__metadata__`` strings (omitted from the header when empty).
        prefix: put back in front of every name (e.g. ``Container.prefix``).

    Raises:
        ValueError: duplicate names, or ``produce`` returned an array whose
            dtype or shape differs from its :class:`TensorInfo` (a caller bug).
        OSError: the file cannot be written.

    Example:
        >>> info = TensorInfo("w", "float32", (2,))
        >>> write_safetensors(Path("w.safetensors"), [info],
        ...                   lambda n: np.zeros(2, np.float32), {})  # doctest: +SKIP
    """
    header: dict[str, Any] = {}
    if metadata:
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    for info in tensors:
        full = prefix + info.name
        if full in header:
            raise ValueError(f"tensor name '{full}' given twice")
        header[full] = {
            "dtype": _DTYPE_TO_CODE[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for info in tensors:
            value = produce(info.name)
            if isinstance(value, RawBytes):
                check_raw(info, value)
                handle.flush()
                position = handle.tell()
                copy_range(value, handle.fileno(), position)
                handle.seek(position + value.length)
                continue
            array = check_produced(info, value)
            if array.size:
                handle.write(array.reshape(-1).view(np.uint8).data)
