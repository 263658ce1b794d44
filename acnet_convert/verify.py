"""Does a fused checkpoint compute the same function as its training checkpoint?

:func:`verify_checkpoints` answers with numbers, in one of three modes:

``arch``
    A built-in architecture (:mod:`acnet_convert.zoo`) is built twice, in
    training form with TRAIN loaded and in deploy (or baseline) form with
    FUSED loaded; both run on the same batch and their outputs are compared.
``model``
    The same, with the user's own factory (``file.py:make`` or
    ``package.module:make``) building the training-time net; the deployed
    net is ``factory(deploy=True)`` where the factory takes ``deploy``, and
    otherwise the training net with every block replaced by a plain conv of
    the same geometry (:func:`acnet_convert.nn.switch_to_deploy`).
``blocks``
    No architecture at all: every block is rebuilt from TRAIN on its own
    (training-time branches, float64) and compared with the fused conv read
    from FUSED, with :func:`acnet_convert.blockcheck.check_block`, the check
    ``fuse`` runs before it writes. Tensors copied unchanged are compared too.

A comparison passes when ``max_abs <= atol + rtol * max|reference|``. In the
network modes the per-block check runs as well and must pass too: a network's
output can hide a wrong weight (a nudge of 1e-3 in one kernel of Cifar-quick
moves its logits by less than 1e-5 of their size), and the block check names
the block (or copied tensor) that differs.

Nothing here prints; the command line renders :class:`VerifyResult`.

>>> options = VerifyOptions(dtype="float64")
>>> result = verify_checkpoints(Path("train.pth"), Path("fused.pth"), options)  # doctest: +SKIP
>>> result.passed, [c.name for c in result.failures]  # doctest: +SKIP
(True, [])
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import importlib.util
import inspect
import math
import re
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from acnet_convert import dtypes
from acnet_convert.blockcheck import check_block
from acnet_convert.blocks import from_layout, load_block
from acnet_convert.checkpoint import CheckpointReader, open_checkpoint
from acnet_convert.errors import (
    ACNetConvertError,
    BadCheckpointError,
    UnfusableBlockError,
    UsageError,
    VerificationError,
)
from acnet_convert.fusion import BNStats, compare_outputs, fold_bn
from acnet_convert.plan import LAYOUTS, FuseOptions, FusionPlan, PlannedBlock, plan_fusion

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_RTOL",
    "LAYOUT_CHOICES",
    "ArchRow",
    "CaseResult",
    "VerifyOptions",
    "VerifyResult",
    "arch_rows",
    "junit_error_xml",
    "junit_xml",
    "parse_input_shape",
    "parse_model_args",
    "raise_for_result",
    "resolve_device",
    "verify_checkpoints",
]

COMPUTE_DTYPES = ("float32", "float64")
LAYOUT_CHOICES = ("auto", *LAYOUTS)

# Default rtol by dtype. The compute dtype sets it (the 1e-5 for float32,
# 1e-10 for float64); where FUSED stores its weights in a narrower type, the
# rounding to that type is part of the conversion, so its (larger) value applies.
DEFAULT_RTOL: dict[str, float] = {
    "float64": 1e-10,
    "float32": 1e-5,
    "float16": 1e-2,
    "bfloat16": 5e-2,
}

# Keys that never change what a net computes in eval mode: BN step counters, and
# the channel-width table upstream's hdf5 files carry beside the weights.
_COUNTER_SUFFIX = "num_batches_tracked"
_NON_WEIGHT_KEYS = frozenset({"deps"})
_SHOW_KEYS = 5


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class VerifyOptions:
    """Everything ``verify`` can be told.

    ``arch``/``model`` pick the network mode (neither: an architecture is
    detected from TRAIN's keys, else block mode; ``blocks`` forces block
    mode). ``model_args`` are keyword arguments for the model factory.
    ``layout`` is FUSED's layout (``auto``: found from its keys); ``dialect``
    and ``eps`` are as for ``fuse``. ``rtol`` None means :data:`DEFAULT_RTOL`.
    ``input_shape`` is ``(C, H, W)``; ``input_path`` a ``.npy`` or ``.pt``
    batch that replaces the random one.
    """

    arch: str | None = None
    model: str | None = None
    model_args: tuple[tuple[str, Any], ...] = ()
    blocks: bool = False
    layout: str = "auto"
    dialect: str | None = None
    eps: float | None = None
    seed: int = 0
    batch: int = 8
    input_shape: tuple[int, ...] | None = None
    input_path: Path | None = None
    device: str = "auto"
    dtype: str = "float32"
    rtol: float | None = None
    atol: float = 0.0
    trust_pickle: bool = False


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``.

    Raises:
        UsageError: anything but three positive integers.

    >>> parse_input_shape("3, 224,224")
    (3, 224, 224)
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(
            f"--input-shape '{text}': expected C,H,W (three positive integers), e.g. 3,32,32"
        )
    return shape


def parse_model_args(values: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """``["depth=56", "name=wide"]`` -> ``(("depth", 56), ("name", "wide"))``.

    Values are read as Python literals where they are one, else kept as text.

    Raises:
        UsageError: an entry without ``=`` or with a key that is no identifier.

    >>> parse_model_args(["width=2.0", "blocks=[2, 2]", "act=relu"])
    (('width', 2.0), ('blocks', [2, 2]), ('act', 'relu'))
    """
    out: list[tuple[str, Any]] = []
    for value in values:
        key, sep, raw = value.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(
                f"--model-arg '{value}': expected KEY=VALUE with KEY a Python identifier"
            )
        if key == "deploy":
            raise UsageError(
                "--model-arg deploy=...: verify builds both forms itself; leave 'deploy' out"
            )
        try:
            parsed: Any = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed = raw
        out.append((key, parsed))
    return tuple(out)


def _check_options(options: VerifyOptions) -> None:
    if options.arch and options.model:
        raise UsageError("--arch and --model both name a network; give one of them")
    if options.blocks and (options.arch or options.model):
        raise UsageError(
            "--blocks checks block by block without a network; leave out --arch/--model"
        )
    if options.model_args and not options.model:
        raise UsageError("--model-arg is for --model; give --model path/to/file.py:factory as well")
    if options.dtype not in COMPUTE_DTYPES:
        raise UsageError(f"--dtype '{options.dtype}': choose one of {', '.join(COMPUTE_DTYPES)}")
    if options.layout not in LAYOUT_CHOICES:
        raise UsageError(f"--layout '{options.layout}': choose one of {', '.join(LAYOUT_CHOICES)}")
    if options.rtol is not None and not options.rtol >= 0:
        raise UsageError(f"--rtol must be a non-negative number, got {options.rtol}")
    if not options.atol >= 0:
        raise UsageError(f"--atol must be a non-negative number, got {options.atol}")
    if options.eps is not None and not options.eps >= 0:
        raise UsageError(f"--eps must be a non-negative number, got {options.eps}")
    if options.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {options.batch}")
    if options.input_shape is not None and (
        len(options.input_shape) != 3 or min(options.input_shape) < 1
    ):
        raise UsageError(
            f"--input-shape {options.input_shape}: expected C,H,W, three positive integers"
        )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CaseResult:
    """One comparison: the whole network, one block, or the tensors copied unchanged.

    ``allowed`` is ``atol + rtol * ref_max``; ``top1_agreement`` is the share
    of the batch whose arg-max class agrees (classifier outputs only);
    ``within_rounding`` (blocks only) says whether every output lies within
    the error bound that rounding FUSED's weights to their dtype allows.
    ``detail`` names what differs where that is more than the numbers.
    """

    name: str
    kind: str
    passed: bool
    max_abs: float
    max_rel: float
    cosine: float
    ref_max: float
    allowed: float
    top1_agreement: float | None = None
    within_rounding: bool | None = None
    detail: str = ""
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "passed": self.passed,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "cosine": _json_float(self.cosine),
            "ref_max": _json_float(self.ref_max),
            "allowed": _json_float(self.allowed),
            "top1_agreement": _json_float(self.top1_agreement),
            "within_rounding": self.within_rounding,
            "detail": self.detail,
            "seconds": round(self.seconds, 4),
        }

    def numbers(self) -> str:
        """The figures, in one line, for messages and JUnit failures."""
        verdict = "<=" if self.passed else ">"
        text = (
            f"max_abs {self.max_abs:.3g} {verdict} allowed {self.allowed:.3g} "
            f"(max_rel {self.max_rel:.3g}, cosine {self.cosine:.9f}, max|ref| {self.ref_max:.3g})"
        )
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
        return text + (f"; {self.detail}" if self.detail else "")


def _json_float(value: float | None) -> float | str | None:
    """Finite floats as numbers; inf/nan as the strings 'inf', '-inf', 'nan' (strict JSON)."""
    if value is None:
        return None
    return value if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` found.

    ``cases`` are the main checks: the network's output(s) in the network
    modes, every block and the copied tensors in block mode. ``block_checks``
    (network modes) holds the per-block check run alongside; the verdict
    needs every case and every block check to pass.
    """

    train: str
    fused: str
    mode: str
    arch: str | None
    arch_detected: bool
    model: str | None
    layout: str
    device: str
    dtype: str
    rtol: float
    atol: float
    seed: int
    batch: int
    input: str
    input_shape: tuple[int, ...] | None
    cases: tuple[CaseResult, ...]
    block_checks: tuple[CaseResult, ...] = ()
    notes: tuple[str, ...] = field(default=())
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in (*self.cases, *self.block_checks))

    @property
    def failures(self) -> tuple[CaseResult, ...]:
        """Every failing check, the block checks of a network mode included."""
        return tuple(c for c in (*self.cases, *self.block_checks) if not c.passed)

    @property
    def culprits(self) -> tuple[str, ...]:
        """The names of the blocks (or copied tensors) that differ."""
        return tuple(dict.fromkeys(c.name for c in self.failures if c.kind != "network"))

    def checks(self) -> tuple[CaseResult, ...]:
        """The checks as a report lists them: the cases, then (network modes) one
        summary of the block checks."""
        summary = _summarise_blocks(self.block_checks)
        return (*self.cases, summary) if summary is not None else self.cases

    def failure_message(self) -> str:
        """One line for stderr naming the offending block(s); empty when passed."""
        if self.passed:
            return ""
        where = f"{self.fused} does not compute what {self.train} computes"
        tol = f"atol {self.atol:g} + rtol {self.rtol:g} * max|reference|"
        bad = [c for c in self.failures if c.kind != "network"]
        listing = ", ".join(f"'{c.name}' (max_rel {c.max_rel:.3g})" for c in bad)
        if self.mode == "blocks":
            return f"{where}: {len(bad)} of {len(self.cases)} checks exceed {tol}: {listing}"
        network = [c for c in self.cases if not c.passed]
        if network:
            worst = max(network, key=lambda c: c.max_rel)
            text = (
                f"{where}: the network output differs by {worst.max_abs:.3g} "
                f"(max_rel {worst.max_rel:.3g}), beyond {tol}"
            )
        else:
            worst = max(self.cases, key=lambda c: c.max_rel)
            text = (
                f"{where}: the network output stays within {tol} (max_rel {worst.max_rel:.3g}) "
                "on this batch, but checked on its own"
            )
            return f"{text} a fused block differs: {listing}"
        if bad:
            return f"{text}; checked on its own, the difference lies in {listing}"
        if self.block_checks:
            return (
                f"{text}; every block matches on its own, so the difference builds up across "
                "layers: compare with --dtype float64, or loosen --rtol if this much is expected"
            )
        return f"{text}; see the notes for why the per-block check could not run"

    def as_json(self) -> dict[str, Any]:
        return {
            "report": "acnet-convert verify",
            "version": 1,
            "passed": self.passed,
            "train": self.train,
            "fused": self.fused,
            "mode": self.mode,
            "arch": self.arch,
            "arch_detected": self.arch_detected,
            "model": self.model,
            "layout": self.layout,
            "device": self.device,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "atol": self.atol,
            "seed": self.seed,
            "batch": self.batch,
            "input": self.input,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "cases": [c.as_json() for c in self.cases],
            "block_checks": [c.as_json() for c in self.block_checks],
            "failed": [c.name for c in self.failures],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 4),
        }


def _summarise_blocks(checks: Sequence[CaseResult]) -> CaseResult | None:
    """One line for many block checks: the worst one's figures, and the failing names."""
    if not checks:
        return None
    worst = max(checks, key=lambda c: (not c.passed, c.max_rel))
    failing = [c.name for c in checks if not c.passed]
    blocks = sum(c.kind == "block" for c in checks)
    detail = (
        f"differ: {', '.join(repr(n) for n in failing)}" if failing else f"worst: '{worst.name}'"
    )
    return CaseResult(
        name=f"each block on its own ({blocks} blocks)",
        kind="blocks",
        passed=not failing,
        max_abs=max(c.max_abs for c in checks),
        max_rel=worst.max_rel,
        cosine=min(c.cosine for c in checks),
        ref_max=worst.ref_max,
        allowed=worst.allowed,
        within_rounding=all(c.within_rounding is not False for c in checks),
        detail=detail,
        seconds=sum(c.seconds for c in checks),
    )


def _case(
    name: str,
    kind: str,
    reference: np.ndarray,
    got: np.ndarray,
    rtol: float,
    atol: float,
    **extra: Any,
) -> CaseResult:
    c = compare_outputs(reference, got)
    allowed = atol + rtol * c.ref_max
    return CaseResult(
        name=name,
        kind=kind,
        passed=c.within(rtol, atol),
        max_abs=c.max_abs,
        max_rel=c.max_rel,
        cosine=c.cosine,
        ref_max=c.ref_max,
        allowed=allowed,
        **extra,
    )


# --------------------------------------------------------------------------- JUnit


def junit_xml(result: VerifyResult) -> str:
    """The result as JUnit XML: one testcase per check, failures carrying the numbers."""
    checks = result.checks()
    failed = sum(not c.passed for c in checks)
    suite = _suite(result.fused, len(checks), failed, 0, result.seconds)
    props = ET.SubElement(suite, "properties")
    for key in (
        "train",
        "fused",
        "mode",
        "arch",
        "model",
        "layout",
        "device",
        "dtype",
        "rtol",
        "atol",
        "seed",
        "batch",
        "input",
    ):
        value = getattr(result, key)
        if value is not None:
            ET.SubElement(props, "property", name=key, value=str(value))
    classname = f"acnet-convert.verify.{Path(result.fused).name}"
    for case in result.checks():
        element = ET.SubElement(
            suite, "testcase", classname=classname, name=case.name, time=f"{case.seconds:.4f}"
        )
        if case.passed:
            ET.SubElement(element, "system-out").text = case.numbers()
            continue
        text = case.numbers()
        culprits = [c for c in result.block_checks if not c.passed]
        if case.kind != "block" and culprits:
            text += "\nchecked on their own, these differ:\n" + "\n".join(
                f"  {c.name}: {c.numbers()}" for c in culprits
            )
        failure = ET.SubElement(
            element, "failure", message=case.numbers(), type="VerificationError"
        )
        failure.text = text
    return _serialise(suite)


def junit_error_xml(train: str, fused: str, message: str) -> str:
    """JUnit XML for a run that could not compare at all (unusable input, bad options)."""
    suite = _suite(fused, 1, 0, 1, 0.0)
    element = ET.SubElement(
        suite,
        "testcase",
        classname=f"acnet-convert.verify.{Path(fused).name}",
        name=f"{train} -> {fused}",
        time="0",
    )
    error = ET.SubElement(element, "error", message=message, type="ACNetConvertError")
    error.text = message
    return _serialise(suite)


def _suite(fused: str, tests: int, failures: int, errors: int, seconds: float) -> ET.Element:
    root = ET.Element("testsuites", name="acnet-convert verify")
    return ET.SubElement(
        root,
        "testsuite",
        name=f"acnet-convert verify {Path(fused).name}",
        tests=str(tests),
        failures=str(failures),
        errors=str(errors),
        skipped="0",
        time=f"{seconds:.4f}",
    )


def _serialise(suite: ET.Element) -> str:
    root = ET.Element("testsuites", name="acnet-convert verify")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class ArchRow:
    """A built-in architecture as ``verify --list-archs`` shows it."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    num_classes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }


def arch_rows() -> list[ArchRow]:
    """Every built-in architecture, in the registry's order."""
    from acnet_convert import zoo

    return [
        ArchRow(name, spec.description, tuple(spec.input_shape), int(spec.num_classes))
        for name, spec in zoo.ARCHS.items()
    ]


def _arch_spec(name: str) -> Any:
    from acnet_convert import zoo

    if name not in zoo.ARCHS:
        raise UsageError(
            f"--arch '{name}' is not a built-in architecture; choose one of {', '.join(zoo.ARCHS)} "
            "(see 'acnet-convert archs'), or give --model for your own"
        )
    return zoo.ARCHS[name]


def _choose_arch(
    options: VerifyOptions, train: CheckpointReader
) -> tuple[str | None, bool, list[str]]:
    """The architecture to use, whether it was detected, and notes for stderr."""
    if options.arch:
        _arch_spec(options.arch)
        return options.arch, False, []
    if options.model or options.blocks:
        return None, False, []
    from acnet_convert import zoo

    matches = list(zoo.match_arch(list(train.tensors)))
    if len(matches) == 1:
        return (
            matches[0],
            True,
            [
                f"using the built-in architecture '{matches[0]}': TRAIN's keys match it "
                "and no other "
                "(--arch chooses one, --blocks checks block by block)"
            ],
        )
    if matches:
        return (
            None,
            False,
            [
                f"TRAIN's keys match several built-in architectures ({', '.join(matches)}); "
                "checking block by block (--arch chooses one)"
            ],
        )
    return None, False, ["no built-in architecture matches TRAIN's keys; checking block by block"]


# --------------------------------------------------------------------------- entry point


def verify_checkpoints(
    train: Path, fused: Path, options: VerifyOptions = VerifyOptions()
) -> VerifyResult:
    """Compare what TRAIN and FUSED compute, in the mode ``options`` selects.

    Args:
        train: the training-time checkpoint (any supported format).
        fused: the fused checkpoint made from it (any format, any layout).
        options: see :class:`VerifyOptions`.

    Returns:
        A :class:`VerifyResult`; ``passed`` is False for a mismatch (the
        caller decides whether that is an error: the CLI exits 1).

    Raises:
        UsageError: contradictory options, an unknown architecture, a model
            factory that cannot be imported or called.
        BadCheckpointError, UnfusableBlockError: a checkpoint that cannot be
            read, does not fit the architecture, or lacks a fused block.
        ACNetConvertError: a device that is not there, an unusable input file.
    """
    started = time.perf_counter()
    _check_options(options)
    device = resolve_device(options.device)
    with (
        open_checkpoint(train, trust_pickle=options.trust_pickle) as t_reader,
        open_checkpoint(fused, trust_pickle=options.trust_pickle) as f_reader,
    ):
        arch, detected, notes = _choose_arch(options, t_reader)
        if options.input_path is not None and arch is None and not options.model:
            raise UsageError(
                "--input feeds a whole network; block mode uses random inputs per block. "
                "Give --arch or --model to check the network on your data"
            )
        rtol = _effective_rtol(options, f_reader)
        if arch is None and not options.model:
            return _verify_blocks(t_reader, f_reader, options, rtol, notes, started, device)
        return _verify_network(
            t_reader, f_reader, options, rtol, arch, detected, notes, started, device
        )


def _effective_rtol(options: VerifyOptions, fused: CheckpointReader) -> float:
    if options.rtol is not None:
        return options.rtol
    stored = {t.dtype for t in fused.tensors.values() if t.dtype in dtypes.FLOAT_DTYPES}
    return max([DEFAULT_RTOL[options.dtype], *(DEFAULT_RTOL[d] for d in stored)])


def resolve_device(spec: str) -> str:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> the device to use.

    Raises:
        UsageError: a name of another form.
        ACNetConvertError: CUDA asked for where there is none, or no device N.
    """
    if spec == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if spec != "auto" and match is None:
        raise UsageError(f"--device '{spec}': use auto, cpu, cuda or cuda:N")
    import torch

    available = torch.cuda.is_available()
    if spec == "auto":
        return "cuda" if available else "cpu"
    if not available:
        build = (
            "a CPU-only build"
            if torch.version.cuda is None
            else f"built for CUDA {torch.version.cuda}"
        )
        raise ACNetConvertError(
            f"--device {spec}: CUDA is not available here (torch {torch.__version__}, {build}, "
            "no usable GPU found); use --device cpu, or --device auto to take a GPU only "
            "where there is one"
        )
    count = torch.cuda.device_count()
    if match is not None and match.group(1) is not None and int(match.group(1)) >= count:
        raise ACNetConvertError(
            f"--device {spec}: there are only {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return spec


# --------------------------------------------------------------------------- block mode


def _plan_for(
    train: CheckpointReader, fused_keys: Mapping[str, object], options: VerifyOptions
) -> tuple[FusionPlan, str]:
    """Plan the fusion of TRAIN in FUSED's layout (found from FUSED's keys for ``auto``)."""

    def fuse_options(layout: str) -> FuseOptions:
        return FuseOptions(layout=layout, dialect=options.dialect, eps=options.eps)

    if options.layout != "auto":
        return plan_fusion(train, fuse_options(options.layout)), options.layout
    best: tuple[int, FusionPlan, str] | None = None
    for layout in LAYOUTS:
        try:
            plan = plan_fusion(train, fuse_options(layout))
        except (UsageError, UnfusableBlockError):
            if layout == "deploy":
                raise
            continue  # e.g. a dialect with no baseline layout
        wanted = _required_outputs(plan)
        present = sum(k in fused_keys for k in wanted)
        if present == len(wanted):
            return plan, layout
        if best is None or present > best[0]:
            best = (present, plan, layout)
    if best is None:  # pragma: no cover - the deploy layout always plans or raises
        raise UnfusableBlockError(f"{train.path}: no layout fits")
    return best[1], best[2]


def _required_outputs(plan: FusionPlan) -> list[str]:
    return [key for block in plan.blocks for key, role in block.outputs if role != "bn_count"]


def _fused_values(
    block: PlannedBlock, fused: CheckpointReader, plan: FusionPlan, layout: str, auto: bool
) -> tuple[np.ndarray, np.ndarray, str]:
    """The fused conv of ``block`` as FUSED stores it: float64 OIHW kernel, bias, dtype."""
    expected = {t.name: t for t in plan.outputs}
    values: dict[str, np.ndarray] = {}
    stored = "float64"
    for key, role in block.outputs:
        if role == "bn_count":
            continue
        info = fused.tensors.get(key)
        if info is None:
            how = (
                "no layout (deploy, baseline, baseline-bias) explains FUSED's keys."
                if auto
                else f"is FUSED in another layout than --layout {layout}?"
            )
            raise BadCheckpointError(
                f"{fused.path}: '{key}', the fused {role} of block '{block.spec.label}', "
                "is missing; "
                f"{how} Was it written with --rename, or from another checkpoint? "
                f"Try 'acnet-convert inspect {fused.path}'"
            )
        want = expected[key].shape
        if info.shape != want:
            raise BadCheckpointError(
                f"{fused.path}: '{key}' (block '{block.spec.label}') has shape {list(info.shape)}, "
                f"expected {list(want)} from TRAIN's block; was FUSED made from another checkpoint?"
            )
        if info.dtype not in dtypes.FLOAT_DTYPES:
            raise BadCheckpointError(
                f"{fused.path}: '{key}' (block '{block.spec.label}') has dtype {info.dtype}; "
                "fused weights must be floating point"
            )
        if role == "weight":
            stored = info.dtype
        values[role] = dtypes.to_float64(fused.read(key), info.dtype)
    weight = np.ascontiguousarray(from_layout(values["weight"], plan.dialect.kernel_layout))
    if layout == "baseline":
        bn = BNStats(
            mean=values["bn_mean"],
            var=values["bn_var"],
            weight=values["bn_weight"],
            bias=values["bias"],
            eps=plan.eps,
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            weight, bias = fold_bn(weight, None, bn)
        return weight, bias, stored
    return weight, values["bias"], stored


def _block_cases(
    train: CheckpointReader, fused: CheckpointReader, options: VerifyOptions, rtol: float
) -> tuple[str, list[CaseResult], list[str]]:
    """Check every block (and the copied tensors) on its own; returns layout, cases, notes."""
    plan, layout = _plan_for(train, fused.tensors, options)
    rng = np.random.default_rng(options.seed)
    cases: list[CaseResult] = []
    for block in plan.blocks:
        began = time.perf_counter()
        tensors = load_block(
            block.spec, train.tensors, train.read, plan.eps, plan.source, plan.dialect.kernel_layout
        )
        weight, bias, stored = _fused_values(block, fused, plan, layout, options.layout == "auto")
        check = check_block(
            tensors,
            weight,
            bias,
            stored_dtype=stored,
            rng=rng,
            batch=options.batch,
            compute_dtype=options.dtype,
        )
        c = check.comparison
        cases.append(
            CaseResult(
                name=block.spec.label,
                kind="block",
                passed=c.within(rtol, options.atol),
                max_abs=c.max_abs,
                max_rel=c.max_rel,
                cosine=c.cosine,
                ref_max=c.ref_max,
                allowed=options.atol + rtol * c.ref_max,
                within_rounding=check.within_rounding,
                seconds=time.perf_counter() - began,
            )
        )
    copied, notes = _copied_case(train, fused, plan, options, rtol)
    if copied is not None:
        cases.append(copied)
    return layout, cases, notes


def _copied_case(
    train: CheckpointReader,
    fused: CheckpointReader,
    plan: FusionPlan,
    options: VerifyOptions,
    rtol: float,
) -> tuple[CaseResult | None, list[str]]:
    """Compare the tensors ``fuse`` copies unchanged (classifier, stem, other BNs)."""
    began = time.perf_counter()
    notes: list[str] = []
    explained = set(plan.origins) | set(_required_outputs(plan))
    explained |= {k for b in plan.blocks for k, _ in b.outputs}
    missing = [out for out in plan.origins if out not in fused.tensors]
    if missing:
        notes.append(
            f"{len(missing)} tensor(s) of TRAIN that fusing copies are not in FUSED "
            "(renamed or left out?), "
            f"e.g. {', '.join(repr(k) for k in missing[:_SHOW_KEYS])}"
        )
    extra = [k for k in fused.tensors if k not in explained]
    if extra:
        notes.append(
            f"FUSED holds {len(extra)} tensor(s) that TRAIN does not explain, e.g. "
            f"{', '.join(repr(k) for k in extra[:_SHOW_KEYS])}"
        )
    present = [(out, src) for out, src in plan.origins.items() if out in fused.tensors]
    if not present:
        return None, notes
    worst: tuple[float, str, float, float, float] | None = None  # ratio, key, abs, ref, allowed
    differing: list[str] = []
    cosine = 1.0
    for out, src in present:
        a_info, b_info = train.tensors[src], fused.tensors[out]
        a, b = train.read(src), fused.read(out)
        if a_info.shape != b_info.shape:
            shapes = f"{list(b_info.shape)} in FUSED, {list(a_info.shape)} in TRAIN"
            differing.append(f"'{out}' has shape {shapes}")
            worst = (math.inf, out, math.inf, 0.0, 0.0)
            continue
        if a_info.dtype == b_info.dtype and np.array_equal(a, b):
            continue  # copied bit for bit, as fuse does
        if a_info.dtype not in dtypes.FLOAT_DTYPES or b_info.dtype not in dtypes.FLOAT_DTYPES:
            differing.append(f"'{out}' ({a_info.dtype} in TRAIN, {b_info.dtype} in FUSED) differs")
            worst = (math.inf, out, math.inf, 0.0, 0.0)
            continue
        c = compare_outputs(dtypes.to_float64(a, a_info.dtype), dtypes.to_float64(b, b_info.dtype))
        allowed = options.atol + rtol * c.ref_max
        ratio = c.max_abs / allowed if allowed > 0 else (0.0 if c.max_abs == 0 else math.inf)
        if not c.within(rtol, options.atol):
            differing.append(f"'{out}' (max_abs {c.max_abs:.3g})")
        if worst is None or ratio > worst[0]:
            worst = (ratio, out, c.max_abs, c.ref_max, allowed)
        cosine = min(cosine, c.cosine)
    if worst is None:
        worst = (0.0, "", 0.0, 0.0, options.atol)
    _, key, max_abs, ref_max, allowed = worst
    detail = (
        f"{len(differing)} differ: {'; '.join(differing[:_SHOW_KEYS])}"
        if differing
        else f"worst: '{key}'"
        if key
        else ""
    )
    return (
        CaseResult(
            name=f"copied tensors ({len(present)})",
            kind="tensors",
            passed=not differing,
            max_abs=max_abs,
            max_rel=max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf),
            cosine=cosine,
            ref_max=ref_max,
            allowed=allowed,
            detail=detail,
            seconds=time.perf_counter() - began,
        ),
        notes,
    )


def _verify_blocks(
    train: CheckpointReader,
    fused: CheckpointReader,
    options: VerifyOptions,
    rtol: float,
    notes: list[str],
    started: float,
    device: str,
) -> VerifyResult:
    if options.device not in ("auto", "cpu"):
        notes.append(
            f"block mode runs in numpy on the CPU; --device {options.device} only applies "
            "to a network"
        )
    if options.input_shape is not None:
        notes.append(
            "block mode feeds each block its own random input; --input-shape only applies "
            "to a network"
        )
    layout, cases, more = _block_cases(train, fused, options, rtol)
    return VerifyResult(
        train=str(train.path),
        fused=str(fused.path),
        mode="blocks",
        arch=None,
        arch_detected=False,
        model=None,
        layout=layout,
        device="cpu",
        dtype=options.dtype,
        rtol=rtol,
        atol=options.atol,
        seed=options.seed,
        batch=options.batch,
        input="random",
        input_shape=None,
        cases=tuple(cases),
        notes=(*notes, *more),
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- network mode


def _state_dict(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """A reader's tensors as torch tensors on the CPU (bfloat16 from its bit patterns)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, info in reader.tensors.items():
        array = np.array(reader.read(name))  # a writable copy: readers may hand out file views
        tensor = torch.from_numpy(array)
        out[name] = tensor.view(torch.bfloat16) if info.dtype == "bfloat16" else tensor
    return out


def _describe_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:_SHOW_KEYS])
    return shown + (f" and {len(keys) - _SHOW_KEYS} more" if len(keys) > _SHOW_KEYS else "")


def _key_misfit(net: nn.Module, given: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """Keys the net needs that ``given`` lacks, and keys ``given`` has that the net does not."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in given and not k.endswith(_COUNTER_SUFFIX)]
    unexpected = [k for k in given if k not in expected and k not in _NON_WEIGHT_KEYS]
    return missing, unexpected


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


def _load_factory(spec: str) -> Callable[..., Any]:
    """``path/to/file.py:make`` or ``package.module:make`` -> the callable."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UsageError(
            f"--model '{spec}': expected path/to/file.py:factory or package.module:factory"
        )
    looks_like_file = target.endswith(".py") or "/" in target or "\\" in target
    try:
        if looks_like_file:
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"--model '{spec}': no file '{target}'")
            name = f"_acnet_verify_model_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise UsageError(f"--model '{spec}': '{target}' cannot be imported as Python")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
            try:
                module_spec.loader.exec_module(module)
            finally:
                with contextlib.suppress(ValueError):
                    sys.path.remove(str(path.resolve().parent))
        else:
            module = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(
            f"--model '{spec}': importing '{target}' failed: {type(err).__name__}: {err}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--model '{spec}': '{target}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--model '{spec}': '{attr}' is not callable")
    return obj  # type: ignore[no-any-return]


def _takes_deploy(factory: Callable[..., Any]) -> bool:
    try:
        return "deploy" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _call_factory(factory: Callable[..., Any], spec: str, kwargs: dict[str, Any]) -> nn.Module:
    from torch import nn

    try:
        net = factory(**kwargs)
    except Exception as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UsageError(
            f"--model '{spec}': calling it with ({shown}) failed: {type(err).__name__}: {err}; "
            "check --model-arg"
        ) from err
    if not isinstance(net, nn.Module):
        raise UsageError(
            f"--model '{spec}': returned a {type(net).__name__}, not a torch.nn.Module"
        )
    return net


def _to_deploy_keys(
    train: CheckpointReader, fused_state: Mapping[str, torch.Tensor], options: VerifyOptions
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """FUSED in the baseline or baseline-bias layout, rewritten as ``<p>.fused_conv.*``
    (the baseline's identity BN folded into the conv), or None where neither fits."""
    import torch

    layouts = ("baseline", "baseline-bias") if options.layout == "auto" else (options.layout,)
    for layout in layouts:
        if layout == "deploy":
            continue
        try:
            plan = plan_fusion(
                train, FuseOptions(layout=layout, dialect=options.dialect, eps=options.eps)
            )
        except ACNetConvertError:
            continue
        if not all(k in fused_state for k in _required_outputs(plan)):
            continue
        state = dict(fused_state)
        for block in plan.blocks:
            values = {role: state.pop(key) for key, role in block.outputs if key in state}
            f64 = {
                role: v.to(torch.float64).numpy()
                for role, v in values.items()
                if role != "bn_count"
            }
            weight, bias = f64["weight"], f64["bias"]
            if layout == "baseline":
                bn = BNStats(f64["bn_mean"], f64["bn_var"], f64["bn_weight"], f64["bias"], plan.eps)
                with np.errstate(invalid="ignore", divide="ignore"):
                    weight, bias = fold_bn(weight, None, bn)
            state[block.spec.fused_weight] = torch.from_numpy(np.ascontiguousarray(weight))
            state[block.spec.fused_bias] = torch.from_numpy(np.ascontiguousarray(bias))
        return layout, state
    return None


@dataclass
class _Nets:
    train: nn.Module
    deployed: nn.Module
    layout: str
    default_shape: tuple[int, ...] | None
    label: str
    notes: list[str]


def _build_nets(
    train: CheckpointReader,
    fused: CheckpointReader,
    options: VerifyOptions,
    arch: str | None,
    dtype: torch.dtype,
) -> _Nets:
    """Both nets, in ``dtype`` on the CPU, with TRAIN and FUSED loaded strictly."""
    from acnet_convert.nn import switch_to_deploy

    notes: list[str] = []
    train_state = _state_dict(train)
    fused_state = _state_dict(fused)
    deploy_forms: list[tuple[str, Callable[[], nn.Module]]]
    if arch is not None:
        from acnet_convert import zoo

        spec = _arch_spec(arch)
        label = f"the built-in architecture '{arch}'"
        train_net = zoo.build_arch(arch, "train")
        default_shape: tuple[int, ...] | None = tuple(spec.input_shape)
        deploy_forms = [
            ("deploy", lambda: zoo.build_arch(arch, "deploy")),
            ("baseline", lambda: zoo.build_arch(arch, "baseline")),
        ]
        train_hint = "is --arch right? Without --arch, verify checks block by block"
    else:
        model = options.model or ""
        factory = _load_factory(model)
        kwargs = dict(options.model_args)
        label = f"the model from --model '{model}'"
        train_net = _call_factory(factory, model, kwargs)
        default_shape = None
        train_hint = "does --model build the network TRAIN was trained with (check --model-arg)?"
        if _takes_deploy(factory):
            deploy_forms = [
                ("deploy", lambda: _call_factory(factory, model, {**kwargs, "deploy": True}))
            ]
        else:

            def derived() -> nn.Module:
                net = copy.deepcopy(train_net)
                report = switch_to_deploy(net)
                if report.count == 0:
                    notes.append(
                        "the model has no block (no module with square_conv, hor_conv "
                        "and ver_conv); "
                        "its deployed form is the model itself"
                    )
                return net

            deploy_forms = [("deploy", derived)]

    fused_keys = [k for k in train_state if k.endswith("fused_conv.weight")]
    if fused_keys and not any("square" in k for k in train_state):
        raise BadCheckpointError(
            f"{train.path}: holds fused weights (e.g. '{fused_keys[0]}'), not training-time "
            "branches; give the training checkpoint first: verify TRAIN FUSED"
        )
    train_net.to(dtype=dtype)
    _set_eps(train_net, options.eps)
    _load_strict(train_net, train_state, str(train.path), f"{label} (training form)", train_hint)

    wanted = options.layout
    built: dict[str, nn.Module] = {}

    def form_net(form: str) -> nn.Module:
        if form not in built:
            built[form] = dict(deploy_forms)[form]()
        return built[form]

    forms = [form for form, _ in deploy_forms]
    for form in forms if wanted == "auto" else [f for f in forms if f == wanted]:
        if not any(_key_misfit(form_net(form), fused_state)):
            return _finish(
                train_net,
                form_net(form),
                form,
                form,
                default_shape,
                label,
                notes,
                fused_state,
                fused,
                options,
                dtype,
            )
    rewritten = _to_deploy_keys(train, fused_state, options) if wanted != "deploy" else None
    if rewritten is not None and not any(_key_misfit(form_net("deploy"), rewritten[1])):
        layout, state = rewritten
        notes.append(f"FUSED is in the {layout} layout; its convs were loaded into the deploy form")
        return _finish(
            train_net,
            form_net("deploy"),
            "deploy",
            layout,
            default_shape,
            label,
            notes,
            state,
            fused,
            options,
            dtype,
        )
    closest = min(forms, key=lambda f: sum(len(x) for x in _key_misfit(form_net(f), fused_state)))
    _load_strict(
        form_net(closest),
        fused_state,
        str(fused.path),
        f"{label} ({' or '.join(forms)} form)",
        "was FUSED fused from TRAIN, without --rename? Without --arch/--model, verify checks "
        "it block by block",
    )
    raise AssertionError("unreachable: _load_strict raises on a misfit")  # pragma: no cover


def _finish(
    train_net: nn.Module,
    deployed: nn.Module,
    form: str,
    layout: str,
    default_shape: tuple[int, ...] | None,
    label: str,
    notes: list[str],
    state: Mapping[str, torch.Tensor],
    fused: CheckpointReader,
    options: VerifyOptions,
    dtype: torch.dtype,
) -> _Nets:
    deployed.to(dtype=dtype)
    _set_eps(deployed, options.eps)
    _load_strict(
        deployed, state, str(fused.path), f"{label} ({form} form)", "was FUSED fused from TRAIN?"
    )
    return _Nets(train_net, deployed, layout, default_shape, label, notes)


def _load_input(path: Path) -> torch.Tensor:
    """A batch from ``.npy`` or ``.pt`` (a tensor, loaded with weights_only=True), as float64."""
    import torch

    suffix = path.suffix.lower()
    if not path.is_file():
        raise UsageError(f"--input '{path}': no such file")
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.dtype.kind not in "fiu":
                raise ACNetConvertError(
                    f"{path}: holds {array.dtype} values; an input batch must be numbers"
                )
            tensor = torch.from_numpy(np.asarray(array, dtype=np.float64))
        elif suffix in (".pt", ".pth"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, torch.Tensor):
                raise ACNetConvertError(
                    f"{path}: holds a {type(loaded).__name__}; save a single tensor "
                    "(torch.save(x, ...))"
                )
            if loaded.is_complex() or loaded.dtype == torch.bool:
                raise ACNetConvertError(
                    f"{path}: holds {loaded.dtype} values; an input batch must be real numbers"
                )
            tensor = loaded.detach().to(torch.float64)
        else:
            raise UsageError(f"--input '{path}': use a .npy file or a .pt file holding one tensor")
    except ACNetConvertError:
        raise
    except Exception as err:
        raise ACNetConvertError(
            f"{path}: cannot be read as an input batch: {type(err).__name__}: {err}"
        ) from err
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.numel() == 0:
        raise ACNetConvertError(
            f"{path}: has shape {list(tensor.shape)}; expected a batch [N, C, H, W] "
            "(or one [C, H, W])"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ACNetConvertError(f"{path}: holds NaN or Inf; the input batch must be finite")
    return tensor


@contextlib.contextmanager
def _exact_math(device: str) -> Iterator[None]:
    """On CUDA, TF32 off for the duration, so the comparison measures the conversion."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _outputs(value: Any, what: str) -> list[tuple[str, torch.Tensor]]:
    """A forward's result as named tensors: one tensor, or a tuple/list/dict of them."""
    import torch

    if isinstance(value, torch.Tensor):
        return [("network", value)]
    if isinstance(value, Mapping):
        items = [(f"network[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, tuple | list):
        items = [(f"network[{i}]", v) for i, v in enumerate(value)]
    else:
        items = []
    if not items or not all(isinstance(v, torch.Tensor) for _, v in items):
        raise UsageError(
            f"{what} returned a {type(value).__name__}; verify compares tensors "
            "(or tuples/dicts of them)"
        )
    return items


def _run(net: nn.Module, x: torch.Tensor, what: str) -> Any:
    try:
        return net(x)
    except Exception as err:
        raise ACNetConvertError(
            f"running {what} on an input of shape {list(x.shape)} failed: "
            f"{type(err).__name__}: {err}; "
            "check --input-shape / --input"
        ) from err


def _verify_network(
    train: CheckpointReader,
    fused: CheckpointReader,
    options: VerifyOptions,
    rtol: float,
    arch: str | None,
    detected: bool,
    notes: list[str],
    started: float,
    device: str,
) -> VerifyResult:
    import torch

    dtype = torch.float64 if options.dtype == "float64" else torch.float32
    nets = _build_nets(train, fused, options, arch, dtype)
    notes.extend(nets.notes)
    if options.input_path is not None:
        x = _load_input(options.input_path)
        source = str(options.input_path)
    else:
        shape = options.input_shape or nets.default_shape
        if shape is None:
            raise UsageError(
                "--model needs --input-shape C,H,W (or --input FILE) to make an input batch"
            )
        generator = torch.Generator().manual_seed(options.seed)
        x = torch.randn((options.batch, *shape), generator=generator, dtype=torch.float64)
        source = "random"
    input_shape = tuple(int(s) for s in x.shape[1:])
    cases: list[CaseResult] = []
    with _exact_math(device), torch.inference_mode():
        train_net = nets.train.to(device).eval()
        deployed = nets.deployed.to(device).eval()
        x = x.to(device=device, dtype=dtype)
        began = time.perf_counter()
        reference = _outputs(_run(train_net, x, f"{nets.label} (training form)"), nets.label)
        got = _outputs(_run(deployed, x, f"{nets.label} ({nets.layout} form)"), nets.label)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        if [n for n, _ in reference] != [n for n, _ in got]:
            raise ACNetConvertError(
                f"{nets.label}: the training and deployed forms return different outputs"
            )
        for (name, ref), (_, out) in zip(reference, got, strict=True):
            if tuple(ref.shape) != tuple(out.shape):
                raise ACNetConvertError(
                    f"{nets.label}: output {name} has shape {list(ref.shape)} in training form "
                    f"but {list(out.shape)} deployed"
                )
            ref64 = ref.detach().to("cpu", torch.float64).numpy()
            out64 = out.detach().to("cpu", torch.float64).numpy()
            if not np.all(np.isfinite(ref64)):
                raise ACNetConvertError(
                    f"{train.path}: the training-time net's output {name} holds NaN or Inf "
                    "on this input, "
                    "so there is nothing to compare with; check TRAIN's weights and BN statistics"
                )
            top1 = None
            if ref64.ndim == 2 and ref64.shape[1] > 1:
                top1 = float(np.mean(ref64.argmax(axis=1) == out64.argmax(axis=1)))
            cases.append(
                _case(
                    name,
                    "network",
                    ref64,
                    out64,
                    rtol,
                    options.atol,
                    top1_agreement=top1,
                    seconds=seconds,
                )
            )
    block_checks: list[CaseResult] = []
    try:
        _, block_checks, _ = _block_cases(train, fused, options, rtol)
    except ACNetConvertError as err:
        notes.append(f"the per-block check could not run, so only the network was compared: {err}")
    return VerifyResult(
        train=str(train.path),
        fused=str(fused.path),
        mode="arch" if arch is not None else "model",
        arch=arch,
        arch_detected=detected,
        model=options.model,
        layout=nets.layout,
        device=device,
        dtype=options.dtype,
        rtol=rtol,
        atol=options.atol,
        seed=options.seed,
        batch=int(x.shape[0]),
        input=source,
        input_shape=input_shape,
        cases=tuple(cases),
        block_checks=tuple(block_checks),
        notes=tuple(notes),
        seconds=time.perf_counter() - started,
    )


def raise_for_result(result: VerifyResult) -> None:
    """Raise :class:`VerificationError` naming the offending checks when ``result`` failed."""
    if not result.passed:
        raise VerificationError(result.failure_message())
