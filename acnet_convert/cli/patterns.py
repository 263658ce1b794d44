"""``acnet-convert patterns``: the example --patterns file."""

from __future__ import annotations

import click

from acnet_convert.cli.app import _EXIT_HELP, cli
from acnet_convert.errors import (
    UsageError,
)

__all__ = ["patterns"]


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
