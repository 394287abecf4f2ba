"""Softmax along ``axis``: the blob as (outer, C, inner); for every (outer, inner) line,
the max over C, e = exp(x - max), then e / sum(e) (Caffe's order of operations).  The
parts split the lines; with inner = 1 a line is contiguous and the max and sum loops
vectorize (the sum may be reassociated)."""
from __future__ import annotations

import math

from llvmlite import ir

from ....ops.base import canonical_axis
from ..irutil import F32, REASSOC, fptr, get, i64, intrinsic, load, loop, part_range, \
    step_function, store, var
from .pointwise import Src


def supported(g, n):
    return None


def lower_softmax(k, n):
    x, y = n.inputs[0], n.outputs[0]
    shape = k.shape(x)
    axis = canonical_axis(int(n.attrs.get("axis", 1)), len(shape), "softmax axis")
    outer, C, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    exp = intrinsic(k.mod, "llvm.exp.f32", F32, [F32])
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", k.loc(x)))
    yp = k.ptr(b, a, Src("arena", k.loc(y)))
    lo, hi = part_range(b, outer * inner, a["part"], a["nparts"])
    with loop(b, lo, hi, name="line") as t:
        o, i = b.udiv(t, i64(inner)), b.urem(t, i64(inner))
        base = b.add(b.mul(o, i64(C * inner)), i)
        src, dst = fptr(b, xp, base), fptr(b, yp, base)

        def at(c):
            return c if inner == 1 else b.mul(c, i64(inner))

        m = var(b, load(b, src, 0), "max")
        with loop(b, 1, C, name="m") as c:
            v = load(b, src, at(c))
            b.store(b.select(b.fcmp_ordered(">", v, get(b, m)), v, get(b, m)), m)
        s = var(b, ir.Constant(F32, 0.0), "sum")
        mx = get(b, m)
        with loop(b, 0, C, name="e") as c:
            e = b.call(exp, [b.fsub(load(b, src, at(c)), mx)])
            store(b, e, dst, at(c))
            b.store(b.fadd(get(b, s), e, flags=REASSOC), s)
        total = get(b, s)
        with loop(b, 0, C, name="d") as c:
            store(b, b.fdiv(load(b, dst, at(c)), total), dst, at(c))
    b.ret_void()
    k.add_step(fn.name, 8 * outer * C * inner)
