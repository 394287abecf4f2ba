"""LRN (ACROSS_CHANNELS, WITHIN_CHANNEL) and the fused LRN + Pooling.

ACROSS_CHANNELS, for channel c: scale = k + alpha/n * sum of x^2 over channels
c - pre .. c + pre (those inside the blob, added in that order, as the reference does);
y = x * scale^-beta.  The parts split (image, channel, block of pixels) items; for one
item the squares of the window's channels are summed into the output row, which is
then rewritten in place as x * scale^-beta.  Every loop runs along pixels and
vectorizes; beta = 0.75 (AlexNet, GoogLeNet) and 0.5, 1 use square roots and a
division instead of pow.

WITHIN_CHANNEL, per plane: the squares, AVE-pooled with kernel n, pad pre, stride 1
(Caffe builds it from a pooling layer: the divisor is always n*n), then
y = x * (1 + alpha * avg)^-beta.

LRN + Pooling: each plane is normalized into the part's scratch and pooled from there,
so the normalized blob never exists in the arena.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from ..irutil import F32, I64, PTR, fptr, i64, imax, imin, intrinsic, load, loop, \
    new_function, part_range, step_function, store
from . import pool
from .pointwise import Src

BLOCK = 1024


def supported(g, n):
    if len(g.types[n.inputs[0]].shape) != 4:
        return ("LRN of a blob that is not 4-D", "reshape to (N, C, H, W)")
    return None


def _consts(attrs):
    size = int(attrs["local_size"])
    alpha = np.float32(attrs["alpha"])
    beta = float(np.float32(attrs["beta"]))
    across = attrs.get("norm_region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS"
    return size, (size - 1) // 2, alpha, beta, float(np.float32(attrs.get("k", 1.0))), across


def _apply_beta(b, x, s, beta: float):
    """x * s^-beta (float32)."""
    sqrt = intrinsic(b.module, "llvm.sqrt.f32", F32, [F32])
    if beta == 0.75:
        r = b.call(sqrt, [s])
        return b.fdiv(x, b.fmul(r, b.call(sqrt, [r])))
    if beta == 0.5:
        return b.fdiv(x, b.call(sqrt, [s]))
    if beta == 1.0:
        return b.fdiv(x, s)
    pw = intrinsic(b.module, "llvm.pow.f32", F32, [F32, F32])
    return b.fmul(x, b.call(pw, [s, ir.Constant(F32, -beta)]))


def _make_across(mod, name, beta):
    """across(x_img, dst, c, C, HW, j0, len, pre, k, alpha_n): dst[j] = LRN of channel c at
    pixel j0 + j (dst is used as the accumulator first)."""
    args = [("x", PTR), ("dst", PTR), ("c", I64), ("C", I64), ("HW", I64), ("j0", I64),
            ("len", I64), ("pre", I64), ("k", F32), ("alpha_n", F32)]
    fn, b, a = new_function(mod, name, args, internal=True)
    for i in (0, 1):
        fn.args[i].add_attribute("noalias")
    dst, ln = a["dst"], a["len"]
    with loop(b, 0, ln, name="z") as j:
        store(b, ir.Constant(F32, 0.0), dst, j)
    c0 = imax(b, b.sub(a["c"], a["pre"]), 0)
    c1 = imin(b, b.add(b.add(a["c"], a["pre"]), i64(1)), a["C"])
    with loop(b, c0, c1, name="cc") as cc:
        src = fptr(b, a["x"], b.add(b.mul(cc, a["HW"]), a["j0"]))
        with loop(b, 0, ln, name="j") as j:
            v = load(b, src, j)
            p = fptr(b, dst, j)
            b.store(b.fadd(b.load(p, typ=F32), b.fmul(v, v)), p)
    own = fptr(b, a["x"], b.add(b.mul(a["c"], a["HW"]), a["j0"]))
    with loop(b, 0, ln, name="o") as j:
        s = b.fadd(a["k"], b.fmul(a["alpha_n"], load(b, dst, j)))
        store(b, _apply_beta(b, load(b, own, j), s, beta), dst, j)
    b.ret_void()
    return fn


def _make_within(mod, name, beta):
    """within(x_plane, dst, sq, avg, H, W, size, pre, alpha): dst = LRN of one plane
    (sq and avg are H*W scratch planes)."""
    args = [("x", PTR), ("dst", PTR), ("sq", PTR), ("avg", PTR), ("H", I64), ("W", I64),
            ("size", I64), ("pre", I64), ("alpha", F32)]
    fn, b, a = new_function(mod, name, args, internal=True)
    hw = b.mul(a["H"], a["W"])
    with loop(b, 0, hw, name="s") as j:
        v = load(b, a["x"], j)
        store(b, b.fmul(v, v), a["sq"], j)
    ave = mod.globals.get("gk_avepool_plane") or pool._make_plane(
        mod, "gk_avepool_plane", "AVE", False)
    one = i64(1)
    b.call(ave, [a["sq"], a["avg"], ir.Constant(PTR, None), a["H"], a["W"], a["H"], a["W"],
                 a["size"], a["size"], one, one, a["pre"], a["pre"]])
    with loop(b, 0, hw, name="o") as j:
        s = b.fadd(ir.Constant(F32, 1.0), b.fmul(a["alpha"], load(b, a["avg"], j)))
        store(b, _apply_beta(b, load(b, a["x"], j), s, beta), a["dst"], j)
    b.ret_void()
    return fn


def _helper(k, across: bool, beta: float):
    kind = "across" if across else "within"
    name = f"gk_lrn_{kind}_{str(beta).replace('.', '_').replace('-', 'm')}"
    make = _make_across if across else _make_within
    if not across:   # its AVE pooling helper must be registered with the context too
        pool.plane_function(k, "AVE")
    return k.helper(name, lambda mod, nm: make(mod, nm, beta))


def lower_lrn(k, n):
    x = n.inputs[0]
    N, C, H, W = k.shape(x)
    HW = H * W
    size, pre, alpha, beta, kk, across = _consts(n.attrs)
    fn_lrn = _helper(k, across, beta)
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", k.loc(x)))
    yp = k.ptr(b, a, Src("arena", k.loc(n.outputs[0])))
    if across:
        nb = -(-HW // BLOCK)
        lo, hi = part_range(b, N * C * nb, a["part"], a["nparts"])
        alpha_n = ir.Constant(F32, float(alpha / np.float32(size)))
        with loop(b, lo, hi, name="item") as t:
            blk = b.urem(t, i64(nb))
            plane = b.udiv(t, i64(nb))
            img, c = b.udiv(plane, i64(C)), b.urem(plane, i64(C))
            j0 = b.mul(blk, i64(BLOCK))
            ln = imin(b, i64(BLOCK), b.sub(i64(HW), j0))
            b.call(fn_lrn, [fptr(b, xp, b.mul(img, i64(C * HW))),
                            fptr(b, yp, b.add(b.mul(plane, i64(HW)), j0)), c, i64(C),
                            i64(HW), j0, ln, i64(pre), ir.Constant(F32, kk), alpha_n])
    else:
        k.need_scratch(8 * HW)
        lo, hi = part_range(b, N * C, a["part"], a["nparts"])
        with loop(b, lo, hi, name="plane") as p:
            off = b.mul(p, i64(HW))
            b.call(fn_lrn, [fptr(b, xp, off), fptr(b, yp, off), a["scratch"],
                            fptr(b, a["scratch"], HW), i64(H), i64(W), i64(size), i64(pre),
                            ir.Constant(F32, float(alpha))])
    b.ret_void()
    k.add_step(fn.name, N * C * HW * (size + 4))


def lower_lrn_pool(k, n, body):
    lrn_step, pool_step = body
    x = n.inputs[lrn_step["inputs"][0]]
    N, C, H, W = k.shape(x)
    HW = H * W
    size, pre, alpha, beta, kk, across = _consts(lrn_step["attrs"])
    geo = pool.geometry(pool_step["attrs"], (N, C, H, W))
    OH, OW = geo[2], geo[3]
    fn_lrn = _helper(k, across, beta)
    plane_fn = pool.fast_plane_function(k, pool_step["attrs"]["pool"], geo)
    k.need_scratch(4 * HW * (1 if across else 3))
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", k.loc(x)))
    yp = k.ptr(b, a, Src("arena", k.loc(n.outputs[0])))
    s0 = a["scratch"]
    lo, hi = part_range(b, N * C, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as p:
        if across:
            img, c = b.udiv(p, i64(C)), b.urem(p, i64(C))
            alpha_n = ir.Constant(F32, float(alpha / np.float32(size)))
            b.call(fn_lrn, [fptr(b, xp, b.mul(img, i64(C * HW))), s0, c, i64(C), i64(HW),
                            i64(0), i64(HW), i64(pre), ir.Constant(F32, kk), alpha_n])
        else:
            b.call(fn_lrn, [fptr(b, xp, b.mul(p, i64(HW))), s0, fptr(b, s0, HW),
                            fptr(b, s0, 2 * HW), i64(H), i64(W), i64(size), i64(pre),
                            ir.Constant(F32, float(alpha))])
        b.call(plane_fn, [s0, fptr(b, yp, b.mul(p, i64(OH * OW)))])
    b.ret_void()
    k.add_step(fn.name, N * C * (HW * (size + 4) + OH * OW * geo[4] * geo[5]))
