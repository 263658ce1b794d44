"""Rough edges a new user meets: inspect on the tool's own outputs, swapped verify
arguments, prefixed models, train-mode switch_to_deploy, report wording, packaging."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import CliRun, small_state
from test_api import TinyNet, _input, _train_checkpoint
from test_hostile import save_as
from torch import nn

import acnet_convert

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
DIALECT_FIXTURES = sorted(
    p
    for p in (FIXTURES / "dialects").iterdir()
    if p.suffix in (".pth", ".safetensors", ".h5", ".hdf5")
)


# --- inspect reads what fuse wrote, in every dialect --------------------------


@pytest.mark.parametrize("src", DIALECT_FIXTURES, ids=lambda p: p.name)
def test_fused_output_inspects_cleanly_in_every_dialect(
    run_cli: CliRun, tmp_path: Path, src: Path
) -> None:
    if src.stem == "ambiguous":
        pytest.skip("needs --dialect")
    out = tmp_path / f"fused{src.suffix}"
    run_cli("fuse", src, out)
    shown = run_cli("inspect", out)
    assert "Try 'acnet-convert inspect'" not in shown.stdout + shown.stderr
    doc = json.loads(run_cli("inspect", out, "--json").stdout)
    assert doc["blocks"] == [] and doc["problem"] is None


def test_inspect_of_an_unreadable_file_does_not_point_back_to_inspect(
    run_cli: CliRun, tmp_path: Path
) -> None:
    src = tmp_path / "notensors.pth"
    torch.save({"epoch": 3, "name": "x"}, src)
    shown = run_cli("inspect", src, expect=3)
    assert "no tensors" in shown.stderr and "acnet-convert inspect" not in shown.stderr
    fused = run_cli("fuse", src, tmp_path / "o.pth", expect=3)
    assert "Try 'acnet-convert inspect'" in fused.stderr  # other commands keep the hint


def test_inspect_never_sends_the_user_back_to_inspect(run_cli: CliRun, tmp_path: Path) -> None:
    sd = small_state()
    del sd["layer1.conv1.acb.ver_bn.running_var"]
    bad = save_as(sd, tmp_path / "bad.safetensors", "safetensors")
    result = run_cli("inspect", bad, expect=3)
    assert "is missing" in result.stderr
    assert "acnet-convert inspect" not in result.stderr


# --- verify with the arguments swapped ---------------------------------------


def test_verify_with_swapped_arguments_says_so(run_cli: CliRun, tmp_path: Path) -> None:
    train = FIXTURES / "resnet_like.pth"
    fused = tmp_path / "fused.safetensors"
    run_cli("fuse", train, fused)
    result = run_cli("verify", fused, train, expect=2)
    assert "look swapped" in result.stderr
    assert f"verify {train} {fused}" in result.stderr
    run_cli("verify", train, fused)


# --- fuse_and_load into prefixed models ---------------------------------------


def test_fuse_and_load_into_a_data_parallel_model(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    train = _train_checkpoint(ckpt)
    deploy = nn.DataParallel(TinyNet("deploy").double())
    report = acnet_convert.fuse_and_load(deploy, ckpt)
    assert report.layout == "deploy"
    with torch.no_grad():
        got, ref = deploy.module.eval()(_input()), train(_input())
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = TinyNet("deploy").double()


def test_fuse_and_load_names_the_prefix_rename_that_fits(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    _train_checkpoint(ckpt)
    model = _Wrapped()
    for strict in (True, False):
        with pytest.raises(acnet_convert.errors.UsageError) as caught:
            acnet_convert.fuse_and_load(model, ckpt, strict=strict)
        message = str(caught.value)
        assert "renames=[('^', 'backbone.')]" in message and "closest is 'deploy'" in message
        assert "strict=False" not in message
    report = acnet_convert.fuse_and_load(model, ckpt, renames=[("^", "backbone.")])
    assert report.layout == "deploy"
    doc = acnet_convert.fuse_and_load.__doc__ or ""
    assert "renames=[('^', 'backbone.')]" in doc and "module." in doc


# --- switch_to_deploy in train mode -------------------------------------------


def test_switch_to_deploy_warns_in_train_mode_and_offers_a_copy() -> None:
    model = nn.Sequential(acnet_convert.ACBlock(3, 4, 3, padding=1))
    with pytest.warns(UserWarning, match=r"train mode.*model\.eval\(\).*inplace=False"):
        acnet_convert.switch_to_deploy(model)
    model = nn.Sequential(acnet_convert.ACBlock(3, 4, 3, padding=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = acnet_convert.switch_to_deploy(model, inplace=False)
    assert report.count == 1 and report.model is not model
    assert hasattr(model[0], "square_conv") and not hasattr(report.model[0], "square_conv")


# --- report wording -----------------------------------------------------------


def test_one_block_is_singular_and_sizes_show_megabytes(run_cli: CliRun, tmp_path: Path) -> None:
    import numpy as np
    from conftest import acb_state

    rng = np.random.default_rng(0)
    sd = acb_state(rng, "a", 64, 64)
    sd["big"] = rng.normal(size=(200_000,)).astype("f4")
    src = save_as(sd, tmp_path / "one.safetensors", "safetensors")
    result = run_cli("fuse", src, tmp_path / "o.safetensors")
    assert "fused 1 block (" in result.stderr
    assert " MB, " in result.stderr and "bytes" in result.stderr
    verbose = run_cli("fuse", src, tmp_path / "v.safetensors", "-v")
    assert "dialect 'acnet' matched 1 block" in verbose.stderr
    assert "block a: 3x3 + 1x3 + 3x1" in verbose.stderr and "max rel" in verbose.stderr


@pytest.mark.parametrize(
    "name, shown",
    [
        ("repvgg", "(RepVGG): 3x3 + 1x1 + identity 1x1"),
        ("dbb", "(DBB): 3x3 + "),
        ("mobileone", "(MobileOne): 3x3 + 3x3 + 1x1 + identity 1x1"),
        ("replknet", "(RepLKNet): 7x7 + 3x3"),
        ("mixed_acnet_repvgg", ": 3x3 + 1x3 + 3x1, "),
    ],
)
def test_verbose_describes_every_family_block(
    run_cli: CliRun, tmp_path: Path, name: str, shown: str
) -> None:
    src = FIXTURES / "families" / f"{name}.safetensors"
    verbose = run_cli("fuse", src, tmp_path / "v.safetensors", "-v")
    assert shown in verbose.stderr
    assert (
        verbose.stderr.count("max rel")
        == json.loads(run_cli("fuse", src, tmp_path / "j.safetensors", "--json", "--quiet").stdout)[
            "blocks_fused"
        ]
    )


def test_dropped_container_entries_are_noted_for_every_format(
    run_cli: CliRun, tmp_path: Path
) -> None:
    sd = {k: torch.from_numpy(v) for k, v in small_state().items()}
    src = tmp_path / "train.pth"
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 3}, src)
    result = run_cli("fuse", src, tmp_path / "o.safetensors", "--json")
    doc = json.loads(result.stdout)
    assert sorted(doc["dropped"]) == ["epoch", "optimizer"]
    assert "dropped 'epoch'" in result.stderr and "tensors only" in result.stderr
    assert "dropped 'optimizer'" in result.stderr and "optimizer, scheduler" in result.stderr
    pth = json.loads(run_cli("fuse", src, tmp_path / "o.pth", "--json").stdout)
    assert pth["dropped"] == ["optimizer"]


def test_a_namespace_is_not_called_training_time_parameters(
    run_cli: CliRun, tmp_path: Path
) -> None:
    sd = {k: torch.from_numpy(v) for k, v in small_state().items()}
    src = tmp_path / "train.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, src)
    result = run_cli("fuse", src, tmp_path / "o.pth", "--trust-pickle")
    line = next(x for x in result.stderr.splitlines() if "dropped 'args'" in x)
    assert "training-time parameters" not in line and "Namespace" in line


# --- packaging -----------------------------------------------------------------


def test_packaging_metadata() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert meta["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    assert (ROOT / "acnet_convert" / "py.typed").exists()
    assert not any(d.startswith("torch") for d in meta["dependencies"])
    assert any(d.startswith("torch") for d in meta["optional-dependencies"]["torch"])
    assert "acnet-convert[torch]" in meta["optional-dependencies"]["test"]
    assert any(d.startswith("tomli") and "3.11" in d for d in meta["dependencies"])
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8")
    for shipped in ("recursive-include tests", "recursive-include fixtures", "include LICENSE"):
        assert shipped in manifest  # the sdist runs its own tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.index('"torch==2.13.0"') < ci.index('-e ".[test')


def test_patterns_example_is_shipped_and_printed(run_cli: CliRun, tmp_path: Path) -> None:
    shipped = (ROOT / "acnet_convert" / "data" / "patterns_example.toml").read_text("utf-8")
    assert shipped == (ROOT / "examples" / "patterns.toml").read_text("utf-8")
    printed = run_cli("patterns", "--example").stdout
    assert printed == shipped
    copy = tmp_path / "mine.toml"
    copy.write_text(printed, encoding="utf-8")
    run_cli("inspect", FIXTURES / "dialects" / "rowcol_port.safetensors", "--patterns", copy)


def test_torch_needing_commands_name_the_extra(tmp_path: Path) -> None:
    # A torch that cannot be imported, as after 'pip install acnet-convert'.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import importlib.abc, sys\n"
        "class _NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    fused = tmp_path / "o.safetensors"
    run = [sys.executable, "-m", "acnet_convert"]
    ok = subprocess.run([*run, "fuse", FIXTURES / "cifar_quick.safetensors", fused], env=env,
                        capture_output=True, text=True, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    done = subprocess.run([*run, "verify", FIXTURES / "cifar_quick.safetensors", fused], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pip install 'acnet-convert[torch]'" in done.stderr
