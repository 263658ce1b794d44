"""The command line's choices: copies in acnet_convert.choices that match their sources,
and ``--help`` that imports neither torch nor numpy."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from acnet_convert import choices

if TYPE_CHECKING:
    from conftest import CliRun

CHOICES_PY = Path(choices.__file__)


# Each copy in acnet_convert.choices, and the library list it copies.
SOURCES = [
    ("FORMATS", "acnet_convert.checkpoint", "FORMATS"),
    ("LAYOUTS", "acnet_convert.layouts", "LAYOUTS"),
    ("VERIFY_LAYOUTS", "acnet_convert.verify.options", "LAYOUT_CHOICES"),
    ("COMPUTE_DTYPES", "acnet_convert.verify.options", "COMPUTE_DTYPES"),
    ("FAMILIES", "acnet_convert.families", "FAMILIES"),
    ("DEFAULT_LOSS_THRESHOLD_DB", "acnet_convert.quant", "DEFAULT_LOSS_THRESHOLD_DB"),
]


@pytest.mark.parametrize(("name", "module", "source"), SOURCES)
def test_each_copy_matches_its_source(name: str, module: str, source: str) -> None:
    truth = getattr(importlib.import_module(module), source)
    if isinstance(truth, (tuple, list, dict)):
        truth = tuple(truth)  # a dict's keys
    assert getattr(choices, name) == truth, f"choices.{name} differs from {module}.{source}"


def test_every_copy_has_a_source() -> None:
    assert sorted(choices.__all__) == sorted(name for name, _, _ in SOURCES)


def test_choices_module_imports_nothing() -> None:
    tree = ast.parse(CHOICES_PY.read_text(encoding="utf-8"))
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports == [], [ast.unparse(n) for n in imports]


def test_help_shows_the_choices(run_cli: CliRun) -> None:
    fuse = " ".join(run_cli("fuse", "--help").stdout.split())
    assert "--to [" + "|".join(choices.FORMATS) + "]" in fuse
    assert "--layout [" + "|".join(choices.LAYOUTS) + "]" in fuse
    assert "(" + ", ".join(choices.FAMILIES) + ")" in fuse
    verify = " ".join(run_cli("verify", "--help").stdout.split())
    assert "--layout [" + "|".join(choices.VERIFY_LAYOUTS) + "]" in verify
    assert "--dtype [" + "|".join(choices.COMPUTE_DTYPES) + "]" in verify


def test_top_level_help_names_every_family_and_format(run_cli: CliRun) -> None:
    from acnet_convert.families import FAMILIES, family_title

    text = " ".join(run_cli("--help").stdout.split())
    for family in FAMILIES:
        assert family_title(family) in text, f"--help does not name {family_title(family)}"
    for extension in (".pth", ".hdf5", ".safetensors", ".pdparams"):
        assert extension in text


def test_inspect_of_a_fused_checkpoint_names_no_single_family(run_cli: CliRun) -> None:
    fused = Path(__file__).resolve().parent.parent / "fixtures/expected/grouped.fused.safetensors"
    shown = run_cli("inspect", fused).stdout
    assert "no training-time blocks found: the checkpoint looks fused or plain already" in shown


_HEAVY = ("torch", "numpy", "h5py", "onnx", "onnxruntime", "safetensors")


@pytest.mark.parametrize(
    "command", ["", "fuse", "inspect", "verify", "export", "archs", "patterns"]
)
def test_help_imports_neither_torch_nor_numpy(command: str) -> None:
    code = (
        "import sys; from acnet_convert.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"heavy = [m for m in {_HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, f'--help imported {heavy}'\n"
    )
    args = [command, "--help"] if command else ["--help"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage: acnet-convert" in done.stdout
