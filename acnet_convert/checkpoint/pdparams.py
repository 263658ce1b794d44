"""Paddle ``.pdparams``: a pickle of a dict, parameter name -> numpy array.

``paddle.save(layer.state_dict(), "x.pdparams")`` pickles the dict with
protocol 2 to 4 (default 4). Paddle 2.0 and ``paddle.static.save`` store each
value as a plain ``numpy.ndarray``; Paddle 2.1 and later reduce a tensor to a
``(name, ndarray)`` tuple (``tuple`` called on that pair). Dygraph files may
also carry ``StructuredToParameterName@@``, a dict of names, which is not a
tensor and is dropped. A numpy array pickles (protocol < 5) as
``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')`` followed by
a BUILD with ``(version, shape, dtype, is_fortran, raw bytes)``, its dtype as
``numpy.dtype(str, align, copy)`` plus a BUILD with the byte order.

:class:`PdparamsUnpickler` extends the restricted unpickler with exactly that
reconstruction path, resolved to inert stand-ins here: no numpy function is
ever called by the pickle, only ``numpy.frombuffer`` on bytes it holds, once
the shape and a numeric dtype have been checked. Every other global is refused
as before.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import ACNetConvertError, BadCheckpointError

from .base import (
    CheckpointReader,
    Container,
    RawBytes,
    TensorInfo,
    check_produced,
    check_raw,
    open_regular,
)
from .pth.unpickler import RestrictedUnpickler, _Global

__all__ = ["PdparamsReader", "PdparamsUnpickler", "write_pdparams"]

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NAME_TABLE = "StructuredToParameterName@@"
# numpy dtype codes a weight can have -> canonical names (bool, ints, floats).
_DTYPE_CODES = {
    "b1": "bool",
    "i1": "int8",
    "u1": "uint8",
    "i2": "int16",
    "u2": "uint16",
    "i4": "int32",
    "u4": "uint32",
    "i8": "int64",
    "u8": "uint64",
    "f2": "float16",
    "f4": "float32",
    "f8": "float64",
}
_PROTOCOL = 4  # what paddle.save writes by default


class _NdarrayType:
    """The ``numpy.ndarray`` global: only a marker for ``_reconstruct``."""


class _DTypeBuilder:
    """``numpy.dtype(code, align, copy)``; its BUILD state sets the byte order."""

    def __init__(self, code: Any, *_rest: Any) -> None:
        if not isinstance(code, str) or code not in _DTYPE_CODES:
            raise BadCheckpointError(f"numpy dtype {str(code)[:20]!r} is not a numeric type")
        self.code = code
        self.order = "<"

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5 or any(s is not None for s in state[2:5]):
            raise BadCheckpointError("numpy dtype state is not that of a plain numeric type")
        if state[1] not in ("<", ">", "|", "="):
            raise BadCheckpointError(f"numpy dtype byte order {state[1]!r} is not one")
        self.order = ">" if state[1] == ">" else "<"

    def numpy(self) -> np.dtype[Any]:
        return np.dtype(self.order + self.code)


class _ArrayBuilder:
    """What ``_reconstruct`` returns; its BUILD state carries shape, dtype and bytes."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise BadCheckpointError("numpy array state is not (version, shape, dtype, ...)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DTypeBuilder) or not isinstance(raw, bytes | bytearray):
            raise BadCheckpointError("numpy array state holds no numeric dtype and bytes")
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise BadCheckpointError(f"numpy array shape {str(shape)[:40]} is not a shape")
        np_dtype = dtype.numpy()
        if math.prod(shape) * np_dtype.itemsize != len(raw):
            raise BadCheckpointError(
                f"numpy array of shape {list(shape)} needs {math.prod(shape) * np_dtype.itemsize}"
                f" bytes, the pickle holds {len(raw)}"
            )
        flat = np.frombuffer(bytes(raw), dtype=np_dtype)
        array = flat.reshape(shape, order="F" if fortran else "C")
        self.array = np.ascontiguousarray(array, dtype=np_dtype.newbyteorder("<"))


def _reconstruct(cls: Any, shape: Any, typecode: Any, *_rest: Any) -> _ArrayBuilder:
    if not isinstance(cls, _NdarrayType):
        raise BadCheckpointError("numpy _reconstruct called for something other than an ndarray")
    return _ArrayBuilder()


class PdparamsUnpickler(RestrictedUnpickler):
    """The restricted unpickler plus numpy's array and dtype reconstruction, and ``tuple``."""

    def find_class(self, module: str, name: str, /) -> Any:
        if module in _NUMPY_MODULES and name == "_reconstruct":
            return _Global(_reconstruct)
        if module == "numpy" and name == "ndarray":
            return _NdarrayType()
        if module == "numpy" and name == "dtype":
            return _Global(_DTypeBuilder)
        if module in ("builtins", "__builtin__") and name == "tuple":
            return tuple  # Paddle >= 2.1: a tensor is tuple((name, ndarray))
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise BadCheckpointError(
            f"{self._path}: the pickle refers to an external object, which a .pdparams never does"
        )


def _value(value: Any) -> np.ndarray | None:
    """The array a state-dict value holds (ndarray, or Paddle 2.1's (name, ndarray))."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        value = value[1]
    if isinstance(value, np.ndarray) and value.dtype.str[1:] in _DTYPE_CODES:  # trust_pickle
        return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    return value.array if isinstance(value, _ArrayBuilder) else None


class PdparamsReader(CheckpointReader):
    """An open ``.pdparams`` file, read whole with :class:`PdparamsUnpickler`.

    ``trust_pickle`` unpickles with Python's own pickle, which runs whatever
    the file names: only for files from a trusted source.

    Raises:
        UnsafeCheckpointError: the pickle names anything but numpy arrays and plain data.
        BadCheckpointError: it is no dict of arrays, or it cannot be unpickled.
    """

    format = "pdparams"

    def __init__(self, path: Path, *, trust_pickle: bool = False) -> None:
        super().__init__(path)
        self.trust_pickle = trust_pickle
        self._arrays: dict[str, np.ndarray] = {}
        obj = self._load()
        if not isinstance(obj, dict):
            raise BadCheckpointError(
                f"{path}: cannot be read as a Paddle .pdparams: it pickles a "
                f"{type(obj).__name__}, not a dict of parameter name -> array"
            )
        dropped = []
        for key, value in obj.items():
            array = _value(value)
            if not isinstance(key, str) or array is None:
                if key == _NAME_TABLE or not isinstance(value, _ArrayBuilder | tuple | np.ndarray):
                    dropped.append(str(key))
                    continue
                raise BadCheckpointError(f"{path}: entry {str(key)[:60]!r} is not an array")
            self._arrays[key] = array
            canonical = _DTYPE_CODES[array.dtype.str[1:]]
            self.tensors[key] = TensorInfo(key, canonical, tuple(array.shape))
        if not self.tensors:
            raise BadCheckpointError(f"{path}: the .pdparams holds no arrays")
        self.container = Container(dropped=tuple(dropped))

    def _load(self) -> Any:
        try:
            with open_regular(self.path) as handle:
                data = handle.read()
            if self.trust_pickle:
                return pickle.loads(data)  # the user opted in to running the file's code
            return PdparamsUnpickler(data, self.path).load()
        except ACNetConvertError as err:
            if str(err).startswith(str(self.path)):
                raise
            raise type(err)(f"{self.path}: cannot be read as a Paddle .pdparams: {err}") from err
        except Exception as err:  # a damaged pickle can fail in many ways
            raise BadCheckpointError(
                f"{self.path}: cannot be read as a Paddle .pdparams ({type(err).__name__}: "
                f"{str(err)[:120]}); it is not a pickle of name -> numpy array, or it is "
                "truncated or corrupt"
            ) from err

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name].copy()

    def raw(self, name: str) -> RawBytes | None:
        return None

    def close(self) -> None:
        self._arrays = {}


def write_pdparams(
    path: Path,
    tensors: Sequence[TensorInfo],
    produce: Callable[[str], np.ndarray | RawBytes],
) -> None:
    """Pickle ``tensors`` as Paddle does: a dict of name -> numpy array, protocol 4.

    Raises:
        BadCheckpointError: a bfloat16 tensor (numpy has no such type).
    """
    out: dict[str, np.ndarray] = {}
    for info in tensors:
        if info.dtype not in _DTYPE_CODES.values():
            raise BadCheckpointError(
                f"'{info.name}' is {info.dtype}, which a .pdparams (numpy) cannot hold; "
                "write safetensors or pth instead"
            )
        value = produce(info.name)
        if isinstance(value, RawBytes):
            from .rawio import read_range

            check_raw(info, value)
            value = np.frombuffer(read_range(value), dtype=dtypes.numpy_dtype(info.dtype))
            value = value.reshape(info.shape)
        out[info.name] = np.array(check_produced(info, value))
    with open(path, "wb") as handle:
        pickle.dump(out, handle, protocol=_PROTOCOL)
