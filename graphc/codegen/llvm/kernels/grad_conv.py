"""A Convolution in a training pass (weights that change every iteration) and its
gradients, as packed GEMMs over image columns, image by image.

Every step's parts split the images; a part builds what one image needs in its own
scratch (where it stays in cache) and runs single-part GEMMs on it (K = Cg*KH*KW,
P = OH*OW, per group g):

    forward   y[n]_g (Og x P)  = W_g (Og x K) @ cols[n]_g (K x P) + b_g
    dW^T      (K x Og)        += cols[n]_g (K x P) @ dy[n]_g^T (P x Og)
    dx        dcols (K x P)    = W_g^T (K x Og) @ dy[n]_g (Og x P), then col2im
    db[o]                      = sum of dy over images and pixels

cols[n] is im2col of image n (conv.py's generators); dy[n]^T is transposed in scratch.
The weight gradient's parts are exactly SPLIT, each summing its images into its own
partial dW^T (zeroed by a step before); one more step adds the partials and writes dW
(Og x K), transposed back.  col2im zeroes each plane of dx and adds every column entry
back to the input pixel it came from.  (The inference kernel packs W at compile time, so
training has its own forward.)
"""
from __future__ import annotations

from llvmlite import ir

from ....ops.conv import Geometry
from ..irutil import I32, fptr, get, i64, imin, load, loop, memcpy, memset0, part_range, \
    step_function, store, var
from .conv import _dims, _gather_tables, _make_im2col, _make_im2col_flat, emit_phases
from .grad_linear import arena
from .transpose import TILE, emit_row_sums, emit_transpose

#: parts of a weight-gradient product (each with its own partial result)
SPLIT = 8


def supported(geo: Geometry):
    if geo.nsp > 2:
        return (f"the gradient of a {geo.nsp}-D convolution",
                "the CPU backend trains 1-D and 2-D convolutions")
    return None


def _geo(attrs, x_shape):
    geo = Geometry(attrs, x_shape, transposed=False)
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    G = geo.group
    Cg, Og = geo.channels // G, geo.num_output // G
    return geo, Cg * KH * KW, OH * OW, Og


def _direct(geo) -> bool:
    """A 1x1 convolution with stride 1 and no padding: the image is its own columns."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    return KH == KW == SH == SW == 1 and PH == PW == 0


#: images with fewer output pixels than this go into one GEMM together, side by side
#: (up to MAX_GROUP of them): a wider product, its operands packed once for all of them
BATCH_P = 256
MAX_GROUP = 8


def _group(pixels: int) -> int:
    return max(1, min(MAX_GROUP, BATCH_P // max(pixels, 1)))


def _im2col_image(k, b, src, dst, geo, C=None, dims=None, ld=None) -> None:
    """The columns (C*KH*KW rows of P, ``ld`` apart; default P) of the image at ``src``
    into ``dst`` (the geometry ``dims`` as conv._dims gives it, default that of ``geo``)."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = dims or _dims(geo)
    C = geo.channels if C is None else C
    P = OH * OW
    ld = P if ld is None else ld
    if SH == SW == 1 and OW == W:
        fn = k.helper("gk_im2col_flat", _make_im2col_flat)
        with loop(b, 0, C, name="ch") as c:
            b.call(fn, [fptr(b, src, b.mul(c, i64(H * W))),
                        fptr(b, dst, b.mul(c, i64(KH * KW * ld))), i64(H), i64(W), i64(OH),
                        i64(KH), i64(KW), i64(PH), i64(PW), i64(DH), i64(DW), i64(0), i64(P),
                        i64(ld)])
    else:
        fn = k.helper(f"gk_im2col_sw{SW}", lambda mod, nm: _make_im2col(mod, nm, SW))
        b.call(fn, [src, dst, i64(C), i64(H), i64(W), i64(KH), i64(KW), i64(SH), i64(SW),
                    i64(PH), i64(PW), i64(DH), i64(DW), i64(OW), i64(0), i64(P), i64(ld)])


def _transpose_inline(b, src, dst, rows: int, cols: int) -> None:
    """dst (cols x rows) = src (rows x cols)^T, in TILE x TILE blocks."""
    with loop(b, 0, rows, TILE, name="tr") as r0:
        r1 = imin(b, b.add(r0, i64(TILE)), i64(rows))
        with loop(b, 0, cols, TILE, name="tc") as c0:
            c1 = imin(b, b.add(c0, i64(TILE)), i64(cols))
            with loop(b, c0, c1, name="c") as c:
                with loop(b, r0, r1, name="r") as r:
                    store(b, load(b, src, b.add(b.mul(r, i64(cols)), c)), dst,
                          b.add(b.mul(c, i64(rows)), r))


def _move_rows(b, src, src_ld, dst, dst_ld, rows: int, length: int) -> None:
    """dst[r, :length] = src[r, :length] for r < rows (leading dimensions in floats)."""
    with loop(b, 0, rows, name="mr") as r:
        memcpy(b, fptr(b, dst, b.mul(r, i64(dst_ld))), fptr(b, src, b.mul(r, i64(src_ld))),
               4 * length)


def _gemm_call(b, gemm, M, N, K, A, lda, B, ldb, C, ldc, accumulate, scratch, extra=()):
    def v(x):
        return i64(x) if isinstance(x, int) else x
    b.call(gemm, [v(M), v(N), v(K), A, v(lda), B, v(ldb), C, v(ldc),
                  ir.Constant(I32, int(accumulate)), i64(0), i64(1), scratch, *extra])


def _image_groups(b, a, N: int, group: int):
    """Loop over this part's images in groups of up to ``group``: yields (first image,
    count) as IR values (a context manager over the group loop)."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        lo, hi = part_range(b, N, a["part"], a["nparts"])
        with loop(b, lo, hi, group, name="img0") as i0:
            yield i0, imin(b, i64(group), b.sub(hi, i0))
    return cm()


def lower_forward(k, n) -> None:
    """y = W (*) x + b, the weights read from the live params: parts split the images;
    a group of images (one, or several small ones side by side) gets its columns in the
    part's scratch and one GEMM per conv group, into y (one image) or into scratch and
    then moved into place."""
    from .epilogue import ProgramEpilogue
    x, y = n.inputs[0], n.outputs[0]
    geo, K, P, Og = _geo(n.attrs, k.shape(x))
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    HW = geo.spatial[0] * (geo.spatial[1] if geo.nsp == 2 else 1)
    w = k.param_src(n.params[0])
    bias = k.param_src(n.params[1]) if len(n.params) > 1 else None
    direct = _direct(geo)
    grp = 1 if direct else _group(P)
    L = grp * P
    ws = k.gemm_workspace_bytes()
    # B gathered from the images' zero-padded phases (conv.py) where the geometry allows
    gather = None if direct else _gather_tables(k, n.name, _dims(geo), C, C // G, grp)
    cols_f = gather.floats(grp * C) if gather else 0 if direct else G * K * L
    k.need_scratch(ws + 4 * (cols_f + (O * L if grp > 1 else 0)))
    gemm = k.gemm(ProgramEpilogue([], "row", bias is not None), gathered_b=bool(gather))
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp, yp, wp = (k.ptr(b, a, s_) for s_ in (arena(k.loc(x)), arena(k.loc(y)), w))
    bp = k.ptr(b, a, bias) if bias is not None else None
    cols = fptr(b, a["scratch"], ws // 4)
    cmat = fptr(b, a["scratch"], ws // 4 + cols_f)
    with _image_groups(b, a, N, grp) as (i0, cnt):
        if gather:
            with loop(b, 0, b.mul(cnt, i64(C)), name="pl") as t:
                emit_phases(b, fptr(b, xp, b.mul(b.add(b.mul(i0, i64(C)), t), i64(HW))),
                            fptr(b, cols, b.mul(t, i64(gather.plane))), _dims(geo),
                            gather.layout)
        elif not direct:
            with loop(b, 0, cnt, name="ii") as ii:
                src = fptr(b, xp, b.mul(b.add(i0, ii), i64(C * HW)))
                _im2col_image(k, b, src, fptr(b, cols, b.mul(ii, i64(P))), geo, ld=L)
        width = b.mul(cnt, i64(P))
        for g in range(G):
            extra = list(gather.tables) if gather else []
            extra += [fptr(b, bp, g * Og)] if bp is not None else []
            if direct:
                bmat = fptr(b, xp, b.add(b.mul(i0, i64(C * HW)), i64(g * K * P)))
            elif gather:
                bmat = fptr(b, cols, g * (C // G) * gather.plane)
            else:
                bmat = fptr(b, cols, g * K * L)
            if grp == 1:
                out, ldc = fptr(b, yp, b.add(b.mul(i0, i64(O * P)), i64(g * Og * P))), P
            else:
                out, ldc = fptr(b, cmat, g * Og * L), L
            _gemm_call(b, gemm, Og, width, K, fptr(b, wp, g * Og * K), K, bmat,
                       P if direct else L, out, ldc, False, a["scratch"], extra)
        if grp > 1:
            with loop(b, 0, cnt, name="ii") as ii:
                _move_rows(b, fptr(b, cmat, b.mul(ii, i64(P))), L,
                           fptr(b, yp, b.mul(b.add(i0, ii), i64(O * P))), P, O, P)
    b.ret_void()
    k.steps.append(_step(fn.name, k.node_index, N))


def _step(fn, node, images):
    from ..lower import Step
    return Step(fn, node, max(1, images), 4)


def lower_grad(k, n, parts) -> None:
    from ..lower import Step
    geo, K, P, Og = _geo(parts.fwd_attrs, parts.input_shapes[0])
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    HW = geo.spatial[0] * (geo.spatial[1] if geo.nsp == 2 else 1)
    dy_off = k.loc(parts.grads[0])
    direct = _direct(geo)
    ws = k.gemm_workspace_bytes()
    gemm = k.gemm(_plain())
    if 1 in parts.param_grads:
        emit_row_sums(k, n.name + "_db", arena(dy_off), arena(k.loc(parts.param_grads[1])),
                      N, O, P)
    if 0 in parts.param_grads:
        # part s of SPLIT: images [N*s/SPLIT, N*(s+1)/SPLIT) into partial s
        partial = k.temp(4 * SPLIT * G * K * Og, "partial")
        _zero_step(k, n.name + "_dw0", partial, SPLIT * G * K * Og)
        grp = 1 if direct else _group(P)
        L = grp * P
        cols_f = 0 if direct else G * K * L
        k.need_scratch(ws + 4 * (cols_f + L * O))
        fn, b, a = step_function(k.mod, k.step_name(n.name + "_dw"))
        xp = k.ptr(b, a, arena(k.loc(parts.inputs[0])))
        gp, pp = k.ptr(b, a, arena(dy_off)), k.ptr(b, a, arena(partial))
        cols = fptr(b, a["scratch"], ws // 4)
        dyt = fptr(b, a["scratch"], ws // 4 + cols_f)
        mine = fptr(b, pp, b.mul(a["part"], i64(G * K * Og)))
        with _image_groups(b, a, N, grp) as (i0, cnt):
            with loop(b, 0, cnt, name="ii") as ii:
                img = b.add(i0, ii)
                if not direct:
                    _im2col_image(k, b, fptr(b, xp, b.mul(img, i64(C * HW))),
                                  fptr(b, cols, b.mul(ii, i64(P))), geo, ld=L)
                _transpose_inline(b, fptr(b, gp, b.mul(img, i64(O * P))),
                                  fptr(b, dyt, b.mul(ii, i64(P * O))), O, P)
            depth = b.mul(cnt, i64(P))
            for g in range(G):
                amat = fptr(b, xp, b.add(b.mul(i0, i64(C * HW)), i64(g * K * P))) if direct \
                    else fptr(b, cols, g * K * L)
                _gemm_call(b, gemm, K, Og, depth, amat, P if direct else L,
                           fptr(b, dyt, g * Og), O, fptr(b, mine, g * K * Og), Og, True,
                           a["scratch"])
        b.ret_void()
        k.steps.append(Step(fn.name, k.node_index, SPLIT, 1 << 20))   # exactly SPLIT parts
        _reduce_partials(k, n.name + "_dwsum", partial, k.loc(parts.param_grads[0]), G, K, Og)
    if 0 in parts.input_grads and _flippable(geo):
        _lower_dx_flipped(k, n, geo, K, P, Og, dy_off, k.loc(parts.input_grads[0]))
    elif 0 in parts.input_grads:
        wt = k.temp(4 * G * K * Og, "wt")
        emit_transpose(k, n.name + "_wt", k.param_src(n.params[0]), arena(wt), G, Og, K)
        grp = 1 if direct else _group(P)
        L = grp * P
        k.need_scratch(ws + 4 * (G * K * L + (O * L if grp > 1 else 0)))
        fn, b, a = step_function(k.mod, k.step_name(n.name + "_dx"))
        gp, wtp = k.ptr(b, a, arena(dy_off)), k.ptr(b, a, arena(wt))
        dxp = k.ptr(b, a, arena(k.loc(parts.input_grads[0])))
        dcols = fptr(b, a["scratch"], ws // 4)
        dyr = fptr(b, a["scratch"], ws // 4 + G * K * L)
        with _image_groups(b, a, N, grp) as (i0, cnt):
            if grp > 1:          # the group's dy side by side: (O x cnt*P)
                with loop(b, 0, cnt, name="ii") as ii:
                    _move_rows(b, fptr(b, gp, b.mul(b.add(i0, ii), i64(O * P))), P,
                               fptr(b, dyr, b.mul(ii, i64(P))), L, O, P)
                bsrc, ldb = dyr, L
            else:
                bsrc, ldb = fptr(b, gp, b.mul(i0, i64(O * P))), P
            width = b.mul(cnt, i64(P))
            for g in range(G):
                target = fptr(b, dxp, b.add(b.mul(i0, i64(C * HW)), i64(g * K * P))) \
                    if direct else fptr(b, dcols, g * K * L)
                _gemm_call(b, gemm, K, width, Og, fptr(b, wtp, g * K * Og), Og,
                           fptr(b, bsrc, g * Og * ldb), ldb, target, P if direct else L,
                           False, a["scratch"])
            if not direct:
                with loop(b, 0, cnt, name="ii") as ii:
                    _col2im_image(b, fptr(b, dcols, b.mul(ii, i64(P))),
                                  fptr(b, dxp, b.mul(b.add(i0, ii), i64(C * HW))), geo, ld=L)
        b.ret_void()
        k.steps.append(_step(fn.name, k.node_index, N))


#: the flipped-weights data gradient is used while dx has at most this many times the
#: pixels of dy (its GEMM does (H*W) / (OH*OW) times the multiply-adds of col2im's)
FLIP_MAX_RATIO = 1.5


def _flippable(geo) -> bool:
    """Stride 1, no dilation: dx is the forward convolution of dy (padded by KH-1-PH,
    KW-1-PW) with the weights flipped in space and input/output channels swapped.  Used
    when the input is not much larger than the output (a "same" convolution): else the
    padded product mostly multiplies zeros and col2im is cheaper."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    return (SH == SW == DH == DW == 1 and PH < KH and PW < KW
            and H * W <= FLIP_MAX_RATIO * OH * OW)


def _lower_dx_flipped(k, n, geo, K, P, Og, dy_off, dx_off) -> None:
    """dx[n]_g (Cg x H*W) = W'_g (Cg x Og*KH*KW) @ im2col(dy[n]_g) (Og*KH*KW x H*W), where
    W'_g[c, (o, kh, kw)] = W[g*Og + o, c, KH-1-kh, KW-1-kw] (a step builds W' each pass).
    A well-shaped product (its depth Og*KH*KW), written straight into dx (one image) or
    moved there (small images side by side): no col2im."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    Cg, KK, HW = C // G, KH * KW, H * W
    # W' (G x Cg x Og*KK) from W (G*Og x Cg x KK)
    wf = k.temp(4 * G * Cg * Og * KK, "wflip")
    fn, b, a = step_function(k.mod, k.step_name(n.name + "_wflip"))
    wp, fp = k.ptr(b, a, k.param_src(n.params[0])), k.ptr(b, a, arena(wf))
    lo, hi = part_range(b, G * Cg, a["part"], a["nparts"])
    with loop(b, lo, hi, name="gc") as gc:
        g, c = b.udiv(gc, i64(Cg)), b.urem(gc, i64(Cg))
        with loop(b, 0, Og, name="o") as o:
            src = fptr(b, wp, b.mul(b.add(b.mul(b.add(b.mul(g, i64(Og)), o), i64(Cg)), c),
                                    i64(KK)))
            dst = fptr(b, fp, b.mul(b.add(b.mul(gc, i64(Og)), o), i64(KK)))
            for t in range(KK):
                store(b, load(b, src, KK - 1 - t), dst, t)
    b.ret_void()
    k.add_step(fn.name, G * Cg * Og * KK)
    # per group of images: im2col of dy (O channels, OH x OW, padded), one GEMM per group
    dims = (OH, OW, KH, KW, 1, 1, KH - 1 - PH, KW - 1 - PW, 1, 1, H, W)
    grp = _group(HW)
    L = grp * HW
    ws = k.gemm_workspace_bytes()
    # im2col(dy) gathered from dy's zero-padded planes (conv.py) where the geometry allows
    gather = _gather_tables(k, n.name + "_dx", dims, O, Og, grp)
    cols_f = gather.floats(grp * O) if gather else O * KK * L
    k.need_scratch(ws + 4 * (cols_f + (C * L if grp > 1 else 0)))
    gemm = k.gemm(_plain(), gathered_b=bool(gather))
    fn, b, a = step_function(k.mod, k.step_name(n.name + "_dx"))
    gp, fp = k.ptr(b, a, arena(dy_off)), k.ptr(b, a, arena(wf))
    dxp = k.ptr(b, a, arena(dx_off))
    cols = fptr(b, a["scratch"], ws // 4)
    cmat = fptr(b, a["scratch"], ws // 4 + cols_f)
    with _image_groups(b, a, N, grp) as (i0, cnt):
        if gather:
            with loop(b, 0, b.mul(cnt, i64(O)), name="pl") as t:
                emit_phases(b, fptr(b, gp, b.mul(b.add(b.mul(i0, i64(O)), t), i64(P))),
                            fptr(b, cols, b.mul(t, i64(gather.plane))), dims, gather.layout)
        else:
            with loop(b, 0, cnt, name="ii") as ii:
                _im2col_image(k, b, fptr(b, gp, b.mul(b.add(i0, ii), i64(O * P))),
                              fptr(b, cols, b.mul(ii, i64(HW))), geo, C=O, dims=dims, ld=L)
        width = b.mul(cnt, i64(HW))
        for g in range(G):
            if grp == 1:
                out, ldc = fptr(b, dxp, b.add(b.mul(i0, i64(C * HW)), i64(g * Cg * HW))), HW
            else:
                out, ldc = fptr(b, cmat, g * Cg * L), L
            bmat = fptr(b, cols, g * Og * gather.plane if gather else g * Og * KK * L)
            _gemm_call(b, gemm, Cg, width, Og * KK, fptr(b, fp, g * Cg * Og * KK), Og * KK,
                       bmat, L, out, ldc, False, a["scratch"], gather.tables if gather else ())
        if grp > 1:
            with loop(b, 0, cnt, name="ii") as ii:
                _move_rows(b, fptr(b, cmat, b.mul(ii, i64(HW))), L,
                           fptr(b, dxp, b.mul(b.add(i0, ii), i64(C * HW))), HW, C, HW)
    b.ret_void()
    k.steps.append(_step(fn.name, k.node_index, N))


def _zero_step(k, name, off, count) -> None:
    fn, b, a = step_function(k.mod, k.step_name(name))
    lo, hi = part_range(b, count, a["part"], a["nparts"], align=16)
    p = fptr(b, k.ptr(b, a, arena(off)), lo)
    memset0(b, p, b.mul(b.sub(hi, lo), i64(4)))
    b.ret_void()
    k.add_step(fn.name, count // 8)


def _plain():
    from .epilogue import ProgramEpilogue
    return ProgramEpilogue([], "col", False)


def _reduce_partials(k, name, partial, dw_off, G, K, Og) -> None:
    """dW[g, o, kk] = sum over s < SPLIT of partial[s][g][kk][o]."""
    fn, b, a = step_function(k.mod, k.step_name(name))
    pp, dp = k.ptr(b, a, arena(partial)), k.ptr(b, a, arena(dw_off))
    total = G * Og * K
    lo, hi = part_range(b, total, a["part"], a["nparts"])
    with loop(b, lo, hi, name="e") as e:
        g = b.udiv(e, i64(Og * K))
        o = b.urem(b.udiv(e, i64(K)), i64(Og))
        kk = b.urem(e, i64(K))
        src = b.add(b.add(b.mul(g, i64(K * Og)), b.mul(kk, i64(Og))), o)
        acc = var(b, load(b, pp, src), "acc")
        for s in range(1, SPLIT):
            b.store(b.fadd(get(b, acc), load(b, pp, b.add(src, i64(s * G * K * Og)))), acc)
        store(b, get(b, acc), dp, e)
    b.ret_void()
    k.add_step(fn.name, total * SPLIT)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _col2im_image(b, cols, dst, geo, ld=None) -> None:
    """dx of one image (C x H x W at ``dst``) from its column gradients (C*KH*KW x P at
    ``cols``): each plane zeroed, then every entry added to the pixel it was read from."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    C, P = geo.channels, OH * OW
    ld = P if ld is None else ld
    with loop(b, 0, C, name="c") as c:
        plane = fptr(b, dst, b.mul(c, i64(H * W)))
        memset0(b, plane, 4 * H * W)
        for kh in range(KH):
            for kw in range(KW):
                row = fptr(b, cols, b.mul(b.add(b.mul(c, i64(KH * KW)), i64(kh * KW + kw)),
                                          i64(ld)))
                iw0, ih0 = kw * DW - PW, kh * DH - PH
                # output positions whose input position o*S + i0 is inside the image
                ow_lo, ow_hi = max(0, _cdiv(-iw0, SW)), min(OW, (W - 1 - iw0) // SW + 1)
                oh_lo, oh_hi = max(0, _cdiv(-ih0, SH)), min(OH, (H - 1 - ih0) // SH + 1)
                if ow_hi <= ow_lo or oh_hi <= oh_lo:
                    continue
                with loop(b, oh_lo, oh_hi, name="oh") as oh:
                    ih = b.add(b.mul(oh, i64(SH)), i64(ih0))
                    src = fptr(b, row, b.mul(oh, i64(OW)))
                    out = fptr(b, plane, b.mul(ih, i64(W)))
                    with loop(b, ow_lo, ow_hi, name="ow") as ow:
                        iw = b.add(b.mul(ow, i64(SW)), i64(iw0))
                        store(b, b.fadd(load(b, out, iw), load(b, src, ow)), out, iw)
