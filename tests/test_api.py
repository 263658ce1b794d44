"""The Python API: lazy package exports, fuse_state, and fuse_and_load.

The small net here has one unit of each awkward geometry (dilation 2, groups,
depthwise, padding below k//2, a BN after the sum, BNs without affine) and can
be built in the training form and in each deployable layout, so every path
from a training checkpoint to a deployable model is checked numerically.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch import Tensor, nn

import acnet_convert
from acnet_convert import convert
from acnet_convert.api import tensor_from_stored
from acnet_convert.checkpoint import open_checkpoint
from acnet_convert.errors import UnfusableBlockError, UsageError, VerificationError
from acnet_convert.fusion import BlockTensors, fuse_block
from acnet_convert.testing import randomise_bn_stats

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FORMS = ("train", "deploy", "baseline", "baseline-bias")

# unit -> (cin, cout, k, stride, padding, dilation, groups, use_last_bn, use_affine)
UNITS: dict[str, tuple[int, int, int, int, int, int, int, bool, bool]] = {
    "dilated": (4, 8, 3, 1, 2, 2, 1, False, True),
    "grouped": (8, 8, 3, 2, 1, 1, 2, True, True),
    "depthwise": (8, 8, 5, 1, 2, 1, 8, False, True),
    "cropped": (8, 6, 5, 1, 1, 1, 1, False, False),  # padding 1 < 5 // 2
    "dilated_cropped": (6, 6, 3, 1, 1, 2, 3, False, True),  # padding 1 < 2 * (3 // 2)
}


def _unit(form: str, name: str, bn_eps: float) -> nn.Sequential:
    cin, cout, k, stride, padding, dilation, groups, last_bn, affine = UNITS[name]
    layers: list[tuple[str, nn.Module]]
    if form in ("train", "deploy"):
        acb = acnet_convert.ACBlock(
            cin, cout, k, stride, padding, dilation, groups, deploy=form == "deploy",
            use_last_bn=last_bn, use_affine=affine,
        )  # fmt: skip
        layers = [("acb", acb)]
    else:
        conv = nn.Conv2d(
            cin, cout, k, stride, padding, dilation, groups, bias=form == "baseline-bias"
        )
        layers = [("conv", conv)]
        if form == "baseline":
            layers.append(("bn", nn.BatchNorm2d(cout, eps=bn_eps)))
    return nn.Sequential(OrderedDict([*layers, ("relu", nn.ReLU())]))


class TinyNet(nn.Module):
    """A plain 1x1 stem (conv + BN), the awkward units, and a linear head."""

    def __init__(self, form: str = "train", bn_eps: float = 1e-5, body: str = "body") -> None:
        super().__init__()
        self.stem = nn.Sequential(
            OrderedDict([("conv", nn.Conv2d(3, 4, 1, bias=False)), ("bn", nn.BatchNorm2d(4))])
        )
        units = nn.Sequential()
        for name in UNITS:
            units.add_module(name, _unit(form, name, bn_eps))
        self.add_module(body, units)
        self.body_name = body
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        out = self.get_submodule(self.body_name)(self.stem(x))
        result: Tensor = self.fc(out.mean(dim=(2, 3)))
        return result


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    return randomise_bn_stats(model, seed, spread=0.3).eval()


def _train_checkpoint(path: Path, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    train = _randomised(TinyNet("train").to(dtype), seed)
    save_file({k: v.contiguous() for k, v in train.state_dict().items()}, str(path))
    return train


def _input(dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(2, 3, 17, 15, generator=torch.Generator().manual_seed(9), dtype=dtype)


def _assert_close(got: Tensor, ref: Tensor, rtol: float) -> None:
    scale = ref.abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rtol * scale, f"max |diff| {err:.3g} > {rtol:g} * max |ref| {scale:.3g}"


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the package's exports -------------------------------------------------------------


def test_package_exports_are_lazy_and_torch_free() -> None:
    code = (
        "import sys, acnet_convert\n"
        "from acnet_convert import FuseOptions, fuse_state\n"
        "assert 'torch' not in sys.modules, 'torch imported by the package'\n"
        "from acnet_convert import ACBlock, switch_to_deploy, fuse_and_load\n"
        "assert 'torch' in sys.modules and callable(fuse_and_load)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_exported_name_resolves() -> None:
    for name in acnet_convert.__all__:
        assert getattr(acnet_convert, name) is not None, name
        assert name in dir(acnet_convert)
    assert acnet_convert.ACBlock is acnet_convert.nn.ACBlock
    with pytest.raises(AttributeError, match="no attribute 'fuse_everything'"):
        acnet_convert.fuse_everything  # noqa: B018


# --- fuse_state --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", convert.LAYOUTS)
def test_fuse_state_equals_what_fuse_checkpoint_writes(layout: str, tmp_path: Path) -> None:
    options = convert.FuseOptions(layout=layout)
    with open_checkpoint(FIXTURES / "resnet_like.pth") as reader:
        state = convert.fuse_state(reader, options)
    assert list(tmp_path.iterdir()) == []  # nothing written
    out = tmp_path / "fused.safetensors"
    report = convert.fuse_checkpoint(FIXTURES / "resnet_like.pth", out, "safetensors", options)
    written = load_file(str(out))
    assert list(state.tensors) == [t.name for t in state.plan.outputs]
    assert set(state.tensors) == set(written)
    for key, value in written.items():
        assert state.tensors[key].dtype == value.dtype, key
        assert np.array_equal(state.tensors[key], value), key
    assert [b.label for b in state.blocks] == [b.label for b in report.blocks]
    assert all(b.passed for b in state.blocks)


def test_fuse_state_outlives_its_reader() -> None:
    with open_checkpoint(FIXTURES / "cifar_quick.safetensors") as reader:
        state = convert.fuse_state(reader)
    for value in state.tensors.values():
        assert value.flags.writeable
        np.asarray(value).sum()


# --- fuse_and_load: every layout, every awkward geometry ------------------------------


@pytest.mark.parametrize("form", FORMS[1:])
def test_fuse_and_load_picks_the_layout_of_the_model(form: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    train = _train_checkpoint(ckpt)
    x = _input()
    with torch.no_grad():
        expected = train(x)
    model = TinyNet(form).double()
    report = acnet_convert.fuse_and_load(model, ckpt)
    assert report.layout == form
    assert sorted(report.blocks) == sorted(f"body.{name}.acb" for name in UNITS)
    assert report.blocks_fused == len(UNITS)
    assert report.keys_loaded == len(model.state_dict())
    assert (report.missing, report.unexpected, report.ignored) == ((), (), ())
    with torch.no_grad():
        _assert_close(model.eval()(x), expected, 1e-10)


def test_fuse_and_load_accepts_a_str_path_and_keeps_the_model_dtype(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    train = _train_checkpoint(ckpt, torch.float32)
    model = TinyNet("deploy").double()
    acnet_convert.fuse_and_load(model, str(ckpt))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = _input(torch.float32)
    with torch.no_grad():
        _assert_close(model.eval()(x.double()), train(x), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_into_float32(dtype: torch.dtype, tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    train = _train_checkpoint(ckpt, dtype)
    model = TinyNet("deploy")
    acnet_convert.fuse_and_load(model, ckpt)
    # What the checkpoint should hold: the fusion of its own values, rounded to its dtype.
    reference = TinyNet("train").double()
    reference.load_state_dict(train.state_dict())
    acnet_convert.switch_to_deploy(reference)
    for key, value in reference.state_dict().items():
        got = model.state_dict()[key]
        if not value.is_floating_point():
            continue
        assert got.dtype == torch.float32
        assert torch.equal(got, got.to(dtype).float()), f"{key} is not a {dtype} value"
        torch.testing.assert_close(got.double(), value, rtol=2 * 2.0**-8, atol=1e-3)


def test_tensor_from_stored_reinterprets_bfloat16_bits() -> None:
    bits = torch.tensor([1.5, -2.0, 3.0e38], dtype=torch.bfloat16).view(torch.int16).numpy()
    got = tensor_from_stored(bits.view(np.uint16), "bfloat16")
    assert got.dtype == torch.bfloat16
    assert got.tolist() == [1.5, -2.0, torch.tensor(3.0e38, dtype=torch.bfloat16).item()]
    readonly = np.arange(3, dtype=np.float32)
    readonly.flags.writeable = False
    assert tensor_from_stored(readonly, "float32").tolist() == [0.0, 1.0, 2.0]


def test_identity_bn_follows_the_models_own_eps(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    train = _train_checkpoint(ckpt)
    model = TinyNet("baseline", bn_eps=1e-3).double()
    acnet_convert.fuse_and_load(model, ckpt)
    with torch.no_grad():
        _assert_close(model.eval()(_input()), train(_input()), 1e-10)


def test_missing_num_batches_tracked_is_filled_in(tmp_path: Path) -> None:
    train = _randomised(TinyNet("train").double(), 3)
    ckpt = tmp_path / "old_torch.pth"
    torch.save({k: v for k, v in train.state_dict().items() if "num_batches" not in k}, ckpt)
    model = TinyNet("deploy").double()
    report = acnet_convert.fuse_and_load(model, ckpt)
    assert report.missing == ()
    with torch.no_grad():
        _assert_close(model.eval()(_input()), train(_input()), 1e-10)


def test_renames_map_onto_other_module_names(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    train = _train_checkpoint(ckpt)
    model = TinyNet("deploy", body="layers").double()
    with pytest.raises(UsageError, match="renames"):
        acnet_convert.fuse_and_load(model, ckpt)
    report = acnet_convert.fuse_and_load(model, ckpt, renames=[(r"^body\.", "layers.")])
    assert report.layout == "deploy"
    with torch.no_grad():
        _assert_close(model.eval()(_input()), train(_input()), 1e-10)


# --- fuse_and_load: what goes wrong, and what it says ---------------------------------


def test_a_model_that_does_not_fit_is_refused_and_untouched(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    _train_checkpoint(ckpt)
    model = acnet_convert.ACBlock(3, 4, 3, deploy=True)
    wrapper = nn.Sequential(OrderedDict([("head", model)]))
    before = _state(wrapper)
    with pytest.raises(UsageError) as info:
        acnet_convert.fuse_and_load(wrapper, ckpt)
    message = str(info.value)
    assert "does not fit Sequential's state dict" in message
    assert "2 model keys it cannot fill: 'head.fused_conv.bias', 'head.fused_conv.weight'" in (
        message
    )
    assert "fused keys with no place: " in message and "more)" in message
    after = _state(wrapper)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_shapes_are_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "train.safetensors"
    _train_checkpoint(ckpt)
    model = TinyNet("deploy").double()
    model.fc = nn.Linear(6, 7).double()
    with pytest.raises(UsageError, match=r"'fc.weight' is \[5, 6\] in the checkpoint, \[7, 6\]"):
        acnet_convert.fuse_and_load(model, ckpt)


def test_strict_false_loads_what_fits_and_reports_the_rest(tmp_path: Path) -> None:
    train = _randomised(TinyNet("train").double(), 4)
    sd = dict(train.state_dict())
    sd["ema.decay"] = torch.tensor([0.999], dtype=torch.float64)
    ckpt = tmp_path / "train.pth"
    torch.save(sd, ckpt)
    model = TinyNet("deploy").double()
    model.extra = nn.Linear(2, 2).double()
    with pytest.raises(UsageError, match=r"1 fused keys with no place: 'ema.decay'"):
        acnet_convert.fuse_and_load(model, ckpt)
    report = acnet_convert.fuse_and_load(model, ckpt, strict=False)
    assert report.layout == "deploy"
    assert report.missing == ("extra.bias", "extra.weight")
    assert report.unexpected == ("ema.decay",)
    with torch.no_grad():
        _assert_close(model.eval()(_input()), train(_input()), 1e-10)


def test_a_fused_checkpoint_is_refused(tmp_path: Path) -> None:
    deploy = TinyNet("deploy")
    ckpt = tmp_path / "deploy.safetensors"
    save_file(deploy.state_dict(), str(ckpt))
    with pytest.raises(UnfusableBlockError, match="no ACNet block found"):
        acnet_convert.fuse_and_load(TinyNet("deploy"), ckpt)


def test_a_failed_check_loads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "train.safetensors"
    _train_checkpoint(ckpt)

    def broken(block: BlockTensors) -> tuple[np.ndarray, np.ndarray]:
        weight, bias = fuse_block(block)
        return weight + 0.01, bias

    monkeypatch.setattr("acnet_convert.convert.fuse_block", broken)
    model = TinyNet("deploy").double()
    before = _state(model)
    with pytest.raises(VerificationError, match=r"body\.dilated\.acb"):
        acnet_convert.fuse_and_load(model, ckpt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    acnet_convert.fuse_and_load(model, ckpt, check=False)  # the caller's choice


def test_pre_activation_units_have_no_baseline_layout(
    tmp_path: Path, run_cli: Callable[..., Result]
) -> None:
    train = nn.Sequential()
    train.add_module("bn", nn.BatchNorm2d(3))
    train.add_module("relu", nn.ReLU())
    train.add_module("acb", acnet_convert.ACBlock(3, 4, 3))
    ckpt = tmp_path / "preact.safetensors"
    save_file(train.state_dict(), str(ckpt))
    result = run_cli("fuse", ckpt, tmp_path / "out.pth", "--layout", "baseline", expect=2)
    assert "block 'acb': the baseline layout puts the fused bias in 'bn'" in result.stderr
    assert "pre-activation" in result.stderr
    run_cli("fuse", ckpt, tmp_path / "out.pth", "--layout", "deploy")


# --- property: any geometry, weights-only path ------------------------------------------


@st.composite
def _geometry(draw: st.DrawFn) -> tuple[int, int, int, int, int, int, int]:
    """(in, out, kernel, stride, padding, dilation, groups)."""
    k = draw(st.sampled_from([3, 5]))
    groups = draw(st.sampled_from([1, 2, 4]))
    depthwise = draw(st.booleans())
    cin = groups * (1 if depthwise else draw(st.integers(1, 2)))
    cout = cin if depthwise else groups * draw(st.integers(1, 2))
    stride = draw(st.sampled_from([1, 2]))
    padding = draw(st.integers(0, k // 2 + 1))
    return cin, cout, k, stride, padding, draw(st.sampled_from([1, 2])), groups


@settings(max_examples=25, deadline=None, database=None)
@given(geometry=_geometry(), last_bn=st.booleans(), seed=st.integers(0, 2**16))
def test_any_block_geometry_fuses_exactly_from_weights_alone(
    geometry: tuple[int, int, int, int, int, int, int], last_bn: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    cin, cout, k, stride, padding, dilation, groups = geometry
    train = _randomised(
        nn.Sequential(
            acnet_convert.ACBlock(
                cin, cout, k, stride, padding, dilation, groups, use_last_bn=last_bn
            )
        ).double(),
        seed,
    )
    deploy = nn.Sequential(
        acnet_convert.ACBlock(cin, cout, k, stride, padding, dilation, groups, deploy=True)
    ).double()
    x = torch.randn(
        2, cin, 13, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    with tempfile.TemporaryDirectory() as folder:
        ckpt = Path(folder) / "train.safetensors"
        save_file(train.state_dict(), str(ckpt))
        acnet_convert.fuse_and_load(deploy, ckpt)
    with torch.no_grad():
        _assert_close(deploy(x), train(x), 1e-10)
