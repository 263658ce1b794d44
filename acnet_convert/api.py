"""Fuse a training checkpoint straight into a torch model: :func:`fuse_and_load`.

The model is the network you deploy, in whichever form you built it: with
deploy-form ACBlocks (``<p>.fused_conv.{weight,bias}``), as the plain baseline
with a BN after each conv (``<u>.conv.weight`` + ``<u>.bn.*``), or as plain
convs with a bias (``<u>.conv.{weight,bias}``). The checkpoint is planned and
fused in memory by :func:`acnet_convert.convert.fuse_state`, exactly as
``acnet-convert fuse`` would write it, in the one layout whose keys are the
model's own.

>>> from acnet_convert.zoo import build_arch                    # doctest: +SKIP
>>> net = build_arch("src56", "baseline").eval()                 # doctest: +SKIP
>>> fuse_and_load(net, "src56_train.pth").layout                # doctest: +SKIP
'baseline'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from acnet_convert.checkpoint import CheckpointReader, open_checkpoint
from acnet_convert.convert import fuse_state
from acnet_convert.errors import ACNetConvertError, UsageError
from acnet_convert.keyfit import NON_WEIGHT_KEYS, a_few, key_misfit
from acnet_convert.layouts import LAYOUTS, identity_var, planned_layouts
from acnet_convert.plan import FuseOptions, FusionPlan, NamingOptions, plan_fusion

__all__ = ["LoadReport", "fuse_and_load", "tensor_from_stored"]

_SHOWN = 4  # keys named per kind in an error message


@dataclass(frozen=True)
class LoadReport:
    """What :func:`fuse_and_load` did.

    Attributes:
        source: the checkpoint read.
        layout: the layout that fitted the model (``deploy``, ``baseline`` or
            ``baseline-bias``).
        dialect: the naming dialect of the checkpoint's blocks.
        eps: the BN epsilon used for fusing.
        blocks: the labels of the fused blocks, in checkpoint order.
        keys_loaded: how many tensors were loaded into the model.
        missing: model keys the checkpoint did not supply (only with
            ``strict=False``; ``num_batches_tracked`` buffers torch fills in
            itself are not listed).
        unexpected: fused keys the model has no place for (only with ``strict=False``).
        ignored: checkpoint keys that are never weights (upstream's ``deps``).
    """

    source: str
    layout: str
    dialect: str
    eps: float
    blocks: tuple[str, ...]
    keys_loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def blocks_fused(self) -> int:
        """How many blocks were fused."""
        return len(self.blocks)


@dataclass(frozen=True)
class _Fit:
    """How one layout's output keys compare with the model's keys."""

    layout: str
    plan: FusionPlan | None
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    refused: str = ""  # why the layout could not be planned at all

    @property
    def exact(self) -> bool:
        return self.plan is not None and not self.missing and not self.unexpected

    @property
    def distance(self) -> int:
        return len(self.missing) + len(self.unexpected) if self.plan is not None else 1 << 62


def tensor_from_stored(array: np.ndarray, dtype: str) -> Tensor:
    """A CPU tensor holding ``array``, stored as the canonical type ``dtype``.

    bfloat16 arrives as uint16 bit patterns (numpy has no bfloat16) and is
    reinterpreted, not converted. The array is copied when it is read-only.

    >>> tensor_from_stored(np.array([0x3F80], dtype=np.uint16), "bfloat16")
    tensor([1.], dtype=torch.bfloat16)
    """
    data = np.ascontiguousarray(array).reshape(np.shape(array))  # keeps a 0-d array 0-d
    if not data.flags.writeable:
        data = data.copy()
    if dtype == "bfloat16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def _compare(layout: str, plan: FusionPlan, model_keys: set[str]) -> _Fit:
    # Upstream's hdf5 files carry channel widths as a bare 'deps' dataset; no model has it.
    given = {t.name for t in plan.outputs} - NON_WEIGHT_KEYS
    missing, unexpected = key_misfit(model_keys, given)
    return _Fit(layout, plan, tuple(sorted(missing)), tuple(sorted(unexpected)))


def _fits(reader: CheckpointReader, options: FuseOptions, model_keys: set[str]) -> list[_Fit]:
    """Plan every layout (from the index alone) and compare each with the model's keys."""
    fits: list[_Fit] = []
    planned = planned_layouts(
        lambda layout: plan_fusion(reader, replace(options, layout=layout)),
        refusable=(ACNetConvertError,),
    )
    for layout, plan, err in planned:
        if plan is None:
            fits.append(_Fit(layout, None, refused=str(err).removeprefix(f"{reader.path}: ")))
        else:
            fits.append(_compare(layout, plan, model_keys))
    return fits


def _few(keys: Sequence[str]) -> str:
    return a_few([f"'{k}'" for k in keys], _SHOWN, more=", ... ({n} more)")


def _common_prefix(keys: Sequence[str]) -> str:
    """The dotted prefix every key shares (``'backbone.'``), or ''."""
    if not keys:
        return ""
    first, *rest = keys
    parts = first.split(".")[:-1]
    prefix = ""
    for part in parts:
        candidate = f"{prefix}{part}."
        if not all(k.startswith(candidate) for k in rest):
            break
        prefix = candidate
    return prefix


def _prefix_hint(fits: Sequence[_Fit], model_keys: set[str]) -> tuple[_Fit, str] | None:
    """A rename that makes one layout fit exactly: a prefix the model has and the file lacks."""
    prefix = _common_prefix(sorted(model_keys))
    if not prefix:
        return None
    bare = {k[len(prefix) :] for k in model_keys}
    for fit in fits:
        if fit.plan is not None and _compare(fit.layout, fit.plan, bare).exact:
            return fit, (
                f"the model's keys all start with '{prefix}' and the checkpoint's do not: "
                f"pass renames=[('^', '{prefix}')], or load into "
                f"model.get_submodule('{prefix.rstrip('.')}')"
            )
    return None


def _mismatch(
    source: str, model: nn.Module, fits: Sequence[_Fit], model_keys: set[str], strict: bool
) -> UsageError:
    hint = _prefix_hint(fits, model_keys)
    best = hint[0] if hint else min(fits, key=lambda f: f.distance)
    parts = [
        f"{source}: the fused checkpoint does not fit {type(model).__name__}'s state dict in any "
        f"layout ({', '.join(LAYOUTS)}); closest is '{best.layout}'"
    ]
    if hint:
        return UsageError("; ".join(parts) + f". {hint[1]}")
    if best.missing:
        parts.append(f"{len(best.missing)} model keys it cannot fill: {_few(best.missing)}")
    if best.unexpected:
        parts.append(f"{len(best.unexpected)} fused keys with no place: {_few(best.unexpected)}")
    parts += [f"layout '{f.layout}' is impossible: {f.refused}" for f in fits if f.refused]
    overlap = best.plan is not None and any(t.name in model_keys for t in best.plan.outputs)
    return UsageError(
        "; ".join(parts)
        + ". Build the model in the form that matches (train/deploy/baseline)"
        + (
            ", pass renames=[(regex, replacement)], or use strict=False to load what fits"
            if strict and overlap
            else " or pass renames=[(regex, replacement)] so the keys match"
        )
    )


def _check_shapes(source: str, plan: FusionPlan, model_state: Mapping[str, Tensor]) -> None:
    wrong = [
        f"'{t.name}' is {list(t.shape)} in the checkpoint, {list(model_state[t.name].shape)} "
        "in the model"
        for t in plan.outputs
        if t.name in model_state and tuple(model_state[t.name].shape) != t.shape
    ]
    if wrong:
        raise UsageError(
            f"{source}: {len(wrong)} tensors have the wrong shape for the model: "
            f"{a_few(wrong, _SHOWN, sep='; ', more=' ({n} more)')}; was the model built with the same widths and "
            "number of classes?"
        )


def _identity_vars(plan: FusionPlan, model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Make each identity BN of the baseline layout exact for the model's own BN eps.

    The fused bias sits in a BN that must compute ``x + bias``, which needs
    ``running_var + bn.eps == 1``; the plan assumed the fusing eps.
    """
    dtype_of = {t.name: t.dtype for t in plan.outputs}
    for block in plan.blocks:
        for key, role in block.outputs:
            if role != "bn_var" or key not in arrays:
                continue
            bn = model.get_submodule(key.rpartition(".")[0])
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                arrays[key] = identity_var(bn.eps, dtype_of[key], arrays[key].shape[0])


def _unwrapped_state(model: nn.Module) -> tuple[str, dict[str, Tensor]]:
    """The prefix a DataParallel/DDP wrapper adds ('module.' or '') and the state without it."""
    model_state = model.state_dict()
    # DataParallel/DDP wrap the model: its keys gain 'module.', the checkpoint's need not.
    wrapped = "module." if model_state and all(k.startswith("module.") for k in model_state) else ""
    return wrapped, {k[len(wrapped) :]: v for k, v in model_state.items()}


def _choose_fit(
    source: str, model: nn.Module, fits: list[_Fit], model_keys: set[str], strict: bool
) -> _Fit:
    """The first exact fit; without one, the closest (strict=False) or a mismatch error."""
    exact = [f for f in fits if f.exact]
    if exact:
        return exact[0]
    if strict:
        raise _mismatch(source, model, fits, model_keys, strict)
    chosen = min(fits, key=lambda f: f.distance)
    if chosen.plan is None or all(t.name not in model_keys for t in chosen.plan.outputs):
        raise _mismatch(source, model, fits, model_keys, strict)
    return chosen


def fuse_and_load(
    model: nn.Module,
    ckpt: str | os.PathLike[str],
    *,
    eps: float | None = None,
    strict: bool = True,
    trust_pickle: bool = False,
    dialect: str | None = None,
    renames: Sequence[tuple[str, str]] = (),
    check: bool = True,
    naming: NamingOptions | None = None,
) -> LoadReport:
    """Fuse a training checkpoint in memory and load it into ``model``.

    The checkpoint may be in any format and container ``acnet-convert fuse``
    reads. Of the layouts (``deploy``, ``baseline``, ``baseline-bias``) the one
    whose keys are exactly the model's is chosen; every tensor is converted to
    the dtype of the model's own parameter or buffer and loaded with
    ``load_state_dict``. Nothing is written to disk, and the model is left
    untouched when anything fails.

    Args:
        model: the deployable network (deploy-form ACBlocks or a plain baseline).
        ckpt: the training-time checkpoint.
        eps: BN epsilon for fusing; None takes the dialect's default (1e-5).
        strict: require the fused keys to be exactly the model's; with False,
            the closest layout is loaded and the rest reported.
        trust_pickle: allow a ``.pth`` that needs full unpickling (see SECURITY.md).
        dialect: force a naming dialect instead of detecting it.
        renames: ``(regex, replacement)`` pairs applied in order to every fused key.
        check: check every fused block numerically against its branches.
        naming: the naming options ``fuse`` and ``verify`` share
            (:class:`~acnet_convert.plan.NamingOptions`: family/dialect, patterns'
            dialects, renames, eps, fold_bn); when given, it replaces ``eps``,
            ``dialect`` and ``renames``.

    Returns:
        A :class:`LoadReport`.

    A model wrapped in ``DataParallel``/``DistributedDataParallel`` (every key
    starting with ``module.``) is matched without that prefix and loaded with it.
    When the model's keys share another prefix the checkpoint lacks (a
    ``backbone.``), the error names the rename that makes them fit:
    ``renames=[('^', 'backbone.')]``.

    Raises:
        UsageError: the fused keys or shapes do not fit the model (the message
            names missing and unexpected keys, a few of each, with counts, or
            the prefix rename that would fit). ``strict=False`` is suggested
            only where some keys fit; it loads those and reports the rest.
        BadCheckpointError, UnfusableBlockError: unusable checkpoint.
        VerificationError: a fused block does not reproduce its branches.

    >>> report = fuse_and_load(build_arch("cfqkbnc", "deploy"), "train.pth")  # doctest: +SKIP
    >>> report.layout, report.blocks_fused                                   # doctest: +SKIP
    ('deploy', 3)
    """
    source = Path(ckpt)
    wrapped, model_state = _unwrapped_state(model)
    model_keys = set(model_state)
    if naming is None:
        naming = NamingOptions(dialect=dialect, renames=tuple(renames), eps=eps)
    options = naming.fuse_options(check=check, trust_pickle=trust_pickle)
    with open_checkpoint(source, trust_pickle=trust_pickle) as reader:
        chosen = _choose_fit(
            str(source), model, _fits(reader, options, model_keys), model_keys, strict
        )
        if chosen.plan is None:  # pragma: no cover - every chosen fit has a plan
            raise UsageError(f"{source}: layout '{chosen.layout}' has no plan")
        _check_shapes(str(source), chosen.plan, model_state)
        state = fuse_state(
            reader,
            replace(options, layout=chosen.layout),
        )
    arrays = {k: v for k, v in state.tensors.items() if k in model_keys}
    if state.plan.outputs and chosen.layout == "baseline":
        _identity_vars(state.plan, model.get_submodule("module") if wrapped else model, arrays)
    dtype_of = {t.name: t.dtype for t in state.plan.outputs}
    tensors = {
        wrapped + key: tensor_from_stored(value, dtype_of[key]).to(dtype=model_state[key].dtype)
        for key, value in arrays.items()
    }
    model.load_state_dict(tensors, strict=strict)
    return LoadReport(
        source=str(source),
        layout=chosen.layout,
        dialect=state.plan.dialect_names,
        eps=state.plan.eps,
        blocks=tuple(b.label for b in state.blocks),
        keys_loaded=len(tensors),
        missing=chosen.missing,
        unexpected=chosen.unexpected,
        ignored=tuple(
            sorted(k for k in state.tensors if k in NON_WEIGHT_KEYS and k not in model_keys)
        ),
    )
