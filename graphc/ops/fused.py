"""``Fused``: several ops run as one node (made by the ``fuse`` pass).

Attrs: ``{"body": [step, ...]}``, each step a dict

    {"op": "Convolution", "attrs": {...}, "inputs": [0], "params": [0, 1], "name": "conv1"}

``inputs`` are indices into the node's inputs or the string ``"prev"`` (the previous
step's output); ``params`` are indices into the node's params; ``name`` (optional) is the
layer the step came from.  Every step has one output; the node's output is the last
step's.  Infer, forward and cost run each step's own rule in turn, so a Fused node means
exactly what its steps mean one after the other.  Cost: the flops of all steps; the bytes
of the node's inputs, params and output only (the intermediate tensors never go to memory).
"""
from __future__ import annotations


from ..errors import OpError
from ..ir.types import TensorType
from .base import Cost, Op, get_op, register


def _check_body(attrs: dict, n_inputs: int, n_params: int) -> list[dict]:
    body = attrs.get("body")
    if not isinstance(body, list) or not body:
        raise OpError("a Fused node needs a non-empty 'body' list of steps",
                      hint='give attrs {body=[{op="ReLU", attrs={...}, inputs=[0], params=[]}]}')
    used_in, used_p = set(), set()
    for i, step in enumerate(body):
        if not isinstance(step, dict) or "op" not in step:
            raise OpError(f"Fused step {i} is not a dict with an 'op'",
                          hint="each step is {op=..., attrs={...}, inputs=[...], params=[...]}")
        if step["op"] == "Fused":
            raise OpError(f"Fused step {i} is itself a Fused node",
                          hint="flatten the nested body into one list of steps")
        get_op(step["op"])   # unknown op -> OpError naming the known ones
        for ref in step.get("inputs", []):
            if ref == "prev":
                if i == 0:
                    raise OpError("the first Fused step reads \"prev\", which does not exist",
                                  hint="the first step reads node inputs by index")
            elif not isinstance(ref, int) or isinstance(ref, bool) or not 0 <= ref < n_inputs:
                raise OpError(f"Fused step {i} ({step['op']}) reads input {ref!r}, but the "
                              f"node has {n_inputs} input(s)",
                              hint="step inputs are node input indices or \"prev\"")
            else:
                used_in.add(ref)
        if i > 0 and "prev" not in step.get("inputs", []):
            raise OpError(f"Fused step {i} ({step['op']}) does not read \"prev\", so step "
                          f"{i - 1}'s result is lost",
                          hint="every step after the first reads the previous step's output")
        for ref in step.get("params", []):
            if not isinstance(ref, int) or isinstance(ref, bool) or not 0 <= ref < n_params:
                raise OpError(f"Fused step {i} ({step['op']}) uses param {ref!r}, but the "
                              f"node has {n_params} param(s)",
                              hint="step params are indices into the node's params")
            used_p.add(ref)
    unused = sorted(set(range(n_inputs)) - used_in)
    if unused:
        raise OpError(f"Fused node inputs {unused} are read by no step",
                      hint="drop the unused inputs from the node")
    unused = sorted(set(range(n_params)) - used_p)
    if unused:
        raise OpError(f"Fused node params {unused} are used by no step",
                      hint="drop the unused params from the node")
    return body


def _step_args(step: dict, node_inputs: list, prev, node_params: list):
    ins = [prev if ref == "prev" else node_inputs[ref] for ref in step.get("inputs", [])]
    ps = [node_params[ref] for ref in step.get("params", [])]
    return ins, ps


@register
class Fused(Op):
    type = "Fused"
    num_inputs = (1, None)
    num_outputs = 1

    def step_types(self, attrs, in_types, param_types) -> list[TensorType]:
        """The output type of every step, in order."""
        body = _check_body(attrs, len(in_types), len(param_types))
        prev, types = None, []
        for i, step in enumerate(body):
            op = get_op(step["op"])
            ins, ps = _step_args(step, in_types, prev, param_types)
            try:
                op.check_arity(len(ins), 1)
                outs = op.infer(step.get("attrs", {}), ins, ps)
            except OpError as e:
                label = f"{step['op']} '{step['name']}'" if step.get("name") else step["op"]
                e.message = f"Fused step {i} ({label}): {e.message}"
                e.args = (e.message,)
                raise
            if len(outs) != 1:
                raise OpError(f"Fused step {i} ({step['op']}) has {len(outs)} outputs; a step "
                              f"must have exactly one", hint="fuse only single-output ops")
            prev = outs[0]
            types.append(prev)
        return types

    def infer(self, attrs, in_types, param_types):
        return [self.step_types(attrs, in_types, param_types)[-1]]

    def forward(self, attrs, inputs, params, ctx):
        body = _check_body(attrs, len(inputs), len(params))
        node = ctx.node
        prev = None
        try:
            for i, step in enumerate(body):
                op = get_op(step["op"])
                ins, ps = _step_args(step, inputs, prev, params)
                if node is not None:   # each step keeps its own ctx.state
                    ctx.node = _StepNode(f"{node.name}/{step.get('name', i)}")
                prev = op.forward(step.get("attrs", {}), ins, ps, ctx)[0]
        finally:
            ctx.node = node
        return [prev]

    def cost(self, attrs, in_types, param_types, out_types):
        body = _check_body(attrs, len(in_types), len(param_types))
        prev, flops = None, 0
        for step in body:
            op = get_op(step["op"])
            ins, ps = _step_args(step, in_types, prev, param_types)
            outs = op.infer(step.get("attrs", {}), ins, ps)
            flops += op.cost(step.get("attrs", {}), ins, ps, outs).flops
            prev = outs[0]
        nbytes = sum(t.nbytes for t in (*in_types, *param_types, *out_types))
        return Cost(flops=flops, bytes=nbytes)

    def inplace_inputs(self, attrs, in_types, param_types) -> list[int]:
        """Node inputs the output may overwrite: an input of the output's type whose every
        read is at a position where its step may alias it (``alias_positions``), with every
        step from its first reader on elementwise along the "prev" chain.  (Steps before
        the first reader, e.g. a convolution, never touch that buffer.)"""
        body = _check_body(attrs, len(in_types), len(param_types))
        out = self.step_types(attrs, in_types, param_types)[-1]
        result = []
        for k, t in enumerate(in_types):
            if t.nbytes != out.nbytes or t.dtype != out.dtype:
                continue
            first = min(i for i, s in enumerate(body) if k in s.get("inputs", []))
            ok = True
            for i, step in enumerate(body[first:], first):
                refs = step.get("inputs", [])
                allowed = alias_positions(step["op"], step.get("attrs", {}), len(refs))
                for pos, ref in enumerate(refs):
                    if (ref == k or (ref == "prev" and i > first)) and pos not in allowed:
                        ok = False
            if ok:
                result.append(k)
        return result


def alias_positions(op_type: str, attrs: dict, n_inputs: int) -> list[int]:
    """Input positions an op's output may share a buffer with: any input of Eltwise (all
    the same shape), input 0 of another elementwise op (``inplace_ok``), else none."""
    if op_type == "Eltwise":
        return list(range(n_inputs))
    if op_type == "Fused":
        return []   # use Fused.inplace_inputs, which knows the types
    op = get_op(op_type)
    return [0] if op.inplace_ok else []


class _StepNode:
    """Stands in for ctx.node while a step runs, so each step has its own ctx.state."""

    def __init__(self, name: str):
        self.name = name
