"""What ``verify`` can be told, and the checks on it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acnet_convert.errors import (
    ACNetConvertError,
    UsageError,
)
from acnet_convert.plan import LAYOUTS

__all__ = [
    "COMPUTE_DTYPES",
    "DEFAULT_RTOL",
    "LAYOUT_CHOICES",
    "VerifyOptions",
    "resolve_device",
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

# How many keys a message names before "and N more".
_SHOW_KEYS = 5


@dataclass(frozen=True)
class VerifyOptions:
    """Everything ``verify`` can be told.

    ``arch``/``model`` pick the network mode (neither: an architecture is
    detected from TRAIN's keys, else block mode; ``blocks`` forces block
    mode). ``model_args`` are keyword arguments for the model factory.
    ``layout`` is FUSED's layout (``auto``: found from its keys); ``dialect``
    and ``eps`` are as for ``fuse``. ``rtol`` None means :data:`DEFAULT_RTOL`.
    ``input_shape`` is ``(C, H, W)``; ``input_path`` a ``.npy`` or ``.pt``
    batch that replaces the random one. ``allow_extra`` lets FUSED hold
    tensors that TRAIN does not explain (block mode; they fail the check otherwise).
    ``extra_dialects`` (``--patterns``) and ``renames`` (``--rename``) are as
    for ``fuse``; where FUSED records how it was written (provenance: dialect,
    layout, renames, eps, --fold-bn) that is used for what is not given here.
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
    allow_extra: bool = False
    extra_dialects: tuple[Any, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()


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
