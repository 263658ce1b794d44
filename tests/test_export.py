"""``acnet-convert export``: every built-in architecture to ONNX, checked by ONNX Runtime
against the training-time net; dynamic batch; --model factories; each failure's exit code,
one line and no OUT."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from acnet_convert.testing import randomise_bn_stats  # noqa: E402
from acnet_convert.zoo import ARCHS, build_arch  # noqa: E402

if TYPE_CHECKING:
    from conftest import CliRun

SMALL = "3,32,32"  # every built-in architecture runs at 32x32, the ImageNet ones too

MODEL_SOURCE = '''
import torch
from torch import nn
from acnet_convert.nn import ACBlock


class Net(nn.Module):
    def __init__(self, width=4, classes=3, deploy=False):
        super().__init__()
        self.body = nn.Sequential(
            ACBlock(3, width, 3, padding=1, deploy=deploy), nn.ReLU(),
            ACBlock(width, width, 3, stride=2, padding=1, deploy=deploy), nn.ReLU(),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def make(width=4, classes=3):
    return Net(width, classes)


class Moody(nn.Module):
    """A forward whose control flow depends on the data: tracing would record one branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if y.sum() > 0 else y - 1


def moody():
    return Moody()


class FixedBatch(nn.Module):
    """Reshapes to a batch of 2 whatever it is given."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(2, -1))


def fixed_batch():
    return FixedBatch()
'''


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """One intra-op thread: on a shared 2-core machine two threads thrash (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A RepVGG-family net (upstream's names: rbr_dense/rbr_1x1 conv+bn, rbr_identity BN) whose
# factory takes deploy=True and then builds rbr_reparam convs.
REPVGG_SOURCE = """
import torch
from torch import nn


def conv_bn(cin, cout, k, stride, padding, groups=1):
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    m.add_module("bn", nn.BatchNorm2d(cout))
    return m


class RepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, deploy=False):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.rbr_dense = conv_bn(cin, cout, 3, stride, 1)
            self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.rbr_reparam(x))
        idt = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + idt)


class Net(nn.Module):
    def __init__(self, deploy=False):
        super().__init__()
        self.stage0 = RepVGGBlock(3, 8, 2, deploy)
        self.stage1 = nn.Sequential(RepVGGBlock(8, 8, 1, deploy), RepVGGBlock(8, 16, 2, deploy))
        self.linear = nn.Linear(16, 5)

    def forward(self, x):
        return self.linear(self.stage1(self.stage0(x)).mean((2, 3)))


def make(deploy=False):
    return Net(deploy)
"""


def _onnx_convs(path: Path) -> int:
    return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)


def _baseline_convs(arch: str) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in build_arch(arch, "baseline").modules())


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: Any = session.run(None, {session.get_inputs()[0].name: x})[0]
    return np.asarray(out, dtype=np.float64)


def _training_net(arch: str, seed: int) -> Any:
    torch.manual_seed(seed)
    return randomise_bn_stats(build_arch(arch, "train"), seed).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    paths = {}
    for seed, arch in enumerate(ARCHS):
        path = root / f"{arch}.pth"
        torch.save({"model": _training_net(arch, seed).state_dict()}, path)
        paths[arch] = path
    return paths


def _assert_one_line_error(result: Any, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_exports_and_runs_to_the_training_net(
    arch: str, trained: dict[str, Path], tmp_path: Path, run_cli: CliRun
) -> None:
    out = tmp_path / f"{arch}.onnx"
    result = run_cli("export", trained[arch], out, "--arch", arch, "--input-shape", SMALL, "--json")
    report = json.loads(result.stdout)
    assert report["schema"] == 1 and report["passed"] and report["written"]
    assert report["training_checkpoint"] and report["layout"] == "deploy"
    assert {c["name"] for c in report["cases"]} == {
        "onnx vs deployed net (batch 2)",
        "onnx vs training net (batch 2)",
    }
    # The file on disk, run here on a fresh input, against the training net itself.
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(99))  # static: 2
    with torch.inference_mode():
        expected = _training_net(arch, list(ARCHS).index(arch))(x).double().numpy()
    got = _run_onnx(out, x.numpy())
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # The ACBs are gone: as many Conv nodes as the plain baseline has convs.
    assert _onnx_convs(out) == _baseline_convs(arch) == report["onnx_nodes"]["Conv"]
    assert report["deployed_net"]["conv_layers"] == _baseline_convs(arch)
    assert report["training_net"]["conv_layers"] > report["deployed_net"]["conv_layers"]
    assert report["training_net"]["macs"] > report["deployed_net"]["macs"]
    assert len(report["quantization"]["layers"]) == _baseline_convs(arch)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no .onnx.data, no temp


def test_table_shows_before_and_after(
    trained: dict[str, Path], tmp_path: Path, run_cli: CliRun
) -> None:
    result = run_cli("export", trained["cfqkbnc"], tmp_path / "a.onnx", "--arch", "cfqkbnc")
    for text in ("training net", "deployed net", "conv layers", "MACs", "Conv", "int8"):
        assert text in result.stdout
    assert "exported" in result.stderr and "ONNX Runtime agrees" in result.stderr


def test_dynamic_batch_runs_at_two_batch_sizes(
    trained: dict[str, Path], tmp_path: Path, run_cli: CliRun
) -> None:
    out = tmp_path / "dyn.onnx"
    report = json.loads(
        run_cli(
            "export", trained["src56"], out, "--arch", "src56", "--dynamic-batch", "--json"
        ).stdout
    )
    assert [c["name"].split("(")[1] for c in report["cases"]] == ["batch 2)"] * 2 + ["batch 3)"] * 2
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    net = _training_net("src56", list(ARCHS).index("src56"))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = net(x).double().numpy()
        got = _run_onnx(out, x.numpy())
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_static_batch_is_fixed(trained: dict[str, Path], tmp_path: Path, run_cli: CliRun) -> None:
    out = tmp_path / "static.onnx"
    run_cli("export", trained["cfqkbnc"], out, "--arch", "cfqkbnc", "--batch", "4")
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


@pytest.mark.parametrize("layout", ["deploy", "baseline"])
def test_fused_checkpoint_exports_against_the_deploy_net(
    layout: str, trained: dict[str, Path], tmp_path: Path, run_cli: CliRun
) -> None:
    fused = tmp_path / "fused.safetensors"
    run_cli("fuse", trained["cfqkbnc"], fused, "--layout", layout, "-q")
    out = tmp_path / "f.onnx"
    report = json.loads(run_cli("export", fused, out, "--arch", "cfqkbnc", "--json").stdout)
    assert report["passed"] and not report["training_checkpoint"] and report["layout"] == layout
    assert [c["name"] for c in report["cases"]] == ["onnx vs deployed net (batch 2)"]
    assert report["training_net"] is None and _onnx_convs(out) == 3


def test_eps_reaches_both_nets(trained: dict[str, Path], tmp_path: Path, run_cli: CliRun) -> None:
    # Fused with eps 1e-1 but compared with a training net left at 1e-5, the logits differ.
    out = tmp_path / "eps.onnx"
    report = json.loads(
        run_cli(
            "export", trained["cfqkbnc"], out, "--arch", "cfqkbnc", "--eps", "0.1", "--json"
        ).stdout
    )
    assert report["passed"] and out.exists()


def test_float16_checkpoint_uses_its_storage_tolerance(tmp_path: Path, run_cli: CliRun) -> None:
    net = _training_net("cfqkbnc", 0)
    half = tmp_path / "half.pth"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, half
    )
    report = json.loads(
        run_cli("export", half, tmp_path / "h.onnx", "--arch", "cfqkbnc", "--json").stdout
    )
    allowed = {c["name"]: c["allowed"] / c["ref_max"] for c in report["cases"]}
    assert allowed["onnx vs deployed net (batch 2)"] == pytest.approx(1e-5)
    assert allowed["onnx vs training net (batch 2)"] == pytest.approx(1e-2)


def _model_source(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """MODEL_SOURCE written as a factory file for --model, and the names it defines."""
    source = tmp_path / "mine.py"
    source.write_text(MODEL_SOURCE)
    namespace: dict[str, Any] = {}
    exec(compile(MODEL_SOURCE, str(source), "exec"), namespace)
    return source, namespace


def test_model_factory(tmp_path: Path, run_cli: CliRun) -> None:
    source, namespace = _model_source(tmp_path)
    torch.manual_seed(3)
    train = tmp_path / "mine.pth"
    torch.save(randomise_bn_stats(namespace["make"](width=6), 3).state_dict(), train)
    out = tmp_path / "mine.onnx"
    spec = f"{source}:make"
    common = ("export", train, out, "--model", spec, "--model-arg", "width=6")
    missing = run_cli(*common, expect=2)
    _assert_one_line_error(missing, "--input-shape")
    report = json.loads(run_cli(*common, "--input-shape", "3,12,12", "--json").stdout)
    assert report["passed"] and report["training_checkpoint"]
    assert report["onnx_nodes"]["Conv"] == 2 and report["training_net"]["conv_layers"] == 6


def test_repvgg_family_through_a_deploy_factory(tmp_path: Path, run_cli: CliRun) -> None:
    source = tmp_path / "repvgg_mini.py"
    source.write_text(REPVGG_SOURCE)
    namespace: dict[str, Any] = {}
    exec(compile(REPVGG_SOURCE, str(source), "exec"), namespace)
    torch.manual_seed(1)
    train = tmp_path / "rv.pth"
    torch.save(randomise_bn_stats(namespace["make"](), 1).state_dict(), train)
    out = tmp_path / "rv.onnx"
    report = json.loads(
        run_cli(
            "export", train, out, "--model", f"{source}:make", "--input-shape", "3,16,16", "--json"
        ).stdout
    )
    assert report["passed"] and report["training_checkpoint"]
    assert report["training_net"]["conv_layers"] == 6 and report["onnx_nodes"]["Conv"] == 3
    assert "Add" not in report["onnx_nodes"]  # the identity and 1x1 branches are inside


def test_data_dependent_forward_fails_closed(tmp_path: Path, run_cli: CliRun) -> None:
    source, namespace = _model_source(tmp_path)
    plain = tmp_path / "plain.pth"
    torch.save(namespace["moody"]().state_dict(), plain)
    out = tmp_path / "moody.onnx"
    result = run_cli(
        "export", plain, out, "--model", f"{source}:moody", "--input-shape", "3,8,8", expect=3
    )
    _assert_one_line_error(result, "could not export", "data-dependent")
    assert list(tmp_path.iterdir()) and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_dynamic_batch_refuses_a_forward_that_fixes_it(tmp_path: Path, run_cli: CliRun) -> None:
    source, namespace = _model_source(tmp_path)
    plain = tmp_path / "fixed.pth"
    torch.save(namespace["fixed_batch"]().state_dict(), plain)
    out = tmp_path / "fixed.onnx"
    args = ("export", plain, out, "--model", f"{source}:fixed_batch", "--input-shape", "3,8,8")
    result = run_cli(*args, "--dynamic-batch", expect=3)
    _assert_one_line_error(result, "--dynamic-batch", "fixes the batch at 2")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    run_cli(*args)  # a static graph of batch 2 is what this forward can do


def test_mismatch_exits_1_and_writes_nothing(
    trained: dict[str, Path], tmp_path: Path, run_cli: CliRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from acnet_convert import onnxio

    real = onnxio.run_onnx

    def nudged(path: Path, batch: np.ndarray) -> list[np.ndarray]:
        outputs = real(path, batch)
        outputs[0][0, 0] += 1e-3 * np.abs(outputs[0]).max()
        return outputs

    monkeypatch.setattr(onnxio, "run_onnx", nudged)
    out = tmp_path / "bad.onnx"
    result = run_cli("export", trained["cfqkbnc"], out, "--arch", "cfqkbnc", "--json", expect=1)
    report = json.loads(result.stdout)
    assert report["schema"] == 1 and not report["passed"] and not report["written"]
    assert set(report["failed"]) == {
        "onnx vs deployed net (batch 2)",
        "onnx vs training net (batch 2)",
    }
    _assert_one_line_error(result, "nothing was written", "max_rel")
    assert list(tmp_path.iterdir()) == []


def test_wrong_arch(trained: dict[str, Path], tmp_path: Path, run_cli: CliRun) -> None:
    out = tmp_path / "x.onnx"
    result = run_cli("export", trained["cfqkbnc"], out, "--arch", "src56", expect=3)
    _assert_one_line_error(result, "does not fit", "src56", "is --arch right?")
    assert list(tmp_path.iterdir()) == []
    unknown = run_cli("export", trained["cfqkbnc"], out, "--arch", "resnet9000", expect=2)
    _assert_one_line_error(unknown, "resnet9000", "not a built-in architecture")


def test_corrupt_input(trained: dict[str, Path], tmp_path: Path, run_cli: CliRun) -> None:
    broken = tmp_path / "broken.pth"
    broken.write_bytes(trained["cfqkbnc"].read_bytes()[:5000])
    out = tmp_path / "x.onnx"
    result = run_cli("export", broken, out, "--arch", "cfqkbnc", "--json", expect=3)
    _assert_one_line_error(result, str(broken))
    document = json.loads(result.stdout)
    assert document["schema"] == 1 and document["exit_code"] == 3 and not document["written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth"]


def test_output_that_cannot_work_is_refused_before_any_work(
    trained: dict[str, Path], tmp_path: Path, run_cli: CliRun
) -> None:
    # the same check as fuse's: stdout, and special files even with --force
    src = trained["cfqkbnc"]
    result = run_cli("export", src, "-", "--arch", "cfqkbnc", expect=2)
    _assert_one_line_error(result, "stdout")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.onnx"
        os.mkfifo(fifo)
        result = run_cli("export", src, fifo, "--arch", "cfqkbnc", "--force", expect=2)
        _assert_one_line_error(result, "FIFO", "regular files")


def test_existing_output_needs_force(
    trained: dict[str, Path], tmp_path: Path, run_cli: CliRun
) -> None:
    out = tmp_path / "x.onnx"
    out.write_bytes(b"keep me")
    result = run_cli("export", trained["cfqkbnc"], out, "--arch", "cfqkbnc", expect=2)
    _assert_one_line_error(result, "exists already", "--force")
    assert out.read_bytes() == b"keep me"
    run_cli("export", trained["cfqkbnc"], out, "--arch", "cfqkbnc", "--force")
    assert _onnx_convs(out) == 3


def test_missing_network(trained: dict[str, Path], tmp_path: Path, run_cli: CliRun) -> None:
    out = tmp_path / "x.onnx"
    result = run_cli("export", trained["cfqkbnc"], out, expect=2)
    _assert_one_line_error(result, "--arch", "--model")
    both = run_cli("export", trained["cfqkbnc"], out, "--arch", "vc", "--model", "m.py:f", expect=2)
    _assert_one_line_error(both, "give one of them")
    assert list(tmp_path.iterdir()) == []


def test_opset_is_the_one_asked_for(
    trained: dict[str, Path], tmp_path: Path, run_cli: CliRun
) -> None:
    out = tmp_path / "o17.onnx"
    run_cli("export", trained["cfqkbnc"], out, "--arch", "cfqkbnc", "--opset", "17")
    model = onnx.load(str(out))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]


def test_bad_opset_is_a_usage_error(
    trained: dict[str, Path], tmp_path: Path, run_cli: CliRun
) -> None:
    result = run_cli(
        "export", trained["cfqkbnc"], tmp_path / "x.onnx", "--arch", "cfqkbnc", "--opset", "13",
        expect=2,
    )  # fmt: skip
    _assert_one_line_error(result, "--opset 13", "from 14")


def test_missing_extra_says_what_to_install(
    trained: dict[str, Path], tmp_path: Path, run_cli: CliRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    out = tmp_path / "x.onnx"
    result = run_cli("export", trained["cfqkbnc"], out, "--arch", "cfqkbnc", expect=2)
    _assert_one_line_error(result, "onnxruntime", "pip install 'acnet-convert[export]'")
    assert not out.exists()


def test_readme_export_and_stats_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util
    import shlex
    import subprocess
    import sys

    from test_readme import ROOT, run_commands, section_blocks

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as _one_thread, for the commands run here
    (export_block,) = section_blocks("## Export to ONNX")
    (stats_block,) = section_blocks("## Quantization readiness")
    make = shlex.split(export_block.splitlines()[0].split("#", 1)[0])
    assert make[:2] == ["python", "docs/make_int8_example.py"]
    subprocess.run([sys.executable, str(ROOT / make[1]), *make[2:]], cwd=tmp_path, check=True)
    run_commands(export_block, tmp_path)
    assert _onnx_convs(tmp_path / "sres18.onnx") == _baseline_convs("sres18")
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (the plot extra)")
    run_commands(stats_block, tmp_path)
    assert (tmp_path / "int8.png").read_bytes()[:4] == b"\x89PNG"
