"""A block with a sequential (DBB ``dbb_1x1_kxk``) branch fuses slab by slab exactly as whole."""

from __future__ import annotations

import numpy as np
import pytest

from acnet_convert.blockcheck import check_block
from acnet_convert.fusion import BlockTensors, BNStats, Branch, fuse_block, reference_outputs


def _bn(rng: np.random.Generator, c: int) -> BNStats:
    return BNStats(
        mean=rng.standard_normal(c),
        var=rng.uniform(0.5, 2.0, c),
        weight=rng.standard_normal(c),
        bias=rng.standard_normal(c),
        eps=1e-5,
    )


def _rows(bn: BNStats, rows: slice) -> BNStats:
    assert bn.weight is not None and bn.bias is not None
    return BNStats(bn.mean[rows], bn.var[rows], bn.weight[rows], bn.bias[rows], bn.eps)


def _block(
    out: int, groups: int, idconv: bool, seed: int
) -> tuple[dict[str, np.ndarray | BNStats], int, int]:
    rng = np.random.default_rng(seed)
    in_per_group = out // groups
    mid = out if idconv else 2 * out
    parts: dict[str, np.ndarray | BNStats] = {
        "origin": rng.standard_normal((out, in_per_group, 3, 3)),
        "origin_bn": _bn(rng, out),
        "k1": rng.standard_normal((mid, in_per_group, 1, 1)),
        "bn1": _bn(rng, mid),
        "k2": rng.standard_normal((out, mid // groups, 3, 3)),
        "bn2": _bn(rng, out),
    }
    return parts, out, mid


def _slab(
    parts: dict[str, np.ndarray | BNStats], rows: slice, out: int, idconv: bool
) -> BlockTensors:
    def arr(name: str) -> np.ndarray:
        value = parts[name]
        assert isinstance(value, np.ndarray)
        return value

    def bn(name: str) -> BNStats:
        value = parts[name]
        assert isinstance(value, BNStats)
        return value

    pre = Branch(
        arr("k1"), None, bn("bn1"), implicit_identity=idconv
    )  # whole, as load_block reads it
    seq = Branch(
        arr("k2")[rows], None, _rows(bn("bn2"), rows), kind="seq", pre=pre, out_channels=out
    )
    square = Branch(arr("origin")[rows], None, _rows(bn("origin_bn"), rows))
    return BlockTensors(square=square, others=(seq,), first_channel=rows.start)


@pytest.mark.parametrize(("groups", "idconv"), [(1, True), (1, False), (2, True), (4, False)])
@pytest.mark.parametrize("rows_per_slab", [1, 3, 5, 8])
def test_seq_block_slabs_fuse_bit_identical_to_whole(
    groups: int, idconv: bool, rows_per_slab: int
) -> None:
    parts, out, _ = _block(16, groups, idconv, seed=7 * groups + rows_per_slab)
    whole_w, whole_b = fuse_block(_slab(parts, slice(0, out), out, idconv))
    got_w, got_b = np.empty_like(whole_w), np.empty_like(whole_b)
    for start in range(0, out, rows_per_slab):  # slabs that cross group boundaries too
        rows = slice(start, min(start + rows_per_slab, out))
        got_w[rows], got_b[rows] = fuse_block(_slab(parts, rows, out, idconv))
    assert got_w.tobytes() == whole_w.tobytes()
    assert got_b.tobytes() == whole_b.tobytes()


@pytest.mark.parametrize(("groups", "idconv"), [(1, True), (2, True), (4, False)])
def test_seq_slab_reference_and_check_per_slab(groups: int, idconv: bool) -> None:
    parts, out, _ = _block(16, groups, idconv, seed=groups)
    whole = _slab(parts, slice(0, out), out, idconv)
    x = np.random.default_rng(0).standard_normal((2, whole.target[1], 3, 3))
    expected = reference_outputs(whole, x)
    w, b = fuse_block(whole)
    for start in range(0, out, 5):
        rows = slice(start, min(start + 5, out))
        block = _slab(parts, rows, out, idconv)
        np.testing.assert_allclose(reference_outputs(block, x), expected[:, rows], rtol=1e-12)
        check = check_block(
            block, w[rows], b[rows], stored_dtype="float64", rng=np.random.default_rng(1)
        )
        assert check.within_rounding
        # a slab fused as if it were rows 0.. of its groups (the group guard ignored) fails the check
        wrong = fuse_block(_slab(parts, slice(0, rows.stop - rows.start), out, idconv))
        if groups > 1 and start // (out // groups) != 0:
            bad = check_block(
                block, wrong[0], wrong[1], stored_dtype="float64", rng=np.random.default_rng(1)
            )
            assert not bad.within_rounding
