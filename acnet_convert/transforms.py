"""The re-parameterization family's kernel transforms: pure float64 numpy.

Every structural re-parameterization block (ACNet, DiverseBranchBlock, RepVGG,
MobileOne, RepConv, timm ByobNet, RepLKNet) deploys as one conv because each of
its branches has an equivalent kernel and bias in the target's shape, and the
branches sum. Besides folding a BN (:func:`acnet_convert.fusion.fold_bn`, the
one fold of the project) the family needs four transforms, the ones listed in
DBB's paper (Ding et al., CVPR 2021, "Diverse Branch Block", section 3.2):

- :func:`pad_to`: a smaller kernel is the centre of a larger one (transform VI);
- :func:`identity_kernel`: an identity branch is a kernel with 1 at
  ``[i, i mod in_per_group]`` at the centre (RepVGG, eq. in section 3.3);
- :func:`avg_kernel`: a kxk average pool is ``1/k^2`` on that diagonal (transform V);
- :func:`compose_1x1_kxk`: a 1x1 conv followed by a kxk conv is one kxk conv,
  per group, with the first bias pushed through the second kernel (transform
  III; exact because DBB's padding BN pads with the value a zero input gets).

The ``*_reference`` functions compute the same branches directly (indexing,
window means, two convs in sequence), sharing no code with the transforms, for
the built-in per-block numerical check. They use the "local input" convention
of :func:`acnet_convert.fusion.reference_outputs`: ``x`` is ``[N, I/g, H, W]``
(the channels one group sees, shared by every group), and an output channel
``o`` of a grouped conv sees them as local channels ``0 .. I/g - 1``. Their
outputs are ``[N, O, H - kh + 1, W - kw + 1]`` for a ``kh x kw`` target, the
shape of the fused conv applied to ``x`` without padding.

Nothing here reads files, prints or keeps state.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from acnet_convert.fusion import BNStats

__all__ = [
    "avg_kernel",
    "avg_pool_reference",
    "compose_1x1_kxk",
    "idconv_kernel",
    "identity_kernel",
    "identity_reference",
    "pad_to",
    "sequential_reference",
]


def pad_to(kernel: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Centre ``kernel`` [O, I, h, w] in a zero ``kh x kw`` kernel (a new array).

    A 1x1 lands at the centre of a 3x3; a 1x3 on a 5x5 fills columns 1..3 of
    row 2. Sizes must differ by an even number, as centre alignment requires.

    >>> pad_to(np.ones((1, 1, 1, 1)), 3, 3)[0, 0]
    array([[0., 0., 0.],
           [0., 1., 0.],
           [0., 0., 0.]])
    """
    h, w = kernel.shape[2:]
    dh, dw = kh - h, kw - w
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f"cannot centre a {h}x{w} kernel in {kh}x{kw}")
    out = np.zeros((*kernel.shape[:2], kh, kw), dtype=np.float64)
    out[:, :, dh // 2 : dh // 2 + h, dw // 2 : dw // 2 + w] = kernel
    return out


def _channels(channels: int, in_per_group: int, rows: slice | None) -> np.ndarray:
    """The output channels asked for (``rows`` of ``channels``; all without it)."""
    if in_per_group <= 0 or channels % in_per_group:
        raise ValueError(f"{channels} channels do not split into groups of {in_per_group}")
    return np.arange(channels)[rows if rows is not None else slice(None)]


def _diagonal(
    channels: int, in_per_group: int, kh: int, kw: int, value: float, rows: slice | None
) -> np.ndarray:
    """``value`` at ``[i, i mod in_per_group]`` over the whole ``kh x kw`` window, for the
    output channels ``rows`` only (a slab costs its own rows, not the block's)."""
    wanted = _channels(channels, in_per_group, rows)
    out = np.zeros((len(wanted), in_per_group, kh, kw), dtype=np.float64)
    out[np.arange(len(wanted)), wanted % in_per_group] = value
    return out


def identity_kernel(
    channels: int, in_per_group: int, kh: int, kw: int, rows: slice | None = None
) -> np.ndarray:
    """The kernel of an identity branch: 1 at ``[i, i mod in_per_group]`` at the centre.

    ``channels`` is the block's width (in == out); ``in_per_group`` is the
    conv's second dimension, so with groups ``g`` it is ``channels / g``.
    ``rows`` keeps only those output channels (a slab).

    >>> identity_kernel(4, 2, 1, 1)[:, :, 0, 0]
    array([[1., 0.],
           [0., 1.],
           [1., 0.],
           [0., 1.]])
    """
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"an identity has no centre in an even {kh}x{kw} kernel")
    return pad_to(_diagonal(channels, in_per_group, 1, 1, 1.0, rows), kh, kw)


def avg_kernel(channels: int, in_per_group: int, k: int, rows: slice | None = None) -> np.ndarray:
    """The kernel of a kxk average pool (zeros counted): ``1/k^2`` on the channel diagonal.

    Agrees with ``nn.AvgPool2d(k, stride, padding)`` whose default
    ``count_include_pad=True`` divides by ``k^2`` at the borders too. ``rows``
    keeps only those output channels (a slab).
    """
    return _diagonal(channels, in_per_group, k, k, 1.0 / (k * k), rows)


def idconv_kernel(weight: np.ndarray) -> np.ndarray:
    """DBB's ``idconv1``: the stored 1x1 weight plus the identity it never stores.

    ``weight`` is [C, C/g, 1, 1]; upstream ``IdentityBasedConv1x1`` adds 1 at
    ``[i, i mod (C/g)]`` in its forward pass, and that identity is not a tensor
    of the state dict.
    """
    channels, in_per_group, kh, kw = weight.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"an identity has no centre in an even {kh}x{kw} kernel")
    if in_per_group <= 0 or channels % in_per_group:
        raise ValueError(f"{channels} channels do not split into groups of {in_per_group}")
    # weight + identity_kernel(...), without a dense identity: + 0.0 off the diagonal (the
    # same values, -0.0 included, as adding the zeros), + 1.0 on it
    out: np.ndarray = weight + 0.0
    rows = np.arange(channels)
    out[rows, rows % in_per_group, kh // 2, kw // 2] += 1.0
    return out


def compose_1x1_kxk(
    k1: np.ndarray, b1: np.ndarray, k2: np.ndarray, b2: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """A 1x1 conv (``k1`` [M, I/g, 1, 1], ``b1`` [M]) then a kxk conv (``k2`` [O, M/g, kh, kw]).

    Per group ``g``: ``K[o, i] = sum_m k2[o, m] * k1[m, i]`` over the group's
    middle channels, and ``b[o] = b2[o] + sum_{m, y, x} k2[o, m, y, x] * b1[m]``.
    The bias term is exact when the middle map is padded with ``b1`` (what
    DBB's ``BNAndPadLayer`` does), not with zeros.

    Returns the [O, I/g, kh, kw] kernel and the [O] bias.
    """
    m, in_per_group, h, w = k1.shape
    out, mid_per_group = k2.shape[:2]
    if (h, w) != (1, 1):
        raise ValueError(f"the first conv must be 1x1, got {h}x{w}")
    if groups <= 0 or m % groups or out % groups or m // groups != mid_per_group:
        raise ValueError(
            f"{m} middle channels, {out} outputs and {mid_per_group} inputs per group of the "
            f"second conv do not fit {groups} groups"
        )
    kh, kw = k2.shape[2:]
    og = out // groups
    first = k1[:, :, 0, 0].reshape(groups, mid_per_group, in_per_group)  # g, m, i
    second = k2.reshape(groups, og, mid_per_group, kh * kw)  # g, o, m, yx
    # One (o*yx, m) @ (m, i) product per group, stacked: BLAS speed on ResNet widths, where a
    # plain einsum (or a broadcast matmul) over these axes is 25-50x slower.
    rows = np.ascontiguousarray(second.transpose(0, 1, 3, 2)).reshape(groups, og * kh * kw, -1)
    kernel = np.matmul(rows, first).reshape(groups, og, kh * kw, in_per_group)
    kernel = kernel.transpose(0, 1, 3, 2).reshape(out, in_per_group, kh, kw)
    # the bias row by row (not a matrix-vector product, whose rounding depends on how many
    # rows it is given), so a slab of rows composes to the bits the whole kernel gives
    pushed = (second.sum(axis=3) * b1.reshape(groups, 1, mid_per_group)).sum(axis=2).reshape(out)
    return kernel, pushed + b2


def _windows(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Sliding ``kh x kw`` windows of x [N, C, H, W]: [N, C, H', W', kh, kw]."""
    return sliding_window_view(x, (kh, kw), axis=(2, 3))


def _centre(x: np.ndarray, target: tuple[int, int], kernel: tuple[int, int]) -> np.ndarray:
    """The part of x a centre-aligned ``kernel`` sees when the fused kernel is ``target``."""
    dh, dw = target[0] - kernel[0], target[1] - kernel[1]
    return x[:, :, dh // 2 : x.shape[2] - (dh - dh // 2), dw // 2 : x.shape[3] - (dw - dw // 2)]


def _normalise(y: np.ndarray, bn: BNStats | None) -> np.ndarray:
    return bn.apply(y) if bn is not None else y


def identity_reference(
    channels: int,
    x: np.ndarray,
    target: tuple[int, int],
    bn: BNStats | None,
    rows: slice | None = None,
) -> np.ndarray:
    """An identity branch (a BN alone, or nothing) on the local input x [N, I/g, H, W].

    Output channel ``o`` is local input channel ``o mod (I/g)`` at the centre of
    each ``target`` window, then normalised by ``bn``; ``rows`` keeps only those
    output channels.
    """
    centre = _centre(x, target, (1, 1))
    return _normalise(centre[:, np.arange(channels)[rows or slice(None)] % x.shape[1]], bn)


def avg_pool_reference(
    x: np.ndarray,
    k: int,
    avg_bn: BNStats | None,
    conv: np.ndarray | None = None,
    conv_bn: BNStats | None = None,
    channels: int | None = None,
    rows: slice | None = None,
) -> np.ndarray:
    """DBB's ``dbb_avg``: [1x1 ``conv`` [O, I/g, 1, 1], its ``bn``], kxk average pool, ``avgbn``.

    Without ``conv`` (DBB's depthwise form) the pool runs on the input itself:
    output channel ``o`` averages local channel ``o mod (I/g)``, for ``channels``
    outputs (``rows`` of them, if given). The target kernel is kxk.
    """
    if conv is not None:
        z = np.einsum("oi,nihw->nohw", conv[:, :, 0, 0], x)
        z = _normalise(z, conv_bn)
    else:
        if channels is None:
            raise ValueError("an average pool without a conv needs the channel count")
        z = x[:, np.arange(channels)[rows or slice(None)] % x.shape[1]]
    pooled = _windows(z, k, k).mean(axis=(4, 5))
    return _normalise(pooled, avg_bn)


def sequential_reference(
    x: np.ndarray,
    first: np.ndarray,
    first_bn: BNStats | None,
    second: np.ndarray,
    second_bn: BNStats | None,
    target: tuple[int, int],
) -> np.ndarray:
    """A 1x1 conv ``first`` [M, I/g, 1, 1], its BN, then a grouped conv ``second`` [O, M/g, kh, kw].

    The groups follow from the shapes: ``M / (M/g)``. Each group's middle
    channels come from the shared local input; output channel ``o`` of the
    second conv reads the middle channels of its own group. ``first`` is the
    effective kernel (for DBB's ``idconv1`` the caller adds the identity). The
    second conv's window is centred in ``target``.
    """
    mid, mid_per_group = first.shape[0], second.shape[1]
    groups = mid // mid_per_group
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # the sum runs over contiguous i
    z = _normalise(np.einsum("mi,nhwi->nmhw", first[:, :, 0, 0], channels_last), first_bn)
    kh, kw = second.shape[2:]
    z = _centre(z, target, (kh, kw))
    out_per_group = second.shape[0] // groups
    parts = []
    for g in range(groups):
        zg = _windows(z[:, g * mid_per_group : (g + 1) * mid_per_group], kh, kw)
        wg = second[g * out_per_group : (g + 1) * out_per_group]
        parts.append(np.einsum("nmhwyx,omyx->nohw", zg, wg))
    return _normalise(np.concatenate(parts, axis=1), second_bn)
