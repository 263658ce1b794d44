"""What ``verify`` found: one :class:`CaseResult` per check, gathered in :class:`VerifyResult`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from acnet_convert.errors import VerificationError
from acnet_convert.fusion import compare_outputs

__all__ = [
    "CaseResult",
    "VerifyResult",
    "raise_for_result",
]

# Cases that list tensors FUSED lacks or holds beyond TRAIN, rather than compare numbers.
LISTING_KINDS = ("missing", "extra")


@dataclass(frozen=True)
class CaseResult:
    """One comparison: the whole network, one block, or the tensors copied unchanged.

    ``allowed`` is ``atol + rtol * ref_max``; ``top1_agreement`` is the share
    of the batch whose arg-max class agrees (classifier outputs only);
    ``within_rounding`` (blocks only) says whether every output lies within
    the error bound that rounding FUSED's weights to their dtype allows.
    ``detail`` names what differs where that is more than the numbers.
    """

    name: str
    kind: str
    passed: bool
    max_abs: float
    max_rel: float
    cosine: float
    ref_max: float
    allowed: float
    top1_agreement: float | None = None
    within_rounding: bool | None = None
    detail: str = ""
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "passed": self.passed,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "cosine": _json_float(self.cosine),
            "ref_max": _json_float(self.ref_max),
            "allowed": _json_float(self.allowed),
            "top1_agreement": _json_float(self.top1_agreement),
            "within_rounding": self.within_rounding,
            "detail": self.detail,
            "seconds": round(self.seconds, 4),
        }

    def numbers(self) -> str:
        """The figures, in one line, for messages and JUnit failures."""
        if self.kind in LISTING_KINDS:  # tensors missing or extra: a list, not numbers
            return self.detail
        verdict = "<=" if self.passed else ">"
        text = (
            f"max_abs {self.max_abs:.3g} {verdict} allowed {self.allowed:.3g} "
            f"(max_rel {self.max_rel:.3g}, cosine {self.cosine:.9f}, max|ref| {self.ref_max:.3g})"
        )
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
        return text + (f"; {self.detail}" if self.detail else "")


def _json_float(value: float | None) -> float | str | None:
    """Finite floats as numbers; inf/nan as the strings 'inf', '-inf', 'nan' (strict JSON)."""
    if value is None:
        return None
    return value if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` found.

    ``cases`` are the main checks: the network's output(s) in the network
    modes, every block and the copied tensors in block mode. ``block_checks``
    (network modes) holds the per-block check run alongside; the verdict
    needs every case and every block check to pass.
    """

    train: str
    fused: str
    mode: str
    arch: str | None
    arch_detected: bool
    model: str | None
    layout: str
    device: str
    dtype: str
    rtol: float
    atol: float
    seed: int
    batch: int
    input: str
    input_shape: tuple[int, ...] | None
    cases: tuple[CaseResult, ...]
    block_checks: tuple[CaseResult, ...] = ()
    notes: tuple[str, ...] = field(default=())
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in (*self.cases, *self.block_checks))

    @property
    def failures(self) -> tuple[CaseResult, ...]:
        """Every failing check, the block checks of a network mode included."""
        return tuple(c for c in (*self.cases, *self.block_checks) if not c.passed)

    @property
    def culprits(self) -> tuple[str, ...]:
        """The names of the blocks (or copied tensors) that differ."""
        return tuple(dict.fromkeys(c.name for c in self.failures if c.kind != "network"))

    def checks(self) -> tuple[CaseResult, ...]:
        """The checks as a report lists them: the cases, then (network modes) one
        summary of the block checks."""
        summary = _summarise_blocks(self.block_checks)
        return (*self.cases, summary) if summary is not None else self.cases

    def failure_message(self) -> str:
        """One line for stderr naming the offending block(s); empty when passed."""
        if self.passed:
            return ""
        where = f"{self.fused} does not compute what {self.train} computes"
        tol = f"atol {self.atol:g} + rtol {self.rtol:g} * max|reference|"
        bad = [c for c in self.failures if c.kind != "network"]
        listing = ", ".join(
            f"{c.detail}" if c.kind in LISTING_KINDS else f"'{c.name}' (max_rel {c.max_rel:.3g})"
            for c in bad
        )
        if self.mode == "blocks":
            numeric = [c for c in bad if c.kind not in LISTING_KINDS]
            fails = f"{len(bad)} of {len(self.cases)} checks fail"
            if numeric:
                fails += f" ({len(numeric)} exceed {tol})"
            return f"{where}: {fails}: {listing}"
        network = [c for c in self.cases if not c.passed]
        if network:
            worst = max(network, key=lambda c: c.max_rel)
            text = (
                f"{where}: the network output differs by {worst.max_abs:.3g} "
                f"(max_rel {worst.max_rel:.3g}), beyond {tol}"
            )
        else:
            worst = max(self.cases, key=lambda c: c.max_rel)
            text = (
                f"{where}: the network output stays within {tol} (max_rel {worst.max_rel:.3g}) "
                "on this batch, but checked on its own"
            )
            return f"{text} a fused block differs: {listing}"
        if bad:
            return f"{text}; checked on its own, the difference lies in {listing}"
        if self.block_checks:
            return (
                f"{text}; every block matches on its own, so the difference builds up across "
                "layers: compare with --dtype float64, or loosen --rtol if this much is expected"
            )
        return f"{text}; see the notes for why the per-block check could not run"

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "report": "acnet-convert verify",
            "version": 1,
            "passed": self.passed,
            "train": self.train,
            "fused": self.fused,
            "mode": self.mode,
            "arch": self.arch,
            "arch_detected": self.arch_detected,
            "model": self.model,
            "layout": self.layout,
            "device": self.device,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "atol": self.atol,
            "seed": self.seed,
            "batch": self.batch,
            "input": self.input,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "cases": [c.as_json() for c in self.cases],
            "block_checks": [c.as_json() for c in self.block_checks],
            "failed": [c.name for c in self.failures],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 4),
        }


def _summarise_blocks(checks: Sequence[CaseResult]) -> CaseResult | None:
    """One line for many block checks: the worst one's figures, and the failing names."""
    if not checks:
        return None
    worst = max(checks, key=lambda c: (not c.passed, c.max_rel))
    failing = [c.name for c in checks if not c.passed]
    blocks = sum(c.kind == "block" for c in checks)
    detail = (
        f"differ: {', '.join(repr(n) for n in failing)}" if failing else f"worst: '{worst.name}'"
    )
    return CaseResult(
        name=f"each block on its own ({blocks} blocks)",
        kind="blocks",
        passed=not failing,
        max_abs=max(c.max_abs for c in checks),
        max_rel=worst.max_rel,
        cosine=min(c.cosine for c in checks),
        ref_max=worst.ref_max,
        allowed=worst.allowed,
        within_rounding=all(c.within_rounding is not False for c in checks),
        detail=detail,
        seconds=sum(c.seconds for c in checks),
    )


def _case(
    name: str,
    kind: str,
    reference: np.ndarray,
    got: np.ndarray,
    rtol: float,
    atol: float,
    **extra: Any,
) -> CaseResult:
    c = compare_outputs(reference, got)
    allowed = atol + rtol * c.ref_max
    return CaseResult(
        name=name,
        kind=kind,
        passed=c.within(rtol, atol),
        max_abs=c.max_abs,
        max_rel=c.max_rel,
        cosine=c.cosine,
        ref_max=c.ref_max,
        allowed=allowed,
        **extra,
    )


def raise_for_result(result: VerifyResult) -> None:
    """Raise :class:`VerificationError` naming the offending checks when ``result`` failed."""
    if not result.passed:
        raise VerificationError(result.failure_message())
