"""Pooling (MAX, AVE; global) over (N, C, H, W), Caffe's geometry and rounding (the
output size comes from ops/pool.py).  The parts split the N*C planes; one plane is
pooled by a module-level function made for its geometry (shared by the Pooling nodes
and fused LRN + Pooling kernels of that geometry): for every output row it runs over
the window's input rows, and for the output columns whose windows lie inside the image
(known at compile time) over the window's columns with no bounds checks, so the loop
along the output row vectorizes; the border columns clip their windows.  One window over
the whole plane (global pooling) is a vector reduction of the plane's contiguous floats.

MAX: the window clipped to the image, start value -FLT_MAX, strictly greater wins (the
first maximum in row-major order; the mask holds its index h * W + w as a float).
AVE: the sum over the window clipped to the image, divided by the window clipped to the
padded extent.
"""
from __future__ import annotations

from llvmlite import ir

from ....ops.pool import pool_geometry
from ..irutil import F32, FLT_MAX, I32, I64, PTR, fptr, get, i64, imax, imin, load, loop, \
    new_function, part_range, step_function, store, var
from .pointwise import Src

PLANE_ARGS = [("src", PTR), ("dst", PTR), ("mask", PTR), ("H", I64), ("W", I64),
              ("OH", I64), ("OW", I64), ("KH", I64), ("KW", I64), ("SH", I64), ("SW", I64),
              ("PH", I64), ("PW", I64)]


def supported(g, n):
    a = n.attrs
    if a["pool"] not in ("MAX", "AVE"):
        return (f"{a['pool']} pooling", "use MAX or AVE pooling")
    if len(g.types[n.inputs[0]].shape) != 4:
        return ("pooling of a blob that is not 4-D", "reshape to (N, C, H, W)")
    return None


def geometry(attrs, shape):
    """(H, W, OH, OW, KH, KW, SH, SW, PH, PW)."""
    kernel, stride, pad, out = pool_geometry(attrs, shape)
    return (*shape[2:], *out, *kernel, *stride, *pad)


def plane_function(k, method: str, with_mask: bool = False) -> ir.Function:
    """The generic plane function (geometry as arguments; the mask variant, and the
    WITHIN_CHANNEL LRN's averaging)."""
    name = f"gk_{method.lower()}pool_plane{'_mask' if with_mask else ''}"
    return k.helper(name, lambda mod, nm: _make_plane(mod, nm, method, with_mask))


def fast_plane_function(k, method: str, geo) -> ir.Function:
    """``f(src, dst)``: one plane pooled with the geometry ``geo`` built in."""
    name = f"gk_{method.lower()}pool_" + "_".join(map(str, geo))
    if _is_global(geo):
        vw = k.gemm_config.vw
        return k.helper(f"{name}_v{vw}",
                        lambda mod, nm: _make_global_plane(mod, nm, method, geo, vw))
    return k.helper(name, lambda mod, nm: _make_fast_plane(mod, nm, method, geo))


def _is_global(geo) -> bool:
    """One window over the whole plane, no padding (global pooling, or a kernel as
    large as the image)."""
    H, W, OH, OW, KH, KW, SH, SW, PH, PW = geo
    return OH == OW == 1 and PH == PW == 0 and KH >= H and KW >= W


#: vector accumulators of the global pooling loop (hide the add / compare latency)
GLOBAL_ACCS = 4


def _make_global_plane(mod, name, method, geo, vw: int):
    """The plane's H*W contiguous floats reduced with GLOBAL_ACCS vector accumulators
    (a scalar chain would wait on each add's latency: SqueezeNet's 13x13 pool10 ran at
    one add per ~3 cycles), then across the lanes, then the tail; AVE divides by H*W
    (the window clipped to the image, which is the padded extent here)."""
    H, W = geo[:2]
    n = H * W
    fn, b, a = new_function(mod, name, [("src", PTR), ("dst", PTR)], internal=True)
    for i in (0, 1):
        fn.args[i].add_attribute("noalias")
    src = a["src"]
    is_max = method == "MAX"
    vt = ir.VectorType(F32, vw)
    init = -FLT_MAX if is_max else 0.0

    def combine(acc, v):
        if is_max:     # strictly greater wins, as in the windowed kernel
            return b.select(b.fcmp_ordered(">", v, acc), v, acc)
        return b.fadd(acc, v)

    accs = [var(b, ir.Constant(vt, [init] * vw), f"acc{u}") for u in range(GLOBAL_ACCS)]
    step = vw * GLOBAL_ACCS
    main_end, vec_end = n - n % step, n - n % vw
    if main_end:
        with loop(b, 0, main_end, step, name="blk") as i:
            for u, slot in enumerate(accs):
                v = load(b, src, b.add(i, i64(u * vw)), ty=vt)
                b.store(combine(get(b, slot), v), slot)
    if vec_end > main_end:
        with loop(b, main_end, vec_end, vw, name="vec") as i:
            b.store(combine(get(b, accs[0]), load(b, src, i, ty=vt)), accs[0])
    vals = [get(b, slot) for slot in accs]
    while len(vals) > 1:
        vals = [combine(vals[i], vals[i + 1]) for i in range(0, len(vals), 2)]
    acc = b.extract_element(vals[0], ir.Constant(I32, 0))
    for lane in range(1, vw):
        acc = combine(acc, b.extract_element(vals[0], ir.Constant(I32, lane)))
    for j in range(vec_end, n):        # fewer than vw floats
        acc = combine(acc, load(b, src, i64(j)))
    if not is_max:
        acc = b.fdiv(acc, ir.Constant(F32, float(n)))
    store(b, acc, a["dst"], i64(0))
    b.ret_void()
    return fn


def _interior(n_in: int, k: int, s: int, p: int, n_out: int) -> tuple[int, int]:
    """Output positions [lo, hi) whose window [o*s - p, o*s - p + k) is inside [0, n_in)."""
    lo = min(n_out, -(-p // s))
    hi = max(lo, min(n_out, (n_in + p - k) // s + 1))
    return lo, hi


def _make_fast_plane(mod, name, method, geo):
    H, W, OH, OW, KH, KW, SH, SW, PH, PW = geo
    fn, b, a = new_function(mod, name, [("src", PTR), ("dst", PTR)], internal=True)
    for i in (0, 1):
        fn.args[i].add_attribute("noalias")
    src, dst = a["src"], a["dst"]
    is_max = method == "MAX"
    lo, hi = _interior(W, KW, SW, PW, OW)

    def combine(acc, v):
        if is_max:
            return b.select(b.fcmp_ordered(">", v, acc), v, acc)
        return b.fadd(acc, v)

    with loop(b, 0, OH, name="oh") as oh:
        h0 = b.sub(b.mul(oh, i64(SH)), i64(PH))
        hs, he = imax(b, h0, 0), imin(b, b.add(h0, i64(KH)), H)
        drow = fptr(b, dst, b.mul(oh, i64(OW)))
        init = ir.Constant(F32, -FLT_MAX if is_max else 0.0)
        with loop(b, 0, OW, name="init") as ow:
            store(b, init, drow, ow)
        with loop(b, hs, he, name="h") as h:
            srow = fptr(b, src, b.mul(h, i64(W)))
            for a_, z_ in ((0, lo), (hi, OW)):          # border columns: clipped windows
                with loop(b, a_, z_, name="bw") as ow:
                    w0 = b.sub(b.mul(ow, i64(SW)), i64(PW))
                    ws, we = imax(b, w0, 0), imin(b, b.add(w0, i64(KW)), W)
                    slot = fptr(b, drow, ow)
                    acc = var(b, b.load(slot, typ=F32), "acc")
                    with loop(b, ws, we, name="w") as w:
                        b.store(combine(get(b, acc), load(b, srow, w)), acc)
                    b.store(get(b, acc), slot)
            with loop(b, lo, hi, name="iw") as ow:       # interior: no bounds checks
                base = b.sub(b.mul(ow, i64(SW)), i64(PW))
                slot = fptr(b, drow, ow)
                acc = b.load(slot, typ=F32)
                if KW <= 8:
                    for kw in range(KW):
                        acc = combine(acc, load(b, srow, b.add(base, i64(kw))))
                    b.store(acc, slot)
                else:
                    accv = var(b, acc, "accv")
                    with loop(b, 0, KW, name="kw") as kw:
                        b.store(combine(get(b, accv), load(b, srow, b.add(base, kw))), accv)
                    b.store(get(b, accv), slot)
        if not is_max:   # divide by the window clipped to the padded extent
            ph = b.sub(imin(b, b.add(h0, i64(KH)), i64(H + PH)), h0)
            with loop(b, 0, OW, name="div") as ow:
                w0 = b.sub(b.mul(ow, i64(SW)), i64(PW))
                pw = b.sub(imin(b, b.add(w0, i64(KW)), i64(W + PW)), w0)
                size = b.sitofp(b.mul(ph, pw), F32)
                slot = fptr(b, drow, ow)
                b.store(b.fdiv(b.load(slot, typ=F32), size), slot)
    b.ret_void()
    return fn


def _make_plane(mod, name, method, with_mask):
    fn, b, a = new_function(mod, name, PLANE_ARGS, internal=True)
    for i in (0, 1):
        fn.args[i].add_attribute("noalias")
    H, W = a["H"], a["W"]
    with loop(b, 0, a["OH"], name="oh") as oh:
        h0 = b.sub(b.mul(oh, a["SH"]), a["PH"])
        h_end = b.add(h0, a["KH"])                     # unclipped: the padded window
        hs, he = imax(b, h0, 0), imin(b, h_end, H)
        with loop(b, 0, a["OW"], name="ow") as ow:
            w0 = b.sub(b.mul(ow, a["SW"]), a["PW"])
            w_end = b.add(w0, a["KW"])
            ws, we = imax(b, w0, 0), imin(b, w_end, W)
            o = b.add(b.mul(oh, a["OW"]), ow)
            if method == "MAX":
                best = var(b, ir.Constant(F32, -FLT_MAX), "best")
                arg = var(b, i64(-1), "arg")
                with loop(b, hs, he, name="h") as h:
                    with loop(b, ws, we, name="w") as w:
                        idx = b.add(b.mul(h, W), w)
                        v = load(b, a["src"], idx)
                        better = b.fcmp_ordered(">", v, get(b, best))
                        b.store(b.select(better, v, get(b, best)), best)
                        if with_mask:
                            b.store(b.select(better, idx, get(b, arg)), arg)
                store(b, get(b, best), a["dst"], o)
                if with_mask:
                    store(b, b.sitofp(get(b, arg), F32), a["mask"], o)
            else:
                acc = var(b, ir.Constant(F32, 0.0), "acc")
                with loop(b, hs, he, name="h") as h:
                    row = fptr(b, a["src"], b.mul(h, W))
                    with loop(b, ws, we, name="w") as w:
                        b.store(b.fadd(get(b, acc), load(b, row, w)), acc)
                ph = b.sub(imin(b, h_end, b.add(H, a["PH"])), h0)
                pw = b.sub(imin(b, w_end, b.add(W, a["PW"])), w0)
                size = b.sitofp(b.mul(ph, pw), F32)
                store(b, b.fdiv(get(b, acc), size), a["dst"], o)
    b.ret_void()
    return fn


def call_plane(b, fn, src, dst, mask, geo):
    H, W, OH, OW, KH, KW, SH, SW, PH, PW = geo
    b.call(fn, [src, dst, mask, *(i64(v) for v in (H, W, OH, OW, KH, KW, SH, SW, PH, PW))])


def lower_pool(k, n):
    x = n.inputs[0]
    shape = k.shape(x)
    geo = geometry(n.attrs, shape)
    H, W, OH, OW = geo[:4]
    planes = shape[0] * shape[1]
    with_mask = len(n.outputs) > 1
    plane = plane_function(k, n.attrs["pool"], True) if with_mask else \
        fast_plane_function(k, n.attrs["pool"], geo)
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", k.loc(x)))
    yp = k.ptr(b, a, Src("arena", k.loc(n.outputs[0])))
    mp = k.ptr(b, a, Src("arena", k.loc(n.outputs[1]))) if with_mask else \
        ir.Constant(PTR, None)
    lo, hi = part_range(b, planes, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as p:
        dst_off = b.mul(p, i64(OH * OW))
        src = fptr(b, xp, b.mul(p, i64(H * W)))
        if with_mask:
            call_plane(b, plane, src, fptr(b, yp, dst_off), fptr(b, mp, dst_off), geo)
        else:
            b.call(plane, [src, fptr(b, yp, dst_off)])
    b.ret_void()
    k.add_step(fn.name, planes * OH * OW * geo[4] * geo[5])
