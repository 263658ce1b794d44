"""The ``acnet-convert`` command line: options in, library calls, rendering, exit codes.

Results go to stdout (rich tables, or JSON with ``--json``); status and errors
go to stderr. This is the one place that turns exceptions into exit codes:
0 success, 1 verification mismatch, 2 usage error, 3 unusable input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from acnet_convert import __version__
from acnet_convert.errors import EXIT_UNUSABLE, EXIT_USAGE, ACNetConvertError, UsageError

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


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, allow_nan=True))


def _json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout.")(fn)


def _trust_option(fn: F) -> F:
    return click.option(
        "--trust-pickle",
        is_flag=True,
        help="Load .pth files with full pickle, which can run code stored in the file. "
        "Only for files you trust; see SECURITY.md.",
    )(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=_EXIT_HELP)
@click.version_option(__version__, prog_name="acnet-convert")
def cli() -> None:
    """Fuse trained ACNet checkpoints into plain-conv checkpoints, and prove they agree.

    \b
    acnet-convert fuse TRAIN OUT      training checkpoint -> deployable checkpoint
    acnet-convert inspect CKPT        tensors, container and blocks found
    acnet-convert verify TRAIN FUSED  numerical equivalence, for people and CI

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
) -> Any:
    from acnet_convert.convert import FuseOptions

    return FuseOptions(
        eps=eps,
        check=not no_check,
        layout=layout,
        dialect=dialect,
        extra_dialects=_load_patterns(patterns),
        renames=_parse_renames(rename),
        trust_pickle=trust_pickle,
    )


def _summary(report: Any) -> str:
    check = "checked" if report.checked else "not checked (--no-check)"
    return (
        f"fused {len(report.blocks)} blocks ({report.dialect}, {check}): "
        f"{report.params_before:,} -> {report.params_after:,} parameters, "
        f"wrote {report.output} ({report.format_out}, {report.bytes_written:,} bytes) in {report.seconds:.2f} s"
    )


@cli.command(epilog=_EXIT_HELP)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--to", "to_format", type=click.Choice(["pth", "hdf5", "safetensors"]), help="Output format (default: from OUT's extension; with --out-dir: the input's).")
@click.option("--eps", type=float, default=None, help="BatchNorm epsilon. [default: 1e-5, upstream ACNet's; 1e-3 for Keras files]")
@click.option("--no-check", is_flag=True, help="Skip the numerical check of every fused block.")
@click.option("--force", "-f", is_flag=True, help="Replace OUT if it exists.")
@click.option("--layout", type=click.Choice(["deploy", "baseline", "baseline-bias"]), default="deploy", show_default=True,
              help="deploy: <p>.fused_conv.{weight,bias}; baseline: <u>.conv.weight + identity <u>.bn.*; "
              "baseline-bias: <u>.conv.{weight,bias}.")
@click.option("--dialect", default=None, help="Force a naming dialect instead of detecting it (see 'inspect').")
@click.option("--patterns", type=click.Path(path_type=Path), default=None, help="TOML file defining extra naming dialects.")
@click.option("--rename", multiple=True, metavar="REGEX=REPLACEMENT", help="Rename output keys (repeatable, applied in order).")
@click.option("--dry-run", is_flag=True, help="Show what would be written, write nothing.")
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=None, help="Fuse every PATH into this folder (same file name).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes with --out-dir.")
@click.option("--quiet", "-q", is_flag=True, help="No progress or summary on stderr.")
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
    out_dir: Path | None,
    jobs: int,
    quiet: bool,
    trust_pickle: bool,
    as_json: bool,
) -> None:
    """Fuse a training checkpoint: fuse CKPT OUT, or fuse CKPT... --out-dir DIR.

    Every block (square + 1xk + kx1 conv, each with BatchNorm) becomes one
    conv with a bias; every other tensor is copied bit for bit, in order.
    Before writing, each fused block is checked numerically against its
    branches; the output appears only when everything succeeded.
    """
    options = _fuse_options(eps, no_check, layout, dialect, patterns, rename, trust_pickle)
    if out_dir is not None:
        sys.exit(_fuse_batch(paths, out_dir, to_format, options, force, jobs, quiet, as_json))
    if len(paths) != 2:
        raise UsageError("fuse takes CKPT OUT (or several CKPTs with --out-dir DIR)")
    source, output = paths
    from acnet_convert.checkpoint import format_for_path

    fmt = format_for_path(output, to_format)
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
                status.update(f"{stage} {source.name}: {done}/{total}" if stage == "fusing" else f"{stage} {output.name}")

            report = fuse_checkpoint(source, output, fmt, options, force=force, progress=progress)
    if not quiet:
        for note in report.notes:
            err.print(f"note: {note}")
        err.print(_summary(report))
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
    from acnet_convert.batch import expand_inputs, fuse_many

    sources = expand_inputs(paths)
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

            items = fuse_many(sources, out_dir, to_format, options, force=force, jobs=jobs, on_done=tick)
    else:
        items = fuse_many(sources, out_dir, to_format, options, force=force, jobs=jobs, on_done=done)
    failed = [i for i in items if i.exit_code != 0]
    if show:
        err.print(f"{len(items) - len(failed)} of {len(items)} checkpoints fused into {out_dir}")
    if as_json:
        _emit_json(
            {
                "out_dir": str(out_dir),
                "results": [
                    {"source": i.source, "output": i.output, "exit_code": i.exit_code, "error": i.error, "report": i.report}
                    for i in items
                ],
            }
        )
    return max((i.exit_code for i in items), default=0)


def _dry_run(source: Path, output: Path, fmt: str, options: Any, as_json: bool) -> None:
    from acnet_convert.checkpoint import open_checkpoint
    from acnet_convert.convert import plan_fusion

    with open_checkpoint(source, trust_pickle=options.trust_pickle) as reader:
        plan = plan_fusion(reader, options)
        mapping = [
            {"block": b.spec.label, "from": list(b.consumed), "to": [k for k, _ in b.outputs]} for b in plan.blocks
        ]
        copied = [{"from": src, "to": dst} for dst, src in plan.origins.items() if src != dst]
    if as_json:
        _emit_json({"source": str(source), "output": str(output), "format_out": fmt, "blocks": mapping,
                    "renamed": copied, "outputs": [t.name for t in plan.outputs]})
        return
    from rich.table import Table

    table = Table(title=f"dry run: {source} -> {output} ({fmt}), nothing written")
    table.add_column("block")
    table.add_column("becomes")
    for m in mapping:
        table.add_row(str(m["block"]), "\n".join(m["to"]))
    for c in copied:
        table.add_row(str(c["from"]), str(c["to"]))
    _stdout().print(table)


@cli.command(epilog=_EXIT_HELP)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--filter", "name_filter", default=None, metavar="REGEX", help="Only list tensors whose name matches.")
@click.option("--dialect", default=None, help="Force a naming dialect.")
@click.option("--patterns", type=click.Path(path_type=Path), default=None, help="TOML file defining extra naming dialects.")
@click.option("--eps", type=float, default=None, help="BatchNorm epsilon assumed for the 'after fusing' figures.")
@click.option("--layout", type=click.Choice(["deploy", "baseline", "baseline-bias"]), default="deploy", show_default=True,
              help="Layout assumed for the 'after fusing' figures.")
@click.option("--rename", multiple=True, metavar="REGEX=REPLACEMENT", help="Show output names after these renames.")
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
    trust_pickle: bool,
    as_json: bool,
) -> None:
    """Show a checkpoint's tensors (name, shape, dtype, elements), its container and format,
    and the blocks found, with totals now and after fusing."""
    from acnet_convert.inspection import inspect_checkpoint, render_inspection

    options = _fuse_options(eps, False, layout, dialect, patterns, rename, trust_pickle)
    result = inspect_checkpoint(checkpoint, options, name_filter)
    if as_json:
        _emit_json(result.as_json())
    else:
        render_inspection(result, _stdout())
    if result.problem is not None:
        raise result.problem


def _fail(console: Any, message: str, code: int) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``acnet-convert`` command."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="acnet-convert", standalone_mode=False)
    except ACNetConvertError as err:
        _fail(_stderr(), _escape(str(err)), err.exit_code)
    except click.exceptions.Abort:
        _fail(_stderr(), "interrupted; nothing was written", 130)
    except KeyboardInterrupt:
        _fail(_stderr(), "interrupted; nothing was written", 130)
    except click.ClickException as err:
        err.show()
        sys.exit(EXIT_USAGE if err.exit_code == 2 else err.exit_code)
    except SystemExit:
        raise
    except MemoryError:
        _fail(_stderr(), "out of memory while reading the input; is the file what it claims to be?", EXIT_UNUSABLE)
    except Exception as err:  # a bug, not the user's fault: say so in one line
        _fail(
            _stderr(),
            f"internal error ({type(err).__name__}: {_escape(str(err))}); please report it with the command you ran",
            EXIT_INTERNAL,
        )
    sys.exit(0)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
