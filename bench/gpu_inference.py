"""graphc beside PyTorch on one NVIDIA GPU, in one process, on the same nets, weights and
precision: graphc's CUDA backend (the forward pass replayed as one CUDA Graph), PyTorch
eager (cuDNN) and PyTorch ``torch.compile``.  Batch-1 latency (median and p90) and
batch-64 throughput for ResNet-50, GoogLeNet and MobileNet v1.  Writes
bench/results/gpu_inference.md with the device's name.

    python bench/gpu_inference.py [--nets resnet50_deploy,...] [--precision tf32]
                                  [--runs 200] [--runs64 50] [--batch 64]

Inputs and outputs stay on the GPU for every engine (graphc reads the input from the torch
tensor's device memory, ``set_input_device``, and leaves the output in its arena): each
timed run is enqueue + wait, measured on the host.  Engines are interleaved round by round
(the order cycling through all permutations), after warm-up runs.  Before timing, every
engine's output is checked against graphc's numpy reference executor: graphc's relative
L2 <= 1e-2 (tf32), 1e-4 (fp32), 2e-2 (fp16, bf16); PyTorch's within 10x that (its own
half-precision rounding; the report lists every error).  Precision: tf32 lets PyTorch use TF32 in cuDNN
convolutions and matmuls (fp32 forbids it); fp16 / bf16 cast PyTorch's module and input
to that type, and compile graphc with ``--precision fp16`` / ``bf16`` (its inputs and
outputs stay float32).

Needs an NVIDIA GPU with its driver, PyTorch with CUDA, and graphc's CUDA extra
(``pip install 'graphc[cuda]'``).  Weights: the rule of ../shared/golden/README.md
(tests/golden.py).
"""
from __future__ import annotations

import argparse
import itertools
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

NETS = {  # zoo file -> label
    "resnet50_deploy": "ResNet-50",
    "googlenet_deploy": "GoogLeNet",
    "mobilenet_deploy": "MobileNet v1",
}
TOLERANCE = {"tf32": 1e-2, "fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
ENGINES = ("graphc", "torch eager", "torch.compile")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS),
                    help="zoo nets, comma-separated (default: " + ",".join(NETS) + ")")
    ap.add_argument("--precision", choices=tuple(TOLERANCE), default="tf32",
                    help="the same for every engine (default tf32)")
    ap.add_argument("--batch", type=int, default=64, help="the throughput batch (default 64)")
    ap.add_argument("--runs", type=int, default=200, help="batch-1 rounds (default 200)")
    ap.add_argument("--runs64", type=int, default=50,
                    help="rounds at the throughput batch (default 50)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs per engine first")
    ap.add_argument("--compile-mode", default="max-autotune",
                    help="torch.compile's mode (default max-autotune: Triton autotuning and "
                         "CUDA graphs); e.g. default, reduce-overhead")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--device", type=int, default=0, help="the GPU (default 0)")
    ap.add_argument("--shared", default=None, help="the shared/ folder (default ../shared)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_inference.md"))
    args = ap.parse_args(argv)
    unknown = [n for n in args.nets.split(",") if n not in NETS]
    if unknown:
        ap.error(f"unknown net(s) {', '.join(unknown)}; choose from {', '.join(NETS)}")
    if args.batch < 1 or args.runs < 1 or args.runs64 < 1 or args.warmup < 0:
        ap.error("--batch, --runs and --runs64 must be at least 1, --warmup at least 0")
    return args


def require_gpu(device: int):
    """torch with a usable CUDA device, or SystemExit saying what is missing."""
    from torch_nets import require_torch
    torch = require_torch()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_inference.py needs an NVIDIA GPU, its driver and PyTorch "
                         f"built with CUDA; here torch {torch.__version__} sees no GPU "
                         f"(torch.version.cuda={torch.version.cuda})")
    if device >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    try:
        from graphc.runtime.cuda_build import require_cuda_bindings
        require_cuda_bindings()
        import graphc.codegen.cuda.lower  # noqa: F401
    except Exception as e:   # noqa: BLE001
        raise SystemExit(f"graphc's CUDA backend is not usable here: {e}")
    return torch


def fill_rule(net) -> None:
    """The golden weight rule (tests/golden.py) for every param of ``net``."""
    from golden import rule_blob
    g = net.graph
    for n in g.nodes:
        for i, p in enumerate(n.params):
            g.params[p].data[...] = rule_blob(n.name, n.op, i, g.params[p].type.shape)


def pct(ts, q) -> float:
    return float(np.percentile(np.asarray(ts), q))


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


class Engines:
    """graphc (cuda), PyTorch eager and torch.compile for one net at one batch size, all
    reading one input tensor on the GPU."""

    def __init__(self, torch, args, proto: str, batch: int, src_net, x: np.ndarray):
        import graphc
        from torch_nets import TorchNet
        self.torch = torch
        dev = torch.device("cuda", args.device)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision,
                                                                   torch.float32)
        major, minor = torch.cuda.get_device_capability(dev)
        arch = f"sm_{major}{minor}"
        from graphc.runtime.cuda_build import cached_cuda_library
        # graphc: the same params, compiled for this GPU at this precision
        net = graphc.Net(proto, batch=batch)
        for name, p in net.graph.params.items():
            p.data[...] = src_net.graph.params[name].data
        self.net = net
        t0 = time.perf_counter()
        self.compiled = graphc.load(cached_cuda_library(net.graph, arch, args.precision),
                                    device=args.device)
        self.compile_s = time.perf_counter() - t0
        self.in_blob = net.inputs[0]
        self.out_blob = net.outputs[0]
        self.x32 = torch.from_numpy(x).to(dev).contiguous()
        self.compiled.set_input_device(self.in_blob, self.x32.data_ptr())
        # PyTorch: the same graph, weights and input
        module = TorchNet(net.graph).eval().to(dev, dtype)
        consts = module._consts

        def const(layer, what, array):   # TorchNet's constants, on the GPU in that type
            key = (layer, what)
            if key not in consts:
                consts[key] = torch.from_numpy(np.asarray(array, np.float32)).to(dev, dtype)
            return consts[key]
        module.const = const
        self.module = module
        self.x = self.x32.to(dtype)
        self.runners = {"graphc": self.run_graphc, "torch eager": self.run_eager}
        self.compile_note = ""
        self.run_eager()   # fills TorchNet's constant caches before torch.compile traces it
        if not args.no_compile:
            try:
                self.compiled_module = torch.compile(module, mode=args.compile_mode)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for _ in range(3):
                        self.compiled_module(data=self.x)
                torch.cuda.synchronize()
                self.torch_compile_s = time.perf_counter() - t0
                self.runners["torch.compile"] = self.run_compiled
            except Exception as e:   # noqa: BLE001 -- report it, time the others
                self.compile_note = (f"torch.compile failed: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200]}")

    def run_graphc(self):
        self.compiled.run()                      # enqueue the graph, wait

    def run_eager(self):
        with self.torch.inference_mode():
            out = self.module(data=self.x)
        self.torch.cuda.synchronize()
        return out

    def run_compiled(self):
        with self.torch.inference_mode():
            out = self.compiled_module(data=self.x)
        self.torch.cuda.synchronize()
        return out

    def outputs(self) -> dict:
        """Each engine's output (float32, on the host) for the current input."""
        torch = self.torch
        self.compiled.run()
        outs = {"graphc": self.compiled.fetch()[self.out_blob]}
        with torch.inference_mode():
            outs["torch eager"] = self.module(data=self.x)[self.out_blob].float().cpu().numpy()
            if "torch.compile" in self.runners:
                outs["torch.compile"] = (self.compiled_module(data=self.x)[self.out_blob]
                                         .float().cpu().numpy())
        return outs

    def close(self):
        self.compiled.close()


def check(eng: Engines, x: np.ndarray, tol: float) -> dict:
    """Every engine's relative L2 error against graphc's reference executor: graphc must
    be within ``tol``; PyTorch within 10 x ``tol`` (its own half-precision rounding differs
    from graphc's; beyond that its build of the net would be wrong)."""
    from graphc.ops.base import Context
    from graphc.reference import ReferenceExecutor
    g = eng.net.graph
    out_v = g.outputs[0]
    ref = ReferenceExecutor(g, Context("test")).run({g.inputs[0]: x}, keep={out_v})[out_v]
    errs = {k: rel_l2(v, ref) for k, v in eng.outputs().items()}
    bad = {k: e for k, e in errs.items() if not e <= (tol if k == "graphc" else 10 * tol)}
    if bad:
        raise SystemExit(f"{g.name}: " + ", ".join(f"{k} relative L2 {e:.3g}"
                                                    for k, e in bad.items())
                         + f" > {tol} against graphc's reference")
    return errs


def time_round_robin(runners: dict, rounds: int, warmup: int) -> dict:
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n]()
    times = {n: [] for n in names}
    orders = list(itertools.permutations(names))
    for r in range(rounds):
        for n in orders[r % len(orders)]:
            t0 = time.perf_counter()
            runners[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    torch = require_gpu(args.device)
    torch.cuda.set_device(args.device)
    tf32 = args.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    import graphc
    from graphc.cost import graph_cost
    zoo = Path(args.shared or ROOT.parent / "shared") / "zoo"
    rng = np.random.default_rng(12345)
    rows, notes, t_start = [], [], time.time()
    for name in args.nets.split(","):
        proto = str(zoo / f"{name}.prototxt")
        src = graphc.Net(proto, batch=1)
        fill_rule(src)
        res = {"name": name, "label": NETS[name]}
        for batch, rounds in ((1, args.runs), (args.batch, args.runs64)):
            shape = (batch, *src.graph.types[src.graph.inputs[0]].shape[1:])
            x = rng.standard_normal(shape).astype(np.float32)
            eng = Engines(torch, args, proto, batch, src, x)
            if eng.compile_note:
                notes.append(f"{name} batch {batch}: {eng.compile_note}")
            res[f"errors{batch}"] = check(eng, x, TOLERANCE[args.precision])
            times = time_round_robin(eng.runners, rounds, args.warmup)
            res[batch] = {k: (pct(v, 50), pct(v, 90), len(v)) for k, v in times.items()}
            res[f"flops{batch}"] = graph_cost(eng.net.graph)[1].flops
            res[f"compile{batch}"] = eng.compile_s
            line = "  ".join(f"{k} {m * 1e3:8.3f} ms (p90 {p * 1e3:.3f})"
                             for k, (m, p, _) in res[batch].items())
            print(f"{name:18s} batch {batch:2d}  {line}", flush=True)
            eng.close()
            del eng
            torch.cuda.empty_cache()
        rows.append(res)
    write_report(args, torch, rows, notes, time.time() - t_start)
    print(f"wrote {args.out}")
    return 0


def write_report(args, torch, rows, notes, total) -> None:
    cmd = "python bench/gpu_inference.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    B = args.batch
    props = torch.cuda.get_device_properties(args.device)
    names = [e for e in ENGINES if any(e in r[1] for r in rows)]
    lines = [
        "# GPU inference: graphc vs PyTorch (eager cuDNN, torch.compile)",
        "",
        f"Command (from the project root): `{cmd.strip()}`",
        "",
        f"Device: {torch.cuda.get_device_name(args.device)} ({props.total_memory / 2**30:.0f} "
        f"GiB, compute capability {props.major}.{props.minor}); torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"cudnn.benchmark on), torch.compile mode `{args.compile_mode}`; Python "
        f"{platform.python_version()}. Precision: **{args.precision}** for every engine.",
        "",
        "Same nets (../shared/zoo), same weights (the golden rule), same input tensor on the "
        "GPU; graphc reads it in place (`set_input_device`) and replays its CUDA Graph; each "
        "timed run is enqueue + wait on the host clock. Engines interleaved per round, the "
        "order cycling through all permutations, after "
        f"{args.warmup} warm-up runs each. Each engine's output was checked against graphc's "
        f"reference executor first (graphc: relative L2 <= {TOLERANCE[args.precision]:g}; "
        f"PyTorch within 10x that; the errors are in the last table).",
        "",
        f"## Batch-1 latency (ms; median, p90 over {args.runs} runs each)",
        "",
        "| net | GFLOP | " + " | ".join(names) + " | "
        + " | ".join(f"{n} / graphc" for n in names[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(names) - 1),
    ]
    for r in rows:
        t = r[1]
        cells = [f"{t[n][0] * 1e3:.3f} ({t[n][1] * 1e3:.3f})" if n in t else "-" for n in names]
        ratios = [f"{t[n][0] / t['graphc'][0]:.2f}" if n in t else "-" for n in names[1:]]
        lines.append(f"| {r['label']} | {r['flops1'] / 1e9:.2f} | " + " | ".join(cells)
                     + " | " + " | ".join(ratios) + " |")
    lines += [
        "",
        "Ratios: the other engine's median over graphc's (above 1: graphc is faster).",
        "",
        f"## Batch-{B} throughput (images/s from the median of {args.runs64} runs; "
        "TFLOP/s achieved)",
        "",
        "| net | " + " | ".join(names) + " | "
        + " | ".join(f"graphc / {n}" for n in names[1:]) + " |",
        "|---|" + "---|" * (2 * len(names) - 1),
    ]
    for r in rows:
        t = r[B]
        ips = {n: B / t[n][0] for n in names if n in t}
        cells = [f"{ips[n]:.0f} ({r[f'flops{B}'] / t[n][0] / 1e12:.1f})" if n in ips else "-"
                 for n in names]
        ratios = [f"{ips['graphc'] / ips[n]:.2f}" if n in ips else "-" for n in names[1:]]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " | " + " | ".join(ratios)
                     + " |")
    lines += ["", "## Correctness before timing (relative L2 against graphc's reference)", "",
              "| net | batch | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        for b in (1, B):
            e = r[f"errors{b}"]
            lines.append(f"| {r['label']} | {b} | "
                         + " | ".join(f"{e[n]:.2e}" if n in e else "-" for n in names) + " |")
    lines += ["", f"graphc compile time (NVRTC + link, or the cache): "
              + ", ".join(f"{r['label']} {r['compile1']:.1f} s / {r[f'compile{B}']:.1f} s"
                          for r in rows) + " (batch 1 / batch " + str(B) + ").", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines.append(f"Total benchmark time {total:.0f} s.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
