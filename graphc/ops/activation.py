"""Activation ("neuron") layers: one bottom, one top of the same shape, computed element
by element, so all may run in place.

ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, Power, Exp, Log, BNLL, Threshold, Dropout.

Each forward follows Caffe's CPU code step by step in the input's dtype (float32), so the
rounding matches: e.g. Power applies ``scale``, then ``shift``, then ``pow`` as separate
float32 steps, and Exp/Log fold their constants exactly as Caffe's ``LayerSetUp`` does.

Cost: a transcendental function (exp, log, tanh, pow) counts as ``TRANSCENDENTAL_FLOPS``
flops per element (a rough price of its vectorized polynomial evaluation); a compare,
select, add or multiply counts as one flop.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpError
from ..ir.types import TensorType
from .base import Context, Cost, Op, ParamSpec, filler_to_dict, register

#: flops charged for one exp / log / tanh / pow of one element
TRANSCENDENTAL_FLOPS = 4


class _Neuron(Op):
    """An elementwise op of one bottom: the top has the bottom's type."""
    num_inputs = 1
    num_outputs = 1
    inplace_ok = True

    def infer(self, attrs, in_types, param_types):
        self.check_arity(len(in_types), 1)
        self.check_attrs(attrs)
        self.check_params(attrs, in_types[0], param_types)
        return [in_types[0]]

    def check_attrs(self, attrs: dict) -> None:
        """Raise OpError for attribute values Caffe rejects."""

    def check_params(self, attrs, x: TensorType, param_types) -> None:
        if param_types:
            raise OpError(f"{self.type} has no learnable blobs but got {len(param_types)}",
                          hint="remove the extra parameter blobs")

    def forward(self, attrs, inputs, params, ctx):
        x = inputs[0]
        with np.errstate(all="ignore"):  # NaN/inf results are Caffe's too; no warnings
            y = self.compute(attrs, x, params, ctx)
        return [np.asarray(y, dtype=x.dtype)]

    def compute(self, attrs: dict, x: np.ndarray, params, ctx: Context) -> np.ndarray:
        raise NotImplementedError(f"{self.type}.compute")

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        x, y, dy = inputs[0], outputs[0], grad_outputs[0]
        if dy is None:
            dy = np.zeros_like(x)
        with np.errstate(all="ignore"):
            dx = self.grad(attrs, x, y, dy, ctx) if need_inputs[0] else None
        return [None if dx is None else np.asarray(dx, dtype=x.dtype)], []

    def grad(self, attrs: dict, x: np.ndarray, y: np.ndarray | None, dy: np.ndarray,
             ctx: Context) -> np.ndarray:
        """dLoss/dx from the bottom x, the top y (when ``backward_uses_outputs``) and
        dLoss/dy, as Caffe's Backward_cpu computes it."""
        raise NotImplementedError(f"{self.type}.grad")

    def flops_per_element(self, attrs: dict) -> int:
        return 1

    def cost(self, attrs, in_types, param_types, out_types):
        base = super().cost(attrs, in_types, param_types, out_types)
        return Cost(flops=self.flops_per_element(attrs) * out_types[0].numel, bytes=base.bytes)


def _c(x: np.ndarray, value: float):
    """A scalar constant in x's dtype (Caffe keeps its constants as Dtype)."""
    return x.dtype.type(value)


@register
class ReLU(_Neuron):
    """``y = max(x, 0) + negative_slope * min(x, 0)``, Caffe's exact expression (so, as in
    Caffe, ``-inf`` gives NaN when ``negative_slope`` is 0)."""
    type = "ReLU"
    caffe_param = "relu_param"

    def from_caffe(self, layer, phase):
        return {"negative_slope": float(layer.relu_param.negative_slope)}

    def compute(self, attrs, x, params, ctx):
        zero = _c(x, 0)
        return np.maximum(x, zero) + _c(x, attrs["negative_slope"]) * np.minimum(x, zero)

    def backward_uses_outputs(self, attrs):
        return attrs["negative_slope"] >= 0

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """With ``negative_slope >= 0``, ``y > 0`` exactly where ``x > 0`` (NaN and -inf
        included), so the top alone decides (as in Caffe's in-place ReLU, whose bottom
        is its top); a negative slope flips signs, so it needs the bottom."""
        top = self.backward_uses_outputs(attrs)
        return [not top], [top]

    def grad(self, attrs, x, y, dy, ctx):
        """``dy * ((x > 0) + negative_slope * (x <= 0))``, the signs taken from y when it
        is given (``negative_slope >= 0``: the same signs)."""
        s = x if y is None else y
        pos = (s > 0).astype(dy.dtype)
        return dy * (pos + _c(dy, attrs["negative_slope"]) * (s <= 0).astype(dy.dtype))

    def flops_per_element(self, attrs):
        return 1 if attrs["negative_slope"] == 0 else 3


@register
class PReLU(_Neuron):
    """ReLU with a learned negative slope per channel (axis 1), or one shared slope.

    Caffe's slope blob has shape ``(C,)``, or shape ``()`` (a scalar blob, count 1) when
    ``channel_shared``; a ``(1,)`` blob is accepted for the shared case too. The bottom
    needs at least 2 axes. Default filler: constant 0.25."""
    type = "PReLU"
    init_attrs = ("filler",)
    caffe_param = "prelu_param"

    def from_caffe(self, layer, phase):
        p = layer.prelu_param
        filler = (filler_to_dict(p.filler) if p.HasField("filler")
                  else {"type": "constant", "value": 0.25})
        return {"channel_shared": bool(p.channel_shared), "filler": filler}

    def _slope_shape(self, attrs, x: TensorType) -> tuple[int, ...]:
        if x.rank < 2:
            raise OpError(f"PReLU needs a bottom with at least 2 axes, got shape {list(x.shape)}",
                          hint="PReLU's channel axis is axis 1; reshape the bottom to (N, C, ...)")
        return () if attrs["channel_shared"] else (x.shape[1],)

    def param_specs(self, attrs, in_types):
        return [ParamSpec(self._slope_shape(attrs, in_types[0]), dict(attrs["filler"]))]

    def check_params(self, attrs, x, param_types):
        want = self._slope_shape(attrs, x)
        if len(param_types) != 1:
            raise OpError(f"PReLU has 1 learnable blob (the slopes), got {len(param_types)}",
                          hint="give exactly one slope blob")
        got = param_types[0].shape
        ok = got == want or (attrs["channel_shared"] and got == (1,))
        if not ok:
            raise OpError(f"PReLU slope blob has shape {list(got)} but the layer needs "
                          f"{list(want)} (bottom shape {list(x.shape)}, channel_shared="
                          f"{attrs['channel_shared']})",
                          hint="the slope blob has one value per channel (axis 1), or a single "
                               "value with channel_shared: true")

    def compute(self, attrs, x, params, ctx):
        slope = np.asarray(params[0], dtype=x.dtype)
        if not attrs["channel_shared"]:
            slope = slope.reshape((1, x.shape[1]) + (1,) * (x.ndim - 2))
        else:
            slope = slope.reshape(())
        zero = _c(x, 0)
        return np.maximum(x, zero) + slope * np.minimum(x, zero)

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: ``dslope[c] += dy * x * (x <= 0)`` summed over every position of channel
        c (all of them when shared); ``dx = dy * (x > 0 ? 1 : slope)``."""
        x, dy = inputs[0], grad_outputs[0]
        if dy is None:
            dy = np.zeros_like(x)
        neg = (x <= 0).astype(x.dtype)
        dx = dslope = None
        if need_params and need_params[0]:
            prod = dy * x * neg
            if attrs["channel_shared"]:
                dslope = np.asarray(prod.sum(dtype=x.dtype)).reshape(np.shape(params[0]))
            else:
                axes = (0,) + tuple(range(2, x.ndim))
                dslope = prod.sum(axis=axes, dtype=x.dtype).reshape(np.shape(params[0]))
        if need_inputs[0]:
            slope = np.asarray(params[0], dtype=x.dtype)
            slope = (slope.reshape(()) if attrs["channel_shared"]
                     else slope.reshape((1, x.shape[1]) + (1,) * (x.ndim - 2)))
            dx = dy * ((x > 0).astype(x.dtype) + slope * neg)
        return [dx], [dslope]

    def flops_per_element(self, attrs):
        return 3


@register
class ELU(_Neuron):
    """``y = max(x, 0) + alpha * (exp(min(x, 0)) - 1)``."""
    type = "ELU"
    caffe_param = "elu_param"

    def from_caffe(self, layer, phase):
        return {"alpha": float(layer.elu_param.alpha)}

    def compute(self, attrs, x, params, ctx):
        zero, one = _c(x, 0), _c(x, 1)
        return np.maximum(x, zero) + _c(x, attrs["alpha"]) * (np.exp(np.minimum(x, zero)) - one)

    def backward_uses_outputs(self, attrs):
        return True

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """With ``alpha >= 0``, ``y > 0`` exactly where ``x > 0``: the top alone will do."""
        return [attrs["alpha"] < 0], [True]

    def grad(self, attrs, x, y, dy, ctx):
        """``dy * ((x > 0) + (alpha + y) * (x <= 0))`` (signs from y when alpha >= 0)."""
        s = x if attrs["alpha"] < 0 else y
        pos, neg = (s > 0).astype(dy.dtype), (s <= 0).astype(dy.dtype)
        return dy * (pos + (_c(dy, attrs["alpha"]) + y) * neg)

    def flops_per_element(self, attrs):
        return TRANSCENDENTAL_FLOPS + 4


@register
class Sigmoid(_Neuron):
    """Caffe computes ``0.5 * tanh(0.5 * x) + 0.5`` in double and stores float."""
    type = "Sigmoid"
    caffe_param = "sigmoid_param"

    def from_caffe(self, layer, phase):
        return {}

    def compute(self, attrs, x, params, ctx):
        return 0.5 * np.tanh(0.5 * x.astype(np.float64)) + 0.5

    def backward_uses_outputs(self, attrs):
        return True

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [True]

    def grad(self, attrs, x, y, dy, ctx):
        """``dy * y * (1 - y)``."""
        return dy * y * (_c(y, 1) - y)

    def flops_per_element(self, attrs):
        return TRANSCENDENTAL_FLOPS + 2


@register
class TanH(_Neuron):
    type = "TanH"
    caffe_param = "tanh_param"

    def from_caffe(self, layer, phase):
        return {}

    def compute(self, attrs, x, params, ctx):
        return np.tanh(x)

    def backward_uses_outputs(self, attrs):
        return True

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [True]

    def grad(self, attrs, x, y, dy, ctx):
        """``dy * (1 - y^2)``."""
        return dy * (_c(y, 1) - y * y)

    def flops_per_element(self, attrs):
        return TRANSCENDENTAL_FLOPS


@register
class AbsVal(_Neuron):
    type = "AbsVal"

    def from_caffe(self, layer, phase):
        return {}

    def compute(self, attrs, x, params, ctx):
        return np.abs(x)

    def grad(self, attrs, x, y, dy, ctx):
        """``dy * sign(x)`` (0 at 0)."""
        return dy * np.sign(x)


@register
class Power(_Neuron):
    """``y = (shift + scale * x) ^ power``.

    Caffe special case: when ``power * scale == 0`` the input is ignored and every output
    is ``1`` if ``power == 0`` else ``shift ^ power`` (so NaN/inf inputs do not propagate).
    Otherwise it multiplies by scale (if != 1), adds shift (if != 0) and raises to power
    (if != 1), each as a separate float step."""
    type = "Power"
    caffe_param = "power_param"

    def from_caffe(self, layer, phase):
        p = layer.power_param
        return {"power": float(p.power), "scale": float(p.scale), "shift": float(p.shift)}

    def compute(self, attrs, x, params, ctx):
        power, scale, shift = (_c(x, attrs[k]) for k in ("power", "scale", "shift"))
        if power * scale == 0:
            value = _c(x, 1) if power == 0 else np.power(shift, power)
            return np.full(x.shape, value, dtype=x.dtype)
        y = x
        if scale != 1:
            y = y * scale
        if shift != 0:
            y = y + shift
        if power != 1:
            y = np.power(y, power)
        return y.copy() if y is x else y

    def backward_uses_outputs(self, attrs):
        power, scale, shift = attrs["power"], attrs["scale"], attrs["shift"]
        return power * scale != 0 and power not in (1, 2)

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """A constant derivative (``power * scale == 0`` or power 1) reads nothing."""
        power, scale = attrs["power"], attrs["scale"]
        return [not (power * scale == 0 or power == 1)], [self.backward_uses_outputs(attrs)]

    def grad(self, attrs, x, y, dy, ctx):
        """Caffe's cases, with ``diff_scale = power * scale``: a constant ``diff_scale``
        when it is 0 or power is 1; power 2: ``diff_scale * (scale * x + shift)``; shift 0:
        ``power * y / x``; otherwise ``diff_scale * y / (scale * x + shift)``."""
        power, scale, shift = (_c(x, attrs[k]) for k in ("power", "scale", "shift"))
        diff_scale = power * scale
        if diff_scale == 0 or power == 1:
            d = np.full(x.shape, diff_scale, dtype=x.dtype)
        elif power == 2:
            d = (diff_scale * scale) * x
            if shift != 0:
                d = d + diff_scale * shift
        elif shift == 0:
            d = (y / x) * power
        else:
            base = x
            if scale != 1:
                base = base * scale
            if shift != 0:
                base = base + shift
            d = y / base
            if diff_scale != 1:
                d = d * diff_scale
        return dy * d

    def flops_per_element(self, attrs):
        power, scale, shift = attrs["power"], attrs["scale"], attrs["shift"]
        if power * scale == 0:
            return 0
        pow_cost = {1.0: 0, 2.0: 1}.get(float(power), TRANSCENDENTAL_FLOPS)
        return int(scale != 1) + int(shift != 0) + pow_cost


def _check_base(op_type: str, base: float) -> None:
    if base != -1 and not (base > 0 and math.isfinite(base)):
        raise OpError(f"{op_type} base must be strictly positive and finite (or -1 for e), "
                      f"got {base}",
                      hint="set base to a positive number, or -1 (the default) for base e")


def _log_base(x_dtype, base: float):
    """Caffe: ``log_base = (base == -1) ? 1 : log(base)``, in Dtype."""
    return x_dtype.type(1) if base == -1 else np.log(x_dtype.type(base))


@register
class Exp(_Neuron):
    """``y = base ^ (shift + scale * x)``; base -1 means e.

    Caffe folds it as ``y = outer * exp(inner * x)`` with ``inner = log(base) * scale``
    and ``outer = base ^ shift`` (``exp(shift)`` for base e), skipping a multiply by 1."""
    type = "Exp"
    caffe_param = "exp_param"

    def from_caffe(self, layer, phase):
        p = layer.exp_param
        return {"base": float(p.base), "scale": float(p.scale), "shift": float(p.shift)}

    def check_attrs(self, attrs):
        _check_base("Exp", attrs["base"])

    def _scales(self, attrs, dtype):
        base, scale, shift = (dtype.type(attrs[k]) for k in ("base", "scale", "shift"))
        inner = _log_base(dtype, attrs["base"]) * scale
        if shift == 0:
            outer = dtype.type(1)
        elif attrs["base"] == -1:
            outer = np.exp(shift)
        else:
            outer = np.power(base, shift)
        return inner, outer

    def compute(self, attrs, x, params, ctx):
        inner, outer = self._scales(attrs, x.dtype)
        y = np.exp(x) if inner == 1 else np.exp(x * inner)
        return y * outer if outer != 1 else y

    def backward_uses_outputs(self, attrs):
        return True

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [True]

    def grad(self, attrs, x, y, dy, ctx):
        """``dy * y * inner_scale``."""
        inner, _ = self._scales(attrs, x.dtype)
        d = y * dy
        return d * inner if inner != 1 else d

    def flops_per_element(self, attrs):
        inner, outer = self._scales(attrs, np.dtype(np.float32))
        return TRANSCENDENTAL_FLOPS + int(inner != 1) + int(outer != 1)


@register
class Log(_Neuron):
    """``y = log_base(shift + scale * x)``; base -1 means e.

    Caffe: ``y = log(x * scale + shift) * (1 / log(base))``, skipping steps whose constant
    is neutral. Base 1 is rejected (1/log(1) is infinite)."""
    type = "Log"
    caffe_param = "log_param"

    def from_caffe(self, layer, phase):
        p = layer.log_param
        return {"base": float(p.base), "scale": float(p.scale), "shift": float(p.shift)}

    def check_attrs(self, attrs):
        _check_base("Log", attrs["base"])
        log_base = float(_log_base(np.dtype(np.float32), attrs["base"]))
        if not math.isfinite(log_base) or log_base == 0:
            raise OpError(f"Log base {attrs['base']} gives 1/log(base) = "
                          f"{'inf' if log_base == 0 else 1 / log_base}",
                          hint="use a positive base other than 1 (or -1 for e)")

    def _base_scale(self, attrs, dtype):
        return dtype.type(1) / _log_base(dtype, attrs["base"])

    def compute(self, attrs, x, params, ctx):
        scale, shift = _c(x, attrs["scale"]), _c(x, attrs["shift"])
        y = x
        if scale != 1:
            y = y * scale
        if shift != 0:
            y = y + shift
        y = np.log(y)
        base_scale = self._base_scale(attrs, x.dtype)
        return y * base_scale if base_scale != 1 else y

    def grad(self, attrs, x, y, dy, ctx):
        """``dy * (scale / log(base)) / (scale * x + shift)``."""
        scale, shift = _c(x, attrs["scale"]), _c(x, attrs["shift"])
        d = x
        if scale != 1:
            d = d * scale
        if shift != 0:
            d = d + shift
        d = _c(x, 1) / d
        num_scale = scale * self._base_scale(attrs, x.dtype)
        if num_scale != 1:
            d = d * num_scale
        return dy * d

    def flops_per_element(self, attrs):
        base_scale = self._base_scale(attrs, np.dtype(np.float32))
        return (TRANSCENDENTAL_FLOPS + int(attrs["scale"] != 1) + int(attrs["shift"] != 0)
                + int(base_scale != 1))


@register
class BNLL(_Neuron):
    """Binomial normal log likelihood, softplus ``log(1 + exp(x))`` in Caffe's stable form
    ``x > 0 ? x + log(1 + exp(-x)) : log(1 + exp(x))``. As in Caffe's C++, ``exp`` is taken
    in float and the ``1. + ...``, ``log`` and the sum in double, then stored as float."""
    type = "BNLL"

    def from_caffe(self, layer, phase):
        return {}

    def compute(self, attrs, x, params, ctx):
        xd = x.astype(np.float64)
        pos = xd + np.log(1.0 + np.exp(-x).astype(np.float64))
        neg = np.log(1.0 + np.exp(x).astype(np.float64))
        return np.where(x > 0, pos, neg)

    def grad(self, attrs, x, y, dy, ctx):
        """``dy * e / (e + 1)`` with ``e = exp(min(x, 50))`` (Caffe's kBNLL_THRESHOLD)."""
        e = np.exp(np.minimum(x, _c(x, 50)))
        return dy * e / (e + _c(x, 1))

    def flops_per_element(self, attrs):
        return 2 * TRANSCENDENTAL_FLOPS + 3


@register
class Threshold(_Neuron):
    """``y = 1 if x > threshold else 0`` (strictly greater).  No gradient (Caffe's
    backward is not implemented): gradients stop here."""
    type = "Threshold"
    caffe_param = "threshold_param"
    differentiable = False

    def from_caffe(self, layer, phase):
        return {"threshold": float(layer.threshold_param.threshold)}

    def compute(self, attrs, x, params, ctx):
        return (x > _c(x, attrs["threshold"])).astype(x.dtype)


@register
class Dropout(_Neuron):
    """At test: identity. At train: ``y = x * mask * scale`` with ``mask ~ Bernoulli(1 -
    dropout_ratio)`` drawn from ``ctx.rng`` each forward and ``scale = 1 / (1 - ratio)``
    (computed in double, stored as float, as Caffe does).

    Attrs: ``dropout_ratio``, ``train`` (from the phase). At train, the mask (0/1, the
    input's dtype and shape) is stored in ``ctx.state["mask"]`` and the scale in
    ``ctx.state["scale"]`` for the backward pass: ``dx = dy * mask * scale``.
    The ``scale_train`` field of some Caffe forks is not supported."""
    type = "Dropout"
    caffe_param = "dropout_param"

    def from_caffe(self, layer, phase):
        return {"dropout_ratio": float(layer.dropout_param.dropout_ratio),
                "train": phase == "train"}

    def check_attrs(self, attrs):
        r = attrs["dropout_ratio"]
        if not 0 <= r < 1:
            raise OpError(f"dropout_ratio must be in [0, 1), got {r}",
                          hint="set dropout_ratio to the fraction of units to drop, e.g. 0.5")

    def compute(self, attrs, x, params, ctx):
        if not attrs["train"]:
            return x.copy()
        ratio = attrs["dropout_ratio"]
        mask = (ctx.rng.random(x.shape) < 1.0 - ratio).astype(x.dtype)
        scale = x.dtype.type(1.0 / (1.0 - ratio))
        ctx.state["mask"] = mask
        ctx.state["scale"] = scale
        return x * mask * scale

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [False]     # the mask is in ctx.state

    def backward_state_bytes(self, attrs, in_types, out_types):
        """The mask, one 4-byte value per element (Caffe's ``rand_vec_``)."""
        return 4 * in_types[0].numel if attrs["train"] else 0

    def grad(self, attrs, x, y, dy, ctx):
        """Train: ``dy * mask * scale`` with the forward's mask (from ``ctx.state``);
        test: ``dy``."""
        if not attrs["train"]:
            return dy.copy()
        st = ctx.state
        if "mask" not in st:
            raise OpError("Dropout backward found no mask: the forward pass of this layer "
                          "has not run", hint="run forward before backward")
        return dy * st["mask"] * st["scale"]

    def flops_per_element(self, attrs):
        return 2 if attrs["train"] else 0

    def cost(self, attrs, in_types, param_types, out_types):
        c = super().cost(attrs, in_types, param_types, out_types)
        if attrs["train"]:  # the mask is written too
            c.bytes += out_types[0].nbytes
        return c
