"""Softmax, ArgMax, Accuracy and Reduction: ops that work along (or across) an axis."""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpError
from .base import Cost, Op, canonical_axis, register


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Caffe's softmax in float32: subtract the max along ``axis``, exp, divide by the sum."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32, copy=False)


def labels_as_int(labels: np.ndarray) -> np.ndarray:
    """Caffe reads labels as ``static_cast<int>(float)``: truncation toward zero."""
    return np.trunc(np.asarray(labels, dtype=np.float64)).astype(np.int64)


# ---------------------------------------------------------------------------------------
@register
class Softmax(Op):
    type = "Softmax"
    caffe_param = "softmax_param"

    def from_caffe(self, layer, phase):
        return {"axis": int(layer.softmax_param.axis)}

    def infer(self, attrs, in_types, param_types):
        canonical_axis(int(attrs.get("axis", 1)), in_types[0].rank, "softmax axis")
        return [in_types[0]]

    def forward(self, attrs, inputs, params, ctx):
        axis = canonical_axis(int(attrs.get("axis", 1)), inputs[0].ndim, "softmax axis")
        return [softmax(inputs[0], axis)]

    def backward_uses_outputs(self, attrs):
        return True

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [True]

    def backward_inplace_ok(self, attrs):
        return True     # the row sums first, then elementwise

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: ``dx = (dy - sum(dy * y along axis)) * y``."""
        if not need_inputs[0]:
            return [None], []
        y, dy = outputs[0], grad_outputs[0]
        if dy is None:
            return [np.zeros_like(inputs[0])], []
        axis = canonical_axis(int(attrs.get("axis", 1)), y.ndim, "softmax axis")
        dot = (dy * y).sum(axis=axis, keepdims=True, dtype=y.dtype)
        return [((dy - dot) * y).astype(y.dtype, copy=False)], []

    def cost(self, attrs, in_types, param_types, out_types):
        # max, subtract, exp, sum, divide: about 5 per element
        n = in_types[0].numel
        return Cost(flops=5 * n, bytes=in_types[0].nbytes + out_types[0].nbytes)


# ---------------------------------------------------------------------------------------
@register
class ArgMax(Op):
    """Indices (as floats) of the ``top_k`` largest values.

    Without ``axis`` Caffe flattens each example (all axes after the first) and the top has
    max(rank, 3) axes, all 1 except (N, 1 or 2, top_k): with ``out_max_val`` channel 0
    holds the indices and channel 1 the values.  With ``axis`` the top is the bottom's shape
    with that axis replaced by ``top_k``, holding the indices, or the values if
    ``out_max_val``.  Ties: Caffe sorts (value, index) pairs descending, so among equal
    values the larger index comes first."""
    type = "ArgMax"
    caffe_param = "argmax_param"
    differentiable = False

    def from_caffe(self, layer, phase):
        p = layer.argmax_param
        return {"out_max_val": bool(p.out_max_val), "top_k": int(p.top_k),
                "axis": int(p.axis) if p.HasField("axis") else None}

    def _check(self, attrs, shape):
        rank = len(shape)
        top_k = int(attrs.get("top_k", 1))
        if top_k < 1:
            raise OpError(f"top k must not be less than 1, got {top_k}", hint="set top_k >= 1")
        axis = attrs.get("axis")
        if axis is not None:
            axis = canonical_axis(int(axis), rank, "argmax axis")
            if top_k > shape[axis]:
                raise OpError(f"top_k ({top_k}) must be less than or equal to the dimension of "
                              f"the axis ({shape[axis]}, bottom shape {list(shape)})",
                              hint=f"use top_k <= {shape[axis]}")
        else:
            if rank < 1:
                raise OpError("ArgMax needs a bottom with at least one axis",
                              hint="feed it a blob of shape (N, ...)")
            per = math.prod(shape[1:])
            if top_k > per:
                raise OpError(f"top_k ({top_k}) must be less than or equal to the dimension of "
                              f"the flattened bottom blob per instance ({per}, bottom shape "
                              f"{list(shape)})", hint=f"use top_k <= {per}")
        return axis, top_k

    def out_shape(self, attrs, shape):
        axis, top_k = self._check(attrs, shape)
        if axis is not None:
            out = list(shape)
            out[axis] = top_k
            return out
        out = [1] * max(len(shape), 3)
        out[0] = shape[0]
        out[1] = 2 if attrs.get("out_max_val", False) else 1
        out[2] = top_k
        return out

    def infer(self, attrs, in_types, param_types):
        t = in_types[0]
        return [t.with_shape(self.out_shape(attrs, t.shape))]

    @staticmethod
    def _top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Along the last axis: (indices, values) of the k largest, larger index first
        among equal values."""
        d = x.shape[-1]
        rev = x[..., ::-1]                                   # larger index first ...
        order = np.argsort(-rev, axis=-1, kind="stable")[..., :k]   # ... kept by a stable sort
        idx = d - 1 - order
        return idx, np.take_along_axis(x, idx, axis=-1)

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        axis, top_k = self._check(attrs, x.shape)
        out_max = bool(attrs.get("out_max_val", False))
        out_shape = self.out_shape(attrs, x.shape)
        if axis is not None:
            idx, val = self._top_k(np.moveaxis(x, axis, -1), top_k)
            res = val if out_max else idx
            return [np.moveaxis(res, -1, axis).astype(np.float32).reshape(out_shape)]
        idx, val = self._top_k(x.reshape(x.shape[0], -1), top_k)
        res = np.stack([idx, val], axis=1) if out_max else idx[:, None, :]
        return [res.astype(np.float32).reshape(out_shape)]

    def cost(self, attrs, in_types, param_types, out_types):
        n = in_types[0].numel
        k = int(attrs.get("top_k", 1))
        return Cost(flops=n * max(1, math.ceil(math.log2(k + 1))),
                    bytes=in_types[0].nbytes + out_types[0].nbytes)


# ---------------------------------------------------------------------------------------
@register
class Accuracy(Op):
    """Top-k classification accuracy; a scalar (shape ()) top, and optionally a second top
    of shape (C,) with the accuracy per class.

    Scores have the class along ``axis``; labels hold ``outer * inner`` values (outer =
    axes before ``axis``, inner = axes after).  A prediction is correct when fewer than
    ``top_k`` classes *other than the true one* score >= the true class (ties count against).
    Labels equal to ``ignore_label`` are skipped; with no counted label the accuracy is 0;
    a class that never occurs has per-class accuracy 0."""
    type = "Accuracy"
    caffe_param = "accuracy_param"
    differentiable = False
    num_inputs = 2
    num_outputs = (1, 2)

    def from_caffe(self, layer, phase):
        p = layer.accuracy_param
        return {"top_k": int(p.top_k), "axis": int(p.axis),
                "ignore_label": int(p.ignore_label) if p.HasField("ignore_label") else None,
                "num_top": len(layer.top)}

    def _dims(self, attrs, s0, s1):
        axis = canonical_axis(int(attrs.get("axis", 1)), len(s0), "accuracy axis")
        outer, classes, inner = math.prod(s0[:axis]), s0[axis], math.prod(s0[axis + 1:])
        top_k = int(attrs.get("top_k", 1))
        count0, count1 = math.prod(s0), math.prod(s1)
        if count1 == 0 or top_k > count0 // count1:
            raise OpError(f"top_k ({top_k}) must be less than or equal to the number of classes "
                          f"({count0 // count1 if count1 else 0}; scores {list(s0)}, labels "
                          f"{list(s1)})", hint="lower accuracy_param top_k")
        if outer * inner != count1:
            raise OpError(f"Number of labels must match number of predictions: scores "
                          f"{list(s0)} with label axis {axis} need {outer * inner} labels, "
                          f"got shape {list(s1)}",
                          hint="e.g. for scores (N, C, H, W) and axis 1 the label count must "
                               "be N*H*W, with integer values in {0, ..., C-1}")
        return axis, outer, classes, inner

    def infer(self, attrs, in_types, param_types):
        axis, _, classes, _ = self._dims(attrs, in_types[0].shape, in_types[1].shape)
        outs = [in_types[0].with_shape(())]
        if int(attrs.get("num_top", 1)) > 1:
            outs.append(in_types[0].with_shape((classes,)))
        return outs

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        axis, outer, classes, inner = self._dims(attrs, x.shape, inputs[1].shape)
        scores = x.reshape(outer, classes, inner)
        labels = labels_as_int(inputs[1]).reshape(outer, inner)
        ignore = attrs.get("ignore_label")
        valid = np.ones_like(labels, dtype=bool) if ignore is None else labels != int(ignore)
        lv = labels[valid]
        if lv.size and (lv.min() < 0 or lv.max() >= classes):
            bad = lv[(lv < 0) | (lv >= classes)][0]
            raise OpError(f"Accuracy: label {bad} is out of range for {classes} classes",
                          hint="labels must be in [0, C-1], or equal to ignore_label")
        o, i = np.nonzero(valid)
        true = scores[o, lv, i]                                   # (n_valid,)
        n_ge = (scores[o, :, i] >= true[:, None]).sum(axis=1)     # includes the true class
        correct = n_ge <= int(attrs.get("top_k", 1))
        count = lv.size
        acc = np.float32(correct.sum()) / np.float32(count) if count else np.float32(0)
        outs = [np.array(acc, dtype=np.float32)]
        if int(attrs.get("num_top", 1)) > 1:
            hits = np.bincount(lv[correct], minlength=classes).astype(np.float32)
            seen = np.bincount(lv, minlength=classes).astype(np.float32)
            per = np.zeros(classes, np.float32)
            np.divide(hits, seen, out=per, where=seen > 0)
            outs.append(per)
        return outs

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=in_types[0].numel,
                    bytes=sum(t.nbytes for t in (*in_types, *out_types)))


# ---------------------------------------------------------------------------------------
REDUCTION_OPS = ("SUM", "ASUM", "SUMSQ", "MEAN")   # Caffe enum values 1..4


@register
class Reduction(Op):
    """Reduce all axes from ``axis`` on (the top has shape bottom.shape[:axis]; axis 0
    gives a scalar) with SUM, ASUM (sum of |x|), SUMSQ (sum of x^2) or MEAN, times
    ``coeff``."""
    type = "Reduction"
    caffe_param = "reduction_param"

    def from_caffe(self, layer, phase):
        p = layer.reduction_param
        op = int(p.operation)
        if not 1 <= op <= 4:
            raise OpError(f"unknown reduction operation {op}",
                          hint="use SUM, ASUM, SUMSQ or MEAN")
        return {"operation": REDUCTION_OPS[op - 1], "axis": int(p.axis),
                "coeff": float(p.coeff)}

    def _axis(self, attrs, rank):
        op = attrs.get("operation", "SUM")
        if op not in REDUCTION_OPS:
            raise OpError(f"unknown reduction operation {op!r}",
                          hint="use SUM, ASUM, SUMSQ or MEAN")
        return canonical_axis(int(attrs.get("axis", 0)), rank, "reduction axis")

    def infer(self, attrs, in_types, param_types):
        t = in_types[0]
        return [t.with_shape(t.shape[:self._axis(attrs, t.rank)])]

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        axis = self._axis(attrs, x.ndim)
        num, dim = math.prod(x.shape[:axis]), math.prod(x.shape[axis:])
        v = x.reshape(num, dim).astype(np.float64)
        op = attrs.get("operation", "SUM")
        coeff = np.float32(attrs.get("coeff", 1.0))
        if op == "ASUM":
            v = np.abs(v)
        elif op == "SUMSQ":
            v = v * v
        if op == "MEAN":
            coeff = np.float32(coeff / np.float32(dim))   # Caffe: coeff_ /= dim in float
        r = (v.sum(axis=1) * np.float64(coeff)).astype(np.float32)
        return [r.reshape(x.shape[:axis])]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """x only for ASUM (its signs) and SUMSQ."""
        return [attrs.get("operation", "SUM") in ("ASUM", "SUMSQ")], [False]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe, with ``c = coeff * dy[i]`` for reduced row i: SUM ``c``; ASUM
        ``c * sign(x)``; SUMSQ ``2 c x``; MEAN ``c / dim``."""
        x, dy = inputs[0], grad_outputs[0]
        if not need_inputs[0]:
            return [None], []
        if dy is None:
            return [np.zeros_like(x)], []
        axis = self._axis(attrs, x.ndim)
        num = math.prod(x.shape[:axis])
        op = attrs.get("operation", "SUM")
        coeff = x.dtype.type(attrs.get("coeff", 1.0))
        rows = x.reshape(num, -1)
        if op == "MEAN":
            coeff = x.dtype.type(coeff / x.dtype.type(rows.shape[1]))
        c = (dy.reshape(num, 1) * coeff).astype(x.dtype)
        if op == "ASUM":
            dx = np.sign(rows) * c
        elif op == "SUMSQ":
            dx = (x.dtype.type(2) * c) * rows
        else:
            dx = np.broadcast_to(c, rows.shape)
        return [np.array(dx, dtype=x.dtype).reshape(x.shape)], []

    def cost(self, attrs, in_types, param_types, out_types):
        n = in_types[0].numel
        return Cost(flops=2 * n, bytes=in_types[0].nbytes + out_types[0].nbytes)
