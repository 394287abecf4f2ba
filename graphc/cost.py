"""Per-node and total cost (flops, bytes) of a graph, from each op's cost rule."""
from __future__ import annotations

from .ir.graph import Graph, Node
from .ops import get_op
from .ops.base import Cost


def node_cost(g: Graph, n: Node) -> Cost:
    return get_op(n.op).cost(n.attrs, [g.types[v] for v in n.inputs],
                             [g.params[p].type for p in n.params],
                             [g.types[v] for v in n.outputs])


def graph_cost(g: Graph) -> tuple[dict[str, Cost], Cost]:
    per = {n.name: node_cost(g, n) for n in g.nodes}
    total = Cost(sum(c.flops for c in per.values()), sum(c.bytes for c in per.values()))
    return per, total


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return (f"{n:.0f}" if suffix == "" else f"{n:.2f}{suffix}") + unit
        n /= 1000.0
    return str(n)
