"""The zoo's architectures: key-compatible with upstream ACNet, and fusable.

The key names and shapes below were read off upstream's source
(github DingXiaoH/ACNet: ``acnet/acnet_builder.py``, ``builder.py``,
``acnet/acb.py``, ``base_model/{cfqk,vgg,stagewise_resnet,wrn,resnet}.py``,
``constants.py``, ``model_map.py``): a ``Conv2dBNReLU`` unit wraps its ACB as
``acb``, a ``Conv2dBN`` or bare ``Conv2d`` unit is the ACB itself, and 1x1 and
7x7 convs stay plain.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from acnet_convert.errors import UsageError
from acnet_convert.nn import find_acblocks, switch_to_deploy
from acnet_convert.testing import randomise_bn_stats
from acnet_convert.zoo import ARCHS, FORMS, arch_keys, build_arch, match_arch

# arch -> (train-form keys with shapes, total train-form keys, number of ACBs)
UPSTREAM_TRAIN_KEYS: dict[str, tuple[dict[str, tuple[int, ...]], int, int]] = {
    "cfqkbnc": (
        {
            "conv1.acb.square_conv.weight": (32, 3, 5, 5),
            "conv1.acb.hor_conv.weight": (32, 3, 1, 5),
            "conv1.acb.ver_conv.weight": (32, 3, 5, 1),
            "conv3.acb.ver_bn.running_var": (64,),
            "fc1.weight": (64, 576),
            "fc2.bias": (10,),
        },
        58, 3,
    ),
    "vc": (
        {
            "stem.conv1.acb.square_conv.weight": (64, 3, 3, 3),
            "stem.conv7.acb.ver_conv.weight": (256, 256, 3, 1),
            "stem.conv13.acb.hor_bn.weight": (512,),
            "linear1.weight": (512, 512),
            "linear2.weight": (10, 512),
        },
        238, 13,
    ),
    "src56": (
        {
            "stage1.conv1.square_conv.weight": (16, 3, 3, 3),
            "stage1.block0.conv1.acb.square_conv.weight": (16, 16, 3, 3),
            "stage1.block0.conv2.hor_conv.weight": (16, 16, 1, 3),
            "stage2.projection.conv.weight": (32, 16, 1, 1),
            "stage2.projection.bn.running_var": (32,),
            "stage2.block0.conv1.acb.square_conv.weight": (32, 16, 3, 3),
            "stage3.block8.conv2.ver_bn.bias": (64,),
            "linear.weight": (10, 64),
        },
        1004, 55,
    ),
    "wrnc16plain": (
        {
            "conv1.square_conv.weight": (16, 3, 3, 3),
            "stage1.block1.proj.bn.weight": (16,),
            "stage1.block1.proj.conv.weight": (128, 16, 1, 1),
            "stage1.block1.conv1.bn.running_mean": (16,),
            "stage1.block1.conv1.acb.square_conv.weight": (128, 16, 3, 3),
            "stage2.block1.conv1.acb.hor_conv.weight": (256, 128, 1, 3),
            "stage3.block2.conv2.acb.ver_conv.weight": (512, 512, 3, 1),
            "last_bn.running_var": (512,),
            "linear.weight": (10, 512),
        },
        319, 13,
    ),
    "sres18": (
        {
            "conv1.conv.weight": (64, 3, 7, 7),
            "conv1.bn.weight": (64,),
            "stage1.0.conv1.acb.square_conv.weight": (64, 64, 3, 3),
            "stage1.1.conv2.square_conv.weight": (64, 64, 3, 3),
            "stage2.0.shortcut.conv.weight": (128, 64, 1, 1),
            "stage2.0.shortcut.bn.running_mean": (128,),
            "stage4.1.conv2.hor_bn.running_var": (512,),
            "linear.weight": (1000, 512),
        },
        314, 16,
    ),
    "sres34": (
        {
            "stage3.5.conv1.acb.ver_conv.weight": (256, 256, 3, 1),
            "stage4.0.shortcut.conv.weight": (512, 256, 1, 1),
            "stage4.2.conv2.square_bn.weight": (512,),
            "linear.bias": (1000,),
        },
        602, 32,
    ),
    "sres50": (
        {
            "conv1.conv.weight": (64, 3, 7, 7),
            "stage1.projection.conv.weight": (256, 64, 1, 1),
            "stage1.block0.conv1.conv.weight": (64, 64, 1, 1),
            "stage1.block0.conv2.acb.square_conv.weight": (64, 64, 3, 3),
            "stage1.block0.conv3.bn.running_var": (256,),
            "stage2.projection.conv.weight": (512, 256, 1, 1),
            "stage2.block0.conv2.acb.hor_conv.weight": (128, 128, 1, 3),
            "stage4.block2.conv3.conv.weight": (2048, 512, 1, 1),
            "fc.weight": (1000, 2048),
        },
        512, 16,
    ),
}  # fmt: skip

# A few baseline-form (upstream ConvBuilder) keys per arch.
UPSTREAM_BASELINE_KEYS = {
    "cfqkbnc": ["conv1.conv.weight", "conv1.bn.running_mean", "fc1.weight"],
    "vc": ["stem.conv1.conv.weight", "stem.conv13.bn.num_batches_tracked"],
    "src56": ["stage1.conv1.conv.weight", "stage1.block0.conv2.bn.weight"],
    "wrnc16plain": ["conv1.weight", "stage1.block1.conv1.conv.weight", "last_bn.weight"],
    "sres18": ["stage1.0.conv1.conv.weight", "stage1.0.conv2.bn.bias"],
    "sres34": ["stage3.5.conv1.conv.weight"],
    "sres50": ["stage1.block0.conv2.conv.weight", "stage1.block0.conv2.bn.running_var"],
}

ARCH_NAMES = sorted(ARCHS)


def test_fixtures_cover_every_arch() -> None:
    assert set(UPSTREAM_TRAIN_KEYS) == set(ARCHS) == set(UPSTREAM_BASELINE_KEYS)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_every_form_builds_and_runs(name: str, form: str) -> None:
    spec = ARCHS[name]
    torch.manual_seed(0)
    model = build_arch(name, form).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *spec.input_shape, generator=torch.Generator().manual_seed(9)))
    assert out.shape == (2, spec.num_classes)
    assert torch.isfinite(out).all()
    assert set(model.state_dict()) == arch_keys(name, form)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_train_form_has_upstream_keys(name: str) -> None:
    expected, count, acbs = UPSTREAM_TRAIN_KEYS[name]
    sd = build_arch(name, "train").state_dict()
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == count
    assert len(find_acblocks(build_arch(name, "train"))) == acbs


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_baseline_form_has_upstream_keys(name: str) -> None:
    keys = arch_keys(name, "baseline")
    assert set(UPSTREAM_BASELINE_KEYS[name]) <= keys
    assert not any(k.endswith(("square_conv.weight", "fused_conv.weight")) for k in keys)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_match_arch_recognises_exactly_one(name: str) -> None:
    train = arch_keys(name, "train")
    assert match_arch(train) == [name]
    assert match_arch(arch_keys(name, "deploy")) == [name]
    assert match_arch(f"module.{k}" for k in train) == [name]
    assert match_arch(k for k in train if not k.endswith("num_batches_tracked")) == [name]
    assert match_arch([*train, "deps"]) == [name]
    assert match_arch(sorted(train)[1:]) == []
    assert match_arch(arch_keys(name, "baseline")) == []


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_switch_to_deploy_gives_deploy_form(name: str) -> None:
    spec = ARCHS[name]
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = build_arch(name, "train").double().eval()
    randomise_bn_stats(model, gen, spread=0.1)
    # float64 convs are slow on CPU: 64x64 is enough for the ImageNet nets here
    # (their pooling is adaptive); the 224x224 forward runs in the test above.
    c, h, w = spec.input_shape
    x = torch.randn(1, c, min(h, 64), min(w, 64), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        report = switch_to_deploy(model)
        after = model(x)
    assert report.count == UPSTREAM_TRAIN_KEYS[name][2]
    assert set(model.state_dict()) == arch_keys(name, "deploy")
    scale = before.abs().max().item()
    assert (after - before).abs().max().item() <= 1e-10 * scale
    # The fused weights load strictly into a freshly built deploy form.
    deployed = build_arch(name, "deploy").double().eval()
    deployed.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(deployed(x), after)


def test_unknown_arch_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match="unknown architecture 'resnet9'; known: cfqkbnc, "):
        build_arch("resnet9")
    with pytest.raises(UsageError, match="unknown architecture"):
        arch_keys("resnet9")


def test_unknown_form_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown form 'fused'; use one of: train, deploy"):
        build_arch("src56", "fused")


def test_num_classes_can_be_set() -> None:
    model = build_arch("cfqkbnc", "train", num_classes=100)
    assert model.state_dict()["fc2.weight"].shape == (100, 64)


def test_importing_the_zoo_does_not_import_torch() -> None:
    code = "import sys, acnet_convert.zoo as z; z.ARCHS; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
