"""InnerProduct (``inner_product_param``) and Embed (``embed_param``).

InnerProduct flattens the input from ``axis`` on: an input (d0, ..., d_{a-1}, d_a, ...)
is an (M, K) matrix with M = d0*...*d_{a-1} and K = d_a*...; the output is
(d0, ..., d_{a-1}, num_output).  The weight is (num_output, K), or (K, num_output) with
``transpose: true``; y = x W^T + b (resp. x W + b).

Embed treats every input element as an index into the rows of its (input_dim, num_output)
weight; the output shape is the input shape + (num_output,).  Caffe stores the indices
as floats; an index outside [0, input_dim) or one that is not a whole number is an error
here (Caffe checks both only in debug builds).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpError
from .base import (Cost, Op, ParamSpec, canonical_axis, check_param_shapes, filler_to_dict,
                   register)
from .fillers import compact


def _check_params(layer_type: str, param_types, want) -> None:
    check_param_shapes(layer_type, param_types, want,
                       hint="the weights do not match num_output or the input size")


@register
class InnerProduct(Op):
    type = "InnerProduct"
    init_attrs = ("weight_filler", "bias_filler")
    caffe_param = "inner_product_param"

    def from_caffe(self, layer, phase: str) -> dict:
        p = layer.inner_product_param
        if p.num_output <= 0:
            raise OpError("num_output is missing or zero",
                          hint="set inner_product_param { num_output: N } with N > 0")
        return {"num_output": int(p.num_output), "bias_term": bool(p.bias_term),
                "axis": int(p.axis), "transpose": bool(p.transpose),
                "weight_filler": compact(filler_to_dict(p.weight_filler)),
                "bias_filler": compact(filler_to_dict(p.bias_filler))}

    @staticmethod
    def _mk(attrs, shape) -> tuple[int, int, int, int]:
        """(axis, M, K, N) for an input of ``shape``."""
        axis = canonical_axis(int(attrs.get("axis", 1)), len(shape))
        n = int(attrs["num_output"])
        if n <= 0:
            raise OpError(f"num_output must be positive, got {n}",
                          hint="set num_output to the number of outputs")
        return axis, math.prod(shape[:axis]), math.prod(shape[axis:]), n

    def _want(self, attrs, shape):
        _, _, k, n = self._mk(attrs, shape)
        want = [(k, n) if attrs.get("transpose") else (n, k)]
        if attrs.get("bias_term", True):
            want.append((n,))
        return want

    def param_specs(self, attrs, in_types):
        want = self._want(attrs, in_types[0].shape)
        specs = [ParamSpec(want[0], dict(attrs.get("weight_filler") or {}))]
        if len(want) > 1:
            specs.append(ParamSpec(want[1], dict(attrs.get("bias_filler") or {})))
        return specs

    def infer(self, attrs, in_types, param_types):
        shape = in_types[0].shape
        axis, _, k, n = self._mk(attrs, shape)
        want = self._want(attrs, shape)
        if param_types and len(param_types[0].shape) == 2:
            # name the real problem first: the input size K no longer matches the weight
            have_k = param_types[0].shape[0 if attrs.get("transpose") else 1]
            if have_k != k and tuple(param_types[0].shape) != want[0]:
                raise OpError(f"the input has {k} values per row (shape {list(shape)} flattened "
                              f"from axis {axis}) but the weight has shape "
                              f"{list(param_types[0].shape)}, which needs {have_k}",
                              hint="the input size is incompatible with the inner product "
                                   "weights; check the input shape and axis")
        _check_params(self.type, param_types, want)
        return [in_types[0].with_shape(shape[:axis] + (n,))]

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0], dtype=np.float32)
        axis, m, k, n = self._mk(attrs, x.shape)
        w = np.asarray(params[0], dtype=np.float32)
        y = x.reshape(m, k) @ (w if attrs.get("transpose") else w.T)
        if attrs.get("bias_term", True):
            y += np.asarray(params[1], dtype=np.float32)
        return [y.reshape(x.shape[:axis] + (n,))]

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """X only for the weight gradient (``dX = dY W`` needs no X)."""
        return [bool(need_params[0])], [False]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """With X (M, K) and dY (M, N): ``dW = dY^T X`` (``X^T dY`` with transpose),
        ``db = sum of dY's rows``, ``dX = dY W`` (``dY W^T`` with transpose)."""
        x = inputs[0]
        _, m, k, n = self._mk(attrs, x.shape)
        w = params[0]
        dy = grad_outputs[0]
        dy = np.zeros((m, n), dtype=x.dtype) if dy is None else dy.reshape(m, n)
        x2 = x.reshape(m, k)
        tr = attrs.get("transpose")
        dw = (x2.T @ dy if tr else dy.T @ x2) if need_params[0] else None
        gp = [dw]
        if attrs.get("bias_term", True):
            gp.append(dy.sum(axis=0, dtype=dy.dtype) if need_params[1] else None)
        dx = (dy @ (w.T if tr else w)).reshape(x.shape) if need_inputs[0] else None
        return [dx], gp

    def cost(self, attrs, in_types, param_types, out_types):
        _, m, k, n = self._mk(attrs, in_types[0].shape)
        flops = 2 * m * k * n + (m * n if attrs.get("bias_term", True) else 0)
        return Cost(flops=flops,
                    bytes=sum(t.nbytes for t in (*in_types, *param_types, *out_types)))


@register
class Embed(Op):
    type = "Embed"
    init_attrs = ("weight_filler", "bias_filler")
    caffe_param = "embed_param"

    def from_caffe(self, layer, phase: str) -> dict:
        p = layer.embed_param
        attrs = {"num_output": int(p.num_output), "input_dim": int(p.input_dim),
                 "bias_term": bool(p.bias_term),
                 "weight_filler": compact(filler_to_dict(p.weight_filler)),
                 "bias_filler": compact(filler_to_dict(p.bias_filler))}
        self._check(attrs)
        return attrs

    @staticmethod
    def _check(attrs) -> None:
        for name in ("num_output", "input_dim"):
            if int(attrs[name]) <= 0:
                raise OpError(f"{name} is missing or zero",
                              hint=f"set embed_param {{ {name}: N }} with N > 0")

    def _want(self, attrs):
        want = [(int(attrs["input_dim"]), int(attrs["num_output"]))]
        if attrs.get("bias_term", True):
            want.append((int(attrs["num_output"]),))
        return want

    def param_specs(self, attrs, in_types):
        want = self._want(attrs)
        specs = [ParamSpec(want[0], dict(attrs.get("weight_filler") or {}))]
        if len(want) > 1:
            specs.append(ParamSpec(want[1], dict(attrs.get("bias_filler") or {})))
        return specs

    def infer(self, attrs, in_types, param_types):
        self._check(attrs)
        _check_params(self.type, param_types, self._want(attrs))
        return [in_types[0].with_shape(in_types[0].shape + (int(attrs["num_output"]),))]

    def forward(self, attrs, inputs, params, ctx):
        x = np.asarray(inputs[0])
        k = int(attrs["input_dim"])
        with np.errstate(invalid="ignore"):
            bad = ~((x >= 0) & (x < k) & (np.floor(x) == x))   # NaN fails every test
        if bad.any():
            first = x.reshape(-1)[np.argmax(bad.reshape(-1))]
            raise OpError(f"Embed input holds {int(bad.sum())} value(s) that are not indices in "
                          f"[0, {k}), e.g. {first!r}",
                          hint=f"feed whole numbers from 0 to {k - 1} (input_dim is {k})")
        idx = x.astype(np.int64)
        y = np.asarray(params[0], dtype=np.float32)[idx]
        if attrs.get("bias_term", True):
            y = y + np.asarray(params[1], dtype=np.float32)
        return [y.astype(np.float32, copy=False)]

    def grad_inputs(self, attrs, n_inputs):
        return [False]   # Caffe: "Can't backpropagate to EmbedLayer input"

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        """The indices only for the weight gradient."""
        return [bool(need_params[0])], [False]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """``dW[index] += dy`` for every input element (repeated indices add up);
        ``db = sum(dy)`` over all elements."""
        n_out = int(attrs["num_output"])
        dy = grad_outputs[0]
        w = params[0]
        dy = (np.zeros(np.shape(inputs[0]) + (n_out,), dtype=w.dtype) if dy is None
              else dy).reshape(-1, n_out)
        gp = [None]
        if need_params[0]:
            dw = np.zeros_like(w, dtype=dy.dtype)
            np.add.at(dw, np.asarray(inputs[0]).astype(np.int64).reshape(-1), dy)
            gp[0] = dw
        if attrs.get("bias_term", True):
            gp.append(dy.sum(axis=0, dtype=dy.dtype) if need_params[1] else None)
        return [None], gp

    def cost(self, attrs, in_types, param_types, out_types):
        flops = out_types[0].numel if attrs.get("bias_term", True) else 0
        return Cost(flops=flops, bytes=in_types[0].nbytes + 2 * out_types[0].nbytes)
