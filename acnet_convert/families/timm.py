"""timm's ByobNet blocks (huggingface/pytorch-image-models ``timm/models/byobnet.py``).

``RepVggBlock``: ``conv_kxk`` (ConvNormAct: ``.conv`` + ``.bn``), ``conv_1x1``,
``identity`` (a BN alone). ``MobileOneBlock``: ``conv_kxk.{i}`` (N kxk
branches), ``conv_scale`` (1x1), ``identity``. Deploy: ``reparam_conv``.
``conv_kxk.conv.weight`` also anchors mmcv-style ACNet ports: a block with
``conv_1x1``, ``conv_scale`` or ``identity`` and no ``conv_1xk`` is timm's.
"""

from __future__ import annotations

from acnet_convert.families._names import TORCH_PREFIX, bn_only, conv_bn, over_parameterized
from acnet_convert.naming import Dialect

__all__ = ["DIALECTS"]

_MOBILEONE = over_parameterized("conv_kxk", "conv_scale", "identity")
_OWN = ("{p}conv_1x1.conv.weight", "{p}conv_scale.conv.weight", "{p}identity.running_var")

DIALECTS = (
    Dialect(
        name="timm-repvgg",
        family="timm",
        exclusive=False,
        description="timm ByobNet RepVggBlock: conv_kxk, conv_1x1 (.conv + .bn), identity (BN); "
        "fused: reparam_conv",
        anchor=TORCH_PREFIX + r"conv_kxk\.conv\.weight",
        square=conv_bn("conv_kxk"),
        branches=(conv_bn("conv_1x1", optional=True), bn_only("identity")),
        fused_weight="{p}reparam_conv.weight",
        fused_bias="{p}reparam_conv.bias",
        label="{p}",
        requires_any=_OWN,
    ),
    Dialect(
        name="timm-mobileone",
        family="timm",
        exclusive=False,
        description="timm ByobNet MobileOneBlock: conv_kxk.{i}, conv_scale (.conv + .bn), "
        "identity (BN); fused: reparam_conv",
        anchor=_MOBILEONE[0],
        square=_MOBILEONE[1],
        branches=_MOBILEONE[2],
        fused_weight="{p}reparam_conv.weight",
        fused_bias="{p}reparam_conv.bias",
        label="{p}",
    ),
)
