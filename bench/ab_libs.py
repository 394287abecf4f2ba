"""Compiled libraries side by side: the batch latency of two or more `graphc compile`
outputs (e.g. the same net built before and after a change), interleaved in one process.

    python bench/ab_libs.py [--rounds 30] [--pause 0.1] [--threads 2] A.so B.so ...

Each round runs every library once, alternating the order, with ``--pause`` seconds of
idle before each run (0: back to back).  Libraries with the same inputs get the same
random input, and their outputs are compared with the first's (relative L2) before
anything is timed.  Prints the median, p90 and minimum per library and each median's
ratio to the first's.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--pause", type=float, default=0.1, help="idle seconds before each run")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from graphc.runtime.loader import load
    nets = [load(p, num_threads=args.threads) for p in args.libs]
    rng = np.random.default_rng(0)
    feeds = [{k: rng.standard_normal(s).astype(np.float32) for k, s in n.inputs.items()}
             for n in nets]
    for i, n in enumerate(nets):
        if n.inputs == nets[0].inputs:
            feeds[i] = feeds[0]
    outs = [n.forward(**f) for n, f in zip(nets, feeds)]
    for p, n, o in zip(args.libs[1:], nets[1:], outs[1:]):
        if n.inputs == nets[0].inputs and o.keys() == outs[0].keys():
            err = max(float(np.linalg.norm(o[k] - outs[0][k]) /
                            max(np.linalg.norm(outs[0][k]), 1e-30)) for k in o)
            print(f"{p}: relative L2 to {args.libs[0]}: {err:.1e}")
    times = [[] for _ in nets]
    for r in range(args.rounds):
        order = range(len(nets)) if r % 2 == 0 else reversed(range(len(nets)))
        for i in order:
            time.sleep(args.pause)
            t0 = time.perf_counter()
            nets[i].forward(**feeds[i])
            times[i].append(time.perf_counter() - t0)
    base = np.median(times[0])
    print(f"{args.rounds} rounds, {args.pause} s pause, {args.threads} threads; ms:")
    for p, ts in zip(args.libs, times):
        ts = np.asarray(ts)
        print(f"  {os.path.relpath(p):50s} median {1e3 * np.median(ts):8.2f}  "
              f"p90 {1e3 * np.percentile(ts, 90):8.2f}  min {1e3 * ts.min():8.2f}  "
              f"median / first's {np.median(ts) / base:.2f}")
    for n in nets:
        n.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
