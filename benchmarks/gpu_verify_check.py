"""Check ``acnet-convert verify --device cuda`` end to end on a machine with a GPU.

For each architecture: build a training-time net with random BN statistics,
save it, fuse it with the command line, then run ``verify`` on CUDA in float32
and float64 (TF32 is off inside verify), once more on the CPU for reference,
and once on a copy with one fused weight nudged by 1e-3, which must exit 1.
Prints the figures and exits 0 only when every run ended as expected.

    python benchmarks/gpu_verify_check.py                  # cfqkbnc, src56, sres18
    python benchmarks/gpu_verify_check.py sres50 --batch 4 --keep /tmp/ckpts

Runs from a checkout without installing: the repo root is put on the path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoints(arch: str, folder: Path) -> tuple[Path, Path, Path]:
    """Training checkpoint, its fused form, and the fused form with one weight nudged."""
    import torch
    from safetensors.torch import load_file, save_file

    from acnet_convert.testing import randomise_bn_stats
    from acnet_convert.zoo import build_arch

    torch.manual_seed(0)
    net = randomise_bn_stats(build_arch(arch, "train"), seed=1)
    train = folder / f"{arch}_train.pth"
    fused = folder / f"{arch}_fused.safetensors"
    torch.save(net.state_dict(), train)
    cli("fuse", str(train), str(fused), "--force", "--quiet", check=True)
    state = load_file(str(fused))
    key = next(k for k in state if k.endswith("fused_conv.weight"))
    state[key].view(-1)[0] += 1e-3
    nudged = folder / f"{arch}_nudged.safetensors"
    save_file(state, str(nudged))
    return train, fused, nudged


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "acnet_convert", *args], capture_output=True, text=True, env=env
    )
    if check and done.returncode != 0:
        raise SystemExit(f"acnet-convert {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def verify(
    train: Path, fused: Path, device: str, dtype: str, batch: int
) -> tuple[int, dict[str, Any], str, float]:
    began = time.perf_counter()
    done = cli(
        "verify", str(train), str(fused), "--device", device, "--dtype", dtype,
        "--batch", str(batch), "--json", "--quiet",
    )  # fmt: skip
    seconds = time.perf_counter() - began
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        report = {}
    return done.returncode, report, done.stderr.strip(), seconds


def num(value: Any) -> float:
    """A report figure as a float: JSON numbers, the strings 'inf'/'nan', or nan when absent."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("archs", nargs="*", default=["cfqkbnc", "src56", "sres18"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="Folder for the checkpoints (default: a temporary one).",
    )
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here; this check needs one", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
    header = (
        f"{'arch':<12} {'run':<22} {'exit':>4} {'max_abs':>10} {'max_rel':>10} {'cosine':>14} "
        f"{'top-1':>6} {'worst block rel':>15} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for arch in args.archs:
            train, fused, nudged = build_checkpoints(arch, folder)
            runs = [
                ("cuda float32", fused, "cuda", "float32", 0),
                ("cuda float64", fused, "cuda", "float64", 0),
                ("cpu float32", fused, "cpu", "float32", 0),
                ("cuda float32 nudged", nudged, "cuda", "float32", 1),
                ("cuda float64 nudged", nudged, "cuda", "float64", 1),
            ]
            for label, target, device, dtype, expected in runs:
                code, report, stderr, seconds = verify(train, target, device, dtype, args.batch)
                net = (report.get("cases") or [{}])[0]
                blocks = report.get("block_checks") or []
                worst = max((num(b.get("max_rel")) for b in blocks), default=float("nan"))
                top1 = net.get("top1_agreement")
                print(
                    f"{arch:<12} {label:<22} {code:>4} {num(net.get('max_abs')):>10.3g} "
                    f"{num(net.get('max_rel')):>10.3g} {num(net.get('cosine')):>14.10f} "
                    f"{'-' if top1 is None else f'{top1:.0%}':>6} {worst:>15.3g} {seconds:>6.1f}"
                )
                if code != expected:
                    ok = False
                    print(f"  ! expected exit {expected}, got {code}: {stderr}")
                elif expected == 1:
                    print(f"  (as expected) {stderr.splitlines()[-1] if stderr else ''}")
    print("all runs ended as expected" if ok else "SOME RUNS DID NOT END AS EXPECTED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
