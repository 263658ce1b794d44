"""``acnet-convert export``: the deployed net as ONNX, proven against the checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from acnet_convert.cli.app import (
    _EXIT_HELP,
    _emit_json,
    _parse_network,
    _status,
    _stderr,
    cli,
)
from acnet_convert.cli.options import (
    batch_option,
    eps_option,
    force_option,
    input_shape_option,
    json_option,
    loss_threshold_option,
    network_options,
    plot_option,
    quiet_option,
    seed_option,
    tolerance_options,
    trust_option,
)
from acnet_convert.cli.render import _check_plot, _escape, _show_result, _write_plot
from acnet_convert.errors import ACNetConvertError, VerificationError

__all__ = ["export"]

if TYPE_CHECKING:
    from acnet_convert.export import ExportOptions, ExportResult


@cli.command(epilog=_EXIT_HELP)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path, dir_okay=False))
@network_options(
    arch_help="Built-in architecture (see 'archs').",
    model_help="Your own factory (FILE.py:FACTORY or package.module:FACTORY) building the "
    "training-time net; its deployed form is factory(deploy=True) where it takes 'deploy'.",
)
@input_shape_option("Shape of one input. [default: the architecture's]")
@click.option(
    "--opset",
    type=int,
    default=None,
    help="ONNX opset, 14 or newer. [default: the exporter's, 20 with torch 2.13]",
)
@click.option("--dynamic-batch", is_flag=True, help="Make the batch axis symbolic.")
@batch_option(2, "Seeded inputs per check (with --dynamic-batch, also batch+1).")
@seed_option("Seed of the test batch.")
@tolerance_options(
    "verify's: 1e-5 in float32; against the training net, 1e-2 for float16 and 5e-2 "
    "for bfloat16 checkpoints"
)
@eps_option("BatchNorm epsilon for fusing. [default: as fuse]")
@click.option("--dialect", default=None, help="Force CKPT's naming dialect (see 'inspect').")
@loss_threshold_option(
    "Flag a conv when per-tensor int8 costs its worst channel more than this many dB."
)
@plot_option("Draw the graph's int8 figures per layer (needs pip install 'acnet-convert[plot]').")
@force_option
@quiet_option("No notes or summary on stderr.")
@trust_option
@json_option
def export(
    checkpoint: Path,
    output: Path,
    model_arg: tuple[str, ...],
    input_shape: str | None,
    loss_threshold: float,
    plot: Path | None,
    quiet: bool,
    as_json: bool,
    **fields: Any,
) -> None:
    """Export the deployed net as one ONNX file and prove it: export CKPT OUT.onnx --arch NAME.

    \b
    CKPT is a training checkpoint (fused in memory first, as 'fuse' would) or a
    fused one. The deployed net is built (--arch or --model), loaded strictly and
    exported with torch.onnx, weights inside the file; ONNX Runtime (CPU) then runs
    it on a seeded batch, compared with the PyTorch deployed net and, for a training
    checkpoint, the training-time net. OUT appears only when they agree (exit 1 otherwise).
    Needs the export extra: pip install 'acnet-convert[export]'.
    """
    with _json_on_error(checkpoint, output, as_json):
        from acnet_convert.export import ExportOptions

        _check_plot(plot)
        model_args, shape = _parse_network(model_arg, input_shape)
        # The options named as ExportOptions' fields (--arch, --opset, --force...) pass as given.
        options = ExportOptions(
            **fields, model_args=model_args, input_shape=shape, loss_threshold_db=loss_threshold
        )
        result = _run_export(checkpoint, output, options, quiet)
    from acnet_convert.cli.exportview import render_export

    _show_result(result, render_export, quiet=quiet, as_json=as_json)
    if not result.passed:
        raise VerificationError(result.failure_message())
    if plot is not None:
        _write_plot(result.quant, plot, quiet=quiet)
    if not quiet:
        _stderr().print(_exported_line(result))


@contextlib.contextmanager
def _json_on_error(checkpoint: Path, output: Path, as_json: bool) -> Iterator[None]:
    """With --json, a user error before the result still prints export's JSON document."""
    try:
        yield
    except ACNetConvertError as error:
        if as_json:
            _emit_json(
                {
                    "schema": 1,
                    "report": "acnet-convert export",
                    "passed": False,
                    "source": str(checkpoint),
                    "output": str(output),
                    "written": False,
                    "error": str(error),
                    "exit_code": error.exit_code,
                }
            )
        raise


def _run_export(
    checkpoint: Path, output: Path, options: ExportOptions, quiet: bool
) -> ExportResult:
    from acnet_convert.export import export_onnx

    with _status(f"exporting {checkpoint.name} to {output.name}...", quiet=quiet):
        return export_onnx(checkpoint, output, options)


def _exported_line(result: ExportResult) -> str:
    """The one line a passing export ends with: the file, its size and nodes, the agreement."""
    worst = max(result.cases, key=lambda c: c.max_rel)
    return (
        f"exported {_escape(result.output)} ({result.onnx_bytes:,} bytes, opset "
        f"{result.opset}, {result.onnx_nodes.get('Conv', 0)} Conv nodes) in "
        f"{result.seconds:.2f} s; ONNX Runtime agrees (max_rel {worst.max_rel:.3g})"
    )
