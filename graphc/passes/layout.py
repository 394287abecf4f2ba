"""``layout``: keep chains of convolutions in a blocked channel layout (``NCHW8c`` for
AVX2, ``NCHW16c`` for AVX-512; ir/types.py), with ``Reorder`` nodes (ops/layout.py) only
where a value has to change layout.

Opt-in (not in DEFAULT_PIPELINE until a backend runs blocked kernels): run it after
``fuse`` (``run_pipeline(g, [..., "fuse", "layout"])``, ``graphc dump NET --passes
dead-code,fold-batchnorm,fuse,layout``); it is best before ``concat-slices`` and
``inplace``, but keeps their marks valid when run after them.

Each node runs either *plain* or *blocked* (every input and output in the blocked
layout; which ops can: ops/layout.py ``blocked_problem``; the others run plain).  Graph
inputs and outputs are plain.  A value is stored in its producer's layout; a reader in
the other layout (or a graph output, when the value is blocked) reads a Reorder of it,
one per value and layout, placed just before its first reader (a graph output's: right
after the producer).

The cost model, in units of one flop of a plain kernel (``Cost`` from ops' ``cost``):

* a node: for each op it runs (a Fused node: each step) ``flops * speed * padding``,
  plus ``BYTE_TIME`` per byte of its inputs and outputs in its layout.  ``speed`` is 1
  plain and ``BLOCKED_SPEED[op]`` blocked (default 1).  ``padding`` is 1 plain; blocked,
  the work on the zero channels that pad C up to whole blocks:
  ceil_x(C_in) * ceil_x(C_out) / (C_in * C_out) for a convolution with one group,
  ceil_x(C) / C otherwise (a depthwise convolution, the other ops' outputs), and 1 for
  grouped convolutions of whole blocks;
* a Reorder: ``BYTE_TIME`` per byte moved (read plain + written blocked, or back).

The assignment of plain/blocked to the nodes minimizing the total is found exactly, as
a minimum s-t cut: a node is a vertex (source side plain, sink side blocked) with an
edge for its extra time in the layout it is cut from; a value read or written by
several nodes costs one Reorder when they disagree, a term of "all equal or pay r"
built with two auxiliary vertices (the binary P^n Potts construction of Kohli, Kumar
and Torr, 2007).  Among optimal assignments the one with the most blocked nodes is
taken: a blocked region extends over the ops for which the layout makes no difference
(a ReLU after the last convolution), so Reorders sit where a plain-only op needs one.  The constants are estimates to be tuned against the CPU
backend's kernels; the tests pin the decisions they give on small graphs.
"""
from __future__ import annotations

import math
from collections import deque

from ..ir.graph import Graph, Node
from ..ir.types import TensorType, blocked_layout
from ..ops import get_op
from ..ops.layout import blocked_problem, fused_steps
from . import register_pass
from .util import fresh_name, replace_uses

#: time per flop of an op on blocked values relative to plain: a blocked convolution
#: loads a block of input channels and writes a block of output channels as whole
#: vectors (no im2col, no transposes); a pooling window reads contiguous channel blocks
BLOCKED_SPEED = {"Convolution": 0.5, "Pooling": 0.8}

#: time of moving one byte (a Reorder, a memory-bound op), in flops of a plain kernel
BYTE_TIME = 4.0

#: channels per block; None: from the host (``host_block``)
BLOCK: int | None = None


def host_block() -> int:
    """16 on a host with AVX-512 (16 floats a vector), else 8 (AVX2); 8 when llvmlite
    cannot tell."""
    try:
        import llvmlite.binding as llvm
        feats = llvm.get_host_cpu_features()
    except Exception:   # no llvmlite, or it cannot read the host: the AVX2 default
        return 8
    return 16 if feats.get("avx512f") else 8


def default_block() -> int:
    return BLOCK if BLOCK is not None else host_block()


# ---- the cost model ------------------------------------------------------------------

def _ceil(c: int, x: int) -> int:
    return -(-c // x) * x


def _padding(op: str, attrs: dict, ins: list[TensorType], out: TensorType, x: int) -> float:
    cout = out.shape[1]
    if op == "Convolution":
        cin, group = ins[0].shape[1], int(attrs.get("group", 1))
        if group == 1:
            return _ceil(cin, x) * _ceil(cout, x) / (cin * cout)
        if not group == cin == cout:
            return 1.0      # groups of whole blocks
    return _ceil(cout, x) / cout


def node_time(g: Graph, n: Node, block: int | None) -> float:
    """The model's time of node ``n`` run plain (``block`` None) or blocked."""
    ins = [g.types[v].plain for v in n.inputs]
    outs = [g.types[v].plain for v in n.outputs]
    params = [g.params[p].type for p in n.params]
    steps = (fused_steps(n.attrs, ins, params) if n.op == "Fused"
             else [(n.op, n.attrs, ins, params, outs[0] if outs else None)])
    flops = 0.0
    for op, attrs, s_ins, s_params, s_out in steps:
        f = get_op(op).cost(attrs, s_ins, s_params, [s_out] if s_out else []).flops
        if block is not None:
            f *= BLOCKED_SPEED.get(op, 1.0) * _padding(op, attrs, s_ins, s_out, block)
        flops += f
    layout = None if block is None else blocked_layout(block)
    nbytes = sum(t.with_layout(layout).nbytes for t in (*ins, *outs))
    return flops + BYTE_TIME * nbytes


def reorder_time(t: TensorType, block: int) -> float:
    """The model's time of reordering a value of type ``t`` between plain and blocked."""
    return BYTE_TIME * (t.plain.nbytes + t.with_layout(blocked_layout(block)).nbytes)


def can_block(g: Graph, n: Node, block: int) -> bool:
    return blocked_problem(n.op, n.attrs, [g.types[v] for v in n.inputs],
                           [g.params[p].type for p in n.params],
                           [g.types[v] for v in n.outputs], block) is None


# ---- the minimum cut -----------------------------------------------------------------

_S, _T = ("source",), ("sink",)    # plain side, blocked side


class _Cut:
    """A flow network with integer capacities; ``blocked()`` runs Edmonds-Karp and
    returns the vertices on the sink side of the minimum cut with the largest sink side
    (those the source can no longer reach in the residual network)."""

    def __init__(self, inf: int):
        self.inf = inf
        self.cap: dict = {_S: {}, _T: {}}

    def edge(self, u, v, c) -> None:
        c = self.inf if c == math.inf else int(round(c))
        if c <= 0:
            return
        self.cap.setdefault(u, {})
        self.cap.setdefault(v, {})
        self.cap[u][v] = self.cap[u].get(v, 0) + c
        self.cap[v].setdefault(u, 0)

    def _from_source(self) -> dict:
        """A BFS tree of the residual network from the source: vertex -> parent."""
        parent = {_S: None}
        queue = deque([_S])
        while queue and _T not in parent:
            u = queue.popleft()
            for v, c in self.cap[u].items():
                if c > 0 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        return parent

    def blocked(self) -> set:
        while True:
            parent = self._from_source()
            if _T not in parent:
                return set(self.cap) - set(parent)
            path, v = [], _T
            while parent[v] is not None:
                path.append((parent[v], v))
                v = parent[v]
            f = min(self.cap[u][v] for u, v in path)
            for u, v in path:
                self.cap[u][v] -= f
                self.cap[v][u] += f


def assign_layouts(g: Graph, block: int | None = None) -> dict[str, str | None]:
    """node name -> the layout it runs in (None: plain), by the cost model above, for a
    graph without layouts."""
    block = block or default_block()
    free = [n for n in g.nodes if can_block(g, n, block)]
    if not free:
        return {n.name: None for n in g.nodes}
    total = sum(abs(node_time(g, n, None)) + abs(node_time(g, n, block)) for n in free)
    total += sum(reorder_time(t, block) for t in g.types.values() if t.rank == 4)
    cut = _Cut(inf=int(total) * 4 + 1)
    var = {n.name: ("node", n.name) for n in free}
    for n in free:
        d = node_time(g, n, block) - node_time(g, n, None)
        if d > 0:
            cut.edge(_S, var[n.name], d)
        else:
            cut.edge(var[n.name], _T, -d)
    members: dict[str, list] = {v: [] for v in g.types}
    for v in g.inputs:
        members[v].append(_S)
    for n in g.nodes:
        for v in (*n.inputs, *n.outputs):
            members[v].append(var.get(n.name, _S))
    for v in g.outputs:
        members[v].append(_S)
    for v, who in members.items():
        who = list(dict.fromkeys(who))
        nodes = [w for w in who if w != _S]
        if len(who) < 2 or not nodes:
            continue
        r = reorder_time(g.types[v], block)
        a = ("all plain", v)      # in the sink side (paying r) once any member is blocked
        cut.edge(_S, a, r)
        for w in nodes:
            cut.edge(a, w, math.inf)
        if _S not in who:         # and, with no fixed plain member: all blocked or pay r
            b = ("all blocked", v)
            cut.edge(b, _T, r)
            for w in nodes:
                cut.edge(w, b, math.inf)
    blocked = cut.blocked()
    layout = blocked_layout(block)
    return {n.name: layout if var.get(n.name) in blocked else None for n in g.nodes}


# ---- the pass ------------------------------------------------------------------------

def strip_layouts(g: Graph) -> Graph:
    """``g`` (a copy) with every Reorder removed and every value plain."""
    g = g.copy()
    for n in [n for n in g.nodes if n.op == "Reorder"]:
        g.nodes.remove(n)
        replace_uses(g, n.outputs[0], n.inputs[0])
        del g.types[n.outputs[0]]
        g.blob_of.pop(n.outputs[0], None)
    g.types = {v: t.plain for v, t in g.types.items()}
    return g


def apply_layouts(g: Graph, mode: dict[str, str | None]) -> Graph:
    """``g`` (plain, a copy is made) with each node's values in the layout ``mode``
    gives it and Reorders where a value's layouts disagree."""
    g = g.copy()
    index = {o: i for i, n in enumerate(g.nodes) for o in n.outputs}
    stored = {v: None for v in g.inputs}
    for n in g.nodes:
        for o in n.outputs:
            stored[o] = mode.get(n.name)
            g.types[o] = g.types[o].with_layout(stored[o])
    # (value, layout) -> index of the node the Reorder goes before
    place: dict[tuple[str, str | None], int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            if stored[v] != mode.get(n.name):
                place.setdefault((v, mode.get(n.name)), i)
    for v in g.outputs:
        if stored[v] is not None:
            place.setdefault((v, None), index[v] + 1)
    values, names = set(g.types), {n.name for n in g.nodes}
    made: dict[tuple[str, str | None], str] = {}
    before: dict[int, list[Node]] = {}
    for (v, layout), i in sorted(place.items(), key=lambda kv: kv[1]):
        name = fresh_name(f"{v}@{layout or 'plain'}", values | names)
        values.add(name)
        names.add(name)
        node = Node("Reorder", name, [v], [name], [], {"to": layout})
        before.setdefault(i, []).append(node)
        g.types[name] = g.types[v].with_layout(layout)
        g.blob_of[name] = g.blob_of.get(v, v)
        made[(v, layout)] = name
    for n in g.nodes:
        want = mode.get(n.name)
        n.inputs = [v if stored[v] == want else made[(v, want)] for v in n.inputs]
    g.outputs = [v if stored[v] is None else made[(v, None)] for v in g.outputs]
    nodes = []
    for i, n in enumerate(g.nodes):
        nodes.extend(before.get(i, []))
        nodes.append(n)
    nodes.extend(before.get(len(g.nodes), []))
    g.nodes = nodes
    return g


def layout_pass(g: Graph, block: int | None = None) -> Graph:
    """The ``layout`` pass with ``block`` channels per block (default: ``default_block``).
    Layouts already in ``g`` are decided again from scratch."""
    g = strip_layouts(g)
    return apply_layouts(g, assign_layouts(g, block))


@register_pass("layout")
def layout(g: Graph) -> Graph:
    return layout_pass(g)
