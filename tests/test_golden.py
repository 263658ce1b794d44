"""Golden tests: every shipped fixture, in every format, fused to every format.

The fused checkpoint must load with strict=True into the fixture's deploy-time
net and reproduce the training net's eval output (stored by the seeded
generator, fixtures/make_fixtures.py) to 1e-5 relative in float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from acnet_convert.api import tensor_from_stored
from acnet_convert.checkpoint import open_checkpoint

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

import make_fixtures  # noqa: E402

FORMATS = ("pth", "hdf5", "safetensors")
NAMES = sorted(make_fixtures.FIXTURES)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as reader:
        return {
            name: tensor_from_stored(np.array(reader.read(name)), info.dtype)
            for name, info in reader.tensors.items()
        }


@pytest.mark.parametrize("out_fmt", FORMATS)
@pytest.mark.parametrize("in_fmt", FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_fused_fixture_reproduces_training_outputs(
    name: str, in_fmt: str, out_fmt: str, tmp_path: Path, run_cli
) -> None:
    source = FIXTURES / f"{name}.{in_fmt}"
    before = source.read_bytes()
    out = tmp_path / f"fused.{out_fmt}"
    run_cli("fuse", source, out, "--quiet")
    assert source.read_bytes() == before

    fused = _state_dict(out)
    fused.pop("deps", None)  # upstream's channel widths, carried through the hdf5 fixture
    deployed = make_fixtures.build(name, deploy=True).double().eval()
    deployed.load_state_dict({k: v.double() for k, v in fused.items()}, strict=True)
    io = load_file(str(FIXTURES / "expected" / f"{name}.io.safetensors"))
    with torch.no_grad():
        got = deployed(io["input"])
    reference = io["output"]
    rel = ((got - reference).abs().max() / reference.abs().max()).item()
    dtype = make_fixtures.FIXTURES[name][2]
    # float16 weights carry about 3 decimal digits; the fused kernel is rounded to them once more.
    assert rel <= (5e-3 if dtype == torch.float16 else 1e-5), rel

    expected = load_file(str(FIXTURES / "expected" / f"{name}.fused.safetensors"))
    assert set(fused) == set(expected)
    for key, want in expected.items():
        got_t = fused[key]
        assert got_t.dtype == want.dtype, key
        if "fused_conv" in key:
            # the same float64 arithmetic, maybe in another order: at most one unit in the last place
            torch.testing.assert_close(
                got_t.double(), want.double(), rtol=2 * torch.finfo(want.dtype).eps, atol=0
            )
        else:
            assert torch.equal(got_t, want), key


def test_ddp_container_is_kept_and_optimizer_dropped(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "fused.pth"
    result = run_cli("fuse", FIXTURES / "ddp_wrapped.pth", out)
    assert "optimizer" in result.stderr
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["model", "iteration", "epoch"]
    assert loaded["iteration"] == 7 and loaded["epoch"] == 2
    assert all(k.startswith("module.") for k in loaded["model"])
    assert "module.stage1.0.conv1.acb.fused_conv.weight" in loaded["model"]


def test_upstream_hdf5_extras_survive(tmp_path: Path, run_cli) -> None:
    import h5py

    out = tmp_path / "fused.hdf5"
    run_cli("fuse", FIXTURES / "resnet_like.hdf5", out)
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["deps"][()], [8, 16, 16])
        assert f.attrs["acnet_convert.blocks_fused"] == "2"
        assert len(f.attrs["acnet_convert.source_sha256"]) == 64


def test_passthrough_keys_keep_their_order(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "fused.pth"
    run_cli("fuse", FIXTURES / "resnet_like.pth", out)
    before = list(torch.load(FIXTURES / "resnet_like.pth", weights_only=True))
    after = list(torch.load(out, weights_only=True))
    kept = [k for k in before if ".acb." not in k]
    assert [k for k in after if ".acb." not in k] == kept
    assert after.index("stage1.0.conv1.acb.fused_conv.weight") == before.index(
        "stage1.0.conv1.acb.square_conv.weight"
    )


def test_safetensors_provenance(tmp_path: Path, run_cli) -> None:
    from safetensors import safe_open

    out = tmp_path / "fused.safetensors"
    run_cli("fuse", FIXTURES / "cifar_quick.safetensors", out, "--eps", "1e-5")
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
    assert meta["acnet_convert.blocks_fused"] == "2"
    assert float(meta["acnet_convert.eps"]) == 1e-5
    import hashlib

    assert (
        meta["acnet_convert.source_sha256"]
        == hashlib.sha256((FIXTURES / "cifar_quick.safetensors").read_bytes()).hexdigest()
    )
