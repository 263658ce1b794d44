"""How checkpoints in the wild name the parts of an asymmetric convolution block.

A :class:`Dialect` is data: one regular expression that finds a block's
square kernel (its named groups become template fields), templates for the
keys of every other part, and templates for the fused conv on output.
:func:`find_blocks` tries every dialect and reports the blocks found, each
as a :class:`BlockSpec` naming the keys it consumes.

The 1-D branches are told apart by kernel shape, not by name: some ports swap
what "ver" and "hor" mean. Shape checks live in :mod:`acnet_convert.blocks`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from acnet_convert.errors import UnfusableBlockError, UsageError

__all__ = [
    "BUILTIN_DIALECTS",
    "BNNames",
    "BlockSpec",
    "BranchNames",
    "BranchSpec",
    "BNSpec",
    "Detection",
    "Dialect",
    "find_blocks",
    "get_dialect",
]


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
    """Templates for one branch: its conv weight, optional conv bias, and its BN."""

    weight: str
    bias: str | None
    bn: BNNames


@dataclass(frozen=True)
class Dialect:
    """One naming scheme for training-time blocks, and for their fused form.

    ``anchor`` is matched against whole keys and finds square kernels; its
    named groups fill the ``{field}`` slots of every template. ``derived``
    computes extra fields: ``(name, source field, ((regex, replacement), ...))``,
    the first regex that matches the source wins (e.g. PaddleClas names the BN
    of conv ``res2a_branch2b`` ``bn2a_branch2b``). ``label`` says how a block
    is shown to people. Kernels are stored ``OIHW`` (PyTorch, Paddle) or
    ``HWIO`` (Keras).
    """

    name: str
    description: str
    anchor: str
    square: BranchNames
    branches: tuple[BranchNames, BranchNames]
    fused_weight: str
    fused_bias: str
    label: str
    last_bn: BNNames | None = None
    derived: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = ()
    kernel_layout: str = "OIHW"
    default_eps: float = 1e-5

    def fields_for(self, key: str) -> dict[str, str] | None:
        """Template fields when ``key`` is a square kernel of this dialect, else None."""
        match = re.fullmatch(self.anchor, key)
        if match is None:
            return None
        fields = {k: (v or "") for k, v in match.groupdict().items()}
        for name, source, rules in self.derived:
            value = fields[source]
            for pattern, replacement in rules:
                derived_match = re.fullmatch(pattern, value)
                if derived_match:
                    fields[name] = derived_match.expand(replacement)
                    break
            else:
                fields[name] = value
        return fields


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
    """Actual keys of one branch; ``bn`` is None for a branch with no BN."""

    weight: str
    bias: str | None
    bn: BNSpec | None

    def keys(self) -> tuple[str, ...]:
        own = tuple(k for k in (self.weight, self.bias) if k)
        return own + (self.bn.keys() if self.bn else ())


@dataclass(frozen=True)
class BlockSpec:
    """One block found in a checkpoint: which keys hold which part.

    ``branches`` are the two 1-D branches in the order the dialect names them
    (their roles are settled by shape later); ``fused_weight``/``fused_bias``
    are the keys the deploy layout writes; ``fields`` are the template fields,
    for other layouts.
    """

    label: str
    dialect: str
    square: BranchSpec
    branches: tuple[BranchSpec, BranchSpec]
    last_bn: BNSpec | None
    fused_weight: str
    fused_bias: str
    fields: Mapping[str, str]

    def keys(self) -> tuple[str, ...]:
        """Every key the block consumes."""
        out = self.square.keys() + self.branches[0].keys() + self.branches[1].keys()
        return out + (self.last_bn.keys() if self.last_bn else ())


def _bn(stem: str, sep: str = ".", style: str = "torch") -> BNNames:
    if style == "paddle":
        return BNNames(f"{stem}_scale", f"{stem}_offset", f"{stem}_mean", f"{stem}_variance")
    if style == "keras":
        return BNNames(f"{stem}/gamma:0", f"{stem}/beta:0", f"{stem}/moving_mean:0", f"{stem}/moving_variance:0")
    return BNNames(
        f"{stem}{sep}weight",
        f"{stem}{sep}bias",
        f"{stem}{sep}running_mean",
        f"{stem}{sep}running_var",
        f"{stem}{sep}num_batches_tracked",
    )


def _torch_branch(conv: str, bn: str) -> BranchNames:
    return BranchNames(f"{{p}}{conv}.weight", f"{{p}}{conv}.bias", _bn(f"{{p}}{bn}"))


# ``p`` includes its trailing dot, so a block at the top level has p == "".
_TORCH_PREFIX = r"(?P<p>(?:.+\.)?)"

BUILTIN_DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        name="acnet",
        description="upstream ACNet (acnet/acb.py): square_conv/hor_conv/ver_conv + *_bn, optional last_bn",
        anchor=_TORCH_PREFIX + r"square_conv\.weight",
        square=_torch_branch("square_conv", "square_bn"),
        branches=(_torch_branch("hor_conv", "hor_bn"), _torch_branch("ver_conv", "ver_bn")),
        last_bn=_bn("{p}last_bn"),
        fused_weight="{p}fused_conv.weight",
        fused_bias="{p}fused_conv.bias",
        label="{p}",
    ),
    Dialect(
        name="acnet-2019",
        description="upstream ACNet of 2019: square_layer/square_BN, horizontal_*, vertical_*",
        anchor=_TORCH_PREFIX + r"square_layer\.weight",
        square=_torch_branch("square_layer", "square_BN"),
        branches=(
            _torch_branch("horizontal_layer", "horizontal_BN"),
            _torch_branch("vertical_layer", "vertical_BN"),
        ),
        fused_weight="{p}fused_conv.weight",
        fused_bias="{p}fused_conv.bias",
        label="{p}",
    ),
    Dialect(
        name="mmcv",
        description="mmcv-style ports: conv_kxk/conv_1xk/conv_kx1, each with .conv and .bn",
        anchor=_TORCH_PREFIX + r"conv_kxk\.conv\.weight",
        square=BranchNames("{p}conv_kxk.conv.weight", "{p}conv_kxk.conv.bias", _bn("{p}conv_kxk.bn")),
        branches=(
            BranchNames("{p}conv_1xk.conv.weight", "{p}conv_1xk.conv.bias", _bn("{p}conv_1xk.bn")),
            BranchNames("{p}conv_kx1.conv.weight", "{p}conv_kx1.conv.bias", _bn("{p}conv_kx1.bn")),
        ),
        fused_weight="{p}fused_conv.weight",
        fused_bias="{p}fused_conv.bias",
        label="{p}",
    ),
    Dialect(
        name="paddle",
        description="PaddleClas ACNet: <n>_acsquare_weights, BN bn<...>_acsquare_{scale,offset,mean,variance}",
        anchor=r"(?P<n>.+)_acsquare_weights",
        derived=(("b", "n", ((r"res(.*)", r"bn\1"), (r"(.*)", r"bn_\1"))),),
        square=BranchNames("{n}_acsquare_weights", None, _bn("{b}_acsquare", style="paddle")),
        branches=(
            BranchNames("{n}_achor_weights", None, _bn("{b}_achor", style="paddle")),
            BranchNames("{n}_acver_weights", None, _bn("{b}_acver", style="paddle")),
        ),
        fused_weight="{n}_acsquare_weights",
        fused_bias="{n}_acsquare_bias",
        label="{n}",
    ),
    Dialect(
        name="keras",
        description="Keras ports: layers <n>_sqr, <n>_hor, <n>_ver and <layer>_bn, HWIO kernels, eps 1e-3",
        anchor=r"(?P<n>[^/]+)_sqr/(?P=n)_sqr/kernel:0",
        square=BranchNames("{n}_sqr/{n}_sqr/kernel:0", "{n}_sqr/{n}_sqr/bias:0", _bn("{n}_sqr_bn/{n}_sqr_bn", style="keras")),
        branches=(
            BranchNames("{n}_hor/{n}_hor/kernel:0", "{n}_hor/{n}_hor/bias:0", _bn("{n}_hor_bn/{n}_hor_bn", style="keras")),
            BranchNames("{n}_ver/{n}_ver/kernel:0", "{n}_ver/{n}_ver/bias:0", _bn("{n}_ver_bn/{n}_ver_bn", style="keras")),
        ),
        fused_weight="{n}/{n}/kernel:0",
        fused_bias="{n}/{n}/bias:0",
        label="{n}",
        kernel_layout="HWIO",
        default_eps=1e-3,
    ),
)


def get_dialect(name: str, extra: Sequence[Dialect] = ()) -> Dialect:
    """The built-in (or user-defined) dialect called ``name``."""
    for d in (*extra, *BUILTIN_DIALECTS):
        if d.name == name:
            return d
    known = ", ".join(d.name for d in (*extra, *BUILTIN_DIALECTS))
    raise UsageError(f"unknown dialect '{name}'; known dialects: {known}")


@dataclass(frozen=True)
class Detection:
    """The dialect that explains a checkpoint and the blocks it found there."""

    dialect: Dialect | None
    blocks: tuple[BlockSpec, ...]


def _resolve_bn(names: BNNames, fields: Mapping[str, str], keys: Mapping[str, object]) -> BNSpec | None:
    def fill(t: str | None) -> str | None:
        if t is None:
            return None
        k = t.format(**fields)
        return k if k in keys else None

    weight, bias, mean, var = (fill(t) for t in (names.weight, names.bias, names.mean, names.var))
    count = fill(names.count)
    if not any((weight, bias, mean, var)):
        return None
    return BNSpec(
        mean=mean or names.mean.format(**fields),
        var=var or names.var.format(**fields),
        weight=weight if weight else (names.weight.format(**fields) if bias else None),
        bias=bias if bias else (names.bias.format(**fields) if weight else None),
        count=count,
    )


def _resolve_branch(names: BranchNames, fields: Mapping[str, str], keys: Mapping[str, object]) -> BranchSpec:
    bias = names.bias.format(**fields) if names.bias else None
    return BranchSpec(
        weight=names.weight.format(**fields),
        bias=bias if bias in keys else None,
        bn=_resolve_bn(names.bn, fields, keys),
    )


def _blocks_of(dialect: Dialect, keys: Mapping[str, object]) -> list[BlockSpec]:
    found: list[BlockSpec] = []
    for key in keys:
        fields = dialect.fields_for(key)
        if fields is None:
            continue
        last_bn = _resolve_bn(dialect.last_bn, fields, keys) if dialect.last_bn else None
        found.append(
            BlockSpec(
                label=dialect.label.format(**fields).rstrip("./") or "<top level>",
                dialect=dialect.name,
                square=_resolve_branch(dialect.square, fields, keys),
                branches=(
                    _resolve_branch(dialect.branches[0], fields, keys),
                    _resolve_branch(dialect.branches[1], fields, keys),
                ),
                last_bn=last_bn,
                fused_weight=dialect.fused_weight.format(**fields),
                fused_bias=dialect.fused_bias.format(**fields),
                fields=fields,
            )
        )
    return found


def find_blocks(
    keys: Mapping[str, object] | Iterable[str],
    dialect: str | None = None,
    extra: Sequence[Dialect] = (),
) -> Detection:
    """Find every block in a checkpoint's keys.

    Args:
        keys: the checkpoint's keys (a mapping's values are ignored).
        dialect: force this dialect instead of trying all.
        extra: user-defined dialects, tried before the built-in ones.

    Returns:
        The dialect that explains the checkpoint and its blocks, in file
        order; ``Detection(None, ())`` when no dialect finds a block.

    Raises:
        UnfusableBlockError: more than one dialect finds blocks.

    >>> find_blocks(["a.square_conv.weight", "a.hor_conv.weight", "a.ver_conv.weight"]).blocks[0].label
    'a'
    """
    key_map: Mapping[str, object] = keys if isinstance(keys, Mapping) else dict.fromkeys(keys)
    candidates = [get_dialect(dialect, extra)] if dialect else [*extra, *BUILTIN_DIALECTS]
    found = [(d, b) for d in candidates if (b := _blocks_of(d, key_map))]
    if not found:
        return Detection(None, ())
    if len(found) > 1:
        listing = "; ".join(f"'{d.name}' ({len(b)} blocks, e.g. '{b[0].label}')" for d, b in found)
        raise UnfusableBlockError(
            f"the keys fit more than one naming dialect: {listing}; choose one with --dialect"
        )
    d, blocks = found[0]
    return Detection(d, tuple(blocks))
