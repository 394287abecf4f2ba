"""Gradient rules of every differentiable op, checked against float64 finite differences
(tests/gradcheck.py) on fresh random inputs kept away from kinks (ReLU at 0, ties in MAX
pooling/Eltwise MAX, hinge margins), plus hand-computed Caffe specifics."""
import sys
import uuid

import numpy as np
import pytest

from graphc.ops import Context, all_ops, get_op
from graphc.ops.base import Op

from gradcheck import check_op


def away_from_zero(rng, shape, lo=0.1, hi=1.0):
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(lo, hi, size=shape)


def distinct(rng, shape, step=0.05):
    """Values with gaps of ``step`` (no ties, no near-ties), shuffled."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) * step).reshape(shape)


def conv_attrs(**kw):
    a = {"num_output": 4, "bias_term": True, "kernel": [3, 3], "stride": [1, 1],
         "pad": [0, 0], "dilation": [1, 1], "group": 1, "axis": 1}
    a.update(kw)
    return a


def pool_attrs(**kw):
    a = {"pool": "MAX", "kernel": [3, 3], "stride": [2, 2], "pad": [0, 0],
         "global_pooling": False, "round_mode": "CEIL", "top_mask": False}
    a.update(kw)
    return a


def _max_inputs(rng, k, shape):
    """k tensors of distinct values where each one is the max somewhere."""
    v = np.sort(distinct(rng, (k,) + shape).reshape(k, -1), axis=0)   # v[-1] is the max
    n = v.shape[1]
    out = np.empty_like(v)
    for j in range(n):
        order = np.roll(rng.permutation(k - 1).tolist() + [k - 1], j % k)
        out[:, j] = v[order, j]
    return [x.reshape(shape) for x in out]


def _hinge_scores(rng, n, c):
    while True:
        x = rng.uniform(-2, 2, (n, c))
        labels = rng.integers(0, c, n)
        s = x.copy()
        s[np.arange(n), labels] *= -1
        if np.all(np.abs(1 + s) > 0.05):
            return x, labels.astype(np.float64)


def _contrastive(rng, legacy):
    n, c = 6, 3
    while True:
        a, b = rng.standard_normal((n, c)), rng.standard_normal((n, c))
        y = np.array([1, 0, 1, 0, 0, 0], dtype=np.float64)
        d2 = ((a - b) ** 2).sum(1)
        margin = 2.0
        gap = margin - d2 if legacy else margin - np.sqrt(d2)
        if np.all(np.abs(gap) > 0.05) and np.any(gap[y == 0] > 0):
            return [a, b, y], {"margin": margin, "legacy_version": legacy}


# Each case: id -> function(rng) returning check_op keyword arguments.
CASES = {
    "Reorder": lambda r: dict(op_type="Reorder", attrs={"to": "NCHW8c"},
                              inputs=[r.standard_normal((2, 12, 3, 3))]),
    "ReLU": lambda r: dict(op_type="ReLU", attrs={"negative_slope": 0.0},
                           inputs=[away_from_zero(r, (2, 3, 4))]),
    "ReLU-leaky": lambda r: dict(op_type="ReLU", attrs={"negative_slope": 0.1},
                                 inputs=[away_from_zero(r, (2, 3, 4))]),
    "PReLU": lambda r: dict(op_type="PReLU", attrs={"channel_shared": False},
                            inputs=[away_from_zero(r, (2, 3, 4, 2))],
                            params=[r.uniform(0.1, 0.5, (3,))]),
    "PReLU-shared": lambda r: dict(op_type="PReLU", attrs={"channel_shared": True},
                                   inputs=[away_from_zero(r, (2, 3, 4))],
                                   params=[np.array(0.25)]),
    "ELU": lambda r: dict(op_type="ELU", attrs={"alpha": 0.7},
                          inputs=[away_from_zero(r, (2, 3, 4))]),
    "Sigmoid": lambda r: dict(op_type="Sigmoid", attrs={}, inputs=[r.standard_normal((3, 5))]),
    "TanH": lambda r: dict(op_type="TanH", attrs={}, inputs=[r.standard_normal((3, 5))]),
    "AbsVal": lambda r: dict(op_type="AbsVal", attrs={}, inputs=[away_from_zero(r, (3, 5))]),
    "Power-general": lambda r: dict(op_type="Power",
                                    attrs={"power": 1.5, "scale": 0.5, "shift": 1.0},
                                    inputs=[r.uniform(-1, 1, (3, 5))]),
    "Power-square": lambda r: dict(op_type="Power",
                                   attrs={"power": 2.0, "scale": -1.5, "shift": 0.5},
                                   inputs=[r.standard_normal((3, 5))]),
    "Power-noshift": lambda r: dict(op_type="Power",
                                    attrs={"power": 3.0, "scale": 2.0, "shift": 0.0},
                                    inputs=[away_from_zero(r, (3, 5))]),
    "Power-linear": lambda r: dict(op_type="Power",
                                   attrs={"power": 1.0, "scale": -2.0, "shift": 3.0},
                                   inputs=[r.standard_normal((3, 5))]),
    "Exp": lambda r: dict(op_type="Exp", attrs={"base": -1.0, "scale": 1.0, "shift": 0.0},
                          inputs=[r.standard_normal((3, 5))]),
    "Exp-base2": lambda r: dict(op_type="Exp", attrs={"base": 2.0, "scale": 0.5, "shift": 1.0},
                                inputs=[r.standard_normal((3, 5))]),
    "Log": lambda r: dict(op_type="Log", attrs={"base": -1.0, "scale": 1.0, "shift": 0.0},
                          inputs=[r.uniform(0.2, 3, (3, 5))]),
    "Log-base10": lambda r: dict(op_type="Log", attrs={"base": 10.0, "scale": 2.0, "shift": 1.0},
                                 inputs=[r.uniform(0.2, 3, (3, 5))]),
    "BNLL": lambda r: dict(op_type="BNLL", attrs={}, inputs=[3 * r.standard_normal((3, 5))]),
    "Dropout-train": lambda r: dict(op_type="Dropout", attrs={"dropout_ratio": 0.3, "train": True},
                                    inputs=[r.standard_normal((4, 6))]),
    "Dropout-test": lambda r: dict(op_type="Dropout", attrs={"dropout_ratio": 0.3, "train": False},
                                   inputs=[r.standard_normal((4, 6))], phase="test"),
    "Eltwise-PROD": lambda r: dict(op_type="Eltwise",
                                   attrs={"operation": "PROD", "coeff": [1.0] * 3,
                                          "stable_prod_grad": True},
                                   inputs=[r.standard_normal((2, 5)) for _ in range(3)]),
    "Eltwise-PROD-unstable": lambda r: dict(op_type="Eltwise",
                                            attrs={"operation": "PROD", "coeff": [1.0, 1.0],
                                                   "stable_prod_grad": False},
                                            inputs=[away_from_zero(r, (2, 5)) for _ in range(2)]),
    "Eltwise-SUM": lambda r: dict(op_type="Eltwise",
                                  attrs={"operation": "SUM", "coeff": [1.0, -0.5, 2.0],
                                         "stable_prod_grad": True},
                                  inputs=[r.standard_normal((2, 5)) for _ in range(3)]),
    "Eltwise-MAX": lambda r: dict(op_type="Eltwise",
                                  attrs={"operation": "MAX", "coeff": [1.0] * 3,
                                         "stable_prod_grad": True},
                                  inputs=_max_inputs(r, 3, (2, 5))),
    "Scale": lambda r: dict(op_type="Scale",
                            attrs={"axis": 1, "num_axes": 1, "bias_term": True},
                            inputs=[r.standard_normal((2, 3, 4))],
                            params=[r.standard_normal((3,)), r.standard_normal((3,))]),
    "Scale-bottom": lambda r: dict(op_type="Scale",
                                   attrs={"axis": 1, "num_axes": 1, "bias_term": False},
                                   inputs=[r.standard_normal((2, 3, 4)),
                                           r.standard_normal((3, 4))]),
    "Scale-scalar": lambda r: dict(op_type="Scale",
                                   attrs={"axis": 0, "num_axes": 0, "bias_term": True},
                                   inputs=[r.standard_normal((2, 3))],
                                   params=[np.array(1.5), np.array(-0.5)]),
    "Bias": lambda r: dict(op_type="Bias", attrs={"axis": 1, "num_axes": 2},
                           inputs=[r.standard_normal((2, 3, 4))],
                           params=[r.standard_normal((3, 4))]),
    "Bias-bottom": lambda r: dict(op_type="Bias", attrs={"axis": 0, "num_axes": 1},
                                  inputs=[r.standard_normal((2, 3)), r.standard_normal((2,))]),
    "Concat": lambda r: dict(op_type="Concat", attrs={"axis": 1},
                             inputs=[r.standard_normal((2, k, 3)) for k in (1, 3, 2)]),
    "Slice": lambda r: dict(op_type="Slice", attrs={"axis": 1, "slice_point": [1, 3],
                                                    "num_top": 3},
                            inputs=[r.standard_normal((2, 5, 3))], grads_for=[0, 2]),
    "Split": lambda r: dict(op_type="Split", attrs={"num_top": 3},
                            inputs=[r.standard_normal((2, 4))]),
    "Flatten": lambda r: dict(op_type="Flatten", attrs={"axis": 1, "end_axis": -1},
                              inputs=[r.standard_normal((2, 3, 2, 2))]),
    "Reshape": lambda r: dict(op_type="Reshape", attrs={"shape": [0, -1], "axis": 0,
                                                        "num_axes": -1},
                              inputs=[r.standard_normal((2, 3, 4))]),
    "Crop": lambda r: dict(op_type="Crop", attrs={"axis": 2, "offset": [1, 2]},
                           inputs=[r.standard_normal((2, 2, 5, 6)), np.zeros((2, 2, 3, 3))]),
    "Tile": lambda r: dict(op_type="Tile", attrs={"axis": 1, "tiles": 3},
                           inputs=[r.standard_normal((2, 2, 3))]),
    "Softmax": lambda r: dict(op_type="Softmax", attrs={"axis": 1},
                              inputs=[r.standard_normal((2, 4, 3))]),
    "Softmax-axis2": lambda r: dict(op_type="Softmax", attrs={"axis": -1},
                                    inputs=[r.standard_normal((2, 3, 5))]),
    "Reduction-SUM": lambda r: dict(op_type="Reduction",
                                    attrs={"operation": "SUM", "axis": 1, "coeff": 2.0},
                                    inputs=[r.standard_normal((3, 4, 2))]),
    "Reduction-ASUM": lambda r: dict(op_type="Reduction",
                                     attrs={"operation": "ASUM", "axis": 0, "coeff": -1.5},
                                     inputs=[away_from_zero(r, (3, 4))]),
    "Reduction-SUMSQ": lambda r: dict(op_type="Reduction",
                                      attrs={"operation": "SUMSQ", "axis": 1, "coeff": 0.5},
                                      inputs=[r.standard_normal((3, 4))]),
    "Reduction-MEAN": lambda r: dict(op_type="Reduction",
                                     attrs={"operation": "MEAN", "axis": 2, "coeff": 3.0},
                                     inputs=[r.standard_normal((2, 3, 4))]),
    "SoftmaxWithLoss": lambda r: dict(
        op_type="SoftmaxWithLoss",
        attrs={"axis": 1, "ignore_label": 2, "normalization": "VALID", "num_top": 2},
        inputs=[r.standard_normal((4, 5, 3)), r.integers(0, 5, (4, 3)).astype(float)],
        grads_for=[0]),
    "SoftmaxWithLoss-FULL": lambda r: dict(
        op_type="SoftmaxWithLoss",
        attrs={"axis": 1, "ignore_label": None, "normalization": "FULL", "num_top": 1},
        inputs=[r.standard_normal((3, 4)), r.integers(0, 4, (3,)).astype(float)]),
    "EuclideanLoss": lambda r: dict(op_type="EuclideanLoss", attrs={},
                                    inputs=[r.standard_normal((3, 4)),
                                            r.standard_normal((3, 2, 2))]),
    "SigmoidCrossEntropyLoss": lambda r: dict(
        op_type="SigmoidCrossEntropyLoss",
        attrs={"ignore_label": -1, "normalization": "VALID"},
        inputs=[2 * r.standard_normal((3, 4)),
                np.where(r.random((3, 4)) < 0.2, -1.0, r.random((3, 4)))]),
    "HingeLoss-L1": lambda r: (lambda x, y: dict(op_type="HingeLoss", attrs={"norm": "L1"},
                                                 inputs=[x, y]))(*_hinge_scores(r, 4, 5)),
    "HingeLoss-L2": lambda r: (lambda x, y: dict(op_type="HingeLoss", attrs={"norm": "L2"},
                                                 inputs=[x, y]))(*_hinge_scores(r, 4, 5)),
    "ContrastiveLoss": lambda r: (lambda ins, a: dict(
        op_type="ContrastiveLoss", attrs=a, inputs=ins, rtol=5e-3))(*_contrastive(r, False)),
    "ContrastiveLoss-legacy": lambda r: (lambda ins, a: dict(
        op_type="ContrastiveLoss", attrs=a, inputs=ins))(*_contrastive(r, True)),
    "MultinomialLogisticLoss": lambda r: dict(
        op_type="MultinomialLogisticLoss", attrs={},
        inputs=[r.uniform(0.05, 1, (4, 5)), r.integers(0, 5, (4,)).astype(float)]),
    "Convolution": lambda r: dict(op_type="Convolution",
                                  attrs=conv_attrs(num_output=4, group=2, stride=[2, 1],
                                                   pad=[1, 2], dilation=[1, 2]),
                                  inputs=[r.standard_normal((2, 4, 7, 6))],
                                  params=[r.standard_normal((4, 2, 3, 3)),
                                          r.standard_normal((4,))]),
    "Convolution-2bottoms": lambda r: dict(op_type="Convolution",
                                           attrs=conv_attrs(num_output=3, bias_term=False,
                                                            kernel=[2, 2], stride=[2, 2]),
                                           inputs=[r.standard_normal((2, 2, 5, 5)),
                                                   r.standard_normal((2, 2, 5, 5))],
                                           params=[r.standard_normal((3, 2, 2, 2))]),
    "Convolution-3d": lambda r: dict(op_type="Convolution",
                                     attrs=conv_attrs(num_output=2, kernel=[2, 2, 2],
                                                      stride=[1, 1, 1], pad=[1, 0, 0],
                                                      dilation=[1, 1, 1]),
                                     inputs=[r.standard_normal((1, 2, 3, 3, 3))],
                                     params=[r.standard_normal((2, 2, 2, 2, 2)),
                                             r.standard_normal((2,))]),
    "Deconvolution": lambda r: dict(op_type="Deconvolution",
                                    attrs=conv_attrs(num_output=4, group=2, stride=[2, 2],
                                                     pad=[1, 0], kernel=[3, 2]),
                                    inputs=[r.standard_normal((2, 2, 3, 4))],
                                    params=[r.standard_normal((2, 2, 3, 2)),
                                            r.standard_normal((4,))]),
    "Pooling-MAX": lambda r: dict(op_type="Pooling", attrs=pool_attrs(pad=[1, 1]),
                                  inputs=[distinct(r, (2, 2, 6, 7))]),
    "Pooling-MAX-mask": lambda r: dict(op_type="Pooling",
                                       attrs=pool_attrs(kernel=[2, 2], top_mask=True),
                                       inputs=[distinct(r, (1, 2, 5, 5))], grads_for=[0]),
    "Pooling-AVE": lambda r: dict(op_type="Pooling",
                                  attrs=pool_attrs(pool="AVE", pad=[1, 2], kernel=[3, 4]),
                                  inputs=[r.standard_normal((2, 2, 6, 7))]),
    "Pooling-global": lambda r: dict(op_type="Pooling",
                                     attrs=pool_attrs(pool="AVE", kernel=None, stride=[1, 1],
                                                      global_pooling=True),
                                     inputs=[r.standard_normal((2, 3, 3, 4))]),
    "Pooling-STOCHASTIC": lambda r: dict(op_type="Pooling",
                                         attrs=pool_attrs(pool="STOCHASTIC", kernel=[2, 2],
                                                          train=True),
                                         inputs=[r.uniform(0.1, 1, (2, 2, 5, 5))],
                                         compare32=False),   # float32 draws differ
    "InnerProduct": lambda r: dict(op_type="InnerProduct",
                                   attrs={"num_output": 3, "bias_term": True, "axis": 1,
                                          "transpose": False},
                                   inputs=[r.standard_normal((4, 2, 3))],
                                   params=[r.standard_normal((3, 6)), r.standard_normal((3,))]),
    "InnerProduct-transpose": lambda r: dict(op_type="InnerProduct",
                                             attrs={"num_output": 3, "bias_term": False,
                                                    "axis": 2, "transpose": True},
                                             inputs=[r.standard_normal((2, 2, 5))],
                                             params=[r.standard_normal((5, 3))]),
    "Embed": lambda r: dict(op_type="Embed",
                            attrs={"num_output": 3, "input_dim": 4, "bias_term": True},
                            inputs=[np.array([[0, 2, 2], [3, 0, 1]], dtype=float)],
                            params=[r.standard_normal((4, 3)), r.standard_normal((3,))]),
    "LRN": lambda r: dict(op_type="LRN",
                          attrs={"local_size": 3, "alpha": 0.5, "beta": 0.75, "k": 2.0,
                                 "norm_region": "ACROSS_CHANNELS"},
                          inputs=[r.standard_normal((2, 5, 3, 2))]),
    "LRN-within": lambda r: dict(op_type="LRN",
                                 attrs={"local_size": 3, "alpha": 0.5, "beta": 0.75, "k": 1.0,
                                        "norm_region": "WITHIN_CHANNEL"},
                                 inputs=[r.standard_normal((2, 2, 4, 5))]),
    "BatchNorm-train": lambda r: dict(op_type="BatchNorm",
                                      attrs={"use_global_stats": False,
                                             "moving_average_fraction": 0.9, "eps": 1e-5},
                                      inputs=[r.standard_normal((3, 2, 2, 2))],
                                      params=[np.zeros(2), np.zeros(2), np.zeros(1)],
                                      need_params=[False] * 3),
    "BatchNorm-global": lambda r: dict(op_type="BatchNorm",
                                       attrs={"use_global_stats": True,
                                              "moving_average_fraction": 0.9, "eps": 1e-5},
                                       inputs=[r.standard_normal((3, 2, 2))],
                                       params=[r.standard_normal(2), r.uniform(1, 2, 2),
                                               np.array([2.0])],
                                       need_params=[False] * 3),
    "MVN": lambda r: dict(op_type="MVN",
                          attrs={"normalize_variance": True, "across_channels": False,
                                 "eps": 1e-9},
                          inputs=[r.standard_normal((2, 3, 2, 2))], rtol=1e-5),
    "MVN-across-mean-only": lambda r: dict(op_type="MVN",
                                           attrs={"normalize_variance": False,
                                                  "across_channels": True, "eps": 1e-9},
                                           inputs=[r.standard_normal((2, 3, 2))]),
    "Sum": lambda r: dict(op_type="Sum", attrs={},
                          inputs=[r.standard_normal((2, 3)) for _ in range(3)]),
}

PYTHON_LAYER = '''
import numpy as np
from graphc.ops.python_layer import PythonLayer

class CubeTimes(PythonLayer):
    """top = k * bottom^3 (k from param_str); backward 3 k x^2 dy."""
    def setup(self, bottom, top):
        self.k = float(self.param_str)
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)
    def forward(self, bottom, top):
        top[0].data[...] = self.k * bottom[0].data ** 3
    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 3 * self.k * bottom[0].data ** 2 * top[0].diff
'''


@pytest.fixture
def python_module(tmp_path):
    name = f"gradlayers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(PYTHON_LAYER)
    sys.path.insert(0, str(tmp_path))
    yield name
    sys.path.remove(str(tmp_path))
    sys.modules.pop(name, None)


NOT_CHECKED_HERE = {"Fused"}   # no gradient rule: autodiff refuses it (test_autodiff.py)


def test_every_differentiable_op_has_a_case():
    """Every op gradients can pass through (it has bottoms and is differentiable) has a
    gradient rule and a case in this table."""
    covered = {c.split("-")[0] for c in CASES} | {"Python"}
    for name, op in all_ops().items():
        if not op.differentiable or op.num_inputs == 0 or name in NOT_CHECKED_HERE:
            continue
        assert type(op).backward is not Op.backward, f"{name} has no backward"
        assert name in covered, f"{name} has no gradient check case"


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient(case, rng):
    kw = CASES[case](rng)
    errs = check_op(rng=rng, **kw)
    assert errs["inputs"] or errs["params"]


def test_python_layer_backward(rng, python_module, tmp_path):
    attrs = {"module": python_module, "layer": "CubeTimes", "param_str": "1.5",
             "share_in_parallel": False, "phase": "train", "num_top": 1,
             "search_dir": str(tmp_path)}
    check_op("Python", attrs, [rng.standard_normal((2, 3))], rng=rng)


# ---- Caffe specifics, by hand -------------------------------------------------------------
def test_max_pool_routes_to_first_max_and_accumulates_overlaps():
    op = get_op("Pooling")
    x = np.array([[[[1., 5., 5.],
                    [0., 2., 5.],
                    [3., 3., 1.]]]], dtype=np.float32)
    attrs = pool_attrs(kernel=[2, 2], stride=[1, 1])
    dy = np.array([[[[1., 10.], [100., 1000.]]]], dtype=np.float32)
    (dx,), _ = op.backward(attrs, [x], [], [None], [dy], [True], [], Context())
    want = np.zeros_like(x)
    want[0, 0, 0, 1] = 1 + 10          # windows (0,0) and (0,1): the first 5, at (0,1)
    want[0, 0, 2, 0] = 100             # window (1,0): the first of two 3s
    want[0, 0, 1, 2] = 1000            # window (1,1): 5 at (1,2)
    np.testing.assert_array_equal(dx, want)


def test_softmax_loss_gradient_by_hand():
    """dx = (softmax - onehot) * loss_weight / valid count; ignored rows are 0."""
    op = get_op("SoftmaxWithLoss")
    x = np.array([[1., 2., 3.], [0., 0., 0.], [2., -1., 0.5]], dtype=np.float32)
    y = np.array([2., 1., 0.], dtype=np.float32)
    attrs = {"axis": 1, "ignore_label": 1, "normalization": "VALID", "num_top": 1}
    (dx, dlabel), _ = op.backward(attrs, [x, y], [], [None], [np.array(2.0, np.float32)],
                                  [True, False], [], Context())
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    want = p.copy()
    want[0, 2] -= 1
    want[2, 0] -= 1
    want[1] = 0
    want *= 2.0 / 2                    # weight 2, two valid labels
    assert dlabel is None
    np.testing.assert_allclose(dx, want, rtol=1e-6, atol=1e-7)


def test_dropout_backward_uses_the_forward_mask():
    op = get_op("Dropout")
    ctx = Context(phase="train", rng=np.random.default_rng(3))
    attrs = {"dropout_ratio": 0.5, "train": True}
    x = np.ones((50, 40), np.float32)
    (y,) = op.forward(attrs, [x], [], ctx)
    (dx,), _ = op.backward(attrs, [x], [], [None], [np.ones_like(x)], [True], [], ctx)
    np.testing.assert_array_equal(dx, y)           # both are mask * 2
    assert 0.4 < (dx == 0).mean() < 0.6


def test_bnll_gradient_saturates_like_caffe():
    op = get_op("BNLL")
    x = np.array([100.0, -100.0, 0.0], np.float32)
    (dx,), _ = op.backward({}, [x], [], [None], [np.ones_like(x)], [True], [], Context())
    np.testing.assert_allclose(dx, [1.0, 0.0, 0.5], atol=1e-7)


def test_conv_backward_data_covers_the_strided_remainder():
    """A stride-2 conv over an even input leaves its last row/column unread: gradient 0
    there, and the shape is the input's."""
    op = get_op("Convolution")
    attrs = conv_attrs(num_output=1, bias_term=False, kernel=[3, 3], stride=[2, 2])
    x = np.ones((1, 1, 6, 6), np.float32)
    w = np.ones((1, 1, 3, 3), np.float32)
    (dx,), (dw,) = op.backward(attrs, [x], [w], [None], [np.ones((1, 1, 2, 2), np.float32)],
                               [True], [True], Context())
    assert dx.shape == x.shape
    assert not dx[:, :, 5, :].any() and not dx[:, :, :, 5].any()
    assert dx[0, 0, 2, 2] == 4          # read by all four windows
    np.testing.assert_array_equal(dw, np.full((1, 1, 3, 3), 4.0))
