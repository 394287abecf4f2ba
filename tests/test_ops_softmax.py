"""Softmax, ArgMax, Accuracy, Reduction against naive float64 loops on fresh random data."""
import itertools
import math

import numpy as np
import pytest
from google.protobuf import text_format

from graphc.errors import OpError
from graphc.ir.types import TensorType
from graphc.ops import Context, get_op


def run(op_type, attrs, inputs):
    op = get_op(op_type)
    types = op.infer(attrs, [TensorType.of(x) for x in inputs], [])
    outs = op.forward(attrs, inputs, [], Context())
    assert len(outs) == len(types)
    for o, t in zip(outs, types):
        assert o.dtype == np.float32
        assert o.shape == t.shape
    return outs


def rel_err(got, want):
    want = np.asarray(want, np.float64)
    assert not np.isnan(want).any(), "the naive reference left elements unwritten"
    assert np.asarray(got).shape == want.shape
    return np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30)


def layer(text):
    from graphc.frontend import caffe_pb2
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def lines_along(shape, axis):
    """Index tuples with ``None`` at ``axis``: one per 1-D line along that axis."""
    others = [range(d) if i != axis else [None] for i, d in enumerate(shape)]
    return itertools.product(*others)


def at(idx, axis, k):
    j = list(idx)
    j[axis] = k
    return tuple(j)


# ---- Softmax ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((2, 5, 3, 4), 1), ((2, 5, 3, 4), -1),
                                        ((3, 7), 1), ((4, 3, 2), 0)])
def test_softmax(rng, shape, axis):
    x = (rng.standard_normal(shape) * 5).astype(np.float32)
    x.reshape(-1)[0] = 80.0            # exp(80) overflows float32 without the max shift
    (y,) = run("Softmax", {"axis": axis}, [x])
    a = axis % len(shape)
    want = np.full(shape, np.nan)
    for idx in lines_along(shape, a):
        vals = [float(x[at(idx, a, k)]) for k in range(shape[a])]
        m = max(vals)
        s = sum(math.exp(v - m) for v in vals)
        for k, v in enumerate(vals):
            want[at(idx, a, k)] = math.exp(v - m) / s
    assert rel_err(y, want) < 1e-6


def test_softmax_from_caffe():
    assert get_op("Softmax").from_caffe(layer('type: "Softmax"'), "test") == {"axis": 1}
    assert get_op("Softmax").from_caffe(layer('type: "Softmax" softmax_param { axis: 2 }'),
                                        "test") == {"axis": 2}


# ---- ArgMax -----------------------------------------------------------------------------

def ranked(pairs, k):
    """Caffe: partial_sort of (value, index) pairs with std::greater."""
    return sorted(pairs, reverse=True)[:k]


@pytest.mark.parametrize("top_k,out_max_val", [(1, False), (3, False), (1, True), (4, True)])
def test_argmax_flat(rng, top_k, out_max_val):
    shape = (3, 2, 2, 3)
    x = rng.integers(-3, 4, shape).astype(np.float32)       # many ties
    (y,) = run("ArgMax", {"top_k": top_k, "out_max_val": out_max_val, "axis": None}, [x])
    want = np.full((3, 2 if out_max_val else 1, top_k, 1), np.nan)
    for n in range(3):
        flat = [float(v) for v in x[n].ravel()]
        best = ranked([(v, j) for j, v in enumerate(flat)], top_k)
        for j, (v, i) in enumerate(best):
            want[n, 0, j, 0] = i
            if out_max_val:
                want[n, 1, j, 0] = v
    assert np.array_equal(y, want)


def test_argmax_flat_2d_has_three_axes(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    (y,) = run("ArgMax", {"top_k": 2, "out_max_val": False, "axis": None}, [x])
    assert y.shape == (4, 1, 2)
    assert np.array_equal(y[:, 0, 0], np.argmax(x, axis=1).astype(np.float32))


@pytest.mark.parametrize("axis,top_k,out_max_val", [(1, 1, False), (1, 2, True), (-1, 3, False),
                                                     (0, 2, False), (2, 1, True)])
def test_argmax_axis(rng, axis, top_k, out_max_val):
    shape = (3, 4, 5)
    x = rng.integers(-2, 3, shape).astype(np.float32)
    (y,) = run("ArgMax", {"top_k": top_k, "out_max_val": out_max_val, "axis": axis}, [x])
    a = axis % 3
    out_shape = list(shape)
    out_shape[a] = top_k
    want = np.full(out_shape, np.nan)
    for idx in lines_along(shape, a):
        best = ranked([(float(x[at(idx, a, k)]), k) for k in range(shape[a])], top_k)
        for j, (v, i) in enumerate(best):
            want[at(idx, a, j)] = v if out_max_val else i
    assert np.array_equal(y, want)


def test_argmax_errors():
    op = get_op("ArgMax")
    with pytest.raises(OpError, match="top_k"):
        op.infer({"top_k": 5, "out_max_val": False, "axis": 1}, [TensorType((2, 4))], [])
    with pytest.raises(OpError, match="top_k"):
        op.infer({"top_k": 13, "out_max_val": False, "axis": None}, [TensorType((2, 3, 4))], [])
    with pytest.raises(OpError, match="less than 1"):
        op.infer({"top_k": 0, "out_max_val": False, "axis": None}, [TensorType((2, 3))], [])
    a = op.from_caffe(layer('type: "ArgMax"'), "test")
    assert a == {"out_max_val": False, "top_k": 1, "axis": None}
    a = op.from_caffe(layer('type: "ArgMax" argmax_param { out_max_val: true top_k: 3 axis: 0 }'),
                      "test")
    assert a == {"out_max_val": True, "top_k": 3, "axis": 0}


# ---- Accuracy ---------------------------------------------------------------------------

def naive_accuracy(x, labels, axis, top_k, ignore):
    shape = x.shape
    classes = shape[axis]
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    xs = x.reshape(outer, classes, inner).astype(np.float64)
    lab = labels.reshape(outer, inner)
    hits = count = 0
    per_hit, per_n = [0] * classes, [0] * classes
    for o in range(outer):
        for i in range(inner):
            lv = int(lab[o, i])
            if ignore is not None and lv == ignore:
                continue
            count += 1
            per_n[lv] += 1
            true = xs[o, lv, i]
            better = sum(1 for c in range(classes) if c != lv and xs[o, c, i] >= true)
            if better < top_k:
                hits += 1
                per_hit[lv] += 1
    acc = hits / count if count else 0.0
    return acc, [h / n if n else 0.0 for h, n in zip(per_hit, per_n)]


@pytest.mark.parametrize("shape,axis,top_k,ignore", [
    ((20, 6), 1, 1, None), ((20, 6), 1, 3, None), ((20, 6), 1, 2, 4),
    ((3, 5, 2, 4), 1, 1, 0), ((3, 5, 2, 4), 1, 2, None), ((4, 3, 5), -1, 2, None),
    ((6, 4), 1, 1, -1),
])
def test_accuracy(rng, shape, axis, top_k, ignore):
    x = rng.integers(-3, 4, shape).astype(np.float32)   # ties: they count against
    a = axis % len(shape)
    lshape = shape[:a] + shape[a + 1:]
    labels = rng.integers(0, shape[a], lshape).astype(np.float32)
    if ignore == -1:
        labels.reshape(-1)[::3] = -1
    acc, per = run("Accuracy", {"top_k": top_k, "axis": axis, "ignore_label": ignore,
                                "num_top": 2}, [x, labels])
    want_acc, want_per = naive_accuracy(x, labels, a, top_k, ignore)
    assert acc.shape == () and per.shape == (shape[a],)
    assert abs(float(acc) - want_acc) < 1e-6
    assert np.allclose(per, want_per, atol=1e-6)
    # one top only
    (acc1,) = run("Accuracy", {"top_k": top_k, "axis": axis, "ignore_label": ignore,
                               "num_top": 1}, [x, labels])
    assert acc1 == acc


def test_accuracy_all_ignored_is_zero(rng):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    labels = np.full(4, 2, np.float32)
    (acc,) = run("Accuracy", {"top_k": 1, "axis": 1, "ignore_label": 2, "num_top": 1},
                 [x, labels])
    assert float(acc) == 0.0


def test_accuracy_errors():
    op = get_op("Accuracy")
    with pytest.raises(OpError, match="Number of labels"):
        op.infer({"top_k": 1, "axis": 1, "num_top": 1},
                 [TensorType((2, 3, 4)), TensorType((2, 3))], [])
    with pytest.raises(OpError, match="number of classes"):
        op.infer({"top_k": 4, "axis": 1, "num_top": 1}, [TensorType((2, 3)), TensorType((2,))],
                 [])
    with pytest.raises(OpError, match="out of range"):
        op.forward({"top_k": 1, "axis": 1, "num_top": 1},
                   [np.zeros((2, 3), np.float32), np.array([0, 3], np.float32)], [], Context())


def test_accuracy_from_caffe():
    op = get_op("Accuracy")
    a = op.from_caffe(layer('type: "Accuracy" top: "acc"'), "test")
    assert a == {"top_k": 1, "axis": 1, "ignore_label": None, "num_top": 1}
    a = op.from_caffe(layer('type: "Accuracy" top: "a" top: "b" '
                            'accuracy_param { top_k: 5 axis: 2 ignore_label: 255 }'), "test")
    assert a == {"top_k": 5, "axis": 2, "ignore_label": 255, "num_top": 2}


# ---- Reduction --------------------------------------------------------------------------

@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis,coeff", [(0, 1.0), (1, 0.5), (-1, -2.0), (2, 3.0)])
def test_reduction(rng, operation, axis, coeff):
    shape = (2, 3, 4)
    x = rng.standard_normal(shape).astype(np.float32)
    (y,) = run("Reduction", {"operation": operation, "axis": axis, "coeff": coeff}, [x])
    a = axis % 3
    assert y.shape == shape[:a]
    want = np.full(shape[:a], np.nan)
    for idx in itertools.product(*(range(d) for d in shape[:a])):
        vals = [float(x[idx + rest]) for rest in
                itertools.product(*(range(d) for d in shape[a:]))]
        if operation == "SUM":
            r = sum(vals)
        elif operation == "ASUM":
            r = sum(abs(v) for v in vals)
        elif operation == "SUMSQ":
            r = sum(v * v for v in vals)
        else:
            r = sum(vals) / len(vals)
        want[idx] = coeff * r
    assert rel_err(y, want) < 1e-6


def test_reduction_from_caffe():
    op = get_op("Reduction")
    assert op.from_caffe(layer('type: "Reduction"'), "test") == \
        {"operation": "SUM", "axis": 0, "coeff": 1.0}
    a = op.from_caffe(layer('type: "Reduction" reduction_param { operation: SUMSQ axis: 1 '
                            'coeff: 0.5 }'), "test")
    assert a == {"operation": "SUMSQ", "axis": 1, "coeff": 0.5}
    with pytest.raises(OpError, match="operation"):
        op.infer({"operation": "MAX", "axis": 0}, [TensorType((2,))], [])
