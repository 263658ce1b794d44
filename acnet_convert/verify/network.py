"""Network modes (``arch`` and ``model``): both nets run on one batch and their outputs compared."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from acnet_convert.checkpoint import CheckpointReader
from acnet_convert.errors import (
    ACNetConvertError,
    UsageError,
)
from acnet_convert.verify.blockmode import _block_cases
from acnet_convert.verify.loading import _build_nets
from acnet_convert.verify.options import VerifyOptions
from acnet_convert.verify.results import CaseResult, VerifyResult, _case

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = []


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


def _network_input(
    options: VerifyOptions, default_shape: tuple[int, ...] | None
) -> tuple[torch.Tensor, str]:
    """The input batch and where it came from: the --input file or "random"."""
    import torch

    if options.input_path is not None:
        return _load_input(options.input_path), str(options.input_path)
    shape = options.input_shape or default_shape
    if shape is None:
        raise UsageError(
            "--model needs --input-shape C,H,W (or --input FILE) to make an input batch"
        )
    generator = torch.Generator().manual_seed(options.seed)
    x = torch.randn((options.batch, *shape), generator=generator, dtype=torch.float64)
    return x, "random"


def _compare_outputs(
    train: CheckpointReader,
    label: str,
    reference: list[tuple[str, torch.Tensor]],
    got: list[tuple[str, torch.Tensor]],
    rtol: float,
    atol: float,
    seconds: float,
) -> list[CaseResult]:
    """One network case per output of the training form against the deployed form."""
    import torch

    if [n for n, _ in reference] != [n for n, _ in got]:
        raise ACNetConvertError(
            f"{label}: the training and deployed forms return different outputs"
        )
    cases: list[CaseResult] = []
    for (name, ref), (_, out) in zip(reference, got, strict=True):
        if tuple(ref.shape) != tuple(out.shape):
            raise ACNetConvertError(
                f"{label}: output {name} has shape {list(ref.shape)} in training form "
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
            _case(name, "network", ref64, out64, rtol, atol, top1_agreement=top1, seconds=seconds)
        )
    return cases


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
    x, source = _network_input(options, nets.default_shape)
    input_shape = tuple(int(s) for s in x.shape[1:])
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
        cases = _compare_outputs(train, nets.label, reference, got, rtol, options.atol, seconds)
    block_checks: list[CaseResult] = []
    try:
        _, block_checks = _block_cases(train, fused, options, rtol)
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
