"""Pooling in a training pass: the MAX forward that keeps its argmax, and the gradients.

* Forward with ``keep_argmax`` (set by the ``pool-argmax`` pass): the pooled values and,
  in the node's state buffer (planned by passes/memory.py), the index h*W + w of each
  window's maximum as a float (``argmax_plane_function``: the first maximum in
  row-major order, as Caffe).
* MAX gradient: each plane of dx zeroed, then every dy added at its window's argmax --
  the kept one, or (no ``keep_argmax``) one found again in x by the same plane function
  into the thread's scratch.
* AVE gradient: every dy / (window clipped to the padded extent) added over its window
  clipped to the image (Caffe's Backward_cpu).
The parts split the N*C planes, so no two parts write one element.
"""
from __future__ import annotations

from llvmlite import ir

from ..irutil import F32, FLT_MAX, I64, PTR, fptr, get, i64, imax, imin, load, loop, \
    memset0, new_function, part_range, step_function, store, var
from .grad_linear import arena
from .pool import _interior, geometry


def argmax_plane_function(k, geo) -> ir.Function:
    """``f(src, dst, mask)``: one plane MAX-pooled with the geometry ``geo`` built in, the
    index h*W + w of each maximum (the first in row-major order: strictly greater wins)
    written to mask as a float.  Outputs whose windows lie inside the image (ranges known
    at compile time) read their KH*KW taps at constant offsets, along the output row (a
    loop LLVM vectorizes); the border outputs clip their windows at run time."""
    name = "gk_maxpool_argmax_" + "_".join(map(str, geo))
    return k.helper(name, lambda mod, nm: _make_argmax_plane(mod, nm, geo))


def _make_argmax_plane(mod, name, geo):
    H, W, OH, OW, KH, KW, SH, SW, PH, PW = geo
    fn, b, a = new_function(mod, name, [("src", PTR), ("dst", PTR), ("mask", PTR)],
                            internal=True)
    for i in (0, 1, 2):
        fn.args[i].add_attribute("noalias")
    src, dst, mask = a["src"], a["dst"], a["mask"]
    lo_w, hi_w = _interior(W, KW, SW, PW, OW)
    lo_h, hi_h = _interior(H, KH, SH, PH, OH)

    def update(acc, arg, v, idx):
        better = b.fcmp_ordered(">", v, acc)
        return b.select(better, v, acc), b.select(better, idx, arg)

    def finish(acc, arg, o):
        store(b, acc, dst, o)
        store(b, b.sitofp(arg, F32), mask, o)

    def clipped(oh, ow):
        """One output whose window may leave the image: runtime-clipped loops."""
        h0 = b.sub(b.mul(oh, i64(SH)), i64(PH))
        w0 = b.sub(b.mul(ow, i64(SW)), i64(PW))
        hs, he = imax(b, h0, 0), imin(b, b.add(h0, i64(KH)), H)
        ws, we = imax(b, w0, 0), imin(b, b.add(w0, i64(KW)), W)
        acc, arg = var(b, ir.Constant(F32, -FLT_MAX), "acc"), var(b, i64(-1), "arg")
        with loop(b, hs, he, name="h") as h:
            with loop(b, ws, we, name="w") as w:
                idx = b.add(b.mul(h, i64(W)), w)
                na, ng = update(get(b, acc), get(b, arg), load(b, src, idx), idx)
                b.store(na, acc)
                b.store(ng, arg)
        finish(get(b, acc), get(b, arg), b.add(b.mul(oh, i64(OW)), ow))

    def clipped_cols(oh, c0, c1):
        if c1 > c0:
            with loop(b, c0, c1, name="bw") as ow:
                clipped(oh, ow)

    with loop(b, 0, OH, name="oh") as oh:
        inside = b.and_(b.icmp_signed(">=", oh, i64(lo_h)), b.icmp_signed("<", oh, i64(hi_h)))
        with b.if_else(inside) as (fast, slow):
            with fast:
                clipped_cols(oh, 0, lo_w)
                clipped_cols(oh, hi_w, OW)
                # interior: the whole window inside, its taps at constant offsets
                top = b.mul(b.sub(b.mul(oh, i64(SH)), i64(PH)), i64(W))
                with loop(b, lo_w, hi_w, name="iw") as ow:
                    base = b.add(top, b.sub(b.mul(ow, i64(SW)), i64(PW)))
                    acc, arg = ir.Constant(F32, -FLT_MAX), i64(-1)
                    for kh in range(KH):
                        for kw in range(KW):
                            idx = b.add(base, i64(kh * W + kw))
                            acc, arg = update(acc, arg, load(b, src, idx), idx)
                    finish(acc, arg, b.add(b.mul(oh, i64(OW)), ow))
            with slow:
                clipped_cols(oh, 0, OW)
    b.ret_void()
    return fn


def state_offset(k, node_name: str) -> int:
    """The arena offset of the state buffer of forward node ``node_name``."""
    for buf in k.plan.buffers:
        if buf.state_of == node_name:
            return k.plan.buffer_offsets[buf.root]
    raise KeyError(node_name)


def lower_forward_argmax(k, n) -> None:
    x, y = n.inputs[0], n.outputs[0]
    shape = k.shape(x)
    geo = geometry(n.attrs, shape)
    H, W, OH, OW = geo[:4]
    planes = shape[0] * shape[1]
    plane = argmax_plane_function(k, geo)
    mask = state_offset(k, n.name)
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp, yp, mp = (k.ptr(b, a, arena(o)) for o in (k.loc(x), k.loc(y), mask))
    lo, hi = part_range(b, planes, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as p:
        off = b.mul(p, i64(OH * OW))
        b.call(plane, [fptr(b, xp, b.mul(p, i64(H * W))), fptr(b, yp, off), fptr(b, mp, off)])
    b.ret_void()
    k.add_step(fn.name, planes * OH * OW * geo[4] * geo[5])


def lower_grad(k, n, parts) -> None:
    attrs = parts.fwd_attrs
    shape = tuple(parts.input_shapes[0])
    geo = geometry(attrs, shape)
    H, W, OH, OW, KH, KW, SH, SW, PH, PW = geo
    planes = shape[0] * shape[1]
    dy, dx = parts.grads[0], parts.input_grads[0]
    method = attrs["pool"]
    keep = bool(attrs.get("keep_argmax"))
    if method == "MAX" and not keep:
        k.need_scratch(8 * OH * OW)
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    dyp, dxp = k.ptr(b, a, arena(k.loc(dy))), k.ptr(b, a, arena(k.loc(dx)))
    if method == "MAX":
        if keep:
            mp = k.ptr(b, a, arena(state_offset(k, attrs_node(n))))
        else:
            xp = k.ptr(b, a, arena(k.loc(parts.inputs[0])))
            plane_fn = argmax_plane_function(k, geo)
    lo, hi = part_range(b, planes, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as p:
        g = fptr(b, dyp, b.mul(p, i64(OH * OW)))
        d = fptr(b, dxp, b.mul(p, i64(H * W)))
        memset0(b, d, 4 * H * W)
        if method == "MAX":
            if keep:
                m = fptr(b, mp, b.mul(p, i64(OH * OW)))
            else:
                m = fptr(b, a["scratch"], OH * OW)
                b.call(plane_fn, [fptr(b, xp, b.mul(p, i64(H * W))), a["scratch"], m])
            with loop(b, 0, OH * OW, name="o") as o:
                idx = b.fptosi(load(b, m, o), I64)
                store(b, b.fadd(load(b, d, idx), load(b, g, o)), d, idx)
        else:
            with loop(b, 0, OH, name="oh") as oh:
                hs = b.sub(b.mul(oh, i64(SH)), i64(PH))
                he = imin(b, b.add(hs, i64(KH)), i64(H + PH))
                with loop(b, 0, OW, name="ow") as ow:
                    ws = b.sub(b.mul(ow, i64(SW)), i64(PW))
                    we = imin(b, b.add(ws, i64(KW)), i64(W + PW))
                    size = b.mul(b.sub(he, hs), b.sub(we, ws))
                    v = b.fdiv(load(b, g, b.add(b.mul(oh, i64(OW)), ow)),
                               b.sitofp(size, F32))
                    h0, h1 = imax(b, hs, i64(0)), imin(b, he, i64(H))
                    w0, w1 = imax(b, ws, i64(0)), imin(b, we, i64(W))
                    with loop(b, h0, h1, name="h") as h:
                        row = fptr(b, d, b.mul(h, i64(W)))
                        with loop(b, w0, w1, name="w") as w:
                            store(b, b.fadd(load(b, row, w), v), row, w)
    b.ret_void()
    k.add_step(fn.name, planes * OH * OW * KH * KW)


def attrs_node(n) -> str:
    return n.attrs["node"]


def supported(attrs, shape):
    if attrs["pool"] not in ("MAX", "AVE"):
        return (f"the gradient of {attrs['pool']} pooling", "use MAX or AVE pooling, or "
                "train with --backend reference")
    if len(shape) != 4:
        return ("the gradient of pooling a blob that is not 4-D", "reshape to (N, C, H, W)")
    return None



