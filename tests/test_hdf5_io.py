"""Hdf5Reader and write_hdf5: upstream ACNet's flat layout, Keras weight files, hostile files."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from acnet_convert.checkpoint.base import TensorInfo
from acnet_convert.checkpoint.hdf5_io import Hdf5Reader, KerasAttrs, write_hdf5
from acnet_convert.errors import BadCheckpointError, UsageError


def _save_upstream(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Lay a dict out the way upstream ACNet's save_hdf5 does: '/' -> '+', one dataset each."""
    with h5py.File(path, "w") as handle:
        for key, value in arrays.items():
            handle.create_dataset(key.replace("/", "+"), data=value)


def _copy_through(reader: Hdf5Reader, out: Path, **kwargs: Any) -> None:
    write_hdf5(
        out,
        list(reader.tensors.values()),
        reader.read,
        reader.metadata,
        prefix=reader.container.prefix,
        **kwargs,
    )


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(BadCheckpointError) as info, Hdf5Reader(path) as reader:
        for name in reader.tensors:
            reader.read(name)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


NUMPY_CASES: dict[str, Any] = {
    "f64": np.linspace(-1, 1, 6).reshape(2, 3),
    "f32": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
    "f16": np.array([0.5, -2.0, 65504.0], np.float16),
    "i64": np.array([-(2**40), 2**40], np.int64),
    "i32": np.array(7, np.int32),
    "i16": np.array([-3, 3], np.int16),
    "i8": np.array([-128, 127], np.int8),
    "u8": np.array([0, 255], np.uint8),
    "u16": np.array([65535], np.uint16),
    "bool": np.array([True, False, True]),
    "scalar": np.float32(3.25),
    "empty": np.zeros((0, 3), np.float32),
    "big_endian": np.arange(5, dtype=">f4"),
    "big_endian_int": np.arange(5, dtype=">i8"),
}
CANONICAL = {
    "f64": "float64",
    "f32": "float32",
    "f16": "float16",
    "i64": "int64",
    "i32": "int32",
    "i16": "int16",
    "i8": "int8",
    "u8": "uint8",
    "u16": "uint16",
    "bool": "bool",
    "scalar": "float32",
    "empty": "float32",
    "big_endian": "float32",
    "big_endian_int": "int64",
}


def test_flat_round_trip_of_many_dtypes(tmp_path: Path) -> None:
    src = tmp_path / "train.hdf5"
    _save_upstream(src, NUMPY_CASES)
    with Hdf5Reader(src) as reader:
        assert reader.format == "hdf5" and reader.layout == "flat"
        assert list(reader.tensors) == sorted(NUMPY_CASES)
        for name, value in NUMPY_CASES.items():
            info = reader.tensors[name]
            array = reader.read(name)
            assert info.dtype == CANONICAL[name]
            assert info.shape == np.shape(value) == array.shape
            assert array.flags.c_contiguous
            assert array.dtype == np.dtype(array.dtype).newbyteorder("<")
            assert np.array_equal(array, value)
        out = tmp_path / "copy.hdf5"
        _copy_through(reader, out)
    with h5py.File(out, "r") as handle:
        assert sorted(handle) == sorted(NUMPY_CASES)
        for name, value in NUMPY_CASES.items():
            assert handle[name].compression is None
            assert np.array_equal(handle[name][()], value)


def test_upstream_names_deps_and_integer_keys(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = {
        "stage1/block0/conv1.acb.square_conv.weight": np.ones((4, 4, 3, 3), np.float32),
        "conv1.acb.hor_bn.running_var": np.full(4, 2.0, np.float32),
        "deps": np.array([16, 16, 32, 64], np.int64),
        "0": np.zeros(2, np.float32),
        "1": np.ones(2, np.float32),
        "10": np.full(2, 10.0, np.float32),
        "2": np.full(2, 2.0, np.float32),
    }
    src = tmp_path / "upstream.hdf5"
    _save_upstream(src, arrays)
    with Hdf5Reader(src) as reader:
        # h5py iterates names alphabetically, which is what upstream wrote and read.
        assert list(reader.tensors) == [
            "0",
            "1",
            "10",
            "2",
            "conv1.acb.hor_bn.running_var",
            "deps",
            "stage1/block0/conv1.acb.square_conv.weight",
        ]
        assert reader.tensors["deps"].dtype == "int64"
        for name, value in arrays.items():
            assert np.array_equal(reader.read(name), value)
        out = tmp_path / "copy.hdf5"
        _copy_through(reader, out)
    with h5py.File(out, "r") as handle:
        assert "stage1+block0+conv1.acb.square_conv.weight" in handle
        assert np.array_equal(handle["deps"][()], arrays["deps"])
        assert handle["deps"].dtype == np.int64


def test_prefix_and_metadata(tmp_path: Path) -> None:
    src = tmp_path / "ddp.h5"
    with h5py.File(src, "w") as handle:
        handle.attrs["note"] = "trained on cifar10"
        handle.attrs["bytes_note"] = b"bytes are text too"
        handle.attrs["epochs"] = 300  # not a string: not metadata
        handle["module.conv.weight"] = np.ones((2, 2, 3, 3), np.float32)
        handle["module.deps"] = np.array([2, 2])
    with Hdf5Reader(src) as reader:
        assert reader.container.prefix == "module."
        assert list(reader.tensors) == ["conv.weight", "deps"]
        assert reader.metadata == {"note": "trained on cifar10", "bytes_note": "bytes are text too"}
        out = tmp_path / "copy.h5"
        _copy_through(reader, out)
    with h5py.File(out, "r") as handle:
        assert sorted(handle) == ["module.conv.weight", "module.deps"]
        assert handle.attrs["note"] == "trained on cifar10"


def test_bfloat16_is_uint16_with_a_marker(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    bits = weight.view(torch.int16).numpy().view(np.uint16)
    out = tmp_path / "bf16.h5"
    write_hdf5(out, [TensorInfo("w", "bfloat16", (3, 5))], lambda _: bits, {})
    with h5py.File(out, "r") as handle:
        assert handle["w"].dtype == np.uint16
        assert handle["w"].attrs["dtype"] == "bfloat16"
    with Hdf5Reader(out) as reader:
        assert reader.tensors["w"].dtype == "bfloat16"
        back = torch.from_numpy(reader.read("w").copy()).view(torch.bfloat16)
    assert torch.equal(back, weight)


def test_writer_streams_in_order_and_checks_arrays(tmp_path: Path) -> None:
    infos = [TensorInfo("b", "float32", (2,)), TensorInfo("a", "int64", ())]
    calls: list[str] = []

    def produce(name: str) -> np.ndarray:
        calls.append(name)
        return np.zeros(2, np.float32) if name == "b" else np.array(4, np.int64)

    write_hdf5(tmp_path / "o.h5", infos, produce, {"k": "v"})
    assert calls == ["b", "a"]
    with pytest.raises(ValueError, match="float64"):
        write_hdf5(tmp_path / "bad.h5", infos[:1], lambda _: np.zeros(2), {})
    with pytest.raises(ValueError, match="layout"):
        write_hdf5(tmp_path / "bad.h5", infos, produce, {}, flavour="tf")


def test_writer_refuses_names_it_cannot_store(tmp_path: Path) -> None:
    info = TensorInfo("a+b", "float32", ())
    with pytest.raises(UsageError, match="'a\\+b'"):
        write_hdf5(tmp_path / "x.h5", [info], lambda _: np.array(1, np.float32), {})
    clash = [TensorInfo("l/w", "float32", ()), TensorInfo("l/w/x", "float32", ())]
    with pytest.raises(UsageError, match="'l/w'"):
        write_hdf5(
            tmp_path / "y.h5", clash, lambda _: np.zeros((), np.float32), {}, flavour="keras"
        )


# ----- Keras -------------------------------------------------------------------------

KERAS_LAYERS: dict[str, dict[str, np.ndarray]] = {
    "input_1": {},
    "conv1_sqr": {"kernel:0": np.random.default_rng(0).standard_normal((3, 3, 3, 8))},
    "conv1_sqr_bn": {
        "gamma:0": np.ones(8),
        "beta:0": np.zeros(8),
        "moving_mean:0": np.full(8, 0.1),
        "moving_variance:0": np.full(8, 0.9),
    },
    "conv1_ver": {"kernel:0": np.ones((3, 1, 3, 8))},
    "conv1_hor": {"kernel:0": np.ones((1, 3, 3, 8))},
    "activation": {},
}


def _save_keras(path: Path, *, full_model: bool) -> None:
    """Lay weights out the way Keras 2's save_weights / save(h5) does."""
    with h5py.File(path, "w") as handle:
        group: h5py.Group = handle
        if full_model:
            handle.attrs["model_config"] = b'{"class_name": "Functional"}'
            handle.attrs["backend"] = b"tensorflow"
            handle.attrs["keras_version"] = b"2.13.1"
            group = handle.create_group("model_weights")
            handle.create_group("optimizer_weights")["Adam/iter:0"] = np.int64(5)
        group.attrs["layer_names"] = np.asarray([name.encode() for name in KERAS_LAYERS])
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.13.1"
        for layer, weights in KERAS_LAYERS.items():
            layer_group = group.create_group(layer)
            names = [f"{layer}/{w}".encode() for w in weights]
            layer_group.attrs["weight_names"] = np.asarray(names) if names else np.asarray([])
            for weight, value in weights.items():
                data = layer_group.create_dataset(
                    f"{layer}/{weight}", value.shape, dtype=np.float32
                )
                data[...] = value


@pytest.mark.parametrize("full_model", [False, True])
def test_keras_reader(tmp_path: Path, full_model: bool) -> None:
    src = tmp_path / "keras.h5"
    _save_keras(src, full_model=full_model)
    with Hdf5Reader(src) as reader:
        assert reader.layout == "keras"
        expected = sorted(
            f"{layer}/{layer}/{weight}" for layer, ws in KERAS_LAYERS.items() for weight in ws
        )
        assert sorted(reader.tensors) == expected
        key = "conv1_sqr/conv1_sqr/kernel:0"
        assert reader.tensors[key].shape == (3, 3, 3, 8)
        assert np.array_equal(reader.read(key), KERAS_LAYERS["conv1_sqr"]["kernel:0"].astype("f4"))
        attrs = reader.keras_attrs
        assert attrs is not None
        assert attrs.weights_group == ("model_weights" if full_model else "")
        assert attrs.layer_names == tuple(KERAS_LAYERS)
        assert attrs.weight_names["input_1"] == ()
        assert attrs.weight_names["conv1_sqr_bn"][0] == "conv1_sqr_bn/gamma:0"
        assert (attrs.backend, attrs.keras_version) == ("tensorflow", "2.13.1")
        if full_model:
            assert reader.container.dropped == ("optimizer_weights",)
            assert reader.metadata["model_config"] == '{"class_name": "Functional"}'


@pytest.mark.parametrize("full_model", [False, True])
def test_keras_writer_keeps_layout_for_a_fused_subset(tmp_path: Path, full_model: bool) -> None:
    src = tmp_path / "train.h5"
    _save_keras(src, full_model=full_model)
    out = tmp_path / "deploy.h5"
    with Hdf5Reader(src) as reader:
        kernel = reader.tensors["conv1_sqr/conv1_sqr/kernel:0"]
        bias = TensorInfo("conv1_sqr/conv1_sqr/bias:0", "float32", (8,))
        values = {kernel.name: reader.read(kernel.name), bias.name: np.arange(8, dtype="f4")}
        write_hdf5(
            out,
            [bias, kernel],
            values.__getitem__,
            {},
            flavour="keras",
            keras_attrs=reader.keras_attrs,
        )
    with h5py.File(out, "r") as handle:
        group = handle["model_weights"] if full_model else handle
        layer_names = [n.decode() for n in group.attrs["layer_names"]]
        # Fused-away layers go; weightless ones stay; the original order is kept.
        assert layer_names == ["input_1", "conv1_sqr", "activation"]
        # h5py reads Keras' encoded bytes back as str, as it does for Keras' own files.
        assert group.attrs["backend"] in ("tensorflow", b"tensorflow")
        weight_names = [n.decode() for n in group["conv1_sqr"].attrs["weight_names"]]
        assert weight_names == ["conv1_sqr/kernel:0", "conv1_sqr/bias:0"]
        assert len(group["input_1"].attrs["weight_names"]) == 0
        assert np.array_equal(group["conv1_sqr/conv1_sqr/bias:0"][()], np.arange(8))
    with Hdf5Reader(out) as again:
        assert again.layout == "keras"
        assert set(again.tensors) == {kernel.name, bias.name}


def test_keras_long_name_lists_are_chunked(tmp_path: Path) -> None:
    layers = [f"block{i:05d}_" + "x" * 40 + "_conv" for i in range(3000)]
    infos = [TensorInfo(f"{name}/{name}/kernel:0", "float32", (1,)) for name in layers]
    out = tmp_path / "many.h5"
    write_hdf5(out, infos, lambda _: np.ones(1, np.float32), {}, flavour="keras")
    with h5py.File(out, "r") as handle:
        assert "layer_names" not in handle.attrs and "layer_names0" in handle.attrs
    with Hdf5Reader(out) as reader:
        assert reader.keras_attrs is not None
        assert reader.keras_attrs.layer_names == tuple(layers)


def test_keras_listing_a_missing_weight_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "broken.h5"
    with h5py.File(src, "w") as handle:
        handle.attrs["layer_names"] = np.asarray([b"conv"])
        handle.create_group("conv").attrs["weight_names"] = np.asarray([b"conv/kernel:0"])
        handle["conv/conv/bias:0"] = np.zeros(2, np.float32)
    _refused(src, "'conv/kernel:0'")


def test_keras_attrs_default(tmp_path: Path) -> None:
    out = tmp_path / "fresh.h5"
    infos = [TensorInfo("d/d/kernel:0", "float32", (2, 2))]
    write_hdf5(out, infos, lambda _: np.eye(2, dtype=np.float32), {}, flavour="keras")
    with Hdf5Reader(out) as reader:
        assert reader.keras_attrs == KerasAttrs(
            layer_names=("d",), weight_names={"d": ("d/kernel:0",)}
        )


# ----- hostile files -----------------------------------------------------------------


def test_string_datasets_are_refused(tmp_path: Path) -> None:
    for kind, value in {
        "vlen": "a string",
        "fixed": np.bytes_(b"abc"),
        "array": np.array([b"a", b"b"]),
    }.items():
        path = tmp_path / f"{kind}.h5"
        with h5py.File(path, "w") as handle:
            handle["w"] = np.ones(2, np.float32)
            handle["labels"] = value
        _refused(path, "'labels'", "string")


@pytest.mark.parametrize(
    "dtype",
    [
        np.dtype([("a", "f4"), ("b", "i4")]),
        np.dtype("c8"),
        h5py.vlen_dtype(np.float32),
        h5py.ref_dtype,
        np.dtype("f4, (2,)f4"),
    ],
    ids=["compound", "complex", "vlen", "ref", "array"],
)
def test_non_numeric_datasets_are_refused(tmp_path: Path, dtype: Any) -> None:
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("odd", (2,), dtype=dtype)
    _refused(path, "'odd'", "not a tensor type")


def test_null_dataspace_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "null.h5"
    with h5py.File(path, "w") as handle:
        handle["nothing"] = h5py.Empty("f4")
    _refused(path, "'nothing'")


def test_bf16_marker_on_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "marker.h5"
    with h5py.File(path, "w") as handle:
        handle["w"] = np.ones(2, np.float32)
        handle["w"].attrs["dtype"] = "bfloat16"
    _refused(path, "'w'", "bfloat16")


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_huge_declared_dataset_is_refused_without_allocating(
    tmp_path: Path, compression: str | None
) -> None:
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset(
            "w", (10**6, 10**6), dtype="f4", chunks=(1, 1024), compression=compression
        )
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _refused(path, "'w'", "declares")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 10 * 2**20


def test_unwritten_contiguous_dataset_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unwritten.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("w", (10**12,), dtype="f4")
    _refused(path, "'w'")


def test_small_unwritten_dataset_is_fill_values(tmp_path: Path) -> None:
    path = tmp_path / "fill.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("w", (3,), dtype="f4", fillvalue=1.5)
    with Hdf5Reader(path) as reader:
        assert reader.read("w").tolist() == [1.5, 1.5, 1.5]


def test_links_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    _save_upstream(other, {"w": np.ones(2)})
    for kind, link in {
        "soft": h5py.SoftLink("/w"),
        "external": h5py.ExternalLink(str(other), "/w"),
    }.items():
        path = tmp_path / f"{kind}.h5"
        with h5py.File(path, "w") as handle:
            handle["w"] = np.ones(2)
            handle["alias"] = link
        _refused(path, "'alias'", "Link")


def test_external_storage_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.ones(4, np.float32).tobytes())
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("w", (4,), dtype="<f4", external=[(str(raw), 0, 16)])
    _refused(path, "'w'", "other files")


def test_unrecognised_layout(tmp_path: Path) -> None:
    path = tmp_path / "nested.h5"
    with h5py.File(path, "w") as handle:
        handle["layers/dense/vars/0"] = np.ones(2)
    _refused(path, "'layers'", "layout not recognised")


def test_committed_datatype_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "type.h5"
    with h5py.File(path, "w") as handle:
        handle["w"] = np.ones(2)
        handle["mytype"] = np.dtype("f4")
    _refused(path, "'mytype'")


def test_no_datasets(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5"
    h5py.File(path, "w").close()
    _refused(path, "no datasets")


def test_truncated_files(tmp_path: Path) -> None:
    path = tmp_path / "cut.h5"
    _save_upstream(path, {"a": np.ones((64, 64), np.float32), "b": np.arange(300)})
    raw = path.read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 3000, 100, 8):
        path.write_bytes(raw[:cut])
        _refused(path)


def test_random_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "noise.h5"
    for _ in range(10):
        path.write_bytes(rng.bytes(int(rng.integers(0, 4096))))
        _refused(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "absent.h5")
    folder = tmp_path / "folder.h5"
    folder.mkdir()
    _refused(folder)
