"""The ``acnet-convert`` command line: options in, library calls, rendering, exit codes.

Results go to stdout (rich tables, or JSON with ``--json``); status and errors
go to stderr. This is the one place that turns exceptions into exit codes:
0 success, 1 verification mismatch, 2 usage error, 3 unusable input.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from acnet_convert import __version__
from acnet_convert.errors import (
    EXIT_UNUSABLE,
    EXIT_USAGE,
    ACNetConvertError,
    UnfusableBlockError,
    UsageError,
)

__all__ = ["cli", "main"]

EXIT_INTERNAL = 70
F = TypeVar("F", bound=Callable[..., Any])

_EXIT_HELP = """
Exit codes: 0 success, 1 verification found a mismatch, 2 usage error,
3 unusable input (unreadable, corrupt or unsafe file, no block found,
inconsistent block).
"""


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped into a file or grep: keep long key names on one line.
        console = Console(highlight=False, width=200)
    return console


_json_printed: list[bool] = []  # whether a command already printed its JSON document


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, allow_nan=True))
    _json_printed.append(True)


def _json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout."
    )(fn)


_LAYOUT_CHOICE = click.Choice(["deploy", "baseline", "baseline-bias"])


def _naming_options(fn: F) -> F:
    """--dialect and --patterns, which fuse and inspect share."""
    fn = click.option(
        "--patterns",
        type=click.Path(path_type=Path),
        default=None,
        help="TOML file defining extra naming dialects (see README).",
    )(fn)
    return click.option(
        "--family",
        "--dialect",
        "dialect",
        default=None,
        help="Force a block family (acnet, dbb, repvgg, repconv, mobileone, timm, replknet) "
        "or one naming dialect instead of detecting it (see 'inspect').",
    )(fn)


def _trust_option(fn: F) -> F:
    return click.option(
        "--trust-pickle",
        is_flag=True,
        help="Load .pth files with full pickle, which can run code stored in the file. "
        "Only for files you trust; see SECURITY.md.",
    )(fn)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_EXIT_HELP,
)
@click.version_option(__version__, prog_name="acnet-convert")
def cli() -> None:
    """Fuse trained ACNet checkpoints into plain-conv checkpoints, and prove they agree.

    \b
    acnet-convert fuse TRAIN OUT      training checkpoint -> deployable checkpoint
    acnet-convert inspect CKPT        tensors, container and blocks found
    acnet-convert verify TRAIN FUSED  numerical equivalence, for people and CI
    acnet-convert export CKPT OUT.onnx --arch NAME   deployed net as ONNX, checked

    Formats: .pth/.pt (torch), .hdf5/.h5 (upstream ACNet, Keras), .safetensors,
    detected from the file's content.
    """


def _parse_renames(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    import re

    rules = []
    for value in values:
        pattern, sep, replacement = value.partition("=")
        if not sep or not pattern:
            raise UsageError(f"--rename '{value}': expected REGEX=REPLACEMENT")
        try:
            re.compile(pattern)
        except re.error as err:
            raise UsageError(f"--rename '{value}': bad regular expression: {err}") from err
        rules.append((pattern, replacement))
    return tuple(rules)


def _load_patterns(path: Path | None) -> tuple[Any, ...]:
    if path is None:
        return ()
    from acnet_convert.patterns import load_patterns

    return tuple(load_patterns(path))


def _fuse_options(
    eps: float | None,
    no_check: bool,
    layout: str,
    dialect: str | None,
    patterns: Path | None,
    rename: Sequence[str],
    trust_pickle: bool,
    *,
    fold_bn: bool | None = None,
    allow_unfused: bool = False,
) -> Any:
    from acnet_convert.plan import FuseOptions

    return FuseOptions(
        eps=eps,
        check=not no_check,
        layout=layout,
        dialect=dialect,
        extra_dialects=_load_patterns(patterns),
        renames=_parse_renames(rename),
        trust_pickle=trust_pickle,
        fold_bn=fold_bn,
        allow_unfused=allow_unfused,
    )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB, {nbytes:,} bytes" if nbytes >= 100_000 else f"{nbytes:,} bytes"


def _summary(report: Any) -> str:
    check = "checked" if report.checked else "not checked (--no-check)"
    return (
        f"fused {_plural(len(report.blocks), 'block')} ({report.dialect}, {check}): "
        f"{report.params_before:,} -> {report.params_after:,} parameters, "
        f"wrote {report.output} ({report.format_out}, {_size(report.bytes_written)}) in {report.seconds:.2f} s"
    )


def _details(report: Any) -> list[str]:
    """What -v adds: the dialect, and each block's geometry and check figures."""
    lines = [
        f"dialect '{report.dialect}' matched {_plural(len(report.blocks), 'block')} by its "
        f"key patterns; eps {report.eps:g}, layout {report.layout}"
    ]
    for b in report.blocks:
        figures = (
            f", max abs {b.max_abs:.3g}, max rel {b.max_rel:.3g}" if b.max_abs is not None else ""
        )
        lines.append(
            f"block {b.label}: {b.kernel}x{b.kernel} + 1x{b.hor[1]} + {b.ver[0]}x1"
            f"{' + last_bn' if b.last_bn else ''}, {b.dtype}{figures} -> {', '.join(b.outputs)}"
        )
    return lines


@cli.command(epilog=_EXIT_HELP)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to_format",
    type=click.Choice(["pth", "hdf5", "safetensors", "pdparams"]),
    help="Output format (default: from OUT's extension; with --out-dir: the input's).",
)
@click.option(
    "--eps",
    type=float,
    default=None,
    help="BatchNorm epsilon. [default: 1e-5, upstream ACNet's; 1e-3 for Keras files]",
)
@click.option("--no-check", is_flag=True, help="Skip the numerical check of every fused block.")
@click.option("--force", "-f", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--layout",
    type=_LAYOUT_CHOICE,
    default="deploy",
    show_default=True,
    help="deploy: <p>.fused_conv.{weight,bias}; baseline: <u>.conv.weight + identity <u>.bn.*; "
    "baseline-bias: <u>.conv.{weight,bias}.",
)
@_naming_options
@click.option(
    "--rename",
    multiple=True,
    metavar="REGEX=REPLACEMENT",
    help="Rename output keys (repeatable, applied in order).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be written, write nothing.")
@click.option(
    "--fold-bn/--no-fold-bn",
    default=None,
    help="Also fold every plain conv followed by its own BN (<b>.conv + <b>.bn, "
    "<b>.<i> + <b>.<i+1>) into the conv's weight and bias, or never. Default: as the "
    "families' deploy nets do (DBB's fold them; the others' do not).",
)
@click.option(
    "--allow-unfused",
    is_flag=True,
    help="Copy tensors that look like unfused training-time branches through, with a note, "
    "instead of refusing (exit 3).",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Fuse every PATH into this folder (same file name).",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes with --out-dir.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress or summary on stderr.")
@click.option(
    "--verbose", "-v", is_flag=True, help="Also the dialect and each block's figures on stderr."
)
@_trust_option
@_json_option
def fuse(
    paths: tuple[Path, ...],
    to_format: str | None,
    eps: float | None,
    no_check: bool,
    force: bool,
    layout: str,
    dialect: str | None,
    patterns: Path | None,
    rename: tuple[str, ...],
    dry_run: bool,
    fold_bn: bool | None,
    allow_unfused: bool,
    out_dir: Path | None,
    jobs: int,
    quiet: bool,
    verbose: bool,
    trust_pickle: bool,
    as_json: bool,
) -> None:
    """Fuse a training checkpoint: fuse CKPT OUT, or fuse CKPT... --out-dir DIR.

    Every block (square + 1xk + kx1 conv, each with BatchNorm) becomes one
    conv with a bias; every other tensor is copied bit for bit, in order.
    Before writing, each fused block is checked numerically against its
    branches; the output appears only when everything succeeded.
    """
    options = _fuse_options(
        eps,
        no_check,
        layout,
        dialect,
        patterns,
        rename,
        trust_pickle,
        fold_bn=fold_bn,
        allow_unfused=allow_unfused,
    )
    if out_dir is not None:
        sys.exit(_fuse_batch(paths, out_dir, to_format, options, force, jobs, quiet, as_json))
    if len(paths) != 2:
        raise UsageError("fuse takes CKPT OUT (or several CKPTs with --out-dir DIR)")
    source, output = paths
    from acnet_convert.checkpoint import format_for_path
    from acnet_convert.outputs import prepare_output, remove_created

    created = [] if dry_run else prepare_output(source, output, force=force)
    try:
        _fuse_one_file(
            source,
            output,
            format_for_path(output, to_format),
            options,
            force,
            dry_run,
            quiet,
            as_json,
            verbose,
        )
    except BaseException:
        remove_created(created)
        raise


def _fuse_one_file(
    source: Path,
    output: Path,
    fmt: str,
    options: Any,
    force: bool,
    dry_run: bool,
    quiet: bool,
    as_json: bool,
    verbose: bool = False,
) -> None:
    if dry_run:
        _dry_run(source, output, fmt, options, as_json)
        return
    from acnet_convert.convert import fuse_checkpoint

    err = _stderr()
    if quiet or not err.is_terminal:
        report = fuse_checkpoint(source, output, fmt, options, force=force)
    else:
        with err.status("fusing...") as status:

            def progress(stage: str, done: int, total: int) -> None:
                status.update(
                    f"{stage} {source.name}: {done}/{total}"
                    if stage == "fusing"
                    else f"{stage} {output.name}"
                )

            report = fuse_checkpoint(source, output, fmt, options, force=force, progress=progress)
    if not quiet:
        for note in report.notes:
            err.print(f"note: {_escape(note)}")
        if verbose:
            for line in _details(report):
                err.print(_escape(line))
        err.print(_escape(_summary(report)))
    if as_json:
        _emit_json(report.as_json())


def _fuse_batch(
    paths: Sequence[Path],
    out_dir: Path,
    to_format: str | None,
    options: Any,
    force: bool,
    jobs: int,
    quiet: bool,
    as_json: bool,
) -> int:
    from acnet_convert.batch import BatchInterrupted, expand_inputs

    sources = expand_inputs(paths)
    try:
        return _fuse_batch_items(sources, out_dir, to_format, options, force, jobs, quiet, as_json)
    except BatchInterrupted as stop:
        done = ", ".join(i.output for i in stop.completed) or "none"
        rest = ", ".join(str(p) for p in stop.not_completed) or "none"
        message = (
            f"interrupted: {len(stop.completed)} of {len(sources)} outputs were completed and "
            f"are valid ({done}); not written: {rest}"
        )
        if as_json:
            _emit_json(
                {
                    "schema": 1,
                    "ok": False,
                    "interrupted": True,
                    "out_dir": str(out_dir),
                    "completed": [i.output for i in stop.completed],
                    "not_completed": [str(p) for p in stop.not_completed],
                    "error": message,
                }
            )
        _fail(_stderr(), _escape(message), 130)


def _fuse_batch_items(
    sources: Sequence[Path],
    out_dir: Path,
    to_format: str | None,
    options: Any,
    force: bool,
    jobs: int,
    quiet: bool,
    as_json: bool,
) -> int:
    from acnet_convert.batch import fuse_many

    err = _stderr()
    show = not quiet

    def done(item: Any) -> None:
        if not show:
            return
        if item.error:
            err.print(f"[bold red]failed:[/] {_escape(item.error)}")
        else:
            err.print(f"ok: {_escape(item.source)} -> {_escape(item.output)}")

    if show and err.is_terminal and len(sources) > 1:
        from rich.progress import Progress

        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("fusing", total=len(sources))

            def tick(item: Any) -> None:
                done(item)
                bar.advance(task)

            items = fuse_many(
                sources, out_dir, to_format, options, force=force, jobs=jobs, on_done=tick
            )
    else:
        items = fuse_many(
            sources, out_dir, to_format, options, force=force, jobs=jobs, on_done=done
        )
    failed = [i for i in items if i.exit_code != 0]
    if show:
        err.print(f"{len(items) - len(failed)} of {len(items)} checkpoints fused into {out_dir}")
    if as_json:
        _emit_json(
            {
                "schema": 1,
                "out_dir": str(out_dir),
                "results": [
                    {
                        "source": i.source,
                        "output": i.output,
                        "exit_code": i.exit_code,
                        "error": i.error,
                        "report": i.report,
                    }
                    for i in items
                ],
            }
        )
    return max((i.exit_code for i in items), default=0)


def _dry_run(source: Path, output: Path, fmt: str, options: Any, as_json: bool) -> None:
    from acnet_convert.checkpoint import open_checkpoint
    from acnet_convert.plan import plan_fusion

    with open_checkpoint(source, trust_pickle=options.trust_pickle) as reader:
        plan = plan_fusion(reader, options)
        mapping = [
            {"block": b.spec.label, "from": list(b.consumed), "to": [k for k, _ in b.outputs]}
            for b in plan.blocks
        ]
        copied = [{"from": src, "to": dst} for dst, src in plan.origins.items() if src != dst]
    if as_json:
        _emit_json(
            {
                "source": str(source),
                "output": str(output),
                "format_out": fmt,
                "blocks": mapping,
                "renamed": copied,
                "outputs": [t.name for t in plan.outputs],
            }
        )
        return
    from rich.table import Table

    where = f"{_escape(str(source))} -> {_escape(str(output))}"
    table = Table(title=f"dry run: {where} ({fmt}), nothing written")
    table.add_column("block")
    table.add_column("becomes")
    for m in mapping:
        table.add_row(_escape(str(m["block"])), "\n".join(_escape(k) for k in m["to"]))
    for c in copied:
        table.add_row(_escape(str(c["from"])), _escape(str(c["to"])))
    _stdout().print(table)


def _quant_options(fn: F) -> F:
    """--stats, --plot and --loss-threshold (inspect; export reports the figures itself)."""
    fn = click.option(
        "--loss-threshold",
        type=float,
        default=20.0,
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
    from acnet_convert.inspection import inspect_checkpoint, render_inspection

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
            from acnet_convert.exportview import render_quant_report

            render_quant_report(quant, _stdout())
    if result.problem is not None:
        raise result.problem
    if quant is not None and plot is not None:
        from acnet_convert.quantplot import plot_quant_report

        plot_quant_report(quant, plot)
        _stderr().print(f"wrote {_escape(str(plot))}")


_VERIFY_ROWS = 12


@cli.command(epilog=_EXIT_HELP)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="TRAIN FUSED")
@click.option(
    "--arch",
    default=None,
    metavar="NAME",
    help="Rebuild both nets as this built-in architecture (see --list-archs). "
    "[default: the one TRAIN's keys match, else block by block]",
)
@click.option(
    "--model",
    default=None,
    metavar="FILE.py:FACTORY",
    help="Rebuild both nets from your own factory (FILE.py:FACTORY or package.module:FACTORY), "
    "which builds the training-time net.",
)
@click.option(
    "--model-arg",
    multiple=True,
    metavar="KEY=VALUE",
    help="Keyword argument for --model's factory (repeatable; values read as Python literals).",
)
@click.option(
    "--blocks",
    "blocks_only",
    is_flag=True,
    help="Check block by block even where an architecture matches.",
)
@click.option("--list-archs", is_flag=True, help="List the built-in architectures and exit.")
@click.option(
    "--layout",
    type=click.Choice(["auto", "deploy", "baseline", "baseline-bias"]),
    default="auto",
    show_default=True,
    help="FUSED's layout; auto: found from its keys.",
)
@click.option(
    "--family",
    "--dialect",
    "dialect",
    default=None,
    help="Force TRAIN's block family or naming dialect (see 'inspect'). "
    "[default: what FUSED records, else detected]",
)
@click.option(
    "--patterns",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML file defining extra naming dialects, as given to 'fuse'.",
)
@click.option(
    "--rename",
    multiple=True,
    metavar="REGEX=REPLACEMENT",
    help="The renames given to 'fuse' (repeatable). [default: what FUSED records]",
)
@click.option(
    "--eps",
    type=float,
    default=None,
    help="BatchNorm epsilon. [default: the dialect's in block mode, the nets' own otherwise]",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the random input batch."
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Random inputs per check.",
)
@click.option(
    "--input-shape",
    default=None,
    metavar="C,H,W",
    help="Shape of one random input. [default: the architecture's]",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Real input batch [N, C, H, W]: a .npy file, or a .pt file holding one tensor.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda or cuda:N (auto: CUDA where present). TF32 is off on CUDA.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Dtype both nets run in.",
)
@click.option(
    "--rtol",
    type=float,
    default=None,
    help="Pass when max_abs <= atol + rtol * max|reference|. [default: 1e-5 in float32, "
    "1e-10 in float64; 1e-5 where FUSED is stored in float32, 1e-2 float16, 5e-2 bfloat16]",
)
@click.option("--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance.")
@click.option(
    "--junit",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the result as JUnit XML to this file, for CI.",
)
@click.option(
    "--allow-extra",
    is_flag=True,
    help="Pass although FUSED holds tensors that TRAIN does not explain (block mode).",
)
@click.option("--quiet", "-q", is_flag=True, help="No notes or summary on stderr.")
@_trust_option
@_json_option
def verify(
    paths: tuple[Path, ...],
    arch: str | None,
    model: str | None,
    model_arg: tuple[str, ...],
    blocks_only: bool,
    list_archs: bool,
    layout: str,
    dialect: str | None,
    patterns: Path | None,
    rename: tuple[str, ...],
    eps: float | None,
    seed: int,
    batch: int,
    input_shape: str | None,
    input_path: Path | None,
    device: str,
    dtype: str,
    rtol: float | None,
    atol: float,
    junit: Path | None,
    allow_extra: bool,
    quiet: bool,
    trust_pickle: bool,
    as_json: bool,
) -> None:
    """Check that FUSED computes the same function as TRAIN: verify TRAIN FUSED.

    \b
    With --arch (or when TRAIN's keys match one built-in architecture) or
    --model, both nets are rebuilt, loaded strictly and run on the same batch.
    Otherwise every block is rebuilt on its own (training-time branches vs
    the fused conv from FUSED) and checked, which needs no architecture.

    Reports max absolute and relative difference, cosine similarity and, for
    classifiers, top-1 agreement. Exit 1 names the blocks that differ.
    """
    if list_archs:
        _render_archs(as_json)
        return
    if len(paths) != 2:
        raise UsageError("verify takes TRAIN FUSED (or --list-archs)")
    from acnet_convert.extras import require_torch

    require_torch("verify")
    from acnet_convert.verify import (
        VerifyOptions,
        junit_error_xml,
        junit_xml,
        parse_input_shape,
        parse_model_args,
        raise_for_result,
        verify_checkpoints,
    )

    train, fused = paths
    if junit is not None and not junit.parent.is_dir():
        raise UsageError(f"--junit {junit}: the folder '{junit.parent}' does not exist")
    err = _stderr()
    try:
        options = VerifyOptions(
            arch=arch,
            model=model,
            model_args=parse_model_args(model_arg),
            blocks=blocks_only,
            layout=layout,
            dialect=dialect,
            eps=eps,
            seed=seed,
            batch=batch,
            input_shape=parse_input_shape(input_shape) if input_shape is not None else None,
            input_path=input_path,
            device=device,
            dtype=dtype,
            rtol=rtol,
            atol=atol,
            trust_pickle=trust_pickle,
            allow_extra=allow_extra,
            extra_dialects=_load_patterns(patterns),
            renames=_parse_renames(rename),
        )
        try:
            if quiet or not err.is_terminal:
                result = verify_checkpoints(train, fused, options)
            else:
                with err.status(f"verifying {fused.name} against {train.name}..."):
                    result = verify_checkpoints(train, fused, options)
        except UnfusableBlockError as error:
            _raise_if_swapped(train, fused, trust_pickle, error)
            raise
    except ACNetConvertError as error:
        if junit is not None:
            _write_text(junit, junit_error_xml(str(train), str(fused), str(error)))
        raise
    if junit is not None:
        _write_text(junit, junit_xml(result))
    if not quiet:
        for note in result.notes:
            err.print(f"note: {_escape(note)}")
    if as_json:
        _emit_json(result.as_json())
    else:
        _render_verify(result, _stdout())
    if result.passed and not quiet:
        checks = result.checks()
        numeric = [c for c in (*result.cases, *result.block_checks) if c.max_rel == c.max_rel]
        worst = max(numeric, key=lambda c: c.max_rel, default=None)
        figure = f", max_rel {worst.max_rel:.3g}" if worst is not None else ""
        err.print(
            f"verified: {_escape(str(fused))} computes what {_escape(str(train))} computes "
            f"({len(checks)} check(s){figure}; rtol {result.rtol:g}, atol {result.atol:g})"
        )
    raise_for_result(result)


def _raise_if_swapped(train: Path, fused: Path, trust_pickle: bool, error: Exception) -> None:
    """TRAIN has no block but FUSED has: the arguments were given the wrong way round."""
    from acnet_convert.checkpoint import open_checkpoint
    from acnet_convert.plan import FuseOptions, plan_fusion

    try:
        with open_checkpoint(fused, trust_pickle=trust_pickle) as reader:
            plan_fusion(reader, FuseOptions(trust_pickle=trust_pickle))
    except ACNetConvertError:
        return
    raise UsageError(
        f"the arguments look swapped: {train} (TRAIN) holds no training-time block but "
        f"{fused} (FUSED) does; run 'acnet-convert verify {fused} {train}'"
    ) from error


def _write_text(path: Path, text: str) -> None:
    from acnet_convert.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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


@cli.command(epilog=_EXIT_HELP)
@_json_option
def archs(as_json: bool) -> None:
    """List the built-in architectures 'verify --arch' can rebuild."""
    _render_archs(as_json)


@cli.command(epilog=_EXIT_HELP)
@click.option(
    "--example", is_flag=True, help="Print a commented example --patterns file to start from."
)
def patterns(example: bool) -> None:
    """User-defined naming dialects for --patterns FILE (TOML): print an example.

    \b
    acnet-convert patterns --example > my_port.toml
    acnet-convert inspect CKPT --patterns my_port.toml
    """
    from importlib.resources import files

    text = files("acnet_convert").joinpath("data/patterns_example.toml").read_text("utf-8")
    if not example:
        raise UsageError("patterns: pass --example to print an example --patterns file")
    click.echo(text, nl=False)


@cli.command(epilog=_EXIT_HELP)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--arch", default=None, metavar="NAME", help="Built-in architecture (see 'archs').")
@click.option(
    "--model",
    default=None,
    metavar="FILE.py:FACTORY",
    help="Your own factory (FILE.py:FACTORY or package.module:FACTORY) building the "
    "training-time net; its deployed form is factory(deploy=True) where it takes 'deploy'.",
)
@click.option(
    "--model-arg",
    multiple=True,
    metavar="KEY=VALUE",
    help="Keyword argument for --model's factory (repeatable; values read as Python literals).",
)
@click.option(
    "--input-shape",
    default=None,
    metavar="C,H,W",
    help="Shape of one input. [default: the architecture's]",
)
@click.option(
    "--opset",
    type=int,
    default=None,
    help="ONNX opset, 14 or newer. [default: the exporter's, 20 with torch 2.13]",
)
@click.option("--dynamic-batch", is_flag=True, help="Make the batch axis symbolic.")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Seeded inputs per check (with --dynamic-batch, also batch+1).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the test batch.")
@click.option(
    "--rtol",
    type=float,
    default=None,
    help="Pass when max_abs <= atol + rtol * max|reference|. [default: verify's: 1e-5 in "
    "float32; against the training net, 1e-2 for float16 and 5e-2 for bfloat16 checkpoints]",
)
@click.option("--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance.")
@click.option(
    "--eps", type=float, default=None, help="BatchNorm epsilon for fusing. [default: as fuse]"
)
@click.option("--dialect", default=None, help="Force CKPT's naming dialect (see 'inspect').")
@click.option(
    "--loss-threshold",
    type=float,
    default=20.0,
    show_default=True,
    metavar="DB",
    help="Flag a conv when per-tensor int8 costs its worst channel more than this many dB.",
)
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE.png",
    help="Draw the graph's int8 figures per layer (needs pip install 'acnet-convert[plot]').",
)
@click.option("--force", "-f", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No notes or summary on stderr.")
@_trust_option
@_json_option
def export(
    checkpoint: Path,
    output: Path,
    arch: str | None,
    model: str | None,
    model_arg: tuple[str, ...],
    input_shape: str | None,
    opset: int | None,
    dynamic_batch: bool,
    batch: int,
    seed: int,
    rtol: float | None,
    atol: float,
    eps: float | None,
    dialect: str | None,
    loss_threshold: float,
    plot: Path | None,
    force: bool,
    quiet: bool,
    trust_pickle: bool,
    as_json: bool,
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
    try:
        result = _run_export(
            checkpoint, output, arch, model, model_arg, input_shape, opset, dynamic_batch,
            batch, seed, rtol, atol, eps, dialect, loss_threshold, plot, force, trust_pickle,
            quiet,
        )  # fmt: skip
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
    err = _stderr()
    if not quiet:
        for note in result.notes:
            err.print(f"note: {_escape(note)}")
    if as_json:
        _emit_json(result.as_json())
    else:
        from acnet_convert.exportview import render_export

        render_export(result, _stdout())
    if not result.passed:
        from acnet_convert.errors import VerificationError

        raise VerificationError(result.failure_message())
    if plot is not None:
        from acnet_convert.quantplot import plot_quant_report

        plot_quant_report(result.quant, plot)
        if not quiet:
            err.print(f"wrote {_escape(str(plot))}")
    if not quiet:
        worst = max(result.cases, key=lambda c: c.max_rel)
        err.print(
            f"exported {_escape(result.output)} ({result.onnx_bytes:,} bytes, opset "
            f"{result.opset}, {result.onnx_nodes.get('Conv', 0)} Conv nodes) in "
            f"{result.seconds:.2f} s; ONNX Runtime agrees (max_rel {worst.max_rel:.3g})"
        )


def _run_export(
    checkpoint: Path,
    output: Path,
    arch: str | None,
    model: str | None,
    model_arg: Sequence[str],
    input_shape: str | None,
    opset: int | None,
    dynamic_batch: bool,
    batch: int,
    seed: int,
    rtol: float | None,
    atol: float,
    eps: float | None,
    dialect: str | None,
    loss_threshold: float,
    plot: Path | None,
    force: bool,
    trust_pickle: bool,
    quiet: bool,
) -> Any:
    from acnet_convert.export import ExportOptions, export_onnx
    from acnet_convert.verify import parse_input_shape, parse_model_args

    if plot is not None:
        from acnet_convert.quantplot import require_plot_extra

        require_plot_extra()
        if not plot.parent.is_dir():
            raise UsageError(f"--plot {plot}: the folder '{plot.parent}' does not exist")
    options = ExportOptions(
        arch=arch,
        model=model,
        model_args=parse_model_args(model_arg),
        input_shape=parse_input_shape(input_shape) if input_shape is not None else None,
        opset=opset,
        dynamic_batch=dynamic_batch,
        batch=batch,
        seed=seed,
        rtol=rtol,
        atol=atol,
        eps=eps,
        dialect=dialect,
        trust_pickle=trust_pickle,
        force=force,
        loss_threshold_db=loss_threshold,
    )
    err = _stderr()
    if quiet or not err.is_terminal:
        return export_onnx(checkpoint, output, options)
    with err.status(f"exporting {checkpoint.name} to {output.name}..."):
        return export_onnx(checkpoint, output, options)


def _fail(console: Any, message: str, code: int) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``acnet-convert`` command."""
    from acnet_convert.atomic import terminate_as_interrupt

    args = list(argv) if argv is not None else sys.argv[1:]
    as_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
    command = next((a for a in args if not a.startswith("-")), None)

    _json_printed.clear()

    def fail(message: str, code: int, *, escaped: bool = False) -> NoReturn:
        if as_json and not _json_printed:  # a report already printed (verify's exit 1) stays
            _emit_json(
                {"schema": 1, "ok": False, "command": command, "exit_code": code, "error": message}
            )
        _fail(_stderr(), message if escaped else _escape(message), code)

    _ignore_file_size_signal()
    # A numpy warning is never the user's message: bad values are reported as results.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"numpy(\.|$)")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"acnet_convert(\.|$)")
    try:
        # SIGTERM (kill, a CI timeout) must clean up a half-written output like Ctrl-C does.
        with terminate_as_interrupt():
            cli.main(args=args, prog_name="acnet-convert", standalone_mode=False)
    except ACNetConvertError as err:
        fail(str(err), err.exit_code)
    except click.exceptions.Abort:
        fail("interrupted; nothing was written", 130)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    except click.ClickException as err:
        if as_json and not _json_printed:
            _emit_json(
                {
                    "schema": 1,
                    "ok": False,
                    "command": command,
                    "exit_code": EXIT_USAGE,
                    "error": err.format_message(),
                }
            )
        err.show()
        sys.exit(EXIT_USAGE if err.exit_code == 2 else err.exit_code)
    except SystemExit:
        raise
    except MemoryError:
        fail(
            "out of memory while reading the input; is the file what it claims to be?",
            EXIT_UNUSABLE,
        )
    except OSError as err:  # the environment (permissions, disk, limits), not a bug
        from acnet_convert.outputs import describe_os_error

        fail(*describe_os_error(err))
    except Exception as err:  # a bug, not the user's fault: say so in one line
        fail(
            f"internal error ({type(err).__name__}: {err}); please report it with the command you ran",
            EXIT_INTERNAL,
        )
    sys.exit(0)


def _ignore_file_size_signal() -> None:
    """Let a write past ``ulimit -f`` fail with EFBIG (a clear error) instead of killing us."""
    import contextlib
    import signal

    if hasattr(signal, "SIGXFSZ"):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _escape(text: str) -> str:
    import re

    from rich.markup import escape

    # Names come from the file: show control characters (a newline, a terminal escape
    # sequence) as Python escapes, so a message stays one harmless line.
    # Lone surrogates (from a pickle's names) cannot be printed at all: escape them too.
    return escape(
        re.sub(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", lambda m: repr(m.group())[1:-1], text)
    )
