"""Checking where an output may go before any work is done, and naming write failures.

Library code, no click: :func:`check_output` refuses what cannot work (stdout,
a folder, a special file, the input itself), :func:`prepare_output` also creates
missing parent folders;
:func:`describe_os_error` turns an ``OSError`` met while writing into one line
with the exit code the CLI uses.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from acnet_convert.errors import EXIT_UNUSABLE, EXIT_USAGE, OutputError, UsageError

__all__ = [
    "OUTPUT_ERRNOS",
    "check_output",
    "describe_os_error",
    "prepare_output",
    "remove_created",
]

# Write failures that are about the destination (exit 2: choose another place).
OUTPUT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EFBIG", "ENAMETOOLONG", "EISDIR")
    if hasattr(errno, name)
)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_output(
    source: Path, output: Path, *, force: bool, create_parents: bool = False, folder_hint: str = ""
) -> None:
    """Refuse an output path that cannot work, before any work is done.

    ``create_parents``: missing parent folders will be made (else they are refused);
    ``folder_hint`` ends the message for an OUT that is a folder.

    Raises:
        UsageError: OUT is ``-``, a folder, the input, exists without ``force``, is
            (a link to) a special file, or lies in a missing folder.
    """
    if str(output) == "-":
        raise UsageError(
            "writing the checkpoint to stdout ('-') is not supported: every output format "
            "is written with seeks and read back; give a file name (--json puts the report "
            "on stdout)"
        )
    if output.is_dir():
        raise UsageError(f"{output}: is a directory; give a file name for OUT{folder_hint}")
    if os.path.lexists(output):
        if source.exists() and output.resolve() == source.resolve():
            raise UsageError(f"{output}: the output would overwrite the input; choose another path")
        if not force:
            raise UsageError(f"{output}: exists already; pass --force to replace it")
        try:
            mode = os.stat(output).st_mode
        except OSError:
            mode = stat.S_IFREG  # a dangling link: replacing the link itself is harmless
        if not stat.S_ISREG(mode):
            raise UsageError(
                f"{output}: is {_kind(mode)}; --force replaces only regular files, give a file name"
            )
    if not create_parents and not output.parent.is_dir():
        raise UsageError(f"{output}: the folder '{output.parent}' does not exist")


def prepare_output(source: Path, output: Path, *, force: bool) -> list[Path]:
    """:func:`check_output`, then create OUT's missing parent folders.

    Returns the folders created (outermost first), so a caller can remove
    them again when the conversion fails.

    Raises:
        UsageError: as :func:`check_output`.
        OutputError: the folder cannot be created or written.

    >>> prepare_output(Path("train.pth"), Path("deploy/model.pth"), force=False)  # doctest: +SKIP
    [PosixPath('deploy')]
    """
    check_output(
        source,
        output,
        force=force,
        create_parents=True,
        folder_hint=f", or fuse into that folder with --out-dir {output}",
    )
    return _make_parents(output)


def _make_parents(output: Path) -> list[Path]:
    missing: list[Path] = []
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except OSError as err:
        remove_created(created)
        raise OutputError(
            f"{output}: cannot create the folder '{err.filename or output.parent}' "
            f"({err.strerror or err})"
        ) from err
    if not output.parent.is_dir():
        raise OutputError(f"{output}: '{output.parent}' is not a folder")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"{output}: the folder '{output.parent}' is not writable (permission denied); "
            "choose another folder"
        )
    return created


def remove_created(folders: list[Path]) -> None:
    """Remove folders :func:`prepare_output` created, innermost first, where still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def describe_os_error(err: OSError) -> tuple[str, int]:
    """One line for an ``OSError`` that escaped a command, and its exit code.

    Destination problems (permission, read-only, full disk, file-size limit)
    are exit 2; anything else met on the way (an I/O error reading) is 3.
    """
    where = f"{err.filename}: " if err.filename else ""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in OUTPUT_ERRNOS:
        hint = {
            errno.EFBIG: "the file-size limit (ulimit -f) was reached",
            errno.ENOSPC: "the disk is full",
        }.get(err.errno or 0, "choose another place for the output")
        return f"{where}cannot write ({reason}); {hint}; nothing was written", EXIT_USAGE
    return f"{where}{reason}; nothing was written", EXIT_UNUSABLE
