"""Finding the state dict inside what a training script saved.

Handles a raw state dict, ``{'model': sd, ...}`` (upstream ACNet's engine),
``{'state_dict': sd, ...}``, and the ``module.`` (DataParallel/DDP) and
``_orig_mod.`` (torch.compile) prefixes, in any combination.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from acnet_convert.errors import BadCheckpointError

from .base import Container

__all__ = ["WRAPPER_KEYS", "bare_name", "is_plain_data", "strip_prefix", "unwrap"]

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "_orig_mod.")
# Entries that describe training-time parameters by position; meaningless after fusing.
_TRAINING_STATE = re.compile(r"optim|sched|scaler|ema|swa", re.IGNORECASE)


# Plain data is written out in full (pickle, JSON): a structure that shares
# sub-structures many times would expand exponentially, so it counts as
# its expanded size, and above this many nodes it is not plain data.
_MAX_PLAIN_NODES = 100_000
_MAX_PLAIN_DEPTH = 32


def is_plain_data(value: Any, depth: int = 0) -> bool:
    """True for None/bool/int/float/str and lists, tuples and str-keyed dicts of them.

    Linear in the number of distinct objects, however often they are shared;
    cycles, nesting deeper than 32 and structures that expand to more than
    100,000 nodes are not plain data.
    """
    return _expanded_size(value, depth, {}, set()) is not None


def _expanded_size(value: Any, depth: int, sizes: dict[int, int], active: set[int]) -> int | None:
    if value is None or isinstance(value, (bool, int, float, str)):
        return 1
    if depth > _MAX_PLAIN_DEPTH or not isinstance(value, (list, tuple, dict)):
        return None
    key = id(value)
    if key in sizes:
        return sizes[key]
    if key in active:
        return None  # a cycle
    active.add(key)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return None
        children: Any = value.values()
    else:
        children = value
    total = 1
    for child in children:
        size = _expanded_size(child, depth + 1, sizes, active)
        if size is None:
            return None
        total += size
        if total > _MAX_PLAIN_NODES:
            return None
    active.discard(key)
    sizes[key] = total
    return total


def bare_name(name: str, prefixes: tuple[str, ...] = _PREFIXES) -> str:
    """``name`` without any run of wrapper prefixes (``module.``, ``_orig_mod.``) in front.

    >>> bare_name("module._orig_mod.conv.weight")
    'conv.weight'
    """
    while name.startswith(prefixes):
        name = name[len(next(p for p in prefixes if name.startswith(p))) :]
    return name


def strip_prefix(names: list[str], path: Path) -> tuple[str, list[str]]:
    """Remove the ``module.``/``_orig_mod.`` prefixes shared by every name.

    Returns the stripped prefix and the new names; refuses a checkpoint whose
    names collide once stripped.
    """
    prefix = ""
    current = names
    changed = True
    while changed and current:
        changed = False
        for p in _PREFIXES:
            if all(n.startswith(p) for n in current):
                prefix += p
                current = [n[len(p) :] for n in current]
                changed = True
    # Prefixes on only some names: refuse when removing them makes two names
    # equal ('module.conv.weight' next to 'conv.weight'), or both copies would
    # be fused and written side by side.
    first: dict[str, str] = {}
    for name in current:
        bare = bare_name(name)
        if bare in first:
            raise BadCheckpointError(
                f"{path}: key '{bare}' appears twice once the {'/'.join(map(repr, _PREFIXES))} "
                f"prefixes are removed ('{prefix}{first[bare]}' and '{prefix}{name}'); the "
                "checkpoint mixes wrapped and unwrapped copies of the weights: keep one copy"
            )
        first[bare] = name
    return prefix, current


def unwrap(
    obj: Any, path: Path, is_tensor: Callable[[Any], bool]
) -> tuple[dict[str, Any], Container]:
    """Find the state dict in a loaded .pth object.

    Args:
        obj: what the pickle held.
        path: the file, for messages.
        is_tensor: tells the reader's tensor objects apart from other values.

    Returns:
        The state dict (names stripped of prefixes, file order) and a
        :class:`Container` describing the rest.

    Raises:
        BadCheckpointError: not a dict, no tensors, or non-tensor values
            inside the state dict.
    """
    if not isinstance(obj, Mapping):
        raise BadCheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
            "save the model's state_dict() instead of the model object"
        )
    wrapper = None
    top_keys = [k for k in obj if isinstance(k, str)]
    if not any(is_tensor(v) for v in obj.values()):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            raise BadCheckpointError(
                f"{path}: no tensors at the top level and none under "
                f"{', '.join(repr(k) for k in WRAPPER_KEYS)}; "
                "is this a training checkpoint? Try 'acnet-convert inspect'"
            )
    sd: Mapping[Any, Any] = obj[wrapper] if wrapper is not None else obj
    names: list[str] = []
    values: list[Any] = []
    for key, value in sd.items():
        if not isinstance(key, str):
            raise BadCheckpointError(f"{path}: state dict key {key!r} is not a string")
        if not is_tensor(value):
            raise BadCheckpointError(
                f"{path}: state dict entry '{key}' is a {type(value).__name__}, not a tensor"
            )
        names.append(key)
        values.append(value)
    if not names:
        raise BadCheckpointError(f"{path}: the state dict is empty")
    prefix, stripped = strip_prefix(names, path)
    extras: dict[str, Any] = {}
    dropped: list[str] = []
    if wrapper is not None:
        for key in top_keys:
            if key == wrapper:
                continue
            if is_plain_data(obj[key]) and not _TRAINING_STATE.search(key):
                extras[key] = obj[key]
            else:
                dropped.append(key)
    container = Container(
        wrapper_key=wrapper,
        prefix=prefix,
        extras=extras,
        dropped=tuple(dropped),
        keys_order=tuple(top_keys) if wrapper is not None else (),
    )
    return dict(zip(stripped, values, strict=True)), container
