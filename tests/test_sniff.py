"""sniff_format: formats by content, and clear refusals for everything else."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch

from acnet_convert.checkpoint import sniff
from acnet_convert.checkpoint.sniff import extension_note, sniff_format
from acnet_convert.errors import BadCheckpointError


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(BadCheckpointError) as info:
        sniff_format(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_torch_zip(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(2)}, path)
    assert sniff_format(path) == "pth-zip"


def test_torch_legacy(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert sniff_format(path) == "pth-legacy"


def test_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "model.hdf5"
    with h5py.File(path, "w") as handle:
        handle["w"] = np.ones(2)
    assert sniff_format(path) == "hdf5"


@pytest.mark.parametrize("userblock", [512, 2048])
def test_hdf5_after_a_user_block(tmp_path: Path, userblock: int) -> None:
    path = tmp_path / "model.h5"
    with h5py.File(path, "w", userblock_size=userblock) as handle:
        handle["w"] = np.ones(2)
    assert sniff_format(path) == "hdf5"


@pytest.mark.parametrize("name_length", [1, 100, 120])
def test_safetensors(tmp_path: Path, name_length: int) -> None:
    # Some header lengths start with 0x80, the pickle PROTO byte; still safetensors.
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w" * name_length: torch.ones(2)}, path)
    assert sniff_format(path) == "safetensors"


def test_header_length_0x80_is_safetensors_not_pickle(tmp_path: Path) -> None:
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    header += b" " * (128 - len(header))
    path = tmp_path / "x.bin"
    path.write_bytes((128).to_bytes(8, "little") + header + b"\0" * 4)
    assert path.read_bytes()[0] == 0x80
    assert sniff_format(path) == "safetensors"


def test_extension_is_only_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "weights.pth"
    with h5py.File(path, "w") as handle:
        handle["w"] = np.ones(2)
    with caplog.at_level(logging.INFO, logger="acnet_convert.checkpoint.sniff"):
        assert sniff_format(path) == "hdf5"
    assert "has extension .pth but holds HDF5 data" in caplog.text
    assert extension_note(path, "hdf5") == f"{path}: has extension .pth but holds HDF5 data"
    assert extension_note(tmp_path / "x.h5", "hdf5") is None
    assert extension_note(tmp_path / "x.weird", "hdf5") is None


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    _refused(path, "empty")


def test_directory(tmp_path: Path) -> None:
    _refused(tmp_path, "directory")


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.pth", "does not exist")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.pth"
    path.write_bytes(b"PK\x03\x04")
    path.chmod(0)
    try:
        _refused(path, "permission denied")
    finally:
        path.chmod(0o600)


def test_permission_denied_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.pth"
    path.write_bytes(b"PK\x03\x04")

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sniff, "open_regular", deny)
    _refused(path, "permission denied")


@pytest.mark.parametrize(
    "content",
    [b"hello world, not a checkpoint", b"\x80\x01x", b"{}", b"\x03\0\0\0\0\0\0\0{}", b"\0" * 600],
    ids=["text", "pickle-proto-1", "bare-json", "header-without-room", "zeros"],
)
def test_unknown_content_lists_the_formats(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "mystery.pth"
    path.write_bytes(content)
    _refused(path, "not recognised", "safetensors", "HDF5", "PyTorch", ".pth")


def test_random_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.bin"
    for _ in range(50):
        data = rng.bytes(int(rng.integers(1, 2048)))
        path.write_bytes(data)
        try:
            kind = sniff_format(path)
        except BadCheckpointError as err:
            assert str(path) in str(err)
        else:
            assert kind in ("pth-zip", "pth-legacy", "hdf5", "safetensors")


def test_git_lfs_pointer(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    _refused(path, "git lfs pull")
