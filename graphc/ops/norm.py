"""Normalizations: LRN (``lrn_param``), BatchNorm (``batch_norm_param``), MVN (``mvn_param``).

LRN, 4-D input, odd ``local_size`` n, pre = (n - 1) / 2:

* ACROSS_CHANNELS: scale = k + alpha/n * sum of x^2 over channels [c - pre, c + pre]
  (zero outside the blob); y = x * scale^-beta.
* WITHIN_CHANNEL: Caffe builds it from other layers: AVE pooling of x^2 with kernel n,
  pad pre, stride 1 (so the sum is always divided by n*n, padding counted), then
  y = x * (1 + alpha * avg)^-beta.  ``k`` is not used.

BatchNorm owns three blobs: mean (C), variance (C) and a scale factor s (1).  With
``use_global_stats`` (Caffe's default in TEST) it uses mean/s and variance/s (0 if s == 0);
otherwise the batch statistics over every axis but 1, and it updates the blobs in place:
s = s*maf + 1, mean_blob = mean_blob*maf + mean, var_blob = var_blob*maf + m/(m-1)*var
(m = count / C, the factor is 1 when m == 1).  y = (x - mean) / sqrt(var + eps).
Caffe forces lr_mult 0 on all three blobs.

MVN normalizes each (n, c) slice (each n with ``across_channels``) of an input with at
most 4 axes: y = x - mean, then y / (sqrt(var) + eps) when ``normalize_variance`` (Caffe
adds eps to the standard deviation, not to the variance).
"""
from __future__ import annotations

import numpy as np

from ..errors import OpError
from .base import Cost, Op, ParamSpec, register
from .pool import ave_pool, ave_pool_backward


def _enum_name(msg, field: str) -> str:
    value = getattr(msg, field)
    return msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name


# ---------------------------------------------------------------------------------- LRN
@register
class LRN(Op):
    type = "LRN"
    caffe_param = "lrn_param"

    def from_caffe(self, layer, phase: str) -> dict:
        p = layer.lrn_param
        attrs = {"local_size": int(p.local_size), "alpha": float(p.alpha),
                 "beta": float(p.beta), "k": float(p.k),
                 "norm_region": _enum_name(p, "norm_region")}
        self._check(attrs)
        return attrs

    @staticmethod
    def _check(attrs) -> None:
        n = int(attrs["local_size"])
        if n <= 0 or n % 2 == 0:
            raise OpError(f"LRN local_size must be a positive odd number, got {n}",
                          hint="use an odd local_size such as 5")
        if attrs.get("norm_region", "ACROSS_CHANNELS") not in ("ACROSS_CHANNELS",
                                                                "WITHIN_CHANNEL"):
            raise OpError(f"unknown LRN norm_region {attrs['norm_region']!r}",
                          hint="use ACROSS_CHANNELS or WITHIN_CHANNEL")

    def infer(self, attrs, in_types, param_types):
        self._check(attrs)
        if in_types[0].rank != 4:
            raise OpError(f"LRN needs a 4-D (num, channels, height, width) input, got shape "
                          f"{list(in_types[0].shape)}", hint="reshape the input to 4 axes")
        return [in_types[0]]

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        n = int(attrs["local_size"])
        pre = (n - 1) // 2
        alpha, beta = np.float32(attrs["alpha"]), np.float32(attrs["beta"])
        sq = x * x
        if attrs.get("norm_region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS":
            c = x.shape[1]
            padded = np.pad(sq, [(0, 0), (pre, pre), (0, 0), (0, 0)])
            acc = np.zeros_like(x)
            for i in range(n):
                acc += padded[:, i:i + c]
            scale = np.float32(attrs["k"]) + (alpha / np.float32(n)) * acc
        else:
            hw = list(x.shape[2:])
            avg = ave_pool(sq, [n, n], [1, 1], [pre, pre], hw)
            scale = np.float32(1.0) + alpha * avg
        return [(x * np.power(scale, -beta)).astype(np.float32, copy=False)]

    @staticmethod
    def _channel_window_sum(t: np.ndarray, n: int) -> np.ndarray:
        """Sum over channels [c - pre, c + pre] (zero outside the blob)."""
        pre, c = (n - 1) // 2, t.shape[1]
        padded = np.pad(t, [(0, 0), (pre, pre), (0, 0), (0, 0)])
        acc = np.zeros_like(t)
        for i in range(n):
            acc += padded[:, i:i + c]
        return acc

    def backward_uses_outputs(self, attrs):
        return attrs.get("norm_region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS"

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """x only: ACROSS_CHANNELS computes the top again from x and the scale it needs
        anyway (bit for bit the forward's) when it is not given."""
        return [True], [False]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """ACROSS_CHANNELS (Caffe's CrossChannelBackward): ``dx = dy * scale^-beta -
        (2 alpha beta / n) * x * sum over the channel window of (dy * y / scale)``.
        WITHIN_CHANNEL: the chain rule through Caffe's square -> AVE pool -> power ->
        product layers: ``dx = dy * s^-beta + 2 x * avepool_backward(-alpha beta * dy * x *
        s^-beta / s)``, ``s = 1 + alpha * avepool(x^2)``."""
        x, dy = inputs[0], grad_outputs[0]
        if not need_inputs[0]:
            return [None], []
        if dy is None:
            return [np.zeros_like(x)], []
        dt = x.dtype
        n = int(attrs["local_size"])
        pre = (n - 1) // 2
        alpha, beta = dt.type(attrs["alpha"]), dt.type(attrs["beta"])
        sq = x * x
        if attrs.get("norm_region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS":
            scale = dt.type(attrs["k"]) + (alpha / dt.type(n)) * self._channel_window_sum(sq, n)
            y = outputs[0] if outputs[0] is not None else x * np.power(scale, -beta)
            ratio = self._channel_window_sum(dy * y / scale, n)
            cache = dt.type(2.0 * float(alpha) * float(beta) / n)
            dx = dy * np.power(scale, -beta) - cache * x * ratio
        else:
            hw = list(x.shape[2:])
            s = dt.type(1.0) + alpha * ave_pool(sq, [n, n], [1, 1], [pre, pre], hw).astype(dt)
            s_pow = np.power(s, -beta)
            d_avg = dy * x * (-beta * alpha) * s_pow / s
            d_sq = ave_pool_backward(sq, d_avg, [n, n], [1, 1], [pre, pre], hw)
            dx = dy * s_pow + dt.type(2) * x * d_sq
        return [dx.astype(dt, copy=False)], []

    def cost(self, attrs, in_types, param_types, out_types):
        n = int(attrs["local_size"])
        window = n if attrs.get("norm_region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS" else n * n
        return Cost(flops=in_types[0].numel * (window + 4),
                    bytes=in_types[0].nbytes + out_types[0].nbytes)


# ---------------------------------------------------------------------------- BatchNorm
def _bn_channels(shape) -> int:
    return shape[1] if len(shape) > 1 else 1


@register
class BatchNorm(Op):
    type = "BatchNorm"
    caffe_param = "batch_norm_param"
    updates_params = True
    inplace_ok = True
    fixed_lr_mult = 0.0   # Caffe: the statistics are not learnable

    def from_caffe(self, layer, phase: str) -> dict:
        p = layer.batch_norm_param
        use_global = bool(p.use_global_stats) if p.HasField("use_global_stats") \
            else phase == "test"
        for i, ps in enumerate(layer.param):
            if ps.lr_mult != 0:   # as in Caffe, an entry without lr_mult means lr_mult 1
                raise OpError(f"BatchNorm param {i} has lr_mult {ps.lr_mult:g}; its blobs are "
                              f"statistics, not learnable parameters",
                              hint="set lr_mult: 0 (or drop the param entries); put the "
                                   "learnable scale/shift in a Scale layer")
        return {"use_global_stats": use_global,
                "moving_average_fraction": float(p.moving_average_fraction),
                "eps": float(p.eps)}

    def param_specs(self, attrs, in_types):
        c = _bn_channels(in_types[0].shape)
        zero = {"type": "constant", "value": 0.0}
        return [ParamSpec((c,), dict(zero)), ParamSpec((c,), dict(zero)),
                ParamSpec((1,), dict(zero))]

    def infer(self, attrs, in_types, param_types):
        if in_types[0].rank < 1:
            raise OpError("BatchNorm needs an input with at least one axis")
        c = _bn_channels(in_types[0].shape)
        want = [(c,), (c,), (1,)]
        if len(param_types) != 3:
            raise OpError(f"BatchNorm needs 3 param blobs (mean, variance, scale factor), got "
                          f"{len(param_types)}", hint="check the weights file")
        for name, t, w in zip(("mean", "variance", "scale factor"), param_types, want):
            if tuple(t.shape) != w:
                raise OpError(f"the {name} blob has shape {list(t.shape)} but this layer needs "
                              f"{list(w)}",
                              hint=f"the input has {c} channels; the weights do not match it")
        return [in_types[0]]

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        c = _bn_channels(x.shape)
        x3 = x.reshape(x.shape[0], c, -1)
        eps = np.float32(attrs.get("eps", 1e-5))
        if attrs.get("use_global_stats", True):
            s = np.float32(params[2].reshape(-1)[0])
            factor = np.float32(0.0) if s == 0 else np.float32(1.0) / s
            mean = factor * params[0].astype(np.float32)
            var = factor * params[1].astype(np.float32)
        else:
            mean = x3.mean(axis=(0, 2), dtype=np.float64).astype(np.float32)
            var = np.square(x3 - mean[None, :, None], dtype=np.float64).mean(axis=(0, 2))
            var = var.astype(np.float32)
            maf = np.float32(attrs.get("moving_average_fraction", 0.999))
            m = x.size // c
            corr = np.float32(m / (m - 1)) if m > 1 else np.float32(1.0)
            params[2][...] = params[2] * maf + np.float32(1.0)
            params[0][...] = mean + maf * params[0]
            params[1][...] = corr * var + maf * params[1]
            ctx.state["var"] = var      # for backward (Caffe keeps variance_ too)
        y = (x3 - mean[None, :, None]) / np.sqrt(var + eps)[None, :, None]
        return [y.reshape(x.shape).astype(np.float32, copy=False)]

    def backward_uses_outputs(self, attrs):
        return not attrs.get("use_global_stats", True)

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """Global statistics: nothing (the variance is a param); batch statistics: the
        top, with the batch variance the forward kept in ``ctx.state`` -- not x."""
        return [False], [self.backward_uses_outputs(attrs)]

    def backward_state_bytes(self, attrs, in_types, out_types):
        return 0 if attrs.get("use_global_stats", True) else 4 * _bn_channels(in_types[0].shape)

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: with global statistics ``dx = dy / sqrt(var + eps)``; with batch
        statistics ``dx = (dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps)``, the means
        per channel over batch and space (y: the top; var: the forward's batch variance,
        from ``ctx.state``).  The statistics blobs get no
        gradient (lr_mult 0)."""
        x, dy = inputs[0], grad_outputs[0]
        none = [None] * len(params)
        if not need_inputs[0]:
            return [None], none
        if dy is None:
            return [np.zeros_like(x)], none
        dt = x.dtype
        c = _bn_channels(x.shape)
        x3 = x.reshape(x.shape[0], c, -1)
        dy3 = dy.reshape(x3.shape)
        eps = dt.type(attrs.get("eps", 1e-5))
        if attrs.get("use_global_stats", True):
            s = dt.type(params[2].reshape(-1)[0])
            factor = dt.type(0.0) if s == 0 else dt.type(1.0) / s
            var = factor * params[1].astype(dt)
            dx = dy3 / np.sqrt(var + eps)[None, :, None]
            return [dx.reshape(x.shape).astype(dt, copy=False)], none
        if "var" not in ctx.state:
            raise OpError("BatchNorm backward found no batch variance: the forward pass of "
                          "this layer has not run", hint="run forward before backward")
        var = np.asarray(ctx.state["var"]).astype(dt)
        y3 = outputs[0].reshape(x3.shape)
        m = dt.type(x3.shape[0] * x3.shape[2])
        mean_dy = dy3.sum(axis=(0, 2), dtype=dt) / m
        mean_dyy = (dy3 * y3).sum(axis=(0, 2), dtype=dt) / m
        dx = (dy3 - mean_dy[None, :, None] - mean_dyy[None, :, None] * y3) \
            / np.sqrt(var + eps)[None, :, None]
        return [dx.reshape(x.shape).astype(dt, copy=False)], none

    def cost(self, attrs, in_types, param_types, out_types):
        per = 2 if attrs.get("use_global_stats", True) else 6
        return Cost(flops=in_types[0].numel * per,
                    bytes=sum(t.nbytes for t in (*in_types, *param_types, *out_types)))


# ---------------------------------------------------------------------------------- MVN
@register
class MVN(Op):
    type = "MVN"
    caffe_param = "mvn_param"

    def from_caffe(self, layer, phase: str) -> dict:
        p = layer.mvn_param
        return {"normalize_variance": bool(p.normalize_variance),
                "across_channels": bool(p.across_channels), "eps": float(p.eps)}

    @staticmethod
    def _rows(attrs, shape) -> int:
        """How many independently normalized slices (Caffe's legacy num/channels)."""
        if len(shape) > 4:
            raise OpError(f"MVN takes at most 4 axes, got shape {list(shape)}",
                          hint="reshape the input to (num, channels, height, width)")
        num = shape[0] if len(shape) > 0 else 1
        ch = shape[1] if len(shape) > 1 else 1
        return num if attrs.get("across_channels") else num * ch

    def infer(self, attrs, in_types, param_types):
        self._rows(attrs, in_types[0].shape)
        return [in_types[0]]

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        rows = x.reshape(self._rows(attrs, x.shape), -1)
        y = rows - rows.mean(axis=1, dtype=np.float64).astype(np.float32)[:, None]
        if attrs.get("normalize_variance", True):
            var = np.square(y, dtype=np.float64).mean(axis=1).astype(np.float32)
            y = y / (np.sqrt(var) + np.float32(attrs.get("eps", 1e-9)))[:, None]
        return [y.reshape(x.shape).astype(np.float32, copy=False)]

    def backward_uses_outputs(self, attrs):
        return attrs.get("normalize_variance", True)

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """Mean only: nothing (``dx = dy - mean(dy)``); with the variance: x and the top."""
        v = bool(attrs.get("normalize_variance", True))
        return [v], [v]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe, per normalized slice of ``dim`` values: ``dx = dy - mean(dy)``; with
        ``normalize_variance`` ``dx = (dy - mean(dy) - y * mean(y * dy)) / (std + eps)``
        (y: the top; exact only up to Caffe's eps on the standard deviation)."""
        x, dy = inputs[0], grad_outputs[0]
        if not need_inputs[0]:
            return [None], []
        if dy is None:
            return [np.zeros_like(x)], []
        dt = x.dtype
        rows = x.reshape(self._rows(attrs, x.shape), -1)
        d = dy.reshape(rows.shape)
        dim = dt.type(rows.shape[1])
        if not attrs.get("normalize_variance", True):
            dx = d - (d.sum(axis=1, dtype=dt) / dim)[:, None]
            return [dx.reshape(x.shape).astype(dt, copy=False)], []
        y = outputs[0].reshape(rows.shape)
        centered = rows - rows.mean(axis=1, dtype=np.float64).astype(dt)[:, None]
        var = np.square(centered, dtype=np.float64).mean(axis=1).astype(dt)
        std = np.sqrt(var) + dt.type(attrs.get("eps", 1e-9))
        inner = y * (d * y).sum(axis=1, dtype=dt)[:, None] + d.sum(axis=1, dtype=dt)[:, None]
        dx = (d - inner / dim) / std[:, None]
        return [dx.reshape(x.shape).astype(dt, copy=False)], []

    def cost(self, attrs, in_types, param_types, out_types):
        per = 6 if attrs.get("normalize_variance", True) else 2
        return Cost(flops=in_types[0].numel * per,
                    bytes=2 * in_types[0].nbytes + out_types[0].nbytes)
