"""Rendering results for people: summaries, tables, and the one display-escaping helper."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from acnet_convert.cli.app import _emit_json, _plural, _require_folder, _size, _stderr, _stdout

if TYPE_CHECKING:
    from pathlib import Path

    from acnet_convert.blocks import BranchGeometry
    from acnet_convert.inspection import Inspection
    from acnet_convert.quant import QuantReport

__all__ = ["render_inspection"]


def _summary(report: Any) -> str:
    check = "checked" if report.checked else "not checked (--no-check)"
    return (
        f"fused {_plural(len(report.blocks), 'block')} ({report.dialect}, {check}): "
        f"{report.params_before:,} -> {report.params_after:,} parameters, "
        f"wrote {report.output} ({report.format_out}, {_size(report.bytes_written)}) in {report.seconds:.2f} s"
    )


def _details(report: Any) -> list[str]:
    """What -v adds: the dialect, and each block's geometry and check figures."""
    from acnet_convert.families import family_title

    lines = [
        f"dialect '{report.dialect}' matched {_plural(len(report.blocks), 'block')} by its "
        f"key patterns; eps {report.eps:g}, layout {report.layout}"
    ]
    for b in report.blocks:
        figures = (
            f", max abs {b.max_abs:.3g}, max rel {b.max_rel:.3g}" if b.max_abs is not None else ""
        )
        family = "" if b.family == "acnet" else f" ({family_title(b.family)})"
        shape = " + ".join(_branch_text(branch) for branch in b.branches)
        lines.append(
            f"block {b.label}{family}: {shape}{' + last_bn' if b.last_bn else ''}, "
            f"{b.dtype}{figures} -> {', '.join(b.outputs)}"
        )
    return lines


_VERIFY_ROWS = 12


def _render_verify(result: Any, console: Any) -> None:
    from rich.table import Table

    def fmt(value: float | None, spec: str = ".3g") -> str:
        # NaN: a check that lists tensors (missing, extra) and has no figures.
        return "-" if value is None or value != value else format(value, spec)

    def table(title: str, cases: Sequence[Any], network: bool) -> Any:
        t = Table(title=title, title_justify="left")
        t.add_column("check")
        for name in ("max abs", "max rel", "cosine"):
            t.add_column(name, justify="right")
        if network:
            t.add_column("top-1", justify="right")
        t.add_column("result")
        shown = list(cases)
        hidden = 0
        if len(shown) > _VERIFY_ROWS:  # keep it short: every failure, then the closest calls
            failing = [c for c in shown if not c.passed]
            passing = sorted((c for c in shown if c.passed), key=lambda c: -c.max_rel)
            keep = {id(c) for c in failing + passing[: max(3, _VERIFY_ROWS - len(failing))]}
            hidden = len(shown) - len(keep)
            shown = [c for c in shown if id(c) in keep]
        for c in shown:
            row = [_escape(c.name), fmt(c.max_abs), fmt(c.max_rel), fmt(c.cosine, ".9f")]
            if network:
                row.append("-" if c.top1_agreement is None else f"{c.top1_agreement:.1%}")
            row.append("ok" if c.passed else "[bold red]FAIL[/]")
            t.add_row(*row)
        if hidden:
            t.add_row(f"... {hidden} more, all within tolerance", *[""] * (len(t.columns) - 1))
        return t

    what = {
        "arch": f"architecture {result.arch}",
        "model": f"model {result.model}",
        "blocks": "block by block",
    }
    network = result.mode != "blocks"
    inputs = f"input {result.input}" + (
        f" [{result.batch}, {', '.join(map(str, result.input_shape))}]"
        if result.input_shape
        else f", batch {result.batch}"
    )
    title = (
        f"verify {_escape(result.train)} -> {_escape(result.fused)}\n"
        f"{_escape(what[result.mode])}, FUSED layout {result.layout}, "
        f"{result.device} {result.dtype}, rtol {result.rtol:g}, atol {result.atol:g}, "
        f"seed {result.seed}, {_escape(inputs)}"
    )
    failing_blocks = [c for c in result.block_checks if not c.passed]
    console.print(table(title, [*result.checks(), *failing_blocks], network))


def _render_archs(as_json: bool) -> None:
    from acnet_convert.verify import arch_rows

    rows = arch_rows()
    if as_json:
        _emit_json([r.as_json() for r in rows])
        return
    from rich.table import Table

    table = Table(title="built-in architectures (verify --arch NAME)", title_justify="left")
    for name in ("name", "input", "classes", "description"):
        table.add_column(name)
    for r in rows:
        table.add_row(
            r.name, ",".join(map(str, r.input_shape)), str(r.num_classes), _escape(r.description)
        )
    _stdout().print(table)


def _escape(text: str) -> str:
    """Text from a file (a key, a path, a message) as literal rich text on one line."""
    import re

    from rich.markup import escape

    # Names come from the file: show control characters (a newline, a terminal escape
    # sequence) as Python escapes, so a message stays one harmless line.
    # Lone surrogates (from a pickle's names) cannot be printed at all: escape them too.
    return escape(
        re.sub(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", lambda m: repr(m.group())[1:-1], text)
    )


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _branch_text(branch: BranchGeometry) -> str:
    size = f"{branch.kernel[0]}x{branch.kernel[1]}"
    return size if branch.kind == "conv" else f"{branch.kind} {size}"


def render_inspection(result: Inspection, console: Any) -> None:
    """Print an :class:`Inspection` as rich tables."""
    from rich.table import Table

    head = f"{_escape(result.path)}: {result.format}, {_escape(result.container)}"
    if result.prefix:
        head += f", keys prefixed '{_escape(result.prefix)}'"
    console.print(head)
    _print_notes(console, result.notes)
    if result.dropped:
        console.print(f"other entries (dropped on fuse): {_escape(', '.join(result.dropped))}")
    table = Table(title=f"{len(result.listed)} of {len(result.tensors)} tensors")
    table.add_column("name", overflow="fold")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("elements", justify="right")
    for t in result.listed:
        table.add_row(_escape(t.name), _shape(t.shape), t.dtype, f"{t.numel:,}")
    console.print(table)
    params = sum(t.numel for t in result.tensors)
    nbytes = sum(t.nbytes for t in result.tensors)
    plan = result.plan
    if plan is None:
        if result.problem is None:
            console.print(
                "no training-time blocks found: the checkpoint looks fused or plain already"
            )
        console.print(f"total: {params:,} parameters, {nbytes:,} bytes")
        return
    blocks = Table(
        title=f"{len(plan.blocks)} blocks ({plan.dialect_names} dialect, eps {plan.eps:g})"
    )
    for col in ("block", "kernel", "branches", "channels", "last_bn", "affine", "becomes"):
        blocks.add_column(col, overflow="fold")
    for b in plan.blocks:
        g = b.geometry
        blocks.add_row(
            _escape(b.spec.label),
            f"{g.kh}x{g.kw}",
            _escape(", ".join(_branch_text(x) for x in g.branches[1:])),
            f"{g.in_per_group}->{g.out_channels}",
            "yes" if g.has_last_bn else "no",
            "yes" if g.affine else "no",
            _escape(", ".join(k for k, _ in b.outputs)),
        )
    console.print(blocks)
    for suspect in plan.suspects:
        console.print(
            f"[yellow]suspicious:[/] {_escape(suspect.name)} ({len(suspect.keys)} tensors): "
            f"looks like {_escape(suspect.what)}; fuse refuses it unless --allow-unfused"
        )
    console.print(
        f"total: {params:,} parameters, {nbytes:,} bytes now; "
        f"{plan.params_after:,} parameters, {plan.bytes_after:,} bytes after fusing"
    )


def _show_result(
    result: Any, render: Callable[[Any, Any], None], *, quiet: bool, as_json: bool
) -> None:
    """A command's notes on stderr (unless quiet), then its JSON or its rendering on stdout."""
    if not quiet:
        _print_notes(_stderr(), result.notes)
    if as_json:
        _emit_json(result.as_json())
    else:
        render(result, _stdout())


def _print_notes(console: Any, notes: Sequence[str]) -> None:
    for note in notes:
        console.print(f"note: {_escape(note)}")


def _check_plot(plot: Path | None) -> None:
    """Refuse --plot early: without the plot extra, or into a folder that does not exist."""
    if plot is not None:
        from acnet_convert.quantplot import require_plot_extra

        require_plot_extra()
        _require_folder("--plot", plot)


def _write_plot(quant: QuantReport, plot: Path, *, quiet: bool) -> None:
    """Draw --plot's PNG, and say so on stderr unless quiet."""
    from acnet_convert.quantplot import plot_quant_report

    plot_quant_report(quant, plot)
    if not quiet:
        _stderr().print(f"wrote {_escape(str(plot))}")
