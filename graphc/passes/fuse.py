"""``fuse``: chains of nodes become one ``Fused`` node (ops/fused.py) whose intermediate
tensors never go to memory.

A chain starts at an *anchor* and grows while the chain's current value has exactly one
reader (and is no graph output) that may join:

* anchor Convolution / InnerProduct (one bottom, one top): then elementwise single-input
  ops (ReLU, PReLU, ELU, Sigmoid, TanH, ...), and at most one Eltwise SUM whose other
  bottoms were all computed before the chain's value (ResNet: the shortcut becomes an
  extra input of the fused node, and the convolution joined is the branch computed last);
* anchor LRN: a following Pooling (GoogLeNet's norm2 -> pool2: the normalized tensor is
  never stored);
* anchor elementwise single-input op, or an Eltwise no convolution took: more
  elementwise single-input ops.

A chain of one node is left as it is.  The fused node sits where the chain's last node
was (every value it reads is defined there), writes the last node's output value (so
readers, graph outputs and Caffe blob names are unchanged) and is named after the
layers it holds: ``res2a_branch2c+res2a+res2a_relu``.
"""
from __future__ import annotations

from ..ir.graph import Graph, Node
from . import register_pass
from .util import cleanup, fresh_name, readers, sole_reader

#: single-input elementwise ops that can join a chain (with only learned params)
UNARY = {"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL",
         "Threshold", "Scale", "Bias", "BatchNorm", "Dropout"}
ANCHORS = {"Convolution", "InnerProduct", "LRN"}


def _unary(g: Graph, n: Node) -> bool:
    if n.op not in UNARY or len(n.inputs) != 1 or len(n.outputs) != 1:
        return False
    if n.op == "Dropout":
        return not n.attrs.get("train", False)
    if n.op == "BatchNorm":
        return bool(n.attrs.get("use_global_stats", True))
    return True


def _can_join(g: Graph, chain: list[Node], n: Node, value: str, index: dict) -> bool:
    first = chain[0]
    if n.attrs.get("loss_weight"):
        return False
    if first.op == "LRN":
        return (len(chain) == 1 and n.op == "Pooling" and len(n.outputs) == 1
                and not n.attrs.get("train", False))
    if _unary(g, n):
        return True
    if first.op in ("Convolution", "InnerProduct") and n.op == "Eltwise":
        if n.attrs.get("operation") != "SUM" or any(m.op == "Eltwise" for m in chain):
            return False
        # the chain's value must be the last computed of the Eltwise's bottoms
        producer_pos = index.get(value, -1)
        return all(index.get(v, -1) < producer_pos for v in n.inputs if v != value)
    return False


def _anchor(g: Graph, n: Node) -> bool:
    if n.attrs.get("loss_weight"):
        return False
    if n.op in ANCHORS:
        return len(n.inputs) == 1 and len(n.outputs) == 1
    if n.op == "Eltwise":
        return len(n.outputs) == 1
    return _unary(g, n)


def _fused_node(chain: list[Node], names: set[str]) -> Node:
    inputs: list[str] = []
    params: list[str] = []
    body = []
    prev = None
    for n in chain:
        refs = []
        for v in n.inputs:
            if v == prev:
                refs.append("prev")
            else:
                if v not in inputs:
                    inputs.append(v)
                refs.append(inputs.index(v))
        prefs = []
        for p in n.params:
            if p not in params:
                params.append(p)
            prefs.append(params.index(p))
        attrs = {k: v for k, v in n.attrs.items() if k != "inplace"}
        body.append({"op": n.op, "name": n.name, "attrs": attrs, "inputs": refs,
                     "params": prefs})
        prev = n.outputs[0]
    name = fresh_name("+".join(n.name for n in chain), names)
    names.add(name)
    return Node("Fused", name, inputs, [prev], params,
                {"body": body}, chain[0].loc)


@register_pass("fuse")
def fuse(g: Graph) -> Graph:
    g = g.copy()
    rd = readers(g)
    index = {o: i for i, n in enumerate(g.nodes) for o in n.outputs}
    taken: set[str] = set()
    names = {n.name for n in g.nodes}
    at_end: dict[str, Node] = {}      # name of a chain's last node -> the fused node
    for n in g.nodes:
        if n.name in taken or not _anchor(g, n):
            continue
        chain = [n]
        while True:
            value = chain[-1].outputs[0]
            nxt = sole_reader(g, value, rd)
            if nxt is None or nxt.name in taken or not _can_join(g, chain, nxt, value, index):
                break
            chain.append(nxt)
        if len(chain) > 1:
            taken.update(m.name for m in chain)
            at_end[chain[-1].name] = _fused_node(chain, names)
    g.nodes = [at_end[n.name] if n.name in at_end else n
               for n in g.nodes if n.name not in taken or n.name in at_end]
    return cleanup(g)
