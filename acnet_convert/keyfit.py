"""How a set of keys fits the keys a model or a layout expects, and how to name a few of them.

Shared by ``fuse_and_load``, ``verify`` and the zoo's architecture match, so
they agree on which keys never matter: a BN's step counter (torch fills it
in itself, and it does not change an eval-mode forward) and the ``deps``
channel-width table upstream's hdf5 files carry beside the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["COUNTER_SUFFIX", "NON_WEIGHT_KEYS", "a_few", "is_counter", "key_misfit"]

COUNTER_SUFFIX = "num_batches_tracked"
NON_WEIGHT_KEYS = frozenset({"deps"})


def is_counter(key: str) -> bool:
    """A BN's step counter (``<bn>.num_batches_tracked``)."""
    return key.endswith(COUNTER_SUFFIX)


def key_misfit(expected: Iterable[str], given: Iterable[str]) -> tuple[list[str], list[str]]:
    """Keys ``expected`` that ``given`` lacks (step counters may be absent), and keys
    ``given`` has that ``expected`` does not (``deps`` is never one), each in its own order.

    >>> key_misfit(["a.weight", "bn.num_batches_tracked"], ["a.weight", "deps", "b"])
    ([], ['b'])
    """
    want = list(expected)
    have = list(given)
    want_set, have_set = set(want), set(have)
    missing = [k for k in want if k not in have_set and not is_counter(k)]
    unexpected = [k for k in have if k not in want_set and k not in NON_WEIGHT_KEYS]
    return missing, unexpected


def a_few(items: Sequence[str], limit: int, *, sep: str = ", ", more: str = " and {n} more") -> str:
    """The first ``limit`` items joined by ``sep``, then ``more`` with how many were left out.

    >>> a_few(["'a'", "'b'", "'c'"], 2)
    "'a', 'b' and 1 more"
    """
    shown = sep.join(items[:limit])
    return shown + (more.format(n=len(items) - limit) if len(items) > limit else "")
