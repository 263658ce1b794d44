"""Rich tables for ``export`` (before/after, ONNX nodes, comparisons) and ``--stats``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from acnet_convert.export import ExportResult
    from acnet_convert.quant import QuantReport

from acnet_convert.cli.render import _escape

__all__ = ["render_export", "render_quant_report"]

_QUANT_ROWS = 30  # longer reports show every flagged layer, then the worst of the rest


def _db(value: float) -> str:
    return "exact" if math.isinf(value) and value > 0 else f"{value:.1f}"


def _macs(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return str(value)


def render_quant_report(report: QuantReport, console: Any, title: str | None = None) -> None:
    """The per-conv int8 figures as a table, then a one-line verdict."""
    from rich.table import Table

    layers = list(report.layers)
    hidden = 0
    if len(layers) > _QUANT_ROWS:
        keep = {id(x) for x in report.flagged}
        rest = sorted((x for x in layers if not x.flagged), key=lambda x: -x.loss_db)
        keep |= {id(x) for x in rest[: max(5, _QUANT_ROWS - len(keep))]}
        hidden = len(layers) - len(keep)
        layers = [x for x in layers if id(x) in keep]
    table = Table(
        title=title or f"int8 readiness of {_escape(report.source)} (symmetric, -127..127)",
        title_justify="left",
    )
    table.add_column("conv", overflow="fold")
    table.add_column("shape")
    for name in (
        "w min",
        "w max",
        "ch spread",
        "SQNR tensor",
        "SQNR channel",
        "worst ch tensor",
        "worst ch channel",
        "loss dB",
    ):
        table.add_column(name, justify="right")
    table.add_column("flag")
    for x in layers:
        spread = "inf" if math.isinf(x.channel_spread) else f"{x.channel_spread:.3g}"
        if x.zero_channels:
            spread += f" ({x.zero_channels} zero)"
        table.add_row(
            _escape(x.name),
            "x".join(map(str, x.shape)),
            f"{x.w_min:.3g}",
            f"{x.w_max:.3g}",
            spread,
            _db(x.sqnr_tensor_db),
            _db(x.sqnr_channel_db),
            _db(x.worst_tensor_db),
            _db(x.worst_channel_db),
            _db(x.loss_db),
            "[bold red]per-channel[/]" if x.flagged else "",
        )
    if hidden:
        table.add_row(f"... {hidden} more, none flagged", *[""] * 10)
    console.print(table)
    flagged = report.flagged
    console.print(
        f"{len(flagged)} of {len(report.layers)} convs flagged: per-tensor int8 costs their "
        f"worst output channel more than {report.threshold_db:g} dB of SQNR against per-channel"
        + ("; quantize them per channel or keep them in higher precision" if flagged else "")
    )


def render_export(result: ExportResult, console: Any) -> None:
    """Before/after table, ONNX nodes by op type, the comparisons, and the int8 figures."""
    from rich.table import Table

    before = Table(
        title=f"{_escape(result.network)} -> {_escape(result.output)} "
        f"(opset {result.opset}, input {'N' if result.dynamic_batch else ''}"
        f"[{', '.join(map(str, result.input_shape))}])",
        title_justify="left",
    )
    before.add_column("")
    before.add_column("training net", justify="right")
    before.add_column("deployed net", justify="right")
    t, d = result.trained, result.deployed
    for label, attr, fmt in (
        ("conv layers", "conv_layers", str),
        ("parameters", "params", lambda v: f"{v:,}"),
        ("MACs (one input)", "macs", _macs),
    ):
        before.add_row(label, fmt(getattr(t, attr)) if t else "-", fmt(getattr(d, attr)))
    console.print(before)
    nodes = Table(title="ONNX nodes by op", title_justify="left")
    nodes.add_column("op")
    nodes.add_column("count", justify="right")
    for op, count in result.onnx_nodes.items():
        nodes.add_row(op, str(count))
    nodes.add_row("total", str(sum(result.onnx_nodes.values())))
    console.print(nodes)
    checks = Table(title="ONNX Runtime (CPU) vs PyTorch, seeded batch", title_justify="left")
    checks.add_column("check")
    for name in ("max abs", "max rel", "cosine", "top-1", "allowed"):
        checks.add_column(name, justify="right")
    checks.add_column("result")
    for c in result.cases:
        checks.add_row(
            _escape(c.name),
            f"{c.max_abs:.3g}",
            f"{c.max_rel:.3g}",
            f"{c.cosine:.9f}",
            "-" if c.top1_agreement is None else f"{c.top1_agreement:.1%}",
            f"{c.allowed:.3g}",
            "ok" if c.passed else "[bold red]FAIL[/]",
        )
    console.print(checks)
    render_quant_report(result.quant, console, "int8 readiness of the graph's Conv weights")
