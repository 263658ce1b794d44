"""``acnet-convert verify`` and ``archs`` through the command line: output, exit codes, reports."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from acnet_convert.testing import randomise_bn_stats
from acnet_convert.zoo import ARCHS, build_arch

if TYPE_CHECKING:
    from conftest import CliRun

NUDGED_KEY = "conv3.acb.fused_conv.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Cifar-quick trained (random BN statistics), fused by the CLI, and one nudged copy."""
    from click.testing import CliRunner

    from acnet_convert.cli import cli

    root = tmp_path_factory.mktemp("verify_cli")
    torch.manual_seed(0)
    net = build_arch("cfqkbnc", "train")
    randomise_bn_stats(net, 7)
    train = root / "train.pth"
    torch.save({"model": net.state_dict(), "iteration": 10}, train)
    fused = root / "fused.safetensors"
    baseline = root / "baseline.pth"
    for out, layout in ((fused, "deploy"), (baseline, "baseline")):
        result = CliRunner().invoke(cli, ["fuse", str(train), str(out), "--layout", layout, "-q"])
        assert result.exit_code == 0, result.output
    state = load_file(str(fused))
    state[NUDGED_KEY][0, 0, 1, 1] += 1e-3
    nudged = root / "nudged.safetensors"
    save_file(state, str(nudged))
    return {"train": train, "fused": fused, "baseline": baseline, "nudged": nudged, "root": root}


def test_arch_detected_passes(run_cli: CliRun, ckpts: dict[str, Path]) -> None:
    result = run_cli("verify", ckpts["train"], ckpts["fused"], "--batch", "2")
    assert "network" in result.stdout and "ok" in result.stdout and "FAIL" not in result.stdout
    assert "cfqkbnc" in result.stdout
    assert "using the built-in architecture 'cfqkbnc'" in result.stderr
    assert "verified:" in result.stderr


def test_block_mode_table(run_cli: CliRun, ckpts: dict[str, Path]) -> None:
    result = run_cli("verify", ckpts["train"], ckpts["baseline"], "--blocks", "--dtype", "float64")
    for name in ("conv1.acb", "conv2.acb", "conv3.acb", "copied tensors"):
        assert name in result.stdout
    assert "block by block" in result.stdout and "layout baseline" in result.stdout


@pytest.mark.parametrize("mode", [[], ["--blocks"], ["--arch", "cfqkbnc"]])
def test_nudged_weight_exits_1_naming_the_block(
    run_cli: CliRun, ckpts: dict[str, Path], mode: list[str]
) -> None:
    result = run_cli("verify", ckpts["train"], ckpts["nudged"], "--batch", "2", *mode, expect=1)
    assert "conv3.acb" in result.stderr and "error:" in result.stderr
    assert "FAIL" in result.stdout


def test_json_report(run_cli: CliRun, ckpts: dict[str, Path]) -> None:
    good = json.loads(
        run_cli("verify", ckpts["train"], ckpts["fused"], "--json", "--batch", "2").stdout
    )
    assert good["passed"] is True and good["mode"] == "arch" and good["failed"] == []
    assert good["cases"][0]["top1_agreement"] == 1.0
    bad = run_cli("verify", ckpts["train"], ckpts["nudged"], "--json", "--blocks", expect=1)
    report = json.loads(bad.stdout)  # stdout stays pure JSON on failure too
    assert report["passed"] is False and report["failed"] == ["conv3.acb"]
    assert "conv3.acb" in bad.stderr


def test_junit_report(run_cli: CliRun, ckpts: dict[str, Path], tmp_path: Path) -> None:
    junit = tmp_path / "verify.xml"
    run_cli("verify", ckpts["train"], ckpts["nudged"], "--blocks", "--junit", junit, expect=1)
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "1"
    failure = suite.find("testcase[@name='conv3.acb']/failure")
    assert failure is not None and "max_abs" in failure.get("message", "")
    # unusable input still leaves a report that says so
    run_cli("verify", ckpts["train"], tmp_path / "absent.pth", "--junit", junit, expect=3)
    error = ET.parse(junit).getroot().find("testsuite/testcase/error")
    assert error is not None and "absent.pth" in error.get("message", "")


def test_cuda_without_cuda_exits_3(
    run_cli: CliRun, ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_cli("verify", ckpts["train"], ckpts["fused"], "--device", "cuda", expect=3)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CUDA is not available" in lines[0] and "--device cpu" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_fused_block_exits_3_naming_the_key(
    run_cli: CliRun, ckpts: dict[str, Path], tmp_path: Path
) -> None:
    state = load_file(str(ckpts["fused"]))
    del state["conv2.acb.fused_conv.bias"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    result = run_cli(
        "verify", ckpts["train"], tmp_path / "partial.safetensors", "--blocks", expect=3
    )
    assert "'conv2.acb.fused_conv.bias'" in result.stderr


def test_wrong_arch_exits_3_naming_keys(run_cli: CliRun, ckpts: dict[str, Path]) -> None:
    result = run_cli("verify", ckpts["train"], ckpts["fused"], "--arch", "src56", expect=3)
    assert "does not fit the built-in architecture 'src56'" in result.stderr
    assert "missing" in result.stderr and "'conv1.acb.square_conv.weight'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "nope"], "not a built-in architecture"),
        (["--arch", "vc", "--model", "m.py:f"], "give one of them"),
        (["--input-shape", "3x32"], "C,H,W"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--model-arg", "x=1"], "--model-arg is for --model"),
        (["--dtype", "float16"], "float16"),
    ],
)
def test_usage_errors_exit_2(
    run_cli: CliRun, ckpts: dict[str, Path], args: list[str], message: str
) -> None:
    result = run_cli("verify", ckpts["train"], ckpts["fused"], *args, expect=2)
    assert message in result.stderr


def test_needs_two_paths(run_cli: CliRun, ckpts: dict[str, Path]) -> None:
    result = run_cli("verify", ckpts["train"], expect=2)
    assert "TRAIN FUSED" in result.stderr


def test_list_archs(run_cli: CliRun) -> None:
    listed = run_cli("verify", "--list-archs").stdout
    assert run_cli("archs").stdout == listed
    for name in ARCHS:
        assert name in listed
    rows = json.loads(run_cli("archs", "--json").stdout)
    assert [r["name"] for r in rows] == list(ARCHS)
    assert rows[0]["input_shape"] == [3, 32, 32] and rows[0]["num_classes"] == 10


def test_user_model(run_cli: CliRun, tmp_path: Path) -> None:
    (tmp_path / "tiny.py").write_text(
        "from torch import nn\n"
        "from acnet_convert.nn import ACBlock\n"
        "def build(width=4, classes=3):\n"
        "    return nn.Sequential(\n"
        "        ACBlock(3, width, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "        nn.Linear(width * 36, classes),\n"
        "    )\n"
    )
    torch.manual_seed(1)
    net = nn.Sequential()
    from acnet_convert.nn import ACBlock

    net.add_module("0", ACBlock(3, 5, 3, padding=1))
    net.add_module("1", nn.ReLU())
    net.add_module("2", nn.Flatten())
    net.add_module("3", nn.Linear(5 * 36, 3))
    randomise_bn_stats(net, 7)
    torch.save(net.state_dict(), tmp_path / "tiny.pth")
    run_cli("fuse", tmp_path / "tiny.pth", tmp_path / "tiny_fused.pth", "-q")
    spec = f"{tmp_path / 'tiny.py'}:build"
    result = run_cli(
        "verify", tmp_path / "tiny.pth", tmp_path / "tiny_fused.pth",
        "--model", spec, "--model-arg", "width=5", "--input-shape", "3,6,6", "--json",
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["passed"] and report["mode"] == "model" and report["input_shape"] == [3, 6, 6]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(
            "verify", tmp_path / "tiny.pth", tmp_path / "tiny_fused.pth",
            "--model", spec, "--model-arg", "width=5", "--input-shape", "3,6,6", "--quiet",
        )  # fmt: skip
    assert not [w for w in caught if "train mode" in str(w.message)]  # its own deploy copy
    wrong = run_cli(
        "verify", tmp_path / "tiny.pth", tmp_path / "tiny_fused.pth",
        "--model", spec, "--input-shape", "3,6,6", expect=3,
    )  # fmt: skip
    assert "'0.square_conv.weight' has shape" in wrong.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float64(run_cli: CliRun, ckpts: dict[str, Path]) -> None:
    report = json.loads(
        run_cli(
            "verify",
            ckpts["train"],
            ckpts["fused"],
            "--device",
            "cuda",
            "--dtype",
            "float64",
            "--json",
        ).stdout
    )
    assert report["passed"] and report["device"] == "cuda" and report["dtype"] == "float64"
