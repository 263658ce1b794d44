"""Export every built-in architecture and print what README's "Export to ONNX" table shows.

For each architecture: a training checkpoint with random weights and BN statistics
(seeded), ``export_onnx`` at the architecture's own input shape, and, for the "before"
column, the training-time net exported by the same exporter. Prints a Markdown table:
ONNX Runtime vs the training net (max rel), Conv/Add/total nodes of both graphs,
export time (the torch.onnx call alone) and file size.

    PYTHONPATH=$PWD python benchmarks/bench_export.py [ARCH ...] [--input-shape 3,64,64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from acnet_convert import onnxio
from acnet_convert.export import ExportOptions, export_onnx
from acnet_convert.testing import randomise_bn_stats
from acnet_convert.zoo import ARCHS, build_arch


def _row(arch: str, root: Path, shape: tuple[int, ...] | None) -> str:
    torch.manual_seed(0)
    net = randomise_bn_stats(build_arch(arch, "train"), 0).eval()
    ckpt = root / f"{arch}.pth"
    torch.save(net.state_dict(), ckpt)
    out = root / f"{arch}.onnx"
    result = export_onnx(ckpt, out, ExportOptions(arch=arch, input_shape=shape, force=True))
    used = result.input_shape
    before_path = root / f"{arch}.train.onnx"
    onnxio.export_graph(net, torch.randn(2, *used), before_path, None, False)
    before = onnxio.graph_nodes(onnxio.load_graph(before_path))
    after = result.onnx_nodes
    train_rel = max(c.max_rel for c in result.cases if "training" in c.name)
    deploy_rel = max(c.max_rel for c in result.cases if "deployed" in c.name)
    flagged = len(result.quant.flagged)

    def nodes(counts: dict[str, int]) -> str:
        return f"{counts.get('Conv', 0)} / {counts.get('Add', 0)} / {sum(counts.values())}"

    return (
        f"| {arch} | {'x'.join(map(str, used))} | {train_rel:.2g} | {deploy_rel:.2g} | "
        f"{nodes(before)} | {nodes(after)} | {result.export_seconds:.1f} | "
        f"{result.onnx_bytes / 1e6:.1f} | {flagged}/{len(result.quant.layers)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=list(ARCHS))
    parser.add_argument("--input-shape", default=None, help="C,H,W for every arch")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.input_shape.split(",")) if args.input_shape else None
    print(
        "| arch | input | max rel vs training | max rel vs deploy | Conv/Add/total before "
        "| Conv/Add/total after | export s | MB | int8 flagged |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        for arch in args.archs:
            print(_row(arch, Path(tmp), shape), flush=True)
        print(f"\n(total {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
