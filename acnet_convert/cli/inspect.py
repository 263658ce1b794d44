"""``acnet-convert inspect``: a checkpoint's tensors, blocks and (--stats) quantisation figures."""

from __future__ import annotations

from pathlib import Path

import click

from acnet_convert.choices import DEFAULT_LOSS_THRESHOLD_DB
from acnet_convert.cli.app import (
    _EXIT_HELP,
    _LAYOUT_CHOICE,
    F,
    _emit_json,
    _json_option,
    _naming_options,
    _stderr,
    _stdout,
    _trust_option,
    cli,
)
from acnet_convert.cli.fuse import _fuse_options
from acnet_convert.cli.render import _escape

__all__ = ["inspect"]


def _quant_options(fn: F) -> F:
    """--stats, --plot and --loss-threshold (inspect; export reports the figures itself)."""
    fn = click.option(
        "--loss-threshold",
        type=float,
        default=DEFAULT_LOSS_THRESHOLD_DB,
        show_default=True,
        metavar="DB",
        help="Flag a conv when per-tensor int8 costs its worst output channel more than "
        "this many dB of SQNR against per-channel scales (6 dB is one bit).",
    )(fn)
    fn = click.option(
        "--plot",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        metavar="FILE.png",
        help="Draw the int8 figures per layer into a PNG (needs matplotlib: "
        "pip install 'acnet-convert[plot]'). Implies --stats.",
    )(fn)
    return click.option(
        "--stats",
        is_flag=True,
        help="Int8 readiness of every conv: weight range, channel spread, SQNR per tensor "
        "vs per channel (see README).",
    )(fn)


@cli.command(epilog=_EXIT_HELP)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--filter",
    "name_filter",
    default=None,
    metavar="REGEX",
    help="Only list tensors whose name matches.",
)
@_naming_options
@click.option(
    "--eps",
    type=float,
    default=None,
    help="BatchNorm epsilon assumed for the 'after fusing' figures.",
)
@click.option(
    "--layout",
    type=_LAYOUT_CHOICE,
    default="deploy",
    show_default=True,
    help="Layout assumed for the 'after fusing' figures.",
)
@click.option(
    "--rename",
    multiple=True,
    metavar="REGEX=REPLACEMENT",
    help="Show output names after these renames.",
)
@_quant_options
@_trust_option
@_json_option
def inspect(
    checkpoint: Path,
    name_filter: str | None,
    dialect: str | None,
    patterns: Path | None,
    eps: float | None,
    layout: str,
    rename: tuple[str, ...],
    stats: bool,
    plot: Path | None,
    loss_threshold: float,
    trust_pickle: bool,
    as_json: bool,
) -> None:
    """Show a checkpoint's tensors (name, shape, dtype, elements), its container and format,
    and the blocks found, with totals now and after fusing.

    With --stats (or --plot), also the int8 readiness of every conv the checkpoint deploys
    (a training checkpoint is fused in memory first): weight range, channel range spread,
    and SQNR of symmetric int8 per tensor vs per output channel.
    """
    from acnet_convert.cli.render import render_inspection
    from acnet_convert.inspection import inspect_checkpoint

    options = _fuse_options(eps, False, layout, dialect, patterns, rename, trust_pickle)
    if plot is not None:
        from acnet_convert.quantplot import require_plot_extra

        require_plot_extra()
    result = inspect_checkpoint(checkpoint, options, name_filter)
    quant = None
    if (stats or plot is not None) and result.problem is None:
        from acnet_convert.quant import checkpoint_quant_stats

        quant = checkpoint_quant_stats(checkpoint, options, loss_threshold)
    if as_json:
        document = result.as_json()
        if quant is not None:
            document["quantization"] = quant.as_json()
        _emit_json(document)
    else:
        render_inspection(result, _stdout())
        if quant is not None:
            from acnet_convert.cli.exportview import render_quant_report

            render_quant_report(quant, _stdout())
    if result.problem is not None:
        raise result.problem
    if quant is not None and plot is not None:
        from acnet_convert.quantplot import plot_quant_report

        plot_quant_report(quant, plot)
        _stderr().print(f"wrote {_escape(str(plot))}")
