"""SoftmaxWithLoss in a training pass: the loss (forward) and the gradient of its
predictions, as ops/loss.py's reference computes them; and Accuracy's forward (a train
net's monitor, as ops/softmax.py's).

Softmax along ``axis`` in float32 (subtract the maximum, exp, divide by the sum); the
loss is the sum of ``-log(max(p[label], FLT_MIN))`` (in double) over positions whose
label is not ``ignore_label``, divided by the normalizer (FULL, VALID, BATCH_SIZE, NONE;
at least 1).  A label outside [0, classes) makes the loss NaN (the reference raises an
error there; a compiled pass cannot) and gets no gradient.  The gradient is
``(p - onehot(label)) * top_diff / normalizer``, zero at ignored positions.

The loss is one part (a scalar sum in a fixed order); the gradient's parts split the
rows (``outer``), each part counting the valid labels itself for VALID.
"""
from __future__ import annotations

import math

from llvmlite import ir

from ....ops.loss import FLT_MIN
from ..irutil import F32, F64, I1, I64, fptr, get, i64, intrinsic, load, loop, part_range, \
    step_function, store, var
from .grad_linear import arena


def supported(attrs, x_shape):
    if int(attrs.get("num_top", 1)) > 1:
        return ("SoftmaxWithLoss with a second (probability) top",
                "remove the second top, or train with --backend reference")
    return None


def _dims(attrs, shape):
    axis = int(attrs.get("axis", 1))
    axis = axis + len(shape) if axis < 0 else axis
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _exp(b, x):
    fn = intrinsic(b.module, "llvm.exp.f32", F32, [F32])
    return b.call(fn, [x])


def _label_state(b, attrs, lp, pos, classes):
    """(label as i64, is it counted (not ignored), is it valid (in range))."""
    lab = b.fptosi(load(b, lp, pos), I64)      # static_cast<int>: truncation
    ignore = attrs.get("ignore_label")
    counted = ir.Constant(I1, 1) if ignore is None else b.icmp_signed("!=", lab, i64(int(ignore)))
    inside = b.and_(b.icmp_signed(">=", lab, i64(0)), b.icmp_signed("<", lab, i64(classes)))
    return lab, counted, inside


def _softmax_at(b, xp, o, i, classes, inner):
    """(max, sum of exp(x - max)) of row (o, ., i)."""
    base = b.add(b.mul(o, i64(classes * inner)), i)
    mx = var(b, load(b, xp, base), "mx")
    with loop(b, 1, classes, name="c") as c:
        v = load(b, xp, b.add(base, b.mul(c, i64(inner))))
        b.store(b.select(b.fcmp_ordered(">", v, get(b, mx)), v, get(b, mx)), mx)
    m = get(b, mx)
    s = var(b, ir.Constant(F32, 0.0), "s")
    with loop(b, 0, classes, name="c") as c:
        v = load(b, xp, b.add(base, b.mul(c, i64(inner))))
        b.store(b.fadd(get(b, s), _exp(b, b.fsub(v, m))), s)
    return base, m, get(b, s)


def _normalizer(b, attrs, outer, inner, count):
    mode = attrs.get("normalization", "VALID")
    if mode == "VALID":
        n = b.sitofp(count, F64)
    else:
        n = ir.Constant(F64, float({"FULL": outer * inner, "BATCH_SIZE": outer,
                                    "NONE": 1}[mode]))
    return b.select(b.fcmp_ordered("<", n, ir.Constant(F64, 1.0)), ir.Constant(F64, 1.0), n)


def _count_valid(b, attrs, lp, total, classes):
    cnt = var(b, i64(0), "cnt")
    with loop(b, 0, total, name="q") as q:
        _, counted, _ = _label_state(b, attrs, lp, q, classes)
        b.store(b.add(get(b, cnt), b.zext(counted, I64)), cnt)
    return get(b, cnt)


def lower_forward(k, n) -> None:
    x, labels = n.inputs[0], n.inputs[1]
    outer, classes, inner = _dims(n.attrs, k.shape(x))
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp, lp, yp = (k.ptr(b, a, arena(k.loc(v))) for v in (x, labels, n.outputs[0]))
    log = intrinsic(b.module, "llvm.log.f64", F64, [F64])
    total = var(b, ir.Constant(F64, 0.0), "total")
    cnt = var(b, i64(0), "cnt")
    bad = var(b, ir.Constant(I1, 0), "bad")
    with loop(b, 0, outer, name="o") as o:
        with loop(b, 0, inner, name="i") as i:
            lab, counted, inside = _label_state(b, n.attrs, lp, b.add(b.mul(o, i64(inner)), i),
                                                classes)
            with b.if_then(counted):
                b.store(b.add(get(b, cnt), i64(1)), cnt)
                with b.if_else(inside) as (ok, no):
                    with ok:
                        base, m, s = _softmax_at(b, xp, o, i, classes, inner)
                        v = load(b, xp, b.add(base, b.mul(lab, i64(inner))))
                        p = b.fdiv(_exp(b, b.fsub(v, m)), s)
                        # max(p, FLT_MIN), a NaN p staying NaN (as np.maximum)
                        p = b.select(b.fcmp_ordered("<", p, ir.Constant(F32, FLT_MIN)),
                                     ir.Constant(F32, FLT_MIN), p)
                        b.store(b.fsub(get(b, total), b.call(log, [b.fpext(p, F64)])), total)
                    with no:
                        b.store(ir.Constant(I1, 1), bad)
    norm = _normalizer(b, n.attrs, outer, inner, get(b, cnt))
    loss = b.fptrunc(b.fdiv(get(b, total), norm), F32)
    nan = ir.Constant(F32, float("nan"))
    store(b, b.select(get(b, bad), nan, loss), yp, 0)
    b.ret_void()
    k.add_step(fn.name, 0)


def lower_grad(k, n, parts) -> None:
    attrs = parts.fwd_attrs
    x, labels = parts.inputs[0], parts.inputs[1] if 1 in parts.inputs else None
    if labels is None:
        raise ValueError("SoftmaxWithLoss gradient without its labels")
    dtop, dx = parts.grads[0], parts.input_grads[0]
    outer, classes, inner = _dims(attrs, k.shape(x))
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp, lp, tp, dp = (k.ptr(b, a, arena(k.loc(v))) for v in (x, labels, dtop, dx))
    count = _count_valid(b, attrs, lp, outer * inner, classes) \
        if attrs.get("normalization", "VALID") == "VALID" else i64(0)
    norm = _normalizer(b, attrs, outer, inner, count)
    scale = b.fdiv(load(b, tp, 0), b.fptrunc(norm, F32))
    zero = ir.Constant(F32, 0.0)
    lo, hi = part_range(b, outer, a["part"], a["nparts"])
    with loop(b, lo, hi, name="o") as o:
        with loop(b, 0, inner, name="i") as i:
            lab, counted, inside = _label_state(b, attrs, lp, b.add(b.mul(o, i64(inner)), i),
                                                classes)
            use = b.and_(counted, inside)
            base, m, s = _softmax_at(b, xp, o, i, classes, inner)
            with loop(b, 0, classes, name="c") as c:
                at = b.add(base, b.mul(c, i64(inner)))
                p = b.fdiv(_exp(b, b.fsub(load(b, xp, at), m)), s)
                hit = b.icmp_signed("==", c, lab)
                d = b.select(hit, b.fsub(p, ir.Constant(F32, 1.0)), p)
                store(b, b.select(use, b.fmul(d, scale), zero), dp, at)
    b.ret_void()
    k.add_step(fn.name, 6 * outer * classes * inner)


_ = fptr


def supported_accuracy(attrs):
    if int(attrs.get("num_top", 1)) > 1:
        return ("Accuracy with a second (per-class) top", "remove the second top, or "
                "train with --backend reference")
    return None


def lower_accuracy(k, n) -> None:
    """Accuracy (forward only, one part): a position counts as correct when at most
    ``top_k`` classes (the true one included) score >= the true class, as ops/softmax.py;
    ignored labels are skipped, no counted label gives 0, a label out of range NaN."""
    x, labels = n.inputs[0], n.inputs[1]
    outer, classes, inner = _dims(n.attrs, k.shape(x))
    top_k = int(n.attrs.get("top_k", 1))
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp, lp, yp = (k.ptr(b, a, arena(k.loc(v))) for v in (x, labels, n.outputs[0]))
    cnt, hits = var(b, i64(0), "cnt"), var(b, i64(0), "hits")
    bad = var(b, ir.Constant(I1, 0), "bad")
    with loop(b, 0, outer, name="o") as o:
        with loop(b, 0, inner, name="i") as i:
            lab, counted, inside = _label_state(b, n.attrs, lp, b.add(b.mul(o, i64(inner)), i),
                                                classes)
            with b.if_then(counted):
                b.store(b.add(get(b, cnt), i64(1)), cnt)
                with b.if_else(inside) as (ok, no):
                    with ok:
                        base = b.add(b.mul(o, i64(classes * inner)), i)
                        true = load(b, xp, b.add(base, b.mul(lab, i64(inner))))
                        ge = var(b, i64(0), "ge")
                        with loop(b, 0, classes, name="c") as c:
                            v = load(b, xp, b.add(base, b.mul(c, i64(inner))))
                            b.store(b.add(get(b, ge), b.zext(b.fcmp_ordered(">=", v, true),
                                                             I64)), ge)
                        win = b.icmp_signed("<=", get(b, ge), i64(top_k))
                        b.store(b.add(get(b, hits), b.zext(win, I64)), hits)
                    with no:
                        b.store(ir.Constant(I1, 1), bad)
    n_ = get(b, cnt)
    acc = b.fdiv(b.sitofp(get(b, hits), F32), b.sitofp(n_, F32))
    acc = b.select(b.icmp_signed(">", n_, i64(0)), acc, ir.Constant(F32, 0.0))
    store(b, b.select(get(b, bad), ir.Constant(F32, float("nan")), acc), yp, 0)
    b.ret_void()
    k.add_step(fn.name, 0)
