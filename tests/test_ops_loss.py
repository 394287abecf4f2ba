"""Loss ops against naive float64 loops on fresh random data."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from graphc.errors import OpError
from graphc.ir.types import TensorType
from graphc.ops import Context, get_op

FLT_MIN = 1.1754943508222875e-38


def run(op_type, attrs, inputs):
    op = get_op(op_type)
    assert op.is_loss
    types = op.infer(attrs, [TensorType.of(x) for x in inputs], [])
    outs = op.forward(attrs, inputs, [], Context())
    assert len(outs) == len(types)
    for o, t in zip(outs, types):
        assert o.dtype == np.float32
        assert o.shape == t.shape
    assert outs[0].shape == ()
    return outs


def close(got, want, tol=1e-5):
    got = float(got)
    assert want != 0.0 and not math.isnan(want)
    assert abs(got - want) <= tol * abs(want), (got, want)


def layer(text):
    from graphc.frontend import caffe_pb2
    return text_format.Parse(text, caffe_pb2.LayerParameter())


# ---- SoftmaxWithLoss --------------------------------------------------------------------

def naive_softmax_loss(x, labels, axis, ignore, mode):
    shape = x.shape
    classes = shape[axis]
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    xs = x.reshape(outer, classes, inner).astype(np.float64)
    lab = labels.reshape(outer, inner)
    loss, valid = 0.0, 0
    for o in range(outer):
        for i in range(inner):
            lv = int(lab[o, i])
            if ignore is not None and lv == ignore:
                continue
            m = max(xs[o, c, i] for c in range(classes))
            s = sum(math.exp(xs[o, c, i] - m) for c in range(classes))
            loss -= math.log(max(math.exp(xs[o, lv, i] - m) / s, FLT_MIN))
            valid += 1
    norm = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return loss / max(1, norm)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("shape,axis,ignore", [
    ((8, 5), 1, None), ((8, 5), 1, 2), ((2, 4, 3, 3), 1, 0), ((2, 3, 4), -1, None),
    ((3, 4, 2), 2, 1),
])
def test_softmax_with_loss(rng, mode, shape, axis, ignore):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    a = axis % len(shape)
    labels = rng.integers(0, shape[a], shape[:a] + shape[a + 1:]).astype(np.float32)
    labels.reshape(-1)[0] = 0 if ignore != 0 else 1         # at least one counted label
    attrs = {"axis": axis, "ignore_label": ignore, "normalization": mode, "num_top": 2}
    loss, prob = run("SoftmaxWithLoss", attrs, [x, labels])
    close(loss, naive_softmax_loss(x, labels, a, ignore, mode))
    assert prob.shape == x.shape
    assert np.allclose(prob.sum(axis=a), 1.0, atol=1e-6)
    assert np.allclose(prob, np.exp(x - x.max(axis=a, keepdims=True)) /
                       np.exp(x - x.max(axis=a, keepdims=True)).sum(axis=a, keepdims=True),
                       rtol=1e-5, atol=1e-7)


def test_softmax_with_loss_valid_counts_only_kept_labels(rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    labels = np.array([0, 255, 1, 255, 2, 255], np.float32)
    attrs = {"axis": 1, "ignore_label": 255, "num_top": 1}
    valid = float(run("SoftmaxWithLoss", {**attrs, "normalization": "VALID"}, [x, labels])[0])
    batch = float(run("SoftmaxWithLoss", {**attrs, "normalization": "BATCH_SIZE"},
                      [x, labels])[0])
    assert abs(valid * 3 - batch * 6) < 1e-5 * abs(batch * 6)
    all_ignored = run("SoftmaxWithLoss", {**attrs, "normalization": "VALID"},
                      [x, np.full(6, 255, np.float32)])[0]
    assert float(all_ignored) == 0.0      # normalizer max(1, 0): no NaN


def test_softmax_with_loss_clips_at_flt_min():
    x = np.array([[0.0, 200.0]], np.float32)       # p(class 0) underflows to 0 in float32
    (loss,) = run("SoftmaxWithLoss", {"axis": 1, "ignore_label": None, "normalization": "VALID",
                                      "num_top": 1}, [x, np.array([0.0], np.float32)])
    close(loss, -math.log(FLT_MIN))


def test_softmax_with_loss_errors():
    op = get_op("SoftmaxWithLoss")
    with pytest.raises(OpError, match="Number of labels"):
        op.infer({"axis": 1, "normalization": "VALID"},
                 [TensorType((2, 3, 4)), TensorType((2, 3))], [])
    with pytest.raises(OpError, match="first dimension"):
        op.infer({"axis": 1, "normalization": "VALID"},
                 [TensorType((2, 3)), TensorType((3,))], [])
    with pytest.raises(OpError, match="out of range"):
        op.forward({"axis": 1, "normalization": "VALID", "ignore_label": None},
                   [np.zeros((2, 3), np.float32), np.array([0, 3], np.float32)], [], Context())


@pytest.mark.parametrize("text,mode", [
    ("", "VALID"),
    ("loss_param { normalize: false }", "BATCH_SIZE"),
    ("loss_param { normalize: true }", "VALID"),
    ("loss_param { normalization: FULL normalize: false }", "FULL"),
    ("loss_param { normalization: NONE }", "NONE"),
])
def test_softmax_with_loss_from_caffe(text, mode):
    a = get_op("SoftmaxWithLoss").from_caffe(
        layer(f'type: "SoftmaxWithLoss" top: "loss" {text}'), "train")
    assert a == {"axis": 1, "ignore_label": None, "normalization": mode, "num_top": 1}
    a = get_op("SoftmaxWithLoss").from_caffe(layer(
        'type: "SoftmaxWithLoss" top: "l" top: "p" softmax_param { axis: 2 } '
        'loss_param { ignore_label: 255 }'), "train")
    assert a == {"axis": 2, "ignore_label": 255, "normalization": "VALID", "num_top": 2}


# ---- EuclideanLoss ----------------------------------------------------------------------

def test_euclidean_loss(rng):
    a = rng.standard_normal((5, 3, 2)).astype(np.float32)
    b = rng.standard_normal((5, 6)).astype(np.float32)      # same count per example
    (loss,) = run("EuclideanLoss", {}, [a, b])
    af, bf = a.reshape(5, 6), b
    want = sum((float(af[n, j]) - float(bf[n, j])) ** 2 for n in range(5) for j in range(6))
    close(loss, want / (2 * 5))
    with pytest.raises(OpError, match="same dimension"):
        get_op("EuclideanLoss").infer({}, [TensorType((5, 6)), TensorType((5, 5))], [])


# ---- SigmoidCrossEntropyLoss ------------------------------------------------------------

@pytest.mark.parametrize("mode,ignore", [("BATCH_SIZE", None), ("VALID", -1), ("FULL", -1),
                                         ("NONE", None), ("BATCH_SIZE", -1)])
def test_sigmoid_cross_entropy_loss(rng, mode, ignore):
    x = (rng.standard_normal((4, 3, 2)) * 4).astype(np.float32)
    t = rng.uniform(0, 1, (4, 6)).astype(np.float32)        # soft targets
    if ignore is not None:
        t.reshape(-1)[::4] = ignore
    (loss,) = run("SigmoidCrossEntropyLoss", {"ignore_label": ignore, "normalization": mode},
                  [x, t])
    total, valid = 0.0, 0
    for xv, tv in zip(x.ravel().astype(np.float64), t.ravel().astype(np.float64)):
        if ignore is not None and int(tv) == ignore:
            continue
        p = 1 / (1 + math.exp(-xv))
        total -= tv * math.log(p) + (1 - tv) * math.log(1 - p)
        valid += 1
    norm = {"FULL": 24, "VALID": valid, "BATCH_SIZE": 4, "NONE": 1}[mode]
    close(loss, total / norm)


def test_sigmoid_cross_entropy_loss_large_inputs_are_stable():
    x = np.array([[100.0, -100.0]], np.float32)
    t = np.array([[0.0, 1.0]], np.float32)
    (loss,) = run("SigmoidCrossEntropyLoss", {"ignore_label": None,
                                              "normalization": "BATCH_SIZE"}, [x, t])
    close(loss, 200.0)


@pytest.mark.parametrize("text,mode", [("", "BATCH_SIZE"),
                                       ("loss_param { normalize: true }", "VALID"),
                                       ("loss_param { normalization: FULL }", "FULL")])
def test_sigmoid_cross_entropy_from_caffe(text, mode):
    a = get_op("SigmoidCrossEntropyLoss").from_caffe(
        layer(f'type: "SigmoidCrossEntropyLoss" {text}'), "train")
    assert a == {"ignore_label": None, "normalization": mode}


# ---- HingeLoss --------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(rng, norm):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6).astype(np.float32)
    (loss,) = run("HingeLoss", {"norm": norm}, [x, labels])
    total = 0.0
    for n in range(6):
        for c in range(5):
            sign = -1.0 if c == int(labels[n]) else 1.0
            m = max(0.0, 1.0 + sign * float(x[n, c]))
            total += m if norm == "L1" else m * m
    close(loss, total / 6)
    assert get_op("HingeLoss").from_caffe(layer('type: "HingeLoss"'), "t") == {"norm": "L1"}
    assert get_op("HingeLoss").from_caffe(
        layer('type: "HingeLoss" hinge_loss_param { norm: L2 }'), "t") == {"norm": "L2"}


# ---- ContrastiveLoss --------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(rng, legacy):
    n, c = 8, 4
    a = (rng.standard_normal((n, c)) * 0.5).astype(np.float32)
    b = (rng.standard_normal((n, c, 1, 1)) * 0.5).astype(np.float32)
    y = rng.integers(0, 2, (n, 1, 1, 1)).astype(np.float32)
    y[0], y[1] = 1, 0
    margin = 2.0
    (loss,) = run("ContrastiveLoss", {"margin": margin, "legacy_version": legacy}, [a, b, y])
    total = 0.0
    for i in range(n):
        d2 = sum((float(a[i, k]) - float(b[i, k, 0, 0])) ** 2 for k in range(c))
        if int(y[i, 0, 0, 0]):
            total += d2
        elif legacy:
            total += max(margin - d2, 0.0)
        else:
            total += max(margin - math.sqrt(d2), 0.0) ** 2
    close(loss, total / n / 2)


def test_contrastive_loss_checks_and_from_caffe():
    op = get_op("ContrastiveLoss")
    with pytest.raises(OpError, match="height and width"):
        op.infer({}, [TensorType((2, 3, 2, 1)), TensorType((2, 3, 2, 1)), TensorType((2,))], [])
    with pytest.raises(OpError, match="channels"):
        op.infer({}, [TensorType((2, 3)), TensorType((2, 4)), TensorType((2,))], [])
    a = op.from_caffe(layer('type: "ContrastiveLoss" contrastive_loss_param { margin: 0.5 '
                            'legacy_version: true }'), "train")
    assert a == {"margin": 0.5, "legacy_version": True}


# ---- MultinomialLogisticLoss ------------------------------------------------------------

def test_multinomial_logistic_loss(rng):
    p = rng.uniform(0.01, 1, (7, 4, 1, 1)).astype(np.float32)
    labels = rng.integers(0, 4, 7).astype(np.float32)
    p[0, int(labels[0]), 0, 0] = 0.0                       # clipped at 1e-20
    (loss,) = run("MultinomialLogisticLoss", {}, [p, labels])
    total = 0.0
    for n in range(7):
        total -= math.log(max(float(p[n, int(labels[n]), 0, 0]), float(np.float32(1e-20))))
    close(loss, total / 7)
    with pytest.raises(OpError, match="label bottom"):
        get_op("MultinomialLogisticLoss").infer({}, [TensorType((7, 4)), TensorType((7, 2))],
                                                [])
