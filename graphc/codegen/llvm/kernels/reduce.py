"""Row reductions: ArgMax, Reduction and MVN.

Each sees its blob as rows (one per independently reduced slice) and splits the rows
among the parts.  Sums are accumulated in double precision, as the reference does, so
long rows lose nothing to float32 rounding.

* ArgMax: top_k by k selection passes over the row, each pass taking the largest
  (value, index) pair below the previous one, so ties keep Caffe's order (the larger
  index first) without sorting or scratch memory.  Rows are strided when ``axis`` is
  given (the blob as (outer, C, inner): a row is one (outer, inner) line).
* Reduction: SUM, ASUM, SUMSQ or MEAN of each row, times coeff.
* MVN: subtract each row's mean; with normalize_variance divide by (std + eps).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from ....ops.base import canonical_axis
from ..irutil import F32, F64, fptr, get, i64, intrinsic, load, loop, part_range, \
    step_function, store, var
from .pointwise import Src


def supported(g, n):
    return None


def _rows_step(k, n, rows: int, work_per_row: int):
    """A step over ``rows`` rows: (fn, builder, args, x pointer, y pointer, row loop)."""
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", k.loc(n.inputs[0])))
    yp = k.ptr(b, a, Src("arena", k.loc(n.outputs[0])))
    lo, hi = part_range(b, rows, a["part"], a["nparts"])
    k.add_step(fn.name, rows * work_per_row)
    return fn, b, a, xp, yp, (lo, hi)


# ---- ArgMax ------------------------------------------------------------------------------

def lower_argmax(k, n):
    x = n.inputs[0]
    shape = k.shape(x)
    attrs = n.attrs
    top_k = int(attrs.get("top_k", 1))
    out_max = bool(attrs.get("out_max_val", False))
    axis = attrs.get("axis")
    if axis is not None:
        axis = canonical_axis(int(axis), len(shape), "argmax axis")
        outer, C, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    else:
        outer, C, inner = shape[0], math.prod(shape[1:]), 1
    fn, b, a, xp, yp, (lo, hi) = _rows_step(k, n, outer * inner, C * top_k)
    with loop(b, lo, hi, name="row") as r:
        o, i = b.udiv(r, i64(inner)), b.urem(r, i64(inner))
        src = fptr(b, xp, b.add(b.mul(o, i64(C * inner)), i))
        # the previous pick (value, index); the first pass has none (index C: above all)
        pv = var(b, ir.Constant(F32, 0.0), "pv")
        pi = var(b, i64(C), "pi")
        with loop(b, 0, top_k, name="j") as j:
            bv = var(b, ir.Constant(F32, 0.0), "bv")
            bi = var(b, i64(-1), "bi")
            with loop(b, 0, C, name="c") as c:
                v = load(b, src, b.mul(c, i64(inner)))
                prev_v, prev_i = get(b, pv), get(b, pi)
                # (v, c) < (prev_v, prev_i) in the order "value, then index", or no prev
                below = b.or_(b.icmp_signed("==", prev_i, i64(C)),
                              b.or_(b.fcmp_ordered("<", v, prev_v),
                                    b.and_(b.fcmp_ordered("==", v, prev_v),
                                           b.icmp_signed("<", c, prev_i))))
                best_v, best_i = get(b, bv), get(b, bi)
                # (v, c) >= (best_v, best_i): c rises, so ties go to the later index
                better = b.or_(b.icmp_signed("<", best_i, i64(0)),
                               b.fcmp_ordered(">=", v, best_v))
                take = b.and_(below, better)
                b.store(b.select(take, v, best_v), bv)
                b.store(b.select(take, c, best_i), bi)
            v, c = get(b, bv), get(b, bi)
            b.store(v, pv)
            b.store(c, pi)
            if axis is not None:
                at = b.add(b.mul(b.add(b.mul(o, i64(top_k)), j), i64(inner)), i)
                store(b, v if out_max else b.sitofp(c, F32), yp, at)
            else:
                base = b.mul(o, i64((2 if out_max else 1) * top_k))
                store(b, b.sitofp(c, F32), yp, b.add(base, j))
                if out_max:
                    store(b, v, yp, b.add(base, b.add(j, i64(top_k))))
    b.ret_void()


# ---- Reduction ---------------------------------------------------------------------------

def lower_reduction(k, n):
    x = n.inputs[0]
    shape = k.shape(x)
    attrs = n.attrs
    axis = canonical_axis(int(attrs.get("axis", 0)), len(shape), "reduction axis")
    num, dim = math.prod(shape[:axis]), math.prod(shape[axis:])
    op = attrs.get("operation", "SUM")
    coeff = np.float32(attrs.get("coeff", 1.0))
    if op == "MEAN":   # Caffe: coeff /= dim, in float
        coeff = coeff / np.float32(dim)
    fabs = intrinsic(k.mod, "llvm.fabs.f64", F64, [F64])
    fn, b, a, xp, yp, (lo, hi) = _rows_step(k, n, num, 2 * dim)
    with loop(b, lo, hi, name="row") as r:
        src = fptr(b, xp, b.mul(r, i64(dim)))
        s = var(b, ir.Constant(F64, 0.0), "s")
        with loop(b, 0, dim, name="e") as e:
            v = b.fpext(load(b, src, e), F64)
            if op == "ASUM":
                v = b.call(fabs, [v])
            elif op == "SUMSQ":
                v = b.fmul(v, v)
            b.store(b.fadd(get(b, s), v), s)
        res = b.fmul(get(b, s), ir.Constant(F64, float(coeff)))
        store(b, b.fptrunc(res, F32), yp, r)
    b.ret_void()


# ---- MVN ---------------------------------------------------------------------------------

def lower_mvn(k, n):
    from ....ops import get_op
    x = n.inputs[0]
    shape = k.shape(x)
    attrs = n.attrs
    rows = get_op("MVN")._rows(attrs, shape)
    dim = math.prod(shape) // rows
    normalize = bool(attrs.get("normalize_variance", True))
    eps = ir.Constant(F32, float(attrs.get("eps", 1e-9)))
    sqrt = intrinsic(k.mod, "llvm.sqrt.f32", F32, [F32])
    fn, b, a, xp, yp, (lo, hi) = _rows_step(k, n, rows, 6 * dim)
    inv_dim = ir.Constant(F64, 1.0 / dim)
    with loop(b, lo, hi, name="row") as r:
        src = fptr(b, xp, b.mul(r, i64(dim)))
        dst = fptr(b, yp, b.mul(r, i64(dim)))
        s = var(b, ir.Constant(F64, 0.0), "s")
        with loop(b, 0, dim, name="m") as e:
            b.store(b.fadd(get(b, s), b.fpext(load(b, src, e), F64)), s)
        mean = b.fptrunc(b.fmul(get(b, s), inv_dim), F32)
        if not normalize:
            with loop(b, 0, dim, name="c") as e:
                store(b, b.fsub(load(b, src, e), mean), dst, e)
        else:
            q = var(b, ir.Constant(F64, 0.0), "q")
            with loop(b, 0, dim, name="v") as e:
                d = b.fpext(b.fsub(load(b, src, e), mean), F64)
                b.store(b.fadd(get(b, q), b.fmul(d, d)), q)
            var_ = b.fptrunc(b.fmul(get(b, q), inv_dim), F32)
            std = b.call(sqrt, [var_])
            den = b.fadd(std, eps)
            with loop(b, 0, dim, name="c") as e:
                store(b, b.fdiv(b.fsub(load(b, src, e), mean), den), dst, e)
    b.ret_void()
