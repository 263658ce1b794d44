"""Streaming conversion: raw byte copies, slab-wise fusing, the scratch file, the read-back."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import acb_state, bn_stats, save_safetensors, small_state

import acnet_convert.convert as convert
import acnet_convert.provenance as provenance
import acnet_convert.streaming as streaming
from acnet_convert.checkpoint import RawBytes, TensorInfo, open_checkpoint, rawio, write_checkpoint
from acnet_convert.convert import FuseOptions, fuse_checkpoint, fuse_state, sha256_file
from acnet_convert.errors import BadCheckpointError

FORMATS = ("pth", "hdf5", "safetensors")
SUFFIX = {"pth": ".pth", "hdf5": ".hdf5", "safetensors": ".safetensors"}


def wide_state() -> dict[str, np.ndarray]:
    """Blocks wide enough to be fused in several slabs, and pass-through tensors above and
    below the size from which HDF5 output is copied by the kernel."""
    rng = np.random.default_rng(3)
    sd: dict[str, np.ndarray] = {
        "stem.weight": rng.normal(0, 0.3, (96, 3, 7, 7)).astype(np.float32)
    }
    sd.update(bn_stats(rng, 96, "stem_bn"))
    sd.update(acb_state(rng, "layer1.conv.acb", 96, 96))
    sd["layer1.proj.weight"] = rng.normal(0, 0.3, (192, 96, 1, 1)).astype(np.float32)
    sd.update(acb_state(rng, "layer2.conv", 96, 192, k=5, k1=3, last_bn=True))
    sd["fc.weight"] = rng.normal(0, 0.3, (100, 192)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.3, 100).astype(np.float32)
    return sd


def save(sd: dict[str, np.ndarray], path: Path, fmt: str) -> Path:
    """``sd`` as ``fmt``, written the way that format's ecosystem writes it."""
    if fmt == "safetensors":
        return save_safetensors(sd, path)
    if fmt == "hdf5":
        import h5py

        with h5py.File(path, "w") as f:
            for key, value in sd.items():
                f.create_dataset(key, data=value)
        return path
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_bytes_are_the_tensor_bytes(fmt: str, tmp_path: Path) -> None:
    sd = small_state()
    path = save(sd, tmp_path / f"train{SUFFIX[fmt]}", fmt)
    with open_checkpoint(path) as reader:
        for name in reader.tensors:
            raw = reader.raw(name)
            assert raw is not None, name
            assert rawio.read_range(raw) == np.ascontiguousarray(sd[name]).tobytes(), name


def test_pth_raw_bytes_carry_the_record_crc_and_skip_strided_tensors(tmp_path: Path) -> None:
    import torch

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    path = tmp_path / "views.pth"
    torch.save({"whole": base.clone(), "strided": base.t(), "row": base[1]}, path)
    with open_checkpoint(path) as reader:
        whole = reader.raw("whole")
        assert whole is not None and whole.crc32 is not None
        import zlib

        assert whole.crc32 == zlib.crc32(rawio.read_range(whole))
        assert reader.raw("strided") is None
        row = reader.raw("row")  # a view into a larger storage: no record CRC to reuse
        assert row is not None and row.crc32 is None
        assert np.array_equal(np.frombuffer(rawio.read_range(row), np.float32), base[1].numpy())
        assert np.array_equal(reader.read("strided"), base.t().numpy())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kernel_copy", [True, False])
def test_writers_copy_raw_bytes(
    fmt: str, kernel_copy: bool, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(rawio, "_kernel_copy", kernel_copy)
    if not kernel_copy:  # and as without pread/preadv/pwrite (Windows)
        monkeypatch.setattr(rawio, "_HAVE_PREADV", False)
        monkeypatch.setattr(rawio, "_pread", rawio._seek_read)
        monkeypatch.setattr(rawio, "_pwrite", rawio._seek_write)
    sd = wide_state()
    source = save(sd, tmp_path / "train.safetensors", "safetensors")
    out = tmp_path / f"copy{SUFFIX[fmt]}"
    with open_checkpoint(source) as reader:
        infos = list(reader.tensors.values())

        def produce(name: str) -> np.ndarray | RawBytes:
            raw = reader.raw(name)
            return raw if raw is not None else reader.read(name)

        write_checkpoint(out, fmt, infos, produce, container=reader.container, metadata={"k": "v"})
    with open_checkpoint(out) as written:
        # HDF5 lists datasets by name; the others keep the writing order.
        assert list(written.tensors) == [i.name for i in infos] or fmt == "hdf5"
        for name, value in sd.items():
            assert written.read(name).tobytes() == value.tobytes(), name
    if fmt == "pth":
        with zipfile.ZipFile(out) as zf:
            assert zf.testzip() is None  # every record's CRC matches its bytes


def test_pth_to_pth_reuses_the_source_crc(tmp_path: Path, monkeypatch: Any) -> None:
    source = save(small_state(), tmp_path / "train.pth", "pth")
    computed: list[RawBytes] = []
    real = rawio.crc32_range

    def counting(raw: RawBytes) -> int:
        computed.append(raw)
        return real(raw)

    import acnet_convert.checkpoint.pth.zipfmt as zipfmt

    monkeypatch.setattr(zipfmt, "crc32_range", counting)
    out = tmp_path / "fused.pth"
    fuse_checkpoint(source, out, "pth")
    with open_checkpoint(source) as reader:
        plan = convert.plan_fusion(reader, FuseOptions())
    # Only the fused tensors, copied from the scratch file, need a CRC computed.
    assert len(computed) == sum(len(b.outputs) for b in plan.blocks) == 4
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming_output_equals_the_in_memory_result(
    fmt: str, tmp_path: Path, monkeypatch: Any
) -> None:
    # Tiny slabs: every block is fused in many pieces, which must change nothing.
    monkeypatch.setattr(streaming, "_SLAB_BYTES", 4096)
    source = save(wide_state(), tmp_path / f"train{SUFFIX[fmt]}", fmt)
    out = tmp_path / f"fused{SUFFIX[fmt]}"
    report = fuse_checkpoint(source, out, fmt)
    assert all(b.passed for b in report.blocks)
    assert report.source_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setattr(streaming, "_SLAB_BYTES", 1 << 30)
    with open_checkpoint(source) as reader:
        whole = fuse_state(reader)
    with open_checkpoint(out) as written:
        assert set(written.tensors) == set(whole.tensors)
        for name, value in whole.tensors.items():
            assert written.read(name).tobytes() == np.ascontiguousarray(value).tobytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, out.name])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tensor_damaged_on_the_way_is_caught(fmt: str, tmp_path: Path, monkeypatch: Any) -> None:
    source = save(wide_state(), tmp_path / "train.safetensors", "safetensors")
    real = rawio.copy_range

    def damaging(raw: RawBytes, out_fd: int, out_offset: int) -> None:
        real(raw, out_fd, out_offset)
        rawio.write_range(out_fd, b"\xff\xff", out_offset + raw.length // 2)

    import acnet_convert.checkpoint.hdf5_io as hdf5_io
    import acnet_convert.checkpoint.pth.zipfmt as zipfmt
    import acnet_convert.checkpoint.safetensors_io as safetensors_io

    for module in (hdf5_io, zipfmt, safetensors_io):
        monkeypatch.setattr(module, "copy_range", damaging)
    out = tmp_path / f"fused{SUFFIX[fmt]}"
    with pytest.raises(BadCheckpointError, match=r"did not land intact|fails its CRC-32 check"):
        fuse_checkpoint(source, out, fmt)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [source.name]


@pytest.mark.parametrize("src_fmt", ["pth", "hdf5"])
def test_a_record_damaged_between_zip_files_is_caught(
    src_fmt: str, tmp_path: Path, monkeypatch: Any
) -> None:
    # .pth to .pth: both records carry a CRC-32, which read-back compares instead of the
    # bytes; only such pass-through copies are damaged here (fused tensors carry none)
    source = save(wide_state(), tmp_path / f"train{SUFFIX[src_fmt]}", src_fmt)
    real = rawio.copy_range
    damaged: list[int] = []

    def damaging(raw: RawBytes, out_fd: int, out_offset: int) -> None:
        real(raw, out_fd, out_offset)
        if raw.crc32 is not None or src_fmt != "pth":
            damaged.append(raw.length)
            rawio.write_range(out_fd, b"\xff\xff", out_offset + raw.length // 2)

    import acnet_convert.checkpoint.pth.zipfmt as zipfmt

    monkeypatch.setattr(zipfmt, "copy_range", damaging)
    out = tmp_path / "fused.pth"
    with pytest.raises(BadCheckpointError, match=r"did not land intact|fails its CRC-32 check"):
        fuse_checkpoint(source, out, "pth")
    assert damaged
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [source.name]


def test_copy_range_reports_a_short_source(tmp_path: Path) -> None:
    import os

    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    out = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(BadCheckpointError, match="truncated"):
            rawio.copy_range(RawBytes(fd, 50, 100), out, 0)
        assert rawio.same_bytes(RawBytes(fd, 0, 10), RawBytes(fd, 10, 10))
        assert not rawio.same_bytes(RawBytes(fd, 0, 10), RawBytes(fd, 0, 11))
    finally:
        os.close(fd)
        os.close(out)


def test_background_digest_matches_and_can_be_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    digest = provenance.BackgroundDigest(path)
    assert digest.hexdigest() == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    stopped = provenance.BackgroundDigest(path)
    stopped.cancel()
    missing = provenance.BackgroundDigest(tmp_path / "gone.bin")
    with pytest.raises(BadCheckpointError, match=r"gone\.bin"):
        missing.hexdigest()


def test_raw_bytes_of_an_hdf5_dataset_that_is_not_plain(tmp_path: Path) -> None:
    import h5py

    path = tmp_path / "odd.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("chunked", data=np.ones((64, 64), np.float32), chunks=(8, 8))
        f.create_dataset("big_endian", data=np.arange(10, dtype=">f4"))
        f.create_dataset("unwritten", shape=(4,), dtype="<f4")
        f.create_dataset("plain", data=np.arange(10, dtype="<f4"))
    with open_checkpoint(path) as reader:
        assert reader.raw("chunked") is None
        assert reader.raw("big_endian") is None
        assert reader.raw("unwritten") is None
        plain = reader.raw("plain")
        assert plain is not None
        assert rawio.read_range(plain) == np.arange(10, dtype="<f4").tobytes()


def test_raw_bytes_must_match_the_tensor_size(tmp_path: Path) -> None:
    source = save(small_state(), tmp_path / "train.safetensors", "safetensors")
    with open_checkpoint(source) as reader:
        info = reader.tensors["fc.weight"]
        raw = reader.raw("fc.bias")
        assert raw is not None
        for fmt in FORMATS:
            with pytest.raises(ValueError, match="raw bytes"):
                write_checkpoint(
                    tmp_path / f"bad{SUFFIX[fmt]}",
                    fmt,
                    [TensorInfo("fc.weight", info.dtype, info.shape)],
                    lambda name, raw=raw: raw,
                    container=reader.container,
                    metadata={},
                )
