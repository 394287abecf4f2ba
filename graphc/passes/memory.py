"""Memory planning: every activation in one arena, at offsets chosen before running.

* Schedule: the node order.  Node i runs at time i; graph inputs exist from time -1,
  graph outputs until time ``len(nodes)``.  Inputs and outputs live in the arena too.
* Buffers: values that share memory (views, ``inplace``, ``by_slices`` Concat bottoms;
  passes/alias.py) form one buffer owned by their root value; its lifetime runs from the
  first definition to the last read of any member.  Two buffers conflict when their
  lifetimes overlap (a node reading one while writing the other counts as overlap).
  *Pinned* values (a training graph's param gradients) live the whole pass.  What an
  op keeps in ``ctx.state`` for its backward (``Op.backward_state_bytes``: Dropout's
  mask, BatchNorm's batch variance) is a buffer too, from the forward node to its last
  Grad node.
* Offsets: greedy best fit -- buffers taken one by one in some order; each goes into the
  smallest gap (among buffers it conflicts with) that holds it, else on top.  Several
  orders are tried (``ORDERS``, then seeded random ones) and the smallest arena is kept,
  stopping early at the lower bound.  Sizes are rounded up to 64 bytes.
* Report: ``naive_bytes`` -- what Caffe allocates: every blob separately (a blob written
  in place counted once; Reshape/Flatten/Split tops share their bottom's data as in
  Caffe, also those of the Splits Caffe inserts), plus for the train phase the diffs
  (every Split top has its own); ``lower_bound_bytes`` -- the largest total
  of bytes live at one time in this schedule; ``planned_bytes`` -- the arena size;
  ``param_bytes``.

Training (``phase="train"``): the lowered net goes through ``TRAIN_PIPELINE`` (autodiff:
a Grad node reads only what its op's backward needs), ``pool-argmax`` (a MAX pooling
keeps its argmax rather than its input where that frees the input), optionally
``recompute`` (cheap layers run again in backward; passes/recompute.py), and
``inplace`` (in the backward graph too: an elementwise gradient, a Sum of partial
gradients, written over a dead buffer).  The whole graph --
forward values kept for backward, activation gradients, saved op state -- is planned
in one arena.  The param gradients are pinned (they live until the solver's update,
and accumulate over ``iter_size`` passes, as Caffe's param diffs): they take a fixed
part of the arena, reported apart (``param_grad_bytes``) beside Caffe's param diffs, so
``planned_bytes`` / ``lower_bound_bytes`` compare with Caffe's blob data + diff.

Scratch space an op may need inside (im2col) is not counted.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field

from ..ir.graph import Graph
from .alias import VIEW_OPS, alias_parents, def_times, last_use_times, root_of

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Buffer:
    root: str            # the value that owns the memory (a state buffer: its own name)
    size: int            # bytes, 64-aligned
    start: int           # first time a member is defined
    end: int             # last time a member is read
    members: list[str] = field(default_factory=list)
    nbytes: int = 0      # bytes, not aligned
    state_of: str | None = None   # the forward node whose ctx.state this holds
    pinned: bool = False          # live the whole pass (param gradients)

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
    pinned_bytes: int = 0            # bytes of the pinned buffers (aligned), in the arena
    pinned_raw_bytes: int = 0        # the same, not aligned (part of the lower bound)


def buffers(g: Graph, pinned=()) -> list[Buffer]:
    """One buffer per root value (passes/alias.py), with the lifetime of all its members
    (a buffer with a pinned member: the whole pass), then the state buffers."""
    parents = alias_parents(g)
    born, last = def_times(g), last_use_times(g)
    pinned = set(pinned)
    by_root: dict[str, Buffer] = {}
    for v, t in g.types.items():
        if v not in born:
            continue
        root, _ = root_of(v, parents)
        b = by_root.get(root)
        if b is None:
            nb = g.types[root].nbytes
            b = by_root[root] = Buffer(root, _align(nb), born[v], last[v], nbytes=nb)
        b.start, b.end = min(b.start, born[v]), max(b.end, last[v])
        b.members.append(v)
    for b in by_root.values():
        if pinned & set(b.members):
            b.start, b.end, b.pinned = -1, len(g.nodes), True
    return list(by_root.values()) + state_buffers(g, set(by_root))


def state_buffers(g: Graph, taken=()) -> list[Buffer]:
    """What forward nodes keep in ``ctx.state`` for their Grad nodes, live from the
    forward node to the last Grad (or Recompute) node of it."""
    from ..ops import get_op
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        if n.op in ("Grad", "Recompute"):
            last[n.attrs["node"]] = i
    out, taken = [], set(taken)
    for i, n in enumerate(g.nodes):
        if n.name not in last or n.op in ("Grad", "Recompute"):
            continue
        nb = get_op(n.op).backward_state_bytes(n.attrs, [g.types[v] for v in n.inputs],
                                               [g.types[v] for v in n.outputs])
        if nb > 0:
            name = f"{n.name}@state"
            while name in taken:
                name += "'"
            taken.add(name)
            out.append(Buffer(name, _align(nb), i, last[n.name], [], nb, n.name))
    return out


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
    "end": lambda b: (-b.end, -b.size),
}

#: after the orders above, up to this many orders by size * lifetime * a random factor
#: in [0.7, 1.3] (seeded: plans are reproducible), unless one reaches the lower bound
RANDOM_TRIES = 24


def lower_bound(bufs: list[Buffer], g: Graph | None = None) -> int:
    """Max over time of the bytes of buffers live then (unaligned sizes)."""
    if not bufs:
        return 0
    lo = min(b.start for b in bufs)
    delta = [0] * (max(b.end for b in bufs) - lo + 2)
    for b in bufs:
        delta[b.start - lo] += b.nbytes
        delta[b.end - lo + 1] -= b.nbytes
    best = live = 0
    for d in delta:
        live += d
        best = max(best, live)
    return best


def plan_memory(g: Graph, pinned=()) -> MemoryPlan:
    """Offsets of every value of ``g`` (already through the passes) in one arena;
    ``pinned`` values (param gradients) live the whole pass."""
    bufs = buffers(g, pinned)
    floor = lower_bound([Buffer(b.root, b.size, b.start, b.end, nbytes=b.size)
                         for b in bufs])     # no arena can be smaller
    orders = list(ORDERS.items())
    rng = random.Random(0)
    for k in range(RANDOM_TRIES):
        noise = {b.root: rng.uniform(0.7, 1.3) for b in bufs}
        orders.append((f"random {k}", lambda b, f=noise: (-b.size * (b.end - b.start + 1)
                                                           * f[b.root])))
    best = None
    for name, key in orders:
        # pinned buffers first: one block at the bottom, the rest planned above it
        offsets, size = _place(sorted(bufs, key=lambda b: (not b.pinned, key(b))))
        if best is None or size < best[1]:
            best = (offsets, size, name)
        if size <= floor:
            break
    offsets, size, name = best if best else ({}, 0, "size")
    parents = alias_parents(g)
    value_off = {}
    for b in bufs:
        for v in b.members:
            _, inner = root_of(v, parents)
            value_off[v] = offsets[b.root] + inner
    pin = [b for b in bufs if b.pinned]
    return MemoryPlan(value_off, size, bufs, offsets, lower_bound(bufs),
                      name, sum(b.size for b in pin), sum(b.nbytes for b in pin))


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


def train_pipelines(recompute: bool = False) -> list[list[str]]:
    """The pass lists a training graph may go through before it is planned (the planner
    keeps the one with the smallest arena).  With ``recompute``, the ``recompute`` pass
    before and after ``pool-argmax``: each decides on what the backward graph reads, and
    either order can be the better one."""
    from . import TRAIN_PIPELINE
    if not recompute:
        return [[*TRAIN_PIPELINE, "pool-argmax", "inplace"]]
    return [[*TRAIN_PIPELINE, "recompute", "pool-argmax", "inplace"],
            [*TRAIN_PIPELINE, "pool-argmax", "recompute", "inplace"]]


def kept_bytes(g: Graph) -> int:
    """Bytes of forward values (buffers) still live when the backward pass starts: what
    the backward graph keeps from the forward pass (with the inputs it reads)."""
    from .recompute import backward_start
    start = backward_start(g)
    if start is None:
        return 0
    return sum(b.nbytes for b in buffers(g) if b.start < start <= b.end
               and not (set(b.members) & set(g.param_grads.values())))


def plan_train(g: Graph, recompute: bool = False) -> tuple[Graph, MemoryPlan]:
    """The training graph of the lowered net ``g`` (the best of ``train_pipelines``)
    and its plan."""
    from . import run_pipeline
    best = None
    for names in train_pipelines(recompute):
        tg = run_pipeline(g, names)
        plan = plan_memory(tg, pinned=tg.param_grads.values())
        if best is None or plan.arena_bytes < best[1].arena_bytes:
            best = (tg, plan)
    return best


def _train_numbers(tg: Graph, plan: MemoryPlan) -> dict:
    planned = plan.arena_bytes - plan.pinned_bytes
    lb = plan.lower_bound_bytes - plan.pinned_raw_bytes
    return {"planned_bytes": planned, "lower_bound_bytes": lb,
            "arena_bytes": plan.arena_bytes, "param_grad_bytes": plan.pinned_raw_bytes,
            "kept_bytes": kept_bytes(tg),
            "state_bytes": sum(b.nbytes for b in plan.buffers if b.state_of),
            "nodes": len(tg.nodes), "buffers": len(plan.buffers),
            "values": len(plan.offsets), "order": plan.order}


def memory_report(g: Graph, pipeline: list[str] | None = None, phase: str | None = None,
                  recompute: bool = False) -> dict:
    """Naive (Caffe) vs planned memory of the lowered graph ``g``, after ``pipeline``
    (default: the default pipeline; for the train phase ``train_pipelines``).  For the
    train phase, ``recompute`` also plans with the ``recompute`` pass and uses that plan
    when its peak is lower; both are reported."""
    from . import run_pipeline
    if phase is None:
        phase = "train" if any(_train_node(n) for n in g.nodes) else "test"
    if phase == "train":
        return _train_report(g, pipeline, recompute)
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
    return report


def _train_report(g: Graph, pipeline: list[str] | None, recompute: bool) -> dict:
    from . import run_pipeline
    if pipeline is not None:
        tg = run_pipeline(g, pipeline)
        runs = {"plain": (tg, plan_memory(tg, pinned=tg.param_grads.values()))}
    else:
        runs = {"plain": plan_train(g)}
        if recompute:
            runs["recompute"] = plan_train(g, recompute=True)
    nums = {k: _train_numbers(tg, plan) for k, (tg, plan) in runs.items()}
    for k, (tg, _) in runs.items():
        nums[k]["recomputed_nodes"] = len(tg.nodes) - len(runs["plain"][0].nodes)
    used = "plain"
    if "recompute" in nums and nums["recompute"]["planned_bytes"] < nums["plain"]["planned_bytes"]:
        used = "recompute"
    tg = runs[used][0]
    naive = naive_bytes(g, "train")
    rep = {"net": g.name, "phase": "train", "naive_bytes": naive,
           **nums[used],
           "param_bytes": sum(p.type.nbytes for p in g.params.values()),
           "param_bytes_lowered": sum(p.type.nbytes for p in g.params.values()),
           "naive_param_diff_bytes": sum(p.type.nbytes for p in g.params.values()),
           "backward_nodes": sum(n.op == "Grad" for n in tg.nodes),
           "recompute_used": used == "recompute"}
    rep["planned_over_naive"] = rep["planned_bytes"] / naive if naive else None
    rep["planned_over_lower_bound"] = (rep["planned_bytes"] / rep["lower_bound_bytes"]
                                       if rep["lower_bound_bytes"] else None)
    if recompute:
        rep["without_recompute"] = nums["plain"]
        if "recompute" in nums:
            rep["with_recompute"] = nums["recompute"]
    if not tg.losses:
        rep["note"] = ("no loss: nothing to differentiate, so this is the forward pass "
                       "only; naive counts data + diff as Caffe allocates")
    return rep


def _train_node(n) -> bool:
    from .util import is_train_node
    return is_train_node(n)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_memory(args) -> int:
    """``graphc memory NET [--phase] [--batch] [--recompute] [--json]``: naive vs planned
    memory."""
    from ..cli import _load_graph
    g = _load_graph(args)
    rep = memory_report(g, phase=args.phase, recompute=getattr(args, "recompute", False))
    if getattr(args, "json", False):
        json.dump(rep, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    w = sys.stdout.write
    train = rep["phase"] == "train"
    what = "after autodiff and the passes" if train else "after the passes"
    w(f"net {rep['net']} ({rep['phase']} phase, {rep['nodes']} nodes {what}, "
      f"{rep['buffers']} buffers for {rep['values']} values)\n")
    if train:
        rows = [("naive (Caffe: blob data + diff)", rep["naive_bytes"]),
                ("lower bound (max live at once)", rep["lower_bound_bytes"]),
                ("planned arena (activations + grads)", rep["planned_bytes"]),
                ("  of it kept from forward to backward", rep["kept_bytes"]),
                ("  of it op state kept for backward", rep["state_bytes"]),
                ("parameters", rep["param_bytes"]),
                ("param gradients (pinned in the arena)", rep["param_grad_bytes"]),
                ("  Caffe's param diffs", rep["naive_param_diff_bytes"])]
    else:
        rows = [("naive (Caffe, one buffer per blob)", rep["naive_bytes"]),
                ("lower bound (max live at once)", rep["lower_bound_bytes"]),
                ("planned arena", rep["planned_bytes"]),
                ("parameters", rep["param_bytes"])]
    for label, n in rows:
        w(f"  {label:<40} {n:>14,d} B  {_mib(n):>12}\n")
    if rep["planned_over_naive"] is not None:
        w(f"  planned / naive        {rep['planned_over_naive']:.3f}\n")
    if rep["planned_over_lower_bound"] is not None:
        w(f"  planned / lower bound  {rep['planned_over_lower_bound']:.3f}\n")
    for key, label in (("without_recompute", "without recompute"),
                       ("with_recompute", "with recompute")):
        if key in rep:
            r = rep[key]
            w(f"  {label + ':':<19} planned {_mib(r['planned_bytes'])}, lower bound "
              f"{_mib(r['lower_bound_bytes'])}, kept {_mib(r['kept_bytes'])}, "
              f"{r['recomputed_nodes']} nodes recomputed\n")
    if "recompute_used" in rep and "with_recompute" in rep:
        w("  recomputation " + ("lowers the peak: used" if rep["recompute_used"]
                                else "does not lower the peak: not used") + "\n")
    if "note" in rep:
        w(f"  note: {rep['note']}\n")
    return 0
