"""The Fused op (ops/fused.py): its steps' own infer/forward/cost run in turn."""
import numpy as np
import pytest

from graphc.errors import OpError
from graphc.ir import f32
from graphc.ops import Context, get_op

from test_passes_common import rel_l2

FUSED = get_op("Fused")
CONV = {"num_output": 4, "kernel": [3, 3], "stride": [1, 1], "pad": [1, 1],
        "dilation": [1, 1], "group": 1, "bias_term": True, "axis": 1}
SUM = {"operation": "SUM", "coeff": [1.0, 1.0], "stable_prod_grad": True}
BODY = [{"op": "Convolution", "name": "c", "attrs": CONV, "inputs": [0], "params": [0, 1]},
        {"op": "Eltwise", "name": "e", "attrs": SUM, "inputs": [1, "prev"], "params": []},
        {"op": "ReLU", "name": "r", "attrs": {"negative_slope": 0.1}, "inputs": ["prev"],
         "params": []}]


def naive_conv(x, w, b):
    """3x3, pad 1, stride 1, float64 loops."""
    n, c, h, wd = x.shape
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (1, 1), (1, 1)])
    y = np.zeros((n, w.shape[0], h, wd))
    for o in range(w.shape[0]):
        for i in range(h):
            for j in range(wd):
                y[:, o, i, j] = (xp[:, :, i:i + 3, j:j + 3] * w[o]).sum(axis=(1, 2, 3)) + b[o]
    return y


def test_forward_is_the_steps_in_turn(rng):
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    r = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    (y,) = FUSED.forward({"body": BODY}, [x, r], [w, b], Context())
    s = naive_conv(x, w, b) + r
    want = np.where(s > 0, s, 0.1 * s)
    assert y.dtype == np.float32 and y.shape == want.shape
    assert rel_l2(y, want) <= 1e-6


def test_infer_and_cost():
    ins, ps = [f32(2, 3, 5, 5), f32(2, 4, 5, 5)], [f32(4, 3, 3, 3), f32(4)]
    (out,) = FUSED.infer({"body": BODY}, ins, ps)
    assert out == f32(2, 4, 5, 5)
    c = FUSED.cost({"body": BODY}, ins, ps, [out])
    conv = get_op("Convolution").cost(CONV, ins[:1], ps, [out])
    elt = get_op("Eltwise").cost(SUM, [out, out], [], [out])
    relu = get_op("ReLU").cost({"negative_slope": 0.1}, [out], [], [out])
    assert c.flops == conv.flops + elt.flops + relu.flops
    # inputs + params + output; the conv result and the sum are never stored
    assert c.bytes == 4 * (2 * 3 * 25 + 2 * 4 * 25 + 4 * 27 + 4 + 2 * 4 * 25)


def test_inplace_inputs():
    ins, ps = [f32(2, 3, 5, 5), f32(2, 4, 5, 5)], [f32(4, 3, 3, 3), f32(4)]
    assert FUSED.inplace_inputs({"body": BODY}, ins, ps) == [1]   # the shortcut, not the conv input
    chain = [{"op": "TanH", "inputs": [0]},
             {"op": "ReLU", "attrs": {"negative_slope": 0.0}, "inputs": ["prev"]}]
    assert FUSED.inplace_inputs({"body": chain}, [f32(3)], []) == [0]
    pool = [{"op": "LRN", "attrs": {"local_size": 3, "alpha": 1.0, "beta": 0.75, "k": 1.0,
                                    "norm_region": "ACROSS_CHANNELS"}, "inputs": [0]},
            {"op": "ReLU", "attrs": {"negative_slope": 0.0}, "inputs": ["prev"]}]
    assert FUSED.inplace_inputs({"body": pool}, [f32(1, 4, 3, 3)], []) == []


def test_each_step_has_its_own_state(rng):
    body = [{"op": "Dropout", "name": "d1", "attrs": {"dropout_ratio": 0.5, "train": True},
             "inputs": [0]},
            {"op": "Dropout", "name": "d2", "attrs": {"dropout_ratio": 0.5, "train": True},
             "inputs": ["prev"]}]
    ctx = Context("train", rng)

    class N:
        name = "f"
    ctx.node = N()
    x = np.ones((50,), np.float32)
    (y,) = FUSED.forward({"body": body}, [x], [], ctx)
    m1, m2 = ctx._state["f/d1"]["mask"], ctx._state["f/d2"]["mask"]
    np.testing.assert_array_equal(y, x * m1 * m2 * 4)
    assert ctx.node.name == "f"


@pytest.mark.parametrize("body,match", [
    ([], "non-empty"),
    ([{"op": "ReLU", "attrs": {"negative_slope": 0.0}, "inputs": ["prev"]}], "first"),
    ([{"op": "ReLU", "attrs": {"negative_slope": 0.0}, "inputs": [3]}], "reads input 3"),
    ([{"op": "Nope", "inputs": [0]}], "unknown layer type"),
    ([{"op": "TanH", "inputs": [0]}, {"op": "TanH", "inputs": [0]}], "does not read"),
    ([{"op": "TanH", "inputs": [0], "params": [0]}], "uses param 0"),
])
def test_malformed_bodies(body, match):
    with pytest.raises(OpError, match=match):
        FUSED.infer({"body": body}, [f32(3)], [])


def test_unused_input_and_step_shape_error():
    with pytest.raises(OpError, match="read by no step"):
        FUSED.infer({"body": [{"op": "TanH", "inputs": [0]}]}, [f32(3), f32(3)], [])
    bad = [{"op": "Eltwise", "attrs": SUM, "inputs": [0, 1]}]
    with pytest.raises(OpError, match="Fused step 0"):
        FUSED.infer({"body": bad}, [f32(3), f32(4)], [])
