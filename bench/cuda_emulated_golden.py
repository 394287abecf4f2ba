"""Accuracy of the CUDA kernels on whole nets, without a GPU: each golden net (real
Caffe's outputs, see the shared golden/README.md) lowered for the CUDA target in each
precision and run on the CPU emulator (graphc/codegen/cuda/emulate.py), compared with
the reference executor and with Caffe's blobs (relative L2 error of the outputs and of the
scores the final Softmax reads).

    python bench/cuda_emulated_golden.py GOLDEN_DIR [--nets lenet,...] [--precisions fp32,tf32]
                                         [--out bench/results/cuda_emulated_golden.md]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run(d: Path, name: str, precision: str) -> list[tuple]:
    import graphc
    from golden import apply_rule, manifest
    from graphc.codegen.cuda.emulate import run_program
    from graphc.codegen.cuda.lower import lower_graph
    from graphc.passes import run_pipeline
    from graphc.runtime.testing import rel_l2
    man = manifest(d)
    model = d / f"{name}.caffemodel"
    net = graphc.Net(str(d / "net.prototxt"), phase="test",
                     weights=str(model) if model.exists() else None)
    if not model.exists():
        apply_rule(net, man)
    x = np.load(d / "input.npy")
    blob = man["input_blob"]
    want = net.forward(**{blob: x})
    g = net.graph.copy()
    for v in [n.inputs[0] for n in g.nodes if n.op == "Softmax" and n.outputs[0] in g.outputs]:
        if v not in g.outputs:
            g.outputs.append(v)
            want[g.blob_of[v]] = net.blobs[g.blob_of[v]]
    program = lower_graph(run_pipeline(g), precision=precision, compile=False)
    t = time.perf_counter()
    got = run_program(program, {blob: x})
    secs = time.perf_counter() - t
    golden = np.load(d / "outputs.npz")
    rows = []
    for k, v in got.items():
        caffe = rel_l2(v, golden[k][:v.shape[0]]) if k in golden.files else None
        rows.append((name, precision, k, list(v.shape), rel_l2(v, want[k]), caffe, secs))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("golden", help="the shared golden/ directory")
    ap.add_argument("--nets", default="lenet,cifar10_quick,alexnet_deploy,caffenet_deploy,"
                    "squeezenet11_deploy,mobilenet_deploy,googlenet_deploy,resnet50_deploy")
    ap.add_argument("--precisions", default="fp32,tf32,fp16,bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = ["# CUDA kernels on the golden nets (CPU emulator, no GPU)", "",
             "Command: `python bench/cuda_emulated_golden.py GOLDEN_DIR --nets "
             f"{args.nets} --precisions {args.precisions}` (GOLDEN_DIR: the shared golden "
             "data). Relative L2 error of each output vs graphc's reference executor and vs "
             "real Caffe's blob (the golden batch).", "",
             "| net | precision | output | shape | vs reference | vs Caffe | emulated (s) |",
             "|---|---|---|---|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name in args.nets.split(","):
        for prec in args.precisions.split(","):
            for r in run(Path(args.golden) / name, name, prec):
                caffe = "-" if r[5] is None else f"{r[5]:.2e}"
                line = (f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2e} | {caffe} | "
                        f"{r[6]:.1f} |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
