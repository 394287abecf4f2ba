"""Per layer, graphc beside ONNX Runtime: which layers of a zoo net ORT runs faster, and by
how much, from both engines' own per-node timers, interleaved in one process.

    python bench/ort_layers.py resnet50_deploy [--rounds 20] [--threads 2] [--top 25]

Each round profiles 5 back-to-back graphc runs (the runtime's node timers) and then 5
ONNX Runtime runs (its ``enable_profiling`` node events), cpu_inference.PAUSE_S apart
so the other engine's spinning workers are asleep (ORT's spin for ~45 ms after a run:
with a 10 ms pause they took a CPU from graphc's first layers, SqueezeNet's conv1 2.4x
slower).  Layers are matched by name (graphc's fused node by its first layer, ORT's
fused node by its first, its ``_nchwc`` suffix dropped); the table lists per-layer
medians, worst ratio first, and both sums.  Weights: the golden
rule (tests/golden.py), the same in both engines.  Needs onnx and onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("net", help="a zoo net, e.g. resnet50_deploy")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25, help="rows to print (default 25)")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = ap.parse_args(argv)
    os.environ["GRAPHC_NUM_THREADS"] = str(args.threads)
    import onnxruntime as ort

    import graphc
    from cpu_inference import PAUSE_S, fill_rule
    from graphc.export.onnx import export_onnx
    from graphc.runtime.build import cached_library
    from graphc.runtime.loader import load

    net = graphc.Net(str(Path(args.shared) / "zoo" / f"{args.net}.prototxt"), batch=1)
    fill_rule(net)
    lib = load(cached_library(net.graph), num_threads=args.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    tmp = tempfile.TemporaryDirectory(prefix="ort_layers_")   # ORT's profile file
    so.profile_file_prefix = os.path.join(tmp.name, "ort")
    sess = ort.InferenceSession(export_onnx(net).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    (name, shape), = lib.inputs.items()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ort_feed = {sess.get_inputs()[0].name: x}
    mine, whole = defaultdict(list), {"graphc": [], "onnxruntime": []}
    for _ in range(args.rounds):
        time.sleep(PAUSE_S)
        per, total = lib.profile(iterations=5, **{name: x})
        for node, _op, secs in per:
            mine[node.split("+")[0]].append(secs)
        whole["graphc"].append(total)
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        for _ in range(5):
            sess.run(None, ort_feed)
        whole["onnxruntime"].append((time.perf_counter() - t0) / 5)
    events = json.loads(Path(sess.end_profiling()).read_text())
    tmp.cleanup()
    theirs = defaultdict(lambda: defaultdict(list))    # layer -> ORT node -> durations
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][:-len("_kernel_time")]
            theirs[node.split("~")[0].removesuffix("_nchwc")][node].append(e["dur"] * 1e-6)
    ort_ms = {k: 1e3 * sum(float(np.median(v)) for v in nodes.values())
              for k, nodes in theirs.items()}
    rows = [(k, 1e3 * float(np.median(v)), ort_ms.get(k)) for k, v in mine.items()]
    print(f"{args.net}, {args.threads} threads, {args.rounds} rounds; whole run (median of "
          f"5-run means): graphc {1e3 * np.median(whole['graphc']):.2f} ms, onnxruntime "
          f"{1e3 * np.median(whole['onnxruntime']):.2f} ms")
    print(f"sum of layers: graphc {sum(r[1] for r in rows):.2f} ms, onnxruntime "
          f"{sum(ort_ms.values()):.2f} ms")
    print(f"{'layer':40s} {'graphc':>8s} {'ort':>8s} {'diff':>8s} {'ratio':>6s}")
    rows.sort(key=lambda r: -(r[1] - (r[2] or 0.0)))
    for k, a, o in rows[:args.top]:
        if o is None:
            print(f"{k:40s} {a:8.3f} {'-':>8s}")
        else:
            print(f"{k:40s} {a:8.3f} {o:8.3f} {a - o:+8.3f} {a / o:6.2f}")
    only = sorted(set(ort_ms) - set(mine))
    if only:
        print("ORT nodes with no graphc layer of that name:",
              ", ".join(f"{k} {ort_ms[k]:.3f}" for k in only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
