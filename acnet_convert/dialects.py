"""Finding blocks in a checkpoint's keys: which family and dialect names them, and which keys.

A :class:`~acnet_convert.naming.Dialect` is data (:mod:`acnet_convert.naming`);
the built-in ones come from the family registry (:mod:`acnet_convert.families`).
:func:`find_blocks` tries every dialect and reports the blocks found, each as
a :class:`BlockSpec` naming the keys it consumes.

Which dialects are used:

1. ``--family NAME`` / ``--dialect NAME`` forces one family or dialect.
2. Otherwise every named dialect (the user's first, then the built-in ones)
   is tried. Within one family, the one dialect that finds blocks is used;
   when several do, the checkpoint is ambiguous and :func:`find_blocks`
   raises, listing them, unless the extra ones only find aliases (rule 4).
   Blocks of different families are all used (a mixed checkpoint: an ACNet
   backbone with a RepVGG head).
3. Only when no named dialect finds a block is ``generic`` tried: three
   sibling convs told apart by kernel shape (:mod:`acnet_convert.generic`).
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

Branch roles are settled by shape, not by name: some ports swap what "ver"
and "hor" mean. Shape checks live in :mod:`acnet_convert.blocks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from acnet_convert.errors import UnfusableBlockError, UsageError
from acnet_convert.families import ACNET_DIALECTS, ALL_DIALECTS, FAMILIES, GENERIC, family_title
from acnet_convert.generic import generic_blocks
from acnet_convert.naming import (
    BlockSpec,
    BNNames,
    BNSpec,
    BranchNames,
    BranchSpec,
    Dialect,
    bn_names,
    template_fields,
)

# ACNet v1's dialects (the registry of every family's: ALL_DIALECTS)
BUILTIN_DIALECTS = ACNET_DIALECTS

__all__ = [
    "ALL_DIALECTS",
    "BUILTIN_DIALECTS",
    "FAMILIES",
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
    "incomplete_sequences",
    "template_fields",
]


def get_dialect(name: str, extra: Sequence[Dialect] = ()) -> Dialect:
    """The built-in (or user-defined) dialect called ``name``.

    Raises:
        UsageError: no dialect of that name.
    """
    for d in (*extra, *ALL_DIALECTS, GENERIC):
        if d.name == name:
            return d
    others = [d for d in ALL_DIALECTS if d not in BUILTIN_DIALECTS]
    known = ", ".join(d.name for d in (*extra, *BUILTIN_DIALECTS, GENERIC, *others))
    raise UsageError(
        f"unknown dialect '{name}'; known dialects: {known}; families: {', '.join(FAMILIES)}"
    )


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
    dialects: tuple[Dialect, ...] = ()

    def dialect_of(self, block: BlockSpec) -> Dialect:
        """The dialect that found ``block``."""
        for d in self.dialects:
            if d.name == block.dialect:
                return d
        if self.dialect is None:
            raise ValueError(f"no dialect for block '{block.label}'")
        return self.dialect

    def alias_of(self, block: BlockSpec) -> Alias | None:
        """The alias record of ``block``, if it is one."""
        return next((a for a in self.aliases if a.block is block), None)


def _resolve_bn(
    names: BNNames | None, fields: Mapping[str, str], keys: Mapping[str, object]
) -> BNSpec | None:
    if names is None:
        return None

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


def _resolve_one(
    names: BranchNames, fields: Mapping[str, str], keys: Mapping[str, object]
) -> BranchSpec | None:
    """The branch's keys, or None for an optional branch of which no key exists."""
    pre = _resolve_one(names.pre, fields, keys) if names.pre else None
    if names.kind == "seq" and pre is not None and pre.weight not in keys:
        pre = None  # DBB's two spellings of its first conv: this one is not here
    weight = names.weight.format(**fields) if names.weight else None
    bias = names.bias.format(**fields) if names.bias else None
    spec = BranchSpec(
        weight=weight,
        bias=bias if bias in keys else None,
        bn=_resolve_bn(names.bn, fields, keys),
        kind=names.kind,
        dilation=names.dilation,
        pre=pre,
        implicit_identity=names.implicit_identity,
        role=names.role.format(**fields) if "{" in names.role else names.role,
    )
    present = (weight in keys) or spec.bn is not None or pre is not None
    if names.kind == "seq":
        present = pre is not None
    if names.optional and not present:
        return None
    return spec


def _resolve_branches(
    names: BranchNames, fields: Mapping[str, str], keys: Mapping[str, object]
) -> list[BranchSpec]:
    if names.repeat_from is None:
        spec = _resolve_one(names, fields, keys)
        return [spec] if spec is not None else []
    found: list[BranchSpec] = []
    index = names.repeat_from
    while (spec := _resolve_one(names, {**fields, "i": str(index)}, keys)) is not None:
        found.append(spec)
        index += 1
    return found


def _blocks_of(dialect: Dialect, keys: Mapping[str, object]) -> list[BlockSpec]:
    if dialect.anchor is None:
        return generic_blocks(dialect, keys)
    if dialect.square is None or dialect.branches is None:
        raise ValueError(f"dialect '{dialect.name}' has an anchor but no branch templates")
    found: list[BlockSpec] = []
    for key in keys:
        fields = dialect.fields_for(key)
        if fields is None:
            continue
        if dialect.requires_any and not any(
            t.format(**fields) in keys for t in dialect.requires_any
        ):
            continue
        square = _resolve_one(dialect.square, fields, keys)
        if square is None:  # an optional primary branch: never in the built-in tables
            continue
        found.append(
            BlockSpec(
                label=dialect.label_for(fields),
                dialect=dialect.name,
                square=square,
                branches=tuple(
                    b
                    for names in (*dialect.branches, *dialect.extra_branches)
                    for b in _resolve_branches(names, fields, keys)
                ),
                last_bn=_resolve_bn(dialect.last_bn, fields, keys),
                fused_weight=dialect.fused_weight.format(**fields),
                fused_bias=dialect.fused_bias.format(**fields),
                fields=fields,
                family=dialect.family,
            )
        )
    return found


def incomplete_sequences(
    dialect: Dialect, spec: BlockSpec, keys: Mapping[str, object]
) -> str | None:
    """What is wrong when a sequential branch's second conv is there without any first conv
    (it is then no unknown branch but an incomplete one); None when nothing is."""
    taken = set(spec.keys())
    p = spec.fields.get("p") or ""
    for names in (*(dialect.branches or ()), *dialect.extra_branches):
        pre = names.pre
        if names.kind != "seq" or not names.weight or pre is None or not pre.weight:
            continue
        weight = names.weight.format(**spec.fields)
        if names.repeat_from is not None or weight not in keys or weight in taken:
            continue
        firsts = [
            n.pre.weight.format(**spec.fields)
            for n in (*(dialect.branches or ()), *dialect.extra_branches)
            if n.kind == "seq" and n.weight == names.weight and n.pre and n.pre.weight
        ]
        short = [k[len(p) :] if p and k.startswith(p) else k for k in (weight, *firsts)]
        return (
            f"these look like {family_title(spec.family)} tensors without "
            f"{' or '.join(repr(k) for k in short[1:])}: '{short[0]}' is there but not the first "
            "conv of its branch; an incomplete block, not a fused one. Try 'acnet-convert inspect'"
        )
    return None


SameTensor = Callable[[str, str], bool]


def _branch_parts(b: BranchSpec) -> list[str | None]:
    def bn(x: BNSpec | None) -> list[str | None]:
        return [None] * 5 if x is None else [x.var, x.mean, x.weight, x.bias, x.count]

    pre = _branch_parts(b.pre) if b.pre else [None] * 7
    return [*bn(b.bn), b.bias, b.weight, *pre]


def _parts(spec: BlockSpec, order: Sequence[int]) -> list[str | None]:
    """A block's keys, part by part; the small BN vectors first, so non-aliases differ cheaply."""
    branches = (spec.square, *(spec.branches[i] for i in order))
    small = [k for b in branches for k in _branch_parts(b)[:5]]
    last = (
        [None] * 5
        if spec.last_bn is None
        else list(_branch_parts(BranchSpec(None, None, spec.last_bn))[:5])
    )
    large = [k for b in branches for k in _branch_parts(b)[5:]]
    return [*small, *last, *large]


@dataclass(frozen=True)
class _Primary:
    """A block others may alias, with what every comparison needs worked out once."""

    spec: BlockSpec
    keys: frozenset[str]
    parts: list[str | None]

    @classmethod
    def of(cls, spec: BlockSpec) -> _Primary:
        return cls(spec, frozenset(spec.keys()), _parts(spec, range(len(spec.branches))))


def _is_alias(block: BlockSpec, primary: _Primary, same: SameTensor) -> bool:
    """Do the two blocks hold bit-identical tensors in every part, under disjoint keys?"""
    if len(block.branches) != len(primary.spec.branches):
        return False
    if not primary.keys.isdisjoint(block.keys()):
        return False
    want = primary.parts
    # ACNet's two 1-D branches may be named in either order (roles are settled by shape)
    orders = [list(range(len(block.branches)))]
    if len(block.branches) == 2:
        orders.append([1, 0])
    for order in orders:
        got = _parts(block, order)
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
    primaries: list[_Primary] = []
    aliases: list[Alias] = []

    def primary_of(block: BlockSpec) -> _Primary | None:
        if same is None:
            return None
        return next((p for p in primaries if _is_alias(block, p, same)), None)

    for block in blocks:
        primary = primary_of(block)
        if primary is None:
            primaries.append(_Primary.of(block))
        else:
            aliases.append(Alias(block, primary.spec, copy=True))
    for _, other_blocks in others:
        for block in other_blocks:
            primary = primary_of(block)
            if primary is None:
                return None
            aliases.append(Alias(block, primary.spec, copy=False))
    return Detection(dialect, tuple(blocks), tuple(aliases), (dialect,))


def _one_family(
    found: Sequence[tuple[Dialect, list[BlockSpec]]], same: SameTensor | None
) -> Detection:
    """The one dialect of a family that explains the keys (the others only find aliases)."""
    for index, (d, blocks) in enumerate(found):
        detection = _with_aliases(d, blocks, [*found[:index], *found[index + 1 :]], same)
        if detection is not None:
            return detection
    listing = "; ".join(
        f"'{d.name}' ({len(b)} block{'s' if len(b) > 1 else ''}, e.g. '{b[0].label}')"
        for d, b in found
    )
    raise UnfusableBlockError(
        f"the keys fit more than one naming dialect: {listing}; choose one with --dialect"
    )


def _merge(detections: Sequence[Detection], order: Mapping[str, int]) -> Detection:
    """Blocks of several families in one checkpoint, in file order."""
    if len(detections) == 1:
        return detections[0]
    blocks = sorted(
        (b for d in detections for b in d.blocks),
        key=lambda b: order.get(b.square.first_key, len(order)),
    )
    return Detection(
        detections[0].dialect,
        tuple(blocks),
        tuple(a for d in detections for a in d.aliases),
        tuple(x for d in detections for x in d.dialects),
    )


def _forced(name: str, extra: Sequence[Dialect]) -> list[Dialect]:
    """The dialects ``--family``/``--dialect NAME`` allows: one dialect, or a whole family."""
    known = (*extra, *ALL_DIALECTS, GENERIC)
    by_family = [d for d in known if d.family == name and d.anchor is not None]
    if any(d.name == name for d in known) or not by_family:
        return [get_dialect(name, extra)]
    return by_family


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
        dialect: force this dialect (or every dialect of this family) instead of trying all.
        extra: user-defined dialects, tried before the built-in ones.
        same: ``same(key_a, key_b)`` tells whether two keys hold bit-identical
            tensors; without it no aliases are detected.

    Returns:
        The dialects that explain the checkpoint, its blocks in file order
        and their aliases; ``Detection(None, ())`` when no dialect finds a
        block.

    Raises:
        UsageError: ``dialect`` names no known dialect or family.
        UnfusableBlockError: more than one dialect of one family finds blocks,
            and not as aliases of one another.

    >>> keys = ["a.square_conv.weight", "a.hor_conv.weight", "a.ver_conv.weight"]
    >>> find_blocks(keys).blocks[0].label
    'a'
    """
    key_map: Mapping[str, Any] = keys if isinstance(keys, Mapping) else dict.fromkeys(keys)
    order = {k: i for i, k in enumerate(key_map)}
    candidates = _forced(dialect, extra) if dialect else [*extra, *ALL_DIALECTS]
    found = [(d, b) for d in candidates if (b := _blocks_of(d, key_map))]
    if not found and not dialect:
        generic = _blocks_of(GENERIC, key_map)
        found = [(GENERIC, generic)] if generic else []
    if not found:
        return Detection(candidates[0] if dialect else None, ())
    families: dict[str, list[tuple[Dialect, list[BlockSpec]]]] = {}
    for d, b in found:  # alternative namings compete; block types of their own do not
        families.setdefault(d.family if d.exclusive else f"{d.family}/{d.name}", []).append((d, b))
    return _merge([_one_family(group, same) for group in families.values()], order)
