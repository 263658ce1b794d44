"""Parsing of option values that are not a click type: --input-shape and --model-arg."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

from acnet_convert.errors import UsageError

__all__ = ["parse_input_shape", "parse_model_args"]


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``.

    Raises:
        UsageError: anything but three positive integers.

    >>> parse_input_shape("3, 224,224")
    (3, 224, 224)
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(
            f"--input-shape '{text}': expected C,H,W (three positive integers), e.g. 3,32,32"
        )
    return shape


def parse_model_args(values: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """``["depth=56", "name=wide"]`` -> ``(("depth", 56), ("name", "wide"))``.

    Values are read as Python literals where they are one, else kept as text.

    Raises:
        UsageError: an entry without ``=`` or with a key that is no identifier.

    >>> parse_model_args(["width=2.0", "blocks=[2, 2]", "act=relu"])
    (('width', 2.0), ('blocks', [2, 2]), ('act', 'relu'))
    """
    out: list[tuple[str, Any]] = []
    for value in values:
        key, sep, raw = value.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(
                f"--model-arg '{value}': expected KEY=VALUE with KEY a Python identifier"
            )
        if key == "deploy":
            raise UsageError(
                "--model-arg deploy=...: verify builds both forms itself; leave 'deploy' out"
            )
        try:
            parsed: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed = raw
        out.append((key, parsed))
    return tuple(out)
