"""Fusing many checkpoints in one go, optionally in worker processes.

A file that fails, for whatever reason, is reported and does not stop the
others. Ctrl-C or SIGTERM stops the workers (each removes its temporary file)
and raises :class:`BatchInterrupted`, which lists the outputs completed
before the signal; they are complete and valid.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acnet_convert.checkpoint import format_for_path, open_checkpoint
from acnet_convert.convert import FuseOptions, fuse_checkpoint
from acnet_convert.errors import EXIT_OK, EXIT_UNUSABLE, ACNetConvertError, UsageError

__all__ = ["BatchInterrupted", "BatchItem", "expand_inputs", "fuse_many", "output_path"]


def _suffix(fmt: str) -> str:
    """The file extension each output format is written with: its own name."""
    return f".{fmt}"


@dataclass(frozen=True)
class BatchItem:
    """The outcome for one input: exit code, output, and the report or error message."""

    source: str
    output: str
    exit_code: int
    report: dict[str, Any] | None
    error: str | None


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during :func:`fuse_many`: what was completed, and what was not."""

    def __init__(self, completed: Sequence[BatchItem], not_completed: Sequence[Path]) -> None:
        super().__init__("interrupted")
        self.completed = list(completed)
        self.not_completed = list(not_completed)


def expand_inputs(patterns: Sequence[Path]) -> list[Path]:
    """Paths as given, with shell-style globs expanded (for shells that did not)."""
    out: list[Path] = []
    for p in patterns:
        text = str(p)
        if not p.exists() and any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UsageError(f"'{text}' matches no file")
            out.extend(Path(m) for m in matches)
        else:
            out.append(p)
    return list(dict.fromkeys(out))  # first occurrence of each, in order


def output_path(source: Path, out_dir: Path, to_format: str | None) -> tuple[Path, str]:
    """Where ``source`` goes in ``out_dir``, and in which format."""
    if to_format is not None:
        fmt = format_for_path(source, to_format)
        return out_dir / (source.stem + _suffix(fmt)), fmt
    try:
        return out_dir / source.name, format_for_path(source)
    except UsageError:
        with open_checkpoint(source) as reader:
            fmt = reader.format
        return out_dir / (source.stem + _suffix(fmt)), fmt


def _planned(source: Path, out_dir: Path, to_format: str | None) -> Path:
    """Where ``source`` goes, known without opening it (an input whose extension names no
    format keeps its name here; :func:`output_path` names it by its content)."""
    return out_dir / (source.stem + _suffix(to_format) if to_format else source.name)


def _fuse_one(
    source: Path, out_dir: Path, to_format: str | None, options: FuseOptions, force: bool
) -> BatchItem:
    output = out_dir / source.name
    try:
        output, fmt = output_path(source, out_dir, to_format)
        report = fuse_checkpoint(source, output, fmt, options, force=force)
        return BatchItem(str(source), str(output), EXIT_OK, report.as_json(), None)
    except ACNetConvertError as err:
        return BatchItem(str(source), str(output), err.exit_code, None, str(err))
    except MemoryError:
        message = f"{source}: out of memory while reading it; is the file what it claims to be?"
        return BatchItem(str(source), str(output), EXIT_UNUSABLE, None, message)
    except OSError as err:
        from acnet_convert.outputs import describe_os_error

        message, code = describe_os_error(err)
        return BatchItem(str(source), str(output), code, None, f"{source}: {message}")
    except Exception as err:  # a bug: this file's failure, not the whole batch's
        message = (
            f"{source}: internal error ({type(err).__name__}: {err}); please report it "
            "with the command you ran"
        )
        return BatchItem(str(source), str(output), EXIT_UNUSABLE, None, message)


_busy = False  # in a worker: whether a file is being fused (SIGTERM then cleans up)


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent; SIGTERM cleans up a file in progress, then exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_terminate)


def _worker_terminate(signum: int, frame: object) -> None:
    if _busy:
        # Unwinds the conversion (atomic_output removes its temporary file); the
        # worker then exits instead of taking the next queued input.
        raise _WorkerStop(f"signal {signum}")
    os._exit(128 + signum)


class _WorkerStop(KeyboardInterrupt):
    pass


def _fuse_in_worker(
    source: Path, out_dir: Path, to_format: str | None, options: FuseOptions, force: bool
) -> BatchItem:
    global _busy
    _busy = True
    try:
        return _fuse_one(source, out_dir, to_format, options, force)
    except _WorkerStop:
        os._exit(128 + signal.SIGTERM)
    finally:
        _busy = False


def fuse_many(
    sources: Sequence[Path],
    out_dir: Path,
    to_format: str | None,
    options: FuseOptions,
    *,
    force: bool = False,
    jobs: int = 1,
    on_done: Callable[[BatchItem], None] | None = None,
) -> list[BatchItem]:
    """Fuse every source into ``out_dir`` (created if missing), ``jobs`` at a time.

    Returns one :class:`BatchItem` per source, in the order given.
    """
    if not sources:
        raise UsageError("no input files given")
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [_planned(p, out_dir, to_format) for p in sources]
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(
            f"two inputs would both be written as '{dup}' in {out_dir}; fuse them into separate folders"
        )
    results: dict[int, BatchItem] = {}
    before = [_identity(o) for o in outputs]
    try:
        for index, item in _run(sources, out_dir, to_format, options, force, jobs):
            results[index] = item
            if on_done:
                on_done(item)
    except KeyboardInterrupt as err:
        # Outputs appear by an atomic rename, so a new file is complete even when its
        # worker was stopped before it could report back.
        for i, (src, out) in enumerate(zip(sources, outputs, strict=True)):
            if i not in results and _identity(out) not in (None, before[i]):
                results[i] = BatchItem(str(src), str(out), EXIT_OK, None, None)
        completed = [results[i] for i in sorted(results) if results[i].exit_code == EXIT_OK]
        rest = [src for i, src in enumerate(sources) if i not in results]
        _remove_partials(out_dir, [_planned(p, out_dir, to_format) for p in rest])
        raise BatchInterrupted(completed, rest) from err
    return [results[i] for i in range(len(sources))]


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _remove_partials(out_dir: Path, outputs: Sequence[Path]) -> None:
    """Temporary files of outputs never completed (a worker killed before it could clean up)."""
    prefixes = [f".{o.name}." for o in outputs]  # as atomic_output names them
    for leftover in out_dir.glob(".*.partial"):
        if any(leftover.name.startswith(prefix) for prefix in prefixes):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _run(
    sources: Sequence[Path],
    out_dir: Path,
    to_format: str | None,
    options: FuseOptions,
    force: bool,
    jobs: int,
) -> Iterator[tuple[int, BatchItem]]:
    if jobs <= 1 or len(sources) == 1:
        for i, src in enumerate(sources):
            yield i, _fuse_one(src, out_dir, to_format, options, force)
        return
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init)
    try:
        futures = {
            pool.submit(_fuse_in_worker, src, out_dir, to_format, options, force): i
            for i, src in enumerate(sources)
        }
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM every worker: one fusing a file removes its temporary file and exits."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=30)
