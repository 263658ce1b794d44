"""What ``acnet-convert inspect`` reports: tensors, container, blocks and totals."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from acnet_convert.checkpoint import TensorInfo, open_checkpoint
from acnet_convert.errors import ACNetConvertError, NoBlockFound, UnfusableBlockError, UsageError
from acnet_convert.plan import FuseOptions, FusionPlan, plan_fusion
from acnet_convert.provenance import extension_notes, found_notes

__all__ = ["Inspection", "inspect_checkpoint"]

_INSPECT_HINT = re.compile(r"\.? ?Try 'acnet-convert inspect'[^.;]*")


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
    try:
        opened = open_checkpoint(path, trust_pickle=options.trust_pickle)
    except ACNetConvertError as err:
        raise _without_hint(err) from err
    with opened as reader:
        tensors = tuple(reader.tensors.values())
        plan: FusionPlan | None = None
        problem: ACNetConvertError | None = None
        try:
            plan = plan_fusion(reader, replace(options, allow_unfused=True))
        except NoBlockFound:
            pass
        except UnfusableBlockError as err:
            problem = _without_hint(err)
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
            notes=(
                *extension_notes(path),
                *(found_notes(plan, ahead=True) if plan is not None else ()),
            ),
        )


def _without_hint(err: ACNetConvertError) -> ACNetConvertError:
    """The same error without "Try 'acnet-convert inspect'": this is inspect, and never
    sends the user back to the command they just ran."""
    return type(err)(_INSPECT_HINT.sub("", str(err)))
