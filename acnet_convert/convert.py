"""Planning and running a conversion: training checkpoint in, plain-conv checkpoint out.

:func:`plan_fusion` works on a checkpoint's index alone (names, dtypes,
shapes): it finds the blocks, checks their shapes and lays out the output.
:func:`fuse_checkpoint` then loads one block at a time, fuses it, checks it
numerically against its branches, and streams the output to a temporary file
that is renamed into place only when everything has succeeded.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from acnet_convert import __version__, dtypes
from acnet_convert.atomic import atomic_output
from acnet_convert.blockcheck import check_block
from acnet_convert.blocks import BlockGeometry, block_geometry, load_block, to_layout
from acnet_convert.checkpoint import CheckpointReader, TensorInfo, open_checkpoint, write_checkpoint
from acnet_convert.dialects import BlockSpec, Dialect, find_blocks
from acnet_convert.errors import BadCheckpointError, UnfusableBlockError, UsageError, VerificationError
from acnet_convert.fusion import fuse_block

__all__ = [
    "LAYOUTS",
    "BlockReport",
    "FuseOptions",
    "FuseReport",
    "FusionPlan",
    "PlannedBlock",
    "FusedState",
    "fuse_checkpoint",
    "fuse_state",
    "plan_fusion",
    "sha256_file",
]

LAYOUTS = ("deploy", "baseline", "baseline-bias")

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FuseOptions:
    """Everything a conversion can be told.

    ``eps`` None means the dialect's default (1e-5 for PyTorch-style
    checkpoints, as upstream ACNet; 1e-3 for Keras). ``renames`` are
    ``(regex, replacement)`` pairs applied in order to every output name.
    """

    eps: float | None = None
    check: bool = True
    layout: str = "deploy"
    dialect: str | None = None
    extra_dialects: tuple[Dialect, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    trust_pickle: bool = False
    seed: int = 0


@dataclass(frozen=True)
class PlannedBlock:
    """A block found in the index, with the output keys it will become."""

    spec: BlockSpec
    geometry: BlockGeometry
    outputs: tuple[tuple[str, str], ...]  # (output key, role)

    @property
    def consumed(self) -> tuple[str, ...]:
        return self.spec.keys()


@dataclass(frozen=True)
class FusionPlan:
    """The whole conversion, decided from the index before any data is read."""

    source: str
    dialect: Dialect
    eps: float
    blocks: tuple[PlannedBlock, ...]
    outputs: tuple[TensorInfo, ...]
    origins: Mapping[str, str]  # output key -> input key it copies, for pass-through keys
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int


@dataclass(frozen=True)
class BlockReport:
    """One fused block: geometry and, when checked, how it compared."""

    label: str
    kernel: int
    hor: tuple[int, int]
    ver: tuple[int, int]
    dtype: str
    last_bn: bool
    affine: bool
    conv_bias: bool
    outputs: tuple[str, ...]
    max_abs: float | None = None
    max_rel: float | None = None
    passed: bool | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "block": self.label,
            "kernel": [self.kernel, self.kernel],
            "hor": list(self.hor),
            "ver": list(self.ver),
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
            "blocks": [b.as_json() for b in self.blocks],
        }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _unit_prefix(spec: BlockSpec) -> str:
    """The baseline unit ``<u>.`` of a block at ``<u>.acb.`` or directly at ``<u>.``."""
    p = spec.fields.get("p")
    if p is None:
        raise UsageError(
            f"block '{spec.label}' uses the '{spec.dialect}' dialect, which has no baseline layout; "
            "use --layout deploy, optionally with --rename"
        )
    return p[: -len("acb.")] if p.endswith(".acb.") or p == "acb." else p


def _layout_outputs(layout: str, spec: BlockSpec) -> tuple[tuple[str, str], ...]:
    if layout == "deploy":
        return ((spec.fused_weight, "weight"), (spec.fused_bias, "bias"))
    u = _unit_prefix(spec)
    if layout == "baseline-bias":
        return ((f"{u}conv.weight", "weight"), (f"{u}conv.bias", "bias"))
    if layout == "baseline":
        return (
            (f"{u}conv.weight", "weight"),
            (f"{u}bn.weight", "bn_weight"),
            (f"{u}bn.bias", "bias"),
            (f"{u}bn.running_mean", "bn_mean"),
            (f"{u}bn.running_var", "bn_var"),
            (f"{u}bn.num_batches_tracked", "bn_count"),
        )
    raise UsageError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}")


def _rename(key: str, renames: Sequence[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _output_info(key: str, role: str, geometry: BlockGeometry, layout: str) -> TensorInfo:
    k, o, i = geometry.kernel, geometry.out_channels, geometry.in_per_group
    if role == "weight":
        shape = (k, k, i, o) if layout == "HWIO" else (o, i, k, k)
        return TensorInfo(key, geometry.dtype, shape)
    if role == "bn_count":
        return TensorInfo(key, "int64", ())
    return TensorInfo(key, geometry.dtype, (o,))


def plan_fusion(reader: CheckpointReader, options: FuseOptions) -> FusionPlan:
    """Find and check every block and lay out the output, from the index alone.

    Raises:
        UnfusableBlockError: no block, an ambiguous dialect, or a block with a
            missing or inconsistent part.
        UsageError: an unknown layout or dialect, or renames that collide.
    """
    source = str(reader.path)
    infos = reader.tensors
    detection = find_blocks(infos, options.dialect, options.extra_dialects)
    if detection.dialect is None or not detection.blocks:
        raise UnfusableBlockError(
            f"{source}: no ACNet block found among {len(infos)} tensors (no key like "
            "'<prefix>.square_conv.weight'); it may be fused already. "
            "Try 'acnet-convert inspect' to see its keys"
        )
    dialect = detection.dialect
    eps = options.eps if options.eps is not None else dialect.default_eps
    if not eps >= 0:
        raise UsageError(f"--eps must be a non-negative number, got {eps}")
    if options.layout not in LAYOUTS:
        raise UsageError(f"unknown layout '{options.layout}'; choose one of {', '.join(LAYOUTS)}")
    planned: list[PlannedBlock] = []
    owner: dict[str, int] = {}
    for spec in detection.blocks:
        geometry = block_geometry(spec, infos, source, dialect.kernel_layout)
        for key in spec.keys():
            if key in owner:
                raise UnfusableBlockError(
                    f"{source}: key '{key}' belongs to two blocks, "
                    f"'{planned[owner[key]].spec.label}' and '{spec.label}'"
                )
            owner[key] = len(planned)
        planned.append(PlannedBlock(spec, geometry, _layout_outputs(options.layout, spec)))

    outputs: list[TensorInfo] = []
    origins: dict[str, str] = {}
    emitted: set[int] = set()
    for key, info in infos.items():
        index = owner.get(key)
        if index is None:
            outputs.append(TensorInfo(key, info.dtype, info.shape))
            origins[key] = key
        elif index not in emitted:
            emitted.add(index)
            block = planned[index]
            outputs.extend(
                _output_info(out_key, role, block.geometry, dialect.kernel_layout)
                for out_key, role in block.outputs
            )
    if options.layout == "baseline":
        _refuse_taken_bn(planned, origins, source)
    renamed = [TensorInfo(_rename(t.name, options.renames), t.dtype, t.shape) for t in outputs]
    seen: dict[str, str] = {}
    for before, after in zip(outputs, renamed):
        if after.name in seen:
            what = "after --rename " if options.renames else ""
            raise (UsageError if options.renames else UnfusableBlockError)(
                f"{source}: output key '{after.name}' {what}would be written twice "
                f"(from '{seen[after.name]}' and '{before.name}'); does the checkpoint already hold fused weights?"
            )
        seen[after.name] = before.name
    final_origins = {
        after.name: origins[before.name] for before, after in zip(outputs, renamed) if before.name in origins
    }
    return FusionPlan(
        source=source,
        dialect=dialect,
        eps=eps,
        blocks=tuple(
            PlannedBlock(b.spec, b.geometry, tuple((_rename(k, options.renames), r) for k, r in b.outputs))
            for b in planned
        ),
        outputs=tuple(renamed),
        origins=final_origins,
        params_before=sum(t.numel for t in infos.values()),
        params_after=sum(t.numel for t in renamed),
        bytes_before=sum(t.nbytes for k, t in infos.items()),
        bytes_after=sum(t.nbytes for t in renamed),
    )


def _refuse_taken_bn(
    planned: Sequence[PlannedBlock], passed_through: Mapping[str, str], source: str
) -> None:
    """The baseline layout needs ``<u>.bn``; a pre-activation unit already has its own BN there."""
    for block in planned:
        taken = [key for key, role in block.outputs if role != "weight" and key in passed_through]
        if taken:
            raise UsageError(
                f"{source}: block '{block.spec.label}': the baseline layout puts the fused bias in "
                f"'{taken[0].rpartition('.')[0]}', but the checkpoint already has a BN there (one "
                "before the conv, as in pre-activation units); a plain baseline without a conv "
                "bias cannot hold this block. Use --layout deploy or --layout baseline-bias"
            )


def _identity_var(eps: float, dtype: str) -> np.ndarray:
    """A running_var v (in ``dtype``) with v + eps as close to 1 as that dtype allows."""
    return dtypes.from_float64(np.array([1.0 - eps]), dtype)


def _block_values(
    block: PlannedBlock, weight: np.ndarray, bias: np.ndarray, eps: float, layout: str, count: np.ndarray | None
) -> dict[str, np.ndarray]:
    g = block.geometry
    stored = {
        "weight": dtypes.from_float64(to_layout(weight, layout), g.dtype),
        "bias": dtypes.from_float64(bias, g.dtype),
        "bn_weight": dtypes.from_float64(np.ones(g.out_channels), g.dtype),
        "bn_mean": dtypes.from_float64(np.zeros(g.out_channels), g.dtype),
        "bn_var": np.repeat(_identity_var(eps, g.dtype), g.out_channels),
        "bn_count": count if count is not None else np.zeros((), dtype=np.int64),
    }
    return {key: np.asarray(stored[role], order="C") for key, role in block.outputs}


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


def _fuse_blocks(
    reader: CheckpointReader, plan: FusionPlan, options: FuseOptions, progress: ProgressCallback | None
) -> tuple[dict[str, np.ndarray], tuple[BlockReport, ...]]:
    """Fuse (and, with ``options.check``, check) every planned block: the blocks' output tensors.

    Raises:
        VerificationError: a fused block does not reproduce its branches.
    """
    layout = plan.dialect.kernel_layout
    rng = np.random.default_rng(options.seed)
    fused: dict[str, np.ndarray] = {}
    reports: list[BlockReport] = []
    failures: list[str] = []
    for n, block in enumerate(plan.blocks):
        if progress:
            progress("fusing", n, len(plan.blocks))
        tensors = load_block(block.spec, reader.tensors, reader.read, plan.eps, plan.source, layout)
        weight, bias = fuse_block(tensors)
        count_key = block.spec.square.bn.count if block.spec.square.bn else None
        count = np.array(reader.read(count_key)).reshape(()).astype(np.int64) if count_key else None
        values = _block_values(block, weight, bias, plan.eps, layout, count)
        fused.update(values)
        g = block.geometry
        max_abs = max_rel = None
        passed = None
        if options.check:
            stored_w = dtypes.to_float64(dtypes.from_float64(weight, g.dtype), g.dtype)
            stored_b = dtypes.to_float64(dtypes.from_float64(bias, g.dtype), g.dtype)
            result = check_block(tensors, stored_w, stored_b, stored_dtype=g.dtype, rng=rng)
            passed = result.within_rounding
            max_abs, max_rel = result.comparison.max_abs, result.comparison.max_rel
            if not passed:
                failures.append(f"'{block.spec.label}' (max relative difference {max_rel:.3g})")
        reports.append(
            BlockReport(
                label=block.spec.label,
                kernel=g.kernel,
                hor=g.hor,
                ver=g.ver,
                dtype=g.dtype,
                last_bn=g.has_last_bn,
                affine=g.affine,
                conv_bias=g.conv_bias,
                outputs=tuple(k for k, _ in block.outputs),
                max_abs=max_abs,
                max_rel=max_rel,
                passed=passed,
            )
        )
    if failures:
        raise VerificationError(
            f"{plan.source}: the fused conv does not reproduce the training-time branches of "
            f"block {', '.join(failures)}; nothing was written"
        )
    return fused, tuple(reports)


def fuse_state(
    reader: CheckpointReader, options: FuseOptions = FuseOptions(), *, progress: ProgressCallback | None = None
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
    fused, reports = _fuse_blocks(reader, plan, options, progress)
    tensors = {
        t.name: fused[t.name] if t.name in fused else np.array(reader.read(plan.origins[t.name]), copy=True)
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
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise UsageError(f"{output}: the output would overwrite the input; choose another path")
    if output.is_dir():
        raise UsageError(f"{output}: is a folder; give a file name for the output")
    if output.exists() and not force:
        raise UsageError(f"{output}: exists already; pass --force to replace it")
    if not output.parent.is_dir():
        raise UsageError(f"{output}: the folder '{output.parent}' does not exist")

    with open_checkpoint(source, trust_pickle=options.trust_pickle) as reader:
        plan = plan_fusion(reader, options)
        fused, reports = _fuse_blocks(reader, plan, options, progress)
        digest = sha256_file(source)
        metadata = dict(reader.metadata)
        metadata.update(
            {
                "acnet_convert.version": __version__,
                "acnet_convert.eps": repr(plan.eps),
                "acnet_convert.blocks_fused": str(len(plan.blocks)),
                "acnet_convert.dialect": plan.dialect.name,
                "acnet_convert.layout": options.layout,
                "acnet_convert.source_sha256": digest,
                "acnet_convert.source": source.name,
            }
        )

        def produce(name: str) -> np.ndarray:
            if name in fused:
                return fused[name]
            return reader.read(plan.origins[name])

        if progress:
            progress("writing", 0, 1)
        with atomic_output(output) as tmp:
            write_checkpoint(
                tmp,
                fmt,
                plan.outputs,
                produce,
                container=reader.container,
                metadata=metadata,
                source=reader,
            )
            _confirm_written(tmp, output, plan.outputs, produce)
        notes = tuple(
            f"dropped '{k}' from the container: it refers to training-time parameters" for k in reader.container.dropped
        ) if fmt == "pth" else ()
        report = FuseReport(
            source=str(source),
            output=str(output),
            format_in=reader.format,
            format_out=fmt,
            dialect=plan.dialect.name,
            layout=options.layout,
            eps=plan.eps,
            blocks=tuple(reports),
            params_before=plan.params_before,
            params_after=plan.params_after,
            bytes_written=output.stat().st_size,
            dropped=reader.container.dropped if fmt == "pth" else (),
            checked=options.check,
            seconds=time.perf_counter() - started,
            source_sha256=digest,
            notes=notes,
        )
    return report


def _raw_bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array)).cast("B")


def _confirm_written(
    tmp: Path, output: Path, expected: Sequence[TensorInfo], produce: Callable[[str], np.ndarray]
) -> None:
    """Read the written file back and compare every tensor with what was meant."""
    try:
        with open_checkpoint(tmp) as written:
            # HDF5 lists datasets by name, not in writing order: compare as mappings.
            got = {t.name: (t.dtype, t.shape) for t in written.tensors.values()}
            want = {t.name: (t.dtype, t.shape) for t in expected}
            if got != want:
                differ = sorted(set(got.items()) ^ set(want.items()))
                raise BadCheckpointError(
                    f"{output}: the written file does not list the expected tensors (first difference: {differ[0][0]})"
                )
            for info in expected:
                if _raw_bytes(written.read(info.name)) != _raw_bytes(produce(info.name)):
                    raise BadCheckpointError(f"{output}: tensor '{info.name}' did not land intact")
    except BadCheckpointError as err:
        raise BadCheckpointError(f"{output}: reading the output back failed: {err}") from err
