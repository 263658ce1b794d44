"""PyTorch .pth checkpoints, read and written without importing torch.

The package is split by job:

- :mod:`.unpickler`: the restricted unpickler, the security boundary (what a
  pickle may name, and the inert stand-ins it gets instead of torch objects);
- :mod:`.reader`: :class:`PthReader`, which indexes and checks every tensor
  before reading a byte (``torch.load`` only for legacy and trusted files);
- :mod:`.writer`: :func:`write_pth`, the pickle writer and the state layout;
- :mod:`.zipfmt`: the zip records, read (spans) and written (aligned, zip64).
"""

from __future__ import annotations

# The public names, and those that lived in the single pth.py module before the split.
from ..base import contiguous_strides as _contiguous_strides  # noqa: F401
from ..sniff import ZIP_MAGIC as _ZIP_MAGIC  # noqa: F401
from .reader import PthReader, _Located, _torch_to_numpy, _weights_only_reason  # noqa: F401
from .unpickler import STORAGE_DTYPES as _STORAGE_DTYPES  # noqa: F401
from .unpickler import TORCH_DTYPES as _TORCH_DTYPES  # noqa: F401
from .unpickler import TRUST_ADVICE as _TRUST_ADVICE  # noqa: F401
from .unpickler import DType as _DType  # noqa: F401
from .unpickler import RestrictedUnpickler as _RestrictedUnpickler  # noqa: F401
from .unpickler import StorageRef as _StorageRef  # noqa: F401
from .unpickler import StorageType as _StorageType  # noqa: F401
from .unpickler import TensorRef as _TensorRef  # noqa: F401
from .unpickler import allowed_global as _allowed_global  # noqa: F401
from .writer import _PickleWriter, _state_pickle, write_pth  # noqa: F401
from .zipfmt import _ZIP64_LIMIT  # noqa: F401
from .zipfmt import ZipWriter as _ZipWriter  # noqa: F401

__all__ = ["PthReader", "write_pth"]
