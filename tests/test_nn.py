"""ACBlock: training form, deploy form and an independent reference agree.

The reference pads the input once (with the block's padding mode) and runs
every branch as an unpadded ``F.conv2d`` on a centre crop of that padded input,
then applies each BN from its formula. It shares no code with ``ACBlock.forward``
(which pads or crops per branch) nor with ``acnet_convert.fusion``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from acnet_convert.errors import UnfusableBlockError, UsageError
from acnet_convert.nn import (
    ACBlock,
    DeployReport,
    block_tensors_from_module,
    find_acblocks,
    switch_to_deploy,
)

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
PROPERTY = settings(max_examples=60, deadline=None, database=None)


def _randomise_bns(module: nn.Module, gen: torch.Generator) -> None:
    """Give every BN non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.copy_(torch.randn(c, generator=gen))
                bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                if bn.affine:
                    bn.weight.copy_(torch.randn(c, generator=gen))
                    bn.bias.copy_(torch.randn(c, generator=gen))


def _bn_reference(y: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    assert bn.running_mean is not None and bn.running_var is not None
    c = (slice(None), None, None)
    mean = bn.running_mean.double()[c]
    out = (y - mean) / torch.sqrt(bn.running_var.double()[c] + bn.eps)
    if bn.affine:
        out = out * bn.weight.double()[c] + bn.bias.double()[c]
    return out


def _reference(block: ACBlock, x: Tensor) -> Tensor:
    """The training-form block in eval mode, computed in float64 from first principles."""
    ph, pw = block.padding
    mode = "constant" if block.padding_mode == "zeros" else block.padding_mode
    xp = F.pad(x.double(), (pw, pw, ph, ph), mode=mode)
    half = block.kernel_size // 2
    ch, cw = block.dilation[0] * half, block.dilation[1] * half
    height, width = xp.shape[2:]
    crops = {
        "square": xp,
        "hor": xp[:, :, ch : height - ch, :],  # 1xk sits on the square's centre row
        "ver": xp[:, :, :, cw : width - cw],  # kx1 sits on the square's centre column
    }
    total = torch.zeros(())
    for branch, inp in crops.items():
        conv = getattr(block, f"{branch}_conv")
        y = F.conv2d(
            inp, conv.weight.double(), stride=block.stride, dilation=block.dilation,
            groups=block.groups,
        )  # fmt: skip
        total = total + _bn_reference(y, getattr(block, f"{branch}_bn"))
    if block.last_bn is not None:
        total = _bn_reference(total, block.last_bn)
    return total


def _assert_close(got: Tensor, ref: Tensor, rtol: float) -> None:
    assert got.shape == ref.shape
    scale = ref.abs().max().item()
    err = (got.double() - ref).abs().max().item()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol:g} * max |ref| {scale:.3g}"


@st.composite
def _geometries(draw: st.DrawFn, modes: tuple[str, ...] = ("zeros",)) -> dict[str, object]:
    k = draw(st.sampled_from([3, 5]))
    dilation = draw(st.sampled_from([1, 2]))
    padding = draw(st.integers(0, k // 2 + 1))
    grouping = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if grouping == "depthwise":
        groups = draw(st.integers(2, 5))
        cin = cout = groups
    else:
        groups = 2 if grouping == "grouped" else 1
        cin = groups * draw(st.integers(1, 3))
        cout = groups * draw(st.integers(1, 3))
    reach = dilation * (k - 1) + 1 - 2 * padding  # smallest input giving one output
    mode = draw(st.sampled_from(modes))
    low = max(reach, 1 if mode == "zeros" else padding + 1, 1)  # torch: pad < size
    return {
        "in_channels": cin,
        "out_channels": cout,
        "kernel_size": k,
        "stride": draw(st.sampled_from([1, 2])),
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "padding_mode": mode,
        "use_affine": draw(st.booleans()),
        "use_last_bn": draw(st.booleans()),
        "size": (draw(st.integers(low, low + 6)), draw(st.integers(low, low + 6))),
    }


def _check_block(geometry: dict[str, object], dtype: torch.dtype, seed: int) -> None:
    kwargs = dict(geometry)
    size = kwargs.pop("size")
    assert isinstance(size, tuple)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = ACBlock(**kwargs).to(dtype).eval()  # type: ignore[arg-type]
    _randomise_bns(block, gen)
    x = torch.randn(2, block.in_channels, *size, generator=gen, dtype=torch.float64).to(dtype)
    ref = _reference(block, x)
    conv_shape = nn.Conv2d(
        block.in_channels, block.out_channels, block.kernel_size, stride=block.stride,
        padding=block.padding, dilation=block.dilation, groups=block.groups,
    )(x.float()).shape  # fmt: skip
    with torch.no_grad():
        train_out = block(x)
        assert train_out.shape == conv_shape  # a drop-in for nn.Conv2d
        _assert_close(train_out, ref, RTOL[dtype])
        report = switch_to_deploy(block)
        assert report == DeployReport(count=1, names=("",))
        assert block.fused_conv.weight.dtype == dtype
        _assert_close(block(x), ref, RTOL[dtype])


@PROPERTY
@given(
    geometry=_geometries(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_train_and_deploy_forms_match_reference(
    geometry: dict[str, object], dtype: torch.dtype, seed: int
) -> None:
    _check_block(geometry, dtype, seed)


@settings(max_examples=25, deadline=None, database=None)
@given(
    geometry=_geometries(modes=("reflect", "replicate", "circular")),
    seed=st.integers(0, 2**16),
)
def test_other_padding_modes_match_reference(geometry: dict[str, object], seed: int) -> None:
    _check_block(geometry, torch.float64, seed)


@pytest.mark.parametrize(("k", "p"), [(3, 0), (5, 0), (5, 1)])
def test_padding_below_half_kernel_crops_correctly(k: int, p: int) -> None:
    # Upstream's geometry for p < k//2 (crop the 1-D branches' input), stride 2.
    _check_block(
        {"in_channels": 3, "out_channels": 4, "kernel_size": k, "stride": 2, "padding": p,
         "dilation": 1, "groups": 1, "padding_mode": "zeros", "use_affine": True,
         "use_last_bn": False, "size": (11, 9)},
        torch.float64, seed=k * 10 + p,
    )  # fmt: skip


def test_state_dict_names_match_upstream() -> None:
    block = ACBlock(4, 8, 3, padding=1, groups=2)
    bn_keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = {f"{b}_conv.weight" for b in ("square", "hor", "ver")} | {
        f"{b}_bn.{key}" for b in ("square", "hor", "ver") for key in bn_keys
    }
    sd = block.state_dict()
    assert set(sd) == expected
    assert sd["square_conv.weight"].shape == (8, 2, 3, 3)
    assert sd["hor_conv.weight"].shape == (8, 2, 1, 3)
    assert sd["ver_conv.weight"].shape == (8, 2, 3, 1)
    with_last = ACBlock(4, 8, 5, padding=2, use_last_bn=True, use_affine=False).state_dict()
    assert {k for k in with_last if k.startswith("last_bn.")} == {f"last_bn.{k}" for k in bn_keys}
    assert "square_bn.weight" not in with_last
    deploy = ACBlock(4, 8, 3, padding=1, deploy=True).state_dict()
    assert set(deploy) == {"fused_conv.weight", "fused_conv.bias"}
    assert deploy["fused_conv.weight"].shape == (8, 4, 3, 3)


def test_switch_keeps_geometry_and_is_idempotent() -> None:
    block = ACBlock(4, 6, 5, stride=2, padding=1, dilation=2, groups=2, padding_mode="reflect")
    model = nn.Sequential(block, nn.ReLU(), ACBlock(6, 6, 3, padding=1))
    assert switch_to_deploy(model) == DeployReport(count=2, names=("0", "2"))
    fused = block.fused_conv
    assert (fused.stride, fused.padding, fused.dilation, fused.groups) == (
        (2, 2),
        (1, 1),
        (2, 2),
        2,
    )
    assert fused.padding_mode == "reflect" and fused.bias is not None
    assert switch_to_deploy(model) == DeployReport(count=0, names=())
    assert find_acblocks(model) == []


class _LegacyLookAlike(nn.Module):
    """A foreign block with upstream's names: legacy 1x3/3x1 branches on a 5x5 square."""

    def __init__(self) -> None:
        super().__init__()
        self.square_conv = nn.Conv2d(3, 4, 5, padding=2, bias=False)
        self.square_bn = nn.BatchNorm2d(4)
        self.ver_conv = nn.Conv2d(3, 4, (3, 1), padding=(1, 0), bias=False)
        self.ver_bn = nn.BatchNorm2d(4)
        self.hor_conv = nn.Conv2d(3, 4, (1, 3), padding=(0, 1), bias=False)
        self.hor_bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.square_bn(self.square_conv(x))
        out = out + self.ver_bn(self.ver_conv(x)) + self.hor_bn(self.hor_conv(x))
        return out


def test_foreign_blocks_are_found_by_structure_and_replaced() -> None:
    model = nn.Sequential(nn.Sequential(_LegacyLookAlike()), nn.ReLU()).double().eval()
    _randomise_bns(model, torch.Generator().manual_seed(3))
    assert [name for name, _ in find_acblocks(model)] == ["0.0"]
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        assert switch_to_deploy(model).names == ("0.0",)
        after = model(x)
    replaced = model.get_submodule("0.0")
    assert isinstance(replaced, ACBlock)
    assert set(model.state_dict()) == {"0.0.fused_conv.weight", "0.0.fused_conv.bias"}
    assert replaced.fused_conv.weight.dtype == torch.float64
    _assert_close(after, before.double(), 1e-10)


def test_block_tensors_eps_override() -> None:
    block = ACBlock(2, 3, 3, padding=1, eps=1e-3)
    assert block_tensors_from_module(block).square.bn is not None
    assert block_tensors_from_module(block).square.bn.eps == 1e-3  # type: ignore[union-attr]
    overridden = block_tensors_from_module(block, eps=1e-5)
    assert all(
        b.bn is not None and b.bn.eps == 1e-5 for b in (overridden.square, *overridden.others)
    )


def test_bn_without_running_stats_is_refused_with_block_name() -> None:
    block = ACBlock(2, 3, 3, padding=1)
    block.hor_bn = nn.BatchNorm2d(3, track_running_stats=False)
    model = nn.Sequential(nn.Sequential(block))
    with pytest.raises(UnfusableBlockError, match=r"block '0\.0': 'hor_bn' keeps no running"):
        switch_to_deploy(model)


def test_misshapen_branch_is_refused() -> None:
    block = ACBlock(2, 3, 3, padding=1)
    block.ver_conv = nn.Conv2d(2, 3, (2, 1), bias=False)
    with pytest.raises(UnfusableBlockError, match=r"block 'b': 'ver_conv' weight \(3, 2, 2, 1\)"):
        block_tensors_from_module(block, name="b")


def test_fusing_a_deployed_block_is_refused() -> None:
    with pytest.raises(UnfusableBlockError, match="already in deploy form"):
        ACBlock(2, 3, 3, deploy=True).get_equivalent_kernel_bias()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 4}, "odd size of at least 3"),
        ({"kernel_size": 1}, "use nn.Conv2d for 1x1"),
        ({"kernel_size": (3, 5)}, "square"),
        ({"kernel_size": 3, "groups": 3}, "divisible by groups=3"),
        ({"kernel_size": 3, "padding_mode": "mirror"}, "padding_mode='mirror'"),
        ({"kernel_size": 3, "padding": "same", "stride": 2}, "'same' \\(stride 1 only\\)"),
        ({"kernel_size": 3, "padding": -1}, "padding"),
        ({"kernel_size": 3, "stride": 0}, "stride"),
    ],
)
def test_bad_arguments_raise_usage_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ACBlock(4, 8, **kwargs)  # type: ignore[arg-type]


def test_same_padding_keeps_size() -> None:
    block = ACBlock(2, 2, 5, padding="same", dilation=2).eval()
    assert block.padding == (4, 4)
    x = torch.randn(1, 2, 7, 9, generator=torch.Generator().manual_seed(5))
    assert block(x).shape == (1, 2, 7, 9)
