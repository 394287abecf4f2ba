"""graphc beside ONNX Runtime and PyTorch (CPU) in one process, on the same nets and weights,
2 threads each: batch-1 latency (median and p90) and batch-16 throughput, each ratio, and the
achieved GFLOP/s against the machine's measured FMA peak.  Writes
bench/results/cpu_inference.md.

    python bench/cpu_inference.py [--nets resnet50_deploy,...] [--runs 30] [--runs16 10]

Every engine is checked against graphc's reference executor (relative L2 <= 1e-4 on the
output, and on the logits where the engine exposes them) before it is timed.  Timing: in
each round every engine runs once, in an order that cycles through all permutations (so
a slow minute hits all of them alike and none always follows the same one), with a 100 ms
pause before each run so one engine's spinning worker threads do not eat into the next
one's time.  Weights: the rule of
../shared/golden/README.md (tests/golden.py).  Needs onnx, onnxruntime and torch==2.13.0.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import shlex
import sys
import time
from pathlib import Path

THREADS_DEFAULT = 2
# the thread counts must be in the environment before the libraries start their pools
_threads = THREADS_DEFAULT
for i, a in enumerate(sys.argv):
    if a == "--threads" and i + 1 < len(sys.argv):
        _threads = int(sys.argv[i + 1])
    elif a.startswith("--threads="):
        _threads = int(a.split("=", 1)[1])
os.environ["GRAPHC_NUM_THREADS"] = str(_threads)
os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

NETS = {  # zoo file -> label
    "resnet50_deploy": "ResNet-50",
    "googlenet_deploy": "GoogLeNet",
    "caffenet_deploy": "CaffeNet",
    "squeezenet11_deploy": "SqueezeNet 1.1",
    "mobilenet_deploy": "MobileNet v1",
}
#: pause before each timed run: ONNX Runtime's idle workers spin for about 45 ms after a
#: run and PyTorch's OpenMP workers for about 10 ms (measured here), so a shorter pause
#: would bill one engine for the previous engine's spinning
PAUSE_S = 0.1


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def wait_idle(limit: float) -> bool:
    """Wait up to ``limit`` s until other jobs leave the CPUs alone (>= 95% idle over
    0.5 s); True if they did.  The machine may be shared with other work."""
    end = time.time() + limit
    while True:
        try:
            i0, t0 = _cpu_times()
            time.sleep(0.5)
            i1, t1 = _cpu_times()
        except OSError:
            return True
        if t1 == t0 or (i1 - i0) / (t1 - t0) >= 0.95:
            return True
        if time.time() > end:
            return False


def pct(ts, q) -> float:
    return float(np.percentile(np.asarray(ts), q))


def fill_rule(net) -> None:
    """The golden weight rule (tests/golden.py) for every param of ``net``."""
    from golden import rule_blob
    g = net.graph
    for n in g.nodes:
        for i, p in enumerate(n.params):
            g.params[p].data[...] = rule_blob(n.name, n.op, i, g.params[p].type.shape)


def copy_params(src, dst) -> None:
    for name, p in dst.graph.params.items():
        p.data[...] = src.graph.params[name].data
    dst.recompile()


def machine() -> str:
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import llvmlite.binding as llvm
        cpu = f" (LLVM host CPU {llvm.get_host_cpu_name()})"
    except Exception:   # noqa: BLE001
        cpu = ""
    isa = "AVX-512" if "avx512f" in flags else "AVX2 + FMA" if "fma" in flags else "?"
    return f"{model or platform.processor()}{cpu}, {isa}, {os.cpu_count()} CPUs visible"


class Engines:
    """The three engines for one net at one batch size."""

    def __init__(self, name: str, batch: int, ref_net, want_graphc: str, threads: int):
        import graphc
        import onnxruntime as ort
        import torch
        from graphc.export.onnx import export_onnx
        from torch_nets import TorchNet
        zoo = ROOT.parent / "shared" / "zoo" if not ARGS.shared else Path(ARGS.shared) / "zoo"
        self.notes = []
        proto = str(zoo / f"{name}.prototxt")
        # graphc: the compiled cpu backend if it builds and runs, else the reference
        self.graphc_engine = "reference"
        net = None
        for attempt in range(2 if want_graphc in ("auto", "cpu") else 0):
            try:
                net = graphc.Net(proto, batch=batch, backend="cpu")
                copy_params(ref_net, net)
                net.forward(data=np.zeros(net.blobs["data"].shape, np.float32))
                self.graphc_engine = "cpu"
                break
            except Exception as e:   # noqa: BLE001 -- report, retry once, fall back
                if want_graphc == "cpu" and attempt:
                    raise
                note = (f"graphc cpu backend failed (attempt {attempt + 1}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:200]})")
                print(f"{name} batch {batch}: {note}", flush=True)
                self.notes.append(note)
                net = None
                time.sleep(5)
        if net is None and want_graphc != "reference":
            self.notes.append("used graphc's reference executor instead")
        if net is None:
            net = graphc.Net(proto, batch=batch)
            copy_params(ref_net, net)
        self.net = net
        g = net.graph
        self.shape = g.types[g.inputs[0]].shape
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.onnx_model = export_onnx(net)
        self.sess = ort.InferenceSession(self.onnx_model.SerializeToString(), so,
                                         providers=["CPUExecutionProvider"])
        self.torch_module = TorchNet(g).eval()
        self.torch = torch

    def runners(self):
        torch, sess, net = self.torch, self.sess, self.net

        def run_graphc(x):
            return net.forward(data=x)

        def run_ort(x):
            return sess.run(None, {"data": x})

        def run_torch(x):
            with torch.inference_mode():
                return self.torch_module(data=torch.from_numpy(x))

        return {"graphc": run_graphc, "onnxruntime": run_ort, "pytorch": run_torch}


def check(name, eng: "Engines", ref_net, x) -> dict:
    """Each engine's worst relative L2 error against graphc's reference."""
    import onnxruntime as ort
    from graphc.export.onnx import export_onnx
    from graphc.ops.base import Context
    from graphc.reference import ReferenceExecutor
    from torch_nets import check_against_reference, logits_value, rel_l2
    g = eng.net.graph
    logits = logits_value(g)
    keep = set(g.outputs) | ({logits} if logits else set())
    ref = ReferenceExecutor(g, Context("test")).run({g.inputs[0]: x}, keep=keep)
    out_v = g.outputs[0]
    errs = {}
    got = eng.net.forward(data=x)
    errs["graphc"] = rel_l2(got[g.blob_of[out_v]], ref[out_v])
    blobs = [g.blob_of[out_v]] + ([g.blob_of[logits]] if logits else [])
    sess = ort.InferenceSession(export_onnx(eng.net, outputs=blobs).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ys = sess.run(None, {"data": x})
    errs["onnxruntime"] = max(rel_l2(y, ref[v]) for y, v in
                              zip(ys, [out_v] + ([logits] if logits else [])))
    errs["pytorch"] = check_against_reference(eng.torch_module, eng.net, x)
    for k, e in errs.items():
        if e > 1e-4:
            raise SystemExit(f"{name}: {k} differs from graphc's reference: relative L2 "
                             f"{e:.3g} > 1e-4")
    return errs


def time_round_robin(runners: dict, x, rounds: int, warmup: int) -> dict:
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n](x)
    times = {n: [] for n in names}
    orders = list(itertools.permutations(names))
    for r in range(rounds):
        order = orders[r % len(orders)]
        for n in order:
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            runners[n](x)
            times[n].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS),
                    help="zoo nets, comma-separated (default: all five)")
    ap.add_argument("--runs", type=int, default=30, help="batch-1 rounds (default 30)")
    ap.add_argument("--runs16", type=int, default=10, help="batch-16 rounds (default 10)")
    ap.add_argument("--batch", type=int, default=16, help="the throughput batch (default 16)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    ap.add_argument("--graphc", choices=("auto", "cpu", "reference"), default="auto",
                    help="graphc's engine (auto: the cpu backend if it works, else the "
                         "reference executor)")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned (default): keep freed memory in glibc's heap (PyTorch's big "
                         "tensors otherwise cost a page fault per 4 KiB each run); default: "
                         "glibc's settings")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each net and batch size, wait up to this long for other "
                         "jobs to leave the CPUs (for a shared machine)")
    ap.add_argument("--shared", default=None, help="the shared/ folder (default ../shared)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_inference.md"))
    ARGS = args = ap.parse_args(argv)
    from torch_nets import require_torch, tuned_malloc
    args.malloc_note = tuned_malloc(args.malloc == "tuned")   # may re-execute the script
    torch = require_torch()
    try:
        import onnxruntime as ort
    except ImportError:
        raise SystemExit("this benchmark needs onnxruntime and onnx: pip install onnx "
                         "onnxruntime")
    torch.set_num_threads(args.threads)
    import graphc
    from graphc.cost import graph_cost

    if args.wait_idle > 0:
        wait_idle(args.wait_idle)
    try:
        from graphc.codegen.llvm.peak import measure_peak
        peak = measure_peak(threads=args.threads)
        peak_note = f"{peak:.1f} GFLOP/s (graphc/codegen/llvm/peak.py, {args.threads} threads)"
    except Exception as e:   # noqa: BLE001
        peak, peak_note = None, f"peak not measured ({type(e).__name__})"
    print(f"FP32 FMA peak: {peak_note}", flush=True)

    rows, notes, t_start = [], [], time.time()
    waits = [0, 0]   # timing groups that started while other jobs still ran, groups
    rng = np.random.default_rng(12345)
    zoo = Path(args.shared or ROOT.parent / "shared") / "zoo"
    for name in args.nets.split(","):
        t0 = time.time()
        ref_net = graphc.Net(str(zoo / f"{name}.prototxt"), batch=1)
        fill_rule(ref_net)
        res = {"name": name, "label": NETS.get(name, name)}
        for batch, rounds in ((1, args.runs), (args.batch, args.runs16)):
            eng = Engines(name, batch, ref_net, args.graphc, args.threads)
            notes += [f"{name} batch {batch}: {n}" for n in eng.notes]
            x = rng.standard_normal(eng.shape).astype(np.float32)
            if batch == 1:
                res["errors"] = check(name, eng, ref_net, x)
            if args.wait_idle > 0:
                waits[1] += 1
                waits[0] += not wait_idle(args.wait_idle)
            times = time_round_robin(eng.runners(), x, rounds, args.warmup)
            res[batch] = {k: (pct(v, 50), pct(v, 90), len(v)) for k, v in times.items()}
            res[f"engine{batch}"] = eng.graphc_engine
            flops = graph_cost(eng.net.graph)[1].flops
            res[f"flops{batch}"] = flops
            line = "  ".join(f"{k} {m * 1e3:8.2f} ms (p90 {p * 1e3:.2f})"
                             for k, (m, p, _) in res[batch].items())
            print(f"{name:20s} batch {batch:2d} [graphc={eng.graphc_engine}]  {line}",
                  flush=True)
            del eng
        res["seconds"] = time.time() - t0
        rows.append(res)
    total = time.time() - t_start
    if peak is not None:   # once more: the machine's speed drifts (and it may be shared)
        peak_end = measure_peak(threads=args.threads)
        peak_note += f"; {peak_end:.1f} GFLOP/s measured again at the end"
        print(f"FP32 FMA peak at the end: {peak_end:.1f} GFLOP/s", flush=True)
        peak = max(peak, peak_end)
    if args.wait_idle > 0:
        notes.append(f"--wait-idle {args.wait_idle:g}: {waits[0]} of {waits[1]} timing groups "
                     "started while other jobs still used the CPUs")
    write_report(args, rows, notes, peak, peak_note, total, torch, ort)
    print(f"wrote {args.out} ({total:.0f} s)")
    return 0


def write_report(args, rows, notes, peak, peak_note, total, torch, ort) -> None:
    import onnx
    # graphc's runtime settings from the environment (GRAPHC_NUM_THREADS is set above)
    env = "".join(f"{k}={shlex.quote(os.environ[k])} " for k in ("GRAPHC_PIN", "GRAPHC_SPIN_US")
                  if os.environ.get(k))
    cmd = env + "python bench/cpu_inference.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    B = args.batch
    engines = {r[f"engine{b}"] for r in rows for b in (1, B)}
    lines = [
        "# CPU inference: graphc vs ONNX Runtime vs PyTorch",
        "",
        f"Command (from the project root): `{cmd.strip()}`",
        "",
        f"Machine: {machine()}; {args.threads} threads for every engine "
        f"(GRAPHC_NUM_THREADS={args.threads}, ORT intra_op_num_threads={args.threads}, "
        f"torch.set_num_threads({args.threads})). Python {platform.python_version()}, "
        f"numpy {np.__version__}, onnxruntime {ort.__version__} (onnx {onnx.__version__}, "
        f"graph optimizations ORT_ENABLE_ALL), torch {torch.__version__} (eager, "
        f"inference_mode, NCHW). Memory: {args.malloc_note}.",
        "",
        "graphc engine: " + ", ".join(sorted(
            {"cpu": "`Net(..., backend=\"cpu\")` (the compiled LLVM backend)",
             "reference": "the numpy reference executor (the cpu backend did not run)"}[e]
            for e in engines)) + ".",
        "",
        "Same nets (../shared/zoo), same weights (the golden rule, tests/golden.py), same "
        "random input; all engines in one process, interleaved: each round runs every engine "
        "once, the order cycling through all permutations, with a 100 ms pause before each "
        "run (ONNX Runtime's idle workers spin ~45 ms after a run, PyTorch's ~10 ms). Every engine was checked against graphc's "
        "reference executor first (relative L2 <= 1e-4, on the output and the logits where "
        "exposed).",
        "",
        f"FP32 peak (FMA loop): {peak_note}" + ("; percentages below are of the higher one."
                                                 if peak else "."),
        "",
        f"## Batch-1 latency (ms; median, p90 over {args.runs} runs each)",
        "",
        "| net | GFLOP | graphc | ONNX Runtime | PyTorch | ORT / graphc | PyTorch / graphc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r[1]
        g, o, p = t["graphc"], t["onnxruntime"], t["pytorch"]
        lines.append(f"| {r['label']} | {r['flops1'] / 1e9:.2f} | {g[0] * 1e3:.2f} "
                     f"({g[1] * 1e3:.2f}) | {o[0] * 1e3:.2f} ({o[1] * 1e3:.2f}) | "
                     f"{p[0] * 1e3:.2f} ({p[1] * 1e3:.2f}) | {o[0] / g[0]:.2f} | "
                     f"{p[0] / g[0]:.2f} |")
    lines += [
        "",
        "Ratios are the other engine's median time over graphc's: above 1 graphc is faster.",
        "",
        f"## Batch-{B} throughput (images/s, from the median of {args.runs16} runs each)",
        "",
        "| net | graphc | ONNX Runtime | PyTorch | graphc / ORT | graphc / PyTorch |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r[B]
        ips = {k: B / v[0] for k, v in t.items()}
        lines.append(f"| {r['label']} | {ips['graphc']:.1f} | {ips['onnxruntime']:.1f} | "
                     f"{ips['pytorch']:.1f} | {ips['graphc'] / ips['onnxruntime']:.2f} | "
                     f"{ips['graphc'] / ips['pytorch']:.2f} |")
    lines += [
        "",
        "## Achieved GFLOP/s (graphc's flop count of the net: a multiply-add is 2 flops)",
        "",
        "| net | batch | graphc | ONNX Runtime | PyTorch |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        for b in (1, B):
            cells = []
            for k in ("graphc", "onnxruntime", "pytorch"):
                gfs = r[f"flops{b}"] / r[b][k][0] / 1e9
                cells.append(f"{gfs:.1f}" + (f" ({gfs / peak:.0%})" if peak else ""))
            lines.append(f"| {r['label']} | {b} | " + " | ".join(cells) + " |")
    lines += ["", "Percentages are of the measured FP32 peak (the higher measurement)." if peak
              else "peak not measured.", ""]
    lines += ["## Correctness before timing (relative L2 against graphc's reference, batch 1)",
              "", "ONNX Runtime and PyTorch: the worst of the output and the logits (the "
              "softmax's input). graphc's compiled net exposes only the output, which for "
              "ResNet-50 is a saturated (one-hot) softmax with these weights, so its 0 says "
              "little there (tests/test_cpu_zoo.py checks the cpu backend blob by blob).",
              "", "| net | graphc | ONNX Runtime | PyTorch |", "|---|---|---|---|"]
    for r in rows:
        e = r["errors"]
        lines.append(f"| {r['label']} | {e['graphc']:.1e} | {e['onnxruntime']:.1e} | "
                     f"{e['pytorch']:.1e} |")
    lines += ["", f"Whole run: {total:.0f} s."]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


ARGS = None

if __name__ == "__main__":
    sys.exit(main())
