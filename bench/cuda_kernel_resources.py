"""ptxas's resources (registers, static shared memory, stack, spills) of every CUDA kernel
instantiation the nets of a zoo directory need, in every precision, compiled by NVRTC
for one architecture; and how long the compile check takes from a cold cache.
No GPU needed.

    python bench/cuda_kernel_resources.py ZOO_DIR [--arch sm_90] [--out bench/results/cuda_kernel_resources.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", help="directory of Caffe prototxt files")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    args = ap.parse_args()
    os.environ["GRAPHC_CACHE"] = tempfile.mkdtemp(prefix="graphc-cold-")   # a cold cache
    from graphc.codegen.cuda.check import compile_check, descriptions, instantiations, \
        resource_table, spilling, zoo_graphs
    from graphc.codegen.cuda.nvrtc import nvrtc_version
    t0, c0 = time.perf_counter(), time.process_time()
    graphs = zoo_graphs(args.zoo)
    t1, c1 = time.perf_counter(), time.process_time()
    info = compile_check(graphs, args.arch)
    t2, c2 = time.perf_counter(), time.process_time()
    sources = {}
    for g in graphs.values():
        sources.update(instantiations(g, arch=args.arch))
    per_net = {n: len(instantiations(g, arch=args.arch)) for n, g in graphs.items()}
    major, minor = nvrtc_version()
    lines = [
        f"# CUDA kernel resources ({args.arch}, NVRTC {major}.{minor}, all precisions)", "",
        "Command: `python bench/cuda_kernel_resources.py ZOO_DIR --arch "
        f"{args.arch} --out bench/results/cuda_kernel_resources.md` (ZOO_DIR: the shared "
        "model-zoo prototxt directory).", "",
        f"- nets: {len(graphs)}; distinct kernel instantiations: {len(info)} "
        f"(per net, all precisions: {', '.join(f'{n} {k}' for n, k in per_net.items())})",
        f"- loading + optimizing the nets: {t1 - t0:.1f} s wall ({c1 - c0:.1f} s CPU)",
        f"- compile check, cold cache: {t2 - t1:.1f} s wall ({c2 - c1:.1f} s CPU of this "
        f"process; the machine was shared, so wall time varies)",
        f"- conv/GEMM kernels that spill: {len(spilling(info))}", "",
        resource_table(info, descriptions(sources)), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if spilling(info) else 0


if __name__ == "__main__":
    sys.exit(main())
