"""Property tests of the fusion math against an independent torch reference.

The reference runs a training-time block in eval mode branch by branch with
torch's own conv2d and batch_norm (stride, padding, groups as given; the 1-D
branches see the centre-aligned crop of the padded input, as upstream ACNet's
ACBlock does); the candidate is one conv with the fused kernel and bias.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from acnet_convert.fusion import BlockTensors, BNStats, Branch, centre_add, fold_bn, fuse_block

EPS = 1e-5


def _bn(rng: np.random.Generator, c: int, affine: bool) -> BNStats:
    return BNStats(
        mean=rng.normal(0, 1, c),
        var=rng.uniform(0.05, 4.0, c),
        weight=rng.uniform(-1.5, 1.5, c) if affine else None,
        bias=rng.normal(0, 1, c) if affine else None,
        eps=EPS,
    )


def _torch_bn(y: torch.Tensor, bn: BNStats) -> torch.Tensor:
    t = lambda a: None if a is None else torch.from_numpy(a).to(y.dtype)  # noqa: E731
    return F.batch_norm(y, t(bn.mean), t(bn.var), t(bn.weight), t(bn.bias), False, 0.0, bn.eps)


def _reference(
    block: BlockTensors, x: torch.Tensor, stride: int, padding: int, groups: int
) -> torch.Tensor:
    k = block.square.weight.shape[2]
    xp = F.pad(x, (padding,) * 4)
    total = None
    for branch in (block.square, *block.others):
        kh, kw = branch.weight.shape[2:]
        top, left = (k - kh) // 2, (k - kw) // 2
        crop = xp[:, :, top : xp.shape[2] - top, left : xp.shape[3] - left]
        w = torch.from_numpy(branch.weight).to(x.dtype)
        b = None if branch.bias is None else torch.from_numpy(branch.bias).to(x.dtype)
        y = F.conv2d(crop, w, b, stride=stride, groups=groups)
        y = _torch_bn(y, branch.bn) if branch.bn is not None else y
        total = y if total is None else total + y
    assert total is not None
    return _torch_bn(total, block.last_bn) if block.last_bn is not None else total


@st.composite
def blocks(draw: st.DrawFn) -> tuple[BlockTensors, int, int, int, int, int]:
    k = draw(st.sampled_from([3, 5]))
    k1 = draw(st.sampled_from([3, k])) if k == 5 else k
    groups = draw(st.sampled_from([1, 2, 4]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.integers(0, k // 2 + 1))
    affine = draw(st.booleans())
    last_bn = draw(st.booleans())
    conv_bias = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def branch(shape: tuple[int, int]) -> Branch:
        return Branch(
            weight=rng.normal(0, 1, (cout, cin // groups, *shape)),
            bias=rng.normal(0, 1, cout) if conv_bias else None,
            bn=_bn(rng, cout, affine),
        )

    block = BlockTensors(
        square=branch((k, k)),
        others=(branch((1, k1)), branch((k1, 1))),
        last_bn=_bn(rng, cout, True) if last_bn else None,
    )
    size = draw(st.integers(max(k - 2 * padding, 1), 9))
    return block, cin, stride, padding, groups, size


def _fused_out(
    block: BlockTensors, x: torch.Tensor, stride: int, padding: int, groups: int
) -> torch.Tensor:
    w, b = fuse_block(block)
    return F.conv2d(
        x,
        torch.from_numpy(w).to(x.dtype),
        torch.from_numpy(b).to(x.dtype),
        stride=stride,
        padding=padding,
        groups=groups,
    )


@settings(max_examples=80, deadline=None)
@given(blocks(), st.integers(0, 2**31 - 1))
def test_fused_conv_matches_branches_float64(
    case: tuple[BlockTensors, int, int, int, int, int], seed: int
) -> None:
    block, cin, stride, padding, groups, size = case
    x = torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (2, cin, size, size)))
    ref = _reference(block, x, stride, padding, groups)
    got = _fused_out(block, x, stride, padding, groups)
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-10 * max(scale, 1e-300)


@settings(max_examples=60, deadline=None)
@given(blocks(), st.integers(0, 2**31 - 1))
def test_fused_conv_matches_branches_float32(
    case: tuple[BlockTensors, int, int, int, int, int], seed: int
) -> None:
    block, cin, stride, padding, groups, size = case
    x = torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (2, cin, size, size))).float()
    ref = _reference(block, x.double(), stride, padding, groups)
    got = _fused_out(block, x, stride, padding, groups).double()
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-5 * scale


def test_centre_add_places_short_kernel_in_the_middle() -> None:
    square = np.zeros((1, 1, 5, 5))
    centre_add(square, np.ones((1, 1, 1, 3)))
    expected = np.zeros((5, 5))
    expected[2, 1:4] = 1
    np.testing.assert_array_equal(square[0, 0], expected)


def test_fold_bn_matches_formula_and_handles_affine_false() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 2, 3, 3))
    bn = BNStats(rng.normal(size=4), rng.uniform(1, 2, 4), None, None, 1e-3)
    fw, fb = fold_bn(w, None, bn)
    t = 1 / np.sqrt(bn.var + 1e-3)
    np.testing.assert_allclose(fw, w * t[:, None, None, None], rtol=1e-15)
    np.testing.assert_allclose(fb, -bn.mean * t, rtol=1e-15)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_fuse_block_without_any_bn_is_a_plain_sum(k: int) -> None:
    rng = np.random.default_rng(k)
    sq, h, v = (
        rng.normal(size=(2, 1, k, k)),
        rng.normal(size=(2, 1, 1, k)),
        rng.normal(size=(2, 1, k, 1)),
    )
    w, b = fuse_block(
        BlockTensors(Branch(sq, None, None), (Branch(h, None, None), Branch(v, None, None)))
    )
    expected = sq.copy()
    expected[:, :, k // 2, :] += h[:, :, 0, :]
    expected[:, :, :, k // 2] += v[:, :, :, 0]
    np.testing.assert_array_equal(w, expected)
    np.testing.assert_array_equal(b, np.zeros(2))
