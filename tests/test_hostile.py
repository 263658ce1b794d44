"""Hostile and broken inputs: whatever a file holds, the CLI runs no code from it,
prints one clear line, exits 3 and leaves the input and the output folder as they were;
and an interrupted or failed conversion leaves the previous output (or none), never a
temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import CliRun, acb_state, save_safetensors, small_state

FORMATS = ("safetensors", "pth", "hdf5")
SUFFIX = {"safetensors": ".safetensors", "pth": ".pth", "hdf5": ".hdf5"}
BLOCK = "layer1.conv1.acb"


def save_as(sd: dict[str, np.ndarray], path: Path, fmt: str) -> Path:
    """Write a state dict as safetensors, with torch.save, or as upstream ACNet's flat hdf5."""
    if fmt == "safetensors":
        return save_safetensors(sd, path)
    if fmt == "pth":
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
        return path
    with h5py.File(path, "w") as f:
        for key, value in sd.items():
            f.create_dataset(key.replace("/", "+"), data=value)
    return path


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_refused(
    run_cli: CliRun,
    args: Sequence[str | Path],
    *,
    mentions: Sequence[str],
    folder: Path,
    inputs: Sequence[Path] = (),
    code: int = 3,
) -> str:
    """Run the CLI; check the exit code, one error line naming ``mentions``, and no side effects.

    Returns the error line.
    """
    listing = _listing(folder)
    digests = [_digest(p) for p in inputs]
    result = run_cli(*args, expect=code)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for text in mentions:
        assert text in line, f"{text!r} not in {line!r}"
    assert "Traceback" not in result.stdout + result.stderr
    assert "internal error" not in line
    assert _listing(folder) == listing, "the output folder changed"
    assert [_digest(p) for p in inputs] == digests, "an input file changed"
    return line


def _fuse_and_inspect(run_cli: CliRun, src: Path, out_dir: Path, mentions: Sequence[str]) -> None:
    for out_name in ("fused.safetensors", "fused.pth", "fused.hdf5"):
        assert_refused(
            run_cli,
            ["fuse", src, out_dir / out_name],
            mentions=mentions,
            folder=out_dir,
            inputs=[src],
        )
    assert_refused(run_cli, ["inspect", src], mentions=mentions, folder=out_dir, inputs=[src])


# --- files that are not checkpoints ---------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".hdf5", ".bin"])
def test_empty_file(run_cli: CliRun, tmp_path: Path, out_dir: Path, suffix: str) -> None:
    src = tmp_path / f"empty{suffix}"
    src.write_bytes(b"")
    _fuse_and_inspect(run_cli, src, out_dir, [str(src), "empty"])


def test_directory(run_cli: CliRun, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "ckpt.pth"
    src.mkdir()
    _fuse_and_inspect(run_cli, src, out_dir, [str(src), "directory"])


def test_missing_file(run_cli: CliRun, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "nowhere.pth"
    _fuse_and_inspect(run_cli, src, out_dir, [str(src), "does not exist"])
    assert not src.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".hdf5"])
def test_random_bytes(run_cli: CliRun, tmp_path: Path, out_dir: Path, suffix: str) -> None:
    src = tmp_path / f"noise{suffix}"
    src.write_bytes(np.random.default_rng(3).bytes(5000))
    _fuse_and_inspect(run_cli, src, out_dir, [str(src), "not recognised"])


# --- damaged checkpoints of each format -----------------------------------------


@pytest.fixture(params=FORMATS)
def good(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, bytes]:
    """A valid training checkpoint's format and bytes."""
    fmt = request.param
    return fmt, save_as(small_state(), tmp_path / f"good{SUFFIX[fmt]}", fmt).read_bytes()


@pytest.mark.parametrize(
    "keep", [0.001, 0.25, 0.5, 0.9, -1], ids=["head", "quarter", "half", "most", "last-byte"]
)
def test_truncated(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, good: tuple[str, bytes], keep: float
) -> None:
    fmt, data = good
    cut = len(data) - 1 if keep == -1 else max(9, int(len(data) * keep))
    src = tmp_path / f"cut{SUFFIX[fmt]}"
    src.write_bytes(data[:cut])
    _fuse_and_inspect(run_cli, src, out_dir, [str(src)])


def _flip(data: bytes, at: int, bit: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]


def _structure_offsets(fmt: str, data: bytes) -> list[int]:
    """Bytes of the format's structure, where a flipped bit cannot give a valid file."""
    if fmt == "safetensors":
        # The header length, the opening brace, a quote, a field name.
        return [0, 8, 9, data.index(b'"data_offsets"') + 3]
    if fmt == "pth":
        # The zip signature, a byte of the CRC-protected pickle, the central directory.
        pickle_at = data.index(b"data.pkl") + 60
        return [0, pickle_at, data.rindex(b"PK\x01\x02") + 1, data.rindex(b"PK\x05\x06") + 2]
    # HDF5: the signature, the superblock version, a B-tree and a local heap signature.
    return [0, 8, data.index(b"TREE") + 1, data.index(b"HEAP")]


def test_flipped_bits(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, good: tuple[str, bytes]
) -> None:
    fmt, data = good
    for n, at in enumerate(_structure_offsets(fmt, data)):
        src = tmp_path / f"flip{n}{SUFFIX[fmt]}"
        src.write_bytes(_flip(data, at, bit=n % 8))
        _fuse_and_inspect(run_cli, src, out_dir, [str(src)])


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [
        ("safetensors", ".pth"),
        ("safetensors", ".hdf5"),
        ("pth", ".safetensors"),
        ("hdf5", ".pth"),
        ("hdf5", ".bin"),
    ],
)
def test_wrong_extension_still_works(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, fmt: str, suffix: str
) -> None:
    src = save_as(small_state(), tmp_path / f"model{suffix}", fmt)
    digest = _digest(src)
    out = out_dir / "fused.safetensors"
    run_cli("fuse", src, out)
    assert _listing(out_dir) == ["fused.safetensors"]
    assert _digest(src) == digest
    result = run_cli("inspect", "--json", out)
    keys = {t["name"] for t in json.loads(result.stdout)["tensors"]}
    assert f"{BLOCK}.fused_conv.weight" in keys
    assert f"{BLOCK}.square_conv.weight" not in keys


# --- containers ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_names_after_removing_module_prefix(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, fmt: str
) -> None:
    sd = small_state()
    mixed = {**sd, **{f"module.{k}": v for k, v in sd.items()}}
    src = save_as(mixed, tmp_path / f"mixed{SUFFIX[fmt]}", fmt)
    line = assert_refused(
        run_cli,
        ["fuse", src, out_dir / "fused.pth"],
        mentions=[str(src), "appears twice", "module."],
        folder=out_dir,
        inputs=[src],
    )
    key = re.search(r"key '([^']+)' appears twice", line)
    assert key is not None and key.group(1) in sd
    assert f"'module.{key.group(1)}'" in line and f"'{key.group(1)}' and" in line


def test_duplicate_names_under_both_prefixes(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    sd = small_state()
    mixed = {
        **{f"module.{k}": v for k, v in sd.items()},
        **{f"module._orig_mod.{k}": v for k, v in sd.items()},
    }
    src = save_safetensors(mixed, tmp_path / "mixed.safetensors")
    assert_refused(
        run_cli,
        ["fuse", src, out_dir / "fused.pth"],
        mentions=[str(src), "appears twice"],
        folder=out_dir,
        inputs=[src],
    )


def test_pth_that_is_a_list_of_tensors(run_cli: CliRun, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "list.pth"
    torch.save([torch.ones(3), torch.zeros(2)], src)
    _fuse_and_inspect(run_cli, src, out_dir, [str(src), "holds a list, not a dict"])


def test_pth_that_is_a_bare_tensor(run_cli: CliRun, tmp_path: Path, out_dir: Path) -> None:
    src = tmp_path / "tensor.pth"
    torch.save(torch.ones(3), src)
    _fuse_and_inspect(run_cli, src, out_dir, [str(src), "not a dict"])


@pytest.mark.parametrize(
    ("extra", "shown"),
    [
        # a block whose name holds a terminal escape sequence (clear screen) and a bell
        (
            {"evil\x1b[2J\x07.square_conv.weight": np.zeros((8, 8, 3, 3), np.float32)},
            "evil\\x1b[2J\\x07",
        ),
        # a name with a newline, refused as a duplicate once 'module.' is removed
        (
            {"x\nerror: all good": np.zeros(1), "module.x\nerror: all good": np.zeros(1)},
            "x\\nerror: all good",
        ),
    ],
    ids=["escape-sequence", "newline"],
)
def test_names_with_control_characters_stay_one_harmless_line(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, extra: dict[str, np.ndarray], shown: str
) -> None:
    src = save_safetensors({**small_state(), **extra}, tmp_path / "evil.safetensors")
    for args in (["fuse", src, out_dir / "fused.pth"], ["inspect", src]):
        line = assert_refused(
            run_cli, args, mentions=[str(src), shown], folder=out_dir, inputs=[src]
        )
        assert "\x1b" not in line and "\x07" not in line


def test_names_that_look_like_markup_are_shown_literally(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    sd = {**small_state(), "a[/]b": np.zeros(1, np.float32), "[bold]c\x1b[31m": np.zeros(1)}
    src = save_safetensors(sd, tmp_path / "ckpt[best].safetensors")
    shown = run_cli("inspect", src).stdout
    assert "ckpt[best].safetensors" in shown
    assert "a[/]b" in shown and "[bold]c\\x1b[31m" in shown and "\x1b" not in shown
    dry = run_cli("fuse", "--dry-run", "--rename", "fc=f[/]c", src, out_dir / "x.pth").stdout
    assert "f[/]c.weight" in dry and "ckpt[best]" in dry
    assert _listing(out_dir) == []


# --- pickles that would run code -------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _evil_checkpoint(tmp_path: Path, how: str) -> tuple[Path, Path]:
    marker = tmp_path / "code-ran"
    src = tmp_path / f"evil-{how}.pth"
    sd = {k: torch.from_numpy(v) for k, v in small_state().items()}
    obj = {"model": sd, "hook": _Payload(marker)}
    if how == "zip":
        torch.save(obj, src)
    elif how == "legacy":
        torch.save(obj, src, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, as a careless tool might write it
        src.write_bytes(pickle.dumps({"weight": _Payload(marker)}, protocol=2))
    return src, marker


def _command_args(command: str, src: Path, out_dir: Path, tmp_path: Path) -> list[str | Path]:
    if command == "fuse":
        return ["fuse", src, out_dir / "fused.pth"]
    if command == "inspect":
        return ["inspect", src]
    fused = save_safetensors(small_state(), tmp_path / "other.safetensors")
    return ["verify", src, fused]


@pytest.mark.parametrize("how", ["zip", "legacy", "bare"])
@pytest.mark.parametrize("command", ["fuse", "inspect", "verify"])
def test_pickle_payload_never_runs_by_default(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, how: str, command: str
) -> None:
    from acnet_convert.cli import cli

    if command not in cli.commands:  # type: ignore[attr-defined]
        pytest.skip(f"no '{command}' command yet")
    src, marker = _evil_checkpoint(tmp_path, how)
    line = assert_refused(
        run_cli,
        _command_args(command, src, out_dir, tmp_path),
        mentions=[str(src), "--trust-pickle", "run code"],
        folder=out_dir,
        inputs=[src],
    )
    assert "open" in line or "_Payload" in line, line  # names what the pickle asked for
    assert not marker.exists(), "code from the checkpoint ran"


def test_trust_pickle_is_the_opt_in(run_cli: CliRun, tmp_path: Path, out_dir: Path) -> None:
    src, marker = _evil_checkpoint(tmp_path, "zip")
    run_cli("fuse", "--trust-pickle", src, out_dir / "fused.pth")
    assert marker.exists()  # exactly what --trust-pickle warns about
    assert _listing(out_dir) == ["fused.pth"]


def test_help_explains_trust_pickle(run_cli: CliRun) -> None:
    text = " ".join(run_cli("fuse", "--help").stdout.split())
    assert "--trust-pickle" in text and "run code" in text and "SECURITY.md" in text


# --- headers that lie -----------------------------------------------------------------


def _raw_safetensors(path: Path, header: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _refused_cheaply(
    run_cli: CliRun, src: Path, out: Path, mentions: Sequence[str], out_dir: Path
) -> None:
    """fuse and inspect both refuse ``src``; fuse does so without allocating what it claims."""
    peak = _peak_bytes(
        lambda: assert_refused(
            run_cli,
            ["fuse", src, out],
            mentions=[str(src), *mentions],
            folder=out_dir,
            inputs=[src],
        )
    )
    assert peak < 50 * 2**20
    assert_refused(
        run_cli, ["inspect", src], mentions=[str(src), *mentions], folder=out_dir, inputs=[src]
    )


@pytest.mark.parametrize(
    ("header", "mentions"),
    [
        (
            {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}},
            ["'w'", "data_offsets"],
        ),
        (
            {"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}},
            ["'w'", "needs"],
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            ["overlaps"],
        ),
        ({"w": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}}, ["'w'", "needs 32 bytes"]),
        (
            {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}},
            ["'w'", "F8_E4M3", "not supported"],
        ),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, ["'w'", "shape"]),
        ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, ["'w'", "shape"]),
        ({"w": {"dtype": "F32", "shape": [4]}}, ["'w'", "data_offsets"]),
        ({"w": [1, 2, 3]}, ["'w'"]),
        (
            {
                "__metadata__": {"epoch": 3},
                "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            },
            ["epoch"],
        ),
    ],
    ids=[
        "huge-shape",
        "shape-vs-offsets",
        "overlap",
        "wrong-dtype",
        "unknown-dtype",
        "negative",
        "string-shape",
        "no-offsets",
        "not-object",
        "metadata",
    ],
)
def test_lying_safetensors_header(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, header: dict[str, Any], mentions: list[str]
) -> None:
    src = _raw_safetensors(tmp_path / "lying.safetensors", header, bytes(24))
    _refused_cheaply(run_cli, src, out_dir / "fused.safetensors", mentions, out_dir)


def test_safetensors_header_length_beyond_the_file(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    src = tmp_path / "lying.safetensors"
    src.write_bytes((2**40).to_bytes(8, "little") + b'{"w": {}}')
    _fuse_and_inspect(run_cli, src, out_dir, [str(src)])


def _hdf5(path: Path, build: Callable[[h5py.File], None], with_block: bool = True) -> Path:
    with h5py.File(path, "w") as f:
        if with_block:
            for key, value in small_state().items():
                f.create_dataset(key, data=value)
        build(f)
    return path


@pytest.mark.parametrize(
    ("build", "mentions"),
    [
        (
            lambda f: f.create_dataset("huge", shape=(2**20, 2**20), dtype="f4", chunks=(64, 64)),
            ["'huge'", "declares"],
        ),
        (lambda f: f.create_dataset("huge", shape=(2**30,), dtype="f8"), ["'huge'"]),
        (lambda f: f.create_dataset("note", data="trained by me"), ["'note'", "string"]),
        (lambda f: f.create_dataset("names", data=np.array([b"a", b"b"])), ["'names'", "string"]),
        (
            lambda f: f.create_dataset("pair", data=np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])),
            ["'pair'", "compound"],
        ),
        (lambda f: f.create_dataset("c", data=np.ones(2, dtype=np.complex64)), ["'c'"]),
        (lambda f: f.create_group("group"), ["'group'"]),
        (lambda f: f.__setitem__("alias", h5py.SoftLink("/stem.weight")), ["'alias'", "link"]),
        (lambda f: f.__setitem__("ext", h5py.ExternalLink("/etc/passwd", "/x")), ["'ext'", "link"]),
    ],
    ids=[
        "huge-chunked",
        "huge-unwritten",
        "string",
        "bytes",
        "compound",
        "complex",
        "group",
        "softlink",
        "extlink",
    ],
)
def test_lying_or_non_numeric_hdf5(
    run_cli: CliRun,
    tmp_path: Path,
    out_dir: Path,
    build: Callable[[h5py.File], None],
    mentions: list[str],
) -> None:
    src = _hdf5(tmp_path / "odd.hdf5", build)
    _refused_cheaply(run_cli, src, out_dir / "fused.hdf5", mentions, out_dir)


def test_pth_tensor_larger_than_its_storage(run_cli: CliRun, tmp_path: Path, out_dir: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(77)}, good)
    src = tmp_path / "lying.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(src, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                # size (77,) -> (2**30,): a 4 GiB tensor over a 308-byte storage
                assert data.count(b"K\x4d\x85") == 1
                data = data.replace(b"K\x4d\x85", b"J\x00\x00\x00\x40\x85")
            zout.writestr(name, data)
    peak = _peak_bytes(lambda: _fuse_and_inspect(run_cli, src, out_dir, [str(src), "'w'", "needs"]))
    assert peak < 50 * 2**20


# --- blocks that cannot be fused ----------------------------------------------------


def _edit(sd: dict[str, np.ndarray], key: str, value: np.ndarray | None) -> dict[str, np.ndarray]:
    out = dict(sd)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


def _zero_size() -> dict[str, np.ndarray]:
    sd = small_state()
    rng = np.random.default_rng(1)
    sd.update(acb_state(rng, BLOCK, 8, 0))
    return sd


def _one_dim_zero() -> dict[str, np.ndarray]:
    return _edit(small_state(), f"{BLOCK}.hor_conv.weight", np.zeros((8, 8, 1, 0), np.float32))


def _nan(key: str, value: float) -> Callable[[], dict[str, np.ndarray]]:
    def make() -> dict[str, np.ndarray]:
        sd = small_state()
        bad = sd[key].copy()
        bad.reshape(-1)[1] = value
        return _edit(sd, key, bad)

    return make


def _replace(key: str, value: np.ndarray | None) -> Callable[[], dict[str, np.ndarray]]:
    return lambda: _edit(small_state(), key, value)


def _kernels(
    k: int, hor: tuple[int, int], ver: tuple[int, int], cout: int = 8
) -> Callable[[], dict[str, np.ndarray]]:
    def make() -> dict[str, np.ndarray]:
        sd = small_state()
        rng = np.random.default_rng(2)
        sd[f"{BLOCK}.square_conv.weight"] = rng.normal(size=(8, 8, k, k)).astype(np.float32)
        sd[f"{BLOCK}.hor_conv.weight"] = rng.normal(size=(cout, 8, *hor)).astype(np.float32)
        sd[f"{BLOCK}.ver_conv.weight"] = rng.normal(size=(8, 8, *ver)).astype(np.float32)
        return sd

    return make


def _plain() -> dict[str, np.ndarray]:
    return {
        k: v
        for k, v in small_state().items()
        if not any(b in k for b in ("_conv", "_bn", "last_bn"))
    }


BLOCK_CASES: dict[str, tuple[Callable[[], dict[str, np.ndarray]], list[str]]] = {
    "zero-channels": (_zero_size, [BLOCK, "no channels"]),
    "zero-length-1d": (_one_dim_zero, [BLOCK, "hor_conv.weight"]),
    "nan-weight": (
        _nan(f"{BLOCK}.square_conv.weight", np.nan),
        [BLOCK, "square_conv.weight", "NaN"],
    ),
    "inf-bn": (_nan(f"{BLOCK}.hor_bn.running_mean", np.inf), [BLOCK, "hor_bn.running_mean", "Inf"]),
    "nan-last-bn": (
        _nan("layer2.conv1.last_bn.weight", np.nan),
        ["layer2.conv1", "last_bn.weight", "NaN"],
    ),
    "var-plus-eps-negative": (
        _replace(f"{BLOCK}.ver_bn.running_var", np.full(8, -2e-5, np.float32)),
        [BLOCK, "ver_bn.running_var", "eps"],
    ),
    "negative-var": (
        _replace(f"{BLOCK}.square_bn.running_var", -np.ones(8, np.float32)),
        [BLOCK, "square_bn.running_var", "not positive"],
    ),
    "even-kernel": (_kernels(4, (1, 3), (3, 1)), [BLOCK, "4x4"]),
    "one-by-one": (_kernels(1, (1, 1), (1, 1)), [BLOCK]),
    "oversize-1d": (
        _kernels(3, (1, 5), (3, 1)),
        [BLOCK, "hor_conv.weight", "1x5", "no longer than"],
    ),
    "even-1d": (_kernels(5, (1, 4), (3, 1)), [BLOCK, "1x4", "odd length"]),
    "both-1xk": (_kernels(3, (1, 3), (1, 3)), [BLOCK, "not one 1xk and one kx1"]),
    "conv-channels": (
        _kernels(3, (1, 3), (3, 1), cout=4),
        [BLOCK, "hor_conv.weight", "does not fit"],
    ),
    "in-channels": (
        _replace(f"{BLOCK}.ver_conv.weight", np.ones((8, 4, 3, 1), np.float32)),
        [BLOCK, "ver_conv.weight", "does not fit"],
    ),
    "bn-channels": (
        _replace(f"{BLOCK}.hor_bn.bias", np.ones(4, np.float32)),
        [BLOCK, "hor_bn.bias", "[4]", "expected [8]"],
    ),
    "no-block": (_plain, ["no ACNet block found", "inspect"]),
    "missing-bn-key": (
        _replace(f"{BLOCK}.ver_bn.running_var", None),
        [BLOCK, "ver_bn.running_var", "missing", "inspect"],
    ),
    "missing-1d-conv": (
        _replace(f"{BLOCK}.hor_conv.weight", None),
        [BLOCK, "hor_conv.weight", "missing"],
    ),
    "int-weight": (
        _replace(f"{BLOCK}.square_conv.weight", np.ones((8, 8, 3, 3), np.int32)),
        [BLOCK, "square_conv.weight", "int32", "floating point"],
    ),
    "bool-bn": (
        _replace(f"{BLOCK}.hor_bn.weight", np.ones(8, np.bool_)),
        [BLOCK, "hor_bn.weight", "bool"],
    ),
    "scalar-bn": (
        _replace(f"{BLOCK}.square_bn.running_mean", np.float32(0.5).reshape(())),
        [BLOCK, "square_bn.running_mean", "shape"],
    ),
}


# Problems in the values, found when fuse reads them; the rest are found from the index.
VALUE_CASES = {"nan-weight", "inf-bn", "nan-last-bn", "var-plus-eps-negative", "negative-var"}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_unfusable_blocks(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, case: str, fmt: str
) -> None:
    make, mentions = BLOCK_CASES[case]
    src = save_as(make(), tmp_path / f"{case}{SUFFIX[fmt]}", fmt)
    for out_name in ("fused.safetensors", "fused.pth", "fused.hdf5"):
        assert_refused(
            run_cli,
            ["fuse", src, out_dir / out_name],
            mentions=[str(src), *mentions],
            folder=out_dir,
            inputs=[src],
        )
    # inspect lists the tensors, then reports a shape problem the same way. It reads no
    # values, and a checkpoint without blocks is a fused or plain one: both exit 0.
    if case in VALUE_CASES or case == "no-block":
        run_cli("inspect", src)
    else:
        # ... without sending the user back to inspect (test_rough_edges).
        shown = [m for m in mentions if m != "inspect"]
        line = assert_refused(
            run_cli, ["inspect", src], mentions=[str(src), *shown], folder=out_dir, inputs=[src]
        )
        assert "acnet-convert inspect" not in line


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fused_value_overflowing_its_dtype_is_not_written(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, dtype: type
) -> None:
    """Finite inputs whose fused kernel exceeds the dtype's range are refused, check or not."""
    sd = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in small_state().items()}
    weight = sd[f"{BLOCK}.square_conv.weight"].copy()
    weight[0, 0, 1, 1] = np.finfo(dtype).max / 2
    gamma = sd[f"{BLOCK}.square_bn.weight"].copy()
    gamma[0] = 10
    sd.update({f"{BLOCK}.square_conv.weight": weight, f"{BLOCK}.square_bn.weight": gamma})
    src = save_safetensors(sd, tmp_path / "extreme.safetensors")
    for extra in ([], ["--no-check"]):
        assert_refused(
            run_cli,
            ["fuse", src, out_dir / "fused.safetensors", *extra],
            mentions=[str(src), BLOCK, f"do not fit {np.dtype(dtype).name}", "nothing was written"],
            folder=out_dir,
            inputs=[src],
        )


# --- the output is whole or absent ------------------------------------------------------


OLD = b"the previous output, which must survive\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_conversion_keeps_existing_output(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, fmt: str
) -> None:
    out = out_dir / f"fused{SUFFIX[fmt]}"
    out.write_bytes(OLD)
    src = save_as(BLOCK_CASES["nan-weight"][0](), tmp_path / f"bad{SUFFIX[fmt]}", fmt)
    assert_refused(
        run_cli, ["fuse", "--force", src, out], mentions=[str(src)], folder=out_dir, inputs=[src]
    )
    assert out.read_bytes() == OLD


def test_mismatch_keeps_existing_output(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import acnet_convert.convert as convert

    real = convert.check_block

    def failing(*args: Any, **kwargs: Any) -> Any:
        import dataclasses

        return dataclasses.replace(real(*args, **kwargs), within_rounding=False)

    monkeypatch.setattr(convert, "check_block", failing)
    out = out_dir / "fused.pth"
    out.write_bytes(OLD)
    src = save_safetensors(small_state(), tmp_path / "train.safetensors")
    assert_refused(
        run_cli,
        ["fuse", "--force", src, out],
        mentions=[str(src), "nothing was written"],
        folder=out_dir,
        inputs=[src],
        code=1,
    )
    assert out.read_bytes() == OLD


def _interrupt(monkeypatch: pytest.MonkeyPatch, out_dir: Path, phase: str) -> list[str]:
    """Raise KeyboardInterrupt while ``fuse`` writes ("write": on the third tensor the
    writer asks for) or once the file is written, before its read-back check and rename
    ("read-back"). Returns the temporary files that existed at that moment.
    """
    import acnet_convert.convert as convert
    import acnet_convert.readback as readback

    present: list[str] = []

    def interrupt() -> None:
        present.extend(p.name for p in out_dir.iterdir() if p.name.endswith(".partial"))
        raise KeyboardInterrupt

    if phase == "write":
        real_write = convert.write_checkpoint

        def write(path: Path, fmt: str, tensors: Any, produce: Any, *args: Any, **kw: Any) -> None:
            calls = [0]

            def interrupted(name: str) -> Any:
                calls[0] += 1
                if calls[0] == 3:
                    interrupt()
                return produce(name)

            real_write(path, fmt, tensors, interrupted, *args, **kw)

        monkeypatch.setattr(convert, "write_checkpoint", write)
    else:

        def confirm(*args: Any, **kwargs: Any) -> None:
            interrupt()

        monkeypatch.setattr(readback, "confirm_written", confirm)
    return present


@pytest.mark.parametrize("existing", [True, False], ids=["old-output", "no-output"])
@pytest.mark.parametrize("phase", ["write", "read-back"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_ctrl_c_during_write_leaves_old_output_and_no_temp_file(
    run_cli: CliRun,
    tmp_path: Path,
    out_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    phase: str,
    existing: bool,
) -> None:
    src = save_safetensors(small_state(), tmp_path / "train.safetensors")
    out = out_dir / f"fused{SUFFIX[fmt]}"
    if existing:
        out.write_bytes(OLD)
    present = _interrupt(monkeypatch, out_dir, phase)
    args = ["fuse", *(["--force"] if existing else []), src, out]
    assert_refused(
        run_cli,
        args,
        mentions=["interrupted", "nothing was written"],
        folder=out_dir,
        inputs=[src],
        code=130,
    )
    assert len(present) == 1, "the interrupt did not come while a temporary file existed"
    if existing:
        assert out.read_bytes() == OLD


_SIGTERM_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import acnet_convert.convert as convert
    from acnet_convert.cli import main

    ready = Path(sys.argv[1])
    real_write = convert.write_checkpoint

    def write(path, fmt, tensors, produce, **kwargs):
        calls = [0]

        def slow_produce(name):
            calls[0] += 1
            if calls[0] == 3:
                ready.write_text(str(path))
                time.sleep(60)
            return produce(name)

        real_write(path, fmt, tensors, slow_produce, **kwargs)

    convert.write_checkpoint = write
    main(sys.argv[2:])
    """
)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigterm_during_write_leaves_old_output_and_no_temp_file(
    tmp_path: Path, out_dir: Path, fmt: str
) -> None:
    """A real process, really killed with SIGTERM while it writes its output."""
    src = save_safetensors(small_state(), tmp_path / "train.safetensors")
    out = out_dir / f"fused{SUFFIX[fmt]}"
    out.write_bytes(OLD)
    ready = tmp_path / "ready"
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGTERM_CHILD, str(ready), "fuse", "--force", str(src), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():  # written, not just created
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.02)
        partial = Path(ready.read_text())
        assert partial.parent == out_dir and partial.name.endswith(".partial") and partial.exists()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["error: interrupted; nothing was written"], stderr
    assert _listing(out_dir) == [out.name]
    assert out.read_bytes() == OLD
