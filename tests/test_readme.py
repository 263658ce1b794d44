"""What the README tells a new user to type works as written."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def section_blocks(heading: str, language: str = "") -> list[str]:
    """The fenced code blocks (of ``language``, or unlabelled) in the README section ``heading``."""
    lines = README.read_text(encoding="utf-8").splitlines()
    stripped = [line.rstrip() for line in lines]
    if heading not in stripped:
        raise AssertionError(f"README.md has no section '{heading}'")
    blocks: list[str] = []
    current: list[str] | None = None
    info = ""
    for line in lines[stripped.index(heading) + 1 :]:
        if current is None and line.startswith("## "):
            break
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == language:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def run_commands(block: str, cwd: Path) -> None:
    """Run each ``acnet-convert`` line of a shell block, as the installed command."""
    for line in block.splitlines():
        words = shlex.split(line.split("#", 1)[0])
        if not words or words[0] != "acnet-convert":
            continue
        done = subprocess.run(
            [sys.executable, "-m", "acnet_convert", *words[1:]],
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (code,) = section_blocks("## Python API", "python")
    monkeypatch.chdir(tmp_path)  # the example writes its checkpoint into the current folder
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "cfqkbnc_train.pth").exists()


def test_first_run_commands_work(tmp_path: Path) -> None:
    (block,) = section_blocks("## First run")
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    run_commands(block, tmp_path)
    assert (tmp_path / "out.safetensors").exists()


def test_dialect_example_commands_work(tmp_path: Path) -> None:
    blocks = section_blocks("## Checkpoint dialects")
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    run_commands(blocks[-1], tmp_path)
    assert (tmp_path / "deploy.safetensors").exists()
    (toml,) = section_blocks("## Checkpoint dialects", "toml")
    example = (ROOT / "examples" / "patterns.toml").read_text(encoding="utf-8")
    assert all(line in example for line in toml.splitlines() if line.strip())


def test_ci_recipe_runs_as_written(tmp_path: Path) -> None:
    """The GitHub Actions job's acnet-convert steps, on a fresh checkout (no deploy/ folder)."""
    (yaml,) = [b for b in section_blocks("## Verify, for people and CI", "yaml") if "run:" in b]
    steps = [
        line.split("- run:", 1)[1].strip()
        for line in yaml.splitlines()
        if line.strip().startswith("- run:") and "acnet-convert " in line.split("- run:", 1)[1]
    ]
    commands = [s for s in steps if s.startswith("acnet-convert ")]
    assert len(commands) >= 2, steps
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "acnet-convert"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m acnet_convert "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "checkout"
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "train.pth").write_bytes(
        (ROOT / "fixtures" / "resnet_like.pth").read_bytes()
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    reports = [w for c in commands for w in shlex.split(c) if w.endswith(".json")]
    for name in reports:
        import json

        assert json.loads((work / name).read_text())["output"] == "deploy/model.safetensors"
    assert any((work / w).is_file() for c in commands for w in shlex.split(c) if w.endswith(".xml"))
