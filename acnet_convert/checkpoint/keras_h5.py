"""The Keras 2 side of HDF5 checkpoints: layer bookkeeping, name lists and layout.

A Keras weight file lists its layer groups in a ``layer_names`` attribute and
each layer's datasets in a ``weight_names`` attribute; :mod:`.hdf5_io` reads
and writes the tensors, this module the lists.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from acnet_convert.errors import BadCheckpointError

from .h5_attrs import _as_str, _string_attrs

__all__ = ["KerasAttrs", "replace_keras_layers", "write_keras_layout"]

# Keras 2 splits a name-list attribute into name0, name1, ... above this many
# bytes, because HDF5 object headers cannot hold larger attributes.
_KERAS_ATTR_LIMIT = 64512


@dataclass(frozen=True)
class KerasAttrs:
    """What a writer needs to lay out a Keras weight file like the one that was read.

    Attributes:
        weights_group: ``""`` when the weights sit at the root (``save_weights``),
            ``"model_weights"`` for a full-model file.
        layer_names: the ``layer_names`` attribute, in order (layers without
            weights included).
        weight_names: layer -> its ``weight_names`` attribute, in order.
        backend: the weights group's ``backend`` attribute, if any.
        keras_version: the weights group's ``keras_version`` attribute, if any.
    """

    weights_group: str = ""
    layer_names: tuple[str, ...] = ()
    weight_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    backend: str | None = None
    keras_version: str | None = None


def _name_list(obj: h5py.HLObject, name: str, path: Path) -> list[str] | None:
    """A Keras name-list attribute, joining the ``name0``, ``name1``, ... chunks; None if absent."""
    if name in obj.attrs:
        parts = [obj.attrs[name]]
    elif f"{name}0" in obj.attrs:
        parts = []
        while f"{name}{len(parts)}" in obj.attrs:
            parts.append(obj.attrs[f"{name}{len(parts)}"])
    else:
        return None
    names: list[str] = []
    for part in parts:
        for item in np.asarray(part).reshape(-1):
            text = _as_str(item)
            if text is None:
                raise BadCheckpointError(
                    f"{path}: Keras attribute '{name}' of '{obj.name}' holds {item!r}, "
                    "not a name; the file is corrupt"
                )
            names.append(text)
    return names


def _hard_get(group: h5py.Group, name: str, path: Path) -> h5py.HLObject | None:
    """``group[name]`` following hard links only, one path component at a time; None if absent.

    A name comes from the file (Keras ``layer_names``), so it may spell an
    absolute path, or pass through a soft or external link: resolving one
    would open another file (a FIFO would block forever). Never do that.
    """
    obj: h5py.HLObject = group
    for part in name.split("/"):
        if part in ("", "."):
            raise BadCheckpointError(
                f"{path}: name '{name}' listed in '{group.name}' is not a plain relative "
                "path; the file is corrupt or crafted"
            )
        if not isinstance(obj, h5py.Group):
            return None
        link = obj.get(part, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            raise BadCheckpointError(
                f"{path}: '{name}' (listed in '{group.name}') goes through a "
                f"{type(link).__name__}; refusing to follow links in a checkpoint"
            )
        obj = obj[part]
    return obj


def _keras_weights_group(root: h5py.File) -> h5py.Group | None:
    """The group holding Keras layer groups, or None for a non-Keras file."""
    if "layer_names" in root.attrs or "layer_names0" in root.attrs:
        return root
    link = root.get("model_weights", getlink=True)
    if isinstance(link, h5py.HardLink):
        group = root["model_weights"]
        if isinstance(group, h5py.Group) and (
            "layer_names" in group.attrs or "layer_names0" in group.attrs
        ):
            return group
    return None


def _read_keras_attrs(group: h5py.Group, path: Path) -> KerasAttrs:
    layer_names = _name_list(group, "layer_names", path) or []
    weight_names: dict[str, tuple[str, ...]] = {}
    for layer in layer_names:
        layer_group = _hard_get(group, layer, path)
        if not isinstance(layer_group, h5py.Group):
            raise BadCheckpointError(
                f"{path}: Keras layer '{layer}' is listed in 'layer_names' but has no group; "
                "the file is incomplete"
            )
        weight_names[layer] = tuple(_name_list(layer_group, "weight_names", path) or [])
    attrs = _string_attrs(group, path)
    return KerasAttrs(
        weights_group=group.name.lstrip("/"),
        layer_names=tuple(layer_names),
        weight_names=weight_names,
        backend=attrs.get("backend"),
        keras_version=attrs.get("keras_version"),
    )


def _check_keras_listing(attrs: KerasAttrs, datasets: set[str], path: Path) -> None:
    """Every weight a layer lists must exist, or Keras could not load the file either."""
    for layer, names in attrs.weight_names.items():
        for weight in names:
            if f"{layer}/{weight}" not in datasets:
                raise BadCheckpointError(
                    f"{path}: Keras layer '{layer}' lists weight '{weight}' but the file has "
                    "no such dataset; the file is incomplete"
                )


def _encode_names(names: Sequence[str]) -> np.ndarray:
    """A name list as Keras stores it: fixed-length UTF-8 bytes (empty: a float64 [] as Keras)."""
    if not names:
        return np.asarray([], dtype=np.float64)
    return np.asarray([n.encode("utf-8") for n in names])


def _set_name_list(obj: h5py.HLObject, name: str, names: Sequence[str]) -> None:
    """Store a name list as Keras 2 does, split into ``name0``, ``name1``, ... when too large."""
    data = _encode_names(names)
    chunks = 1
    while math.ceil(data.nbytes / chunks) > _KERAS_ATTR_LIMIT and chunks < len(names):
        chunks += 1
    if chunks == 1:
        obj.attrs[name] = data
    else:
        for index, part in enumerate(np.array_split(data, chunks)):
            obj.attrs[f"{name}{index}"] = part


def replace_keras_layers(attrs: KerasAttrs, replaced: Mapping[str, str]) -> KerasAttrs:
    """``attrs`` with layers replaced: ``replaced`` maps an old layer to its new one.

    Keras loads weights by position in ``layer_names``, so each new layer
    takes the place of the first of its old layers; the old layers stay
    listed, and :func:`write_hdf5` drops those left without weights.

    >>> replace_keras_layers(KerasAttrs(layer_names=("in", "c_sqr", "c_hor")),
    ...                      {"c_sqr": "c", "c_hor": "c"}).layer_names
    ('in', 'c', 'c_sqr', 'c_hor')
    """
    layers: list[str] = []
    for layer in attrs.layer_names:
        new = replaced.get(layer)
        if new is not None and new not in layers and new not in attrs.layer_names:
            layers.append(new)
        layers.append(layer)
    return dataclasses.replace(attrs, layer_names=tuple(layers))


def _keras_plan(names: Sequence[str], attrs: KerasAttrs) -> tuple[list[str], dict[str, list[str]]]:
    """layer_names and weight_names for the tensors to be written.

    Layers keep their original order, followed by new ones in tensor order; a
    layer that had weights and now has none (fused away) is dropped, layers
    that never had weights (activations, pooling) stay. Within a layer, known
    weights keep their order and new ones (a fused conv's bias) follow.
    """
    present: dict[str, list[str]] = {}
    for full in names:
        if "/" in full:
            layer, weight = full.split("/", 1)
            present.setdefault(layer, []).append(weight)
    layers = [
        layer
        for layer in attrs.layer_names
        if layer in present or not attrs.weight_names.get(layer)
    ]
    layers += [layer for layer in present if layer not in layers]
    weight_names: dict[str, list[str]] = {}
    for layer in layers:
        new = present.get(layer, [])
        known = [w for w in attrs.weight_names.get(layer, ()) if w in new]
        weight_names[layer] = known + [w for w in new if w not in known]
    return layers, weight_names


def write_keras_layout(
    handle: h5py.File, attrs: KerasAttrs, full_names: Sequence[str]
) -> h5py.Group:
    """Create the weights group, its attributes and the layer groups; return the weights group."""
    group: h5py.Group = handle
    if attrs.weights_group:
        group = handle.create_group(attrs.weights_group)
    layers, weight_names = _keras_plan(full_names, attrs)
    if attrs.backend is not None:
        group.attrs["backend"] = attrs.backend.encode("utf-8")
    if attrs.keras_version is not None:
        group.attrs["keras_version"] = attrs.keras_version.encode("utf-8")
    _set_name_list(group, "layer_names", layers)
    for layer in layers:
        _set_name_list(group.create_group(layer), "weight_names", weight_names[layer])
    return group
