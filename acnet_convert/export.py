"""``acnet-convert export``: the deployed net as one ONNX file, proven with ONNX Runtime.

:func:`export_onnx` builds the deploy form of a built-in architecture or of a
``--model`` factory (the networks ``verify`` builds, :mod:`acnet_convert.verify.loading`),
loads the fused weights strictly (a training checkpoint is fused in memory
first, by :func:`acnet_convert.api.fuse_and_load`), exports it with torch.onnx
(:mod:`acnet_convert.onnxio`) to a temporary file beside OUT, runs that with ONNX
Runtime on a seeded batch and compares it with the PyTorch deploy net and,
for a training checkpoint, with the training-time net, with ``verify``'s
tolerances and figures. OUT appears (renamed into place) only when every
comparison passed.

Nothing here prints; the command line renders :class:`ExportResult`.

>>> result = export_onnx(Path("train.pth"), Path("net.onnx"), ExportOptions(arch="src56"))  # doctest: +SKIP
>>> result.passed, result.onnx_nodes["Conv"]  # doctest: +SKIP
(True, 57)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from acnet_convert.atomic import atomic_output
from acnet_convert.checkpoint import CheckpointReader, open_checkpoint
from acnet_convert.errors import ACNetConvertError, UsageError
from acnet_convert.netsummary import NetSummary, summarise_net
from acnet_convert.outputs import check_output
from acnet_convert.quant import DEFAULT_LOSS_THRESHOLD_DB, QuantReport, quant_report
from acnet_convert.verify.options import DEFAULT_RTOL, VerifyOptions
from acnet_convert.verify.options import _check_options as check_verify_options
from acnet_convert.verify.results import CaseResult, _case

if TYPE_CHECKING:
    import torch
    from torch import nn

    from acnet_convert.verify.loading import NetForms

__all__ = ["ExportOptions", "ExportResult", "export_onnx"]

_MISMATCH_HINT = "the graph does not compute what the PyTorch net computes; nothing was written"


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``export`` can be told.

    One of ``arch`` (a built-in architecture) and ``model`` (``file.py:factory``,
    with ``model_args``) names the network. ``input_shape`` is ``(C, H, W)``
    (default: the architecture's). ``opset`` None is the exporter's default.
    ``batch`` inputs are run, and with ``dynamic_batch`` also ``batch + 1``.
    ``rtol`` None means verify's default for float32 (and for FUSED's stored
    dtype, against the training net). ``eps``, ``dialect`` and
    ``trust_pickle`` are as for ``fuse``; ``loss_threshold_db`` as for ``inspect --stats``.
    """

    arch: str | None = None
    model: str | None = None
    model_args: tuple[tuple[str, Any], ...] = ()
    input_shape: tuple[int, ...] | None = None
    opset: int | None = None
    dynamic_batch: bool = False
    batch: int = 2
    seed: int = 0
    rtol: float | None = None
    atol: float = 0.0
    eps: float | None = None
    dialect: str | None = None
    trust_pickle: bool = False
    force: bool = False
    loss_threshold_db: float = DEFAULT_LOSS_THRESHOLD_DB


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` did and measured; ``passed`` decides whether OUT was written."""

    source: str
    output: str
    written: bool
    network: str
    training_checkpoint: bool
    layout: str
    exporter: str
    opset: int
    dynamic_batch: bool
    input_shape: tuple[int, ...]
    seed: int
    cases: tuple[CaseResult, ...]
    deployed: NetSummary
    trained: NetSummary | None
    onnx_nodes: dict[str, int]
    onnx_bytes: int
    quant: QuantReport
    export_seconds: float
    notes: tuple[str, ...] = field(default=())
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def failure_message(self) -> str:
        """One line for stderr naming the comparisons that failed; empty when passed."""
        bad = [c for c in self.cases if not c.passed]
        if not bad:
            return ""
        listing = "; ".join(f"{c.name}: {c.numbers()}" for c in bad)
        return f"{self.output}: {_MISMATCH_HINT}: {listing}"

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "report": "acnet-convert export",
            "passed": self.passed,
            "source": self.source,
            "output": self.output,
            "written": self.written,
            "network": self.network,
            "training_checkpoint": self.training_checkpoint,
            "layout": self.layout,
            "exporter": self.exporter,
            "opset": self.opset,
            "dynamic_batch": self.dynamic_batch,
            "input_shape": list(self.input_shape),
            "seed": self.seed,
            "cases": [c.as_json() for c in self.cases],
            "failed": [c.name for c in self.cases if not c.passed],
            "training_net": self.trained.as_json() if self.trained else None,
            "deployed_net": self.deployed.as_json(),
            "onnx_nodes": self.onnx_nodes,
            "onnx_bytes": self.onnx_bytes,
            "quantization": self.quant.as_json(),
            "export_seconds": round(self.export_seconds, 4),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 4),
        }


# --------------------------------------------------------------------------- the nets


@dataclass
class _ExportNets:
    forms: NetForms
    deployed: nn.Module
    trained: nn.Module | None  # loaded from CKPT, when CKPT is a training checkpoint it fits
    layout: str
    training_checkpoint: bool


def _verify_options(options: ExportOptions) -> VerifyOptions:
    """The options verify would be given for the same nets, checks and tolerances."""
    return VerifyOptions(
        arch=options.arch,
        model=options.model,
        model_args=options.model_args,
        eps=options.eps,
        dialect=options.dialect,
        trust_pickle=options.trust_pickle,
        input_shape=options.input_shape,
        batch=options.batch,
        seed=options.seed,
        rtol=options.rtol,
        atol=options.atol,
    )


def _from_training(
    reader: CheckpointReader, options: ExportOptions, forms: NetForms
) -> _ExportNets:
    """CKPT holds blocks: fuse it in memory into the first deploy form it fits."""
    from acnet_convert.api import fuse_and_load
    from acnet_convert.verify.loading import _key_misfit, _load_strict, _set_eps, _state_dict

    path = str(reader.path)
    state = _state_dict(reader)
    fits_train = not any(_key_misfit(forms.train, state))
    _set_eps(forms.train, options.eps)  # --eps: the training net's BNs too, as verify does
    if fits_train:
        _load_strict(forms.train, state, path, f"{forms.label} (training form)", forms.train_hint)
    refusals: list[str] = []
    for form, build in forms.deploy_forms:
        net = build()
        _set_eps(net, options.eps)  # BNs the deployed net keeps (stems, shortcuts)
        try:
            loaded = fuse_and_load(
                net, reader.path, eps=options.eps, dialect=options.dialect,
                trust_pickle=options.trust_pickle,
            )  # fmt: skip
        except UsageError as err:  # the fused keys do not fit this form
            refusals.append(f"{form} form: {err}")
            continue
        if not fits_train:
            forms.notes.append(
                f"{path}: its keys are not those of {forms.label} in training form (another "
                "naming dialect?), so ONNX Runtime is compared with the deployed net only"
            )
        return _ExportNets(forms, net, forms.train if fits_train else None, loaded.layout, True)
    if not fits_train:  # neither form fits: say so for the training form, as verify does
        _load_strict(forms.train, state, path, f"{forms.label} (training form)", forms.train_hint)
    raise ACNetConvertError(
        f"{path}: fused, it does not fit the deploy form of {forms.label}: {refusals[0]}"
    )


def _build(reader: CheckpointReader, options: ExportOptions, arch: str | None) -> _ExportNets:
    import torch

    from acnet_convert.plan import FuseOptions
    from acnet_convert.quant import checkpoint_has_blocks
    from acnet_convert.verify.loading import _state_dict, load_deployed, net_forms

    verify_options = _verify_options(options)
    forms = net_forms(verify_options, arch)
    forms.train_hint = (
        "is --arch right?" if arch else "does --model build the network CKPT was trained with?"
    ) + f" ('acnet-convert inspect {reader.path}' lists its keys)"
    fuse_options = FuseOptions(
        eps=options.eps, dialect=options.dialect, trust_pickle=options.trust_pickle
    )
    if checkpoint_has_blocks(reader, fuse_options):
        nets = _from_training(reader, options, forms)
    else:
        deployed, layout = load_deployed(
            forms,
            _state_dict(reader),
            str(reader.path),
            verify_options,
            torch.float32,
            None,
            "is it fused from this network's training checkpoint (fuse without --rename)?",
        )
        nets = _ExportNets(forms, deployed, None, layout, False)
    nets.deployed.float().eval()
    if nets.trained is not None:
        nets.trained.float().eval()
    return nets


# --------------------------------------------------------------------------- comparing


def _seeded_batch(seed: int, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    generator = torch.Generator().manual_seed(seed + batch)  # each size its own draw
    return torch.randn((batch, *shape), generator=generator, dtype=torch.float32)


def _net_outputs(net: nn.Module, x: torch.Tensor, what: str) -> list[np.ndarray]:
    import torch

    from acnet_convert.verify.network import _outputs, _run

    with torch.inference_mode():
        named = _outputs(_run(net, x, what), what)
    return [t.detach().to(torch.float64).numpy() for _, t in named]


def _cases(
    path: Path,
    nets: _ExportNets,
    shape: tuple[int, ...],
    options: ExportOptions,
    rtols: tuple[float, float],
) -> list[CaseResult]:
    """ONNX Runtime against the deploy net (and the training net) at each batch size."""
    from acnet_convert.onnxio import run_onnx

    sizes = (options.batch, options.batch + 1) if options.dynamic_batch else (options.batch,)
    references = [("deployed net", nets.deployed, rtols[0])]
    if nets.trained is not None:
        references.append(("training net", nets.trained, rtols[1]))
    cases: list[CaseResult] = []
    for size in sizes:
        x = _seeded_batch(options.seed, size, shape)
        began = time.perf_counter()
        got = run_onnx(path, x.numpy())
        seconds = time.perf_counter() - began
        for what, net, rtol in references:
            expected = _net_outputs(net, x, f"{nets.forms.label} ({what})")
            if len(expected) != len(got):
                raise ACNetConvertError(
                    f"the graph returns {len(got)} output(s), the {what} {len(expected)}"
                )
            for i, (ref, out) in enumerate(zip(expected, got, strict=True)):
                suffix = f"[{i}]" if len(got) > 1 else ""
                name = f"onnx vs {what}{suffix} (batch {size})"
                cases.append(
                    _compare(name, ref, out.astype(np.float64), rtol, options.atol, seconds)
                )
    return cases


def _compare(
    name: str, ref: np.ndarray, out: np.ndarray, rtol: float, atol: float, seconds: float
) -> CaseResult:
    if ref.shape != out.shape:
        return CaseResult(
            name, "network", False, math.inf, math.inf, 0.0, 0.0, 0.0,
            detail=f"shape {list(out.shape)} from ONNX Runtime, {list(ref.shape)} from PyTorch",
        )  # fmt: skip
    top1 = None
    if ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float(np.mean(ref.argmax(axis=1) == out.argmax(axis=1)))
    return _case(name, "network", ref, out, rtol, atol, top1_agreement=top1, seconds=seconds)


# --------------------------------------------------------------------------- entry point


class _Refused(Exception):
    """Carries a failed result out of the atomic write, so the temporary file goes."""

    def __init__(self, result: ExportResult) -> None:
        super().__init__(result.failure_message())
        self.result = result


def _check_options(options: ExportOptions) -> VerifyOptions:
    """Verify's checks of the shared options, and export's own need for a network."""
    if not options.arch and not options.model:
        raise UsageError(
            "export builds the deployed net from an architecture: give --arch NAME "
            "(see 'acnet-convert archs') or --model FILE.py:FACTORY"
        )
    verify_options = _verify_options(options)
    check_verify_options(verify_options)
    return verify_options


def _check_opset(opset: int | None) -> None:
    from acnet_convert.onnxio import MIN_OPSET, max_opset

    if opset is not None and not MIN_OPSET <= opset <= max_opset():
        raise UsageError(f"--opset {opset}: choose one from {MIN_OPSET} to {max_opset()}")


def export_onnx(ckpt: Path, output: Path, options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export CKPT's deployed net to OUT as ONNX and prove it with ONNX Runtime.

    Returns:
        An :class:`ExportResult`; when ``passed`` is False, OUT was not
        written (the caller decides: the CLI exits 1).

    Raises:
        UsageError: bad or missing options, an existing OUT without ``force``,
            the ``export`` extra not installed.
        BadCheckpointError, UnfusableBlockError: CKPT cannot be read or does
            not fit the network.
        ACNetConvertError: the net cannot be exported or the graph not run.
    """
    started = time.perf_counter()
    verify_options = _check_options(options)
    check_output(ckpt, output, force=options.force)
    from acnet_convert.onnxio import require_export_extra

    require_export_extra()
    _check_opset(options.opset)
    from acnet_convert.verify import _effective_rtol

    with open_checkpoint(ckpt, trust_pickle=options.trust_pickle) as reader:
        nets = _build(reader, options, options.arch)
        rtol_train = _effective_rtol(verify_options, reader)
    shape = options.input_shape or nets.forms.default_shape
    if shape is None:
        raise UsageError("--model needs --input-shape C,H,W to make the example and test batches")
    rtols = (DEFAULT_RTOL["float32"] if options.rtol is None else options.rtol, rtol_train)
    label = nets.forms.label
    summaries = (
        summarise_net(nets.deployed, shape, options.batch, f"{label} (deployed net)"),
        summarise_net(nets.trained, shape, options.batch, f"{label} (training net)")
        if nets.trained is not None
        else None,
    )
    try:
        with atomic_output(output) as tmp:
            result = _export_and_check(tmp, ckpt, output, nets, shape, options, rtols, summaries)
            if not result.passed:
                raise _Refused(result)
    except _Refused as refused:
        result = refused.result
    return _finished(result, started)


def _finished(result: ExportResult, started: float) -> ExportResult:
    import dataclasses

    return dataclasses.replace(result, seconds=time.perf_counter() - started)


def _checked_graph_opset(model: Any, options: ExportOptions) -> int:
    """The exported graph's opset, once its batch axis and opset are as asked."""
    from acnet_convert import onnxio

    fixed = [a for a in onnxio.graph_batch_axes(model) if isinstance(a, int)]
    if options.dynamic_batch and fixed:
        raise ACNetConvertError(
            f"--dynamic-batch: the exported graph fixes the batch at {fixed[0]}; does the net's "
            "forward hard-code its batch size (e.g. a reshape to a fixed size)?"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if options.opset is not None and opset != options.opset:
        raise ACNetConvertError(
            f"--opset {options.opset}: the exporter wrote opset {opset} instead (it could not "
            "convert the graph); choose another opset, or leave --opset out"
        )
    return int(opset)


def _export_and_check(
    tmp: Path,
    ckpt: Path,
    output: Path,
    nets: _ExportNets,
    shape: tuple[int, ...],
    options: ExportOptions,
    rtols: tuple[float, float],
    summaries: tuple[NetSummary, NetSummary | None],
) -> ExportResult:
    from acnet_convert import onnxio

    began = time.perf_counter()
    example = _seeded_batch(options.seed, options.batch, shape)
    onnxio.export_graph(nets.deployed, example, tmp, options.opset, options.dynamic_batch)
    export_seconds = time.perf_counter() - began
    model = onnxio.load_graph(tmp)
    opset = _checked_graph_opset(model, options)
    cases = _cases(tmp, nets, shape, options, rtols)
    quant = quant_report(
        str(output),
        onnxio.conv_kernels(model),
        options.loss_threshold_db,
        notes=("figures are of the graph's Conv weights (BN folded in), what an int8 "
               "quantizer of this file sees",),
    )  # fmt: skip
    return ExportResult(
        source=str(ckpt),
        output=str(output),
        written=all(c.passed for c in cases),
        network=nets.forms.label,
        training_checkpoint=nets.training_checkpoint,
        layout=nets.layout,
        exporter=onnxio.EXPORTER,
        opset=int(opset),
        dynamic_batch=options.dynamic_batch,
        input_shape=tuple(shape),
        seed=options.seed,
        cases=tuple(cases),
        deployed=summaries[0],
        trained=summaries[1],
        onnx_nodes=onnxio.graph_nodes(model),
        onnx_bytes=tmp.stat().st_size,
        quant=quant,
        export_seconds=export_seconds,
        notes=tuple(nets.forms.notes),
    )
