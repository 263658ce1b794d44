"""What a Keras model configuration says about its BatchNormalization layers.

A Keras 2 full-model ``.h5`` carries the network's configuration as JSON in the
``model_config`` root attribute; a Keras 3 ``.keras`` archive carries it as
``config.json``. Both list layers as ``{"class_name": ..., "config": {"name":
..., ...}}`` (nested models list their own ``layers``). For a
``BatchNormalization`` the config holds ``epsilon`` (Keras' default 1e-3),
``center`` (whether it has ``beta``) and ``scale`` (whether it has ``gamma``).

No JSON value is evaluated; anything that is not that shape is ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["KerasBN", "bn_epsilons", "bn_layers", "config_layers"]

_BN_CLASSES = frozenset({"BatchNormalization", "SyncBatchNormalization"})
_MAX_DEPTH = 32


@dataclass(frozen=True)
class KerasBN:
    """One BatchNormalization layer as its config declares it."""

    name: str
    epsilon: float
    center: bool = True
    scale: bool = True


def config_layers(config: Any, depth: int = 0) -> Iterator[Mapping[str, Any]]:
    """Every layer entry of a (possibly nested) model config, depth first, in order."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(config, Mapping):
        inner = config.get("config", config)
        layers = inner.get("layers") if isinstance(inner, Mapping) else None
        if layers is None and isinstance(inner, list):  # Keras 2.2 Sequential: a bare list
            layers = inner
    elif isinstance(config, list):
        layers = config
    else:
        return
    if not isinstance(layers, list):
        return
    for layer in layers:
        if not isinstance(layer, Mapping):
            continue
        yield layer
        yield from config_layers(layer, depth + 1)


def bn_layers(config_json: str | bytes) -> dict[str, KerasBN]:
    """The BatchNormalization layers of a model config, by layer name (invalid JSON: none).

    >>> cfg = '{"config": {"layers": [{"class_name": "BatchNormalization",'
    >>> cfg += ' "config": {"name": "c_bn", "epsilon": 1e-05, "center": false}}]}}'
    >>> bn_layers(cfg)["c_bn"]
    KerasBN(name='c_bn', epsilon=1e-05, center=False, scale=True)
    """
    try:
        config = json.loads(config_json)
    except (ValueError, RecursionError):
        return {}
    out: dict[str, KerasBN] = {}
    for layer in config_layers(config):
        inner = layer.get("config")
        if layer.get("class_name") not in _BN_CLASSES or not isinstance(inner, Mapping):
            continue
        name, eps = inner.get("name"), inner.get("epsilon", 1e-3)
        if not isinstance(name, str) or isinstance(eps, bool) or not isinstance(eps, int | float):
            continue
        if not (math.isfinite(eps) and eps >= 0):
            continue
        out[name] = KerasBN(
            name,
            float(eps),
            center=inner.get("center", True) is not False,
            scale=inner.get("scale", True) is not False,
        )
    return out


def bn_epsilons(layers: Mapping[str, KerasBN], tensor_names: list[str]) -> dict[str, float]:
    """Map each BN's moving-mean tensor (``<layer>/<layer>/moving_mean:0``) to its epsilon.

    A tensor belongs to the BN layer named by any of its path components but the last.

    >>> bn_epsilons({"c_bn": KerasBN("c_bn", 1e-5)}, ["c_bn/c_bn/moving_mean:0", "c/c/kernel:0"])
    {'c_bn/c_bn/moving_mean:0': 1e-05}
    """
    out: dict[str, float] = {}
    for key in tensor_names:
        *groups, leaf = key.split("/")
        if not leaf.startswith("moving_mean"):
            continue
        for group in reversed(groups):
            if group in layers:
                out[key] = layers[group].epsilon
                break
    return out
