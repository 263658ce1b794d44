"""Paddle .pdparams: read and write, sniffed by content; pickles that would run code are refused.

The .pdparams files here are written from the format's definition (paddle.save pickles a
dict of name -> numpy array with protocol 2..4; Paddle >= 2.1 reduces a tensor to
``tuple((name, ndarray))``), from the seeded paddle_resnet fixture.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from acnet_convert.checkpoint import open_checkpoint
from acnet_convert.checkpoint.sniff import sniff_format
from acnet_convert.errors import BadCheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    from conftest import CliRun

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PADDLE = FIXTURES / "dialects" / "paddle_resnet.safetensors"


class _Varbase:
    """Pickles as Paddle >= 2.1's reduce_varbase does: tuple((name, ndarray))."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def __reduce__(self) -> tuple[Any, ...]:
        return tuple, ((self.name, self.array),)


def _state() -> dict[str, np.ndarray]:
    return dict(load_file(str(PADDLE)))


def _pdparams(path: Path, style: str = "2.0", protocol: int = 4) -> Path:
    sd = _state()
    obj: dict[str, Any]
    if style == "2.1":
        obj = {k: _Varbase(k, v) for k, v in sd.items()}
        obj["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(sd)}
    else:
        obj = dict(sd)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize(("style", "protocol"), [("2.0", 2), ("2.0", 3), ("2.0", 4), ("2.1", 4)])
def test_pdparams_fuses_like_safetensors(
    tmp_path: Path, run_cli: CliRun, style: str, protocol: int
) -> None:
    src = _pdparams(tmp_path / "train.pdparams", style, protocol)
    assert sniff_format(src) == "pdparams"
    with open_checkpoint(src) as reader:
        assert reader.format == "pdparams" and set(reader.tensors) == set(_state())
        for key, value in _state().items():
            np.testing.assert_array_equal(reader.read(key), value)
        if style == "2.1":
            assert reader.container.dropped == ("StructuredToParameterName@@",)
    out = tmp_path / "fused.pdparams"
    result = run_cli("fuse", src, out, "--json")
    assert json.loads(result.stdout)["format_out"] == "pdparams"
    reference = tmp_path / "reference.safetensors"
    run_cli("fuse", PADDLE, reference)
    written = pickle.loads(out.read_bytes())  # numpy's own unpickler: what paddle.load does
    expected = load_file(str(reference))
    assert set(written) == set(expected) and "res2a_branch2b_acsquare_bias" in written
    for key, value in expected.items():
        assert written[key].dtype == value.dtype
        np.testing.assert_array_equal(written[key], value)
    verified = json.loads(run_cli("verify", src, out, "--json").stdout)
    assert verified["passed"] is True and verified["mode"] == "blocks"


def test_big_endian_and_fortran_arrays_read_as_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 4)).astype(">f4")
    b = np.asfortranarray(rng.normal(size=(2, 5)))
    path = tmp_path / "odd.pdparams"
    path.write_bytes(pickle.dumps({"a": a, "b": b}, protocol=2))
    with open_checkpoint(path) as reader:
        assert reader.tensors["a"].dtype == "float32" and reader.tensors["b"].dtype == "float64"
        np.testing.assert_array_equal(reader.read("a"), a.astype("<f4"))
        np.testing.assert_array_equal(reader.read("b"), b)
        assert reader.read("b").flags.c_contiguous


def test_torch_legacy_pickle_is_still_pth(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert sniff_format(path) == "pth-legacy"


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        ([np.zeros(2, np.float32)], "pickles a list, not a dict"),
        ({"w": np.array(["a"], dtype=object)}, "numpy dtype 'O8' is not a numeric type"),
        ({"w": np.zeros(2, dtype=[("x", "<f4")])}, "not a numeric type"),
        ({"w": np.zeros(2, dtype=np.complex64)}, "not a numeric type"),
        ({}, "holds no arrays"),
    ],
)
def test_unreadable_pdparams_says_so(tmp_path: Path, obj: object, says: str) -> None:
    path = tmp_path / "bad.pdparams"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises((BadCheckpointError, UnsafeCheckpointError), match=says) as info:
        open_checkpoint(path)
    assert str(path) in str(info.value) and info.value.exit_code == 3
    if says != "holds no arrays":
        assert "cannot be read as a Paddle .pdparams" in str(info.value)


def test_truncated_or_lying_pdparams_is_refused(tmp_path: Path, run_cli: CliRun) -> None:
    whole = _pdparams(tmp_path / "whole.pdparams").read_bytes()
    cut = tmp_path / "cut.pdparams"
    cut.write_bytes(whole[: len(whole) // 2])
    result = run_cli("inspect", cut, expect=3)
    assert "cannot be read as a Paddle .pdparams" in result.stderr
    assert "truncated or corrupt" in " ".join(result.stderr.split())
    # An array whose state claims more elements than its bytes hold.
    lying = bytearray(pickle.dumps({"w": np.zeros((2, 3), np.float32)}, protocol=2))
    at = lying.index(b"K\x02K\x03")  # BININT1 2, BININT1 3: the shape
    lying[at : at + 4] = b"K\x09K\x03"
    path = tmp_path / "lying.pdparams"
    path.write_bytes(bytes(lying))
    with pytest.raises(BadCheckpointError, match=r"needs 108 bytes, the pickle holds 24"):
        open_checkpoint(path)


def test_bfloat16_cannot_be_written_as_pdparams(tmp_path: Path, run_cli: CliRun) -> None:
    from safetensors.torch import save_file

    from acnet_convert.nn import ACBlock
    from acnet_convert.testing import randomise_bn_stats

    torch.manual_seed(0)
    block = ACBlock(2, 2, 3, padding=1)
    randomise_bn_stats(block, 0)
    src = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in block.state_dict().items()}, str(src))
    out = tmp_path / "fused.pdparams"
    result = run_cli("fuse", src, out, expect=3)
    assert "bfloat16, which a .pdparams (numpy) cannot hold" in " ".join(result.stderr.split())
    assert not out.exists()


# --- pickles that would run code, in a .pdparams and in a torch zip's data.pkl -------------


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Each payload creates ``marker`` if it runs; the value names the global it asks for."""
    touch = _unicode(f"touch {marker}")
    opener = _unicode(f"open({str(marker)!r}, 'w')")
    return {
        "os.system REDUCE": (b"\x80\x02cos\nsystem\n" + touch + b"\x85R.", "os.system"),
        "posix.system": (b"\x80\x02cposix\nsystem\n" + touch + b"\x85R.", "posix.system"),
        "builtins.eval": (b"\x80\x02cbuiltins\neval\n" + opener + b"\x85R.", "builtins.eval"),
        "builtins.exec": (b"\x80\x02c__builtin__\nexec\n" + opener + b"\x85R.", "builtins.exec"),
        "getattr chain": (
            b"\x80\x02cbuiltins\ngetattr\ncos\npath\n" + _unicode("exists") + b"\x86R.",
            "builtins.getattr",
        ),
        "subprocess GLOBAL": (
            b"\x80\x02csubprocess\ncheck_call\n" + _unicode("touch") + _unicode(str(marker))
            + b"\x86\x85R.",
            "subprocess.check_call",
        ),
        "INST": (b"\x80\x02(" + touch + b"ios\nsystem\n.", "os.system"),
        "OBJ": (b"\x80\x02(cos\nsystem\n" + touch + b"o.", "os.system"),
        "NEWOBJ": (b"\x80\x02csubprocess\nPopen\n" + touch + b"\x85\x81.", "subprocess.Popen"),
        "STACK_GLOBAL": (b"\x80\x04" + _unicode("os") + _unicode("system") + b"\x93" + touch
                         + b"\x85R.", "os.system"),
        "BUILD __setstate__": (
            b"\x80\x02ccollections\nOrderedDict\n)R}" + _unicode("__setstate__")
            + b"cos\nsystem\ns" + b"b.",
            "os.system",
        ),
    }  # fmt: skip


def _torch_zip_with(tmp_path: Path, pkl: bytes) -> Path:
    """A torch.save zip whose data.pkl is replaced by ``pkl`` (every other record kept)."""
    src = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, src)
    out = tmp_path / "evil.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = pkl if item.filename.endswith("/data.pkl") else zin.read(item)
            zout.writestr(item, data)
    return out


@pytest.mark.parametrize("container", ["pdparams", "pth-zip"])
@pytest.mark.parametrize("payload", list(_payloads(Path("m"))))
def test_code_running_pickle_is_refused(
    tmp_path: Path, run_cli: CliRun, container: str, payload: str
) -> None:
    marker = tmp_path / "code-ran"
    pkl, wanted = _payloads(marker)[payload]
    if container == "pdparams":
        src = tmp_path / "evil.pdparams"
        src.write_bytes(pkl)
    else:
        src = _torch_zip_with(tmp_path, pkl)
    assert sniff_format(src) == container
    result = run_cli("inspect", src, expect=3)
    line = " ".join(result.stderr.split())
    assert f"'{wanted}'" in line and "run code" in line and "--trust-pickle" in line, line
    assert not marker.exists(), "code from the file ran"


def test_payload_would_really_run_without_the_guard(tmp_path: Path) -> None:
    """The payloads are live: Python's own unpickler runs them (so the test above means it)."""
    marker = tmp_path / "code-ran"
    pickle.load(io.BytesIO(_payloads(marker)["os.system REDUCE"][0]))
    assert marker.exists()


# --- the Paddle fluid port's auto-named square-conv bias --------------------------------------


def _paddle_block_reference(sd: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    """res2a_branch2b in eval mode from its raw tensors (float64, BN eps 1e-5)."""
    import torch.nn.functional as F

    def t(key: str) -> torch.Tensor:
        return torch.from_numpy(sd[key].astype(np.float64))

    out = torch.zeros(())
    for branch in ("acsquare", "achor", "acver"):
        w = t(f"res2a_branch2b_{branch}_weights")
        bias_key = "res2a_branch2b.acsquare.conv2d.output.1.b_0"
        b = t(bias_key) if branch == "acsquare" else None
        y = F.conv2d(x, w, b, padding=(w.shape[2] // 2, w.shape[3] // 2))
        bn = f"bn2a_branch2b_{branch}"
        y = F.batch_norm(
            y, t(f"{bn}_mean"), t(f"{bn}_variance"), t(f"{bn}_scale"), t(f"{bn}_offset"), eps=1e-5
        )
        out = out + y
    return out


def test_fluid_square_conv_bias_is_folded(tmp_path: Path, run_cli: CliRun) -> None:
    sd = _state()
    channels = sd["res2a_branch2b_acsquare_weights"].shape[0]
    bias_key = "res2a_branch2b.acsquare.conv2d.output.1.b_0"
    sd[bias_key] = np.random.default_rng(8).normal(0, 0.5, channels).astype(np.float32)
    src = tmp_path / "fluid.pdparams"
    src.write_bytes(pickle.dumps(sd, protocol=2))
    out = tmp_path / "fused.safetensors"
    run_cli("fuse", src, out)
    fused = load_file(str(out))
    assert bias_key not in fused  # consumed by the block, not passed through
    w = torch.from_numpy(fused["res2a_branch2b_acsquare_weights"].astype(np.float64))
    b = torch.from_numpy(fused["res2a_branch2b_acsquare_bias"].astype(np.float64))
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, w.shape[1], 7, 7, generator=gen, dtype=torch.float64)
    got = torch.nn.functional.conv2d(x, w, b, padding=1)
    want = _paddle_block_reference(sd, x)
    # float32 storage of the fused kernel: ~1e-7 relative; the bias matters at ~1e-1.
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


# --- a whole pickled model (YOLOv7/YOLOv6 training checkpoints) ---------------------------------


def _pickled_model(module: str, name: str) -> bytes:
    """``{'model': <module>.<name>(), 'epoch': 1}`` as YOLO's train.py pickles it (GLOBAL + REDUCE),
    built from opcodes, so no YOLO code is needed."""
    key = _unicode("model")
    return (
        pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK
        + key + pickle.GLOBAL + f"{module}\n{name}\n".encode() + pickle.EMPTY_TUPLE + pickle.REDUCE
        + _unicode("epoch") + pickle.BININT1 + b"\x01"
        + pickle.SETITEMS + pickle.STOP
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "name"), [("models.yolo", "Model"), ("yolov6.models.yolo", "Model")]
)
def test_a_pickled_model_is_refused_with_the_state_dict_advice(
    tmp_path: Path, run_cli: CliRun, module: str, name: str
) -> None:
    pkl = _pickled_model(module, name)
    pickletools.dis(pkl, out=io.StringIO())  # well-formed
    src = _torch_zip_with(tmp_path, pkl)
    out = tmp_path / "o.safetensors"
    result = run_cli("fuse", src, out, expect=3)
    line = " ".join(result.stderr.split())
    assert f"'{module}.{name}'" in line and "pickled nn.Module" in line, line
    assert "save model.state_dict() first" in line and not out.exists()


def test_other_refused_globals_get_no_state_dict_advice(tmp_path: Path, run_cli: CliRun) -> None:
    src = _torch_zip_with(tmp_path, _pickled_model("subprocess", "Popen"))
    result = run_cli("inspect", src, expect=3)
    assert "'subprocess.Popen'" in result.stderr and "state_dict" not in result.stderr


def test_a_build_cannot_rewrite_an_allowed_global() -> None:
    # BUILD with slot state on numpy's _reconstruct: it would swap the function it calls
    from acnet_convert.checkpoint.pdparams import PdparamsUnpickler

    data = b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nN}X\x03\x00\x00\x00_fncnumpy\ndtype\ns\x86b."
    with pytest.raises(AttributeError, match="read-only"):
        PdparamsUnpickler(data, Path("crafted.pdparams")).load()
