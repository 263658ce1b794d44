"""Shared test helpers: synthetic ACNet state dicts and a CLI runner that explains failures.

Randomness is reproducible and selectable:

- ``ACNET_TEST_SEED`` (default 0) seeds Python's ``random``, numpy's global
  generator and torch's default generator before every test, so a test that
  draws without its own generator (a module's default init) still sees fixed
  values; set it to another integer to run the suite on other draws.
- ``HYPOTHESIS_PROFILE`` picks a Hypothesis profile: ``ci`` (the default:
  derandomized, no example database, so every run tries the same examples),
  ``dev`` (random examples, database in the system temp folder, outside the
  repository) or ``random`` (random examples, no database).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile(
    "dev",
    database=DirectoryBasedExampleDatabase(
        os.path.join(tempfile.gettempdir(), "acnet-convert-hypothesis")
    ),
)
settings.register_profile("random", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TEST_SEED = int(os.environ.get("ACNET_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    """Every test starts from the same global random state (``ACNET_TEST_SEED``)."""
    import torch

    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)  # the legacy global state, for code that draws from it
    torch.manual_seed(TEST_SEED)
    yield


@dataclass
class CliRun:
    """Runs the CLI in-process; ``expect`` fails with stdout, stderr and the exception shown."""

    def __call__(self, *args: str | Path, expect: int | None = 0) -> Result:
        from acnet_convert.cli import main

        runner = CliRunner()
        result = runner.invoke(_Main(main), [str(a) for a in args], catch_exceptions=True)
        if expect is not None and result.exit_code != expect:
            raise AssertionError(
                f"exit code {result.exit_code}, expected {expect}\n--- stdout\n{result.stdout}"
                f"\n--- stderr\n{result.stderr}\n--- exception\n{result.exception!r}"
            )
        return result


class _Main:
    """Adapts ``main()`` (which calls sys.exit) to CliRunner's command interface."""

    def __init__(self, main: object) -> None:
        self.main_fn = main
        self.name = "acnet-convert"

    def main(self, args: Sequence[str], prog_name: str | None = None, **extra: object) -> None:
        self.main_fn(args)  # type: ignore[operator]


@pytest.fixture
def run_cli() -> CliRun:
    return CliRun()


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An empty folder for outputs (the hostile-input tests check nothing else lands in it)."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def bn_stats(
    rng: np.random.Generator, channels: int, prefix: str, affine: bool = True
) -> dict[str, np.ndarray]:
    """Realistic-looking eval-mode BN tensors under ``prefix``."""
    out = {
        f"{prefix}.running_mean": rng.normal(0, 0.5, channels).astype(np.float32),
        f"{prefix}.running_var": rng.uniform(0.2, 3.0, channels).astype(np.float32),
        f"{prefix}.num_batches_tracked": np.array(120, dtype=np.int64),
    }
    if affine:
        out[f"{prefix}.weight"] = rng.uniform(0.3, 1.5, channels).astype(np.float32)
        out[f"{prefix}.bias"] = rng.normal(0, 0.3, channels).astype(np.float32)
    return out


def acb_state(
    rng: np.random.Generator,
    prefix: str,
    cin: int,
    cout: int,
    k: int = 3,
    k1: int | None = None,
    groups: int = 1,
    last_bn: bool = False,
    affine: bool = True,
) -> dict[str, np.ndarray]:
    """State-dict entries of one upstream-named ACBlock (1-D length ``k1``, default k)."""
    k1 = k1 or k
    cpg = cin // groups
    sd: dict[str, np.ndarray] = {}
    for conv, bn, shape in (
        ("square_conv", "square_bn", (k, k)),
        ("ver_conv", "ver_bn", (k1, 1)),
        ("hor_conv", "hor_bn", (1, k1)),
    ):
        sd[f"{prefix}.{conv}.weight"] = rng.normal(0, 0.3, (cout, cpg, *shape)).astype(np.float32)
        sd.update(bn_stats(rng, cout, f"{prefix}.{bn}", affine))
    if last_bn:
        sd.update(bn_stats(rng, cout, f"{prefix}.last_bn"))
    return sd


def small_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A two-block net with a stem conv, a model-level last_bn and a classifier."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {"stem.weight": rng.normal(0, 0.3, (8, 3, 1, 1)).astype(np.float32)}
    sd.update(acb_state(rng, "layer1.conv1.acb", 8, 8))
    sd.update(acb_state(rng, "layer2.conv1", 8, 16, k=5, k1=3, last_bn=True))
    sd.update(bn_stats(rng, 16, "last_bn"))
    sd["fc.weight"] = rng.normal(0, 0.3, (10, 16)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.3, 10).astype(np.float32)
    return sd


def save_safetensors(sd: dict[str, np.ndarray], path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
    return path
