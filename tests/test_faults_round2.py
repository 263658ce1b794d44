"""Faults and rough edges, round 2: every failure is one line with exit 2 or 3 (never 70),
batches survive one bad file and stop cleanly on a signal, OUT paths that cannot work
are refused before any work, and --json always prints a JSON document.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import CliRun, small_state
from test_hostile import assert_refused, save_as

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return save_as(small_state(), tmp_path / "train.safetensors", "safetensors")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# --- one line, exit 2 or 3, never 70 -----------------------------------------


def _with_extra(tmp_path: Path, name: str, tensor: torch.Tensor) -> Path:
    sd = {k: torch.from_numpy(v) for k, v in small_state().items()}
    sd[name] = tensor
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    return path


def test_zero_size_tensor_with_a_huge_dimension(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    good = save_as(small_state(), tmp_path / "ok.safetensors", "safetensors")
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["zero"] = {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}
    raw = json.dumps(header).encode()
    bad = tmp_path / "zero.safetensors"
    bad.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    for command in (["fuse", bad, out_dir / "o.safetensors"], ["inspect", bad]):
        assert_refused(
            run_cli, command, mentions=[str(bad), "'zero'", "impossibly large"], folder=out_dir
        )


def test_lone_surrogate_names_when_writing_safetensors_and_inspecting(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    bad = _with_extra(tmp_path, "\ud800bad", torch.zeros(3))
    for suffix in (".safetensors", ".hdf5"):
        assert_refused(
            run_cli,
            ["fuse", bad, out_dir / f"o{suffix}"],
            mentions=["lone surrogate", "\\ud800bad", "--rename"],
            folder=out_dir,
            inputs=[bad],
        )
    shown = run_cli("inspect", bad)
    assert "\\ud800bad" in shown.stdout
    run_cli("fuse", bad, out_dir / "o.pth")  # .pth stores any str


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_folder(run_cli: CliRun, src: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_refused(
            run_cli,
            ["fuse", src, locked / "o.safetensors"],
            mentions=["not writable"],
            folder=locked,
            code=2,
        )
    finally:
        locked.chmod(0o700)


def test_file_size_limit_is_a_clear_error(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

    done = subprocess.run(
        [sys.executable, "-m", "acnet_convert", "fuse", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        preexec_fn=limit,
        check=False,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr  # was -25 (SIGXFSZ) or 70
    assert len(lines) == 1 and "file-size limit" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


# --- batches -----------------------------------------------------------------


def test_an_internal_error_in_one_file_is_that_files_failure(
    run_cli: CliRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import acnet_convert.batch as batch

    inputs = [
        save_as(small_state(i), tmp_path / f"m{i}.safetensors", "safetensors") for i in (0, 1)
    ]
    real = batch.fuse_checkpoint

    def flaky(source: Path, *args: object, **kwargs: object) -> object:
        if source.name == "m0.safetensors":
            raise RuntimeError("boom")
        return real(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(batch, "fuse_checkpoint", flaky)
    out = tmp_path / "out"
    result = run_cli("fuse", *inputs, "--out-dir", out, "--json", expect=3)
    doc = json.loads(result.stdout)
    assert doc["schema"] == 1
    codes = {Path(r["source"]).name: r["exit_code"] for r in doc["results"]}
    assert codes == {"m0.safetensors": 3, "m1.safetensors": 0}
    assert "internal error" in result.stderr and "boom" in result.stderr
    assert "ok: " in result.stderr and "m1.safetensors" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["m1.safetensors"]


_SLOW_MAIN = textwrap.dedent(
    """
    import sys, time
    import acnet_convert.batch as batch
    real = batch.fuse_checkpoint
    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)
    batch.fuse_checkpoint = slow
    from acnet_convert.cli import main
    main(sys.argv[1:])
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_a_parallel_batch_stops_and_reports(
    tmp_path: Path, signum: signal.Signals
) -> None:
    inputs = [
        save_as(small_state(i), tmp_path / f"m{i}.safetensors", "safetensors") for i in range(8)
    ]
    out = tmp_path / "out"
    script = tmp_path / "slow_main.py"
    script.write_text(_SLOW_MAIN)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(script), "fuse", *map(str, inputs), "--out-dir", str(out), "-j", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(out.glob("m*.safetensors"))) < 2:
        time.sleep(0.05)
    # Ctrl-C reaches the whole process group; kill/timeouts send SIGTERM to the parent.
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert time.perf_counter() - started < 8 * 1.0 + 20  # did not fuse all that was queued
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    line = errors[0]
    written = sorted(p.name for p in out.iterdir())
    assert all(not name.startswith(".") for name in written), written  # no temporary files
    assert 2 <= len(written) < 8, written
    assert f"{len(written)} of 8 outputs were completed" in line
    for name in written:
        assert str(out / name) in line
        from acnet_convert.checkpoint import open_checkpoint

        with open_checkpoint(out / name) as reader:  # complete and valid
            assert reader.tensors
    for path in inputs:
        if path.name not in written:
            assert str(path) in line.split("not written:")[1]


# --- OUT paths that cannot work ----------------------------------------------


def test_dash_as_out_is_refused(run_cli: CliRun, src: Path, out_dir: Path) -> None:
    os.chdir(out_dir)
    assert_refused(
        run_cli,
        ["fuse", src, "-", "--to", "safetensors"],
        mentions=["stdout"],
        folder=out_dir,
        code=2,
    )


def test_directory_as_out_points_to_out_dir(run_cli: CliRun, src: Path, out_dir: Path) -> None:
    line = assert_refused(
        run_cli,
        ["fuse", src, out_dir],
        mentions=["is a directory", "--out-dir"],
        folder=out_dir,
        code=2,
    )
    assert "cannot tell the output format" not in line


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_force_never_replaces_a_special_file_or_a_link_to_one(
    run_cli: CliRun, src: Path, out_dir: Path
) -> None:
    link = out_dir / "o.safetensors"
    link.symlink_to("/dev/null")
    assert_refused(
        run_cli,
        ["fuse", src, link, "--force"],
        mentions=["device", "--force replaces only regular files"],
        folder=out_dir,
        code=2,
    )
    assert link.is_symlink()
    if hasattr(os, "mkfifo"):
        fifo = out_dir / "p.safetensors"
        os.mkfifo(fifo)
        assert_refused(
            run_cli, ["fuse", src, fifo, "--force"], mentions=["FIFO"], folder=out_dir, code=2
        )


def test_missing_parent_folders_of_out_are_created(
    run_cli: CliRun, src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "deploy" / "v1" / "model.safetensors"
    run_cli("fuse", src, out)
    assert out.is_file()


def test_folders_created_for_a_failed_fuse_are_removed(run_cli: CliRun, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\0" * 64)
    run_cli("fuse", bad, tmp_path / "deploy" / "model.safetensors", expect=3)
    assert not (tmp_path / "deploy").exists()


# --- --json prints a JSON document on failure, for every command -------------


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["fuse", "{bad}", "{out}/o.safetensors", "--json"], 3),
        (["fuse", "{bad}", "{out}", "--json"], 2),
        (["inspect", "{bad}", "--json"], 3),
        (["verify", "{bad}", "{bad}", "--json"], 3),
        (["fuse", "{bad}", "{out}/o.safetensors", "--json", "--eps", "x"], 2),
    ],
    ids=["fuse", "fuse-usage", "inspect", "verify", "click-usage"],
)
def test_json_error_document(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, args: list[str], code: int
) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\0" * 64)
    filled = [a.format(bad=bad, out=out_dir) for a in args]
    result = run_cli(*filled, expect=code)
    doc = json.loads(result.stdout)
    assert doc["schema"] == 1 and doc["ok"] is False and doc["exit_code"] == code
    assert doc["command"] == args[0] and doc["error"]


def test_permission_error_while_writing_is_one_line_exit_2(
    run_cli: CliRun, src: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import acnet_convert.atomic as atomic

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(out_dir))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    assert_refused(
        run_cli,
        ["fuse", src, out_dir / "o.safetensors"],
        mentions=["cannot write", "Permission denied"],
        folder=out_dir,
        code=2,
    )


def test_infinite_fused_bias_in_verify_warns_nothing(tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    train = REPO / "fixtures" / "resnet_like.pth"
    fused = tmp_path / "fused.safetensors"
    run = [sys.executable, "-m", "acnet_convert"]
    subprocess.run([*run, "fuse", train, fused, "-q"], env=_env(), check=True)
    tensors = load_file(str(fused))
    key = next(k for k in tensors if k.endswith("fused_conv.bias"))
    tensors[key] = tensors[key].copy()
    tensors[key][0] = np.inf
    save_file(tensors, str(fused))
    done = subprocess.run(
        [*run, "verify", train, fused], env=_env(), capture_output=True, text=True, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_verify_mismatch_with_json_prints_one_document(run_cli: CliRun, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    train = REPO / "fixtures" / "resnet_like.pth"
    fused = tmp_path / "fused.safetensors"
    run_cli("fuse", train, fused)
    tensors = load_file(str(fused))
    key = next(k for k in tensors if k.endswith("fused_conv.weight"))
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(fused))
    result = run_cli("verify", train, fused, "--json", expect=1)
    doc = json.loads(result.stdout)  # exactly one document: the report
    assert "passed" in doc or "checks" in doc or doc
