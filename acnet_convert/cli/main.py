"""The entry point: the one place that turns exceptions into exit codes."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from acnet_convert.cli.app import EXIT_INTERNAL, _emit_json, _json_printed, _stderr, cli
from acnet_convert.cli.render import _escape
from acnet_convert.errors import (
    EXIT_UNUSABLE,
    EXIT_USAGE,
    ACNetConvertError,
)

__all__ = ["main"]


def _fail(console: Any, message: str, code: int) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``acnet-convert`` command.

    Exit codes: 0 success; an :class:`ACNetConvertError`'s own (1 mismatch, 2 usage,
    3 unusable input); click's own for its errors (2 for a usage error); 130 when
    interrupted; 2 or 3 for an ``OSError`` (``outputs.describe_os_error``);
    :data:`EXIT_INTERNAL` for a bug. With --json, a failure before the command printed
    its JSON document prints one that says so.
    """
    from acnet_convert.atomic import terminate_as_interrupt

    args = list(argv) if argv is not None else sys.argv[1:]
    as_json = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
    command = next((a for a in args if not a.startswith("-")), None)

    _json_printed.clear()
    _ignore_file_size_signal()
    # A numpy warning is never the user's message: bad values are reported as results.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"numpy(\.|$)")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"acnet_convert(\.|$)")
    try:
        # SIGTERM (kill, a CI timeout) must clean up a half-written output like Ctrl-C does.
        with terminate_as_interrupt():
            cli.main(args=args, prog_name="acnet-convert", standalone_mode=False)
    except click.ClickException as err:
        if as_json and not _json_printed:
            _emit_json(_error_document(command, EXIT_USAGE, err.format_message()))
        err.show()
        sys.exit(EXIT_USAGE if err.exit_code == 2 else err.exit_code)
    except SystemExit:
        raise
    except (Exception, KeyboardInterrupt) as err:  # click's Abort (Ctrl-C at a prompt) too
        message, code = _describe_failure(err)
        if as_json and not _json_printed:  # a report already printed (verify's exit 1) stays
            _emit_json(_error_document(command, code, message))
        _fail(_stderr(), _escape(message), code)
    sys.exit(0)


def _describe_failure(err: BaseException) -> tuple[str, int]:
    """The one line and the exit code for an error that ended a command."""
    if isinstance(err, ACNetConvertError):
        return str(err), err.exit_code
    if isinstance(err, (click.exceptions.Abort, KeyboardInterrupt)):
        return "interrupted; nothing was written", 130
    if isinstance(err, MemoryError):
        return (
            "out of memory while reading the input; is the file what it claims to be?",
            EXIT_UNUSABLE,
        )
    if isinstance(err, OSError):  # the environment (permissions, disk, limits), not a bug
        from acnet_convert.outputs import describe_os_error

        return describe_os_error(err)
    # A bug, not the user's fault: say so in one line.
    return (
        f"internal error ({type(err).__name__}: {err}); please report it with the command you ran",
        EXIT_INTERNAL,
    )


def _error_document(command: str | None, code: int, message: str) -> dict[str, Any]:
    """What --json prints when a command ends in an error before printing its own report."""
    return {"schema": 1, "ok": False, "command": command, "exit_code": code, "error": message}


def _ignore_file_size_signal() -> None:
    """Let a write past ``ulimit -f`` fail with EFBIG (a clear error) instead of killing us."""
    import contextlib
    import signal

    if hasattr(signal, "SIGXFSZ"):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
