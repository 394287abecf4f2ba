"""Elementwise ops of several operands: Eltwise (PROD / SUM / MAX of same-shape bottoms),
and Scale and Bias, which broadcast a factor along some axes of bottom 0.

Scale/Bias broadcasting (Caffe's rule): the factor (a learned blob, or bottom 1) covers
axes ``[axis, axis + factor.rank)`` of bottom 0, whose dims must equal the factor's shape.
Bottom 0 is seen as ``(outer, dim, inner)`` with ``outer = prod(shape[:axis])``,
``dim = factor.numel`` and ``inner = prod(shape[axis + factor.rank:])``. A scalar factor
(shape ``()``) always uses axis 0. A learned factor's shape is
``shape[axis : axis + num_axes]`` (``num_axes`` -1: to the end; 0: a scalar).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpError
from ..ir.types import TensorType
from .base import (Cost, Op, ParamSpec, canonical_axis, expect_same_shape, filler_to_dict,
                   register)

ELTWISE_OPS = ("PROD", "SUM", "MAX")   # EltwiseParameter.EltwiseOp enum order


def eltwise_max(inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's Eltwise MAX: the max and the index of the bottom it came from.

    Caffe compares bottoms 0 and 1 with ``a > b ? a : b`` (a tie goes to bottom 1), then
    takes bottom ``i >= 2`` only where it is strictly greater than the running max (a tie
    keeps the earlier one). The gradient flows to that index alone."""
    a, b = inputs[0], inputs[1]
    first = a > b
    top = np.where(first, a, b)
    idx = np.where(first, 0, 1).astype(np.int32)
    for i, x in enumerate(inputs[2:], 2):
        take = x > top
        top = np.where(take, x, top)
        idx[take] = i
    return top, idx


@register
class Eltwise(Op):
    """Elementwise PROD, SUM (with one coefficient per bottom) or MAX of >= 2 bottoms of
    the same shape.

    Attrs: ``operation`` ("PROD" | "SUM" | "MAX"), ``coeff`` (one float per bottom; an
    empty list means all 1; Caffe allows coefficients only for SUM and ignores them for
    MAX), ``stable_prod_grad`` (backward only). SUM is ``((c0*b0 + c1*b1) + c2*b2) ...``
    in the bottoms' order, as Caffe's chain of axpy calls."""
    type = "Eltwise"
    caffe_param = "eltwise_param"
    num_inputs = (2, None)
    num_outputs = 1
    inplace_ok = True

    def from_caffe(self, layer, phase):
        p = layer.eltwise_param
        attrs = {"operation": ELTWISE_OPS[p.operation],
                 "coeff": [float(c) for c in p.coeff],
                 "stable_prod_grad": bool(p.stable_prod_grad)}
        if attrs["operation"] == "PROD" and attrs["coeff"]:
            raise OpError("Eltwise takes coefficients only for SUM, not for PROD",
                          hint="remove the coeff fields, or use operation: SUM")
        self._check_attrs(attrs, len(layer.bottom))
        if not attrs["coeff"]:
            attrs["coeff"] = [1.0] * len(layer.bottom)
        return attrs

    def _check_attrs(self, attrs, n: int) -> None:
        op, coeff = attrs["operation"], attrs["coeff"]
        if op not in ELTWISE_OPS:
            raise OpError(f"unknown Eltwise operation {op!r}",
                          hint=f"use one of {', '.join(ELTWISE_OPS)}")
        if len(coeff) not in (0, n):
            raise OpError(f"Eltwise has {n} bottoms but {len(coeff)} coeff values",
                          hint="give one coeff per bottom blob, or none")
        if op == "PROD" and any(c != 1 for c in coeff):
            raise OpError("Eltwise takes coefficients only for SUM, not for PROD",
                          hint="remove the coeff fields, or use operation: SUM")

    def infer(self, attrs, in_types, param_types):
        self.check_arity(len(in_types), 1)
        self._check_attrs(attrs, len(in_types))
        if param_types:
            raise OpError(f"Eltwise has no learnable blobs but got {len(param_types)}",
                          hint="remove the extra parameter blobs")
        expect_same_shape(in_types, f"Eltwise {attrs['operation']} needs bottoms of the same shape",
                          hint="all bottoms of an Eltwise layer must have identical shapes; "
                               "reshape or crop one of them (for ResNet-style shortcuts, use a "
                               "projection convolution when the shapes differ)")
        return [in_types[0]]

    def forward(self, attrs, inputs, params, ctx):
        op = attrs["operation"]
        dt = inputs[0].dtype
        if op == "PROD":
            top = inputs[0] * inputs[1]
            for x in inputs[2:]:
                top = top * x
        elif op == "SUM":
            coeff = attrs["coeff"] or [1.0] * len(inputs)
            top = np.zeros_like(inputs[0])
            for c, x in zip(coeff, inputs):
                top = top + (x if c == 1 else dt.type(c) * x)
        else:
            top, _ = eltwise_max(inputs)
        return [np.asarray(top, dtype=dt)]

    def backward_uses_outputs(self, attrs):
        return attrs["operation"] == "PROD" and not attrs.get("stable_prod_grad", True)

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """SUM: nothing; MAX: every bottom (the argmax); PROD: the other bottoms of each
        needed one (``stable_prod_grad``), else the top and the needed bottoms."""
        op, need = attrs["operation"], [bool(b) for b in need_inputs]
        if op == "SUM":
            return [False] * len(need), [False]
        if op == "MAX":
            return [True] * len(need), [False]
        if attrs.get("stable_prod_grad", True):
            return [any(nd for j, nd in enumerate(need) if j != i)
                    for i in range(len(need))], [False]
        return need, [any(need)]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: PROD gives ``dy *`` the product of the other bottoms
        (``stable_prod_grad``, the default) or ``dy * top / bottom_i``; SUM ``coeff_i * dy``;
        MAX ``dy`` where bottom i gave the max (the forward's tie rule), else 0."""
        op, dt = attrs["operation"], inputs[0].dtype
        dy = grad_outputs[0] if grad_outputs[0] is not None else np.zeros_like(inputs[0])
        idx = eltwise_max(inputs)[1] if op == "MAX" else None
        grads = []
        for i, need in enumerate(need_inputs):
            if not need:
                grads.append(None)
                continue
            if op == "PROD":
                if attrs.get("stable_prod_grad", True):
                    others = [x for j, x in enumerate(inputs) if j != i]
                    d = others[0].copy()
                    for x in others[1:]:
                        d = d * x
                else:
                    with np.errstate(all="ignore"):
                        d = outputs[0] / inputs[i]
                g = d * dy
            elif op == "SUM":
                c = (attrs["coeff"] or [1.0] * len(inputs))[i]
                g = dy.copy() if c == 1 else dt.type(c) * dy
            else:
                g = np.where(idx == i, dy, dt.type(0))
            grads.append(np.asarray(g, dtype=dt))
        return grads, []

    def cost(self, attrs, in_types, param_types, out_types):
        n, numel = len(in_types), out_types[0].numel
        flops = (n - 1) * numel
        if attrs["operation"] == "SUM":
            flops += sum(c != 1 for c in attrs["coeff"]) * numel
        return Cost(flops=flops, bytes=sum(t.nbytes for t in (*in_types, *out_types)))


# ---- Scale / Bias broadcasting ---------------------------------------------------------

def learned_shape(op_type: str, x: TensorType, axis: int, num_axes: int) -> tuple[int, ...]:
    """Shape of a learned Scale/Bias blob: ``x.shape[axis : axis + num_axes]``."""
    ax = canonical_axis(axis, x.rank)
    if num_axes < -1:
        raise OpError(f"{op_type} num_axes must be >= -1, got {num_axes}",
                      hint="use num_axes >= 0, or -1 to extend to the last axis")
    if num_axes == -1:
        return x.shape[ax:]
    if ax + num_axes > x.rank:
        raise OpError(f"{op_type} blob with num_axes {num_axes} starting at axis {ax} extends "
                      f"past bottom 0's shape {list(x.shape)}",
                      hint=f"use num_axes <= {x.rank - ax} (or -1 for all remaining axes)")
    return x.shape[ax:ax + num_axes]


def broadcast_dims(op_type: str, x_shape: tuple[int, ...], factor_shape: tuple[int, ...],
                   axis: int, what: str = "scale") -> tuple[int, int, int]:
    """Caffe's Reshape for Scale/Bias: check the factor against bottom 0 and return
    ``(outer, dim, inner)``."""
    rank, k = len(x_shape), len(factor_shape)
    ax = 0 if k == 0 else canonical_axis(axis, rank)
    if ax + k > rank or tuple(x_shape[ax:ax + k]) != tuple(factor_shape):
        raise OpError(f"{op_type}: {what} shape {list(factor_shape)} does not match bottom 0 "
                      f"shape {list(x_shape)} at axis {ax} (it must equal bottom 0's dims "
                      f"{list(x_shape[ax:ax + k])} there)",
                      hint=f"make the {what} shape equal bottom 0's dims starting at 'axis', "
                           f"or change axis")
    return math.prod(x_shape[:ax]), math.prod(factor_shape), math.prod(x_shape[ax + k:])


def _apply(x: np.ndarray, factor: np.ndarray, axis: int, fn) -> np.ndarray:
    outer, dim, inner = broadcast_dims("", x.shape, np.shape(factor), axis)
    f = np.asarray(factor, dtype=x.dtype).reshape(1, dim, 1)
    return fn(x.reshape(outer, dim, inner), f).reshape(x.shape)


def _reduce_to(t: np.ndarray, factor_shape, axis: int) -> np.ndarray:
    """Sum ``t`` (bottom 0's shape) over the outer and inner axes of the broadcast: the
    gradient of a broadcast factor of ``factor_shape``."""
    outer, dim, inner = broadcast_dims("", t.shape, tuple(factor_shape), axis)
    return t.reshape(outer, dim, inner).sum(axis=(0, 2), dtype=t.dtype).reshape(factor_shape)


def _check_param_shapes(op_type: str, got: list[TensorType], want: list[tuple],
                        names: list[str]) -> None:
    if len(got) != len(want):
        raise OpError(f"{op_type} expects {len(want)} learnable blob(s) "
                      f"({', '.join(names) or 'none'}) but got {len(got)}",
                      hint="check bias_term and the number of bottoms")
    for t, shape, name in zip(got, want, names):
        if t.shape != tuple(shape):
            raise OpError(f"{op_type} {name} blob has shape {list(t.shape)} but the layer "
                          f"needs {list(shape)}",
                          hint="the blob must match bottom 0's dims at axis..axis+num_axes")


@register
class Scale(Op):
    """``top = bottom0 * scale (+ bias)``, scale broadcast as described in the module doc.

    One bottom: the scale is a learned blob (filler default constant 1). Two bottoms:
    bottom 1 is the scale. With ``bias_term`` a learned bias of the scale's shape is added
    (filler ``bias_filler``, default constant 0) after the product, as Caffe's inner
    BiasLayer does. Params, in Caffe order: [scale (one bottom only), bias (if bias_term)].
    Attrs: axis, num_axes, bias_term, filler, bias_filler."""
    type = "Scale"
    init_attrs = ("filler", "bias_filler")
    caffe_param = "scale_param"
    num_inputs = (1, 2)
    num_outputs = 1
    inplace_ok = True

    def from_caffe(self, layer, phase):
        p = layer.scale_param
        filler = (filler_to_dict(p.filler) if p.HasField("filler")
                  else {"type": "constant", "value": 1.0})
        return {"axis": int(p.axis), "num_axes": int(p.num_axes), "bias_term": bool(p.bias_term),
                "filler": filler, "bias_filler": filler_to_dict(p.bias_filler)}

    def _param_shapes(self, attrs, in_types) -> tuple[list[tuple], list[str]]:
        x = in_types[0]
        shapes, names = [], []
        if len(in_types) == 1:
            shapes.append(learned_shape("Scale", x, attrs["axis"], attrs["num_axes"]))
            names.append("scale")
        if attrs["bias_term"]:
            # Caffe's inner BiasLayer: axis, num_axes = rank of the scale
            k = len(shapes[0]) if shapes else in_types[1].rank
            shapes.append(learned_shape("Scale", x, attrs["axis"], k))
            names.append("bias")
        return shapes, names

    def param_specs(self, attrs, in_types):
        shapes, names = self._param_shapes(attrs, in_types)
        fillers = {"scale": attrs["filler"], "bias": attrs["bias_filler"]}
        return [ParamSpec(tuple(s), dict(fillers[n])) for s, n in zip(shapes, names)]

    def infer(self, attrs, in_types, param_types):
        self.check_arity(len(in_types), 1)
        x = in_types[0]
        if len(in_types) == 2:
            broadcast_dims("Scale", x.shape, in_types[1].shape, attrs["axis"], "bottom 1 (scale)")
        shapes, names = self._param_shapes(attrs, in_types)
        _check_param_shapes("Scale", param_types, shapes, names)
        for s, n in zip(shapes, names):
            broadcast_dims("Scale", x.shape, tuple(s), attrs["axis"], n)
        return [x]

    def forward(self, attrs, inputs, params, ctx):
        x = inputs[0]
        if len(inputs) == 2:
            scale, rest = inputs[1], params
        else:
            scale, rest = params[0], params[1:]
        y = _apply(x, scale, attrs["axis"], np.multiply)
        if attrs["bias_term"]:
            y = _apply(y, rest[0], attrs["axis"], np.add)
        return [np.asarray(y, dtype=x.dtype)]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """x only for the scale's gradient; a scale bottom only for x's gradient."""
        if len(need_inputs) == 2:
            return [bool(need_inputs[1]), bool(need_inputs[0])], [False]
        return [bool(need_params[0])], [False]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """Caffe: ``dx = dy * scale``; ``dscale = sum(dy * x)`` and ``dbias = sum(dy)``
        over the axes the factor is broadcast along."""
        x, axis = inputs[0], attrs["axis"]
        dy = grad_outputs[0] if grad_outputs[0] is not None else np.zeros_like(x)
        two = len(inputs) == 2
        scale = inputs[1] if two else params[0]
        need_scale = need_inputs[1] if two else need_params[0]
        d_scale = _reduce_to(dy * x, np.shape(scale), axis) if need_scale else None
        dx = np.asarray(_apply(dy, scale, axis, np.multiply), dtype=x.dtype) \
            if need_inputs[0] else None
        gp: list = [None] * len(params)
        if attrs["bias_term"]:
            k = 0 if two else 1
            if need_params[k]:
                gp[k] = _reduce_to(dy, np.shape(params[k]), axis)
        if two:
            return [dx, d_scale], gp
        gp[0] = d_scale
        return [dx], gp

    def cost(self, attrs, in_types, param_types, out_types):
        numel = out_types[0].numel
        return Cost(flops=numel * (2 if attrs["bias_term"] else 1),
                    bytes=sum(t.nbytes for t in (*in_types, *param_types, *out_types)))


@register
class Bias(Op):
    """``top = bottom0 + bias``, broadcast like Scale. One bottom: the bias is a learned
    blob (filler default constant 0); two bottoms: bottom 1 is the bias.
    Attrs: axis, num_axes, filler."""
    type = "Bias"
    init_attrs = ("filler",)
    caffe_param = "bias_param"
    num_inputs = (1, 2)
    num_outputs = 1
    inplace_ok = True

    def from_caffe(self, layer, phase):
        p = layer.bias_param
        return {"axis": int(p.axis), "num_axes": int(p.num_axes),
                "filler": filler_to_dict(p.filler)}

    def param_specs(self, attrs, in_types):
        if len(in_types) == 2:
            return []
        shape = learned_shape("Bias", in_types[0], attrs["axis"], attrs["num_axes"])
        return [ParamSpec(tuple(shape), dict(attrs["filler"]))]

    def infer(self, attrs, in_types, param_types):
        self.check_arity(len(in_types), 1)
        x = in_types[0]
        if len(in_types) == 2:
            _check_param_shapes("Bias", param_types, [], [])
            broadcast_dims("Bias", x.shape, in_types[1].shape, attrs["axis"], "bottom 1 (bias)")
        else:
            want = learned_shape("Bias", x, attrs["axis"], attrs["num_axes"])
            _check_param_shapes("Bias", param_types, [want], ["bias"])
            broadcast_dims("Bias", x.shape, want, attrs["axis"], "bias")
        return [x]

    def forward(self, attrs, inputs, params, ctx):
        x = inputs[0]
        bias = inputs[1] if len(inputs) == 2 else params[0]
        return [np.asarray(_apply(x, bias, attrs["axis"], np.add), dtype=x.dtype)]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False] * len(need_inputs), [False]    # shapes only

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """``dx = dy``; ``dbias = sum(dy)`` over the broadcast axes."""
        x = inputs[0]
        dy = grad_outputs[0] if grad_outputs[0] is not None else np.zeros_like(x)
        two = len(inputs) == 2
        bias = inputs[1] if two else params[0]
        need_bias = need_inputs[1] if two else need_params[0]
        db = _reduce_to(dy, np.shape(bias), attrs["axis"]) if need_bias else None
        dx = dy.copy() if need_inputs[0] else None
        return ([dx, db], []) if two else ([dx], [db])

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=out_types[0].numel,
                    bytes=sum(t.nbytes for t in (*in_types, *param_types, *out_types)))
