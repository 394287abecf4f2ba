"""Which values share memory, and when values are live (shared by ``inplace``,
``concat-slices`` and the memory planner).

A value may live inside another one's buffer (its *parent*, at a byte offset):

* the outputs of view ops (Reshape, Flatten, Split) are their input's memory, as in Caffe
  (``ShareData``);
* a node marked ``inplace: k`` writes its output over its input k;
* the bottoms of a Concat marked ``by_slices`` are written by their producers straight
  into their slice of the Concat's output.

Following parents from a value ends at its *root*, the value that owns the buffer.
Time: node i runs at time i; graph inputs are defined at time -1 and graph outputs are
read at time ``len(nodes)``.
"""
from __future__ import annotations

from ..errors import GraphcError
from ..ir.graph import Graph

#: ops whose outputs are their input's memory, unchanged
VIEW_OPS = ("Reshape", "Flatten", "Split")


def is_view(n) -> bool:
    return n.op in VIEW_OPS and len(n.inputs) == 1


def alias_parents(g: Graph) -> dict[str, tuple[str, int]]:
    """value -> (parent value, byte offset in the parent's buffer)."""
    parents: dict[str, tuple[str, int]] = {}

    def link(child: str, parent: str, offset: int, n) -> None:
        if child in parents and parents[child] != (parent, offset):
            raise GraphcError(f"value %{child} would share memory with both %{parents[child][0]} "
                              f"and %{parent}", layer=n.name, layer_type=n.op,
                              hint="drop the 'inplace' or 'by_slices' attribute of one of them")
        parents[child] = (parent, offset)

    for n in g.nodes:
        if is_view(n):
            for o in n.outputs:
                link(o, n.inputs[0], 0, n)
        k = n.attrs.get("inplace")
        if k is not None and n.outputs:
            link(n.outputs[0], n.inputs[int(k)], 0, n)
        if n.op == "Concat" and n.attrs.get("by_slices"):
            offset = 0
            for v in n.inputs:
                link(v, n.outputs[0], offset, n)
                offset += g.types[v].nbytes
    return parents


def root_of(v: str, parents: dict[str, tuple[str, int]]) -> tuple[str, int]:
    """(root value, byte offset of v in the root's buffer)."""
    offset, seen = 0, set()
    while v in parents:
        if v in seen:
            raise GraphcError(f"values share memory in a cycle through %{v}",
                              hint="drop an 'inplace' or 'by_slices' attribute")
        seen.add(v)
        v, off = parents[v]
        offset += off
    return v, offset


def def_times(g: Graph) -> dict[str, int]:
    t = {v: -1 for v in g.inputs}
    for i, n in enumerate(g.nodes):
        for o in n.outputs:
            t[o] = i
    return t


def last_use_times(g: Graph) -> dict[str, int]:
    """value -> time of its last read (its definition time when nobody reads it)."""
    last = def_times(g)
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            last[v] = max(last.get(v, i), i)
    for v in g.outputs:
        last[v] = len(g.nodes)
    return last
