"""Fuzzing the command line with damaged checkpoints in every input format.

Small valid checkpoints are mutated (truncation, bit flips, byte ranges
overwritten, safetensors header fields replaced, the pickle inside a .pth
edited and re-zipped) and fed to ``fuse`` and ``inspect`` in-process. Whatever
the bytes, the command must end with exit 0 (the damage hit tensor values and
left a valid checkpoint) or 3 (refused), in one line on stderr, never a
traceback or an internal error, and leave nothing behind but a complete output.
Damage that makes a weight huge yet finite, so that the fused value overflows
the checkpoint's dtype, is refused too (test_hostile.py builds such a case).

The examples are fixed (``derandomize``) for a given Hypothesis version and set
of loaded modules (Hypothesis also draws constants from the code under test).
1200 of them take about 15 s on two cores. The helpers here also drive
``tools/fuzz_long.py`` for longer runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FORMATS = ("safetensors", "pth", "hdf5")
SUFFIX = {"safetensors": ".safetensors", "pth": ".pth", "hdf5": ".hdf5"}
ALLOWED_EXITS = {0, 3}

# A mutation is a tuple: ("truncate", at), ("flip", at, bit), ("overwrite", at, data),
# ("header", tensor index, field, value) for safetensors, ("pickle", at, data) for .pth.
Mutation = tuple[Any, ...]

# Values a lying safetensors header may hold, per field.
HEADER_VALUES: dict[str, list[Any]] = {
    "dtype": ["F8_E4M3", "I64", "U8", "BOOL", "F16", "BF16", "F64", 7, None, ["F32"], "f32"],
    "shape": [[], [0], [2**40, 2**40], [2**62], [-1], [3.0], "3", None, [1] * 64, [0, 2**63]],
    "data_offsets": [
        [0, 0],
        [0, 2**62],
        [-8, 8],
        [8, 0],
        [0],
        "0,8",
        [0.0, 8.0],
        [2**64, 2**64 + 8],
    ],
    "name": ["", "module.", "__metadata__", "x" * 5000, "a.square_conv.weight", "\u00e9\u0000"],
    "extra": [{"__metadata__": {"k": 1}}, {"__metadata__": []}, {"__metadata__": None}, {"z": {}}],
}


def _state() -> dict[str, np.ndarray]:
    """Two blocks (3x3 and 5x5 with a 1x3 branch and a last_bn) plus pass-through tensors."""
    from conftest import acb_state, bn_stats

    rng = np.random.default_rng(7)
    sd: dict[str, np.ndarray] = {"stem.weight": rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32)}
    sd.update(acb_state(rng, "layer1.acb", 4, 4))
    sd.update(acb_state(rng, "layer2", 4, 4, k=5, k1=3, last_bn=True))
    sd.update(bn_stats(rng, 4, "last_bn"))
    sd["fc.weight"] = rng.normal(0, 0.3, (3, 4)).astype(np.float32)
    return sd


def build_fixture(fmt: str, folder: Path) -> Path:
    """A small valid training checkpoint in ``fmt``, written the way its ecosystem writes it."""
    sd = _state()
    path = folder / f"train{SUFFIX[fmt]}"
    if fmt == "safetensors":
        from conftest import save_safetensors

        save_safetensors(sd, path)
    elif fmt == "pth":
        import torch

        torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "iteration": 3}, path)
    else:
        import h5py

        # Upstream ACNet's save_hdf5: one flat dataset per key, '/' stored as '+'.
        with h5py.File(path, "w") as f:
            for key, value in sd.items():
                f.create_dataset(key.replace("/", "+"), data=value)
            f.create_dataset("deps", data=np.array([4, 4], dtype=np.int64))
    return path


def _safetensors_header_edit(data: bytes, index: int, field: str, value: Any) -> bytes:
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError:  # an earlier mutation broke the header already
        return data
    names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    if not names:
        return data
    name = names[index % len(names)]
    if field == "name":
        header[value] = header.pop(name)
    elif field == "extra":
        header.update(value)
    else:
        header[name][field] = value
    raw = json.dumps(header).encode("utf-8")
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def _pickle_edit(data: bytes, at: int, patch: bytes) -> bytes:
    """Overwrite bytes of the pickle inside a torch zip and re-zip it with valid checksums."""
    try:
        src = zipfile.ZipFile(io.BytesIO(data))
    except Exception:  # an earlier mutation broke the archive already; zipfile raises many kinds
        return data
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        warnings.simplefilter("ignore")  # duplicate member names, from earlier damage
        for info in src.infolist():
            try:
                member = src.read(info.filename)
            except Exception:
                return data
            if info.filename.endswith("/data.pkl"):
                at %= max(len(member), 1)
                member = member[:at] + patch + member[at + len(patch) :]
            dst.writestr(info.filename, member)
    return out.getvalue()


# Pickle fragments that attack the reader's bounds (round 2 of the hostile-input
# work): bytearray(n), a shared-reference nest, a tuple-hash nest used as a key,
# a persistent id that is a nest, a stride-0 view description.
def _nest(levels: int, build: bytes) -> bytes:
    out = b"]r" + (900_000).to_bytes(4, "little")
    for i in range(1, levels + 1):
        prev = b"j" + (900_000 + i - 1).to_bytes(4, "little")
        out += b"0" + build.replace(b"P", prev) + b"r" + (900_000 + i).to_bytes(4, "little")
    return out


HOSTILE_SNIPPETS = (
    b"c__builtin__\nbytearray\n(J\xff\xff\xff\x7ftR",
    _nest(24, b"](" + b"P" * 8 + b"e"),
    _nest(60, b"PP\x86") + b"}j" + (900_060).to_bytes(4, "little") + b"K\x01s",
    _nest(40, b"](" + b"P" * 8 + b"e") + b"Q",
    b"(K\x00J\x00\x00\x00\x10\x85K\x00\x85t",  # offset 0, size (2**28,), stride (0,)
)


def _deflate_pickle(data: bytes, padding: int) -> bytes:
    """Re-zip with data.pkl deflated and ``padding`` zero bytes after its STOP opcode."""
    try:
        src = zipfile.ZipFile(io.BytesIO(data))
        members = [(i.filename, src.read(i.filename)) for i in src.infolist()]
    except Exception:  # an earlier mutation broke the archive already
        return data
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as dst:
        warnings.simplefilter("ignore")
        for name, member in members:
            if name.endswith("/data.pkl"):
                dst.writestr(name, member + b"\0" * padding, compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(name, member, compress_type=zipfile.ZIP_STORED)
    return out.getvalue()


def mutate(data: bytes, fmt: str, mutations: Sequence[Mutation]) -> bytes:
    """Apply ``mutations`` in order; positions wrap around the current length."""
    for m in mutations:
        kind = m[0]
        if not data:
            break
        if kind == "truncate":
            data = data[: m[1] % len(data)]
        elif kind == "flip":
            at = m[1] % len(data)
            data = data[:at] + bytes([data[at] ^ (1 << m[2])]) + data[at + 1 :]
        elif kind == "overwrite":
            at = m[1] % len(data)
            data = data[:at] + m[2] + data[at + len(m[2]) :]
        elif kind == "header" and fmt == "safetensors":
            data = _safetensors_header_edit(data, m[1], m[2], m[3])
        elif kind == "pickle" and fmt == "pth":
            data = _pickle_edit(data, m[1], m[2])
        elif kind == "hostile" and fmt == "pth":
            data = _pickle_edit(data, m[1], HOSTILE_SNIPPETS[m[2] % len(HOSTILE_SNIPPETS)])
        elif kind == "deflate" and fmt == "pth":
            data = _deflate_pickle(data, m[1])
    return data


def random_mutations(rng: random.Random, fmt: str, size: int) -> list[Mutation]:
    """One to three mutations drawn from ``rng`` (for tools/fuzz_long.py)."""
    out: list[Mutation] = []
    for _ in range(rng.randint(1, 3)):
        kinds = ["truncate", "flip", "flip", "overwrite"]
        if fmt == "safetensors":
            kinds += ["header", "header"]
        if fmt == "pth":
            kinds += ["pickle", "pickle", "hostile", "deflate"]
        kind = rng.choice(kinds)
        # Half the positions fall in the first KiB, where headers and indexes live.
        at = rng.randrange(min(size, 1024)) if rng.random() < 0.5 else rng.randrange(size)
        if kind == "truncate":
            out.append((kind, at))
        elif kind == "flip":
            out.append((kind, at, rng.randrange(8)))
        elif kind in ("overwrite", "pickle"):
            out.append((kind, at, rng.randbytes(rng.randint(1, 16))))
        elif kind == "hostile":
            out.append((kind, at, rng.randrange(len(HOSTILE_SNIPPETS))))
        elif kind == "deflate":
            out.append((kind, rng.choice((0, 2**20, 64 * 2**20))))
        else:
            field = rng.choice(sorted(HEADER_VALUES))
            out.append((kind, rng.randrange(64), field, rng.choice(HEADER_VALUES[field])))
    return out


@dataclass(frozen=True)
class Outcome:
    """One CLI run on a damaged file: exit code and, if it misbehaved, why."""

    command: str
    exit_code: int
    problem: str | None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_damaged(
    invoke: Callable[[Sequence[str]], Any], data: bytes, fmt: str, folder: Path
) -> list[Outcome]:
    """Write ``data`` into the empty ``folder`` and run fuse and inspect on it.

    ``invoke(args)`` runs the CLI in-process and returns click's ``Result``.
    """
    src = folder / f"damaged{SUFFIX[fmt]}"
    src.write_bytes(data)
    before = _digest(src)
    outcomes = []
    for command in ("fuse", "inspect"):
        out = folder / "fused.safetensors"
        args = [command, str(src), str(out)] if command == "fuse" else [command, str(src)]
        result = invoke(args)
        outcomes.append(Outcome(command, result.exit_code, _misbehaviour(result, folder, src, out)))
        if _digest(src) != before:
            outcomes.append(Outcome(command, result.exit_code, "the input file changed"))
        out.unlink(missing_ok=True)
    return outcomes


def _misbehaviour(result: Any, folder: Path, src: Path, out: Path) -> str | None:
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"exception escaped: {result.exception!r}"
    if code not in ALLOWED_EXITS:
        return f"exit {code}: {result.stderr.strip()[-300:]}"
    text = result.stdout + result.stderr
    if "Traceback" in text:
        return "traceback in the output"
    if "Warning" in result.stderr:
        return f"a Python warning on stderr: {result.stderr.strip()[:300]}"
    left = sorted(p.name for p in folder.iterdir())
    expected = sorted([src.name, out.name] if code == 0 and out.exists() else [src.name])
    if left != expected:
        return f"folder holds {left}, expected {expected}"
    if code != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if len(lines) != 1 or not lines[0].startswith("error:"):
            return f"stderr is not one error line: {result.stderr!r}"
    return None


# --- the test ------------------------------------------------------------------

_fixtures: dict[str, bytes] = {}


def _fixture_bytes(fmt: str) -> bytes:
    if fmt not in _fixtures:
        with tempfile.TemporaryDirectory() as tmp:
            _fixtures[fmt] = build_fixture(fmt, Path(tmp)).read_bytes()
    return _fixtures[fmt]


_positions = st.integers(min_value=0, max_value=2**20)
_early = st.integers(min_value=0, max_value=1023)  # where headers and indexes live
_common = [
    st.tuples(st.just("truncate"), st.one_of(_early, _positions)),
    st.tuples(st.just("flip"), st.one_of(_early, _positions), st.integers(0, 7)),
    st.tuples(
        st.just("overwrite"), st.one_of(_early, _positions), st.binary(min_size=1, max_size=16)
    ),
]
_header = st.sampled_from(sorted(HEADER_VALUES)).flatmap(
    lambda field: st.tuples(
        st.just("header"), st.integers(0, 63), st.just(field), st.sampled_from(HEADER_VALUES[field])
    )
)
_pickle = st.tuples(st.just("pickle"), st.integers(0, 4095), st.binary(min_size=1, max_size=8))
MUTATIONS = {
    "safetensors": st.one_of(*_common, _header),
    "pth": st.one_of(*_common, _pickle),
    "hdf5": st.one_of(*_common),
}


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, list[Mutation]]:
    fmt = draw(st.sampled_from(FORMATS))
    return fmt, draw(st.lists(MUTATIONS[fmt], min_size=1, max_size=3))


@settings(
    max_examples=1200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=damaged())
def test_damaged_checkpoints_never_crash_or_leave_files(
    case: tuple[str, list[Mutation]], run_cli: Any, tmp_path: Path
) -> None:
    fmt, mutations = case
    data = mutate(_fixture_bytes(fmt), fmt, mutations)
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        outcomes = run_damaged(lambda args: run_cli(*args, expect=None), data, fmt, Path(tmp))
    problems = [f"{o.command}: {o.problem}" for o in outcomes if o.problem]
    assert not problems, f"{fmt} {mutations!r}: {problems}"


def test_fixtures_fuse_cleanly(run_cli: Any, tmp_path: Path) -> None:
    for fmt in FORMATS:
        folder = tmp_path / fmt
        folder.mkdir()
        outcomes = run_damaged(
            lambda args: run_cli(*args, expect=None), _fixture_bytes(fmt), fmt, folder
        )
        assert [(o.exit_code, o.problem) for o in outcomes] == [(0, None), (0, None)], fmt
