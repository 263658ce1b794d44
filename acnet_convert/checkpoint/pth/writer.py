"""Writing ``torch.save``-style zip checkpoints without torch.

A small protocol-2 pickle writer names the torch globals by hand; the zip
records come from :class:`~.zipfmt.ZipWriter`. Tensors are streamed one at a
time; raw bytes from a reader are copied in the kernel, and their CRC-32 is
taken from the source's zip directory where the tensor is a whole record.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..base import (
    Container,
    RawBytes,
    TensorInfo,
    check_produced,
    check_raw,
    contiguous_strides,
)
from ..rawio import array_bytes
from .zipfmt import ZipWriter

__all__ = ["write_pth"]

# What the writer emits: the typed storage class for dtypes that have one
# (readable by every torch since 1.6), else an untyped storage plus a dtype.
_WRITE_STORAGE = {
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}

_ARCHIVE = "archive"


class _PickleWriter:
    """Emits the protocol-2 opcodes a torch checkpoint needs, naming torch globals by hand."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"

    def int_(self, value: int) -> None:
        if 0 <= value < 0x100:
            self.out += b"K" + struct.pack("<B", value)
        elif 0 <= value < 0x10000:
            self.out += b"M" + struct.pack("<H", value)
        elif -0x80000000 <= value < 0x80000000:
            self.out += b"J" + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() >> 3) + 1, "little", signed=True)
            if len(raw) < 0x100:
                self.out += b"\x8a" + struct.pack("<B", len(raw)) + raw  # LONG1
            else:
                self.out += b"\x8b" + struct.pack("<i", len(raw)) + raw  # LONG4

    def str_(self, value: str) -> None:
        raw = value.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE

    def tuple_(self, items: Sequence[int | str]) -> None:
        if not items:
            self.out += b")"
            return
        self.out += b"("
        for item in items:
            self.value(item, ())
        self.out += b"t"

    def ordered_dict_call(self) -> None:
        """``OrderedDict()``: the state dict itself, and each tensor's empty backward hooks."""
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE

    def value(self, value: Any, where: tuple[str, ...], depth: int = 0) -> None:
        """Plain data: None/bool/int/float/str, and lists, tuples and str-keyed dicts of it."""
        if depth > 64:
            raise ValueError(f"extra '{'.'.join(where)}' is nested too deeply to write")
        if value is None:
            self.out += b"N"
        elif value is True:
            self.out += b"\x88"
        elif value is False:
            self.out += b"\x89"
        elif isinstance(value, int):
            self.int_(value)
        elif isinstance(value, float):
            self.out += b"G" + struct.pack(">d", value)  # BINFLOAT
        elif isinstance(value, str):
            self.str_(value)
        elif isinstance(value, tuple):
            self.out += b"("
            for i, item in enumerate(value):
                self.value(item, (*where, str(i)), depth + 1)
            self.out += b"t"
        elif isinstance(value, list):
            self.out += b"]"
            if value:
                self.out += b"("
                for i, item in enumerate(value):
                    self.value(item, (*where, str(i)), depth + 1)
                self.out += b"e"  # APPENDS
        elif isinstance(value, dict):
            self.out += b"}"
            if value:
                self.out += b"("
                for key, item in value.items():
                    if not isinstance(key, str):
                        raise TypeError(f"extra '{'.'.join(where)}' has a non-string key {key!r}")
                    self.str_(key)
                    self.value(item, (*where, key), depth + 1)
                self.out += b"u"  # SETITEMS
        else:
            raise TypeError(
                f"extra '{'.'.join(where)}' is a {type(value).__name__}; a .pth written "
                "without torch holds only None/bool/int/float/str/list/tuple/dict"
            )

    def tensor(self, key: str, info: TensorInfo) -> None:
        """``_rebuild_tensor_v2(storage, 0, shape, strides, False, OrderedDict())`` (or v3)."""
        shape = info.shape
        stride = contiguous_strides(shape)
        typed = _WRITE_STORAGE.get(info.dtype)
        self.global_("torch._utils", "_rebuild_tensor_v2" if typed else "_rebuild_tensor_v3")
        self.out += b"(("
        self.str_("storage")
        if typed:
            self.global_("torch", typed)
            numel = info.numel
        else:
            self.global_("torch.storage", "UntypedStorage")
            numel = info.nbytes
        self.str_(key)
        self.str_("cpu")
        self.int_(numel)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int_(0)
        self.tuple_(shape)
        self.tuple_(stride)
        self.out += b"\x89"  # requires_grad=False
        self.ordered_dict_call()
        if not typed:
            self.global_("torch", info.dtype)
        self.out += b"tR"  # TUPLE, REDUCE


def _state_pickle(tensors: Sequence[TensorInfo], container: Container) -> bytes:
    writer = _PickleWriter()

    def state_dict() -> None:
        writer.ordered_dict_call()
        if tensors:
            writer.out += b"("
            for key, info in enumerate(tensors):
                writer.str_(container.prefix + info.name)
                writer.tensor(str(key), info)
            writer.out += b"u"

    wrapper = container.wrapper_key
    if wrapper is None:
        state_dict()
    else:
        order = [k for k in container.keys_order if k not in container.dropped]
        if wrapper not in order:
            order.insert(0, wrapper)
        order += [k for k in container.extras if k not in order]
        writer.out += b"}("
        for key in order:
            if key == wrapper:
                writer.str_(key)
                state_dict()
            elif key in container.extras:
                writer.str_(key)
                writer.value(container.extras[key], (key,))
        writer.out += b"u"
    writer.out += b"."
    return bytes(writer.out)


def _iter_unique(tensors: Sequence[TensorInfo]) -> Iterator[TensorInfo]:
    seen: set[str] = set()
    for info in tensors:
        if info.name in seen:
            raise ValueError(f"tensor '{info.name}' is listed twice")
        seen.add(info.name)
        yield info


def write_pth(
    path: Path,
    tensors: Sequence[TensorInfo],
    produce: Callable[[str], np.ndarray | RawBytes],
    container: Container,
) -> None:
    """Write a ``torch.save``-style zip checkpoint without importing torch.

    ``produce(name)`` is called once per tensor, in order, and its array is
    written at once, so at most one tensor is held in memory. Each tensor gets
    its own contiguous storage. The state dict is stored as
    ``container.prefix + name``, under ``container.wrapper_key`` with the
    container's plain extras in their original order, or at the top level
    when there is no wrapper. ``torch.load(path, weights_only=True)`` reads
    the result.

    Args:
        path: the file to write (overwritten; see :mod:`acnet_convert.atomic`
            for writing it atomically).
        tensors: names, dtypes and shapes, in the order to write them.
        produce: returns each tensor's elements, of the numpy dtype that stores
            its canonical dtype (bfloat16 as uint16 bits) and its exact shape,
            or :class:`RawBytes` to copy file to file.
        container: how to wrap the state dict (see :class:`Container`).

    Raises:
        TypeError, ValueError: ``produce`` returned an array of the wrong dtype
            or shape, or an extra holds more than plain data.
        OSError: the file cannot be written.

    >>> write_pth(Path("deploy.pth"), list(reader.tensors.values()), reader.read,
    ...           reader.container)  # doctest: +SKIP
    """
    infos = list(_iter_unique(tensors))
    pickled = _state_pickle(infos, container)
    with open(path, "wb") as fp:
        zw = ZipWriter(fp)
        zw.record(f"{_ARCHIVE}/data.pkl", pickled)
        zw.record(f"{_ARCHIVE}/byteorder", b"little")
        for key, info in enumerate(infos):
            value = produce(info.name)
            if isinstance(value, RawBytes):
                check_raw(info, value)
                data: memoryview | RawBytes = value
            else:
                data = array_bytes(check_produced(info, value))
            zw.record(f"{_ARCHIVE}/data/{key}", data)
            del data, value
        zw.record(f"{_ARCHIVE}/version", b"3\n")
        zw.finish()
