"""Both nets of a network mode, built and loaded strictly with TRAIN and FUSED."""

from __future__ import annotations

import copy
import re
import string
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from acnet_convert.checkpoint import CheckpointReader
from acnet_convert.dialects import find_blocks
from acnet_convert.errors import (
    ACNetConvertError,
    BadCheckpointError,
)
from acnet_convert.families import ALL_DIALECTS, family_title
from acnet_convert.keyfit import a_few, key_misfit
from acnet_convert.layouts import get_layout, planned_layouts, required_keys
from acnet_convert.naming import Dialect
from acnet_convert.plan import FuseOptions, _already_fused, plan_fusion
from acnet_convert.verify.archs import _arch_spec
from acnet_convert.verify.factories import _call_factory, _load_factory, _takes_deploy
from acnet_convert.verify.options import _SHOW_KEYS, VerifyOptions

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["NetForms", "load_deployed", "net_forms"]


def _state_dict(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """A reader's tensors as torch tensors on the CPU (bfloat16 from its bit patterns)."""
    from acnet_convert.api import tensor_from_stored

    # tensor_from_stored copies a read-only view of the file, which must not outlive it
    return {
        name: tensor_from_stored(reader.read(name), info.dtype)
        for name, info in reader.tensors.items()
    }


def _describe_keys(keys: Sequence[str]) -> str:
    return a_few([f"'{k}'" for k in keys], _SHOW_KEYS)


def _key_misfit(net: nn.Module, given: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """Keys the net needs that ``given`` lacks, and keys ``given`` has that the net does not."""
    return key_misfit(net.state_dict(), given)


def _load_strict(
    net: nn.Module, state: Mapping[str, torch.Tensor], path: str, what: str, hint: str
) -> None:
    """``load_state_dict(strict=True)`` with a message naming the keys that do not fit.

    BN step counters may be absent (they do not change an eval-mode forward) and
    upstream's ``deps`` table is ignored.
    """
    missing, unexpected = _key_misfit(net, state)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} key(s) the net needs are missing: {_describe_keys(missing)}"
            )
        if unexpected:
            parts.append(
                f"{len(unexpected)} key(s) the net does not have: {_describe_keys(unexpected)}"
            )
        raise BadCheckpointError(f"{path}: does not fit {what}: {'; '.join(parts)}; {hint}")
    expected = net.state_dict()
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise BadCheckpointError(
                f"{path}: '{key}' has shape {list(value.shape)} but {what} needs "
                f"{list(expected[key].shape)}; {hint}"
            )
    full = {k: state.get(k, v) for k, v in expected.items()}
    try:
        net.load_state_dict(full, strict=True)
    except RuntimeError as err:  # dtype oddities; the shapes were checked above
        raise BadCheckpointError(f"{path}: cannot be loaded into {what}: {err}") from err


def _set_eps(net: nn.Module, eps: float | None) -> None:
    if eps is None:
        return
    from torch import nn

    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = eps


def _to_deploy_keys(
    train: CheckpointReader, fused_state: Mapping[str, torch.Tensor], options: VerifyOptions
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """FUSED in the baseline or baseline-bias layout, rewritten as ``<p>.fused_conv.*``
    (the baseline's identity BN folded into the conv), or None where neither fits."""
    import torch

    names = ("baseline", "baseline-bias") if options.layout == "auto" else (options.layout,)
    planned = planned_layouts(
        lambda layout: plan_fusion(
            train, FuseOptions(layout=layout, dialect=options.dialect, eps=options.eps)
        ),
        [name for name in names if name != "deploy"],
        refusable=(ACNetConvertError,),
    )
    for layout, plan, _ in planned:
        if plan is None or not all(k in fused_state for k in required_keys(plan)):
            continue
        state = dict(fused_state)
        for block in plan.blocks:
            values = {role: state.pop(key) for key, role in block.outputs if key in state}
            f64 = {
                role: v.to(torch.float64).numpy()
                for role, v in values.items()
                if role != "bn_count"
            }
            weight, bias = get_layout(layout).decode(f64, plan.eps)
            state[block.spec.fused_weight] = torch.from_numpy(np.ascontiguousarray(weight))
            state[block.spec.fused_bias] = torch.from_numpy(np.ascontiguousarray(bias))
        return layout, state
    return None


@dataclass
class NetForms:
    """A network in training form (built, not loaded) and the deploy forms to try, in order.

    ``deploy_forms`` maps a form's name (``deploy``, ``baseline``) to a builder;
    ``train_hint`` is the advice for a checkpoint that does not fit the training form.
    """

    train: nn.Module
    deploy_forms: list[tuple[str, Callable[[], nn.Module]]]
    default_shape: tuple[int, ...] | None
    label: str
    train_hint: str
    notes: list[str]


def net_forms(options: VerifyOptions, arch: str | None) -> NetForms:
    """The built-in architecture ``arch``, or ``options.model``'s factory, in its forms.

    Shared by ``verify`` and ``export``. Raises UsageError for an unknown
    architecture or a factory that cannot be imported or called.
    """
    from acnet_convert.nn import switch_to_deploy

    notes: list[str] = []
    if arch is not None:
        from acnet_convert import zoo

        spec = _arch_spec(arch)
        return NetForms(
            train=zoo.build_arch(arch, "train"),
            deploy_forms=[
                ("deploy", lambda: zoo.build_arch(arch, "deploy")),
                ("baseline", lambda: zoo.build_arch(arch, "baseline")),
            ],
            default_shape=tuple(spec.input_shape),
            label=f"the built-in architecture '{arch}'",
            train_hint="is --arch right? Without --arch, verify checks block by block",
            notes=notes,
        )
    model = options.model or ""
    factory = _load_factory(model)
    kwargs = dict(options.model_args)
    train_net = _call_factory(factory, model, kwargs)
    if _takes_deploy(factory):
        forms = [("deploy", lambda: _call_factory(factory, model, {**kwargs, "deploy": True}))]
    else:

        def derived() -> nn.Module:
            # eval: the copy only gives the deploy structure (FUSED's weights load into it)
            net = copy.deepcopy(train_net).eval()
            report = switch_to_deploy(net)
            if report.count == 0:
                notes.append(
                    "the model has no block (no module with square_conv, hor_conv "
                    "and ver_conv); "
                    "its deployed form is the model itself"
                )
            return net

        forms = [("deploy", derived)]
    return NetForms(
        train=train_net,
        deploy_forms=forms,
        default_shape=None,
        label=f"the model from --model '{model}'",
        train_hint="does --model build the network TRAIN was trained with (check --model-arg)?",
        notes=notes,
    )


@dataclass
class _Nets:
    train: nn.Module
    deployed: nn.Module
    layout: str
    default_shape: tuple[int, ...] | None
    label: str
    notes: list[str]


def _template_regex(template: str) -> re.Pattern[str]:
    """A key template as a regex: ``{p}`` a module prefix with its dot (maybe empty), any
    other field some text, a field used twice the same text both times."""
    parts: list[str] = []
    seen: set[str] = set()
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is None:
            continue
        if name in seen:
            parts.append(f"(?P={name})")
        else:
            parts.append(f"(?P<{name}>(?:.+\\.)?)" if name == "p" else f"(?P<{name}>.+)")
        seen.add(name)
    return re.compile("".join(parts))


def _deploy_key(
    candidates: Sequence[str], keys: Collection[str], dialects: Sequence[Dialect]
) -> tuple[str, Dialect] | None:
    """The first candidate that is a dialect's fused conv weight, its fused bias in ``keys``."""
    for dialect in dialects:
        weight = _template_regex(dialect.fused_weight)
        for key in candidates:
            match = weight.fullmatch(key)
            try:
                bias = dialect.fused_bias.format(**match.groupdict()) if match else None
            except (KeyError, IndexError, ValueError):  # a field only the bias uses
                bias = None
            if bias is not None and bias in keys:
                return key, dialect
    return None


def _has_training_blocks(train: CheckpointReader, options: VerifyOptions) -> bool:
    """Whether TRAIN has a training-time block (not one already fused) by the naming options."""
    try:
        detection = find_blocks(train.tensors, options.dialect, tuple(options.extra_dialects))
    except ACNetConvertError:
        return True  # ambiguous blocks are blocks; a bad --dialect is refused elsewhere
    return any(not _already_fused(b, train.tensors) for b in detection.blocks)


def _refuse_swapped(
    train: CheckpointReader,
    train_state: Mapping[str, object],
    train_net: nn.Module,
    options: VerifyOptions,
) -> None:
    """TRAIN with no training-time block but a family's fused convs, which the training
    form does not have: FUSED given first. Found from every family's deploy names."""
    _, unexpected = _key_misfit(train_net, train_state)
    if not unexpected or _has_training_blocks(train, options):
        return
    dialects = (*options.extra_dialects, *ALL_DIALECTS)
    found = _deploy_key(unexpected, train_state.keys(), dialects)
    if found is None:
        return
    key, dialect = found
    raise BadCheckpointError(
        f"{train.path}: holds fused weights ({family_title(dialect.family)}'s deploy convs, "
        f"e.g. '{key}') and no training-time block; give the training checkpoint first: "
        "verify TRAIN FUSED"
    )


def _build_nets(
    train: CheckpointReader,
    fused: CheckpointReader,
    options: VerifyOptions,
    arch: str | None,
    dtype: torch.dtype,
) -> _Nets:
    """Both nets, in ``dtype`` on the CPU, with TRAIN and FUSED loaded strictly."""
    train_state = _state_dict(train)
    fused_state = _state_dict(fused)
    forms = net_forms(options, arch)
    train_net = forms.train
    _refuse_swapped(train, train_state, train_net, options)
    train_net.to(dtype=dtype)
    _set_eps(train_net, options.eps)
    _load_strict(
        train_net, train_state, str(train.path), f"{forms.label} (training form)", forms.train_hint
    )
    deployed, layout = load_deployed(
        forms,
        fused_state,
        str(fused.path),
        options,
        dtype,
        train,
        "was FUSED fused from TRAIN, without --rename? Without --arch/--model, verify checks "
        "it block by block",
    )
    return _Nets(train_net, deployed, layout, forms.default_shape, forms.label, forms.notes)


def load_deployed(
    forms: NetForms,
    fused_state: Mapping[str, torch.Tensor],
    fused_path: str,
    options: VerifyOptions,
    dtype: torch.dtype,
    train: CheckpointReader | None,
    hint: str,
) -> tuple[nn.Module, str]:
    """The first deploy form whose keys FUSED fits, loaded strictly, and FUSED's layout.

    With TRAIN given, a FUSED in a baseline layout is rewritten into the
    deploy form's keys where no form takes it as it is. A misfit raises
    BadCheckpointError naming the keys of the closest form, and ``hint``.
    """
    wanted = options.layout
    built: dict[str, nn.Module] = {}

    def form_net(form: str) -> nn.Module:
        if form not in built:
            built[form] = dict(forms.deploy_forms)[form]()
        return built[form]

    def finish(form: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
        deployed = form_net(form)
        deployed.to(dtype=dtype)
        _set_eps(deployed, options.eps)
        _load_strict(
            deployed,
            state,
            fused_path,
            f"{forms.label} ({form} form)",
            "was FUSED fused from TRAIN?",
        )
        return deployed

    names = [form for form, _ in forms.deploy_forms]
    for form in names if wanted == "auto" else [f for f in names if f == wanted]:
        if not any(_key_misfit(form_net(form), fused_state)):
            return finish(form, fused_state), form
    rewritten = (
        _to_deploy_keys(train, fused_state, options)
        if wanted != "deploy" and train is not None
        else None
    )
    if rewritten is not None and not any(_key_misfit(form_net("deploy"), rewritten[1])):
        layout, state = rewritten
        forms.notes.append(
            f"FUSED is in the {layout} layout; its convs were loaded into the deploy form"
        )
        return finish("deploy", state), layout
    closest = min(names, key=lambda f: sum(len(x) for x in _key_misfit(form_net(f), fused_state)))
    _load_strict(
        form_net(closest),
        fused_state,
        fused_path,
        f"{forms.label} ({' or '.join(names)} form)",
        hint,
    )
    raise AssertionError("unreachable: _load_strict raises on a misfit")  # pragma: no cover
