"""``recompute``: in a training graph, compute cheap layers again in the backward pass
instead of keeping their outputs from the forward pass (compute traded for memory).

The forward values a backward graph reads stay alive from the forward pass to their
last backward use.  A *chain* of cheap nodes (``cheap``: ReLU, BatchNorm, Scale, LRN,
pooling, Concat, Eltwise, a depthwise convolution, views...; joined through the values
they pass each other) can instead run again, from values it reads, just before the
backward pass first needs one of its outputs.  E.g. convolution -> BatchNorm -> Scale
-> ReLU keeps the BatchNorm output (read by the BatchNorm and Scale gradients) and the
ReLU output (read by the ReLU gradient and the next layer's weight gradient); keeping
only the BatchNorm output and running Scale and ReLU again halves that.

Per chain, the options are: for each value u entering or inside the chain (and for all
of its entering values at once), recompute what backward reads downstream of u, which
makes backward read the inputs of the recomputed nodes instead.  The option that keeps
the fewest bytes from forward to backward wins (counted per buffer: a view is its
input's memory; a buffer holding a graph output is kept anyway), ties going to fewer
recomputed nodes; a chain keeps everything when no option saves bytes.  The copies:

* a copy of each recomputed node, named ``<node>@re``, with outputs ``<value>@re``; an
  op that updates its params in its forward (BatchNorm's moving averages) is wrapped
  in a ``Recompute`` node (ops/grad.py), which updates copies;
* each copy is placed just before the first backward node (or copy) that reads it;
* backward nodes read the copies; forward nodes still read the originals.

Cheap ops give the same outputs every time, so the copies compute exactly what the
forward pass computed and the gradients do not change (Dropout, whose mask is random,
is never recomputed).  Run before ``inplace``.  The memory planner (``graphc memory
--recompute``) plans with and without this pass and uses it when the peak is lower.
"""
from __future__ import annotations

from collections import Counter

from ..ir.graph import Graph, Node
from ..ops import get_op
from . import register_pass
from .alias import alias_parents, is_view, root_of
from .util import fresh_name

#: a node is cheap when its forward costs at most this many flops per output element
#: (``Op.cost``): ReLU 1, Scale 2, BatchNorm 6, LRN and 3x3 pooling 9, a 3x3 depthwise
#: convolution 19, copies (Concat, Slice) 0 -- about what moving the data costs.  A
#: convolution over several channels per output, an InnerProduct, a global pooling, a
#: loss are not.
CHEAP_FLOPS = 20

#: ops never run twice: their forward draws random numbers or has effects of its own
NOT_REPEATABLE = ("Dropout", "Python")

#: ops only the backward graph has (autodiff, this pass)
BACKWARD_OPS = ("Grad", "Sum", "Fill", "Recompute")


def cheap(g: Graph, n: Node) -> bool:
    """A node this pass may run again: a view, or a node with inputs whose op gives the
    same outputs every time (not ``NOT_REPEATABLE``, not stochastic pooling) and costs
    at most ``CHEAP_FLOPS`` per output element."""
    if is_view(n):
        return True
    if not n.inputs or not n.outputs or n.op in NOT_REPEATABLE or n.op in BACKWARD_OPS:
        return False
    if n.op == "Pooling" and n.attrs.get("pool") == "STOCHASTIC":
        return False
    outs = [g.types[v] for v in n.outputs]
    flops = get_op(n.op).cost(n.attrs, [g.types[v] for v in n.inputs],
                              [g.params[p].type for p in n.params], outs).flops
    return flops <= CHEAP_FLOPS * sum(t.numel for t in outs)


def backward_start(g: Graph) -> int | None:
    """Index of the first node of the backward graph (None: there is none)."""
    for i, n in enumerate(g.nodes):
        if n.op in BACKWARD_OPS:
            return i
    return None


def _chains(g: Graph, nodes: list[Node]) -> list[list[Node]]:
    """Connected groups of cheap nodes (joined by the values they pass each other), each
    in forward order."""
    ok = [n for n in nodes if cheap(g, n)]
    parent = {n.name: n.name for n in ok}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    made = {o: n for n in ok for o in n.outputs}
    for n in ok:
        for v in n.inputs:
            if v in made:
                parent[find(n.name)] = find(made[v].name)
    groups: dict[str, list[Node]] = {}
    for n in ok:
        groups.setdefault(find(n.name), []).append(n)
    return list(groups.values())


class _Kept:
    """The buffers (alias roots) the backward graph reads from the forward pass, with
    how many of their members it reads; a root holding a graph output is live anyway."""

    def __init__(self, g: Graph, read_bwd: set[str], protected: set[str]):
        parents = alias_parents(g)
        self.g = g
        self.root = {v: root_of(v, parents)[0] for v in g.types}
        self.count = Counter(self.root[v] for v in read_bwd)
        self.free = {self.root[v] for v in protected}

    def saving(self, drop: list[str], add: set[str]) -> int:
        """Bytes no longer kept when the backward graph stops reading the values in
        ``drop`` and starts reading those in ``add``."""
        after = Counter(self.count)
        for v in drop:
            after[self.root[v]] -= 1
        for v in add:
            after[self.root[v]] += 1
        touched = {self.root[v] for v in (*drop, *add)} - self.free
        size = self.g.types
        return sum(size[r].nbytes * ((self.count[r] > 0) - (after[r] > 0)) for r in touched)

    def apply(self, drop: list[str], add: set[str]) -> None:
        for v in drop:
            self.count[self.root[v]] -= 1
        for v in add:
            self.count[self.root[v]] += 1


def _plan_chain(chain: list[Node], read_bwd: set[str], kept: _Kept):
    """The best recomputation for one chain: -> (nodes to copy in forward order, the
    values backward stops reading, the values it starts reading), or None.

    Options: for each value u entering or inside the chain, recompute what the backward
    reads downstream of u (and all of the chain, from all its sources); each keeps
    instead the inputs of the recomputed nodes.  The option keeping the fewest bytes
    wins (ties: fewer nodes); None when none beats keeping everything."""
    made = {o: n for n in chain for o in n.outputs}
    if not any(v in read_bwd for v in made):
        return None
    readers: dict[str, list[Node]] = {}
    for n in chain:
        for v in n.inputs:
            readers.setdefault(v, []).append(n)
    sources = [v for v in readers if v not in made]

    def downstream(starts) -> list[Node]:
        seen, todo = set(), [n for v in starts for n in readers.get(v, [])]
        while todo:
            n = todo.pop()
            if n.name not in seen:
                seen.add(n.name)
                todo += [m for o in n.outputs for m in readers.get(o, [])]
        return [n for n in chain if n.name in seen]

    best, best_key = None, (0, 0)
    for starts in [[v] for v in (*sources, *made)] + [sources]:
        region = downstream(starts)
        inside = {o for n in region for o in n.outputs}
        drop = [o for o in inside if o in read_bwd]
        # the nodes those need (within the region)
        need, todo = set(), [made[o] for o in drop]
        while todo:
            n = todo.pop()
            if n.name not in need:
                need.add(n.name)
                todo += [made[v] for v in n.inputs if v in inside]
        nodes = [n for n in region if n.name in need]
        if not nodes:
            continue
        outs = {o for n in nodes for o in n.outputs}
        add = {v for n in nodes for v in n.inputs if v not in outs}
        key = (kept.saving(drop, add), -len(nodes))
        if key[0] > 0 and key > best_key:
            best, best_key = (nodes, drop, add), key
    return best


@register_pass("recompute")
def recompute(g: Graph) -> Graph:
    g = g.copy()
    start = backward_start(g)
    if start is None:
        return g
    fwd, bwd = g.nodes[:start], g.nodes[start:]
    read_bwd = {v for n in bwd for v in n.inputs}
    protected = set(g.outputs) | {v for v, _ in g.losses}
    names = {n.name for n in g.nodes}
    kept = _Kept(g, read_bwd, protected)
    renamed: dict[str, str] = {}          # original value -> its recomputed copy
    copies: list[Node] = []
    for chain in _chains(g, fwd):
        choice = _plan_chain(chain, read_bwd, kept)
        if choice is None:
            continue
        todo, drop, add = choice
        kept.apply(drop, add)
        read_bwd.difference_update(drop)
        read_bwd.update(add)
        for n in todo:
            outs = []
            for o in n.outputs:
                new = fresh_name(f"{o}@re", g.types)
                g.types[new], g.blob_of[new] = g.types[o], g.blob_of.get(o, o)
                renamed[o] = new
                outs.append(new)
            name = fresh_name(f"{n.name}@re", names)
            names.add(name)
            attrs = {k: v for k, v in n.attrs.items()
                     if k not in ("inplace", "by_slices", "keep_argmax")}
            ins = [renamed.get(v, v) for v in n.inputs]
            if get_op(n.op).updates_params:
                copy = Node("Recompute", name, ins, outs, list(n.params),
                            {"op": n.op, "attrs": attrs, "node": n.name}, n.loc)
            else:
                copy = Node(n.op, name, ins, outs, list(n.params), attrs, n.loc)
            copies.append(copy)
    if not copies:
        return g
    for n in bwd:
        n.inputs = [renamed.get(v, v) for v in n.inputs]

    # place each copy before its first reader (a backward node or a later copy)
    first: dict[str, int] = {}
    for i, n in enumerate(bwd):
        for v in n.inputs:
            first.setdefault(v, i)
    at: dict[str, int] = {}
    for c in reversed(copies):
        uses = [first[o] for o in c.outputs if o in first]
        uses += [at[d.name] for d in copies if set(c.outputs) & set(d.inputs) and d.name in at]
        at[c.name] = min(uses)
    order = []
    for i, n in enumerate(bwd):
        order += [c for c in copies if at[c.name] == i]
        order.append(n)
    g.nodes = fwd + order
    return g
