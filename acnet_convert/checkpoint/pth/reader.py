"""Reading PyTorch .pth checkpoints, without torch for the zip format.

``torch.save`` (since torch 1.6) writes an uncompressed zip archive::

    <archive>/data.pkl          a pickle; tensors are calls to
                                torch._utils._rebuild_tensor_v2(storage, offset,
                                size, stride, requires_grad, backward_hooks)
    <archive>/data/<key>        one raw little-endian file per storage
    <archive>/byteorder         'little' or 'big'
    <archive>/version           the archive format version, '3\\n'

:class:`PthReader` indexes such a file on open with the restricted unpickler
of :mod:`.unpickler`, so a checkpoint can never run code from its pickle;
tensor bytes are read one tensor at a time (``pread`` for a contiguous tensor,
an ``mmap`` view for a strided one), and a contiguous tensor's bytes can be
copied file to file (:meth:`PthReader.raw`). Only legacy (pre-1.6, non-zip)
files, and files opened with ``trust_pickle=True`` whose pickle needs more than
tensors and plain data, go through ``torch.load``, importing torch lazily.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import ACNetConvertError, BadCheckpointError, UnsafeCheckpointError

from ..base import (
    MAX_TENSOR_BYTES,
    CheckpointReader,
    RawBytes,
    TensorInfo,
    check_shape,
    contiguous_strides,
    open_regular,
    require_regular_file,
)
from ..containers import unwrap
from ..rawio import crc32_range, read_exactly
from ..sniff import ZIP_MAGIC
from .unpickler import TRUST_ADVICE, DType, StorageRef, TensorRef, short_repr, unpickle
from .zipfmt import member_span

__all__ = ["PthReader"]

# How torch.load(weights_only=True) words a refusal (as opposed to a corrupt pickle).
_WEIGHTS_ONLY_REFUSALS = (
    "GLOBAL",
    "unrecognized function",
    "Can only create new object",
    "add_safe_globals",
)


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
        expected = contiguous_strides(self.shape)
        pairs = zip(self.shape, self.stride, expected, strict=True)
        return all(n == 1 or s == e for n, s, e in pairs)


def _is_nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list)) and all(_is_nonneg_int(v) for v in value):
        return tuple(int(v) for v in value)
    return None


def pickle_limit(file_size: int) -> int:
    """The most bytes a (compressed) data.pkl may inflate to: as for compressed HDF5 data."""
    return 16 * file_size + 2**20


def _read_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    """A small record's bytes, read through zipfile (which checks its CRC-32), at most ``limit``."""
    with zf.open(member) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise BadCheckpointError(
            f"{path}: record '{member.filename}' inflates to more than {limit} bytes, far more "
            f"than a {path.stat().st_size}-byte checkpoint holds; the file is corrupt or crafted "
            "(torch stores records uncompressed: save it again)"
        )
    return data


def _check_layout(
    where: str,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int,
    itemsize: int,
    nbytes: int,
    record: str,
) -> None:
    """Refuse sizes that overflow, views that run past their storage, and overlapping views."""
    check_shape(where, shape, itemsize)
    # sizes, strides and offsets stay far below what int64 index arithmetic can hold
    if any(s >= MAX_TENSOR_BYTES for s in stride) or offset >= MAX_TENSOR_BYTES:
        raise BadCheckpointError(
            f"{where}: size {shape} with stride {stride} is impossibly large; the file is corrupt"
        )
    if math.prod(shape) == 0:
        return
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    needed = (offset + extent) * itemsize
    if needed > nbytes:
        raise BadCheckpointError(
            f"{where} needs {needed} bytes of storage '{record}', which holds only "
            f"{nbytes}; the file is truncated or corrupt"
        )
    # Elements that share storage (stride 0 from expand(), or as_strided views)
    # would be expanded into far more memory and output than the file holds.
    reach = 0
    for n, s in sorted(
        ((n, s) for n, s in zip(shape, stride, strict=True) if n > 1), key=lambda pair: pair[1]
    ):
        if s <= reach:
            raise BadCheckpointError(
                f"{where}: size {shape} with stride {stride} reuses its elements (an "
                "expand()ed or as_strided view); acnet-convert does not expand such tensors: "
                "save it with .contiguous() (or .clone()) first"
            )
        reach += (n - 1) * s


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
        self._size = 0
        self._located: dict[str, _Located] = {}
        self._verified: set[int] = set()  # data offsets of records whose CRC-32 was checked
        self._torch_tensors: dict[str, Any] = {}
        self._size = require_regular_file(path)
        try:
            with open_regular(path) as f:
                head = f.read(512)
        except OSError as err:
            raise BadCheckpointError(f"{path}: cannot open: {err.strerror or err}") from err
        try:
            if head.startswith(ZIP_MAGIC):
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
            self._file = open_regular(path)
            self._size = os.fstat(self._file.fileno()).st_size
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
                    raw_order = _read_member(zf, members[f"{archive}/byteorder"], 64, path)
                    byteorder = raw_order.decode("ascii", "replace")
                pickled = _read_member(zf, members[pkl_name], pickle_limit(self._size), path)
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
        obj = unpickle(pickled, self.path)
        del pickled
        state_dict, self.container = unwrap(obj, path, lambda v: isinstance(v, TensorRef))
        for name, ref in state_dict.items():
            info, located = self._check(name, ref, archive, members, byteorder)
            self.tensors[name] = info
            self._located[name] = located

    def _check(
        self,
        name: str,
        ref: TensorRef,
        archive: str,
        members: Mapping[str, zipfile.ZipInfo],
        byteorder: str,
    ) -> tuple[TensorInfo, _Located]:
        """Validate one tensor before any of its bytes are touched."""
        where = f"{self.path}: tensor '{name}'"
        storage = ref.storage
        if not isinstance(storage, StorageRef):
            raise BadCheckpointError(
                f"{where} has no storage; the file was not written by torch.save"
            )
        dtype = _element_type(where, storage, ref)
        shape = _int_tuple(ref.shape)
        stride = _int_tuple(ref.stride)
        if shape is None or stride is None or len(shape) != len(stride):
            raise BadCheckpointError(
                f"{where}: size {short_repr(ref.shape)} and stride {short_repr(ref.stride)} are "
                "not equally long "
                "tuples of non-negative integers; the file is corrupt"
            )
        if not _is_nonneg_int(ref.offset):
            raise BadCheckpointError(
                f"{where}: storage offset {short_repr(ref.offset)} is not a non-negative integer"
            )
        record = f"{archive}/data/{storage.key}"
        member = members.get(record)
        if member is None:
            raise BadCheckpointError(
                f"{where}: its storage record '{record}' is missing; the file is incomplete"
            )
        data_offset, nbytes = member_span(self.path, member, self._fileno(), self._size)
        np_dtype = dtypes.numpy_dtype(dtype)
        if byteorder == "big":
            np_dtype = np_dtype.newbyteorder(">")
        _check_layout(where, shape, stride, int(ref.offset), np_dtype.itemsize, nbytes, record)
        info = TensorInfo(name=name, dtype=dtype, shape=shape)
        located = _Located(
            data_offset, np_dtype, int(ref.offset), shape, stride, nbytes, member.CRC
        )
        return info, located

    # -- legacy files and trusted pickles, through torch --

    def _open_with_torch(self, *, weights_only: bool) -> None:
        path = self.path
        from acnet_convert.extras import require_torch

        require_torch(f"{path}: reading a legacy (pre-1.6) or --trust-pickle .pth")
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
                    f"file. {TRUST_ADVICE}"
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

    def _verify_record(self, loc: _Located, crc: int | None = None) -> None:
        """Check a storage record's CRC-32 against the zip directory, once per record.

        ``crc`` is the record's checksum when the caller has just computed it
        (a tensor that is the whole record, read into memory).
        """
        if loc.data_offset in self._verified:
            return
        if crc is None:
            crc = crc32_range(RawBytes(self._fileno(), loc.data_offset, loc.record_size))
        if crc != loc.record_crc:
            raise BadCheckpointError(
                f"{self.path}: a storage record at byte {loc.data_offset} fails its CRC-32 "
                f"check (stored {loc.record_crc:08x}, computed {crc:08x}); the file is "
                "corrupt: copy or download it again"
            )
        self._verified.add(loc.data_offset)

    def raw(self, name: str) -> RawBytes | None:
        """Where the tensor's bytes lie, for a contiguous little-endian tensor of a zip file.

        The storage record is checked against its CRC-32 first, so the CRC
        handed on with whole-record bytes is the one of the bytes copied.
        """
        loc = self._located.get(name)
        if loc is None or not loc.contiguous or loc.numpy_dtype.str[0] == ">":
            return None
        length = self.tensors[name].nbytes
        if length == 0:
            return None
        self._verify_record(loc)
        start = loc.offset * loc.numpy_dtype.itemsize
        # The record's CRC is this tensor's when the tensor is the whole record.
        crc = loc.record_crc if start == 0 and length == loc.record_size else None
        return RawBytes(self._fileno(), loc.data_offset + start, length, crc)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new C-contiguous array (bfloat16 as uint16 bits).

        Raises:
            BadCheckpointError: the storage record fails its CRC-32 check, or the
                file was truncated while open.
        """
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named '{name}'")
        if name in self._torch_tensors:
            return _torch_to_numpy(self._torch_tensors[name], self.tensors[name].dtype)
        loc = self._located[name]
        little = dtypes.numpy_dtype(self.tensors[name].dtype)
        if math.prod(loc.shape) == 0:
            return np.empty(loc.shape, dtype=little)
        itemsize = loc.numpy_dtype.itemsize
        start = loc.data_offset + loc.offset * itemsize
        if loc.contiguous:
            out = np.empty(loc.shape, dtype=loc.numpy_dtype)
            raw = out.reshape(-1).view(np.uint8).data
            read_exactly(self._fileno(), raw, start)
            whole = loc.offset == 0 and out.nbytes == loc.record_size
            self._verify_record(loc, zlib.crc32(raw) if whole else None)
            return out if loc.numpy_dtype == little else out.astype(little)
        # Strided: the elements' span (checked to fit the record, and not
        # overlapping, so at most the record's size) by pread, then a C-order copy.
        self._verify_record(loc)
        extent = 1 + sum((n - 1) * s for n, s in zip(loc.shape, loc.stride, strict=True))
        flat = np.empty(extent, dtype=loc.numpy_dtype)
        read_exactly(self._fileno(), flat.view(np.uint8).data, start)
        view = np.lib.stride_tricks.as_strided(
            flat,
            shape=loc.shape,
            strides=tuple(s * itemsize for s in loc.stride),
            writeable=False,
        )
        return np.array(view, dtype=little, order="C", copy=True)

    def close(self) -> None:
        """Close the file (and forget tensors loaded through torch)."""
        self._torch_tensors.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


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


def _element_type(where: str, storage: StorageRef, ref: TensorRef) -> str:
    """The tensor's dtype name (its own, or its storage's), refused unless we handle it."""
    dtype = storage.dtype
    if ref.dtype is not None:
        if not isinstance(ref.dtype, DType):
            raise BadCheckpointError(
                f"{where}: its dtype {short_repr(ref.dtype)} is not a torch dtype"
            )
        dtype = ref.dtype.name
    if not isinstance(dtype, str):
        raise BadCheckpointError(f"{where}: its storage has no element type")
    if dtype not in dtypes.NUMPY_DTYPES:
        raise BadCheckpointError(
            f"{where} has dtype {dtype}, which acnet-convert does not handle; "
            f"supported: {', '.join(dtypes.NUMPY_DTYPES)}"
        )
    return dtype
