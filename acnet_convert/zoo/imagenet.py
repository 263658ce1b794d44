"""Upstream ACNet's ImageNet ResNets: ResNet-18/34 (``sres18``/``sres34``) and ResNet-50.

Upstream's ``model_map.py`` maps ``sres18``/``sres34`` to ``base_model/resnet.py``
(``ResNet`` with ``BasicBlock``; blocks named ``stage1.0``, ``stage1.1``, ...) and
``sres50`` to ``base_model/stagewise_resnet.py`` (``SBottleneckResNet``; a stage
``projection`` plus ``block0``, ``block1``, ...). The 7x7 stem stays a plain conv
in ACNet. Global pooling is adaptive: identical to upstream's 7x7 average pool
on 224x224 inputs, and it also accepts other sizes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from acnet_convert.errors import UsageError
from acnet_convert.zoo._units import Units, check_form

__all__ = ["ImageNetResNet", "StagewiseResNet50"]

# Upstream constants.py RESNET50_ORIGIN_DEPS_FLATTENED, per stage: (mid, out, blocks).
_BASIC_COUNTS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
_RESNET50_STAGES = ((64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3))


def _gap() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _BasicBlock(nn.Module):
    """Upstream ``resnet.py`` ``BasicBlock``: ``shortcut``, ``conv1``, ``conv2``."""

    def __init__(self, units: Units, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        if stride != 1 or cin != planes:
            self.shortcut = units.conv_bn(cin, planes, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.conv1 = units.conv_bn_relu(cin, planes, 3, stride=stride, padding=1)
        self.conv2 = units.conv_bn(planes, planes, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """relu(conv2(conv1(x)) + shortcut(x))."""
        out: Tensor = self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))
        return out


class ImageNetResNet(nn.Module):
    """ResNet-18 or -34 as upstream ``resnet.py`` builds it (width multiplier 1)."""

    def __init__(self, form: str = "train", depth: int = 18, num_classes: int = 1000) -> None:
        super().__init__()
        units = Units(check_form(form))
        if depth not in _BASIC_COUNTS:
            raise UsageError(f"ResNet depth {depth} is not one of {sorted(_BASIC_COUNTS)}")
        counts = _BASIC_COUNTS[depth]
        self.conv1 = units.conv_bn_relu(3, 64, 7, stride=2, padding=3)
        stages = []
        cin = 64
        for s, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True), 1):
            blocks = []
            for b in range(count):
                blocks.append(_BasicBlock(units, cin, planes, 2 if s > 1 and b == 0 else 1))
                cin = planes
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = _gap()
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Stem, 3x3/2 max-pool, four stages, global pool, linear."""
        out = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        out = self.stage4(self.stage3(self.stage2(self.stage1(out))))
        result: Tensor = self.linear(self.gap(out))
        return result


class _Bottleneck(nn.Module):
    """Upstream ``BottleneckBranch``: 1x1, 3x3 (strided, an ACB in ACNet), 1x1."""

    def __init__(self, units: Units, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = units.conv_bn_relu(cin, mid, 1)
        self.conv2 = units.conv_bn_relu(mid, mid, 3, stride=stride, padding=1)
        self.conv3 = units.conv_bn(mid, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        """conv3(conv2(conv1(x)))."""
        out: Tensor = self.conv3(self.conv2(self.conv1(x)))
        return out


class _BottleneckStage(nn.Module):
    """Upstream ``ResNetBottleneckStage``: a 1x1 ``projection``, then ``block0`` ..."""

    def __init__(
        self, units: Units, cin: int, mid: int, cout: int, blocks: int, stride: int
    ) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.projection = units.conv_bn(cin, cout, 1, stride=stride)
        self.num_blocks = blocks
        for i in range(blocks):
            block = _Bottleneck(units, cin if i == 0 else cout, mid, cout, stride if i == 0 else 1)
            self.add_module(f"block{i}", block)

    def forward(self, x: Tensor) -> Tensor:
        """The projection shortcuts block0 only; later blocks add their input."""
        out = self.relu(self.projection(x) + self.get_submodule("block0")(x))
        for i in range(1, self.num_blocks):
            out = self.relu(out + self.get_submodule(f"block{i}")(out))
        result: Tensor = out
        return result


class StagewiseResNet50(nn.Module):
    """ResNet-50 as upstream ``stagewise_resnet.py`` builds it (``sres50``)."""

    def __init__(self, form: str = "train", num_classes: int = 1000) -> None:
        super().__init__()
        units = Units(check_form(form))
        self.conv1 = units.conv_bn_relu(3, 64, 7, stride=2, padding=3)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        cin = 64
        for s, (mid, cout, blocks) in enumerate(_RESNET50_STAGES, start=1):
            stages.append(
                _BottleneckStage(units, cin, mid, cout, blocks, stride=1 if s == 1 else 2)
            )
            cin = cout
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = _gap()
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Stem, max-pool, four stages, global pool, fc."""
        out = self.stage4(self.stage3(self.stage2(self.stage1(self.maxpool(self.conv1(x))))))
        result: Tensor = self.fc(self.gap(out))
        return result
