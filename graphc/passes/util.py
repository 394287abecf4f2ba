"""Small helpers the passes share: use counts, rewiring, fresh names, cleanup."""
from __future__ import annotations

from ..ir.graph import Graph, Node


def readers(g: Graph) -> dict[str, list[Node]]:
    """value -> the nodes reading it, once per input position (a node reading a value
    twice appears twice)."""
    r: dict[str, list[Node]] = {v: [] for v in g.types}
    for n in g.nodes:
        for v in n.inputs:
            r.setdefault(v, []).append(n)
    return r


def sole_reader(g: Graph, value: str, rd: dict[str, list[Node]]) -> Node | None:
    """The one node reading ``value`` exactly once, when nothing else (no other node, no
    graph output) uses it; else None."""
    users = rd.get(value, [])
    if len(users) != 1 or value in g.outputs or value in g.inputs:
        return None
    return users[0]


def replace_uses(g: Graph, old: str, new: str) -> None:
    """Make every reader of ``old`` (nodes and graph outputs) read ``new`` (in place on g)."""
    for n in g.nodes:
        if old in n.inputs:
            n.inputs = [new if v == old else v for v in n.inputs]
    g.outputs = [new if v == old else v for v in g.outputs]
    # training graphs: loss terms and gradient records follow the value too
    g.losses = [(new if v == old else v, w) for v, w in g.losses]
    g.param_grads = {p: new if v == old else v for p, v in g.param_grads.items()}
    g.value_grads = {x: new if v == old else v for x, v in g.value_grads.items()}


def fresh_name(base: str, taken) -> str:
    """``base``, or ``base#2``, ``base#3``, ... whichever is not in ``taken``."""
    if base not in taken:
        return base
    k = 2
    while f"{base}#{k}" in taken:
        k += 1
    return f"{base}#{k}"


def cleanup(g: Graph) -> Graph:
    """Drop types/blob names of values no longer defined and params no node uses, and
    list params in the order nodes first use them (in place on g, which must be the
    pass's own copy); return g."""
    defined = set(g.inputs) | {o for n in g.nodes for o in n.outputs}
    g.types = {v: t for v, t in g.types.items() if v in defined}
    g.blob_of = {v: b for v, b in g.blob_of.items() if v in defined}
    g.value_grads = {x: v for x, v in g.value_grads.items() if x in defined and v in defined}
    order = dict.fromkeys(p for n in g.nodes for p in n.params)
    g.params = {k: g.params[k] for k in order}
    return g


def is_train_node(n: Node) -> bool:
    """A node whose forward differs between training and inference, lowered for training
    (Dropout's ``train``, BatchNorm without ``use_global_stats``, stochastic pooling)."""
    if n.op == "BatchNorm":
        return not n.attrs.get("use_global_stats", True)
    return bool(n.attrs.get("train", False))
