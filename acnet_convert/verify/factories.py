"""Model import for ``--model``: a factory from a file or a module, called safely."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acnet_convert.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

__all__ = []


def _load_factory(spec: str) -> Callable[..., Any]:
    """``path/to/file.py:make`` or ``package.module:make`` -> the callable."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(
            f"--model '{spec}': expected path/to/file.py:factory or package.module:factory"
        )
    looks_like_file = target.endswith(".py") or "/" in target or "\\" in target
    try:
        if looks_like_file:
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"--model '{spec}': no file '{target}'")
            name = f"_acnet_verify_model_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise UsageError(f"--model '{spec}': '{target}' cannot be imported as Python")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
            try:
                module_spec.loader.exec_module(module)
            finally:
                with contextlib.suppress(ValueError):
                    sys.path.remove(str(path.resolve().parent))
        else:
            module = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(
            f"--model '{spec}': importing '{target}' failed: {type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--model '{spec}': '{target}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--model '{spec}': '{attr}' is not callable")
    return obj  # type: ignore[no-any-return]


def _takes_deploy(factory: Callable[..., Any]) -> bool:
    try:
        return "deploy" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _call_factory(factory: Callable[..., Any], spec: str, kwargs: dict[str, Any]) -> nn.Module:
    from torch import nn

    try:
        net = factory(**kwargs)
    except Exception as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UsageError(
            f"--model '{spec}': calling it with ({shown}) failed: {type(err).__name__}: {err}; "
            "check --model-arg"
        ) from err
    if not isinstance(net, nn.Module):
        raise UsageError(
            f"--model '{spec}': returned a {type(net).__name__}, not a torch.nn.Module"
        )
    return net
