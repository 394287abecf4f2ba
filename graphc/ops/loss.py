"""Loss layers.  Each returns the *unweighted* loss as a scalar (shape (), like Caffe's
0-axis loss blobs); the graph keeps ``loss_weight`` per top and applies it.

Every Caffe LossLayer checks that bottom 0 and bottom 1 have the same first dimension.
Labels are read as ``static_cast<int>`` of the float value (truncation).  Caffe leaves a
label outside [0, C) undefined (a DCHECK); here it is an OpError at run time.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpError
from .base import Cost, Op, canonical_axis, register
from .softmax import labels_as_int, softmax

FLT_MIN = float(np.finfo(np.float32).tiny)    # 1.17549435e-38, Caffe's clip in SoftmaxWithLoss
LOG_THRESHOLD = 1e-20                          # Caffe's kLOG_THRESHOLD
NORMALIZATIONS = ("FULL", "VALID", "BATCH_SIZE", "NONE")   # LossParameter enum 0..3


def read_normalization(layer, default: str) -> str:
    """LossParameter -> normalization mode name.  ``normalization`` wins when set;
    otherwise the legacy bool ``normalize`` (true: VALID, false: BATCH_SIZE); otherwise
    ``default`` (VALID for SoftmaxWithLoss, which is the proto default; BATCH_SIZE for
    SigmoidCrossEntropyLoss, kept by Caffe for backward compatibility)."""
    p = layer.loss_param
    if p.HasField("normalization"):
        return NORMALIZATIONS[int(p.normalization)]
    if p.HasField("normalize"):
        return "VALID" if p.normalize else "BATCH_SIZE"
    return default


def read_ignore_label(layer):
    p = layer.loss_param
    return int(p.ignore_label) if p.HasField("ignore_label") else None


def normalizer(mode: str, outer: int, inner: int, valid: int) -> float:
    """Caffe's LossLayer::GetNormalizer, including its max(1, ...) guard."""
    if mode == "FULL":
        n = outer * inner
    elif mode == "VALID":
        n = valid
    elif mode == "BATCH_SIZE":
        n = outer
    elif mode == "NONE":
        n = 1
    else:
        raise OpError(f"unknown loss normalization mode {mode!r}",
                      hint=f"use one of {', '.join(NORMALIZATIONS)}")
    return max(1.0, float(np.float32(n)))


def scalar(v) -> np.ndarray:
    return np.array(v, dtype=np.float32).reshape(())


def check_first_dims(in_types) -> None:
    s0, s1 = in_types[0].shape, in_types[1].shape
    if s0 and s1 and s0[0] != s1[0]:
        raise OpError(f"The data and label should have the same first dimension: bottom 0 "
                      f"has shape {list(s0)}, bottom 1 has shape {list(s1)}",
                      hint="feed labels for the same batch as the data")
    if not s0 or not s1:
        raise OpError(f"loss bottoms need at least one axis (got shapes {list(s0)} and "
                      f"{list(s1)})", hint="feed blobs of shape (N, ...)")


def legacy_dim(shape, i: int, what: str) -> int:
    """Blob::LegacyShape: num/channels/height/width, 1 for a missing axis (at most 4)."""
    if len(shape) > 4:
        raise OpError(f"{what} has shape {list(shape)}; this layer reads it as "
                      f"(num, channels, height, width), so at most 4 axes",
                      hint="reshape the blob to 4 or fewer axes")
    return shape[i] if i < len(shape) else 1


def check_labels(lv: np.ndarray, classes: int, what: str) -> None:
    if lv.size and (lv.min() < 0 or lv.max() >= classes):
        bad = lv[(lv < 0) | (lv >= classes)][0]
        raise OpError(f"{what}: label {bad} is out of range for {classes} classes",
                      hint=f"labels must be integers in [0, {classes - 1}]"
                           + (" or equal to ignore_label" if what == "SoftmaxWithLoss" else ""))


def top_diff(grad_outputs, dtype) -> "np.floating":
    """The loss top's gradient (its loss weight, for a loss the net sums): Caffe reads
    ``top[0]->cpu_diff()[0]``; 0 when no gradient reaches the top."""
    dy = grad_outputs[0]
    return dtype.type(0) if dy is None else dtype.type(np.asarray(dy).reshape(-1)[0])


class _Loss(Op):
    is_loss = True
    num_inputs = 2
    num_outputs = 1

    def grad_inputs(self, attrs, n_inputs):
        """Caffe backpropagates to the predictions, never to the labels (bottom 1)."""
        return [True] + [False] * (n_inputs - 1)

    def infer(self, attrs, in_types, param_types):
        check_first_dims(in_types)
        self.check(attrs, in_types)
        return [in_types[0].with_shape(())]

    def check(self, attrs, in_types) -> None:
        pass

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=4 * in_types[0].numel,
                    bytes=sum(t.nbytes for t in (*in_types, *out_types)))


# ---------------------------------------------------------------------------------------
@register
class SoftmaxWithLoss(_Loss):
    """Softmax along ``axis`` then the mean negative log-probability of the true class,
    ``-log(max(p, FLT_MIN))``, summed over non-ignored labels and divided by the
    normalizer (FULL: outer*inner, VALID: non-ignored count, BATCH_SIZE: outer, NONE: 1;
    at least 1).  Optional second top: the probabilities (bottom 0's shape)."""
    type = "SoftmaxWithLoss"
    caffe_param = "loss_param"
    num_outputs = (1, 2)

    def from_caffe(self, layer, phase):
        return {"axis": int(layer.softmax_param.axis),
                "ignore_label": read_ignore_label(layer),
                "normalization": read_normalization(layer, "VALID"),
                "num_top": len(layer.top)}

    def _dims(self, attrs, s0, s1):
        axis = canonical_axis(int(attrs.get("axis", 1)), len(s0), "softmax axis")
        outer, inner = math.prod(s0[:axis]), math.prod(s0[axis + 1:])
        if outer * inner != math.prod(s1):
            raise OpError(f"Number of labels must match number of predictions: scores "
                          f"{list(s0)} with softmax axis {axis} need {outer * inner} labels, "
                          f"got shape {list(s1)}",
                          hint="e.g. for scores (N, C, H, W) and axis 1 the label count must "
                               "be N*H*W, with integer values in {0, ..., C-1}")
        return axis, outer, s0[axis], inner

    def infer(self, attrs, in_types, param_types):
        check_first_dims(in_types)
        self._dims(attrs, in_types[0].shape, in_types[1].shape)
        normalizer(attrs.get("normalization", "VALID"), 1, 1, 1)   # validates the mode
        outs = [in_types[0].with_shape(())]
        if int(attrs.get("num_top", 1)) > 1:
            outs.append(in_types[0])
        return outs

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        axis, outer, classes, inner = self._dims(attrs, x.shape, inputs[1].shape)
        prob = softmax(x, axis)
        p = prob.reshape(outer, classes, inner)
        labels = labels_as_int(inputs[1]).reshape(outer, inner)
        ignore = attrs.get("ignore_label")
        valid = np.ones_like(labels, dtype=bool) if ignore is None else labels != int(ignore)
        lv = labels[valid]
        check_labels(lv, classes, "SoftmaxWithLoss")
        o, i = np.nonzero(valid)
        picked = np.maximum(p[o, lv, i], np.float32(FLT_MIN)).astype(np.float64)
        loss = -np.log(picked).sum()
        norm = normalizer(attrs.get("normalization", "VALID"), outer, inner, int(lv.size))
        outs = [scalar(loss / norm)]
        if int(attrs.get("num_top", 1)) > 1:
            outs.append(prob)
        return outs

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: ``dx = prob - onehot(label)`` (0 at ignored positions), times
        ``top_diff / normalizer``.  The probability top's gradient is not used."""
        if not need_inputs[0]:
            return [None, None], []
        x = np.asarray(inputs[0])
        dt = x.dtype
        axis, outer, classes, inner = self._dims(attrs, x.shape, inputs[1].shape)
        d = softmax(x, axis).astype(dt, copy=False).reshape(outer, classes, inner).copy()
        labels = labels_as_int(inputs[1]).reshape(outer, inner)
        ignore = attrs.get("ignore_label")
        valid = np.ones_like(labels, dtype=bool) if ignore is None else labels != int(ignore)
        lv = labels[valid]
        check_labels(lv, classes, "SoftmaxWithLoss")
        o, i = np.nonzero(valid)
        d[o, lv, i] -= dt.type(1)
        io, ii = np.nonzero(~valid)
        d[io, :, ii] = 0
        norm = normalizer(attrs.get("normalization", "VALID"), outer, inner, int(lv.size))
        d *= dt.type(top_diff(grad_outputs, dt) / dt.type(norm))
        return [d.reshape(x.shape), None], []

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=6 * in_types[0].numel,
                    bytes=sum(t.nbytes for t in (*in_types, *out_types)))


# ---------------------------------------------------------------------------------------
@register
class EuclideanLoss(_Loss):
    """sum((a - b)^2) / (2 N), N = bottom 0's first dimension."""
    type = "EuclideanLoss"

    def check(self, attrs, in_types):
        s0, s1 = in_types[0].shape, in_types[1].shape
        if math.prod(s0[1:]) != math.prod(s1[1:]):
            raise OpError(f"Inputs must have the same dimension: bottom 0 has shape {list(s0)}, "
                          f"bottom 1 has shape {list(s1)}",
                          hint="both bottoms need the same number of values per example")

    def forward(self, attrs, inputs, params, ctx):
        a = np.asarray(inputs[0], dtype=np.float32)
        b = np.asarray(inputs[1], dtype=np.float32).reshape(a.shape)
        d = (a - b).astype(np.float64)        # Caffe's diff_ is float; the dot accumulates
        return [scalar(np.dot(d.ravel(), d.ravel()) / a.shape[0] / 2.0)]

    def grad_inputs(self, attrs, n_inputs):
        return [True, True]   # Caffe's EuclideanLoss allows both

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """``d bottom_i = sign_i * top_diff / N * (a - b)``, sign +1 for a, -1 for b."""
        a = np.asarray(inputs[0])
        dt = a.dtype
        diff = a - np.asarray(inputs[1], dtype=dt).reshape(a.shape)
        alpha = top_diff(grad_outputs, dt) / dt.type(a.shape[0])
        return [(alpha * diff).reshape(np.shape(inputs[0])) if need_inputs[0] else None,
                (-alpha * diff).reshape(np.shape(inputs[1])) if need_inputs[1] else None], []


# ---------------------------------------------------------------------------------------
@register
class SigmoidCrossEntropyLoss(_Loss):
    """Cross-entropy of sigmoid(x) against targets t in [0, 1], in Caffe's stable form
    ``-(x (t - [x>=0]) - log(1 + exp(x - 2 x [x>=0])))`` summed over elements whose
    ``int(t)`` is not ``ignore_label``, divided by the normalizer (default BATCH_SIZE:
    the first dimension; VALID: the counted elements; FULL: all elements; NONE: 1)."""
    type = "SigmoidCrossEntropyLoss"
    caffe_param = "loss_param"

    def from_caffe(self, layer, phase):
        return {"ignore_label": read_ignore_label(layer),
                "normalization": read_normalization(layer, "BATCH_SIZE")}

    def check(self, attrs, in_types):
        s0, s1 = in_types[0].shape, in_types[1].shape
        if math.prod(s0) != math.prod(s1):
            raise OpError(f"SIGMOID_CROSS_ENTROPY_LOSS layer inputs must have the same count: "
                          f"bottom 0 has shape {list(s0)}, bottom 1 has shape {list(s1)}",
                          hint="give one target per prediction")
        normalizer(attrs.get("normalization", "BATCH_SIZE"), 1, 1, 1)

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32).ravel().astype(np.float64)
        t = np.asarray(inputs[1], dtype=np.float32).ravel().astype(np.float64)
        ignore = attrs.get("ignore_label")
        keep = np.ones(x.shape, bool) if ignore is None else labels_as_int(t) != int(ignore)
        x, t = x[keep], t[keep]
        pos = (x >= 0).astype(np.float64)
        loss = -(x * (t - pos) - np.log1p(np.exp(x - 2 * x * pos))).sum()
        outer = inputs[0].shape[0]
        norm = normalizer(attrs.get("normalization", "BATCH_SIZE"), outer,
                          inputs[0].size // max(outer, 1), int(keep.sum()))
        return [scalar(loss / norm)]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: ``dx = sigmoid(x) - t`` (0 where the target is ignored), times
        ``top_diff / normalizer``."""
        if not need_inputs[0]:
            return [None, None], []
        x = np.asarray(inputs[0])
        dt = x.dtype
        t = np.asarray(inputs[1]).reshape(x.shape)
        sig = (0.5 * np.tanh(0.5 * x.astype(np.float64)) + 0.5).astype(dt)
        d = sig - t.astype(dt)
        ignore = attrs.get("ignore_label")
        keep = np.ones(x.shape, bool) if ignore is None else labels_as_int(t) != int(ignore)
        d[~keep] = 0
        outer = x.shape[0]
        norm = normalizer(attrs.get("normalization", "BATCH_SIZE"), outer,
                          x.size // max(outer, 1), int(keep.sum()))
        d *= dt.type(top_diff(grad_outputs, dt) / dt.type(norm))
        return [d, None], []


# ---------------------------------------------------------------------------------------
@register
class HingeLoss(_Loss):
    """One-vs-all hinge loss: for example n with true class l, with s = scores (flattened
    per example) and s[l] negated, loss = sum(max(0, 1 + s)) / N (L1) or sum of squares
    / N (L2)."""
    type = "HingeLoss"
    caffe_param = "hinge_loss_param"

    def from_caffe(self, layer, phase):
        norm = int(layer.hinge_loss_param.norm)          # enum L1 = 1, L2 = 2
        if norm not in (1, 2):
            raise OpError(f"unknown hinge loss norm {norm}", hint="use L1 or L2")
        return {"norm": "L1" if norm == 1 else "L2"}

    def check(self, attrs, in_types):
        if attrs.get("norm", "L1") not in ("L1", "L2"):
            raise OpError(f"unknown hinge loss norm {attrs.get('norm')!r}", hint="use L1 or L2")
        n = in_types[0].shape[0]
        if math.prod(in_types[1].shape) != n:
            raise OpError(f"HingeLoss needs one label per example: scores "
                          f"{list(in_types[0].shape)}, labels {list(in_types[1].shape)}",
                          hint="labels should have shape (N,) or (N, 1, 1, 1)")

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        n = x.shape[0]
        s = x.reshape(n, -1).astype(np.float64)
        labels = labels_as_int(inputs[1]).reshape(n)
        check_labels(labels, s.shape[1], "HingeLoss")
        s[np.arange(n), labels] *= -1
        m = np.maximum(0.0, 1.0 + s)
        total = (m * m).sum() if attrs.get("norm", "L1") == "L2" else m.sum()
        return [scalar(total / n)]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: with ``m = max(0, 1 + s)`` (true class negated) and that entry's sign
        flipped back, L1: ``sign(m) * top_diff / N``; L2: ``2 m * top_diff / N``."""
        if not need_inputs[0]:
            return [None, None], []
        x = np.asarray(inputs[0])
        dt = x.dtype
        n = x.shape[0]
        s = x.reshape(n, -1).copy()
        labels = labels_as_int(inputs[1]).reshape(n)
        check_labels(labels, s.shape[1], "HingeLoss")
        rows = np.arange(n)
        s[rows, labels] *= dt.type(-1)
        m = np.maximum(dt.type(0), dt.type(1) + s)
        m[rows, labels] *= dt.type(-1)
        w = top_diff(grad_outputs, dt)
        if attrs.get("norm", "L1") == "L2":
            d = m * dt.type(w * dt.type(2) / dt.type(n))
        else:
            d = np.sign(m) * dt.type(w / dt.type(n))
        return [d.reshape(x.shape), None], []


# ---------------------------------------------------------------------------------------
@register
class ContrastiveLoss(_Loss):
    """Bottoms a, b (N, C[, 1, 1]) and similarity y (N[, 1, 1, 1]).  d^2 = |a - b|^2 per
    example; similar pairs (int(y) != 0) add d^2, dissimilar ones add max(margin - d, 0)^2
    (``legacy_version``: max(margin - d^2, 0)).  Loss = sum / N / 2."""
    type = "ContrastiveLoss"
    caffe_param = "contrastive_loss_param"
    num_inputs = 3

    def grad_inputs(self, attrs, n_inputs):
        return [True, True, False]

    def from_caffe(self, layer, phase):
        p = layer.contrastive_loss_param
        return {"margin": float(p.margin), "legacy_version": bool(p.legacy_version)}

    def check(self, attrs, in_types):
        a, b, y = (t.shape for t in in_types)
        if not y or y[0] != a[0]:
            raise OpError(f"ContrastiveLoss: the similarity bottom has shape {list(y)} but the "
                          f"inputs have {a[0]} examples", hint="give one y per pair")
        ca, cb = legacy_dim(a, 1, "bottom 0"), legacy_dim(b, 1, "bottom 1")
        if ca != cb:
            raise OpError(f"ContrastiveLoss: bottoms 0 and 1 differ in channels: shapes "
                          f"{list(a)} and {list(b)}", hint="compare features of the same size")
        for shape, what in ((a, "bottom 0"), (b, "bottom 1")):
            if legacy_dim(shape, 2, what) != 1 or legacy_dim(shape, 3, what) != 1:
                raise OpError(f"ContrastiveLoss: {what} has shape {list(shape)}; height and "
                              f"width must be 1", hint="flatten the features to (N, C)")
        if any(legacy_dim(y, i, "bottom 2") != 1 for i in (1, 2, 3)):
            raise OpError(f"ContrastiveLoss: the similarity bottom has shape {list(y)}; it "
                          f"must be (N,) or (N, 1, 1, 1)", hint="give one y per pair")

    def forward(self, attrs, inputs, params, ctx):
        a = np.asarray(inputs[0], dtype=np.float32)
        n = a.shape[0]
        d = (a - np.asarray(inputs[1], dtype=np.float32).reshape(a.shape))
        d2 = (d.astype(np.float64).reshape(n, -1) ** 2).sum(axis=1)
        similar = labels_as_int(inputs[2]).reshape(n) != 0
        margin = float(np.float32(attrs.get("margin", 1.0)))
        if attrs.get("legacy_version", False):
            dissim = np.maximum(margin - d2, 0.0)
        else:
            dissim = np.maximum(margin - np.sqrt(d2), 0.0) ** 2
        loss = np.where(similar, d2, dissim).sum()
        return [scalar(loss / n / 2.0)]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe, with ``alpha = sign * top_diff / N`` (sign +1 for a, -1 for b) and
        ``diff = a - b``: similar pairs ``alpha * diff``; dissimilar pairs with
        ``mdist = margin - d > 0`` get ``-alpha * mdist / (d + 1e-4) * diff`` (legacy:
        ``mdist = margin - d^2``, ``-alpha * diff``), others 0.  (The 1e-4 is Caffe's.)"""
        a = np.asarray(inputs[0])
        dt = a.dtype
        n = a.shape[0]
        diff = (a - np.asarray(inputs[1], dtype=dt).reshape(a.shape)).reshape(n, -1)
        d2 = (diff.astype(np.float64) ** 2).sum(axis=1).astype(dt)
        similar = labels_as_int(inputs[2]).reshape(n) != 0
        margin = dt.type(attrs.get("margin", 1.0))
        if attrs.get("legacy_version", False):
            mdist = margin - d2
            factor = np.where(mdist > 0, dt.type(-1), dt.type(0))
        else:
            dist = np.sqrt(d2)
            mdist = margin - dist
            factor = np.where(mdist > 0, -mdist / (dist + dt.type(1e-4)), dt.type(0))
        factor = np.where(similar, dt.type(1), factor).astype(dt)[:, None]
        grads = []
        for i, sign in ((0, 1), (1, -1)):
            if not need_inputs[i]:
                grads.append(None)
                continue
            alpha = dt.type(sign) * top_diff(grad_outputs, dt) / dt.type(n)
            grads.append((alpha * factor * diff).astype(dt).reshape(np.shape(inputs[i])))
        return grads + [None], []


# ---------------------------------------------------------------------------------------
@register
class MultinomialLogisticLoss(_Loss):
    """Bottom 0 holds probabilities (N, C...); loss = -sum(log(max(p[n, label_n], 1e-20)))
    / N."""
    type = "MultinomialLogisticLoss"

    def check(self, attrs, in_types):
        y = in_types[1].shape
        if any(legacy_dim(y, i, "the label bottom") != 1 for i in (1, 2, 3)):
            raise OpError(f"MultinomialLogisticLoss: the label bottom has shape {list(y)}; it "
                          f"must be (N,) or (N, 1, 1, 1)", hint="give one label per example")

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        n = x.shape[0]
        p = x.reshape(n, -1)
        labels = labels_as_int(inputs[1]).reshape(n)
        check_labels(labels, p.shape[1], "MultinomialLogisticLoss")
        picked = np.maximum(p[np.arange(n), labels], np.float32(LOG_THRESHOLD))
        return [scalar(-np.log(picked.astype(np.float64)).sum() / n)]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: ``-top_diff / N / max(p[label], 1e-20)`` at the true class, 0 elsewhere."""
        if not need_inputs[0]:
            return [None, None], []
        x = np.asarray(inputs[0])
        dt = x.dtype
        n = x.shape[0]
        p = x.reshape(n, -1)
        labels = labels_as_int(inputs[1]).reshape(n)
        check_labels(labels, p.shape[1], "MultinomialLogisticLoss")
        rows = np.arange(n)
        scale = -top_diff(grad_outputs, dt) / dt.type(n)
        d = np.zeros_like(p)
        d[rows, labels] = scale / np.maximum(p[rows, labels], dt.type(LOG_THRESHOLD))
        return [d.reshape(x.shape), None], []
