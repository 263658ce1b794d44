"""Seeded training-time state dicts shaped like two re-parameterization family nets.

``dbb_resnet18_state``: DiverseBranchBlock's ImageNet ResNet-18 (github
DingXiaoH/DiverseBranchBlock ``resnet.py`` with ``CONV_BN_IMPL = 'DBB'``): the
7x7 stem and the 1x1 shortcuts stay plain ``<u>.conv`` + ``<u>.bn`` units, every
3x3 conv is a DBB (``dbb_origin``, ``dbb_1x1``, ``dbb_avg.{conv,bn.bn,avgbn}``,
``dbb_1x1_kxk.{idconv1,bn1.bn,conv2,bn2}``); about 26 M parameters.

``repvgg_a0_state``: RepVGG-A0 (github DingXiaoH/RepVGG ``create_RepVGG_A0``):
22 RepVGG blocks (``rbr_dense``, ``rbr_1x1``, ``rbr_identity`` when in == out and
stride 1), widths 48/48/96/192/1280; about 9 M parameters.

Keys and shapes equal the upstream models' ``state_dict()`` (checked against the
upstream code when written; the benchmark itself needs only numpy). Values are
random but realistic (BN variances around 1), in module order.
"""

from __future__ import annotations

from typing import Any

__all__ = ["dbb_resnet18_state", "repvgg_a0_state"]


class _State:
    """A state dict filled in module order from one seeded generator."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)
        self.sd: dict[str, Any] = {}

    def conv(self, name: str, shape: tuple[int, int, int, int]) -> None:
        fan_in = shape[1] * shape[2] * shape[3]
        scale = self.np.float32((2.0 / fan_in) ** 0.5)
        self.sd[name] = self.rng.standard_normal(shape, dtype=self.np.float32) * scale

    def bn(self, prefix: str, c: int) -> None:
        np, rng = self.np, self.rng
        self.sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        self.sd[f"{prefix}.bias"] = rng.normal(0.0, 0.1, c).astype(np.float32)
        self.sd[f"{prefix}.running_mean"] = rng.normal(0.0, 0.1, c).astype(np.float32)
        self.sd[f"{prefix}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        self.sd[f"{prefix}.num_batches_tracked"] = np.array(50_000, dtype=np.int64)

    def conv_bn(self, prefix: str, cin: int, cout: int, k: int) -> None:
        self.conv(f"{prefix}.conv.weight", (cout, cin, k, k))
        self.bn(f"{prefix}.bn", cout)

    def linear(self, prefix: str, cin: int, cout: int) -> None:
        self.sd[f"{prefix}.weight"] = (
            self.rng.standard_normal((cout, cin), dtype=self.np.float32) * 0.01
        )
        self.sd[f"{prefix}.bias"] = self.np.zeros(cout, dtype=self.np.float32)


def _dbb(s: _State, p: str, cin: int, cout: int) -> None:
    """A 3x3 DBB, groups 1: the middle width of dbb_1x1_kxk is cin, so its first conv is idconv1."""
    s.conv_bn(f"{p}.dbb_origin", cin, cout, 3)
    s.conv(f"{p}.dbb_avg.conv.weight", (cout, cin, 1, 1))
    s.bn(f"{p}.dbb_avg.bn.bn", cout)
    s.bn(f"{p}.dbb_avg.avgbn", cout)
    s.conv_bn(f"{p}.dbb_1x1", cin, cout, 1)
    s.conv(f"{p}.dbb_1x1_kxk.idconv1.weight", (cin, cin, 1, 1))
    s.bn(f"{p}.dbb_1x1_kxk.bn1.bn", cin)
    s.conv(f"{p}.dbb_1x1_kxk.conv2.weight", (cout, cin, 3, 3))
    s.bn(f"{p}.dbb_1x1_kxk.bn2", cout)


def dbb_resnet18_state(seed: int) -> dict[str, Any]:
    """DBB ResNet-18 (ImageNet, 1000 classes), training-time, float32."""
    s = _State(seed)
    s.conv_bn("stage0.conv1", 3, 64, 7)
    cin = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            stride = 2 if stage > 1 and b == 0 else 1
            p = f"stage{stage}.{b}"
            if stride != 1 or cin != planes:
                s.conv_bn(f"{p}.shortcut", cin, planes, 1)
            _dbb(s, f"{p}.conv1", cin, planes)
            _dbb(s, f"{p}.conv2", planes, planes)
            cin = planes
    s.linear("linear", 512, 1000)
    return s.sd


def repvgg_a0_state(seed: int) -> dict[str, Any]:
    """RepVGG-A0 (ImageNet, 1000 classes), training-time, float32."""
    s = _State(seed)

    def block(p: str, cin: int, cout: int, stride: int) -> None:
        if cin == cout and stride == 1:
            s.bn(f"{p}.rbr_identity", cin)
        s.conv_bn(f"{p}.rbr_dense", cin, cout, 3)
        s.conv_bn(f"{p}.rbr_1x1", cin, cout, 1)

    block("stage0", 3, 48, 2)
    cin = 48
    for stage, (planes, blocks) in enumerate(((48, 2), (96, 4), (192, 14), (1280, 1)), start=1):
        for b in range(blocks):
            block(f"stage{stage}.{b}", cin, planes, 2 if b == 0 else 1)
            cin = planes
    s.linear("linear", 1280, 1000)
    return s.sd
