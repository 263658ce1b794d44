"""Reading and writing HDF5 checkpoints: upstream ACNet's flat files and Keras weight files.

Two flavours are recognised from the file itself:

``flat``
    Upstream ACNet (``utils/misc.py`` ``save_hdf5``/``read_hdf5``): one dataset
    per state-dict key at the root, ``/`` in a key stored as ``+``. Keys may
    look like integers, and a ``deps`` dataset (channel widths) travels with
    the weights; both are ordinary keys here.
``keras``
    Keras 2 ``model.save_weights('x.h5')`` (the weights at the root) or a
    full-model ``model.save('x.h5')`` (the weights under ``model_weights``):
    one group per layer listed in the ``layer_names`` attribute, each listing
    its datasets in a ``weight_names`` attribute, e.g. dataset
    ``conv1_sqr/conv1_sqr/kernel:0``. A tensor's name is that path inside the
    weights group.

HDF5 has no bfloat16: such tensors are stored as uint16 bit patterns with the
dataset attribute ``dtype = "bfloat16"``, and read back as bfloat16.

Everything a dataset declares (type, shape, where its bytes are) is checked on
open, before anything is read, so a crafted file cannot make us allocate far
more memory than its own size or read outside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import BadCheckpointError, UsageError

from .base import (
    CheckpointReader,
    Container,
    RawBytes,
    TensorInfo,
    check_produced,
    check_raw,
    require_regular_file,
)
from .containers import strip_prefix
from .h5_attrs import _H5_ERRORS, _reason, _string_attrs
from .h5_datasets import BF16_ATTR, check_dataset, read_dataset
from .keras_config import bn_epsilons, bn_layers
from .keras_h5 import (
    KerasAttrs,
    _check_keras_listing,
    _keras_weights_group,
    _read_keras_attrs,
    replace_keras_layers,
    write_keras_layout,
)
from .rawio import copy_range, read_range

__all__ = [
    "BF16_ATTR",
    "FLAVOURS",
    "LAYOUTS",
    "Hdf5Reader",
    "KerasAttrs",
    "replace_keras_layers",
    "write_hdf5",
]

FLAVOURS = ("flat", "keras")
LAYOUTS = FLAVOURS  # the old name of FLAVOURS


class Hdf5Reader(CheckpointReader):
    """An open HDF5 checkpoint (upstream ACNet's flat flavour or Keras weights).

    After opening, ``flavour`` (also readable as ``layout``) is ``"flat"`` or
    ``"keras"``; for Keras files ``keras_attrs`` holds the layer bookkeeping a writer needs, and
    ``container.dropped`` names top-level groups that were not read
    (``optimizer_weights``).

    Example:
        >>> with Hdf5Reader(Path("train.hdf5")) as reader:  # doctest: +SKIP
        ...     deps = reader.read("deps")

    Raises:
        BadCheckpointError: unreadable, truncated or corrupt file; a flavour that
            is neither of the two; a dataset that is not a plain numeric array,
            is a link, or declares more data than the file can hold.
    """

    format = "hdf5"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.flavour = "flat"
        self.keras_attrs: KerasAttrs | None = None
        # A Keras full-model file's BN epsilons, keyed by moving-mean tensor (see keras_config).
        self.bn_epsilons: dict[str, float] = {}
        self._paths: dict[str, str] = {}
        self._fd: int | None = None  # for raw(): a copy of the HDF5 library's own descriptor
        file_size = require_regular_file(path)
        try:
            self._file: h5py.File | None = h5py.File(path, "r")
        except _H5_ERRORS as err:
            raise BadCheckpointError(
                f"{path}: cannot be opened as HDF5 ({_reason(err)}); "
                "the file is truncated, corrupt or not HDF5"
            ) from err
        try:
            self._index(self._file, file_size)
        except BadCheckpointError:
            self.close()
            raise
        except _H5_ERRORS as err:
            self.close()
            raise BadCheckpointError(
                f"{path}: HDF5 structure cannot be read ({_reason(err)}); the file is corrupt"
            ) from err

    def _index(self, root: h5py.File, file_size: int) -> None:
        """Detect the flavour and check every dataset, reading no tensor data."""
        self.metadata = _string_attrs(root, self.path)
        weights = _keras_weights_group(root)
        dropped: tuple[str, ...] = ()
        if weights is not None:
            self.flavour = "keras"
            self.keras_attrs = _read_keras_attrs(weights, self.path)
            if weights is not root:
                dropped = tuple(k for k in root if k != self.keras_attrs.weights_group)
        found: list[tuple[str, str, str, tuple[int, ...]]] = []
        for rel, dataset in _walk(weights or root, "", self.path, nested=weights is not None):
            key = rel if self.flavour == "keras" else rel.replace("+", "/")
            dtype, shape = check_dataset(dataset, key, file_size, self.path)
            found.append((key, dataset.name, dtype, shape))
        if not found:
            raise BadCheckpointError(f"{self.path}: the HDF5 file holds no datasets")
        if self.keras_attrs is not None:
            _check_keras_listing(self.keras_attrs, {key for key, *_ in found}, self.path)
        prefix, names = strip_prefix([key for key, *_ in found], self.path)
        self.container = Container(prefix=prefix, dropped=dropped)
        for name, (_, h5_path, dtype, shape) in zip(names, found, strict=True):
            self.tensors[name] = TensorInfo(name=name, dtype=dtype, shape=shape)
            self._paths[name] = h5_path
        if self.keras_attrs is not None and "model_config" in self.metadata:
            layers = bn_layers(self.metadata["model_config"])
            self.bn_epsilons = bn_epsilons(layers, list(self.tensors))

    def __enter__(self) -> Hdf5Reader:
        return self

    @property
    def layout(self) -> str:
        """The old name of :attr:`flavour`."""
        return self.flavour

    def writer_state(self, replaced: Mapping[str, str]) -> KerasAttrs | None:
        """The Keras layer list with each replaced key's layer followed by its new layer's."""
        if self.keras_attrs is None:
            return None
        layers = {
            old.split("/", 1)[0]: new.split("/", 1)[0]
            for old, new in replaced.items()
            if "/" in old and "/" in new
        }
        return replace_keras_layers(self.keras_attrs, layers)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new C-contiguous array of its storage dtype.

        Big-endian data is converted to little-endian; bfloat16 comes back as
        uint16 bit patterns.

        Raises:
            BadCheckpointError: the data cannot be read (corrupt file).
            KeyError: no tensor of that name (a caller bug).
        """
        return read_dataset(self._file, self._paths[name], self.tensors[name], self.path)

    def raw(self, name: str) -> RawBytes | None:
        """Where a dataset's bytes lie, for contiguous little-endian storage in this file.

        HDF5 then keeps the elements exactly as numpy would, in one run of
        bytes; a dataset with chunked, compact or unallocated storage, a
        big-endian or non-IEEE element type gets None.
        """
        info = self.tensors[name]
        if info.numel == 0 or self._file is None:
            return None
        try:
            # The low-level open: a third of the cost of building an h5py.Dataset.
            dsid = h5py.h5d.open(self._file.id, self._paths[name].encode("utf-8"))
            if dsid.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
                return None
            offset = dsid.get_offset()
            stored = dsid.get_type()
            native = h5py.h5t.py_create(dtypes.numpy_dtype(info.dtype))
            if offset is None or not stored.equal(native) or dsid.get_storage_size() != info.nbytes:
                return None
            if self._fd is None:
                self._fd = os.dup(self._file.id.get_vfd_handle())
        except _H5_ERRORS:
            return None  # read() reports what is wrong with the dataset
        return RawBytes(self._fd, offset, info.nbytes)

    def close(self) -> None:
        """Close the HDF5 file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._file.close()
            self._file = None


class _OwnDescriptor:
    """A write descriptor of a file h5py has open, opened on first use."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_WRONLY)
        return self._fd

    def __enter__(self) -> _OwnDescriptor:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _walk(
    group: h5py.Group, base: str, path: Path, *, nested: bool
) -> Iterator[tuple[str, h5py.Dataset]]:
    """Datasets under ``group`` in h5py's order, depth first, refusing links and odd objects.

    ``nested`` is False for the flat flavour, where a group means the file is
    something else.
    """
    for key in group:
        rel = f"{base}{key}"
        link = group.get(key, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            # An external link would make us open another file; a soft link
            # can alias or loop. Real checkpoints use neither.
            raise BadCheckpointError(
                f"{path}: '{rel}' is a {type(link).__name__}, not a dataset; "
                "refusing to follow links in a checkpoint"
            )
        obj = group[key]
        if isinstance(obj, h5py.Dataset):
            yield rel, obj
        elif isinstance(obj, h5py.Group) and nested:
            yield from _walk(obj, f"{rel}/", path, nested=True)
        elif isinstance(obj, h5py.Group):
            raise BadCheckpointError(
                f"{path}: HDF5 layout not recognised: '{rel}' is a group and there is no "
                "Keras 'layer_names' attribute. Supported are upstream ACNet's flat "
                "datasets and Keras 2 weight files (model.save_weights('x.h5') or "
                "model.save('x.h5'))"
            )
        else:
            raise BadCheckpointError(
                f"{path}: '{rel}' is a {type(obj).__name__}, not a dataset or group; "
                "a checkpoint holds only numeric datasets"
            )


def _check_names(full_names: Sequence[str], flavour: str) -> None:
    """Refuse names the flavour cannot store faithfully (they come from user checkpoints)."""
    if len(set(full_names)) != len(full_names):
        raise ValueError("tensor names are not unique")
    for full in full_names:
        if flavour == "flat" and "+" in full:
            raise UsageError(
                f"key '{full}' contains '+', which upstream ACNet's flat HDF5 files use for '/'; "
                "write safetensors or .pth instead"
            )
        parts = [full] if flavour == "flat" else full.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise UsageError(
                f"key '{full}' cannot be an HDF5 dataset name (empty or '.' path parts); "
                "write safetensors or .pth instead"
            )
    if flavour == "keras":
        # 'a/b' and 'a/b/c' would need 'a/b' to be a dataset and a group at once.
        known = set(full_names)
        for longer in full_names:
            parts = longer.split("/")
            for cut in range(1, len(parts)):
                shorter = "/".join(parts[:cut])
                if shorter in known:
                    raise UsageError(
                        f"keys '{shorter}' and '{longer}' cannot both be stored in a Keras "
                        f"HDF5 file ('{shorter}' would be a dataset and a group); "
                        "write safetensors or .pth instead"
                    )


# Raw bytes at least this large are copied into early-allocated storage by
# the kernel; smaller ones are read and written through h5py like any array.
_RAW_COPY_MIN = 1 << 16


def _copy_into_dataset(
    group: h5py.Group, name: str, info: TensorInfo, raw: RawBytes, fd: int
) -> h5py.Dataset:
    """A contiguous dataset whose storage HDF5 allocates at once and never fills; the
    bytes go straight from ``raw`` to that storage, which HDF5 itself then never writes."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dataset = group.create_dataset(
        name, shape=info.shape, dtype=dtypes.numpy_dtype(info.dtype), dcpl=dcpl, fill_time="never"
    )
    offset = dataset.id.get_offset()
    if offset is None or dataset.id.get_storage_size() != raw.length:
        raise RuntimeError(f"HDF5 did not allocate contiguous storage for '{name}'")
    copy_range(raw, fd, offset)
    return dataset


def write_hdf5(
    path: Path,
    tensors: Sequence[TensorInfo],
    produce: Callable[[str], np.ndarray | RawBytes],
    metadata: dict[str, str],
    *,
    flavour: str = "flat",
    prefix: str = "",
    keras_attrs: KerasAttrs | None = None,
) -> None:
    """Write an HDF5 checkpoint, one tensor in memory at a time.

    ``produce(name)`` is called once per tensor, in order, and its array is
    written uncompressed before the next is requested. :class:`RawBytes` it
    returns are copied file to file into the dataset's storage.

    Args:
        path: where to write (overwritten in place; wrap in
            :func:`acnet_convert.atomic.atomic_output` for all-or-nothing output).
        tensors: names (unprefixed), canonical dtypes and shapes, in order.
        produce: returns the tensor's elements in its storage dtype
            (bfloat16 as uint16 bit patterns; stored with ``dtype="bfloat16"``),
            or :class:`RawBytes` holding exactly those elements.
        metadata: written as string attributes of the root.
        flavour: ``"flat"`` (upstream ACNet: ``/`` in names stored as ``+``) or
            ``"keras"`` (a tensor ``layer/weight/path`` is dataset
            ``weight/path`` of layer group ``layer``, listed in the
            ``layer_names`` and ``weight_names`` attributes).
        prefix: put back in front of every name.
        keras_attrs: the source file's Keras bookkeeping, to keep its layer
            order, layers without weights, ``model_weights`` nesting and
            version attributes; None for a fresh file.

    Raises:
        UsageError: a name the flavour cannot store (``+`` in a flat-flavour
            key, empty path parts).
        ValueError: an unknown flavour, duplicate names, or a produced array
            that does not match its :class:`TensorInfo` (caller bugs).

    Example:
        >>> write_hdf5(Path("out.hdf5"), [TensorInfo("deps", "int64", (3,))],
        ...            lambda n: np.array([16, 32, 64]), {})  # doctest: +SKIP
    """
    if flavour not in FLAVOURS:
        raise ValueError(
            f"unknown HDF5 flavour '{flavour}' (the layout of its groups); expected one of {FLAVOURS}"
        )
    full_names = [prefix + info.name for info in tensors]
    _check_names(full_names, flavour)
    with h5py.File(path, "w") as handle, _OwnDescriptor(path) as raw_fd:
        for key, value in metadata.items():
            handle.attrs[key] = value
        group: h5py.Group = handle
        if flavour == "keras":
            group = write_keras_layout(handle, keras_attrs or KerasAttrs(), full_names)
        for info, full in zip(tensors, full_names, strict=True):
            produced = produce(info.name)
            name = full.replace("/", "+") if flavour == "flat" else full
            if isinstance(produced, RawBytes):
                check_raw(info, produced)
                if produced.length >= _RAW_COPY_MIN:
                    dataset = _copy_into_dataset(group, name, info, produced, raw_fd.fd)
                else:
                    stored = dtypes.numpy_dtype(info.dtype)
                    array = np.frombuffer(read_range(produced), dtype=stored).reshape(info.shape)
                    dataset = group.create_dataset(name, data=array)
            else:
                dataset = group.create_dataset(name, data=check_produced(info, produced))
            if info.dtype == "bfloat16":
                dataset.attrs[BF16_ATTR] = "bfloat16"
