"""Which built-in architecture ``verify`` builds: named by ``--arch`` or detected from TRAIN."""

from __future__ import annotations

from typing import Any

from acnet_convert.checkpoint import CheckpointReader
from acnet_convert.errors import UsageError
from acnet_convert.verify.options import VerifyOptions

__all__ = []


def _arch_spec(name: str) -> Any:
    from acnet_convert import zoo

    if name not in zoo.ARCHS:
        raise UsageError(
            f"--arch '{name}' is not a built-in architecture; choose one of {', '.join(zoo.ARCHS)} "
            "(see 'acnet-convert archs'), or give --model for your own"
        )
    return zoo.ARCHS[name]


def _choose_arch(
    options: VerifyOptions, train: CheckpointReader
) -> tuple[str | None, bool, list[str]]:
    """The architecture to use, whether it was detected, and notes for stderr."""
    if options.arch:
        _arch_spec(options.arch)
        return options.arch, False, []
    if options.model or options.blocks:
        return None, False, []
    from acnet_convert import zoo

    matches = list(zoo.match_arch(list(train.tensors)))
    if len(matches) == 1:
        return (
            matches[0],
            True,
            [
                f"using the built-in architecture '{matches[0]}': TRAIN's keys match it "
                "and no other "
                "(--arch chooses one, --blocks checks block by block)"
            ],
        )
    if matches:
        return (
            None,
            False,
            [
                f"TRAIN's keys match several built-in architectures ({', '.join(matches)}); "
                "checking block by block (--arch chooses one)"
            ],
        )
    return None, False, ["no built-in architecture matches TRAIN's keys; checking block by block"]
