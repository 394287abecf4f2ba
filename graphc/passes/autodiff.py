"""``autodiff``: append the backward graph (reverse-mode differentiation) to a forward graph.

What it computes, following Caffe's Net::Init/Backward:

* the loss is ``sum(loss_weight * top)`` over every top with a nonzero ``loss_weight``
  (node attr; the lowering gives a loss layer's first top weight 1).  Each such top is
  seeded with its weight (a ``Fill`` node: Caffe sets the top's diff to the weight);
* gradients flow back through every differentiable op (``Grad`` nodes, one per forward
  node that needs one, running the op's own ``backward``) to every param with a nonzero
  ``lr_mult``; a param with ``lr_mult: 0`` gets no gradient and costs no work;
* a bottom gets a gradient only where it can (``Op.grad_inputs``: not labels, not Embed
  indices), where ``propagate_down`` allows, and where it depends on something that
  needs one: the graph inputs (data) need none unless ``force_backward``;
* nodes that cannot reach a loss, or whose inputs and params need no gradient, are
  skipped; ops that are not differentiable (Accuracy, ArgMax, ...) stop gradients;
* a Grad node reads only the forward inputs and outputs its op's backward needs
  (``Op.backward_reads``: e.g. not a convolution's input when its weights are frozen, only
  the top of a ReLU or Sigmoid), so the others die after the forward pass;
* a value read by several nodes (or twice by one) and a param shared by several layers
  accumulate: their partial gradients are added by a ``Sum`` node, like Caffe's Split
  layers and shared param diffs.

Names: the gradient of value ``x`` is ``x@grad`` (partials ``x@grad.0``, ``x@grad.1``...),
of param ``p`` is ``$p@grad``; the Grad node of layer ``L`` is ``L@grad``.  The graph
records ``losses``, ``param_grads`` and ``value_grads`` (see ir/graph.py); the param
gradients (and, with force_backward, the input gradients) become graph outputs, so
later passes keep them.  In-place layers need no care: in the IR every version of a
blob is its own value.
"""
from __future__ import annotations

from collections import Counter

from ..errors import GraphcError
from ..ir.graph import Graph, Node
from ..ops import get_op
from ..ops.base import Op
from ..ops.grad import grad_node_attrs
from . import register_pass
from .util import fresh_name


def _has_rule(op: Op) -> bool:
    return type(op).backward is not Op.backward


class _Builder:
    """Emits backward nodes and keeps track of partial gradients."""

    def __init__(self, g: Graph, totals: Counter, ptotals: Counter):
        self.g = g
        self.totals, self.ptotals = totals, ptotals       # expected partials per value/param
        self.parts: dict[str, list[str]] = {}              # value -> partials emitted
        self.pparts: dict[str, list[str]] = {}             # param -> partials emitted
        self.node_names = {n.name for n in g.nodes}
        self.final: dict[str, str] = {}                    # value -> its gradient value

    def _fresh_value(self, base: str) -> str:
        return fresh_name(base, self.g.types)

    def _fresh_node(self, base: str) -> str:
        name = fresh_name(base, self.node_names)
        self.node_names.add(name)
        return name

    def _emit(self, node: Node, types) -> None:
        self.g.add_node(node, list(types))

    def partial(self, key: str, param: bool) -> str:
        """A new name for the next partial gradient of a value or a param."""
        total = (self.ptotals if param else self.totals)[key]
        parts = (self.pparts if param else self.parts).setdefault(key, [])
        base = f"${key}@grad" if param else f"{key}@grad"
        name = self._fresh_value(base if total == 1 else f"{base}.{len(parts)}")
        parts.append(name)
        self.g.types[name] = self.g.params[key].type if param else self.g.types[key]
        return name

    def _sum(self, key: str, parts: list[str], param: bool, loc) -> str:
        if len(parts) == 1:
            return parts[0]
        base = f"${key}@grad" if param else f"{key}@grad"
        out = self._fresh_value(base)
        t = self.g.params[key].type if param else self.g.types[key]
        self._emit(Node("Sum", self._fresh_node(f"{base}/sum"), list(parts), [out], [], {},
                        loc), [t])
        return out

    def finish_value(self, v: str, loc=None) -> str:
        parts = self.parts.get(v, [])
        if len(parts) != self.totals[v]:
            raise RuntimeError(f"autodiff: {len(parts)} of {self.totals[v]} gradients of %{v} "
                               f"were made before it was needed")
        out = self._sum(v, parts, False, loc)
        self.final[v] = out
        return out

    def maybe_finish_param(self, p: str, loc=None) -> None:
        parts = self.pparts.get(p, [])
        if len(parts) == self.ptotals[p] and p not in self.g.param_grads:
            self.g.param_grads[p] = self._sum(p, parts, True, loc)

    def seed(self, v: str, weight: float) -> None:
        name = self.partial(v, False)
        t = self.g.types[v]
        self._emit(Node("Fill", self._fresh_node(f"{v}@seed"), [], [name], [],
                        {"shape": list(t.shape), "value": float(weight)}), [t])


@register_pass("autodiff")
def autodiff(g: Graph) -> Graph:
    if g.param_grads or g.value_grads or any(n.op == "Grad" for n in g.nodes):
        raise GraphcError(f"graph '{g.name}' already has a backward graph",
                          hint="run the autodiff pass once, on the forward graph")
    g = g.copy()
    fwd = list(g.nodes)
    g.losses = [(n.outputs[k], float(w)) for n in fwd
                for k, w in enumerate(n.attrs.get("loss_weight", [])) if w != 0]
    loss_weight = {v: w for v, w in g.losses}
    trainable = {name for name, p in g.params.items() if p.lr_mult != 0}

    # forward sweep: which values depend (differentiably) on something needing a gradient,
    # and what each node would have to compute
    carries = set(g.inputs) if g.force_backward else set()
    plan: dict[str, tuple[list[bool], list[bool]]] = {}
    for n in fwd:
        op = get_op(n.op)
        if not op.differentiable:
            continue
        allowed = op.grad_inputs(n.attrs, len(n.inputs))
        pd = n.attrs.get("propagate_down")
        need_in = [bool(allowed[i]) and (pd is None or bool(pd[i])) and v in carries
                   for i, v in enumerate(n.inputs)]
        need_p = [p in trainable for p in n.params]
        if any(need_in) or any(need_p):
            plan[n.name] = (need_in, need_p)
            carries.update(n.outputs)

    # backward sweep: which of those reach a loss; count the partial gradients
    totals: Counter = Counter()
    ptotals: Counter = Counter()
    active: list[Node] = []
    for n in reversed(fwd):
        if n.name not in plan:
            continue
        outs = [o for o in n.outputs if o in loss_weight or totals[o]]
        if not outs:
            continue
        op = get_op(n.op)
        if not _has_rule(op):
            raise GraphcError(f"{n.op} has no gradient rule, but a gradient has to pass "
                              f"through this layer", where=n.loc, layer=n.name, layer_type=n.op,
                              hint="set propagate_down: false on the bottoms of the layer after "
                                   "it, or lr_mult: 0 on the layers before it (a Fused node: "
                                   "run autodiff before the fuse pass)")
        for o in n.outputs:
            if o in loss_weight:
                totals[o] += 1
        active.append(n)
        need_in, need_p = plan[n.name]
        for v, need in zip(n.inputs, need_in):
            if need:
                totals[v] += 1
        for p, need in zip(n.params, need_p):
            if need:
                ptotals[p] += 1

    b = _Builder(g, totals, ptotals)
    for n in active:
        op = get_op(n.op)
        need_in, need_p = plan[n.name]
        grads, grad_vals = [], []
        for k, o in enumerate(n.outputs):
            if not totals[o]:
                continue
            if o in loss_weight:
                b.seed(o, loss_weight[o])
            grads.append(k)
            grad_vals.append(b.finish_value(o, n.loc))
        outs = [b.partial(v, False) for v, need in zip(n.inputs, need_in) if need]
        outs += [b.partial(p, True) for p, need in zip(n.params, need_p) if need]
        attrs = grad_node_attrs(op, n.attrs, n.name, [g.types[v] for v in n.inputs],
                                len(n.outputs), need_in, need_p, grads)
        node = Node("Grad", b._fresh_node(f"{n.name}@grad"),
                    [*(n.inputs[i] for i in attrs["inputs"]),
                     *(n.outputs[k] for k in attrs["outputs"]), *grad_vals], outs,
                    list(n.params), attrs, n.loc)
        b._emit(node, [g.types[o] for o in outs])
        for p, need in zip(n.params, need_p):
            if need:
                b.maybe_finish_param(p, n.loc)
    for v in g.inputs:
        if totals[v]:
            b.finish_value(v)

    g.value_grads = dict(b.final)
    g.param_grads = {p: g.param_grads[p] for p in g.params if p in g.param_grads}
    extra = [v for v, _ in g.losses] + list(g.param_grads.values())
    extra += [b.final[v] for v in g.inputs if v in b.final]
    g.outputs = list(dict.fromkeys([*g.outputs, *extra]))
    return g
