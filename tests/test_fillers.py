"""Caffe's fillers (graphc/ops/fillers.py) and the ops built on them (Input, DummyData)."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from graphc.errors import OpError
from graphc.ops import get_op
from graphc.ops.base import Context
from graphc.ops.fillers import fill


def layer(text):
    from graphc.frontend import caffe_pb2
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def test_constant(rng):
    a = fill({"type": "constant", "value": 2.5}, (3, 4), rng)
    assert a.dtype == np.float32 and a.shape == (3, 4)
    assert np.all(a == 2.5)
    assert np.all(fill({}, (2,), rng) == 0)      # Caffe's default filler: constant 0


def test_uniform_statistics(rng):
    a = fill({"type": "uniform", "min": -2.0, "max": 6.0}, (200, 500), rng)
    assert a.min() >= -2 and a.max() <= 6
    assert abs(a.mean() - 2.0) < 0.05
    assert abs(a.std() - 8 / math.sqrt(12)) < 0.05


def test_gaussian_statistics(rng):
    a = fill({"type": "gaussian", "mean": 1.0, "std": 3.0}, (300, 400), rng)
    assert abs(a.mean() - 1.0) < 0.05
    assert abs(a.std() - 3.0) < 0.05


def test_gaussian_sparse_keeps_sparse_over_num_outputs(rng):
    # Caffe: each value is kept with probability sparse / shape[0]
    a = fill({"type": "gaussian", "std": 1.0, "sparse": 5}, (20, 50000), rng)
    frac = np.count_nonzero(a) / a.size
    assert abs(frac - 5 / 20) < 0.01
    kept = a[a != 0]
    assert abs(kept.std() - 1.0) < 0.02


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_xavier_fans(rng, norm):
    shape = (64, 16, 3, 3)              # fan_in = 16*9 = 144, fan_out = 64*9 = 576
    n = {"FAN_IN": 144, "FAN_OUT": 576, "AVERAGE": (144 + 576) / 2}[norm]
    a = fill({"type": "xavier", "variance_norm": norm}, shape, rng)
    bound = math.sqrt(3 / n)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound
    assert abs(a.std() / (bound / math.sqrt(3)) - 1) < 0.03


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_msra_fans(rng, norm):
    shape = (32, 48, 5, 5)              # fan_in = 48*25 = 1200, fan_out = 32*25 = 800
    n = {"FAN_IN": 1200, "FAN_OUT": 800, "AVERAGE": 1000}[norm]
    a = fill({"type": "msra", "variance_norm": norm}, shape, rng)
    assert abs(a.mean()) < 0.025 * math.sqrt(2 / n)
    assert abs(a.std() / math.sqrt(2 / n) - 1) < 0.03


def test_fans_of_2d_and_1d_blobs(rng):
    # InnerProduct weight (N, K): fan_in = K, fan_out = N; a 1-D blob: fan_out = count
    a = fill({"type": "msra", "variance_norm": "FAN_OUT"}, (400, 1000), rng)
    assert abs(a.std() / math.sqrt(2 / 400) - 1) < 0.03
    b = fill({"type": "msra", "variance_norm": "FAN_OUT"}, (40000,), rng)
    assert abs(b.std() / math.sqrt(2 / 40000) - 1) < 0.03
    c = fill({"type": "msra"}, (40000,), rng)          # fan_in = count / shape[0] = 1
    assert abs(c.std() / math.sqrt(2) - 1) < 0.03


def test_positive_unitball(rng):
    a = fill({"type": "positive_unitball"}, (7, 3, 4), rng)
    assert np.all(a >= 0)
    np.testing.assert_allclose(a.reshape(7, -1).sum(axis=1), 1.0, rtol=1e-5)
    assert len(np.unique(a)) > 50


def bilinear_naive(k):
    f = math.ceil(k / 2)
    c = (k - 1) / (2 * f)
    w = np.empty((k, k))
    for y in range(k):
        for x in range(k):
            w[y, x] = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
    return w


@pytest.mark.parametrize("k", [2, 3, 4, 5, 16])
def test_bilinear(rng, k):
    a = fill({"type": "bilinear"}, (3, 2, k, k), rng)
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(a[i, j], bilinear_naive(k), rtol=1e-6)
    if k == 4:   # the classic 2x upsampling kernel
        np.testing.assert_allclose(a[0, 0, 0], [0.0625, 0.1875, 0.1875, 0.0625], rtol=1e-6)


def test_compact_keeps_what_the_type_reads():
    from graphc.ops.fillers import DEFAULTS, compact
    full = dict(DEFAULTS)
    assert compact({**full, "type": "gaussian", "std": 0.01}) == {"type": "gaussian", "mean": 0.0,
                                                                 "std": 0.01}
    assert compact({**full, "type": "gaussian", "sparse": 3})["sparse"] == 3
    assert compact({**full, "type": "bilinear"}) == {"type": "bilinear"}
    assert compact({**full, "type": "msra"}) == {"type": "msra", "variance_norm": "FAN_IN"}


def test_errors(rng):
    with pytest.raises(OpError, match="unknown filler type 'gausian'"):
        fill({"type": "gausian"}, (2, 2), rng)
    with pytest.raises(OpError, match="square"):
        fill({"type": "bilinear"}, (1, 1, 3, 4), rng)
    with pytest.raises(OpError, match="sparse"):
        fill({"type": "uniform", "sparse": 3}, (2, 2), rng)
    with pytest.raises(OpError, match="empty"):
        fill({"type": "constant"}, (0, 2), rng)


# ---------------------------------------------------------------- Input / DummyData
def test_input_from_caffe_shapes():
    op = get_op("Input")
    one = layer('type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } }')
    attrs = op.from_caffe(one, "test")
    assert [t.shape for t in op.infer(attrs, [], [])] == [(2, 3), (2, 3)]
    each = layer('type: "Input" top: "a" top: "b" '
                 'input_param { shape { dim: 2 dim: 3 } shape { dim: 5 } }')
    attrs = op.from_caffe(each, "test")
    assert [t.shape for t in op.infer(attrs, [], [])] == [(2, 3), (5,)]
    with pytest.raises(OpError, match="2 times for 3 top"):
        op.from_caffe(layer('type: "Input" top: "a" top: "b" top: "c" '
                            'input_param { shape { dim: 1 } shape { dim: 2 } }'), "test")
    with pytest.raises(OpError, match="no shape"):
        op.from_caffe(layer('type: "Input" top: "a"'), "test")


def test_dummydata_shapes_and_fillers(rng):
    op = get_op("DummyData")
    lp = layer('type: "DummyData" top: "a" top: "b" dummy_data_param { '
               'shape { dim: 300 dim: 200 } shape { dim: 4 } '
               'data_filler { type: "gaussian" std: 2 } data_filler { type: "constant" value: 7 } }')
    attrs = op.from_caffe(lp, "train")
    assert [t.shape for t in op.infer(attrs, [], [])] == [(300, 200), (4,)]
    ctx = Context("train", rng)
    a, b = op.forward(attrs, [], [], ctx)
    assert abs(a.std() - 2) < 0.05 and np.all(b == 7)
    a2, _ = op.forward(attrs, [], [], ctx)
    assert not np.array_equal(a, a2)          # fresh values every forward


def test_dummydata_legacy_dims_and_shared_filler(rng):
    op = get_op("DummyData")
    lp = layer('type: "DummyData" top: "a" top: "b" dummy_data_param { '
               'num: 2 channels: 3 channels: 4 height: 5 width: 6 '
               'data_filler { type: "uniform" min: 1 max: 2 } }')
    attrs = op.from_caffe(lp, "test")
    assert [t.shape for t in op.infer(attrs, [], [])] == [(2, 3, 5, 6), (2, 4, 5, 6)]
    a, b = op.forward(attrs, [], [], Context("test", rng))
    assert a.min() >= 1 and b.max() <= 2 and a.dtype == np.float32
    default = op.from_caffe(layer('type: "DummyData" top: "z" '
                                  'dummy_data_param { shape { dim: 3 } }'), "test")
    assert np.all(op.forward(default, [], [], Context())[0] == 0)
    with pytest.raises(OpError, match="both shape and the legacy"):
        op.from_caffe(layer('type: "DummyData" top: "a" dummy_data_param { '
                            'num: 1 channels: 1 height: 1 width: 1 shape { dim: 1 } }'), "test")
    with pytest.raises(OpError, match="unknown filler"):
        op.from_caffe(layer('type: "DummyData" top: "a" dummy_data_param { '
                            'shape { dim: 1 } data_filler { type: "nope" } }'), "test")
    with pytest.raises(OpError, match="data_filler is given 2 times for 3"):
        op.from_caffe(layer('type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param { '
                            'shape { dim: 1 } data_filler { } data_filler { } }'), "test")
