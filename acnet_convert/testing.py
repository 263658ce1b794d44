"""Helpers for testing fused models: plausible eval-mode BatchNorm statistics.

A freshly built network has running_mean 0, running_var 1, gamma 1 and
beta 0 in every BN, which hides most fusion mistakes. These helpers give each
BN non-trivial values, the way a few epochs of training would.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomise_bn_stats"]


def randomise_bn_stats(
    model: nn.Module, seed: int | torch.Generator, *, spread: float = 0.2
) -> nn.Module:
    """Give every BatchNorm2d in ``model`` random statistics and affine parameters, in place.

    running_mean and beta are normal with standard deviation ``spread``;
    running_var and gamma are uniform in [0.5, 1.5). Returns ``model``.

    >>> net = randomise_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=0)
    >>> bool(net[1].running_var.min() >= 0.5)
    True
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            c = bn.num_features
            if bn.running_mean is not None and bn.running_var is not None:
                bn.running_mean.copy_(torch.randn(c, generator=gen) * spread)
                bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            if bn.affine:
                bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=gen) * spread)
    return model
