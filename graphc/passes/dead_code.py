"""``dead-code``: remove what computes nothing anyone reads.

* Silence nodes (they only stop Caffe from listing their bottoms as net outputs);
* Split nodes (Caffe's copies of a blob read by several layers): readers use the input;
* Dropout at inference (``train`` false) is the identity: readers use its input.  A
  Dropout lowered for training is kept;
* nodes none of whose outputs is read by a node or is a graph output, repeatedly, except
  losses (a ``loss_weight`` or a loss op), nodes without outputs (side effects) and nodes
  that update their params (BatchNorm statistics in training);
* params no node uses any more.

Graph outputs stay: an identity node whose output is a graph output is removed only when
its input is the same Caffe blob (an in-place Dropout) and is not itself an input or
output of the graph; otherwise the node is kept.
"""
from __future__ import annotations

from ..ir.graph import Graph, Node
from ..ops import get_op
from . import register_pass
from .util import cleanup, replace_uses


def _identity(n: Node) -> bool:
    if n.op == "Split":
        return len(n.inputs) == 1
    if n.op == "Dropout":
        return not n.attrs.get("train", False)
    return False


def _removable_identity(g: Graph, n: Node) -> bool:
    x = n.inputs[0]
    for y in n.outputs:
        if y in g.outputs and (g.blob_of.get(y, y) != g.blob_of.get(x, x)
                               or x in g.outputs or x in g.inputs):
            return False
    return True


def _has_effect(n: Node) -> bool:
    op = get_op(n.op)
    if op.is_loss or any(w != 0 for w in n.attrs.get("loss_weight", [])):
        return True
    if not n.outputs:
        return True
    return op.updates_params and not n.attrs.get("use_global_stats", True)


@register_pass("dead-code")
def dead_code(g: Graph) -> Graph:
    g = g.copy()
    kept = []
    for n in g.nodes:
        if n.op == "Silence":
            continue
        if _identity(n) and _removable_identity(g, n):
            for y in n.outputs:
                replace_uses(g, y, n.inputs[0])
            continue
        kept.append(n)
    g.nodes = kept

    # backward sweep: a node is live if an output is read by a live node or is an output
    needed = set(g.outputs)
    live = []
    for n in reversed(g.nodes):
        if _has_effect(n) or any(o in needed for o in n.outputs):
            live.append(n)
            needed.update(n.inputs)
    g.nodes = live[::-1]
    return cleanup(g)
