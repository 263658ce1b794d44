"""RepVGG (Ding et al., CVPR 2021; github DingXiaoH/RepVGG); YOLOv6's RepVGGBlock uses the same names.

Branches: ``rbr_dense`` (kxk conv+BN), ``rbr_1x1`` (1x1 conv+BN), ``rbr_identity``
(a BN alone, present when in == out and stride 1). Deploy: ``rbr_reparam``.
Groups follow from shapes: the identity needs out channels a multiple of the
dense conv's in-channels per group.
"""

from __future__ import annotations

from acnet_convert.families._names import TORCH_PREFIX, bn_only, conv_bn
from acnet_convert.naming import Dialect

__all__ = ["DIALECTS"]

DIALECTS = (
    Dialect(
        name="repvgg",
        family="repvgg",
        exclusive=False,
        description="RepVGG / YOLOv6 RepVGGBlock: rbr_dense, rbr_1x1 (.conv + .bn), "
        "rbr_identity (BN); fused: rbr_reparam",
        anchor=TORCH_PREFIX + r"rbr_dense\.conv\.weight",
        square=conv_bn("rbr_dense"),
        branches=(conv_bn("rbr_1x1", optional=True), bn_only("rbr_identity")),
        fused_weight="{p}rbr_reparam.weight",
        fused_bias="{p}rbr_reparam.bias",
        label="{p}",
    ),
)
