"""The ``acnet-convert`` command line: options in, library calls, rendering, exit codes.

Results go to stdout (rich tables, or JSON with ``--json``); status and errors
go to stderr. :func:`~acnet_convert.cli.main.main` is the one place that turns
exceptions into exit codes: 0 success, 1 verification mismatch, 2 usage error,
3 unusable input.

``app`` holds the click group and what commands share (consoles, JSON,
parsing), ``options`` the options several commands take; ``fuse``
(with batches), ``inspect`` (with --stats), ``verify`` (with ``archs``),
``export`` and ``patterns`` one command group each; ``render`` and
``exportview`` everything that draws for people, and the one
display-escaping helper.
"""

from __future__ import annotations

# Each command module registers its commands on the group when imported.
from acnet_convert.cli import export, fuse, inspect, patterns, verify  # noqa: F401
from acnet_convert.cli.app import EXIT_INTERNAL, cli
from acnet_convert.cli.main import main

__all__ = ["EXIT_INTERNAL", "cli", "main"]
