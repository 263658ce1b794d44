"""acnet-convert: fuse re-parameterizable CNN checkpoints (ACNet, DBB, RepVGG, ...) into plain convs.

The Python API is importable from the package itself::

    from acnet_convert import ACBlock, switch_to_deploy, fuse_and_load

Those names are loaded on first use, so ``import acnet_convert`` (and with it
the command line's start-up and the torch-free fuse path) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from acnet_convert.api import LoadReport, fuse_and_load
    from acnet_convert.convert import FusedState, FuseOptions, fuse_state
    from acnet_convert.nn import ACBlock, DeployReport, find_acblocks, switch_to_deploy

__version__ = "0.1.0"
__all__ = [
    "ACBlock",
    "DeployReport",
    "FuseOptions",
    "FusedState",
    "LoadReport",
    "__version__",
    "find_acblocks",
    "fuse_and_load",
    "fuse_state",
    "switch_to_deploy",
]

# Public name -> the module that defines it; imported when the name is first asked for.
_LAZY = {
    "ACBlock": "acnet_convert.nn",
    "DeployReport": "acnet_convert.nn",
    "find_acblocks": "acnet_convert.nn",
    "switch_to_deploy": "acnet_convert.nn",
    "LoadReport": "acnet_convert.api",
    "fuse_and_load": "acnet_convert.api",
    "FuseOptions": "acnet_convert.convert",
    "FusedState": "acnet_convert.convert",
    "fuse_state": "acnet_convert.convert",
}


def __getattr__(name: str) -> Any:
    """Import the module behind a lazily exported name (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'acnet_convert' has no attribute {name!r}")
    if module != "acnet_convert.convert":
        from acnet_convert.extras import require_torch

        require_torch(f"acnet_convert.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
