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

import hashlib
import math
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from acnet_convert import __version__, dtypes
from acnet_convert.atomic import atomic_output
from acnet_convert.blockcheck import BlockCheck, check_block
from acnet_convert.blocks import BranchGeometry, load_block, to_layout
from acnet_convert.checkpoint import (
    CheckpointReader,
    Container,
    RawBytes,
    TensorInfo,
    open_checkpoint,
    write_checkpoint,
)
from acnet_convert.checkpoint.rawio import (
    array_bytes,
    crc32_range,
    read_range,
    same_bytes,
    write_range,
)
from acnet_convert.errors import (
    BadCheckpointError,
    UnfusableBlockError,
    UsageError,
    VerificationError,
)
from acnet_convert.fusion import BlockTensors, fuse_block
from acnet_convert.plan import (
    LAYOUTS,
    FuseOptions,
    FusionPlan,
    PlannedBlock,
    plan_fusion,
    plan_notes,
)

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


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces into one reused buffer.

    ``stop``, when set, ends the reading early (the result is then meaningless).
    """
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while (n := fh.readinto(buffer)) and not (stop is not None and stop.is_set()):
            digest.update(view[:n])
    return digest.hexdigest()


class _BackgroundDigest:
    """The sha256 of a file, computed in a thread while the caller does other work.

    hashlib and file reads release the GIL, so with a second core the digest
    (a full read of the source, the slowest single step after the fusing
    itself) costs no wall time until :meth:`hexdigest` is asked for it.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stop = threading.Event()
        self._digest = ""
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="acnet-convert-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._digest = sha256_file(self._path, self._stop)
        except OSError as err:
            self._error = err

    def hexdigest(self) -> str:
        """Wait for the digest.

        Raises:
            BadCheckpointError: the file could not be read to the end.
        """
        self._thread.join()
        if self._error is not None:
            raise BadCheckpointError(
                f"{self._path}: cannot be read to the end: {self._error.strerror or self._error}"
            ) from self._error
        return self._digest

    def cancel(self) -> None:
        """Stop reading and wait for the thread, so no file stays open behind the caller."""
        self._stop.set()
        self._thread.join()


def _keras_attrs(reader: CheckpointReader, plan: FusionPlan) -> Any:
    """The source's Keras layer list with each block's layers replaced by its fused layer."""
    attrs = getattr(reader, "keras_attrs", None)
    if attrs is None:
        return None
    from acnet_convert.checkpoint.hdf5_io import replace_keras_layers

    replaced = {
        key.split("/", 1)[0]: block.outputs[0][0].split("/", 1)[0]
        for block in plan.blocks
        for key in block.consumed
        if "/" in key and "/" in block.outputs[0][0]
    }
    return replace_keras_layers(attrs, replaced)


def _identity_var(eps: float, dtype: str) -> np.ndarray:
    """A running_var v (in ``dtype``) with v + eps as close to 1 as that dtype allows."""
    return dtypes.from_float64(np.array([1.0 - eps]), dtype)


def _block_values(
    block: PlannedBlock,
    weight: np.ndarray | None,
    bias: np.ndarray,
    eps: float,
    layout: str,
    count: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """The block's output tensors from its fused kernel (OIHW, already in its stored dtype;
    None leaves the weight out) and its float64 bias."""
    g = block.geometry
    stored = {
        "weight": to_layout(weight, layout) if weight is not None else None,
        "bias": dtypes.from_float64(bias, g.dtype),
        "bn_weight": dtypes.from_float64(np.ones(g.out_channels), g.dtype),
        "bn_mean": dtypes.from_float64(np.zeros(g.out_channels), g.dtype),
        "bn_var": np.repeat(_identity_var(eps, g.dtype), g.out_channels),
        "bn_count": count if count is not None else np.zeros((), dtype=np.int64),
    }
    return {
        key: np.asarray(stored[role], order="C")
        for key, role in block.outputs
        if stored[role] is not None
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


# Output channels are loaded, fused and checked in slabs of about this many
# float64 bytes of square kernel, so a block's working set stays a few MiB
# however wide the layer is. Smaller slabs cost more in per-call overhead;
# larger ones save little time and add to the peak resident size.
_SLAB_BYTES = 512 << 10
# A block with a sequential (DBB 1x1 -> kxk) branch composes each slab by a matrix product,
# whose per-call cost (BLAS threads waking) favours fewer, larger slabs: 1 MiB measured
# 0.62x the file in peak RSS on DBB ResNet-18 (0.5 MiB: 0.57x at about 1.8x the time).
_SEQ_SLAB_BYTES = 1 << 20


def _block_slabs(
    reader: CheckpointReader,
    block: PlannedBlock,
    eps: float,
    source: str,
    layout: str,
    bn_eps: Mapping[str, float] | None = None,
) -> Iterator[tuple[slice, BlockTensors]]:
    """The block's tensors in float64 (checked by :func:`load_block`), a slab of channels at a time.

    Fusing and checking are separable per output channel (each BN scales one
    channel; the 1-D kernels add into that channel's square kernel), so fusing
    slab by slab gives bit for bit what fusing the whole block gives. Kernel
    rows are read straight from the file where the reader knows their bytes
    (OIHW: a slab of output channels is one run of bytes); per-channel vectors
    and kernels stored otherwise are read whole, once per block. Reads go by
    ``pread`` where they can, so no page of a reader's mmap becomes resident.
    """
    g = block.geometry
    # a sequential branch composes by a matrix product per slab: fewer, larger ones
    slab_bytes = _SLAB_BYTES if g.streamable else _SEQ_SLAB_BYTES
    rows_per_slab = max(1, slab_bytes // (8 * g.in_per_group * g.kh * g.kw))
    whole: dict[str, np.ndarray] = {}
    raws: dict[str, RawBytes | None] = {}

    def rows_of(key: str, rows: slice) -> np.ndarray:
        info = reader.tensors[key]
        kernel = len(info.shape) == 4
        if key not in raws:
            raws[key] = reader.raw(key)
        raw = raws[key]
        if raw is not None and kernel and layout == "OIHW":
            row = info.nbytes // info.shape[0]
            count = rows.stop - rows.start
            part = RawBytes(raw.fd, raw.offset + rows.start * row, count * row)
            stored = np.frombuffer(read_range(part), dtype=dtypes.numpy_dtype(info.dtype))
            return stored.reshape((count, *info.shape[1:]))
        if key not in whole:
            if raw is not None:
                stored = np.frombuffer(read_range(raw), dtype=dtypes.numpy_dtype(info.dtype))
                whole[key] = stored.reshape(info.shape)
            else:
                whole[key] = reader.read(key)
        values = whole[key]
        return values[..., rows] if kernel and layout == "HWIO" else values[rows]

    def read_whole(key: str) -> np.ndarray:
        info = reader.tensors[key]
        return rows_of(key, slice(0, info.shape[0] if info.shape else 0))

    for start in range(0, g.out_channels, rows_per_slab):
        rows = slice(start, min(start + rows_per_slab, g.out_channels))

        def read(key: str, rows: slice = rows) -> np.ndarray:
            return rows_of(key, rows)

        yield (
            rows,
            load_block(
                block.spec,
                reader.tensors,
                read,
                eps,
                source,
                layout,
                first_channel=start,
                read_whole=read_whole,
                bn_eps=bn_eps,
            ),
        )


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
    layout = plan.dialect.kernel_order
    eps = block.eps if block.eps is not None else plan.eps
    slabs = _block_slabs(reader, block, eps, plan.source, layout, plan.bn_eps)
    for rows, tensors in slabs:
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


class _FusedTensors:
    """Where :func:`_fuse_blocks` puts the fused tensors: here, a dict in memory."""

    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}

    def rows(self, key: str, info: TensorInfo) -> Callable[[slice, np.ndarray], None] | None:
        """A writer of the kernel ``key`` slab by slab (OIHW), or None to be handed it whole."""
        return None

    def put(self, key: str, value: np.ndarray) -> None:
        self.values[key] = value

    def same_as(self, key: str, primary: str) -> None:
        """``key`` holds what ``primary`` holds (an alias block's output)."""
        self.values[key] = self.values[primary]


class _ScratchFile(_FusedTensors):
    """Fused tensors in an unnamed temporary file beside the output, as :class:`RawBytes`.

    The writer copies them from there in the kernel, the read-back check
    compares the output with them byte for byte, and at no point is more of
    them in memory than a slab of one block.
    """

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed in close()
        self._fd = self._file.fileno()
        self._end = 0
        self.raw: dict[str, RawBytes] = {}

    def _reserve(self, key: str, length: int) -> int:
        start = self._end
        self.raw[key] = RawBytes(self._fd, start, length)
        self._end += length
        return start

    def rows(self, key: str, info: TensorInfo) -> Callable[[slice, np.ndarray], None] | None:
        start = self._reserve(key, info.nbytes)
        row = info.nbytes // info.shape[0]

        def put_rows(rows: slice, slab: np.ndarray) -> None:
            write_range(self._fd, array_bytes(slab), start + rows.start * row)

        return put_rows

    def put(self, key: str, value: np.ndarray) -> None:
        data = array_bytes(value)
        write_range(self._fd, data, self._reserve(key, len(data)))

    def same_as(self, key: str, primary: str) -> None:
        self.raw[key] = self.raw[primary]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _ScratchFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _fuse_blocks(
    reader: CheckpointReader,
    plan: FusionPlan,
    options: FuseOptions,
    progress: ProgressCallback | None,
    into: _FusedTensors,
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
        bias, count, checked = _fuse_one(reader, plan, block, put_rows, rng)
        eps = block.eps if block.eps is not None else plan.eps
        for key, value in _block_values(block, kernel, bias, eps, layout, count).items():
            into.put(key, value)
        if checked is not None and not checked.passed:
            failures.append(f"'{block.spec.label}' (max relative difference {checked.max_rel:.3g})")
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
                max_abs=checked.max_abs if checked else None,
                max_rel=checked.max_rel if checked else None,
                passed=checked.passed if checked else None,
                family=block.spec.family,
                kernel_shape=(g.kh, g.kw),
                branches=g.branches,
            )
        )
    if failures:
        raise VerificationError(
            f"{plan.source}: the fused conv does not reproduce the training-time branches of "
            f"block {', '.join(failures)}; nothing was written"
        )
    return tuple(reports)


class _OutputFeed:
    """Hands a writer each output tensor, in order, and remembers what it should find in the file.

    Fused tensors and pass-through tensors go as :class:`RawBytes` (from the
    scratch file, or from the source where its reader knows them) to be
    copied file to file; other pass-through tensors go as the arrays the
    reader returns.
    """

    def __init__(
        self, reader: CheckpointReader, plan: FusionPlan, fused: Mapping[str, RawBytes]
    ) -> None:
        self._reader = reader
        self._origins = plan.origins
        self._fused = fused
        # output key -> the bytes it copies, or (crc32, length) of the array handed over
        self.expected: dict[str, RawBytes | tuple[int, int]] = {}

    def __call__(self, name: str) -> np.ndarray | RawBytes:
        raw = self._fused.get(name)
        if raw is None:
            raw = self._reader.raw(self._origins[name])
        if raw is not None:
            self.expected[name] = raw
            return raw
        value = self._reader.read(self._origins[name])
        data = array_bytes(value)
        self.expected[name] = (zlib.crc32(data), len(data))
        return value


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
    store = _FusedTensors()
    reports = _fuse_blocks(reader, plan, options, progress, store)
    fused = store.values
    tensors = {
        t.name: fused[t.name]
        if t.name in fused
        else np.array(reader.read(plan.origins[t.name]), copy=True)
        for t in plan.outputs
    }
    return FusedState(plan, tensors, reports)


# Keras full-model files describe the network in these root attributes; after
# fusing they would describe the training-time net, so the output keeps weights only.
_TRAINING_TIME_METADATA = ("model_config", "training_config")


def _dropped_entries(container: Container, fmt: str) -> list[tuple[str, str]]:
    """Container entries the output does not keep, each with the reason."""
    import re

    out: list[tuple[str, str]] = []
    for key in container.dropped:
        if re.search(r"optim|sched|scaler|ema|swa", key, re.IGNORECASE):
            why = "training-time state (optimizer, scheduler, ...), meaningless after fusing"
        else:
            why = "it holds more than plain data (an object such as an argparse.Namespace)"
        out.append((key, why))
    if fmt != "pth":
        out += [(key, f"a {fmt} file holds tensors only") for key in container.extras]
    return out


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

    with (
        open_checkpoint(source, trust_pickle=options.trust_pickle) as reader,
        _ScratchFile(output.parent) as scratch,
    ):
        plan = plan_fusion(reader, options)
        hashing = _BackgroundDigest(source)
        try:
            reports = _fuse_blocks(reader, plan, options, progress, scratch)
            digest = hashing.hexdigest()
        finally:
            hashing.cancel()
        metadata = {k: v for k, v in reader.metadata.items() if k not in _TRAINING_TIME_METADATA}
        metadata.update(
            {
                "acnet_convert.version": __version__,
                "acnet_convert.eps": repr(plan.eps),
                "acnet_convert.blocks_fused": str(len(reports)),
                "acnet_convert.dialect": plan.dialect_names,
                "acnet_convert.layout": options.layout,
                "acnet_convert.source_sha256": digest,
                "acnet_convert.source": source.name,
            }
        )
        import json

        if options.renames:
            metadata["acnet_convert.renames"] = json.dumps([list(r) for r in options.renames])
        if options.eps is not None:
            metadata["acnet_convert.eps_option"] = repr(options.eps)
        if plan.fold_bn or options.fold_bn is False:
            metadata["acnet_convert.fold_bn"] = "true" if plan.fold_bn else "false"
        aliases = {b.spec.label: b.alias_of for b in plan.blocks if b.alias_of}
        aliases.update({f"{a} ({d})": p for a, d, p in plan.dropped_aliases})
        if aliases:
            metadata["acnet_convert.aliases"] = json.dumps(aliases)

        feed = _OutputFeed(reader, plan, scratch.raw)
        if progress:
            progress("writing", 0, 1)
        with atomic_output(output) as tmp:
            write_checkpoint(
                tmp,
                fmt,
                plan.outputs,
                feed,
                container=reader.container,
                metadata=metadata,
                source=reader,
                keras_attrs=_keras_attrs(reader, plan) if fmt == "hdf5" else None,
            )
            _confirm_written(tmp, output, plan.outputs, feed.expected)
        dropped_entries = _dropped_entries(reader.container, fmt)
        notes = tuple(f"dropped '{k}' from the container: {why}" for k, why in dropped_entries)
        notes += tuple(
            f"dropped the '{k}' attribute: it describes the training-time network; "
            "the output holds weights only (load them with load_weights)"
            for k in _TRAINING_TIME_METADATA
            if k in reader.metadata
        )
        notes += plan_notes(plan)
        notes += _extension_notes(source)
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
            dropped=tuple(k for k, _ in dropped_entries),
            checked=options.check,
            seconds=time.perf_counter() - started,
            source_sha256=digest,
            notes=notes,
        )
    return report


def _extension_notes(source: Path) -> tuple[str, ...]:
    """The note that the file's extension does not match its content, if so (a 32-byte read)."""
    from acnet_convert.checkpoint.sniff import extension_note, sniff_format

    note = extension_note(source, sniff_format(source))
    return (note,) if note else ()


def _confirm_written(
    tmp: Path,
    output: Path,
    expected: Sequence[TensorInfo],
    landed: Mapping[str, RawBytes | tuple[int, int]],
) -> None:
    """Read the written file back: every tensor listed as meant, and every byte as meant.

    The index (names, dtypes, shapes) is compared in full, and so is every
    tensor that was handed over as bytes (fused tensors from the scratch
    file, pass-through tensors from the source), byte for byte through two
    small buffers: one read of the output and of what it copied, mostly from
    the page cache, without holding a tensor. A tensor handed over as an
    array (a pass-through tensor whose bytes the reader could not point to:
    strided, big-endian, chunked) is compared by the CRC-32 taken as it went
    to the writer, instead of keeping it: that catches a writer bug or an
    I/O fault (odds of missing a random corruption: 1 in 2**32), which is
    what this check is for.
    """
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
                if not _landed_intact(written, info.name, landed.get(info.name)):
                    raise BadCheckpointError(f"{output}: tensor '{info.name}' did not land intact")
    except BadCheckpointError as err:
        raise BadCheckpointError(f"{output}: reading the output back failed: {err}") from err


def _landed_intact(
    written: CheckpointReader, name: str, meant: RawBytes | tuple[int, int] | None
) -> bool:
    if meant is None:
        return False
    stored = written.raw(name)
    if isinstance(meant, RawBytes):
        if stored is not None:
            return same_bytes(meant, stored)
        return bytes(array_bytes(written.read(name))) == read_range(meant)
    crc, length = meant
    if stored is not None:
        return stored.length == length and crc32_range(stored) == crc
    data = array_bytes(written.read(name))
    return len(data) == length and zlib.crc32(data) == crc
