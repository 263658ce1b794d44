"""Accounting for every tensor after planning: fused, passed through, or suspicious.

A tensor that is neither consumed by a fused block nor plainly an ordinary
layer's is *suspicious* when it looks like a training-time part of a block
that was fused without it:

* a conv (4-D ``<m>.weight``) inside a fused block's module whose output
  width matches the block's and that has its own BN or the block's exact
  [out, in-per-group] shape: a branch the family's naming does not list;
* a BN-like group (torch ``running_mean/var``, Paddle dygraph
  ``_mean/_variance``, Paddle fluid ``<stem>_mean/_variance``, Keras
  ``moving_*``) inside a fused block's module with the block's width;
* a bit-identical copy of a tensor a block consumed, under another name,
  that is not a whole second registration of the block's branches.

A second registration (a ModuleList holding a block's branch modules again,
``<q>.0/1/2``) is no suspect: when every conv kernel of the block has a
copy under one module ``<q>`` and every tensor under ``<q>`` is a
bit-identical copy of one of the block's, :func:`branch_aliases` makes
``<q>`` an alias block, written with the fused conv under its own deploy
names (``<q>.fused_conv``, ``<q>.rbr_reparam``, ...) as well.

``fuse`` refuses a plan with suspicious tensors (exit 3) unless told
``--allow-unfused``; ``inspect`` lists them; ``verify`` refuses such a TRAIN.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from acnet_convert.checkpoint.base import TensorInfo
from acnet_convert.dialects import Alias, Detection
from acnet_convert.generic import branch_bn_stems
from acnet_convert.keyfit import a_few
from acnet_convert.naming import BlockSpec, BNSpec, BranchSpec

__all__ = [
    "Suspect",
    "branch_aliases",
    "find_suspects",
    "suspects_message",
    "with_branch_aliases",
]

# BN statistics under any naming style: (regex on the key, group "stem")
_BN_MEAN = (
    re.compile(r"(?P<stem>.+)\.running_mean"),
    re.compile(r"(?P<stem>.+)\._mean"),
    re.compile(r"(?P<stem>.+)_mean"),
    re.compile(r"(?P<stem>.+)/moving_mean:0"),
)


@dataclass(frozen=True)
class Suspect:
    """Tensors that look like an unfused training-time part, and what they look like."""

    name: str
    keys: tuple[str, ...]
    what: str

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "keys": list(self.keys), "looks_like": self.what}


def _under(key: str, prefix: str) -> bool:
    return key.startswith(prefix)


def _bn_stems(keys: Sequence[str], infos: Mapping[str, TensorInfo]) -> dict[str, str]:
    """BN-like groups among ``keys``: stem -> running-mean key."""
    found: dict[str, str] = {}
    for key in keys:
        for pattern in _BN_MEAN:
            match = pattern.fullmatch(key)
            if match and len(infos[key].shape) == 1:
                found.setdefault(match["stem"], key)
                break
    return found


def _group(stem: str, keys: Sequence[str]) -> tuple[str, ...]:
    return tuple(k for k in keys if k.startswith(stem) and k[len(stem) : len(stem) + 1] in "._/")


def _conv_suspects(
    spec: BlockSpec,
    prefix: str,
    width: tuple[int, int],
    keys: Sequence[str],
    infos: Mapping[str, TensorInfo],
    bn_stems: Mapping[str, str],
) -> list[Suspect]:
    out: list[Suspect] = []
    for key in keys:
        shape = infos[key].shape
        if not (key.endswith(".weight") and len(shape) == 4 and _under(key, prefix)):
            continue
        module = key[: -len(".weight")]
        branch, stems = branch_bn_stems(module)
        bns = [s for s in stems if s in bn_stems]
        if shape[0] != width[0] or not (bns or (shape[1] == width[1] and prefix)):
            continue
        what = (
            f"a {shape[2]}x{shape[3]} conv{'+BN' if bns else ''} branch inside block "
            f"'{spec.label}' ({spec.family}) that its naming does not list"
        )
        grouped = tuple(
            dict.fromkeys((*_group(branch, keys), *(k for s in bns for k in _group(s, keys))))
        )
        out.append(Suspect(branch, grouped or (key,), what))
    return out


def find_suspects(
    blocks: Sequence[tuple[BlockSpec, tuple[int, int]]],
    passed: Sequence[str],
    infos: Mapping[str, TensorInfo],
    consumed: Sequence[str],
    same: Callable[[str, str], bool] | None,
    constant: Callable[[str], bool] | None = None,
) -> tuple[Suspect, ...]:
    """Suspicious tensors among the pass-through keys ``passed``.

    Args:
        blocks: every fused block with its [out channels, in per group].
        passed: the keys that would be copied through unchanged.
        infos: the checkpoint's index.
        consumed: every key a fused block consumed.
        same: ``same(a, b)``: do keys a and b hold bit-identical tensors?
        constant: ``constant(key)``: does the tensor hold one value throughout?
            (Equal constant tensors, such as untrained ones, are not aliases.)
    """
    suspects: dict[str, Suspect] = {}
    taken: set[str] = set()  # the keys of the suspects so far

    def add(suspect: Suspect) -> None:
        if suspect.name not in suspects:
            suspects[suspect.name] = suspect
            taken.update(suspect.keys)

    bn_stems = _bn_stems(passed, infos)
    groups: dict[str, tuple[str, ...]] = {}  # a BN stem's keys, found once
    for spec, width in blocks:
        prefix = spec.fields.get("p")
        if prefix is None:
            continue
        for s in _conv_suspects(spec, prefix, width, passed, infos, bn_stems):
            add(s)
        if not prefix:  # a block at the top level: every root key is "inside" it
            continue
        for stem, mean in bn_stems.items():
            if not _under(stem, prefix) or infos[mean].shape != (width[0],):
                continue
            if stem not in groups:
                groups[stem] = _group(stem, passed)
            if any(k in taken for k in groups[stem]):  # already part of a suspect
                continue
            what = (
                f"BatchNorm statistics of width {width[0]} inside block '{spec.label}' "
                f"({spec.family}), which was fused without them"
            )
            add(Suspect(stem, groups[stem], what))
    rest = [k for k in passed if k not in taken]
    for alias in _aliases(rest, infos, consumed, same, constant):
        suspects.setdefault(alias.name, alias)
    return tuple(suspects.values())


def _aliases(
    passed: Sequence[str],
    infos: Mapping[str, TensorInfo],
    consumed: Sequence[str],
    same: Callable[[str, str], bool] | None,
    constant: Callable[[str], bool] | None,
) -> list[Suspect]:
    """Pass-through conv kernels bit-identical to a consumed one (BN statistics of
    untrained BNs are equal without being aliases, so kernels only)."""
    if same is None:
        return []

    def kind(key: str) -> bool:
        return len(infos[key].shape) == 4

    by_shape: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for key in consumed:
        if key in infos and kind(key):
            by_shape.setdefault((infos[key].dtype, infos[key].shape), []).append(key)
    out = []
    for key in passed:
        info = infos[key]
        if not kind(key) or info.numel == 0:
            continue
        twins = by_shape.get((info.dtype, info.shape), [])
        twin = next((c for c in twins if same(key, c)), None)
        if twin is not None and not (constant is not None and constant(key)):
            what = f"a bit-identical copy of '{twin}', which a fused block consumed"
            out.append(Suspect(key, (key,), what))
    return out


def suspects_message(source: str, suspects: Sequence[Suspect]) -> str:
    """The one-line refusal for a plan with suspicious tensors."""
    shown = a_few([f"'{s.name}' ({s.what})" for s in suspects], 3, sep="; ", more="; and {n} more")
    return (
        f"{source}: {len(suspects)} group{'s' if len(suspects) > 1 else ''} of tensors look like "
        f"training-time branches that would be left unfused: {shown}. Describe them with "
        "--patterns, or have 'fuse --allow-unfused' copy them through as they are"
    )


def _moved_bn(bn: BNSpec | None, moved: Mapping[str, str]) -> BNSpec | None:
    if bn is None:
        return None

    def move(k: str | None) -> str | None:
        return moved.get(k, k) if k else k

    return BNSpec(
        moved.get(bn.mean, bn.mean),
        moved.get(bn.var, bn.var),
        *map(move, (bn.weight, bn.bias, bn.count)),
    )


def _moved(b: BranchSpec, moved: Mapping[str, str]) -> BranchSpec:
    return replace(
        b,
        weight=moved.get(b.weight, b.weight) if b.weight else None,
        bias=moved.get(b.bias, b.bias) if b.bias else None,
        bn=_moved_bn(b.bn, moved),
        pre=_moved(b.pre, moved) if b.pre else None,
    )


def _copies(
    block: BlockSpec,
    group: Sequence[str],
    infos: Mapping[str, TensorInfo],
    same: Callable[[str, str], bool],
) -> dict[str, str] | None:
    """Block key -> its copy in ``group``, when every key of ``group`` copies one; else None."""
    own = [k for k in block.keys() if k in infos]  # noqa: SIM118 - BlockSpec.keys()
    moved: dict[str, str] = {}
    for key in group:
        twin = next((k for k in own if k not in moved and same(key, k)), None)
        if twin is None:
            return None
        moved[twin] = key
    return moved


def branch_aliases(
    blocks: Sequence[BlockSpec],
    infos: Mapping[str, TensorInfo],
    same: Callable[[str, str], bool],
    constant: Callable[[str], bool],
) -> list[tuple[BlockSpec, BlockSpec]]:
    """Second registrations of blocks' branch modules, as (alias block, primary block) pairs.

    The alias block is the primary with each key replaced by its copy (keys
    without one stay the primary's) and its deploy names moved under the
    copies' common module.
    """
    taken = {k for b in blocks for k in b.keys()}  # noqa: SIM118 - BlockSpec.keys()
    kernels: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for key, info in infos.items():
        if key not in taken and len(info.shape) == 4 and info.numel:
            kernels.setdefault((info.dtype, info.shape), []).append(key)
    found: list[tuple[BlockSpec, BlockSpec]] = []
    claimed: set[str] = set()
    for block in blocks:
        prefix = block.fields.get("p")
        own = [k for k in block.keys() if k in infos and len(infos[k].shape) == 4]  # noqa: SIM118
        if prefix is None or not own:
            continue
        twins = []
        for key in own:
            shaped = kernels.get((infos[key].dtype, infos[key].shape), [])
            twin = next((t for t in shaped if t not in claimed and same(t, key)), None)
            if twin is None or constant(twin):
                break
            twins.append(twin)
        else:
            module = _common_module(twins)
            if not module or f"{module}." == prefix or module in taken:
                continue
            group = [k for k in infos if k.startswith(f"{module}.") and k not in taken]
            moved = _copies(block, group, infos, same) if not claimed & set(group) else None
            if moved is None:
                continue
            claimed.update(group)
            found.append((_alias_block(block, moved, f"{module}."), block))
    return found


def _common_module(keys: Sequence[str]) -> str:
    """The longest module path (dotted parts) every key lies under."""
    common: list[str] = []
    for parts in zip(*(k.split(".")[:-1] for k in keys), strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common)


def _alias_block(block: BlockSpec, moved: Mapping[str, str], prefix: str) -> BlockSpec:
    old = block.fields.get("p") or ""

    def deploy_name(key: str) -> str:
        return prefix + key[len(old) :] if key.startswith(old) else prefix + key.rpartition(".")[2]

    return replace(
        block,
        label=prefix.rstrip("."),
        square=_moved(block.square, moved),
        branches=tuple(_moved(b, moved) for b in block.branches),
        last_bn=_moved_bn(block.last_bn, moved),
        fused_weight=deploy_name(block.fused_weight),
        fused_bias=deploy_name(block.fused_bias),
        fields={**block.fields, "p": prefix},
    )


def with_branch_aliases(
    detection: Detection,
    infos: Mapping[str, TensorInfo],
    same: Callable[[str, str], bool],
    constant: Callable[[str], bool],
) -> tuple[Detection, list[BlockSpec]]:
    """``detection`` with the second registrations of its blocks' branches as copy aliases."""
    found = branch_aliases(detection.blocks, infos, same, constant)
    if not found:
        return detection, []
    aliases = tuple(Alias(alias, primary, copy=True) for alias, primary in found)
    blocks = (*detection.blocks, *(a.block for a in aliases))
    return replace(detection, blocks=blocks, aliases=(*detection.aliases, *aliases)), [
        a.block for a in aliases
    ]
