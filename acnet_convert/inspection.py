"""What ``acnet-convert inspect`` reports: tensors, container, blocks and totals."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from acnet_convert.blocks import BranchGeometry
from acnet_convert.checkpoint import TensorInfo, open_checkpoint
from acnet_convert.errors import ACNetConvertError, NoBlockFound, UnfusableBlockError, UsageError
from acnet_convert.plan import FuseOptions, FusionPlan, plan_fusion

__all__ = ["Inspection", "inspect_checkpoint", "render_inspection"]


@dataclass(frozen=True)
class Inspection:
    """A checkpoint's index and what fusing it would do.

    ``plan`` is None when no block was found (a fused or plain checkpoint) or
    the blocks are unusable; ``problem`` then says why, for the latter.
    """

    path: str
    format: str
    container: str
    prefix: str
    dropped: tuple[str, ...]
    tensors: tuple[TensorInfo, ...]
    listed: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    plan: FusionPlan | None
    problem: ACNetConvertError | None
    notes: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "schema": 1,
            "path": self.path,
            "format": self.format,
            "container": self.container,
            "prefix": self.prefix,
            "dropped_on_fuse": list(self.dropped),
            "metadata": self.metadata,
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel}
                for t in self.listed
            ],
            "totals": {
                "tensors": len(self.tensors),
                "params": sum(t.numel for t in self.tensors),
                "bytes": sum(t.nbytes for t in self.tensors),
                "params_after_fusing": plan.params_after if plan else None,
                "bytes_after_fusing": plan.bytes_after if plan else None,
            },
            "dialect": plan.dialect_names if plan else None,
            "blocks": [
                {
                    "block": b.spec.label,
                    "family": b.spec.family,
                    "kernel": [b.geometry.kh, b.geometry.kw],
                    "hor": list(b.geometry.hor) if b.geometry.hor else None,
                    "ver": list(b.geometry.ver) if b.geometry.ver else None,
                    "groups": b.geometry.groups,
                    "branches": [x.as_json() for x in b.geometry.branches],
                    "out_channels": b.geometry.out_channels,
                    "in_per_group": b.geometry.in_per_group,
                    "dtype": b.geometry.dtype,
                    "last_bn": b.geometry.has_last_bn,
                    "affine": b.geometry.affine,
                    "conv_bias": b.geometry.conv_bias,
                    "becomes": [k for k, _ in b.outputs],
                }
                for b in (plan.blocks if plan else ())
            ],
            "suspicious": [x.as_json() for x in plan.suspects] if plan else [],
            "problem": str(self.problem) if self.problem else None,
            "notes": list(self.notes),
        }


def inspect_checkpoint(
    path: Path, options: FuseOptions, name_filter: str | None = None
) -> Inspection:
    """Index a checkpoint and plan (without running) its fusion.

    Raises:
        BadCheckpointError: the file cannot be read.
        UsageError: a bad ``name_filter`` regex or option.
    """
    try:
        pattern = re.compile(name_filter) if name_filter else None
    except re.error as err:
        raise UsageError(f"--filter '{name_filter}': bad regular expression: {err}") from err
    with open_checkpoint(path, trust_pickle=options.trust_pickle) as reader:
        tensors = tuple(reader.tensors.values())
        plan: FusionPlan | None = None
        problem: ACNetConvertError | None = None
        try:
            plan = plan_fusion(reader, replace(options, allow_unfused=True))
        except NoBlockFound:
            pass
        except UnfusableBlockError as err:
            problem = err
        return Inspection(
            path=str(path),
            format=reader.format,
            container=reader.container.kind,
            prefix=reader.container.prefix,
            dropped=reader.container.dropped,
            tensors=tensors,
            listed=tuple(t for t in tensors if pattern is None or pattern.search(t.name)),
            metadata=dict(reader.metadata),
            plan=plan,
            problem=problem,
            notes=_notes(path),
        )


def _notes(path: Path) -> tuple[str, ...]:
    from acnet_convert.checkpoint.sniff import extension_note, sniff_format

    note = extension_note(path, sniff_format(path))
    return (note,) if note else ()


def _shown(text: str) -> str:
    """A name from the file as literal rich text: markup escaped, control characters as escapes."""
    from rich.markup import escape

    return escape(re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], text))


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _branch_text(branch: BranchGeometry) -> str:
    size = f"{branch.kernel[0]}x{branch.kernel[1]}"
    return size if branch.kind == "conv" else f"{branch.kind} {size}"


def render_inspection(result: Inspection, console: Any) -> None:
    """Print an :class:`Inspection` as rich tables."""
    from rich.table import Table

    head = f"{_shown(result.path)}: {result.format}, {_shown(result.container)}"
    if result.prefix:
        head += f", keys prefixed '{_shown(result.prefix)}'"
    console.print(head)
    for note in result.notes:
        console.print(f"note: {_shown(note)}")
    if result.dropped:
        console.print(f"other entries (dropped on fuse): {_shown(', '.join(result.dropped))}")
    table = Table(title=f"{len(result.listed)} of {len(result.tensors)} tensors")
    table.add_column("name", overflow="fold")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("elements", justify="right")
    for t in result.listed:
        table.add_row(_shown(t.name), _shape(t.shape), t.dtype, f"{t.numel:,}")
    console.print(table)
    params = sum(t.numel for t in result.tensors)
    nbytes = sum(t.nbytes for t in result.tensors)
    plan = result.plan
    if plan is None:
        if result.problem is None:
            console.print("no ACNet blocks found: the checkpoint looks fused or plain already")
        console.print(f"total: {params:,} parameters, {nbytes:,} bytes")
        return
    blocks = Table(
        title=f"{len(plan.blocks)} blocks ({plan.dialect_names} dialect, eps {plan.eps:g})"
    )
    for col in ("block", "kernel", "branches", "channels", "last_bn", "affine", "becomes"):
        blocks.add_column(col, overflow="fold")
    for b in plan.blocks:
        g = b.geometry
        blocks.add_row(
            _shown(b.spec.label),
            f"{g.kh}x{g.kw}",
            _shown(", ".join(_branch_text(x) for x in g.branches[1:])),
            f"{g.in_per_group}->{g.out_channels}",
            "yes" if g.has_last_bn else "no",
            "yes" if g.affine else "no",
            _shown(", ".join(k for k, _ in b.outputs)),
        )
    console.print(blocks)
    for suspect in plan.suspects:
        console.print(
            f"[yellow]suspicious:[/] {_shown(suspect.name)} ({len(suspect.keys)} tensors): "
            f"looks like {_shown(suspect.what)}; fuse refuses it unless --allow-unfused"
        )
    console.print(
        f"total: {params:,} parameters, {nbytes:,} bytes now; "
        f"{plan.params_after:,} parameters, {plan.bytes_after:,} bytes after fusing"
    )
