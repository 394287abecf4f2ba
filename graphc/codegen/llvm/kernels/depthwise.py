"""Depthwise convolution (one input and one output channel per group: MobileNet's 3x3).

Each plane (image, channel) is one item of the step's parts:

1. The plane is copied zero-padded into the thread's scratch, a padded row r holding
   image row r - PH; with column stride S the row is split into its S column phases
   (phase p, column j holds padded column j * S + p; for S = 2 split with shuffles), so
   that every tap reads a vector of consecutive output columns as one contiguous run:
   tap (kh, kw) of output row oh reads padded row oh * SH + kh * DH, phase (kw * DW) % S,
   from column ow + (kw * DW) // S.  Rows and phases are wide enough for whole vectors,
   so the inner loop has no bounds checks.
2. Per block of ROWS output rows and vector of output columns: the bias, then each tap's
   weight (a splat) times the loaded run, fused multiply-adds in registers, each run
   loaded once for all the rows of the block that read it (a 3x3 tap serves 3); the
   fused tail (ReLU, a residual add, a per-channel Scale, ...) on the register; one
   store.  A masked store is slow, so a row's last vector (the row's last columns) is
   stored whole, written before the next row's first vector overwrites what spilled,
   except in the plane's last rows (where it would spill out of the plane) and when the
   tail reads the output in place.

With 9 multiply-adds per output element (18 flops per 8 bytes read and written) the
kernel is bound by moving the activations rather than by the FMAs.
"""
from __future__ import annotations

from llvmlite import ir

from ..irutil import F32, I1, I32, fptr, i64, intrinsic, load, load_vec, loop, memcpy, memset0, \
    part_range, splat, step_function, store_vec
from .pointwise import Site, Src, chan_operands, channel_structure, emit_program

ROWS = 4    # output rows computed together: a 3x3 tap's input run serves up to 3 of them


def lower(k, n, geo, dims, x_off, params, steps, tensors, out_off):
    """Emit and schedule the step; ``dims`` are conv._dims(geo)."""
    from . import NotEpilogue
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = dims
    N, C = geo.num, geo.channels
    P = OH * OW
    dim, inner = channel_structure(geo.out_shape())
    if any(c.dim != 1 and (c.dim, c.inner) != (dim, inner) for c in chan_operands(steps)):
        raise NotEpilogue("operand not per output channel")
    vw = k.gemm_config.vw
    nvec, tail = -(-OW // vw), OW % vw
    # phase row width: whole vectors from the largest tap offset, and one more column so
    # the copy of the image row always fits (its last column may be one no tap reads)
    Wq = nvec * vw + (KW - 1) * DW // SW + 1
    Hp = (OH - 1) * SH + (KH - 1) * DH + 1                  # padded rows any tap reads
    row_floats = SW * Wq
    k.need_scratch(4 * Hp * row_floats)

    fn, b, a = step_function(k.mod, k.step_name(n.name))
    xp = k.ptr(b, a, Src("arena", x_off))
    yp = k.ptr(b, a, Src("arena", out_off))
    wp = k.ptr(b, a, k.param_src(params[0]))
    bp = k.ptr(b, a, k.param_src(params[1])) if len(params) > 1 else None
    buf = a["scratch"]
    vt = ir.VectorType(F32, vw)
    fma = intrinsic(k.mod, f"llvm.{'fma' if k.target.has_fma else 'fmuladd'}.v{vw}f32",
                    vt, [vt] * 3)
    in_place = out_off in tensors           # the tail reads the output
    mask = ir.Constant(ir.VectorType(I1, vw), [j < tail for j in range(vw)]) if tail else None
    # per phase p: the columns j holding image columns (j * SW + p - PW in [0, W))
    cols = [(min(Wq, max(0, -(-(PW - p) // SW))), min(Wq, (W - 1 + PW - p) // SW + 1))
            for p in range(SW)]

    lo, hi = part_range(b, N * C, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as plane:
        c = b.urem(plane, i64(C))
        src = fptr(b, xp, b.mul(plane, i64(H * W)))
        _copy_padded(b, buf, src, H, W, PH, PW, SW, Wq, Hp, cols, vw)
        wc = fptr(b, wp, b.mul(c, i64(KH * KW)))
        wv = [splat(b, load(b, wc, t), vw) for t in range(KH * KW)]
        init = splat(b, load(b, bp, c) if bp is not None else ir.Constant(F32, 0.0), vw)
        out_plane = b.mul(plane, i64(P))

        def emit_block(oh0, nrows, col, masks):
            """Output rows oh0 .. oh0 + nrows - 1 at columns col .. col + vw - 1 (row i's
            lanes limited by masks[i]): each input run loaded once, for every row of the
            block that reads it."""
            accs = [init] * nrows
            r0 = b.mul(oh0, i64(SH))
            for rel in sorted({i * SH + kh * DH for i in range(nrows) for kh in range(KH)}):
                at_row = b.mul(b.add(r0, i64(rel)), i64(row_floats))
                for kw in range(KW):
                    users = [(i, (rel - i * SH) // DH) for i in range(nrows)
                             if (rel - i * SH) % DH == 0 and 0 <= (rel - i * SH) // DH < KH]
                    if not users:
                        continue
                    p, dj = kw * DW % SW, kw * DW // SW
                    x = load_vec(b, buf, b.add(at_row, b.add(col, i64(p * Wq + dj))), vw)
                    for i, kh in users:
                        accs[i] = b.call(fma, [wv[kh * KW + kw], x, accs[i]])
            for i, (acc, m) in enumerate(zip(accs, masks)):
                at = b.add(out_plane, b.add(b.mul(b.add(oh0, i64(i)), i64(OW)), col))
                site = _VectorSite(b, k, a, tensors, at, c, vw, m)
                store_vec(b, emit_program(site, steps, acc), yp, at, m)

        def emit_rows(oh0, nrows, masked):
            """Rows oh0 .. oh0 + nrows - 1, each row's last vector first, with a mask
            for the rows i where masked(i): the other rows' last vectors may write past
            the row end, as the rows after them overwrite that later."""
            if tail:
                emit_block(oh0, nrows, i64((nvec - 1) * vw),
                           [mask if masked(i) else None for i in range(nrows)])
            if nvec - bool(tail):
                with loop(b, 0, nvec - bool(tail), name="ov") as v:
                    emit_block(oh0, nrows, b.mul(v, i64(vw)), [None] * nrows)

        # rows whose last vector stays inside the plane may write past their end; when
        # the tail reads the output, none may (what it reads must not be overwritten)
        free = OH if not tail else 0 if in_place else \
            min(OH, max(0, (P - nvec * vw) // OW + 1))
        looped = (OH if in_place else free) // ROWS
        if looped:
            with loop(b, 0, looped, name="oh") as blk:
                emit_rows(b.mul(blk, i64(ROWS)), ROWS, lambda i: in_place and bool(tail))
        for oh0 in range(looped * ROWS, OH, ROWS):          # the last rows, unrolled
            emit_rows(i64(oh0), min(ROWS, OH - oh0), lambda i, oh0=oh0: oh0 + i >= free)
    b.ret_void()
    k.add_step(fn.name, 2 * N * C * P * KH * KW)


def _copy_padded(b, buf, src, H, W, PH, PW, SW, Wq, Hp, cols, vw):
    """buf row r, phase p, column j = image[r - PH][j * SW + p - PW], zero outside."""
    row_floats = SW * Wq
    for r0, r1 in ((0, min(PH, Hp)), (min(PH + H, Hp), Hp)):       # rows of padding
        if r0 < r1:
            memset0(b, fptr(b, buf, r0 * row_floats), 4 * (r1 - r0) * row_floats)
    r_hi = min(PH + H, Hp)
    if PH >= r_hi:
        return
    with loop(b, PH, r_hi, name="prow") as r:
        row = fptr(b, buf, b.mul(r, i64(row_floats)))
        srow = fptr(b, src, b.mul(b.sub(r, i64(PH)), i64(W)))
        for p, (j0, j1) in enumerate(cols):                         # the side padding
            if j0 > 0:
                memset0(b, fptr(b, row, p * Wq), 4 * j0)
            if j1 < Wq:
                memset0(b, fptr(b, row, p * Wq + max(j1, 0)), 4 * (Wq - max(j1, 0)))
        done = 0
        if SW == 1:
            memcpy(b, fptr(b, row, PW), srow, 4 * W)
            done = W
        elif SW == 2:   # whole pairs of vectors split into their even and odd lanes
            done = _deinterleave(b, srow, [fptr(b, row, (e + PW) % 2 * Wq + (e + PW) // 2)
                                           for e in (0, 1)], W, vw)
        if done < W:    # image column iw goes to phase (iw + PW) % SW, column (iw + PW) // SW
            with loop(b, done, W, name="pcol") as iw:
                q = b.add(iw, i64(PW))
                at = b.add(b.mul(b.urem(q, i64(SW)), i64(Wq)), b.udiv(q, i64(SW)))
                b.store(load(b, srow, iw), fptr(b, row, at))


def _deinterleave(b, src, dsts, n: int, vw: int) -> int:
    """dsts[e][t] = src[2t + e] for 2t + e < (n // (2 vw)) * 2 vw, two vectors loaded
    and split by shuffles; returns the elements done (the caller copies the rest)."""
    vt = ir.VectorType(F32, 2 * vw)
    count = n // (2 * vw)
    lanes = [ir.Constant(ir.VectorType(I32, vw), list(range(e, 2 * vw, 2))) for e in (0, 1)]
    if count:
        with loop(b, 0, count, name="dei") as t:
            x = b.load(fptr(b, src, b.mul(t, i64(2 * vw))), typ=vt, align=4)
            for dst, sel in zip(dsts, lanes):
                b.store(b.shuffle_vector(x, x, sel), fptr(b, dst, b.mul(t, i64(vw))), align=4)
    return count * 2 * vw


class _VectorSite(Site):
    """A vector of ``width`` outputs at flat index ``i`` of channel ``c`` (lanes outside
    ``mask`` are neither read nor written)."""

    def __init__(self, b, kctx, args, tensors, i, c, width, mask):
        super().__init__(b)
        self.kctx, self.args, self.tensors = kctx, args, tensors
        self.i, self.c, self.width, self.mask = i, c, width, mask

    def tensor(self, j: int):
        p = self.kctx.ptr(self.b, self.args, Src("arena", self.tensors[j]))
        return load_vec(self.b, p, self.i, self.width, self.mask)

    def chan(self, ch):
        p = self.kctx.ptr(self.b, self.args, ch.src)
        return splat(self.b, load(self.b, p, 0 if ch.dim == 1 else self.c), self.width)

