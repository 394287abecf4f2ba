"""Compiled libraries side by side: the batch latency of two or more `graphc compile`
outputs (e.g. the same net built before and after a change), interleaved in one process.

    python bench/ab_libs.py [--rounds 30] [--pause 0.1] [--threads 2] [--layers K] A.so B.so ...

Each round runs every library once, alternating the order, with ``--pause`` seconds of
idle before each run (0: back to back).  Libraries with the same inputs get the same
random input, and their outputs are compared with the first's (relative L2) before
anything is timed.  Prints the median, p90 and minimum per library and each median's
ratio to the first's.  With ``--layers K``, each round also profiles K back-to-back runs
of every library with the runtime's per-node timers (10 ms after the library before it
ran, so that library's spinning workers are asleep) and prints the per-layer medians
side by side (libraries whose layers have the same names: builds of one net).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


SETTLE_S = 0.01


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--pause", type=float, default=0.1, help="idle seconds before each run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=0, metavar="K",
                    help="also per-layer times: K profiled runs per library per round")
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
    layers = [{} for _ in nets]
    for r in range(args.rounds):
        order = range(len(nets)) if r % 2 == 0 else reversed(range(len(nets)))
        for i in order:
            time.sleep(args.pause)
            t0 = time.perf_counter()
            nets[i].forward(**feeds[i])
            times[i].append(time.perf_counter() - t0)
            if args.layers:
                # the other libraries' workers spin for a while after their runs
                # (GRAPHC_SPIN_US, 2 ms by default): let them fall asleep first
                time.sleep(SETTLE_S)
                per, total = nets[i].profile(iterations=args.layers, **feeds[i])
                for name, _, secs in per + [("(forward)", "", total)]:
                    layers[i].setdefault(name, []).append(secs)
    base = np.median(times[0])
    print(f"{args.rounds} rounds, {args.pause} s pause, {args.threads} threads; ms:")
    for p, ts in zip(args.libs, times):
        ts = np.asarray(ts)
        print(f"  {os.path.relpath(p):50s} median {1e3 * np.median(ts):8.2f}  "
              f"p90 {1e3 * np.percentile(ts, 90):8.2f}  min {1e3 * ts.min():8.2f}  "
              f"median / first's {np.median(ts) / base:.2f}")
    if args.layers:
        print_layers(args.libs, layers)
    for n in nets:
        n.close()
    return 0


def print_layers(libs, layers) -> None:
    names = list(layers[0])
    same = [i for i, ls in enumerate(layers) if list(ls) == names]
    print(f"per layer, ms (median over rounds of the mean of the profiled runs); "
          f"libraries {', '.join(str(i + 1) for i in same)}:")
    print(f"  {'layer':40s}" + "".join(f"{i + 1:>9d}" for i in same) + "   ratio")
    for name in names:
        med = [1e3 * float(np.median(layers[i][name])) for i in same]
        ratio = f"{med[-1] / med[0]:8.2f}" if med[0] > 0 else ""
        print(f"  {name[:40]:40s}" + "".join(f"{m:9.3f}" for m in med) + ratio)


if __name__ == "__main__":
    sys.exit(main())
