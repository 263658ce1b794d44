"""Int8 readiness figures (``inspect --stats``, ``--plot``): the math against an independent
computation, every fixture, training vs fused checkpoints, and the torch-free path."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from acnet_convert.errors import UsageError
from acnet_convert.quant import (
    checkpoint_quant_stats,
    conv_quant_stats,
    fake_quantize_int8,
    quant_report,
    sqnr_db,
)

if TYPE_CHECKING:
    from conftest import CliRun

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CHECKPOINTS = sorted(
    p
    for folder in ("", "dialects/", "families/", "expected/")
    for p in FIXTURES.glob(f"{folder}*.*")
    if p.suffix in (".pth", ".hdf5", ".h5", ".safetensors")
    and not p.name.endswith(".io.safetensors")
)
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _reference_sqnr(weight: np.ndarray, per_channel: bool) -> tuple[float, list[float]]:
    """Symmetric int8 SQNR, element by element in plain Python floats (round half to even):
    of the whole kernel, and of each output channel."""
    channels = weight.reshape(weight.shape[0], -1).tolist()
    everything = [abs(v) for row in channels for v in row]
    signal = noise = 0.0
    rows: list[float] = []
    for row in channels:
        absmax = max(abs(v) for v in row) if per_channel else max(everything)
        scale = absmax / 127.0
        row_signal = row_noise = 0.0
        for v in row:
            q = 0.0 if scale == 0 else min(127, max(-127, round(v / scale))) * scale
            row_signal += v * v
            row_noise += (v - q) ** 2
        signal, noise = signal + row_signal, noise + row_noise
        rows.append(math.inf if row_noise == 0 else 10.0 * math.log10(row_signal / row_noise))
    return (math.inf if noise == 0 else 10.0 * math.log10(signal / noise)), rows


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (16, 1, 5, 5), (4, 8, 1, 1)])
def test_sqnr_matches_an_elementwise_computation(seed: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.2, shape) * rng.lognormal(0, 1.5, (shape[0], 1, 1, 1))
    stats = conv_quant_stats("w", weight)
    kernel_t, rows_t = _reference_sqnr(weight, per_channel=False)
    kernel_c, rows_c = _reference_sqnr(weight, per_channel=True)
    assert stats.sqnr_tensor_db == pytest.approx(kernel_t, abs=1e-9)
    assert stats.sqnr_channel_db == pytest.approx(kernel_c, abs=1e-9)
    assert stats.worst_tensor_db == pytest.approx(min(rows_t), abs=1e-9)
    assert stats.worst_channel_db == pytest.approx(min(rows_c), abs=1e-9)
    losses = [c - t for c, t in zip(rows_c, rows_t, strict=True)]
    assert stats.loss_db == pytest.approx(max(losses), abs=1e-9)
    absmax = np.abs(weight).reshape(shape[0], -1).max(axis=1)
    assert stats.channel_spread == pytest.approx(absmax.max() / absmax.min(), rel=1e-12)
    assert (stats.w_min, stats.w_max) == (weight.min(), weight.max())


def test_per_tensor_rounds_a_small_channel_away_and_is_flagged() -> None:
    # Channel 1 is 1000x smaller: one scale for both gives it 0.127 of a level, so it
    # rounds to zero (0 dB), which the whole kernel's SQNR hardly shows.
    weight = np.stack([np.linspace(-1, 1, 9), np.linspace(-1e-3, 1e-3, 9)]).reshape(2, 1, 3, 3)
    per_tensor = fake_quantize_int8(weight, per_channel=False)
    assert np.all(per_tensor[1] == 0)
    stats = conv_quant_stats("w", weight)
    assert stats.channel_spread == pytest.approx(1000.0)
    assert stats.sqnr_channel_db - stats.sqnr_tensor_db < 1.0
    assert stats.worst_tensor_db == pytest.approx(0.0, abs=1e-12)
    assert stats.worst_channel_db > 40 and stats.flagged and stats.loss_db > 40
    assert not conv_quant_stats("w", weight, threshold_db=stats.loss_db + 1).flagged


def test_alike_channels_are_not_flagged() -> None:
    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, (8, 4, 3, 3))
    weight[:, 0, 0, 0] = 1.0  # every channel the same max|w|: one scale is as good as eight
    stats = conv_quant_stats("w", weight)
    assert stats.channel_spread == 1.0 and stats.loss_db == 0.0 and not stats.flagged


def test_exact_grid_values_have_infinite_sqnr_and_no_loss() -> None:
    weight = (np.arange(-127, 128, dtype=np.float64) / 128).reshape(1, 1, 15, 17)  # scale 1/128
    stats = conv_quant_stats("w", weight)
    assert math.isinf(stats.sqnr_tensor_db) and math.isinf(stats.sqnr_channel_db)
    assert stats.loss_db == 0.0 and not stats.flagged
    assert stats.as_json()["sqnr_per_tensor_db"] == "inf"


def test_zero_channels_are_counted_not_divided_by() -> None:
    weight = np.zeros((3, 2, 3, 3))
    weight[0] = 0.5
    weight[2] = 0.05
    stats = conv_quant_stats("w", weight)
    assert stats.zero_channels == 1 and stats.channel_spread == pytest.approx(10.0)
    assert np.all(fake_quantize_int8(weight, per_channel=True)[1] == 0)


def test_sqnr_db_definition() -> None:
    assert sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(20.0)
    assert sqnr_db(np.ones(3), np.ones(3)) == math.inf


@pytest.mark.parametrize("threshold", [-1.0, math.nan, math.inf])
def test_bad_threshold_is_a_usage_error(threshold: float) -> None:
    with pytest.raises(UsageError, match="loss-threshold"):
        quant_report("x", [], threshold)


def test_training_checkpoint_is_fused_first_and_matches_its_fused_file(tmp_path: Path) -> None:
    from acnet_convert.convert import FuseOptions, fuse_checkpoint

    train = FIXTURES / "resnet_like.safetensors"
    fused = tmp_path / "fused.safetensors"
    fuse_checkpoint(train, fused, "safetensors", FuseOptions())
    a, b = checkpoint_quant_stats(train), checkpoint_quant_stats(fused)
    assert a.fused_in_memory and not b.fused_in_memory
    assert [x.name for x in a.layers] == [x.name for x in b.layers]
    assert any(x.block for x in a.layers) and all(x.block is None for x in b.layers)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.sqnr_tensor_db == pytest.approx(y.sqnr_tensor_db, abs=1e-9)
        assert x.channel_spread == pytest.approx(y.channel_spread, rel=1e-12)


def test_keras_kernels_are_read_as_hwio() -> None:
    report = checkpoint_quant_stats(FIXTURES / "dialects" / "keras_acnet.h5")
    assert report.layers and all(x.shape[1:] in ((3, 3, 3), (8, 5, 5)) for x in report.layers)


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.name)
def test_inspect_stats_on_every_fixture(path: Path, run_cli: CliRun) -> None:
    dialect = ["--dialect", "acnet"] if path.stem == "ambiguous" else []
    result = run_cli("inspect", path, "--stats", "--json", *dialect)
    quant = json.loads(result.stdout)["quantization"]
    assert quant["layers"], "no conv found"
    for layer in quant["layers"]:
        assert layer["sqnr_per_channel_db"] == "inf" or layer["sqnr_per_channel_db"] > 20
    table = run_cli("inspect", path, "--stats", *dialect).stdout
    assert "SQNR tensor" in table and "convs flagged" in table


def test_stats_do_not_hide_an_unusable_checkpoint(run_cli: CliRun) -> None:
    result = run_cli(
        "inspect", FIXTURES / "dialects" / "ambiguous.safetensors", "--stats", expect=3
    )
    assert "more than one naming dialect" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inspect_stats_stays_torch_free() -> None:
    code = (
        "import sys; from acnet_convert.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'onnx' not in sys.modules, 'onnx was imported'\n"
    )
    for args in (
        ["inspect", str(FIXTURES / "cifar_quick.pth"), "--stats"],
        ["export", "--help"],
    ):
        subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the plot extra)")
@pytest.mark.parametrize("name", ["resnet_like.pth", "expected/grouped.fused.safetensors"])
def test_plot_writes_a_png(name: str, tmp_path: Path, run_cli: CliRun) -> None:
    png = tmp_path / "stats.png"
    result = run_cli("inspect", FIXTURES / name, "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SQNR tensor" in result.stdout and "wrote" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["stats.png"]  # no temporary left


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the plot extra)")
def test_plot_into_a_missing_folder_is_refused_before_any_work(
    tmp_path: Path, run_cli: CliRun
) -> None:
    png = tmp_path / "nowhere" / "int8.png"
    result = run_cli("inspect", FIXTURES / "cifar_quick.pth", "--plot", png, expect=2)
    assert "does not exist" in result.stderr and result.stdout == ""
    assert not png.parent.exists()


def test_plot_without_matplotlib_says_how_to_install(
    tmp_path: Path, run_cli: CliRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    import acnet_convert.quantplot as quantplot

    real = quantplot.importlib.util.find_spec
    monkeypatch.setattr(
        quantplot.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    png = tmp_path / "stats.png"
    result = run_cli("inspect", FIXTURES / "cifar_quick.pth", "--plot", png, expect=2)
    assert "pip install 'acnet-convert[plot]'" in result.stderr and not png.exists()
