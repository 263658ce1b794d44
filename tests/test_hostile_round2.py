"""Hostile inputs and faults, round 2: links out of the file, allocations beyond the file,
walks that explode, corruption passed on, inputs that never end or change underneath.

Every refusal is one line on stderr, exit 3, and no output (the helpers of
test_hostile check all of it).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import CliRun, small_state
from test_hostile import _peak_bytes, assert_refused, save_as

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process (for inputs that could hang or kill the process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "acnet_convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _torch_save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _state() -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in small_state().items()}


def _rezip(src: Path, dst: Path, edit: Callable[[str, bytes], tuple[bytes, int]]) -> Path:
    """Copy a torch.save zip record by record; ``edit(name, data)`` gives new data and method."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, method = edit(info.filename, zin.read(info))
            zout.writestr(zipfile.ZipInfo(info.filename), data, compress_type=method)
    return dst


_MARKER = "SPLICE-HERE-0123456789"


def _spliced(tmp_path: Path, opcodes: bytes, name: str = "bomb.pth") -> Path:
    """A real training checkpoint whose extra entry 'x' is replaced by raw pickle opcodes."""
    src = _torch_save({"model": _state(), "x": _MARKER}, tmp_path / "src.pth")
    raw = _MARKER.encode()
    marker = b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE

    def edit(member: str, data: bytes) -> tuple[bytes, int]:
        if member.endswith("/data.pkl"):
            assert data.count(marker) == 1
            data = data.replace(marker, opcodes)
        return data, zipfile.ZIP_STORED

    out = _rezip(src, tmp_path / name, edit)
    src.unlink()
    return out


def _put(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)  # LONG_BINPUT


def _get(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)  # LONG_BINGET


def _shared_lists(levels: int, base: int = 100_000) -> bytes:
    """Opcodes for L[n] with L[0] = [] and L[i] = [L[i-1]] * 8: 9 bytes per level."""
    out = b"]" + _put(base)
    for i in range(1, levels + 1):
        out += b"0](" + _get(base + i - 1) * 8 + b"e" + _put(base + i)  # POP the previous
    return out


def _shared_tuples(levels: int, base: int = 200_000) -> bytes:
    """T[0] = 'a', T[i] = (T[i-1], T[i-1]): hashing T[n] walks 2**n leaves."""
    out = b"X\x01\x00\x00\x00a" + _put(base)
    for i in range(1, levels + 1):
        out += b"0" + _get(base + i - 1) * 2 + b"\x86" + _put(base + i)  # POP, TUPLE2
    return out + b"0"  # leaves nothing: the caller gets T[n] from the memo


# --- links out of the file ---------------------------------------------------


def _keras_with_external_layer(tmp_path: Path, target: Path) -> Path:
    path = tmp_path / "keras.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"conv1_sqr", b"evil"])
        g = f.create_group("conv1_sqr")
        g.attrs["weight_names"] = np.array([b"conv1_sqr/kernel:0"])
        g.create_dataset("conv1_sqr/kernel:0", data=rng.normal(size=(3, 3, 2, 2)).astype("f4"))
        f["evil"] = h5py.ExternalLink(str(target), "/")
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_keras_layer_name_through_an_external_link_to_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    src = _keras_with_external_layer(tmp_path, fifo)
    for args in (["fuse", src, tmp_path / "out.h5"], ["inspect", src]):
        done = _cli(*args, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 3, done.stderr
        assert len(lines) == 1 and "ExternalLink" in lines[0] and "evil" in lines[0], lines
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("reader", ["Keras3Reader", "PdparamsReader"])
def test_every_reader_refuses_a_fifo_given_to_it_directly(tmp_path: Path, reader: str) -> None:
    # readers are public: built without sniffing first, they must not block on a FIFO
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    module = "keras3" if reader == "Keras3Reader" else "pdparams"
    code = (
        f"from acnet_convert.checkpoint.{module} import {reader}\n"
        "from acnet_convert.errors import BadCheckpointError\n"
        "try:\n"
        f"    {reader}(__import__('pathlib').Path({str(fifo)!r}))\n"
        "except BadCheckpointError as err:\n"
        "    print('refused:', err)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.stdout.startswith("refused:") and "regular file" in done.stdout, done


def test_keras_layer_name_through_a_soft_link(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    src = _keras_with_external_layer(tmp_path, tmp_path / "nothing.h5")
    with h5py.File(src, "a") as f:
        del f["evil"]
        f["evil"] = h5py.SoftLink("/conv1_sqr")
    assert_refused(
        run_cli,
        ["fuse", src, out_dir / "o.h5"],
        mentions=["SoftLink", "evil"],
        folder=out_dir,
        inputs=[src],
    )


# --- inputs that never end or change underneath ------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_input_is_refused_up_front(tmp_path: Path) -> None:
    fifo = tmp_path / "in.pth"
    os.mkfifo(fifo)
    for args in (["fuse", fifo, tmp_path / "o.pth"], ["inspect", fifo], ["verify", fifo, fifo]):
        done = _cli(*args, timeout=60)
        assert done.returncode == 3, (args, done.stderr)
        assert "FIFO" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_device_input_is_refused(run_cli: CliRun, tmp_path: Path, out_dir: Path) -> None:
    assert_refused(
        run_cli, ["inspect", "/dev/zero"], mentions=["/dev/zero", "device"], folder=out_dir
    )


def test_readers_refuse_non_regular_files_themselves(tmp_path: Path) -> None:
    from acnet_convert.checkpoint.hdf5_io import Hdf5Reader
    from acnet_convert.checkpoint.pth import PthReader
    from acnet_convert.checkpoint.safetensors_io import SafetensorsReader
    from acnet_convert.errors import BadCheckpointError

    for reader in (PthReader, SafetensorsReader, Hdf5Reader):
        with pytest.raises(BadCheckpointError, match="directory"):
            reader(tmp_path)


def test_safetensors_truncated_while_open_is_a_clear_error(tmp_path: Path) -> None:
    src = save_as(small_state(), tmp_path / "m.safetensors", "safetensors")
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from acnet_convert.checkpoint.safetensors_io import SafetensorsReader
        from acnet_convert.errors import BadCheckpointError
        reader = SafetensorsReader(Path({str(src)!r}))
        os.truncate({str(src)!r}, 200)
        try:
            for name in reader.tensors:
                reader.read(name)
        except BadCheckpointError as err:
            print("refused:", err)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr)  # -7 was SIGBUS
    assert "refused:" in done.stdout and "truncated" in done.stdout


# --- memory bounded by what the file holds -----------------------------------


def test_deflated_data_pkl_bomb_is_refused_cheaply(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    src = _torch_save(_state(), tmp_path / "src.pth")

    def edit(member: str, data: bytes) -> tuple[bytes, int]:
        if member.endswith("/data.pkl"):
            return data + b"\0" * (300 * 2**20), zipfile.ZIP_DEFLATED  # ignored after STOP
        return data, zipfile.ZIP_STORED

    bomb = _rezip(src, tmp_path / "bomb.pth", edit)
    assert bomb.stat().st_size < 2 * 2**20
    for command in (["fuse", bomb, out_dir / "o.pth"], ["inspect", bomb]):
        peak = _peak_bytes(
            lambda c=command: assert_refused(  # type: ignore[misc]
                run_cli, c, mentions=[str(bomb), "data.pkl", "inflates"], folder=out_dir
            )
        )
        assert peak < 64 * 2**20, peak


def test_deflated_data_pkl_within_bounds_still_reads(tmp_path: Path) -> None:
    from acnet_convert.checkpoint.pth import PthReader

    src = _torch_save(_state(), tmp_path / "src.pth")

    def edit(member: str, data: bytes) -> tuple[bytes, int]:
        method = zipfile.ZIP_DEFLATED if member.endswith("/data.pkl") else zipfile.ZIP_STORED
        return data, method

    squeezed = _rezip(src, tmp_path / "deflated.pth", edit)
    with PthReader(squeezed) as reader:
        assert set(reader.tensors) == set(_state())


def test_bytearray_of_a_huge_size_is_refused(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    # bytearray(2**31 - 1): 26 bytes of pickle asking for 2 GiB.
    opcodes = b"c__builtin__\nbytearray\n(J\xff\xff\xff\x7ftR"
    bomb = _spliced(tmp_path, opcodes)
    peak = _peak_bytes(
        lambda: assert_refused(
            run_cli,
            ["fuse", bomb, out_dir / "o.pth"],
            mentions=[str(bomb), "bytearray"],
            folder=out_dir,
            inputs=[bomb],
        )
    )
    assert peak < 64 * 2**20, peak


def test_bytearray_from_bytes_still_loads(tmp_path: Path) -> None:
    from acnet_convert.checkpoint.pth import PthReader

    src = _torch_save({"model": _state(), "blob": bytearray(b"abc")}, tmp_path / "ok.pth")
    with PthReader(src) as reader:
        assert len(reader.tensors) == len(_state())


def test_stride_zero_tensor_is_refused_not_expanded(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    sd = _state()
    sd["stem.weight"] = torch.zeros(1).expand(2**28)  # 4 bytes of storage, 1 GiB expanded
    src = _torch_save(sd, tmp_path / "expanded.pth")
    assert src.stat().st_size < 64 * 2**10
    for command in (["fuse", src, out_dir / "o.pth"], ["inspect", src]):
        peak = _peak_bytes(
            lambda c=command: assert_refused(  # type: ignore[misc]
                run_cli,
                c,
                mentions=[str(src), "'stem.weight'", "expand", ".contiguous()"],
                folder=out_dir,
                inputs=[src],
            )
        )
        assert peak < 64 * 2**20, peak


# --- walks over untrusted structure are linear -------------------------------


def test_shared_reference_bomb_in_an_extra_finishes_fast(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    bomb = _spliced(tmp_path, _shared_lists(24))  # 8**24 leaves, nested less than 32 deep
    started = time.perf_counter()
    out = out_dir / "o.pth"
    run_cli("fuse", bomb, out)
    run_cli("inspect", bomb)
    assert time.perf_counter() - started < 30
    loaded = torch.load(out, weights_only=True)
    assert "x" not in loaded  # not plain data once expanded: dropped


def test_shared_reference_bomb_as_persistent_id_is_refused_fast(
    run_cli: CliRun, tmp_path: Path, out_dir: Path
) -> None:
    bomb = _spliced(tmp_path, _shared_lists(40) + b"Q")  # BINPERSID
    started = time.perf_counter()
    assert_refused(
        run_cli,
        ["fuse", bomb, out_dir / "o.pth"],
        mentions=[str(bomb), "not a tensor storage"],
        folder=out_dir,
        inputs=[bomb],
    )
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize(
    "container",
    [
        b"}" + b"_KEY_" + b"K\x01s",  # {key: 1}, SETITEM
        b"}(" + b"_KEY_" + b"K\x01u",  # SETITEMS
        b"c__builtin__\nfrozenset\n(](_KEY_etR",  # frozenset([key])
    ],
    ids=["setitem", "setitems", "frozenset"],
)
def test_hash_bomb_as_dict_key_is_refused_fast(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, container: bytes
) -> None:
    opcodes = _shared_tuples(80) + container.replace(b"_KEY_", _get(200_080))
    bomb = _spliced(tmp_path, opcodes)
    started = time.perf_counter()
    assert_refused(
        run_cli,
        ["fuse", bomb, out_dir / "o.pth"],
        mentions=[str(bomb), "tuple nested too large"],
        folder=out_dir,
        inputs=[bomb],
    )
    assert time.perf_counter() - started < 30


def test_plain_data_check_is_linear_and_bounded() -> None:
    from acnet_convert.checkpoint.containers import is_plain_data

    shared: Any = [1]
    for _ in range(20):
        shared = [shared] * 4
    started = time.perf_counter()
    assert not is_plain_data(shared)  # 4**20 nodes expanded, 20 deep
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert not is_plain_data(cyclic)
    leaf = [1, 2.5, "x", None]
    assert is_plain_data({"a": [leaf] * 1000, "b": (leaf, leaf)})  # shared, but small expanded
    assert time.perf_counter() - started < 1


# --- corruption is not passed on ---------------------------------------------


def _corrupt_tensor_bytes(src: Path, dst: Path, record_suffix: str) -> Path:
    """Flip one byte inside a stored record's data, leaving the zip directory as it was."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(record_suffix))
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("to", ["pth", "safetensors"])
def test_zip_crc_is_checked_and_never_copied_stale(
    run_cli: CliRun, tmp_path: Path, out_dir: Path, to: str
) -> None:
    sd = _state()
    src = _torch_save(sd, tmp_path / "src.pth")
    # Record 0 is 'stem.weight', a tensor copied through unchanged.
    assert next(iter(sd)) == "stem.weight"
    bad = _corrupt_tensor_bytes(src, tmp_path / "bad.pth", "/data/0")
    assert_refused(
        run_cli,
        ["fuse", bad, out_dir / f"o.{to}"],
        mentions=[str(bad), "CRC-32"],
        folder=out_dir,
        inputs=[bad],
    )


def test_fused_output_zip_passes_its_own_crc_check(run_cli: CliRun, tmp_path: Path) -> None:
    src = _torch_save({"model": _state(), "epoch": 3}, tmp_path / "src.pth")
    out = tmp_path / "o.pth"
    run_cli("fuse", src, out)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
