"""Every tensor is fused, passed through as an ordinary layer, or refused as suspicious."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from test_families import _apply_bn, _t

State = dict[str, np.ndarray]


def _bn(rng: np.random.Generator, sd: State, stem: str, c: int, style: str = "torch") -> None:
    mean, var = ("running_mean", "running_var") if style == "torch" else ("_mean", "_variance")
    sd[f"{stem}.weight"] = rng.uniform(0.5, 1.5, c)
    sd[f"{stem}.bias"] = rng.normal(0, 0.3, c)
    sd[f"{stem}.{mean}"] = rng.normal(0, 0.3, c)
    sd[f"{stem}.{var}"] = rng.uniform(0.5, 2.0, c)


def _acb(rng: np.random.Generator, sd: State, p: str, c: int = 4) -> None:
    for name, shape in (("square", (c, c, 3, 3)), ("hor", (c, c, 1, 3)), ("ver", (c, c, 3, 1))):
        sd[f"{p}{name}_conv.weight"] = rng.normal(0, 0.5, shape)
        _bn(rng, sd, f"{p}{name}_bn", c)


def _save(sd: State, path: Path) -> Path:
    save_file(sd, str(path))
    return path


def test_a_dilated_corner_branch_is_fused(tmp_path: Path, run_cli: Any) -> None:
    """A fourth branch corner_conv (2x2, dilation 2) is the square's corners: fused, exactly."""
    rng = np.random.default_rng(1)
    sd: State = {}
    _acb(rng, sd, "b.")
    sd["b.corner_conv.weight"] = rng.normal(0, 0.5, (4, 4, 2, 2))
    _bn(rng, sd, "b.corner_bn", 4)
    out = tmp_path / "o.safetensors"
    run_cli("fuse", _save(sd, tmp_path / "t.safetensors"), out)
    fused = load_file(str(out))
    assert set(fused) == {"b.fused_conv.weight", "b.fused_conv.bias"}
    x = _t(rng.normal(size=(2, 4, 6, 7)))
    want = _apply_bn(F.conv2d(x, _t(sd["b.square_conv.weight"])), sd, "b.square_bn")
    want = want + _apply_bn(F.conv2d(x[:, :, 1:-1], _t(sd["b.hor_conv.weight"])), sd, "b.hor_bn")
    want = want + _apply_bn(F.conv2d(x[:, :, :, 1:-1], _t(sd["b.ver_conv.weight"])), sd, "b.ver_bn")
    corner = F.conv2d(x, _t(sd["b.corner_conv.weight"]), dilation=2)
    want = want + _apply_bn(corner, sd, "b.corner_bn")
    got = F.conv2d(x, _t(fused["b.fused_conv.weight"]), _t(fused["b.fused_conv.bias"]))
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_an_unknown_branch_is_refused_and_allowed_with_a_note(tmp_path: Path, run_cli: Any) -> None:
    rng = np.random.default_rng(2)
    sd: State = {}
    _acb(rng, sd, "net.acb.")
    sd["net.acb.diag_conv.weight"] = rng.normal(0, 0.5, (4, 4, 3, 3))
    _bn(rng, sd, "net.acb.diag_bn", 4)
    sd["net.fc.weight"] = rng.normal(size=(2, 4))
    src = _save(sd, tmp_path / "t.safetensors")
    out = tmp_path / "o.safetensors"
    result = run_cli("fuse", src, out, expect=3)
    assert "'net.acb.diag_conv'" in result.stderr and "conv+BN branch" in result.stderr
    assert "--allow-unfused" in result.stderr and not out.exists()
    result = run_cli("fuse", src, out, "--allow-unfused")
    assert "note: passed through 'net.acb.diag_conv' unfused" in result.stderr
    assert "net.acb.diag_conv.weight" in load_file(str(out))
    listed = json.loads(run_cli("inspect", src, "--json").stdout)
    assert listed["schema"] == 1
    assert [s["name"] for s in listed["suspicious"]] == ["net.acb.diag_conv"]
    assert "net.acb.diag_bn.running_var" in listed["suspicious"][0]["keys"]


def test_bn_statistics_in_another_naming_inside_a_block_are_refused(
    tmp_path: Path, run_cli: Any
) -> None:
    """A Paddle-named BN (_mean/_variance) beside an ACB's branches: never silently copied."""
    rng = np.random.default_rng(3)
    sd: State = {}
    _acb(rng, sd, "m.acb.")
    _bn(rng, sd, "m.acb.extra_norm", 4, style="paddle")
    result = run_cli("fuse", _save(sd, tmp_path / "t.safetensors"), tmp_path / "o.pth", expect=3)
    assert "'m.acb.extra_norm'" in result.stderr and "BatchNorm statistics" in result.stderr


def test_a_module_list_alias_of_branch_kernels_is_refused(tmp_path: Path, run_cli: Any) -> None:
    rng = np.random.default_rng(4)
    sd: State = {}
    _acb(rng, sd, "m.acb.")
    sd["m.acb_list.0.weight"] = sd["m.acb.square_conv.weight"].copy()
    result = run_cli("fuse", _save(sd, tmp_path / "t.safetensors"), tmp_path / "o.pth", expect=3)
    assert "'m.acb_list.0.weight'" in result.stderr
    assert "bit-identical copy of 'm.acb.square_conv.weight'" in result.stderr


def test_paddleslim_acblock_is_fused_with_its_bns(tmp_path: Path, run_cli: Any) -> None:
    """PaddleSlim's names: square_branch/hor_branch/ver_branch with .bn._mean/_variance."""
    rng = np.random.default_rng(5)
    sd: State = {}
    for name, shape in (("square", (4, 2, 3, 3)), ("hor", (4, 2, 1, 3)), ("ver", (4, 2, 3, 1))):
        sd[f"blk.{name}_branch.conv.weight"] = rng.normal(0, 0.5, shape)
        _bn(rng, sd, f"blk.{name}_branch.bn", 4, style="paddle")
    out = tmp_path / "o.safetensors"
    run_cli("fuse", _save(sd, tmp_path / "t.safetensors"), out)
    fused = load_file(str(out))
    assert set(fused) == {"blk.fused_branch.weight", "blk.fused_branch.bias"}
    x = _t(rng.normal(size=(1, 2, 5, 5)))
    want = sum(
        _apply_bn(
            F.conv2d(crop, _t(sd[f"blk.{n}_branch.conv.weight"])),
            sd,
            f"blk.{n}_branch.bn",
            style="paddle",
        )
        for n, crop in (("square", x), ("hor", x[:, :, 1:-1]), ("ver", x[:, :, :, 1:-1]))
    )
    got = F.conv2d(x, _t(fused["blk.fused_branch.weight"]), _t(fused["blk.fused_branch.bias"]))
    assert isinstance(want, torch.Tensor)
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_sibling_triples_at_the_root_are_refused_as_ambiguous(tmp_path: Path, run_cli: Any) -> None:
    """17 bias-free conv{i}_1 (1x3), conv{i}_2 (3x1), conv{i}_3 (3x3): never one fused_conv."""
    rng = np.random.default_rng(6)
    sd: State = {}
    for i in range(1, 18):
        cin = 3 if i == 1 else 8
        for j, shape in ((1, (1, 3)), (2, (3, 1)), (3, (3, 3))):
            sd[f"conv{i}_{j}.0.weight"] = rng.normal(size=(8, cin, *shape))
    out = tmp_path / "o.safetensors"
    result = run_cli("fuse", _save(sd, tmp_path / "t.safetensors"), out, expect=3)
    assert "the top level holds 17 square convs" in result.stderr and "ambiguous" in result.stderr
    assert not out.exists()


def test_generic_rule_refuses_a_branch_with_an_unread_bn(tmp_path: Path, run_cli: Any) -> None:
    rng = np.random.default_rng(7)
    sd: State = {}
    for name, shape in (("k", (4, 2, 3, 3)), ("r", (4, 2, 1, 3)), ("c", (4, 2, 3, 1))):
        sd[f"blk.{name}.conv.weight"] = rng.normal(0, 0.5, shape)
        _bn(rng, sd, f"blk.{name}.bn", 4, style="paddle")
    result = run_cli("fuse", _save(sd, tmp_path / "t.safetensors"), tmp_path / "o.pth", expect=3)
    assert "'blk.k.conv.weight'" in result.stderr and "blk.k.bn._mean" in result.stderr


def _registered_again(sd: State, pairs: dict[str, str]) -> State:
    """A ModuleList holding a block's branch modules again: every tensor under a second name."""
    out = dict(sd)
    for old_stem, new_stem in pairs.items():
        for key in [k for k in sd if k.startswith(old_stem + ".")]:
            out[new_stem + key[len(old_stem) :]] = sd[key].copy()
    return out


def _fused_pair(out: State, first: str, second: str) -> None:
    """Both names hold the fused conv, bit for bit, and a model registering it twice loads them."""
    conv = torch.nn.Conv2d(*reversed(out[f"{first}.weight"].shape[:2]), 3, bias=True).double()
    model = torch.nn.Module()
    for name in (first, second):
        parent = model
        *heads, last = name.split(".")
        for head in heads:
            if not hasattr(parent, head):
                parent.add_module(head, torch.nn.Module())
            parent = getattr(parent, head)
        parent.add_module(last, conv)
    model.load_state_dict({k: _t(v) for k, v in out.items()}, strict=True)
    for part in ("weight", "bias"):
        assert np.array_equal(out[f"{first}.{part}"], out[f"{second}.{part}"])


ALIASED = {
    "acnet": (
        lambda rng, sd: _acb(rng, sd, "m.acb."),
        {
            "m.acb.square_conv": "m.acb.convs.0",
            "m.acb.hor_conv": "m.acb.convs.1",
            "m.acb.ver_conv": "m.acb.convs.2",
        },
        "m.acb.fused_conv",
        "m.acb.convs.fused_conv",
    ),
    "mmcv": (
        lambda rng, sd: [
            sd.update({f"b.{n}.conv.weight": rng.normal(0, 0.5, s)}) or _bn(rng, sd, f"b.{n}.bn", 4)
            for n, s in (
                ("conv_kxk", (4, 4, 3, 3)),
                ("conv_1xk", (4, 4, 1, 3)),
                ("conv_kx1", (4, 4, 3, 1)),
            )
        ],
        {"b.conv_kxk": "b.branches.0", "b.conv_1xk": "b.branches.1", "b.conv_kx1": "b.branches.2"},
        "b.fused_conv",
        "b.branches.fused_conv",
    ),
    "repvgg": (
        lambda rng, sd: [
            sd.update(
                {
                    "s.rbr_dense.conv.weight": rng.normal(0, 0.5, (4, 4, 3, 3)),
                    "s.rbr_1x1.conv.weight": rng.normal(0, 0.5, (4, 4, 1, 1)),
                }
            ),
            _bn(rng, sd, "s.rbr_dense.bn", 4),
            _bn(rng, sd, "s.rbr_1x1.bn", 4),
            _bn(rng, sd, "s.rbr_identity", 4),
        ],
        {"s.rbr_dense": "s.conv.0", "s.rbr_1x1": "s.conv.1", "s.rbr_identity": "s.conv.2"},
        "s.rbr_reparam",
        "s.conv.rbr_reparam",
    ),
}


@pytest.mark.parametrize("family", sorted(ALIASED))
def test_branch_modules_registered_again_get_the_fused_conv_too(
    family: str, tmp_path: Path, run_cli: Any
) -> None:
    make, pairs, first, second = ALIASED[family]
    rng = np.random.default_rng(11)
    sd: State = {}
    make(rng, sd)
    alone = tmp_path / "alone.safetensors"
    run_cli("fuse", _save(sd, tmp_path / "t.safetensors"), alone, "--quiet")
    src = _save(_registered_again(sd, pairs), tmp_path / "twice.safetensors")
    out = tmp_path / "o.safetensors"
    report = json.loads(run_cli("fuse", src, out, "--json").stdout)
    assert any(
        f"'{second.rpartition('.')[0]}' holds the same tensors" in n for n in report["notes"]
    )
    fused = load_file(str(out))
    assert set(fused) == {f"{n}.{p}" for n in (first, second) for p in ("weight", "bias")}
    _fused_pair(fused, first, second)
    want = load_file(str(alone))
    assert np.array_equal(fused[f"{first}.weight"], want[f"{first}.weight"])
    run_cli("verify", src, out, "--blocks")


@pytest.mark.parametrize("family", sorted(ALIASED))
def test_a_second_registration_differing_in_one_tensor_is_refused(
    family: str, tmp_path: Path, run_cli: Any
) -> None:
    make, pairs, _, second = ALIASED[family]
    rng = np.random.default_rng(12)
    sd: State = {}
    make(rng, sd)
    twice = _registered_again(sd, pairs)
    stem = next(iter(pairs.values()))
    copied = [k for k in twice if k.startswith(stem + ".")]
    key = next((k for k in copied if k.endswith("running_var")), copied[0])
    twice[key] = np.nextafter(twice[key], np.inf)
    out = tmp_path / "o.safetensors"
    result = run_cli("fuse", _save(twice, tmp_path / "t.safetensors"), out, expect=3)
    assert f"'{second.rpartition('.')[0]}" in result.stderr and not out.exists()
    assert "would be left unfused" in result.stderr
