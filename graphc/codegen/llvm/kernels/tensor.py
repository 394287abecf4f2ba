"""Data movement: Concat (when its producers do not write in place), Slice, Tile, Crop,
and a copy for a view the memory plan did not alias.

Concat, Slice and Tile are lists of contiguous block copies known at compile time
(split into pieces of at most 256 KiB so the parts share the work); the list is a
constant table in the module and each part copies its share.  Crop copies runs of the
innermost cropped axis (with the uncropped axes after it) found by index arithmetic.
"""
from __future__ import annotations

import math

from ....ops import get_op
from ....ops.base import canonical_axis
from ..irutil import I64, byte_ptr, constant_table, i64, loop, memcpy, part_range, \
    step_function

PIECE = 256 << 10


def supported(g, n):
    return None


def _pieces(blocks):
    """Split (dst, src, nbytes) blocks into pieces of at most PIECE bytes."""
    out = []
    for dst, src, nbytes in blocks:
        for s in range(0, nbytes, PIECE):
            out.append((dst + s, src + s, min(PIECE, nbytes - s)))
    return out


def emit_copies(k, name: str, blocks) -> None:
    """A step copying arena blocks (dst offset, src offset, bytes)."""
    pieces = [p for p in _pieces(blocks) if p[2] > 0]
    if not pieces:
        return
    table = constant_table(k.mod, f"{name}_table", I64, [v for p in pieces for v in p])
    fn, b, a = step_function(k.mod, name)
    lo, hi = part_range(b, len(pieces), a["part"], a["nparts"])
    with loop(b, lo, hi, name="piece") as t:
        row = b.mul(t, i64(3))
        get = lambda j: b.load(b.gep(table, [i64(0), b.add(row, i64(j))], inbounds=True),  # noqa
                               typ=I64)
        memcpy(b, byte_ptr(b, a["arena"], get(0)), byte_ptr(b, a["arena"], get(1)), get(2))
    b.ret_void()
    k.add_step(name, sum(p[2] for p in pieces) // 2)


def lower_copy(k, n):
    nbytes = 4 * math.prod(k.shape(n.inputs[0]))
    src = k.loc(n.inputs[0])
    emit_copies(k, k.step_name(n.name), [(k.loc(o), src, nbytes) for o in n.outputs])


def _outer_inner(shape, axis):
    return math.prod(shape[:axis]), math.prod(shape[axis + 1:])


def lower_concat(k, n):
    out = n.outputs[0]
    shape = k.shape(out)
    axis = canonical_axis(int(n.attrs["axis"]), len(shape))
    outer, inner = _outer_inner(shape, axis)
    dst0, row = k.loc(out), 4 * shape[axis] * inner
    blocks, at = [], 0
    for v in n.inputs:
        size = 4 * k.shape(v)[axis] * inner
        src0 = k.loc(v)
        blocks += [(dst0 + o * row + at, src0 + o * size, size) for o in range(outer)]
        at += size
    emit_copies(k, k.step_name(n.name), blocks)


def lower_slice(k, n):
    x = n.inputs[0]
    shape = k.shape(x)
    axis, sizes = get_op("Slice").sizes(n.attrs, shape)
    outer, inner = _outer_inner(shape, axis)
    src0, row = k.loc(x), 4 * shape[axis] * inner
    blocks, at = [], 0
    for v, s in zip(n.outputs, sizes):
        size = 4 * s * inner
        blocks += [(k.loc(v) + o * size, src0 + o * row + at, size) for o in range(outer)]
        at += size
    emit_copies(k, k.step_name(n.name), blocks)


def lower_tile(k, n):
    x = n.inputs[0]
    shape = k.shape(x)
    axis = canonical_axis(int(n.attrs.get("axis", 1)), len(shape))
    tiles = int(n.attrs["tiles"])
    outer = math.prod(shape[:axis])
    block = 4 * math.prod(shape[axis:])
    src0, dst0 = k.loc(x), k.loc(n.outputs[0])
    blocks = [(dst0 + (o * tiles + t) * block, src0 + o * block, block)
              for o in range(outer) for t in range(tiles)]
    emit_copies(k, k.step_name(n.name), blocks)


def lower_crop(k, n):
    x, y = n.inputs[0], n.outputs[0]
    s0, s1 = k.shape(x), k.shape(n.inputs[1])
    off, oshape = get_op("Crop").plan(n.attrs, s0, s1)
    rank = len(s0)
    # the run: the last axis that is cropped, with every (whole) axis after it
    last = max([i for i in range(rank) if oshape[i] != s0[i] or off[i]] or [0])
    run = math.prod(oshape[last:])
    rows = math.prod(oshape[:last])
    in_strides = [math.prod(s0[i + 1:]) for i in range(rank)]
    fn, b, a = step_function(k.mod, k.step_name(n.name))
    src0 = k.loc(x) + 4 * sum(o * st for o, st in zip(off, in_strides))
    lo, hi = part_range(b, rows, a["part"], a["nparts"])
    with loop(b, lo, hi, name="row") as r:
        rest, src = r, i64(0)
        for i in reversed(range(last)):
            idx = b.urem(rest, i64(oshape[i]))
            rest = b.udiv(rest, i64(oshape[i]))
            src = b.add(src, b.mul(idx, i64(in_strides[i])))
        dst = byte_ptr(b, a["arena"], b.add(i64(k.loc(y)), b.mul(r, i64(4 * run))))
        srcp = byte_ptr(b, a["arena"], b.add(i64(src0), b.mul(src, i64(4))))
        memcpy(b, dst, srcp, 4 * run)
    b.ret_void()
    k.add_step(fn.name, rows * run)
