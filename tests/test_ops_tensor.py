"""Data-movement ops (Concat, Slice, Split, Flatten, Reshape, Crop, Silence, Tile) against
naive element-by-element float64 loops on fresh random data."""
import itertools

import numpy as np
import pytest
from google.protobuf import text_format

from graphc.errors import OpError
from graphc.ir.types import TensorType
from graphc.ops import Context, get_op


def run(op_type, attrs, inputs):
    """infer + forward; checks forward's shapes against infer's and the dtype."""
    op = get_op(op_type)
    types = op.infer(attrs, [TensorType.of(x) for x in inputs], [])
    outs = op.forward(attrs, inputs, [], Context())
    assert len(outs) == len(types)
    for o, t in zip(outs, types):
        assert o.dtype == np.float32
        assert o.shape == t.shape
    return outs


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def nan_array(shape):
    return np.full(shape, np.nan)


def assert_same(got, want):
    """``want`` was filled element by element starting from NaN: every element must have
    been written, and the op's output must match it exactly (pure data movement)."""
    assert not np.isnan(want).any(), "the naive reference left elements unwritten"
    assert got.shape == want.shape
    assert np.array_equal(got.astype(np.float64), want)


def layer(text):
    from graphc.frontend import caffe_pb2
    return text_format.Parse(text, caffe_pb2.LayerParameter())


# ---- Concat -----------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -3])
def test_concat(rng, axis):
    base = [2, 3, 4, 5]
    a = axis % 4
    sizes = [int(s) for s in rng.integers(1, 4, size=3)]
    xs = []
    for s in sizes:
        shape = list(base)
        shape[a] = s
        xs.append(rand(rng, *shape))
    (y,) = run("Concat", {"axis": axis}, xs)
    out_shape = list(base)
    out_shape[a] = sum(sizes)
    want = nan_array(out_shape)
    start = 0
    for x in xs:
        for idx in itertools.product(*(range(d) for d in x.shape)):
            j = list(idx)
            j[a] += start
            want[tuple(j)] = x[idx]
        start += x.shape[a]
    assert_same(y, want)


def test_concat_single_bottom(rng):
    x = rand(rng, 2, 3)
    (y,) = run("Concat", {"axis": 1}, [x])
    assert np.array_equal(y, x)


def test_concat_mismatch_names_shapes():
    op = get_op("Concat")
    with pytest.raises(OpError) as e:
        op.infer({"axis": 1}, [TensorType((2, 3, 4, 4)), TensorType((2, 5, 4, 3))], [])
    assert "[2, 3, 4, 4]" in str(e.value) and "[2, 5, 4, 3]" in str(e.value)
    assert e.value.hint
    with pytest.raises(OpError, match="number of axes"):
        op.infer({"axis": 1}, [TensorType((2, 3, 4)), TensorType((2, 3))], [])
    with pytest.raises(OpError, match="out of range"):
        op.infer({"axis": 4}, [TensorType((2, 3, 4, 4))] * 2, [])


def test_concat_from_caffe():
    op = get_op("Concat")
    assert op.from_caffe(layer('type: "Concat"'), "test") == {"axis": 1}
    assert op.from_caffe(layer('type: "Concat" concat_param { axis: -2 }'), "test") == {"axis": -2}
    assert op.from_caffe(layer('type: "Concat" concat_param { concat_dim: 0 }'),
                         "test") == {"axis": 0}
    with pytest.raises(OpError, match="both"):
        op.from_caffe(layer('type: "Concat" concat_param { axis: 1 concat_dim: 1 }'), "test")


# ---- Slice ------------------------------------------------------------------------------

def naive_slice(x, axis, sizes):
    outs, start = [], 0
    for s in sizes:
        shape = list(x.shape)
        shape[axis] = s
        o = nan_array(shape)
        for idx in itertools.product(*(range(d) for d in shape)):
            j = list(idx)
            j[axis] += start
            o[idx] = x[tuple(j)]
        outs.append(o)
        start += s
    return outs


@pytest.mark.parametrize("axis,points,n_top,sizes", [
    (1, [2, 3], 3, [2, 1, 4]),        # shape[1] = 7
    (-1, [1], 2, [1, 4]),             # shape[3] = 5
    (0, [], 3, [2, 2, 2]),            # shape[0] = 6, equal split
    (2, [], 2, [2, 2]),               # shape[2] = 4
    (1, [], 1, [7]),
])
def test_slice(rng, axis, points, n_top, sizes):
    x = rand(rng, 6, 7, 4, 5)
    outs = run("Slice", {"axis": axis, "slice_point": points, "num_top": n_top}, [x])
    for got, want in zip(outs, naive_slice(x, axis % 4, sizes), strict=True):
        assert_same(got, want)


def test_slice_errors():
    op = get_op("Slice")
    t = [TensorType((2, 6, 3))]
    with pytest.raises(OpError, match="evenly divide"):
        op.infer({"axis": 1, "slice_point": [], "num_top": 4}, t, [])
    with pytest.raises(OpError, match="one slice_point fewer|slice_point"):
        op.infer({"axis": 1, "slice_point": [2], "num_top": 3}, t, [])
    with pytest.raises(OpError, match="increasing"):
        op.infer({"axis": 1, "slice_point": [3, 3], "num_top": 3}, t, [])
    with pytest.raises(OpError, match="beyond"):
        op.infer({"axis": 1, "slice_point": [2, 7], "num_top": 3}, t, [])
    with pytest.raises(OpError, match="only 3"):
        op.infer({"axis": 2, "slice_point": [], "num_top": 4}, [TensorType((2, 6, 3))], [])


def test_slice_from_caffe():
    op = get_op("Slice")
    a = op.from_caffe(layer('type: "Slice" top: "a" top: "b" top: "c" '
                            'slice_param { slice_dim: 2 slice_point: 1 slice_point: 3 }'), "test")
    assert a == {"axis": 2, "slice_point": [1, 3], "num_top": 3}
    a = op.from_caffe(layer('type: "Slice" top: "a" top: "b"'), "test")
    assert a == {"axis": 1, "slice_point": [], "num_top": 2}


# ---- Split / Silence --------------------------------------------------------------------

def test_split(rng):
    x = rand(rng, 2, 3, 4)
    outs = run("Split", {"num_top": 3}, [x])
    assert len(outs) == 3
    for o in outs:
        assert np.array_equal(o, x)
    outs[0][0, 0, 0] += 1             # tops are independent buffers
    assert np.array_equal(outs[1], x)


def test_silence(rng):
    op = get_op("Silence")
    assert op.infer({}, [TensorType((2, 3)), TensorType((4,))], []) == []
    assert op.forward({}, [rand(rng, 2, 3)], [], Context()) == []
    op.check_arity(2, 0)
    with pytest.raises(OpError):
        op.check_arity(1, 1)


# ---- Flatten ----------------------------------------------------------------------------

@pytest.mark.parametrize("axis,end_axis,want_shape", [
    (1, -1, (2, 60)), (0, -1, (120,)), (2, 3, (2, 3, 20)), (1, 2, (2, 12, 5)),
    (-3, -2, (2, 12, 5)), (3, 3, (2, 3, 4, 5)), (0, 0, (2, 3, 4, 5)),
])
def test_flatten(rng, axis, end_axis, want_shape):
    x = rand(rng, 2, 3, 4, 5)
    (y,) = run("Flatten", {"axis": axis, "end_axis": end_axis}, [x])
    assert y.shape == want_shape
    # row-major order is kept: walk both in order
    want = nan_array(want_shape)
    flat_in = [x[idx] for idx in itertools.product(*(range(d) for d in x.shape))]
    for k, idx in enumerate(itertools.product(*(range(d) for d in want_shape))):
        want[idx] = flat_in[k]
    assert_same(y, want)


def test_flatten_errors():
    op = get_op("Flatten")
    with pytest.raises(OpError, match="before"):
        op.infer({"axis": 2, "end_axis": 1}, [TensorType((2, 3, 4))], [])
    with pytest.raises(OpError, match="out of range"):
        op.infer({"axis": 3, "end_axis": -1}, [TensorType((2, 3, 4))], [])


# ---- Reshape ----------------------------------------------------------------------------

@pytest.mark.parametrize("bottom,shape,axis,num_axes,want", [
    ((2, 3, 4, 5), [0, -1], 0, -1, (2, 60)),
    ((2, 3, 4, 5), [-1], 0, -1, (120,)),
    ((2, 3, 4, 5), [0, 0, 0, 0], 0, -1, (2, 3, 4, 5)),
    ((2, 3, 4, 5), [6, -1, 2], 0, -1, (6, 10, 2)),
    ((2, 3, 4, 5), [0, 3, 20], 0, -1, (2, 3, 20)),
    ((2, 3, 4, 5), [0, -1, 0], 0, -1, (2, 15, 4)),    # 0 copies from its own position
    ((2, 8), [2, 2, 2], 1, -1, (2, 2, 2, 2)),           # partial: axes from 1 on
    ((2, 8), [1, 1], 0, 0, (1, 1, 2, 8)),               # insert axes at the front
    ((2, 8), [1], -1, 0, (2, 8, 1)),                    # axis -1: after the last axis
    ((2, 3, 4, 5), [-1], 1, 2, (2, 12, 5)),             # replace axes 1..2
    ((2, 3, 4, 5), [0, 2, 2], 1, 2, (2, 3, 2, 2, 5)),   # 0 copies bottom axis 1
    ((2, 3, 4, 5), [-1, 5], -2, 1, (2, 3, 4, 1, 5)),    # axis -2 = position 3
    ((2, 3, 4, 5), [], 1, 0, (2, 3, 4, 5)),
])
def test_reshape(rng, bottom, shape, axis, num_axes, want):
    x = rand(rng, *bottom)
    (y,) = run("Reshape", {"shape": shape, "axis": axis, "num_axes": num_axes}, [x])
    assert y.shape == want
    assert np.array_equal(y.ravel(), x.ravel())


@pytest.mark.parametrize("bottom,shape,axis,num_axes,msg", [
    ((2, 3, 4), [-1, -1], 0, -1, "multiple -1"),
    ((2, 3, 4), [0, 0, 0, 0], 0, -1, "no corresponding bottom axis"),
    ((2, 3, 4), [5, -1], 0, -1, "divisible"),
    ((2, 3, 4), [5, 5], 0, -1, "count must match"),
    ((2, 3, 4), [2, -2, 12], 0, -1, "invalid dimension"),
    ((2, 3, 4), [24], 4, -1, "out of range"),
    ((2, 3, 4), [24], -5, -1, "out of range"),
    ((2, 3, 4), [12], 1, 3, "out of range"),
    ((2, 3, 4), [12], 1, -2, "num_axes"),
])
def test_reshape_errors(bottom, shape, axis, num_axes, msg):
    with pytest.raises(OpError, match=msg) as e:
        get_op("Reshape").infer({"shape": shape, "axis": axis, "num_axes": num_axes},
                                [TensorType(bottom)], [])
    assert e.value.hint


def test_reshape_from_caffe():
    op = get_op("Reshape")
    a = op.from_caffe(layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } '
                            'axis: 1 num_axes: 2 }'), "test")
    assert a == {"shape": [0, -1], "axis": 1, "num_axes": 2}
    with pytest.raises(OpError, match="multiple -1"):
        op.from_caffe(layer('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }'),
                      "test")


# ---- Crop -------------------------------------------------------------------------------

@pytest.mark.parametrize("axis,offset", [
    (2, []), (2, [1]), (2, [2, 1]), (1, [1, 0, 2]), (-1, [3]), (0, [1]), (1, [2]),
])
def test_crop(rng, axis, offset):
    x = rand(rng, 3, 5, 6, 7)
    ref = np.zeros((2, 3, 4, 4), np.float32)
    (y,) = run("Crop", {"axis": axis, "offset": offset}, [x, ref])
    a = axis % 4
    out_shape = [x.shape[i] if i < a else ref.shape[i] for i in range(4)]
    off = [0] * 4
    for i in range(a, 4):
        off[i] = offset[0] if len(offset) == 1 else (offset[i - a] if offset else 0)
    want = nan_array(out_shape)
    for idx in itertools.product(*(range(d) for d in out_shape)):
        want[idx] = x[tuple(i + o for i, o in zip(idx, off))]
    assert_same(y, want)


def test_crop_errors():
    op = get_op("Crop")
    t = [TensorType((1, 3, 8, 8)), TensorType((1, 3, 6, 6))]
    with pytest.raises(OpError, match="out of bounds") as e:
        op.infer({"axis": 2, "offset": [3]}, t, [])
    assert "offset 3" in str(e.value)
    with pytest.raises(OpError, match="offset values"):
        op.infer({"axis": 1, "offset": [1, 1]}, t, [])
    with pytest.raises(OpError, match="number of axes"):
        op.infer({"axis": 2, "offset": []}, [TensorType((1, 3, 8, 8)), TensorType((6, 6))], [])
    # a reference larger than the input
    with pytest.raises(OpError, match="out of bounds"):
        op.infer({"axis": 2, "offset": []}, [t[1], t[0]], [])


def test_crop_from_caffe():
    a = get_op("Crop").from_caffe(layer('type: "Crop" crop_param { axis: 1 offset: 2 '
                                        'offset: 3 offset: 4 }'), "test")
    assert a == {"axis": 1, "offset": [2, 3, 4]}
    assert get_op("Crop").from_caffe(layer('type: "Crop"'), "test") == {"axis": 2, "offset": []}


# ---- Tile -------------------------------------------------------------------------------

@pytest.mark.parametrize("axis,tiles", [(1, 3), (0, 2), (-1, 2), (2, 1)])
def test_tile(rng, axis, tiles):
    x = rand(rng, 2, 3, 4)
    (y,) = run("Tile", {"axis": axis, "tiles": tiles}, [x])
    a = axis % 3
    outer = int(np.prod(x.shape[:a]))
    inner = int(np.prod(x.shape[a:]))
    xf = x.reshape(outer, inner)
    want = nan_array((outer, tiles * inner))
    for o in range(outer):
        for t in range(tiles):
            for i in range(inner):
                want[o, t * inner + i] = xf[o, i]
    shape = list(x.shape)
    shape[a] *= tiles
    assert_same(y, want.reshape(shape))


def test_tile_errors():
    op = get_op("Tile")
    with pytest.raises(OpError, match="positive"):
        op.infer({"axis": 1, "tiles": 0}, [TensorType((2, 3))], [])
    with pytest.raises(OpError, match="must be specified"):
        op.from_caffe(layer('type: "Tile" tile_param { axis: 1 }'), "test")
    assert op.from_caffe(layer('type: "Tile" tile_param { tiles: 4 }'),
                         "test") == {"axis": 1, "tiles": 4}
