"""The reference nets' deploy forms are their training forms, fused with the family transforms.

Each training-time block of tests/family_reference.py is fused by hand with
acnet_convert.transforms and fusion.fold_bn (reading the module's own tensors,
not a checkpoint), loaded into the deploy-form net, and the two nets must agree
in float64 to 1e-10 relative (rounding is ~1e-14 here; a wrong branch is O(1)).
This checks that the reference modules and the transforms describe the same
arithmetic for every family, and that the deploy forms have the same keys as
the fused blocks; the upstream cross-check (NOTES) ties the modules to upstream.
"""

from __future__ import annotations

import family_reference as fr
import numpy as np
import pytest
import torch
from torch import nn

from acnet_convert.fusion import BNStats, fold_bn
from acnet_convert.transforms import (
    avg_kernel,
    compose_1x1_kxk,
    idconv_kernel,
    identity_kernel,
    pad_to,
)

Fused = tuple[np.ndarray, np.ndarray]


def _stats(bn: nn.Module) -> BNStats:
    bn = bn.bn if isinstance(bn, fr.PaddingBN) else bn
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    return BNStats(
        mean=bn.running_mean.numpy(),
        var=bn.running_var.numpy(),
        weight=bn.weight.detach().numpy(),
        bias=bn.bias.detach().numpy(),
        eps=bn.eps,
    )


def _w(conv: nn.Module) -> np.ndarray:
    return conv.weight.detach().numpy()  # type: ignore[operator,union-attr,no-any-return]


def _conv_bn(unit: nn.Module, k: int) -> Fused:
    conv, bn = (unit[0], unit[1]) if "0" in unit._modules else (unit.conv, unit.bn)
    w, b = fold_bn(_w(conv), None, _stats(bn))
    return pad_to(w, k, k), b


def _identity(bn: nn.Module, weight_shape: tuple[int, ...]) -> Fused:
    channels, per_group, kh, kw = weight_shape
    return fold_bn(identity_kernel(channels, per_group, kh, kw), None, _stats(bn))


def _sum(parts: list[Fused]) -> Fused:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)  # type: ignore[return-value]


def _dbb(block: fr.DiverseBranchBlock) -> Fused:
    origin = _w(block.dbb_origin.conv)
    cout, per_group, k, _ = origin.shape
    groups = block.dbb_origin.conv.groups
    parts = [_conv_bn(block.dbb_origin, k)]
    if hasattr(block, "dbb_1x1"):
        parts.append(_conv_bn(block.dbb_1x1, k))
    avg = block.dbb_avg
    pool = fold_bn(avg_kernel(cout, cout // groups, k), None, _stats(avg.avgbn))
    if hasattr(avg, "conv"):
        pool = compose_1x1_kxk(*fold_bn(_w(avg.conv), None, _stats(avg.bn)), *pool, groups)
    parts.append(pool)
    seq = block.dbb_1x1_kxk
    first = idconv_kernel(_w(seq.idconv1)) if hasattr(seq, "idconv1") else _w(seq.conv1)
    parts.append(
        compose_1x1_kxk(
            *fold_bn(first, None, _stats(seq.bn1)),
            *fold_bn(_w(seq.conv2), None, _stats(seq.bn2)),
            groups,
        )
    )
    assert parts[-1][0].shape == (cout, per_group, k, k)
    return _sum(parts)


def _branches(block: nn.Module, names: tuple[str, ...], primary: nn.Module) -> Fused:
    """RepVGG-like blocks: conv+BN branches (lists too) centred in the primary kernel, BN identities."""
    shape = tuple(_w(primary).shape)
    parts = []
    for name in names:
        branch = getattr(block, name, None)
        units = list(branch) if isinstance(branch, nn.ModuleList) else [branch]
        for unit in units:
            if isinstance(unit, nn.BatchNorm2d):
                parts.append(_identity(unit, shape))
            elif unit is not None:
                parts.append(_conv_bn(unit, shape[2]))
    return _sum(parts)


def _fuse(block: nn.Module) -> tuple[str, Fused] | None:
    """The deploy name and fused tensors of a training-time block, or None for other modules."""
    if isinstance(block, fr.DiverseBranchBlock):
        return "dbb_reparam", _dbb(block)
    if isinstance(block, fr.RepVGGBlock | fr.RepConv):
        primary = block.rbr_dense.conv if isinstance(block, fr.RepVGGBlock) else block.rbr_dense[0]
        return "rbr_reparam", _branches(block, block.branch_names, primary)
    if isinstance(block, fr.MobileOneBlock):
        return "reparam_conv", _branches(block, block.branch_names, block.rbr_conv[0].conv)
    if isinstance(block, fr.TimmRepVggBlock):
        return "reparam_conv", _branches(block, block.branch_names, block.conv_kxk.conv)
    if isinstance(block, fr.TimmMobileOneBlock):
        return "reparam_conv", _branches(block, block.branch_names, block.conv_kxk[0].conv)
    if isinstance(block, fr.ReparamLargeKernelConv):
        return "lkb_reparam", _branches(block, block.branch_names, block.lkb_origin.conv)
    return None


@pytest.mark.parametrize("name", sorted(fr.FAMILY_NETS))
def test_deploy_net_is_the_training_net_fused_by_the_transforms(name: str) -> None:
    factory = fr.FAMILY_NETS[name]
    train = fr.randomize(factory(), torch.Generator().manual_seed(11)).double()
    deployed = factory(deploy=True).double().eval()
    state = {k: v for k, v in train.state_dict().items()}
    fused_count = 0
    for prefix, module in train.named_modules():
        result = _fuse(module)
        if result is None:
            continue
        deploy_name, (w, b) = result
        for key in [k for k in state if k.startswith(prefix + ".")]:
            del state[key]
        state[f"{prefix}.{deploy_name}.weight"] = torch.from_numpy(w)
        state[f"{prefix}.{deploy_name}.bias"] = torch.from_numpy(b)
        fused_count += 1
    assert fused_count >= 4
    deployed.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        reference, got = train(x), deployed(x)
    rel = float((got - reference).abs().max() / reference.abs().max())
    assert rel <= 1e-10, rel


def test_padding_bn_pads_with_the_bn_of_zero() -> None:
    """DBB's padding BN: the border of its output is what the BN gives a zero input."""
    pad_bn = fr.PaddingBN(3, 2)
    fr.randomize(pad_bn, torch.Generator().manual_seed(3))
    pad_bn = pad_bn.double()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    out = pad_bn(x)
    zero = pad_bn.bn(torch.zeros(1, 3, 1, 1, dtype=torch.float64))
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out[:, :, 0, 0], zero[:, :, 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 2:-2, 2:-2], pad_bn.bn(x), rtol=0, atol=0)
    assert not torch.allclose(zero, torch.zeros_like(zero))


def test_idconv1_identity_is_not_in_the_state_dict() -> None:
    conv = fr.IdentityBasedConv1x1(4, 2)
    assert list(conv.state_dict()) == ["weight"]
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(conv(x), x)  # zero weight: the identity alone
