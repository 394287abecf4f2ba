"""InnerProduct: y (M x N) = x (M x K) @ W^T + b, x flattened from ``axis``.

* Few rows (M <= SMALL_M, the usual deploy batch): the product is bound by reading W
  once, so each output feature n is a dot product of W's row n (contiguous, weights kept
  as (N, K); a ``transpose: true`` weight is transposed at compile time) with every row
  of x, all rows in one pass over W; the loop is a float reduction LLVM vectorizes.
  The parts split the output features.  The fused tail runs on each result.
* More rows: the packed SGEMM with B = W^T (K x N, transposed at compile time), its own
  row/column split among the parts, and the tail in its epilogue ("col" mode: the
  channel is the output feature).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ....ops import get_op
from ..irutil import F32, I32, REASSOC, fptr, get, i64, load, loop, part_range, \
    step_function, store, var
from .epilogue import ProgramEpilogue
from .pointwise import FlatSite, Src, channel_structure, emit_program

SMALL_M = 8


def supported(g, n, anchor):
    if len(anchor.get("inputs", [])) != 1:
        return ("an InnerProduct with several bottoms", "use one bottom")
    return None


def _mkn(k, n, anchor):
    x = n.inputs[anchor["inputs"][0]]
    shape = k.shape(x)
    axis, m, kk, nn = get_op("InnerProduct")._mk(anchor["attrs"], shape)
    return x, shape, axis, m, kk, nn


def out_shape(k, n, anchor):
    _, shape, axis, _, _, nn = _mkn(k, n, anchor)
    return tuple(shape[:axis]) + (nn,)


def lower(k, n, anchor, steps, tensors, out_off):
    from . import NotEpilogue
    x, shape, axis, M, K, N = _mkn(k, n, anchor)
    attrs = anchor["attrs"]
    params = [n.params[i] for i in anchor.get("params", [])]
    bias = len(params) > 1
    w = k.param_data(params[0])
    oshape = tuple(shape[:axis]) + (N,)
    if M <= SMALL_M:
        if attrs.get("transpose"):
            w_src = k.weights_src(np.ascontiguousarray(w.T), ("ip-nk", params[0]))
        else:
            w_src = k.param_src(params[0])
        b_src = k.param_src(params[1]) if bias else None
        return gemv(k, n, k.loc(x), w_src, b_src, M, K, N, oshape, steps, tensors, out_off)
    alias = [j for j, off in enumerate(tensors) if off == out_off]
    skip, accumulate = set(), False
    if alias:
        from .conv import _accumulates
        if _accumulates(steps, alias[0]):
            skip, accumulate = {alias[0]}, True
        elif K > k.gemm_config.kc:
            raise NotEpilogue("in-place residual with a long K")
    epi = ProgramEpilogue(steps, "col", bias, skip)
    if not epi.fits(N, 1):
        raise NotEpilogue("operand not per output feature")
    if attrs.get("transpose"):
        wt_src = k.param_src(params[0])
    else:
        wt_src = k.weights_src(np.ascontiguousarray(w.T), ("ip-kn", params[0]))
    b_src = k.param_src(params[1]) if bias else None
    gemm = k.gemm(epi)
    k.need_scratch(k.gemm_workspace_bytes())
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    extra = []
    if b_src is not None:
        extra.append(k.ptr(b, a, b_src))
    extra += [k.ptr(b, a, c.src) for c in epi.chans]
    extra += [k.ptr(b, a, Src("arena", tensors[j])) for j in epi.tensors]
    if epi.tensors:
        extra.append(i64(N))
    b.call(gemm, [i64(M), i64(N), i64(K), k.ptr(b, a, Src("arena", k.loc(x))), i64(K),
                  k.ptr(b, a, wt_src), i64(N), k.ptr(b, a, Src("arena", out_off)), i64(N),
                  ir.Constant(I32, int(accumulate)), a["part"], a["nparts"], a["scratch"],
                  *extra])
    b.ret_void()
    k.add_step(fn.name, 2 * M * N * K, per_thread=1)


def gemv(k, n, x_off, w_src, b_src, M, K, N, oshape, steps, tensors, out_off):
    """y[m, j] = tail(sum_k x[m, k] * W[j, k] + b[j]) for M (few) rows of x, W (N, K)."""
    dim, inner = channel_structure(oshape)
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", x_off))
    yp = k.ptr(b, a, Src("arena", out_off))
    wp = k.ptr(b, a, w_src)
    bp = k.ptr(b, a, b_src) if b_src else None
    lo, hi = part_range(b, N, a["part"], a["nparts"], align=16)
    zero = ir.Constant(F32, 0.0)
    with loop(b, lo, hi, name="n") as j:
        row = fptr(b, wp, b.mul(j, i64(K)))
        accs = [var(b, zero, f"acc{m}") for m in range(M)]
        with loop(b, 0, K, name="k") as kk:
            wv = load(b, row, kk)
            for m in range(M):
                xv = load(b, xp, b.add(i64(m * K), kk))
                b.store(b.fadd(get(b, accs[m]), b.fmul(xv, wv, flags=REASSOC), flags=REASSOC),
                        accs[m])
        for m in range(M):
            v = get(b, accs[m])
            if bp is not None:
                v = b.fadd(v, load(b, bp, j))
            i = b.add(i64(m * N), j)
            c = b.urem(b.udiv(i, i64(inner)), i64(dim))
            site = FlatSite(b, k, a, tensors, i, c, dim, inner)
            store(b, emit_program(site, steps, v), yp, i)
    b.ret_void()
    k.add_step(fn.name, 2 * M * N * K)
