"""Block mode: every block rebuilt from TRAIN on its own and compared with FUSED's fused conv."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from acnet_convert import dtypes
from acnet_convert.blockcheck import check_block
from acnet_convert.blocks import from_layout, load_block
from acnet_convert.checkpoint import CheckpointReader
from acnet_convert.errors import (
    BadCheckpointError,
    UnfusableBlockError,
)
from acnet_convert.fusion import compare_outputs
from acnet_convert.keyfit import a_few
from acnet_convert.layouts import LAYOUTS, closest_layout, get_layout, planned_layouts
from acnet_convert.plan import (
    FuseOptions,
    FusionPlan,
    NamingOptions,
    PlannedBlock,
    plan_fusion,
)
from acnet_convert.verify.options import _SHOW_KEYS, VerifyOptions
from acnet_convert.verify.results import CaseResult, VerifyResult

__all__ = []


def naming_for(
    options: VerifyOptions, provenance: Mapping[str, str], declares_eps: bool = False
) -> NamingOptions:
    """The naming options to plan TRAIN with: the user's, else what FUSED says ``fuse`` used.

    ``fuse --eps`` is taken from the provenance only when TRAIN declares no BN
    epsilons of its own (``declares_eps``): a declared epsilon is the truth a
    wrong ``--eps`` at fuse time must be checked against.
    """
    dialect = options.dialect
    recorded = provenance.get("acnet_convert.dialect", "")
    if dialect is None and recorded and "+" not in recorded and recorded != "conv-bn":
        dialect = recorded
    renames = options.renames
    if not renames and "acnet_convert.renames" in provenance:
        try:
            renames = tuple(
                (str(a), str(b)) for a, b in json.loads(provenance["acnet_convert.renames"])
            )
        except (ValueError, TypeError):
            renames = ()
    eps = options.eps
    if eps is None and not declares_eps and "acnet_convert.eps_option" in provenance:
        try:
            eps = float(provenance["acnet_convert.eps_option"])
        except ValueError:
            eps = None
    return NamingOptions(
        dialect=dialect,
        extra_dialects=tuple(options.extra_dialects),
        renames=renames,
        eps=eps,
        fold_bn={"true": True, "false": False}.get(provenance.get("acnet_convert.fold_bn", "")),
    )


def _plan_for(
    train: CheckpointReader,
    fused_keys: Mapping[str, object],
    options: VerifyOptions,
    provenance: Mapping[str, str] | None = None,
) -> tuple[FusionPlan, str]:
    """Plan the fusion of TRAIN in FUSED's layout (found from FUSED's keys for ``auto``)."""
    recorded = dict(provenance or {})
    naming = naming_for(options, recorded, bool(getattr(train, "bn_epsilons", None)))

    def fuse_options(layout: str) -> FuseOptions:
        return naming.fuse_options(layout=layout)

    chosen = options.layout
    if chosen == "auto" and recorded.get("acnet_convert.layout") in LAYOUTS:
        chosen = recorded["acnet_convert.layout"]
    if chosen != "auto":
        return plan_fusion(train, fuse_options(chosen)), chosen
    planned = planned_layouts(lambda layout: plan_fusion(train, fuse_options(layout)))
    best = closest_layout(planned, fused_keys)
    if best is None:  # pragma: no cover - the deploy layout always plans or raises
        raise UnfusableBlockError(f"{train.path}: no layout fits")
    return best


def _fused_values(
    block: PlannedBlock, fused: CheckpointReader, plan: FusionPlan, layout: str, auto: bool
) -> tuple[np.ndarray, np.ndarray, str]:
    """The fused conv of ``block`` as FUSED stores it: float64 OIHW kernel, bias, dtype."""
    expected = {t.name: t for t in plan.outputs}
    values: dict[str, np.ndarray] = {}
    stored = "float64"
    for key, role in block.outputs:
        if role == "bn_count":
            continue
        info = fused.tensors.get(key)
        if info is None:
            how = (
                "no layout (deploy, baseline, baseline-bias) explains FUSED's keys."
                if auto
                else f"is FUSED in another layout than --layout {layout}?"
            )
            raise BadCheckpointError(
                f"{fused.path}: '{key}', the fused {role} of block '{block.spec.label}', "
                "is missing; "
                f"{how} Was it written with --rename, or from another checkpoint? "
                f"Try 'acnet-convert inspect {fused.path}'"
            )
        want = expected[key].shape
        if info.shape != want:
            raise BadCheckpointError(
                f"{fused.path}: '{key}' (block '{block.spec.label}') has shape {list(info.shape)}, "
                f"expected {list(want)} from TRAIN's block; was FUSED made from another checkpoint?"
            )
        if info.dtype not in dtypes.FLOAT_DTYPES:
            raise BadCheckpointError(
                f"{fused.path}: '{key}' (block '{block.spec.label}') has dtype {info.dtype}; "
                "fused weights must be floating point"
            )
        if role == "weight":
            stored = info.dtype
        values[role] = dtypes.to_float64(fused.read(key), info.dtype)
    values["weight"] = np.ascontiguousarray(
        from_layout(values["weight"], plan.dialect.kernel_order)
    )
    weight, bias = get_layout(layout).decode(values, plan.eps)
    return weight, bias, stored


def _block_cases(
    train: CheckpointReader, fused: CheckpointReader, options: VerifyOptions, rtol: float
) -> tuple[str, list[CaseResult]]:
    """Check every block (and the copied tensors) on its own; returns layout and cases."""
    plan, layout = _plan_for(train, fused.tensors, options, fused.metadata)
    rng = np.random.default_rng(options.seed)
    cases: list[CaseResult] = []
    for block in plan.blocks:
        began = time.perf_counter()
        tensors = load_block(
            block.spec,
            train.tensors,
            train.read,
            block.eps,
            plan.source,
            plan.dialect.kernel_order,
            bn_eps=plan.bn_eps,
        )
        weight, bias, stored = _fused_values(block, fused, plan, layout, options.layout == "auto")
        check = check_block(
            tensors,
            weight,
            bias,
            stored_dtype=stored,
            rng=rng,
            batch=options.batch,
            compute_dtype=options.dtype,
        )
        c = check.comparison
        cases.append(
            CaseResult(
                name=block.spec.label,
                kind="block",
                passed=c.within(rtol, options.atol),
                max_abs=c.max_abs,
                max_rel=c.max_rel,
                cosine=c.cosine,
                ref_max=c.ref_max,
                allowed=options.atol + rtol * c.ref_max,
                within_rounding=check.within_rounding,
                seconds=time.perf_counter() - began,
            )
        )
    copied = _copied_case(train, fused, plan, options, rtol)
    if copied is not None:
        cases.append(copied)
    cases.extend(_accounting_cases(fused, plan, options))
    return layout, cases


def _accounting_cases(
    fused: CheckpointReader, plan: FusionPlan, options: VerifyOptions
) -> list[CaseResult]:
    """FUSED must hold every tensor ``fuse`` would have copied, and (without
    ``allow_extra``) nothing TRAIN does not explain: a fused file with a layer
    left out, or with weights from elsewhere, is not what ``fuse`` wrote."""
    explained = set(plan.origins) | {k for b in plan.blocks for k, _ in b.outputs}
    missing = [out for out in plan.origins if out not in fused.tensors]
    extra = [k for k in fused.tensors if k not in explained]
    cases = []
    if missing:
        cases.append(
            _listing_case(
                "missing",
                f"missing from FUSED ({len(missing)})",
                missing,
                "FUSED lacks tensors that fusing copies from TRAIN unchanged",
                passed=False,
            )
        )
    if extra:
        allowed = "allowed by --allow-extra" if options.allow_extra else "--allow-extra allows them"
        cases.append(
            _listing_case(
                "extra",
                f"extra in FUSED ({len(extra)})",
                extra,
                f"FUSED holds tensors that TRAIN does not explain ({allowed})",
                passed=options.allow_extra,
            )
        )
    return cases


def _listing_case(kind: str, name: str, keys: list[str], what: str, passed: bool) -> CaseResult:
    shown = a_few([repr(k) for k in keys], _SHOW_KEYS)
    nan = math.nan
    return CaseResult(
        name=name,
        kind=kind,
        passed=passed,
        max_abs=nan,
        max_rel=nan,
        cosine=nan,
        ref_max=nan,
        allowed=nan,
        detail=f"{what}: {shown}",
    )


_Worst = tuple[float, str, float, float, float]  # ratio to the tolerance, key, abs, ref, allowed


@dataclass(frozen=True)
class _CopiedDiff:
    """One copied tensor that is not bit-identical to its source in TRAIN.

    ``differs`` is the listing's line when it is off by more than the tolerance;
    ``incomparable``: another shape or a non-float dtype (always the worst so far).
    """

    worst: _Worst
    cosine: float
    differs: str | None
    incomparable: bool = False


def _compare_copied(
    train: CheckpointReader,
    fused: CheckpointReader,
    out: str,
    src: str,
    options: VerifyOptions,
    rtol: float,
) -> _CopiedDiff | None:
    """FUSED's ``out`` against TRAIN's ``src``; None when copied bit for bit, as fuse does."""
    a_info, b_info = train.tensors[src], fused.tensors[out]
    a, b = train.read(src), fused.read(out)
    never = (math.inf, out, math.inf, 0.0, 0.0)
    if a_info.shape != b_info.shape:
        shapes = f"{list(b_info.shape)} in FUSED, {list(a_info.shape)} in TRAIN"
        return _CopiedDiff(never, 1.0, f"'{out}' has shape {shapes}", incomparable=True)
    if a_info.dtype == b_info.dtype and np.array_equal(a, b):
        return None
    if a_info.dtype not in dtypes.FLOAT_DTYPES or b_info.dtype not in dtypes.FLOAT_DTYPES:
        what = f"'{out}' ({a_info.dtype} in TRAIN, {b_info.dtype} in FUSED) differs"
        return _CopiedDiff(never, 1.0, what, incomparable=True)
    c = compare_outputs(dtypes.to_float64(a, a_info.dtype), dtypes.to_float64(b, b_info.dtype))
    allowed = options.atol + rtol * c.ref_max
    ratio = c.max_abs / allowed if allowed > 0 else (0.0 if c.max_abs == 0 else math.inf)
    differs = None if c.within(rtol, options.atol) else f"'{out}' (max_abs {c.max_abs:.3g})"
    return _CopiedDiff((ratio, out, c.max_abs, c.ref_max, allowed), c.cosine, differs)


def _copied_case(
    train: CheckpointReader,
    fused: CheckpointReader,
    plan: FusionPlan,
    options: VerifyOptions,
    rtol: float,
) -> CaseResult | None:
    """Compare the tensors ``fuse`` copies unchanged (classifier, stem, other BNs)."""
    began = time.perf_counter()
    present = [(out, src) for out, src in plan.origins.items() if out in fused.tensors]
    if not present:
        return None
    worst: _Worst | None = None
    differing: list[str] = []
    cosine = 1.0
    for out, src in present:
        diff = _compare_copied(train, fused, out, src, options, rtol)
        if diff is None:
            continue
        if diff.differs is not None:
            differing.append(diff.differs)
        if diff.incomparable or worst is None or diff.worst[0] > worst[0]:
            worst = diff.worst
        cosine = min(cosine, diff.cosine)
    worst = worst or (0.0, "", 0.0, 0.0, options.atol)
    seconds = time.perf_counter() - began
    return _copied_result(len(present), worst, differing, cosine, seconds)


def _copied_result(
    count: int, worst: _Worst, differing: list[str], cosine: float, seconds: float
) -> CaseResult:
    _, key, max_abs, ref_max, allowed = worst
    detail = (
        f"{len(differing)} differ: {'; '.join(differing[:_SHOW_KEYS])}"
        if differing
        else f"worst: '{key}'"
        if key
        else ""
    )
    return CaseResult(
        name=f"copied tensors ({count})",
        kind="tensors",
        passed=not differing,
        max_abs=max_abs,
        max_rel=max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf),
        cosine=cosine,
        ref_max=ref_max,
        allowed=allowed,
        detail=detail,
        seconds=seconds,
    )


def _verify_blocks(
    train: CheckpointReader,
    fused: CheckpointReader,
    options: VerifyOptions,
    rtol: float,
    notes: list[str],
    started: float,
    device: str,
) -> VerifyResult:
    if options.device not in ("auto", "cpu"):
        notes.append(
            f"block mode runs in numpy on the CPU; --device {options.device} only applies "
            "to a network"
        )
    if options.input_shape is not None:
        notes.append(
            "block mode feeds each block its own random input; --input-shape only applies "
            "to a network"
        )
    layout, cases = _block_cases(train, fused, options, rtol)
    return VerifyResult(
        train=str(train.path),
        fused=str(fused.path),
        mode="blocks",
        arch=None,
        arch_detected=False,
        model=None,
        layout=layout,
        device="cpu",
        dtype=options.dtype,
        rtol=rtol,
        atol=options.atol,
        seed=options.seed,
        batch=options.batch,
        input="random",
        input_shape=None,
        cases=tuple(cases),
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- network mode
