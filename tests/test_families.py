"""Every built-in family fused from its weights alone, checked against torch in eval mode.

Each case builds a training-time block's state dict under its family's
upstream names (seeded), runs the training-time computation with torch's
conv2d / batch_norm / avg_pool2d (an independent reference, written from the
papers' definitions), fuses with ``acnet-convert fuse`` and compares the fused
conv under the family's deploy names. float64 blocks: 1e-10 relative.
The reference works in 'valid' mode (no padding), where every branch,
DBB's padding BNs included, is defined without border conventions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from acnet_convert.checkpoint import open_checkpoint
from acnet_convert.convert import fuse_state
from acnet_convert.fusion import BNStats, Branch
from acnet_convert.kinds import equivalent, reference
from acnet_convert.naming import BranchNames, Dialect, bn_names
from acnet_convert.plan import FuseOptions

State = dict[str, np.ndarray]
Tensor = torch.Tensor


def _bn(rng: np.random.Generator, sd: State, stem: str, c: int) -> None:
    sd[f"{stem}.weight"] = rng.uniform(0.5, 1.5, c)
    sd[f"{stem}.bias"] = rng.normal(0, 0.3, c)
    sd[f"{stem}.running_mean"] = rng.normal(0, 0.3, c)
    sd[f"{stem}.running_var"] = rng.uniform(0.5, 2.0, c)
    sd[f"{stem}.num_batches_tracked"] = np.array(7, dtype=np.int64)


def _conv(rng: np.random.Generator, sd: State, key: str, shape: tuple[int, ...]) -> None:
    sd[key] = rng.normal(0, 0.5, shape)


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _apply_bn(
    y: Tensor, sd: State, stem: str, eps: float = 1e-5, *, style: str = "torch"
) -> Tensor:
    """Eval-mode BN from the state's ``<stem>.*`` (Paddle's ``_mean``/``_variance`` names too)."""
    mean, var = ("running_mean", "running_var") if style == "torch" else ("_mean", "_variance")
    return F.batch_norm(
        y,
        _t(sd[f"{stem}.{mean}"]),
        _t(sd[f"{stem}.{var}"]),
        _t(sd[f"{stem}.weight"]),
        _t(sd[f"{stem}.bias"]),
        False,
        0.0,
        eps,
    )


def _crop(y: Tensor, target: int, k: int) -> Tensor:
    c = (target - k) // 2
    return y[:, :, c : y.shape[2] - c, c : y.shape[3] - c] if c else y


@dataclass
class Case:
    """A block's state dict, its reference forward, and where the fused conv goes."""

    state: State
    forward: Callable[[Tensor], Tensor]
    fused: str
    k: int
    groups: int
    cin: int


def _conv_bn(
    sd: State, conv: str, bn: str, x: Tensor, k: int, groups: int, eps: float = 1e-5
) -> Tensor:
    w = _t(sd[conv])
    return _apply_bn(F.conv2d(_crop(x, k, w.shape[2]), w, groups=groups), sd, bn, eps)


def _identity(sd: State, bn: str, x: Tensor, k: int, eps: float = 1e-5) -> Tensor:
    return _apply_bn(_crop(x, k, 1), sd, bn, eps)


def repvgg_case(names: str, c: int = 4, groups: int = 2, k: int = 3) -> Case:
    rng = np.random.default_rng(11)
    sd: State = {}
    dense, one = (
        ("rbr_dense.conv", "rbr_1x1.conv") if names == "repvgg" else ("rbr_dense.0", "rbr_1x1.0")
    )
    dbn, obn = ("rbr_dense.bn", "rbr_1x1.bn") if names == "repvgg" else ("rbr_dense.1", "rbr_1x1.1")
    p = "stage1.0."
    _conv(rng, sd, f"{p}{dense}.weight", (c, c // groups, k, k))
    _bn(rng, sd, f"{p}{dbn}", c)
    _conv(rng, sd, f"{p}{one}.weight", (c, c // groups, 1, 1))
    _bn(rng, sd, f"{p}{obn}", c)
    _bn(rng, sd, f"{p}rbr_identity", c)
    sd["head.weight"] = rng.normal(size=(3, c))

    eps = 1e-5 if names == "repvgg" else 1e-3  # YOLOv7 builds its BNs with eps 1e-3

    def forward(x: Tensor) -> Tensor:
        return (
            _conv_bn(sd, f"{p}{dense}.weight", f"{p}{dbn}", x, k, groups, eps)
            + _conv_bn(sd, f"{p}{one}.weight", f"{p}{obn}", x, k, groups, eps)
            + _identity(sd, f"{p}rbr_identity", x, k, eps)
        )

    return Case(sd, forward, f"{p}rbr_reparam", k, groups, c)


def mobileone_case(timm: bool, c: int = 6, k: int = 3) -> Case:
    rng = np.random.default_rng(12)
    sd: State = {}
    conv, scale, skip = (
        ("conv_kxk", "conv_scale", "identity") if timm else ("rbr_conv", "rbr_scale", "rbr_skip")
    )
    p = "features.2."
    for i in range(3):
        _conv(rng, sd, f"{p}{conv}.{i}.conv.weight", (c, 1, k, k))
        _bn(rng, sd, f"{p}{conv}.{i}.bn", c)
    _conv(rng, sd, f"{p}{scale}.conv.weight", (c, 1, 1, 1))
    _bn(rng, sd, f"{p}{scale}.bn", c)
    _bn(rng, sd, f"{p}{skip}", c)

    def forward(x: Tensor) -> Tensor:
        total = _identity(sd, f"{p}{skip}", x, k)
        total = total + _conv_bn(sd, f"{p}{scale}.conv.weight", f"{p}{scale}.bn", x, k, c)
        for i in range(3):
            total = total + _conv_bn(sd, f"{p}{conv}.{i}.conv.weight", f"{p}{conv}.{i}.bn", x, k, c)
        return total

    return Case(sd, forward, f"{p}reparam_conv", k, c, c)


def timm_repvgg_case(c: int = 4, k: int = 3) -> Case:
    rng = np.random.default_rng(13)
    sd: State = {}
    p = "stages.0.0."
    _conv(rng, sd, f"{p}conv_kxk.conv.weight", (c, c, k, k))
    _bn(rng, sd, f"{p}conv_kxk.bn", c)
    _conv(rng, sd, f"{p}conv_1x1.conv.weight", (c, c, 1, 1))
    _bn(rng, sd, f"{p}conv_1x1.bn", c)
    _bn(rng, sd, f"{p}identity", c)

    def forward(x: Tensor) -> Tensor:
        return (
            _conv_bn(sd, f"{p}conv_kxk.conv.weight", f"{p}conv_kxk.bn", x, k, 1)
            + _conv_bn(sd, f"{p}conv_1x1.conv.weight", f"{p}conv_1x1.bn", x, k, 1)
            + _identity(sd, f"{p}identity", x, k)
        )

    return Case(sd, forward, f"{p}reparam_conv", k, 1, c)


def replknet_case(c: int = 4, big: int = 7, small: int = 3) -> Case:
    rng = np.random.default_rng(14)
    sd: State = {}
    p = "stages.1.blocks.0.large_kernel."
    _conv(rng, sd, f"{p}lkb_origin.conv.weight", (c, 1, big, big))
    _bn(rng, sd, f"{p}lkb_origin.bn", c)
    _conv(rng, sd, f"{p}small_conv.conv.weight", (c, 1, small, small))
    _bn(rng, sd, f"{p}small_conv.bn", c)

    def forward(x: Tensor) -> Tensor:
        return _conv_bn(
            sd, f"{p}lkb_origin.conv.weight", f"{p}lkb_origin.bn", x, big, c
        ) + _conv_bn(sd, f"{p}small_conv.conv.weight", f"{p}small_conv.bn", x, big, c)

    return Case(sd, forward, f"{p}lkb_reparam", big, c, c)


def dbb_case(first: str, cin: int = 4, cout: int = 6, groups: int = 2, k: int = 3) -> Case:
    rng = np.random.default_rng(15)
    sd: State = {}
    p = "layer1.0.conv1."
    ipg = cin // groups
    mid = cin if first == "idconv1" else 2 * cin
    _conv(rng, sd, f"{p}dbb_origin.conv.weight", (cout, ipg, k, k))
    _bn(rng, sd, f"{p}dbb_origin.bn", cout)
    _conv(rng, sd, f"{p}dbb_1x1.conv.weight", (cout, ipg, 1, 1))
    _bn(rng, sd, f"{p}dbb_1x1.bn", cout)
    _conv(rng, sd, f"{p}dbb_avg.conv.weight", (cout, ipg, 1, 1))
    _bn(rng, sd, f"{p}dbb_avg.bn.bn", cout)
    _bn(rng, sd, f"{p}dbb_avg.avgbn", cout)
    _conv(rng, sd, f"{p}dbb_1x1_kxk.{first}.weight", (mid, ipg, 1, 1))
    _bn(rng, sd, f"{p}dbb_1x1_kxk.bn1.bn", mid)
    _conv(rng, sd, f"{p}dbb_1x1_kxk.conv2.weight", (cout, mid // groups, k, k))
    _bn(rng, sd, f"{p}dbb_1x1_kxk.bn2", cout)

    def forward(x: Tensor) -> Tensor:
        total = _conv_bn(sd, f"{p}dbb_origin.conv.weight", f"{p}dbb_origin.bn", x, k, groups)
        total = total + _conv_bn(sd, f"{p}dbb_1x1.conv.weight", f"{p}dbb_1x1.bn", x, k, groups)
        avg = F.conv2d(x, _t(sd[f"{p}dbb_avg.conv.weight"]), groups=groups)
        avg = F.avg_pool2d(_apply_bn(avg, sd, f"{p}dbb_avg.bn.bn"), k, stride=1)
        total = total + _apply_bn(avg, sd, f"{p}dbb_avg.avgbn")
        w1 = _t(sd[f"{p}dbb_1x1_kxk.{first}.weight"])
        if first == "idconv1":  # the identity IdentityBasedConv1x1 adds in its forward
            eye = torch.zeros_like(w1)
            for i in range(mid):
                eye[i, i % ipg, 0, 0] = 1.0
            w1 = w1 + eye
        z = _apply_bn(F.conv2d(x, w1, groups=groups), sd, f"{p}dbb_1x1_kxk.bn1.bn")
        z = F.conv2d(z, _t(sd[f"{p}dbb_1x1_kxk.conv2.weight"]), groups=groups)
        return total + _apply_bn(z, sd, f"{p}dbb_1x1_kxk.bn2")

    return Case(sd, forward, f"{p}dbb_reparam", k, groups, cin)


CASES: dict[str, Callable[[], Case]] = {
    "repvgg": lambda: repvgg_case("repvgg"),
    "repconv-yolov7": lambda: repvgg_case("repconv"),
    "mobileone": lambda: mobileone_case(timm=False),
    "timm-mobileone": lambda: mobileone_case(timm=True),
    "timm-repvgg": timm_repvgg_case,
    "replknet": replknet_case,
    "dbb-idconv1": lambda: dbb_case("idconv1"),
    "dbb-conv1": lambda: dbb_case("conv1"),
}


def _fused_matches(case: Case, out: State, seed: int) -> None:
    x = _t(np.random.default_rng(seed).normal(size=(2, case.cin, case.k + 3, case.k + 4)))
    want = case.forward(x)
    got = F.conv2d(
        x, _t(out[f"{case.fused}.weight"]), _t(out[f"{case.fused}.bias"]), groups=case.groups
    )
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 1e-10 * want.abs().max().item(), err


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_fuses_under_its_deploy_names(name: str, tmp_path: Path, run_cli: Any) -> None:
    case = CASES[name]()
    src, dst = tmp_path / "train.safetensors", tmp_path / "deploy.safetensors"
    save_file(case.state, str(src))
    run_cli("fuse", src, dst)
    out = load_file(str(dst))
    _fused_matches(case, out, seed=len(name))
    trained = {k for k in case.state if not k.startswith(case.fused.rpartition(".")[0] + ".")}
    assert not trained & set(out) - {"head.weight"}  # no training-time branch is left
    assert {f"{case.fused}.weight", f"{case.fused}.bias"} <= set(out)


def test_mixed_families_are_all_fused(tmp_path: Path, run_cli: Any) -> None:
    """An ACNet backbone with a RepVGG head: both fused, never half of it."""
    repvgg = repvgg_case("repvgg")
    rng = np.random.default_rng(3)
    acb: State = {}
    for conv, shape in (("square", (4, 4, 3, 3)), ("hor", (4, 4, 1, 3)), ("ver", (4, 4, 3, 1))):
        _conv(rng, acb, f"backbone.acb.{conv}_conv.weight", shape)
        _bn(rng, acb, f"backbone.acb.{conv}_bn", 4)
    src, dst = tmp_path / "mixed.safetensors", tmp_path / "deploy.safetensors"
    save_file({**acb, **repvgg.state}, str(src))
    result = run_cli("fuse", src, dst, "--json")
    out = load_file(str(dst))
    assert "backbone.acb.fused_conv.weight" in out
    _fused_matches(repvgg, out, seed=1)
    assert not any("square_conv" in k or "rbr_dense" in k for k in out)
    import json

    report = json.loads(result.stdout)
    assert report["schema"] == 1 and report["blocks_fused"] == 2
    assert {b["family"] for b in report["blocks"]} == {"acnet", "repvgg"}


def test_timm_conv_kxk_is_not_claimed_by_mmcv(tmp_path: Path, run_cli: Any) -> None:
    case = timm_repvgg_case()
    src = tmp_path / "timm.safetensors"
    save_file(case.state, str(src))
    result = run_cli("inspect", src, "--json")
    import json

    blocks = json.loads(result.stdout)["blocks"]
    assert [b["family"] for b in blocks] == ["timm"]
    assert [x["kind"] for x in blocks[0]["branches"]] == ["conv", "conv", "identity"]


def test_toy_family_needs_no_pipeline_edit() -> None:
    """A 'square + 1x1' family declared as data only, fused and checked by the pipeline."""
    toy = Dialect(
        name="toy",
        family="toy",
        description="a 3x3 conv+BN beside a 1x1 conv+BN",
        anchor=r"(?P<p>(?:.+\.)?)sq\.conv\.weight",
        square=BranchNames("{p}sq.conv.weight", None, bn_names("{p}sq.bn")),
        branches=(BranchNames("{p}pw.conv.weight", None, bn_names("{p}pw.bn")),),
        fused_weight="{p}merged.weight",
        fused_bias="{p}merged.bias",
        label="{p}",
    )
    rng = np.random.default_rng(21)
    sd: State = {}
    _conv(rng, sd, "b.sq.conv.weight", (5, 3, 3, 3))
    _bn(rng, sd, "b.sq.bn", 5)
    _conv(rng, sd, "b.pw.conv.weight", (5, 3, 1, 1))
    _bn(rng, sd, "b.pw.bn", 5)

    from acnet_convert.checkpoint import TensorInfo

    class Reader:
        path = Path("toy.safetensors")

        def __init__(self) -> None:
            self.tensors = {k: TensorInfo(k, str(v.dtype), tuple(v.shape)) for k, v in sd.items()}

        def read(self, key: str) -> np.ndarray:
            return sd[key]

        def raw(self, key: str) -> None:
            return None

    reader: Any = Reader()
    state = fuse_state(reader, FuseOptions(extra_dialects=(toy,)))
    assert state.blocks[0].passed is True
    x = _t(rng.normal(size=(2, 3, 6, 6)))
    want = _conv_bn(sd, "b.sq.conv.weight", "b.sq.bn", x, 3, 1) + _conv_bn(
        sd, "b.pw.conv.weight", "b.pw.bn", x, 3, 1
    )
    got = F.conv2d(x, _t(state.tensors["b.merged.weight"]), _t(state.tensors["b.merged.bias"]))
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_dilated_conv_kind_is_a_sparse_centred_kernel() -> None:
    """A 2x2 conv with dilation 2 (a corner branch) equals a 3x3 with only its corners set."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(4, 2, 2, 2))
    bn = BNStats(rng.normal(size=4), rng.uniform(0.5, 2, 4), rng.uniform(0.5, 1.5, 4), None, 1e-5)
    branch = Branch(w, None, bn, dilation=2)
    kernel, bias = equivalent(branch, (4, 2, 3, 3))
    assert kernel.shape == (4, 2, 3, 3) and np.all(kernel[:, :, 1, :] == 0)
    x = rng.normal(size=(2, 2, 5, 5))
    want = F.conv2d(_t(x), _t(w), dilation=2).numpy()
    t = bn.scale()
    want = want * t[None, :, None, None] + (bn.shift() - bn.mean * t)[None, :, None, None]
    np.testing.assert_allclose(reference(branch, x, (4, 2, 3, 3)), want, rtol=1e-12, atol=1e-12)
    got = F.conv2d(_t(x), _t(kernel), _t(bias)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_repvgg_identity_with_in_not_out_is_refused(tmp_path: Path, run_cli: Any) -> None:
    rng = np.random.default_rng(2)
    sd: State = {}
    _conv(rng, sd, "b.rbr_dense.conv.weight", (6, 4, 3, 3))
    _bn(rng, sd, "b.rbr_dense.bn", 6)
    _bn(rng, sd, "b.rbr_identity", 6)
    src = tmp_path / "bad.safetensors"
    save_file(sd, str(src))
    result = run_cli("fuse", src, tmp_path / "o.safetensors", expect=3)
    assert "RepVGG identity branch 'rbr_identity' with in != out" in result.stderr
    assert "'rbr_dense.conv.weight' is [6, 4, 3, 3]" in result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_stream_slabs_agree_with_one_slab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Identity and avg kernels depend on the absolute channel: slabs of 1 row give the same bytes."""
    case = CASES["dbb-conv1"]()  # seq: read whole; check repvgg's identity too
    for c in (case, CASES["repvgg"](), CASES["mobileone"]()):
        src = tmp_path / "t.safetensors"
        save_file(c.state, str(src))
        with open_checkpoint(src) as reader:
            whole = fuse_state(reader).tensors
        monkeypatch.setattr("acnet_convert.streaming._SLAB_BYTES", 1)
        with open_checkpoint(src) as reader:
            slabbed = fuse_state(reader)
        monkeypatch.undo()
        assert all(b.passed for b in slabbed.blocks)
        for key, value in whole.items():
            np.testing.assert_array_equal(slabbed.tensors[key], value)


def test_a_user_toml_family_with_branch_kinds(tmp_path: Path, run_cli: Any) -> None:
    """A patterns file can describe a new family: N branches, each with a kind."""
    toml = tmp_path / "myrep.toml"
    toml.write_text(
        """
[[dialect]]
name = "myrep"
family = "myrep"
anchor = '(?P<p>(?:.+\\.)?)big\\.conv\\.weight'
fused_weight = "{p}deployed.weight"
fused_bias = "{p}deployed.bias"
square = { weight = "{p}big.conv.weight", bn = "{p}big.bn" }
branches = [
  { weight = "{p}point.conv.weight", bn = "{p}point.bn" },
  { kind = "identity", bn = "{p}skip" },
]
""",
        encoding="utf-8",
    )
    rng = np.random.default_rng(31)
    sd: State = {}
    _conv(rng, sd, "m.big.conv.weight", (4, 4, 3, 3))
    _bn(rng, sd, "m.big.bn", 4)
    _conv(rng, sd, "m.point.conv.weight", (4, 4, 1, 1))
    _bn(rng, sd, "m.point.bn", 4)
    _bn(rng, sd, "m.skip", 4)
    src, dst = tmp_path / "t.safetensors", tmp_path / "o.safetensors"
    save_file(sd, str(src))
    run_cli("fuse", src, dst, "--patterns", toml)
    out = load_file(str(dst))
    assert set(out) == {"m.deployed.weight", "m.deployed.bias"}
    case = Case(
        sd,
        lambda x: (
            _conv_bn(sd, "m.big.conv.weight", "m.big.bn", x, 3, 1)
            + _conv_bn(sd, "m.point.conv.weight", "m.point.bn", x, 3, 1)
            + _identity(sd, "m.skip", x, 3)
        ),
        "m.deployed",
        3,
        1,
        4,
    )
    _fused_matches(case, out, seed=3)


def test_fold_bn_is_off_by_default_and_named_in_the_report(tmp_path: Path, run_cli: Any) -> None:
    rng = np.random.default_rng(41)
    sd: State = dict(repvgg_case("repvgg").state)
    _conv(rng, sd, "stem.conv.weight", (4, 3, 3, 3))
    _bn(rng, sd, "stem.bn", 4)
    src = tmp_path / "t.safetensors"
    save_file(sd, str(src))
    plain, folded = tmp_path / "plain.safetensors", tmp_path / "folded.safetensors"
    run_cli("fuse", src, plain, "--quiet")
    assert {"stem.conv.weight", "stem.bn.running_var"} <= set(load_file(str(plain)))
    import json

    report = json.loads(run_cli("fuse", src, folded, "--fold-bn", "--json").stdout)
    assert any(n.startswith("--fold-bn: folded 1 conv+BN unit") for n in report["notes"])
    assert "conv-bn" in {b["family"] for b in report["blocks"]}
    out = load_file(str(folded))
    assert "stem.bn.running_var" not in out and "stem.conv.bias" in out
    x = _t(rng.normal(size=(2, 3, 5, 5)))
    want = _conv_bn(sd, "stem.conv.weight", "stem.bn", x, 3, 1)
    got = F.conv2d(x, _t(out["stem.conv.weight"]), _t(out["stem.conv.bias"]))
    assert (got - want).abs().max().item() <= 1e-10 * want.abs().max().item()


@pytest.mark.parametrize("lost", ["weight", "bias"])
def test_fold_bn_refuses_a_unit_whose_bn_lost_half_its_affine(
    tmp_path: Path, run_cli: Any, lost: str
) -> None:
    rng = np.random.default_rng(47)
    sd: State = dict(repvgg_case("repvgg").state)
    _conv(rng, sd, "stem.conv.weight", (4, 3, 3, 3))
    _bn(rng, sd, "stem.bn", 4)
    del sd[f"stem.bn.{lost}"]
    src, out = tmp_path / "t.safetensors", tmp_path / "o.safetensors"
    save_file(sd, str(src))
    result = run_cli("fuse", src, out, "--fold-bn", expect=3)
    assert f"stem.bn.{lost}" in result.stderr
    assert not out.exists()


_FOLDING_FAMILY = """
[[dialect]]
name = "myfold"
family = "myfold"
anchor = '(?P<p>(?:.+\\.)?)big\\.conv\\.weight'
fused_weight = "{p}deployed.weight"
fused_bias = "{p}deployed.bias"
square = { weight = "{p}big.conv.weight", bn = "{p}big.bn" }
branches = [{ weight = "{p}point.conv.weight", bn = "{p}point.bn" }]
"""


@pytest.mark.parametrize("folds", [True, False])
def test_a_user_family_declares_whether_its_deploy_nets_fold_bn(
    tmp_path: Path, run_cli: Any, folds: bool
) -> None:
    toml = tmp_path / "myfold.toml"
    toml.write_text(_FOLDING_FAMILY + f"deploy_folds_bn = {str(folds).lower()}\n", encoding="utf-8")
    rng = np.random.default_rng(43)
    sd: State = {}
    _conv(rng, sd, "stem.conv.weight", (4, 3, 3, 3))
    _bn(rng, sd, "stem.bn", 4)
    _conv(rng, sd, "m.big.conv.weight", (4, 4, 3, 3))
    _bn(rng, sd, "m.big.bn", 4)
    _conv(rng, sd, "m.point.conv.weight", (4, 4, 1, 1))
    _bn(rng, sd, "m.point.bn", 4)
    src, dst = tmp_path / "t.safetensors", tmp_path / "o.safetensors"
    save_file(sd, str(src))
    run_cli("fuse", src, dst, "--patterns", toml, "--quiet")
    out = load_file(str(dst))
    assert {"m.deployed.weight", "m.deployed.bias"} <= set(out)
    assert ("stem.conv.bias" in out) is folds
    assert ("stem.bn.running_var" in out) is not folds


def test_deploy_folds_bn_must_be_a_boolean(tmp_path: Path, run_cli: Any) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(_FOLDING_FAMILY + 'deploy_folds_bn = "yes"\n', encoding="utf-8")
    src = tmp_path / "t.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(src))
    result = run_cli("inspect", src, "--patterns", toml, expect=2)
    assert "'deploy_folds_bn' must be true or false, got 'yes'" in result.stderr


def _depthwise_avg_state() -> State:
    """A depthwise DBB block: dbb_origin and a dbb_avg without its conv (avg pool + avgbn)."""
    rng = np.random.default_rng(9)
    sd: State = {}
    _conv(rng, sd, "b.dbb_origin.conv.weight", (4, 1, 3, 3))
    _bn(rng, sd, "b.dbb_origin.bn", 4)
    _bn(rng, sd, "b.dbb_avg.avgbn", 4)
    return sd


@pytest.mark.parametrize(
    ("case", "transform"),
    [("repvgg", "identity_kernel"), ("dbb-idconv1", "compose_1x1_kxk"), (None, "avg_kernel")],
)
def test_the_block_check_catches_a_wrong_branch_transform(
    case: str | None,
    transform: str,
    tmp_path: Path,
    run_cli: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The references share no code with the transforms: a transform off by 1e-6 is caught."""
    import acnet_convert.kinds as kinds

    real = getattr(kinds, transform)

    def off(*args: Any, **kwargs: Any) -> Any:
        got = real(*args, **kwargs)
        if isinstance(got, tuple):
            return (got[0] * (1 + 1e-6), got[1])
        return got * (1 + 1e-6)

    monkeypatch.setattr(kinds, transform, off)
    src = tmp_path / "t.safetensors"
    save_file(CASES[case]().state if case else _depthwise_avg_state(), str(src))
    result = run_cli("fuse", src, tmp_path / "o.safetensors", expect=1)
    assert "does not reproduce the training-time branches" in result.stderr
