"""Make the checkpoint and picture of README's "Quantization readiness" example.

A ResNet-18 training checkpoint (upstream names, random weights) whose BN statistics
are drawn the way a trained net's look, log-normal scales rather than all near 1, and in
which a few channels of two blocks were all but switched off (tiny gamma, as
L1-regularised "network slimming" training leaves them). Fusing folds those scales into
the kernels, so those fused convs carry channels 100x smaller than their neighbours.

    PYTHONPATH=$PWD python docs/make_int8_example.py OUT_DIR
    acnet-convert inspect OUT_DIR/sres18_train.pth --stats --plot docs/int8_stats.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from acnet_convert.zoo import build_arch


def main(out_dir: Path) -> Path:
    gen = torch.Generator().manual_seed(18)
    net = build_arch("sres18", "train")
    with torch.no_grad():
        for bn in net.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                bn.running_var.copy_(torch.exp(torch.randn(c, generator=gen) * 0.5))
                bn.weight.copy_(torch.exp(torch.randn(c, generator=gen) * 0.3))
                bn.bias.copy_(torch.randn(c, generator=gen) * 0.2)
        for name in ("stage2.0.conv1.acb", "stage3.1.conv2"):
            block = net.get_submodule(name)
            for bn in (block.square_bn, block.hor_bn, block.ver_bn):
                bn.weight[:4] *= 0.01  # four channels all but switched off
    path = out_dir / "sres18_train.pth"
    torch.save(net.state_dict(), path)
    return path


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
