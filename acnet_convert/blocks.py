"""From a :class:`~acnet_convert.naming.BlockSpec` and a checkpoint's tensors to
validated float64 :class:`~acnet_convert.fusion.BlockTensors`.

Shape checks run on the index alone (before any data is read); value checks
(finite, ``running_var + eps > 0``) run when the block's tensors are loaded.
The checks that hold for every family live here (every part present and
floating point, every branch fits centred in the primary kernel, BN widths);
a family's own rule (ACNet: an odd square and one 1xk and one kx1) is its
dialect's ``validate``. Every message names the file, the block and the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.checkpoint.base import TensorInfo
from acnet_convert.errors import UnfusableBlockError
from acnet_convert.families import family_title
from acnet_convert.fusion import BlockTensors, BNStats, Branch
from acnet_convert.keyfit import a_few
from acnet_convert.kinds import streamable
from acnet_convert.naming import BlockSpec, BNSpec, BranchSpec

__all__ = [
    "BlockGeometry",
    "BranchGeometry",
    "block_geometry",
    "fits_centred",
    "from_layout",
    "load_block",
    "to_layout",
]

_HINT = "; is this checkpoint already fused? Try 'acnet-convert inspect'"


@dataclass(frozen=True)
class BranchGeometry:
    """One branch as the index shows it: kind, kernel (dilated extent), the keys it consumes."""

    kind: str
    role: str
    key: str
    kernel: tuple[int, int]
    dilation: int
    keys: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "role": self.role,
            "kernel": list(self.kernel),
            "dilation": self.dilation,
            "tensors": list(self.keys),
        }


@dataclass(frozen=True)
class BlockGeometry:
    """What the index says about a block: the target conv, its branches, dtype.

    ``groups`` is known where shapes tell it (an identity branch: out / in-per-group;
    a sequential branch: middle width / the kxk conv's in-channels), else None.
    """

    out_channels: int
    in_per_group: int
    kh: int
    kw: int
    groups: int | None
    branches: tuple[BranchGeometry, ...]
    dtype: str
    has_last_bn: bool
    affine: bool
    conv_bias: bool
    streamable: bool = True

    @property
    def kernel(self) -> int:
        """The target's kernel height (its size, for the square kernels of every family)."""
        return self.kh

    def _one_d(self, row: bool) -> tuple[int, int] | None:
        for b in self.branches[1:]:
            h, w = b.kernel
            if (h == 1 and w > 1) if row else (w == 1 and h > 1):
                return b.kernel
        return None

    @property
    def hor(self) -> tuple[int, int] | None:
        """The 1xk branch's kernel (ACNet), if any."""
        return self._one_d(row=True)

    @property
    def ver(self) -> tuple[int, int] | None:
        """The kx1 branch's kernel (ACNet), if any."""
        return self._one_d(row=False)


def _oihw(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "HWIO" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def to_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """An OIHW kernel in the dialect's kernel order."""
    return array.transpose(2, 3, 1, 0) if layout == "HWIO" else array


def from_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A kernel stored in the dialect's kernel order, as OIHW."""
    return array.transpose(3, 2, 0, 1) if layout == "HWIO" else array


def fits_centred(shape: Sequence[int], target: Sequence[int], dilation: int = 1) -> bool:
    """Whether an OIHW kernel (its extent with ``dilation``) fits centred in ``target``.

    The rule every family's branches follow: the same [O, I], no side larger
    than the target's, and even differences (so the branch has a centre).

    >>> fits_centred((4, 2, 1, 3), (4, 2, 5, 5)), fits_centred((4, 2, 2, 1), (4, 2, 3, 3))
    (True, False)
    """
    dh = target[2] - (dilation * (shape[2] - 1) + 1)
    dw = target[3] - (dilation * (shape[3] - 1) + 1)
    same_io = tuple(shape[:2]) == tuple(target[:2])
    return same_io and dh >= 0 and dw >= 0 and dh % 2 == 0 and dw % 2 == 0


class _Checker:
    def __init__(
        self, source: str, spec: BlockSpec, infos: Mapping[str, TensorInfo], layout: str
    ) -> None:
        self.source = source
        self.spec = spec
        self.infos = infos
        self.layout = layout

    def fail(self, message: str) -> UnfusableBlockError:
        return UnfusableBlockError(f"{self.source}: block '{self.spec.label}': {message}")

    def info(self, key: str, hint: str = "") -> TensorInfo:
        if key not in self.infos:
            raise self.fail(self.missing(key) if hint == _HINT else f"'{key}' is missing{hint}")
        info = self.infos[key]
        if info.dtype not in dtypes.FLOAT_DTYPES:
            raise self.fail(f"'{key}' has dtype {info.dtype}; weights must be floating point")
        return info

    def short(self, key: str) -> str:
        """A key relative to the block's prefix, as the family's names read."""
        p = self.spec.fields.get("p") or ""
        return key[len(p) :] if p and key.startswith(p) else key

    def looks_fused(self) -> bool:
        """No BN tensor of the block is left, or its fused conv is there too."""
        spec = self.spec
        branches = [*spec.all_branches, *(b.pre for b in spec.all_branches if b.pre)]
        bns = [k for b in branches if b.bn for k in b.bn.keys()]  # noqa: SIM118
        bns += list(spec.last_bn.keys()) if spec.last_bn else []
        if spec.fused_weight != spec.square.weight and spec.fused_weight in self.infos:
            return True
        return not any(k in self.infos for k in bns)

    def missing(self, key: str) -> str:
        """What a missing key means: a fused block, or what was found of an incomplete one."""
        if self.looks_fused():
            return f"'{key}' is missing{_HINT}"
        branch = next((b for b in self.spec.all_branches if key in b.keys()), None)  # noqa: SIM118
        near = [k for k in (branch.keys() if branch else ()) if k in self.infos]
        where = f"its branch '{branch.role}' has " if near and branch and branch.role else ""
        near = near or [k for k in self.spec.keys() if k in self.infos]  # noqa: SIM118
        shown = a_few([f"'{self.short(k)}'" for k in near], 3)
        return (
            f"these look like {family_title(self.spec.family)} tensors without "
            f"'{self.short(key)}' ({where}{shown}): an incomplete block, not a fused one "
            f"('{key}' is missing). Try 'acnet-convert inspect'"
        )

    def kernel(self, key: str) -> tuple[int, ...]:
        shape = _oihw(self.info(key, _HINT).shape, self.layout)
        if len(shape) != 4:
            raise self.fail(f"'{key}' has shape {list(shape)}, expected a 4-D conv kernel")
        return shape

    def vector(self, key: str, channels: int) -> None:
        shape = self.info(key).shape
        if shape != (channels,):
            raise self.fail(
                f"'{key}' has shape {list(shape)}, expected [{channels}] (one value per output channel)"
            )

    def bn(self, bn: BNSpec | None, channels: int, role: str) -> None:
        if bn is None:
            return
        for stat in (bn.mean, bn.var):
            self.info(stat, _HINT)
        for affine in (bn.weight, bn.bias):
            if affine is not None:
                self.info(affine, f" ({role} has one of weight/bias but not the other)")
        for key in (bn.weight, bn.bias, bn.mean, bn.var):
            if key is not None:
                self.vector(key, channels)

    def fits(self, key: str, shape: tuple[int, ...], target: tuple[int, ...], d: int) -> None:
        """A conv kernel (dilated extent) that fits centred in the target, same [O, I]."""
        if not fits_centred(shape, target, d):
            extent = (d * (shape[2] - 1) + 1, d * (shape[3] - 1) + 1)
            what = f" (dilation {d}: {extent[0]}x{extent[1]})" if d > 1 else ""
            raise self.fail(
                f"'{key}' has shape {list(shape)}{what}, which does not fit centred in the primary "
                f"kernel {list(target)} of '{self.spec.square.first_key}' "
                f"(expected [{target[0]}, {target[1]}, h, w] with h <= {target[2]}, w <= {target[3]}, "
                "differences even)"
            )


def _branch_shape(c: _Checker, b: BranchSpec, target: tuple[int, ...]) -> tuple[int, int]:
    """The kernel a branch adds (before the fit check), from its own tensors."""
    if b.kind == "conv" and b.weight is not None:
        shape = c.kernel(b.weight)
        if shape[:2] != target[:2]:
            c.fits(b.weight, shape, target, b.dilation)
        return (b.dilation * (shape[2] - 1) + 1, b.dilation * (shape[3] - 1) + 1)
    if b.kind == "seq" and b.weight is not None:
        shape = c.kernel(b.weight)
        return (shape[2], shape[3])
    if b.kind == "identity":
        return (1, 1)
    if b.kind == "avg":
        return (target[2], target[3])
    raise c.fail(f"a '{b.kind}' branch at '{b.first_key}' lacks its conv weight{_HINT}")


def _check_branch(c: _Checker, b: BranchSpec, target: tuple[int, ...]) -> int | None:
    """The shape checks of one non-primary branch; returns the groups it implies, if any."""
    out_ch, in_pg, kh, kw = target
    if b.kind == "conv" and b.weight is not None:
        c.fits(b.weight, c.kernel(b.weight), target, b.dilation)
    elif b.kind == "identity":
        return _check_identity(c, b, target)
    elif b.kind == "avg":
        if b.pre is not None and b.pre.weight is not None:
            c.fits(b.pre.weight, c.kernel(b.pre.weight), (out_ch, in_pg, 1, 1), 1)
            c.bn(b.pre.bn, out_ch, b.pre.weight)
        elif out_ch % in_pg:
            raise c.fail(f"the average-pool branch '{b.role}' without a conv needs in == out")
        if kh != kw:
            raise c.fail(f"an average-pool branch needs a square kernel, not {kh}x{kw}")
    elif b.kind == "seq" and b.weight is not None and b.pre is not None and b.pre.weight:
        return _check_seq(c, b, target)
    return None


def _check_identity(c: _Checker, b: BranchSpec, target: tuple[int, ...]) -> int:
    out_ch, in_pg, kh, kw = target
    title = family_title(c.spec.family)
    if b.bn is None:
        raise c.fail(f"the {title} identity branch '{b.role}' has no BatchNorm tensors")
    width = c.infos[b.bn.mean].shape if b.bn.mean in c.infos else (out_ch,)
    if out_ch % in_pg or width != (out_ch,):
        found = f"its BN has {list(width)} channels, " if width != (out_ch,) else ""
        raise c.fail(
            f"{title} identity branch '{c.short(b.bn.var).rpartition('.')[0] or b.role}' with "
            f"in != out: {found}the primary conv '{c.short(c.spec.square.first_key)}' is "
            f"{list(target)} ({out_ch} outputs, {in_pg} inputs per group); an identity needs "
            "in == out channels"
        )
    if kh % 2 == 0 or kw % 2 == 0:
        raise c.fail(
            f"{title} identity branch '{b.role}' beside an even {kh}x{kw} primary kernel: an "
            "identity needs an odd kernel"
        )
    return out_ch // in_pg


def _check_seq(c: _Checker, b: BranchSpec, target: tuple[int, ...]) -> int:
    if b.weight is None or b.pre is None or b.pre.weight is None:
        raise c.fail(f"the sequential branch '{b.role}' lacks one of its convs{_HINT}")
    first = c.kernel(b.pre.weight)
    second = c.kernel(b.weight)
    mid = first[0]
    if first[1] != target[1] or first[2:] != (1, 1) or second[1] == 0 or mid % second[1]:
        raise c.fail(
            f"'{b.pre.weight}' {list(first)} then '{b.weight}' {list(second)} do not compose "
            f"into the primary kernel {list(target)} (a 1x1 conv, then groups of middle channels)"
        )
    groups = mid // second[1]
    if target[0] % groups or (b.pre.implicit_identity and first[1] != second[1]):
        raise c.fail(
            f"'{b.pre.weight}' {list(first)} and '{b.weight}' {list(second)}: {groups} groups do "
            f"not fit {target[0]} outputs{' and an identity 1x1' if b.pre.implicit_identity else ''}"
        )
    c.fits(b.weight, (target[0], target[1], *second[2:]), target, 1)
    c.bn(b.pre.bn, mid, b.pre.weight)
    return groups


def block_geometry(
    spec: BlockSpec,
    infos: Mapping[str, TensorInfo],
    source: str,
    layout: str = "OIHW",
    validate: Callable[[Any], str | None] | None = None,
) -> BlockGeometry:
    """Check a block's shapes and dtypes from the index alone.

    ``validate`` is the family's own rule (see :class:`~acnet_convert.naming.Dialect`).

    Raises:
        UnfusableBlockError: a missing part, a non-float dtype, a branch that
            does not fit the primary kernel, channel counts that disagree, or
            a block the family's rule refuses.
    """
    c = _Checker(source, spec, infos, layout)
    if spec.square.weight is None:
        raise c.fail("the primary branch has no conv weight")
    square = c.kernel(spec.square.weight)
    out_ch, in_ch, kh, kw = square
    if out_ch == 0 or in_ch == 0:
        raise c.fail(f"'{spec.square.weight}' has shape {list(square)} with no channels")
    branches = spec.all_branches
    kernels = [(kh, kw)] + [_branch_shape(c, b, square) for b in spec.branches]
    draft = [
        BranchGeometry(b.kind, b.role, b.first_key, k, b.dilation, b.keys())
        for b, k in zip(branches, kernels, strict=True)
    ]
    geometry = _geometry(spec, infos, square, tuple(draft), None)
    problem = validate(geometry) if validate is not None else None
    if problem:
        raise c.fail(problem)
    groups = [g for b in spec.branches if (g := _check_branch(c, b, square)) is not None]
    if len(set(groups)) > 1:
        raise c.fail(f"its branches imply different group counts: {sorted(set(groups))}")
    convs = [b for b in branches if b.kind == "conv"]
    with_bn = [b.bn is not None for b in convs]
    if any(with_bn) and not all(with_bn):
        missing = next(b for b in convs if b.bn is None)
        raise c.fail(f"the branch '{missing.weight}' has no BatchNorm while its siblings do")
    for b in branches:
        c.bn(b.bn, out_ch, b.first_key)
        if b.bias is not None:
            c.vector(b.bias, out_ch)
    c.bn(spec.last_bn, out_ch, "last_bn")
    return _geometry(spec, infos, square, tuple(draft), groups[0] if groups else None)


def _geometry(
    spec: BlockSpec,
    infos: Mapping[str, TensorInfo],
    square: tuple[int, ...],
    branches: tuple[BranchGeometry, ...],
    groups: int | None,
) -> BlockGeometry:
    bns = [b.bn for b in spec.all_branches if b.bn] + [
        b.pre.bn for b in spec.all_branches if b.pre and b.pre.bn
    ]
    return BlockGeometry(
        out_channels=square[0],
        in_per_group=square[1],
        kh=square[2],
        kw=square[3],
        groups=groups,
        branches=branches,
        dtype=infos[spec.square.weight].dtype if spec.square.weight else "float32",
        has_last_bn=spec.last_bn is not None,
        affine=all(bn.weight is not None for bn in bns),
        conv_bias=any(b.bias is not None for b in spec.all_branches),
        streamable=streamable(spec.all_branches),
    )


Reader = Callable[[str], np.ndarray]


def load_block(
    spec: BlockSpec,
    infos: Mapping[str, TensorInfo],
    read: Reader,
    eps: float,
    source: str,
    layout: str = "OIHW",
    *,
    first_channel: int = 0,
    read_whole: Reader | None = None,
    bn_eps: Mapping[str, float] | None = None,
) -> BlockTensors:
    """Read a block's tensors into float64, in OIHW, checking their values.

    ``read`` gives the rows of the slab being fused (per-output-channel
    tensors); ``read_whole`` the whole tensor, for the middle channels of a
    sequential branch (default: ``read``). ``bn_eps`` maps a BN's
    running-mean key to the epsilon its file declares; ``eps`` is used for the others.

    Raises:
        UnfusableBlockError: NaN/Inf anywhere in the block, or
            ``running_var + eps <= 0`` in one of its BNs.
    """
    loader = _Loader(
        _Checker(source, spec, infos, layout), infos, read_whole or read, eps, bn_eps or {},
        layout,
    )  # fmt: skip
    return BlockTensors(
        square=loader.branch(spec.square, read),
        others=tuple(loader.branch(b, read) for b in spec.branches),
        last_bn=loader.bn(spec.last_bn, read),
        first_channel=first_channel,
    )


@dataclass(frozen=True)
class _Loader:
    """Reads one block's tensors for :func:`load_block`, checking each value."""

    checker: _Checker
    infos: Mapping[str, TensorInfo]
    whole: Reader
    eps: float
    declared: Mapping[str, float]
    layout: str

    def load(self, key: str, reader: Reader) -> np.ndarray:
        values = dtypes.to_float64(reader(key), self.infos[key].dtype)
        if not np.all(np.isfinite(values)):
            raise self.checker.fail(f"'{key}' holds NaN or Inf; the training run may have diverged")
        return values

    def bn(self, s: BNSpec | None, reader: Reader) -> BNStats | None:
        if s is None:
            return None
        e = self.declared.get(s.mean, self.eps)
        var = self.load(s.var, reader)
        if np.any(var + e <= 0):
            raise self.checker.fail(
                f"'{s.var}' + eps ({e:g}) is not positive; the BN statistics are corrupt"
            )
        return BNStats(
            mean=self.load(s.mean, reader),
            var=var,
            weight=self.load(s.weight, reader) if s.weight else None,
            bias=self.load(s.bias, reader) if s.bias else None,
            eps=e,
        )

    def branch(self, s: BranchSpec, reader: Reader) -> Branch:
        # A sequential branch's first conv is read whole: its middle channels
        # feed every output row of the slab.
        pre_reader = self.whole if s.kind == "seq" else reader
        weight = None
        if s.weight:
            weight = np.ascontiguousarray(from_layout(self.load(s.weight, reader), self.layout))
        out_channels = None
        if s.kind == "seq" and s.weight:
            out_channels = _oihw(self.infos[s.weight].shape, self.layout)[0]
        return Branch(
            weight=weight,
            bias=self.load(s.bias, reader) if s.bias else None,
            bn=self.bn(s.bn, reader),
            kind=s.kind,
            dilation=s.dilation,
            pre=self.branch(s.pre, pre_reader) if s.pre else None,
            implicit_identity=s.implicit_identity,
            out_channels=out_channels,
        )
