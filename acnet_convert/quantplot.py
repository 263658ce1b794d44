"""``--plot FILE.png``: the int8 figures of :mod:`acnet_convert.quant`, one point per layer.

Needs matplotlib (the ``plot`` extra); the PNG is written atomically.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from acnet_convert.atomic import atomic_output
from acnet_convert.errors import UsageError
from acnet_convert.quant import QuantReport

__all__ = ["PLOT_HINT", "plot_quant_report", "require_plot_extra"]

PLOT_HINT = "pip install 'acnet-convert[plot]' (matplotlib)"
_MAX_LABELS = 40  # more layers than this: number the x axis instead of naming each layer


def require_plot_extra() -> None:
    """Raise UsageError saying how to install matplotlib when it is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}")


def _short(name: str, width: int = 28) -> str:
    for suffix in (".weight", "/kernel:0", ".fused_conv"):
        name = name.removesuffix(suffix)
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def plot_quant_report(report: QuantReport, path: Path) -> None:
    """Draw the worst channel's SQNR per tensor and per channel (top) and the channel
    range spread (bottom), one point per layer.

    Flagged layers are marked in red; the dashed line in the top panel is the
    per-channel figure minus the threshold, below which the per-tensor one flags a layer.

    Raises:
        UsageError: matplotlib missing, no layer to draw, or PATH's folder missing.
    """
    require_plot_extra()
    if not report.layers:
        raise UsageError(f"--plot: {report.source} has no conv kernel to draw")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: the folder '{path.parent}' does not exist")
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    layers = report.layers
    x = np.arange(len(layers))
    finite = [min(layer.worst_channel_db, 99.0) for layer in layers]
    tensor = [min(layer.worst_tensor_db, 99.0) for layer in layers]
    flagged = np.array([layer.flagged for layer in layers])
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6.0, 0.28 * len(layers) + 2.5), 5.6), sharex=True
    )
    try:
        top.plot(x, finite, "o-", color="tab:blue", ms=3, label="per channel")
        top.plot(x, tensor, "s-", color="tab:orange", ms=3, label="per tensor")
        top.plot(
            x,
            [v - report.threshold_db for v in finite],
            "--",
            color="grey",
            lw=0.8,
            label=f"per channel - {report.threshold_db:g} dB",
        )
        top.scatter(x[flagged], np.array(tensor)[flagged], s=40, color="red", zorder=3,
                    label="flagged")  # fmt: skip
        top.set_ylabel("worst channel's\nint8 SQNR (dB)")
        top.legend(fontsize=7, loc="lower left")
        top.grid(alpha=0.3)
        spreads = [layer.channel_spread for layer in layers]
        colours = ["red" if f else "tab:green" for f in flagged]
        bottom.bar(x, spreads, color=colours)
        bottom.set_yscale("log")
        finite_spreads = [v for v in spreads if np.isfinite(v)] or [1.0]
        bottom.set_ylim(1.0, max(10.0, 2.0 * max(finite_spreads)))
        bottom.set_ylabel("channel range spread\n(max/min of max|w|)")
        bottom.grid(alpha=0.3, axis="y")
        if len(layers) <= _MAX_LABELS:
            bottom.set_xticks(x, [_short(layer.name) for layer in layers], rotation=75, fontsize=6)
        else:
            bottom.set_xlabel("conv layer (in order)")
        fig.suptitle(f"{Path(report.source).name}: symmetric int8 weights", fontsize=9)
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
