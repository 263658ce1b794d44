"""Every built-in dialect, on a fixture in its port's real layout, fused and checked.

The fixtures and their manifests come from fixtures/make_dialect_fixtures.py.
The reference is computed here, per block, with torch's conv2d and batch_norm
on the training tensors named by the manifest (not by the package's dialect
tables), and the fused conv must match it to 1e-5 relative in float32.
Files are read back with h5py, safetensors and torch directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acnet_convert.checkpoint import TensorInfo
from acnet_convert.dialects import BUILTIN_DIALECTS, GENERIC, find_blocks, get_dialect
from acnet_convert.errors import UnfusableBlockError, UsageError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "dialects"
PATTERNS = ROOT / "examples" / "patterns.toml"
MANIFESTS = {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))}
CASES = [
    (name, fmt)
    for name, manifest in MANIFESTS.items()
    if manifest["dialect"] is not None
    for fmt in manifest["formats"]
]


def load(path: Path) -> dict[str, np.ndarray]:
    """A checkpoint's tensors, read without the package."""
    raw = path.read_bytes()[:8]
    if raw.startswith(b"\x89HDF"):
        out: dict[str, np.ndarray] = {}
        with h5py.File(path, "r") as f:
            keras = "layer_names" in f.attrs

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    out[name if keras else name.replace("+", "/")] = obj[()]

            f.visititems(visit)
        return out
    if raw.startswith(b"PK"):
        return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    from safetensors.numpy import load_file

    return load_file(str(path))


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float64))


def _oihw(array: np.ndarray, layout: str) -> torch.Tensor:
    t = _t(array)
    return t.permute(3, 2, 0, 1) if layout == "HWIO" else t


def _bn(
    y: torch.Tensor, state: dict[str, np.ndarray], keys: dict[str, str], eps: float
) -> torch.Tensor:
    return F.batch_norm(
        y,
        _t(state[keys["running_mean"]]),
        _t(state[keys["running_var"]]),
        _t(state[keys["weight"]]),
        _t(state[keys["bias"]]),
        training=False,
        eps=eps,
    )


def reference(
    state: dict[str, np.ndarray], block: dict[str, Any], x: torch.Tensor, manifest: dict[str, Any]
) -> torch.Tensor:
    """The training-time block in eval mode, branch by branch, in float64."""
    layout, eps = manifest["layout"], manifest["eps"]
    out = torch.zeros(())
    for branch in block["branches"]:
        bias = _t(state[branch["bias"]]) if branch["bias"] else None
        y = F.conv2d(
            x, _oihw(state[branch["weight"]], layout), bias, padding=tuple(branch["padding"])
        )
        out = out + _bn(y, state, branch["bn"], eps)
    if block["last_bn"]:
        out = _bn(out, state, block["last_bn"], eps)
    return out


def fuse(
    run_cli: Any, name: str, fmt: str, tmp_path: Path, *extra: str
) -> tuple[Path, dict[str, Any]]:
    source = FIXTURES / f"{name}.{fmt}"
    out = tmp_path / f"fused.{fmt}"
    args = ["fuse", source, out, "--json", "--quiet", *extra]
    if MANIFESTS[name]["patterns"]:
        args += ["--patterns", PATTERNS]
    result = run_cli(*args)
    return out, json.loads(result.stdout)


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_fixture_fuses_to_its_training_time_computation(
    name: str, fmt: str, tmp_path: Path, run_cli: Any
) -> None:
    manifest = MANIFESTS[name]
    source = FIXTURES / f"{name}.{fmt}"
    before = source.read_bytes()
    out, report = fuse(run_cli, name, fmt, tmp_path)
    assert source.read_bytes() == before
    assert report["dialect"] == manifest["dialect"]
    assert report["eps"] == manifest["eps"]

    train, fused = load(source), load(out)
    expected_keys = set(manifest["passthrough"]) | {
        k for b in manifest["blocks"] for k in b["fused"]
    }
    assert set(fused) == expected_keys
    for key in manifest["passthrough"]:
        assert fused[key].dtype == train[key].dtype and np.array_equal(fused[key], train[key]), key

    gen = torch.Generator().manual_seed(0)
    for block in manifest["blocks"]:
        weight_key, bias_key = block["fused"]
        weight = _oihw(fused[weight_key], manifest["layout"]).float()
        bias = torch.from_numpy(fused[bias_key]).float()
        assert fused[weight_key].dtype == np.float32 and fused[bias_key].dtype == np.float32
        x = torch.randn(2, weight.shape[1], 9, 9, generator=gen, dtype=torch.float64)
        want = reference(train, block, x, manifest)
        got = F.conv2d(x.float(), weight, bias, padding=weight.shape[-1] // 2).double()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-5, (block["label"], rel)


def test_hor_named_branch_holding_a_kx1_kernel_is_classified_by_shape(
    tmp_path: Path, run_cli: Any
) -> None:
    result = run_cli("inspect", FIXTURES / "acnet_swapped.safetensors", "--json")
    blocks = json.loads(result.stdout)["blocks"]
    assert [b["hor"] for b in blocks] == [[1, 3], [1, 5]]
    assert [b["ver"] for b in blocks] == [[3, 1], [5, 1]]
    state = load(FIXTURES / "acnet_swapped.safetensors")
    assert state["layer1.0.acb.hor_conv.weight"].shape[2:] == (3, 1)


@pytest.mark.parametrize("name", sorted(n for n, m in MANIFESTS.items() if m["dialect"]))
def test_inspect_names_the_dialect(name: str, run_cli: Any) -> None:
    manifest = MANIFESTS[name]
    args = ["inspect", FIXTURES / f"{name}.{manifest['formats'][0]}", "--json"]
    if manifest["patterns"]:
        args += ["--patterns", PATTERNS]
    found = json.loads(run_cli(*args).stdout)
    assert found["dialect"] == manifest["dialect"]
    assert [b["block"] for b in found["blocks"]] == [b["label"] for b in manifest["blocks"]]


def test_ambiguous_checkpoint_is_refused_with_the_candidates(tmp_path: Path, run_cli: Any) -> None:
    out = tmp_path / "out.safetensors"
    result = run_cli("fuse", FIXTURES / "ambiguous.safetensors", out, expect=3)
    assert "'acnet' (1 block, e.g. 'a')" in result.stderr
    assert "'mmcv' (1 block, e.g. 'b')" in result.stderr
    assert "--dialect" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_forcing_a_dialect_settles_an_ambiguous_checkpoint(tmp_path: Path, run_cli: Any) -> None:
    out = tmp_path / "out.safetensors"
    result = run_cli(
        "fuse", FIXTURES / "ambiguous.safetensors", out, "--dialect", "mmcv", "--json", "-q"
    )
    assert json.loads(result.stdout)["dialect"] == "mmcv"
    fused = load(out)
    assert "b.fused_conv.weight" in fused
    assert "a.square_conv.weight" in fused  # the other dialect's block is left alone


def test_unknown_dialect_is_a_usage_error(tmp_path: Path, run_cli: Any) -> None:
    result = run_cli(
        "fuse",
        FIXTURES / "acnet_swapped.safetensors",
        tmp_path / "o.safetensors",
        "--dialect",
        "nosuch",
        expect=2,
    )
    assert "unknown dialect 'nosuch'" in result.stderr
    assert "acnet, acnet-2019, mmcv, paddle, keras, generic" in result.stderr


def test_forced_dialect_that_finds_nothing(tmp_path: Path, run_cli: Any) -> None:
    result = run_cli(
        "fuse",
        FIXTURES / "acnet_swapped.safetensors",
        tmp_path / "o.safetensors",
        "--dialect",
        "paddle",
        expect=3,
    )
    assert "no ACNet block found" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_generic_is_tried_only_when_no_named_dialect_matches(tmp_path: Path, run_cli: Any) -> None:
    # rowcol_port is found by the generic rule alone, by the user's dialect with --patterns
    plain = run_cli("inspect", FIXTURES / "rowcol_port.safetensors", "--json")
    assert json.loads(plain.stdout)["dialect"] == "generic"
    named = run_cli(
        "inspect", FIXTURES / "rowcol_port.safetensors", "--json", "--patterns", PATTERNS
    )
    assert json.loads(named.stdout)["dialect"] == "rowcol"
    # with a named dialect present, generic finds nothing even where it could
    out = tmp_path / "o.pth"
    result = run_cli("fuse", FIXTURES / "acnet_legacy.pth", out, "--json", "-q")
    assert json.loads(result.stdout)["dialect"] == "acnet"


def test_generic_run_says_how_blocks_were_found(tmp_path: Path, run_cli: Any) -> None:
    result = run_cli("fuse", FIXTURES / "generic_port.safetensors", tmp_path / "o.safetensors")
    assert "kernel shape alone" in result.stderr


def test_keras_output_layer_bookkeeping_matches_its_datasets(tmp_path: Path, run_cli: Any) -> None:
    out, report = fuse(run_cli, "keras_acnet", "h5", tmp_path)
    assert report["eps"] == 1e-3
    with h5py.File(out, "r") as f:
        layers = [n.decode() for n in f.attrs["layer_names"]]
        text = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
        assert text["backend"] == "tensorflow" and text["keras_version"] == "2.11.0"
        assert layers == [
            "input_1",
            "conv1",
            "conv1_add",
            "conv1_relu",
            "conv2",
            "conv2_add",
            "conv2_relu",
            "global_average_pooling2d",
            "dense",
        ]
        assert set(f) == set(layers)
        for layer in layers:
            names = [
                n.decode()
                for n in np.atleast_1d(f[layer].attrs["weight_names"])
                if isinstance(n, bytes)
            ]
            datasets: list[str] = []
            f[layer].visititems(
                lambda n, o, d=datasets: d.append(n) if isinstance(o, h5py.Dataset) else None
            )
            assert sorted(names) == sorted(datasets), layer
        assert [n.decode() for n in f["conv1"].attrs["weight_names"]] == [
            "conv1/kernel:0",
            "conv1/bias:0",
        ]
        assert f["conv1/conv1/kernel:0"].shape == (3, 3, 3, 8)  # HWIO
        assert f["conv2/conv2/kernel:0"].shape == (5, 5, 8, 8)


def test_keras_eps_override_changes_the_result(tmp_path: Path, run_cli: Any) -> None:
    a, _ = fuse(run_cli, "keras_acnet", "h5", tmp_path)
    b = tmp_path / "eps.h5"
    run_cli("fuse", FIXTURES / "keras_acnet.h5", b, "--eps", "1e-5", "-q")
    assert not np.array_equal(load(a)["conv1/conv1/kernel:0"], load(b)["conv1/conv1/kernel:0"])


def test_paddle_output_is_what_paddleclas_deploy_net_loads(tmp_path: Path, run_cli: Any) -> None:
    out, _ = fuse(run_cli, "paddle_resnet", "safetensors", tmp_path)
    fused = load(out)
    for n in ("conv1", "res2a_branch2a", "res2a_branch2b"):
        assert fused[f"{n}_acsquare_weights"].ndim == 4
        assert fused[f"{n}_acsquare_bias"].shape == (8,)
        assert not any(k.startswith(f"{n}_achor") or k.startswith(f"{n}_acver") for k in fused)
    assert not any("_acsquare_scale" in k for k in fused)
    assert "bn2a_branch1_scale" in fused and "res2a_branch1_weights" in fused


def test_paddle_bn_names_follow_paddleclas() -> None:
    paddle = get_dialect("paddle")
    assert paddle.fields_for("conv1_acsquare_weights")["b"] == "bn_conv1"  # type: ignore[index]
    assert paddle.fields_for("res4b12_branch2b_acsquare_weights")["b"] == "bn4b12_branch2b"  # type: ignore[index]


# --- aliases --------------------------------------------------------------------------------


def test_module_registered_twice_is_fused_once_and_written_under_both_names(
    tmp_path: Path, run_cli: Any
) -> None:
    out, report = fuse(run_cli, "mmcv_shared", "pth", tmp_path)
    assert report["blocks_fused"] == 2
    assert [b["block"] for b in report["blocks"]] == ["backbone.stem", "backbone.layers.1"]
    assert any(
        "'backbone.layers.0' holds the same tensors as 'backbone.stem'" in n
        for n in report["notes"]
    )
    fused = load(out)
    for part in ("weight", "bias"):
        a, b = (
            fused[f"backbone.stem.fused_conv.{part}"],
            fused[f"backbone.layers.0.fused_conv.{part}"],
        )
        assert np.array_equal(a, b)


def test_second_naming_of_the_same_tensors_is_dropped(tmp_path: Path, run_cli: Any) -> None:
    out, report = fuse(run_cli, "mmcv_compat", "safetensors", tmp_path)
    assert report["dialect"] == "acnet"
    assert sum("dropped the keys of the 'mmcv' block" in n for n in report["notes"]) == 2
    assert not any("conv_kxk" in k or "conv_1xk" in k for k in load(out))
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        assert json.loads(f.metadata()["acnet_convert.aliases"]) == {
            "neck.acb (mmcv)": "neck.acb",
            "neck.out (mmcv)": "neck.out",
        }


def _infos(state: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, str(v.dtype), tuple(v.shape)) for k, v in state.items()}


def _same(state: dict[str, np.ndarray]) -> Any:
    return lambda a, b: state[a].dtype == state[b].dtype and np.array_equal(state[a], state[b])


def test_aliases_need_every_tensor_identical() -> None:
    state = load(FIXTURES / "mmcv_compat.safetensors")
    assert find_blocks(_infos(state), same=_same(state)).dialect.name == "acnet"  # type: ignore[union-attr]
    # one BN value differs by one ulp: no longer an alias, so two dialects explain the file
    state["neck.acb.square_bn.running_var"] = np.nextafter(
        state["neck.acb.square_bn.running_var"], np.float32(np.inf)
    )
    with pytest.raises(UnfusableBlockError, match="more than one naming dialect"):
        find_blocks(_infos(state), same=_same(state))
    # and without a way to compare data, aliases are never assumed
    with pytest.raises(UnfusableBlockError, match="more than one naming dialect"):
        find_blocks(_infos(load(FIXTURES / "mmcv_compat.safetensors")))


def test_identical_blocks_within_a_dialect_are_aliases_only_with_disjoint_keys() -> None:
    state = load(FIXTURES / "mmcv_shared.pth")
    detection = find_blocks(_infos(state), same=_same(state))
    assert [(a.block.label, a.primary.label, a.copy) for a in detection.aliases] == [
        ("backbone.layers.0", "backbone.stem", True)
    ]
    nudged = dict(state)
    nudged["backbone.layers.0.conv_kxk.conv.weight"] = (
        state["backbone.layers.0.conv_kxk.conv.weight"] * 2
    )
    assert find_blocks(_infos(nudged), same=_same(nudged)).aliases == ()


# --- the generic rule -----------------------------------------------------------------------


def _conv(sd: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> None:
    sd[key] = np.zeros(shape, np.float32)


def _torch_bn(sd: dict[str, np.ndarray], stem: str, c: int = 4) -> None:
    for f in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{stem}.{f}"] = np.ones(c, np.float32)


def test_generic_rule_finds_its_three_documented_layouts() -> None:
    sd: dict[str, np.ndarray] = {}
    _conv(sd, "a.sq.0.weight", (4, 2, 3, 3)), _torch_bn(sd, "a.sq.1")
    _conv(sd, "a.r.0.weight", (4, 2, 1, 3)), _torch_bn(sd, "a.r.1")
    _conv(sd, "a.c.0.weight", (4, 2, 3, 1)), _torch_bn(sd, "a.c.1")
    _conv(sd, "b.k.conv.weight", (4, 2, 5, 5)), _torch_bn(sd, "b.k.bn")
    _conv(sd, "b.h.conv.weight", (4, 2, 1, 3)), _torch_bn(sd, "b.h.norm")
    _conv(sd, "b.v.conv.weight", (4, 2, 3, 1)), _torch_bn(sd, "b.v.bn")
    _conv(sd, "conv_sq.weight", (4, 2, 3, 3)), _torch_bn(sd, "bn_sq")
    _conv(sd, "row.weight", (4, 2, 1, 3)), _torch_bn(sd, "row_bn")
    _conv(sd, "col.weight", (4, 2, 3, 1)), _torch_bn(sd, "bn_col")
    detection = find_blocks(_infos(sd))
    assert detection.dialect is GENERIC
    by_label = {b.label: b for b in detection.blocks}
    assert list(by_label) == ["a", "b", "<top level>"]
    assert by_label["a"].square.bn.mean == "a.sq.1.running_mean"  # type: ignore[union-attr]
    assert by_label["b"].branches[0].bn.mean == "b.h.norm.running_mean"  # type: ignore[union-attr]
    top = by_label["<top level>"]
    assert [top.square.bn.var, top.branches[0].bn.var, top.branches[1].bn.var] == [  # type: ignore[union-attr]
        "bn_sq.running_var",
        "row_bn.running_var",
        "bn_col.running_var",
    ]
    assert (
        top.fused_weight == "fused_conv.weight"
        and by_label["a"].fused_weight == "a.fused_conv.weight"
    )


def test_generic_rule_refuses_anything_but_exactly_one_of_each() -> None:
    sd: dict[str, np.ndarray] = {}
    _conv(sd, "two_rows.sq.weight", (4, 2, 3, 3))
    _conv(sd, "two_rows.r1.weight", (4, 2, 1, 3))
    _conv(sd, "two_rows.r2.weight", (4, 2, 1, 3))
    _conv(sd, "two_rows.c.weight", (4, 2, 3, 1))
    _conv(sd, "too_long.sq.weight", (4, 2, 3, 3))
    _conv(sd, "too_long.r.weight", (4, 2, 1, 5))
    _conv(sd, "too_long.c.weight", (4, 2, 5, 1))
    _conv(sd, "other_width.sq.weight", (4, 2, 3, 3))
    _conv(sd, "other_width.r.weight", (4, 3, 1, 3))
    _conv(sd, "other_width.c.weight", (4, 2, 3, 1))
    _conv(sd, "plain.conv1.weight", (4, 2, 3, 3))
    _conv(sd, "plain.conv2.weight", (4, 4, 3, 3))
    assert find_blocks(_infos(sd)).blocks == ()
    # a plain list of names has no shapes: the generic rule needs them
    assert find_blocks(["a.sq.weight", "a.r.weight", "a.c.weight"]).dialect is None


def test_every_builtin_dialect_is_tried_and_named() -> None:
    assert [d.name for d in BUILTIN_DIALECTS] == ["acnet", "acnet-2019", "mmcv", "paddle", "keras"]
    with pytest.raises(UsageError, match="unknown dialect"):
        get_dialect("acnet2")
    assert get_dialect("generic") is GENERIC


# --- bad input ------------------------------------------------------------------------------


def test_block_with_a_missing_bn_tensor_is_one_clear_line(tmp_path: Path, run_cli: Any) -> None:
    from safetensors.numpy import save_file

    state = load(FIXTURES / "paddle_resnet.safetensors")
    del state["bn2a_branch2b_acver_variance"]
    src = tmp_path / "broken.safetensors"
    save_file(state, str(src))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("fuse", src, out_dir / "o.safetensors", expect=3)
    line = result.stderr.strip()
    assert "\n" not in line
    assert "block 'res2a_branch2b'" in line and "'bn2a_branch2b_acver_variance' is missing" in line
    assert list(out_dir.iterdir()) == []


def test_keras_file_with_a_dangling_weight_name_is_refused(tmp_path: Path, run_cli: Any) -> None:
    import shutil

    src = tmp_path / "broken.h5"
    shutil.copy(FIXTURES / "keras_acnet.h5", src)
    with h5py.File(src, "r+") as f:
        del f["conv1_hor_bn/conv1_hor_bn/moving_variance:0"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("fuse", src, out_dir / "o.h5", expect=3)
    assert "\n" not in result.stderr.strip()
    assert "moving_variance:0" in result.stderr
    assert list(out_dir.iterdir()) == []
