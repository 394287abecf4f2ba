"""``graphc compile`` and ``graphc time``.

    graphc compile NET.prototxt [--weights W] [--batch N] [--cpu native|generic] -o net.so
    graphc compile NET.prototxt --target cuda [--arch sm_90] [--precision tf32] -o net.so
    graphc time NET.prototxt|net.so [--weights W] [--batch N] [--iterations K]
                [--target cuda [--arch A] [--precision P]]
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
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (LLVM, this machine's CPU by default) or cuda (NVIDIA GPUs: "
                        "NVRTC cubin + a host runtime that loads the driver; no GPU needed "
                        "to compile)")
    _add_cuda_args(p)
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
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                   help="for a .prototxt: the target to compile for (a .so says its own)")
    _add_cuda_args(p)
    p.add_argument("--cpu", default="native")
    p.add_argument("--threads", type=int, default=0,
                   help="worker threads (default: GRAPHC_NUM_THREADS or all CPUs available)")
    p.add_argument("--reference", action="store_true",
                   help="also time the numpy reference executor, for comparison")
    p.set_defaults(func=cmd_time)


def _add_cuda_args(p) -> None:
    p.add_argument("--arch", default="sm_90",
                   help="cuda: the GPU architecture of the cubin (default sm_90: H100/H200; "
                        "sm_80: A100, sm_89: L4/RTX 40xx)")
    p.add_argument("--precision", choices=("tf32", "fp32", "fp16", "bf16"), default="tf32",
                   help="cuda: tf32 (default: fp32 data, TF32 tensor-core products), fp32, "
                        "fp16 or bf16 (inputs and outputs stay float32)")


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
    if args.target == "cuda":
        return _compile_cuda(args)
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


def _compile_cuda(args) -> int:
    from .build import optimize
    from .cuda_build import build_cuda, check_precision, parse_arch, require_cuda_bindings
    parse_arch(args.arch)
    check_precision(args.precision)
    require_cuda_bindings()           # before the (slow) loading and optimizing
    if not args.weights:
        print("graphc: note: no --weights given: the parameters get their fillers' values",
              file=sys.stderr)
    t0 = time.perf_counter()
    opt = optimize(_graph(args))
    r = build_cuda(opt, args.output, arch=args.arch, precision=args.precision,
                   weights_file=args.weights_file, header=args.header,
                   keep_sources=args.keep_sources)
    p = r.program
    size = Path(r.library).stat().st_size
    where = f"weights in {r.weights}" if r.weights else "weights embedded"
    print(f"wrote {r.library} ({size / 2**20:.1f} MiB, {where}) and {r.header}")
    ins = ", ".join(f"{t.name} {list(t.shape)}" for t in p.inputs)
    outs = ", ".join(f"{t.name} {list(t.shape)}" for t in p.outputs)
    print(f"  net {p.name} for {p.arch} ({p.precision}): {len(p.nodes)} nodes, "
          f"{len(p.launches)} kernel launches ({len(set(l.kernel for l in p.launches))} "
          f"kernels, cubin {len(p.cubin) / 2**10:.0f} KiB); inputs {ins}; outputs {outs}")
    print(f"  device arena {p.arena_bytes / 2**20:.2f} MiB, weights "
          f"{p.weights.size / 2**20:.2f} MiB")
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
    elif args.target == "cuda":
        from .cuda_build import cached_cuda_library, require_cuda_bindings
        require_cuda_bindings()
        g = _graph(args)
        t0 = time.perf_counter()
        lib = cached_cuda_library(g, args.arch, args.precision)
        t_compile = time.perf_counter() - t0
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
    on = (f"{net.device} ({net.arch}, {net.precision}; per-layer times from CUDA events, "
          f"kernels launched one by one)" if net.target == "cuda"
          else f"{net.num_threads} thread(s)")
    w(f"graphc time: {net.name} ({shapes}), {on}, {args.iterations} iteration(s)\n")
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
    if net.target == "cuda":   # the way services run it: one CUDA Graph per forward pass
        net.run()
        t0 = time.perf_counter()
        for _ in range(args.iterations):
            net.run()
        replay = (time.perf_counter() - t0) / args.iterations
        w(f"CUDA Graph replay: {replay * 1e3:.3f} ms per forward pass (input copied in, "
          f"waited for).\n")
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
