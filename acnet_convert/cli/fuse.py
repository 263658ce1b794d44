"""``acnet-convert fuse``: one checkpoint, or a batch into --out-dir; --dry-run."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from acnet_convert.choices import FORMATS
from acnet_convert.cli.app import (
    _EXIT_HELP,
    _emit_json,
    _load_patterns,
    _parse_renames,
    _status,
    _stderr,
    _stdout,
    cli,
)
from acnet_convert.cli.main import _fail
from acnet_convert.cli.options import (
    eps_option,
    fold_bn_option,
    force_option,
    json_option,
    layout_option,
    naming_options,
    quiet_option,
    rename_option,
    trust_option,
)
from acnet_convert.cli.render import _details, _escape, _print_notes, _summary
from acnet_convert.errors import (
    UsageError,
)

if TYPE_CHECKING:
    from acnet_convert.batch import BatchInterrupted, BatchItem
    from acnet_convert.convert import FuseReport, ProgressCallback
    from acnet_convert.plan import FuseOptions

__all__ = ["fuse"]


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
) -> FuseOptions:
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


@dataclass(frozen=True)
class _FuseRun:
    """What fuse was told besides how to fuse (``options``): how to write and what to show.

    With ``dry_run`` nothing is written, for one CKPT OUT pair and for a batch.
    """

    options: FuseOptions
    to_format: str | None
    force: bool
    dry_run: bool
    jobs: int
    quiet: bool
    verbose: bool
    as_json: bool


@cli.command(epilog=_EXIT_HELP)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to_format",
    type=click.Choice(FORMATS),
    help="Output format (default: from OUT's extension; with --out-dir: the input's).",
)
@eps_option(
    "BatchNorm epsilon. [default: what the file declares, else the family's: 1e-5; "
    "1e-3 for Keras files and RepConv (YOLOv7)]"
)
@click.option("--no-check", is_flag=True, help="Skip the numerical check of every fused block.")
@force_option
@layout_option(
    "deploy: <p>.fused_conv.{weight,bias}; baseline: <u>.conv.weight + identity <u>.bn.*; "
    "baseline-bias: <u>.conv.{weight,bias}."
)
@naming_options()
@rename_option("Rename output keys (repeatable, applied in order).")
@click.option("--dry-run", is_flag=True, help="Show what would be written, write nothing.")
@fold_bn_option(
    "Also fold every plain conv followed by its own BN (<b>.conv + <b>.bn, "
    "<b>.<i> + <b>.<i+1>) into the conv's weight and bias, or never. Default: as the "
    "families' deploy nets do (DBB's fold them; the others' do not)."
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
@quiet_option("No progress or summary on stderr.")
@click.option(
    "--verbose", "-v", is_flag=True, help="Also the dialect and each block's figures on stderr."
)
@trust_option
@json_option
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

    Every training-time block (parallel conv branches with BatchNorm, such as
    ACNet's kxk + 1xk + kx1 or RepVGG's 3x3 + 1x1 + identity) becomes one conv
    with a bias; every other tensor is copied bit for bit, in order.
    Before writing, each fused block is checked numerically against its
    branches; the output appears only when everything succeeded.
    """
    run = _FuseRun(
        options=_fuse_options(
            eps,
            no_check,
            layout,
            dialect,
            patterns,
            rename,
            trust_pickle,
            fold_bn=fold_bn,
            allow_unfused=allow_unfused,
        ),
        to_format=to_format,
        force=force,
        dry_run=dry_run,
        jobs=jobs,
        quiet=quiet,
        verbose=verbose,
        as_json=as_json,
    )
    if out_dir is not None and dry_run:
        _dry_run_batch(paths, out_dir, run)
    elif out_dir is not None:
        sys.exit(_fuse_batch(paths, out_dir, run))
    elif len(paths) != 2:
        raise UsageError("fuse takes CKPT OUT (or several CKPTs with --out-dir DIR)")
    else:
        source, output = paths
        _fuse_pair(source, output, run)


def _fuse_pair(source: Path, output: Path, run: _FuseRun) -> None:
    """CKPT OUT: the folders made for OUT are removed again if anything fails."""
    from acnet_convert.checkpoint import format_for_path
    from acnet_convert.outputs import prepare_output, remove_created

    created = [] if run.dry_run else prepare_output(source, output, force=run.force)
    try:
        _fuse_one_file(source, output, format_for_path(output, run.to_format), run)
    except BaseException:
        remove_created(created)
        raise


def _fuse_one_file(source: Path, output: Path, fmt: str, run: _FuseRun) -> None:
    if run.dry_run:
        _dry_run(source, output, fmt, run.options, run.as_json)
        return
    from acnet_convert.convert import fuse_checkpoint

    with _status("fusing...", quiet=run.quiet) as status:
        progress = None if status is None else _progress(status, source, output)
        report = fuse_checkpoint(
            source, output, fmt, run.options, force=run.force, progress=progress
        )
    _report_fused(report, run)


def _progress(status: Any, source: Path, output: Path) -> ProgressCallback:
    def progress(stage: str, done: int, total: int) -> None:
        status.update(
            f"{stage} {source.name}: {done}/{total}"
            if stage == "fusing"
            else f"{stage} {output.name}"
        )

    return progress


def _report_fused(report: FuseReport, run: _FuseRun) -> None:
    if not run.quiet:
        err = _stderr()
        _print_notes(err, report.notes)
        if run.verbose:
            for line in _details(report):
                err.print(_escape(line))
        err.print(_escape(_summary(report)))
    if run.as_json:
        _emit_json(report.as_json())


def _fuse_batch(paths: Sequence[Path], out_dir: Path, run: _FuseRun) -> int:
    from acnet_convert.batch import BatchInterrupted, expand_inputs

    sources = expand_inputs(paths)
    try:
        items = _fuse_batch_items(sources, out_dir, run)
    except BatchInterrupted as stop:
        _batch_interrupted(stop, len(sources), out_dir, run.as_json)
    if not run.quiet:
        failed = sum(1 for i in items if i.exit_code != 0)
        _stderr().print(f"{len(items) - failed} of {len(items)} checkpoints fused into {out_dir}")
    if run.as_json:
        _emit_json(
            {"schema": 1, "out_dir": str(out_dir), "results": [_item_json(i) for i in items]}
        )
    return max((i.exit_code for i in items), default=0)


def _batch_interrupted(
    stop: BatchInterrupted, total: int, out_dir: Path, as_json: bool
) -> NoReturn:
    done = ", ".join(i.output for i in stop.completed) or "none"
    rest = ", ".join(str(p) for p in stop.not_completed) or "none"
    message = (
        f"interrupted: {len(stop.completed)} of {total} outputs were completed and "
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


def _fuse_batch_items(sources: Sequence[Path], out_dir: Path, run: _FuseRun) -> list[BatchItem]:
    """Fuse every source, one line on stderr as each ends, and a progress bar on a terminal."""
    from acnet_convert.batch import fuse_many

    err = _stderr()

    def fuse_all(on_done: Callable[[BatchItem], None]) -> list[BatchItem]:
        return fuse_many(
            sources,
            out_dir,
            run.to_format,
            run.options,
            force=run.force,
            jobs=run.jobs,
            on_done=on_done,
        )

    def done(item: BatchItem) -> None:
        if run.quiet:
            return
        if item.error:
            err.print(f"[bold red]failed:[/] {_escape(item.error)}")
        else:
            err.print(f"ok: {_escape(item.source)} -> {_escape(item.output)}")

    if run.quiet or not err.is_terminal or len(sources) <= 1:
        return fuse_all(done)
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("fusing", total=len(sources))

        def tick(item: BatchItem) -> None:
            done(item)
            bar.advance(task)

        return fuse_all(tick)


def _item_json(item: BatchItem) -> dict[str, Any]:
    return {
        "source": item.source,
        "output": item.output,
        "exit_code": item.exit_code,
        "error": item.error,
        "report": item.report,
    }


def _dry_run_batch(paths: Sequence[Path], out_dir: Path, run: _FuseRun) -> None:
    """--out-dir with --dry-run: each input's plan, as a batch would name its output."""
    from acnet_convert.batch import expand_inputs, output_path

    sources = expand_inputs(paths)
    if not sources:
        raise UsageError("no input files given")
    planned = [(source, *output_path(source, out_dir, run.to_format)) for source in sources]
    outputs = [str(output) for _, output, _ in planned]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise UsageError(
            f"two inputs would both be written as '{dup}'; fuse them into separate folders"
        )
    documents = [_dry_run_plan(source, output, fmt, run.options) for source, output, fmt in planned]
    if run.as_json:
        _emit_json({"schema": 1, "out_dir": str(out_dir), "dry_run": True, "results": documents})
        return
    for document in documents:
        _show_dry_run(document)


def _dry_run(source: Path, output: Path, fmt: str, options: Any, as_json: bool) -> None:
    document = _dry_run_plan(source, output, fmt, options)
    if as_json:
        _emit_json(document)
    else:
        _show_dry_run(document)


def _dry_run_plan(source: Path, output: Path, fmt: str, options: Any) -> dict[str, Any]:
    """What fusing SOURCE into OUTPUT would write: blocks, renamed copies, output names."""
    from acnet_convert.checkpoint import open_checkpoint
    from acnet_convert.plan import plan_fusion

    with open_checkpoint(source, trust_pickle=options.trust_pickle) as reader:
        plan = plan_fusion(reader, options)
        mapping = [
            {"block": b.spec.label, "from": list(b.consumed), "to": [k for k, _ in b.outputs]}
            for b in plan.blocks
        ]
        copied = [{"from": src, "to": dst} for dst, src in plan.origins.items() if src != dst]
    return {
        "source": str(source),
        "output": str(output),
        "format_out": fmt,
        "blocks": mapping,
        "renamed": copied,
        "outputs": [t.name for t in plan.outputs],
    }


def _show_dry_run(document: dict[str, Any]) -> None:
    mapping, copied, fmt = document["blocks"], document["renamed"], document["format_out"]
    source, output = document["source"], document["output"]
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
