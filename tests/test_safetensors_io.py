"""SafetensorsReader and write_safetensors against the safetensors package, and hostile files."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from acnet_convert.api import tensor_from_stored
from acnet_convert.checkpoint.base import TensorInfo
from acnet_convert.checkpoint.safetensors_io import SafetensorsReader, write_safetensors
from acnet_convert.errors import BadCheckpointError

TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (4, 3, 3, 3)]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen).to(dtype)


def _as_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    return tensor_from_stored(array.copy(), dtype)


def _copy_through(reader: SafetensorsReader, out: Path) -> None:
    write_safetensors(
        out, list(reader.tensors.values()), reader.read, reader.metadata, reader.container.prefix
    )


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_matches_safetensors_package(
    tmp_path: Path, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    original = {"a.weight": _tensor(dtype, shape), "b": _tensor(torch.float32, (2, 3), seed=1)}
    src = tmp_path / "in.safetensors"
    safetensors.torch.save_file(original, src)
    with SafetensorsReader(src) as reader:
        assert set(reader.tensors) == set(original)
        for name, info in reader.tensors.items():
            array = reader.read(name)
            assert array.flags.c_contiguous and not array.flags.writeable
            assert array.shape == tuple(original[name].shape) == info.shape
            assert torch.equal(_as_torch(array, info.dtype), original[name])
        out = tmp_path / "out.safetensors"
        _copy_through(reader, out)
    assert out.read_bytes() == src.read_bytes()
    loaded = safetensors.torch.load_file(out)
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    if dtype != torch.bfloat16:
        as_numpy = safetensors.numpy.load_file(out)
        assert np.array_equal(as_numpy["a.weight"], original["a.weight"].numpy())


def test_prefix_and_metadata_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "ddp.safetensors"
    tensors = {
        "module._orig_mod.conv.weight": torch.ones(2, 2),
        "module._orig_mod.bn.running_var": torch.arange(2.0),
    }
    safetensors.torch.save_file(tensors, src, metadata={"format": "pt", "epoch": "90"})
    with SafetensorsReader(src) as reader:
        assert reader.container.prefix == "module._orig_mod."
        assert set(reader.tensors) == {"conv.weight", "bn.running_var"}
        assert reader.metadata == {"format": "pt", "epoch": "90"}
        assert reader.format == "safetensors"
        out = tmp_path / "out.safetensors"
        _copy_through(reader, out)
    with SafetensorsReader(out) as again:
        assert again.metadata == {"format": "pt", "epoch": "90"}
    loaded = safetensors.torch.load_file(out)
    assert set(loaded) == set(tensors)


def test_order_is_data_offset_order_and_header_is_padded(tmp_path: Path) -> None:
    out = tmp_path / "ordered.safetensors"
    infos = [
        TensorInfo("z.last_in_alphabet", "float32", (3,)),
        TensorInfo("empty", "float16", (0,)),
        TensorInfo("a.first_in_alphabet", "float16", (1,)),
        TensorInfo("odd", "float32", (2,)),
    ]
    values: dict[str, np.ndarray] = {
        "z.last_in_alphabet": np.arange(3, dtype=np.float32),
        "empty": np.zeros(0, np.float16),
        "a.first_in_alphabet": np.array([1.5], np.float16),
        "odd": np.array([2.5, -1.0], np.float32),
    }
    calls: list[str] = []

    def produce(name: str) -> np.ndarray:
        calls.append(name)
        return values[name]

    write_safetensors(out, infos, produce, {})
    assert calls == [info.name for info in infos]
    raw = out.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    assert raw[8 + header_len - 1 : 8 + header_len] in (b" ", b"}")
    assert "__metadata__" not in json.loads(raw[8 : 8 + header_len])
    with SafetensorsReader(out) as reader:
        assert list(reader.tensors) == [info.name for info in infos]
        # 'odd' starts 2 bytes after a float16: not 4-aligned in the file; still readable.
        odd = reader.read("odd")
        assert odd.flags.aligned and odd.flags.c_contiguous
        for name, value in values.items():
            assert np.array_equal(reader.read(name), value)
    loaded = safetensors.numpy.load_file(out)
    for name, value in values.items():
        assert np.array_equal(loaded[name], value)


def test_arrays_outlive_the_reader(tmp_path: Path) -> None:
    src = tmp_path / "x.safetensors"
    safetensors.torch.save_file({"w": torch.arange(6.0).reshape(2, 3)}, src)
    reader = SafetensorsReader(src)
    view = reader.read("w")
    reader.close()
    assert view.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


@pytest.mark.parametrize(
    ("produced", "match"),
    [
        (np.zeros((2, 3), np.float64), "float64"),
        (np.zeros((3, 2), np.float32), "shape"),
        ([[0.0] * 3] * 2, "list"),
    ],
)
def test_writer_checks_produced_arrays(tmp_path: Path, produced: Any, match: str) -> None:
    info = TensorInfo("w", "float32", (2, 3))
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "o.safetensors", [info], lambda _: produced, {})


def test_writer_accepts_non_contiguous_arrays(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.float32).reshape(3, 2).T
    out = tmp_path / "t.safetensors"
    write_safetensors(out, [TensorInfo("t", "float32", (2, 3))], lambda _: array, {})
    assert np.array_equal(safetensors.numpy.load_file(out)["t"], array)


# ----- hostile files ------------------------------------------------------------------


def _craft(path: Path, header: Any, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(length.to_bytes(8, "little") + raw + data)
    return path


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(BadCheckpointError) as info:
        SafetensorsReader(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def _entry(dtype: str = "F32", shape: list[Any] | None = None, offsets: Any = None) -> Any:
    return {
        "dtype": dtype,
        "shape": [2] if shape is None else shape,
        "data_offsets": [0, 8] if offsets is None else offsets,
    }


def test_header_length_beyond_file(tmp_path: Path) -> None:
    _refused(_craft(tmp_path / "h.safetensors", {"w": _entry()}, b"\0" * 8, 10**9), "truncated")


def test_header_length_over_format_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as handle:
        handle.write((100_000_001).to_bytes(8, "little") + b"{")
        handle.truncate(100_000_100)  # sparse: costs no disk
    _refused(path, "100000000")


def test_too_short(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x02\0\0")
    _refused(path, "too short")


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[1, 2]", "not an object"),
        (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "w": {}}', "twice"),
        (b'{"w": 3}', "'w'"),
        (b'{"w": {"dtype": "F32"}}', "lacks shape, data_offsets"),
        (b'{"__metadata__": {"epoch": 3}}', "epoch"),
        (b'{"__metadata__": [1]}', "__metadata__"),
    ],
)
def test_malformed_header(tmp_path: Path, header: bytes, fragment: str) -> None:
    _refused(_craft(tmp_path / "m.safetensors", header, b"\0" * 8), fragment)


@pytest.mark.parametrize("code", ["F8_E4M3", "C64", "complex", 7])
def test_unknown_dtype_names_key_and_dtype(tmp_path: Path, code: Any) -> None:
    path = _craft(tmp_path / "d.safetensors", {"layer.w": _entry(dtype=code)}, b"\0" * 8)
    _refused(path, "'layer.w'", repr(code), "supported")


@pytest.mark.parametrize(
    "shape", [[-1], [2.0], [True], "2", [None]], ids=["negative", "float", "bool", "str", "null"]
)
def test_bad_shape(tmp_path: Path, shape: Any) -> None:
    _refused(_craft(tmp_path / "s.safetensors", {"w": _entry(shape=shape)}, b"\0" * 8), "'w'")


@pytest.mark.parametrize(
    "offsets", [[0, 8, 16], [8, 0], [0, 16], [-8, 0], [0.0, 8.0], "0-8"], ids=str
)
def test_bad_offsets(tmp_path: Path, offsets: Any) -> None:
    path = _craft(tmp_path / "o.safetensors", {"w": _entry(offsets=offsets)}, b"\0" * 8)
    _refused(path, "'w'")


def test_size_mismatch(tmp_path: Path) -> None:
    path = _craft(tmp_path / "n.safetensors", {"w": _entry(shape=[3])}, b"\0" * 12)
    _refused(path, "'w'", "12 bytes")


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": _entry(offsets=[0, 8]), "b": _entry(offsets=[4, 12])}
    _refused(_craft(tmp_path / "ov.safetensors", header, b"\0" * 12), "overlaps")


def test_huge_declared_shape_is_refused_without_allocating(tmp_path: Path) -> None:
    header = {"w": _entry(shape=[10**6, 10**6], offsets=[0, 8])}
    path = _craft(tmp_path / "huge.safetensors", header, b"\0" * 8)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _refused(path, "'w'")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 10 * 2**20


def test_huge_offsets_are_refused(tmp_path: Path) -> None:
    header = {"w": _entry(shape=[10**12], offsets=[0, 4 * 10**12])}
    _refused(_craft(tmp_path / "huge2.safetensors", header, b"\0" * 8), "outside")


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file(
        {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(8))}, path
    )
    raw = path.read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 100, 9):
        path.write_bytes(raw[:cut])
        _refused(path)


def test_random_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.safetensors"
    for _ in range(20):
        path.write_bytes(rng.bytes(int(rng.integers(0, 4096))))
        _refused(path)


def test_no_tensors(tmp_path: Path) -> None:
    _refused(_craft(tmp_path / "e.safetensors", {"__metadata__": {"a": "b"}}), "no tensors")


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "absent.safetensors")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "dir.safetensors"
    os.mkdir(folder)
    _refused(folder)
