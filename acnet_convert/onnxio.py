"""The ONNX side of ``export``: torch.onnx, the graph's figures, and ONNX Runtime.

The exporter is torch.onnx's ``dynamo=True`` one (``torch.export`` captures the
graph, onnxscript translates and optimises it). On torch 2.13 it gives the same
graph as the TorchScript exporter for every built-in architecture (the same
Conv, Relu, Add, pooling and Gemm nodes; BN after a plain conv folded in), and
it fails closed where tracing would not: a forward whose control flow depends
on the data raises instead of being recorded along one branch, and the
TorchScript exporter is deprecated there. README's "Export to ONNX" has the
measurements.

Needs the ``export`` extra (onnx, onnxruntime, onnxscript); importing this
module does not import any of them, or torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from acnet_convert.errors import ACNetConvertError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "EXPORTER",
    "MIN_OPSET",
    "conv_kernels",
    "export_graph",
    "graph_batch_axes",
    "graph_nodes",
    "load_graph",
    "max_opset",
    "require_export_extra",
    "run_onnx",
]

EXPORTER = "torch.onnx (dynamo=True, torch.export)"
MIN_OPSET = 14  # below, torch 2.13's exporter silently keeps its own opset 18
_EXTRA_HINT = "pip install 'acnet-convert[export]' (torch, onnx, onnxruntime, onnxscript)"
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")


def require_export_extra() -> None:
    """Raise UsageError naming the extra to install when torch, onnx, onnxruntime or
    onnxscript is missing."""
    import importlib.util

    missing = [
        name
        for name in ("torch", "onnx", "onnxruntime", "onnxscript")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise UsageError(
            f"export needs {', '.join(missing)}, which are not installed: {_EXTRA_HINT}"
        )


def max_opset() -> int:
    """The newest opset both onnx and this exporter know."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx reports progress and warnings on stdout/stderr; the library never prints."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in _QUIET_LOGGERS]
    sink = io.StringIO()
    try:
        for logger, _ in saved:
            logger.setLevel(logging.CRITICAL)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def export_graph(
    net: nn.Module, example: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool
) -> None:
    """Export ``net`` (eval mode) to one self-contained ONNX file at ``path``.

    Input ``input`` [N, C, H, W], outputs ``output`` (or ``output_0``, ...);
    with ``dynamic_batch`` the first axis of each is symbolic.

    Raises:
        ACNetConvertError: the net cannot be exported (named with the cause).
    """
    import torch

    dims = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with _quiet():
            program = torch.onnx.export(
                net,
                (example,),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dims,
                input_names=["input"],
                verbose=False,
                optimize=True,
                external_data=False,
            )
            if program is None:  # pragma: no cover - dynamo=True always returns a program
                raise ACNetConvertError("torch.onnx.export returned no program")
            program.save(str(path), external_data=False)
    except ACNetConvertError:
        raise
    except Exception as err:
        raise ACNetConvertError(
            f"torch.onnx could not export the deployed net: {_root_cause(err)}; "
            "export needs a forward torch.export can capture (no data-dependent control flow)"
        ) from err
    sidecar = path.with_name(path.name + ".data")
    if sidecar.exists():  # pragma: no cover - external_data=False writes none
        sidecar.unlink()
        raise ACNetConvertError(f"torch.onnx wrote the weights beside {path}, not inside it")


def load_graph(path: Path) -> Any:
    """The ONNX model at ``path``, checked (weights inside, valid graph)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ACNetConvertError(
            f"the exported graph keeps {len(external)} tensor(s) outside the file "
            f"(e.g. '{external[0]}'); over 2 GiB of weights cannot be one .onnx file"
        )
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ACNetConvertError(
            f"the exported graph is not valid ONNX: {_root_cause(err)}"
        ) from err
    return model


def graph_nodes(model: Any) -> dict[str, int]:
    """Node counts by op type (the main graph, as onnx-simplifier counts them), most first."""
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def graph_batch_axes(model: Any) -> list[str | int]:
    """The first axis of each graph input: a name where symbolic, else its size."""
    axes: list[str | int] = []
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            axes.append(dims[0].dim_param or int(dims[0].dim_value))
    return axes


def conv_kernels(model: Any) -> list[tuple[str, np.ndarray, str | None]]:
    """Every Conv node's weight (an initializer), as ``(name, OIHW kernel, node name)``."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    out: list[tuple[str, np.ndarray, str | None]] = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        out.append((node.input[1], weight, node.name or None))
    return out


def run_onnx(path: Path, batch: np.ndarray) -> list[np.ndarray]:
    """Run the graph at ``path`` with ONNX Runtime's CPU provider on ``batch``.

    Raises:
        ACNetConvertError: ONNX Runtime cannot load or run the graph.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not ours to print
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name
        outputs: Sequence[Any] = session.run(None, {name: batch})
    except Exception as err:
        raise ACNetConvertError(
            f"ONNX Runtime cannot run the exported graph on a batch of shape "
            f"{list(batch.shape)}: {_root_cause(err)}"
        ) from err
    return [np.asarray(o) for o in outputs]
