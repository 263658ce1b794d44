"""Fusing many checkpoints in one go, optionally in worker processes.

A file that fails is reported and does not stop the others.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acnet_convert.checkpoint import format_for_path, open_checkpoint
from acnet_convert.convert import FuseOptions, fuse_checkpoint
from acnet_convert.errors import EXIT_OK, ACNetConvertError, UsageError

__all__ = ["BatchItem", "expand_inputs", "fuse_many", "output_path"]

_SUFFIX = {"pth": ".pth", "hdf5": ".hdf5", "safetensors": ".safetensors"}


@dataclass(frozen=True)
class BatchItem:
    """The outcome for one input: exit code, output, and the report or error message."""

    source: str
    output: str
    exit_code: int
    report: dict[str, Any] | None
    error: str | None


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
        return out_dir / (source.stem + _SUFFIX[fmt]), fmt
    try:
        return out_dir / source.name, format_for_path(source)
    except UsageError:
        with open_checkpoint(source) as reader:
            fmt = reader.format
        return out_dir / (source.stem + _SUFFIX[fmt]), fmt


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
    names = [p.stem if to_format else p.name for p in sources]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(
            f"two inputs would both be written as '{dup}' in {out_dir}; fuse them into separate folders"
        )
    results: dict[int, BatchItem] = {}
    for index, item in _run(sources, out_dir, to_format, options, force, jobs):
        results[index] = item
        if on_done:
            on_done(item)
    return [results[i] for i in range(len(sources))]


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
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {
            pool.submit(_fuse_one, src, out_dir, to_format, options, force): i
            for i, src in enumerate(sources)
        }
        for future in as_completed(futures):
            yield futures[future], future.result()
