"""The ops of backward graphs (made by the ``autodiff`` pass): Grad, Sum, Fill, and
Recompute (made by the ``recompute`` pass).

``Grad`` runs one forward node's gradient rule (its op's ``backward``).  Attrs:

* ``op``, ``attrs``, ``node``: the forward node's op type, attributes and name (the name
  keys ``ctx.state``, so Dropout's mask or a Python layer's instance from the forward
  call is what the backward sees);
* ``need_inputs`` (one bool per forward input), ``need_params`` (one bool per param):
  which gradients the node computes (Caffe's ``propagate_down`` and
  ``param_propagate_down``);
* ``inputs``: indices of the forward inputs it reads (``Op.backward_reads``; absent: all
  of them), and ``input_shapes``: the shape of every forward input (needed for those it
  does not read; their dtype is taken to be the gradients');
* ``outputs``: indices of the forward outputs it reads (when the rule needs top data);
* ``grads``: indices of the forward outputs whose gradients it reads (the others get
  no gradient: zero);
* ``num_outputs``: how many outputs the forward node has.

Inputs, in order: the forward inputs listed in ``inputs``, the forward outputs listed in
``outputs``, the gradients listed in ``grads``.  Params: the forward node's params.
Outputs: the gradient of each needed input, then of each needed param (in that order).
A forward input the node does not read reaches ``backward`` as a read-only NaN
placeholder of its shape, so a rule that reads more than it declares gives NaN.

``Sum`` adds its inputs (all of one type), in order: where a value is read by several
nodes, or a param is shared by several layers, the gradients accumulate, as Caffe's
Split layers and shared param diffs do.  ``Fill`` makes a constant tensor (the seed of a
loss top: its loss weight).  ``Recompute`` runs a forward node again in the backward
pass (so its outputs need not be kept from the forward pass).
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


def _layout(attrs: dict, n: int) -> tuple[int, list[int], list[int], list[int]]:
    """-> (number of forward inputs, indices of those read, of the outputs read, of the
    gradients read), checked against ``n`` inputs."""
    n_in = len(attrs["need_inputs"])
    ins = list(attrs["inputs"]) if "inputs" in attrs else list(range(n_in))
    outs, grads = list(attrs.get("outputs", [])), list(attrs["grads"])
    if n != len(ins) + len(outs) + len(grads):
        raise OpError(f"Grad node has {n} inputs but its attrs describe {len(ins)} forward "
                      f"input(s) + {len(outs)} forward output(s) + {len(grads)} gradient(s)",
                      hint="inputs are: the forward inputs in 'inputs', the outputs in "
                           "'outputs', the gradients in 'grads'")
    if ins != sorted(set(ins)) or any(not 0 <= i < n_in for i in ins):
        raise OpError(f"Grad node: 'inputs' {ins} must be increasing indices of the "
                      f"{n_in} forward input(s)", hint="fix 'inputs'")
    if len(ins) < n_in and len(attrs.get("input_shapes", [])) != n_in:
        raise OpError(f"Grad node reads {len(ins)} of {n_in} forward inputs but "
                      f"'input_shapes' does not give the shape of each",
                      hint="give input_shapes: one shape list per forward input")
    k = int(attrs["num_outputs"])
    for i in (*outs, *grads):
        if not 0 <= i < k:
            raise OpError(f"Grad node refers to forward output {i}, but the forward node "
                          f"has {k}", hint="fix 'outputs'/'grads'")
    if not grads:
        raise OpError("Grad node reads no gradient", hint="list at least one in 'grads'")
    return n_in, ins, outs, grads


def _forward_input_types(attrs: dict, in_types: list) -> list[TensorType]:
    """The types of all forward inputs: those read from ``in_types``, the others from
    ``input_shapes`` with the gradients' dtype."""
    n_in, ins, outs, grads = _layout(attrs, len(in_types))
    read = dict(zip(ins, in_types))
    dtype = in_types[len(ins) + len(outs)].dtype
    shapes = attrs.get("input_shapes")
    types = []
    for i in range(n_in):
        if i in read:
            if shapes is not None and tuple(shapes[i]) != read[i].shape:
                raise OpError(f"Grad node: forward input {i} has shape {list(read[i].shape)} "
                              f"but input_shapes says {list(shapes[i])}",
                              hint="the backward graph no longer matches its forward node")
            types.append(read[i])
        else:
            types.append(TensorType(tuple(shapes[i]), dtype))
    return types


def grad_node_attrs(op: Op, fwd_attrs: dict, node: str, in_types: list[TensorType],
                    n_outputs: int, need_inputs: list[bool], need_params: list[bool],
                    grads: list[int]) -> dict:
    """The attrs of the Grad node of a forward node (op ``op``, attrs ``fwd_attrs``, name
    ``node``, input types ``in_types``), reading what ``op.backward_reads`` declares."""
    import copy
    reads_in, reads_out = op.backward_reads(fwd_attrs, list(need_inputs), list(need_params),
                                            n_outputs)
    attrs = {"op": op.type, "attrs": copy.deepcopy(fwd_attrs), "node": node,
             "need_inputs": list(need_inputs), "need_params": list(need_params),
             "inputs": [i for i, r in enumerate(reads_in) if r],
             "outputs": [k for k, r in enumerate(reads_out) if r],
             "grads": list(grads), "num_outputs": n_outputs}
    if len(attrs["inputs"]) < len(in_types):
        attrs["input_shapes"] = [list(t.shape) for t in in_types]
    return attrs


@register
class Grad(Op):
    type = "Grad"
    num_inputs = (0, None)
    num_outputs = (1, None)
    differentiable = False   # no second derivatives

    def infer(self, attrs, in_types, param_types):
        fwd = get_op(attrs["op"])
        n_in, ins, outs, grads = _layout(attrs, len(in_types))
        need_in, need_p = list(attrs["need_inputs"]), list(attrs["need_params"])
        if len(need_p) != len(param_types):
            raise OpError(f"Grad node has {len(param_types)} params but need_params lists "
                          f"{len(need_p)}", hint="give one need_params entry per param")
        if not any(need_in) and not any(need_p):
            raise OpError("Grad node computes no gradient",
                          hint="set at least one need_inputs/need_params entry")
        fwd_in = _forward_input_types(attrs, list(in_types))
        fwd_out = fwd.infer(attrs["attrs"], fwd_in, list(param_types))
        if len(fwd_out) != int(attrs["num_outputs"]):
            raise OpError(f"the forward {attrs['op']} has {len(fwd_out)} outputs, Grad says "
                          f"{attrs['num_outputs']}", hint="fix num_outputs")
        rest = in_types[len(ins):]
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
        n_in, ins, outs, grads = _layout(attrs, len(inputs))
        k = int(attrs["num_outputs"])
        dtype = np.asarray(inputs[len(ins) + len(outs)]).dtype
        shapes = attrs.get("input_shapes")
        fwd_in: list = [None] * n_in
        for i, a in zip(ins, inputs):
            fwd_in[i] = a
        for i in range(n_in):
            if fwd_in[i] is None:     # not read: a read-only NaN of the right shape
                fwd_in[i] = np.broadcast_to(np.array(np.nan, dtype), tuple(shapes[i]))
        outputs: list = [None] * k
        grad_outputs: list = [None] * k
        rest = inputs[len(ins):]
        for i, a in zip(outs, rest[:len(outs)]):
            outputs[i] = a
        for i, a in zip(grads, rest[len(outs):]):
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

    def inplace_inputs(self, attrs, in_types, param_types) -> list[int]:
        """Inputs the first output may be written over (passes/inplace.py): when it is
        the gradient of a forward input and the backward is elementwise
        (``Op.backward_inplace_ok``), any input of the same size."""
        fwd = get_op(attrs["op"])
        if not any(attrs["need_inputs"]) or not fwd.backward_inplace_ok(attrs["attrs"]):
            return []
        first = list(attrs["need_inputs"]).index(True)
        fwd_in = _forward_input_types(attrs, list(in_types))
        size = fwd_in[first].nbytes
        return [i for i, t in enumerate(in_types) if t.nbytes == size]

    def cost(self, attrs, in_types, param_types, out_types):
        fwd = get_op(attrs["op"])
        fwd_in = _forward_input_types(attrs, list(in_types))
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
    inplace_ok = True     # elementwise: the sum may be written over its first input

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

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False] * len(need_inputs), [False]

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


@register
class Recompute(Op):
    """A forward node run again in the backward pass (the ``recompute`` pass), so its
    outputs need not be kept from the forward pass.  Attrs: ``op``, ``attrs``, ``node``
    (the forward node's op type, attributes and name; the name keys ``ctx.state``).
    Inputs, params and outputs are the forward node's.  Params the op updates in its
    forward (BatchNorm's moving averages) are updated on copies: only once per pass."""
    type = "Recompute"
    num_inputs = (0, None)
    num_outputs = (1, None)
    differentiable = False

    def infer(self, attrs, in_types, param_types):
        return get_op(attrs["op"]).infer(attrs["attrs"], list(in_types), list(param_types))

    def forward(self, attrs, inputs, params, ctx):
        fwd = get_op(attrs["op"])
        if fwd.updates_params:
            params = [np.array(p, copy=True) for p in params]
        saved = ctx.node
        ctx.node = _StateKey(attrs["node"])
        try:
            return fwd.forward(attrs["attrs"], list(inputs), list(params), ctx)
        finally:
            ctx.node = saved

    def inplace_inputs(self, attrs, in_types, param_types) -> list[int]:
        from .fused import alias_positions
        return alias_positions(attrs["op"], attrs["attrs"], len(in_types))

    def cost(self, attrs, in_types, param_types, out_types):
        return get_op(attrs["op"]).cost(attrs["attrs"], list(in_types), list(param_types),
                                        list(out_types))
