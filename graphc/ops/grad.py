"""The ops of backward graphs (made by the ``autodiff`` pass): Grad, Sum and Fill.

``Grad`` runs one forward node's gradient rule (its op's ``backward``).  Attrs:

* ``op``, ``attrs``, ``node``: the forward node's op type, attributes and name (the name
  keys ``ctx.state``, so Dropout's mask or a Python layer's instance from the forward
  call is what the backward sees);
* ``need_inputs`` (one bool per forward input), ``need_params`` (one bool per param):
  which gradients the node computes (Caffe's ``propagate_down`` and
  ``param_propagate_down``);
* ``outputs``: indices of the forward outputs it reads (when the rule needs top data);
* ``grads``: indices of the forward outputs whose gradients it reads (the others get
  no gradient: zero);
* ``num_outputs``: how many outputs the forward node has.

Inputs, in order: every forward input, the forward outputs listed in ``outputs``, the
gradients listed in ``grads``.  Params: the forward node's params.  Outputs: the
gradient of each needed input, then of each needed param (in that order).

``Sum`` adds its inputs (all of one type), in order: where a value is read by several
nodes, or a param is shared by several layers, the gradients accumulate, as Caffe's
Split layers and shared param diffs do.  ``Fill`` makes a constant tensor (the seed of a
loss top: its loss weight).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpError
from ..ir.types import TensorType
from .base import Cost, Op, get_op, register


class _StateKey:
    """Stands in for ``ctx.node`` so ``ctx.state`` is the forward node's."""

    def __init__(self, name: str):
        self.name = name


def _layout(attrs: dict, n: int) -> tuple[int, list[int], list[int]]:
    n_in = len(attrs["need_inputs"])
    outs, grads = list(attrs.get("outputs", [])), list(attrs["grads"])
    if n != n_in + len(outs) + len(grads):
        raise OpError(f"Grad node has {n} inputs but its attrs describe {n_in} forward "
                      f"input(s) + {len(outs)} forward output(s) + {len(grads)} gradient(s)",
                      hint="inputs are: forward inputs, the outputs in 'outputs', the "
                           "gradients in 'grads'")
    k = int(attrs["num_outputs"])
    for i in (*outs, *grads):
        if not 0 <= i < k:
            raise OpError(f"Grad node refers to forward output {i}, but the forward node "
                          f"has {k}", hint="fix 'outputs'/'grads'")
    return n_in, outs, grads


@register
class Grad(Op):
    type = "Grad"
    num_inputs = (0, None)
    num_outputs = (1, None)
    differentiable = False   # no second derivatives

    def infer(self, attrs, in_types, param_types):
        fwd = get_op(attrs["op"])
        n_in, outs, grads = _layout(attrs, len(in_types))
        need_in, need_p = list(attrs["need_inputs"]), list(attrs["need_params"])
        if len(need_p) != len(param_types):
            raise OpError(f"Grad node has {len(param_types)} params but need_params lists "
                          f"{len(need_p)}", hint="give one need_params entry per param")
        if not any(need_in) and not any(need_p):
            raise OpError("Grad node computes no gradient",
                          hint="set at least one need_inputs/need_params entry")
        fwd_in = list(in_types[:n_in])
        fwd_out = fwd.infer(attrs["attrs"], fwd_in, list(param_types))
        if len(fwd_out) != int(attrs["num_outputs"]):
            raise OpError(f"the forward {attrs['op']} has {len(fwd_out)} outputs, Grad says "
                          f"{attrs['num_outputs']}", hint="fix num_outputs")
        rest = in_types[n_in:]
        for what, idx, types in (("output", outs, rest[:len(outs)]),
                                 ("gradient of output", grads, rest[len(outs):])):
            for i, t in zip(idx, types):
                if t != fwd_out[i]:
                    raise OpError(f"Grad node: {what} {i} has type {t} but the forward "
                                  f"{attrs['op']} gives {fwd_out[i]}",
                                  hint="the backward graph no longer matches its forward node")
        return ([t for t, need in zip(fwd_in, need_in) if need]
                + [t for t, need in zip(param_types, need_p) if need])

    def forward(self, attrs, inputs, params, ctx):
        fwd = get_op(attrs["op"])
        n_in, outs, grads = _layout(attrs, len(inputs))
        k = int(attrs["num_outputs"])
        fwd_in = list(inputs[:n_in])
        outputs: list = [None] * k
        grad_outputs: list = [None] * k
        for i, a in zip(outs, inputs[n_in:n_in + len(outs)]):
            outputs[i] = a
        for i, a in zip(grads, inputs[n_in + len(outs):]):
            grad_outputs[i] = a
        need_in = [bool(b) for b in attrs["need_inputs"]]
        need_p = [bool(b) for b in attrs["need_params"]]
        saved = ctx.node
        ctx.node = _StateKey(attrs["node"])
        try:
            gi, gp = fwd.backward(attrs["attrs"], fwd_in, list(params), outputs, grad_outputs,
                                  need_in, need_p, ctx)
        finally:
            ctx.node = saved
        result = []
        for what, got, need, like in (("input", gi, need_in, fwd_in),
                                      ("param", gp, need_p, params)):
            for i, (g, wanted) in enumerate(zip(got, need)):
                if not wanted:
                    continue
                if g is None:
                    raise RuntimeError(f"{attrs['op']}.backward gave no gradient for "
                                       f"{what} {i} ({attrs['node']})")
                ref = np.asarray(like[i])
                dt = ref.dtype if ref.dtype.kind == "f" else np.float32
                result.append(np.asarray(g, dtype=dt).reshape(ref.shape))
        return result

    def cost(self, attrs, in_types, param_types, out_types):
        fwd = get_op(attrs["op"])
        n_in = len(attrs["need_inputs"])
        fwd_in = list(in_types[:n_in])
        fwd_out = fwd.infer(attrs["attrs"], fwd_in, list(param_types))
        flops = fwd.grad_cost(attrs["attrs"], fwd_in, list(param_types), fwd_out,
                              [bool(b) for b in attrs["need_inputs"]],
                              [bool(b) for b in attrs["need_params"]])
        return Cost(flops=flops,
                    bytes=sum(t.nbytes for t in (*in_types, *param_types, *out_types)))


@register
class Sum(Op):
    """The sum of its inputs (same type), added in order."""
    type = "Sum"
    num_inputs = (1, None)
    num_outputs = 1

    def infer(self, attrs, in_types, param_types):
        for i, t in enumerate(in_types[1:], 1):
            if t != in_types[0]:
                raise OpError(f"Sum: input 0 is {in_types[0]} but input {i} is {t}",
                              hint="only values of one type can be added")
        return [in_types[0]]

    def forward(self, attrs, inputs, params, ctx):
        acc = np.array(inputs[0], copy=True)
        for x in inputs[1:]:
            acc += x
        return [acc]

    def grad_inputs(self, attrs, n_inputs):
        return [True] * n_inputs

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        dy = grad_outputs[0]
        return [dy.copy() if need else None for need in need_inputs], []

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=(len(in_types) - 1) * out_types[0].numel,
                    bytes=sum(t.nbytes for t in (*in_types, *out_types)))


@register
class Fill(Op):
    """A constant tensor: attrs ``shape`` (list) and ``value``."""
    type = "Fill"
    num_inputs = 0
    num_outputs = 1
    differentiable = False

    def infer(self, attrs, in_types, param_types):
        shape = attrs.get("shape")
        if not isinstance(shape, list) or any(not isinstance(d, int) or d < 0 for d in shape):
            raise OpError(f"Fill needs a shape list of non-negative ints, got {shape!r}",
                          hint="give attrs {shape=[...], value=...}")
        return [TensorType(tuple(shape), "f32")]

    def forward(self, attrs, inputs, params, ctx):
        return [np.full(tuple(attrs["shape"]), attrs.get("value", 0.0), dtype=np.float32)]

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=0, bytes=math.prod(attrs["shape"]) * 4)
