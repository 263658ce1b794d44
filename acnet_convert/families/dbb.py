"""DiverseBranchBlock, ACNet v2 (Ding et al., CVPR 2021; github DingXiaoH/DiverseBranchBlock).

Branches, summed: ``dbb_origin`` (kxk conv+BN); ``dbb_1x1`` (1x1 conv+BN,
absent when depthwise); ``dbb_avg`` (``conv`` 1x1 and ``bn`` — a BN that pads
with its own bias, stored nested as ``bn.bn.*`` — then a kxk average pool and
``avgbn``; when depthwise no conv); ``dbb_1x1_kxk`` (``idconv1``, a 1x1 whose
effective kernel is its weight plus an identity that is not stored, or a plain
``conv1``; ``bn1`` (padding BN, nested); ``conv2`` kxk; ``bn2``). Deploy:
``dbb_reparam``; DBB's deploy nets also fold their plain ``ConvBN`` units
(``conv`` + ``bn`` -> ``conv.{weight,bias}``), so those fold by default. Groups follow from shapes (intermediate width / conv2's in-channels).
"""

from __future__ import annotations

from acnet_convert.families._names import TORCH_PREFIX, conv_bn
from acnet_convert.naming import BranchNames, Dialect, bn_names

__all__ = ["DIALECTS"]


def _pre(conv: str, bn: str, *, identity: bool = False) -> BranchNames:
    return BranchNames(
        f"{{p}}{conv}.weight",
        None,
        bn_names(f"{{p}}{bn}"),
        optional=True,
        implicit_identity=identity,
        role=conv.rpartition(".")[2],
    )


_AVG = BranchNames(
    None,
    None,
    bn_names("{p}dbb_avg.avgbn"),
    kind="avg",
    optional=True,
    pre=_pre("dbb_avg.conv", "dbb_avg.bn.bn"),
    role="dbb_avg",
)


def _seq(first: str, identity: bool) -> BranchNames:
    return BranchNames(
        "{p}dbb_1x1_kxk.conv2.weight",
        None,
        bn_names("{p}dbb_1x1_kxk.bn2"),
        kind="seq",
        optional=True,
        pre=_pre(f"dbb_1x1_kxk.{first}", "dbb_1x1_kxk.bn1.bn", identity=identity),
        role="dbb_1x1_kxk",
    )


DIALECTS = (
    Dialect(
        name="dbb",
        family="dbb",
        exclusive=False,
        description="DiverseBranchBlock (ACNet v2): dbb_origin, dbb_1x1, dbb_avg, "
        "dbb_1x1_kxk (idconv1 or conv1, bn1, conv2, bn2); fused: dbb_reparam",
        anchor=TORCH_PREFIX + r"dbb_origin\.conv\.weight",
        square=conv_bn("dbb_origin"),
        branches=(
            conv_bn("dbb_1x1", optional=True),
            _AVG,
            _seq("idconv1", identity=True),
            _seq("conv1", identity=False),
        ),
        fused_weight="{p}dbb_reparam.weight",
        fused_bias="{p}dbb_reparam.bias",
        label="{p}",
        # DEPLOY_FLAG nets build every plain ConvBN unit as one conv with a bias
        deploy_folds_bn=True,
    ),
)
