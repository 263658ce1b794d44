"""Each guard is as tight as it claims: the built-in block check, output durability,
read-back, and the copied-tensor comparison of verify, each against damage it must see."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from acnet_convert import convert, readback
from acnet_convert.blockcheck import check_block
from acnet_convert.blocks import load_block
from acnet_convert.checkpoint import open_checkpoint
from acnet_convert.dtypes import from_float64, to_float64
from acnet_convert.fusion import fuse_block
from acnet_convert.plan import FuseOptions, plan_fusion

if TYPE_CHECKING:
    from conftest import CliRun

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# float32 stores a value to within u = 2**-24 ~ 6e-8 relative: an error of 1e-6 relative is
# about 17 units, far beyond rounding. A check 1000x looser (6e-5) would not see it.
NUDGE = 1e-6


def _blocks(path: Path) -> list[tuple[object, np.ndarray, np.ndarray]]:
    """Every block of a fixture with its fused kernel and bias as float32 stores them."""
    out = []
    with open_checkpoint(path) as reader:
        plan = plan_fusion(reader, FuseOptions())
        for block in plan.blocks:
            tensors = load_block(
                block.spec, reader.tensors, reader.read, plan.eps, plan.source, "OIHW"
            )
            w, b = fuse_block(tensors)
            stored_w = to_float64(from_float64(w, "float32"), "float32")
            stored_b = to_float64(from_float64(b, "float32"), "float32")
            out.append((tensors, stored_w, stored_b))
    return out


@pytest.mark.parametrize("fixture", ["cifar_quick.pth", "resnet_like.pth", "grouped.pth"])
def test_block_check_accepts_rounding_and_rejects_1e6_relative(fixture: str) -> None:
    for tensors, w, b in _blocks(FIXTURES / fixture):
        rng = np.random.default_rng(0)
        exact = check_block(tensors, w, b, stored_dtype="float32", rng=rng, batch=4)  # type: ignore[arg-type]
        assert exact.within_rounding, exact
        nudged_w = to_float64(from_float64(w * (1 + NUDGE), "float32"), "float32")
        nudged = check_block(
            tensors,  # type: ignore[arg-type]
            nudged_w,
            b,
            stored_dtype="float32",
            rng=np.random.default_rng(0),
            batch=4,
        )
        assert not nudged.within_rounding, (fixture, nudged)
        # The bound sits between the two: rounding is inside it, the nudge well outside.
        assert nudged.comparison.max_rel > 3 * nudged.rounding_rel


def test_fuse_refuses_a_kernel_off_by_1e6_relative(
    tmp_path: Path, run_cli: CliRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = convert.fuse_block

    def nudged(block):  # type: ignore[no-untyped-def]
        w, b = real(block)
        return w * (1 + NUDGE), b

    monkeypatch.setattr(convert, "fuse_block", nudged)
    out = tmp_path / "o.safetensors"
    result = run_cli("fuse", FIXTURES / "cifar_quick.pth", out, expect=1)
    assert "conv1.acb" in result.stderr and "nothing was written" in result.stderr
    assert not out.exists()


# --- durability: the output file and its folder are fsynced ----------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "hdf5", "pdparams"])
def test_output_and_its_folder_are_fsynced(
    tmp_path: Path, run_cli: CliRun, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / f"fused.{fmt if fmt != 'hdf5' else 'h5'}"
    run_cli("fuse", FIXTURES / "cifar_quick.pth", out)
    assert out.exists()
    folder_syncs = [i for i, p in enumerate(synced) if p == str(folder)]
    assert folder_syncs, f"the folder was never fsynced: {synced}"
    # The file's data reaches the disk before its name does: a temporary name in the same
    # folder is synced, then (after the rename) the folder.
    file_syncs = [i for i, p in enumerate(synced) if Path(p).parent == folder and p != str(folder)]
    assert file_syncs and min(file_syncs) < max(folder_syncs), synced


# --- read-back: damage between writing and renaming is caught, in every format -------------


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "hdf5", "pdparams"])
def test_read_back_catches_a_damaged_output(
    tmp_path: Path, run_cli: CliRun, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    real = readback.confirm_written

    def damaging(tmp, output, outputs, expected):  # type: ignore[no-untyped-def]
        data = bytearray(Path(tmp).read_bytes())
        with open_checkpoint(Path(tmp)) as reader:
            key = next(k for k in reader.tensors if k.endswith("fused_conv.weight"))
            value = reader.read(key)
        raw = value.tobytes()
        at = bytes(data).find(raw[:64])  # the kernel's bytes as stored
        assert at >= 0
        data[at + 5] ^= 0x40  # one exponent bit of one element
        Path(tmp).write_bytes(bytes(data))
        return real(tmp, output, outputs, expected)

    monkeypatch.setattr(readback, "confirm_written", damaging)
    out = tmp_path / f"fused.{fmt if fmt != 'hdf5' else 'h5'}"
    result = run_cli("fuse", FIXTURES / "cifar_quick.pth", out, expect=3)
    line = " ".join(result.stderr.split())
    assert line.startswith("error:") and "reading the output back failed" in line, line
    # A torch zip's records carry CRC-32s, which catch the damage before the values are
    # compared; the other formats name the damaged tensor.
    assert ("fails its CRC-32 check" if fmt == "pth" else "fused_conv.weight") in line, line
    assert not out.exists()


# --- verify's copied-tensor check: damage in each format --------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "hdf5", "pdparams"])
def test_verify_sees_one_damaged_copied_tensor(tmp_path: Path, run_cli: CliRun, fmt: str) -> None:
    """A copied (non-block) tensor changed by 1e-4 relative in one element fails verify."""
    fused = tmp_path / f"fused.{fmt if fmt != 'hdf5' else 'h5'}"
    run_cli("fuse", FIXTURES / "cifar_quick.pth", fused)
    with open_checkpoint(fused) as reader:
        state = {k: np.array(reader.read(k)) for k in reader.tensors}
    key = "head.linear.weight"
    state[key].flat[7] *= 1 + 1e-4
    damaged = tmp_path / f"damaged.{fmt if fmt != 'hdf5' else 'h5'}"
    _write(fmt, state, damaged)
    result = run_cli(
        "verify", FIXTURES / "cifar_quick.pth", damaged, "--blocks", "--json", expect=1
    )
    report = json.loads(result.stdout)
    (copied,) = [c for c in report["cases"] if c["kind"] == "tensors"]
    assert not copied["passed"] and f"'{key}'" in copied["detail"]
    assert report["failed"] == [copied["name"]]


def _write(fmt: str, state: dict[str, np.ndarray], path: Path) -> None:
    from acnet_convert.checkpoint import Container, TensorInfo, write_checkpoint
    from acnet_convert.dtypes import NUMPY_DTYPES

    names = {v: k for k, v in NUMPY_DTYPES.items() if k != "bfloat16"}
    infos = [TensorInfo(k, names[v.dtype.newbyteorder("<")], v.shape) for k, v in state.items()]
    write_checkpoint(path, fmt, infos, lambda k: state[k], container=Container(), metadata={})
