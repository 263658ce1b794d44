"""``--fold-bn``: a plain conv followed by its own BN becomes one conv with a bias.

Not a family of the registry (it is off by default): with ``--fold-bn`` every
conv that no block consumed and that has its BN in one of the two structural
spellings below folds into ``<m>.weight`` + ``<m>.bias`` (what DBB's
``ConvBN.switch_to_deploy`` and YOLO's ``Conv.fuse()`` write):

* ``<b>.conv.weight`` with ``<b>.bn.*`` (DBB's ConvBN, YOLO's Conv, RepLKNet's conv_bn);
* ``<b>.<i>.weight`` with ``<b>.<i+1>.*`` (``nn.Sequential(conv, bn)``).

Name-based guesses (``conv1`` -> ``bn1``) are not used: in a pre-activation
net ``bn1`` comes before ``conv1``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from acnet_convert.generic import bn_at, branch_bn_stems
from acnet_convert.naming import BlockSpec, BranchSpec, Dialect

__all__ = ["FOLD_BN", "fold_units"]

FOLD_BN = Dialect(
    name="conv-bn",
    family="conv-bn",
    exclusive=False,
    description="--fold-bn: a conv followed by its own BN (<b>.conv + <b>.bn, <b>.<i> + <b>.<i+1>)",
    anchor=None,
    fused_weight="{m}.weight",
    fused_bias="{m}.bias",
    label="{m}",
)


def fold_units(infos: Mapping[str, object], taken: Collection[str]) -> list[BlockSpec]:
    """Every conv+BN unit among the keys not in ``taken``, as a one-branch block."""
    found: list[BlockSpec] = []
    for key, info in infos.items():
        shape: tuple[int, ...] = tuple(getattr(info, "shape", ()))
        if key in taken or not key.endswith(".weight") or len(shape) != 4:
            continue
        module = key[: -len(".weight")]
        branch, stems = branch_bn_stems(module)
        if branch == module:  # neither <b>.conv nor <b>.<i>: no structural BN spelling
            continue
        bn = bn_at(stems[:1], shape[0], infos)  # <b>.bn, or <b>.<i+1>
        if bn is None or any(k in taken for k in bn.keys()):  # noqa: SIM118 - a method
            continue
        bias = f"{module}.bias"
        found.append(
            BlockSpec(
                label=module,
                dialect=FOLD_BN.name,
                square=BranchSpec(key, bias if bias in infos else None, bn, role="conv"),
                branches=(),
                last_bn=None,
                fused_weight=key,
                fused_bias=bias,
                fields={"m": module},
                family=FOLD_BN.family,
            )
        )
    return found
