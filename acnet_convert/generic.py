"""The generic dialect: ACNet blocks found by kernel shape alone, under any naming.

Tried last, only when no named dialect finds a block (see
:func:`acnet_convert.dialects.find_blocks`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from acnet_convert.errors import UnfusableBlockError
from acnet_convert.families.acnet import acnet_problem
from acnet_convert.naming import BlockSpec, BNSpec, BranchSpec, Dialect, bn_names

__all__ = ["bn_at", "branch_bn_stems", "generic_blocks"]


@dataclass(frozen=True)
class _Conv:
    key: str
    branch: str
    parent: str
    shape: tuple[int, int, int, int]
    bias: str | None
    bn: BNSpec | None


def branch_bn_stems(module: str) -> tuple[str, list[str]]:
    """The branch a conv module belongs to, and where its BN may be (in the order tried)."""
    head, _, last = module.rpartition(".")
    if head and last == "conv":  # ConvModule style: <branch>.conv + <branch>.bn
        return head, [f"{head}.bn", f"{head}.norm"]
    if head and last.isdigit():  # nn.Sequential(conv, bn): <branch>.0 + <branch>.1
        return head, [f"{head}.{int(last) + 1}"]
    parent = f"{head}." if head else ""
    stems = []
    if "conv" in last:  # square_conv -> square_bn, conv_sq -> bn_sq
        i = last.rindex("conv")
        stems.append(f"{parent}{last[:i]}bn{last[i + 4 :]}")
    stems += [f"{module}_bn", f"{parent}bn_{last}"]
    return module, stems


def bn_at(stems: Sequence[str], channels: int, keys: Mapping[str, object]) -> BNSpec | None:
    """The first of ``stems`` holding a ``channels``-wide BN (torch names; running mean and
    var required). A BN with only one of weight and bias keeps the other's name, so the
    missing tensor is reported, never taken as 1 or 0."""
    for stem in stems:
        names = bn_names(stem)
        mean, var = keys.get(names.mean), keys.get(names.var)
        if mean is None or var is None or getattr(mean, "shape", None) != (channels,):
            continue
        weight = names.weight if names.weight in keys else None
        bias = names.bias if names.bias in keys else None
        return BNSpec(
            mean=names.mean,
            var=names.var,
            weight=weight or (names.weight if bias else None),
            bias=bias or (names.bias if weight else None),
            count=names.count if names.count in keys else None,
        )
    return None


def generic_blocks(dialect: Dialect, keys: Mapping[str, object]) -> list[BlockSpec]:
    """Blocks found by kernel shape alone (the ``generic`` dialect).

    The rule:

    * a conv is a 4-D tensor (OIHW) stored as ``<module>.weight``; its bias,
      if any, is ``<module>.bias``.
    * its branch is ``<module>``, or ``<b>`` when ``<module>`` is ``<b>.conv``
      (ConvModule style) or ``<b>.<i>`` (``nn.Sequential(conv, bn)``); the
      branch's parent is the branch path without its last part.
    * its BN (torch names, ``running_mean`` and ``running_var`` required) is
      the first that exists of: ``<b>.bn``, ``<b>.norm`` (ConvModule style);
      ``<b>.<i+1>`` (Sequential style); otherwise, for a conv module
      ``<parent>.<name>``: ``<parent>.<name with its last 'conv' made 'bn'>``,
      ``<parent>.<name>_bn``, ``<parent>.bn_<name>``.
    * under one parent, the convs with the same [O, I] form a block when
      they are exactly one odd kxk (k >= 3), one 1xk' and one k'x1 (k' odd,
      1 < k' <= k): ACNet's own rule,
      :func:`~acnet_convert.families.acnet.acnet_problem`. Any other mix (two
      squares, a lone 1xk) is no block.

    * a parent holding several squares and 1-D convs (sibling triples of a
      network that names them ``conv{i}_1/_2/_3``) is ambiguous: refused,
      never one ``fused_conv`` chosen from several.
    * a branch without an attached BN whose module holds BN-like tensors
      under another naming (Paddle ``_mean``/``_variance``, Keras ``moving_*``)
      is refused, never fused with its BN ignored.

    The fused conv is written as ``<parent>.fused_conv.{weight,bias}``.
    Keys without shapes (a plain list of names) find nothing.

    Raises:
        UnfusableBlockError: an ambiguous parent, or a branch with a BN the rule cannot read.
    """
    convs: dict[tuple[str, int, int], list[_Conv]] = {}
    for key, info in keys.items():
        shape = getattr(info, "shape", None)
        if not key.endswith(".weight") or shape is None or len(shape) != 4:
            continue
        module = key[: -len(".weight")]
        branch, stems = branch_bn_stems(module)
        parent = branch.rpartition(".")[0]
        bias = f"{module}.bias"
        conv = _Conv(
            key=key,
            branch=branch,
            parent=parent,
            shape=(int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3])),
            bias=bias if bias in keys else None,
            bn=bn_at(stems, int(shape[0]), keys),
        )
        convs.setdefault((parent, conv.shape[0], conv.shape[1]), []).append(conv)
    _refuse_ambiguous(convs)
    found: list[tuple[int, BlockSpec]] = []
    order = {key: i for i, key in enumerate(keys)}
    for (parent, _, _), group in convs.items():
        squares, rows, cols = _by_shape(group)
        if not (len(squares) == len(rows) == len(cols) == 1):
            continue
        square, row, col = squares[0], rows[0], cols[0]
        if acnet_problem([(c.key, (c.shape[2], c.shape[3]), 1) for c in (square, row, col)]):
            continue
        _refuse_unattached_bn((square, row, col), keys)
        fields = {"p": f"{parent}." if parent else ""}
        spec = BlockSpec(
            label=dialect.label_for(fields),
            dialect=dialect.name,
            square=BranchSpec(square.key, square.bias, square.bn),
            branches=(BranchSpec(row.key, row.bias, row.bn), BranchSpec(col.key, col.bias, col.bn)),
            last_bn=None,
            fused_weight=dialect.fused_weight.format(**fields),
            fused_bias=dialect.fused_bias.format(**fields),
            fields=fields,
        )
        found.append((order[square.key], spec))
    return [spec for _, spec in sorted(found, key=lambda item: item[0])]


_BN_LIKE = re.compile(
    r".*(running_mean|running_var|_mean|_variance|moving_mean:0|moving_variance:0)$"
)


def _by_shape(convs: Sequence[_Conv]) -> tuple[list[_Conv], list[_Conv], list[_Conv]]:
    """The odd squares of 3 or more, the 1xk and the kx1 among ``convs``."""
    squares = [c for c in convs if c.shape[2] == c.shape[3] >= 3 and c.shape[2] % 2 == 1]
    rows = [c for c in convs if c.shape[2] == 1 and c.shape[3] > 1]
    cols = [c for c in convs if c.shape[3] == 1 and c.shape[2] > 1]
    return squares, rows, cols


def _refuse_ambiguous(convs: Mapping[tuple[str, int, int], list[_Conv]]) -> None:
    by_parent: dict[str, list[_Conv]] = {}
    for (parent, _, _), group in convs.items():
        by_parent.setdefault(parent, []).extend(group)
    for parent, group in by_parent.items():
        squares, rows, cols = _by_shape(group)
        if len(squares) > 1 and rows and cols:
            where = f"'{parent}'" if parent else "the top level"
            raise UnfusableBlockError(
                f"{where} holds {len(squares)} square convs, {len(rows)} 1xk and {len(cols)} kx1 "
                f"side by side (e.g. '{squares[0].key}', '{squares[1].key}'): which of them form "
                "blocks is ambiguous by shape alone; describe them with --patterns"
            )


def _refuse_unattached_bn(branches: Sequence[_Conv], keys: Mapping[str, object]) -> None:
    for conv in branches:
        if conv.bn is not None:
            continue
        inside = [k for k in keys if k.startswith(f"{conv.branch}.") and _BN_LIKE.match(k)]
        if inside:
            raise UnfusableBlockError(
                f"'{conv.key}' (a branch found by shape) has BatchNorm-like tensors beside it that "
                f"the generic rule cannot read (e.g. '{inside[0]}'); fusing without them would be "
                "wrong. Choose a dialect with --family/--dialect (e.g. paddleslim) or --patterns"
            )
