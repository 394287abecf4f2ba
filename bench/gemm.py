"""SGEMM: graphc's generated kernels vs the machine's measured FP32 peak and numpy (OpenBLAS);
writes bench/results/gemm.md.

    python bench/gemm.py [--repeats 9] [--quick] [--wait-idle SECONDS] [--out bench/results/gemm.md]

Everything is measured in one process, interleaved: each round times the FMA peak loop,
then every (shape, kernel, threads) once, so a change in the machine's speed (other jobs,
clock boost) lands on all figures alike. Reported: the median over rounds (and the best).
numpy's thread count is set with threadpoolctl when installed, else by running numpy in
two worker processes started with OPENBLAS_NUM_THREADS=1 and =2 (still interleaved: the
main process waits while a worker times its call).

Kernels: "native" (the host's widest vectors: AVX-512 where present) and, on a host wider
than AVX2, also "avx2" (x86-64-v3, the level of machines without AVX-512), each compared
with the peak of its own vector width.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphc.codegen.llvm import gemm, jit, peak  # noqa: E402

SQUARES = [256, 512, 1024, 2048]
#: convolution as implicit GEMM at batch 1: M = output channels, N = output pixels,
#: K = input channels x kernel area
CONV = [
    ((96, 3025, 363), "CaffeNet conv1 11x11/4, 3->96, 55x55"),
    ((64, 3136, 576), "ResNet-50 conv2_x 3x3, 64->64, 56x56"),
    ((128, 784, 1152), "ResNet-50 conv3_x 3x3, 128->128, 28x28"),
    ((256, 3136, 2304), "VGG-16 conv3_2 3x3, 256->256, 56x56"),
    ((512, 784, 4608), "VGG-16 conv4_2 3x3, 512->512, 28x28"),
]
NOTES = """## Notes from tuning

Measured on a Zen 5 machine with AVX-512, where the 256-bit kernel is the `avx2` column (on
an AVX2 host it is `native`):

* numpy's OpenBLAS (a `Haswell` DYNAMIC_ARCH build) runs 256-bit kernels there, so it is
  bounded by the 256-bit peak; compare it with the 256-bit kernel.
* Tile choice on Zen5 (AVX-512): 8x32 (16 zmm accumulators) measured better than 14x32,
  8x48, 16x16 and 4x64, on the squares and the conv shapes alike; on AVX2 the classic 6x16.
* Where the kernels lose time: packing B costs ~0.1 ns per element, paid back over only
  M rows of compute, so its share grows as M shrinks (M = 64: about a tenth of the run); the C
  tile is reloaded once per K block (prefetching it from inside the k loop raised the
  median on 2048^3 from ~175 to ~217 GFLOP/s); K not a multiple of the block is split
  into equal blocks (K = 363 runs as 184 + 179), and N not a multiple of the tile width
  ends in a masked tile.
* Two threads split C by whole tiles of rows or columns (whichever leaves the busier
  thread less work, packing included), each packing its own panels; no barrier, no
  shared packed buffer. Figures for 2 threads vary most: the two vCPUs sometimes land on
  one physical core (the 2-thread peak then reads like the 1-thread one).
* 2 threads on calls of about a millisecond (the conv shapes) are held back by waking the
  idle second vCPU, which here takes ~0.5-1 ms: the pool thread starts its part when the
  caller is nearly done with its own. With the other vCPU kept awake (a `nice 19`
  spinner), 64x3136x576 on 2 threads went from ~190 to ~350 GFLOP/s. A runtime pool whose
  workers spin briefly before sleeping (as OpenBLAS's do) would remove this; the Python
  pool here only shows how to drive the per-part entry point.
"""
MIN_SECONDS = 0.03  # each timing covers at least this long (several calls for small shapes)
THREADS = (1, 2)
OPENBLAS_SPIN = 0.5  # seconds OpenBLAS's idle threads may keep spinning after a call


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_times():
    """(idle, steal, total) jiffies from /proc/stat (zeros where it is absent)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], (v[7] if len(v) > 7 else 0), sum(v)
    except OSError:
        return 0, 0, 0


def wait_idle(limit: float) -> bool:
    """Wait (up to ``limit`` seconds) until no other job uses the CPUs: over 0.25 s, at
    least 97% idle. True if it got there."""
    end = time.time() + limit
    while True:
        i0, _, t0 = _cpu_times()
        time.sleep(0.25)
        i1, _, t1 = _cpu_times()
        if t1 == t0 or (i1 - i0) / (t1 - t0) >= 0.97:
            return True
        if time.time() > end:
            return False


def calls_for(flops: float, gflops_guess: float = 150.0) -> int:
    return max(1, int(MIN_SECONDS / (flops / (gflops_guess * 1e9))))


def timed(fn, n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def operands(shape, seed=0):
    M, N, K = shape
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((M, K)).astype(np.float32),
            rng.standard_normal((K, N)).astype(np.float32))


# -- numpy with a fixed thread count ------------------------------------------------------

_WORKER = r"""
import json, sys, time
import numpy as np
rng_cache = {}
for line in sys.stdin:
    req = json.loads(line)
    M, N, K = req["shape"]
    if (M, N, K) not in rng_cache:
        rng = np.random.default_rng(0)
        rng_cache[(M, N, K)] = (rng.standard_normal((M, K)).astype(np.float32),
                                rng.standard_normal((K, N)).astype(np.float32))
    A, B = rng_cache[(M, N, K)]
    C = np.empty((M, N), np.float32)
    np.matmul(A, B, out=C)
    t0 = time.perf_counter()
    for _ in range(req["calls"]):
        np.matmul(A, B, out=C)
    print(json.dumps({"t": (time.perf_counter() - t0) / req["calls"]}), flush=True)
"""


class NumpyTimer:
    """Times np.matmul with a given BLAS thread count."""

    def __init__(self, threads: int):
        self.threads = threads
        try:
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits
            self._proc = None
            self.how = "threadpoolctl"
        except ImportError:
            env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads),
                       OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            self._proc = subprocess.Popen([sys.executable, "-c", _WORKER], env=env, text=True,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.how = "OPENBLAS_NUM_THREADS in a worker process"
        self._ops = {}

    def seconds(self, shape, calls: int) -> float:
        if self._proc is not None:
            self._proc.stdin.write(json.dumps({"shape": list(shape), "calls": calls}) + "\n")
            self._proc.stdin.flush()
            return json.loads(self._proc.stdout.readline())["t"]
        if shape not in self._ops:
            self._ops[shape] = operands(shape)
        A, B = self._ops[shape]
        C = np.empty((shape[0], shape[1]), np.float32)
        with self._limits(limits=self.threads, user_api="blas"):
            np.matmul(A, B, out=C)
            return timed(lambda: np.matmul(A, B, out=C), calls)

    def close(self):
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait()


# -- the run ------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds (default 9)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, no 2048 square")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each group of timings, wait up to this long for other jobs "
                         "to finish (for a shared machine)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gemm.md"))
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.repeats
    squares = [s for s in SQUARES if not (args.quick and s > 1024)]
    shapes = [(s, s, s) for s in squares] + [shape for shape, _ in CONV]

    host = jit.target("native")
    kernels = {"native": gemm.Gemm("native")}
    if host.vector_bits > 256 and jit.target("avx2").has_fma:
        kernels["avx2"] = gemm.Gemm("avx2")
    widths = {name: g.config.vw for name, g in kernels.items()}
    peak_fns = {w: peak.compile_peak("native", width=w) for w in sorted(set(widths.values()))}
    np_timers = {th: NumpyTimer(th) for th in THREADS}

    data = {shape: operands(shape) for shape in shapes}
    outs = {shape: np.empty((shape[0], shape[1]), np.float32) for shape in shapes}
    # correctness first (and warm-up): every kernel against float64 numpy
    errors = {}
    for shape in shapes:
        A, B = data[shape]
        ref = A.astype(np.float64) @ B
        for name, g in kernels.items():
            for th in THREADS:
                C = g(A, B, threads=th)
                errors[shape, name, th] = float(np.linalg.norm(C - ref) / np.linalg.norm(ref))

    samples: dict = {}

    def add(key, gflops):
        samples.setdefault(key, []).append(gflops)

    load_before = os.getloadavg()
    t_start = time.time()
    busy = [0, 0]  # (waits that timed out, waits)
    _, steal0, total0 = _cpu_times()

    def quiet():
        if args.wait_idle > 0:
            busy[1] += 1
            busy[0] += not wait_idle(args.wait_idle)
    for r in range(rounds):
        quiet()
        for w in peak_fns:
            for th in THREADS:
                # best of 3 short runs: the peak is a ceiling, a slow run only means a busy host
                add(("peak", w, th), peak.measure_peak(th, width=w, seconds=0.05, repeats=3))
        for shape in shapes:
            quiet()
            flops = 2.0 * shape[0] * shape[1] * shape[2]
            A, B = data[shape]
            C = outs[shape]
            n = calls_for(flops)
            for name, g in kernels.items():
                for th in THREADS:
                    add((shape, name, th), flops / timed(lambda: g(A, B, C, threads=th), n) / 1e9)
        # numpy last: after a call OpenBLAS's threads keep spinning for a while, taking a
        # core from whatever runs next
        for shape in shapes:
            quiet()
            flops = 2.0 * shape[0] * shape[1] * shape[2]
            for th in THREADS:
                secs = np_timers[th].seconds(shape, calls_for(flops))
                add((shape, "numpy", th), flops / secs / 1e9)
        time.sleep(OPENBLAS_SPIN)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    elapsed = time.time() - t_start
    load_after = os.getloadavg()
    _, steal1, total1 = _cpu_times()
    env = {"load": (load_before[0], load_after[0]), "busy": busy,
           "steal": 100.0 * (steal1 - steal0) / max(1, total1 - total0),
           "wait_idle": args.wait_idle}
    numpy_how = np_timers[1].how
    for t in np_timers.values():
        t.close()

    med = {k: float(np.median(v)) for k, v in samples.items()}
    best = {k: float(np.max(v)) for k, v in samples.items()}
    text = report(rounds, host, kernels, widths, shapes, med, best, errors, numpy_how,
                  elapsed, env)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def report(rounds, host, kernels, widths, shapes, med, best, errors, numpy_how,
           elapsed, env) -> str:
    def fig(key):
        return f"{med[key]:.1f} ({best[key]:.1f})"

    def pct(key, w, th):
        return f"{100 * med[key] / med[('peak', w, th)]:.0f}%"

    cmd = "python bench/gemm.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    lines = [
        "# SGEMM: graphc's generated kernels vs the FP32 peak and numpy",
        "",
        f"Command: `{cmd}` (from the project root).",
        "",
        f"* Machine: {cpu_model()} (LLVM host CPU `{host.cpu_name}`), "
        f"{len(os.sched_getaffinity(0))} cores available, widest vectors {host.vector_bits} "
        f"bits, FMA {'yes' if host.has_fma else 'no'}; Python {platform.python_version()}, "
        f"numpy {np.__version__}, llvmlite LLVM {'.'.join(map(str, jit.llvm.llvm_version_info))}.",
        f"* {rounds} interleaved rounds in one process ({elapsed:.0f} s); figures are GFLOP/s, "
        "**median (best)** over the rounds; a multiply-add counts 2 flops.",
        f"* Load average before / after: {env['load'][0]:.2f} / {env['load'][1]:.2f}; CPU time "
        f"stolen by the hypervisor during the run: {env['steal']:.1f}%"
        + (f"; before each group of timings the run waited up to {env['wait_idle']:.0f} s "
           f"for other jobs to finish ({env['busy'][0]} of {env['busy'][1]} waits timed out)"
           if env["wait_idle"] else "")
        + ". The machine is a shared VM: other jobs and the host's clock boost move every "
        "figure, which is why the peak is measured in the same rounds.",
        f"* numpy threads: {numpy_how}.",
        "* Kernels: " + "; ".join(
            f"`{name}` = {g.target.cpu_name}, {g.config.vw * 32}-bit vectors, tile "
            f"{g.config.mr}x{g.config.nr}, KC={g.config.kc} MC={g.config.mc} NC={g.config.nc}"
            for name, g in kernels.items()) + ".",
        "",
        "## Peak: an FMA-bound loop (independent accumulators, nothing else)",
        "",
        "| vector width | 1 thread | 2 threads |",
        "|---|---:|---:|",
    ]
    for w in sorted(set(widths.values()), reverse=True):
        lines.append(f"| {w * 32}-bit | {fig(('peak', w, 1))} | {fig(('peak', w, 2))} |")
    lines += ["", "## GEMM, GFLOP/s (and % of the peak of the kernel's vector width, "
              "same threads)", ""]
    head = "| M x N x K | numpy 1T | numpy 2T |"
    sep = "|---|---:|---:|"
    for name in kernels:
        head += f" graphc {name} 1T | graphc {name} 2T |"
        sep += "---:|---:|"
    lines += [head, sep]
    notes = dict(CONV)
    for shape in shapes:
        label = "x".join(map(str, shape))
        if shape in notes:
            label += f" ({notes[shape]})"
        row = f"| {label} | {fig((shape, 'numpy', 1))} | {fig((shape, 'numpy', 2))} |"
        for name in kernels:
            w = widths[name]
            for th in THREADS:
                row += f" {fig((shape, name, th))} {pct((shape, name, th), w, th)} |"
        lines.append(row)
    worst = max(errors.values())
    g0 = next(iter(kernels.values()))
    small = [s for s in shapes if 2.0 * s[0] * s[1] * s[2] < 2 * g0.min_flops_per_thread]
    if small:
        lines += ["", "Asked for 2 threads, " + ", ".join("x".join(map(str, s)) for s in small)
                  + f" ran on 1: `Gemm` gives each thread at least "
                  f"{g0.min_flops_per_thread / 1e6:.0f} MFLOP (a hand-off to a pool thread "
                  "costs tens of microseconds)."]
    lines += ["", f"Every result was checked against float64 numpy first: worst relative L2 "
              f"error {worst:.1e}.", "", "## Against the target (>= 85% of peak, large matrices)",
              "", "Median GEMM / median peak of the same rounds (in brackets: / the best peak "
              "seen, the stricter figure).", ""]
    for name in kernels:
        w = widths[name]
        for th in THREADS:
            figs = ", ".join(f"{s[0]}: {100 * med[(s, name, th)] / med[('peak', w, th)]:.0f}% "
                             f"({100 * med[(s, name, th)] / best[('peak', w, th)]:.0f}%)"
                             for s in shapes if s[0] == s[1] == s[2] and s[0] >= 1024)
            lines.append(f"* `{name}` ({w * 32}-bit), {th} thread{'s' * (th > 1)}: {figs} "
                         f"of {med[('peak', w, th)]:.0f} ({best[('peak', w, th)]:.0f}) GFLOP/s")
    lines += ["", NOTES]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
