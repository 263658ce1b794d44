"""Quantization readiness of a deployed net's convs: how much int8 costs each layer.

Fusing three branches (or a whole re-parameterized block) into one conv sums
kernels whose output channels were scaled by different BN statistics, so the
fused kernels' channels can differ in size by orders of magnitude. Symmetric
int8 quantization with one scale per tensor then spends most of its 255 levels
on the largest channel and rounds the small ones to a few levels; one scale
per output channel does not. For every conv kernel this module reports:

``w_min``, ``w_max``
    the weight range.
``channel_spread``
    the largest output channel's max|w| over the smallest non-zero one's
    (1.0: all channels alike; 100: per-tensor int8 leaves the smallest channel
    about 1 of its 127 levels).
``sqnr_tensor_db``, ``sqnr_channel_db``
    the signal-to-quantization-noise ratio ``10 log10(sum w^2 / sum (w - q(w))^2)``
    of the whole kernel under symmetric int8 (scale max|w| / 127, round half to
    even, clip to [-127, 127]) with one scale per tensor and with one scale per
    output channel.
``worst_tensor_db``, ``worst_channel_db``
    the same ratio taken over each output channel on its own, for the worst
    channel, under each scheme. The whole-kernel figure is dominated by the
    largest channels and hides a small channel rounded away entirely; each
    channel is a feature map of its own, so channels are what flag a layer.
``loss_db``
    the most any output channel loses: the largest, over channels, of that
    channel's SQNR with its own scale minus its SQNR with the tensor's scale,
    which is about ``20 log10`` of how much smaller than the largest channel it
    is, until it rounds away. A layer is flagged when this exceeds the threshold
    (default 20 dB, about 3.3 bits at 20 log10(2) = 6.02 dB a bit: that channel's
    range is some 10x smaller than the largest, so it keeps about 12 of the 127
    levels its own scale would give it).
    All-zero channels are exact under both schemes and left out.

Pure numpy; no torch. :func:`checkpoint_quant_stats` fuses a training
checkpoint in memory first (the same fusion ``acnet-convert fuse`` runs).

>>> w = np.zeros((2, 1, 1, 1)); w[0] = 1.0; w[1] = 0.001
>>> round(conv_quant_stats("c", w).channel_spread)
1000
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.blocks import from_layout
from acnet_convert.checkpoint import CheckpointReader, open_checkpoint
from acnet_convert.errors import NoBlockFound, UsageError
from acnet_convert.plan import FuseOptions

if TYPE_CHECKING:
    from acnet_convert.convert import FusedState

__all__ = [
    "DEFAULT_LOSS_THRESHOLD_DB",
    "INT8_LEVELS",
    "ConvQuantStats",
    "QuantReport",
    "checkpoint_has_blocks",
    "checkpoint_quant_stats",
    "conv_quant_stats",
    "fake_quantize_int8",
    "quant_report",
    "sqnr_db",
]

DEFAULT_LOSS_THRESHOLD_DB = 20.0
INT8_LEVELS = 127  # symmetric int8: integers -127..127, zero exact


def fake_quantize_int8(weight: np.ndarray, per_channel: bool) -> np.ndarray:
    """``weight`` quantized to symmetric int8 and back, in float64.

    The scale is max|w| / 127 over the whole tensor, or over each output
    channel (axis 0) with ``per_channel``; an all-zero tensor or channel stays zero.

    >>> fake_quantize_int8(np.array([[1.0, 0.5, 0.004]]), per_channel=False).tolist()
    [[1.0, 0.5039370078740157, 0.0]]
    """
    w = np.asarray(weight, dtype=np.float64)
    if per_channel:
        absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        absmax = absmax.reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        absmax = np.asarray(np.abs(w).max() if w.size else 0.0)
    scale = absmax / INT8_LEVELS
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(w / safe), -INT8_LEVELS, INT8_LEVELS)
    out: np.ndarray = np.where(scale > 0, q * safe, 0.0)
    return out


def sqnr_db(signal: np.ndarray, approx: np.ndarray) -> float:
    """``10 log10(sum signal^2 / sum (signal - approx)^2)``; inf when they are equal.

    >>> round(sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.5])), 2)
    20.0
    """
    s = np.asarray(signal, dtype=np.float64)
    noise = float(np.sum((s - np.asarray(approx, dtype=np.float64)) ** 2))
    power = float(np.sum(s * s))
    if noise == 0.0:
        return math.inf
    if power == 0.0:
        return -math.inf
    return 10.0 * math.log10(power / noise)


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class ConvQuantStats:
    """The int8 figures of one conv kernel (see the module docstring)."""

    name: str
    shape: tuple[int, ...]  # OIHW
    block: str | None
    w_min: float
    w_max: float
    channel_spread: float
    zero_channels: int
    sqnr_tensor_db: float
    sqnr_channel_db: float
    worst_tensor_db: float
    worst_channel_db: float
    loss_db: float
    threshold_db: float

    @property
    def flagged(self) -> bool:
        return self.loss_db > self.threshold_db

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "block": self.block,
            "w_min": self.w_min,
            "w_max": self.w_max,
            "channel_spread": _json_number(self.channel_spread),
            "zero_channels": self.zero_channels,
            "sqnr_per_tensor_db": _json_number(self.sqnr_tensor_db),
            "sqnr_per_channel_db": _json_number(self.sqnr_channel_db),
            "worst_channel_sqnr_per_tensor_db": _json_number(self.worst_tensor_db),
            "worst_channel_sqnr_per_channel_db": _json_number(self.worst_channel_db),
            "loss_db": _json_number(self.loss_db),
            "flagged": self.flagged,
        }


def conv_quant_stats(
    name: str,
    weight: np.ndarray,
    threshold_db: float = DEFAULT_LOSS_THRESHOLD_DB,
    block: str | None = None,
) -> ConvQuantStats:
    """The figures of one kernel ``weight`` (output channels on axis 0, e.g. OIHW)."""
    w = np.asarray(weight, dtype=np.float64)
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) if w.size else np.zeros(0)
    live = absmax > 0
    spread = float(absmax[live].max() / absmax[live].min()) if live.any() else 1.0
    per_tensor = fake_quantize_int8(w, per_channel=False)
    per_channel = fake_quantize_int8(w, per_channel=True)
    by_tensor = _channel_sqnrs(w, per_tensor)
    by_channel = _channel_sqnrs(w, per_channel)
    return ConvQuantStats(
        name=name,
        shape=tuple(int(s) for s in w.shape),
        block=block,
        w_min=float(w.min()) if w.size else 0.0,
        w_max=float(w.max()) if w.size else 0.0,
        channel_spread=spread,
        zero_channels=int(absmax.size - live.sum()),
        sqnr_tensor_db=sqnr_db(w, per_tensor),
        sqnr_channel_db=sqnr_db(w, per_channel),
        worst_tensor_db=min(by_tensor, default=math.inf),
        worst_channel_db=min(by_channel, default=math.inf),
        loss_db=max((_loss(c, t) for c, t in zip(by_channel, by_tensor, strict=True)), default=0.0),
        threshold_db=threshold_db,
    )


def _loss(own: float, shared: float) -> float:
    return 0.0 if own == shared else own - shared  # both exact (inf): nothing lost


def _channel_sqnrs(weight: np.ndarray, approx: np.ndarray) -> list[float]:
    """The SQNR of each output channel (all-zero channels left out: exact either way)."""
    return [
        sqnr_db(channel, q)
        for channel, q in zip(weight, approx, strict=True)
        if np.any(channel != 0)
    ]


@dataclass(frozen=True)
class QuantReport:
    """The figures of every conv of a deployed net, in checkpoint (or graph) order."""

    source: str
    threshold_db: float
    layers: tuple[ConvQuantStats, ...]
    fused_in_memory: bool = False
    notes: tuple[str, ...] = ()

    @property
    def flagged(self) -> tuple[ConvQuantStats, ...]:
        return tuple(layer for layer in self.layers if layer.flagged)

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "scheme": "symmetric int8 (-127..127), per tensor vs per output channel",
            "threshold_db": self.threshold_db,
            "fused_in_memory": self.fused_in_memory,
            "layers": [layer.as_json() for layer in self.layers],
            "flagged": [layer.name for layer in self.flagged],
            "notes": list(self.notes),
        }


def quant_report(
    source: str,
    kernels: Iterable[tuple[str, np.ndarray, str | None]],
    threshold_db: float = DEFAULT_LOSS_THRESHOLD_DB,
    *,
    fused_in_memory: bool = False,
    notes: tuple[str, ...] = (),
) -> QuantReport:
    """A report over ``(name, OIHW kernel, block label or None)`` triples.

    Raises:
        UsageError: a threshold that is not a non-negative number.
    """
    _check_threshold(threshold_db)
    layers = tuple(conv_quant_stats(n, w, threshold_db, b) for n, w, b in kernels)
    return QuantReport(source, threshold_db, layers, fused_in_memory, notes)


def _check_threshold(threshold_db: float) -> None:
    if not threshold_db >= 0 or math.isinf(threshold_db):
        raise UsageError(
            f"--loss-threshold must be a non-negative number of dB, got {threshold_db}"
        )


_STORED_NOTE = (
    "figures are of the kernels as the checkpoint stores them; where a plain conv is followed "
    "by a BN, exporting folds the BN in and changes them ('export' reports the graph's own)",
)


def _is_hwio(name: str) -> bool:
    # Keras stores conv kernels as '<layer>/kernel:0', height-width-in-out.
    return name.rsplit("/", 1)[-1].split(":")[0] == "kernel"


Kernel = tuple[str, np.ndarray, str | None]  # name, OIHW kernel, block label


def _stored_kernels(reader: CheckpointReader) -> list[Kernel]:
    out: list[Kernel] = []
    for name, info in reader.tensors.items():
        if len(info.shape) != 4 or info.dtype not in dtypes.FLOAT_DTYPES:
            continue
        array = dtypes.to_float64(reader.read(name), info.dtype)
        out.append((name, from_layout(array, "HWIO") if _is_hwio(name) else array, None))
    return out


def _fused_kernels(state: FusedState) -> list[Kernel]:
    layout = state.plan.dialect.kernel_layout
    block_of = {
        key: block.spec.label
        for block in state.plan.blocks
        for key, role in block.outputs
        if role == "weight"
    }
    dtype_of = {t.name: t.dtype for t in state.plan.outputs}
    out: list[Kernel] = []
    for name, value in state.tensors.items():
        dtype = dtype_of.get(name, "")
        if value.ndim != 4 or dtype not in dtypes.FLOAT_DTYPES:
            continue
        array = from_layout(dtypes.to_float64(value, dtype), layout)
        out.append((name, array, block_of.get(name)))
    return out


def checkpoint_has_blocks(reader: CheckpointReader, options: FuseOptions = FuseOptions()) -> bool:
    """True for a training checkpoint (blocks to fuse), False for a fused or plain one.

    Raises:
        UnfusableBlockError: blocks that cannot be fused (an inconsistent or
            ambiguous one), which is not the same as no block at all.
    """
    from acnet_convert.plan import plan_fusion

    try:
        plan_fusion(reader, options)
    except NoBlockFound:
        return False
    return True


def checkpoint_quant_stats(
    path: Path,
    options: FuseOptions = FuseOptions(),
    threshold_db: float = DEFAULT_LOSS_THRESHOLD_DB,
) -> QuantReport:
    """The figures of every conv kernel a checkpoint deploys.

    A training checkpoint is fused in memory first (``options`` as for
    ``fuse``; nothing is written); a fused or plain one is read as it is.
    Every 4-D floating-point tensor is a conv kernel (Keras ``kernel:0``
    tensors are read as HWIO).

    Raises:
        BadCheckpointError, UnfusableBlockError, VerificationError: as ``fuse``.
        UsageError: a bad threshold or option.

    >>> report = checkpoint_quant_stats(Path("train.pth"))  # doctest: +SKIP
    >>> [layer.name for layer in report.flagged]  # doctest: +SKIP
    ['stage2.block0.conv1.acb.fused_conv.weight']
    """
    from acnet_convert.convert import fuse_state

    _check_threshold(threshold_db)
    with open_checkpoint(path, trust_pickle=options.trust_pickle) as reader:
        if not checkpoint_has_blocks(reader, options):
            return quant_report(
                str(path), _stored_kernels(reader), threshold_db, notes=_STORED_NOTE
            )
        state = fuse_state(reader, dataclasses.replace(options, check=True))
    return quant_report(
        str(path), _fused_kernels(state), threshold_db, fused_in_memory=True, notes=_STORED_NOTE
    )
