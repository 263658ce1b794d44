"""verify: arch, model and block mode; every layout; a nudged weight; unusable input.

Checkpoints are built here from the zoo and from a small user model, with
random BN statistics, and fused with ``fuse_checkpoint``: what ``verify`` sees
is what a user would have after ``acnet-convert fuse``.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from acnet_convert.cli.parsing import parse_input_shape, parse_model_args
from acnet_convert.convert import FuseOptions, fuse_checkpoint
from acnet_convert.errors import (
    ACNetConvertError,
    BadCheckpointError,
    UsageError,
    VerificationError,
)
from acnet_convert.testing import randomise_bn_stats
from acnet_convert.verify import (
    VerifyOptions,
    VerifyResult,
    junit_error_xml,
    junit_xml,
    raise_for_result,
    resolve_device,
    verify_checkpoints,
)
from acnet_convert.zoo import build_arch

CUDA = torch.cuda.is_available()
NUDGED_KEY = "conv2.acb.fused_conv.weight"

# A user's own model: one block of this package, one look-alike of upstream's.
MODEL_SOURCE = '''
from torch import nn
from acnet_convert.nn import ACBlock


class LookAlike(nn.Module):
    """Upstream-style block: square/hor/ver convs, each with its BN."""

    def __init__(self, cin, cout):
        super().__init__()
        self.square_conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        self.hor_conv = nn.Conv2d(cin, cout, (1, 3), padding=(0, 1), bias=False)
        self.hor_bn = nn.BatchNorm2d(cout)
        self.ver_conv = nn.Conv2d(cin, cout, (3, 1), padding=(1, 0), bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        square = self.square_bn(self.square_conv(x))
        return square + self.hor_bn(self.hor_conv(x)) + self.ver_bn(self.ver_conv(x))


class Net(nn.Module):
    def __init__(self, width=6, classes=5, deploy=False):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 1)
        self.body = nn.Sequential(
            ACBlock(width, width, 3, padding=1, deploy=deploy), nn.ReLU(),
            ACBlock(width, 2 * width, 3, stride=2, padding=1, deploy=deploy), nn.ReLU(),
        )
        self.extra = nn.Sequential(LookAlike(2 * width, 2 * width)) if not deploy else None
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.body(self.stem(x))
        if self.extra is not None:
            x = self.extra(x)
        return self.head(x.mean((2, 3)))


def make(width=6, classes=5):
    return Net(width, classes)


def make_plain(width=6, classes=5, deploy=False):
    """Takes deploy: but without the look-alike, so its forms match."""
    net = Net(width, classes, deploy)
    net.extra = None
    return net


def broken():
    raise RuntimeError("no GPU today")
'''


def save_train(net: nn.Module, path: Path, seed: int = 0) -> Path:
    randomise_bn_stats(net, seed)
    torch.save(net.state_dict(), path)
    return path


def fuse(train: Path, out: Path, layout: str = "deploy") -> Path:
    fmt = "safetensors" if out.suffix == ".safetensors" else "pth"
    fuse_checkpoint(train, out, fmt, FuseOptions(layout=layout))
    return out


@pytest.fixture(scope="module")
def cfq(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Cifar-quick: a training checkpoint and its fusions in every layout, plus a nudged one."""
    root = tmp_path_factory.mktemp("cfq")
    torch.manual_seed(0)
    train = save_train(build_arch("cfqkbnc", "train"), root / "train.pth")
    paths = {"train": train}
    for layout in ("deploy", "baseline", "baseline-bias"):
        paths[layout] = fuse(train, root / f"{layout}.safetensors", layout)
    state = load_file(str(paths["deploy"]))
    state[NUDGED_KEY][3, 1, 2, 2] += 1e-3
    save_file(state, str(root / "nudged.safetensors"))
    paths["nudged"] = root / "nudged.safetensors"
    return paths


def run(train: Path, fused: Path, **kw: object) -> VerifyResult:
    kw.setdefault("batch", 2)
    return verify_checkpoints(train, fused, VerifyOptions(**kw))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- arch mode


def test_detected_arch_passes_and_says_so(cfq: dict[str, Path]) -> None:
    result = run(cfq["train"], cfq["deploy"])
    assert (
        result.passed
        and result.mode == "arch"
        and result.arch == "cfqkbnc"
        and result.arch_detected
    )
    assert any("'cfqkbnc'" in n for n in result.notes)
    (network,) = result.cases
    assert network.name == "network" and network.top1_agreement == 1.0
    assert network.max_rel < 1e-5 and network.cosine > 0.999999
    assert network.max_abs <= network.allowed == pytest.approx(1e-5 * network.ref_max)
    assert len(result.block_checks) == 4  # three blocks and the copied tensors
    assert result.input_shape == (3, 32, 32) and result.batch == 2
    assert result.device == ("cuda" if CUDA else "cpu")  # --device auto


@pytest.mark.parametrize("layout", ["deploy", "baseline", "baseline-bias"])
def test_arch_mode_accepts_every_layout(cfq: dict[str, Path], layout: str) -> None:
    result = run(cfq["train"], cfq[layout], arch="cfqkbnc", dtype="float64")
    assert result.passed, result.failure_message()
    assert result.layout == layout and not result.arch_detected
    assert result.rtol == 1e-5  # FUSED is stored in float32: its rounding sets the floor
    assert result.cases[0].max_rel < 1e-6


def test_float64_tolerance_applies_to_float64_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = build_arch("cfqkbnc", "train").double()
    train = save_train(net, tmp_path / "train64.pth")
    fused = fuse(train, tmp_path / "fused64.pth")
    result = run(train, fused, dtype="float64")
    assert result.rtol == 1e-10
    assert result.passed, result.failure_message()
    assert result.cases[0].max_rel < 1e-12


def test_nudged_weight_fails_and_names_the_block(cfq: dict[str, Path]) -> None:
    result = run(cfq["train"], cfq["nudged"])
    assert not result.passed
    assert result.culprits == ("conv2.acb",)
    message = result.failure_message()
    assert "'conv2.acb'" in message and str(cfq["nudged"]) in message
    with pytest.raises(VerificationError, match=r"conv2\.acb") as info:
        raise_for_result(result)
    assert info.value.exit_code == 1


def test_arch_that_does_not_fit_names_the_keys(cfq: dict[str, Path]) -> None:
    with pytest.raises(
        BadCheckpointError, match=r"does not fit .*'vc'.*missing.*'stem.*does not have.*'conv1"
    ) as info:
        run(cfq["train"], cfq["deploy"], arch="vc")
    assert info.value.exit_code == 3


def test_fused_checkpoint_from_another_net_does_not_fit(
    cfq: dict[str, Path], tmp_path: Path
) -> None:
    state = load_file(str(cfq["deploy"]))
    del state["conv1.acb.fused_conv.bias"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(BadCheckpointError, match=r"conv1\.acb\.fused_conv\.bias"):
        run(cfq["train"], tmp_path / "partial.safetensors", arch="cfqkbnc")


def test_swapped_arguments_are_named(cfq: dict[str, Path]) -> None:
    with pytest.raises(BadCheckpointError, match="give the training checkpoint first") as info:
        run(cfq["deploy"], cfq["train"])
    assert info.value.exit_code == 3


def test_unknown_arch_is_a_usage_error(cfq: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="sres50"):
        run(cfq["train"], cfq["deploy"], arch="resnet9000")


def test_sres50_at_a_small_input(tmp_path: Path) -> None:
    torch.manual_seed(2)
    train = save_train(build_arch("sres50", "train"), tmp_path / "sres50.pth")
    fused = fuse(train, tmp_path / "sres50_fused.pth")
    result = run(train, fused, batch=1, input_shape=(3, 64, 64))
    assert result.passed, result.failure_message()
    assert result.arch == "sres50" and result.input_shape == (3, 64, 64)
    assert result.cases[0].top1_agreement == 1.0


# ----------------------------------------------------------------------------- block mode


@pytest.mark.parametrize("layout", ["deploy", "baseline", "baseline-bias"])
def test_block_mode_every_layout(cfq: dict[str, Path], layout: str) -> None:
    auto = run(cfq["train"], cfq[layout], blocks=True)
    explicit = run(cfq["train"], cfq[layout], blocks=True, layout=layout)
    for result in (auto, explicit):
        assert result.passed and result.mode == "blocks" and result.layout == layout
        assert [c.name for c in result.cases] == [
            "conv1.acb",
            "conv2.acb",
            "conv3.acb",
            "copied tensors (4)",
        ]
        assert all(c.within_rounding for c in result.cases if c.kind == "block")
        assert max(c.max_rel for c in result.cases) < 1e-5


def test_block_mode_needs_no_architecture(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = nn.Sequential()
    from acnet_convert.nn import ACBlock

    net.add_module("a", ACBlock(4, 8, 3, padding=1))
    net.add_module("b", ACBlock(8, 8, 5, padding=2, use_last_bn=True))
    train = save_train(net, tmp_path / "any.pth")
    fused = fuse(train, tmp_path / "any_fused.pth")
    result = run(train, fused, dtype="float64")
    assert result.mode == "blocks" and result.passed
    assert any("no built-in architecture" in n for n in result.notes)
    assert [c.name for c in result.cases] == ["a", "b"]


def test_block_mode_catches_the_nudge(cfq: dict[str, Path]) -> None:
    result = run(cfq["train"], cfq["nudged"], blocks=True)
    assert [c.name for c in result.failures] == ["conv2.acb"]
    assert result.failures[0].max_rel > 1e-4
    assert "1 of 4 checks" in result.failure_message()


def test_block_mode_catches_a_changed_copied_tensor(cfq: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(str(cfq["deploy"]))
    state["fc1.weight"] = state["fc1.weight"] * 1.01
    save_file(state, str(tmp_path / "copied.safetensors"))
    result = run(cfq["train"], tmp_path / "copied.safetensors", blocks=True)
    assert [c.kind for c in result.failures] == ["tensors"]
    assert "'fc1.weight'" in result.failures[0].detail


def test_missing_fused_block_names_the_key(cfq: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(str(cfq["deploy"]))
    del state["conv3.acb.fused_conv.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    for layout in ("auto", "deploy"):
        with pytest.raises(
            BadCheckpointError, match=r"'conv3\.acb\.fused_conv\.weight'.*'conv3\.acb'"
        ) as info:
            run(cfq["train"], tmp_path / "missing.safetensors", blocks=True, layout=layout)
        assert info.value.exit_code == 3


def test_train_without_blocks_is_unusable(cfq: dict[str, Path]) -> None:
    with pytest.raises(ACNetConvertError, match="no ACNet block") as info:
        run(cfq["deploy"], cfq["deploy"], blocks=True)
    assert info.value.exit_code == 3


def test_block_mode_refuses_an_input_file(cfq: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(UsageError, match="--input"):
        run(cfq["train"], cfq["deploy"], blocks=True, input_path=tmp_path / "x.npy")


def test_float16_checkpoint_gets_a_float16_tolerance(cfq: dict[str, Path], tmp_path: Path) -> None:
    state = {
        k: v.half() if v.is_floating_point() else v for k, v in torch.load(cfq["train"]).items()
    }
    torch.save(state, tmp_path / "half.pth")
    fused = fuse(tmp_path / "half.pth", tmp_path / "half_fused.pth")
    result = run(tmp_path / "half.pth", fused)
    assert result.rtol == 1e-2
    assert result.passed, result.failure_message()


# ----------------------------------------------------------------------------- model mode


@pytest.fixture(scope="module")
def user_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("model")
    source = root / "mynet.py"
    source.write_text(MODEL_SOURCE)
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynet_for_fixture", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(4)
    train = save_train(module.make(width=4, classes=3), root / "mine.pth")
    torch.manual_seed(5)
    plain = save_train(module.make_plain(width=4, classes=3), root / "plain.pth")
    return {
        "source": source,
        "train": train,
        "fused": fuse(train, root / "mine_fused.pth"),
        "baseline": fuse(train, root / "mine_baseline.safetensors", "baseline-bias"),
        "plain": plain,
        "plain_fused": fuse(plain, root / "plain_fused.pth"),
    }


def test_model_mode_derives_the_deployed_net(user_model: dict[str, Path]) -> None:
    spec = f"{user_model['source']}:make"
    result = run(
        user_model["train"],
        user_model["fused"],
        model=spec,
        model_args=(("width", 4), ("classes", 3)),
        input_shape=(3, 8, 8),
        batch=4,
    )
    assert result.passed, result.failure_message()
    assert result.mode == "model" and result.model == spec and result.layout == "deploy"
    assert result.cases[0].top1_agreement == 1.0
    assert [c.name for c in result.block_checks][:3] == ["body.0", "body.2", "extra.0"]


def test_model_mode_loads_a_baseline_layout(user_model: dict[str, Path]) -> None:
    result = run(
        user_model["train"],
        user_model["baseline"],
        model=f"{user_model['source']}:make",
        model_args=(("width", 4), ("classes", 3)),
        input_shape=(3, 8, 8),
    )
    assert result.passed and result.layout == "baseline-bias"


def test_model_mode_with_a_deploy_argument(
    user_model: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(user_model["source"].parent))
    result = run(
        user_model["plain"],
        user_model["plain_fused"],
        model="mynet:make_plain",  # the module form
        model_args=(("width", 4), ("classes", 3)),
        input_shape=(3, 8, 8),
        dtype="float64",
    )
    assert result.passed, result.failure_message()
    assert result.cases[0].max_rel < 1e-6


def test_model_mode_catches_the_wrong_model_args(user_model: dict[str, Path]) -> None:
    with pytest.raises(BadCheckpointError, match="shape") as info:
        run(
            user_model["train"],
            user_model["fused"],
            model=f"{user_model['source']}:make",
            input_shape=(3, 8, 8),
        )
    assert info.value.exit_code == 3


def test_model_mode_needs_an_input_shape(user_model: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="--input-shape"):
        run(
            user_model["train"],
            user_model["fused"],
            model=f"{user_model['source']}:make",
            model_args=(("width", 4), ("classes", 3)),
        )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nowhere.py:make", "no file"),
        ("{src}:missing", "no attribute 'missing'"),
        ("{src}:broken", "RuntimeError: no GPU today"),
        ("{src}", "expected path/to/file.py:factory"),
        ("no_such_module_here:make", "ModuleNotFoundError"),
    ],
)
def test_model_spec_errors_are_usage_errors(
    user_model: dict[str, Path], spec: str, match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        run(
            user_model["train"],
            user_model["fused"],
            model=spec.format(src=user_model["source"]),
            input_shape=(3, 8, 8),
        )


# ----------------------------------------------------------------------------- inputs


def test_input_files(cfq: dict[str, Path], tmp_path: Path) -> None:
    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", batch)
    torch.save(torch.from_numpy(batch), tmp_path / "x.pt")
    for path in (tmp_path / "x.npy", tmp_path / "x.pt"):
        result = run(cfq["train"], cfq["deploy"], input_path=path)
        assert result.passed and result.input == str(path) and result.batch == 3
    np.save(tmp_path / "one.npy", batch[0])
    assert run(cfq["train"], cfq["deploy"], input_path=tmp_path / "one.npy").batch == 1


def test_unusable_input_files(cfq: dict[str, Path], tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(1)}, tmp_path / "dict.pt")
    np.save(tmp_path / "flat.npy", np.zeros(5))
    np.save(tmp_path / "wrong.npy", np.zeros((1, 4, 32, 32)))
    for name, match in (
        ("dict.pt", "holds a dict"),
        ("flat.npy", r"shape \[5\]"),
        ("wrong.npy", "failed"),
    ):
        with pytest.raises(ACNetConvertError, match=match) as info:
            run(cfq["train"], cfq["deploy"], input_path=tmp_path / name)
        assert info.value.exit_code == 3, name
    with pytest.raises(UsageError, match=r"\.npy"):
        (tmp_path / "x.csv").write_text("1,2")
        run(cfq["train"], cfq["deploy"], input_path=tmp_path / "x.csv")


def test_seed_makes_the_batch(cfq: dict[str, Path]) -> None:
    a, b = run(cfq["train"], cfq["deploy"], seed=1), run(cfq["train"], cfq["deploy"], seed=1)
    c = run(cfq["train"], cfq["deploy"], seed=2)
    assert a.cases[0].max_abs == b.cases[0].max_abs
    assert a.cases[0].ref_max != c.cases[0].ref_max


# ----------------------------------------------------------------------------- options, device


def test_parse_helpers() -> None:
    assert parse_input_shape("3,32,32") == (3, 32, 32)
    assert parse_model_args(["a=1", "b=[1, 2]", "c=relu", "d='x'"]) == (
        ("a", 1),
        ("b", [1, 2]),
        ("c", "relu"),
        ("d", "x"),
    )
    for bad in ("3,32", "a,b,c", "0,1,1"):
        with pytest.raises(UsageError, match="C,H,W"):
            parse_input_shape(bad)
    for bad_arg in ("novalue", "1x=2", "deploy=True"):
        with pytest.raises(UsageError, match="--model-arg"):
            parse_model_args([bad_arg])


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"arch": "vc", "model": "m.py:f"}, "give one of them"),
        ({"rtol": -1.0}, "--rtol"),
        ({"atol": math.nan}, "--atol"),
        ({"dtype": "float16"}, "--dtype"),
        ({"model_args": (("a", 1),)}, "--model-arg is for --model"),
        ({"device": "gpu"}, "--device 'gpu'"),
    ],
)
def test_contradictory_options(
    cfq: dict[str, Path], options: dict[str, object], match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        run(cfq["train"], cfq["deploy"], **options)


def test_cuda_without_cuda_is_unusable(
    cfq: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ACNetConvertError, match="CUDA is not available") as info:
            run(cfq["train"], cfq["deploy"], device=device)
        assert info.value.exit_code == 3


# ----------------------------------------------------------------------------- reports


def test_json_report_is_strict_json(cfq: dict[str, Path]) -> None:
    report = run(cfq["train"], cfq["nudged"]).as_json()
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text)["failed"] == ["conv2.acb"]
    assert set(report) >= {
        "passed",
        "mode",
        "arch",
        "layout",
        "device",
        "dtype",
        "rtol",
        "atol",
        "cases",
    }
    assert set(report["cases"][0]) >= {
        "name",
        "passed",
        "max_abs",
        "max_rel",
        "cosine",
        "top1_agreement",
    }


def test_junit_reports(cfq: dict[str, Path]) -> None:
    blocks = ET.fromstring(junit_xml(run(cfq["train"], cfq["nudged"], blocks=True)))
    suite = blocks.find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "1"
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["conv2.acb"]
    network = ET.fromstring(junit_xml(run(cfq["train"], cfq["nudged"])))
    names = [c.get("name") for c in network.iter("testcase")]
    assert names[0] == "network" and len(names) == 2
    failure = next(c for c in network.iter("testcase") if c.find("failure") is not None).find(
        "failure"
    )
    assert failure is not None and "conv2.acb" in (failure.text or "")
    error = ET.fromstring(junit_error_xml("t.pth", "f.pth", "no such file"))
    assert error.find("testsuite/testcase/error") is not None


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_arch_mode(cfq: dict[str, Path], dtype: str) -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    result = run(cfq["train"], cfq["deploy"], device="cuda", dtype=dtype, batch=8)
    assert result.passed, result.failure_message()
    assert result.device == "cuda" and result.cases[0].top1_agreement == 1.0
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert not run(cfq["train"], cfq["nudged"], device="cuda", dtype=dtype).passed


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_device_index_out_of_range(cfq: dict[str, Path]) -> None:
    with pytest.raises(ACNetConvertError, match="only") as info:
        run(cfq["train"], cfq["deploy"], device=f"cuda:{torch.cuda.device_count()}")
    assert info.value.exit_code == 3
