"""Tensor element types by name, and exact conversions through float64.

numpy has no bfloat16, so bfloat16 data travels as ``uint16`` arrays holding
the raw bit patterns; the canonical dtype name says how to read them.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "FLOAT_DTYPES",
    "NUMPY_DTYPES",
    "from_float64",
    "itemsize",
    "numpy_dtype",
    "to_float64",
    "unit_roundoff",
]

# Canonical name -> numpy storage dtype (little-endian, as every format here stores it).
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
}

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})

_UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}


def numpy_dtype(name: str) -> np.dtype[np.generic]:
    """The numpy dtype that stores elements of the canonical type ``name``."""
    return NUMPY_DTYPES[name]


def itemsize(name: str) -> int:
    """Bytes per element of the canonical type ``name``."""
    return NUMPY_DTYPES[name].itemsize


def unit_roundoff(name: str) -> float:
    """Half the distance from 1.0 to the next representable number of a float type."""
    return _UNIT_ROUNDOFF[name]


def to_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored elements of type ``dtype`` to float64 exactly (a new array)."""
    if dtype == "bfloat16":
        wide = array.astype(np.uint32) << np.uint32(16)
        return wide.view(np.float32).astype(np.float64)
    with np.errstate(invalid="ignore"):  # a signalling NaN; callers check for NaN themselves
        return np.asarray(array).astype(np.float64)


def from_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` (round to nearest even, as torch does)."""
    if dtype == "bfloat16":
        # Through float32 first, as torch's double -> bfloat16 cast does.
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        nan = np.isnan(bits.view(np.float32))
        rounded = (
            bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        ) >> np.uint32(16)
        out = rounded.astype(np.uint16)
        out[nan] = np.uint16(0x7FC0)
        return out
    with np.errstate(over="ignore"):  # too large for the dtype: inf, which callers detect
        return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype])
