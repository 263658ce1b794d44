"""Reference torch modules for the re-parameterization family, training and deploy forms.

Written from the papers' definitions, not from upstream code, but with the
upstream parameter names exactly (confirmed against the upstream sources; see
NOTES in the repository history), so a state dict of these modules is a state
dict of the family's own model:

- DiverseBranchBlock (Ding et al., CVPR 2021): a kxk conv+BN, a 1x1 conv+BN, a
  1x1 conv + "padding BN" + kxk average pool + BN, and a 1x1 conv + padding BN
  + kxk conv + BN, summed (section 3). A padding BN pads its output with the
  value it gives a zero input, so the sequential branches equal one kxk conv.
- RepVGG (Ding et al., CVPR 2021): 3x3 conv+BN, 1x1 conv+BN, identity BN.
- MobileOne (Vasu et al., CVPR 2023): N kxk conv+BN, a 1x1 "scale" conv+BN
  when k > 1, an identity BN.
- RepConv (YOLOv7, Wang et al., CVPR 2023): RepVGG's block with Sequential
  names; YOLOv7 models set every BN's eps to 1e-3.
- timm ByobNet's RepVggBlock and MobileOneBlock: the same blocks under timm names.
- RepLKNet (Ding et al., CVPR 2022): a large depthwise KxK conv+BN plus a small
  kxk conv+BN.

Every block takes ``deploy``: the deploy form is one conv with a bias under the
family's deploy name. Nets take ``fold_bn`` too: their plain conv+BN units are
then one conv with a bias (what ``--fold-bn`` writes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FAMILY_NETS",
    "DBBConvBN",
    "DiverseBranchBlock",
    "IdentityBasedConv1x1",
    "MobileOneBlock",
    "PaddingBN",
    "RepConv",
    "RepVGGBlock",
    "ReparamLargeKernelConv",
    "TimmMobileOneBlock",
    "TimmRepVggBlock",
    "randomize",
]

YOLO_BN_EPS = 1e-3


def _conv(cin: int, cout: int, k: int, stride: int, pad: int, groups: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups, bias=bias)


def conv_bn(
    cin: int,
    cout: int,
    k: int,
    stride: int = 1,
    groups: int = 1,
    pad: int | None = None,
    fold_bn: bool = False,
) -> nn.Sequential:
    """A conv (no bias) then a BN, named ``conv`` and ``bn``; folded: ``conv`` with a bias."""
    unit = nn.Sequential()
    pad = k // 2 if pad is None else pad
    unit.add_module("conv", _conv(cin, cout, k, stride, pad, groups, fold_bn))
    if not fold_bn:
        unit.add_module("bn", nn.BatchNorm2d(cout))
    return unit


class PaddingBN(nn.Module):
    """A BN whose output is padded with the BN of zero (DBB's ``BNAndPadLayer``; stored as ``bn``)."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.bn(x)
        if self.pad == 0:
            return y
        bn = self.bn  # the value this BN gives a zero input, from its running statistics
        zero = F.batch_norm(
            torch.zeros_like(x[:1, :, :1, :1]),
            bn.running_mean,
            bn.running_var,
            bn.weight,
            bn.bias,
            False,
            0.0,
            bn.eps,
        )
        p = self.pad
        out = zero.expand(y.shape[0], -1, y.shape[2] + 2 * p, y.shape[3] + 2 * p).clone()
        out[:, :, p:-p, p:-p] = y
        return out


class IdentityBasedConv1x1(nn.Module):
    """DBB's ``idconv1``: a 1x1 conv whose kernel is its weight plus an identity that is not stored."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, per_group = self.weight.shape[:2]
        eye = torch.zeros_like(self.weight)
        eye[torch.arange(c), torch.arange(c) % per_group, 0, 0] = 1.0
        return F.conv2d(x, self.weight + eye, groups=self.groups)


class DiverseBranchBlock(nn.Module):
    """DBB: ``dbb_origin``, ``dbb_1x1`` (when groups < out), ``dbb_avg``, ``dbb_1x1_kxk``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        internal: int | None = None,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        pad = k // 2
        if deploy:
            self.dbb_reparam = _conv(cin, cout, k, stride, pad, groups, True)
            return
        self.dbb_origin = conv_bn(cin, cout, k, stride, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", _conv(cin, cout, 1, 1, 0, groups, False))
            self.dbb_avg.add_module("bn", PaddingBN(cout, pad))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride=stride, padding=0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride=stride, padding=pad))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        if internal is None:
            internal = cin if groups < cout else 2 * cin
        seq = nn.Sequential()
        if internal == cin:
            seq.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            seq.add_module("conv1", _conv(cin, internal, 1, 1, 0, groups, False))
        seq.add_module("bn1", PaddingBN(internal, pad))
        seq.add_module("conv2", _conv(internal, cout, k, stride, 0, groups, False))
        seq.add_module("bn2", nn.BatchNorm2d(cout))
        self.dbb_1x1_kxk = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dbb_reparam"):
            return self.dbb_reparam(x)  # type: ignore[no-any-return]
        out = self.dbb_origin(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        if hasattr(self, "dbb_1x1"):
            out = out + self.dbb_1x1(x)
        return out  # type: ignore[no-any-return]


class DBBConvBN(nn.Module):
    """DBB nets' plain unit: ``conv`` + ``bn``; folded: ``conv`` with a bias."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, fold_bn: bool = False) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, k, stride, k // 2, 1, fold_bn)
        self.bn = nn.Identity() if fold_bn else nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))  # type: ignore[no-any-return]


class _IdentityBranchBlock(nn.Module):
    """Shared forward of the RepVGG-like blocks: the sum of every branch that exists."""

    deploy_name: str = ""
    branch_names: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deployed = getattr(self, self.deploy_name, None)
        if deployed is not None:
            return deployed(x)  # type: ignore[no-any-return]
        out = torch.zeros((), dtype=x.dtype)
        for name in self.branch_names:
            branch = getattr(self, name, None)
            if isinstance(branch, nn.ModuleList):
                for b in branch:
                    out = out + b(x)
            elif branch is not None:
                out = out + branch(x)
        return out


class RepVGGBlock(_IdentityBranchBlock):
    """RepVGG: ``rbr_dense`` 3x3, ``rbr_1x1``, ``rbr_identity`` (in == out, stride 1)."""

    deploy_name = "rbr_reparam"
    branch_names = ("rbr_dense", "rbr_1x1", "rbr_identity")

    def __init__(
        self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False
    ) -> None:
        super().__init__()
        if deploy:
            self.rbr_reparam = _conv(cin, cout, 3, stride, 1, groups, True)
            return
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, groups)


class RepConv(_IdentityBranchBlock):
    """YOLOv7 RepConv: ``rbr_dense.0/.1``, ``rbr_1x1.0/.1``, ``rbr_identity``; BN eps 1e-3."""

    deploy_name = "rbr_reparam"
    branch_names = ("rbr_dense", "rbr_1x1", "rbr_identity")

    def __init__(
        self, cin: int, cout: int, stride: int = 1, groups: int = 1, deploy: bool = False
    ) -> None:
        super().__init__()
        if deploy:
            self.rbr_reparam = _conv(cin, cout, 3, stride, 1, groups, True)
            return
        bn = lambda c: nn.BatchNorm2d(c, eps=YOLO_BN_EPS)  # noqa: E731
        self.rbr_identity = bn(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = nn.Sequential(_conv(cin, cout, 3, stride, 1, groups, False), bn(cout))
        self.rbr_1x1 = nn.Sequential(_conv(cin, cout, 1, stride, 0, groups, False), bn(cout))


class YoloConv(nn.Module):
    """YOLOv7's plain ``Conv``: ``conv`` + ``bn`` (eps 1e-3); folded: ``conv`` with a bias."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, fold_bn: bool = False) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, k, stride, k // 2, 1, fold_bn)
        self.bn = nn.Identity() if fold_bn else nn.BatchNorm2d(cout, eps=YOLO_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class MobileOneBlock(_IdentityBranchBlock):
    """MobileOne: ``rbr_conv.{i}`` kxk, ``rbr_scale`` 1x1 (k > 1), ``rbr_skip`` (in == out, stride 1)."""

    deploy_name = "reparam_conv"
    branch_names = ("rbr_conv", "rbr_scale", "rbr_skip")

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        branches: int = 1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if deploy:
            self.reparam_conv = _conv(cin, cout, k, stride, k // 2, groups, True)
            return
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            conv_bn(cin, cout, k, stride, groups) for _ in range(branches)
        )
        self.rbr_scale = conv_bn(cin, cout, 1, stride, groups) if k > 1 else None


class TimmRepVggBlock(_IdentityBranchBlock):
    """timm ByobNet RepVggBlock: ``conv_kxk``, ``conv_1x1``, ``identity``; deploy ``reparam_conv``."""

    deploy_name = "reparam_conv"
    branch_names = ("conv_kxk", "conv_1x1", "identity")

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if deploy:
            self.reparam_conv = _conv(cin, cout, k, stride, k // 2, groups, True)
            return
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk = conv_bn(cin, cout, k, stride, groups)
        self.conv_1x1 = conv_bn(cin, cout, 1, stride, groups)


class TimmMobileOneBlock(_IdentityBranchBlock):
    """timm ByobNet MobileOneBlock: ``conv_kxk.{i}``, ``conv_scale`` (k > 1), ``identity``."""

    deploy_name = "reparam_conv"
    branch_names = ("conv_kxk", "conv_scale", "identity")

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        branches: int = 1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        if deploy:
            self.reparam_conv = _conv(cin, cout, k, stride, k // 2, groups, True)
            return
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList(
            conv_bn(cin, cout, k, stride, groups) for _ in range(branches)
        )
        self.conv_scale = conv_bn(cin, cout, 1, stride, groups) if k > 1 else None


class ReparamLargeKernelConv(_IdentityBranchBlock):
    """RepLKNet: ``lkb_origin`` large depthwise KxK, ``small_conv`` kxk; deploy ``lkb_reparam``."""

    deploy_name = "lkb_reparam"
    branch_names = ("lkb_origin", "small_conv")

    def __init__(
        self, channels: int, k: int, small: int | None, stride: int = 1, deploy: bool = False
    ) -> None:
        super().__init__()
        if deploy:
            self.lkb_reparam = _conv(channels, channels, k, stride, k // 2, channels, True)
            return
        self.lkb_origin = conv_bn(channels, channels, k, stride, channels)
        if small is not None:
            self.small_conv = conv_bn(channels, channels, small, stride, channels)


# --- small nets covering every branch kind -------------------------------------------------


class _Net(nn.Module):
    """Units applied in order with a ReLU between, then a linear head on the mean."""

    def __init__(self, units: list[tuple[str, nn.Module]], width: int) -> None:
        super().__init__()
        for name, unit in units:
            self.add_module(name, unit)
        self.order = [name for name, _ in units]
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = torch.relu(getattr(self, name)(x))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]

    def _with_backbone(self, blocks: list[tuple[str, nn.Module]]) -> _Net:
        """Fill the ``backbone`` Sequential with upstream ACNet's ``<unit>.acb`` units."""
        for name, block in blocks:
            unit = nn.Module()
            unit.add_module("acb", block)
            unit.forward = block.forward  # type: ignore[method-assign]
            self.backbone.add_module(name, unit)
        return self


def dbb_net(deploy: bool = False, fold_bn: bool = False) -> nn.Module:
    """Plain ConvBN stem; DBB with idconv1, grouped + stride 2, depthwise k=5 (conv1), conv1 k=3."""
    return _Net(
        [
            ("stem", DBBConvBN(3, 4, 3, fold_bn=fold_bn)),
            ("block1", DiverseBranchBlock(4, 4, 3, deploy=deploy)),
            ("block2", DiverseBranchBlock(4, 8, 3, stride=2, groups=2, deploy=deploy)),
            ("block3", DiverseBranchBlock(8, 8, 5, groups=8, deploy=deploy)),
            ("block4", DiverseBranchBlock(8, 8, 3, internal=16, deploy=deploy)),
            ("proj", DBBConvBN(8, 8, 1, fold_bn=fold_bn)),
        ],
        8,
    )


def repvgg_net(deploy: bool = False, fold_bn: bool = False) -> nn.Module:
    """Stride-2 (no identity), identity, grouped identity, depthwise identity, grouped stride 2."""
    return _Net(
        [
            ("stage0", RepVGGBlock(3, 4, stride=2, deploy=deploy)),
            ("stage1", RepVGGBlock(4, 4, deploy=deploy)),
            ("stage2", RepVGGBlock(4, 4, groups=2, deploy=deploy)),
            ("stage3", RepVGGBlock(4, 4, groups=4, deploy=deploy)),
            ("stage4", RepVGGBlock(4, 8, stride=2, groups=2, deploy=deploy)),
        ],
        8,
    )


def mobileone_net(deploy: bool = False, fold_bn: bool = False) -> nn.Module:
    """Stem (conv + scale), depthwise 3x3 x2 with skip, pointwise x2, depthwise k=5 stride 2, 1x1 with skip."""
    return _Net(
        [
            ("stage0", MobileOneBlock(3, 4, 3, stride=2, deploy=deploy)),
            ("dw1", MobileOneBlock(4, 4, 3, groups=4, branches=2, deploy=deploy)),
            ("pw1", MobileOneBlock(4, 8, 1, branches=2, deploy=deploy)),
            ("dw2", MobileOneBlock(8, 8, 5, stride=2, groups=8, branches=3, deploy=deploy)),
            ("pw2", MobileOneBlock(8, 8, 1, deploy=deploy)),
            ("grouped", MobileOneBlock(8, 8, 3, groups=2, deploy=deploy)),
        ],
        8,
    )


def repconv_net(deploy: bool = False, fold_bn: bool = False) -> nn.Module:
    """YOLO Conv stem; RepConv stride 2, identity, grouped identity, depthwise; a 1x1 YOLO Conv."""
    return _Net(
        [
            ("stem", YoloConv(3, 4, 3, fold_bn=fold_bn)),
            ("rep1", RepConv(4, 8, stride=2, deploy=deploy)),
            ("rep2", RepConv(8, 8, deploy=deploy)),
            ("rep3", RepConv(8, 8, groups=2, deploy=deploy)),
            ("rep4", RepConv(8, 8, groups=8, deploy=deploy)),
            ("cv", YoloConv(8, 8, 1, fold_bn=fold_bn)),
        ],
        8,
    )


def timm_net(deploy: bool = False, fold_bn: bool = False) -> nn.Module:
    """RepVggBlock stride 2, identity, grouped; MobileOneBlock depthwise x2, 1x1, k=5 stride 2, 1x1 x2."""
    return _Net(
        [
            ("rv0", TimmRepVggBlock(3, 4, stride=2, deploy=deploy)),
            ("rv1", TimmRepVggBlock(4, 4, deploy=deploy)),
            ("rv2", TimmRepVggBlock(4, 4, groups=2, deploy=deploy)),
            ("mo_dw", TimmMobileOneBlock(4, 4, 3, groups=4, branches=2, deploy=deploy)),
            ("mo_pw", TimmMobileOneBlock(4, 8, 1, deploy=deploy)),
            ("mo_k5", TimmMobileOneBlock(8, 8, 5, stride=2, groups=8, deploy=deploy)),
            ("mo_id", TimmMobileOneBlock(8, 8, 1, branches=2, deploy=deploy)),
        ],
        8,
    )


class _RepLKUnit(nn.Module):
    """RepLKNet's block: ``prelkb_bn``, ``pw1``, ``large_kernel``, ``pw2``, with a residual."""

    def __init__(
        self, channels: int, k: int, small: int | None, deploy: bool, fold_bn: bool
    ) -> None:
        super().__init__()
        self.prelkb_bn = nn.BatchNorm2d(channels)  # a BN before a conv: no --fold-bn folds it
        self.pw1 = conv_bn(channels, channels, 1, fold_bn=fold_bn)
        self.large_kernel = ReparamLargeKernelConv(channels, k, small, deploy=deploy)
        self.pw2 = conv_bn(channels, channels, 1, fold_bn=fold_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.pw1(self.prelkb_bn(x)))
        return x + self.pw2(torch.relu(self.large_kernel(y)))  # type: ignore[no-any-return]


def replknet_net(deploy: bool = False, fold_bn: bool = False) -> nn.Module:
    """Plain stem; 7x7 + 3x3 unit; 5x5 + 3x3 stride 2; 7x7 + 5x5; 5x5 alone (no small_conv)."""
    return _Net(
        [
            ("stem", conv_bn(3, 4, 3, stride=2, fold_bn=fold_bn)),
            ("block1", _RepLKUnit(4, 7, 3, deploy, fold_bn)),
            ("down", ReparamLargeKernelConv(4, 5, 3, stride=2, deploy=deploy)),
            ("block2", _RepLKUnit(4, 7, 5, deploy, fold_bn)),
            ("block3", _RepLKUnit(4, 5, None, deploy, fold_bn)),
        ],
        4,
    )


def mixed_net(deploy: bool = False, fold_bn: bool = False) -> nn.Module:
    """An ACNet backbone (upstream's ``<unit>.acb`` names) with a RepVGG head block."""
    from acnet_convert.nn import ACBlock

    return _Net(
        [
            ("backbone", nn.Sequential()),
            ("head_block", RepVGGBlock(8, 8, deploy=deploy)),
        ],
        8,
    )._with_backbone(
        [
            ("conv1", ACBlock(3, 8, 3, padding=1, deploy=deploy)),
            ("conv2", ACBlock(8, 8, 3, stride=2, padding=1, deploy=deploy)),
        ]
    )


# name -> net factory (deploy, fold_bn)
FAMILY_NETS: dict[str, Callable[..., nn.Module]] = {
    "dbb": dbb_net,
    "repvgg": repvgg_net,
    "mobileone": mobileone_net,
    "repconv": repconv_net,
    "timm": timm_net,
    "replknet": replknet_net,
}
MIXED_NET = mixed_net


def randomize(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Seeded weights and BN statistics (all branches non-trivial, idconv1 included)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(c, generator=gen) * 2.0 + 0.3)
                module.num_batches_tracked.fill_(100)  # type: ignore[union-attr,operator]
            elif isinstance(module, nn.Conv2d | nn.Linear | IdentityBasedConv1x1):
                w = module.weight
                fan_in = w[0].numel()
                w.copy_(torch.randn(w.shape, generator=gen) / fan_in**0.5)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.copy_(torch.randn(bias.shape, generator=gen) * 0.1)
    return model.eval()
