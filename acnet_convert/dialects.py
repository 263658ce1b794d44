"""How checkpoints in the wild name the parts of an asymmetric convolution block.

A :class:`Dialect` is data: one regular expression that finds a block's
square kernel (its named groups become template fields), templates for the
keys of every other part, and templates for the fused conv on output.
:func:`find_blocks` tries every dialect and reports the blocks found, each
as a :class:`BlockSpec` naming the keys it consumes. The same dataclass is
what a user's ``--patterns`` TOML file becomes (:mod:`acnet_convert.patterns`).

Which dialect is used:

1. ``--dialect NAME`` forces one.
2. Otherwise every named dialect (the user's first, then the built-in ones)
   is tried; the one that finds blocks is used. When several do, the
   checkpoint is ambiguous and :func:`find_blocks` raises, listing them,
   unless the extra ones only find aliases (rule 4).
3. Only when no named dialect finds a block is ``generic`` tried: three
   sibling convs told apart by kernel shape (see :func:`_generic_blocks`).
4. Aliases. Some models register one module under two names, or expose a
   second naming of the same tensors (an mmcv-style port that also offers
   upstream's ``square_conv``). Block B is an *alias* of block A when they
   share no key and every part of B (conv weights and biases, every BN
   tensor) is bit-identical to the same part of A: same dtype, shape and
   bytes. A is the first of them in file order; it is fused once.
   An alias found by the *same* dialect is a module registered twice: its
   output names get copies of A's fused tensors, so the deploy model (which
   registers it twice too) loads with ``strict=True``. An alias found by
   *another* dialect is a second naming of A: its keys are dropped. Keys
   outside every block always pass through, even when one equals a fused
   tensor: equal values alone cannot tell an alias from, say, two BNs that
   were never trained.

The 1-D branches are told apart by kernel shape, not by name: some ports swap
what "ver" and "hor" mean. Shape checks live in :mod:`acnet_convert.blocks`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from acnet_convert.errors import UnfusableBlockError, UsageError

__all__ = [
    "BUILTIN_DIALECTS",
    "GENERIC",
    "Alias",
    "BNNames",
    "BNSpec",
    "BlockSpec",
    "BranchNames",
    "BranchSpec",
    "Detection",
    "Dialect",
    "bn_names",
    "find_blocks",
    "get_dialect",
    "template_fields",
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
    the first regex that fully matches the source wins, and no match keeps
    the source's value (PaddleClas names the BN of conv ``res2a_branch2b``
    ``bn2a_branch2b``). ``label`` says how a block is shown to people.
    Kernels are stored ``OIHW`` (PyTorch, Paddle) or ``HWIO`` (Keras).
    ``default_eps`` is the BN epsilon of the framework the dialect comes from.

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
    branches: tuple[BranchNames, BranchNames] | None = None
    last_bn: BNNames | None = None
    derived: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = ()
    kernel_layout: str = "OIHW"
    default_eps: float = 1e-5

    def fields_for(self, key: str) -> dict[str, str] | None:
        """Template fields when ``key`` is a square kernel of this dialect, else None.

        >>> get_dialect("paddle").fields_for("res2a_branch2b_acsquare_weights")["b"]
        'bn2a_branch2b'
        """
        if self.anchor is None:
            return None
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

    def templates(self) -> dict[str, str]:
        """Every key template of the dialect, by where it sits (for validation and messages)."""
        out = {
            "fused_weight": self.fused_weight,
            "fused_bias": self.fused_bias,
            "label": self.label,
        }
        named = [("square", self.square)]
        if self.branches is not None:
            named += [("branches[0]", self.branches[0]), ("branches[1]", self.branches[1])]
        for where, branch in named:
            if branch is None:
                continue
            out[f"{where}.weight"] = branch.weight
            if branch.bias is not None:
                out[f"{where}.bias"] = branch.bias
            out.update({f"{where}.bn.{k}": v for k, v in _bn_templates(branch.bn).items()})
        if self.last_bn is not None:
            out.update({f"last_bn.{k}": v for k, v in _bn_templates(self.last_bn).items()})
        return out


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
    import string

    names: list[str] = []
    for _literal, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"'{{{field}}}' is not a plain field name like '{{p}}'")
        names.append(field)
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


def bn_names(stem: str, style: str = "torch") -> BNNames:
    """BN key templates under ``stem`` in a framework's style.

    ``torch``: ``<stem>.{weight,bias,running_mean,running_var,num_batches_tracked}``;
    ``paddle``: ``<stem>_{scale,offset,mean,variance}``;
    ``keras``: ``<stem>/{gamma,beta,moving_mean,moving_variance}:0``.

    >>> bn_names("{p}square_bn").var
    '{p}square_bn.running_var'
    """
    if style == "paddle":
        return BNNames(f"{stem}_scale", f"{stem}_offset", f"{stem}_mean", f"{stem}_variance")
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


def _torch_branch(conv: str, bn: str) -> BranchNames:
    return BranchNames(f"{{p}}{conv}.weight", f"{{p}}{conv}.bias", bn_names(f"{{p}}{bn}"))


def _keras_branch(layer: str) -> BranchNames:
    # Keras 2 h5: group <layer>, dataset <layer>/<weight>:0 inside it.
    return BranchNames(
        f"{layer}/{layer}/kernel:0",
        f"{layer}/{layer}/bias:0",
        bn_names(f"{layer}_bn/{layer}_bn", style="keras"),
    )


# ``p`` includes its trailing dot, so a block at the top level has p == "".
_TORCH_PREFIX = r"(?P<p>(?:.+\.)?)"

GENERIC = Dialect(
    name="generic",
    description="any port: a kxk, a 1xk and a kx1 conv under one parent, told apart by shape "
    "(tried last, only when no named dialect matches)",
    anchor=None,
    fused_weight="{p}fused_conv.weight",
    fused_bias="{p}fused_conv.bias",
    label="{p}",
)

BUILTIN_DIALECTS: tuple[Dialect, ...] = (
    Dialect(
        name="acnet",
        description="upstream ACNet (acnet/acb.py): square_conv/hor_conv/ver_conv + *_bn, "
        "optional last_bn (legacy: 1x3/3x1 on any square)",
        anchor=_TORCH_PREFIX + r"square_conv\.weight",
        square=_torch_branch("square_conv", "square_bn"),
        branches=(_torch_branch("hor_conv", "hor_bn"), _torch_branch("ver_conv", "ver_bn")),
        last_bn=bn_names("{p}last_bn"),
        fused_weight="{p}fused_conv.weight",
        fused_bias="{p}fused_conv.bias",
        label="{p}",
    ),
    Dialect(
        name="acnet-2019",
        description="upstream ACNet of 2019 (acnet_builder.py): square_layer/square_BN, "
        "horizontal_layer/horizontal_BN (1x3), vertical_layer/vertical_BN (3x1)",
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
        description="mmcv-style ports: conv_kxk/conv_1xk/conv_kx1, "
        "each a ConvModule with .conv and .bn",
        anchor=_TORCH_PREFIX + r"conv_kxk\.conv\.weight",
        square=BranchNames(
            "{p}conv_kxk.conv.weight", "{p}conv_kxk.conv.bias", bn_names("{p}conv_kxk.bn")
        ),
        branches=(
            BranchNames(
                "{p}conv_1xk.conv.weight", "{p}conv_1xk.conv.bias", bn_names("{p}conv_1xk.bn")
            ),
            BranchNames(
                "{p}conv_kx1.conv.weight", "{p}conv_kx1.conv.bias", bn_names("{p}conv_kx1.bn")
            ),
        ),
        fused_weight="{p}fused_conv.weight",
        fused_bias="{p}fused_conv.bias",
        label="{p}",
    ),
    Dialect(
        name="paddle",
        description="PaddleClas ResNet_ACNet: <n>_acsquare/_achor/_acver_weights, BN "
        "bn<n[3:]>_acsquare_{scale,offset,mean,variance} (bn_conv1_... for conv1); "
        "fused: <n>_acsquare_weights + <n>_acsquare_bias",
        anchor=r"(?P<n>.+)_acsquare_weights",
        # PaddleClas' ResNet_ACNet: bn_name = "bn_" + name if name == "conv1" else "bn" + name[3:]
        derived=(("b", "n", ((r"conv1", r"bn_conv1"), (r"...(.+)", r"bn\1"))),),
        # A fluid conv2d named '<n>.acsquare.conv2d.output.1' without bias_attr=False gets an
        # auto-named bias: folded like any conv bias when present.
        square=BranchNames(
            "{n}_acsquare_weights",
            "{n}.acsquare.conv2d.output.1.b_0",
            bn_names("{b}_acsquare", style="paddle"),
        ),
        branches=(
            BranchNames("{n}_achor_weights", None, bn_names("{b}_achor", style="paddle")),
            BranchNames("{n}_acver_weights", None, bn_names("{b}_acver", style="paddle")),
        ),
        fused_weight="{n}_acsquare_weights",
        fused_bias="{n}_acsquare_bias",
        label="{n}",
    ),
    Dialect(
        name="keras",
        description="Keras 2 .h5 ports: layers <n>_sqr, <n>_hor, <n>_ver and <layer>_bn, "
        "HWIO kernels, "
        "BN eps 1e-3; fused: layer <n> with kernel:0 and bias:0",
        anchor=r"(?P<n>[^/]+)_sqr/(?P=n)_sqr/kernel:0",
        square=_keras_branch("{n}_sqr"),
        branches=(_keras_branch("{n}_hor"), _keras_branch("{n}_ver")),
        fused_weight="{n}/{n}/kernel:0",
        fused_bias="{n}/{n}/bias:0",
        label="{n}",
        kernel_layout="HWIO",
        default_eps=1e-3,
    ),
)


def get_dialect(name: str, extra: Sequence[Dialect] = ()) -> Dialect:
    """The built-in (or user-defined) dialect called ``name``.

    Raises:
        UsageError: no dialect of that name.
    """
    for d in (*extra, *BUILTIN_DIALECTS, GENERIC):
        if d.name == name:
            return d
    known = ", ".join(d.name for d in (*extra, *BUILTIN_DIALECTS, GENERIC))
    raise UsageError(f"unknown dialect '{name}'; known dialects: {known}")


@dataclass(frozen=True)
class Alias:
    """A block that holds bit-identical copies of ``primary``'s tensors.

    ``copy`` is True for an alias found by the same dialect (a module
    registered twice: its outputs repeat the primary's), False for one
    found by another dialect (a second naming: its keys are dropped).
    """

    block: BlockSpec
    primary: BlockSpec
    copy: bool


@dataclass(frozen=True)
class Detection:
    """The dialect that explains a checkpoint, the blocks it found there and their aliases.

    ``blocks`` holds every block to fuse or copy, in file order (an alias
    with ``copy`` comes after its primary); ``aliases`` names the aliases,
    those to drop included.
    """

    dialect: Dialect | None
    blocks: tuple[BlockSpec, ...]
    aliases: tuple[Alias, ...] = ()

    def alias_of(self, block: BlockSpec) -> Alias | None:
        """The alias record of ``block``, if it is one."""
        return next((a for a in self.aliases if a.block is block), None)


def _resolve_bn(
    names: BNNames, fields: Mapping[str, str], keys: Mapping[str, object]
) -> BNSpec | None:
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


def _resolve_branch(
    names: BranchNames, fields: Mapping[str, str], keys: Mapping[str, object]
) -> BranchSpec:
    bias = names.bias.format(**fields) if names.bias else None
    return BranchSpec(
        weight=names.weight.format(**fields),
        bias=bias if bias in keys else None,
        bn=_resolve_bn(names.bn, fields, keys),
    )


def _label(dialect: Dialect, fields: Mapping[str, str]) -> str:
    return dialect.label.format(**fields).rstrip("./") or "<top level>"


def _blocks_of(dialect: Dialect, keys: Mapping[str, object]) -> list[BlockSpec]:
    if dialect.anchor is None:
        return _generic_blocks(dialect, keys)
    if dialect.square is None or dialect.branches is None:
        raise ValueError(f"dialect '{dialect.name}' has an anchor but no branch templates")
    found: list[BlockSpec] = []
    for key in keys:
        fields = dialect.fields_for(key)
        if fields is None:
            continue
        last_bn = _resolve_bn(dialect.last_bn, fields, keys) if dialect.last_bn else None
        found.append(
            BlockSpec(
                label=_label(dialect, fields),
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


@dataclass(frozen=True)
class _Conv:
    key: str
    parent: str
    shape: tuple[int, int, int, int]
    bias: str | None
    bn: BNSpec | None


def _generic_bn_stems(module: str) -> tuple[str, list[str]]:
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


def _generic_bn(stems: Sequence[str], channels: int, keys: Mapping[str, object]) -> BNSpec | None:
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


def _generic_blocks(dialect: Dialect, keys: Mapping[str, object]) -> list[BlockSpec]:
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
      1 < k' <= k). Any other mix (two squares, a lone 1xk) is no block.

    The fused conv is written as ``<parent>.fused_conv.{weight,bias}``.
    Keys without shapes (a plain list of names) find nothing.
    """
    convs: dict[tuple[str, int, int], list[_Conv]] = {}
    for key, info in keys.items():
        shape = getattr(info, "shape", None)
        if not key.endswith(".weight") or shape is None or len(shape) != 4:
            continue
        module = key[: -len(".weight")]
        branch, stems = _generic_bn_stems(module)
        parent = branch.rpartition(".")[0]
        bias = f"{module}.bias"
        conv = _Conv(
            key=key,
            parent=parent,
            shape=(int(shape[0]), int(shape[1]), int(shape[2]), int(shape[3])),
            bias=bias if bias in keys else None,
            bn=_generic_bn(stems, int(shape[0]), keys),
        )
        convs.setdefault((parent, conv.shape[0], conv.shape[1]), []).append(conv)
    found: list[tuple[int, BlockSpec]] = []
    order = {key: i for i, key in enumerate(keys)}
    for (parent, _, _), group in convs.items():
        squares = [c for c in group if c.shape[2] == c.shape[3] >= 3 and c.shape[2] % 2 == 1]
        rows = [c for c in group if c.shape[2] == 1 and c.shape[3] > 1]
        cols = [c for c in group if c.shape[3] == 1 and c.shape[2] > 1]
        if not (len(squares) == len(rows) == len(cols) == 1):
            continue
        square, row, col = squares[0], rows[0], cols[0]
        k = square.shape[2]
        if any(n % 2 == 0 or n > k for n in (row.shape[3], col.shape[2])):
            continue
        fields = {"p": f"{parent}." if parent else ""}
        spec = BlockSpec(
            label=_label(dialect, fields),
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


SameTensor = Callable[[str, str], bool]


def _parts(spec: BlockSpec, swap: bool) -> list[str | None]:
    """A block's keys, part by part; the small BN vectors first, so non-aliases differ cheaply."""

    def bn(b: BNSpec | None) -> list[str | None]:
        return [None] * 5 if b is None else [b.var, b.mean, b.weight, b.bias, b.count]

    first, second = spec.branches[::-1] if swap else spec.branches
    branches = (spec.square, first, second)
    return [
        *(k for b in branches for k in bn(b.bn)),
        *bn(spec.last_bn),
        *(k for b in branches for k in (b.bias, b.weight)),
    ]


def _is_alias(block: BlockSpec, primary: BlockSpec, same: SameTensor) -> bool:
    """Do the two blocks hold bit-identical tensors in every part, under disjoint keys?"""
    if set(block.keys()) & set(primary.keys()):
        return False
    want = _parts(primary, swap=False)
    for swap in (False, True):
        got = _parts(block, swap)
        if [g is None for g in got] != [w is None for w in want]:
            continue
        if all(g is None or w is None or same(g, w) for g, w in zip(got, want, strict=True)):
            return True
    return False


def _with_aliases(
    dialect: Dialect,
    blocks: list[BlockSpec],
    others: Sequence[tuple[Dialect, list[BlockSpec]]],
    same: SameTensor | None,
) -> Detection | None:
    """``dialect``'s blocks with their aliases settled; None when ``others`` are not all aliases."""
    primaries: list[BlockSpec] = []
    aliases: list[Alias] = []
    for block in blocks:
        primary = next((p for p in primaries if same and _is_alias(block, p, same)), None)
        if primary is None:
            primaries.append(block)
        else:
            aliases.append(Alias(block, primary, copy=True))
    for _, other_blocks in others:
        for block in other_blocks:
            primary = next((p for p in primaries if same and _is_alias(block, p, same)), None)
            if primary is None:
                return None
            aliases.append(Alias(block, primary, copy=False))
    return Detection(dialect, tuple(blocks), tuple(aliases))


def find_blocks(
    keys: Mapping[str, object] | Iterable[str],
    dialect: str | None = None,
    extra: Sequence[Dialect] = (),
    same: SameTensor | None = None,
) -> Detection:
    """Find every block in a checkpoint's keys.

    Args:
        keys: the checkpoint's keys; a mapping's values, when they have a
            ``shape`` (:class:`~acnet_convert.checkpoint.TensorInfo`), let
            the generic dialect work.
        dialect: force this dialect instead of trying all.
        extra: user-defined dialects, tried before the built-in ones.
        same: ``same(key_a, key_b)`` tells whether two keys hold bit-identical
            tensors; without it no aliases are detected.

    Returns:
        The dialect that explains the checkpoint, its blocks in file order
        and their aliases; ``Detection(None, ())`` when no dialect finds a
        block.

    Raises:
        UsageError: ``dialect`` names no known dialect.
        UnfusableBlockError: more than one dialect finds blocks, and not
            as aliases of one another.

    >>> keys = ["a.square_conv.weight", "a.hor_conv.weight", "a.ver_conv.weight"]
    >>> find_blocks(keys).blocks[0].label
    'a'
    """
    key_map: Mapping[str, Any] = keys if isinstance(keys, Mapping) else dict.fromkeys(keys)
    if dialect:
        forced = get_dialect(dialect, extra)
        return _with_aliases(forced, _blocks_of(forced, key_map), (), same) or Detection(forced, ())
    found = [(d, b) for d in (*extra, *BUILTIN_DIALECTS) if (b := _blocks_of(d, key_map))]
    if not found:
        generic = _blocks_of(GENERIC, key_map)
        if not generic:
            return Detection(None, ())
        found = [(GENERIC, generic)]
    for index, (d, blocks) in enumerate(found):
        detection = _with_aliases(d, blocks, found[:index] + found[index + 1 :], same)
        if detection is not None:
            return detection
    listing = "; ".join(
        f"'{d.name}' ({len(b)} block{'s' if len(b) > 1 else ''}, e.g. '{b[0].label}')"
        for d, b in found
    )
    raise UnfusableBlockError(
        f"the keys fit more than one naming dialect: {listing}; choose one with --dialect"
    )
