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

from acnet_convert.naming import BlockSpec, BNSpec, BranchSpec, Dialect, bn_names

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


def _bn_of(module: str) -> str | None:
    head, _, last = module.rpartition(".")
    if head and last == "conv":
        return f"{head}.bn"
    if head and last.isdigit():
        return f"{head}.{int(last) + 1}"
    return None


def fold_units(infos: Mapping[str, object], taken: Collection[str]) -> list[BlockSpec]:
    """Every conv+BN unit among the keys not in ``taken``, as a one-branch block."""
    found: list[BlockSpec] = []
    for key, info in infos.items():
        shape: tuple[int, ...] = tuple(getattr(info, "shape", ()))
        if key in taken or not key.endswith(".weight") or len(shape) != 4:
            continue
        module = key[: -len(".weight")]
        stem = _bn_of(module)
        if stem is None:
            continue
        names = bn_names(stem)
        keys = (names.weight, names.bias, names.mean, names.var)
        if names.mean not in infos or names.var not in infos or any(k in taken for k in keys):
            continue
        if getattr(infos[names.mean], "shape", None) != (shape[0],):
            continue
        bias = f"{module}.bias"
        bn = BNSpec(
            mean=names.mean,
            var=names.var,
            weight=names.weight if names.weight in infos else None,
            bias=names.bias if names.bias in infos else None,
            count=names.count if names.count and names.count in infos else None,
        )
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
