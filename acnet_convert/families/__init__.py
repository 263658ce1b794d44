"""The registry of block families: one module per family, each a tuple of dialects.

Adding a family is a new module here that defines ``DIALECTS`` (a tuple of
:class:`~acnet_convert.naming.Dialect`, see :mod:`acnet_convert.families.repvgg`
for a short one) and a line in ``_MODULES``; the pipeline (detection, planning,
fusing, checking, inspect, verify) needs no edit. Families whose kernels are
not of a built-in branch kind need a kind in :mod:`acnet_convert.kinds` first.
"""

from __future__ import annotations

from acnet_convert.families import (
    acnet,
    dbb,
    mobileone,
    paddleslim,
    repconv,
    replknet,
    repvgg,
    timm,
)
from acnet_convert.naming import Dialect

__all__ = ["ACNET_DIALECTS", "ALL_DIALECTS", "FAMILIES", "GENERIC", "family_title"]

_MODULES = (acnet, paddleslim, dbb, repvgg, repconv, mobileone, timm, replknet)

ALL_DIALECTS: tuple[Dialect, ...] = tuple(d for m in _MODULES for d in m.DIALECTS)
# ACNet v1's original dialects, in the order they are tried (``dialects.BUILTIN_DIALECTS``)
ACNET_DIALECTS: tuple[Dialect, ...] = acnet.DIALECTS
GENERIC = acnet.GENERIC

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(d.family for d in ALL_DIALECTS))

_TITLES = {
    "acnet": "ACNet",
    "paddleslim": "PaddleSlim ACBlock",
    "dbb": "DBB",
    "repvgg": "RepVGG",
    "repconv": "RepConv (YOLOv7)",
    "mobileone": "MobileOne",
    "timm": "timm ByobNet",
    "replknet": "RepLKNet",
    "conv-bn": "conv+BN",
}


def family_title(family: str) -> str:
    """How people write a family's name ('dbb' -> 'DBB'); a user family keeps its own."""
    return _TITLES.get(family, family)
