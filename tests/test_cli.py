"""The command line: every option of fuse and inspect, and the exit-code contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from acnet_convert import convert

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_fuse_writes_json_report(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out.safetensors"
    result = run_cli("fuse", FIXTURES / "cifar_quick.pth", out, "--json")
    report = json.loads(result.stdout)
    assert report["blocks_fused"] == 2
    assert report["format_in"] == "pth" and report["format_out"] == "safetensors"
    assert report["params_after"] < report["params_before"]
    assert all(b["check"]["passed"] for b in report["blocks"])
    assert "fused 2 blocks" in result.stderr


def test_to_overrides_the_extension(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out.bin"
    run_cli("fuse", FIXTURES / "cifar_quick.hdf5", out, "--to", "safetensors")
    assert out.read_bytes()[8:9] == b"{"


def test_unknown_output_extension_is_a_usage_error(tmp_path: Path, run_cli) -> None:
    result = run_cli("fuse", FIXTURES / "cifar_quick.pth", tmp_path / "out.xyz", expect=2)
    assert "--to" in result.stderr


def test_existing_output_needs_force(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "out.pth"
    out.write_bytes(b"precious")
    result = run_cli("fuse", FIXTURES / "cifar_quick.pth", out, expect=2)
    assert "--force" in result.stderr
    assert out.read_bytes() == b"precious"
    run_cli("fuse", FIXTURES / "cifar_quick.pth", out, "--force")
    assert out.read_bytes() != b"precious"


def test_output_equal_to_input_is_refused(tmp_path: Path, run_cli) -> None:
    src = tmp_path / "m.pth"
    src.write_bytes((FIXTURES / "cifar_quick.pth").read_bytes())
    result = run_cli("fuse", src, src, "--force", expect=2)
    assert "overwrite the input" in result.stderr


def test_missing_output_folder_is_created(tmp_path: Path, run_cli) -> None:
    # Was a usage error; now created, as --out-dir always did (see test_faults_round2).
    run_cli("fuse", FIXTURES / "cifar_quick.pth", tmp_path / "nope" / "o.pth")
    assert (tmp_path / "nope" / "o.pth").is_file()


def test_fused_checkpoint_has_no_blocks(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "o.pth"
    run_cli("fuse", FIXTURES / "cifar_quick.pth", out)
    result = run_cli("fuse", out, tmp_path / "again.pth", expect=3)
    assert "no ACNet block found" in result.stderr and "inspect" in result.stderr
    assert not (tmp_path / "again.pth").exists()


def test_check_failure_exits_1_and_writes_nothing(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = convert.fuse_block

    def broken(block):  # type: ignore[no-untyped-def]
        w, b = real(block)
        w = w.copy()
        w[0, 0, 0, 0] += 0.01
        return w, b

    monkeypatch.setattr(convert, "fuse_block", broken)
    out = tmp_path / "o.safetensors"
    result = run_cli("fuse", FIXTURES / "cifar_quick.pth", out, expect=1)
    assert "conv1.acb" in result.stderr and "nothing was written" in result.stderr
    assert list(tmp_path.iterdir()) == []
    # --no-check writes whatever the fusion produced
    run_cli("fuse", FIXTURES / "cifar_quick.pth", out, "--no-check")
    assert out.exists()


def test_eps_changes_the_result(tmp_path: Path, run_cli) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_cli("fuse", FIXTURES / "cifar_quick.pth", a)
    run_cli("fuse", FIXTURES / "cifar_quick.pth", b, "--eps", "1e-3")
    from safetensors.numpy import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    key = "conv1.acb.fused_conv.weight"
    assert not np.array_equal(wa[key], wb[key])


def test_negative_eps_is_a_usage_error(tmp_path: Path, run_cli) -> None:
    result = run_cli(
        "fuse", FIXTURES / "cifar_quick.pth", tmp_path / "o.pth", "--eps", "-1", expect=2
    )
    assert "--eps must be a non-negative number, got -1" in result.stderr
    assert not (tmp_path / "o.pth").exists()


def test_dry_run_writes_nothing_and_shows_renames(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "o.pth"
    result = run_cli(
        "fuse",
        FIXTURES / "resnet_like.pth",
        out,
        "--dry-run",
        "--json",
        "--rename",
        r"^stage1\.0\.=layer1.0.",
    )
    plan = json.loads(result.stdout)
    assert not out.exists()
    assert "layer1.0.conv1.acb.fused_conv.weight" in plan["outputs"]
    assert {"from": "stage1.0.shortcut.0.weight", "to": "layer1.0.shortcut.0.weight"} in plan[
        "renamed"
    ]
    human = run_cli("fuse", FIXTURES / "resnet_like.pth", out, "--dry-run")
    assert "nothing written" in human.stdout


@pytest.mark.parametrize("fmt", ["pth", "hdf5", "safetensors", "pdparams"])
def test_batch_writes_every_output_format(tmp_path: Path, run_cli, fmt: str) -> None:
    out_dir = tmp_path / "out"
    run_cli("fuse", FIXTURES / "cifar_quick.pth", "--out-dir", out_dir, "--to", fmt, "--quiet")
    assert [p.name for p in out_dir.iterdir()] == [f"cifar_quick.{fmt}"]


def test_batch_dry_run_writes_nothing(tmp_path: Path, run_cli) -> None:
    out_dir = tmp_path / "out"
    sources = (FIXTURES / "resnet_like.pth", FIXTURES / "cifar_quick.pth")
    result = run_cli(
        "fuse", *sources, "--out-dir", out_dir, "--dry-run", "--json", "--to", "safetensors"
    )
    document = json.loads(result.stdout)
    assert document["dry_run"] is True
    assert [r["output"] for r in document["results"]] == [
        str(out_dir / "resnet_like.safetensors"),
        str(out_dir / "cifar_quick.safetensors"),
    ]
    assert "stage1.0.conv1.acb.fused_conv.weight" in document["results"][0]["outputs"]
    assert not out_dir.exists()
    human = run_cli("fuse", *sources, "--out-dir", out_dir, "--dry-run")
    assert human.stdout.count("nothing written") == 2
    assert not out_dir.exists()


def test_rename_applies_to_written_keys(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "o.pth"
    run_cli("fuse", FIXTURES / "resnet_like.pth", out, "--rename", r"\.acb\.fused_conv=.fused")
    sd = torch.load(out, weights_only=True)
    assert "stage1.0.conv1.fused.weight" in sd


def test_colliding_renames_are_refused(tmp_path: Path, run_cli) -> None:
    result = run_cli(
        "fuse", FIXTURES / "resnet_like.pth", tmp_path / "o.pth", "--rename", ".*=x", expect=2
    )
    assert "written twice" in result.stderr


def test_bad_rename_syntax(tmp_path: Path, run_cli) -> None:
    result = run_cli(
        "fuse", FIXTURES / "resnet_like.pth", tmp_path / "o.pth", "--rename", "noequals", expect=2
    )
    assert "--rename 'noequals'" in result.stderr
    result = run_cli(
        "fuse", FIXTURES / "resnet_like.pth", tmp_path / "o.pth", "--rename", "(=x", expect=2
    )
    assert "--rename '(=x': bad regular expression" in result.stderr
    assert not (tmp_path / "o.pth").exists()


def test_baseline_layout_identity_bn_reproduces_fused_conv(tmp_path: Path, run_cli) -> None:
    deploy, base = tmp_path / "d.pth", tmp_path / "b.pth"
    run_cli("fuse", FIXTURES / "resnet_like.pth", deploy)
    run_cli("fuse", FIXTURES / "resnet_like.pth", base, "--layout", "baseline")
    d, b = torch.load(deploy, weights_only=True), torch.load(base, weights_only=True)
    u = "stage1.0.conv1."
    assert {k for k in b if k.startswith(u)} == {
        u + "conv.weight",
        u + "bn.weight",
        u + "bn.bias",
        u + "bn.running_mean",
        u + "bn.running_var",
        u + "bn.num_batches_tracked",
    }
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(16).eval()
    conv.load_state_dict({"weight": b[u + "conv.weight"]})
    bn.load_state_dict({k[len(u) + 3 :]: v for k, v in b.items() if k.startswith(u + "bn.")})
    fused = torch.nn.Conv2d(8, 16, 3, padding=1)
    fused.load_state_dict(
        {"weight": d[u + "acb.fused_conv.weight"], "bias": d[u + "acb.fused_conv.bias"]}
    )
    # Both sides hold the same float32 kernel and bias; they differ only by the baseline's
    # identity BN, whose running_var = 1 - eps rounds to float32, so sqrt(var + eps) is 1
    # within one unit u = 2**-24. Run in float64 so nothing else rounds: then
    # |difference| <= u * (|W| * |x| + |b|) elementwise; 2u leaves room for float64 noise.
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    conv, bn, fused = conv.double(), bn.double(), fused.double()
    with torch.no_grad():
        diff = (bn(conv(x)) - fused(x)).abs()
        scale = torch.nn.functional.conv2d(x.abs(), fused.weight.abs(), fused.bias.abs(), padding=1)
    assert bool((diff <= 2 * 2.0**-24 * scale).all()), float((diff / scale).max())


def test_baseline_bias_layout(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "b.pth"
    run_cli("fuse", FIXTURES / "cifar_quick.pth", out, "--layout", "baseline-bias")
    sd = torch.load(out, weights_only=True)
    assert "conv1.conv.weight" in sd and "conv1.conv.bias" in sd


def test_inspect_json_and_filter(run_cli) -> None:
    result = run_cli(
        "inspect", FIXTURES / "ddp_wrapped.pth", "--json", "--filter", r"conv1\.acb\.square"
    )
    data = json.loads(result.stdout)
    assert data["format"] == "pth" and data["prefix"] == "module."
    assert data["dropped_on_fuse"] == ["optimizer"]
    assert data["dialect"] == "acnet" and len(data["blocks"]) == 2
    assert all("square" in t["name"] for t in data["tensors"])
    assert data["totals"]["params_after_fusing"] < data["totals"]["params"]
    human = run_cli("inspect", FIXTURES / "legacy_last_bn.safetensors")
    assert "1x3" in human.stdout and "5x5" in human.stdout


def test_inspect_bad_filter_is_usage_error(run_cli) -> None:
    result = run_cli("inspect", FIXTURES / "cifar_quick.pth", "--filter", "(", expect=2)
    assert "--filter '(': bad regular expression" in result.stderr and not result.stdout


def test_inspect_fused_checkpoint_says_so(tmp_path: Path, run_cli) -> None:
    out = tmp_path / "o.pth"
    run_cli("fuse", FIXTURES / "cifar_quick.pth", out)
    assert "fused or plain" in run_cli("inspect", out).stdout


def test_out_dir_with_jobs_reports_failures_and_keeps_going(tmp_path: Path, run_cli) -> None:
    bad = tmp_path / "in" / "broken.pth"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    out_dir = tmp_path / "out"
    result = run_cli(
        "fuse",
        FIXTURES / "cifar_quick.pth",
        FIXTURES / "grouped.safetensors",
        bad,
        "--out-dir",
        out_dir,
        "-j",
        "2",
        "--json",
        expect=3,
    )
    data = json.loads(result.stdout)
    assert [r["exit_code"] for r in data["results"]] == [0, 0, 3]
    assert sorted(p.name for p in out_dir.iterdir()) == ["cifar_quick.pth", "grouped.safetensors"]
    assert "broken.pth" in result.stderr


def test_out_dir_expands_globs(tmp_path: Path, run_cli) -> None:
    run_cli("fuse", str(FIXTURES / "cifar_quick.*"), "--out-dir", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cifar_quick.hdf5",
        "cifar_quick.pth",
        "cifar_quick.safetensors",
    ]
    result = run_cli(
        "fuse",
        str(FIXTURES / "cifar_quick.*"),
        "--out-dir",
        tmp_path / "x",
        "--to",
        "pth",
        expect=2,
    )
    assert "cifar_quick" in result.stderr


def test_fuse_needs_two_paths_without_out_dir(run_cli) -> None:
    result = run_cli("fuse", FIXTURES / "cifar_quick.pth", expect=2)
    assert "fuse takes CKPT OUT (or several CKPTs with --out-dir DIR)" in result.stderr


def test_unknown_dialect_is_usage_error(tmp_path: Path, run_cli) -> None:
    result = run_cli(
        "fuse", FIXTURES / "cifar_quick.pth", tmp_path / "o.pth", "--dialect", "nope", expect=2
    )
    assert "known dialects" in result.stderr


def test_python_dash_m_and_help(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "acnet_convert", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fuse" in done.stdout and "Exit codes" in done.stdout
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "acnet_convert",
            "fuse",
            str(tmp_path / "missing.pth"),
            str(tmp_path / "o.pth"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 3
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_fuse_inspect_and_help_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from acnet_convert.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    for src in ("cifar_quick.pth", "cifar_quick.hdf5", "cifar_quick.safetensors"):
        out = tmp_path / (src + ".out.pth")
        subprocess.run(
            [sys.executable, "-c", code, "fuse", str(FIXTURES / src), str(out)], check=True
        )
        subprocess.run([sys.executable, "-c", code, "inspect", str(out)], check=True)
    subprocess.run([sys.executable, "-c", code, "--help"], check=True, capture_output=True)


@pytest.mark.parametrize("out_fmt", ["pth", "hdf5", "safetensors"])
def test_bfloat16_checkpoint_fuses_in_its_own_dtype(out_fmt: str, tmp_path: Path, run_cli) -> None:
    from safetensors.torch import save_file

    from acnet_convert.checkpoint import open_checkpoint
    from acnet_convert.nn import ACBlock
    from acnet_convert.testing import randomise_bn_stats

    torch.manual_seed(0)
    train = randomise_bn_stats(ACBlock(4, 6, 3, padding=1, use_last_bn=True), seed=1).eval()
    state = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in train.state_dict().items()
    }
    src = tmp_path / "train.safetensors"
    save_file(state, str(src))
    out = tmp_path / f"fused.{out_fmt}"
    run_cli("fuse", src, out, "--quiet")

    with open_checkpoint(out) as reader:
        assert reader.tensors["fused_conv.weight"].dtype == "bfloat16"
        fused = {
            k: torch.from_numpy(np.array(reader.read(k))).view(torch.bfloat16)
            for k in ("fused_conv.weight", "fused_conv.bias")
        }
    reference = ACBlock(4, 6, 3, padding=1, use_last_bn=True).double().eval()
    reference.load_state_dict(
        {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    )
    deployed = ACBlock(4, 6, 3, padding=1, deploy=True).double().eval()
    deployed.load_state_dict({k: v.double() for k, v in fused.items()})
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want, got = reference(x), deployed(x)
    # bfloat16 keeps 8 significant bits; the fused kernel is rounded to them once.
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2


def test_training_engine_checkpoint_with_optimizer_and_scheduler(tmp_path: Path, run_cli) -> None:
    """What upstream's engine saves: model, SGD state with momentum buffers, a scheduler whose
    milestones are a collections.Counter (torch's MultiStepLR), and the iteration."""
    from acnet_convert.nn import ACBlock
    from acnet_convert.testing import randomise_bn_stats

    net = randomise_bn_stats(torch.nn.Sequential(ACBlock(3, 4, 3, padding=1)), seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [30, 60])
    src = tmp_path / "iter-100.pth"
    torch.save(
        {
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "iteration": 100,
        },
        src,
    )
    torch.load(src, weights_only=True)  # torch's own safe loader accepts it; so must we
    out = tmp_path / "fused.pth"
    result = run_cli("fuse", src, out)
    assert "dropped 'optimizer'" in result.stderr and "dropped 'scheduler'" in result.stderr
    fused = torch.load(out, weights_only=True)
    assert list(fused) == ["model", "iteration"] and fused["iteration"] == 100
    assert set(fused["model"]) == {"0.fused_conv.weight", "0.fused_conv.bias"}


def test_keras_full_model_file_keeps_weights_and_drops_its_model_config(
    tmp_path: Path, run_cli
) -> None:
    import h5py

    src = tmp_path / "full_model.h5"
    with (
        h5py.File(FIXTURES / "dialects" / "keras_acnet.h5", "r") as weights,
        h5py.File(src, "w") as full,
    ):
        weights.copy("/", full, name="model_weights")
        full.attrs["model_config"] = '{"class_name": "Functional", "layers": ["conv1_sqr"]}'
        full.attrs["training_config"] = '{"loss": "categorical_crossentropy"}'
        full.attrs["backend"] = "tensorflow"
        full.attrs["keras_version"] = "2.13.1"
    out = tmp_path / "fused.h5"
    result = run_cli("fuse", src, out)
    assert "dropped the 'model_config' attribute" in result.stderr
    with h5py.File(out, "r") as fused:
        assert "model_config" not in fused.attrs and "training_config" not in fused.attrs
        assert fused.attrs["acnet_convert.dialect"] == "keras"
    inspected = json.loads(run_cli("inspect", out, "--json").stdout)
    assert inspected["blocks"] == [] and inspected["tensors"]
