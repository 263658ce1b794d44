"""RepLKNet (Ding et al., CVPR 2022; github DingXiaoH/RepLKNet-pytorch).

``ReparamLargeKernelConv``: ``lkb_origin`` (a large KxK depthwise conv+BN) and
``small_conv`` (a small kxk conv+BN, centred). Deploy: ``lkb_reparam``.
"""

from __future__ import annotations

from acnet_convert.families._names import TORCH_PREFIX, conv_bn
from acnet_convert.naming import Dialect

__all__ = ["DIALECTS"]

DIALECTS = (
    Dialect(
        name="replknet",
        family="replknet",
        exclusive=False,
        description="RepLKNet ReparamLargeKernelConv: lkb_origin, small_conv (.conv + .bn); "
        "fused: lkb_reparam",
        anchor=TORCH_PREFIX + r"lkb_origin\.conv\.weight",
        square=conv_bn("lkb_origin"),
        branches=(conv_bn("small_conv", optional=True),),
        fused_weight="{p}lkb_reparam.weight",
        fused_bias="{p}lkb_reparam.bias",
        label="{p}",
    ),
)
