"""InnerProduct in a training pass: the forward with weights that change every
iteration, and its gradients, all as packed GEMMs (gemm.py).

    forward   y (M x N) = x (M x K) @ W^T + b     W^T transposed into a temporary each
                                                  pass (the inference kernel transposes
                                                  it once, at compile time)
    dx        (M x K) = dy (M x N) @ W            W as stored: no copy
    dW        (N x K) = dy^T (N x M) @ x          dy^T transposed into a temporary
    db        (N)     = sum over the M rows of dy

(``transpose: true`` stores W as (K x N): the roles of W and W^T swap.)  x is flattened
from ``axis`` as in ops/linear.py.
"""
from __future__ import annotations

from llvmlite import ir

from ....ops import get_op
from ..irutil import I32, i64, step_function
from .epilogue import ProgramEpilogue
from .pointwise import Src
from .transpose import emit_column_sums, emit_transpose


def arena(off: int) -> Src:
    return Src("arena", off)


def emit_gemm(k, name: str, M: int, N: int, K: int, A: Src, lda: int, B: Src, ldb: int,
              C: Src, ldc: int, *, accumulate: bool = False, bias: Src | None = None,
              mode: str = "col") -> None:
    """One step: C (M x N) = A (M x K) @ B (K x N) (+ C when ``accumulate``; + the bias
    per column ("col") or row ("row")), split among the parts by the GEMM."""
    epi = ProgramEpilogue([], mode, bias is not None)
    gemm = k.gemm(epi)
    k.need_scratch(k.gemm_workspace_bytes())
    fn, b, a = step_function(k.mod, k.step_name(name))
    extra = [k.ptr(b, a, bias)] if bias is not None else []
    b.call(gemm, [i64(M), i64(N), i64(K), k.ptr(b, a, A), i64(lda), k.ptr(b, a, B), i64(ldb),
                  k.ptr(b, a, C), i64(ldc), ir.Constant(I32, int(accumulate)), a["part"],
                  a["nparts"], a["scratch"], *extra])
    b.ret_void()
    k.add_step(fn.name, 2 * M * N * K, per_thread=1)


def _mkn(attrs, shape):
    _, m, kk, nn = get_op("InnerProduct")._mk(attrs, shape)
    return m, kk, nn


def lower_forward(k, n) -> None:
    """A (plain, unfused) InnerProduct node whose weights are the live parameters."""
    x, y = n.inputs[0], n.outputs[0]
    M, K, N = _mkn(n.attrs, k.shape(x))
    w = k.param_src(n.params[0])
    bias = k.param_src(n.params[1]) if len(n.params) > 1 else None
    if n.attrs.get("transpose"):
        wt = w
    else:
        wt = arena(k.temp(4 * K * N, "wt"))
        emit_transpose(k, n.name + "_wt", w, wt, 1, N, K)
    emit_gemm(k, n.name, M, N, K, arena(k.loc(x)), K, wt, N, arena(k.loc(y)), N, bias=bias)


def lower_grad(k, n, parts) -> None:
    """The Grad node of an InnerProduct (``parts``: train.GradParts)."""
    attrs = parts.fwd_attrs
    trans = bool(attrs.get("transpose"))
    dy = parts.grads[0]
    M, K, N = _mkn(attrs, parts.input_shapes[0])
    w = k.param_src(n.params[0])
    dyp = arena(k.loc(dy))
    if 0 in parts.input_grads:          # dx = dy @ W (W: N x K)
        dx = arena(k.loc(parts.input_grads[0]))
        if trans:                       # W stored K x N: its transpose is N x K
            wn = arena(k.temp(4 * K * N, "w_nk"))
            emit_transpose(k, n.name + "_w", w, wn, 1, K, N)
        else:
            wn = w
        emit_gemm(k, n.name + "_dx", M, K, N, dyp, N, wn, K, dx, K)
    if 0 in parts.param_grads:
        dw = arena(k.loc(parts.param_grads[0]))
        x = arena(k.loc(parts.inputs[0]))
        if trans:                       # dW (K x N) = x^T (K x M) @ dy (M x N)
            xt = arena(k.temp(4 * M * K, "xt"))
            emit_transpose(k, n.name + "_xt", x, xt, 1, M, K)
            emit_gemm(k, n.name + "_dw", K, N, M, xt, M, dyp, N, dw, N)
        else:                           # dW (N x K) = dy^T (N x M) @ x (M x K)
            dyt = arena(k.temp(4 * M * N, "dyt"))
            emit_transpose(k, n.name + "_dyt", dyp, dyt, 1, M, N)
            emit_gemm(k, n.name + "_dw", N, K, M, dyt, M, x, K, dw, K)
    if 1 in parts.param_grads:
        emit_column_sums(k, n.name + "_db", dyp, arena(k.loc(parts.param_grads[1])), M, N)
