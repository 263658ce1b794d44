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

import time
from pathlib import Path

from acnet_convert import dtypes
from acnet_convert.checkpoint import CheckpointReader, open_checkpoint
from acnet_convert.errors import ACNetConvertError, UnfusableBlockError, UsageError
from acnet_convert.plan import FuseOptions, plan_fusion
from acnet_convert.verify.archs import _choose_arch
from acnet_convert.verify.blockmode import _verify_blocks
from acnet_convert.verify.junit import junit_error_xml, junit_xml
from acnet_convert.verify.network import _verify_network
from acnet_convert.verify.options import (
    COMPUTE_DTYPES,
    DEFAULT_RTOL,
    LAYOUT_CHOICES,
    VerifyOptions,
    _check_options,
    resolve_device,
)
from acnet_convert.verify.results import CaseResult, VerifyResult, raise_for_result
from acnet_convert.zoo import ArchRow, arch_rows

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
    "raise_for_result",
    "resolve_device",
    "verify_checkpoints",
]


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
        try:
            if arch is None and not options.model:
                return _verify_blocks(t_reader, f_reader, options, rtol, notes, started, device)
            return _verify_network(
                t_reader, f_reader, options, rtol, arch, detected, notes, started, device
            )
        except UnfusableBlockError as error:
            _refuse_if_swapped(t_reader, f_reader, options, error)
            raise


def _refuse_if_swapped(
    train: CheckpointReader, fused: CheckpointReader, options: VerifyOptions, error: Exception
) -> None:
    """TRAIN has no block that fuses but FUSED has: the arguments were given the wrong way round."""
    try:
        plan_fusion(fused, FuseOptions(trust_pickle=options.trust_pickle))
    except ACNetConvertError:
        return
    raise UsageError(
        f"the arguments look swapped: {train.path} (TRAIN) holds no training-time block but "
        f"{fused.path} (FUSED) does; run 'acnet-convert verify {fused.path} {train.path}'"
    ) from error


def _effective_rtol(options: VerifyOptions, fused: CheckpointReader) -> float:
    if options.rtol is not None:
        return options.rtol
    stored = {t.dtype for t in fused.tensors.values() if t.dtype in dtypes.FLOAT_DTYPES}
    return max([DEFAULT_RTOL[options.dtype], *(DEFAULT_RTOL[d] for d in stored)])
