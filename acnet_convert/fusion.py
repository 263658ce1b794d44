"""The fusion arithmetic: pure functions on float64 numpy arrays.

An asymmetric convolution block (ACB; Ding et al., ICCV 2019) computes

    y = BN_sq(conv_kxk(x)) + BN_hor(conv_1xk(x)) + BN_ver(conv_kx1(x))

and, in 2020-era upstream code, optionally a BN after the sum. Each BN folds
into its conv (eq. 3 of the paper; upstream ``ACBlock._fuse_bn_tensor``), and
the 1-D kernels add into the centre row and column of the square kernel
(upstream ``ACBlock._add_to_square_kernel``), giving one conv with a bias.

Nothing here reads files, prints or keeps state. Everything is float64, so the
only rounding a user sees is the final cast to the checkpoint's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "BNStats",
    "BlockTensors",
    "Branch",
    "Comparison",
    "centre_add",
    "centre_crop",
    "compare_outputs",
    "conv_outputs",
    "conv_valid",
    "fold_bn",
    "fuse_block",
    "reference_outputs",
    "rounding_bound",
]


@dataclass(frozen=True)
class BNStats:
    """Eval-mode BatchNorm parameters; ``weight``/``bias`` are None when affine=False."""

    mean: np.ndarray
    var: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float

    def scale(self) -> np.ndarray:
        """``gamma / sqrt(running_var + eps)``, the per-channel factor a BN applies."""
        std = np.sqrt(self.var + self.eps)
        return (self.weight if self.weight is not None else 1.0) / std

    def shift(self) -> np.ndarray:
        """``beta`` (0 when affine=False)."""
        return self.bias if self.bias is not None else np.zeros_like(self.mean)

    def apply(self, y: np.ndarray) -> np.ndarray:
        """Normalise ``y`` [N, C, H, W] the way an eval-mode BatchNorm2d does."""
        std = np.sqrt(self.var + self.eps)
        gamma = self.weight if self.weight is not None else np.ones_like(self.mean)
        c = (slice(None), None, None)
        out: np.ndarray = (y - self.mean[c]) / std[c] * gamma[c] + self.shift()[c]
        return out


@dataclass(frozen=True)
class Branch:
    """One branch of a block in float64: its (last) conv [O, I/g, kh, kw], bias and BN.

    ``kind`` says how the branch computes (:mod:`acnet_convert.kinds`):
    ``conv`` (``dilation`` as stored), ``identity`` (``weight`` None, a BN
    alone), ``avg`` (``pre``: optional 1x1 conv and padding BN; ``bn``: the
    BN after the pool), ``seq`` (``pre``: the 1x1 conv, plus an identity when
    ``implicit_identity``, and padding BN; ``weight``: the kxk conv).
    ``out_channels`` is the whole conv's output count when ``weight`` holds
    the rows of one slab (a ``seq`` branch reads its groups from it; None:
    ``weight`` is whole).
    """

    weight: np.ndarray | None
    bias: np.ndarray | None
    bn: BNStats | None
    kind: str = "conv"
    dilation: int = 1
    pre: Branch | None = None
    implicit_identity: bool = False
    out_channels: int | None = None


@dataclass(frozen=True)
class BlockTensors:
    """A training-time block in float64: the primary conv first, then the other branches.

    The primary (``square``) is a conv whose kernel has the fused kernel's
    shape. ``first_channel`` is the block's output channel of row 0 (a block
    is fused a slab of output channels at a time; identity kernels depend on
    the absolute channel).
    """

    square: Branch
    others: tuple[Branch, ...]
    last_bn: BNStats | None = None
    first_channel: int = 0

    @property
    def target(self) -> tuple[int, int, int, int]:
        """The fused kernel's shape [O (of this slab), I/g, kh, kw]."""
        if self.square.weight is None:
            raise ValueError("the primary branch of a block is a conv")
        o, i, kh, kw = self.square.weight.shape
        return (int(o), int(i), int(kh), int(kw))


def fold_bn(
    weight: np.ndarray, bias: np.ndarray | None, bn: BNStats | None
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an eval-mode BN into the conv before it.

    ``W' = W * t``, ``b' = beta + (b - running_mean) * t`` with
    ``t = gamma / sqrt(running_var + eps)``.

    >>> w = np.ones((2, 1, 3, 3)); bn = BNStats(np.zeros(2), np.ones(2), None, None, 0.0)
    >>> fold_bn(w, None, bn)[0].sum()
    18.0
    """
    conv_bias = bias if bias is not None else np.zeros(weight.shape[0])
    if bn is None:
        return weight.copy(), conv_bias.copy()
    t = bn.scale()
    return weight * t[:, None, None, None], bn.shift() + (conv_bias - bn.mean) * t


def centre_add(square: np.ndarray, kernel: np.ndarray) -> None:
    """Add ``kernel`` [O, I, h, w] into the centre of ``square`` [O, I, k, k], in place.

    A 1x3 kernel on a 5x5 square lands in columns 1..3 of row 2.
    """
    kh, kw = kernel.shape[2:]
    top = (square.shape[2] - kh) // 2
    left = (square.shape[3] - kw) // 2
    square[:, :, top : top + kh, left : left + kw] += kernel


def fuse_block(block: BlockTensors) -> tuple[np.ndarray, np.ndarray]:
    """Collapse a training-time block into one conv kernel and bias (float64).

    Every branch's equivalent kernel (:func:`acnet_convert.kinds.equivalent`)
    is added into the centre of the primary's folded kernel; biases sum.
    """
    from acnet_convert.kinds import equivalent

    if block.square.weight is None:
        raise ValueError("the primary branch of a block is a conv")
    kernel, bias = fold_bn(block.square.weight, block.square.bias, block.square.bn)
    for branch in block.others:
        w, b = equivalent(branch, block.target, block.first_channel)
        centre_add(kernel, w)
        bias = bias + b
    if block.last_bn is not None:
        kernel, bias = fold_bn(kernel, bias, block.last_bn)
    return kernel, bias


def conv_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Ungrouped 'valid' cross-correlation of x [N, C, H, W] with w [O, C, kh, kw]."""
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))  # N, C, H', W', kh, kw
    out = np.tensordot(windows, w, axes=([1, 4, 5], [1, 2, 3]))  # N, H', W', O
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def centre_crop(x: np.ndarray, size: tuple[int, int], kernel: tuple[int, int]) -> np.ndarray:
    """The part of x that a centre-aligned ``kernel`` sees when the square is ``size``."""
    top = (size[0] - kernel[0]) // 2
    left = (size[1] - kernel[1]) // 2
    h = x.shape[2] - (size[0] - kernel[0])
    w = x.shape[3] - (size[1] - kernel[1])
    return x[:, :, top : top + h, left : left + w]


def reference_outputs(block: BlockTensors, x: np.ndarray) -> np.ndarray:
    """Run the training-time block in eval mode on x, branch by branch (float64).

    Each 1-D branch convolves the cropped input, as upstream's ACBlock does,
    so this shares no code with :func:`fuse_block`. The conv is ungrouped over
    ``I/g`` input channels: the per-output-channel identity being checked does
    not depend on the group count.
    """
    from acnet_convert.kinds import reference

    total = np.zeros(1)
    for branch in (block.square, *block.others):
        total = total + reference(branch, x, block.target, block.first_channel)
    if block.last_bn is not None:
        total = block.last_bn.apply(total)
    return total


def conv_outputs(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The fused conv on x, in the dtype of its arguments."""
    out: np.ndarray = conv_valid(x, weight) + bias[:, None, None]
    return out


def rounding_bound(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|x| * |W| + |b|: scales the rounding error any conv with these values may show."""
    out: np.ndarray = conv_valid(np.abs(x), np.abs(weight)) + np.abs(bias)[:, None, None]
    return out


@dataclass(frozen=True)
class Comparison:
    """How far ``got`` is from ``reference``; ``max_rel`` is relative to max |reference|."""

    max_abs: float
    max_rel: float
    cosine: float
    ref_max: float

    def within(self, rtol: float, atol: float = 0.0) -> bool:
        """True when ``max_abs <= atol + rtol * max|reference|`` (and nothing is NaN)."""
        return bool(self.max_abs <= atol + rtol * self.ref_max)


def compare_outputs(reference: np.ndarray, got: np.ndarray) -> Comparison:
    """Max absolute and relative difference and cosine similarity, in float64."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    out = np.asarray(got, dtype=np.float64).ravel()
    with np.errstate(all="ignore"):  # inf/nan in a bad fused file are reported, not warned
        return _compare(ref, out)


def _compare(ref: np.ndarray, out: np.ndarray) -> Comparison:
    diff = np.abs(ref - out)
    max_abs = float(diff.max()) if diff.size else 0.0
    if diff.size and not np.all(np.isfinite(diff)):
        max_abs = float("inf")
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else float("inf"))
    denom = float(np.linalg.norm(ref) * np.linalg.norm(out))
    cosine = float(ref @ out) / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return Comparison(max_abs=max_abs, max_rel=max_rel, cosine=cosine, ref_max=ref_max)
