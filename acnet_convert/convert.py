"""Running a conversion: training checkpoint in, plain-conv checkpoint out.

:func:`~acnet_convert.plan.plan_fusion` decides everything from the index
(re-exported here with :class:`FuseOptions`, which most callers want
together with :func:`fuse_checkpoint`). :func:`fuse_checkpoint` then loads
one block at a time, fuses it, checks it
numerically against its branches, and streams the output to a temporary file
that is renamed into place only when everything has succeeded.

Where the time and memory go (see DESIGN.md): a conversion is mostly I/O, so
it never holds the whole input or output. Blocks are loaded, fused and checked
a slab of output channels at a time (fusion is separable per output channel),
and the fused tensors go to an unnamed scratch file beside the output as they
are made; the writer then copies them, and every tensor that passes through
unchanged, file to file in the kernel. The source's sha256 is computed in a
background thread while the blocks are fused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from acnet_convert import dtypes, readback
from acnet_convert.atomic import atomic_output
from acnet_convert.blockcheck import BlockCheck, check_block
from acnet_convert.blocks import BranchGeometry, to_layout
from acnet_convert.checkpoint import (
    CheckpointReader,
    TensorInfo,
    open_checkpoint,
    write_checkpoint,
)
from acnet_convert.errors import UnfusableBlockError, VerificationError
from acnet_convert.fusion import fuse_block
from acnet_convert.layouts import Layout
from acnet_convert.outputs import check_output
from acnet_convert.plan import (
    LAYOUTS,
    FuseOptions,
    FusionPlan,
    PlannedBlock,
    plan_fusion,
)
from acnet_convert.provenance import BackgroundDigest, fuse_metadata, fuse_notes, sha256_file
from acnet_convert.streaming import FusedSink, MemorySink, OutputFeed, ScratchSink, SlabSource

__all__ = [
    "LAYOUTS",
    "BlockReport",
    "FuseOptions",
    "FuseReport",
    "FusedState",
    "FusionPlan",
    "PlannedBlock",
    "fuse_checkpoint",
    "fuse_state",
    "plan_fusion",
    "sha256_file",
]

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BlockReport:
    """One fused block: geometry and, when checked, how it compared.

    ``hor``/``ver`` are an ACNet block's 1-D kernels (None for other
    families); ``branches`` lists every branch (kind, kernel, tensors).
    """

    label: str
    kernel: int
    hor: tuple[int, int] | None
    ver: tuple[int, int] | None
    dtype: str
    last_bn: bool
    affine: bool
    conv_bias: bool
    outputs: tuple[str, ...]
    max_abs: float | None = None
    max_rel: float | None = None
    passed: bool | None = None
    family: str = "acnet"
    kernel_shape: tuple[int, int] = (0, 0)
    branches: tuple[BranchGeometry, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "block": self.label,
            "family": self.family,
            "kernel": list(self.kernel_shape) if self.kernel_shape[0] else [self.kernel] * 2,
            "hor": list(self.hor) if self.hor else None,
            "ver": list(self.ver) if self.ver else None,
            "branches": [b.as_json() for b in self.branches],
            "dtype": self.dtype,
            "last_bn": self.last_bn,
            "affine": self.affine,
            "conv_bias": self.conv_bias,
            "outputs": list(self.outputs),
            "check": None
            if self.passed is None
            else {"passed": self.passed, "max_abs": self.max_abs, "max_rel": self.max_rel},
        }


@dataclass(frozen=True)
class FuseReport:
    """What a conversion did, for people (one line) and machines (``as_json``)."""

    source: str
    output: str
    format_in: str
    format_out: str
    dialect: str
    layout: str
    eps: float
    blocks: tuple[BlockReport, ...]
    params_before: int
    params_after: int
    bytes_written: int
    dropped: tuple[str, ...]
    checked: bool
    seconds: float
    source_sha256: str = ""
    notes: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "source": self.source,
            "output": self.output,
            "format_in": self.format_in,
            "format_out": self.format_out,
            "dialect": self.dialect,
            "layout": self.layout,
            "eps": self.eps,
            "blocks_fused": len(self.blocks),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "bytes_written": self.bytes_written,
            "dropped": list(self.dropped),
            "checked": self.checked,
            "seconds": round(self.seconds, 4),
            "source_sha256": self.source_sha256,
            "notes": list(self.notes),
            "blocks": [b.as_json() for b in self.blocks],
        }


@dataclass(frozen=True)
class FusedState:
    """A fused checkpoint held in memory.

    ``tensors`` maps every output key, in ``plan.outputs`` order, to its value
    as the chosen format would store it (bfloat16 as uint16 bit patterns);
    ``blocks`` reports each fused block.
    """

    plan: FusionPlan
    tensors: dict[str, np.ndarray]
    blocks: tuple[BlockReport, ...]


@dataclass(frozen=True)
class _Checked:
    """One block's check, merged over its slabs."""

    passed: bool
    max_abs: float
    max_rel: float


def _merge_checks(checks: Sequence[BlockCheck]) -> _Checked:
    """What one check of the whole block would report: the largest difference relative
    to the largest reference output, within the bound everywhere."""
    max_abs = max(c.comparison.max_abs for c in checks)
    ref_max = max(c.comparison.ref_max for c in checks)
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
    return _Checked(all(c.within_rounding for c in checks), max_abs, max_rel)


def _refuse_overflow(
    source: str,
    block: PlannedBlock,
    weight: np.ndarray,
    bias: np.ndarray,
    stored_weight: np.ndarray,
    stored_bias: np.ndarray,
) -> None:
    """Finite inputs can still fuse to values beyond the range of their dtype (a huge
    weight times a large BN scale): storing them would write inf, so refuse."""
    if np.all(np.isfinite(stored_weight)) and np.all(np.isfinite(stored_bias)):
        return
    largest = max(
        float(np.max(np.abs(weight), initial=0.0)), float(np.max(np.abs(bias), initial=0.0))
    )
    raise UnfusableBlockError(
        f"{source}: block '{block.spec.label}': the fused values (largest magnitude {largest:.3g}) "
        f"do not fit {block.geometry.dtype}; the block's weights or BN statistics are extreme "
        "or damaged, so nothing was written"
    )


def _fuse_one(
    reader: CheckpointReader,
    slabs: SlabSource,
    plan: FusionPlan,
    block: PlannedBlock,
    put_rows: Callable[[slice, np.ndarray], None],
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray | None, _Checked | None]:
    """Fuse one block slab by slab, and check it when given ``rng``.

    Each slab of the fused kernel goes to ``put_rows(rows, slab)`` (OIHW, in
    its stored dtype) as soon as it is made. Returns the float64 bias, the
    square BN's ``num_batches_tracked`` (or None) and the merged check.
    """
    g = block.geometry
    bias = np.empty(g.out_channels)
    checks: list[BlockCheck] = []
    for rows, tensors in slabs.slabs(block, block.eps):
        w, b = fuse_block(tensors)
        stored = dtypes.from_float64(w, g.dtype)
        stored_w = dtypes.to_float64(stored, g.dtype)
        stored_b = dtypes.to_float64(dtypes.from_float64(b, g.dtype), g.dtype)
        _refuse_overflow(plan.source, block, w, b, stored_w, stored_b)
        put_rows(rows, stored)
        bias[rows] = b
        if rng is not None:
            checks.append(check_block(tensors, stored_w, stored_b, stored_dtype=g.dtype, rng=rng))
    spec = block.spec
    count_key = spec.square.bn.count if spec.square.bn else None
    count = np.array(reader.read(count_key)).reshape(()).astype(np.int64) if count_key else None
    return bias, count, _merge_checks(checks) if checks else None


def _block_report(block: PlannedBlock, checked: _Checked | None) -> BlockReport:
    g = block.geometry
    return BlockReport(
        label=block.spec.label,
        kernel=g.kernel,
        hor=g.hor,
        ver=g.ver,
        dtype=g.dtype,
        last_bn=g.has_last_bn,
        affine=g.affine,
        conv_bias=g.conv_bias,
        outputs=tuple(k for k, _ in block.outputs),
        max_abs=checked.max_abs if checked else None,
        max_rel=checked.max_rel if checked else None,
        passed=checked.passed if checked else None,
        family=block.spec.family,
        kernel_shape=(g.kh, g.kw),
        branches=g.branches,
    )


def _fuse_blocks(
    reader: CheckpointReader,
    plan: FusionPlan,
    options: FuseOptions,
    progress: ProgressCallback | None,
    into: FusedSink,
) -> tuple[BlockReport, ...]:
    """Fuse (and, with ``options.check``, check) every planned block; its outputs go ``into``.

    Raises:
        VerificationError: a fused block does not reproduce its branches.
    """
    layout = plan.dialect.kernel_order
    rng = np.random.default_rng(options.seed) if options.check else None
    reports: list[BlockReport] = []
    failures: list[str] = []
    by_label = {b.spec.label: b for b in plan.blocks}
    slabs = SlabSource(reader, plan.source, layout, plan.bn_eps)
    for n, block in enumerate(plan.blocks):
        if progress:
            progress("fusing", n, len(plan.blocks))
        if block.alias_of is not None:
            # bit-identical to a block fused before it: repeat its result
            primary = {role: key for key, role in by_label[block.alias_of].outputs}
            for key, role in block.outputs:
                into.same_as(key, primary[role])
            continue
        g = block.geometry
        weight_key = next(key for key, role in block.outputs if role == "weight")
        oihw = TensorInfo(weight_key, g.dtype, (g.out_channels, g.in_per_group, g.kh, g.kw))
        put_rows = into.rows(weight_key, oihw) if layout == "OIHW" else None
        kernel = None
        if put_rows is None:
            kernel = np.empty(oihw.shape, dtypes.numpy_dtype(g.dtype))
            put_rows = kernel.__setitem__
        bias, count, checked = _fuse_one(reader, slabs, plan, block, put_rows, rng)
        weight = to_layout(kernel, layout) if kernel is not None else None
        values = Layout.encode(block.outputs, weight, bias, block.eps, g.dtype, count)
        for key, value in values.items():
            into.put(key, value)
        if checked is not None and not checked.passed:
            failures.append(f"'{block.spec.label}' (max relative difference {checked.max_rel:.3g})")
        reports.append(_block_report(block, checked))
    if failures:
        raise VerificationError(
            f"{plan.source}: the fused conv does not reproduce the training-time branches of "
            f"block {', '.join(failures)}; nothing was written"
        )
    return tuple(reports)


def fuse_state(
    reader: CheckpointReader,
    options: FuseOptions = FuseOptions(),
    *,
    progress: ProgressCallback | None = None,
) -> FusedState:
    """Plan and fuse an open training checkpoint in memory, without writing anything.

    The tensors are those :func:`fuse_checkpoint` would write, pass-through keys
    copied out of the reader, so they outlive it.

    Raises:
        UsageError, UnfusableBlockError: as :func:`plan_fusion`.
        VerificationError: a fused block does not reproduce its branches.

    >>> with open_checkpoint(Path("train.pth")) as reader:  # doctest: +SKIP
    ...     state = fuse_state(reader, FuseOptions(layout="baseline"))
    """
    plan = plan_fusion(reader, options)
    store = MemorySink()
    reports = _fuse_blocks(reader, plan, options, progress, store)
    fused = store.values
    tensors = {
        t.name: fused[t.name]
        if t.name in fused
        else np.array(reader.read(plan.origins[t.name]), copy=True)
        for t in plan.outputs
    }
    return FusedState(plan, tensors, reports)


def fuse_checkpoint(
    source: Path,
    output: Path,
    fmt: str,
    options: FuseOptions = FuseOptions(),
    *,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> FuseReport:
    """Fuse every block of a training checkpoint and write the result atomically.

    (Over 60 lines with this docstring; the body is a dozen steps, each a call.)

    Args:
        source: the training-time checkpoint (.pth, .hdf5 or .safetensors).
        output: where to write; its folder must exist.
        fmt: output format, ``pth``, ``hdf5`` or ``safetensors``.
        options: see :class:`FuseOptions`.
        force: replace an existing ``output``.
        progress: called as ``progress(stage, done, total)``.

    Returns:
        A :class:`FuseReport`.

    Raises:
        UsageError: output equals source, exists without ``force``, or its
            folder is missing.
        BadCheckpointError, UnfusableBlockError: unusable input.
        VerificationError: a fused block does not reproduce its branches;
            nothing is written.
    """
    started = time.perf_counter()
    check_output(source, output, force=force)
    with (
        open_checkpoint(source, trust_pickle=options.trust_pickle) as reader,
        closing(ScratchSink(output.parent)) as scratch,
    ):
        plan = plan_fusion(reader, options)
        hashing = BackgroundDigest(source)
        try:
            reports = _fuse_blocks(reader, plan, options, progress, scratch)
            digest = hashing.hexdigest()
        finally:
            hashing.cancel()
        metadata = fuse_metadata(
            reader, plan, options, source_name=source.name, digest=digest, blocks_fused=len(reports)
        )
        if progress:
            progress("writing", 0, 1)
        _write_output(reader, plan, scratch, output, fmt, metadata)
        notes, dropped = fuse_notes(reader, plan, fmt, source)
        report = FuseReport(
            source=str(source),
            output=str(output),
            format_in=reader.format,
            format_out=fmt,
            dialect=plan.dialect_names,
            layout=options.layout,
            eps=plan.eps,
            blocks=tuple(reports),
            params_before=plan.params_before,
            params_after=plan.params_after,
            bytes_written=output.stat().st_size,
            dropped=dropped,
            checked=options.check,
            seconds=time.perf_counter() - started,
            source_sha256=digest,
            notes=notes,
        )
    return report


def _write_output(
    reader: CheckpointReader,
    plan: FusionPlan,
    scratch: ScratchSink,
    output: Path,
    fmt: str,
    metadata: dict[str, str],
) -> None:
    """Write the plan's outputs atomically, read them back, and only then rename into place."""
    feed = OutputFeed(reader, plan.origins, scratch.raw)
    # each block's consumed input keys give way to its fused ones (Keras keeps its layer order)
    replaced = {key: block.outputs[0][0] for block in plan.blocks for key in block.consumed}
    with atomic_output(output) as tmp:
        write_checkpoint(
            tmp,
            fmt,
            plan.outputs,
            feed,
            container=reader.container,
            metadata=metadata,
            source=reader,
            writer_state=reader.writer_state(replaced) if fmt == reader.format else None,
        )
        readback.confirm_written(tmp, output, plan.outputs, feed.expected)
