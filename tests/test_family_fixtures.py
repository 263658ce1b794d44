"""End to end: every re-parameterization family, fused from the weights alone.

For each family fixture (fixtures/make_family_fixtures.py: the training-time
nets of tests/family_reference.py, whose names, shapes and deploy keys were
checked against the families' own upstream modules), ``acnet-convert fuse``
with default options must write a file that loads with ``strict=True`` into
the family's deploy-form net and reproduces the training net's eval output.
The fused file is read back with torch / safetensors / h5py directly, not with
the project's readers.

Tolerances: a float32 checkpoint's fused kernels are float64 sums rounded once
to float32 (relative error <= 2^-24 per weight); through six layers of at most
a few hundred products each the output moves by well under 1e-6 of its
maximum, so 1e-5 relative (the issue's bar) leaves margin while a wrong
branch, eps or scale (>= 1e-4) fails. In float64 the same analysis gives
~1e-14; 1e-10 is the bar.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

import make_family_fixtures as mff  # noqa: E402

FORMATS = ("pth", "safetensors", "hdf5")
FAMILIES = ("dbb", "repvgg", "mobileone", "repconv", "timm", "replknet")
ALL = (*FAMILIES, "mixed_acnet_repvgg")
DEPLOY_NAMES = ("dbb_reparam", "rbr_reparam", "reparam_conv", "lkb_reparam", "fused_conv")
FLOAT32_RTOL = 1e-5
# families whose deploy nets fold their plain conv+BN units (what fuse does by default for them)
FOLDS_BY_DEFAULT = ("dbb",)
FLOAT64_RTOL = 1e-10


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_plainly(path: Path) -> dict[str, torch.Tensor]:
    """Read a written checkpoint the way a user would, without the project's readers."""
    if path.suffix == ".pth":
        obj = torch.load(path, weights_only=True)
        while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = [obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)]
            assert inner, f"no state dict in {sorted(obj)}"
            obj = inner[0]
        sd = dict(obj)
    elif path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        sd = {}
        with h5py.File(path, "r") as f:
            for name, item in f.items():
                if isinstance(item, h5py.Dataset):
                    sd[name.replace("+", "/")] = torch.from_numpy(np.array(item[()]))
    return _strip_prefix(sd)


def _io(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    io = load_file(str(FIXTURES / "families" / f"{name}.io.safetensors"))
    return io["input"], io["output"]


def _deployed_output(
    name: str, fused: dict[str, torch.Tensor], fold_bn: bool | None = None
) -> torch.Tensor:
    fold = name in FOLDS_BY_DEFAULT if fold_bn is None else fold_bn
    deployed = mff.build(name, deploy=True, fold_bn=fold).double().eval()
    deployed.load_state_dict({k: v.double() for k, v in fused.items()}, strict=True)
    with torch.no_grad():
        out: torch.Tensor = deployed(_io(name)[0])
    return out


def _rel(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got - reference).abs().max() / reference.abs().max())


def _block_prefixes(name: str) -> set[str]:
    """The fused blocks a fixture has: every deploy-name conv of its deploy-form net."""
    keys = mff.build(name, deploy=True).state_dict()
    pattern = re.compile(rf"^(.*)\.({'|'.join(DEPLOY_NAMES)})\.weight$")
    out = set()
    for key in keys:
        m = pattern.match(key)
        if m:
            out.add(m.group(1))
    assert out
    return out


@pytest.mark.parametrize("out_fmt", FORMATS)
@pytest.mark.parametrize("in_fmt", FORMATS)
@pytest.mark.parametrize("name", ALL)
def test_family_fuses_into_its_deploy_net(
    name: str, in_fmt: str, out_fmt: str, tmp_path: Path, run_cli
) -> None:
    source = FIXTURES / "families" / f"{name}.{in_fmt}"
    before = source.read_bytes()
    out = tmp_path / f"fused.{out_fmt}"
    run_cli("fuse", source, out, "--quiet")
    assert source.read_bytes() == before
    fused = _load_plainly(out)
    assert all(v.dtype in (torch.float32, torch.int64) for v in fused.values())
    rel = _rel(_deployed_output(name, fused), _io(name)[1])
    assert rel <= FLOAT32_RTOL, rel


@pytest.mark.parametrize("name", ALL)
def test_family_fuses_in_float64(name: str, tmp_path: Path, run_cli) -> None:
    sd = load_file(str(FIXTURES / "families" / f"{name}.safetensors"))
    source = tmp_path / "train64.safetensors"
    save_file({k: v.double() if v.is_floating_point() else v for k, v in sd.items()}, str(source))
    out = tmp_path / "fused64.safetensors"
    run_cli("fuse", source, out, "--quiet")
    fused = _load_plainly(out)
    assert {v.dtype for v in fused.values() if v.is_floating_point()} == {torch.float64}
    rel = _rel(_deployed_output(name, fused), _io(name)[1])
    assert rel <= FLOAT64_RTOL, rel


def test_unfused_family_output_fails_the_comparison() -> None:
    """The comparison above can fail: the training file itself does not load as deployed."""
    sd = _load_plainly(FIXTURES / "families" / "repvgg.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        _deployed_output("repvgg", sd)


@pytest.mark.parametrize("name", ["dbb", "repconv", "replknet"])
def test_fold_bn_writes_the_upstream_deploy_net(name: str, tmp_path: Path, run_cli) -> None:
    """DBB's ConvBN, YOLOv7's Conv and RepLKNet's conv_bn units fold into conv.{weight,bias}.

    RepLKNet's ``prelkb_bn`` sits before a conv, not after one: it must stay as it is.
    """
    out = tmp_path / "fused.safetensors"
    run_cli("fuse", FIXTURES / "families" / f"{name}.safetensors", out, "--fold-bn", "--quiet")
    fused = _load_plainly(out)
    assert set(fused) == set(mff.build(name, deploy=True, fold_bn=True).state_dict())
    rel = _rel(_deployed_output(name, fused, fold_bn=True), _io(name)[1])
    assert rel <= FLOAT32_RTOL, rel


@pytest.mark.parametrize("name", ALL)
def test_inspect_shows_the_blocks(name: str, run_cli) -> None:
    result = run_cli("inspect", FIXTURES / "families" / f"{name}.safetensors", "--json")
    report = json.loads(result.stdout)
    assert report["schema"] == 1
    shown = {block["block"] for block in report["blocks"] if block["family"] != "conv-bn"}
    assert shown == _block_prefixes(name)
    folded = {block["block"] for block in report["blocks"] if block["family"] == "conv-bn"}
    assert folded == ({"stem.conv", "proj.conv"} if name in FOLDS_BY_DEFAULT else set())
    text = run_cli("inspect", FIXTURES / "families" / f"{name}.safetensors").stdout
    assert f"{len(shown) + len(folded)} blocks" in text


@pytest.mark.parametrize("name", ALL)
def test_verify_checks_every_block(name: str, tmp_path: Path, run_cli) -> None:
    source = FIXTURES / "families" / f"{name}.safetensors"
    out = tmp_path / "fused.safetensors"
    run_cli("fuse", source, out, "--quiet")
    result = run_cli("verify", source, out, "--blocks", "--json")
    report = json.loads(result.stdout)
    assert report["passed"] is True
    checked = {case["name"] for case in report["cases"] if case["kind"] == "block"}
    assert checked >= _block_prefixes(name)

    # The same check must catch one fused kernel that is off.
    fused = load_file(str(out))
    key = next(
        k for k in sorted(fused) if k.endswith(".weight") and k.split(".")[-2] in DEPLOY_NAMES
    )
    fused[key] = fused[key].clone()
    fused[key].view(-1)[0] += 0.5
    bad = tmp_path / "bad.safetensors"
    save_file(fused, str(bad))
    run_cli("verify", source, bad, "--blocks", expect=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_fuse_and_load_reaches_every_family(name: str) -> None:
    from acnet_convert.api import fuse_and_load

    deployed = mff.build(name, deploy=True, fold_bn=name in FOLDS_BY_DEFAULT).double().eval()
    fuse_and_load(deployed, FIXTURES / "families" / f"{name}.safetensors")
    x, reference = _io(name)
    with torch.no_grad():
        rel = _rel(deployed(x), reference)
    assert rel <= FLOAT32_RTOL, rel


def test_mixed_checkpoint_is_fused_whole(tmp_path: Path, run_cli) -> None:
    """An ACNet backbone with a RepVGG head: both families fused, nothing left in training form."""
    out = tmp_path / "fused.pth"
    run_cli("fuse", FIXTURES / "families" / "mixed_acnet_repvgg.pth", out, "--quiet")
    fused = _load_plainly(out)
    assert not [
        k for k in fused if re.search(r"(rbr_dense|rbr_1x1|rbr_identity|square_|hor_|ver_)", k)
    ]
    rel = _rel(_deployed_output("mixed_acnet_repvgg", fused), _io("mixed_acnet_repvgg")[1])
    assert rel <= FLOAT32_RTOL, rel


def _with_unknown_branch(tmp_path: Path) -> Path:
    """The mixed net plus a conv+BN sibling no family knows, inside the RepVGG head block."""
    sd = load_file(str(FIXTURES / "families" / "mixed_acnet_repvgg.safetensors"))
    extra = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    for k, v in extra.state_dict().items():
        sd["head_block.rbr_extra." + k.replace("0.", "conv.").replace("1.", "bn.")] = v
    path = tmp_path / "mixed_extra.safetensors"
    save_file(sd, str(path))
    return path


def test_leftover_training_branch_is_refused_not_half_fused(tmp_path: Path, run_cli) -> None:
    source = _with_unknown_branch(tmp_path)
    out = tmp_path / "fused.safetensors"
    result = run_cli("fuse", source, out, expect=3)
    assert "head_block.rbr_extra" in result.stderr
    assert not out.exists()
    assert not list(tmp_path.glob("fused*"))
    allowed = tmp_path / "allowed.safetensors"
    run_cli("fuse", source, allowed, "--allow-unfused", "--quiet")
    fused = load_file(str(allowed))
    assert "head_block.rbr_reparam.weight" in fused
    assert "head_block.rbr_extra.conv.weight" in fused


@pytest.mark.parametrize("name", ALL)
def test_shipped_fixtures_are_what_the_generator_writes(name: str, tmp_path: Path) -> None:
    """Regenerating a fixture gives the same tensors: the shipped files match the reference nets."""
    mff.make(name, out=tmp_path)
    for suffix in ("safetensors", "io.safetensors"):
        shipped = load_file(str(FIXTURES / "families" / f"{name}.{suffix}"))
        fresh = load_file(str(tmp_path / f"{name}.{suffix}"))
        assert list(shipped) == list(fresh)
        for key, value in shipped.items():
            assert torch.equal(value, fresh[key]), key


# (fixture, tensor removed): each leaves a branch incomplete; fusing without it would be a different net
INCOMPLETE = [
    ("dbb", "block1.dbb_1x1.conv.weight"),
    ("dbb", "block1.dbb_avg.conv.weight"),
    ("dbb", "block1.dbb_avg.avgbn.running_var"),
    ("dbb", "block2.dbb_1x1_kxk.idconv1.weight"),
    ("dbb", "block4.dbb_1x1_kxk.bn1.bn.running_var"),
    ("repvgg", "stage1.rbr_1x1.conv.weight"),
    ("repvgg", "stage1.rbr_identity.running_var"),
    ("mobileone", "dw1.rbr_conv.1.conv.weight"),
    ("mobileone", "dw1.rbr_scale.conv.weight"),
    ("mobileone", "dw1.rbr_skip.running_mean"),
    ("repconv", "rep2.rbr_1x1.0.weight"),
    ("repconv", "rep2.rbr_identity.running_var"),
    ("timm", "rv1.conv_1x1.conv.weight"),
    ("timm", "mo_dw.conv_kxk.1.conv.weight"),
    ("timm", "mo_dw.conv_scale.bn.running_var"),
    ("replknet", "block1.large_kernel.small_conv.conv.weight"),
    ("replknet", "block1.large_kernel.small_conv.bn.running_var"),
]


@pytest.mark.parametrize(("name", "removed"), INCOMPLETE)
def test_incomplete_branch_is_refused(name: str, removed: str, tmp_path: Path, run_cli) -> None:
    sd = load_file(str(FIXTURES / "families" / f"{name}.safetensors"))
    del sd[removed]
    source = tmp_path / "incomplete.safetensors"
    save_file(sd, str(source))
    out = tmp_path / "fused.safetensors"
    result = run_cli("fuse", source, out, expect=3)
    assert not out.exists()
    block = removed.split(".dbb_")[0].split(".rbr_")[0].split(".conv_")[0].split(".small_conv")[0]
    assert f"'{block}" in result.stderr, result.stderr
    # the siblings prove the block is not fused: the message says what was found instead
    title = TITLES[name]
    assert f"these look like {title} tensors without '{removed[len(block) + 1 :]}" in result.stderr
    assert "not a fused one" in result.stderr and "already fused" not in result.stderr


TITLES = {
    "dbb": "DBB",
    "repvgg": "RepVGG",
    "mobileone": "MobileOne",
    "repconv": "RepConv (YOLOv7)",
    "timm": "timm ByobNet",
    "replknet": "RepLKNet",
}


def test_a_block_beside_its_fused_conv_still_asks_whether_it_is_fused(
    tmp_path: Path, run_cli
) -> None:
    """A RepVGG block whose rbr_reparam is in the file too: that may be a half-fused file."""
    sd = load_file(str(FIXTURES / "families" / "repvgg.safetensors"))
    sd["stage1.rbr_reparam.weight"] = sd["stage1.rbr_dense.conv.weight"].clone()
    sd["stage1.rbr_reparam.bias"] = sd["stage1.rbr_dense.bn.bias"].clone()
    del sd["stage1.rbr_1x1.conv.weight"]
    source = tmp_path / "half.safetensors"
    save_file(sd, str(source))
    result = run_cli("fuse", source, tmp_path / "o.safetensors", expect=3)
    assert "'stage1.rbr_1x1.conv.weight' is missing" in result.stderr, result.stderr
    assert "is this checkpoint already fused?" in result.stderr


def test_repvgg_identity_with_in_not_out_says_so(tmp_path: Path, run_cli) -> None:
    sd = load_file(str(FIXTURES / "families" / "repvgg.safetensors"))
    stem = "stage1.rbr_identity."
    width = sd[stem + "running_var"].shape[0]
    for part in ("weight", "bias", "running_mean", "running_var"):
        sd[stem + part] = sd[stem + part][: width // 2].clone()
    source = tmp_path / "odd.safetensors"
    save_file(sd, str(source))
    result = run_cli("fuse", source, tmp_path / "o.safetensors", expect=3)
    assert "RepVGG identity branch 'rbr_identity' with in != out" in result.stderr, result.stderr
    assert f"its BN has [{width // 2}] channels" in result.stderr


def test_dbb_folds_its_plain_units_by_default(tmp_path: Path, run_cli) -> None:
    """DBB's deploy nets (DEPLOY_FLAG) build each plain ConvBN as one conv with a bias: default
    options write exactly that net; --no-fold-bn keeps the conv+BN units."""
    source = FIXTURES / "families" / "dbb.safetensors"
    out = tmp_path / "fused.safetensors"
    report = json.loads(run_cli("fuse", source, out, "--json").stdout)
    fused = _load_plainly(out)
    assert set(fused) == set(mff.build("dbb", deploy=True, fold_bn=True).state_dict())
    rel = _rel(_deployed_output("dbb", fused, fold_bn=True), _io("dbb")[1])
    assert rel <= FLOAT32_RTOL, rel
    note = next(n for n in report["notes"] if "by default" in n)
    assert "DBB deploy nets fold them" in note and "--no-fold-bn" in note
    run_cli("verify", source, out, "--blocks")

    kept = tmp_path / "kept.safetensors"
    run_cli("fuse", source, kept, "--no-fold-bn", "--quiet")
    plain = _load_plainly(kept)
    assert set(plain) == set(mff.build("dbb", deploy=True).state_dict())
    assert _rel(_deployed_output("dbb", plain, fold_bn=False), _io("dbb")[1]) <= FLOAT32_RTOL
    run_cli("verify", source, kept, "--blocks")


def test_inspect_says_what_fuse_folds_and_follows_fold_bn(run_cli) -> None:
    source = FIXTURES / "families" / "dbb.safetensors"
    shown = json.loads(run_cli("inspect", source, "--json").stdout)
    note = next(n for n in shown["notes"] if "by default" in n)
    assert note.startswith("fuse folds 2 plain conv+BN units") and "--no-fold-bn" in note
    assert "conv-bn" in {b["family"] for b in shown["blocks"]}
    kept = json.loads(run_cli("inspect", source, "--json", "--no-fold-bn").stdout)
    assert not any("fold" in n for n in kept["notes"])
    assert "conv-bn" not in {b["family"] for b in kept["blocks"]}
    assert kept["totals"] != shown["totals"]
    human = run_cli("inspect", source).stdout + run_cli("inspect", source).stderr
    assert "fuse folds 2 plain conv+BN units" in human


def test_a_mixed_file_folds_only_when_every_family_asks(tmp_path: Path, run_cli) -> None:
    """DBB blocks beside a RepVGG block: RepVGG's deploy nets keep conv+BN, so nothing folds."""
    sd = load_file(str(FIXTURES / "families" / "dbb.safetensors"))
    sd.update(
        {
            f"head.{k}": v
            for k, v in load_file(str(FIXTURES / "families" / "repvgg.safetensors")).items()
        }
    )
    source = tmp_path / "mixed.safetensors"
    save_file(sd, str(source))
    out = tmp_path / "fused.safetensors"
    report = json.loads(run_cli("fuse", source, out, "--json").stdout)
    assert "conv-bn" not in {b["family"] for b in report["blocks"]}
    assert not any("by default" in n for n in report["notes"])
    assert "stem.bn.running_var" in load_file(str(out))
