"""RepConv of YOLOv7 (github WongKinYiu/yolov7, ``models/common.py``).

Branches: ``rbr_dense.0`` conv / ``.1`` BN, ``rbr_1x1.0`` / ``.1``, ``rbr_identity``
(a BN alone, when in == out and stride 1). Deploy: ``rbr_reparam``. BN eps 1e-3,
as YOLOv7 builds them.
"""

from __future__ import annotations

from acnet_convert.families._names import TORCH_PREFIX, bn_only, seq_conv_bn
from acnet_convert.naming import Dialect

__all__ = ["DIALECTS"]

DIALECTS = (
    Dialect(
        name="repconv",
        family="repconv",
        exclusive=False,
        description="YOLOv7 RepConv: rbr_dense.0/.1, rbr_1x1.0/.1, rbr_identity (BN); "
        "fused: rbr_reparam",
        anchor=TORCH_PREFIX + r"rbr_dense\.0\.weight",
        square=seq_conv_bn("rbr_dense"),
        branches=(seq_conv_bn("rbr_1x1", optional=True), bn_only("rbr_identity")),
        fused_weight="{p}rbr_reparam.weight",
        fused_bias="{p}rbr_reparam.bias",
        label="{p}",
        default_eps=1e-3,  # YOLOv7 builds its BatchNorm2d with eps=0.001
    ),
)
