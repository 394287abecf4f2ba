"""Activation ops against naive float64 loops on fresh random data."""
import math

import numpy as np
import pytest

from graphc.errors import OpError
from graphc.ir.types import TensorType, f32
from graphc.ops import Context, get_op
from graphc.ops.activation import TRANSCENDENTAL_FLOPS

SHAPE = (2, 3, 4, 5)


# ---- input generators (float32) ------------------------------------------------------

def normal(scale=2.0):
    return lambda rng, shape: (rng.standard_normal(shape) * scale).astype(np.float32)


def uniform(lo, hi):
    return lambda rng, shape: rng.uniform(lo, hi, shape).astype(np.float32)


def with_value(gen, value):
    """gen's data with every 7th element set exactly to ``value`` (tests ties like x == t)."""
    def g(rng, shape):
        x = gen(rng, shape)
        x.reshape(-1)[::7] = np.float32(value)
        return x
    return g


# ---- naive float64 references, one element at a time -----------------------------------

def naive_exp(x, a):
    base = math.e if a["base"] == -1 else a["base"]
    return base ** (a["shift"] + a["scale"] * x)


def naive_log(x, a):
    v = a["shift"] + a["scale"] * x
    return math.log(v) if a["base"] == -1 else math.log(v) / math.log(a["base"])


NAIVE = {
    "ReLU": lambda x, a: x if x > 0 else a["negative_slope"] * x,
    "ELU": lambda x, a: x if x > 0 else a["alpha"] * (math.exp(x) - 1),
    "Sigmoid": lambda x, a: 1 / (1 + math.exp(-x)),
    "TanH": lambda x, a: math.tanh(x),
    "AbsVal": lambda x, a: abs(x),
    "Power": lambda x, a: math.pow(a["shift"] + a["scale"] * x, a["power"]),
    "Exp": naive_exp,
    "Log": naive_log,
    "BNLL": lambda x, a: max(x, 0.0) + math.log1p(math.exp(-abs(x))),
    "Threshold": lambda x, a: 1.0 if x > a["threshold"] else 0.0,
    "Dropout": lambda x, a: x,
}

# (type, attrs, input generator)
CASES = [
    ("ReLU", {"negative_slope": 0.0}, with_value(normal(), 0.0)),
    ("ReLU", {"negative_slope": 0.1}, normal()),
    ("ReLU", {"negative_slope": -2.5}, normal()),
    ("ELU", {"alpha": 1.0}, normal()),
    ("ELU", {"alpha": 0.3}, normal(4.0)),
    ("Sigmoid", {}, normal(4.0)),
    ("TanH", {}, normal()),
    ("AbsVal", {}, normal()),
    ("Power", {"power": 1.0, "scale": 1.0, "shift": 0.0}, normal()),
    ("Power", {"power": 2.0, "scale": 0.5, "shift": 1.0}, normal()),
    ("Power", {"power": 0.5, "scale": 2.0, "shift": 3.0}, uniform(-1.4, 4.0)),
    ("Power", {"power": -1.5, "scale": -1.0, "shift": 5.0}, uniform(-3.0, 4.0)),
    ("Power", {"power": 3.0, "scale": 0.0, "shift": 2.0}, normal()),     # ignores x: 8
    ("Power", {"power": 0.0, "scale": 3.0, "shift": -1.0}, normal()),    # ignores x: 1
    ("Exp", {"base": -1.0, "scale": 1.0, "shift": 0.0}, normal()),
    ("Exp", {"base": 2.0, "scale": 0.5, "shift": 1.0}, normal()),
    ("Exp", {"base": -1.0, "scale": -1.5, "shift": 0.5}, normal()),
    ("Exp", {"base": 0.25, "scale": 1.0, "shift": -2.0}, normal()),
    ("Log", {"base": -1.0, "scale": 1.0, "shift": 0.0}, uniform(0.01, 10.0)),
    ("Log", {"base": 10.0, "scale": 2.0, "shift": 3.0}, uniform(-1.4, 5.0)),
    ("Log", {"base": 2.0, "scale": -0.5, "shift": 0.0}, uniform(-9.0, -0.1)),
    ("BNLL", {}, normal(3.0)),
    ("BNLL", {}, normal(40.0)),                       # large |x|: the stable form matters
    ("Threshold", {"threshold": 0.0}, with_value(normal(), 0.0)),
    ("Threshold", {"threshold": 0.3}, with_value(normal(), 0.3)),
    ("Dropout", {"dropout_ratio": 0.5, "train": False}, normal()),
]


def rel_l2(y, ref):
    ref = np.asarray(ref, dtype=np.float64)
    assert np.linalg.norm(ref) > 0, "reference is all zeros: the comparison proves nothing"
    return np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref)


def as_from_caffe(attrs):
    """Float attrs rounded to float32, as they arrive from the protobuf's float fields."""
    return {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in attrs.items()}


def case_id(case):
    t, attrs, _ = case
    return t + "".join(f"-{k}={v}" for k, v in attrs.items() if k != "train")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_against_naive(case, rng):
    type_, attrs, gen = case
    attrs = as_from_caffe(attrs)
    op = get_op(type_)
    x = gen(rng, SHAPE)
    assert op.infer(attrs, [f32(SHAPE)], []) == [f32(SHAPE)]
    assert op.param_specs(attrs, [f32(SHAPE)]) == []
    assert op.inplace_ok
    (y,) = op.forward(attrs, [x], [], Context("test", rng))
    ref = np.array([NAIVE[type_](float(v), attrs) for v in x.reshape(-1)]).reshape(SHAPE)
    assert y.dtype == np.float32 and y.shape == SHAPE
    assert np.isfinite(y).all()             # every element written, none garbage
    assert y is not x
    assert rel_l2(y, ref) < 1e-5
    c = op.cost(attrs, [f32(SHAPE)], [], [f32(SHAPE)])
    assert c.bytes == 2 * f32(SHAPE).nbytes
    assert 0 <= c.flops <= 3 * TRANSCENDENTAL_FLOPS * x.size


def test_threshold_is_strict(rng):
    x = np.array([0.3, np.nextafter(np.float32(0.3), np.float32(1)), -1, 5], np.float32)
    (y,) = get_op("Threshold").forward({"threshold": 0.3}, [x], [], Context())
    assert y.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_caffe_special_values():
    ctx = Context()
    x = np.array([-np.inf, np.inf, np.nan, -1.0, 2.0], np.float32)
    # ReLU is max(x,0) + slope*min(x,0): 0 * -inf is NaN, as in Caffe
    (y,) = get_op("ReLU").forward({"negative_slope": 0.0}, [x], [], ctx)
    assert np.isnan(y[0]) and y[1] == np.inf and np.isnan(y[2]) and y[3] == 0 and y[4] == 2
    # Power with power*scale == 0 never looks at x
    (y,) = get_op("Power").forward({"power": 2.0, "scale": 0.0, "shift": 3.0}, [x], [], ctx)
    assert (y == 9).all()
    # BNLL is finite and exact at the extremes of float32's exp range
    x = np.array([-100, -50, 50, 100], np.float32)
    (y,) = get_op("BNLL").forward({}, [x], [], ctx)
    assert np.all(np.isfinite(y)) and y[2] == 50 and y[3] == 100 and 0 <= y[0] < 1e-30


# ---- PReLU ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 6), (1, 2, 7)])
@pytest.mark.parametrize("shared", [False, True])
def test_prelu(shape, shared, rng):
    op = get_op("PReLU")
    attrs = {"channel_shared": shared, "filler": {"type": "constant", "value": 0.25}}
    (spec,) = op.param_specs(attrs, [f32(shape)])
    assert spec.shape == (() if shared else (shape[1],))
    assert spec.filler == {"type": "constant", "value": 0.25}
    slope = rng.uniform(-1, 1, spec.shape).astype(np.float32)
    assert op.infer(attrs, [f32(shape)], [f32(spec.shape)]) == [f32(shape)]
    x = normal()(rng, shape)
    (y,) = op.forward(attrs, [x], [slope], Context())
    ref = np.empty(shape)
    for idx in np.ndindex(*shape):
        a = float(slope) if shared else float(slope[idx[1]])
        v = float(x[idx])
        ref[idx] = v if v > 0 else a * v
    assert y.dtype == np.float32 and y.shape == shape and np.isfinite(y).all()
    assert rel_l2(y, ref) < 1e-6


def test_prelu_errors():
    op = get_op("PReLU")
    attrs = {"channel_shared": False, "filler": {"type": "constant", "value": 0.25}}
    with pytest.raises(OpError) as e:
        op.infer(attrs, [f32(2, 3, 4)], [f32(4)])
    assert "[4]" in str(e.value) and "[3]" in str(e.value) and e.value.hint
    with pytest.raises(OpError) as e:
        op.param_specs(attrs, [f32(5)])
    assert "2 axes" in str(e.value) and e.value.hint
    shared = dict(attrs, channel_shared=True)
    assert op.infer(shared, [f32(2, 3)], [f32(1)]) == [f32(2, 3)]   # count 1 is fine
    with pytest.raises(OpError):
        op.infer(shared, [f32(2, 3)], [f32(3)])


# ---- Dropout ---------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.5, 0.2, 0.9])
def test_dropout_train_statistics(ratio, rng):
    op = get_op("Dropout")
    attrs = {"dropout_ratio": ratio, "train": True}
    ctx = Context("train", np.random.default_rng(rng.integers(2 ** 32)))
    x = rng.uniform(0.5, 2.0, (50, 40, 50)).astype(np.float32)
    (y,) = op.forward(attrs, [x], [], ctx)
    mask = ctx.state["mask"]
    assert mask.shape == x.shape and set(np.unique(mask)) <= {0.0, 1.0}
    kept = mask == 1
    n = x.size
    sigma = math.sqrt(ratio * (1 - ratio) / n)
    assert abs(kept.mean() - (1 - ratio)) < 5 * sigma
    assert (y[~kept] == 0).all()
    scale = np.float32(1.0 / (1.0 - ratio))
    assert ctx.state["scale"] == scale
    np.testing.assert_array_equal(y[kept], x[kept] * scale)
    assert rel_l2(y[kept], x[kept].astype(np.float64) / (1 - ratio)) < 1e-6
    # the expectation is preserved
    assert abs(y.mean() / x.mean() - 1) < 10 * sigma / (1 - ratio)
    # a new mask on every forward
    (y2,) = op.forward(attrs, [x], [], ctx)
    assert not np.array_equal(ctx.state["mask"], mask)


def test_dropout_test_is_identity_and_errors(rng):
    op = get_op("Dropout")
    x = normal()(rng, SHAPE)
    ctx = Context("test", rng)
    (y,) = op.forward({"dropout_ratio": 0.7, "train": False}, [x], [], ctx)
    np.testing.assert_array_equal(y, x)
    assert "mask" not in ctx.state
    assert op.cost({"dropout_ratio": 0.7, "train": False}, [f32(SHAPE)], [],
                   [f32(SHAPE)]).flops == 0
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(OpError) as e:
            op.infer({"dropout_ratio": bad, "train": True}, [f32(SHAPE)], [])
        assert e.value.hint


# ---- attribute errors ------------------------------------------------------------------

@pytest.mark.parametrize("type_,attrs", [
    ("Exp", {"base": 0.0, "scale": 1.0, "shift": 0.0}),
    ("Exp", {"base": -2.0, "scale": 1.0, "shift": 0.0}),
    ("Log", {"base": -0.5, "scale": 1.0, "shift": 0.0}),
    ("Log", {"base": 1.0, "scale": 1.0, "shift": 0.0}),
    ("Log", {"base": float("inf"), "scale": 1.0, "shift": 0.0}),
])
def test_bad_base(type_, attrs):
    with pytest.raises(OpError) as e:
        get_op(type_).infer(attrs, [f32(SHAPE)], [])
    assert "base" in str(e.value) and e.value.hint


def test_neuron_rejects_params_and_arity():
    with pytest.raises(OpError):
        get_op("ReLU").infer({"negative_slope": 0.0}, [f32(SHAPE)], [f32(3)])
    with pytest.raises(OpError):
        get_op("TanH").infer({}, [f32(SHAPE), f32(SHAPE)], [])


def test_costs():
    t = f32(SHAPE)
    n = t.numel
    assert get_op("ReLU").cost({"negative_slope": 0.0}, [t], [], [t]).flops == n
    assert get_op("TanH").cost({}, [t], [], [t]).flops == TRANSCENDENTAL_FLOPS * n
    exp_plain = get_op("Exp").cost({"base": -1.0, "scale": 1.0, "shift": 0.0}, [t], [], [t])
    exp_full = get_op("Exp").cost({"base": 2.0, "scale": 3.0, "shift": 1.0}, [t], [], [t])
    assert exp_plain.flops == TRANSCENDENTAL_FLOPS * n
    assert exp_full.flops == (TRANSCENDENTAL_FLOPS + 2) * n
    drop = get_op("Dropout").cost({"dropout_ratio": 0.5, "train": True}, [t], [], [t])
    assert drop.bytes == 3 * t.nbytes
    p = TensorType((3,))
    assert get_op("PReLU").cost({"channel_shared": False}, [t], [p], [t]).bytes == \
        2 * t.nbytes + p.nbytes


# ---- from_caffe (needs the generated schema) --------------------------------------------

FROM_CAFFE = [
    ('type: "ReLU"', "test", {"negative_slope": 0.0}),
    ('type: "ReLU" relu_param { negative_slope: 0.5 }', "test", {"negative_slope": 0.5}),
    ('type: "PReLU"', "test",
     {"channel_shared": False, "filler": {"type": "constant", "value": 0.25}}),
    ('type: "ELU"', "test", {"alpha": 1.0}),
    ('type: "ELU" elu_param { alpha: 0.5 }', "test", {"alpha": 0.5}),
    ('type: "Sigmoid"', "test", {}),
    ('type: "TanH"', "test", {}),
    ('type: "AbsVal"', "test", {}),
    ('type: "BNLL"', "test", {}),
    ('type: "Power"', "test", {"power": 1.0, "scale": 1.0, "shift": 0.0}),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: -1 }', "test",
     {"power": 2.0, "scale": 0.5, "shift": -1.0}),
    ('type: "Exp"', "test", {"base": -1.0, "scale": 1.0, "shift": 0.0}),
    ('type: "Log" log_param { base: 10 }', "test", {"base": 10.0, "scale": 1.0, "shift": 0.0}),
    ('type: "Threshold"', "test", {"threshold": 0.0}),
    ('type: "Threshold" threshold_param { threshold: 0.5 }', "test", {"threshold": 0.5}),
    ('type: "Dropout"', "train", {"dropout_ratio": 0.5, "train": True}),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.25 }', "test",
     {"dropout_ratio": 0.25, "train": False}),
]


@pytest.mark.parametrize("text,phase,want", FROM_CAFFE)
def test_from_caffe(text, phase, want):
    caffe_pb2 = pytest.importorskip("graphc.frontend.caffe_pb2")
    from google.protobuf import text_format
    layer = text_format.Parse(text, caffe_pb2.LayerParameter())
    assert get_op(layer.type).from_caffe(layer, phase) == want


def test_from_caffe_prelu_filler():
    caffe_pb2 = pytest.importorskip("graphc.frontend.caffe_pb2")
    from google.protobuf import text_format
    layer = text_format.Parse('type: "PReLU" prelu_param { channel_shared: true '
                              'filler { type: "gaussian" std: 0.1 } }',
                              caffe_pb2.LayerParameter())
    attrs = get_op("PReLU").from_caffe(layer, "test")
    assert attrs["channel_shared"] is True
    assert attrs["filler"]["type"] == "gaussian"
    assert attrs["filler"]["std"] == pytest.approx(0.1)
