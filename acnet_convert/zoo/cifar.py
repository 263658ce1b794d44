"""Upstream ACNet's CIFAR-10 networks: Cifar-quick, VGG, ResNet-56 and WRN-16-8.

Module names and shapes follow upstream ``base_model/cfqk.py``,
``base_model/vgg.py``, ``base_model/stagewise_resnet.py`` (``SRCNet``) and
``base_model/wrn.py``, with the default channel widths of upstream
``constants.py``, so an upstream state dict loads with ``strict=True``. Pooling
and activations carry no weights; they are reproduced so that outputs agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from acnet_convert.zoo._units import Units, check_form

__all__ = ["CifarQuick", "CifarResNet", "CifarVGG", "WideResNetCifar"]

# Upstream constants.py: CFQK_ORIGIN_DEPS and VGG_ORIGIN_DEPS.
CFQK_DEPS = (32, 32, 64)
VGG_DEPS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
# VGG: a 2x2 max-pool follows these convs (1-based), as in upstream's stem.
_VGG_POOL_AFTER = (2, 4, 7, 10, 13)


class CifarQuick(nn.Module):
    """Cifar-quick with BN (``cfqkbnc``): three 5x5 conv units, two linear layers."""

    def __init__(self, form: str = "train", num_classes: int = 10) -> None:
        super().__init__()
        units = Units(check_form(form))
        d = CFQK_DEPS
        self.conv1 = units.conv_bn_relu(3, d[0], 5, padding=2)
        self.conv2 = units.conv_bn_relu(d[0], d[1], 5, padding=2)
        self.conv3 = units.conv_bn_relu(d[1], d[2], 5, padding=2)
        self.fc1 = nn.Linear(3 * 3 * d[2], 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """32x32 -> 15 -> 7 -> 3 spatially, then the classifier."""
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2)
        x = F.avg_pool2d(self.conv2(x), kernel_size=3, stride=2)
        x = F.avg_pool2d(self.conv3(x), kernel_size=3, stride=2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        out: Tensor = self.fc2(x)
        return out


class CifarVGG(nn.Module):
    """VGG-16 for CIFAR (``vc``): 13 3x3 conv units in ``stem``, then two linear layers."""

    def __init__(self, form: str = "train", num_classes: int = 10) -> None:
        super().__init__()
        units = Units(check_form(form))
        self.stem = nn.Sequential()
        cin, pools = 3, 0
        for i, cout in enumerate(VGG_DEPS, start=1):
            self.stem.add_module(f"conv{i}", units.conv_bn_relu(cin, cout, 3, padding=1))
            if i in _VGG_POOL_AFTER:
                pools += 1
                self.stem.add_module(f"maxpool{pools}", nn.MaxPool2d(kernel_size=2))
            cin = cout
        self.flatten = nn.Flatten()
        self.linear1 = nn.Linear(VGG_DEPS[-1], 512)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Five 2x2 pools take 32x32 to 1x1."""
        out: Tensor = self.linear2(self.relu(self.linear1(self.flatten(self.stem(x)))))
        return out


class _BasicBranch(nn.Module):
    """The residual branch of a basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN."""

    def __init__(self, units: Units, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = units.conv_bn_relu(cin, mid, 3, stride=stride, padding=1)
        self.conv2 = units.conv_bn(mid, cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """conv2(conv1(x))."""
        out: Tensor = self.conv2(self.conv1(x))
        return out


class _BasicStage(nn.Module):
    """Upstream ``ResNetBasicStage``: a 3x3 stem conv (first stage) or a 1x1
    projection, then ``block0`` ... ``block{n-1}``."""

    def __init__(
        self, units: Units, cin: int, width: int, blocks: int, stride: int, is_first: bool
    ) -> None:
        super().__init__()
        if is_first:
            self.conv1 = units.conv_bn(cin, width, 3, padding=1)
        else:
            self.projection = units.conv_bn(cin, width, 1, stride=stride)
        self.relu = nn.ReLU()
        self.is_first = is_first
        self.num_blocks = blocks
        for i in range(blocks):
            block_in = cin if i == 0 and not is_first else width
            block = _BasicBranch(units, block_in, width, width, stride if i == 0 else 1)
            self.add_module(f"block{i}", block)

    def forward(self, x: Tensor) -> Tensor:
        """Residual sums with ReLU after each, as upstream."""
        block0 = self.get_submodule("block0")
        if self.is_first:
            x = self.relu(self.get_submodule("conv1")(x))
            out = x + block0(x)
        else:
            out = self.get_submodule("projection")(x) + block0(x)
        out = self.relu(out)
        for i in range(1, self.num_blocks):
            out = self.relu(out + self.get_submodule(f"block{i}")(out))
        result: Tensor = out
        return result


class CifarResNet(nn.Module):
    """ResNet-56 for CIFAR (``src56``, upstream ``SRCNet``): 3 stages of 9 basic blocks."""

    def __init__(self, form: str = "train", num_classes: int = 10, blocks: int = 9) -> None:
        super().__init__()
        units = Units(check_form(form))
        # Upstream rc_origin_deps_flattened: widths 16, 32, 64.
        self.stage1 = _BasicStage(units, 3, 16, blocks, stride=1, is_first=True)
        self.stage2 = _BasicStage(units, 16, 32, blocks, stride=2, is_first=False)
        self.stage3 = _BasicStage(units, 32, 64, blocks, stride=2, is_first=False)
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Three stages, global average pool (8x8 on CIFAR), linear."""
        out: Tensor = self.linear(self.gap(self.stage3(self.stage2(self.stage1(x)))))
        return out


class _WRNBlock(nn.Module):
    """Pre-activation wide block: ``proj`` (first block of a stage), ``conv1``, ``conv2``."""

    def __init__(self, units: Units, cin: int, width: int, stride: int, project: bool) -> None:
        super().__init__()
        self.proj = units.bn_relu_conv(cin, width, 1, stride=stride) if project else nn.Identity()
        self.conv1 = units.bn_relu_conv(cin, width, 3, stride=stride, padding=1)
        self.dropout = nn.Identity()  # the 'plain' variant has no dropout
        self.conv2 = units.bn_relu_conv(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """conv2(conv1(x)) + proj(x); upstream applies no ReLU after the sum."""
        out: Tensor = self.conv2(self.dropout(self.conv1(x))) + self.proj(x)
        return out


class WideResNetCifar(nn.Module):
    """WRN-16-8 for CIFAR (``wrnc16plain``): a 3x3 stem conv, 3 stages of 2 wide blocks,
    and a model-level ``last_bn`` that belongs to no block."""

    def __init__(self, form: str = "train", num_classes: int = 10) -> None:
        super().__init__()
        units = Units(check_form(form))
        # Upstream's stem is a bare builder Conv2d without bias (an ACB in ACNet).
        self.conv1 = units.conv(3, 16, 3, padding=1, bias=False)
        stages = []
        cin = 16
        for s, width in enumerate((128, 256, 512), start=1):
            stage = nn.Sequential()
            for b in range(2):
                stride = 2 if s > 1 and b == 0 else 1
                stage.add_module(f"block{b + 1}", _WRNBlock(units, cin, width, stride, b == 0))
                cin = width
            stages.append(stage)
        self.stage1, self.stage2, self.stage3 = stages
        self.last_bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Upstream applies ``last_bn`` and then pools (kernel 8) without a ReLU between."""
        out = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        out = F.avg_pool2d(self.last_bn(out), kernel_size=8, stride=1)
        result: Tensor = self.linear(torch.flatten(out, 1))
        return result
