"""``concat-slices``: let a Concat's producers write straight into its output.

Concatenating along ``axis`` places bottom i at a byte offset of the top, and the slice
is one contiguous block exactly when every dimension before ``axis`` is 1 (axis 0; or
axis 1 at batch 1).  Then each producer can write its result in place in the top and the
Concat copies nothing.  The node is marked ``by_slices: true`` when that holds and every
bottom is

* produced by a node (not a graph input), which is not a view (Reshape/Flatten/Split)
  and does not already write over another value (``inplace``);
* read by this Concat alone, once, and not a graph output.

The memory planner then places the bottoms inside the top's buffer (passes/alias.py).
"""
from __future__ import annotations

import math

from ..ir.graph import Graph
from ..ops.base import canonical_axis
from . import register_pass
from .alias import alias_parents, is_view
from .util import readers


@register_pass("concat-slices")
def concat_slices(g: Graph) -> Graph:
    g = g.copy()
    rd = readers(g)
    producer = g.producers()
    parents = alias_parents(g)
    for n in g.nodes:
        if n.op != "Concat" or n.attrs.get("by_slices") or len(n.outputs) != 1:
            continue
        out = g.types[n.outputs[0]]
        axis = canonical_axis(int(n.attrs.get("axis", 1)), out.rank)
        if math.prod(out.shape[:axis]) != 1:
            continue
        ok = True
        for v in n.inputs:
            p = producer.get(v)
            if (p is None or is_view(p) or "inplace" in p.attrs or v in parents
                    or v in g.outputs or len(rd.get(v, [])) != 1 or n.inputs.count(v) != 1
                    or g.types[v].dtype != out.dtype):
                ok = False
                break
        if ok:
            n.attrs["by_slices"] = True
    return g
