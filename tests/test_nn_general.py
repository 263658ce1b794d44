"""One rule for every way into a block, and verify's swapped-argument check for every family.

A torch module and its checkpoint are refused by the same ACNet rule
(:func:`acnet_convert.families.acnet.validate_acnet`), with the same problem;
a module is read under upstream ACNet's dialect names, its optional dilated
corner branch included. In network mode, a TRAIN that holds some family's
fused convs and no training-time block is named as FUSED given first, whatever
the family's deploy names (``fused_conv``, ``rbr_reparam``, ``reparam_conv``,
``dbb_reparam``, ``lkb_reparam``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import family_reference as fr
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from acnet_convert.checkpoint import open_checkpoint
from acnet_convert.convert import fuse_checkpoint
from acnet_convert.errors import BadCheckpointError, UnfusableBlockError
from acnet_convert.nn import ACBlock, block_tensors_from_module, find_acblocks, switch_to_deploy
from acnet_convert.plan import FuseOptions, plan_fusion
from acnet_convert.testing import randomise_bn_stats
from acnet_convert.verify import VerifyOptions, VerifyResult, verify_checkpoints
from acnet_convert.zoo import build_arch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
FAMILY_REFERENCE = Path(__file__).with_name("family_reference.py")


class _LookAlike(nn.Module):
    """A foreign block under upstream's names, with the kernels and conv settings given."""

    def __init__(
        self,
        square: tuple[int, int] = (3, 3),
        hor: tuple[int, int] = (1, 3),
        ver: tuple[int, int] = (3, 1),
        corner_dilation: int | None = None,
        hor_dilation: int = 1,
    ) -> None:
        super().__init__()
        cin, cout = 3, 4

        def conv(kernel: tuple[int, int], dilation: int = 1) -> nn.Conv2d:
            # centred: the padding that keeps the size for this kernel and dilation
            pad = (dilation * (kernel[0] // 2), dilation * (kernel[1] // 2))
            return nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)

        self.square_conv, self.square_bn = conv(square), nn.BatchNorm2d(cout)
        self.hor_conv, self.hor_bn = conv(hor, hor_dilation), nn.BatchNorm2d(cout)
        self.ver_conv, self.ver_bn = conv(ver), nn.BatchNorm2d(cout)
        if corner_dilation is not None:
            # the square's corners: a 2x2 conv with dilation 2 covers a 3x3 window
            self.corner_conv = nn.Conv2d(
                cin, cout, 2, padding=corner_dilation // 2, dilation=corner_dilation, bias=False
            )
            self.corner_bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.square_bn(self.square_conv(x))
        out = out + self.hor_bn(self.hor_conv(x)) + self.ver_bn(self.ver_conv(x))
        if hasattr(self, "corner_conv"):
            out = out + self.corner_bn(self.corner_conv(x))
        return out


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen))
            elif isinstance(sub, nn.BatchNorm2d):
                c = sub.num_features
                assert sub.running_mean is not None and sub.running_var is not None
                sub.running_mean.copy_(torch.randn(c, generator=gen))
                sub.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.1)
                sub.weight.copy_(torch.randn(c, generator=gen))
                sub.bias.copy_(torch.randn(c, generator=gen))
    return module.eval()


# ----------------------------------------------------------------------- one rule


@pytest.mark.parametrize(
    ("kernels", "problem"),
    [
        # a 1x1 "hor" branch fits centred, but is not a 1xk
        ({"hor": (1, 1)}, "are not one 1xk and one kx1"),
        # an even square with 2x4 and 4x2 branches fits centred, but is not an ACB
        (
            {"square": (4, 4), "hor": (2, 4), "ver": (4, 2)},
            "has a 4x4 kernel; an asymmetric block needs an odd square kernel",
        ),
    ],
)
def test_module_and_checkpoint_are_refused_by_the_same_rule(
    kernels: dict[str, tuple[int, int]], problem: str, tmp_path: Path
) -> None:
    block = _LookAlike(**kernels)  # type: ignore[arg-type]
    with pytest.raises(UnfusableBlockError, match=rf"^block 'b': .*{problem}"):
        block_tensors_from_module(block, name="b")
    path = tmp_path / "odd.safetensors"
    save_file({f"b.{k}": v.contiguous() for k, v in block.state_dict().items()}, str(path))
    with open_checkpoint(path) as reader, pytest.raises(UnfusableBlockError, match=problem):
        plan_fusion(reader, FuseOptions())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_foreign_block_with_a_corner_branch_fuses_exactly(dtype: torch.dtype) -> None:
    model = nn.Sequential(_randomised(_LookAlike(corner_dilation=2), seed=7)).to(dtype).eval()
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(8), dtype=dtype)
    tensors = block_tensors_from_module(model[0])
    assert [b.dilation for b in tensors.others] == [1, 1, 2]  # hor, ver, corner
    with torch.no_grad():
        before = model(x)
        assert switch_to_deploy(model).names == ("0",)
        after = model(x)
    assert isinstance(model[0], ACBlock) and set(model.state_dict()) == {
        "0.fused_conv.weight",
        "0.fused_conv.bias",
    }
    err = (after.double() - before.double()).abs().max().item()
    assert err <= RTOL[dtype] * before.abs().max().item()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            _LookAlike(hor_dilation=2),
            r"'hor_conv' has stride/dilation/groups/padding_mode .*\(2, 2\).* but 'square_conv'",
        ),
        (_LookAlike(corner_dilation=1), r"'corner_conv' .* so it needs \(\(1, 1\), \(2, 2\)"),
    ],
)
def test_a_branch_with_the_wrong_dilation_is_refused(block: nn.Module, message: str) -> None:
    with pytest.raises(UnfusableBlockError, match=message):
        block_tensors_from_module(block, name="b")


def test_blocks_are_found_by_the_dialect_s_required_branches() -> None:
    model = nn.Sequential(_LookAlike(), _LookAlike(corner_dilation=2), nn.Conv2d(4, 4, 3))
    assert [name for name, _ in find_acblocks(model)] == ["0", "1"]


# ----------------------------------------------------------------- swapped arguments


def _save(net: nn.Module, path: Path, seed: int) -> Path:
    randomise_bn_stats(net, seed)
    torch.save(net.state_dict(), path)
    return path


def _fused(train: Path, out: Path) -> Path:
    # the reference nets' deploy forms keep their plain conv+BN units: no --fold-bn
    fuse_checkpoint(train, out, "safetensors", FuseOptions(layout="deploy", fold_bn=False))
    return out


def _verify(train: Path, fused: Path, **kw: object) -> VerifyResult:
    return verify_checkpoints(train, fused, VerifyOptions(batch=2, **kw))  # type: ignore[arg-type]


def test_swapped_acnet_checkpoints_are_named_in_arch_mode(tmp_path: Path) -> None:
    train = _save(build_arch("cfqkbnc", "train"), tmp_path / "train.pth", seed=1)
    fused = _fused(train, tmp_path / "fused.safetensors")
    assert _verify(train, fused, arch="cfqkbnc").passed
    with pytest.raises(BadCheckpointError, match="give the training checkpoint first") as info:
        _verify(fused, train, arch="cfqkbnc")
    message = str(info.value)
    assert str(fused) in message and "fused_conv.weight" in message and "ACNet's" in message
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    ("family", "factory", "deploy_name", "title"),
    [
        ("repvgg", fr.repvgg_net, "rbr_reparam.weight", "RepVGG"),
        ("mobileone", fr.mobileone_net, "reparam_conv.weight", "MobileOne"),
        ("dbb", fr.dbb_net, "dbb_reparam.weight", "DBB"),
        ("replknet", fr.replknet_net, "lkb_reparam.weight", "RepLKNet"),
    ],
)
def test_swapped_checkpoints_of_other_families_are_named_in_model_mode(
    family: str,
    factory: Callable[..., nn.Module],
    deploy_name: str,
    title: str,
    tmp_path: Path,
) -> None:
    torch.manual_seed(3)
    train = _save(factory(), tmp_path / f"{family}.pth", seed=3)
    fused = _fused(train, tmp_path / f"{family}_fused.safetensors")
    model = f"{FAMILY_REFERENCE}:{factory.__name__}"
    shape = (3, 12, 12)
    assert _verify(train, fused, model=model, input_shape=shape).passed
    with pytest.raises(BadCheckpointError, match="give the training checkpoint first") as info:
        _verify(fused, train, model=model, input_shape=shape)
    message = str(info.value)
    assert str(fused) in message and deploy_name in message and f"{title}'s deploy convs" in message
    assert info.value.exit_code == 3


def test_a_training_form_that_does_not_fit_is_not_called_swapped(tmp_path: Path) -> None:
    # TRAIN is a RepVGG training checkpoint, the model another family's net: a plain misfit
    torch.manual_seed(4)
    train = _save(fr.repvgg_net(), tmp_path / "repvgg.pth", seed=4)
    fused = _fused(train, tmp_path / "repvgg_fused.safetensors")
    model = f"{FAMILY_REFERENCE}:mobileone_net"
    with pytest.raises(BadCheckpointError, match="does not fit") as info:
        _verify(train, fused, model=model, input_shape=(3, 12, 12))
    assert "give the training checkpoint first" not in str(info.value)
