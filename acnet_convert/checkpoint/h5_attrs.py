"""Small helpers shared by the HDF5 readers: h5py's error types and string attributes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

logger = logging.getLogger(__name__)

# Errors h5py raises for unreadable or corrupt files and objects.
_H5_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError)


def _reason(err: BaseException) -> str:
    return str(err).strip() or type(err).__name__


def _as_str(value: Any) -> str | None:
    """An attribute value as text, if it is a (byte) string."""
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "SUO":
        value = value.item()
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _string_attrs(obj: h5py.HLObject, path: Path) -> dict[str, str]:
    """The object's string-valued attributes; others are not metadata and are skipped."""
    result: dict[str, str] = {}
    for key in obj.attrs:
        try:
            text = _as_str(obj.attrs[key])
        except _H5_ERRORS as err:
            logger.debug("%s: attribute %r skipped (%s)", path, key, _reason(err))
            continue
        if text is not None:
            result[key] = text
    return result
