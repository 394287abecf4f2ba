"""Deconvolution (1-D and 2-D), direct: each part owns whole output planes (image n,
output channel o), starts them at the bias and adds, for every input channel c of o's
group and every kernel tap (kh, kw), w[c, o', kh, kw] times input row ih to output row
oh = ih*SH - PH + kh*DH at columns ow = iw*SW - PW + kw*DW.  The tap's valid input
rows and columns are computed exactly (no per-element bounds tests), the inner loop
reads the input row contiguously.  Planes belong to one part, so no two parts write
the same element; every output element is written by the initialization.

Weights are (C, O/group, KH, KW), as Caffe stores them.
"""
from __future__ import annotations

from llvmlite import ir

from ....ops.conv import Geometry
from ..irutil import F32, floor_div, fptr, i64, imax, imin, load, loop, part_range, \
    step_function, store
from .pointwise import Src


def _geometry(g_or_k, n) -> Geometry:
    shape = (g_or_k.types[n.inputs[0]].shape if hasattr(g_or_k, "types")
             else g_or_k.shape(n.inputs[0]))
    return Geometry(n.attrs, shape, transposed=True)


def supported(g, n):
    if len(n.inputs) != 1:
        return ("a Deconvolution with several bottoms", "use one Deconvolution layer per bottom")
    geo = _geometry(g, n)
    if geo.nsp > 2:
        return (f"a {geo.nsp}-D deconvolution", "the CPU backend has 1-D and 2-D deconvolutions")
    return None


def _valid(b, k_idx, D: int, P: int, S: int, n_in: int, n_out: int):
    """[lo, hi) of input positions i with 0 <= i*S - P + k*D < n_out, within [0, n_in)."""
    a = b.sub(b.mul(k_idx, i64(D)), i64(P))                   # k*D - P
    lo = b.sub(i64(0), floor_div(b, a, S))                    # ceil((P - k*D) / S)
    hi = b.add(floor_div(b, b.sub(i64(n_out - 1), a), S), i64(1))
    return imax(b, lo, 0), imin(b, hi, n_in)


def lower_deconv(k, n):
    geo = _geometry(k, n)
    if geo.nsp == 1:
        H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = (
            1, geo.spatial[0], 1, geo.kernel[0], 1, geo.stride[0], 0, geo.pad[0], 1,
            geo.dilation[0], 1, geo.out_spatial[0])
    else:
        (H, W), (KH, KW), (SH, SW) = geo.spatial, geo.kernel, geo.stride
        (PH, PW), (DH, DW), (OH, OW) = geo.pad, geo.dilation, geo.out_spatial
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    Cg, Og = C // G, O // G
    bias = len(n.params) > 1
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", k.loc(n.inputs[0])))
    yp = k.ptr(b, a, Src("arena", k.loc(n.outputs[0])))
    wp = k.ptr(b, a, k.param_src(n.params[0]))
    bp = k.ptr(b, a, k.param_src(n.params[1])) if bias else None
    lo, hi = part_range(b, N * O, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as p:
        img, o = b.udiv(p, i64(O)), b.urem(p, i64(O))
        grp, ol = b.udiv(o, i64(Og)), b.urem(o, i64(Og))
        dst = fptr(b, yp, b.mul(p, i64(OH * OW)))
        init = load(b, bp, o) if bp is not None else ir.Constant(F32, 0.0)
        with loop(b, 0, OH * OW, name="init") as e:
            store(b, init, dst, e)
        with loop(b, 0, Cg, name="c") as cl:
            c = b.add(b.mul(grp, i64(Cg)), cl)
            src = fptr(b, xp, b.mul(b.add(b.mul(img, i64(C)), c), i64(H * W)))
            wrow = fptr(b, wp, b.mul(b.add(b.mul(c, i64(Og)), ol), i64(KH * KW)))
            with loop(b, 0, KH, name="kh") as kh:
                ih_lo, ih_hi = _valid(b, kh, DH, PH, SH, H, OH)
                with loop(b, 0, KW, name="kw") as kw:
                    w = load(b, wrow, b.add(b.mul(kh, i64(KW)), kw))
                    iw_lo, iw_hi = _valid(b, kw, DW, PW, SW, W, OW)
                    ow0 = b.sub(b.mul(kw, i64(DW)), i64(PW))        # ow = iw*SW + ow0
                    with loop(b, ih_lo, ih_hi, name="ih") as ih:
                        oh = b.add(b.mul(ih, i64(SH)), b.sub(b.mul(kh, i64(DH)), i64(PH)))
                        srow = fptr(b, src, b.mul(ih, i64(W)))
                        row0 = b.add(b.mul(oh, i64(OW)), ow0)   # may be < 0: index only
                        with loop(b, iw_lo, iw_hi, name="iw") as iw:
                            at = b.add(row0, b.mul(iw, i64(SW)))
                            store(b, b.fadd(load(b, dst, at),
                                            b.fmul(w, load(b, srow, iw))), dst, at)
    b.ret_void()
    k.add_step(fn.name, 2 * N * C * H * W * Og * KH * KW)
