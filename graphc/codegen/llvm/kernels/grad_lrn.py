"""The gradient of LRN across channels (Caffe's CrossChannelBackward), as ops/norm.py:

    scale[c] = k + alpha/n * sum over the window of x^2        (window [c-pre, c-pre+n))
    y        = x * scale^-beta
    dx[c]    = dy * scale^-beta - (2 alpha beta / n) * x * sum over the window of
               (dy * y / scale)

The parts split (image, block of BLOCK pixels); a part computes scale and dy*y/scale of
every channel of its block into its scratch (the window sums add the channels in
order, as the reference), then dx.  The inner loops run along the pixels (LLVM
vectorizes them).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ..irutil import F32, fptr, i64, imin, intrinsic, load, loop, part_range, step_function, \
    store
from .grad_linear import arena

BLOCK = 256


def supported(attrs, shape):
    if attrs.get("norm_region", "ACROSS_CHANNELS") != "ACROSS_CHANNELS":
        return ("the gradient of WITHIN_CHANNEL LRN", "use ACROSS_CHANNELS, or train with "
                "--backend reference")
    if len(shape) != 4:
        return ("the gradient of LRN of a blob that is not 4-D", "reshape to (N, C, H, W)")
    return None


def _window_sum(b, src, c, j, C: int, pre: int, n: int, stride: int):
    """sum over i < n of src[(c - pre + i) * stride + j] for channels inside [0, C)."""
    acc = ir.Constant(F32, 0.0)
    for i in range(n):
        ch = b.add(c, i64(i - pre))
        inside = b.and_(b.icmp_signed(">=", ch, i64(0)), b.icmp_signed("<", ch, i64(C)))
        chc = imin(b, b.select(inside, ch, i64(0)), i64(C - 1))
        v = load(b, src, b.add(b.mul(chc, i64(stride)), j))
        acc = b.fadd(acc, b.select(inside, v, ir.Constant(F32, 0.0)))
    return acc


def lower_grad(k, n, parts) -> None:
    attrs = parts.fwd_attrs
    N, C, H, W = parts.input_shapes[0]
    HW = H * W
    size = int(attrs["local_size"])
    pre = (size - 1) // 2
    alpha, beta = np.float32(attrs["alpha"]), np.float32(attrs["beta"])
    a_n = float(alpha / np.float32(size))
    cache = float(np.float32(2.0 * float(alpha) * float(beta) / size))
    kk = float(np.float32(attrs["k"]))
    blk = min(BLOCK, HW)
    nblk = -(-HW // blk)
    k.need_scratch(4 * 2 * C * blk)
    powf = intrinsic(k.mod, "llvm.pow.f32", F32, [F32, F32])
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, arena(k.loc(parts.inputs[0])))
    gp = k.ptr(b, a, arena(k.loc(parts.grads[0])))
    dp = k.ptr(b, a, arena(k.loc(parts.input_grads[0])))
    sc = a["scratch"]                          # scale (C x blk)
    tt = fptr(b, a["scratch"], C * blk)         # dy * y / scale (C x blk)
    nb = ir.Constant(F32, -float(beta))
    yp = k.ptr(b, a, arena(k.loc(parts.outputs[0]))) if 0 in parts.outputs else None
    lo, hi = part_range(b, N * nblk, a["part"], a["nparts"])
    with loop(b, lo, hi, name="t") as t:
        img, bi = b.udiv(t, i64(nblk)), b.urem(t, i64(nblk))
        p0 = b.mul(bi, i64(blk))
        plen = imin(b, i64(blk), b.sub(i64(HW), p0))
        base = b.add(b.mul(img, i64(C * HW)), p0)
        x0, g0, d0 = (fptr(b, p, base) for p in (xp, gp, dp))
        y0 = fptr(b, yp, base) if yp is not None else None
        # x^2 into tt (temporarily), then scale
        with loop(b, 0, C, name="c") as c:
            with loop(b, 0, plen, name="j") as j:
                v = load(b, x0, b.add(b.mul(c, i64(HW)), j))
                store(b, b.fmul(v, v), tt, b.add(b.mul(c, i64(blk)), j))
        with loop(b, 0, C, name="c") as c:
            with loop(b, 0, plen, name="j") as j:
                acc = _window_sum(b, tt, c, j, C, pre, size, blk)
                s = b.fadd(ir.Constant(F32, kk), b.fmul(ir.Constant(F32, a_n), acc))
                store(b, s, sc, b.add(b.mul(c, i64(blk)), j))
        # tt = dy * y / scale (y the forward's top when the node reads it, else x * scale^-beta)
        with loop(b, 0, C, name="c") as c:
            with loop(b, 0, plen, name="j") as j:
                at = b.add(b.mul(c, i64(HW)), j)
                s = load(b, sc, b.add(b.mul(c, i64(blk)), j))
                y = load(b, y0, at) if y0 is not None else \
                    b.fmul(load(b, x0, at), b.call(powf, [s, nb]))
                store(b, b.fdiv(b.fmul(load(b, g0, at), y), s), tt,
                      b.add(b.mul(c, i64(blk)), j))
        # dx = dy * scale^-beta - cache * x * window sum of tt
        with loop(b, 0, C, name="c") as c:
            with loop(b, 0, plen, name="j") as j:
                at = b.add(b.mul(c, i64(HW)), j)
                s = load(b, sc, b.add(b.mul(c, i64(blk)), j))
                ratio = _window_sum(b, tt, c, j, C, pre, size, blk)
                first = b.fmul(load(b, g0, at), b.call(powf, [s, nb]))
                second = b.fmul(b.fmul(ir.Constant(F32, cache), load(b, x0, at)), ratio)
                store(b, b.fsub(first, second), d0, at)
    b.ret_void()
    k.add_step(fn.name, N * C * HW * (2 * size + 20))

