"""Reading Keras 3 weights: ``model.save_weights('x.weights.h5')`` and ``.keras`` archives.

Keras 3 (``keras/src/saving/saving_lib.py``) stores each layer's variables in
an HDF5 group ``<path>/vars``, as datasets ``0``, ``1``, ... in the layer's
variable order. ``<path>`` follows the model's attributes; the layers of a
Functional or Sequential model are ``layers/<class>``, where ``<class>`` is
the layer's class name in snake case with ``_1``, ``_2``, ... for repeats
(``layers/conv2d``, ``layers/conv2d_1``, ``layers/batch_normalization``).
A ``.keras`` file is a zip archive holding ``config.json`` (the model
configuration), ``metadata.json`` and ``model.weights.h5``.

The layer names (which the dialects need: ``<n>_sqr``, ``<n>_bn``) are only in
the configuration, so a ``.keras`` file is read with names in the Keras 2
style, ``<layer>/<layer>/<variable>:0`` (``conv1_sqr/conv1_sqr/kernel:0``),
variables named by the layer's class (a BatchNormalization's by its
``scale``/``center``), and each BN's epsilon is taken from the config. A bare
``.weights.h5`` has no configuration: its tensors keep their storage paths
(``layers/conv2d/vars/0``), which no dialect can tell apart; fuse the
``.keras`` file instead. The output of ``fuse`` is a Keras 2 style weight file
(or any other format), which Keras 3 loads with ``load_weights`` too.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np

from acnet_convert.errors import BadCheckpointError

from .base import (
    CheckpointReader,
    Container,
    RawBytes,
    TensorInfo,
    open_regular,
    require_regular_file,
)
from .h5_attrs import _H5_ERRORS, _reason
from .h5_datasets import check_dataset, read_dataset
from .keras_config import bn_epsilons, bn_layers
from .keras_h5 import _hard_get

__all__ = ["Keras3Reader", "is_keras3_weights", "snake_case"]

_WEIGHTS = "model.weights.h5"
_CONFIG = "config.json"
_MAX_CONFIG_BYTES = 64 << 20
# Variable names by layer class, in the order Keras 3 creates them (bias only with use_bias).
_CONV_LIKE = ("Conv1D", "Conv2D", "Conv3D", "Dense", "Conv2DTranspose", "Conv1DTranspose")
_BN = ("BatchNormalization", "SyncBatchNormalization")


def is_keras3_weights(path: Path) -> bool:
    """Is ``path`` HDF5 in Keras 3's layout (``layers/.../vars``, no Keras 2 ``layer_names``)?"""
    try:
        with h5py.File(path, "r") as f:
            return _is_keras3_root(f)
    except _H5_ERRORS:
        return False


def _is_keras3_root(f: h5py.File) -> bool:
    if "layer_names" in f.attrs or "layer_names0" in f.attrs or "model_weights" in f:
        return False
    return isinstance(f.get("layers", getlink=True), h5py.HardLink) and isinstance(
        f["layers"], h5py.Group
    )


def snake_case(name: str) -> str:
    """A class name as Keras 3 names its group: ``BatchNormalization`` -> ``batch_normalization``.

    >>> [snake_case(n) for n in ("Conv2D", "BatchNormalization", "DepthwiseConv2D")]
    ['conv2d', 'batch_normalization', 'depthwise_conv2d']
    """
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _var_names(class_name: str, config: Mapping[str, Any], count: int) -> list[str]:
    if class_name in _CONV_LIKE:
        names = ["kernel", "bias"]
    elif class_name == "DepthwiseConv2D":
        names = ["depthwise_kernel", "bias"]
    elif class_name in _BN:
        names = [
            *(["gamma"] if config.get("scale", True) is not False else []),
            *(["beta"] if config.get("center", True) is not False else []),
            "moving_mean",
            "moving_variance",
        ]
    else:
        names = []
    if len(names) < count or (class_name in _BN and len(names) != count):
        return [f"var{i}" for i in range(count)]
    return names[:count]


def _direct_layers(config: Any) -> list[Any]:
    """The layer entries a (Functional/Sequential) model config lists itself."""
    inner = config.get("config", config) if isinstance(config, Mapping) else config
    layers = inner.get("layers") if isinstance(inner, Mapping) else inner
    return layers if isinstance(layers, list) else []


def _layer_groups(
    config: Any, base: str = "", depth: int = 0
) -> Iterator[tuple[str, str, str, Mapping[str, Any]]]:
    """(group path, layer name, class name, layer config) for the config's layers, nested too."""
    used: dict[str, int] = {}
    for layer in _direct_layers(config):
        if not isinstance(layer, Mapping):
            continue
        class_name, inner = layer.get("class_name"), layer.get("config")
        if not isinstance(class_name, str) or not isinstance(inner, Mapping):
            continue
        snake = snake_case(class_name)
        seen = used.get(snake)
        used[snake] = 0 if seen is None else seen + 1
        group = f"{base}layers/{snake}" + ("" if seen is None else f"_{seen + 1}")
        name = inner.get("name")
        if isinstance(name, str):
            yield group, name, class_name, inner
        if depth < 8 and _direct_layers(layer):
            yield from _layer_groups(layer, f"{group}/", depth + 1)


class Keras3Reader(CheckpointReader):
    """A Keras 3 ``.weights.h5`` or ``.keras`` archive (see the module docstring).

    Raises:
        BadCheckpointError: unreadable, corrupt or not in Keras 3's layout.
    """

    format = "hdf5"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.flavour = "keras"  # written back as a Keras 2 style weight file
        self.bn_epsilons: dict[str, float] = {}
        self._paths: dict[str, str] = {}
        self._zip: zipfile.ZipFile | None = None
        self._member: IO[bytes] | None = None
        self._file: h5py.File | None = None
        self._handle: IO[bytes] | None = None
        try:
            config = self._open()
            assert self._file is not None
            self._index(self._file, config)
        except BadCheckpointError:
            self.close()
            raise
        except (*_H5_ERRORS, zipfile.BadZipFile, json.JSONDecodeError) as err:
            self.close()
            raise BadCheckpointError(
                f"{path}: cannot be read as Keras 3 weights ({_reason(err)}); "
                "the file is truncated or corrupt"
            ) from err

    @property
    def layout(self) -> str:
        """The old name of :attr:`flavour`."""
        return self.flavour

    def _open(self) -> Any:
        size = require_regular_file(self.path)
        self._handle = open_regular(self.path)
        if not zipfile.is_zipfile(self._handle):
            self._file = h5py.File(self.path, "r")
            self._size = size
            return None
        self._zip = zipfile.ZipFile(self._handle)
        info = self._zip.getinfo(_CONFIG)
        if info.file_size > _MAX_CONFIG_BYTES:
            raise BadCheckpointError(f"{self.path}: config.json is {info.file_size} bytes")
        config = json.loads(self._zip.read(_CONFIG))
        self._size = self._zip.getinfo(_WEIGHTS).file_size
        self._member = self._zip.open(_WEIGHTS)
        self._file = h5py.File(self._member, "r")
        return config

    def _index(self, root: h5py.File, config: Any) -> None:
        if not _is_keras3_root(root):
            raise BadCheckpointError(
                f"{self.path}: the weights are not in Keras 3's layout (no 'layers' group)"
            )
        named = {g: (n, c, cfg) for g, n, c, cfg in _layer_groups(config)} if config else {}
        dropped = sorted(k for k in root if k not in ("layers", "vars"))
        for group_path, group in _vars_groups(root["layers"], "layers", self.path):
            count = len(group)
            if sorted(group) != [str(i) for i in range(count)]:
                raise BadCheckpointError(
                    f"{self.path}: '{group.name}' holds {sorted(group)[:5]}, not datasets 0..n-1"
                )
            layer = named.get(group_path)
            names = _var_names(layer[1], layer[2], count) if layer else []
            for i in range(count):
                dataset = _hard_get(group, str(i), self.path)
                if not isinstance(dataset, h5py.Dataset):
                    raise BadCheckpointError(f"{self.path}: '{group.name}/{i}' is not a dataset")
                key = f"{layer[0]}/{layer[0]}/{names[i]}:0" if layer else f"{group_path}/vars/{i}"
                dtype, shape = check_dataset(dataset, key, self._size, self.path)
                if key in self.tensors:
                    raise BadCheckpointError(f"{self.path}: two layers give the tensor '{key}'")
                self.tensors[key] = TensorInfo(key, dtype, shape)
                self._paths[key] = dataset.name
        if not self.tensors:
            raise BadCheckpointError(f"{self.path}: the Keras 3 weights hold no variables")
        self.container = Container(dropped=tuple(dropped))
        if config:
            self.bn_epsilons = bn_epsilons(bn_layers(json.dumps(config)), list(self.tensors))

    def read(self, name: str) -> np.ndarray:
        return read_dataset(self._file, self._paths[name], self.tensors[name], self.path)

    def raw(self, name: str) -> RawBytes | None:
        return None

    def close(self) -> None:
        for handle in (self._file, self._member, self._zip, self._handle):
            if handle is not None:
                handle.close()
        self._file = self._member = self._zip = self._handle = None


def _vars_groups(group: h5py.Group, base: str, file: Path) -> Iterator[tuple[str, h5py.Group]]:
    """(path, vars group) for every group under ``group`` that holds variables, depth first.

    Every name is resolved through hard links only (:func:`keras_h5._hard_get`): a soft or
    external link could alias, loop or open another file.
    """
    for key in group:
        link = group.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise BadCheckpointError(f"'{base}/{key}' is a link; refusing to follow links")
        child = group[key]
        if not isinstance(child, h5py.Group):
            continue
        path = f"{base}/{key}"
        inner = _hard_get(child, "vars", file)
        if isinstance(inner, h5py.Group) and len(inner):
            yield path, inner
        layers = _hard_get(child, "layers", file)
        if isinstance(layers, h5py.Group):
            yield from _vars_groups(layers, f"{path}/layers", file)
