"""Convolution and Deconvolution (``convolution_param``), N-D.

Caffe's geometry, per spatial axis (k kernel, s stride, p pad, d dilation):

* Convolution:   out = (in + 2p - (d(k-1) + 1)) / s + 1   (integer division)
* Deconvolution: out = s(in - 1) + d(k-1) + 1 - 2p
* Convolution weight (out, in/group, *k); Deconvolution weight (in, out/group, *k) — the
  deconvolution is the backward-data pass of a convolution with that weight.
* ``axis`` is the channel axis; axes before it are flattened into the batch, every axis
  after it is spatial.  ``kernel_size``/``stride``/``pad``/``dilation`` are given once or
  once per spatial axis; ``kernel_h``/``kernel_w`` etc. only for 2-D.
* Several bottoms are allowed (all the same shape); bottom i -> top i, sharing weights.

Attributes keep one value per spatial axis (``[kh, kw]`` for the usual 2-D case; a single
``kernel_size: 3`` becomes ``[3, 3]``).  A list whose entries are all equal also applies
to an input with another number of spatial axes, like Caffe's single value does.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..errors import OpError
from ..ir.types import TensorType
from .base import (Cost, Op, ParamSpec, canonical_axis, check_param_shapes, filler_to_dict,
                   register)
from .fillers import compact

_GEOM = ("kernel", "stride", "pad", "dilation")


def conv_out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def deconv_out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * pad


def _per_axis(values: list[int], nsp: int, name: str) -> list[int]:
    if len(values) == nsp:
        return list(values)
    if len(values) == 1 or (values and len(set(values)) == 1):
        return [values[0]] * nsp
    raise OpError(f"{name} has {len(values)} values {values} but the input has {nsp} spatial "
                  f"axes", hint=f"give {name} once, or once per spatial axis")


class Geometry:
    """The resolved geometry of one convolution on one input shape."""

    def __init__(self, attrs: dict, in_shape: tuple[int, ...], transposed: bool):
        rank = len(in_shape)
        self.axis = canonical_axis(int(attrs.get("axis", 1)), rank)
        self.nsp = rank - self.axis - 1
        if self.nsp < 1:
            raise OpError(f"the input has shape {list(in_shape)}: no spatial axis after the "
                          f"channel axis {self.axis}",
                          hint="the input needs (batch..., channels, spatial...) axes; check "
                               "the axis field")
        self.kernel = _per_axis(attrs["kernel"], self.nsp, "kernel_size")
        self.stride = _per_axis(attrs["stride"], self.nsp, "stride")
        self.pad = _per_axis(attrs["pad"], self.nsp, "pad")
        self.dilation = _per_axis(attrs["dilation"], self.nsp, "dilation")
        self.lead = tuple(in_shape[:self.axis])
        self.num = math.prod(self.lead)
        self.channels = in_shape[self.axis]
        self.spatial = tuple(in_shape[self.axis + 1:])
        self.num_output = int(attrs["num_output"])
        self.group = int(attrs.get("group", 1))
        self.transposed = transposed
        self._check()
        size = deconv_out_size if transposed else conv_out_size
        self.out_spatial = tuple(size(n, k, s, p, d) for n, k, s, p, d in zip(
            self.spatial, self.kernel, self.stride, self.pad, self.dilation))
        if any(o <= 0 for o in self.out_spatial):
            raise OpError(f"the output would have spatial size {list(self.out_spatial)} for "
                          f"input {list(in_shape)}",
                          hint="reduce pad, or use a larger input")

    def _check(self):
        for name, vals, lo in (("kernel_size", self.kernel, 1), ("stride", self.stride, 1),
                               ("pad", self.pad, 0), ("dilation", self.dilation, 1)):
            if any(v < lo for v in vals):
                raise OpError(f"{name} {vals} must be >= {lo}",
                              hint=f"give a {name} of at least {lo}")
        if self.num_output <= 0:
            raise OpError(f"num_output must be positive, got {self.num_output}",
                          hint="set convolution_param { num_output: N } with N > 0")
        g = self.group
        if g <= 0:
            raise OpError(f"group must be positive, got {g}", hint="use group >= 1")
        if self.channels % g:
            raise OpError(f"the input has {self.channels} channels, which group {g} does "
                          f"not divide", hint="make group a divisor of the input channels")
        if self.num_output % g:
            raise OpError(f"num_output {self.num_output} is not a multiple of group {g}",
                          hint="make group a divisor of num_output")
        if not self.transposed:
            for i, (n, k, p, d) in enumerate(zip(self.spatial, self.kernel, self.pad,
                                                 self.dilation)):
                extent = d * (k - 1) + 1
                if extent > n + 2 * p:
                    raise OpError(f"the kernel extent {extent} (kernel {k}, dilation {d}) is "
                                  f"larger than the padded input {n + 2 * p} (size {n} + 2*pad "
                                  f"{p}) along spatial axis {i}",
                                  hint="use a smaller kernel_size or dilation, or more pad")

    @property
    def kernel_count(self) -> int:
        return math.prod(self.kernel)

    def weight_shape(self) -> tuple[int, ...]:
        if self.transposed:
            return (self.channels, self.num_output // self.group, *self.kernel)
        return (self.num_output, self.channels // self.group, *self.kernel)

    def out_shape(self) -> tuple[int, ...]:
        return (*self.lead, self.num_output, *self.out_spatial)


def _windows(xp: np.ndarray, kernel, stride, dilation, out_spatial) -> np.ndarray:
    """View of padded input (N, C, *S) as (N, C, *kernel, *out): element
    [n, c, *k, *o] = xp[n, c, *(o*stride + k*dilation)]."""
    st = xp.strides
    nsp = len(kernel)
    shape = (*xp.shape[:2], *kernel, *out_spatial)
    strides = (st[0], st[1], *(st[2 + i] * dilation[i] for i in range(nsp)),
               *(st[2 + i] * stride[i] for i in range(nsp)))
    return as_strided(xp, shape, strides, writeable=False)


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride, pad, dilation,
                 group: int) -> np.ndarray:
    """x (N, C, *S), w (O, C/g, *K) -> (N, O, *out): im2col + one matmul per group."""
    n, c = x.shape[:2]
    o, nsp = w.shape[0], x.ndim - 2
    kernel = w.shape[2:]
    out_spatial = tuple(conv_out_size(x.shape[2 + i], kernel[i], stride[i], pad[i],
                                      dilation[i]) for i in range(nsp))
    if any(pad):
        x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    cols = _windows(x, kernel, stride, dilation, out_spatial)
    kdim = (c // group) * math.prod(kernel)
    cols = cols.reshape(n, group, kdim, math.prod(out_spatial))
    y = np.matmul(w.reshape(group, o // group, kdim), cols)      # (N, g, O/g, P)
    y = y.reshape(n, o, *out_spatial)
    if b is not None:
        y += b.reshape((1, o) + (1,) * nsp)
    return y


def deconv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride, pad,
                   dilation, group: int) -> np.ndarray:
    """x (N, C, *S), w (C, O/g, *K) -> (N, O, *out): matmul to columns, then col2im
    (scatter-add each kernel tap at stride ``stride``), then crop ``pad``."""
    n, c = x.shape[:2]
    og, kernel = w.shape[1], w.shape[2:]
    o, nsp, spatial = og * group, x.ndim - 2, x.shape[2:]
    wm = w.reshape(group, c // group, og * math.prod(kernel)).transpose(0, 2, 1)
    cols = np.matmul(wm, x.reshape(n, group, c // group, math.prod(spatial)))
    cols = cols.reshape(n, o, *kernel, *spatial)
    full = tuple(stride[i] * (spatial[i] - 1) + dilation[i] * (kernel[i] - 1) + 1
                 for i in range(nsp))
    y = np.zeros((n, o, *full), dtype=np.float32)
    for tap in np.ndindex(*kernel):
        sl = tuple(slice(t * d, t * d + s * (m - 1) + 1, s)
                   for t, d, s, m in zip(tap, dilation, stride, spatial))
        y[(slice(None), slice(None), *sl)] += cols[(slice(None), slice(None), *tap)]
    crop = tuple(slice(p, f - p) for p, f in zip(pad, full))
    y = np.ascontiguousarray(y[(slice(None), slice(None), *crop)])
    if b is not None:
        y += b.reshape((1, o) + (1,) * nsp)
    return y


def conv_backward_data(dy: np.ndarray, w: np.ndarray, in_spatial, stride, pad, dilation,
                       group: int) -> np.ndarray:
    """The input gradient of ``conv_forward``: dy (N, O, *out), w (O, C/g, *K) ->
    (N, C, *in_spatial).  Columns ``W^T dy`` per group, scattered back onto the padded
    input (col2im: each kernel tap adds at stride ``stride``), then the pad cropped.
    Input positions no window reaches (the remainder of a strided conv) get 0."""
    n, o = dy.shape[:2]
    cg, kernel = w.shape[1], w.shape[2:]
    c, nsp, out = cg * group, dy.ndim - 2, dy.shape[2:]
    wm = w.reshape(group, o // group, cg * math.prod(kernel)).transpose(0, 2, 1)
    cols = np.matmul(wm, dy.reshape(n, group, o // group, math.prod(out)))
    cols = cols.reshape(n, c, *kernel, *out)
    padded = tuple(in_spatial[i] + 2 * pad[i] for i in range(nsp))
    xp = np.zeros((n, c, *padded), dtype=cols.dtype)
    for tap in np.ndindex(*kernel):
        sl = tuple(slice(t * d, t * d + s * (m - 1) + 1, s)
                   for t, d, s, m in zip(tap, dilation, stride, out))
        xp[(slice(None), slice(None), *sl)] += cols[(slice(None), slice(None), *tap)]
    crop = tuple(slice(p, p + size) for p, size in zip(pad, in_spatial))
    return np.ascontiguousarray(xp[(slice(None), slice(None), *crop)])


def conv_backward_weight(x: np.ndarray, dy: np.ndarray, kernel, stride, pad, dilation,
                         group: int) -> np.ndarray:
    """The weight gradient of ``conv_forward``: x (N, C, *S), dy (N, O, *out) ->
    (O, C/g, *K), ``sum over the batch of dy_g @ im2col(x)_g^T`` (Caffe's weight_cpu_gemm)."""
    n, c = x.shape[:2]
    o, out = dy.shape[1], dy.shape[2:]
    if any(pad):
        x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    cols = _windows(x, kernel, stride, dilation, out)
    kdim = (c // group) * math.prod(kernel)
    cols = cols.reshape(n, group, kdim, math.prod(out))
    dyg = dy.reshape(n, group, o // group, math.prod(out))
    dw = np.matmul(dyg, cols.transpose(0, 1, 3, 2)).sum(axis=0)      # (g, O/g, kdim)
    return dw.reshape(o, c // group, *kernel)


class _ConvBase(Op):
    init_attrs = ("weight_filler", "bias_filler")
    caffe_param = "convolution_param"
    num_inputs = (1, None)
    num_outputs = (1, None)
    transposed = False

    def from_caffe(self, layer, phase: str) -> dict:
        p = layer.convolution_param
        if len(layer.bottom) != len(layer.top):
            raise OpError(f"{self.type} needs as many tops as bottoms, got {len(layer.bottom)} "
                          f"bottom(s) and {len(layer.top)} top(s)",
                          hint="give one top per bottom")
        if p.num_output <= 0:
            raise OpError("num_output is missing or zero",
                          hint="set convolution_param { num_output: N } with N > 0")

        def pick(name: str, h: str, w: str, default: int) -> list[int]:
            if p.HasField(h) or p.HasField(w):
                if len(getattr(p, name)):
                    raise OpError(f"both {name} and {h}/{w} are given",
                                  hint=f"give either {name} or {h} and {w}, not both")
                return [int(getattr(p, h)), int(getattr(p, w))]
            vals = [int(v) for v in getattr(p, name)]
            if not vals:
                return [default, default]
            return vals * 2 if len(vals) == 1 else vals

        kernel = pick("kernel_size", "kernel_h", "kernel_w", 0)
        if not any(kernel) and not len(p.kernel_size):
            raise OpError("the kernel size is missing",
                          hint="set kernel_size (or kernel_h and kernel_w)")
        dil = [int(v) for v in p.dilation] or [1]
        return {
            "num_output": int(p.num_output),
            "bias_term": bool(p.bias_term),
            "kernel": kernel,
            "stride": pick("stride", "stride_h", "stride_w", 1),
            "pad": pick("pad", "pad_h", "pad_w", 0),
            "dilation": dil * 2 if len(dil) == 1 else dil,
            "group": int(p.group),
            "axis": int(p.axis),
            "weight_filler": compact(filler_to_dict(p.weight_filler)),
            "bias_filler": compact(filler_to_dict(p.bias_filler)),
        }

    def geometry(self, attrs: dict, in_type: TensorType) -> Geometry:
        return Geometry(attrs, in_type.shape, self.transposed)

    def param_specs(self, attrs, in_types):
        geo = self.geometry(attrs, in_types[0])
        specs = [ParamSpec(geo.weight_shape(), dict(attrs.get("weight_filler") or {}))]
        if attrs.get("bias_term", True):
            specs.append(ParamSpec((geo.num_output,), dict(attrs.get("bias_filler") or {})))
        return specs

    def infer(self, attrs, in_types, param_types):
        for i, t in enumerate(in_types[1:], 1):
            if t.shape != in_types[0].shape:
                raise OpError(f"all bottoms of {self.type} must have the same shape: bottom 0 is "
                              f"{list(in_types[0].shape)}, bottom {i} is {list(t.shape)}",
                              hint="use one layer per input shape")
        geo = self.geometry(attrs, in_types[0])
        want = [geo.weight_shape()]
        if attrs.get("bias_term", True):
            want.append((geo.num_output,))
        check_param_shapes(self.type, param_types, want,
                           hint="the weights do not match num_output/kernel_size/group or the "
                                "input channels")
        return [TensorType(geo.out_shape(), t.dtype) for t in in_types]

    def forward(self, attrs, inputs, params, ctx):
        geo = Geometry(attrs, inputs[0].shape, self.transposed)
        w = np.asarray(params[0], dtype=np.float32)
        b = np.asarray(params[1], dtype=np.float32) if attrs.get("bias_term", True) else None
        fn = deconv_forward if self.transposed else conv_forward
        outs = []
        for x in inputs:
            x3 = np.asarray(x, dtype=np.float32).reshape(geo.num, geo.channels, *geo.spatial)
            y = fn(x3, w, b, geo.stride, geo.pad, geo.dilation, geo.group)
            outs.append(y.reshape(geo.out_shape()).astype(np.float32, copy=False))
        return outs

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """The bottoms only for the weight gradient (``dx`` needs W and dy alone)."""
        return [bool(need_params[0])] * len(need_inputs), [False] * n_outputs

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Per bottom i (top i's gradient dy): Convolution ``dx = col2im(W^T dy)``,
        ``dW += dy im2col(x)^T``; Deconvolution (a transposed convolution) ``dx =
        conv(dy, W)``, ``dW += x im2col(dy)^T``; ``db += sum(dy)`` over batch and space.
        The weights are shared by all bottoms, so their gradients add up."""
        geo = Geometry(attrs, inputs[0].shape, self.transposed)
        w = params[0]
        bias = attrs.get("bias_term", True)
        dw = np.zeros_like(w) if need_params[0] else None
        db = np.zeros_like(params[1]) if bias and need_params[1] else None
        grads = []
        for x, dy, need in zip(inputs, grad_outputs, need_inputs):
            if dy is None:
                grads.append(np.zeros_like(x) if need else None)
                continue
            x3 = x.reshape(geo.num, geo.channels, *geo.spatial)
            dy3 = dy.reshape(geo.num, geo.num_output, *geo.out_spatial)
            args = (geo.stride, geo.pad, geo.dilation, geo.group)
            if self.transposed:
                dx = conv_forward(dy3, w, None, *args) if need else None
                if dw is not None:
                    dw += conv_backward_weight(dy3, x3, geo.kernel, *args)
            else:
                dx = conv_backward_data(dy3, w, geo.spatial, *args) if need else None
                if dw is not None:
                    dw += conv_backward_weight(x3, dy3, geo.kernel, *args)
            if db is not None:
                db += dy3.sum(axis=(0, *range(2, dy3.ndim)), dtype=dy3.dtype)
            grads.append(None if dx is None else dx.reshape(x.shape))
        return grads, ([dw, db] if bias else [dw])

    def cost(self, attrs, in_types, param_types, out_types):
        geo = self.geometry(attrs, in_types[0])
        if self.transposed:
            macs = (geo.num * geo.channels * math.prod(geo.spatial)
                    * (geo.num_output // geo.group) * geo.kernel_count)
        else:
            macs = (geo.num * geo.num_output * math.prod(geo.out_spatial)
                    * (geo.channels // geo.group) * geo.kernel_count)
        bias = out_types[0].numel if attrs.get("bias_term", True) else 0
        flops = (2 * macs + bias) * len(in_types)
        nbytes = sum(t.nbytes for t in (*in_types, *param_types, *out_types))
        return Cost(flops=flops, bytes=nbytes)


@register
class Convolution(_ConvBase):
    type = "Convolution"
    transposed = False


@register
class Deconvolution(_ConvBase):
    type = "Deconvolution"
    transposed = True
