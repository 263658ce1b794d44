"""verify fails closed: FUSED missing or adding tensors, zeroed copies, and a network
comparison that can fail on its own (not only through the per-block check)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from acnet_convert.convert import FuseOptions, fuse_checkpoint
from acnet_convert.testing import randomise_bn_stats
from acnet_convert.verify import VerifyOptions, junit_xml, verify_checkpoints
from acnet_convert.zoo import build_arch

if TYPE_CHECKING:
    from conftest import CliRun

# A --model factory whose deployed form adds a constant after the head: every block's
# fused conv matches TRAIN exactly, so only the network comparison can see the difference.
SHIFTED_MODEL = """
import torch
from torch import nn
from acnet_convert.nn import ACBlock


class Net(nn.Module):
    def __init__(self, deploy=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.acb = ACBlock(4, 4, 3, padding=1, deploy=deploy)
        self.head = nn.Linear(4, 3)
        self.shift = 0.5 if deploy else 0.0

    def forward(self, x):
        return self.head(self.acb(self.stem(x)).mean((2, 3))) + self.shift


def make(deploy=False):
    return Net(deploy)
"""


@pytest.fixture(scope="module")
def cfq(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("closed")
    torch.manual_seed(3)
    net = build_arch("cfqkbnc", "train")
    randomise_bn_stats(net, 3)
    train = root / "train.pth"
    torch.save(net.state_dict(), train)
    fused = root / "fused.safetensors"
    fuse_checkpoint(train, fused, "safetensors", FuseOptions(layout="deploy"))
    return {"root": root, "train": train, "fused": fused}


def _variant(cfq: dict[str, Path], name: str, edit: dict[str, torch.Tensor | None]) -> Path:
    state = load_file(str(cfq["fused"]))
    for key, value in edit.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    out = cfq["root"] / f"{name}.safetensors"
    save_file(state, str(out))
    return out


def _blocks(train: Path, fused: Path, **kw: object) -> object:
    return verify_checkpoints(train, fused, VerifyOptions(blocks=True, batch=2, **kw))  # type: ignore[arg-type]


def test_missing_copied_tensor_fails_and_is_listed(cfq: dict[str, Path]) -> None:
    missing = _variant(cfq, "missing", {"fc1.weight": None, "fc2.bias": None})
    result = _blocks(cfq["train"], missing)
    assert not result.passed  # type: ignore[attr-defined]
    (case,) = [c for c in result.cases if c.kind == "missing"]  # type: ignore[attr-defined]
    assert not case.passed and case.name == "missing from FUSED (2)"
    assert "'fc1.weight'" in case.detail and "'fc2.bias'" in case.detail
    assert "FUSED lacks" in result.failure_message()  # type: ignore[attr-defined]
    report = result.as_json()  # type: ignore[attr-defined]
    assert report["passed"] is False and "missing from FUSED (2)" in report["failed"]
    json.dumps(report, allow_nan=False)  # strict JSON: the absent figures are strings
    failure = ET.fromstring(junit_xml(result)).find(  # type: ignore[arg-type]
        "testsuite/testcase[@name='missing from FUSED (2)']/failure"
    )
    assert failure is not None and "'fc1.weight'" in failure.get("message", "")


def test_extra_tensor_fails_unless_allowed(cfq: dict[str, Path]) -> None:
    extra = _variant(cfq, "extra", {"spare.weight": torch.ones(3)})
    result = _blocks(cfq["train"], extra)
    assert not result.passed  # type: ignore[attr-defined]
    (case,) = [c for c in result.cases if c.kind == "extra"]  # type: ignore[attr-defined]
    assert case.name == "extra in FUSED (1)" and "'spare.weight'" in case.detail
    assert "--allow-extra" in case.detail
    allowed = _blocks(cfq["train"], extra, allow_extra=True)
    assert allowed.passed, allowed.failure_message()  # type: ignore[attr-defined]
    (kept,) = [c for c in allowed.cases if c.kind == "extra"]  # type: ignore[attr-defined]
    assert kept.passed and "allowed by --allow-extra" in kept.detail


def test_correct_file_has_no_listing_cases(cfq: dict[str, Path]) -> None:
    result = _blocks(cfq["train"], cfq["fused"])
    assert result.passed, result.failure_message()  # type: ignore[attr-defined]
    assert {c.kind for c in result.cases} == {"block", "tensors"}  # type: ignore[attr-defined]


def _zeroed_state(cfq: dict[str, Path]) -> dict[str, np.ndarray]:
    state = {k: v.numpy() for k, v in load_file(str(cfq["fused"])).items()}
    return {k: (v if "fused_conv" in k else np.zeros_like(v)) for k, v in state.items()}


def _write(fmt: str, state: dict[str, np.ndarray], path: Path) -> Path:
    if fmt == "safetensors":
        save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(path))
    elif fmt == "pth":
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    else:  # upstream's flat hdf5: '/' stored as '+'
        with h5py.File(path, "w") as f:
            for k, v in state.items():
                f.create_dataset(k.replace("/", "+"), data=v)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "hdf5"])
def test_zeroed_non_block_tensors_fail_in_every_format(
    cfq: dict[str, Path], fmt: str, run_cli: CliRun, tmp_path: Path
) -> None:
    zeroed = _write(fmt, _zeroed_state(cfq), tmp_path / f"zeroed.{fmt if fmt != 'hdf5' else 'h5'}")
    junit = tmp_path / "verify.xml"
    out = run_cli("verify", cfq["train"], zeroed, "--blocks", "--json", "--junit", junit, expect=1)
    report = json.loads(out.stdout)
    assert report["passed"] is False and report["failed"] == ["copied tensors (4)"]
    (copied,) = [c for c in report["cases"] if c["kind"] == "tensors"]
    assert copied["detail"].startswith("4 differ: 'fc1.weight'")
    assert "copied tensors (4)" in out.stderr and "error:" in out.stderr
    failure = (
        ET.parse(junit).getroot().find("testsuite/testcase[@name='copied tensors (4)']/failure")
    )
    assert failure is not None and "fc1.weight" in (failure.text or "")


def test_cli_missing_and_extra_exit_1_with_table(
    cfq: dict[str, Path], run_cli: CliRun, tmp_path: Path
) -> None:
    both = _variant(cfq, "both", {"fc1.bias": None, "spare.bias": torch.zeros(2)})
    out = run_cli("verify", cfq["train"], both, "--blocks", expect=1)
    assert "missing from FUSED (1)" in out.stdout and "extra in FUSED (1)" in out.stdout
    assert out.stdout.count("FAIL") == 2 and "nan" not in out.stdout
    assert "'fc1.bias'" in out.stderr and "'spare.bias'" in out.stderr
    extra = _variant(cfq, "extra_only", {"spare.bias": torch.zeros(2)})
    ok = run_cli("verify", cfq["train"], extra, "--blocks", "--allow-extra")
    assert "extra in FUSED (1)" in ok.stdout and "FAIL" not in ok.stdout
    assert "verified:" in ok.stderr and "nan" not in ok.stderr


# ----------------------------------------------------------------------------- network modes


def test_arch_network_comparison_itself_fails(cfq: dict[str, Path]) -> None:
    """A head scaled by 2: the network case must fail on its own figures (a verify that
    ran TRAIN on both sides would pass it)."""
    state = load_file(str(cfq["fused"]))
    scaled = _variant(cfq, "scaled", {"fc2.weight": state["fc2.weight"] * 2})
    result = verify_checkpoints(cfq["train"], scaled, VerifyOptions(arch="cfqkbnc", batch=4))
    (network,) = result.cases
    assert network.kind == "network" and not network.passed
    assert network.max_rel > 0.1 and network.max_abs > network.allowed
    assert "the network output differs" in result.failure_message()


def test_model_network_fails_where_every_block_matches(tmp_path: Path) -> None:
    """Only the network comparison can catch a deployed form that computes something else."""
    source = tmp_path / "shifted.py"
    source.write_text(SHIFTED_MODEL)
    import importlib.util

    spec = importlib.util.spec_from_file_location("shifted_model", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(5)
    net = module.make()
    randomise_bn_stats(net, 5)
    train = tmp_path / "train.pth"
    torch.save(net.state_dict(), train)
    fused = tmp_path / "fused.pth"
    fuse_checkpoint(train, fused, "pth", FuseOptions(layout="deploy"))
    options = VerifyOptions(model=f"{source}:make", input_shape=(3, 8, 8), batch=4)
    result = verify_checkpoints(train, fused, options)
    assert result.block_checks and all(c.passed for c in result.block_checks)
    (network,) = result.cases
    assert not network.passed
    assert math.isclose(network.max_abs, 0.5, rel_tol=1e-5)
    assert "every block matches on its own" in result.failure_message()
