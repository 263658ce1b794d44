"""Branch kinds: each branch's equivalent kernel, its reference computation, its streaming.

A block's branches all become one kernel in the target's shape (the primary
conv's [O, I/g, kh, kw]) and sum. Per kind:

========  ==========================================  ==============================
kind      equivalent kernel and bias                  reference (for the block check)
========  ==========================================  ==============================
conv      BN folded (:func:`~acnet_convert.fusion.    the conv on the centred crop of
          fold_bn`), dilated, centred in the target   the input, dilated windows
identity  1 at [o, o mod I/g] at the centre, BN       the input channel itself, BN
          folded (RepVGG's ``rbr_identity``)
avg       optional 1x1 conv + padding BN, then        window means of the (1x1 conv
          1/k^2 per channel, then its BN (DBB)        + BN) map, BN
seq       1x1 conv (+ implicit identity) + padding    the two convs one after the
          BN composed with the kxk conv, BN (DBB)     other, per group
========  ==========================================  ==============================

The transforms come from :mod:`acnet_convert.transforms`, the references from
there and :mod:`acnet_convert.fusion`; the two share no code. ``conv``,
``identity`` and ``avg`` are separable per output channel, so a block of them
is fused a slab of output channels at a time; a ``seq`` branch mixes the
middle channels of a group, so a block holding one is read whole
(:func:`streamable`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from acnet_convert.fusion import Branch, centre_crop, conv_valid, fold_bn
from acnet_convert.transforms import (
    avg_kernel,
    avg_pool_reference,
    compose_1x1_kxk,
    idconv_kernel,
    identity_kernel,
    identity_reference,
    sequential_reference,
)

__all__ = ["dilate", "equivalent", "reference", "streamable"]

Target = tuple[int, int, int, int]


def dilate(kernel: np.ndarray, dilation: int) -> np.ndarray:
    """The dense kernel of a dilated one: a 2x2 with dilation 2 is a 3x3 with its corners set."""
    if dilation == 1:
        return kernel
    o, i, h, w = kernel.shape
    out = np.zeros((o, i, dilation * (h - 1) + 1, dilation * (w - 1) + 1))
    out[:, :, ::dilation, ::dilation] = kernel
    return out


def streamable(branches: Sequence[Branch | object]) -> bool:
    """Can a block of these branches (or branch specs) be fused a slab of output channels at a time?"""
    return all(getattr(b, "kind", "conv") != "seq" for b in branches)


def _rows(first: int, count: int) -> slice:
    return slice(first, first + count)


def _through(first: int, rows: int, in_per_group: int) -> int:
    """A channel count covering the slab that whole groups of ``in_per_group`` make up."""
    return -(-(first + rows) // in_per_group) * in_per_group


def equivalent(branch: Branch, target: Target, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The branch as one kernel ([rows, I/g, kh', kw'], to be centred in the target) and bias.

    ``target`` is the slab's fused kernel shape and ``first`` its first output channel.
    """
    rows, in_per_group = target[:2]
    if branch.kind == "conv":
        if branch.weight is None:
            raise ValueError("a conv branch needs a weight")
        w, b = fold_bn(branch.weight, branch.bias, branch.bn)
        return dilate(w, branch.dilation), b
    if branch.kind == "identity":
        ident = identity_kernel(_through(first, rows, in_per_group), in_per_group, 1, 1)
        return fold_bn(ident[_rows(first, rows)], None, branch.bn)
    if branch.kind == "avg":
        return _avg_equivalent(branch, target, first)
    if branch.kind == "seq":
        return _seq_equivalent(branch, target)
    raise ValueError(f"unknown branch kind '{branch.kind}'")


def _avg_equivalent(branch: Branch, target: Target, first: int) -> tuple[np.ndarray, np.ndarray]:
    rows, in_per_group, kh, kw = target
    pre = branch.pre
    if pre is None or pre.weight is None:  # depthwise: the pool runs on the input itself
        kernel = avg_kernel(_through(first, rows, in_per_group), in_per_group, kh)
        kernel = kernel[_rows(first, rows)]
        return fold_bn(kernel, None, branch.bn)
    k1, b1 = fold_bn(pre.weight, pre.bias, pre.bn)
    # the pool is per channel: each output channel's 1x1 weight spread over k x k, / k^2
    kernel = np.repeat(np.repeat(k1, kh, axis=2), kw, axis=3) / (kh * kw)
    return fold_bn(kernel, b1, branch.bn)


def _seq_equivalent(branch: Branch, target: Target) -> tuple[np.ndarray, np.ndarray]:
    pre = branch.pre
    if pre is None or pre.weight is None or branch.weight is None:
        raise ValueError("a sequential branch needs its 1x1 and its kxk conv")
    first_kernel = idconv_kernel(pre.weight) if pre.implicit_identity else pre.weight
    k1, b1 = fold_bn(first_kernel, pre.bias, pre.bn)
    k2, b2 = fold_bn(branch.weight, branch.bias, branch.bn)
    groups = k1.shape[0] // k2.shape[1]
    return compose_1x1_kxk(k1, b1, k2, b2, groups)


def _conv_reference(branch: Branch, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if branch.weight is None:
        raise ValueError("a conv branch needs a weight")
    d = branch.dilation
    h, w = branch.weight.shape[2:]
    extent = (d * (h - 1) + 1, d * (w - 1) + 1)
    crop = centre_crop(x, size, extent)
    if d == 1:
        y = conv_valid(crop, branch.weight)
    else:  # the dilated conv as a sum of shifted 1x1 convs, one per kernel tap
        oh, ow = crop.shape[2] - extent[0] + 1, crop.shape[3] - extent[1] + 1
        y = np.zeros((x.shape[0], branch.weight.shape[0], oh, ow))
        for r in range(h):
            for c in range(w):
                part = crop[:, :, r * d : r * d + oh, c * d : c * d + ow]
                y += np.einsum("oi,nihw->nohw", branch.weight[:, :, r, c], part)
    if branch.bias is not None:
        y = y + branch.bias[:, None, None]
    return branch.bn.apply(y) if branch.bn is not None else y


def reference(branch: Branch, x: np.ndarray, target: Target, first: int = 0) -> np.ndarray:
    """The branch run on the local input ``x`` [N, I/g, H, W] in eval mode (float64).

    Shares no code with :func:`equivalent`: convs run on cropped inputs, the
    identity indexes channels, the pool takes window means, ``seq`` runs its
    two convs in sequence.
    """
    rows, _, kh, kw = target
    size = (kh, kw)
    if branch.kind == "conv":
        return _conv_reference(branch, x, size)
    if branch.kind == "identity":
        y = identity_reference(first + rows, x, size, None)[:, _rows(first, rows)]
        return branch.bn.apply(y) if branch.bn is not None else y
    if branch.kind == "avg":
        pre = branch.pre
        if pre is None or pre.weight is None:
            y = avg_pool_reference(x, kh, None, channels=first + rows)[:, _rows(first, rows)]
        else:
            y = avg_pool_reference(x, kh, None, conv=pre.weight, conv_bn=None)
            if pre.bias is not None:
                y = y + pre.bias[:, None, None]
            if pre.bn is not None:  # the padding BN is per channel: it commutes with the pool
                y = pre.bn.apply(y)
        return branch.bn.apply(y) if branch.bn is not None else y
    if branch.kind == "seq":
        pre = branch.pre
        if pre is None or pre.weight is None or branch.weight is None:
            raise ValueError("a sequential branch needs its 1x1 and its kxk conv")
        first_kernel = pre.weight
        if pre.implicit_identity:
            first_kernel = pre.weight + _identity_1x1(pre.weight.shape)
        y = sequential_reference(x, first_kernel, pre.bn, branch.weight, None, size)
        if branch.bias is not None:
            y = y + branch.bias[:, None, None]
        return branch.bn.apply(y) if branch.bn is not None else y
    raise ValueError(f"unknown branch kind '{branch.kind}'")


def _identity_1x1(shape: tuple[int, ...]) -> np.ndarray:
    """DBB's implicit identity of ``idconv1``, built by indexing (not by the transform)."""
    out = np.zeros(shape)
    channels, in_per_group = shape[0], shape[1]
    out[np.arange(channels), np.arange(channels) % in_per_group, 0, 0] = 1.0
    return out
