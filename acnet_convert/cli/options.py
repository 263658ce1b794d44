"""Options that more than one command takes: declared once here, each command's help text its own.

An option's name, type, default and metavar are the same in every command
that takes it; only the help says what it means there, so every factory
takes the help text. ``json_option``, ``trust_option`` and ``force_option``
read the same everywhere and are plain decorators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from acnet_convert.choices import DEFAULT_LOSS_THRESHOLD_DB, FAMILIES, LAYOUTS

__all__ = [
    "batch_option",
    "eps_option",
    "force_option",
    "input_shape_option",
    "json_option",
    "layout_option",
    "loss_threshold_option",
    "naming_options",
    "network_options",
    "plot_option",
    "quiet_option",
    "rename_option",
    "seed_option",
    "tolerance_options",
    "trust_option",
]

F = TypeVar("F", bound=Callable[..., Any])

_FAMILY_HELP = (
    f"Force a block family ({', '.join(FAMILIES)}) "
    "or one naming dialect instead of detecting it (see 'inspect')."
)
_PATTERNS_HELP = "TOML file defining extra naming dialects (see README)."
_MODEL_ARG_HELP = (
    "Keyword argument for --model's factory (repeatable; values read as Python literals)."
)
_RTOL_HELP = "Pass when max_abs <= atol + rtol * max|reference|. [default: {}]"


def _stacked(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """One decorator applying ``decorators`` as if written one above the other, in order."""

    def apply(fn: F) -> F:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout."
    )(fn)


def trust_option(fn: F) -> F:
    return click.option(
        "--trust-pickle",
        is_flag=True,
        help="Load .pth files with full pickle, which can run code stored in the file. "
        "Only for files you trust; see SECURITY.md.",
    )(fn)


def force_option(fn: F) -> F:
    return click.option("--force", "-f", is_flag=True, help="Replace OUT if it exists.")(fn)


def quiet_option(help: str) -> Callable[[F], F]:
    return click.option("--quiet", "-q", is_flag=True, help=help)


def eps_option(help: str) -> Callable[[F], F]:
    return click.option("--eps", type=float, default=None, help=help)


def layout_option(
    help: str, choices: Sequence[str] = LAYOUTS, default: str = "deploy"
) -> Callable[[F], F]:
    return click.option(
        "--layout", type=click.Choice(choices), default=default, show_default=True, help=help
    )


def fold_bn_option(help: str) -> Callable[[F], F]:
    return click.option("--fold-bn/--no-fold-bn", default=None, help=help)


def rename_option(help: str) -> Callable[[F], F]:
    return click.option("--rename", multiple=True, metavar="REGEX=REPLACEMENT", help=help)


def naming_options(
    family_help: str = _FAMILY_HELP, patterns_help: str = _PATTERNS_HELP
) -> Callable[[F], F]:
    """--family (alias --dialect) and --patterns: how TRAIN's blocks are named."""
    return _stacked(
        click.option("--family", "--dialect", "dialect", default=None, help=family_help),
        click.option(
            "--patterns", type=click.Path(path_type=Path), default=None, help=patterns_help
        ),
    )


def network_options(arch_help: str, model_help: str) -> Callable[[F], F]:
    """--arch, --model and --model-arg: the net that verify and export rebuild."""
    return _stacked(
        click.option("--arch", default=None, metavar="NAME", help=arch_help),
        click.option("--model", default=None, metavar="FILE.py:FACTORY", help=model_help),
        click.option("--model-arg", multiple=True, metavar="KEY=VALUE", help=_MODEL_ARG_HELP),
    )


def input_shape_option(help: str) -> Callable[[F], F]:
    return click.option("--input-shape", default=None, metavar="C,H,W", help=help)


def seed_option(help: str) -> Callable[[F], F]:
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def batch_option(default: int, help: str) -> Callable[[F], F]:
    return click.option(
        "--batch", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def tolerance_options(rtol_default: str) -> Callable[[F], F]:
    """--rtol (``rtol_default`` says what None means there) and --atol."""
    return _stacked(
        click.option("--rtol", type=float, default=None, help=_RTOL_HELP.format(rtol_default)),
        click.option(
            "--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance."
        ),
    )


def loss_threshold_option(help: str) -> Callable[[F], F]:
    return click.option(
        "--loss-threshold",
        type=float,
        default=DEFAULT_LOSS_THRESHOLD_DB,
        show_default=True,
        metavar="DB",
        help=help,
    )


def plot_option(help: str) -> Callable[[F], F]:
    return click.option(
        "--plot",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        metavar="FILE.png",
        help=help,
    )
