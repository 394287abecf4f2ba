"""Data movement steps the training kernels build their GEMM operands with: a batched
2-D transpose, a gather of per-image rows side by side, and sums over rows (a bias
gradient).  The packed GEMM (gemm.py) reads row-major A and B only, so a product with a
transposed operand (``dW = dY^T @ X``) first transposes that operand into a temporary.

Each function emits one step for the current node of the KernelContext ``k``; offsets
are byte offsets into the arena (``Src("arena", off)``) or the weights buffer.
"""
from __future__ import annotations

from llvmlite import ir

from ..irutil import F32, fptr, i64, imin, load, loop, part_range, step_function, store, \
    memcpy
from .pointwise import Src

TILE = 16


def emit_transpose(k, name: str, src: Src, dst: Src, batch: int, rows: int, cols: int,
                   src_stride: int | None = None, dst_stride: int | None = None) -> None:
    """dst[b][c, r] = src[b][r, c] for b < batch, an (rows x cols) matrix per b (strides
    between the matrices in floats; default: packed).  Parts split (b, row tile) items;
    each tile of TILE x TILE is moved through registers."""
    src_stride = rows * cols if src_stride is None else src_stride
    dst_stride = rows * cols if dst_stride is None else dst_stride
    rt = -(-rows // TILE)
    fn, b, a = step_function(k.mod, k.step_name(name))
    sp, dp = k.ptr(b, a, src), k.ptr(b, a, dst)
    lo, hi = part_range(b, batch * rt, a["part"], a["nparts"])
    with loop(b, lo, hi, name="t") as t:
        bi, r0 = b.udiv(t, i64(rt)), b.mul(b.urem(t, i64(rt)), i64(TILE))
        r1 = imin(b, b.add(r0, i64(TILE)), i64(rows))
        s = fptr(b, sp, b.mul(bi, i64(src_stride)))
        d = fptr(b, dp, b.mul(bi, i64(dst_stride)))
        with loop(b, 0, cols, TILE, name="c0") as c0:
            c1 = imin(b, b.add(c0, i64(TILE)), i64(cols))
            with loop(b, c0, c1, name="c") as c:
                with loop(b, r0, r1, name="r") as r:
                    v = load(b, s, b.add(b.mul(r, i64(cols)), c))
                    store(b, v, d, b.add(b.mul(c, i64(rows)), r))
    b.ret_void()
    k.add_step(fn.name, batch * rows * cols * 2)


def emit_gather_rows(k, name: str, src: Src, dst: Src, imgs: int, rows: int, length: int,
                     scatter: bool = False) -> None:
    """dst[r, i*length + j] = src[i, r, j]: ``imgs`` (rows x length) matrices side by side
    into one (rows x imgs*length) matrix (a convolution's output gradients of a chunk of
    images as one GEMM operand); ``scatter``: the other way round (dst[i, r, j] =
    src[r, i*length + j])."""
    fn, b, a = step_function(k.mod, k.step_name(name))
    sp, dp = k.ptr(b, a, src), k.ptr(b, a, dst)
    lo, hi = part_range(b, imgs * rows, a["part"], a["nparts"])
    with loop(b, lo, hi, name="t") as t:
        i, r = b.udiv(t, i64(rows)), b.urem(t, i64(rows))
        per_image = fptr(b, dp if scatter else sp, b.mul(t, i64(length)))
        side = fptr(b, sp if scatter else dp,
                    b.add(b.mul(r, i64(imgs * length)), b.mul(i, i64(length))))
        if scatter:
            memcpy(b, per_image, side, 4 * length)
        else:
            memcpy(b, side, per_image, 4 * length)
    b.ret_void()
    k.add_step(fn.name, imgs * rows * length // 4)


def emit_row_sums(k, name: str, src: Src, dst: Src, outer: int, chans: int, inner: int
                  ) -> None:
    """dst[c] = sum over o < outer, j < inner of src[o, c, j] (a bias gradient), each
    channel summed in float32 in a fixed order (o, then j); parts split the channels."""
    fn, b, a = step_function(k.mod, k.step_name(name))
    sp, dp = k.ptr(b, a, src), k.ptr(b, a, dst)
    lo, hi = part_range(b, chans, a["part"], a["nparts"])
    from ..irutil import REASSOC, get, var
    with loop(b, lo, hi, name="c") as c:
        acc = var(b, ir.Constant(F32, 0.0), "acc")
        with loop(b, 0, outer, name="o") as o:
            base = b.mul(b.add(b.mul(o, i64(chans)), c), i64(inner))
            if inner == 1:
                b.store(b.fadd(get(b, acc), load(b, sp, base)), acc)
            else:
                part = var(b, ir.Constant(F32, 0.0), "part")
                with loop(b, 0, inner, name="j") as j:
                    b.store(b.fadd(get(b, part), load(b, sp, b.add(base, j)), flags=REASSOC),
                            part)
                b.store(b.fadd(get(b, acc), get(b, part)), acc)
        store(b, get(b, acc), dp, c)
    b.ret_void()
    k.add_step(fn.name, outer * chans * inner)


def emit_column_sums(k, name: str, src: Src, dst: Src, rows: int, cols: int) -> None:
    """dst[c] = sum over r < rows of src[r, c] (an inner product's bias gradient); parts
    split the columns, the rows are added in order (vectorized across columns)."""
    fn, b, a = step_function(k.mod, k.step_name(name))
    sp, dp = k.ptr(b, a, src), k.ptr(b, a, dst)
    lo, hi = part_range(b, cols, a["part"], a["nparts"], align=16)
    with loop(b, lo, hi, name="c") as c:
        store(b, ir.Constant(F32, 0.0), dp, c)
    with loop(b, 0, rows, name="r") as r:
        row = fptr(b, sp, b.mul(r, i64(cols)))
        with loop(b, lo, hi, name="c") as c:
            store(b, b.fadd(load(b, dp, c), load(b, row, c)), dp, c)
    b.ret_void()
    k.add_step(fn.name, rows * cols)
