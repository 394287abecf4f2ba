"""The machine's FP32 peak, measured: an FMA-bound loop with many independent accumulators.

Each iteration issues ``nacc`` independent vector FMAs (``acc_i = acc_i * x + y``), enough
to cover the FMA latency on every FMA pipe, with nothing else on the critical path. The
GFLOP/s it reaches (2 flops per lane per FMA) is what a GEMM kernel can hope for.
"""
from __future__ import annotations

import ctypes
import time
from concurrent.futures import ThreadPoolExecutor

from llvmlite import ir

from graphc.codegen.llvm import jit

F32 = ir.FloatType()
I64 = ir.IntType(64)


def peak_ir(width: int = 8, nacc: int = 12) -> str:
    """``void fma_loop(i64 iters, float* out)``: ``iters`` x ``nacc`` FMAs on <width x float>."""
    vt = ir.VectorType(F32, width)
    mod = ir.Module(name="peak")
    fma = ir.Function(mod, ir.FunctionType(vt, [vt] * 3), f"llvm.fma.v{width}f32")
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [I64, F32.as_pointer()]), "fma_loop")
    iters, out = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    # x and y come from memory so nothing can be folded; x ~ 1 keeps values finite.
    x = b.insert_element(ir.Constant(vt, ir.Undefined), b.load(out), ir.Constant(I64, 0))
    x = b.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))
    y = b.insert_element(ir.Constant(vt, ir.Undefined),
                         b.load(b.gep(out, [ir.Constant(I64, 1)])), ir.Constant(I64, 0))
    y = b.shuffle_vector(y, y, ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))
    b.branch(loop)
    b.position_at_end(loop)
    i = b.phi(I64)
    accs = [b.phi(vt) for _ in range(nacc)]
    new = [b.call(fma, [a, x, y]) for a in accs]
    i_next = b.add(i, ir.Constant(I64, 1))
    i.add_incoming(ir.Constant(I64, 0), entry)
    i.add_incoming(i_next, loop)
    for k, (a, n) in enumerate(zip(accs, new)):
        a.add_incoming(ir.Constant(vt, [float(k)] * width), entry)
        a.add_incoming(n, loop)
    b.cbranch(b.icmp_signed("<", i_next, iters), loop, done)
    b.position_at_end(done)
    total = new[0]
    for n in new[1:]:
        total = b.fadd(total, n)
    s = b.extract_element(total, ir.Constant(I64, 0))
    b.store(s, b.gep(out, [ir.Constant(I64, 2)]))
    b.ret_void()
    return str(mod)


def default_shape(t: jit.Target) -> tuple[int, int]:
    """(vector width in floats, accumulators) for the widest FMA registers of ``t``."""
    if t.vector_bits >= 512:
        return 16, 24
    if t.vector_bits >= 256:
        return 8, 12
    return 4, 12


def compile_peak(cpu: str = "native", width: int | None = None, nacc: int | None = None):
    t = jit.target(cpu)
    w, n = default_shape(t)
    mod = jit.compile_ir(peak_ir(width or w, nacc or n), t)
    return mod.function("fma_loop", None, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)), \
        (width or w), (nacc or n)


def measure_peak(threads: int = 1, cpu: str = "native", width: int | None = None,
                 nacc: int | None = None, seconds: float = 0.25, repeats: int = 5) -> float:
    """FP32 GFLOP/s of ``threads`` threads each running the FMA loop (best of ``repeats``)."""
    fn, w, n = compile_peak(cpu, width, nacc)
    flops_per_iter = 2 * w * n
    bufs = [(ctypes.c_float * 4)(1.0, 1e-7, 0.0, 0.0) for _ in range(threads)]
    ptrs = [ctypes.cast(bf, ctypes.POINTER(ctypes.c_float)) for bf in bufs]
    # calibrate one thread's iteration count for ~``seconds``
    iters = 1 << 16
    while True:
        t0 = time.perf_counter()
        fn(iters, ptrs[0])
        dt = time.perf_counter() - t0
        if dt > 0.02:
            break
        iters *= 4
    iters = max(1, int(iters * seconds / dt))
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda p: fn(iters, p), ptrs))
            dt = time.perf_counter() - t0
            best = max(best, threads * iters * flops_per_iter / dt / 1e9)
    return best


if __name__ == "__main__":  # python -m graphc.codegen.llvm.peak
    for w in (8, 16):
        for th in (1, 2):
            print(f"width {w:2d} threads {th}: {measure_peak(th, width=w):7.1f} GFLOP/s")
