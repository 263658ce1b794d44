"""Output layouts: how a fused block is named and stored in FUSED.

A layout maps a planned block to its output keys (with the role each
plays), encodes the fused kernel and bias as those tensors, decodes them
back into a kernel and bias for ``verify``, and is recognised from a
model's or a file's keys (:func:`planned_layouts`, :func:`closest_layout`).

``deploy``
    the family's own deploy keys (``<p>.fused_conv.{weight,bias}``).
``baseline``
    the plain network's ``<u>.conv.weight`` plus an identity BN ``<u>.bn.*``
    whose bias is the fused bias (``running_var = 1 - eps``, so the BN adds
    the bias exactly).
``baseline-bias``
    ``<u>.conv.{weight,bias}``.

No torch here: ``fuse`` and ``inspect`` use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from acnet_convert import dtypes
from acnet_convert.errors import ACNetConvertError, UnfusableBlockError, UsageError
from acnet_convert.fusion import BNStats, fold_bn
from acnet_convert.naming import BlockSpec

__all__ = [
    "LAYOUTS",
    "Layout",
    "closest_layout",
    "get_layout",
    "identity_var",
    "planned_layouts",
    "required_keys",
]

LAYOUTS = ("deploy", "baseline", "baseline-bias")

Outputs = tuple[tuple[str, str], ...]  # (output key, role)


class _HasOutputs(Protocol):
    @property
    def outputs(self) -> Outputs: ...


class _HasBlocks(Protocol):
    @property
    def blocks(self) -> Sequence[_HasOutputs]: ...


P = TypeVar("P", bound=_HasBlocks)


def identity_var(eps: float, dtype: str, channels: int) -> np.ndarray:
    """An identity BN's running_var (in ``dtype``): v + eps as close to 1 as that dtype allows."""
    return np.repeat(dtypes.from_float64(np.array([1.0 - eps]), dtype), channels)


def _unit_prefix(spec: BlockSpec) -> str:
    """The baseline unit ``<u>.`` of a block at ``<u>.acb.`` or directly at ``<u>.``."""
    p = spec.fields.get("p")
    if p is None:
        raise UsageError(
            f"block '{spec.label}' uses the '{spec.dialect}' dialect, which has no baseline layout; "
            "use --layout deploy, optionally with --rename"
        )
    return p[: -len("acb.")] if p.endswith(".acb.") or p == "acb." else p


@dataclass(frozen=True)
class Layout:
    """One output layout (see the module docstring)."""

    name: str

    def outputs(self, spec: BlockSpec) -> Outputs:
        """The block's output keys in this layout, each with its role."""
        if self.name == "deploy":
            return ((spec.fused_weight, "weight"), (spec.fused_bias, "bias"))
        u = _unit_prefix(spec)
        if self.name == "baseline-bias":
            return ((f"{u}conv.weight", "weight"), (f"{u}conv.bias", "bias"))
        return (
            (f"{u}conv.weight", "weight"),
            (f"{u}bn.weight", "bn_weight"),
            (f"{u}bn.bias", "bias"),
            (f"{u}bn.running_mean", "bn_mean"),
            (f"{u}bn.running_var", "bn_var"),
            (f"{u}bn.num_batches_tracked", "bn_count"),
        )

    @staticmethod
    def encode(
        outputs: Outputs,
        weight: np.ndarray | None,
        bias: np.ndarray,
        eps: float,
        dtype: str,
        count: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """The output tensors from the fused kernel (already stored: dtype and kernel order;
        None leaves it out) and the float64 bias; the identity BN's stats where named."""
        channels = bias.shape[0]
        stored = {
            "weight": weight,
            "bias": dtypes.from_float64(bias, dtype),
            "bn_weight": dtypes.from_float64(np.ones(channels), dtype),
            "bn_mean": dtypes.from_float64(np.zeros(channels), dtype),
            "bn_var": identity_var(eps, dtype, channels),
            "bn_count": count if count is not None else np.zeros((), dtype=np.int64),
        }
        return {
            key: np.asarray(stored[role], order="C")
            for key, role in outputs
            if stored[role] is not None
        }

    def decode(self, values: Mapping[str, np.ndarray], eps: float) -> tuple[np.ndarray, np.ndarray]:
        """The fused conv's float64 (kernel, bias) from its float64 tensors by role
        (the baseline's BN folded into the conv as stored, even where it is no identity)."""
        if self.name != "baseline":
            return values["weight"], values["bias"]
        bn = BNStats(values["bn_mean"], values["bn_var"], values["bn_weight"], values["bias"], eps)
        with np.errstate(invalid="ignore", divide="ignore"):
            return fold_bn(values["weight"], None, bn)


_BY_NAME = {name: Layout(name) for name in LAYOUTS}


def get_layout(name: str) -> Layout:
    """The layout called ``name``.

    Raises:
        UsageError: no such layout.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UsageError(f"unknown layout '{name}'; choose one of {', '.join(LAYOUTS)}") from None


def required_keys(plan: _HasBlocks) -> list[str]:
    """Every block output a file in the plan's layout must hold (step counters may be absent)."""
    return [key for block in plan.blocks for key, role in block.outputs if role != "bn_count"]


def planned_layouts(
    plan_with: Callable[[str], P],
    names: Iterable[str] = LAYOUTS,
    refusable: tuple[type[ACNetConvertError], ...] = (UsageError, UnfusableBlockError),
) -> Iterator[tuple[str, P | None, ACNetConvertError | None]]:
    """``(layout, plan, None)`` for each layout that plans, ``(layout, None, why)`` for the others.

    A refusal of ``deploy`` is raised: no block, a bad block or a bad option
    is the same for every layout. Others (a dialect without a baseline unit)
    only rule that layout out.
    """
    for name in names:
        try:
            yield name, plan_with(name), None
        except refusable as err:
            if name == "deploy":
                raise
            yield name, None, err


def closest_layout(
    planned: Iterable[tuple[str, P | None, ACNetConvertError | None]], keys: Mapping[str, object]
) -> tuple[P, str] | None:
    """The first layout whose every required key is in ``keys``, else the one with most of them."""
    best: tuple[int, P, str] | None = None
    for name, plan, _ in planned:
        if plan is None:
            continue
        wanted = required_keys(plan)
        present = sum(k in keys for k in wanted)
        if present == len(wanted):
            return plan, name
        if best is None or present > best[0]:
            best = (present, plan, name)
    return (best[1], best[2]) if best is not None else None
