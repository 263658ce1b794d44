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

import contextlib
import math
import mmap
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import ACNetConvertError, BadCheckpointError, UnsafeCheckpointError

from ..base import CheckpointReader, RawBytes, TensorInfo, contiguous_strides
from ..containers import unwrap
from ..rawio import read_exactly
from ..sniff import ZIP_MAGIC
from .unpickler import TRUST_ADVICE, DType, StorageRef, TensorRef, unpickle
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
        obj = unpickle(pickled, self.path)
        state_dict, self.container = unwrap(obj, path, lambda v: isinstance(v, TensorRef))
        for name, ref in state_dict.items():
            info, located = self._check(name, ref, archive, members, byteorder, mapped)
            self.tensors[name] = info
            self._located[name] = located

    def _check(
        self,
        name: str,
        ref: TensorRef,
        archive: str,
        members: Mapping[str, zipfile.ZipInfo],
        byteorder: str,
        mapped: mmap.mmap,
    ) -> tuple[TensorInfo, _Located]:
        """Validate one tensor before any of its bytes are touched."""
        where = f"{self.path}: tensor '{name}'"
        storage = ref.storage
        if not isinstance(storage, StorageRef):
            raise BadCheckpointError(
                f"{where} has no storage; the file was not written by torch.save"
            )
        dtype = storage.dtype
        if ref.dtype is not None:
            if not isinstance(ref.dtype, DType):
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
        data_offset, nbytes = member_span(self.path, member, self._fileno(), len(mapped))
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
            read_exactly(self._fileno(), out.reshape(-1).view(np.uint8).data, start)
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
