"""How long ``acnet-convert fuse`` takes, next to what the same file costs to copy or round-trip.

Generates seeded training-time checkpoints shaped like upstream ACNet's
ImageNet ResNet-50 (``sres50``: every bottleneck 3x3 conv is an ACB, keys such
as ``stage1.block0.conv2.acb.square_conv.weight``), once at width 1 (~133 MB)
and once at width 2 (4x the parameters, ~0.5 GB), in each format (.pth written
by torch.save, upstream ACNet's flat .hdf5, .safetensors). Then, per file and
interleaved over the repetitions, it times as separate processes:

``fuse``      the ``acnet-convert`` console script, as a user runs it;
``cp``        ``cp`` of the same file;
``torch``     a minimal load-and-save through torch, import included
              (.pth: torch.load/torch.save; .safetensors: safetensors.torch;
              .hdf5: h5py into torch tensors and back out, as upstream's
              ``model_load_hdf5``/``save_hdf5`` do);
``upstream``  (.hdf5 only) an upstream-style numpy+h5py converter, written here
              to behave like upstream's ``acnet/acnet_fusion.py``
              ``convert_acnet_weights``: whole file into a dict, fuse, write.

It prints median wall times, the ratios, the fuse process's peak RSS (from
``wait4``) against the file size, whether the fuse process imported torch
(``python -X importtime``), and the wall time of ``acnet-convert --help``.

With ``--nets`` it also times re-parameterization family checkpoints of the
same kind (benchmarks/family_states.py): ``dbb_res18`` (DiverseBranchBlock
ResNet-18, ~105 MB) and ``repvgg_a0`` (RepVGG-A0, ~37 MB), held to the same
targets as ACNet's ResNet-50 at width 1 (the upstream-style converter is
ACNet's, so it runs only for ``sres50``).

    python benchmarks/bench_fuse.py            # about 3-4 minutes on 2 cores
    python benchmarks/bench_fuse.py --quick    # fewer repetitions
    python benchmarks/bench_fuse.py --nets sres50,dbb_res18,repvgg_a0 --widths 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("pth", "hdf5", "safetensors")
NETS = ("sres50", "dbb_res18", "repvgg_a0")
SUFFIXES = {"pth": ".pth", "hdf5": ".hdf5", "safetensors": ".safetensors"}
# Upstream constants.py RESNET50_ORIGIN_DEPS_FLATTENED, per stage: (mid, out, blocks).
RESNET50_STAGES = ((64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3))
EPS = 1e-5

# Targets from the issue: ratios measured side by side in one run.
TARGET_CP = {1: 5.0, 2: 2.5}  # width -> fuse/cp
TARGET_UPSTREAM = 0.5
TARGET_RSS = 0.5
TARGET_HELP_S = 0.5


# --- the checkpoints ------------------------------------------------------------


def resnet50_state(width: int, seed: int) -> dict[str, Any]:
    """An ``sres50`` training-time state dict (numpy, float32), keys in module order.

    Mirrors ``acnet_convert.zoo.StagewiseResNet50('train')`` with every channel
    count times ``width``, without building the model: 1x1 units are
    ``<u>.conv`` + ``<u>.bn``, 3x3 units are ``<u>.acb.{square,ver,hor}_{conv,bn}``.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    sd: dict[str, Any] = {}

    def conv(name: str, cout: int, cin: int, kh: int, kw: int) -> None:
        scale = np.float32((2.0 / (cin * kh * kw)) ** 0.5)
        sd[name] = rng.standard_normal((cout, cin, kh, kw), dtype=np.float32) * scale

    def bn(prefix: str, c: int) -> None:
        sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{prefix}.bias"] = rng.normal(0.0, 0.1, c).astype(np.float32)
        sd[f"{prefix}.running_mean"] = rng.normal(0.0, 0.1, c).astype(np.float32)
        sd[f"{prefix}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{prefix}.num_batches_tracked"] = np.array(50_000, dtype=np.int64)

    def unit(prefix: str, cin: int, cout: int, k: int) -> None:
        if k == 1 or k >= 7:  # upstream keeps 1x1 and 7x7 convs plain
            conv(f"{prefix}.conv.weight", cout, cin, k, k)
            bn(f"{prefix}.bn", cout)
            return
        acb = f"{prefix}.acb"  # a Conv2dBNReLU unit wraps its block as 'acb'
        conv(f"{acb}.square_conv.weight", cout, cin, k, k)
        bn(f"{acb}.square_bn", cout)
        conv(f"{acb}.ver_conv.weight", cout, cin, k, 1)
        conv(f"{acb}.hor_conv.weight", cout, cin, 1, k)
        bn(f"{acb}.ver_bn", cout)
        bn(f"{acb}.hor_bn", cout)

    cin = 64 * width
    unit("conv1", 3, cin, 7)
    for s, (mid, out, blocks) in enumerate(RESNET50_STAGES, start=1):
        mid, out = mid * width, out * width
        unit(f"stage{s}.projection", cin, out, 1)
        for b in range(blocks):
            unit(f"stage{s}.block{b}.conv1", cin if b == 0 else out, mid, 1)
            unit(f"stage{s}.block{b}.conv2", mid, mid, 3)
            unit(f"stage{s}.block{b}.conv3", mid, out, 1)
        cin = out
    sd["fc.weight"] = rng.standard_normal((1000, cin), dtype=np.float32) * np.float32(0.01)
    sd["fc.bias"] = np.zeros(1000, dtype=np.float32)
    return sd


def write_inputs(state: dict[str, Any], stem: Path, formats: Sequence[str]) -> dict[str, Path]:
    """``state`` saved as each format the way its usual tool saves it."""
    paths: dict[str, Path] = {}
    for fmt in formats:
        path = stem.with_suffix(SUFFIXES[fmt])
        if fmt == "pth":
            import torch

            torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
        elif fmt == "hdf5":
            import h5py

            with h5py.File(path, "w") as f:  # upstream utils/misc.py save_hdf5: '/' as '+'
                for key, value in state.items():
                    f.create_dataset(key.replace("/", "+"), data=value)
        else:
            from safetensors.numpy import save_file

            save_file(state, str(path))
        paths[fmt] = path
    return paths


def checkpoints(
    nets: str, widths: Sequence[int], seed: int
) -> list[tuple[str, int, Callable[[], dict[str, Any]]]]:
    """(name, width, state factory) for each requested net; families run at width 1 only."""
    from family_states import dbb_resnet18_state, repvgg_a0_state

    families = {"dbb_res18": dbb_resnet18_state, "repvgg_a0": repvgg_a0_state}
    out: list[tuple[str, int, Callable[[], dict[str, Any]]]] = []
    for net in [n for n in nets.split(",") if n]:
        if net == "sres50":
            out += [(net, w, lambda w=w: resnet50_state(w, seed)) for w in widths]
        elif net in families:
            out.append((net, 1, lambda f=families[net]: f(seed)))
        else:
            raise SystemExit(f"unknown net {net!r}; choose from {', '.join(NETS)}")
    return out


# --- the baselines, run as subprocesses of this file ------------------------------


def torch_round_trip(fmt: str, src: str, dst: str) -> None:
    """A minimal load-and-save of ``src`` through torch tensors, in the same format."""
    import torch

    if fmt == "pth":
        torch.save(torch.load(src, map_location="cpu", weights_only=True), dst)
    elif fmt == "safetensors":
        from safetensors.torch import load_file, save_file

        save_file(load_file(src), dst)
    else:
        import h5py
        import numpy as np

        with h5py.File(src, "r") as f:
            tensors = {key: torch.from_numpy(np.asarray(f[key])) for key in f}
        with h5py.File(dst, "w") as f:
            for key, tensor in tensors.items():
                f.create_dataset(key, data=tensor.numpy())


def upstream_style_convert(src: str, dst: str, eps: float = EPS) -> None:
    """Behaves like upstream ACNet's hdf5 converter: whole file in, fuse with numpy, whole file out.

    Reads every dataset into memory ('+' in names back to '/'), folds each
    branch BN into its kernel, adds the 1-D kernels into the centre of the
    square one, and writes ``fused_conv.{weight,bias}`` plus every key that
    has none of ``hor_``, ``ver_``, ``square_`` in its name.
    """
    import h5py
    import numpy as np

    with h5py.File(src, "r") as f:
        weights = {key.replace("+", "/"): np.asarray(f[key]) for key in f}
    marker = "square_conv.weight"
    out: dict[str, Any] = {}
    for name in [k for k in weights if marker in k]:
        base = name[: -len(marker)]
        kernel_sum = None
        bias_sum = 0.0
        for branch in ("square", "ver", "hor"):
            kernel = weights[f"{base}{branch}_conv.weight"]
            gamma = weights[f"{base}{branch}_bn.weight"]
            beta = weights[f"{base}{branch}_bn.bias"]
            mean = weights[f"{base}{branch}_bn.running_mean"]
            std = np.sqrt(weights[f"{base}{branch}_bn.running_var"] + eps)
            scaled = kernel * (gamma / std).reshape(-1, 1, 1, 1)
            bias_sum = bias_sum + beta - mean * gamma / std
            if kernel_sum is None:
                kernel_sum = scaled
            else:
                h, w = scaled.shape[2:]
                top = kernel_sum.shape[2] // 2 - h // 2
                left = kernel_sum.shape[3] // 2 - w // 2
                kernel_sum[:, :, top : top + h, left : left + w] += scaled
        out[f"{base}fused_conv.weight"] = kernel_sum
        out[f"{base}fused_conv.bias"] = bias_sum
    for key, value in weights.items():
        if "hor_" not in key and "ver_" not in key and "square_" not in key:
            out[key] = value
    with h5py.File(dst, "w") as f:
        for key, value in out.items():
            f.create_dataset(key.replace("/", "+"), data=value)


# --- timing -------------------------------------------------------------------------


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)  # bytes

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


# Forks, execs the command, waits with wait4 and reports wall time and peak RSS.
# A small process of its own because Linux counts, in a child's ru_maxrss, the
# resident size of the image it exec'ed from; run straight from this process
# (which holds the generated tensors, and torch) every child would seem as big.
LAUNCHER = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
elapsed = time.perf_counter() - started
with open(sys.argv[1], "w") as out:
    out.write(f"{elapsed!r} {usage.ru_maxrss * 1024} {os.waitstatus_to_exitcode(status)}")
"""


def run_measured(cmd: Sequence[str]) -> tuple[float, int, str]:
    """Wall time, peak RSS (bytes) and stderr of one command, measured around fork and wait4."""
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as result:
        launcher = [sys.executable, "-S", "-c", LAUNCHER, result.name, *cmd]
        subprocess.run(launcher, stdout=subprocess.DEVNULL, stderr=err, check=False)
        elapsed, rss, code = result.read().split()
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{text}")
    return float(elapsed), int(rss), text


def console_script() -> list[str]:
    """The installed ``acnet-convert`` entry point (not a pyenv/asdf shim in front of it)."""
    script = Path(sysconfig.get_path("scripts")) / "acnet-convert"
    if script.is_file():
        return [str(script)]
    found = shutil.which("acnet-convert")
    return [found] if found else [sys.executable, "-m", "acnet_convert"]


def imports_torch(cli: list[str], src: Path, dst: Path) -> bool:
    """Whether ``fuse`` imports torch, from ``python -X importtime``'s list."""
    cmd = cli if cli[0] == sys.executable else [sys.executable, *cli]
    _, _, text = run_measured(
        [sys.executable, "-X", "importtime", *cmd[1:], "fuse", "-q", "-f", str(src), str(dst)]
    )
    names = [
        line.rsplit("|", 1)[-1].strip()
        for line in text.splitlines()
        if line.startswith("import time:")
    ]
    dst.unlink(missing_ok=True)
    return any(n == "torch" or n.startswith("torch.") for n in names)


def commands(
    fmt: str, src: Path, out_dir: Path, cli: list[str], acnet: bool = True
) -> dict[str, list[str]]:
    me = [sys.executable, str(Path(__file__).resolve())]
    dst = str(out_dir / f"out{SUFFIXES[fmt]}")
    cmds = {
        "fuse": [*cli, "fuse", "-q", "-f", str(src), dst],
        "cp": ["cp", str(src), dst],
        "torch": [*me, "--torch-round-trip", fmt, str(src), dst],
    }
    if fmt == "hdf5" and acnet:
        cmds["upstream"] = [*me, "--upstream-convert", str(src), dst]
    return cmds


def clear(out_dir: Path) -> None:
    for path in out_dir.iterdir():
        path.unlink()


# --- the report -------------------------------------------------------------------


def fmt_ratio(a: float, b: float | None) -> str:
    return "-" if b is None else f"{a / b:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions per size (default 5 and 3)"
    )
    parser.add_argument(
        "--widths", default="1,2", help="width multipliers (1: ResNet-50; 2: 4x size)"
    )
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument(
        "--nets", default="sres50", help=f"checkpoints, comma-separated: {', '.join(NETS)}"
    )
    parser.add_argument("--tmpdir", type=Path, default=None, help="where to put the files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-round-trip", nargs=3, metavar=("FMT", "SRC", "DST"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--upstream-convert", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.torch_round_trip:
        torch_round_trip(*args.torch_round_trip)
        return 0
    if args.upstream_convert:
        upstream_style_convert(*args.upstream_convert)
        return 0

    began = time.perf_counter()
    widths = [int(w) for w in args.widths.split(",")]
    formats = [f for f in args.formats.split(",") if f]
    cli = console_script()
    work = Path(tempfile.mkdtemp(prefix="acnet-bench-", dir=args.tmpdir))
    rows: list[dict[str, Any]] = []
    try:
        out_dir = work / "out"
        out_dir.mkdir()
        for net, width, make_state in checkpoints(args.nets, widths, args.seed):
            reps = args.reps or (
                (2 if width == 1 else 1) if args.quick else (5 if width == 1 else 3)
            )
            gen = time.perf_counter()
            state = make_state()
            inputs = write_inputs(state, work / f"{net}_w{width}_train", formats)
            del state
            print(
                f"{net} width {width}: wrote {', '.join(p.name for p in inputs.values())} "
                f"in {time.perf_counter() - gen:.1f} s",
                file=sys.stderr,
            )
            samples = {fmt: {} for fmt in formats}  # type: dict[str, dict[str, Samples]]
            acnet = net == "sres50"
            plans = {fmt: commands(fmt, inputs[fmt], out_dir, cli, acnet) for fmt in formats}
            torch_used = {
                fmt: imports_torch(cli, inputs[fmt], out_dir / f"probe{SUFFIXES[fmt]}")
                for fmt in formats
            }
            for fmt in formats:  # warm the page cache and .pyc files, untimed
                run_measured(plans[fmt]["fuse"])
                clear(out_dir)
            for rep in range(reps):
                for fmt in formats:
                    names = list(plans[fmt])
                    shift = rep % len(names)  # rotate the order so no tool always goes first
                    for name in names[shift:] + names[:shift]:
                        seconds, rss, _ = run_measured(plans[fmt][name])
                        clear(out_dir)
                        print(
                            f"  {net} x{width**2} .{fmt} {name}: {seconds:.3f} s", file=sys.stderr
                        )
                        got = samples[fmt].setdefault(name, Samples())
                        got.seconds.append(seconds)
                        got.peak_rss.append(rss)
            for fmt in formats:
                s = samples[fmt]
                rows.append(
                    {
                        "net": net,
                        "width": width,
                        "format": fmt,
                        "size": inputs[fmt].stat().st_size,
                        "reps": reps,
                        "fuse": s["fuse"].median,
                        "cp": s["cp"].median,
                        "torch": s["torch"].median,
                        "upstream": s["upstream"].median if "upstream" in s else None,
                        "rss": max(s["fuse"].peak_rss),
                        "upstream_rss": max(s["upstream"].peak_rss) if "upstream" in s else None,
                        "torch_imported": torch_used[fmt],
                    }
                )
            for path in inputs.values():
                path.unlink()
        help_times = [run_measured([*cli, "--help"])[0] for _ in range(5)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print_report(rows, statistics.median(help_times), time.perf_counter() - began)
    return 0


def print_report(rows: list[dict[str, Any]], help_s: float, total_s: float) -> None:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {usable} of {os.cpu_count()} CPUs ({cpu}), Python {sys.version.split()[0]}")
    head = (
        f"{'checkpoint':<26}{'MB':>6}{'n':>3}{'fuse s':>8}{'cp s':>7}{'torch s':>8}{'upstr s':>8}"
        f"{'f/cp':>7}{'f/torch':>8}{'f/upstr':>8}{'RSS MB':>8}{'RSS/size':>9}{'torch?':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        name = f"{r['net']} x{r['width'] ** 2} .{r['format']}"
        upstream = f"{r['upstream']:.3f}" if r["upstream"] is not None else "-"
        torch_seen = "yes" if r["torch_imported"] else "no"
        print(
            f"{name:<26}{r['size'] / 1e6:>6.0f}{r['reps']:>3}{r['fuse']:>8.3f}{r['cp']:>7.3f}"
            f"{r['torch']:>8.3f}{upstream:>8}{fmt_ratio(r['fuse'], r['cp']):>7}"
            f"{fmt_ratio(r['fuse'], r['torch']):>8}{fmt_ratio(r['fuse'], r['upstream']):>8}"
            f"{r['rss'] / 1e6:>8.0f}{r['rss'] / r['size']:>9.2f}{torch_seen:>7}"
        )
    for r in rows:
        if r["upstream_rss"] is not None:
            print(
                f"upstream-style converter peak RSS, x{r['width'] ** 2}: "
                f"{r['upstream_rss'] / 1e6:.0f} MB ({r['upstream_rss'] / r['size']:.2f}x the file)"
            )
    print(f"acnet-convert --help: {help_s:.3f} s (median of 5)")
    print("targets:")
    for r in rows:
        limit = TARGET_CP.get(r["width"])
        name = f"{r['net']} x{r['width'] ** 2} .{r['format']}"
        checks = []
        if limit is not None:
            checks.append(_verdict(f"fuse/cp <= {limit:g}", r["fuse"] / r["cp"] <= limit))
        if r["upstream"] is not None and r["width"] == 1:
            checks.append(
                _verdict(
                    f"fuse/upstream <= {TARGET_UPSTREAM:g}",
                    r["fuse"] / r["upstream"] <= TARGET_UPSTREAM,
                )
            )
        checks.append(_verdict(f"RSS/size <= {TARGET_RSS:g}", r["rss"] / r["size"] <= TARGET_RSS))
        checks.append(_verdict("no torch", not r["torch_imported"]))
        print(f"  {name:<26}" + "  ".join(checks))
    print(f"  {'--help':<26}" + _verdict(f"< {TARGET_HELP_S:g} s", help_s < TARGET_HELP_S))
    print(f"benchmark wall time: {total_s:.0f} s")


def _verdict(label: str, ok: bool) -> str:
    return f"{label}: {'ok' if ok else 'MISSED'}"


if __name__ == "__main__":
    sys.exit(main())
