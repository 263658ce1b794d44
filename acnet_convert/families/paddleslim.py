"""PaddleSlim's ACBlock (dygraph): ACNet v1 under PaddleSlim's names.

``square_branch``, ``hor_branch``, ``ver_branch``, each ``.conv`` + ``.bn``
with Paddle dygraph BN names (``weight``, ``bias``, ``_mean``, ``_variance``);
deploy ``fused_branch``. ACNet's geometry rule applies.
"""

from __future__ import annotations

from acnet_convert.families._names import TORCH_PREFIX
from acnet_convert.families.acnet import validate_acnet
from acnet_convert.naming import BranchNames, Dialect, bn_names

__all__ = ["DIALECTS"]

DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        name="paddleslim",
        description="PaddleSlim ACBlock (dygraph): square_branch/hor_branch/ver_branch, each "
        ".conv + .bn with _mean/_variance; fused: fused_branch",
        anchor=TORCH_PREFIX + r"square_branch\.conv\.weight",
        square=BranchNames(
            "{p}square_branch.conv.weight",
            "{p}square_branch.conv.bias",
            bn_names("{p}square_branch.bn", style="paddle-dygraph"),
            role="square_branch",
        ),
        branches=tuple(
            BranchNames(
                f"{{p}}{b}.conv.weight",
                f"{{p}}{b}.conv.bias",
                bn_names(f"{{p}}{b}.bn", style="paddle-dygraph"),
                role=b,
            )
            for b in ("hor_branch", "ver_branch")
        ),
        fused_weight="{p}fused_branch.weight",
        fused_bias="{p}fused_branch.bias",
        label="{p}",
        validate=validate_acnet,
    ),
)
