"""The data a family of checkpoints is described by: key templates, and the keys they find.

A :class:`Dialect` names one family's training-time blocks: an ``anchor``
regex that finds a block's primary kernel (its named groups become template
fields), templates for every other branch, and the deploy names of the fused
conv. A branch has a *kind* (see :mod:`acnet_convert.kinds`): ``conv`` (a
conv with optional bias and BN; any kernel that fits centred in the target,
dilated or not), ``identity`` (a BN alone), ``avg`` (optional 1x1 conv and
padding BN, an average pool over the target kernel, its BN) and ``seq``
(1x1 conv, padding BN, kxk conv, BN). Templates are resolved against a
checkpoint's keys into a :class:`BlockSpec` naming the keys it consumes.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BRANCH_KINDS",
    "BNNames",
    "BNSpec",
    "BlockSpec",
    "BranchNames",
    "BranchSpec",
    "Dialect",
    "bn_names",
    "template_fields",
]

BRANCH_KINDS = ("conv", "identity", "avg", "seq")


@dataclass(frozen=True)
class BNNames:
    """Templates for a BatchNorm's keys; ``count`` is num_batches_tracked, if stored."""

    weight: str
    bias: str
    mean: str
    var: str
    count: str | None = None


@dataclass(frozen=True)
class BranchNames:
    """Templates for one branch.

    ``weight``/``bias``/``bn``: the branch's (last) conv and its BN; ``weight``
    is None for ``identity`` and for a depthwise ``avg`` (no conv). ``pre``:
    the 1x1 conv and padding BN that come first in ``avg`` and ``seq``
    branches. ``implicit_identity``: ``pre``'s effective kernel is its weight
    plus an identity that is not stored (DBB's ``idconv1``). ``optional``:
    the branch may be absent (found by its first key). ``dilation``: the
    conv's dilation (a 2x2 conv with dilation 2 covers a 3x3 kernel's corners).
    ``repeat_from``: the templates hold ``{i}``; the branch repeats for
    i = repeat_from, repeat_from + 1, ... while its weight exists (MobileOne's
    ``rbr_conv.{i}``). ``role`` names the branch in reports.
    """

    weight: str | None
    bias: str | None
    bn: BNNames | None
    kind: str = "conv"
    optional: bool = False
    dilation: int = 1
    pre: BranchNames | None = None
    implicit_identity: bool = False
    repeat_from: int | None = None
    role: str = field(default="", compare=False)


@dataclass(frozen=True)
class Dialect:
    """One naming scheme for training-time blocks, and for their fused form.

    ``anchor`` is matched against whole keys and finds primary kernels; its
    named groups fill the ``{field}`` slots of every template. ``derived``
    computes extra fields: ``(name, source field, ((regex, replacement), ...))``,
    the first regex that fully matches the source wins, and no match keeps
    the source's value (PaddleClas names the BN of conv ``res2a_branch2b``
    ``bn2a_branch2b``). ``label`` says how a block is shown to people.
    ``square`` is the primary branch (its kernel is the target's), ``branches``
    the others (N of them, any kind); ``extra_branches`` optional ones some
    variants add (ACNet's dilated corner branch). ``family`` groups dialects; blocks of
    different families may be mixed in one checkpoint. ``exclusive``
    dialects are alternative namings of one block (ACNet's ports): of a
    family's exclusive dialects only one explains a checkpoint (the others
    may only find aliases); a non-exclusive dialect names a block type of
    its own (timm's RepVggBlock and MobileOneBlock live side by side). ``requires_any``: key templates of which one must
    exist for the anchor to claim a block (mmcv's ``conv_kxk`` also anchors
    timm's blocks). ``validate`` is the family's own geometry rule, called
    with the block's :class:`~acnet_convert.blocks.BlockGeometry`; it returns
    a problem or None. Kernels are stored ``OIHW`` (PyTorch, Paddle) or
    ``HWIO`` (Keras): ``kernel_order`` says which (``kernel_layout`` is its old name;
    "layout" now means only the output key naming, see :data:`acnet_convert.layouts.LAYOUTS`).
    ``default_eps`` is the BN epsilon of the framework the dialect comes from.
    ``deploy_folds_bn``: the family's deploy nets also fold their plain conv+BN
    units into ``conv.{weight,bias}`` (DBB's ``ConvBN``), so ``--fold-bn`` is on
    by default for a file whose blocks are all of such families.

    The generic dialect has no anchor and no branch templates (``None``):
    it finds blocks by kernel shape.
    """

    name: str
    description: str
    anchor: str | None
    fused_weight: str
    fused_bias: str
    label: str
    square: BranchNames | None = None
    branches: tuple[BranchNames, ...] | None = None
    last_bn: BNNames | None = None
    derived: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = ()
    kernel_order: str = "OIHW"
    default_eps: float = 1e-5
    extra_branches: tuple[BranchNames, ...] = ()
    family: str = "acnet"
    exclusive: bool = True
    requires_any: tuple[str, ...] = ()
    deploy_folds_bn: bool = False
    validate: Callable[[Any], str | None] | None = field(default=None, compare=False)

    @property
    def kernel_layout(self) -> str:
        """The old name of :attr:`kernel_order`, kept for callers of 0.1."""
        return self.kernel_order

    def fields_for(self, key: str) -> dict[str, str] | None:
        """Template fields when ``key`` is a primary kernel of this dialect, else None.

        >>> from acnet_convert.dialects import get_dialect
        >>> get_dialect("paddle").fields_for("res2a_branch2b_acsquare_weights")["b"]
        'bn2a_branch2b'
        """
        if self.anchor is None:
            return None
        match = _compiled(self.anchor).fullmatch(key)
        if match is None:
            return None
        fields = {k: (v or "") for k, v in match.groupdict().items()}
        for name, source, rules in self.derived:
            value = fields[source]
            for pattern, replacement in rules:
                derived_match = _compiled(pattern).fullmatch(value)
                if derived_match:
                    fields[name] = derived_match.expand(replacement)
                    break
            else:
                fields[name] = value
        return fields

    def label_for(self, fields: Mapping[str, str]) -> str:
        """A block's label: ``label`` filled from ``fields``, without a trailing separator."""
        return self.label.format(**fields).rstrip("./") or "<top level>"

    def templates(self) -> dict[str, str]:
        """Every key template of the dialect, by where it sits (for validation and messages)."""
        out = {
            "fused_weight": self.fused_weight,
            "fused_bias": self.fused_bias,
            "label": self.label,
        }
        named: list[tuple[str, BranchNames | None]] = [("square", self.square)]
        named += [(f"branches[{i}]", b) for i, b in enumerate(self.branches or ())]
        named += [(f"extra_branches[{i}]", b) for i, b in enumerate(self.extra_branches)]
        for where, branch in named:
            while branch is not None:
                if branch.weight is not None:
                    out[f"{where}.weight"] = branch.weight
                if branch.bias is not None:
                    out[f"{where}.bias"] = branch.bias
                if branch.bn is not None:
                    out.update({f"{where}.bn.{k}": v for k, v in _bn_templates(branch.bn).items()})
                where, branch = f"{where}.pre", branch.pre
        if self.last_bn is not None:
            out.update({f"last_bn.{k}": v for k, v in _bn_templates(self.last_bn).items()})
        return out


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _bn_templates(bn: BNNames) -> dict[str, str]:
    out = {"weight": bn.weight, "bias": bn.bias, "mean": bn.mean, "var": bn.var}
    if bn.count is not None:
        out["count"] = bn.count
    return out


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a template uses.

    Raises:
        ValueError: unbalanced braces, positional ``{}`` fields, or fields
            with attribute/index access, conversions or format specs.

    >>> template_fields("{p}square_conv.weight")
    ['p']
    """
    names: list[str] = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"'{{{name}}}' is not a plain field name like '{{p}}'")
        names.append(name)
    return names


@dataclass(frozen=True)
class BNSpec:
    """Actual keys of one BN in a checkpoint; weight/bias are None when affine=False."""

    mean: str
    var: str
    weight: str | None
    bias: str | None
    count: str | None

    def keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.weight, self.bias, self.mean, self.var, self.count) if k)


@dataclass(frozen=True)
class BranchSpec:
    """Actual keys of one branch; ``bn`` is None for a branch with no BN.

    ``kind``, ``dilation``, ``pre`` and ``implicit_identity`` as in
    :class:`BranchNames`; ``weight`` is None for kinds without a conv.
    """

    weight: str | None
    bias: str | None
    bn: BNSpec | None
    kind: str = "conv"
    dilation: int = 1
    pre: BranchSpec | None = None
    implicit_identity: bool = False
    role: str = field(default="", compare=False)

    def keys(self) -> tuple[str, ...]:
        own = tuple(k for k in (self.weight, self.bias) if k)
        own += self.bn.keys() if self.bn else ()
        return (self.pre.keys() if self.pre else ()) + own

    @property
    def first_key(self) -> str:
        """The key shown for this branch: its conv weight, else its BN's running_var."""
        if self.weight:
            return self.weight
        if self.pre is not None:
            return self.pre.first_key
        return self.bn.var if self.bn else "?"


@dataclass(frozen=True)
class BlockSpec:
    """One block found in a checkpoint: which keys hold which part.

    ``square`` is the primary conv (its kernel is the fused kernel's size),
    ``branches`` the other branches in the order the family names them;
    ``fused_weight``/``fused_bias`` are the keys the deploy layout writes;
    ``fields`` are the template fields, for other layouts.
    """

    label: str
    dialect: str
    square: BranchSpec
    branches: tuple[BranchSpec, ...]
    last_bn: BNSpec | None
    fused_weight: str
    fused_bias: str
    fields: Mapping[str, str]
    family: str = "acnet"

    @property
    def all_branches(self) -> tuple[BranchSpec, ...]:
        """The primary branch, then the others."""
        return (self.square, *self.branches)

    def keys(self) -> tuple[str, ...]:
        """Every key the block consumes."""
        out = self.square.keys() + tuple(k for b in self.branches for k in b.keys())  # noqa: SIM118
        return out + (self.last_bn.keys() if self.last_bn else ())


def bn_names(stem: str, style: str = "torch") -> BNNames:
    """BN key templates under ``stem`` in a framework's style.

    ``torch``: ``<stem>.{weight,bias,running_mean,running_var,num_batches_tracked}``;
    ``paddle``: ``<stem>_{scale,offset,mean,variance}``;
    ``paddle-dygraph``: ``<stem>.{weight,bias,_mean,_variance}``;
    ``keras``: ``<stem>/{gamma,beta,moving_mean,moving_variance}:0``.

    >>> bn_names("{p}square_bn").var
    '{p}square_bn.running_var'
    """
    if style == "paddle":
        return BNNames(f"{stem}_scale", f"{stem}_offset", f"{stem}_mean", f"{stem}_variance")
    if style == "paddle-dygraph":
        return BNNames(f"{stem}.weight", f"{stem}.bias", f"{stem}._mean", f"{stem}._variance")
    if style == "keras":
        return BNNames(
            f"{stem}/gamma:0",
            f"{stem}/beta:0",
            f"{stem}/moving_mean:0",
            f"{stem}/moving_variance:0",
        )
    if style != "torch":
        raise ValueError(f"unknown BN style '{style}'")
    return BNNames(
        f"{stem}.weight",
        f"{stem}.bias",
        f"{stem}.running_mean",
        f"{stem}.running_var",
        f"{stem}.num_batches_tracked",
    )
