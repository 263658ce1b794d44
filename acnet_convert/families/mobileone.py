"""MobileOne (Vasu et al., CVPR 2023; github apple/ml-mobileone).

Branches: ``rbr_conv.{i}`` (N kxk conv+BN; the first is the primary),
``rbr_scale`` (1x1 conv+BN, only when k > 1), ``rbr_skip`` (a BN alone, when
in == out and stride 1). A 1x1 block fuses into a 1x1 conv. Deploy: ``reparam_conv``.
"""

from __future__ import annotations

from acnet_convert.families._names import over_parameterized
from acnet_convert.naming import Dialect

__all__ = ["DIALECTS"]

_ANCHOR, _PRIMARY, _BRANCHES = over_parameterized("rbr_conv", "rbr_scale", "rbr_skip")

DIALECTS = (
    Dialect(
        name="mobileone",
        family="mobileone",
        exclusive=False,
        description="MobileOne: rbr_conv.{i} (.conv + .bn), rbr_scale, rbr_skip (BN); "
        "fused: reparam_conv",
        anchor=_ANCHOR,
        square=_PRIMARY,
        branches=_BRANCHES,
        fused_weight="{p}reparam_conv.weight",
        fused_bias="{p}reparam_conv.bias",
        label="{p}",
    ),
)
