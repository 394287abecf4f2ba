"""Memory planning: every activation in one arena, at offsets chosen before running.

* Schedule: the node order.  Node i runs at time i; graph inputs exist from time -1,
  graph outputs until time ``len(nodes)``.  Inputs and outputs live in the arena too.
* Buffers: values that share memory (views, ``inplace``, ``by_slices`` Concat bottoms;
  passes/alias.py) form one buffer owned by their root value; its lifetime runs from the
  first definition to the last read of any member.  Two buffers conflict when their
  lifetimes overlap (a node reading one while writing the other counts as overlap).
* Offsets: greedy best fit -- buffers taken one by one in some order; each goes into the
  smallest gap (among buffers it conflicts with) that holds it, else on top.  Several
  orders are tried and the smallest arena is kept.  Sizes are rounded up to 64 bytes.
* Report: ``naive_bytes`` -- what Caffe allocates: every blob separately (a blob written
  in place counted once; Reshape/Flatten/Split tops share their bottom's data as in
  Caffe, also those of the Splits Caffe inserts), plus for the train phase the diffs
  (every Split top has its own); ``lower_bound_bytes`` -- the largest total
  of bytes live at one time in this schedule; ``planned_bytes`` -- the arena size;
  ``param_bytes``.

Only the forward pass is planned; the train phase's backward graph (which keeps forward
values alive for the gradients) is not planned yet, so its planned/lower-bound numbers
are those of a forward pass.  Scratch space an op may need inside (im2col) is not counted.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from ..ir.graph import Graph
from .alias import VIEW_OPS, alias_parents, def_times, last_use_times, root_of

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Buffer:
    root: str            # the value that owns the memory
    size: int            # bytes, 64-aligned
    start: int           # first time a member is defined
    end: int             # last time a member is read
    members: list[str] = field(default_factory=list)

    def overlaps(self, other: "Buffer") -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass
class MemoryPlan:
    offsets: dict[str, int]          # value -> byte offset in the arena
    arena_bytes: int
    buffers: list[Buffer]
    buffer_offsets: dict[str, int]   # root -> offset
    lower_bound_bytes: int
    order: str                       # which placement order won


def buffers(g: Graph) -> list[Buffer]:
    """One buffer per root value (passes/alias.py), with the lifetime of all its members."""
    parents = alias_parents(g)
    born, last = def_times(g), last_use_times(g)
    by_root: dict[str, Buffer] = {}
    for v, t in g.types.items():
        if v not in born:
            continue
        root, _ = root_of(v, parents)
        b = by_root.get(root)
        if b is None:
            b = by_root[root] = Buffer(root, _align(g.types[root].nbytes), born[v], last[v])
        b.start, b.end = min(b.start, born[v]), max(b.end, last[v])
        b.members.append(v)
    return list(by_root.values())


def _place(bufs: list[Buffer]) -> tuple[dict[str, int], int]:
    """Best fit in the given order: the smallest free gap between the buffers placed so
    far that are live at the same time, else above them all.  -> (offsets, arena size)"""
    placed: list[tuple[int, Buffer]] = []
    offsets: dict[str, int] = {}
    top = 0
    for b in bufs:
        busy = sorted((off, off + o.size) for off, o in placed if o.overlaps(b))
        best, best_gap, cursor = None, None, 0
        for lo, hi in busy:
            gap = lo - cursor
            if gap >= b.size and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, hi)
        if best is None:
            best = cursor
        offsets[b.root] = best
        placed.append((best, b))
        top = max(top, best + b.size)
    return offsets, top


ORDERS = {
    "size": lambda b: (-b.size, b.start),
    "size*lifetime": lambda b: (-b.size * (b.end - b.start + 1), b.start),
    "lifetime": lambda b: (-(b.end - b.start), -b.size),
    "start": lambda b: (b.start, -b.size),
}


def lower_bound(bufs: list[Buffer], g: Graph) -> int:
    """Max over time of the bytes of buffers live then (unaligned sizes)."""
    if not bufs:
        return 0
    times = range(min(b.start for b in bufs), max(b.end for b in bufs) + 1)
    raw = {b.root: g.types[b.root].nbytes for b in bufs}
    return max(sum(raw[b.root] for b in bufs if b.start <= t <= b.end) for t in times)


def plan_memory(g: Graph) -> MemoryPlan:
    """Offsets of every value of ``g`` (already through the passes) in one arena."""
    bufs = buffers(g)
    best = None
    for name, key in ORDERS.items():
        offsets, size = _place(sorted(bufs, key=key))
        if best is None or size < best[1]:
            best = (offsets, size, name)
    offsets, size, name = best if best else ({}, 0, "size")
    parents = alias_parents(g)
    value_off = {}
    for b in bufs:
        for v in b.members:
            _, inner = root_of(v, parents)
            value_off[v] = offsets[b.root] + inner
    return MemoryPlan(value_off, size, bufs, offsets, lower_bound(bufs, g), name)


def check_plan(g: Graph, plan: MemoryPlan) -> None:
    """Raise AssertionError if two values that are live together (and do not share a
    buffer) overlap in the arena.  For tests."""
    bufs = plan.buffers
    for i, a in enumerate(bufs):
        oa = plan.buffer_offsets[a.root]
        assert 0 <= oa and oa + a.size <= plan.arena_bytes, a.root
        for b in bufs[i + 1:]:
            ob = plan.buffer_offsets[b.root]
            if a.overlaps(b):
                assert oa + a.size <= ob or ob + b.size <= oa, (a.root, b.root)


def naive_bytes(g: Graph, phase: str = "test") -> int:
    """What Caffe allocates for blobs: one buffer per blob name (in-place layers write the
    same blob); none for the tops of Reshape/Flatten/Split, which share their bottom's
    data -- this includes the Split layers Caffe inserts for a blob read by several
    layers.  For the train phase add the diffs: one per blob, shared the same way except
    that every Split top (written or inserted by Caffe) has its own."""
    shared = {o for n in g.nodes if n.op in VIEW_OPS for o in n.outputs}
    split_tops = {o for n in g.nodes if n.op == "Split" for o in n.outputs}
    sizes: dict[str, int] = {}
    for v, t in g.types.items():
        if v not in shared:
            blob = g.blob_of.get(v, v)
            sizes[blob] = max(sizes.get(blob, 0), t.nbytes)
    data = sum(sizes.values())
    if phase != "train":
        return data
    reads: dict[str, int] = {}
    for n in g.nodes:
        for v in n.inputs:
            reads[v] = reads.get(v, 0) + 1
    inserted = sum(k * g.types[v].nbytes for v, k in reads.items() if k > 1)
    return 2 * data + sum(g.types[v].nbytes for v in split_tops) + inserted


def memory_report(g: Graph, pipeline: list[str] | None = None, phase: str | None = None) -> dict:
    """Naive (Caffe) vs planned memory of the lowered graph ``g``, after ``pipeline``
    (default: the default pipeline)."""
    from . import run_pipeline
    if phase is None:
        phase = "train" if any(_train_node(n) for n in g.nodes) else "test"
    opt = run_pipeline(g, pipeline)
    plan = plan_memory(opt)
    naive = naive_bytes(g, phase)
    report = {
        "net": g.name,
        "phase": phase,
        "naive_bytes": naive,
        "lower_bound_bytes": plan.lower_bound_bytes,
        "planned_bytes": plan.arena_bytes,
        "param_bytes": sum(p.type.nbytes for p in opt.params.values()),
        "param_bytes_lowered": sum(p.type.nbytes for p in g.params.values()),
        "planned_over_naive": plan.arena_bytes / naive if naive else None,
        "planned_over_lower_bound": (plan.arena_bytes / plan.lower_bound_bytes
                                     if plan.lower_bound_bytes else None),
        "nodes": len(opt.nodes),
        "buffers": len(plan.buffers),
        "values": len(plan.offsets),
        "order": plan.order,
    }
    if phase == "train":
        report["note"] = ("forward pass only: the backward graph is not planned yet; "
                          "naive counts data + diff as Caffe allocates")
    return report


def _train_node(n) -> bool:
    from .util import is_train_node
    return is_train_node(n)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_memory(args) -> int:
    """``graphc memory NET [--phase] [--batch] [--json]``: naive vs planned memory."""
    from ..cli import _load_graph
    g = _load_graph(args)
    rep = memory_report(g, phase=args.phase)
    if getattr(args, "json", False):
        json.dump(rep, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    w = sys.stdout.write
    w(f"net {rep['net']} ({rep['phase']} phase, {rep['nodes']} nodes after the passes, "
      f"{rep['buffers']} buffers for {rep['values']} values)\n")
    rows = [("naive (Caffe, one buffer per blob)", rep["naive_bytes"]),
            ("lower bound (max live at once)", rep["lower_bound_bytes"]),
            ("planned arena", rep["planned_bytes"]),
            ("parameters", rep["param_bytes"])]
    for label, n in rows:
        w(f"  {label:<36} {n:>14,d} B  {_mib(n):>12}\n")
    if rep["planned_over_naive"] is not None:
        w(f"  planned / naive        {rep['planned_over_naive']:.3f}\n")
    if rep["planned_over_lower_bound"] is not None:
        w(f"  planned / lower bound  {rep['planned_over_lower_bound']:.3f}\n")
    if "note" in rep:
        w(f"  note: {rep['note']}\n")
    return 0
