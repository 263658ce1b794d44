"""Planning a conversion from a checkpoint's index alone.

:func:`plan_fusion` reads names, dtypes and shapes (and, to recognise alias
blocks, a few tensors): it finds the blocks, checks their shapes, and lays
out every output tensor in the chosen layout, so that :mod:`acnet_convert.convert`
can then stream the conversion and ``inspect`` can show it without running it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from acnet_convert.accounting import (
    Suspect,
    find_suspects,
    suspects_message,
    with_branch_aliases,
)
from acnet_convert.blocks import BlockGeometry, block_geometry
from acnet_convert.checkpoint import CheckpointReader, TensorInfo
from acnet_convert.checkpoint.rawio import array_bytes
from acnet_convert.dialects import (
    FAMILIES,
    BlockSpec,
    Detection,
    Dialect,
    find_blocks,
    incomplete_sequences,
)
from acnet_convert.errors import NoBlockFound, UnfusableBlockError, UsageError
from acnet_convert.families.convbn import FOLD_BN, fold_units
from acnet_convert.layouts import LAYOUTS, get_layout

__all__ = [
    "LAYOUTS",
    "FuseOptions",
    "FusionPlan",
    "NamingOptions",
    "PlannedBlock",
    "deploy_folds_bn",
    "plan_fusion",
]


@dataclass(frozen=True)
class NamingOptions:
    """How TRAIN's blocks are found and FUSED's keys named: shared by fuse, inspect,
    verify and ``fuse_and_load`` (vary it with ``dataclasses.replace``).

    ``dialect`` forces a family or dialect; ``extra_dialects`` come from
    ``--patterns``; ``renames`` are ``(regex, replacement)`` pairs applied to
    output names; ``eps`` None means each family's default (or the file's).
    ``fold_bn`` also folds plain conv+BN units (True), never (False), or as the
    families' deploy nets do (None: DBB's fold them, the others' do not).
    """

    dialect: str | None = None
    extra_dialects: tuple[Dialect, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    eps: float | None = None
    fold_bn: bool | None = None

    def fuse_options(self, **other: Any) -> FuseOptions:
        """:class:`FuseOptions` with these naming options (and ``other`` fields)."""
        return FuseOptions(
            dialect=self.dialect,
            extra_dialects=self.extra_dialects,
            renames=self.renames,
            eps=self.eps,
            fold_bn=self.fold_bn,
            **other,
        )


@dataclass(frozen=True)
class FuseOptions:
    """Everything a conversion can be told.

    ``eps`` None means the dialect's default (1e-5 for PyTorch-style
    checkpoints, as upstream ACNet; 1e-3 for Keras). ``renames`` are
    ``(regex, replacement)`` pairs applied in order to every output name.
    """

    eps: float | None = None
    check: bool = True
    layout: str = "deploy"
    dialect: str | None = None
    extra_dialects: tuple[Dialect, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    trust_pickle: bool = False
    seed: int = 0
    allow_unfused: bool = False
    fold_bn: bool | None = None  # None: as the families' deploy nets do

    @property
    def naming(self) -> NamingOptions:
        """The naming part of these options."""
        return NamingOptions(
            self.dialect, self.extra_dialects, self.renames, self.eps, self.fold_bn
        )


@dataclass(frozen=True)
class PlannedBlock:
    """A block found in the index, with the output keys it will become."""

    spec: BlockSpec
    geometry: BlockGeometry
    outputs: tuple[tuple[str, str], ...]  # (output key, role)
    eps: float  # this block's BN epsilon (its family's default, or --eps)
    alias_of: str | None = None  # label of the block whose fused tensors this one repeats

    @property
    def consumed(self) -> tuple[str, ...]:
        return self.spec.keys()


@dataclass(frozen=True)
class FusionPlan:
    """The whole conversion, decided from the index before any data is read."""

    source: str
    dialect: Dialect
    eps: float
    blocks: tuple[PlannedBlock, ...]
    outputs: tuple[TensorInfo, ...]
    origins: Mapping[str, str]  # output key -> input key it copies, for pass-through keys
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    # (alias label, alias dialect, primary label): blocks whose keys are dropped as a second naming
    dropped_aliases: tuple[tuple[str, str, str], ...] = ()
    # BN running-mean key -> the epsilon the file declares for it (used unless --eps is given)
    bn_eps: Mapping[str, float] = field(default_factory=dict)
    # (running-mean key, declared eps) of BNs whose declared eps --eps overrides
    eps_overridden: tuple[tuple[str, float], ...] = ()
    dialects: tuple[Dialect, ...] = ()
    # tensors that look like unfused training-time parts (passed through with --allow-unfused)
    suspects: tuple[Suspect, ...] = ()
    # plain conv+BN units were folded; by_default: the families whose deploy nets fold them
    fold_bn: bool = False
    fold_bn_by_default: tuple[str, ...] = ()

    @property
    def dialect_names(self) -> str:
        """The dialects used, joined with '+' for a checkpoint mixing families."""
        return "+".join(dict.fromkeys(d.name for d in (self.dialects or (self.dialect,))))


def _rename(key: str, renames: Sequence[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def _output_info(key: str, role: str, geometry: BlockGeometry, layout: str) -> TensorInfo:
    kh, kw, o, i = geometry.kh, geometry.kw, geometry.out_channels, geometry.in_per_group
    if role == "weight":
        shape = (kh, kw, i, o) if layout == "HWIO" else (o, i, kh, kw)
        return TensorInfo(key, geometry.dtype, shape)
    if role == "bn_count":
        return TensorInfo(key, "int64", ())
    return TensorInfo(key, geometry.dtype, (o,))


def _already_fused(spec: BlockSpec, infos: Mapping[str, TensorInfo]) -> bool:
    """Only the dialect's own deploy keys (weight and bias) are present: a fused conv."""
    if spec.square.weight != spec.fused_weight or spec.fused_bias not in infos:
        return False
    branch_keys = [k for b in spec.branches for k in b.keys()]  # noqa: SIM118 - BranchSpec.keys()
    square_bn = spec.square.bn.keys() if spec.square.bn is not None else ()
    return not any(k in infos for k in (*branch_keys, *square_bn))


def _default_eps(own: Dialect, detection: Detection) -> float:
    """A block's BN epsilon: its family's; for --fold-bn's units, the checkpoint's family's
    (YOLOv7's plain Conv units use its BN eps 1e-3 too)."""
    if own is FOLD_BN and detection.dialect is not None:
        return detection.dialect.default_eps
    return own.default_eps


def deploy_folds_bn(detection: Detection) -> tuple[str, ...]:
    """The families present whose deploy nets fold plain conv+BN units, when every one does."""
    used = {b.dialect for b in detection.blocks}
    families = {d.family: d.deploy_folds_bn for d in detection.dialects if d.name in used}
    if not families or not all(families.values()):
        return ()
    return tuple(sorted(families))


def _detect(
    reader: CheckpointReader, options: FuseOptions, same: Callable[[str, str], bool]
) -> tuple[Detection, list[BlockSpec]]:
    """The detected blocks, plus the conv+BN units ``--fold-bn`` folds, in file order."""
    source = str(reader.path)
    infos = reader.tensors
    try:
        detection = find_blocks(infos, options.dialect, options.extra_dialects, same)
    except UnfusableBlockError as err:
        raise UnfusableBlockError(f"{source}: {err}") from err
    # A "block" holding only the dialect's deploy keys (paddle writes the fused conv
    # as '<n>_acsquare_weights' + '_acsquare_bias') is one already fused: plain.
    detection = replace(
        detection, blocks=tuple(b for b in detection.blocks if not _already_fused(b, infos))
    )
    detection, moved = with_branch_aliases(detection, infos, same, _constant(reader))
    blocks = (*detection.blocks, *(a.block for a in detection.aliases))
    taken = {k for b in blocks for k in b.keys()}  # noqa: SIM118 - BlockSpec.keys()
    fold = options.fold_bn if options.fold_bn is not None else bool(deploy_folds_bn(detection))
    units = fold_units(infos, taken) if fold else []
    if (detection.dialect is None or not detection.blocks) and not units:
        raise NoBlockFound(
            f"{source}: no ACNet block found among {len(infos)} tensors (no key like "
            "'<prefix>.square_conv.weight'), nor a block of another family "
            f"({', '.join(FAMILIES[1:])}); it may be fused already, or plain. "
            "Try 'acnet-convert inspect' to see its keys"
        )
    order = {k: i for i, k in enumerate(infos)}
    specs = sorted(
        [b for b in (*detection.blocks, *units) if all(b is not a for a in moved)],
        key=lambda b: order.get(b.square.first_key, 0),
    )
    return detection, [*specs, *moved]  # an alias after its primary: it repeats its result


def _plan_blocks(
    specs: Sequence[BlockSpec],
    detection: Detection,
    options: FuseOptions,
    infos: Mapping[str, TensorInfo],
    source: str,
) -> tuple[list[PlannedBlock], dict[str, int], list[tuple[str, str, str]]]:
    """Each block checked and given its outputs; which block owns which key; dropped aliases."""
    planned: list[PlannedBlock] = []
    owner: dict[str, int] = {}
    dropped = [
        (a.block.label, a.block.dialect, a.primary.label) for a in detection.aliases if not a.copy
    ]
    for dropped_alias in detection.aliases:
        if not dropped_alias.copy:
            owner.update(dict.fromkeys(dropped_alias.block.keys(), _DROPPED))
    for spec in specs:
        own = FOLD_BN if spec.family == FOLD_BN.family else detection.dialect_of(spec)
        problem = incomplete_sequences(own, spec, infos)
        if problem:
            raise UnfusableBlockError(f"{source}: block '{spec.label}': {problem}")
        geometry = block_geometry(spec, infos, source, own.kernel_order, own.validate)
        alias = detection.alias_of(spec)
        primary = next((i for i, p in enumerate(planned) if alias and p.spec is alias.primary), -2)
        for key in spec.keys():  # noqa: SIM118 - BlockSpec.keys(), not a dict
            if owner.get(key) == primary:
                continue  # a part the second registration does not copy: read from the primary
            if key in owner:
                raise UnfusableBlockError(
                    f"{source}: key '{key}' belongs to two blocks, "
                    f"'{planned[owner[key]].spec.label}' and '{spec.label}'"
                )
            owner[key] = len(planned)
        planned.append(
            PlannedBlock(
                spec,
                geometry,
                get_layout("deploy" if own is FOLD_BN else options.layout).outputs(spec),
                alias_of=alias.primary.label if alias else None,
                eps=options.eps if options.eps is not None else _default_eps(own, detection),
            )
        )
    return planned, owner, dropped


def _lay_out(
    infos: Mapping[str, TensorInfo],
    owner: Mapping[str, int],
    planned: Sequence[PlannedBlock],
    kernel_order: str,
) -> tuple[list[TensorInfo], dict[str, str]]:
    """Every output tensor in file order (a block's where its first key was), and which
    input each pass-through output copies."""
    outputs: list[TensorInfo] = []
    origins: dict[str, str] = {}
    emitted: set[int] = set()
    for key, info in infos.items():
        index = owner.get(key)
        if index == _DROPPED:
            continue
        if index is None:
            outputs.append(TensorInfo(key, info.dtype, info.shape))
            origins[key] = key
        elif index not in emitted:
            emitted.add(index)
            block = planned[index]
            outputs.extend(
                _output_info(out_key, role, block.geometry, kernel_order)
                for out_key, role in block.outputs
            )
    return outputs, origins


def _renamed(
    outputs: Sequence[TensorInfo],
    origins: Mapping[str, str],
    renames: Sequence[tuple[str, str]],
    source: str,
) -> tuple[list[TensorInfo], dict[str, str]]:
    """The outputs after ``--rename``; refuses two outputs under one name."""
    renamed = [TensorInfo(_rename(t.name, renames), t.dtype, t.shape) for t in outputs]
    seen: dict[str, str] = {}
    for before, after in zip(outputs, renamed, strict=True):
        if after.name in seen:
            what = "after --rename " if renames else ""
            raise (UsageError if renames else UnfusableBlockError)(
                f"{source}: output key '{after.name}' {what}would be written twice "
                f"(from '{seen[after.name]}' and '{before.name}'); does the checkpoint already hold fused weights?"
            )
        seen[after.name] = before.name
    final_origins = {
        after.name: origins[before.name]
        for before, after in zip(outputs, renamed, strict=True)
        if before.name in origins
    }
    return renamed, final_origins


def plan_fusion(reader: CheckpointReader, options: FuseOptions) -> FusionPlan:
    """Find and check every block and lay out the output, from the index alone.

    Raises:
        UnfusableBlockError: no block, an ambiguous dialect, or a block with a
            missing or inconsistent part.
        UsageError: an unknown layout or dialect, or renames that collide.
    """
    source = str(reader.path)
    infos = reader.tensors
    same = _same_tensor(reader)
    detection, specs = _detect(reader, options, same)
    folds = deploy_folds_bn(detection)
    dialect = detection.dialect or FOLD_BN
    eps = options.eps if options.eps is not None else dialect.default_eps
    if not eps >= 0:
        raise UsageError(f"--eps must be a non-negative number, got {eps}")
    get_layout(options.layout)  # refuses an unknown layout
    planned, owner, dropped = _plan_blocks(specs, detection, options, infos, source)
    outputs, origins = _lay_out(infos, owner, planned, dialect.kernel_order)
    if options.layout == "baseline":
        _refuse_taken_bn(planned, origins, source)
    bn_eps, overridden = _file_epsilons(reader, options)
    suspects = find_suspects(
        [(b.spec, (b.geometry.out_channels, b.geometry.in_per_group)) for b in planned],
        list(origins),
        infos,
        list(owner),
        same,
        _constant(reader),
    )
    if suspects and not options.allow_unfused:
        raise UnfusableBlockError(suspects_message(source, suspects))
    renamed, final_origins = _renamed(outputs, origins, options.renames, source)
    return FusionPlan(
        source=source,
        dialect=dialect,
        eps=eps,
        blocks=tuple(
            replace(b, outputs=tuple((_rename(k, options.renames), r) for k, r in b.outputs))
            for b in planned
        ),
        outputs=tuple(renamed),
        origins=final_origins,
        params_before=sum(t.numel for t in infos.values()),
        params_after=sum(t.numel for t in renamed),
        bytes_before=sum(t.nbytes for k, t in infos.items()),
        bytes_after=sum(t.nbytes for t in renamed),
        dropped_aliases=tuple(dropped),
        bn_eps=bn_eps,
        eps_overridden=overridden,
        dialects=detection.dialects,
        suspects=suspects,
        fold_bn=bool(folds) if options.fold_bn is None else options.fold_bn,
        fold_bn_by_default=folds if options.fold_bn is None else (),
    )


def _file_epsilons(
    reader: CheckpointReader, options: FuseOptions
) -> tuple[dict[str, float], tuple[tuple[str, float], ...]]:
    """The reader's per-BN epsilons (``bn_epsilons``) to use, and those ``--eps`` overrides."""
    declared = dict(getattr(reader, "bn_epsilons", None) or {})
    if options.eps is None:
        return declared, ()
    return {}, tuple((k, e) for k, e in declared.items() if e != options.eps)


_DROPPED = -1  # owner of the keys of an alias block that is dropped


def _same_tensor(reader: CheckpointReader) -> Callable[[str, str], bool]:
    """``same(a, b)``: do keys a and b hold bit-identical tensors? Each key is read at most once."""
    digests: dict[str, bytes] = {}

    def digest(key: str) -> bytes:
        if key not in digests:
            digests[key] = hashlib.sha256(array_bytes(reader.read(key))).digest()
        return digests[key]

    def same(a: str, b: str) -> bool:
        ia, ib = reader.tensors.get(a), reader.tensors.get(b)
        if ia is None or ib is None:
            return ia is ib
        return (ia.dtype, ia.shape) == (ib.dtype, ib.shape) and digest(a) == digest(b)

    return same


def _constant(reader: CheckpointReader) -> Callable[[str], bool]:
    def constant(key: str) -> bool:
        values = reader.read(key)
        return bool(values.size == 0 or (values == values.flat[0]).all())

    return constant


def _refuse_taken_bn(
    planned: Sequence[PlannedBlock], passed_through: Mapping[str, str], source: str
) -> None:
    """The baseline layout needs ``<u>.bn``; a pre-activation unit already has its own BN there."""
    for block in planned:
        taken = [key for key, role in block.outputs if role != "weight" and key in passed_through]
        if taken:
            raise UsageError(
                f"{source}: block '{block.spec.label}': the baseline layout puts the fused bias in "
                f"'{taken[0].rpartition('.')[0]}', but the checkpoint already has a BN there (one "
                "before the conv, as in pre-activation units); a plain baseline without a conv "
                "bias cannot hold this block. Use --layout deploy or --layout baseline-bias"
            )
