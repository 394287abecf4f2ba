"""Data-movement layers: Concat, Slice, Split, Flatten, Reshape, Crop, Silence, Tile.

None of these computes anything; they only move (or re-view) memory, so their cost is
zero flops and the bytes they move.  Shape rules and error conditions follow BVLC Caffe's
``*_layer.cpp`` exactly (the messages say what Caffe's CHECKs say, plus what to change).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpError
from .base import Cost, Op, canonical_axis, register


def _shape(shape) -> list[int]:
    return [int(d) for d in shape]


def _move_cost(in_types, out_types) -> Cost:
    return Cost(flops=0, bytes=sum(t.nbytes for t in (*in_types, *out_types)))


def _grad_or_zeros(dy, shape, dtype) -> np.ndarray:
    """A top's gradient, or zeros when none reaches it (Caffe's untouched diff)."""
    return dy if dy is not None else np.zeros(shape, dtype)


def _move_grad_cost(self, attrs, in_types, param_types, out_types, need_inputs, need_params):
    return 0


# ---------------------------------------------------------------------------------------
@register
class Concat(Op):
    """Concatenate bottoms along ``axis`` (legacy ``concat_dim``: a non-negative axis).
    Every other dimension must agree.  One bottom: the top is a copy of it."""
    type = "Concat"
    caffe_param = "concat_param"
    num_inputs = (1, None)
    num_outputs = 1

    def from_caffe(self, layer, phase):
        p = layer.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise OpError("concat_param sets both axis and concat_dim",
                          hint="keep only axis (concat_dim is the deprecated spelling)")
        if p.HasField("concat_dim"):
            return {"axis": int(p.concat_dim)}
        return {"axis": int(p.axis)}

    def infer(self, attrs, in_types, param_types):
        first = in_types[0]
        axis = canonical_axis(attrs["axis"], first.rank, "concat axis")
        out = list(first.shape)
        for i, t in enumerate(in_types[1:], 1):
            if t.rank != first.rank:
                raise OpError(f"Concat: bottom 0 has shape {list(first.shape)} but bottom {i} "
                              f"has shape {list(t.shape)} (different number of axes)",
                              hint="all bottoms of a Concat need the same number of axes")
            for a in range(first.rank):
                if a != axis and t.shape[a] != first.shape[a]:
                    raise OpError(f"Concat along axis {axis}: bottom 0 has shape "
                                  f"{list(first.shape)} but bottom {i} has shape "
                                  f"{list(t.shape)} (axis {a} differs)",
                                  hint="all dimensions except the concat axis must be equal; "
                                       "check the axis or the bottoms' shapes")
            out[axis] += t.shape[axis]
        return [first.with_shape(out)]

    def forward(self, attrs, inputs, params, ctx):
        axis = canonical_axis(attrs["axis"], inputs[0].ndim)
        return [np.concatenate(inputs, axis=axis).astype(np.float32, copy=False)]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False] * len(need_inputs), [False]    # shapes only

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Each bottom gets its slab of the top's gradient."""
        axis = canonical_axis(attrs["axis"], inputs[0].ndim)
        cuts = np.cumsum([x.shape[axis] for x in inputs])[:-1]
        dy = grad_outputs[0]
        parts = np.split(dy, cuts, axis=axis) if dy is not None else [None] * len(inputs)
        return [(np.ascontiguousarray(p) if p is not None else np.zeros_like(x)) if need
                else None for p, x, need in zip(parts, inputs, need_inputs)], []

    grad_cost = _move_grad_cost

    def cost(self, attrs, in_types, param_types, out_types):
        return _move_cost(in_types, out_types)


# ---------------------------------------------------------------------------------------
@register
class Slice(Op):
    """Cut the bottom along ``axis`` (legacy ``slice_dim``) into the tops: at the given
    ``slice_point``s (strictly increasing, one fewer than the tops), or, without points,
    into equal parts (the number of tops must divide the axis).  Attribute ``num_top``."""
    type = "Slice"
    caffe_param = "slice_param"
    num_inputs = 1
    num_outputs = (1, None)

    def from_caffe(self, layer, phase):
        p = layer.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise OpError("slice_param sets both axis and slice_dim",
                          hint="keep only axis (slice_dim is the deprecated spelling)")
        axis = int(p.slice_dim) if p.HasField("slice_dim") else int(p.axis)
        return {"axis": axis, "slice_point": [int(s) for s in p.slice_point],
                "num_top": len(layer.top)}

    def sizes(self, attrs, shape) -> tuple[int, list[int]]:
        """(canonical axis, size of each top along it)."""
        axis = canonical_axis(attrs["axis"], len(shape), "slice axis")
        dim = shape[axis]
        points = list(attrs.get("slice_point", []))
        n = int(attrs["num_top"])
        if points:
            if len(points) != n - 1:
                raise OpError(f"Slice has {len(points)} slice_point(s) but {n} top(s)",
                              hint="give exactly one slice_point fewer than the number of tops")
            sizes, prev = [], 0
            for p in points:
                if p <= prev:
                    raise OpError(f"slice_point values {points} are not strictly increasing "
                                  f"and positive",
                                  hint="list the cut positions in increasing order, each > 0")
                sizes.append(p - prev)
                prev = p
            if prev > dim:  # Caffe allows prev == dim (an empty last top)
                raise OpError(f"slice_point {prev} is beyond the end of axis {axis} "
                              f"(size {dim}, bottom shape {list(shape)})",
                              hint=f"every slice_point must be at most {dim}")
            sizes.append(dim - prev)
            return axis, sizes
        if n > dim:
            raise OpError(f"Slice has {n} tops but axis {axis} has only {dim} element(s)",
                          hint="use fewer tops or another axis")
        if dim % n:
            raise OpError(f"Number of top blobs ({n}) should evenly divide input slice axis "
                          f"({dim}) (bottom shape {list(shape)})",
                          hint="give slice_point values, or a number of tops dividing the axis")
        return axis, [dim // n] * n

    def infer(self, attrs, in_types, param_types):
        t = in_types[0]
        axis, sizes = self.sizes(attrs, t.shape)
        outs = []
        for s in sizes:
            shape = list(t.shape)
            shape[axis] = s
            outs.append(t.with_shape(shape))
        return outs

    def forward(self, attrs, inputs, params, ctx):
        x = inputs[0]
        axis, sizes = self.sizes(attrs, x.shape)
        cuts = np.cumsum(sizes)[:-1]
        return [np.ascontiguousarray(p, dtype=np.float32)
                for p in np.split(x, cuts, axis=axis)]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [False] * n_outputs           # shapes only

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """The tops' gradients put back side by side (zeros for a top without one)."""
        x = inputs[0]
        if not need_inputs[0]:
            return [None], []
        axis, sizes = self.sizes(attrs, x.shape)
        parts = []
        for dy, size in zip(grad_outputs, sizes):
            shape = list(x.shape)
            shape[axis] = size
            parts.append(_grad_or_zeros(dy, shape, x.dtype))
        return [np.concatenate(parts, axis=axis)], []

    grad_cost = _move_grad_cost

    def cost(self, attrs, in_types, param_types, out_types):
        return _move_cost(in_types, out_types)


# ---------------------------------------------------------------------------------------
@register
class Split(Op):
    """One bottom to N identical tops (Caffe inserts these where a blob feeds several
    layers; in backward their diffs are summed).  Attribute ``num_top``."""
    type = "Split"
    num_inputs = 1
    num_outputs = (1, None)

    def from_caffe(self, layer, phase):
        return {"num_top": len(layer.top)}

    def infer(self, attrs, in_types, param_types):
        return [in_types[0]] * int(attrs["num_top"])

    def forward(self, attrs, inputs, params, ctx):
        return [np.array(inputs[0], dtype=np.float32, copy=True)
                for _ in range(int(attrs["num_top"]))]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [False] * n_outputs

    def backward_inplace_ok(self, attrs):
        return True     # an elementwise sum of the tops' gradients

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe sums the tops' gradients in top order."""
        if not need_inputs[0]:
            return [None], []
        acc = np.zeros_like(inputs[0])
        for dy in grad_outputs:
            if dy is not None:
                acc += dy
        return [acc], []

    def grad_cost(self, attrs, in_types, param_types, out_types, need_inputs, need_params):
        return (len(out_types) - 1) * in_types[0].numel

    def cost(self, attrs, in_types, param_types, out_types):
        return _move_cost(in_types, out_types)


# ---------------------------------------------------------------------------------------
class _NewShape(Op):
    """Flatten and Reshape: the same data under a new shape (``out_shape``); Caffe shares
    the memory, so they cost nothing."""

    def out_shape(self, attrs, shape):
        raise NotImplementedError

    def infer(self, attrs, in_types, param_types):
        t = in_types[0]
        return [t.with_shape(self.out_shape(attrs, t.shape))]

    def forward(self, attrs, inputs, params, ctx):
        x = inputs[0]
        return [np.array(x, dtype=np.float32).reshape(self.out_shape(attrs, x.shape))]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [False]

    def backward_inplace_ok(self, attrs):
        return True     # the same elements in the same order

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        x, dy = inputs[0], grad_outputs[0]
        return [_grad_or_zeros(dy, x.shape, x.dtype).reshape(x.shape).copy()
                if need_inputs[0] else None], []

    grad_cost = _move_grad_cost

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(0, 0)


@register
class Flatten(_NewShape):
    """Merge axes ``axis`` .. ``end_axis`` (inclusive, both may be negative) into one."""
    type = "Flatten"
    caffe_param = "flatten_param"

    def from_caffe(self, layer, phase):
        p = layer.flatten_param
        return {"axis": int(p.axis), "end_axis": int(p.end_axis)}

    def out_shape(self, attrs, shape) -> list[int]:
        rank = len(shape)
        start = canonical_axis(attrs.get("axis", 1), rank, "flatten axis")
        end = canonical_axis(attrs.get("end_axis", -1), rank, "flatten end_axis")
        if end < start:
            raise OpError(f"Flatten end_axis {attrs.get('end_axis', -1)} (axis {end}) comes "
                          f"before axis {attrs.get('axis', 1)} (axis {start}) for a "
                          f"{rank}-D bottom {list(shape)}",
                          hint="end_axis must be at or after axis")
        return [*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:]]



# ---------------------------------------------------------------------------------------
def reshape_shape(bottom: tuple[int, ...], new: list[int], axis: int = 0,
                  num_axes: int = -1) -> list[int]:
    """Caffe's Reshape rule.

    Axes ``[axis, axis + num_axes)`` of the bottom are replaced by ``new`` (``num_axes``
    -1: all axes from ``axis`` on; a negative ``axis`` counts from the end, -1 meaning
    *after* the last axis).  In ``new``, 0 copies the bottom dimension at the same position
    (counted from ``axis``), and at most one -1 is inferred so the counts match."""
    rank = len(bottom)
    start = axis if axis >= 0 else rank + axis + 1
    if not 0 <= start <= rank:
        raise OpError(f"reshape_param axis {axis} is out of range for a {rank}-D bottom "
                      f"{list(bottom)}", hint=f"use an axis in [{-rank - 1}, {rank}]")
    if num_axes < -1:
        raise OpError(f"reshape_param num_axes {num_axes} is invalid",
                      hint="num_axes must be >= 0, or -1 for all axes from axis on")
    end = rank if num_axes == -1 else start + num_axes
    if end > rank:
        raise OpError(f"end_axis = axis + num_axes = {start} + {num_axes} is out of range "
                      f"for a {rank}-D bottom {list(bottom)}",
                      hint=f"num_axes can be at most {rank - start} here (or -1)")
    inferred = [i for i, d in enumerate(new) if d == -1]
    if len(inferred) > 1:
        raise OpError(f"new shape {list(new)} contains multiple -1 dims; at most a single (1) "
                      f"value of -1 may be specified", hint="keep one -1, give the other sizes")
    for d in new:
        if d < -1:
            raise OpError(f"new shape {list(new)} has the invalid dimension {d}",
                          hint="use a positive size, 0 to copy the bottom's, or -1 to infer")
    top = [*bottom[:start], *new, *bottom[end:]]
    for i, d in enumerate(new):
        if d == 0:
            if start + i >= rank:
                raise OpError(f"new shape {list(new)} contains a 0 at position {i}, but there "
                              f"was no corresponding bottom axis to copy (bottom "
                              f"{list(bottom)}, axis {start})",
                              hint="a 0 copies the bottom dimension at the same position; "
                                   "give an explicit size there")
            top[start + i] = bottom[start + i]
    count = math.prod(bottom)
    if inferred:
        known = math.prod(d for j, d in enumerate(top) if j != start + inferred[0])
        if known == 0 or count % known:
            raise OpError(f"bottom count ({count}, shape {list(bottom)}) must be divisible by "
                          f"the product of the specified dimensions ({known}) to infer the -1 "
                          f"in {list(new)}", hint="fix the new shape so the sizes divide")
        top[start + inferred[0]] = count // known
    if math.prod(top) != count:
        raise OpError(f"output count must match input count: bottom {list(bottom)} has {count} "
                      f"elements but the new shape gives {top} with {math.prod(top)}",
                      hint="fix reshape_param shape (0 copies a dimension, -1 infers one)")
    return top


@register
class Reshape(_NewShape):
    """Change the shape without touching the data (Caffe shares the memory)."""
    type = "Reshape"
    caffe_param = "reshape_param"

    def from_caffe(self, layer, phase):
        p = layer.reshape_param
        attrs = {"shape": [int(d) for d in p.shape.dim], "axis": int(p.axis),
                 "num_axes": int(p.num_axes)}
        if sum(1 for d in attrs["shape"] if d == -1) > 1:
            raise OpError(f"new shape {attrs['shape']} contains multiple -1 dims; at most a "
                          f"single (1) value of -1 may be specified",
                          hint="keep one -1, give the other sizes")
        return attrs

    def out_shape(self, attrs, shape):
        return reshape_shape(tuple(shape), list(attrs["shape"]), int(attrs.get("axis", 0)),
                             int(attrs.get("num_axes", -1)))



# ---------------------------------------------------------------------------------------
@register
class Crop(Op):
    """Crop bottom 0 to the shape of bottom 1 on every axis from ``axis`` (default 2) on.

    ``offset``: none (all 0), one (used for every cropped axis), or one per cropped axis.
    Axes before ``axis`` are kept whole.  Bottom 1 only provides a shape."""
    type = "Crop"
    caffe_param = "crop_param"
    num_inputs = 2

    def from_caffe(self, layer, phase):
        p = layer.crop_param
        return {"axis": int(p.axis), "offset": [int(o) for o in p.offset]}

    def plan(self, attrs, s0, s1) -> tuple[list[int], list[int]]:
        """(offsets, output shape), one entry per axis."""
        rank = len(s0)
        if len(s1) != rank:
            raise OpError(f"Crop: bottom 0 has shape {list(s0)} but bottom 1 (the reference) "
                          f"has shape {list(s1)}: the number of axes differs",
                          hint="crop to a reference blob with as many axes as the input")
        start = canonical_axis(int(attrs.get("axis", 2)), rank, "crop axis")
        offsets = list(attrs.get("offset", []))
        if len(offsets) > 1 and len(offsets) != rank - start:
            raise OpError(f"Crop: {len(offsets)} offset values given but {rank - start} axes "
                          f"are cropped (axis {start} to {rank - 1})",
                          hint="give one offset for all cropped axes, or one per cropped axis")
        off, shape = [0] * rank, list(s0)
        for i in range(start, rank):
            o = offsets[0] if len(offsets) == 1 else (offsets[i - start] if offsets else 0)
            if o < 0 or s0[i] - o < s1[i]:
                raise OpError(f"Crop: the crop for axis {i} is out of bounds: bottom 0 has size "
                              f"{s0[i]} there, the reference size is {s1[i]} and the offset "
                              f"{o} (shapes {list(s0)} and {list(s1)})",
                              hint="lower the offset, or crop to a smaller reference blob")
            off[i], shape[i] = o, s1[i]
        return off, shape

    def infer(self, attrs, in_types, param_types):
        _, shape = self.plan(attrs, in_types[0].shape, in_types[1].shape)
        return [in_types[0].with_shape(shape)]

    def forward(self, attrs, inputs, params, ctx):
        x = inputs[0]
        off, shape = self.plan(attrs, x.shape, inputs[1].shape)
        idx = tuple(slice(o, o + s) for o, s in zip(off, shape))
        return [np.array(x[idx], dtype=np.float32)]

    def grad_inputs(self, attrs, n_inputs):
        return [True, False]   # bottom 1 only gives a shape

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False] * len(need_inputs), [False]    # shapes only

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """The top's gradient at the crop window of bottom 0, zeros elsewhere."""
        x, dy = inputs[0], grad_outputs[0]
        dx = np.zeros_like(x)
        if need_inputs[0] and dy is not None:
            off, shape = self.plan(attrs, x.shape, inputs[1].shape)
            dx[tuple(slice(o, o + s) for o, s in zip(off, shape))] = dy
        return [dx if need_inputs[0] else None, None], []

    grad_cost = _move_grad_cost

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(0, 2 * sum(t.nbytes for t in out_types))


# ---------------------------------------------------------------------------------------
@register
class Silence(Op):
    """Swallow its bottoms (so they are not net outputs); no tops, no work."""
    type = "Silence"
    num_inputs = (1, None)
    num_outputs = 0
    differentiable = False   # no tops, so nothing of the loss flows through it

    def infer(self, attrs, in_types, param_types):
        return []

    def forward(self, attrs, inputs, params, ctx):
        return []

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(0, 0)


# ---------------------------------------------------------------------------------------
@register
class Tile(Op):
    """Repeat the block of axes ``axis``.. ``tiles`` times along ``axis`` (np.tile)."""
    type = "Tile"
    caffe_param = "tile_param"

    def from_caffe(self, layer, phase):
        p = layer.tile_param
        if not p.HasField("tiles"):
            raise OpError("Number of tiles must be specified", hint="add tile_param { tiles: N }")
        return {"axis": int(p.axis), "tiles": int(p.tiles)}

    def _check(self, attrs, rank):
        tiles = int(attrs["tiles"])
        if tiles <= 0:
            raise OpError(f"Number of tiles must be positive, got {tiles}",
                          hint="set tile_param tiles to 1 or more")
        return canonical_axis(int(attrs.get("axis", 1)), rank, "tile axis"), tiles

    def infer(self, attrs, in_types, param_types):
        t = in_types[0]
        axis, tiles = self._check(attrs, t.rank)
        shape = list(t.shape)
        shape[axis] *= tiles
        return [t.with_shape(shape)]

    def forward(self, attrs, inputs, params, ctx):
        x = inputs[0]
        axis, tiles = self._check(attrs, x.ndim)
        reps = [1] * x.ndim
        reps[axis] = tiles
        return [np.tile(x, reps).astype(np.float32, copy=False)]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [False]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """The sum of the top's gradient over the copies."""
        x, dy = inputs[0], grad_outputs[0]
        if not need_inputs[0]:
            return [None], []
        if dy is None:
            return [np.zeros_like(x)], []
        axis, tiles = self._check(attrs, x.ndim)
        outer = x.shape[:axis]
        blocks = dy.reshape(*outer, tiles, *x.shape[axis:])
        return [blocks.sum(axis=axis, dtype=x.dtype)], []

    grad_cost = _move_grad_cost

    def cost(self, attrs, in_types, param_types, out_types):
        return _move_cost(in_types, out_types)
