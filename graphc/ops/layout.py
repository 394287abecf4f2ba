"""Physical layouts (ir/types.py): the ``Reorder`` op, and which ops may run on values in
a blocked channel layout (``NCHW<x>c``).

``Reorder`` (attrs ``{"to": "NCHW8c"}`` or ``{"to": null}`` for plain) rearranges the
bytes of a value into another layout.  Logically it is the identity: the reference
executor works on logical arrays, so its forward returns the same values; its gradient
is the Reorder back (the gradient takes the input's layout again).

The layout rule of every other node (checked by ir/verify.py, used by passes/layout.py):
either all its inputs and outputs are plain, or all of them are in one blocked layout
and the op can run that way (``blocked_problem``):

* Convolution (2-D, channels on axis 1, one bottom) with group 1, a depthwise
  convolution (group = channels in = channels out), or groups whose channel counts are
  multiples of the block (a block never straddles two groups); channels that are not a
  multiple of the block are padded (with zeros, which the padded weights ignore);
* Pooling with one top (no mask) -- every method pools each channel alone;
* elementwise ops (``ELEMENTWISE``) with per-channel or scalar factors (Scale / Bias
  with axis 1 and num_axes 1 or 0, BatchNorm with global statistics), Eltwise, Split;
* LRN within a channel (across channels its window would cross the blocks: plain);
* Concat along the channels when every bottom's channel count is a multiple of the
  block (the bottoms are then whole blocks, with no padding inside the top);
* a Fused node whose every step can.

A blocked value's padding channels hold zeros: an elementwise op that maps 0 to
something else (Sigmoid, Exp, Power with a shift, ...) must write zeros there.
Everything else (InnerProduct, Softmax, Reshape/Flatten, Crop, Slice, losses, ...)
runs on plain values only.
"""
from __future__ import annotations

import numpy as np

from ..errors import OpError
from ..ir.types import TensorType, layout_block
from .base import Cost, Op, canonical_axis, get_op, register

#: single-bottom elementwise ops that may run on blocked values (with the attribute
#: conditions of ``_elementwise_problem``)
ELEMENTWISE = {"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log",
               "BNLL", "Threshold", "Dropout", "Scale", "Bias", "BatchNorm"}


@register
class Reorder(Op):
    type = "Reorder"
    num_inputs = 1
    num_outputs = 1

    def infer(self, attrs, in_types, param_types):
        to = attrs.get("to")
        try:
            layout_block(to)
        except ValueError as e:
            raise OpError(f"Reorder to {to!r}: {e}",
                          hint='use {to="NCHW8c"} (a blocked layout) or {to=null} (plain)')
        t = in_types[0]
        if to is not None and (t.rank != 4 or t.dtype != "f32"):
            raise OpError(f"Reorder to {to} needs a 4-D f32 value, got {t}",
                          hint="blocked layouts are for (N, C, H, W) f32 values only")
        if param_types:
            raise OpError(f"Reorder has no params but got {len(param_types)}",
                          hint="remove the params")
        return [TensorType(t.shape, t.dtype, to)]

    def forward(self, attrs, inputs, params, ctx):
        return [np.array(inputs[0], copy=True)]     # the same logical values

    def backward_reads(self, attrs, need_inputs, need_params, n_outputs):
        return [False], [False]

    def backward_inplace_ok(self, attrs):
        return False    # the gradient changes layout: a different buffer

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """The gradient is the top's, reordered back into the bottom's layout (logically
        the same values)."""
        if not need_inputs[0]:
            return [None], []
        dy = grad_outputs[0]
        return [np.zeros_like(inputs[0]) if dy is None else np.array(dy, copy=True)], []

    def grad_cost(self, attrs, in_types, param_types, out_types, need_inputs, need_params):
        return 0

    def cost(self, attrs, in_types, param_types, out_types):
        """No arithmetic; every byte read in one layout and written in the other."""
        return Cost(flops=0, bytes=in_types[0].nbytes + out_types[0].nbytes)


def _elementwise_problem(op_type: str, attrs: dict) -> str | None:
    if op_type in ("Scale", "Bias"):
        if int(attrs.get("num_axes", 1)) == 0:
            return None
        axis = canonical_axis(int(attrs.get("axis", 1)), 4)
        if int(attrs.get("num_axes", 1)) != 1 or axis != 1:
            return (f"{op_type} with axis {attrs.get('axis')} and num_axes "
                    f"{attrs.get('num_axes')} is not per-channel")
    if op_type == "BatchNorm" and not attrs.get("use_global_stats", True):
        return "BatchNorm computing batch statistics runs on plain values"
    if op_type == "Dropout" and attrs.get("train"):
        return "Dropout in training runs on plain values"
    return None


def _conv_problem(attrs: dict, in_type: TensorType, out_type: TensorType, block: int):
    if canonical_axis(int(attrs.get("axis", 1)), 4) != 1 or len(attrs.get("kernel", ())) != 2:
        return "only 2-D convolutions over axis 1 run on blocked values"
    g = int(attrs.get("group", 1))
    cin, cout = in_type.shape[1], out_type.shape[1]
    if g == 1 or (g == cin == cout):
        return None
    if (cin // g) % block or (cout // g) % block:
        return (f"a convolution with {g} groups of {cin // g} -> {cout // g} channels: "
                f"not whole blocks of {block}")
    return None


def blocked_problem(op_type: str, attrs: dict, in_types: list[TensorType],
                    param_types: list[TensorType], out_types: list[TensorType],
                    block: int) -> str | None:
    """Why a node of ``op_type`` cannot run with every input and output in the blocked
    layout of ``block`` channels (None: it can).  Types are the logical ones."""
    in_types = [t.plain for t in in_types]
    out_types = [t.plain for t in out_types]
    for t in (*in_types, *out_types):
        if t.rank != 4 or t.dtype != "f32":
            return f"a blocked layout needs 4-D f32 values, not {t}"
    if not in_types or not out_types:
        return f"{op_type} has no input or no output"
    if op_type == "Fused":
        return _fused_problem(attrs, in_types, param_types, block)
    if op_type == "Convolution":
        if len(in_types) != 1:
            return "a convolution with several bottoms runs on plain values"
        return _conv_problem(attrs, in_types[0], out_types[0], block)
    if op_type == "Pooling":
        if len(out_types) != 1:
            return "pooling with a mask top runs on plain values"
        if attrs.get("train"):
            return "stochastic pooling in training runs on plain values"
        return None
    if op_type == "LRN":
        if attrs.get("norm_region", "ACROSS_CHANNELS") != "WITHIN_CHANNEL":
            return "LRN across channels runs on plain values"
        return None
    if op_type in ELEMENTWISE:
        if len(in_types) != 1:
            return f"{op_type} with a second bottom runs on plain values"
        return _elementwise_problem(op_type, attrs)
    if op_type in ("Eltwise", "Split"):
        return None
    if op_type == "Concat":
        if canonical_axis(int(attrs.get("axis", 1)), 4) != 1:
            return "a Concat not along the channels runs on plain values"
        odd = [t.shape[1] for t in in_types if t.shape[1] % block]
        if odd:
            return f"a Concat of bottoms with {odd} channels: not whole blocks of {block}"
        return None
    return f"{op_type} runs on plain values only"


def fused_steps(attrs: dict, in_types: list[TensorType], param_types: list[TensorType]):
    """Each step of a Fused node as (op type, attrs, input types, param types, output
    type), logical types."""
    outs = get_op("Fused").step_types(attrs, list(in_types), list(param_types))
    prev, steps = None, []
    for step, out in zip(attrs["body"], outs):
        ins = [prev if r == "prev" else in_types[r] for r in step.get("inputs", [])]
        ps = [param_types[r] for r in step.get("params", [])]
        steps.append((step["op"], step.get("attrs", {}), ins, ps, out))
        prev = out
    return steps


def _fused_problem(attrs, in_types, param_types, block) -> str | None:
    for op, a, ins, ps, out in fused_steps(attrs, in_types, param_types):
        why = blocked_problem(op, a, ins, ps, [out], block)
        if why:
            return f"step {op}: {why}"
    return None


def layout_problem(op_type: str, attrs: dict, in_types: list[TensorType],
                   param_types: list[TensorType], out_types: list[TensorType]) -> str | None:
    """Why the layouts of a node's values break the rule of the module doc (None: they
    follow it).  Types carry their layouts."""
    if op_type == "Reorder":
        if out_types[0].layout != attrs.get("to"):
            return (f"a Reorder to {attrs.get('to') or 'plain'} writes a value in layout "
                    f"{out_types[0].layout or 'plain'}")
        return None
    if op_type == "Grad" and attrs.get("op") == "Reorder":
        return None     # the Reorder back
    if any(t.layout is not None for t in param_types):
        return "params are plain"
    layouts = {t.layout for t in (*in_types, *out_types)}
    if layouts == {None}:
        return None
    if len(layouts) > 1:
        shown = ", ".join(sorted(x or "plain" for x in layouts))
        return f"its values are in different layouts ({shown})"
    layout = layouts.pop()
    why = blocked_problem(op_type, attrs, in_types, param_types, out_types,
                          layout_block(layout))
    return f"it cannot run on {layout} values: {why}" if why else None
