"""The click group and what every command shares: consoles, JSON output, parsing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from acnet_convert import __version__
from acnet_convert.errors import (
    UsageError,
)

__all__ = ["EXIT_INTERNAL", "cli"]


EXIT_INTERNAL = 70


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


@contextlib.contextmanager
def _status(message: str, *, quiet: bool) -> Iterator[Any]:
    """A spinner on stderr while the block runs, yielded (``.update(text)``), or None.

    None when ``quiet`` or when stderr is not a terminal (a log, CI): no spinner there.
    """
    err = _stderr()
    if quiet or not err.is_terminal:
        yield None
        return
    with err.status(message) as status:
        yield status


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_EXIT_HELP,
)
@click.version_option(__version__, prog_name="acnet-convert")
def cli() -> None:
    """Fuse re-parameterizable CNN checkpoints into plain-conv checkpoints, and prove they agree.

    Block families: ACNet, DiverseBranchBlock (DBB), RepVGG, RepConv (YOLOv7),
    MobileOne, timm ByobNet and RepLKNet, found by their tensor names.

    \b
    acnet-convert fuse TRAIN OUT      training checkpoint -> deployable checkpoint
    acnet-convert inspect CKPT        tensors, container and blocks found
    acnet-convert verify TRAIN FUSED  numerical equivalence, for people and CI
    acnet-convert export CKPT OUT.onnx --arch NAME   deployed net as ONNX, checked

    Formats: .pth/.pt (torch), .hdf5/.h5 (upstream ACNet, Keras), .safetensors,
    .pdparams (Paddle), detected from the file's content.
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


def _parse_network(
    model_arg: Sequence[str], input_shape: str | None
) -> tuple[tuple[tuple[str, Any], ...], tuple[int, ...] | None]:
    """--model-arg and --input-shape (verify, export): the factory's keywords, the (C, H, W)."""
    from acnet_convert.cli.parsing import parse_input_shape, parse_model_args

    model_args = parse_model_args(model_arg)
    return model_args, parse_input_shape(input_shape) if input_shape is not None else None


def _require_folder(option: str, path: Path | None) -> None:
    """Refuse an output option (--junit, --plot) whose folder does not exist, before any work."""
    if path is not None and not path.parent.is_dir():
        raise UsageError(f"{option} {path}: the folder '{path.parent}' does not exist")


def _load_patterns(path: Path | None) -> tuple[Any, ...]:
    if path is None:
        return ()
    from acnet_convert.patterns import load_patterns

    return tuple(load_patterns(path))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB, {nbytes:,} bytes" if nbytes >= 100_000 else f"{nbytes:,} bytes"


def _write_text(path: Path, text: str) -> None:
    from acnet_convert.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
