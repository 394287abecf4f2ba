"""The gradients of a Convolution, as packed GEMMs over image columns.

For a chunk of images (their columns fit COLS_BUDGET), group g, K = Cg*KH*KW, P = OH*OW:

    dW^T (K x Og) += cols (K x imgs*P) @ dY^T (imgs*P x Og)
        cols: im2col of the images side by side (conv.py's step); dY^T: each image's
        (O x P) output gradient transposed.  The product's reduction runs over the
        pixels of every image while its result is small (LeNet's conv1: 25 x 20), so it
        is split along the reduction: SPLIT parts each sum their share of the pixels
        into their own partial result, and one more step adds the partials and writes
        dW (Og x K) transposed back.
    dX: dcols (K x imgs*P) = W^T (K x Og) @ dY (Og x imgs*P), the GEMM's own split; then
        col2im adds every column entry back to the input pixel it was read from (the
        parts split (image, channel) planes, so no two parts write one pixel).
    db[o] = sum of dY over images and pixels.
"""
from __future__ import annotations


from llvmlite import ir

from ....ops.conv import Geometry
from ..irutil import I32, fptr, get, i64, load, loop, memset0, part_range, step_function, \
    store, var
from .conv import COLS_BUDGET, _dims, _im2col_step
from .grad_linear import arena, emit_gemm
from .transpose import emit_gather_rows, emit_row_sums, emit_transpose

#: parts of a weight-gradient product (each with its own partial result)
SPLIT = 8


def supported(geo: Geometry):
    if geo.nsp > 2:
        return (f"the gradient of a {geo.nsp}-D convolution",
                "the CPU backend trains 1-D and 2-D convolutions")
    return None


def lower_grad(k, n, parts) -> None:
    from ..lower import Step
    attrs = parts.fwd_attrs
    x_shape = parts.input_shapes[0]
    geo = Geometry(attrs, x_shape, transposed=False)
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    Cg, Og = C // G, O // G
    K, P = Cg * KH * KW, OH * OW
    dy = parts.grads[0]
    dy_off = k.loc(dy)
    need_dw = 0 in parts.param_grads
    need_dx = 0 in parts.input_grads
    if 1 in parts.param_grads:
        emit_row_sums(k, n.name + "_db", arena(dy_off), arena(k.loc(parts.param_grads[1])),
                      N, O, P)
    if not (need_dw or need_dx):
        return
    chunk = max(1, min(N, COLS_BUDGET // max(4 * G * K * P, 1)))
    cols = k.temp(4 * chunk * G * K * P, "cols")
    dyt = k.temp(4 * chunk * O * P, "dy")
    w = k.param_src(n.params[0])
    if need_dw:
        x_off = k.loc(parts.inputs[0])
        partial = k.temp(4 * SPLIT * G * K * Og, "partial")
        _zero_step(k, n.name + "_dw0", partial, SPLIT * G * K * Og)
        for first in range(0, N, chunk):
            imgs = min(chunk, N - first)
            ld = imgs * P
            _im2col_step(k, n, x_off, cols, first, imgs, geo, side_by_side=True)
            emit_transpose(k, n.name + "_dyt", arena(dy_off + 4 * first * O * P), arena(dyt),
                           imgs, O, P)
            # split-K: part s sums pixels [ld*s/SPLIT, ld*(s+1)/SPLIT) into partial s
            fn, b, a = step_function(k.mod, k.step_name(n.name + "_dw"))
            gemm = k.gemm(_plain())
            k.need_scratch(k.gemm_workspace_bytes())
            cp, tp, pp = (k.ptr(b, a, arena(o)) for o in (cols, dyt, partial))
            k0 = b.sdiv(b.mul(a["part"], i64(ld)), a["nparts"])
            k1 = b.sdiv(b.mul(b.add(a["part"], i64(1)), i64(ld)), a["nparts"])
            mine = fptr(b, pp, b.mul(a["part"], i64(G * K * Og)))
            for g in range(G):
                b.call(gemm, [i64(K), i64(Og), b.sub(k1, k0),
                              fptr(b, cp, b.add(i64(g * K * ld), k0)), i64(ld),
                              fptr(b, tp, b.add(b.mul(k0, i64(O)), i64(g * Og))), i64(O),
                              fptr(b, mine, g * K * Og), i64(Og),
                              ir.Constant(I32, 1), i64(0), i64(1), a["scratch"]])
            b.ret_void()
            # exactly SPLIT parts (each owns a partial result; one with no pixels adds 0)
            k.steps.append(Step(fn.name, k.node_index, SPLIT, 1 << 20))
        _reduce_partials(k, n.name + "_dwsum", partial, k.loc(parts.param_grads[0]), G, K, Og)
    if need_dx:
        dx_off = k.loc(parts.input_grads[0])
        wt = k.temp(4 * G * K * Og, "wt")
        emit_transpose(k, n.name + "_wt", w, arena(wt), G, Og, K)
        for first in range(0, N, chunk):
            imgs = min(chunk, N - first)
            ld = imgs * P
            emit_gather_rows(k, n.name + "_dyr", arena(dy_off + 4 * first * O * P), arena(dyt),
                             imgs, O, P)
            for g in range(G):
                emit_gemm(k, n.name + "_dcols", K, ld, Og, arena(wt + 4 * g * K * Og), Og,
                          arena(dyt + 4 * g * Og * ld), ld, arena(cols + 4 * g * K * ld), ld)
            _col2im_step(k, n, cols, dx_off, first, imgs, geo)


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


def _col2im_step(k, n, cols, dx_off, first, imgs, geo) -> None:
    """dX[first + i, c] for the images of a chunk: the side-by-side columns (rows
    (c, kh, kw), image i's pixels at i*P) added back to the input positions they came
    from.  Parts split the (image, channel) planes."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    C, P = geo.channels, OH * OW
    ld = imgs * P
    fn, b, a = step_function(k.mod, k.step_name(n.name + "_col2im"))
    cp = k.ptr(b, a, arena(cols))
    xp = k.ptr(b, a, arena(dx_off))
    lo, hi = part_range(b, imgs * C, a["part"], a["nparts"])
    with loop(b, lo, hi, name="pl") as pl:
        i, c = b.udiv(pl, i64(C)), b.urem(pl, i64(C))
        plane = fptr(b, xp, b.mul(b.add(pl, i64(first * C)), i64(H * W)))
        memset0(b, plane, 4 * H * W)
        for kh in range(KH):
            for kw in range(KW):
                row = fptr(b, cp, b.add(b.mul(b.add(b.mul(c, i64(KH * KW)), i64(kh * KW + kw)),
                                              i64(ld)), b.mul(i, i64(P))))
                iw0, ih0 = kw * DW - PW, kh * DH - PH
                # output positions whose input position o*S + i0 is inside the image
                ow_lo, ow_hi = max(0, _cdiv(-iw0, SW)), min(OW, (W - 1 - iw0) // SW + 1)
                oh_lo, oh_hi = max(0, _cdiv(-ih0, SH)), min(OH, (H - 1 - ih0) // SH + 1)
                if ow_hi <= ow_lo or oh_hi <= oh_lo:
                    continue
                with loop(b, oh_lo, oh_hi, name="oh") as oh:
                    ih = b.add(b.mul(oh, i64(SH)), i64(ih0))
                    src = fptr(b, row, b.mul(oh, i64(OW)))
                    dst = fptr(b, plane, b.mul(ih, i64(W)))
                    with loop(b, ow_lo, ow_hi, name="ow") as ow:
                        iw = b.add(b.mul(ow, i64(SW)), i64(iw0))
                        store(b, b.fadd(load(b, dst, iw), load(b, src, ow)), dst, iw)
    b.ret_void()
    k.add_step(fn.name, imgs * C * KH * KW * P)


# ---------------------------------------------------------------------------------------
# the forward pass in training (the inference kernel packs the weights at compile time)

#: output pixels from which the forward GEMM runs image by image (smaller images: a chunk
#: of images side by side as one product, then the rows moved into place)
PER_IMAGE_P = 256


def lower_forward(k, n) -> None:
    """y = W (*) x + b for a plain Convolution whose weights are the live params: im2col
    of a chunk of images side by side, then per group either one GEMM per image straight
    into y (P >= PER_IMAGE_P) or one GEMM for the chunk into a temporary, scattered to y."""
    x, y = n.inputs[0], n.outputs[0]
    geo = Geometry(n.attrs, k.shape(x), transposed=False)
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    Cg, Og = C // G, O // G
    K, P = Cg * KH * KW, OH * OW
    w = k.param_src(n.params[0])
    bias = k.param_src(n.params[1]) if len(n.params) > 1 else None
    x_off, y_off = k.loc(x), k.loc(y)
    chunk = max(1, min(N, COLS_BUDGET // max(4 * G * K * P, 1)))
    cols = k.temp(4 * chunk * G * K * P, "cols")
    per_image = P >= PER_IMAGE_P
    cmat = None if per_image else k.temp(4 * chunk * O * P, "cmat")
    from .epilogue import ProgramEpilogue
    epi = ProgramEpilogue([], "row", bias is not None)
    for first in range(0, N, chunk):
        imgs = min(chunk, N - first)
        ld = imgs * P
        _im2col_step(k, n, x_off, cols, first, imgs, geo, side_by_side=True)
        fn, b, a = step_function(k.mod, k.step_name(n.name))
        gemm = k.gemm(epi)
        k.need_scratch(k.gemm_workspace_bytes())
        cp, wp = k.ptr(b, a, arena(cols)), k.ptr(b, a, w)
        bp = k.ptr(b, a, bias) if bias is not None else None
        out = k.ptr(b, a, arena(y_off if per_image else cmat))
        for g in range(G):
            extra = [fptr(b, bp, g * Og)] if bp is not None else []
            for i in (range(imgs) if per_image else [None]):
                if i is None:
                    bmat, cmat_ptr, ldc, ncols = fptr(b, cp, g * K * ld), \
                        fptr(b, out, g * Og * ld), ld, ld
                else:
                    bmat = fptr(b, cp, g * K * ld + i * P)
                    cmat_ptr, ldc, ncols = fptr(b, out, ((first + i) * O + g * Og) * P), P, P
                b.call(gemm, [i64(Og), i64(ncols), i64(K), fptr(b, wp, g * Og * K), i64(K),
                              bmat, i64(ld), cmat_ptr, i64(ldc), ir.Constant(I32, 0),
                              a["part"], a["nparts"], a["scratch"], *extra])
        b.ret_void()
        k.add_step(fn.name, 2 * imgs * O * P * K, per_thread=1)
        if not per_image:
            emit_gather_rows(k, n.name + "_out", arena(cmat), arena(y_off + 4 * first * O * P),
                             imgs, O, P, scatter=True)
