"""Embed: y[i, :] = W[x[i], :] (+ b), x holding row indices as floats.

The parts split the indices.  An index that is not a whole number in [0, input_dim)
(which Caffe does not check in release builds and then reads past the table) gives a
row of NaN here, so a bad input shows in the output instead of reading stray memory.
"""
from __future__ import annotations

import math

from llvmlite import ir

from ..irutil import F32, fptr, i64, load, loop, part_range, step_function, store
from .pointwise import Src


def supported(g, n):
    return None


def lower_embed(k, n):
    x, y = n.inputs[0], n.outputs[0]
    count = math.prod(k.shape(x))
    K, N = int(n.attrs["input_dim"]), int(n.attrs["num_output"])
    bias = bool(n.attrs.get("bias_term", True)) and len(n.params) > 1
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", k.loc(x)))
    yp = k.ptr(b, a, Src("arena", k.loc(y)))
    wp = k.ptr(b, a, k.param_src(n.params[0]))
    bp = k.ptr(b, a, k.param_src(n.params[1])) if bias else None
    lo, hi = part_range(b, count, a["part"], a["nparts"])
    nan = ir.Constant(F32, float("nan"))
    with loop(b, lo, hi, name="i") as i:
        v = load(b, xp, i)
        inside = b.and_(b.fcmp_ordered(">=", v, ir.Constant(F32, 0.0)),
                        b.fcmp_ordered("<", v, ir.Constant(F32, float(K))))
        vc = b.select(inside, v, ir.Constant(F32, 0.0))   # fptosi of the rest is poison
        idx = b.fptosi(vc, ir.IntType(64))
        ok = b.and_(inside, b.fcmp_ordered("==", b.sitofp(idx, F32), vc))
        row = fptr(b, wp, b.mul(b.select(ok, idx, i64(0)), i64(N)))
        dst = fptr(b, yp, b.mul(i, i64(N)))
        with loop(b, 0, N, name="j") as j:
            w = load(b, row, j)
            if bp is not None:
                w = b.fadd(w, load(b, bp, j))
            store(b, b.select(ok, w, nan), dst, j)
    b.ret_void()
    k.add_step(fn.name, count * N)
