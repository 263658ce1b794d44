"""Library notes reach the user through the reports: the misnamed-extension note is printed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_a_misnamed_file_is_noted_by_fuse_and_inspect(tmp_path: Path, run_cli: Any) -> None:
    misnamed = tmp_path / "train.pth"
    shutil.copy(FIXTURES / "resnet_like.safetensors", misnamed)
    result = run_cli("fuse", misnamed, tmp_path / "o.safetensors", "--json")
    note = f"{misnamed}: has extension .pth but holds safetensors data"
    assert note in result.stderr
    assert note in json.loads(result.stdout)["notes"]
    shown = json.loads(run_cli("inspect", misnamed, "--json").stdout)
    assert any("has extension .pth" in n for n in shown["notes"])
    assert "has extension .pth" in run_cli("inspect", misnamed).stdout
