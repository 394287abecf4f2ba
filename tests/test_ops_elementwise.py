"""Eltwise, Scale and Bias against naive float64 loops on fresh random data."""
import math

import numpy as np
import pytest

from graphc.errors import OpError
from graphc.ir.types import f32
from graphc.ops import Context, get_op
from graphc.ops.elementwise import eltwise_max


def rel_l2(y, ref):
    ref = np.asarray(ref, dtype=np.float64)
    assert np.linalg.norm(ref) > 0, "reference is all zeros: the comparison proves nothing"
    return np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref)


def randn(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---- Eltwise -------------------------------------------------------------------------

def naive_eltwise(op, coeff, xs):
    shape = xs[0].shape
    out = np.empty(shape)
    for idx in np.ndindex(*shape):
        vals = [float(x[idx]) for x in xs]
        if op == "SUM":
            out[idx] = sum(c * v for c, v in zip(coeff, vals))
        elif op == "PROD":
            out[idx] = math.prod(vals)
        else:
            out[idx] = max(vals)
    return out


ELTWISE_CASES = [
    ("SUM", [1.0, 1.0], (2, 3, 4, 5)),
    ("SUM", [0.5, -2.0, 3.0], (2, 3, 4, 5)),
    ("SUM", [], (6, 7)),                       # empty coeff means all 1
    ("PROD", [1.0, 1.0], (2, 3, 4, 5)),
    ("PROD", [1.0, 1.0, 1.0, 1.0], (3, 8)),
    ("MAX", [1.0, 1.0], (2, 3, 4, 5)),
    ("MAX", [1.0, 1.0, 1.0], (5, 2, 3)),
]


@pytest.mark.parametrize("operation,coeff,shape", ELTWISE_CASES)
def test_eltwise(operation, coeff, shape, rng):
    op = get_op("Eltwise")
    n = len(coeff) or 2
    attrs = {"operation": operation, "coeff": coeff, "stable_prod_grad": True}
    types = [f32(shape)] * n
    assert op.infer(attrs, types, []) == [f32(shape)]
    assert op.param_specs(attrs, types) == []
    xs = [randn(rng, shape) for _ in range(n)]
    (y,) = op.forward(attrs, xs, [], Context())
    ref = naive_eltwise(operation, coeff or [1.0] * n, xs)
    assert y.dtype == np.float32 and y.shape == shape and np.isfinite(y).all()
    assert rel_l2(y, ref) < 1e-6
    c = op.cost(attrs, types, [], [f32(shape)])
    assert c.bytes == (n + 1) * f32(shape).nbytes
    assert c.flops >= (n - 1) * f32(shape).numel


def test_eltwise_max_ties_follow_caffe():
    a = np.array([1, 2, 3, 3], np.float32)
    b = np.array([1, 1, 4, 3], np.float32)
    c = np.array([1, 5, 4, 3], np.float32)
    top, idx = eltwise_max([a, b, c])
    assert top.tolist() == [1, 5, 4, 3]
    # bottoms 0/1 tie -> 1 (Caffe's `a > b ? a : b`); later ties keep the earlier index
    assert idx.tolist() == [1, 2, 1, 1]


def test_eltwise_shape_mismatch():
    op = get_op("Eltwise")
    attrs = {"operation": "SUM", "coeff": [1.0, 1.0], "stable_prod_grad": True}
    with pytest.raises(OpError) as e:
        op.infer(attrs, [f32(2, 3, 4, 4), f32(2, 3, 4, 5)], [])
    msg = str(e.value)
    assert "[2, 3, 4, 4]" in msg and "[2, 3, 4, 5]" in msg and e.value.hint


@pytest.mark.parametrize("attrs,n", [
    ({"operation": "SUM", "coeff": [1.0, 2.0, 3.0], "stable_prod_grad": True}, 2),
    ({"operation": "PROD", "coeff": [2.0, 1.0], "stable_prod_grad": True}, 2),
    ({"operation": "MIN", "coeff": [], "stable_prod_grad": True}, 2),
    ({"operation": "SUM", "coeff": [], "stable_prod_grad": True}, 1),
])
def test_eltwise_bad_attrs(attrs, n):
    with pytest.raises(OpError) as e:
        get_op("Eltwise").infer(attrs, [f32(2, 3)] * n, [])
    assert e.value.hint


# ---- Scale / Bias ----------------------------------------------------------------------

def naive_broadcast(x, factor, axis, fn):
    """y[i] = fn(x[i], factor[i[axis:axis+k]]), with Caffe's axis rule (scalar: any axis)."""
    k = factor.ndim
    ax = 0 if k == 0 else axis % x.ndim
    out = np.empty(x.shape)
    for idx in np.ndindex(*x.shape):
        out[idx] = fn(float(x[idx]), float(factor[idx[ax:ax + k]]))
    return out


# (x shape, axis, num_axes, expected learned shape)
LEARNED = [
    ((2, 3, 4, 5), 1, 1, (3,)),
    ((2, 3, 4, 5), 1, 2, (3, 4)),
    ((2, 3, 4, 5), 0, -1, (2, 3, 4, 5)),
    ((2, 3, 4, 5), 2, -1, (4, 5)),
    ((2, 3, 4, 5), -1, 1, (5,)),
    ((2, 3, 4, 5), 1, 0, ()),
    ((6, 7), 1, 1, (7,)),
    ((6, 7), 0, 1, (6,)),
]


def scale_attrs(axis, num_axes, bias_term):
    return {"axis": axis, "num_axes": num_axes, "bias_term": bias_term,
            "filler": {"type": "constant", "value": 1.0},
            "bias_filler": {"type": "constant", "value": 0.0}}


@pytest.mark.parametrize("bias_term", [False, True])
@pytest.mark.parametrize("shape,axis,num_axes,want", LEARNED)
def test_scale_learned(shape, axis, num_axes, want, bias_term, rng):
    op = get_op("Scale")
    attrs = scale_attrs(axis, num_axes, bias_term)
    specs = op.param_specs(attrs, [f32(shape)])
    assert [s.shape for s in specs] == [want] * (2 if bias_term else 1)
    assert specs[0].filler == attrs["filler"]
    if bias_term:
        assert specs[1].filler == attrs["bias_filler"]
    ptypes = [f32(s.shape) for s in specs]
    assert op.infer(attrs, [f32(shape)], ptypes) == [f32(shape)]
    x = randn(rng, shape)
    params = [randn(rng, s.shape) for s in specs]
    (y,) = op.forward(attrs, [x], params, Context())
    ref = naive_broadcast(x, params[0], axis, lambda a, b: a * b)
    if bias_term:
        ref = naive_broadcast(ref, params[1], axis, lambda a, b: a + b)
    assert y.dtype == np.float32 and y.shape == shape and np.isfinite(y).all()
    assert rel_l2(y, ref) < 1e-6
    c = op.cost(attrs, [f32(shape)], ptypes, [f32(shape)])
    assert c.flops == x.size * (2 if bias_term else 1)


# (x shape, axis, bottom-1 shape)
TWO_BOTTOMS = [
    ((2, 3, 4, 5), 1, (3,)),
    ((2, 3, 4, 5), 1, (3, 4)),
    ((2, 3, 4, 5), 1, (3, 4, 5)),
    ((2, 3, 4, 5), 0, (2, 3)),
    ((2, 3, 4, 5), -1, (5,)),
    ((2, 3, 4, 5), 3, ()),        # a scalar: axis is ignored
    ((2, 3, 4, 5), 1, ()),
]


@pytest.mark.parametrize("bias_term", [False, True])
@pytest.mark.parametrize("shape,axis,sshape", TWO_BOTTOMS)
def test_scale_two_bottoms(shape, axis, sshape, bias_term, rng):
    op = get_op("Scale")
    attrs = scale_attrs(axis, 1, bias_term)       # num_axes is unused with two bottoms
    types = [f32(shape), f32(sshape)]
    specs = op.param_specs(attrs, types)
    assert [s.shape for s in specs] == ([sshape] if bias_term else [])
    ptypes = [f32(s.shape) for s in specs]
    assert op.infer(attrs, types, ptypes) == [f32(shape)]
    x, s = randn(rng, shape), randn(rng, sshape)
    params = [randn(rng, p.shape) for p in specs]
    (y,) = op.forward(attrs, [x, s], params, Context())
    ref = naive_broadcast(x, s, axis, lambda a, b: a * b)
    if bias_term:
        ref = naive_broadcast(ref, params[0], axis, lambda a, b: a + b)
    assert y.dtype == np.float32 and y.shape == shape and np.isfinite(y).all()
    assert rel_l2(y, ref) < 1e-6


def test_scale_scalar_bottom_ignores_axis(rng):
    """Caffe sets axis 0 for a scalar scale without checking 'axis' (two bottoms, no bias);
    its inner BiasLayer (bias_term) does check it."""
    op = get_op("Scale")
    x, s = randn(rng, (2, 3)), randn(rng, ())
    attrs = scale_attrs(7, 1, False)
    assert op.infer(attrs, [f32(2, 3), f32()], []) == [f32(2, 3)]
    (y,) = op.forward(attrs, [x, s], [], Context())
    assert rel_l2(y, x.astype(np.float64) * float(s)) < 1e-6
    _raises(lambda: op.param_specs(scale_attrs(7, 1, True), [f32(2, 3), f32()]), "axis")


def _raises(fn, *needles):
    with pytest.raises(OpError) as e:
        fn()
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert e.value.hint
    return e.value


def test_scale_errors():
    op = get_op("Scale")
    x = f32(2, 3, 4, 5)
    a = scale_attrs(1, 1, False)
    # bottom 1 does not match bottom 0 at axis 1
    _raises(lambda: op.infer(a, [x, f32(4)], []), "[4]", "[2, 3, 4, 5]")
    _raises(lambda: op.infer(a, [x, f32(3, 5)], []), "[3, 5]", "[2, 3, 4, 5]")
    # extends past the end
    _raises(lambda: op.infer(scale_attrs(3, 1, False), [x, f32(5, 1)], []), "[5, 1]")
    # a learned scale of the wrong shape
    _raises(lambda: op.infer(a, [x], [f32(4)]), "[4]", "[3]")
    # a missing bias blob
    _raises(lambda: op.infer(scale_attrs(1, 1, True), [x], [f32(3)]), "2")
    # num_axes too large / invalid, axis out of range
    _raises(lambda: op.param_specs(scale_attrs(2, 3, False), [x]), "num_axes")
    _raises(lambda: op.param_specs(scale_attrs(1, -2, False), [x]), "num_axes")
    _raises(lambda: op.param_specs(scale_attrs(4, 1, False), [x]), "axis")


BIAS_CASES = [  # (x shape, axis, num_axes, bottom-1 shape or None for a learned bias)
    ((2, 3, 4, 5), 1, 1, None),
    ((2, 3, 4, 5), 2, -1, None),
    ((2, 3, 4, 5), 0, 0, None),
    ((2, 3, 4, 5), 1, 1, (3, 4)),
    ((2, 3, 4, 5), -2, 1, (4, 5)),
    ((2, 3, 4, 5), 1, 1, ()),
]


@pytest.mark.parametrize("shape,axis,num_axes,bshape", BIAS_CASES)
def test_bias(shape, axis, num_axes, bshape, rng):
    op = get_op("Bias")
    attrs = {"axis": axis, "num_axes": num_axes, "filler": {"type": "constant", "value": 0.0}}
    types = [f32(shape)] + ([f32(bshape)] if bshape is not None else [])
    specs = op.param_specs(attrs, types)
    ptypes = [f32(s.shape) for s in specs]
    assert len(specs) == (0 if bshape is not None else 1)
    assert op.infer(attrs, types, ptypes) == [f32(shape)]
    x = randn(rng, shape)
    b = randn(rng, bshape if bshape is not None else specs[0].shape)
    inputs, params = ([x, b], []) if bshape is not None else ([x], [b])
    (y,) = op.forward(attrs, inputs, params, Context())
    ref = naive_broadcast(x, b, axis, lambda u, v: u + v)
    assert y.dtype == np.float32 and y.shape == shape and np.isfinite(y).all()
    assert rel_l2(y, ref) < 1e-6
    assert op.cost(attrs, types, ptypes, [f32(shape)]).flops == x.size


def test_bias_errors():
    op = get_op("Bias")
    attrs = {"axis": 1, "num_axes": 1, "filler": {"type": "constant", "value": 0.0}}
    x = f32(2, 3, 4, 5)
    _raises(lambda: op.infer(attrs, [x, f32(4)], []), "[4]", "[2, 3, 4, 5]")
    _raises(lambda: op.infer(attrs, [x], [f32(3, 4)]), "[3, 4]", "[3]")
    _raises(lambda: op.infer(attrs, [x, f32(3)], [f32(3)]), "0")


# ---- from_caffe (needs the generated schema) --------------------------------------------

def parse(text):
    caffe_pb2 = pytest.importorskip("graphc.frontend.caffe_pb2")
    from google.protobuf import text_format
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def test_from_caffe_eltwise():
    op = get_op("Eltwise")
    layer = parse('type: "Eltwise" bottom: "a" bottom: "b" bottom: "c"')
    assert op.from_caffe(layer, "test") == {"operation": "SUM", "coeff": [1.0, 1.0, 1.0],
                                            "stable_prod_grad": True}
    layer = parse('type: "Eltwise" bottom: "a" bottom: "b" '
                  'eltwise_param { operation: SUM coeff: 1 coeff: -1 }')
    assert op.from_caffe(layer, "test")["coeff"] == [1.0, -1.0]
    layer = parse('type: "Eltwise" bottom: "a" bottom: "b" eltwise_param { operation: MAX }')
    assert op.from_caffe(layer, "train")["operation"] == "MAX"
    layer = parse('type: "Eltwise" bottom: "a" bottom: "b" '
                  'eltwise_param { operation: PROD coeff: 1 coeff: 1 }')
    _raises(lambda: op.from_caffe(layer, "test"), "PROD")
    layer = parse('type: "Eltwise" bottom: "a" bottom: "b" eltwise_param { coeff: 2 }')
    _raises(lambda: op.from_caffe(layer, "test"), "coeff")


def test_from_caffe_scale_bias_defaults():
    attrs = get_op("Scale").from_caffe(parse('type: "Scale"'), "test")
    assert attrs["axis"] == 1 and attrs["num_axes"] == 1 and attrs["bias_term"] is False
    assert attrs["filler"] == {"type": "constant", "value": 1.0}
    assert attrs["bias_filler"]["type"] == "constant" and attrs["bias_filler"]["value"] == 0
    attrs = get_op("Scale").from_caffe(parse(
        'type: "Scale" scale_param { axis: 0 num_axes: -1 bias_term: true '
        'filler { type: "constant" value: 2 } bias_filler { type: "constant" value: 3 } }'),
        "test")
    assert (attrs["axis"], attrs["num_axes"], attrs["bias_term"]) == (0, -1, True)
    assert attrs["filler"]["value"] == 2 and attrs["bias_filler"]["value"] == 3
    attrs = get_op("Bias").from_caffe(parse('type: "Bias"'), "test")
    assert attrs["axis"] == 1 and attrs["num_axes"] == 1
    assert attrs["filler"]["type"] == "constant" and attrs["filler"]["value"] == 0
    attrs = get_op("Bias").from_caffe(parse('type: "Bias" bias_param { axis: 2 num_axes: 2 '
                                            'filler { type: "gaussian" } }'), "test")
    assert (attrs["axis"], attrs["num_axes"], attrs["filler"]["type"]) == (2, 2, "gaussian")
