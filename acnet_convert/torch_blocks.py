"""A training-form ACNet block as torch modules, read into float64 block tensors.

The names are upstream ACNet's dialect (:mod:`acnet_convert.families.acnet`):
``square_conv``/``square_bn``, ``hor_*``, ``ver_*``, the optional dilated
``corner_*`` and ``last_bn``, as ``acnet/acb.py`` registers them. A block is
checked by the package's one set of rules: every branch fits centred in the
square (:func:`acnet_convert.blocks.fits_centred`) and ACNet's own geometry rule
(:func:`acnet_convert.families.acnet.validate_acnet`) on the geometry
:mod:`acnet_convert.blocks` builds, so a module is refused exactly where its
checkpoint would be; only what a module has and a checkpoint has not (BN modules
without running statistics, conv stride, dilation, groups and padding mode) is
checked here alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from acnet_convert.blocks import fits_centred
from acnet_convert.errors import UnfusableBlockError
from acnet_convert.families.acnet import DIALECTS as _ACNET_DIALECTS
from acnet_convert.families.acnet import acnet_problem
from acnet_convert.fusion import BlockTensors, BNStats, Branch
from acnet_convert.naming import BranchNames

__all__ = [
    "BRANCHES",
    "LAST_BN",
    "REQUIRED_BRANCHES",
    "BranchModules",
    "block_label",
    "block_tensors_from_module",
]


def _module_name(template: str) -> str:
    """``'{p}hor_bn.running_mean'`` -> ``'hor_bn'``: the submodule a key template names."""
    return template.removeprefix("{p}").rpartition(".")[0]


@dataclass(frozen=True)
class BranchModules:
    """One branch of upstream ACNet's dialect as submodule names: its conv and its BN."""

    conv: str
    bn: str
    dilation: int  # relative to the square conv's
    optional: bool

    @classmethod
    def of(cls, names: BranchNames) -> BranchModules:
        if names.weight is None or names.bn is None:  # pragma: no cover - ACNet's are conv+BN
            raise UnfusableBlockError(f"internal error: ACNet branch {names.role!r} is not conv+BN")
        return cls(
            _module_name(names.weight), _module_name(names.bn.mean), names.dilation, names.optional
        )


def _upstream_names() -> tuple[tuple[BranchModules, ...], str]:
    """The square, 1-D and extra branches of upstream's dialect, and its last BN's name."""
    upstream = next(d for d in _ACNET_DIALECTS if d.name == "acnet")
    names = (upstream.square, *(upstream.branches or ()), *upstream.extra_branches)
    last = upstream.last_bn
    branches = tuple(BranchModules.of(b) for b in names if b is not None)
    return branches, _module_name(last.mean) if last is not None else "last_bn"


# square_conv/square_bn, hor_*, ver_*, the optional corner_*, and last_bn: upstream's acb.py
BRANCHES, LAST_BN = _upstream_names()
REQUIRED_BRANCHES = tuple(b for b in BRANCHES if not b.optional)


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _bn_stats(bn: object, where: str, eps: float | None) -> BNStats:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise UnfusableBlockError(f"{where} is a {type(bn).__name__}, not a BatchNorm")
    if bn.running_mean is None or bn.running_var is None:
        raise UnfusableBlockError(
            f"{where} keeps no running statistics (track_running_stats=False), so it "
            "normalises with batch statistics and cannot be folded into a conv"
        )
    return BNStats(
        mean=_numpy(bn.running_mean),
        var=_numpy(bn.running_var),
        weight=_numpy(bn.weight) if bn.weight is not None else None,
        bias=_numpy(bn.bias) if bn.bias is not None else None,
        eps=float(bn.eps if eps is None else eps),
    )


def block_label(module: nn.Module, name: str) -> str:
    return f"block '{name}'" if name else f"{type(module).__name__} block"


@dataclass(frozen=True)
class _Part:
    """One branch as read from a module: its names, kernel shape, conv settings, tensors."""

    names: BranchModules
    shape: tuple[int, ...]
    settings: tuple[object, ...]  # the conv's stride, dilation, groups, padding_mode
    branch: Branch

    @property
    def extent(self) -> tuple[int, int]:
        """The kernel's extent with its dilation relative to the square's."""
        d = self.names.dilation
        return d * (self.shape[2] - 1) + 1, d * (self.shape[3] - 1) + 1


def _read_branch(
    module: nn.Module, names: BranchModules, where: str, eps: float | None
) -> _Part | None:
    """A branch's conv and BN in float64; None for an optional branch the module lacks."""
    conv = getattr(module, names.conv, None)
    if conv is None and names.optional:
        return None
    weight = getattr(conv, "weight", None)
    if not isinstance(conv, nn.Module) or not isinstance(weight, Tensor) or weight.dim() != 4:
        raise UnfusableBlockError(
            f"{where}: '{names.conv}' is missing or has no 4-D weight; is it already fused?"
        )
    bn = getattr(module, names.bn, None)
    stats = _bn_stats(bn, f"{where}: '{names.bn}'", eps) if bn is not None else None
    if stats is not None and stats.mean.shape != (weight.shape[0],):
        raise UnfusableBlockError(
            f"{where}: '{names.bn}' has {stats.mean.shape[0]} channels but "
            f"'{names.conv}' has {weight.shape[0]} outputs"
        )
    bias = getattr(conv, "bias", None)
    return _Part(
        names,
        tuple(weight.shape),
        tuple(getattr(conv, a, None) for a in ("stride", "dilation", "groups", "padding_mode")),
        Branch(
            _numpy(weight),
            _numpy(bias) if isinstance(bias, Tensor) else None,
            stats,
            dilation=names.dilation,
        ),
    )


def _settings_beside(square: _Part, dilation: int) -> tuple[object, ...]:
    """The conv settings a branch needs beside the square: its own, with dilation scaled."""
    stride, square_dilation, *rest = square.settings
    if dilation != 1 and isinstance(square_dilation, tuple):
        square_dilation = tuple(d * dilation for d in square_dilation)
    return (stride, square_dilation, *rest)


def _check_parts(parts: Sequence[_Part], where: str) -> None:
    """Every branch fits centred in the square, with its conv settings; then ACNet's rule."""
    square, *others = parts
    for part in others:
        conv = part.names.conv
        if not fits_centred(part.shape, square.shape, part.names.dilation):
            raise UnfusableBlockError(
                f"{where}: '{conv}' weight {part.shape} does not fit "
                f"centred in '{square.names.conv}' weight {square.shape}"
            )
        wanted = _settings_beside(square, part.names.dilation)
        if part.settings != wanted:
            needs = f", so it needs {wanted}" if wanted != square.settings else ""
            raise UnfusableBlockError(
                f"{where}: '{conv}' has stride/dilation/groups/padding_mode "
                f"{part.settings} but '{square.names.conv}' has {square.settings}{needs}"
            )
    kernels = [(p.names.conv, p.extent, p.names.dilation) for p in parts]
    problem = acnet_problem(kernels, (square.shape[2], square.shape[3]))
    if problem:
        raise UnfusableBlockError(f"{where}: {problem}")


def block_tensors_from_module(
    module: nn.Module, eps: float | None = None, name: str = ""
) -> BlockTensors:
    """The float64 :class:`~acnet_convert.fusion.BlockTensors` of a training-form block.

    ``module`` has the submodules upstream ACNet's dialect names
    (:mod:`acnet_convert.families.acnet`): ``square_conv``, ``hor_conv`` and
    ``ver_conv`` (each with a ``weight`` and optional ``bias``), normally
    ``square_bn``, ``hor_bn`` and ``ver_bn``, optionally a dilated
    ``corner_conv``/``corner_bn`` and ``last_bn``. A branch without its BN is
    taken as it is. The block must pass ACNet's rule
    (:func:`~acnet_convert.families.acnet.validate_acnet`, as ``fuse`` applies
    it): the 1-D branches are told apart by their kernel shapes, not their
    names, and may be shorter than the square (legacy 1x3/3x1 on a 5x5 square).

    Args:
        module: the block (upstream's ACBlock, this package's, or a look-alike).
        eps: overrides every BN's own ``eps`` when given.
        name: the block's name in its model, for error messages.

    Raises:
        UnfusableBlockError: a missing conv, inconsistent shapes or geometry, or a
            BN without running statistics; the message names the block.

    >>> from acnet_convert.nn import ACBlock
    >>> t = block_tensors_from_module(ACBlock(2, 4, 3, padding=1))
    >>> t.square.weight.shape, [b.weight.shape for b in t.others]
    ((4, 2, 3, 3), [(4, 2, 1, 3), (4, 2, 3, 1)])
    """
    where = block_label(module, name)
    parts = [p for b in BRANCHES if (p := _read_branch(module, b, where, eps)) is not None]
    _check_parts(parts, where)
    last = getattr(module, LAST_BN, None)
    last_stats = _bn_stats(last, f"{where}: '{LAST_BN}'", eps) if last is not None else None
    out_ch = parts[0].shape[0]
    if last_stats is not None and last_stats.mean.shape != (out_ch,):
        raise UnfusableBlockError(
            f"{where}: '{LAST_BN}' has {last_stats.mean.shape[0]} channels, expected {out_ch}"
        )
    square, *others = (p.branch for p in parts)
    return BlockTensors(square=square, others=tuple(others), last_bn=last_stats)
