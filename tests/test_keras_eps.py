"""Keras full-model .h5: each BatchNormalization's own epsilon from ``model_config``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acnet_convert.checkpoint import open_checkpoint
from acnet_convert.checkpoint.keras_config import bn_epsilons, bn_layers

if TYPE_CHECKING:
    from conftest import CliRun

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "dialects" / "keras_acnet.h5"
BN_LAYERS = [f"conv{i}_{b}_bn" for i in (1, 2) for b in ("sqr", "hor", "ver")]


def _model_config(eps: float) -> str:
    layers = [{"class_name": "InputLayer", "config": {"name": "input_1"}}]
    for name in BN_LAYERS:
        cfg = {"name": name, "epsilon": eps, "center": True, "scale": True, "momentum": 0.99}
        layers.append({"class_name": "BatchNormalization", "config": cfg})
    return json.dumps({"class_name": "Functional", "config": {"name": "m", "layers": layers}})


def _full_model(tmp_path: Path, eps: float) -> Path:
    src = tmp_path / f"full_{eps:g}.h5"
    with h5py.File(FIXTURE, "r") as weights, h5py.File(src, "w") as full:
        weights.copy("/", full, name="model_weights")
        full.attrs["model_config"] = _model_config(eps)
        full.attrs["keras_version"] = "2.13.1"
    return src


def _reference(path: Path, block: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The training-time block in eval mode, from the raw HWIO tensors, in float64."""
    out = torch.zeros(())
    with h5py.File(path, "r") as f:
        g = f["model_weights"]
        for branch in ("sqr", "hor", "ver"):
            layer = f"{block}_{branch}"
            w = torch.from_numpy(np.asarray(g[f"{layer}/{layer}/kernel:0"], np.float64))
            w = w.permute(3, 2, 0, 1)  # HWIO -> OIHW
            bias_key = f"{layer}/{layer}/bias:0"
            b = torch.from_numpy(np.asarray(g[bias_key], np.float64)) if bias_key in g else None
            y = F.conv2d(x, w, b, padding=(w.shape[2] // 2, w.shape[3] // 2))
            bn = {
                k: torch.from_numpy(np.asarray(g[f"{layer}_bn/{layer}_bn/{k}:0"], np.float64))
                for k in ("gamma", "beta", "moving_mean", "moving_variance")
            }
            y = F.batch_norm(
                y, bn["moving_mean"], bn["moving_variance"], bn["gamma"], bn["beta"], eps=eps
            )
            out = out + y
    return out


def _fused_output(path: Path, block: str, x: torch.Tensor) -> torch.Tensor:
    with h5py.File(path, "r") as f:
        root = f.get("model_weights", f)
        w = torch.from_numpy(np.asarray(root[f"{block}/{block}/kernel:0"], np.float64))
        b = torch.from_numpy(np.asarray(root[f"{block}/{block}/bias:0"], np.float64))
    w = w.permute(3, 2, 0, 1)
    return F.conv2d(x, w, b, padding=w.shape[2] // 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_reader_exposes_bn_epsilons(tmp_path: Path) -> None:
    with open_checkpoint(_full_model(tmp_path, 1e-5)) as reader:
        eps = reader.bn_epsilons  # type: ignore[attr-defined]
    assert eps == {f"{n}/{n}/moving_mean:0": 1e-5 for n in BN_LAYERS}
    with open_checkpoint(FIXTURE) as reader:  # weights only: the file does not say
        assert reader.bn_epsilons == {}  # type: ignore[attr-defined]


def test_config_parsing_ignores_what_is_not_a_bn() -> None:
    assert bn_layers("not json") == {}
    assert bn_layers('{"config": {"layers": [{"class_name": "Conv2D"}, 3]}}') == {}
    nested = {"layers": [{"class_name": "Functional", "config": {"layers": [
        {"class_name": "BatchNormalization", "config": {"name": "inner", "epsilon": 2e-4}},
        {"class_name": "BatchNormalization", "config": {"name": "bad", "epsilon": "x"}},
        {"class_name": "BatchNormalization", "config": {"name": "dflt"}},
    ]}}]}  # fmt: skip
    layers = bn_layers(json.dumps(nested))
    assert {k: v.epsilon for k, v in layers.items()} == {"inner": 2e-4, "dflt": 1e-3}
    assert bn_epsilons(layers, ["m/inner/moving_mean:0", "inner/x:0"]) == {
        "m/inner/moving_mean:0": 2e-4
    }


def test_fuse_uses_each_bn_epsilon(tmp_path: Path, run_cli: CliRun) -> None:
    """eps 1e-5 in the config: the fused conv reproduces the block with eps 1e-5
    (stored in float32, so ~1e-7 relative), and not with Keras' default 1e-3."""
    src = _full_model(tmp_path, 1e-5)
    out = tmp_path / "fused.h5"
    result = run_cli("fuse", src, out)
    stderr = " ".join(result.stderr.split())  # rich wraps long notes
    assert "used the epsilon the file declares for each of 6 BN(s) (1e-05)" in stderr
    gen = torch.Generator().manual_seed(11)
    for block, cin in (("conv1", 3), ("conv2", 8)):
        x = torch.randn(2, cin, 9, 9, generator=gen, dtype=torch.float64)
        fused = _fused_output(out, block, x)
        assert _rel(fused, _reference(src, block, x, 1e-5)) < 1e-5
        assert _rel(fused, _reference(src, block, x, 1e-3)) > 1e-4  # the test can tell them apart


def test_eps_option_overrides_with_a_note(tmp_path: Path, run_cli: CliRun) -> None:
    src = _full_model(tmp_path, 1e-5)
    out = tmp_path / "fused.h5"
    result = run_cli("fuse", src, out, "--eps", "1e-3")
    stderr = " ".join(result.stderr.split())  # rich wraps long notes
    assert "--eps 0.001 overrides the epsilon the file declares for 6 BN(s)" in stderr
    assert "e.g. 1e-05 for 'conv1_hor_bn/conv1_hor_bn/moving_mean:0'" in stderr
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    assert _rel(_fused_output(out, "conv1", x), _reference(src, "conv1", x, 1e-3)) < 1e-5


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_verify_block_mode_uses_the_declared_eps(
    tmp_path: Path, run_cli: CliRun, eps: float
) -> None:
    """A file fused with the right eps verifies; one fused with the wrong eps fails."""
    src = _full_model(tmp_path, 1e-5)
    out = tmp_path / "fused.h5"
    run_cli("fuse", src, out, "--eps", str(eps))
    expect = 0 if eps == 1e-5 else 1
    result = run_cli("verify", src, out, "--blocks", "--json", expect=expect)
    report = json.loads(result.stdout)
    assert report["passed"] is (expect == 0)
    if expect:
        assert set(report["failed"]) == {"conv1", "conv2"}
