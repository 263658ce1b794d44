"""From a :class:`~acnet_convert.dialects.BlockSpec` and a checkpoint's tensors to
validated float64 :class:`~acnet_convert.fusion.BlockTensors`.

Shape checks run on the index alone (before any data is read); value checks
(finite, ``running_var + eps > 0``) run when the block's tensors are loaded.
Every message names the file, the block and the key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from acnet_convert import dtypes
from acnet_convert.checkpoint.base import TensorInfo
from acnet_convert.dialects import BlockSpec, BNSpec, BranchSpec
from acnet_convert.errors import UnfusableBlockError
from acnet_convert.fusion import BlockTensors, BNStats, Branch

__all__ = ["BlockGeometry", "block_geometry", "from_layout", "load_block", "to_layout"]


@dataclass(frozen=True)
class BlockGeometry:
    """What the index says about a block: sizes, dtype and which branch is 1xk."""

    out_channels: int
    in_per_group: int
    kernel: int
    hor: tuple[int, int]
    ver: tuple[int, int]
    dtype: str
    hor_index: int
    has_last_bn: bool
    affine: bool
    conv_bias: bool


def _oihw(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "HWIO" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def to_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """An OIHW kernel in the dialect's storage layout."""
    return array.transpose(2, 3, 1, 0) if layout == "HWIO" else array


def from_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """A kernel stored in the dialect's layout, as OIHW."""
    return array.transpose(3, 2, 0, 1) if layout == "HWIO" else array


class _Checker:
    def __init__(self, source: str, spec: BlockSpec, infos: Mapping[str, TensorInfo]) -> None:
        self.source = source
        self.spec = spec
        self.infos = infos

    def fail(self, message: str) -> UnfusableBlockError:
        return UnfusableBlockError(f"{self.source}: block '{self.spec.label}': {message}")

    def info(self, key: str, hint: str = "") -> TensorInfo:
        if key not in self.infos:
            raise self.fail(f"'{key}' is missing{hint}")
        info = self.infos[key]
        if info.dtype not in dtypes.FLOAT_DTYPES:
            raise self.fail(f"'{key}' has dtype {info.dtype}; weights must be floating point")
        return info

    def vector(self, key: str, channels: int) -> None:
        shape = self.info(key).shape
        if shape != (channels,):
            raise self.fail(
                f"'{key}' has shape {list(shape)}, expected [{channels}] (one value per output channel)"
            )

    def bn(self, bn: BNSpec | None, channels: int, role: str) -> None:
        if bn is None:
            return
        hint = "; is this checkpoint already fused? Try 'acnet-convert inspect'"
        for stat in (bn.mean, bn.var):
            self.info(stat, hint)
        for affine in (bn.weight, bn.bias):
            if affine is not None:
                self.info(affine, f" ({role} has one of weight/bias but not the other)")
        for key in (bn.weight, bn.bias, bn.mean, bn.var):
            if key is not None:
                self.vector(key, channels)


def block_geometry(
    spec: BlockSpec, infos: Mapping[str, TensorInfo], source: str, layout: str = "OIHW"
) -> BlockGeometry:
    """Check a block's shapes and dtypes from the index alone.

    Raises:
        UnfusableBlockError: a missing part, a non-float dtype, an even or
            non-square kernel, 1-D kernels that are not one 1xk' and one
            k'x1 with k' <= k, or channel counts that disagree.
    """
    c = _Checker(source, spec, infos)
    hint = "; is this checkpoint already fused? Try 'acnet-convert inspect'"
    square = _oihw(c.info(spec.square.weight, hint).shape, layout)
    if len(square) != 4:
        raise c.fail(f"'{spec.square.weight}' has shape {list(square)}, expected a 4-D conv kernel")
    out_ch, in_ch, kh, kw = square
    if kh != kw or kh % 2 == 0 or kh < 3:
        raise c.fail(
            f"'{spec.square.weight}' has a {kh}x{kw} kernel; an asymmetric block needs an odd square kernel of size 3 or more"
        )
    if out_ch == 0 or in_ch == 0:
        raise c.fail(f"'{spec.square.weight}' has shape {list(square)} with no channels")
    shapes = [_oihw(c.info(b.weight, hint).shape, layout) for b in spec.branches]
    for branch, shape in zip(spec.branches, shapes, strict=True):
        if len(shape) != 4 or shape[:2] != (out_ch, in_ch):
            raise c.fail(
                f"'{branch.weight}' has shape {list(shape)}, which does not fit the square kernel "
                f"{list(square)} (expected [{out_ch}, {in_ch}, 1, k] or [{out_ch}, {in_ch}, k, 1])"
            )
    kinds = [
        "hor" if s[2] == 1 and s[3] > 1 else "ver" if s[3] == 1 and s[2] > 1 else "bad"
        for s in shapes
    ]
    if sorted(kinds) != ["hor", "ver"]:
        raise c.fail(
            f"the 1-D kernels '{spec.branches[0].weight}' {list(shapes[0][2:])} and "
            f"'{spec.branches[1].weight}' {list(shapes[1][2:])} are not one 1xk and one kx1"
        )
    hor_index = kinds.index("hor")
    for branch, shape in zip(spec.branches, shapes, strict=True):
        length = max(shape[2], shape[3])
        if length % 2 == 0 or length > kh:
            raise c.fail(
                f"'{branch.weight}' is {shape[2]}x{shape[3]}; a 1-D kernel must have odd length no longer than the {kh}x{kh} square"
            )
    branches = (spec.square, *spec.branches)
    with_bn = [b.bn is not None for b in branches]
    if any(with_bn) and not all(with_bn):
        missing = next(b for b in branches if b.bn is None)
        raise c.fail(f"the branch '{missing.weight}' has no BatchNorm while its siblings do")
    for b in branches:
        c.bn(b.bn, out_ch, b.weight)
        if b.bias is not None:
            c.vector(b.bias, out_ch)
    c.bn(spec.last_bn, out_ch, "last_bn")
    affine = all(b.bn is None or b.bn.weight is not None for b in branches)
    return BlockGeometry(
        out_channels=out_ch,
        in_per_group=in_ch,
        kernel=kh,
        hor=(shapes[hor_index][2], shapes[hor_index][3]),
        ver=(shapes[1 - hor_index][2], shapes[1 - hor_index][3]),
        dtype=infos[spec.square.weight].dtype,
        hor_index=hor_index,
        has_last_bn=spec.last_bn is not None,
        affine=affine,
        conv_bias=any(b.bias is not None for b in branches),
    )


def load_block(
    spec: BlockSpec,
    infos: Mapping[str, TensorInfo],
    read: Callable[[str], np.ndarray],
    eps: float,
    source: str,
    layout: str = "OIHW",
    bn_eps: Mapping[str, float] | None = None,
) -> BlockTensors:
    """Read a block's tensors into float64, in OIHW, checking their values.

    ``bn_eps`` maps a BN's running-mean key to the epsilon its file declares
    (a reader's ``bn_epsilons``); other BNs use ``eps``.

    Raises:
        UnfusableBlockError: NaN/Inf anywhere in the block, or
            ``running_var + eps <= 0`` in one of its BNs.
    """
    c = _Checker(source, spec, infos)

    def load(key: str) -> np.ndarray:
        values = dtypes.to_float64(read(key), infos[key].dtype)
        if not np.all(np.isfinite(values)):
            raise c.fail(f"'{key}' holds NaN or Inf; the training run may have diverged")
        return values

    def bn(s: BNSpec | None) -> BNStats | None:
        if s is None:
            return None
        e = (bn_eps or {}).get(s.mean, eps)
        var = load(s.var)
        if np.any(var + e <= 0):
            raise c.fail(f"'{s.var}' + eps ({e:g}) is not positive; the BN statistics are corrupt")
        return BNStats(
            mean=load(s.mean),
            var=var,
            weight=load(s.weight) if s.weight else None,
            bias=load(s.bias) if s.bias else None,
            eps=e,
        )

    def branch(s: BranchSpec) -> Branch:
        return Branch(
            weight=np.ascontiguousarray(from_layout(load(s.weight), layout)),
            bias=load(s.bias) if s.bias else None,
            bn=bn(s.bn),
        )

    return BlockTensors(
        square=branch(spec.square),
        others=(branch(spec.branches[0]), branch(spec.branches[1])),
        last_bn=bn(spec.last_bn),
    )
