"""verify accepts what 'fuse --rename' and 'fuse --patterns' wrote, and reads fuse's provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
PATTERNS = ROOT / "examples" / "patterns.toml"


def test_verify_accepts_renamed_outputs(tmp_path: Path, run_cli: Any) -> None:
    out = tmp_path / "renamed.safetensors"
    run_cli("fuse", FIXTURES / "resnet_like.safetensors", out, "--rename", r"fused_conv=merged")
    assert any(k.endswith(".acb.merged.weight") for k in load_file(str(out)))
    # from the provenance fuse wrote
    result = run_cli("verify", FIXTURES / "resnet_like.safetensors", out, "--blocks", "--json")
    assert json.loads(result.stdout)["passed"] is True
    # and from the option, on a copy that has lost its provenance
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(out)), str(bare))
    refused = run_cli("verify", FIXTURES / "resnet_like.safetensors", bare, "--blocks", expect=3)
    assert "--rename" in refused.stderr
    run_cli(
        "verify",
        FIXTURES / "resnet_like.safetensors",
        bare,
        "--blocks",
        "--rename",
        r"fused_conv=merged",
    )


def test_verify_accepts_outputs_of_user_patterns(tmp_path: Path, run_cli: Any) -> None:
    src = FIXTURES / "dialects" / "rowcol_port.safetensors"
    out = tmp_path / "rowcol.safetensors"
    run_cli("fuse", src, out, "--patterns", PATTERNS)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(out)), str(bare))
    run_cli("verify", src, bare, "--blocks", "--patterns", PATTERNS, "--family", "rowcol")
    run_cli("verify", src, out, "--blocks", "--patterns", PATTERNS)  # dialect from provenance


def test_verify_family_option_is_an_alias_of_dialect(tmp_path: Path, run_cli: Any) -> None:
    src = FIXTURES / "families" / "repvgg.safetensors"
    out = tmp_path / "o.safetensors"
    run_cli("fuse", src, out, "--family", "repvgg", "--quiet")
    run_cli("verify", src, out, "--blocks", "--family", "repvgg")
    run_cli("verify", src, out, "--blocks", "--dialect", "repvgg")


def test_verify_json_carries_the_schema(tmp_path: Path, run_cli: Any) -> None:
    out = tmp_path / "o.safetensors"
    run_cli("fuse", FIXTURES / "resnet_like.safetensors", out, "--quiet")
    result = run_cli("verify", FIXTURES / "resnet_like.safetensors", out, "--blocks", "--json")
    assert json.loads(result.stdout)["schema"] == 1
