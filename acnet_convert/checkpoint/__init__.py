"""Checkpoint files: one reader and one writer per format, chosen by content.

>>> from acnet_convert.checkpoint import open_checkpoint   # doctest: +SKIP
>>> with open_checkpoint(Path("train.safetensors")) as ckpt:  # doctest: +SKIP
...     print(list(ckpt.tensors))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from acnet_convert.errors import BadCheckpointError, UsageError

from .base import CheckpointReader, Container, RawBytes, TensorInfo

__all__ = [
    "FORMATS",
    "CheckpointReader",
    "Container",
    "RawBytes",
    "TensorInfo",
    "format_for_path",
    "open_checkpoint",
    "write_checkpoint",
]

FORMATS = ("pth", "hdf5", "safetensors", "pdparams")
_EXTENSIONS = {
    ".pth": "pth",
    ".pt": "pth",
    ".ckpt": "pth",
    ".bin": "pth",
    ".tar": "pth",
    ".hdf5": "hdf5",
    ".h5": "hdf5",
    ".safetensors": "safetensors",
    ".pdparams": "pdparams",
}


def format_for_path(path: Path, explicit: str | None = None) -> str:
    """The output format: ``explicit`` if given, else from the extension."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise UsageError(f"unknown format '{explicit}'; choose one of {', '.join(FORMATS)}")
        return explicit
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"cannot tell the output format from '{path.name}'; use an extension "
            f"({', '.join(sorted(_EXTENSIONS))}) or --to {{{','.join(FORMATS)}}}"
        )
    return fmt


def open_checkpoint(path: Path, *, trust_pickle: bool = False) -> CheckpointReader:
    """Open a checkpoint of any supported format, detected from its content.

    Raises:
        BadCheckpointError: missing, unreadable, corrupt or unknown content.
        UnsafeCheckpointError: a .pth that needs full unpickling while
            ``trust_pickle`` is False.
    """
    from .sniff import sniff_format

    kind = sniff_format(path)
    if kind == "safetensors":
        from .safetensors_io import SafetensorsReader

        return SafetensorsReader(path)
    if kind == "keras":
        from .keras3 import Keras3Reader

        return Keras3Reader(path)
    if kind == "hdf5":
        from .hdf5_io import Hdf5Reader
        from .keras3 import Keras3Reader, is_keras3_weights

        return Keras3Reader(path) if is_keras3_weights(path) else Hdf5Reader(path)
    if kind == "pdparams":
        from .pdparams import PdparamsReader

        return PdparamsReader(path, trust_pickle=trust_pickle)
    from .pth import PthReader

    return PthReader(path, trust_pickle=trust_pickle)


def _require_utf8(fmt: str, names: Sequence[str], metadata: dict[str, str]) -> None:
    """safetensors and HDF5 store names as UTF-8: refuse text that has no UTF-8 form."""
    for what, text in (
        *(("tensor name", n) for n in names),
        *(("metadata key", k) for k in metadata),
        *((f"metadata '{k}'", v) for k, v in metadata.items()),
    ):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadCheckpointError(
                f"{what} {text!r} holds a lone surrogate ({text[err.start]!r}), which {fmt} "
                "cannot store (it needs UTF-8); rename it (--rename) or write .pth"
            ) from err


def write_checkpoint(
    path: Path,
    fmt: str,
    tensors: Sequence[TensorInfo],
    produce: Callable[[str], np.ndarray | RawBytes],
    *,
    container: Container,
    metadata: dict[str, str],
    source: CheckpointReader | None = None,
    writer_state: object | None = None,
) -> None:
    """Write ``tensors`` (values from ``produce``, called once each, in order) as ``fmt``.

    ``produce`` returns an array, or :class:`RawBytes` from an open reader
    (see :meth:`CheckpointReader.raw`) that the writer copies file to file.

    The container (wrapper keys, ``module.`` prefix, plain extras) is kept
    where the format can hold it; ``metadata`` goes where the format has room
    (safetensors ``__metadata__``, HDF5 root attributes). ``writer_state``,
    when given, is what ``source.writer_state`` returned: it replaces the
    format's own bookkeeping of ``source`` (Keras' layer list).
    """
    if fmt in ("safetensors", "hdf5"):
        _require_utf8(fmt, [container.prefix + t.name for t in tensors], metadata)
    if fmt == "safetensors":
        from .safetensors_io import write_safetensors

        write_safetensors(path, tensors, produce, metadata, prefix=container.prefix)
    elif fmt == "hdf5":
        from .hdf5_io import KerasAttrs, write_hdf5

        flavour = (
            getattr(source, "flavour", "flat")
            if source is not None and source.format == "hdf5"
            else "flat"
        )
        if writer_state is None and source is not None:
            writer_state = source.writer_state({})
        write_hdf5(
            path,
            tensors,
            produce,
            metadata,
            flavour=flavour,
            prefix=container.prefix,
            keras_attrs=writer_state
            if flavour == "keras" and isinstance(writer_state, KerasAttrs)
            else None,
        )
    elif fmt == "pth":
        from .pth import write_pth

        write_pth(path, tensors, produce, container)
    elif fmt == "pdparams":
        from .pdparams import write_pdparams

        write_pdparams(path, tensors, produce)
    else:
        raise UsageError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
