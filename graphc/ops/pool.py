"""Pooling (``pooling_param``): MAX, AVE, STOCHASTIC over a 4-D (N, C, H, W) blob.

Caffe's rules, per spatial axis (k kernel, s stride, p pad):

* out = ceil((H + 2p - k) / s) + 1 (``round_mode: FLOOR`` uses floor); then, if any pad is
  non-zero, a last window that would start at or beyond H + p is dropped.
* MAX ignores padding (the window is clipped to the image); the first maximum in row-major
  order wins; a window with nothing greater than -FLT_MAX gives -FLT_MAX.  A second top
  receives the argmax as a float index h * W + w into the input plane (-1 if none).
* AVE sums the window clipped to the image but divides by the window clipped to the
  *padded* extent: (min(hs + k, H + p) - hs) * (min(ws + k, W + p) - ws), hs = oh*s - p.
* STOCHASTIC (no padding): at TEST the window's sum(x^2) / (FLT_MIN + sum(x)); at TRAIN a
  position drawn with probability x / sum(x) (inputs are expected to be >= 0).  This is
  Caffe's GPU code; its CPU code does not implement STOCHASTIC at all.
* ``global_pooling``: the kernel is the whole H x W plane (pad 0, stride 1).
"""
from __future__ import annotations

import numpy as np

from ..errors import OpError
from .base import Cost, Op, register

FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)

METHODS = ("MAX", "AVE", "STOCHASTIC")
ROUND_MODES = ("CEIL", "FLOOR")


def _enum_name(msg, field: str) -> str:
    value = getattr(msg, field)
    return msg.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name


def pooled_size(size: int, kernel: int, stride: int, pad: int, round_mode: str,
                any_pad: bool) -> int:
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if round_mode == "CEIL" else span // stride) + 1
    if any_pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pool_geometry(attrs: dict, in_shape) -> tuple[list[int], list[int], list[int], list[int]]:
    """(kernel, stride, pad, out) for the two spatial axes of an (N, C, H, W) input."""
    if len(in_shape) != 4:
        raise OpError(f"Pooling needs a 4-D (num, channels, height, width) input, got shape "
                      f"{list(in_shape)}", hint="reshape the input to 4 axes")
    hw = list(in_shape[2:])
    if attrs.get("global_pooling"):
        kernel, stride, pad = hw, [1, 1], [0, 0]
    else:
        kernel, stride, pad = list(attrs["kernel"]), list(attrs["stride"]), list(attrs["pad"])
    any_pad = any(pad)
    out = [pooled_size(n, k, s, p, attrs.get("round_mode", "CEIL"), any_pad)
           for n, k, s, p in zip(hw, kernel, stride, pad)]
    if any(o <= 0 for o in out):
        raise OpError(f"the pooled output would be {out} for input {list(in_shape)} (kernel "
                      f"{kernel}, stride {stride}, pad {pad})",
                      hint="use a smaller kernel or more pad")
    return kernel, stride, pad, out


def _taps(xp: np.ndarray, kernel, stride, out):
    """Yield (i, j, view): view[n, c, oh, ow] = xp[n, c, oh*sh + i, ow*sw + j]."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]


def _pad_for(x: np.ndarray, kernel, stride, pad, out, value: float) -> np.ndarray:
    """Pad H/W by ``pad`` before and by whatever the last window needs after."""
    widths = [(0, 0), (0, 0)]
    for n, k, s, p, o in zip(x.shape[2:], kernel, stride, pad, out):
        widths.append((p, max(0, (o - 1) * s - p + k - n)))
    return np.pad(x, widths, constant_values=value)


def max_pool(x, kernel, stride, pad, out):
    """Caffe's MAX: returns (values, argmax index h*W + w as float32)."""
    W = x.shape[3]
    xp = _pad_for(x, kernel, stride, pad, out, -np.inf)
    val = np.full(x.shape[:2] + tuple(out), -FLT_MAX, dtype=np.float32)
    idx = np.full(val.shape, -1.0, dtype=np.float32)
    hs = np.arange(out[0]) * stride[0] - pad[0]
    ws = np.arange(out[1]) * stride[1] - pad[1]
    for i, j, v in _taps(xp, kernel, stride, out):
        better = v > val
        val = np.where(better, v, val)
        pos = ((hs + i)[:, None] * W + (ws + j)[None, :]).astype(np.float32)
        idx = np.where(better, pos, idx)
    return val, idx


def ave_pool_divisor(size_hw, kernel, stride, pad, out) -> np.ndarray:
    """Caffe's AVE divisor per output position (the window clipped to the padded extent)."""
    dims = []
    for n, k, s, p, o in zip(size_hw, kernel, stride, pad, out):
        start = np.arange(o) * s - p
        dims.append(np.minimum(start + k, n + p) - start)
    return np.outer(dims[0], dims[1]).astype(np.float32)


def ave_pool(x, kernel, stride, pad, out):
    xp = _pad_for(x, kernel, stride, pad, out, 0.0)
    acc = np.zeros(x.shape[:2] + tuple(out), dtype=np.float32)
    for _, _, v in _taps(xp, kernel, stride, out):
        acc += v
    div = ave_pool_divisor(x.shape[2:], kernel, stride, pad, out)
    with np.errstate(divide="ignore", invalid="ignore"):   # Caffe divides by <= 0 too
        return acc / div


def stochastic_pool(x, kernel, stride, out, train: bool, rng: np.random.Generator,
                    record: dict | None = None):
    xp = _pad_for(x, kernel, stride, [0, 0], out, 0.0)
    if not train:
        s = np.full(x.shape[:2] + tuple(out), FLT_MIN, dtype=np.float32)
        sq = np.zeros_like(s)
        for _, _, v in _taps(xp, kernel, stride, out):
            s += v
            sq += v * v
        with np.errstate(divide="ignore", invalid="ignore"):
            return sq / s
    valid = _pad_for(np.ones((1, 1) + x.shape[2:], dtype=bool), kernel, stride, [0, 0],
                     out, False)
    total = np.zeros(x.shape[:2] + tuple(out), dtype=np.float32)
    for _, _, v in _taps(xp, kernel, stride, out):
        total += v
    thres = rng.random(total.shape, dtype=np.float32) * total
    csum = np.zeros_like(total)
    val = np.zeros_like(total)
    done = np.zeros(total.shape, dtype=bool)
    choice = np.full(total.shape, -1, dtype=np.int64)    # the tap drawn (for backward)
    for k, ((_, _, v), (_, _, ok)) in enumerate(zip(_taps(xp, kernel, stride, out),
                                                     _taps(valid, kernel, stride, out))):
        csum += v
        hit = ok & ~done & (csum >= thres)
        val = np.where(hit, v, val)
        choice[hit] = k
        done |= hit
    if record is not None:
        record["stochastic_tap"] = choice
    return val


def max_pool_backward(x, dy, kernel, stride, pad, out, idx=None):
    """MAX: each top gradient goes to the input position of its window's first maximum
    (the forward's argmax ``idx``, found again in x when not given), ``+=`` where windows
    overlap; windows without one give none."""
    if idx is None:
        _, idx = max_pool(x, kernel, stride, pad, out)
    n, c, h, w = x.shape
    idx = idx.astype(np.int64).reshape(n * c, -1)
    dx = np.zeros((n * c, h * w), dtype=dy.dtype)
    rows = np.broadcast_to(np.arange(n * c)[:, None], idx.shape)
    ok = idx >= 0
    np.add.at(dx, (rows[ok], idx[ok]), dy.reshape(n * c, -1)[ok])
    return dx.reshape(x.shape)


def ave_pool_backward(x, dy, kernel, stride, pad, out):
    """AVE: each top gradient divided by its window's divisor, added to every input
    position of the window (clipped to the image)."""
    dxp = _pad_for(np.zeros_like(dy, shape=x.shape), kernel, stride, pad, out, 0.0)
    div = ave_pool_divisor(x.shape[2:], kernel, stride, pad, out).astype(dy.dtype)
    share = dy / div
    for _, _, v in _taps(dxp, kernel, stride, out):
        v += share
    h, w = x.shape[2:]
    return np.ascontiguousarray(dxp[:, :, pad[0]:pad[0] + h, pad[1]:pad[1] + w])


def stochastic_pool_backward(x, dy, kernel, stride, out, choice):
    """STOCHASTIC at train (Caffe's GPU code): the gradient goes to the drawn position."""
    dxp = _pad_for(np.zeros_like(dy, shape=x.shape), kernel, stride, [0, 0], out, 0.0)
    zero = dy.dtype.type(0)
    for k, (_, _, v) in enumerate(_taps(dxp, kernel, stride, out)):
        v += np.where(choice == k, dy, zero)
    h, w = x.shape[2:]
    return np.ascontiguousarray(dxp[:, :, :h, :w])


@register
class Pooling(Op):
    type = "Pooling"
    caffe_param = "pooling_param"
    num_inputs = 1
    num_outputs = (1, 2)

    def from_caffe(self, layer, phase: str) -> dict:
        p = layer.pooling_param
        method = _enum_name(p, "pool")
        glob = bool(p.global_pooling)
        if p.HasField("kernel_size") and (p.HasField("kernel_h") or p.HasField("kernel_w")):
            raise OpError("both kernel_size and kernel_h/kernel_w are given",
                          hint="give either kernel_size or kernel_h and kernel_w")
        if p.HasField("pad") and (p.HasField("pad_h") or p.HasField("pad_w")):
            raise OpError("both pad and pad_h/pad_w are given",
                          hint="give either pad or pad_h and pad_w")
        if p.HasField("stride") and (p.HasField("stride_h") or p.HasField("stride_w")):
            raise OpError("both stride and stride_h/stride_w are given",
                          hint="give either stride or stride_h and stride_w")
        if glob:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise OpError("global_pooling takes no kernel size",
                              hint="remove kernel_size, or set global_pooling: false")
            kernel = None
        elif p.HasField("kernel_size"):
            kernel = [int(p.kernel_size)] * 2
        elif p.HasField("kernel_h") and p.HasField("kernel_w"):
            kernel = [int(p.kernel_h), int(p.kernel_w)]
        else:
            raise OpError("the pooling kernel size is missing",
                          hint="set kernel_size (or both kernel_h and kernel_w), or "
                               "global_pooling: true")
        pad = ([int(p.pad_h), int(p.pad_w)] if p.HasField("pad_h") or p.HasField("pad_w")
               else [int(p.pad)] * 2)
        stride = ([int(p.stride_h), int(p.stride_w)]
                  if p.HasField("stride_h") or p.HasField("stride_w") else [int(p.stride)] * 2)
        attrs = {"pool": method, "kernel": kernel, "stride": stride, "pad": pad,
                 "global_pooling": glob, "round_mode": _enum_name(p, "round_mode"),
                 "top_mask": len(layer.top) > 1}
        if method == "STOCHASTIC":
            attrs["train"] = phase == "train"
        self.check_attrs(attrs)
        return attrs

    @staticmethod
    def check_attrs(attrs: dict) -> None:
        method = attrs["pool"]
        if method not in METHODS:
            raise OpError(f"unknown pooling method {method!r}",
                          hint=f"use one of {', '.join(METHODS)}")
        if attrs.get("round_mode", "CEIL") not in ROUND_MODES:
            raise OpError(f"unknown round_mode {attrs['round_mode']!r}", hint="use CEIL or FLOOR")
        pad, stride = attrs["pad"], attrs["stride"]
        if attrs.get("global_pooling"):
            if any(pad) or any(s != 1 for s in stride):
                raise OpError(f"global_pooling needs pad 0 and stride 1, got pad {pad} and "
                              f"stride {stride}", hint="remove pad and stride")
        else:
            kernel = attrs["kernel"]
            if any(k <= 0 for k in kernel):
                raise OpError(f"the pooling kernel {kernel} has a zero size",
                              hint="give kernel sizes >= 1")
            if any(p >= k for p, k in zip(pad, kernel)):
                raise OpError(f"pad {pad} must be smaller than the kernel {kernel}",
                              hint="reduce pad below the kernel size")
        if any(s <= 0 for s in stride):
            raise OpError(f"stride {stride} must be positive", hint="give strides >= 1")
        if any(pad) and method not in ("MAX", "AVE"):
            raise OpError(f"{method} pooling does not support padding",
                          hint="remove pad, or use MAX or AVE pooling")
        if attrs.get("top_mask") and method != "MAX":
            raise OpError(f"only MAX pooling has a second (mask) top; this is {method}",
                          hint="remove the second top")

    def infer(self, attrs, in_types, param_types):
        self.check_attrs(attrs)
        _, _, _, out = pool_geometry(attrs, in_types[0].shape)
        t = in_types[0].with_shape(in_types[0].shape[:2] + tuple(out))
        return [t, t] if attrs.get("top_mask") else [t]

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        kernel, stride, pad, out = pool_geometry(attrs, x.shape)
        method = attrs["pool"]
        if method == "MAX":
            val, idx = max_pool(x, kernel, stride, pad, out)
            if attrs.get("keep_argmax"):
                ctx.state["argmax"] = idx
            return [val, idx] if attrs.get("top_mask") else [val]
        if method == "AVE":
            return [ave_pool(x, kernel, stride, pad, out)]
        if method == "STOCHASTIC":
            train = bool(attrs.get("train"))
            return [stochastic_pool(x, kernel, stride, out, train, ctx.rng,
                                    ctx.state if train else None)]
        raise OpError(f"unknown pooling method {method!r}")

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """MAX finds the argmax again in x, unless ``keep_argmax`` (set by the
        ``pool-argmax`` pass) made the forward keep it in ``ctx.state`` (as Caffe keeps
        ``max_idx_``); AVE and STOCHASTIC (its draw is in ``ctx.state``) need x's shape
        only."""
        return [attrs["pool"] == "MAX" and not attrs.get("keep_argmax")], [False] * n_outputs

    def backward_state_bytes(self, attrs, in_types, out_types):
        """STOCHASTIC in training keeps the drawn position of every top element (Caffe's
        ``rand_idx_``), MAX with ``keep_argmax`` its argmax: one 4-byte value each."""
        keep = ((attrs["pool"] == "STOCHASTIC" and attrs.get("train"))
                or (attrs["pool"] == "MAX" and attrs.get("keep_argmax")))
        return 4 * out_types[0].numel if keep else 0

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe's Backward_cpu (the mask top, if any, gets no gradient): MAX routes to
        the argmax, AVE spreads ``dy / divisor`` over the window, STOCHASTIC (train only)
        routes to the position the forward drew."""
        x, dy = inputs[0], grad_outputs[0]
        if not need_inputs[0]:
            return [None], []
        if dy is None:
            return [np.zeros_like(x)], []
        kernel, stride, pad, out = pool_geometry(attrs, x.shape)
        method = attrs["pool"]
        if method == "MAX":
            idx = None
            if attrs.get("keep_argmax"):
                idx = ctx.state.get("argmax")
                if idx is None:
                    raise OpError("MAX pooling backward found no argmax: the forward pass of "
                                  "this layer has not run", hint="run forward before backward")
            return [max_pool_backward(x, dy, kernel, stride, pad, out, idx)], []
        if method == "AVE":
            return [ave_pool_backward(x, dy, kernel, stride, pad, out)], []
        choice = ctx.state.get("stochastic_tap") if attrs.get("train") else None
        if choice is None:
            raise OpError("STOCHASTIC pooling has a gradient only in training, after its "
                          "forward pass", hint="use MAX or AVE pooling, or train phase")
        return [stochastic_pool_backward(x, dy, kernel, stride, out, choice)], []

    def cost(self, attrs, in_types, param_types, out_types):
        kernel, _, _, _ = pool_geometry(attrs, in_types[0].shape)
        return Cost(flops=out_types[0].numel * kernel[0] * kernel[1],
                    bytes=sum(t.nbytes for t in (*in_types, *out_types)))
