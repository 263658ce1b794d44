"""``--plot FILE.png``: the int8 figures of :mod:`acnet_convert.quant`, one point per layer.

Needs matplotlib (the ``plot`` extra); the PNG is written atomically.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from acnet_convert.atomic import atomic_output
from acnet_convert.errors import ACNetConvertError, UsageError
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
    """Draw, one point per layer: int8 SQNR (worst channel under each scheme, whole
    kernel per tensor), the loss that flags a layer against the threshold (dashed),
    and the channel range spread. Flagged layers are red.

    Raises:
        UsageError: matplotlib missing or PATH's folder missing.
        ACNetConvertError: no conv kernel to draw.
    """
    require_plot_extra()
    if not report.layers:
        raise ACNetConvertError(f"--plot: {report.source} has no conv kernel to draw")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: the folder '{path.parent}' does not exist")
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    layers = report.layers
    x = np.arange(len(layers))
    flagged = np.array([layer.flagged for layer in layers])
    colours = ["red" if f else "tab:green" for f in flagged]
    fig, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(max(6.0, 0.28 * len(layers) + 2.5), 7.0), sharex=True
    )
    try:
        for attr, style, label in (
            ("worst_channel_db", "o-", "worst channel, per-channel scales"),
            ("worst_tensor_db", "s-", "worst channel, one scale per tensor"),
            ("sqnr_tensor_db", ":", "whole kernel, one scale per tensor"),
        ):
            values = [min(getattr(layer, attr), 99.0) for layer in layers]
            top.plot(x, values, style, ms=3, lw=1, label=label)
        top.set_ylabel("int8 SQNR (dB)")
        top.legend(fontsize=7, loc="lower left")
        top.grid(alpha=0.3)
        middle.bar(x, [min(layer.loss_db, 99.0) for layer in layers], color=colours)
        middle.axhline(report.threshold_db, color="grey", ls="--", lw=0.8)
        middle.set_ylabel(f"loss (dB)\nflag > {report.threshold_db:g}")
        middle.grid(alpha=0.3, axis="y")
        spreads = [layer.channel_spread for layer in layers]
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
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)
