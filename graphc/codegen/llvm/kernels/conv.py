"""Convolution: GEMM over image columns, or a direct depthwise kernel.

For image n and group g, Caffe's convolution is the matrix product

    Y[n, g] (Og x P) = W[g] (Og x K) @ cols (K x P),   K = Cg * KH * KW, P = OH * OW

where ``cols`` is im2col of the group's input channels.  The work is cut into items
(image, group, block of Pb output pixels, block of Mb output channels), split evenly
among the parts.  For its item a part writes the columns of its pixel block into its
own scratch (a 1x1 convolution with stride 1 and no padding reads the input directly:
it already is the column matrix) and calls the packed, register-blocked SGEMM
(gemm.py) on it, single-threaded, with an epilogue that adds the bias and computes the
fused tail (ReLU, a residual add, ...) on each register tile.  Consecutive items of
one part share the pixel block, so the columns are built once per block.

When the fused tail adds a residual that the output overwrites in place, the GEMM
accumulates onto the output (which holds the residual) instead of reading it in the
epilogue (a K longer than one cache block would otherwise see partial sums).

Depthwise (one input and one output channel per group): per output row, each kernel
tap adds ``w * x`` over the valid output columns (a vectorizable loop with no bounds
checks inside), accumulated in scratch; the tail is then applied on the way out.
"""
from __future__ import annotations

import math

from llvmlite import ir

from ....ops.conv import Geometry
from ..irutil import F32, I32, I64, PTR, VOID, ceil_div, floor_div, fptr, get, i64, imax, \
    imin, load, loop, memset0, new_function, part_range, step_function, store, var
from .epilogue import ProgramEpilogue
from .pointwise import FlatSite, channel_structure, emit_program

MIB = 1 << 20


def _geometry(k, n, anchor) -> Geometry:
    x = n.inputs[anchor["inputs"][0]]
    return Geometry(anchor["attrs"], k.shape(x), transposed=False)


def supported(g, n, anchor):
    if len(anchor.get("inputs", [])) != 1:
        return ("a Convolution with several bottoms", "use one Convolution layer per bottom")
    x = n.inputs[anchor["inputs"][0]]
    geo = Geometry(anchor["attrs"], g.types[x].shape, transposed=False)
    if geo.nsp > 2:
        return (f"a {geo.nsp}-D convolution", "the CPU backend has 1-D and 2-D convolutions")
    return None


def out_shape(k, n, anchor):
    return _geometry(k, n, anchor).out_shape()


def _dims(geo: Geometry):
    """(H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW), a 1-D convolution as H = 1."""
    if geo.nsp == 1:
        return (1, geo.spatial[0], 1, geo.kernel[0], 1, geo.stride[0], 0, geo.pad[0], 1,
                geo.dilation[0], 1, geo.out_spatial[0])
    return (*geo.spatial, *geo.kernel, *geo.stride, *geo.pad, *geo.dilation, *geo.out_spatial)


def lower(k, n, anchor, steps, tensors, out_off):
    from . import NotEpilogue
    geo = _geometry(k, n, anchor)
    x = n.inputs[anchor["inputs"][0]]
    params = [n.params[i] for i in anchor.get("params", [])]
    bias = len(params) > 1
    cg, og = geo.channels // geo.group, geo.num_output // geo.group
    if cg == 1 and og == 1:
        return _depthwise(k, n, geo, k.loc(x), params, steps, tensors, out_off)
    dim, inner = channel_structure(geo.out_shape())
    alias = [j for j, off in enumerate(tensors) if off == out_off]
    skip, accumulate = set(), False
    if alias:
        j = alias[0]
        if _accumulates(steps, j):
            skip, accumulate = {j}, True
        elif cg * math.prod(geo.kernel) > k.gemm_config.kc:
            raise NotEpilogue("in-place residual with a long K")
    epi = ProgramEpilogue(steps, "row", bias, skip)
    if not epi.fits(dim, inner):
        raise NotEpilogue("operand not per output channel")
    _gemm_conv(k, n, geo, k.loc(x), params, epi, tensors, out_off, accumulate)


def _accumulates(steps, j) -> bool:
    """Is the first tail step ``prev + tensor j`` (Eltwise SUM, coefficients 1), and
    tensor j read nowhere else?  Then the GEMM can start from C = tensor j."""
    if not steps or steps[0].op != "Eltwise" or steps[0].attrs.get("operation") != "SUM":
        return False
    s = steps[0]
    coeff = list(s.attrs.get("coeff") or [1.0] * len(s.inputs))
    terms = dict(zip(map(str, s.inputs), coeff))
    if terms.get("prev") != 1 or terms.get(str(("t", j))) != 1 or s.inputs.count(("t", j)) != 1:
        return False
    return all(("t", j) not in t.inputs for t in steps[1:])


# ---------------------------------------------------------------------------------------
# GEMM convolution


def choose_blocks(ng: int, m: int, p: int, kdim: int, cfg, target_items: int = 48,
                  min_item_flops: float = 2e6) -> tuple[int, int]:
    """(Mb, Pb): output channels and pixels per item.  Pixel blocks of whole NR-tiles, at
    most 1024 and with an im2col block of at most 2 MiB; then the blocks are halved (the
    relatively larger dimension first) until there are ``target_items`` items or an item
    would fall below ``min_item_flops``."""
    nr, mr = cfg.nr, cfg.mr

    def rup(x, u):
        return max(u, -(-x // u) * u)

    cap = max(nr, (2 * MIB // (4 * max(kdim, 1))) // nr * nr)
    npb, nmb = max(1, -(-p // min(rup(p, nr), 1024, cap))), 1

    def shape(npb, nmb):
        pb = min(p, rup(-(-p // npb), nr))
        mb = min(m, rup(-(-m // nmb), mr))
        return mb, pb, ng * (-(-p // pb)) * (-(-m // mb))

    mb, pb, items = shape(npb, nmb)
    while items < target_items:
        can_p, can_m = pb >= 4 * nr, mb >= 4 * mr
        if can_p and (not can_m or pb / nr >= mb / mr):
            cand = (npb * 2, nmb)
        elif can_m:
            cand = (npb, nmb * 2)
        else:
            break
        mb2, pb2, items2 = shape(*cand)
        if 2.0 * mb2 * pb2 * kdim < min_item_flops or items2 <= items:
            break
        (npb, nmb), (mb, pb, items) = cand, (mb2, pb2, items2)
    return mb, pb


def _gemm_conv(k, n, geo, x_off, params, epi, tensors, out_off, accumulate):
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    Cg, Og = C // G, O // G
    K, P, HW = Cg * KH * KW, OH * OW, H * W
    direct = KH == KW == 1 and SH == SW == 1 and PH == PW == 0
    cfg = k.gemm_config
    mb, pb = choose_blocks(N * G, Og, P, K, cfg)
    MB, PB = -(-Og // mb), -(-P // pb)
    T = N * G * PB * MB
    gemm = k.gemm(epi)
    ws_bytes = k.gemm_workspace_bytes()
    k.need_scratch(ws_bytes + (0 if direct else 4 * K * pb))
    w_src = k.param_src(params[0])
    b_src = k.param_src(params[1]) if epi.bias else None
    im2col = None if direct else k.helper("gk_im2col", _make_im2col)

    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, _arena(x_off))
    yp = k.ptr(b, a, _arena(out_off))
    wp = k.ptr(b, a, w_src)
    bp = k.ptr(b, a, b_src) if b_src else None
    chp = [k.ptr(b, a, c.src) for c in epi.chans]
    tp = {j: k.ptr(b, a, _arena(tensors[j])) for j in epi.tensors}
    ws = a["scratch"]
    col = fptr(b, ws, ws_bytes // 4)
    lo, hi = part_range(b, T, a["part"], a["nparts"])
    last = var(b, i64(-1), "last")
    with loop(b, lo, hi, name="t") as t:
        m_i = b.urem(t, i64(MB))
        r = b.udiv(t, i64(MB))
        p_i = b.urem(r, i64(PB))
        ng = b.udiv(r, i64(PB))
        img = b.udiv(ng, i64(G))
        grp = b.urem(ng, i64(G))
        p0 = b.mul(p_i, i64(pb))
        plen = imin(b, i64(pb), b.sub(i64(P), p0))
        m0 = b.mul(m_i, i64(mb))
        mlen = imin(b, i64(mb), b.sub(i64(Og), m0))
        c0 = b.add(b.mul(img, i64(C)), b.mul(grp, i64(Cg)))          # first input channel
        src = fptr(b, xp, b.mul(c0, i64(HW)))
        if direct:
            bmat, ldb = fptr(b, src, p0), i64(HW)
        else:
            with b.if_then(b.icmp_signed("!=", r, get(b, last))):
                b.call(im2col, [src, col, i64(Cg), i64(H), i64(W), i64(KH), i64(KW), i64(SH),
                                i64(SW), i64(PH), i64(PW), i64(DH), i64(DW), i64(OW), p0, plen])
                b.store(r, last)
            bmat, ldb = col, plen
        ch0 = b.add(b.mul(grp, i64(Og)), m0)                         # first output channel
        coff = b.add(b.mul(b.add(b.mul(img, i64(O)), ch0), i64(P)), p0)
        extra = []
        if bp is not None:
            extra.append(fptr(b, bp, ch0))
        for c, p in zip(epi.chans, chp):
            extra.append(p if c.dim == 1 else fptr(b, p, ch0))
        for j in epi.tensors:
            extra.append(fptr(b, tp[j], coff))
        if epi.tensors:
            extra.append(i64(P))
        b.call(gemm, [mlen, plen, i64(K), fptr(b, wp, b.mul(ch0, i64(K))), i64(K), bmat, ldb,
                      fptr(b, yp, coff), i64(P), ir.Constant(I32, int(accumulate)), i64(0),
                      i64(1), ws, *extra])
    b.ret_void()
    k.add_step(fn.name, 2 * N * O * P * K)


def _arena(off):
    from .pointwise import Src
    return Src("arena", off)


def _valid_range(b, start, step: int, lo_bound, hi_bound, n_out):
    """Output positions o in [0, n_out) with lo_bound <= start + o*step < hi_bound, as
    (o_lo, o_hi) clamped to [0, n_out] (start: i64 value, may be negative)."""
    # o >= ceil((lo_bound - start) / step),  o <= floor((hi_bound - 1 - start) / step)
    o_lo = b.sub(i64(0), floor_div(b, b.sub(start, lo_bound), step))
    o_hi = b.add(floor_div(b, b.sub(b.sub(hi_bound, i64(1)), start), step), i64(1))
    o_lo = imin(b, imax(b, o_lo, i64(0)), n_out)
    o_hi = imax(b, imin(b, o_hi, n_out), o_lo)
    return o_lo, o_hi


def _make_im2col(mod, name):
    """cols[kk][j] (row length plen) for kk = (c, kh, kw) and output pixels p0 + j:
    the input at (c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW), 0 outside the image."""
    args = [("src", PTR), ("dst", PTR), ("C", I64), ("H", I64), ("W", I64), ("KH", I64),
            ("KW", I64), ("SH", I64), ("SW", I64), ("PH", I64), ("PW", I64), ("DH", I64),
            ("DW", I64), ("OW", I64), ("p0", I64), ("plen", I64)]
    fn, b, a = new_function(mod, name, args, internal=True)
    for i in (0, 1):
        fn.args[i].add_attribute("noalias")
    H, W, OW, SH, SW = a["H"], a["W"], a["OW"], a["SH"], a["SW"]
    p0, plen = a["p0"], a["plen"]
    oh0 = b.udiv(p0, OW)
    oh1 = b.add(b.udiv(b.sub(b.add(p0, plen), i64(1)), OW), i64(1))
    kk = var(b, i64(0), "kk")
    with loop(b, 0, a["C"], name="c") as c:
        plane = fptr(b, a["src"], b.mul(c, b.mul(H, W)))
        with loop(b, 0, a["KH"], name="kh") as kh:
            with loop(b, 0, a["KW"], name="kw") as kw:
                row = fptr(b, a["dst"], b.mul(get(b, kk), plen))
                iw0 = b.sub(b.mul(kw, a["DW"]), a["PW"])        # input column of ow = 0
                with loop(b, oh0, oh1, name="oh") as oh:
                    ow_a = imax(b, b.sub(p0, b.mul(oh, OW)), i64(0))
                    ow_b = imin(b, b.sub(b.add(p0, plen), b.mul(oh, OW)), OW)
                    base = b.sub(b.mul(oh, OW), p0)             # j = base + ow
                    ih = b.add(b.sub(b.mul(oh, SH), a["PH"]), b.mul(kh, a["DH"]))
                    inside = b.and_(b.icmp_signed(">=", ih, i64(0)), b.icmp_signed("<", ih, H))
                    with b.if_else(inside) as (then, other):
                        with then:
                            src_row = fptr(b, plane, b.mul(ih, W))
                            v_lo, v_hi = _valid_range_rt(b, iw0, SW, W, OW)
                            v_lo = imin(b, imax(b, v_lo, ow_a), ow_b)
                            v_hi = imin(b, imax(b, v_hi, v_lo), ow_b)
                            with loop(b, ow_a, v_lo, name="z0") as ow:
                                store(b, ir.Constant(F32, 0.0), row, b.add(base, ow))
                            with loop(b, v_lo, v_hi, name="cp") as ow:
                                v = load(b, src_row, b.add(b.mul(ow, SW), iw0))
                                store(b, v, row, b.add(base, ow))
                            with loop(b, v_hi, ow_b, name="z1") as ow:
                                store(b, ir.Constant(F32, 0.0), row, b.add(base, ow))
                        with other:
                            with loop(b, ow_a, ow_b, name="z") as ow:
                                store(b, ir.Constant(F32, 0.0), row, b.add(base, ow))
                b.store(b.add(get(b, kk), i64(1)), kk)
    b.ret_void()
    return fn


def _valid_range_rt(b, start, step, size, n_out):
    """Like _valid_range with a runtime step: o with 0 <= start + o*step < size."""
    # o >= ceil(-start / step) = -floor(start / step);  o <= floor((size - 1 - start) / step)
    def fdiv(x, d):
        q = b.sdiv(x, d)
        r = b.srem(x, d)
        return b.select(b.icmp_signed("<", r, i64(0)), b.sub(q, i64(1)), q)
    o_lo = b.sub(i64(0), fdiv(start, step))
    o_hi = b.add(fdiv(b.sub(b.sub(size, i64(1)), start), step), i64(1))
    o_lo = imin(b, imax(b, o_lo, i64(0)), n_out)
    o_hi = imax(b, imin(b, o_hi, n_out), o_lo)
    return o_lo, o_hi


# ---------------------------------------------------------------------------------------
# depthwise


def _depthwise(k, n, geo, x_off, params, steps, tensors, out_off):
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    N, C = geo.num, geo.channels
    P, HW = OH * OW, H * W
    dim, inner = channel_structure(geo.out_shape())
    w_src = k.param_src(params[0])
    b_src = k.param_src(params[1]) if len(params) > 1 else None
    k.need_scratch(4 * OW)
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, _arena(x_off))
    yp = k.ptr(b, a, _arena(out_off))
    wp = k.ptr(b, a, w_src)
    bp = k.ptr(b, a, b_src) if b_src else None
    acc = a["scratch"]
    lo, hi = part_range(b, N * C, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as plane:
        c = b.urem(plane, i64(C))
        src = fptr(b, xp, b.mul(plane, i64(HW)))
        wc = fptr(b, wp, b.mul(c, i64(KH * KW)))
        init = load(b, bp, c) if bp is not None else ir.Constant(F32, 0.0)
        with loop(b, 0, OH, name="oh") as oh:
            with loop(b, 0, OW, name="fill") as ow:
                store(b, init, acc, ow)
            for kh in range(KH):
                ih = b.add(b.mul(oh, i64(SH)), i64(kh * DH - PH))
                inside = b.and_(b.icmp_signed(">=", ih, i64(0)), b.icmp_signed("<", ih, i64(H)))
                with b.if_then(inside):
                    src_row = fptr(b, src, b.mul(ih, i64(W)))
                    for kw in range(KW):
                        iw0 = kw * DW - PW
                        o_lo, o_hi = _valid_range(b, i64(iw0), SW, i64(0), i64(W), i64(OW))
                        wv = load(b, wc, kh * KW + kw)
                        with loop(b, o_lo, o_hi, name="tap") as ow:
                            xv = load(b, src_row, b.add(b.mul(ow, i64(SW)), i64(iw0)))
                            pa = fptr(b, acc, ow)
                            b.store(b.fadd(b.load(pa, typ=F32), b.fmul(wv, xv)), pa)
            obase = b.add(b.mul(plane, i64(P)), b.mul(oh, i64(OW)))
            with loop(b, 0, OW, name="out") as ow:
                i = b.add(obase, ow)
                site = FlatSite(b, k, a, tensors, i, c, dim, inner)
                y = emit_program(site, steps, load(b, acc, ow))
                store(b, y, yp, i)
    b.ret_void()
    k.add_step(fn.name, 2 * N * C * P * KH * KW)
