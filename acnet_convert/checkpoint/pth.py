"""PyTorch .pth checkpoints, read and written without importing torch.

``torch.save`` (since torch 1.6) writes an uncompressed zip archive::

    <archive>/data.pkl          a pickle; tensors are calls to
                                torch._utils._rebuild_tensor_v2(storage, offset,
                                size, stride, requires_grad, backward_hooks)
    <archive>/data/<key>        one raw little-endian file per storage
    <archive>/byteorder         'little' or 'big'
    <archive>/version           the archive format version, '3\\n'

:class:`PthReader` indexes such a file on open with a restricted unpickler
that knows only tensors and plain data, so a checkpoint can never run code
from its pickle; tensor bytes are read one tensor at a time (``pread`` for a
contiguous tensor, an ``mmap`` view for a strided one), and a contiguous
tensor's bytes can be copied file to file (:meth:`PthReader.raw`). Only
legacy (pre-1.6, non-zip) files, and files opened with ``trust_pickle=True``
whose pickle needs more than tensors and plain data, go through
``torch.load``, importing torch lazily.

:func:`write_pth` writes the zip format with its own small pickle and zip
writers, streaming one tensor at a time; raw bytes from a reader are copied
in the kernel, and their CRC-32 is taken from the source's zip directory where
the tensor is a whole record.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import mmap
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import ACNetConvertError, BadCheckpointError, UnsafeCheckpointError

from .base import CheckpointReader, Container, RawBytes, TensorInfo
from .containers import unwrap
from .rawio import copy_range, crc32_range, pread_into, read_range

__all__ = ["PthReader", "write_pth"]

# Storage classes of torch's typed-storage era -> canonical dtype names. Names
# that acnet_convert.dtypes does not know are kept so the error can name them.
_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
}
# torch.<attribute> dtype globals (written by _rebuild_tensor_v3) -> canonical names.
_TORCH_DTYPES = {
    **{name: name for name in dtypes.NUMPY_DTYPES},
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    # Known to torch but not handled here: kept so the error names them.
    **{
        name: name
        for name in (  # noqa: SIM905 - a word list reads better than 27 quoted lines
            "complex32 complex64 complex128 float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
            "float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2 qint8 quint8 qint32 quint4x2 "
            "int1 int2 int3 int4 int5 int6 int7 uint1 uint2 uint3 uint4 uint5 uint6 uint7"
        ).split()
    },
}
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

_TRUST_ADVICE = (
    "If you trust the file, load it with full pickle: --trust-pickle (library: trust_pickle=True)"
)
# How torch.load(weights_only=True) words a refusal (as opposed to a corrupt pickle).
_WEIGHTS_ONLY_REFUSALS = (
    "GLOBAL",
    "unrecognized function",
    "Can only create new object",
    "add_safe_globals",
)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
_END_RECORD = struct.Struct("<IHHHHIIH")
_END_RECORD64 = struct.Struct("<IQHHIIQQQQ")
_END_LOCATOR64 = struct.Struct("<IIQI")
_ALIGNMENT = 64  # torch aligns every record's data to 64 bytes
_ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need zip64 fields
_ARCHIVE = "archive"
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, so output is reproducible


# --- stand-ins for the torch objects a checkpoint pickle names ---------------


@dataclass(frozen=True)
class _StorageType:
    """``torch.FloatStorage`` & co; ``dtype`` None for ``torch.UntypedStorage`` (bytes)."""

    dtype: str | None


@dataclass(frozen=True)
class _DType:
    """A ``torch.<dtype>`` global, by canonical name."""

    name: str


@dataclass(frozen=True)
class _StorageRef:
    """A storage persistent id: the record key and the element type it was saved as."""

    key: str
    dtype: str | None


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle described it; checked only once its name is known."""

    storage: Any
    offset: Any
    shape: Any
    stride: Any
    dtype: Any = None  # from _rebuild_tensor_v3; None means "the storage's"


@dataclass(frozen=True)
class _Located:
    """A checked tensor: where its storage's bytes are and how the view walks them."""

    data_offset: int
    numpy_dtype: np.dtype[Any]
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    record_size: int  # bytes in the storage record
    record_crc: int  # its CRC-32, from the zip directory

    @property
    def contiguous(self) -> bool:
        """Whether the elements are the storage's bytes from ``offset`` on, in C order."""
        expected = _contiguous_strides(self.shape)
        pairs = zip(self.shape, self.stride, expected, strict=True)
        return all(n == 1 or s == e for n, s, e in pairs)


class _Global:
    """A callable the pickle may name; refuses attribute writes from BUILD opcodes."""

    __slots__ = ("_fn",)
    _fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("read-only")

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


def _rebuild_tensor_v2(
    storage: Any, offset: Any, shape: Any, stride: Any, *_rest: Any
) -> _TensorRef:
    return _TensorRef(storage, offset, shape, stride)


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    shape: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    *_rest: Any,
) -> _TensorRef:
    return _TensorRef(storage, offset, shape, stride, dtype)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    if not isinstance(data, _TensorRef):
        raise TypeError("torch._utils._rebuild_parameter called on something other than a tensor")
    return data


def _encode(text: Any, encoding: Any = "utf-8", *_rest: Any) -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TypeError("_codecs.encode is allowed only as (str, 'latin1')")
    return text.encode("latin-1")


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


_BUILTINS: dict[str, Any] = {
    "set": set,
    "frozenset": frozenset,
    "slice": slice,
    "complex": complex,
    "bytearray": bytearray,
}
_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _encode,
    ("torch", "device"): _device,
}


def _allowed_global(module: str, name: str) -> Any:
    """The stand-in for ``module.name``, or None when the name is not allowed.

    Stand-ins are fresh objects on every call, so nothing a pickle does to
    them outlives the load.
    """
    if module == "collections" and name in ("OrderedDict", "Counter"):
        # Counter: torch's MultiStepLR keeps its milestones in one.
        return getattr(collections, name)
    if module in ("builtins", "__builtin__") and name in _BUILTINS:
        return _BUILTINS[name]
    fn = _FUNCTIONS.get((module, name))
    if fn is not None:
        return _Global(fn)
    if module == "torch":
        if name == "Size":
            return tuple
        if name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if name in _TORCH_DTYPES:
            return _DType(_TORCH_DTYPES[name])
    if module == "torch.storage" and name in ("UntypedStorage", "_UntypedStorage"):
        return _StorageType(None)
    return None


# The pure-Python unpickler: the C one grows its memo to the largest index a
# PUT opcode names, so a few crafted bytes ('r' + 4-byte index) make it
# allocate gigabytes; this one keeps the memo in a dict.
class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickles tensors (as :class:`_TensorRef`) and plain data; refuses every other global."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str, /) -> Any:
        found = _allowed_global(module, name)
        if found is None:
            shown = "builtins" if module == "__builtin__" else module  # protocol 2 spelling
            raise UnsafeCheckpointError(
                f"{self._path}: the pickle asks for '{shown}.{name}', which is not a tensor "
                f"or plain data; loading it would run code from the file. {_TRUST_ADVICE}"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], (str, int))
            and not isinstance(pid[2], bool)
        ):
            return _StorageRef(str(pid[2]), pid[1].dtype)
        raise BadCheckpointError(
            f"{self._path}: the pickle refers to {str(pid)[:80]!r}, which is not a tensor "
            "storage; the file was not written by torch.save"
        )


# --- the reader --------------------------------------------------------------


def _is_nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list)) and all(_is_nonneg_int(v) for v in value):
        return tuple(int(v) for v in value)
    return None


class PthReader(CheckpointReader):
    """A PyTorch checkpoint (``torch.save`` zip format, or legacy pre-1.6 pickle).

    Zip-format files are indexed with a restricted unpickler and read through
    an ``mmap``, without importing torch; legacy files go through
    ``torch.load(weights_only=True)``.

    Args:
        path: the .pth file.
        trust_pickle: allow full unpickling (``torch.load(weights_only=False)``)
            for a file whose pickle holds more than tensors and plain data.
            Only for files from a trusted source: unpickling can run any code.

    Raises:
        UnsafeCheckpointError: the pickle names something other than tensors
            and plain data, and ``trust_pickle`` is False.
        BadCheckpointError: missing, truncated, corrupt, or not a checkpoint.

    >>> with PthReader(Path("train.pth")) as ckpt:  # doctest: +SKIP
    ...     weight = ckpt.read("conv1.square_conv.weight")
    """

    format = "pth"

    def __init__(self, path: Path, *, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self.trust_pickle = trust_pickle
        self._file: IO[bytes] | None = None
        self._mmap: mmap.mmap | None = None
        self._located: dict[str, _Located] = {}
        self._torch_tensors: dict[str, Any] = {}
        try:
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError as err:
            raise BadCheckpointError(f"{path}: cannot open: {err.strerror or err}") from err
        try:
            if head.startswith(_ZIP_MAGIC):
                try:
                    self._open_zip()
                except UnsafeCheckpointError:
                    if not trust_pickle:
                        raise
                    self.close()
                    self._open_with_torch(weights_only=False)
            elif head.startswith(b"\x80") or head[257:262] == b"ustar":
                # A pickle (torch < 1.6, or _use_new_zipfile_serialization=False) or
                # torch's even older tar format: torch.load knows both.
                self._open_with_torch(weights_only=not trust_pickle)
            else:
                raise BadCheckpointError(
                    f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                    "pickle); is it the right file? Try 'acnet-convert inspect'"
                )
        except BaseException:
            self.close()
            raise

    # -- zip format, no torch --

    def _open_zip(self) -> None:
        path = self.path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - held open until close()
            self._mmap = mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            with zipfile.ZipFile(self._file) as zf:
                members = {info.filename: info for info in zf.infolist()}
                pkl_name = next(
                    (n for n in members if n.endswith("/data.pkl") and n.count("/") == 1), None
                )
                if pkl_name is None:
                    raise BadCheckpointError(
                        f"{path}: zip archive without a '<name>/data.pkl' record; "
                        "it was not written by torch.save"
                    )
                archive = pkl_name[: -len("/data.pkl")]
                byteorder = "little"
                if f"{archive}/byteorder" in members:
                    byteorder = zf.read(f"{archive}/byteorder").decode("ascii", "replace")
                pickled = zf.read(pkl_name)
        except ACNetConvertError:
            raise
        except Exception as err:  # zipfile raises many kinds on damaged archives
            raise BadCheckpointError(
                f"{path}: not a readable zip archive ({err}); the file is truncated or "
                "corrupt: save it again or copy it again"
            ) from err
        if byteorder not in ("little", "big"):
            raise BadCheckpointError(
                f"{path}: byteorder record says {byteorder[:20]!r}, expected 'little' or 'big'"
            )
        obj = self._unpickle(pickled)
        state_dict, self.container = unwrap(obj, path, lambda v: isinstance(v, _TensorRef))
        for name, ref in state_dict.items():
            info, located = self._check(name, ref, archive, members, byteorder, mapped)
            self.tensors[name] = info
            self._located[name] = located

    def _unpickle(self, pickled: bytes) -> Any:
        try:
            return _RestrictedUnpickler(pickled, self.path).load()
        except ACNetConvertError:
            raise
        except Exception as err:  # a damaged pickle can fail in many ways
            raise BadCheckpointError(
                f"{self.path}: the pickle in the archive is corrupt ({type(err).__name__}: "
                f"{str(err)[:120]}); save the checkpoint again"
            ) from err

    def _check(
        self,
        name: str,
        ref: _TensorRef,
        archive: str,
        members: Mapping[str, zipfile.ZipInfo],
        byteorder: str,
        mapped: mmap.mmap,
    ) -> tuple[TensorInfo, _Located]:
        """Validate one tensor before any of its bytes are touched."""
        where = f"{self.path}: tensor '{name}'"
        storage = ref.storage
        if not isinstance(storage, _StorageRef):
            raise BadCheckpointError(
                f"{where} has no storage; the file was not written by torch.save"
            )
        dtype = storage.dtype
        if ref.dtype is not None:
            if not isinstance(ref.dtype, _DType):
                raise BadCheckpointError(f"{where}: its dtype {ref.dtype!r} is not a torch dtype")
            dtype = ref.dtype.name
        if not isinstance(dtype, str):
            raise BadCheckpointError(f"{where}: its storage has no element type")
        if dtype not in dtypes.NUMPY_DTYPES:
            raise BadCheckpointError(
                f"{where} has dtype {dtype}, which acnet-convert does not handle; "
                f"supported: {', '.join(dtypes.NUMPY_DTYPES)}"
            )
        shape = _int_tuple(ref.shape)
        stride = _int_tuple(ref.stride)
        if shape is None or stride is None or len(shape) != len(stride):
            raise BadCheckpointError(
                f"{where}: size {ref.shape!r} and stride {ref.stride!r} are not equally long "
                "tuples of non-negative integers; the file is corrupt"
            )
        if not _is_nonneg_int(ref.offset):
            raise BadCheckpointError(
                f"{where}: storage offset {ref.offset!r} is not a non-negative integer"
            )
        record = f"{archive}/data/{storage.key}"
        member = members.get(record)
        if member is None:
            raise BadCheckpointError(
                f"{where}: its storage record '{record}' is missing; the file is incomplete"
            )
        data_offset, nbytes = self._member_span(member, mapped)
        np_dtype = dtypes.numpy_dtype(dtype)
        if byteorder == "big":
            np_dtype = np_dtype.newbyteorder(">")
        itemsize = np_dtype.itemsize
        if math.prod(shape) * itemsize >= 2**62 or any(s >= 2**62 for s in stride):
            raise BadCheckpointError(
                f"{where}: size {shape} with stride {stride} is impossibly large; "
                "the file is corrupt"
            )
        if math.prod(shape) > 0:
            extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
            needed = (int(ref.offset) + extent) * itemsize
            if needed > nbytes:
                raise BadCheckpointError(
                    f"{where} needs {needed} bytes of storage '{record}', which holds only "
                    f"{nbytes}; the file is truncated or corrupt"
                )
        info = TensorInfo(name=name, dtype=dtype, shape=shape)
        located = _Located(
            data_offset, np_dtype, int(ref.offset), shape, stride, nbytes, member.CRC
        )
        return info, located

    def _member_span(self, member: zipfile.ZipInfo, mapped: mmap.mmap) -> tuple[int, int]:
        """Where a stored record's bytes start in the file, and how many there are."""
        where = f"{self.path}: record '{member.filename}'"
        if member.compress_type != zipfile.ZIP_STORED:
            raise BadCheckpointError(
                f"{where} is compressed (zip method {member.compress_type}); torch stores "
                "tensors uncompressed: unzip and re-zip it with 'zip -0', or save it again"
            )
        if member.flag_bits & 0x1:
            raise BadCheckpointError(f"{where} is encrypted")
        size = len(mapped)
        start = member.header_offset
        if start + _LOCAL_HEADER.size > size:
            raise BadCheckpointError(f"{where} starts past the end of the file; it is truncated")
        # pread, not the mmap: a touched page of a mapping counts towards our
        # resident size, and the kernel maps its neighbours along with it.
        header = _LOCAL_HEADER.unpack(
            read_range(RawBytes(self._fileno(), start, _LOCAL_HEADER.size))
        )
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

    # -- legacy files and trusted pickles, through torch --

    def _open_with_torch(self, *, weights_only: bool) -> None:
        path = self.path
        import torch  # only here: importing torch costs seconds

        try:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
        except pickle.UnpicklingError as err:
            text = str(err)
            if weights_only and any(marker in text for marker in _WEIGHTS_ONLY_REFUSALS):
                found = re.search(r"GLOBAL ([\w.]+)", text)
                what = f"'{found.group(1)}'" if found else "more than tensors and plain data"
                raise UnsafeCheckpointError(
                    f"{path}: the pickle asks for {what}; loading it would run code from the "
                    f"file. {_TRUST_ADVICE}"
                ) from err
            reason = _weights_only_reason(text)
            raise BadCheckpointError(
                f"{path}: torch.load cannot read it ({reason[:200]}); the file is truncated, "
                "corrupt or not a checkpoint"
            ) from err
        except Exception as err:  # torch.load fails in many ways on bad files
            raise BadCheckpointError(
                f"{path}: torch.load cannot read it ({type(err).__name__}: {str(err)[:200]}); "
                "the file is truncated, corrupt or not a checkpoint"
            ) from err
        state_dict, self.container = unwrap(obj, path, lambda v: isinstance(v, torch.Tensor))
        for name, tensor in state_dict.items():
            dtype = str(tensor.dtype).removeprefix("torch.")
            if dtype not in dtypes.NUMPY_DTYPES or tensor.layout != torch.strided:
                raise BadCheckpointError(
                    f"{path}: tensor '{name}' is a {tensor.layout} {dtype} tensor, which "
                    f"acnet-convert does not handle; supported: {', '.join(dtypes.NUMPY_DTYPES)}"
                )
            self.tensors[name] = TensorInfo(name=name, dtype=dtype, shape=tuple(tensor.shape))
            self._torch_tensors[name] = tensor

    # -- reading --

    def _fileno(self) -> int:
        if self._file is None:
            raise ValueError(f"{self.path}: the reader is closed")
        return self._file.fileno()

    def raw(self, name: str) -> RawBytes | None:
        """Where the tensor's bytes lie, for a contiguous little-endian tensor of a zip file."""
        loc = self._located.get(name)
        if loc is None or not loc.contiguous or loc.numpy_dtype.str[0] == ">":
            return None
        length = self.tensors[name].nbytes
        if length == 0:
            return None
        start = loc.offset * loc.numpy_dtype.itemsize
        # The record's CRC is this tensor's when the tensor is the whole record.
        crc = loc.record_crc if start == 0 and length == loc.record_size else None
        return RawBytes(self._fileno(), loc.data_offset + start, length, crc)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new C-contiguous array (bfloat16 as uint16 bits)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named '{name}'")
        if name in self._torch_tensors:
            return _torch_to_numpy(self._torch_tensors[name], self.tensors[name].dtype)
        loc = self._located[name]
        little = dtypes.numpy_dtype(self.tensors[name].dtype)
        if math.prod(loc.shape) == 0:
            return np.empty(loc.shape, dtype=little)
        if self._mmap is None:
            raise ValueError(f"{self.path}: the reader is closed")
        itemsize = loc.numpy_dtype.itemsize
        if loc.contiguous:
            # Straight into a new array: no page of the mmap becomes resident.
            out = np.empty(loc.shape, dtype=loc.numpy_dtype)
            start = loc.data_offset + loc.offset * itemsize
            _read_exactly(self._fileno(), out.reshape(-1).view(np.uint8).data, start, self.path)
            return out if loc.numpy_dtype == little else out.astype(little)
        extent = 1 + sum((n - 1) * s for n, s in zip(loc.shape, loc.stride, strict=True))
        flat = np.frombuffer(
            self._mmap,
            dtype=loc.numpy_dtype,
            count=extent,
            offset=loc.data_offset + loc.offset * itemsize,
        )
        view = np.lib.stride_tricks.as_strided(
            flat,
            shape=loc.shape,
            strides=tuple(s * itemsize for s in loc.stride),
            writeable=False,
        )
        # Always a copy: an array into the mmap would keep the file open past close().
        out = np.array(view, dtype=little, order="C", copy=True)
        del flat, view
        return out

    def close(self) -> None:
        """Close the file and its mmap (and forget tensors loaded through torch)."""
        self._torch_tensors.clear()
        if self._mmap is not None:
            # BufferError: an array still points into it; the GC closes it later.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        if self._file is not None:
            self._file.close()
            self._file = None


def _read_exactly(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = pread_into(fd, view[done:], offset + done)
        if got == 0:
            raise BadCheckpointError(
                f"{path}: the file ended early; it was truncated while being read"
            )
        done += got


def _weights_only_reason(text: str) -> str:
    """The specific part of a torch.load(weights_only=True) error, without the boilerplate."""
    for paragraph in text.split("\n\n"):
        reason = paragraph.strip().removeprefix("WeightsUnpickler error:").strip()
        if reason and not reason.startswith(
            ("Weights only load failed", "Check the documentation")
        ):
            return reason
    return text.strip()


def _torch_to_numpy(tensor: Any, dtype: str) -> np.ndarray:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    target = dtypes.numpy_dtype(dtype)
    if dtype in ("bfloat16", "uint16", "uint32", "uint64"):
        # Through a signed integer view: numpy has no bfloat16, and older
        # torch cannot hand unsigned wide integers to numpy.
        signed = {2: torch.int16, 4: torch.int32, 8: torch.int64}[target.itemsize]
        return np.array(t.view(signed).numpy().view(target), order="C", copy=True)
    return np.array(t.numpy(), dtype=target, order="C", copy=True)


# --- the writer --------------------------------------------------------------


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
        stride = _contiguous_strides(shape)
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


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)  # as torch does, so zero-size tensors get ordinary strides
    return tuple(reversed(strides))


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


@dataclass(frozen=True)
class _ZipEntry:
    name: bytes
    offset: int
    size: int
    crc: int


class _ZipWriter:
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
            self._write(
                _CENTRAL_HEADER.pack(
                    0x02014B50,
                    version,
                    version,
                    0,
                    0,
                    0,
                    _DOS_DATE,
                    entry.crc,
                    size32,
                    size32,
                    len(entry.name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    offset32,
                )
            )
            self._write(entry.name)
            self._write(extra)
        cd_size = self._pos - cd_offset
        count = len(self._entries)
        if count >= 0xFFFF or cd_offset >= _ZIP64_LIMIT or cd_size >= _ZIP64_LIMIT:
            end64 = self._pos
            self._write(
                _END_RECORD64.pack(
                    0x06064B50,
                    _END_RECORD64.size - 12,
                    45,
                    45,
                    0,
                    0,
                    count,
                    count,
                    cd_size,
                    cd_offset,
                )
            )
            self._write(_END_LOCATOR64.pack(0x07064B50, 0, end64, 1))
        self._write(
            _END_RECORD.pack(
                0x06054B50,
                0,
                0,
                min(count, 0xFFFF),
                min(count, 0xFFFF),
                min(cd_size, 0xFFFFFFFF),
                min(cd_offset, 0xFFFFFFFF),
                0,
            )
        )


def _storage_bytes(info: TensorInfo, array: Any) -> memoryview:
    """Check ``produce``'s array against its TensorInfo; its bytes, little-endian and C order."""
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"tensor '{info.name}': produce() returned a {type(array).__name__}, not an array"
        )
    expected = dtypes.numpy_dtype(info.dtype)
    if array.dtype.newbyteorder("=") != expected.newbyteorder("="):
        raise TypeError(
            f"tensor '{info.name}': produce() returned {array.dtype}, expected {expected} "
            f"for dtype {info.dtype}"
        )
    if tuple(array.shape) != tuple(info.shape):
        raise ValueError(
            f"tensor '{info.name}': produce() returned shape {tuple(array.shape)}, "
            f"expected {tuple(info.shape)}"
        )
    flat = np.ascontiguousarray(array, dtype=expected).reshape(-1)
    return flat.view(np.uint8).data


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
        zw = _ZipWriter(fp)
        zw.record(f"{_ARCHIVE}/data.pkl", pickled)
        zw.record(f"{_ARCHIVE}/byteorder", b"little")
        for key, info in enumerate(infos):
            value = produce(info.name)
            if isinstance(value, RawBytes):
                if value.length != info.nbytes:
                    raise ValueError(
                        f"tensor '{info.name}': produce() returned {value.length} raw bytes, "
                        f"expected {info.nbytes}"
                    )
                data: memoryview | RawBytes = value
            else:
                data = _storage_bytes(info, value)
            zw.record(f"{_ARCHIVE}/data/{key}", data)
            del data, value
        zw.record(f"{_ARCHIVE}/version", b"3\n")
        zw.finish()
