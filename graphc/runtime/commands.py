"""``graphc compile`` and ``graphc time`` (the CPU backend's commands).

    graphc compile NET.prototxt [--weights W] [--batch N] [--cpu native|generic] -o net.so
    graphc time NET.prototxt|net.so [--weights W] [--batch N] [--iterations K]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import GraphcError


def add_parsers(sub) -> None:
    from ..cli import _add_net_args
    p = sub.add_parser("compile", help="compile a net into a shared library with a C API "
                                       "(and its header)")
    _add_net_args(p)
    p.add_argument("-o", "--output", required=True, help="the library to write (e.g. net.so)")
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cpu", default="native",
                   help="native (this machine), generic (any x86-64), avx2, avx512, or an "
                        "LLVM CPU name (default: native)")
    p.add_argument("--weights-file", action="store_true",
                   help="write the weights beside the library (NAME.weights) instead of "
                        "embedding them")
    p.add_argument("--header", help="the header to write (default: the library's name with .h)")
    p.add_argument("--keep-sources", metavar="DIR",
                   help="keep the generated C, LLVM IR and object files in DIR")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("time", help="time the forward pass per layer (like caffe time)")
    p.add_argument("net", help="a .prototxt (compiled first, with a cache) or a compiled .so")
    p.add_argument("--weights", help="a .caffemodel (default: the fillers' values)")
    p.add_argument("--phase", choices=("train", "test"), default="test")
    p.add_argument("--level", type=int)
    p.add_argument("--stage", action="append", default=[])
    p.add_argument("--batch", type=int, help="batch size for the net's inputs")
    p.add_argument("--input", action="append", default=[], metavar="BLOB=D1,D2,...",
                   type=_input_type())
    p.add_argument("--iterations", "-i", type=int, default=10, help="timed passes (default 10)")
    p.add_argument("--cpu", default="native")
    p.add_argument("--threads", type=int, default=0,
                   help="worker threads (default: GRAPHC_NUM_THREADS or all CPUs available)")
    p.add_argument("--reference", action="store_true",
                   help="also time the numpy reference executor, for comparison")
    p.set_defaults(func=cmd_time)


def _input_type():
    from ..cli import _input_shape
    return _input_shape


def _graph(args):
    """The lowered graph with weights (or fillers' values when there are none)."""
    from ..cli import _load_graph
    from .build import fill_params
    g = _load_graph(args)
    missing = [p for p in g.params.values() if p.data is None]
    if missing:
        if getattr(args, "weights", None):
            names = ", ".join(p.name for p in missing[:5])
            print(f"graphc: note: the weights file has no values for {names}"
                  f"{' ...' if len(missing) > 5 else ''}; they get their fillers' values",
                  file=sys.stderr)
        fill_params(g)
    return g


def cmd_compile(args) -> int:
    from .build import build_library, optimize
    if args.target != "cpu":
        raise GraphcError(f"target '{args.target}' is not available in this build",
                          hint="use --target cpu")
    if not args.weights:
        print("graphc: note: no --weights given: the parameters get their fillers' values",
              file=sys.stderr)
    t0 = time.perf_counter()
    g = _graph(args)
    opt = optimize(g)
    r = build_library(opt, args.output, cpu=args.cpu, weights_file=args.weights_file,
                      header=args.header, keep_sources=args.keep_sources)
    p = r.program
    size = Path(r.library).stat().st_size
    where = f"weights in {r.weights}" if r.weights else "weights embedded"
    print(f"wrote {r.library} ({size / 2**20:.1f} MiB, {where}) and {r.header}")
    ins = ", ".join(f"{t.name} {list(t.shape)}" for t in p.inputs)
    outs = ", ".join(f"{t.name} {list(t.shape)}" for t in p.outputs)
    print(f"  net {p.name}: {len(p.nodes)} nodes, {len(p.steps)} kernels; inputs {ins}; "
          f"outputs {outs}")
    print(f"  arena {p.arena_bytes / 2**20:.2f} MiB, scratch {p.scratch_bytes / 2**10:.0f} KiB "
          f"per thread, weights {p.weights.size / 2**20:.2f} MiB")
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in r.seconds.items())
    print(f"  compiled in {time.perf_counter() - t0:.2f} s ({phases})")
    return 0


def cmd_time(args) -> int:
    import numpy as np
    from .loader import load
    if args.iterations < 1:
        raise GraphcError(f"--iterations {args.iterations} must be at least 1",
                          hint="e.g. --iterations 10")
    g = None
    if args.net.endswith(".so"):
        lib = Path(args.net)
        t_compile = None
    else:
        from .build import cached_library
        g = _graph(args)
        t0 = time.perf_counter()
        lib = cached_library(g, args.cpu)
        t_compile = time.perf_counter() - t0
    net = load(lib, num_threads=args.threads or None)
    rng = np.random.default_rng(0)
    inputs = {k: rng.standard_normal(v).astype(np.float32) for k, v in net.inputs.items()}
    per, total = net.profile(iterations=args.iterations, **inputs)
    w = sys.stdout.write
    shapes = ", ".join(f"{k} {list(v)}" for k, v in net.inputs.items())
    w(f"graphc time: {net.name} ({shapes}), {net.num_threads} thread(s), "
      f"{args.iterations} iteration(s)\n")
    if t_compile is not None:
        w(f"  library {lib} (ready in {t_compile:.2f} s)\n")
    nodes = {name: flops for name, _, flops in net.nodes}
    width = max([len(n) for n, _, _ in per] + [10])
    w(f"  {'layer':<{width}}  {'op':<28} {'forward ms':>11} {'%':>6} {'GFLOP/s':>8}\n")
    layer_total = sum(s for _, _, s in per) or 1e-12
    for name, op, s in per:
        gf = nodes[name] / s / 1e9 if s > 0 else 0.0
        w(f"  {name:<{width}}  {op[:28]:<28} {s * 1e3:>11.3f} {100 * s / layer_total:>6.1f} "
          f"{gf:>8.1f}\n")
    w(f"Average Forward pass: {total * 1e3:.3f} ms.\n")
    if args.reference:
        from ..ops.base import Context
        from ..reference import ReferenceExecutor
        if g is None:
            raise GraphcError("--reference needs the .prototxt, not a compiled library",
                              hint="pass the net's .prototxt")
        feeds = {v: inputs[g.blob_of[v]] for v in g.inputs}
        ex = ReferenceExecutor(g, Context("test"))
        ex.run(feeds)
        t0 = time.perf_counter()
        n = max(1, min(args.iterations, 3))
        for _ in range(n):
            ex.run(feeds)
        ref = (time.perf_counter() - t0) / n
        w(f"Reference executor: {ref * 1e3:.3f} ms per forward pass "
          f"(graphc is {ref / total:.1f}x faster).\n")
    net.close()
    return 0
