"""Training speed on the CPU: images/s for LeNet and CIFAR-10 quick (batch 64) with graphc's
solver (``graphc.train``, SGD with momentum) on the training pass compiled by graphc's CPU
backend, against PyTorch (torch==2.13.0 CPU) training the same net from the same initial
weights with the same solver settings, on the same data, 2 threads each; graphc's
reference executor (numpy) as a third, for context.  Writes bench/results/cpu_training.md,
with a per-layer profile of the compiled pass.

    python bench/cpu_training.py [--iters 30] [--warmup 3] [--batch 64]

The nets are BVLC's train_test prototxts from ../shared/zoo with the Data layers replaced by
an Input layer (data, label): the data are fixed random batches (see DATA below), cycled.
Solver: SGD, momentum 0.9, lr_policy "fixed" (LeNet: base_lr 0.01, weight_decay 5e-4 as in
lenet_solver.prototxt, whose "inv" policy is replaced by a fixed rate; CIFAR-10 quick:
base_lr 0.001, weight_decay 0.004, fixed, as BVLC's cifar10_quick_solver.prototxt), each
blob's lr_mult / decay_mult from the net.  With a fixed rate PyTorch's SGD (buf = m*buf + g,
w -= lr*buf) is exactly Caffe's (h = lr*g + m*h, w -= h), so both runs compute the same
sequence of losses; the report gives how far apart they are.  Iterations of the two are
interleaved in one process (alternating which goes first), 50 ms apart (--pause).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

THREADS = 2
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "GRAPHC_NUM_THREADS"):
    os.environ[var] = str(THREADS)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

#: name -> (zoo train_test prototxt, input shape without batch, base_lr, weight_decay)
NETS = {
    "LeNet": ("lenet_train_test.prototxt", (1, 28, 28), 0.01, 0.0005),
    "CIFAR-10 quick": ("cifar10_quick_train_test.prototxt", (3, 32, 32), 0.001, 0.004),
}
DATA = {
    "LeNet": "uniform [0, 1) pixels (MNIST scaled by 1/256 has that range), labels uniform "
             "in 0..9",
    "CIFAR-10 quick": "standard normal pixels (mean-subtracted images are centred), labels "
                      "uniform in 0..9",
}
MOMENTUM = 0.9
NUM_BATCHES = 8
#: idle seconds before each timed iteration (so one engine's spinning threads do not
#: bill the next)
PAUSE_S = 0.05


def train_net_param(zoo: Path, file: str, batch: int, chw):
    """The train_test NetParameter with its Data layers replaced by one Input layer."""
    from graphc.frontend import caffe_pb2 as pb
    from graphc.frontend.prototxt import read_net
    src = read_net(str(zoo / file)).net
    net = pb.NetParameter()
    net.name = src.name
    inp = net.layer.add()
    inp.name, inp.type = "input", "Input"
    inp.top.extend(["data", "label"])
    inp.input_param.shape.add().dim.extend([batch, *chw])
    inp.input_param.shape.add().dim.extend([batch])
    for layer in src.layer:
        if layer.type not in ("Data", "ImageData", "HDF5Data"):
            net.layer.add().CopyFrom(layer)
    return net


def make_solver(net_param, base_lr: float, weight_decay: float, seed: int,
                backend: str = "cpu"):
    from graphc.frontend import caffe_pb2 as pb
    from graphc.train.solver import get_solver
    sp = pb.SolverParameter()
    sp.net_param.CopyFrom(net_param)
    sp.type = "SGD"
    sp.base_lr = base_lr
    sp.momentum = MOMENTUM
    sp.weight_decay = weight_decay
    sp.lr_policy = "fixed"
    sp.max_iter = 1_000_000
    sp.display = 0
    sp.snapshot = 0
    sp.snapshot_after_train = False
    sp.random_seed = seed
    return get_solver(sp, backend=backend)


def make_data(name: str, batch: int, chw, rng):
    shape = (NUM_BATCHES, batch, *chw)
    x = (rng.random(shape, dtype=np.float32) if name == "LeNet"
         else rng.standard_normal(shape).astype(np.float32))
    y = rng.integers(0, 10, (NUM_BATCHES, batch)).astype(np.float32)
    return x, y


def bench_net(name: str, args, rng) -> dict:
    torch = __import__("torch")
    from torch_nets import TorchNet
    file, chw, base_lr, wd = NETS[name]
    zoo = Path(args.shared or ROOT.parent / "shared") / "zoo"
    seed = int(rng.integers(1 << 30))
    netp = train_net_param(zoo, file, args.batch, chw)
    solver = make_solver(netp, base_lr, wd, seed=seed, backend="cpu")
    assert solver.net.backend == "cpu"
    ref_solver = make_solver(netp, base_lr, wd, seed=seed, backend="reference")
    g = solver.net.graph
    for pname, p in ref_solver.net.graph.params.items():
        p.data[...] = g.params[pname].data
    x, y = make_data(name, args.batch, chw, rng)
    if args.wait_idle > 0:
        from cpu_inference import wait_idle
        res_busy = not wait_idle(args.wait_idle)
    else:
        res_busy = None

    def feeder(sv):
        def feed():
            i = sv.iter % NUM_BATCHES
            sv.net.blobs["data"][...] = x[i]
            sv.net.blobs["label"][...] = y[i]
        return feed

    solver.add_callback(on_start=feeder(solver))
    ref_solver.add_callback(on_start=feeder(ref_solver))
    module = TorchNet(g, train=True)      # the same initial weights (copied now)
    groups = []
    for i, (pname, p) in enumerate(g.params.items()):
        if p.lr_mult != 0:
            groups.append({"params": [module.weights[i]], "lr": base_lr * p.lr_mult,
                           "weight_decay": wd * p.decay_mult})
    opt = torch.optim.SGD(groups, lr=base_lr, momentum=MOMENTUM)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    state = {"it": 0}

    def step_graphc():
        solver.step(1)
        return float(solver.loss)

    def step_reference():
        ref_solver.step(1)
        return float(ref_solver.loss)

    def step_torch():
        i = state["it"] % NUM_BATCHES
        state["it"] += 1
        opt.zero_grad(set_to_none=True)
        loss = module(data=xt[i], label=yt[i])["loss"]
        loss.backward()
        opt.step()
        return float(loss.detach())

    steps = {"graphc": step_graphc, "pytorch": step_torch}
    if not args.no_reference:
        steps["reference"] = step_reference
    times = {k: [] for k in steps}
    losses = {k: [] for k in steps}
    for r in range(args.warmup + args.iters):
        order = list(steps)[r % len(steps):] + list(steps)[:r % len(steps)]
        for k in order:
            time.sleep(args.pause)
            t0 = time.perf_counter()
            loss = steps[k]()
            dt = time.perf_counter() - t0
            losses[k].append(loss)
            if r >= args.warmup:
                times[k].append(dt)
    prof = solver.net.compiled_train().profile(repeats=args.profile_repeats)
    lg, lt = np.array(losses["graphc"]), np.array(losses["pytorch"])
    diff = np.abs(lg - lt) / np.maximum(np.abs(lg), 1e-12)
    res = {"name": name, "data": DATA[name], "base_lr": base_lr, "wd": wd,
           "flops": None, "times": times, "loss_first": (lg[0], lt[0]),
           "loss_last": (lg[-1], lt[-1]), "max_rel_loss_diff": float(diff.max()),
           "max_rel_loss_diff5": float(diff[:5].max()), "diffs": diff,
           "iters": len(lg), "busy": res_busy, "profile": prof}
    for k, ts in times.items():
        med = float(np.median(ts))
        print(f"{name:16s} {k:8s} {med * 1e3:9.1f} ms/iter (p90 "
              f"{np.percentile(ts, 90) * 1e3:.1f})  {args.batch / med:8.1f} images/s",
              flush=True)
    print(f"{name:16s} losses: graphc {lg[0]:.5f} -> {lg[-1]:.5f}, pytorch {lt[0]:.5f} -> "
          f"{lt[-1]:.5f}; relative difference per iteration: "
          + " ".join(f"{d:.0e}" for d in diff), flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30, help="timed iterations (default 30)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--pause", type=float, default=PAUSE_S,
                    help=f"idle seconds before each iteration (default {PAUSE_S})")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned (default): keep freed memory in glibc's heap (see "
                         "bench/torch_nets.py tuned_malloc); default: glibc's settings")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each net, wait up to this long for other jobs to leave the "
                         "CPUs (for a shared machine)")
    ap.add_argument("--profile-repeats", type=int, default=5,
                    help="runs of each compiled step alone for the per-layer table")
    ap.add_argument("--no-reference", action="store_true",
                    help="leave out graphc's reference executor (the context row)")
    ap.add_argument("--shared", default=None, help="the shared/ folder (default ../shared)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_training.md"))
    args = ap.parse_args(argv)
    from torch_nets import require_torch, tuned_malloc
    args.malloc_note = tuned_malloc(args.malloc == "tuned")   # may re-execute the script
    torch = require_torch()
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(2024)
    t0 = time.time()
    args.load_before = os.getloadavg()[0]
    rows = [bench_net(name, args, rng) for name in args.nets.split(",")]
    args.load_after = os.getloadavg()[0]
    write_report(args, rows, time.time() - t0, torch)
    print(f"wrote {args.out}")
    return 0


def write_report(args, rows, total, torch) -> None:
    from cpu_inference import machine
    cmd = "python bench/cpu_training.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# CPU training: graphc vs PyTorch",
        "",
        f"Command (from the project root): `{cmd.strip()}`",
        "",
        f"Machine: {machine()}; {THREADS} threads for each (OPENBLAS_NUM_THREADS={THREADS} "
        f"for numpy, torch.set_num_threads({THREADS})). Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch.__version__} (eager). Memory: "
        f"{args.malloc_note}.",
        "",
        "graphc: `graphc.train` SGDSolver (Caffe's solver loop and update, numpy, on the "
        "param arrays in place) on graphc.Net(backend=\"cpu\"): the train graph (forward, "
        "derived backward, loss) **compiled by the CPU backend** (graphc/codegen/llvm/train.py), "
        "run on a 2-thread pool; the params and param gradients are numpy views of the compiled "
        "pass's memory. graphc reference: the same solver on the numpy reference executor (for "
        "context). PyTorch: the same net built from graphc's IR (bench/torch_nets.py) with the "
        "same initial weights, `torch.optim.SGD` with the same per-blob learning rates and "
        "weight decays.",
        "",
        f"Batch {args.batch}; SGD momentum {MOMENTUM}, lr_policy fixed; {args.warmup} warm-up "
        f"then {args.iters} timed iterations each, interleaved one by one (alternating which "
        f"goes first, rotating), {1e3 * args.pause:g} ms apart; images/s = batch / median "
        "iteration time. An "
        "iteration is the whole solver step: forward, backward and the update.",
        "",
        "| net | data | base_lr, weight_decay | graphc cpu ms/iter (p90) | PyTorch ms/iter "
        "(p90) | graphc cpu images/s | PyTorch images/s | PyTorch time / graphc time | "
        "graphc reference ms/iter (p90) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tg, tt = r["times"]["graphc"], r["times"]["pytorch"]
        mg, mt = float(np.median(tg)), float(np.median(tt))
        lines.append(
            f"| {r['name']} | {r['data']} | {r['base_lr']:g}, {r['wd']:g} | {mg * 1e3:.1f} "
            f"({np.percentile(tg, 90) * 1e3:.1f}) | {mt * 1e3:.1f} "
            f"({np.percentile(tt, 90) * 1e3:.1f}) | {args.batch / mg:.1f} | "
            f"{args.batch / mt:.1f} | {mt / mg:.2f} | " + (
                f"{np.median(r['times']['reference']) * 1e3:.1f} "
                f"({np.percentile(r['times']['reference'], 90) * 1e3:.1f}) |"
                if "reference" in r["times"] else "- |"))
    lines += ["", "Same work, checked: the training losses of the two runs, iteration by "
              "iteration (warm-up included):", "",
              "| net | iterations | first loss (graphc, PyTorch) | last loss (graphc, PyTorch) "
              "| max relative difference, first 5 iterations | ... all iterations |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        (fg, ft), (lg, lt) = r["loss_first"], r["loss_last"]
        lines.append(f"| {r['name']} | {r['iters']} | {fg:.6f}, {ft:.6f} | {lg:.6f}, "
                     f"{lt:.6f} | {r['max_rel_loss_diff5']:.1e} | "
                     f"{r['max_rel_loss_diff']:.1e} |")
    lines += ["", "(float32 rounding differs between the two (summation orders), and SGD "
              "amplifies such differences over the iterations; a different update rule or "
              "gradient would show from the second iteration on.)"]
    lines += ["", "## Where the compiled pass spends its time", "",
              "Each step of the compiled pass run alone (best of "
              f"{args.profile_repeats}, after a whole pass, 2 threads), summed per layer; "
              "flops from the ops' cost model (a multiply-add counts 2). `@grad` rows are the "
              "backward of that layer (all its gradients).", ""]
    for r in rows:
        prof = r["profile"]
        total_t = sum(t for *_, t in prof)
        total_f = sum(f for _, _, f, _ in prof)
        conv = [(f, t) for _, op, f, t in prof if "Convolution" in op]
        conv_t, conv_f = sum(t for _, t in conv), sum(f for f, _ in conv)
        lines += [f"**{r['name']}**: {total_f / 1e9:.2f} GFLOP per iteration; the steps "
                  f"alone sum to {total_t * 1e3:.1f} ms ({total_f / total_t / 1e9:.0f} GFLOP/s "
                  f"overall). Convolutions (forward and gradients) do "
                  f"{100 * conv_f / max(total_f, 1):.0f}% of the flops in "
                  f"{100 * conv_t / total_t:.0f}% of the time, at "
                  f"{conv_f / max(conv_t, 1e-12) / 1e9:.0f} GFLOP/s.", "",
                  "| layer | op | GFLOP | ms | share | GFLOP/s |", "|---|---|---:|---:|---:|---:|"]
        for name, op, f, t in sorted(prof, key=lambda x: -x[3]):
            if t < 0.02 * total_t:
                continue
            lines.append(f"| {name} | {op} | {f / 1e9:.3f} | {t * 1e3:.2f} | "
                         f"{100 * t / total_t:.0f}% | {f / t / 1e9 if f else 0:.0f} |")
        rest = [t for *_, t in prof if t < 0.02 * total_t]
        lines.append(f"| ({len(rest)} others) | | | {sum(rest) * 1e3:.2f} | "
                     f"{100 * sum(rest) / total_t:.0f}% | |")
        lines.append("")
    busy = [r["name"] for r in rows if r["busy"]]
    if args.wait_idle > 0:
        lines += ["", f"--wait-idle {args.wait_idle:g}: " + (
            f"other jobs still used the CPUs when {', '.join(busy)} started" if busy else
            "each net started with the CPUs idle")]
    lines += ["", f"Whole run: {total:.0f} s; load average (1 min) before / after: "
              f"{args.load_before:.2f} / {args.load_after:.2f} (2 CPUs, shared with other "
              "jobs: timings taken under load favour whichever run suffers less from "
              "preemption, which is why the runs are interleaved)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
