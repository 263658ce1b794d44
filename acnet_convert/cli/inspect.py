"""``acnet-convert inspect``: a checkpoint's tensors, blocks and (--stats) quantisation figures."""

from __future__ import annotations

from pathlib import Path

import click

from acnet_convert.cli.app import _EXIT_HELP, _emit_json, _stdout, cli
from acnet_convert.cli.fuse import _fuse_options
from acnet_convert.cli.options import (
    eps_option,
    fold_bn_option,
    json_option,
    layout_option,
    loss_threshold_option,
    naming_options,
    plot_option,
    rename_option,
    trust_option,
)
from acnet_convert.cli.render import _check_plot, _write_plot

__all__ = ["inspect"]


@cli.command(epilog=_EXIT_HELP)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--filter",
    "name_filter",
    default=None,
    metavar="REGEX",
    help="Only list tensors whose name matches.",
)
@naming_options()
@eps_option("BatchNorm epsilon assumed for the 'after fusing' figures.")
@layout_option("Layout assumed for the 'after fusing' figures.")
@rename_option("Show output names after these renames.")
@fold_bn_option(
    "Count plain conv+BN units as folded (or not) in the blocks and 'after fusing' figures, "
    "as for fuse. Default: as the families' deploy nets do (DBB's fold them)."
)
@click.option(
    "--stats",
    is_flag=True,
    help="Int8 readiness of every conv: weight range, channel spread, SQNR per tensor "
    "vs per channel (see README).",
)
@plot_option(
    "Draw the int8 figures per layer into a PNG (needs matplotlib: "
    "pip install 'acnet-convert[plot]'). Implies --stats."
)
@loss_threshold_option(
    "Flag a conv when per-tensor int8 costs its worst output channel more than "
    "this many dB of SQNR against per-channel scales (6 dB is one bit)."
)
@trust_option
@json_option
def inspect(
    checkpoint: Path,
    name_filter: str | None,
    dialect: str | None,
    patterns: Path | None,
    eps: float | None,
    layout: str,
    rename: tuple[str, ...],
    fold_bn: bool | None,
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

    options = _fuse_options(
        eps, False, layout, dialect, patterns, rename, trust_pickle, fold_bn=fold_bn
    )
    _check_plot(plot)
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
        _write_plot(quant, plot, quiet=False)
