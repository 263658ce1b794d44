"""PthReader and write_pth against torch.save/torch.load, bit for bit."""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import acnet_convert.checkpoint.pth as pth
from acnet_convert.checkpoint.base import Container, TensorInfo
from acnet_convert.checkpoint.pth import PthReader, write_pth
from acnet_convert.errors import BadCheckpointError, UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[1]

ALL_DTYPES = [
    torch.float16,
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]
# Older dtypes: what torch's legacy (non-zip) format can round-trip.
CLASSIC_DTYPES = ALL_DTYPES[:10]
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
        return t.to(dtype)
    low = 0 if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else -100
    return torch.randint(low, 200, shape, generator=gen, dtype=torch.int64).to(dtype)


def _bits(t: torch.Tensor) -> bytes:
    """Raw element bytes of a tensor in C order (exact, NaN-safe)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8).numpy().tobytes()
    return t.view(_SIGNED[t.element_size()]).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal on same-size integer views, so NaNs and -0.0 compare by bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().contiguous(), b.detach().contiguous()
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    signed = _SIGNED[a.element_size()]
    return torch.equal(a.view(signed), b.view(signed))


def _assert_matches(reader: PthReader, expected: dict[str, torch.Tensor]) -> None:
    assert list(reader.tensors) == list(expected)
    for name, t in expected.items():
        info = reader.tensors[name]
        assert info.dtype == _name(t.dtype)
        assert info.shape == tuple(t.shape)
        arr = reader.read(name)
        assert arr.flags.c_contiguous
        assert arr.shape == tuple(t.shape)
        assert arr.dtype.itemsize == t.element_size()
        assert arr.tobytes() == _bits(t), name


def _views(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    base = _random((2, 3, 4, 5), dtype)
    if dtype.is_floating_point:
        base.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)
    return {
        "conv.weight": base,
        "transposed": base.permute(3, 1, 0, 2),
        "sliced": base[1:, :, 1:3, ::2],
        "scalar": _random((), dtype, seed=1),
        "empty": _random((0, 3), dtype),
        "empty4d": _random((2, 0, 3, 3), dtype),
        "expanded": _random((3, 1), dtype, seed=2).expand(3, 4),
        "row": base[1, 2, 3],
    }


# --- reading -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_name)
def test_reads_every_dtype_and_view_like_torch(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "views.pth"
    torch.save(_views(dtype), path)
    expected = torch.load(path, weights_only=True)
    with PthReader(path) as reader:
        assert reader.format == "pth"
        _assert_matches(reader, expected)


def test_shared_storage_is_read_once_per_view(tmp_path: Path) -> None:
    whole = torch.arange(24, dtype=torch.float32)
    sd = {"a": whole, "b": whole[3:11].view(2, 4), "c": whole.view(4, 6).t(), "d": whole[5]}
    path = tmp_path / "shared.pth"
    torch.save(sd, path)
    storages = [n for n in zipfile.ZipFile(path).namelist() if "/data/" in n]
    assert len(storages) == 1
    with PthReader(path) as reader:
        _assert_matches(reader, torch.load(path, weights_only=True))


def test_reads_module_state_dict_and_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "net.pth"
    torch.save(net.state_dict(), path)
    with PthReader(path) as reader:
        _assert_matches(reader, torch.load(path, weights_only=True))
    params = {
        "w": torch.nn.Parameter(torch.randn(2, 3, generator=torch.Generator().manual_seed(7))),
        "b": torch.nn.Parameter(torch.zeros(2)),
    }
    torch.save(params, path)
    with PthReader(path) as reader:
        _assert_matches(reader, {k: v.detach() for k, v in params.items()})


def _sd(prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        f"{prefix}stem.square_conv.weight": _random((4, 3, 3, 3), torch.float32),
        f"{prefix}stem.square_bn.running_var": _random((4,), torch.float32).abs(),
        f"{prefix}stem.square_bn.num_batches_tracked": torch.tensor(7),
    }


CONTAINERS: dict[str, tuple[Callable[[], Any], Container]] = {
    "raw": (lambda: _sd(), Container()),
    "model": (
        lambda: {"model": _sd(), "iteration": 5},
        Container("model", "", {"iteration": 5}, (), ("model", "iteration")),
    ),
    "state_dict+optimizer": (
        lambda: {
            "epoch": 3,
            "state_dict": _sd(),
            "optimizer": {
                "state": {0: {"momentum_buffer": torch.ones(4, 3, 3, 3)}},
                "param_groups": [{"lr": 0.1, "params": [0]}],
            },
            "best_acc": 0.5,
        },
        Container(
            "state_dict",
            "",
            {"epoch": 3, "best_acc": 0.5},
            ("optimizer",),
            ("epoch", "state_dict", "optimizer", "best_acc"),
        ),
    ),
    "module.": (lambda: OrderedDict(_sd("module.")), Container(prefix="module.")),
    "model+module._orig_mod.": (
        lambda: {"model": _sd("module._orig_mod."), "args": {"arch": "sres18", "lr": [0.1, 0.01]}},
        Container(
            "model",
            "module._orig_mod.",
            {"args": {"arch": "sres18", "lr": [0.1, 0.01]}},
            (),
            ("model", "args"),
        ),
    ),
}


@pytest.mark.parametrize("case", list(CONTAINERS))
def test_unwraps_containers(tmp_path: Path, case: str) -> None:
    make, expected = CONTAINERS[case]
    path = tmp_path / "ckpt.pth"
    torch.save(make(), path)
    with PthReader(path) as reader:
        assert reader.container == expected
        _assert_matches(reader, _sd())


def test_legacy_format_loads_through_torch(tmp_path: Path) -> None:
    sd: dict[str, torch.Tensor] = {}
    for dtype in CLASSIC_DTYPES:
        for name, t in _views(dtype).items():
            sd[f"{_name(dtype)}.{name}"] = t
    path = tmp_path / "legacy.pth"
    torch.save({"model": sd, "iteration": 9}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    with PthReader(path) as reader:
        assert reader.container.wrapper_key == "model"
        assert reader.container.extras == {"iteration": 9}
        _assert_matches(reader, torch.load(path, weights_only=True)["model"])


def test_reads_big_endian_storages(tmp_path: Path) -> None:
    sd = {"w": _random((3, 4), torch.float32), "h": _random((5,), torch.bfloat16)}
    src, dst = tmp_path / "little.pth", tmp_path / "big.pth"
    torch.save(sd, src)
    sizes = {f"little/data/{i}": t.element_size() for i, t in enumerate(sd.values())}

    def swap(name: str, data: bytes) -> bytes:
        if name.endswith("/byteorder"):
            return b"big"
        if name in sizes:
            arr = np.frombuffer(data, dtype=f"<u{sizes[name]}")
            return arr.astype(f">u{sizes[name]}").tobytes()
        return data

    _rewrite(src, dst, swap)
    with PthReader(dst) as reader:
        _assert_matches(reader, sd)


def test_arrays_outlive_close(tmp_path: Path) -> None:
    path = tmp_path / "a.pth"
    torch.save({"w": torch.arange(6.0)}, path)
    reader = PthReader(path)
    arr = reader.read("w")
    reader.close()
    reader.close()  # twice is harmless
    assert arr.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="closed"):
        reader.read("w")
    with pytest.raises(KeyError, match="nope"):
        reader.read("nope")


# --- writing -----------------------------------------------------------------


def _write_from(tmp_path: Path, obj: Any, name: str = "out.pth") -> tuple[PthReader, Path]:
    src = tmp_path / "src.pth"
    torch.save(obj, src)
    reader = PthReader(src)
    out = tmp_path / name
    write_pth(out, list(reader.tensors.values()), reader.read, reader.container)
    return reader, out


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_name)
def test_write_round_trips_through_torch_load(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = _views(dtype)
    reader, out = _write_from(tmp_path, sd)
    reader.close()
    for weights_only, mmap in ((True, False), (False, False), (True, True)):
        loaded = torch.load(out, weights_only=weights_only, mmap=mmap)
        assert isinstance(loaded, OrderedDict)
        assert list(loaded) == list(sd)
        for key, t in sd.items():
            assert _same(loaded[key], t.contiguous()), key
            assert loaded[key].is_contiguous()
    with PthReader(out) as again:
        _assert_matches(again, sd)


@pytest.mark.parametrize("case", list(CONTAINERS))
def test_write_keeps_the_container(tmp_path: Path, case: str) -> None:
    make, expected = CONTAINERS[case]
    original = make()
    reader, out = _write_from(tmp_path, original)
    reader.close()
    loaded = torch.load(out, weights_only=True)
    if expected.wrapper_key is None:
        state = loaded
    else:
        kept = [k for k in original if k not in expected.dropped]
        assert list(loaded) == kept
        for key in kept:
            if key != expected.wrapper_key:
                assert loaded[key] == original[key]
        state = loaded[expected.wrapper_key]
        original = original[expected.wrapper_key]
    assert isinstance(state, OrderedDict)
    assert list(state) == list(original)
    for key, t in original.items():
        assert _same(state[key], t), key
    with PthReader(out) as again:
        assert again.container == Container(
            expected.wrapper_key,
            expected.prefix,
            expected.extras,
            (),
            tuple(k for k in expected.keys_order if k not in expected.dropped),
        )


def test_write_plain_extras_of_every_kind(tmp_path: Path) -> None:
    extras = {
        "none": None,
        "flags": [True, False],
        "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31, 2**63, -(2**64) - 3, 10**100],
        "floats": (0.5, -1e300, float("inf")),
        "text": "ümlaut \u2603",
        "nested": {"a": [{"b": ()}], "c": ((1, 2), [])},
        "empty": {},
    }
    info = TensorInfo("w", "float32", (2,))
    out = tmp_path / "extras.pth"
    write_pth(
        out,
        [info],
        lambda _: np.array([1.0, 2.0], dtype=np.float32),
        Container("model", "", extras, (), ("model", *extras)),
    )
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["model", *extras]
    for key, value in extras.items():
        assert loaded[key] == value
    assert loaded["model"]["w"].tolist() == [1.0, 2.0]


def test_write_streams_in_order_and_aligns_storages(tmp_path: Path) -> None:
    infos = [TensorInfo(f"t{i}", "float32", (i + 1, 3)) for i in range(5)]
    infos.append(TensorInfo("flags", "bool", (7,)))
    calls: list[str] = []

    def produce(name: str) -> np.ndarray:
        calls.append(name)
        info = next(i for i in infos if i.name == name)
        return np.ones(info.shape, dtype=np.bool_ if info.dtype == "bool" else np.float32)

    out = tmp_path / "stream.pth"
    write_pth(out, infos, produce, Container())
    assert calls == [i.name for i in infos]
    raw = out.read_bytes()
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
        for member in zf.infolist():
            assert member.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack_from("<HH", raw, member.header_offset + 26)
            assert (member.header_offset + 30 + name_len + extra_len) % 64 == 0
    loaded = torch.load(out, weights_only=True)
    assert [tuple(t.shape) for t in loaded.values()] == [i.shape for i in infos]


def test_write_zip64_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pth.zipfmt, "_ZIP64_LIMIT", 1)  # every size and offset takes the zip64 path
    sd = {"a": _random((3, 5), torch.float32), "b": _random((4,), torch.bfloat16)}
    reader, out = _write_from(tmp_path, {"model": sd, "epoch": 1})
    reader.close()
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    loaded = torch.load(out, weights_only=True)
    assert all(_same(loaded["model"][k], v) for k, v in sd.items())
    with PthReader(out) as again:
        _assert_matches(again, sd)


def test_write_rejects_wrong_arrays_and_extras(tmp_path: Path) -> None:
    info = TensorInfo("w", "float32", (2, 2))
    out = tmp_path / "bad.pth"
    with pytest.raises(ValueError, match=r"'w'.*shape"):
        write_pth(out, [info], lambda _: np.zeros((4,), np.float32), Container())
    with pytest.raises(TypeError, match=r"'w'.*float64"):
        write_pth(out, [info], lambda _: np.zeros((2, 2)), Container())
    with pytest.raises(ValueError, match="twice"):
        write_pth(out, [info, info], lambda _: np.zeros((2, 2), np.float32), Container())
    with pytest.raises(TypeError, match=r"'meta\.when'"):
        write_pth(
            out,
            [info],
            lambda _: np.zeros((2, 2), np.float32),
            Container("model", "", {"meta": {"when": b"bytes"}}, (), ("model", "meta")),
        )


# --- refusing code in pickles ------------------------------------------------


class _Marker:
    """Pickles to a call that would create ``path``."""

    def __init__(self, path: Path, via: str) -> None:
        self.path = path
        self.via = via

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        if self.via == "system":
            return os.system, (f"touch '{self.path}'",)
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


def _zip(path: Path, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refuses_code_in_torch_save_pickle(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": torch.ones(2)}, "hook": _Marker(marker, "system")}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as caught:
        PthReader(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"{os.system.__module__}.system" in message
    assert "--trust-pickle" in message and "run code" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ("exec", "builtins.exec"),
        ("torch.load", "torch.load"),
        ("rebuild", "torch._utils._rebuild_tensor"),
    ],
)
def test_refuses_hand_built_pickles(tmp_path: Path, payload: str, named: str) -> None:
    marker = tmp_path / "pwned"
    if payload == "exec":
        pickled = pickle.dumps({"w": _Marker(marker, "exec")}, protocol=2)
    elif payload == "torch.load":
        pickled = b"\x80\x02ctorch\nload\nX\x03\x00\x00\x00x.pt\x85R."
    else:
        pickled = b"\x80\x02ctorch._utils\n_rebuild_tensor\n)R."
    path = tmp_path / "evil.pth"
    _zip(path, {"archive/data.pkl": pickled, "archive/version": b"3\n"})
    with pytest.raises(UnsafeCheckpointError, match=named.replace(".", r"\.")):
        PthReader(path)
    assert not marker.exists()


def test_trust_pickle_loads_a_trusted_file(tmp_path: Path) -> None:
    sd = _sd()
    path = tmp_path / "trusted.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1), "epoch": 2}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        PthReader(path)
    with PthReader(path, trust_pickle=True) as reader:
        assert reader.container.dropped == ("args",)
        assert reader.container.extras == {"epoch": 2}
        _assert_matches(reader, sd)


# --- damaged files -----------------------------------------------------------


def _rewrite(
    src: Path,
    dst: Path,
    edit: Callable[[str, bytes], bytes | None],
    compress: Callable[[str], bool] = lambda _: False,
) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = edit(name, zin.read(name))
            if data is not None:
                method = zipfile.ZIP_DEFLATED if compress(name) else zipfile.ZIP_STORED
                zout.writestr(name, data, compress_type=method)


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "good.pth"
    torch.save({"stem.weight": torch.arange(12.0).view(3, 4), "n": torch.tensor(1)}, path)
    return path


def _grow_in_directory(raw: bytes, member: str, size: int) -> bytes:
    """Claim in the central directory that ``member`` holds ``size`` bytes."""
    out = bytearray(raw)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        if out[pos + 46 : pos + 46 + name_len] == member.encode():
            struct.pack_into("<II", out, pos + 20, size, size)
            return bytes(out)
        pos = out.find(b"PK\x01\x02", pos + 1)
    raise AssertionError(f"{member} not in the central directory")


def test_damaged_files_are_bad_checkpoints(tmp_path: Path) -> None:
    good = _saved(tmp_path)
    raw = good.read_bytes()
    cases: dict[str, tuple[bytes, str]] = {
        "truncated": (raw[: len(raw) // 2], "truncated or corrupt"),
        "garbage": (bytes(range(255, -1, -1)), "not a PyTorch"),
        "empty": (b"", "not a PyTorch"),
        "text": (b"hello world\n", "not a PyTorch"),
        "past-eof": (_grow_in_directory(raw, "good/data/0", 10**9), "past the end"),
    }
    for label, (content, message) in cases.items():
        path = tmp_path / f"{label}.pth"
        path.write_bytes(content)
        with pytest.raises(BadCheckpointError, match=message) as caught:
            PthReader(path)
        assert str(path) in str(caught.value), label
    with pytest.raises(BadCheckpointError, match="cannot open"):
        PthReader(tmp_path / "missing.pth")


@pytest.mark.parametrize(
    ("edit", "compressed", "message"),
    [
        (lambda n, d: None if n.endswith("data.pkl") else d, False, "data.pkl"),
        (lambda n, d: b"\x80\x02garbage" if n.endswith("data.pkl") else d, False, "corrupt"),
        (lambda n, d: d[:20] if n.endswith("data.pkl") else d, False, "corrupt"),
        (lambda n, d: None if n.endswith("data/0") else d, False, "'stem.weight'.*missing"),
        (lambda n, d: d[:-4] if n.endswith("data/0") else d, False, "'stem.weight' needs 48"),
        (lambda n, d: d, True, "compressed"),
        (lambda n, d: b"middle" if n.endswith("byteorder") else d, False, "byteorder"),
    ],
    ids=["no-pickle", "garbage-pickle", "cut-pickle", "no-storage", "short", "deflated", "order"],
)
def test_inconsistent_archives_are_bad_checkpoints(
    tmp_path: Path,
    edit: Callable[[str, bytes], bytes | None],
    compressed: bool,
    message: str,
) -> None:
    path = tmp_path / "edited.pth"
    _rewrite(_saved(tmp_path), path, edit, compress=lambda n: compressed and "/data/" in n)
    with pytest.raises(BadCheckpointError, match=message) as caught:
        PthReader(path)
    assert not isinstance(caught.value, UnsafeCheckpointError)


def test_unsupported_dtype_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "complex.pth"
    torch.save({"ok": torch.ones(2), "phase": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(BadCheckpointError, match="'phase' has dtype complex64"):
        PthReader(path)


def test_lying_tensor_metadata_is_refused(tmp_path: Path) -> None:
    # ('storage', torch.FloatStorage, '0', 'cpu', 4) as a persistent id
    pid = (
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    )

    def tensor(size: bytes, stride: bytes, offset: bytes = b"K\x00") -> bytes:
        return (
            b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
            + pid
            + offset
            + size
            + stride
            + b"\x89ccollections\nOrderedDict\n)RtRu."
        )

    cases = {
        "huge-stride": (tensor(b"K\x02\x85", b"J\x00\x00\x00\x01\x85"), "needs"),
        "negative": (tensor(b"J\xfe\xff\xff\xff\x85", b"K\x01\x85"), "non-negative"),
        "rank-mismatch": (tensor(b"K\x02K\x02\x86", b"K\x01\x85"), "equally long"),
        "offset": (tensor(b"K\x02\x85", b"K\x01\x85", b"K\x03"), "needs"),
        "bad-offset": (tensor(b"K\x02\x85", b"K\x01\x85", b"N"), "storage offset"),
        "absurd": (tensor(b"\x8a\x09" + b"\0" * 8 + b"\x01\x85", b"K\x00\x85"), "impossibly"),
    }
    for label, (pickled, message) in cases.items():
        path = tmp_path / f"{label}.pth"
        _zip(path, {"archive/data.pkl": pickled, "archive/data/0": b"\0" * 16})
        with pytest.raises(BadCheckpointError, match=message):
            PthReader(path)
    ok = tmp_path / "ok.pth"
    _zip(ok, {"archive/data.pkl": tensor(b"K\x02\x85", b"K\x02\x85"), "archive/data/0": b"\0" * 16})
    with PthReader(ok) as reader:
        assert reader.read("w").tolist() == [0.0, 0.0]


# --- no torch on the zip path ------------------------------------------------

_NO_TORCH_SCRIPT = """
import sys
from pathlib import Path
from acnet_convert.checkpoint.pth import PthReader, write_pth
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
with PthReader(src) as reader:
    write_pth(dst, list(reader.tensors.values()), reader.read, reader.container)
with PthReader(dst) as reader:
    total = sum(int(reader.read(name).size) for name in reader.tensors)
print(total, "torch" in sys.modules)
"""


def test_zip_path_never_imports_torch(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.pth", tmp_path / "dst.pth"
    sd = {"a": _random((3, 3), torch.bfloat16), "b": _random((2, 4), torch.int64).t()}
    torch.save({"model": sd, "iteration": 4}, src)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SCRIPT, str(src), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["17", "False"]
    loaded = torch.load(dst, weights_only=True)
    assert loaded["iteration"] == 4
    assert all(_same(loaded["model"][k], v) for k, v in sd.items())
