"""Every zoo architecture, end to end: training checkpoint -> fused -> deployable net.

A training-form net with randomised BN statistics is saved (in a different
format or container per architecture), fused through the command line with
``--layout baseline`` and through :func:`acnet_convert.fuse_and_load` into the
baseline and the deploy form, and each result must reproduce the training
net's eval output in float32.

WRN-16-8 is the exception for the baseline form: its units are pre-activation
(``bn`` before the conv), so upstream's plain baseline has no BN after the
conv and no conv bias to hold the fused bias. There the baseline layout is
refused with a message that says so, and the deploy form carries the test.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import Result
from torch import Tensor, nn

from acnet_convert import fuse_and_load
from acnet_convert.errors import UsageError
from acnet_convert.testing import randomise_bn_stats
from acnet_convert.zoo import ARCHS, build_arch

RTOL = 1e-5
# arch -> how its training checkpoint is saved
SAVES = {
    "cfqkbnc": "safetensors",
    "vc": "pth-wrapped",  # {'model': sd, 'iteration': n} with DataParallel's 'module.' prefix
    "src56": "hdf5",  # upstream's flat layout
    "wrnc16plain": "pth",
    "sres18": "pth",
    "sres34": "safetensors",
    "sres50": "pth",
}
NO_BASELINE = {"wrnc16plain"}


def _save(model: nn.Module, path: Path, how: str) -> Path:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if how == "safetensors":
        from safetensors.torch import save_file

        path = path.with_suffix(".safetensors")
        save_file(sd, str(path))
    elif how == "hdf5":
        path = path.with_suffix(".hdf5")
        with h5py.File(path, "w") as f:
            for key, value in sd.items():
                f.create_dataset(key.replace("/", "+"), data=value.numpy())
            f.create_dataset("deps", data=np.arange(3, dtype=np.int64))
    elif how == "pth-wrapped":
        path = path.with_suffix(".pth")
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "iteration": 7}, path)
    else:
        path = path.with_suffix(".pth")
        torch.save(sd, path)
    return path


def _poison(model: nn.Module) -> None:
    """NaN in every float tensor, so a key that is not loaded shows in the output."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))


def _assert_matches(model: nn.Module, x: Tensor, expected: Tensor) -> None:
    with torch.no_grad():
        got = model.eval()(x)
    scale = expected.abs().max().item()
    err = (got - expected).abs().max().item()
    assert err <= RTOL * scale, f"max |diff| {err:.3g} > {RTOL:g} * max |ref| {scale:.3g}"


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_training_checkpoint_loads_into_baseline_and_deploy(
    name: str, tmp_path: Path, run_cli: Callable[..., Result]
) -> None:
    spec = ARCHS[name]
    gen = torch.Generator().manual_seed(sorted(ARCHS).index(name))
    torch.manual_seed(0)
    train = build_arch(name, "train").eval()
    randomise_bn_stats(train, gen, spread=0.1)
    cifar = spec.input_shape[1] == 32
    x = torch.randn(2, *(spec.input_shape if cifar else (3, 64, 64)), generator=gen)
    with torch.no_grad():
        expected = train(x)
    ckpt = _save(train, tmp_path / f"{name}_train", SAVES[name])
    blocks = sum(1 for k in train.state_dict() if k.endswith("square_conv.weight"))
    del train

    fused = tmp_path / f"{name}_baseline.pth"
    baseline = build_arch(name, "baseline")
    if name in NO_BASELINE:
        result = run_cli("fuse", ckpt, fused, "--layout", "baseline", expect=2)
        assert "pre-activation" in result.stderr and "--layout deploy" in result.stderr
        assert not fused.exists()
        with pytest.raises(UsageError, match=r"not fit WideResNetCifar.* model keys it cannot"):
            fuse_and_load(baseline, ckpt, check=False)
    else:
        run_cli("fuse", ckpt, fused, "--layout", "baseline")
        _poison(baseline)
        written = torch.load(fused, weights_only=True)
        if SAVES[name] == "pth-wrapped":  # the output keeps its container
            assert written["iteration"] == 7
            written = {k.removeprefix("module."): v for k, v in written["model"].items()}
        if SAVES[name] == "hdf5":
            assert written.pop("deps").tolist() == [0, 1, 2]  # upstream's widths travel along
        baseline.load_state_dict(written, strict=True)
        _assert_matches(baseline, x, expected)

        _poison(baseline)
        report = fuse_and_load(baseline, ckpt, check=False)
        assert (report.layout, report.blocks_fused) == ("baseline", blocks)
        assert report.keys_loaded == len(baseline.state_dict())
        assert report.ignored == (("deps",) if SAVES[name] == "hdf5" else ())
        _assert_matches(baseline, x, expected)
    del baseline

    deploy = build_arch(name, "deploy")
    _poison(deploy)
    report = fuse_and_load(deploy, ckpt, check=False)
    assert (report.layout, report.blocks_fused) == ("deploy", blocks)
    _assert_matches(deploy, x, expected)
