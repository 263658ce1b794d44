"""Keras 3 weights (``.weights.h5`` and the weights inside ``.keras``) are read, not refused.

The Keras 3 files are written here from the format's definition (keras/src/saving/
saving_lib.py: a layer's variables in ``layers/<snake_case class>[_N]/vars/<i>``, a
``.keras`` zip with config.json, metadata.json and model.weights.h5), from the seeded
Keras 2 fixture, so both must fuse to the same tensors.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file

from acnet_convert.checkpoint import open_checkpoint
from acnet_convert.checkpoint.keras3 import snake_case
from acnet_convert.checkpoint.sniff import sniff_format

if TYPE_CHECKING:
    from conftest import CliRun

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "dialects" / "keras_acnet.h5"
EPS = 1e-4


def _layers() -> list[tuple[str, str, list[str]]]:
    """(layer name, class, weight names) of the Keras 2 fixture, in its layer order."""
    out = []
    with h5py.File(FIXTURE, "r") as f:
        for raw in f.attrs["layer_names"]:
            name = raw.decode()
            weights = [w.decode().split("/")[-1][:-2] for w in f[name].attrs["weight_names"]]
            if name.endswith("_bn"):
                cls = "BatchNormalization"
            elif weights == ["kernel", "bias"] and name == "dense":
                cls = "Dense"
            elif weights:
                cls = "Conv2D"
            else:
                cls = {"input_1": "InputLayer"}.get(name, "Activation")
            out.append((name, cls, weights))
    return out


def _config() -> dict[str, object]:
    layers = []
    for name, cls, weights in _layers():
        cfg: dict[str, object] = {"name": name}
        if cls == "BatchNormalization":
            cfg.update(epsilon=EPS, center=True, scale=True)
        if cls in ("Conv2D", "Dense"):
            cfg["use_bias"] = "bias" in weights
        layers.append({"module": "keras.layers", "class_name": cls, "config": cfg})
    return {"module": "keras", "class_name": "Functional", "config": {"layers": layers}}


def _weights_h5(target: h5py.File) -> None:
    target.create_group("vars")
    used: dict[str, int] = {}
    with h5py.File(FIXTURE, "r") as src:
        for name, cls, weights in _layers():
            snake = snake_case(cls)
            n = used.get(snake)
            used[snake] = 0 if n is None else n + 1
            group = target.create_group(f"layers/{snake}" + ("" if n is None else f"_{n + 1}"))
            vars_ = group.create_group("vars")
            for i, weight in enumerate(weights):
                vars_[str(i)] = np.asarray(src[f"{name}/{name}/{weight}:0"])
    target.create_group("optimizer/vars")["0"] = np.zeros(1, np.int64)  # the iteration counter


def _weights_file(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        _weights_h5(f)
    return path


def _keras_file(path: Path) -> Path:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        _weights_h5(f)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        zf.writestr("config.json", json.dumps(_config()))
        zf.writestr("model.weights.h5", buffer.getvalue())
    return path


def _keras2_full_model(path: Path) -> Path:
    with h5py.File(FIXTURE, "r") as weights, h5py.File(path, "w") as full:
        weights.copy("/", full, name="model_weights")
        full.attrs["model_config"] = json.dumps(_config())
    return path


def test_snake_case_names_match_keras() -> None:
    names = ["Conv2D", "BatchNormalization", "DepthwiseConv2D", "Dense", "InputLayer"]
    assert [snake_case(n) for n in names] == [
        "conv2d",
        "batch_normalization",
        "depthwise_conv2d",
        "dense",
        "input_layer",
    ]


def test_keras_archive_reads_with_layer_names_and_eps(tmp_path: Path) -> None:
    path = _keras_file(tmp_path / "model.keras")
    assert sniff_format(path) == "keras"
    with open_checkpoint(path) as reader, open_checkpoint(FIXTURE) as keras2:
        assert set(reader.tensors) == set(keras2.tensors)
        for key in keras2.tensors:
            np.testing.assert_array_equal(reader.read(key), keras2.read(key))
        assert reader.container.dropped == ("optimizer",)
        eps = reader.bn_epsilons  # type: ignore[attr-defined]
    assert eps and set(eps.values()) == {EPS}
    assert "conv1_sqr_bn/conv1_sqr_bn/moving_mean:0" in eps


@pytest.mark.parametrize("out_name", ["fused.h5", "fused.safetensors"])
def test_keras_archive_fuses_like_the_keras2_file(
    tmp_path: Path, run_cli: CliRun, out_name: str
) -> None:
    src = _keras_file(tmp_path / "model.keras")
    reference = tmp_path / f"reference{Path(out_name).suffix}"
    run_cli("fuse", _keras2_full_model(tmp_path / "full.h5"), reference)
    out = tmp_path / out_name
    result = run_cli("fuse", src, out)
    assert "fused 2 blocks (keras" in result.stderr
    with open_checkpoint(out) as got, open_checkpoint(reference) as want:
        assert set(got.tensors) == set(want.tensors)
        for key in want.tensors:
            np.testing.assert_array_equal(got.read(key), want.read(key))
    if out.suffix == ".safetensors":
        assert "conv1/conv1/bias:0" in load_file(str(out))
    report = json.loads(run_cli("verify", src, out, "--json").stdout)
    assert report["passed"] is True and report["mode"] == "blocks"


def test_bare_weights_h5_is_read_with_storage_paths(tmp_path: Path, run_cli: CliRun) -> None:
    path = _weights_file(tmp_path / "model.weights.h5")
    with open_checkpoint(path) as reader:
        assert "layers/conv2d/vars/0" in reader.tensors
        assert reader.tensors["layers/batch_normalization/vars/3"].shape == (8,)
    inspected = json.loads(run_cli("inspect", path, "--json").stdout)
    assert len(inspected["tensors"]) == len(_layers_weights())
    result = run_cli("fuse", path, tmp_path / "o.safetensors", expect=3)
    assert "no ACNet block found" in result.stderr


def _layers_weights() -> list[str]:
    return [w for _, _, weights in _layers() for w in weights]


def test_damaged_keras3_weights_are_refused(tmp_path: Path, run_cli: CliRun) -> None:
    path = _weights_file(tmp_path / "bad.weights.h5")
    with h5py.File(path, "a") as f:
        f["layers/conv2d/vars/kernel"] = np.zeros(2, np.float32)
    result = run_cli("inspect", path, expect=3)
    assert "not datasets 0..n-1" in result.stderr and str(path) in result.stderr
    truncated = tmp_path / "cut.keras"
    data = _keras_file(tmp_path / "whole.keras").read_bytes()
    truncated.write_bytes(data[: len(data) - 200])
    result = run_cli("inspect", truncated, expect=3)
    assert "error:" in result.stderr and str(truncated) in " ".join(result.stderr.split())


@pytest.mark.parametrize("where", ["vars", "dataset", "layers"])
def test_keras3_weights_never_follow_a_link(tmp_path: Path, run_cli: CliRun, where: str) -> None:
    # an external link to a FIFO would block the reader forever; any link is refused
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_group("g")["0"] = np.zeros(2, np.float32)
        f["g/layers/x/vars/0"] = np.zeros(2, np.float32)
    path = _weights_file(tmp_path / "linked.weights.h5")
    with h5py.File(path, "a") as f:
        group = f["layers/conv2d"]
        if where == "vars":
            del group["vars"]
            group["vars"] = h5py.ExternalLink(str(other), "/g")
        elif where == "dataset":
            del group["vars/0"]
            group["vars/0"] = h5py.ExternalLink(str(other), "/g/0")
        else:
            group["layers"] = h5py.ExternalLink(str(other), "/g/layers")
    result = run_cli("inspect", path, expect=3)
    assert "refusing to follow links" in result.stderr and str(path) in result.stderr
