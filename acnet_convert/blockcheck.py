"""Numerical check of one fused block against its training-time branches.

The reference runs every branch on its own (cropped input, eval-mode BN, in
float64: :func:`acnet_convert.fusion.reference_outputs`); the candidate is a
single conv with the fused weights as stored. Used by ``fuse`` before it
writes anything and by ``verify`` in per-block mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acnet_convert import dtypes
from acnet_convert.fusion import (
    BlockTensors,
    Comparison,
    compare_outputs,
    conv_outputs,
    reference_outputs,
    rounding_bound,
)

__all__ = ["BlockCheck", "check_block"]

# Slack for float64 arithmetic on both sides (sums over up to ~1e5 products).
_F64_SLACK = 1e-9


@dataclass(frozen=True)
class BlockCheck:
    """How a fused block compares with its branches; ``within_rounding`` says
    whether every output lies inside the error bound that rounding the fused
    weights to their storage dtype (and computing in ``compute_dtype``) allows."""

    comparison: Comparison
    within_rounding: bool
    rounding_rel: float


def check_block(
    block: BlockTensors,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    stored_dtype: str,
    rng: np.random.Generator,
    batch: int = 2,
    margin: int = 0,
    compute_dtype: str = "float64",
) -> BlockCheck:
    """Run the branches and the fused conv on the same random input and compare.

    Args:
        block: the training-time block (float64).
        weight, bias: the fused conv as stored, widened to float64 (OIHW).
        stored_dtype: dtype the fused values were stored in; sets the bound.
        rng: source of the random input (standard normal).
        batch: number of random inputs.
        margin: extra rows/columns beyond the kernel size (0: a 1x1 output
            per input, which already exercises every kernel entry).
        compute_dtype: dtype the fused conv is evaluated in.

    Returns:
        The comparison, and whether it lies within the rounding bound
        ``(u_stored + u_compute * fan_in + slack) * (|x| * |W| + |b|)``
        evaluated per output element.
    """
    _, in_per_group, kh, kw = block.target
    x = rng.standard_normal((batch, in_per_group, kh + margin, kw + margin))
    reference = reference_outputs(block, x)
    np_compute = dtypes.numpy_dtype(compute_dtype)
    got = conv_outputs(
        weight.astype(np_compute, copy=False),
        bias.astype(np_compute, copy=False),
        x.astype(np_compute, copy=False),
    )
    fan_in = int(np.prod(weight.shape[1:]))
    unit = dtypes.unit_roundoff(stored_dtype) + dtypes.unit_roundoff(compute_dtype) * fan_in
    allowed = (unit + _F64_SLACK) * rounding_bound(weight, bias, x)
    error = np.abs(got.astype(np.float64) - reference)
    # A fused value that overflowed its dtype makes the bound infinite too: never within.
    within = bool(np.all(np.isfinite(got)) and np.all(error <= allowed))
    comparison = compare_outputs(reference, got)
    scale = float(np.max(allowed)) / comparison.ref_max if comparison.ref_max > 0 else 0.0
    return BlockCheck(comparison=comparison, within_rounding=within, rounding_rel=scale)
