"""Optional dependencies: which extra to install when one is missing.

``pip install acnet-convert`` gives the torch-free converter (fuse, inspect,
patterns); ``verify``, the Python API (``ACBlock``, ``fuse_and_load``), the zoo
and legacy (pre-1.6) .pth files need PyTorch: ``pip install 'acnet-convert[torch]'``.
"""

from __future__ import annotations

from acnet_convert.errors import UsageError

__all__ = ["TORCH_EXTRA", "require_torch"]

TORCH_EXTRA = "pip install 'acnet-convert[torch]'"


def require_torch(what: str) -> None:
    """Raise :class:`UsageError` naming the extra to install when torch is not importable.

    >>> require_torch("verify")  # doctest: +SKIP
    """
    try:
        import torch  # noqa: F401 - the command needs it next anyway
    except ImportError as err:
        raise UsageError(f"{what} needs PyTorch, which is not installed: {TORCH_EXTRA}") from err
