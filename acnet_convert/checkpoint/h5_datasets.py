"""Checked access to HDF5 datasets, shared by the HDF5 and Keras 3 readers.

Everything a dataset declares (element type, shape, where its bytes are) is
checked before anything is read, so a crafted file cannot make a reader
allocate far more memory than the file's own size or read outside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import BadCheckpointError

from .base import TensorInfo, check_shape
from .h5_attrs import _H5_ERRORS, _as_str, _reason

__all__ = ["BF16_ATTR", "check_dataset", "read_dataset"]

# Dataset attribute that marks uint16 data as bfloat16 bit patterns.
BF16_ATTR = "dtype"

# Stored element type (little-endian) -> canonical name; HDF5 converts
# big-endian data on read.
_CANONICAL = {
    np.dtype(np_dtype): name for name, np_dtype in dtypes.NUMPY_DTYPES.items() if name != "bfloat16"
}


def read_dataset(file: h5py.File | None, h5_path: str, info: TensorInfo, path: Path) -> np.ndarray:
    """The dataset at ``h5_path`` of an open file as a new array of ``info``'s storage dtype.

    Raises:
        BadCheckpointError: the data cannot be read (corrupt file).
        ValueError: the file is closed (a caller bug).
    """
    out = np.empty(info.shape, dtype=dtypes.numpy_dtype(info.dtype))
    if out.size == 0:
        return out
    if file is None:
        raise ValueError(f"{path}: the reader is closed")
    try:
        file[h5_path].read_direct(out)
    except _H5_ERRORS as err:
        raise BadCheckpointError(
            f"{path}: dataset '{info.name}' cannot be read ({_reason(err)}); "
            "the file is truncated or corrupt"
        ) from err
    return out


def check_dataset(
    dataset: h5py.Dataset, key: str, file_size: int, path: Path
) -> tuple[str, tuple[int, ...]]:
    """The dataset's canonical dtype and shape, refusing anything we would not read safely."""
    where = f"{path}: dataset '{key}'"
    np_dtype = dataset.dtype
    canonical = None
    if np_dtype.fields is None and np_dtype.subdtype is None and np_dtype.kind in "biuf":
        canonical = _CANONICAL.get(np_dtype.newbyteorder("<"))
    if canonical is None:
        raise BadCheckpointError(
            f"{where}: element type {_describe_dtype(np_dtype)} is not a tensor type "
            f"(supported: {', '.join(dtypes.NUMPY_DTYPES)}); remove it or save it as numbers"
        )
    marker = _as_str(dataset.attrs[BF16_ATTR]) if BF16_ATTR in dataset.attrs else None
    if marker == "bfloat16":
        if canonical != "uint16":
            raise BadCheckpointError(
                f"{where}: marked bfloat16 but stored as {canonical}, not uint16; "
                "the file is corrupt"
            )
        canonical = "bfloat16"
    shape = dataset.shape
    if shape is None:
        raise BadCheckpointError(f"{where}: has no shape (an HDF5 null dataspace), not a tensor")
    if 0 in shape:  # no bytes to check it against; numpy must still be able to make it
        check_shape(where, tuple(int(d) for d in shape), np_dtype.itemsize)
    nbytes = math.prod(shape) * np_dtype.itemsize
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL or plist.get_external_count() > 0:
        raise BadCheckpointError(
            f"{where}: its data lives in other files (virtual or external storage); "
            "refusing to read outside the checkpoint"
        )
    offset = dataset.id.get_offset() if layout == h5py.h5d.CONTIGUOUS else None
    if offset is not None:
        # Uncompressed bytes stored in the file: they must lie inside it.
        if offset + nbytes > file_size:
            raise BadCheckpointError(
                f"{where}: shape {shape} needs bytes {offset}..{offset + nbytes} but the file "
                f"has {file_size}; the file is truncated or corrupt"
            )
    elif nbytes > 16 * file_size + 2**20:
        # Chunked (maybe compressed), compact or never-written data: its size
        # in memory is not bounded by the file. Weights compress by a few
        # times at most, so 16x the file plus 1 MiB of slack for small
        # fill-value datasets admits every real checkpoint while capping what
        # a crafted file can make us allocate.
        raise BadCheckpointError(
            f"{where}: shape {shape} declares {nbytes} bytes, more than a "
            f"{file_size}-byte file can plausibly hold; the file is corrupt or crafted "
            "(if it is genuine, re-save it without compression)"
        )
    return canonical, tuple(int(d) for d in shape)


def _describe_dtype(np_dtype: np.dtype[Any]) -> str:
    if h5py.check_string_dtype(np_dtype) is not None or np_dtype.kind in "SU":
        return "string"
    if h5py.check_vlen_dtype(np_dtype) is not None:
        return "variable-length"
    if h5py.check_ref_dtype(np_dtype) is not None:
        return "object reference"
    if np_dtype.fields is not None:
        return "compound"
    return str(np_dtype)
