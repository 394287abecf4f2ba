"""``inplace``: mark nodes whose output may overwrite one of their inputs.

A node gets ``inplace: k`` (its output reuses input k's buffer) when

* the op may alias that position: input 0 of an elementwise op (``inplace_ok``), any
  bottom of an Eltwise, or what the op's ``inplace_inputs`` allows (e.g. the shortcut of
  a fused conv + Eltwise SUM; for a Grad node with an elementwise backward, the top's
  gradient or a forward value of the same size);
* input k has the output's size and dtype and the node reads it once;
* nothing sharing input k's buffer (views, earlier in-place values, Concat slices; see
  passes/alias.py) is a graph input or output, or is read after this node, or is another
  input of this node;
* the node has one output (a Grad node: its first, an input's gradient) and that output
  is not a Concat slice.

Only attributes change: values keep their names, and ``Graph.blob_of`` keeps the Caffe
blob names, so a layer the user wrote in place (``conv1~relu1``, blob ``conv1``) still
reads as it did.  The first allowed input (lowest k) wins.
"""
from __future__ import annotations

from ..ir.graph import Graph, Node
from ..ops import get_op
from ..ops.fused import alias_positions
from . import register_pass
from .alias import alias_parents, last_use_times, root_of


def candidates(g: Graph, n: Node) -> list[int]:
    """Input positions node n's output may overwrite, by the op's rule alone (ops that
    need the types to tell -- Fused, and the backward graph's Grad and Recompute -- have
    an ``inplace_inputs`` method)."""
    op = get_op(n.op)
    if hasattr(op, "inplace_inputs"):
        return op.inplace_inputs(n.attrs, [g.types[v] for v in n.inputs],
                                 [g.params[p].type for p in n.params])
    return alias_positions(n.op, n.attrs, len(n.inputs))


@register_pass("inplace")
def inplace(g: Graph) -> Graph:
    g = g.copy()
    parents = alias_parents(g)
    last = last_use_times(g)
    end = len(g.nodes)
    # members of each buffer, by root, kept up to date as nodes are marked
    members: dict[str, set[str]] = {}
    for v in g.types:
        members.setdefault(root_of(v, parents)[0], set()).add(v)
    protected = set(g.inputs) | set(g.outputs)

    for i, n in enumerate(g.nodes):
        # a Grad node's first output (an input's gradient) may alias; its others not
        many = len(n.outputs) > 1 and n.op == "Grad"
        if (len(n.outputs) != 1 and not many) or "inplace" in n.attrs \
                or n.outputs[0] in parents:
            continue
        out = g.types[n.outputs[0]]
        roots = [root_of(v, parents)[0] for v in n.inputs]
        for k in candidates(g, n):
            v = n.inputs[k]
            t = g.types[v]
            cls = members[roots[k]]
            if (t.nbytes != out.nbytes or t.dtype != out.dtype or n.inputs.count(v) != 1
                    or roots.count(roots[k]) != 1 or cls & protected
                    or any(last[m] > i for m in cls) or last[v] >= end):
                continue
            n.attrs["inplace"] = k
            parents[n.outputs[0]] = (v, 0)
            old = members.pop(n.outputs[0], {n.outputs[0]})
            cls.update(old)
            break
    return g
