"""The restricted unpickler: the security boundary of the .pth reader.

A ``torch.save`` pickle describes tensors as calls to a few torch functions
(``torch._utils._rebuild_tensor_v2`` and friends) whose first argument is a
persistent id naming a storage record of the zip archive. This module lets a
pickle name exactly those functions, the storage and dtype globals, and plain
data types (``OrderedDict``, ``Counter``, ``set``, ``frozenset``, ``slice``,
``complex``, ``bytearray``); every other global is refused with
:class:`~acnet_convert.errors.UnsafeCheckpointError` before anything from it
runs. The torch names resolve to inert stand-ins defined here (torch is never
imported): a tensor becomes a :class:`TensorRef` that the reader checks against
the archive before touching a byte.

Subclass :class:`RestrictedUnpickler` (override :meth:`find_class` and call
``super()``) to admit a format's own plain-data globals.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from acnet_convert import dtypes
from acnet_convert.errors import ACNetConvertError, BadCheckpointError, UnsafeCheckpointError

__all__ = [
    "STORAGE_DTYPES",
    "TORCH_DTYPES",
    "TRUST_ADVICE",
    "DType",
    "RestrictedUnpickler",
    "StorageRef",
    "StorageType",
    "TensorRef",
    "allowed_global",
    "check_key",
    "short_repr",
    "unpickle",
]

# Storage classes of torch's typed-storage era -> canonical dtype names. Names
# that acnet_convert.dtypes does not know are kept so the error can name them.
STORAGE_DTYPES = {
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
TORCH_DTYPES = {
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

TRUST_ADVICE = (
    "If you trust the file, load it with full pickle: --trust-pickle (library: trust_pickle=True)"
)


# --- stand-ins for the torch objects a checkpoint pickle names ---------------


@dataclass(frozen=True)
class StorageType:
    """``torch.FloatStorage`` & co; ``dtype`` None for ``torch.UntypedStorage`` (bytes)."""

    dtype: str | None


@dataclass(frozen=True)
class DType:
    """A ``torch.<dtype>`` global, by canonical name."""

    name: str


@dataclass(frozen=True)
class StorageRef:
    """A storage persistent id: the record key and the element type it was saved as."""

    key: str
    dtype: str | None


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle described it; checked only once its name is known."""

    storage: Any
    offset: Any
    shape: Any
    stride: Any
    dtype: Any = None  # from _rebuild_tensor_v3; None means "the storage's"


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
) -> TensorRef:
    return TensorRef(storage, offset, shape, stride)


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    shape: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    *_rest: Any,
) -> TensorRef:
    return TensorRef(storage, offset, shape, stride, dtype)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    if not isinstance(data, TensorRef):
        raise TypeError("torch._utils._rebuild_parameter called on something other than a tensor")
    return data


def _encode(text: Any, encoding: Any = "utf-8", *_rest: Any) -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); allow only that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TypeError("_codecs.encode is allowed only as (str, 'latin1')")
    return text.encode("latin-1")


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


# Dict keys and set elements get hashed, and compared when hashes collide: for a
# nest of shared tuples both take time exponential in the pickle's size. Keys
# are therefore flat: scalars, or small tuples of them.
_KEY_SCALARS = (str, bytes, int, float, complex, type(None))
_KEY_TUPLE_NODES = 256


def check_key(key: Any) -> None:
    """Refuse a dict key or set element that is not a scalar or a small tuple of scalars."""
    budget = _KEY_TUPLE_NODES
    pending = [key]
    while pending:
        item = pending.pop()
        if isinstance(item, _KEY_SCALARS):
            continue
        if type(item) is tuple:
            budget -= len(item) + 1
            if budget < 0:
                raise TypeError("a dict key or set element is a tuple nested too large")
            pending.extend(item)
            continue
        raise TypeError(
            f"a dict key or set element is a {type(item).__name__}; a checkpoint's keys are "
            "names and numbers"
        )


def _set(items: Any = ()) -> set[Any]:
    values = list(items)
    for value in values:
        check_key(value)
    return set(values)


def _frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_set(items))


def _pairs(arg: Any) -> list[tuple[Any, Any]]:
    pairs = list(arg.items()) if isinstance(arg, dict) else [tuple(p) for p in arg]
    for pair in pairs:
        if len(pair) != 2:
            raise TypeError("a mapping is built from something other than key, value pairs")
        check_key(pair[0])
    return pairs


def _ordered_dict(arg: Any = ()) -> collections.OrderedDict[Any, Any]:
    return collections.OrderedDict(_pairs(arg))


def _counter(arg: Any = ()) -> collections.Counter[Any]:
    if isinstance(arg, dict):
        return collections.Counter(dict(_pairs(arg)))
    values = list(arg)
    for value in values:
        check_key(value)
    return collections.Counter(values)


def _bytearray(*args: Any) -> bytearray:
    # As pickled by bytearray.__reduce_ex__: (bytes,) or, in protocol 2, (str, 'latin-1').
    # Never bytearray(n): a few pickle bytes would allocate n.
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin-1")
    raise TypeError("bytearray is allowed only from bytes or (str, 'latin-1'), not from a size")


_BUILTINS: dict[str, Callable[..., Any]] = {
    "set": _set,
    "frozenset": _frozenset,
    "slice": slice,
    "complex": complex,
    "bytearray": _bytearray,
}
_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _encode,
    ("torch", "device"): _device,
}


def allowed_global(module: str, name: str) -> Any:
    """The stand-in for ``module.name``, or None when the name is not allowed.

    Stand-ins are fresh objects on every call, so nothing a pickle does to
    them outlives the load.
    """
    if module == "collections" and name == "OrderedDict":
        return _Global(_ordered_dict)
    if module == "collections" and name == "Counter":
        # torch's MultiStepLR keeps its milestones in one.
        return _Global(_counter)
    if module in ("builtins", "__builtin__") and name in _BUILTINS:
        return _Global(_BUILTINS[name])
    fn = _FUNCTIONS.get((module, name))
    if fn is not None:
        return _Global(fn)
    if module == "torch":
        if name == "Size":
            return tuple
        if name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if name in TORCH_DTYPES:
            return DType(TORCH_DTYPES[name])
    if module == "torch.storage" and name in ("UntypedStorage", "_UntypedStorage"):
        return StorageType(None)
    return None


def short_repr(value: Any) -> str:
    """A bounded repr of untrusted data: a few levels and items, whatever the structure shares."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40


def _load_checking(opcode: bytes, keys: Callable[[list[Any]], list[Any]]) -> Any:
    """A dispatch entry that checks the keys an opcode is about to hash, then runs it."""
    original = pickle._Unpickler.dispatch[opcode[0]]

    def load(self: Any) -> None:
        for key in keys(self.stack):
            check_key(key)
        original(self)

    return load


# Opcodes that create a container (or call a constructor): each costs 50 to 250
# bytes of memory for as little as one byte of pickle. torch's own pickles
# spend about 15 bytes per container (Adam state); a budget of one per 8 bytes (plus
# slack for small files) bounds memory to a small multiple of the file.
_BUILDING = (
    pickle.EMPTY_DICT, pickle.EMPTY_LIST, pickle.EMPTY_SET, pickle.DICT, pickle.LIST,
    pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.FROZENSET,
    pickle.REDUCE, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.OBJ, pickle.INST, pickle.BUILD,
)  # fmt: skip
_BYTES_PER_CONTAINER = 8
_CONTAINER_SLACK = 100_000


def _load_counting(opcode: bytes) -> Any:
    """A dispatch entry that charges the unpickler's container budget, then runs the opcode."""
    original = pickle._Unpickler.dispatch[opcode[0]]

    def load(self: Any) -> None:
        self._budget -= 1
        if self._budget < 0:
            raise BadCheckpointError(
                f"{self._path}: the pickle builds more objects than a checkpoint of its size "
                f"holds (more than one per {_BYTES_PER_CONTAINER} bytes); the file is crafted "
                "or not a checkpoint"
            )
        original(self)

    return load


# The pure-Python unpickler: the C one grows its memo to the largest index a
# PUT opcode names, so a few crafted bytes ('r' + 4-byte index) make it
# allocate gigabytes; this one keeps the memo in a dict.
class RestrictedUnpickler(pickle._Unpickler):
    """Unpickles tensors (as :class:`TensorRef`) and plain data; refuses every other global."""

    dispatch: ClassVar[dict[int, Callable[..., Any]]] = {
        **pickle._Unpickler.dispatch,
        **{op[0]: _load_counting(op) for op in _BUILDING},
        pickle.SETITEM[0]: _load_checking(pickle.SETITEM, lambda stack: stack[-2:-1]),
        pickle.SETITEMS[0]: _load_checking(pickle.SETITEMS, lambda stack: stack[0::2]),
        pickle.ADDITEMS[0]: _load_checking(pickle.ADDITEMS, lambda stack: stack),
        pickle.FROZENSET[0]: _load_checking(pickle.FROZENSET, lambda stack: stack),
    }

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path
        self._budget = len(data) // _BYTES_PER_CONTAINER + _CONTAINER_SLACK

    def find_class(self, module: str, name: str, /) -> Any:
        found = allowed_global(module, name)
        if found is None:
            shown = "builtins" if module == "__builtin__" else module  # protocol 2 spelling
            raise UnsafeCheckpointError(
                f"{self._path}: the pickle asks for '{shown}.{name}', which is not a tensor "
                f"or plain data; loading it would run code from the file. "
                f"{_MODULE_ADVICE if _is_model_class(module, name) else ''}{TRUST_ADVICE}"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], StorageType)
            and isinstance(pid[2], (str, int))
            and not isinstance(pid[2], bool)
        ):
            return StorageRef(str(pid[2]), pid[1].dtype)
        raise BadCheckpointError(
            f"{self._path}: the pickle refers to {short_repr(pid)}, which is not a tensor "
            "storage; the file was not written by torch.save"
        )


# A model class (torch.nn's, or a repository's models/ package as YOLOv5/v6/v7 have): the
# file holds a whole pickled nn.Module, as YOLO training scripts save {'model': model, ...}.
_MODEL_MODULE = re.compile(r"torch\.nn(\..*)?|(.*\.)?models?(\..*)?|yolov\d.*|ultralytics(\..*)?")
_MODULE_ADVICE = (
    "It looks like a pickled nn.Module (YOLOv7's and YOLOv6's training scripts save the whole "
    "model): load it with the model's own code and save model.state_dict() first, e.g. "
    "torch.save(torch.load(f, weights_only=False)['model'].float().state_dict(), 'state.pt'). "
)


def _is_model_class(module: str, name: str) -> bool:
    return name[:1].isupper() and _MODEL_MODULE.fullmatch(module) is not None


def unpickle(data: bytes, path: Path) -> Any:
    """Unpickle ``data`` (the archive's data.pkl) with :class:`RestrictedUnpickler`.

    Raises:
        UnsafeCheckpointError: the pickle names something that is not allowed.
        BadCheckpointError: the pickle is damaged.
    """
    try:
        return RestrictedUnpickler(data, path).load()
    except ACNetConvertError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways
        raise BadCheckpointError(
            f"{path}: the pickle in the archive is corrupt ({type(err).__name__}: "
            f"{str(err)[:120]}); save the checkpoint again"
        ) from err
