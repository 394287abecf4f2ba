"""Elementwise steps of backward graphs: the gradients of the pointwise activations
whose rule is one expression (ReLU, Sigmoid, TanH, as ops/activation.py's ``grad``),
``Sum`` (gradient accumulation, inputs added in order) and ``Fill`` (a loss seed); and
Dropout in training, forward and gradient, with the mask the forward drew (the pass's
caller draws it from the net's random generator, as the reference op does, into the
node's state buffer: 0/1 floats) and ``scale = float(1 / (1 - ratio))``.

Each is one loop over the elements, the parts splitting it in 16-float aligned ranges;
the loop body is plain scalar IR that LLVM vectorizes.  A gradient written in place
over its input (passes/inplace.py) reads each element before writing it.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir

from ..irutil import F32, fptr, i64, load, loop, part_range, step_function, store
from .grad_linear import arena

#: op -> (reads the forward output (else the input), dx from (b, s, dy, attrs))
RULES = {}


def _rule(op: str, uses_output):
    def deco(fn):
        RULES[op] = (uses_output, fn)
        return fn
    return deco


def _relu_uses_output(attrs) -> bool:
    return attrs.get("negative_slope", 0.0) >= 0


@_rule("ReLU", _relu_uses_output)
def _relu(b, s, dy, attrs):
    slope = float(attrs.get("negative_slope", 0.0))
    pos = b.fcmp_ordered(">", s, ir.Constant(F32, 0.0))
    if slope == 0.0:
        return b.select(pos, dy, ir.Constant(F32, 0.0))
    return b.select(pos, dy, b.fmul(dy, ir.Constant(F32, slope)))


@_rule("Sigmoid", lambda attrs: True)
def _sigmoid(b, y, dy, attrs):
    return b.fmul(b.fmul(dy, y), b.fsub(ir.Constant(F32, 1.0), y))


@_rule("TanH", lambda attrs: True)
def _tanh(b, y, dy, attrs):
    return b.fmul(dy, b.fsub(ir.Constant(F32, 1.0), b.fmul(y, y)))


def supported(op: str, attrs: dict):
    if op == "Dropout":
        return None
    if op not in RULES:
        return (f"there is no CPU gradient kernel for {op} layers",
                "gradient kernels exist for Convolution, InnerProduct, Pooling (MAX, AVE), "
                "LRN (across channels), ReLU, Sigmoid, TanH, Dropout, SoftmaxWithLoss, Split "
                "and Sum; train with "
                "--backend reference")
    return None


def dropout_scale(attrs) -> float:
    return float(np.float32(1.0 / (1.0 - attrs["dropout_ratio"])))


def _lower_masked(k, name, src, mask_off, dst, count, attrs) -> None:
    """dst = src * mask * scale (train) or a copy of src (test)."""
    train = bool(attrs.get("train"))
    fn, b, a = step_function(k.mod, k.step_name(name))
    sp, dp = k.ptr(b, a, arena(src)), k.ptr(b, a, arena(dst))
    mp = k.ptr(b, a, arena(mask_off)) if train else None
    scale = ir.Constant(F32, dropout_scale(attrs)) if train else None
    lo, hi = part_range(b, count, a["part"], a["nparts"], align=16)
    with loop(b, lo, hi, name="i") as i:
        v = load(b, sp, i)
        if train:
            v = b.fmul(b.fmul(v, load(b, mp, i)), scale)
        store(b, v, dp, i)
    b.ret_void()
    k.add_step(fn.name, 2 * count)


def lower_dropout(k, n, mask_off) -> None:
    count = math.prod(k.shape(n.outputs[0]))
    _lower_masked(k, n.name, k.loc(n.inputs[0]), mask_off, k.loc(n.outputs[0]), count,
                  n.attrs)


def lower_grad(k, n, parts) -> None:
    op, attrs = n.attrs["op"], parts.fwd_attrs
    if op == "Dropout":
        from .grad_pool import state_offset
        dx = parts.input_grads[0]
        mask = state_offset(k, n.attrs["node"]) if attrs.get("train") else None
        _lower_masked(k, n.name, k.loc(parts.grads[0]), mask, k.loc(dx),
                      math.prod(k.shape(dx)), attrs)
        return
    uses_output, rule = RULES[op]
    src = parts.outputs[0] if uses_output(attrs) else parts.inputs[0]
    dy, dx = parts.grads[0], parts.input_grads[0]
    count = math.prod(k.shape(dx))
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    sp, gp, dp = (k.ptr(b, a, arena(k.loc(v))) for v in (src, dy, dx))
    lo, hi = part_range(b, count, a["part"], a["nparts"], align=16)
    with loop(b, lo, hi, name="i") as i:
        store(b, rule(b, load(b, sp, i), load(b, gp, i), attrs), dp, i)
    b.ret_void()
    k.add_step(fn.name, 2 * count)


def lower_sum(k, n) -> None:
    out = n.outputs[0]
    count = math.prod(k.shape(out))
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    ins = [k.ptr(b, a, arena(k.loc(v))) for v in n.inputs]
    op = k.ptr(b, a, arena(k.loc(out)))
    lo, hi = part_range(b, count, a["part"], a["nparts"], align=16)
    with loop(b, lo, hi, name="i") as i:
        acc = load(b, ins[0], i)
        for p in ins[1:]:
            acc = b.fadd(acc, load(b, p, i))
        store(b, acc, op, i)
    b.ret_void()
    k.add_step(fn.name, count * len(n.inputs))


def lower_fill(k, n) -> None:
    out = n.outputs[0]
    count = math.prod(k.shape(out))
    value = ir.Constant(F32, float(n.attrs.get("value", 0.0)))
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    op = k.ptr(b, a, arena(k.loc(out)))
    lo, hi = part_range(b, count, a["part"], a["nparts"], align=16)
    with loop(b, lo, hi, name="i") as i:
        store(b, value, op, i)
    b.ret_void()
    k.add_step(fn.name, count)


_ = (fptr, i64)
