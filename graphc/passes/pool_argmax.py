"""``pool-argmax``: in a training graph, let a MAX pooling keep its argmax for backward
instead of its input.

The gradient of MAX pooling routes each top gradient to its window's maximum.  By
default the Grad node finds the maxima again in the pooling's input x, so x stays alive
from the forward pass to the backward.  When that Grad node is the only backward
reader of x (no ReLU gradient or weight gradient reads it too: e.g. a convolution
followed directly by pooling, as in LeNet and CIFAR-10), this pass sets
``keep_argmax`` on the forward node: its forward keeps the argmax in ``ctx.state`` --
one 4-byte value per top element, as Caffe's ``max_idx_`` -- and its Grad node reads
that instead of x, which then dies after the forward pass.  Only where the argmax is
smaller than x and x is not a graph output.  The gradients do not change (the argmax is
the one the forward found).  Run after ``autodiff``.
"""
from __future__ import annotations

from collections import Counter

from ..ir.graph import Graph
from ..ops import get_op
from ..ops.grad import grad_node_attrs
from . import register_pass
from .alias import alias_parents, root_of
from .recompute import backward_start


@register_pass("pool-argmax")
def pool_argmax(g: Graph) -> Graph:
    g = g.copy()
    start = backward_start(g)
    if start is None:
        return g
    parents = alias_parents(g)
    root = {v: root_of(v, parents)[0] for v in g.types}
    reads = Counter(root[v] for n in g.nodes[start:] for v in n.inputs)
    live_anyway = {root[v] for v in g.outputs}
    forward = {n.name: n for n in g.nodes[:start]}
    pooling = get_op("Pooling")
    for n in g.nodes[start:]:
        a = n.attrs
        if n.op != "Grad" or a["op"] != "Pooling" or a["attrs"]["pool"] != "MAX" \
                or a["attrs"].get("keep_argmax") or a["node"] not in forward:
            continue
        fwd = forward[a["node"]]
        x = fwd.inputs[0]
        read = list(a["inputs"]) if "inputs" in a else list(range(len(fwd.inputs)))
        out_t, x_t = g.types[fwd.outputs[0]], g.types[x]
        if (0 not in read or reads[root[x]] != 1 or root[x] in live_anyway
                or 4 * out_t.numel >= x_t.nbytes):
            continue
        fwd.attrs["keep_argmax"] = True
        grads = n.inputs[len(read) + len(a.get("outputs", [])):]
        new = grad_node_attrs(pooling, fwd.attrs, fwd.name, [g.types[v] for v in fwd.inputs],
                              len(fwd.outputs), a["need_inputs"], a["need_params"],
                              a["grads"])
        n.attrs = new
        n.inputs = [*(fwd.inputs[i] for i in new["inputs"]),
                    *(fwd.outputs[k] for k in new["outputs"]), *grads]
        reads[root[x]] -= 1
    return g
