"""The exception family a user can cause, and the exit code each one maps to.

Only the command line catches :class:`ACNetConvertError`; library callers get
the exception itself, with a message that names the file, the key or block,
and the next step.
"""

from __future__ import annotations

__all__ = [
    "EXIT_MISMATCH",
    "EXIT_OK",
    "EXIT_UNUSABLE",
    "EXIT_USAGE",
    "ACNetConvertError",
    "BadCheckpointError",
    "NoBlockFound",
    "UnfusableBlockError",
    "UnsafeCheckpointError",
    "UsageError",
    "VerificationError",
]

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_UNUSABLE = 3


class ACNetConvertError(Exception):
    """Base of every error a user can cause; ``exit_code`` is what the CLI returns."""

    exit_code: int = EXIT_UNUSABLE


class UsageError(ACNetConvertError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = EXIT_USAGE


class BadCheckpointError(ACNetConvertError):
    """A file that cannot be read as a checkpoint: missing, truncated, corrupt, lying."""


class UnsafeCheckpointError(BadCheckpointError):
    """A .pth whose pickle asks for objects beyond tensors and plain data."""


class UnfusableBlockError(ACNetConvertError):
    """No block found, or a block with a missing, inconsistent or non-finite part."""


class NoBlockFound(UnfusableBlockError):
    """No block of any family in a checkpoint: it is fused already, plain, or named unknownly."""


class VerificationError(ACNetConvertError):
    """Fused weights that do not reproduce the training-time computation."""

    exit_code = EXIT_MISMATCH
