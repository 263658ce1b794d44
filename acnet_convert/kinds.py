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
there and :mod:`acnet_convert.fusion`; the two share no code. Every kind is
separable per output channel, so a block is fused a slab of output channels
at a time: a ``seq`` branch's kxk conv and its BN come as the slab's rows,
its 1x1 conv and padding BN (the middle channels, small) whole, and each row
composes with its own group's middle channels (larger slabs for such a
block: :func:`streamable`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from acnet_convert.fusion import BNStats, Branch, centre_crop, conv_valid, fold_bn
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
    """Are these branches (or branch specs) fused in small slabs of output channels?

    Every kind can be fused a slab at a time; a ``seq`` branch's slab also
    needs its whole (small) 1x1 conv, and composes by a matrix product whose
    cost per call favours fewer, larger slabs, so a block holding one is
    fused in larger slabs (False here).
    """
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
        channels = _through(first, rows, in_per_group)
        ident = identity_kernel(channels, in_per_group, 1, 1, _rows(first, rows))
        return fold_bn(ident, None, branch.bn)
    if branch.kind == "avg":
        return _avg_equivalent(branch, target, first)
    if branch.kind == "seq":
        return _seq_equivalent(branch, first)
    raise ValueError(f"unknown branch kind '{branch.kind}'")


def _avg_equivalent(branch: Branch, target: Target, first: int) -> tuple[np.ndarray, np.ndarray]:
    rows, in_per_group, kh, kw = target
    pre = branch.pre
    if pre is None or pre.weight is None:  # depthwise: the pool runs on the input itself
        channels = _through(first, rows, in_per_group)
        kernel = avg_kernel(channels, in_per_group, kh, _rows(first, rows))
        return fold_bn(kernel, None, branch.bn)
    k1, b1 = fold_bn(pre.weight, pre.bias, pre.bn)
    # the pool is per channel: each output channel's 1x1 weight spread over k x k, / k^2
    kernel = np.repeat(np.repeat(k1, kh, axis=2), kw, axis=3) / (kh * kw)
    return fold_bn(kernel, b1, branch.bn)


def _seq_groups(branch: Branch, first: int) -> list[tuple[slice, slice]]:
    """(rows of the slab, middle channels) for each group the slab's rows fall in.

    The kxk conv's rows are the slab's (``branch.out_channels`` in all); the
    1x1 conv ``branch.pre`` is whole, ``M`` middle channels in groups of the
    kxk conv's in-channels.
    """
    if branch.pre is None or branch.pre.weight is None or branch.weight is None:
        raise ValueError("a sequential branch needs its 1x1 and its kxk conv")
    rows, mid_per_group = branch.weight.shape[:2]
    groups = branch.pre.weight.shape[0] // mid_per_group
    per_group = (branch.out_channels or rows) // groups
    parts = []
    for g in range(first // per_group, (first + rows - 1) // per_group + 1):
        lo, hi = max(first, g * per_group) - first, min(first + rows, (g + 1) * per_group) - first
        parts.append((slice(lo, hi), _rows(g * mid_per_group, mid_per_group)))
    return parts


def _seq_equivalent(branch: Branch, first: int) -> tuple[np.ndarray, np.ndarray]:
    pre = branch.pre
    if pre is None or pre.weight is None or branch.weight is None:
        raise ValueError("a sequential branch needs its 1x1 and its kxk conv")
    first_kernel = idconv_kernel(pre.weight) if pre.implicit_identity else pre.weight
    k1, b1 = fold_bn(first_kernel, pre.bias, pre.bn)
    del first_kernel
    k2, b2 = fold_bn(branch.weight, branch.bias, branch.bn)
    rows, mid_per_group = k2.shape[:2]
    if branch.out_channels in (None, rows) and first == 0:  # the whole conv: every group at once
        return compose_1x1_kxk(k1, b1, k2, b2, k1.shape[0] // mid_per_group)
    kernel = np.empty((rows, k1.shape[1], *k2.shape[2:]))
    bias = np.empty(rows)
    for out, mid in _seq_groups(branch, first):
        kernel[out], bias[out] = compose_1x1_kxk(k1[mid], b1[mid], k2[out], b2[out], 1)
    return kernel, bias


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
        y = identity_reference(first + rows, x, size, None, _rows(first, rows))
        return branch.bn.apply(y) if branch.bn is not None else y
    if branch.kind == "avg":
        pre = branch.pre
        if pre is None or pre.weight is None:
            y = avg_pool_reference(x, kh, None, channels=first + rows, rows=_rows(first, rows))
        else:
            y = avg_pool_reference(x, kh, None, conv=pre.weight, conv_bn=None)
            if pre.bias is not None:
                y = y + pre.bias[:, None, None]
            if pre.bn is not None:  # the padding BN is per channel: it commutes with the pool
                y = pre.bn.apply(y)
        return branch.bn.apply(y) if branch.bn is not None else y
    if branch.kind == "seq":
        y = _seq_reference(branch, x, size, first)
        if branch.bias is not None:
            y = y + branch.bias[:, None, None]
        return branch.bn.apply(y) if branch.bn is not None else y
    raise ValueError(f"unknown branch kind '{branch.kind}'")


def _seq_reference(branch: Branch, x: np.ndarray, size: tuple[int, int], first: int) -> np.ndarray:
    """The two convs in sequence for the slab's rows, each row reading its own group."""
    pre = branch.pre
    if pre is None or pre.weight is None or branch.weight is None:
        raise ValueError("a sequential branch needs its 1x1 and its kxk conv")
    first_kernel = _with_identity(pre.weight) if pre.implicit_identity else pre.weight
    rows, mid_per_group = branch.weight.shape[:2]
    groups = first_kernel.shape[0] // mid_per_group
    group_of = (first + np.arange(rows)) * groups // (branch.out_channels or rows)
    parts = []
    for g in np.unique(group_of):
        mid = slice(int(g) * mid_per_group, (int(g) + 1) * mid_per_group)
        second = branch.weight[group_of == g]
        parts.append(
            sequential_reference(x, first_kernel[mid], _bn_part(pre.bn, mid), second, None, size)
        )
    return np.concatenate(parts, axis=1)


def _bn_part(bn: BNStats | None, channels: slice) -> BNStats | None:
    """The BN of some of its channels."""
    if bn is None:
        return None
    return BNStats(
        mean=bn.mean[channels],
        var=bn.var[channels],
        weight=bn.weight[channels] if bn.weight is not None else None,
        bias=bn.bias[channels] if bn.bias is not None else None,
        eps=bn.eps,
    )


def _with_identity(weight: np.ndarray) -> np.ndarray:
    """DBB's ``idconv1`` with its implicit identity, added by indexing (not by the transform)."""
    out = weight.copy()
    channels, in_per_group = weight.shape[:2]
    out[np.arange(channels), np.arange(channels) % in_per_group, 0, 0] += 1.0
    return out
