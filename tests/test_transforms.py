"""The family transforms and their numpy references against torch modules in eval mode.

Every transform is checked the way a block uses it: torch runs the training-time
branch (BatchNorm2d, AvgPool2d, two convs in sequence, with stride, padding and
groups as given) and one conv with the transformed kernel must reproduce it.
The references are checked on the "local input": a torch grouped conv fed the
local input tiled over its groups computes what the reference computes.

Tolerance: everything is float64 with at most a few hundred products per
output, so rounding stays near 1e-14 of max |output|; 1e-10 leaves four
orders of margin and still catches any wrong index or scale (those are O(1)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acnet_convert.fusion import BNStats, compare_outputs, conv_outputs, fold_bn
from acnet_convert.transforms import (
    avg_kernel,
    avg_pool_reference,
    compose_1x1_kxk,
    idconv_kernel,
    identity_kernel,
    identity_reference,
    pad_to,
    sequential_reference,
)

RTOL = 1e-10


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _close(reference: np.ndarray | torch.Tensor, got: np.ndarray | torch.Tensor) -> None:
    ref = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
    out = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    assert ref.shape == out.shape
    cmp = compare_outputs(ref, out)
    assert cmp.ref_max > 0.1
    assert cmp.within(RTOL), cmp


def _bn_module(rng: np.random.Generator, c: int, eps: float = 1e-5) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=eps).double()
    with torch.no_grad():
        bn.weight.copy_(_t(rng.uniform(-1.5, 1.5, c)))
        bn.bias.copy_(_t(rng.normal(0, 1, c)))
        bn.running_mean.copy_(_t(rng.normal(0, 1, c)))
        bn.running_var.copy_(_t(rng.uniform(0.05, 4.0, c)))
    return bn.eval()


def _stats(bn: nn.BatchNorm2d) -> BNStats:
    assert bn.running_mean is not None and bn.running_var is not None
    return BNStats(
        mean=bn.running_mean.numpy().copy(),
        var=bn.running_var.numpy().copy(),
        weight=bn.weight.detach().numpy().copy(),
        bias=bn.bias.detach().numpy().copy(),
        eps=bn.eps,
    )


def _conv(
    rng: np.random.Generator, cin: int, cout: int, k: int, groups: int, **kw: int
) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, groups=groups, bias=False, **kw).double()
    with torch.no_grad():
        conv.weight.copy_(_t(rng.normal(0, 1, conv.weight.shape)))
    return conv


def _fused(x: torch.Tensor, w: np.ndarray, b: np.ndarray, groups: int, **kw: int) -> torch.Tensor:
    return F.conv2d(x, _t(w), _t(b), groups=groups, **kw)


@pytest.mark.parametrize(("small", "k"), [((1, 1), 3), ((1, 1), 5), ((3, 3), 5), ((1, 3), 5)])
@pytest.mark.parametrize("stride", [1, 2])
def test_pad_to_matches_the_smaller_conv_centred(
    small: tuple[int, int], k: int, stride: int
) -> None:
    rng = _rng(1)
    w = rng.normal(0, 1, (6, 2, *small))
    x = _t(rng.normal(0, 1, (2, 6, 9, 9)))
    pad = (small[0] // 2, small[1] // 2)
    reference = F.conv2d(x, _t(w), stride=stride, padding=pad, groups=3)
    padded = pad_to(w, k, k)
    assert padded.shape == (6, 2, k, k)
    _close(reference, _fused(x, padded, np.zeros(6), 3, stride=stride, padding=k // 2))


def test_pad_to_refuses_what_cannot_be_centred() -> None:
    with pytest.raises(ValueError, match="cannot centre"):
        pad_to(np.ones((1, 1, 2, 2)), 3, 3)
    with pytest.raises(ValueError, match="cannot centre"):
        pad_to(np.ones((1, 1, 5, 5)), 3, 3)


@pytest.mark.parametrize(("channels", "groups"), [(6, 1), (6, 3), (6, 6)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_identity_kernel_folds_a_batchnorm_alone(channels: int, groups: int, k: int) -> None:
    rng = _rng(2)
    bn = _bn_module(rng, channels)
    x = _t(rng.normal(0, 1, (2, channels, 7, 7)))
    w, b = fold_bn(identity_kernel(channels, channels // groups, k, k), None, _stats(bn))
    _close(bn(x), _fused(x, w, b, groups, padding=k // 2))


def test_identity_kernel_places_ones_on_the_group_diagonal() -> None:
    kernel = identity_kernel(4, 2, 3, 3)
    expected = np.zeros((4, 2, 3, 3))
    expected[[0, 1, 2, 3], [0, 1, 0, 1], 1, 1] = 1.0
    np.testing.assert_array_equal(kernel, expected)
    with pytest.raises(ValueError, match="groups of"):
        identity_kernel(5, 2, 3, 3)
    with pytest.raises(ValueError, match="even"):
        identity_kernel(4, 2, 2, 2)


@pytest.mark.parametrize(("channels", "groups"), [(6, 1), (6, 2), (6, 6)])
@pytest.mark.parametrize(("k", "stride"), [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_avg_kernel_is_an_average_pool(channels: int, groups: int, k: int, stride: int) -> None:
    rng = _rng(3)
    x = _t(rng.normal(0, 1, (2, channels, 9, 9)))
    pool = nn.AvgPool2d(k, stride=stride, padding=k // 2).eval()
    w = avg_kernel(channels, channels // groups, k)
    _close(pool(x), _fused(x, w, np.zeros(channels), groups, stride=stride, padding=k // 2))


class _OneByOneThenKxK(nn.Module):
    """A 1x1 conv with bias, its map padded with that bias (zero input), then a kxk conv."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, pad: int, identity: bool) -> None:
        super().__init__()
        self.first, self.second, self.pad, self.identity = first, second, pad, identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.first.weight
        if self.identity:  # DBB's IdentityBasedConv1x1: weight + identity, by definition
            eye = torch.zeros_like(w)
            rows = torch.arange(w.shape[0])
            eye[rows, rows % w.shape[1], 0, 0] = 1.0
            w = w + eye
        # Zero-padding the input of a 1x1 conv with a bias pads its output with the bias.
        y = F.conv2d(x, w, self.first.bias, padding=self.pad, groups=self.first.groups)
        return self.second(y)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("cin", "mid", "cout", "groups", "identity"),
    [
        (4, 4, 6, 1, False),
        (4, 8, 6, 2, False),
        (6, 12, 6, 6, False),
        (6, 6, 6, 3, False),
        (4, 8, 4, 4, False),
        # DBB's idconv1 exists only when the middle width equals the input width.
        (4, 4, 6, 1, True),
        (6, 6, 6, 3, True),
        (6, 6, 6, 6, True),
    ],
)
@pytest.mark.parametrize(("k", "stride"), [(3, 1), (3, 2), (5, 2)])
def test_compose_1x1_kxk_is_the_two_convs_in_sequence(
    cin: int, mid: int, cout: int, groups: int, identity: bool, k: int, stride: int
) -> None:
    rng = _rng(4)
    first = _conv(rng, cin, mid, 1, groups)
    first.bias = nn.Parameter(_t(rng.normal(0, 1, mid)))
    second = _conv(rng, mid, cout, k, groups, stride=stride)
    second.bias = nn.Parameter(_t(rng.normal(0, 1, cout)))
    module = _OneByOneThenKxK(first, second, k // 2, identity).eval()
    x = _t(rng.normal(0, 1, (2, cin, 9, 9)))
    k1 = first.weight.detach().numpy()
    k1 = idconv_kernel(k1) if identity else k1
    kernel, bias = compose_1x1_kxk(
        k1,
        first.bias.detach().numpy(),
        second.weight.detach().numpy(),
        second.bias.detach().numpy(),
        groups,
    )
    assert kernel.shape == (cout, cin // groups, k, k)
    _close(module(x), _fused(x, kernel, bias, groups, stride=stride, padding=k // 2))


def test_compose_1x1_kxk_refuses_shapes_that_do_not_fit() -> None:
    k1, b1 = np.ones((8, 2, 1, 1)), np.zeros(8)
    with pytest.raises(ValueError, match="groups"):
        compose_1x1_kxk(k1, b1, np.ones((4, 4, 3, 3)), np.zeros(4), 4)
    with pytest.raises(ValueError, match="1x1"):
        compose_1x1_kxk(np.ones((8, 2, 3, 3)), b1, np.ones((4, 2, 3, 3)), np.zeros(4), 4)


def test_idconv_kernel_adds_the_unstored_identity() -> None:
    w = np.zeros((4, 2, 1, 1))
    np.testing.assert_array_equal(idconv_kernel(w), identity_kernel(4, 2, 1, 1))


# --- references on the local input -------------------------------------------------------


def _tiled(x: np.ndarray, groups: int) -> torch.Tensor:
    """The full input a grouped conv sees when every group's channels are the local input."""
    return _t(np.tile(x, (1, groups, 1, 1)))


@pytest.mark.parametrize(("channels", "groups"), [(6, 1), (6, 3), (6, 6)])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_identity_reference_is_the_batchnorm(channels: int, groups: int, k: int) -> None:
    rng = _rng(5)
    bn = _bn_module(rng, channels)
    x = rng.normal(0, 1, (2, channels // groups, 8, 8))
    full = bn(_tiled(x, groups))
    c = k // 2
    expected = full[:, :, c : full.shape[2] - c, c : full.shape[3] - c]
    got = identity_reference(channels, x, (k, k), _stats(bn))
    _close(expected, got)
    w, b = fold_bn(identity_kernel(channels, channels // groups, k, k), None, _stats(bn))
    _close(got, conv_outputs(w, b, x))


@pytest.mark.parametrize(("cin", "cout", "groups"), [(4, 6, 1), (4, 6, 2), (6, 6, 3)])
@pytest.mark.parametrize("k", [3, 5])
def test_avg_pool_reference_with_its_1x1_conv(cin: int, cout: int, groups: int, k: int) -> None:
    rng = _rng(6)
    conv, conv_bn, avg_bn = (
        _conv(rng, cin, cout, 1, groups),
        _bn_module(rng, cout),
        _bn_module(rng, cout),
    )
    module = nn.Sequential(conv, conv_bn, nn.AvgPool2d(k, stride=1, padding=0), avg_bn).eval()
    x = rng.normal(0, 1, (2, cin // groups, 9, 9))
    k1 = conv.weight.detach().numpy()
    got = avg_pool_reference(x, k, _stats(avg_bn), conv=k1, conv_bn=_stats(conv_bn))
    _close(module(_tiled(x, groups)), got)
    first = fold_bn(k1, None, _stats(conv_bn))
    pool = fold_bn(avg_kernel(cout, cout // groups, k), None, _stats(avg_bn))
    kernel, bias = compose_1x1_kxk(*first, *pool, groups)
    _close(got, conv_outputs(kernel, bias, x))


@pytest.mark.parametrize("k", [3, 5])
def test_avg_pool_reference_depthwise(k: int) -> None:
    rng = _rng(7)
    avg_bn = _bn_module(rng, 6)
    module = nn.Sequential(nn.AvgPool2d(k, stride=1, padding=0), avg_bn).eval()
    x = rng.normal(0, 1, (2, 1, 9, 9))
    got = avg_pool_reference(x, k, _stats(avg_bn), channels=6)
    _close(module(_tiled(x, 6)), got)
    w, b = fold_bn(avg_kernel(6, 1, k), None, _stats(avg_bn))
    _close(got, conv_outputs(w, b, x))
    with pytest.raises(ValueError, match="channel count"):
        avg_pool_reference(x, k, None)


@pytest.mark.parametrize(
    ("cin", "mid", "cout", "groups"), [(4, 4, 6, 1), (4, 8, 6, 2), (6, 12, 6, 6), (6, 6, 6, 3)]
)
@pytest.mark.parametrize(("k", "target"), [(3, 3), (5, 5), (3, 5)])
def test_sequential_reference_is_two_grouped_convs(
    cin: int, mid: int, cout: int, groups: int, k: int, target: int
) -> None:
    rng = _rng(8)
    first, bn1 = _conv(rng, cin, mid, 1, groups), _bn_module(rng, mid)
    second, bn2 = _conv(rng, mid, cout, k, groups), _bn_module(rng, cout)
    module = nn.Sequential(first, bn1, second, bn2).eval()
    x = rng.normal(0, 1, (2, cin // groups, 9, 9))
    k1, k2 = first.weight.detach().numpy(), second.weight.detach().numpy()
    got = sequential_reference(x, k1, _stats(bn1), k2, _stats(bn2), (target, target))
    full = module(_tiled(x, groups))
    c = (target - k) // 2
    _close(full[:, :, c : full.shape[2] - c, c : full.shape[3] - c], got)
    kernel, bias = compose_1x1_kxk(
        *fold_bn(k1, None, _stats(bn1)), *fold_bn(k2, None, _stats(bn2)), groups
    )
    _close(got, conv_outputs(pad_to(kernel, target, target), bias, x))


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    mid_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    k=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_compose_and_its_reference_agree_with_torch_over_shapes(
    groups: int,
    in_per_group: int,
    mid_per_group: int,
    out_per_group: int,
    k: int,
    stride: int,
    seed: int,
) -> None:
    """Any grouped 1x1 -> kxk pair with BNs: torch in eval mode, the composed conv, the reference."""
    rng = _rng(seed)
    cin, mid, cout = groups * in_per_group, groups * mid_per_group, groups * out_per_group
    first, bn1 = _conv(rng, cin, mid, 1, groups), _bn_module(rng, mid)
    second, bn2 = _conv(rng, mid, cout, k, groups, stride=stride), _bn_module(rng, cout)
    k1, k2 = first.weight.detach().numpy(), second.weight.detach().numpy()
    kernel, bias = compose_1x1_kxk(
        *fold_bn(k1, None, _stats(bn1)), *fold_bn(k2, None, _stats(bn2)), groups
    )
    # Padded form: the middle map is padded with bn1's value for a zero input, as DBB's padding BN does.
    x = _t(rng.normal(0, 1, (2, cin, 7, 7)))
    pad = k // 2
    middle = bn1(first(F.pad(x, (pad,) * 4)))
    _close(bn2(second(middle)), _fused(x, kernel, bias, groups, stride=stride, padding=pad))
    # Local-input form, with the independent reference.
    local = rng.normal(0, 1, (2, in_per_group, 7, 7))
    got = sequential_reference(local, k1, _stats(bn1), k2, _stats(bn2), (k, k))
    _close(got, conv_outputs(kernel, bias, local))


@pytest.mark.parametrize("rows", [slice(0, 3), slice(5, 9), slice(7, 12)])
def test_diagonal_kernels_of_a_slab_are_its_rows_of_the_whole(rows: slice) -> None:
    np.testing.assert_array_equal(
        identity_kernel(12, 4, 3, 3, rows), identity_kernel(12, 4, 3, 3)[rows]
    )
    np.testing.assert_array_equal(avg_kernel(12, 3, 3, rows), avg_kernel(12, 3, 3)[rows])
    x = np.random.default_rng(5).normal(size=(2, 4, 5, 5))
    np.testing.assert_array_equal(
        identity_reference(12, x, (3, 3), None, rows),
        identity_reference(12, x, (3, 3), None)[:, rows],
    )
    np.testing.assert_array_equal(
        avg_pool_reference(x, 3, None, channels=12, rows=rows),
        avg_pool_reference(x, 3, None, channels=12)[:, rows],
    )
