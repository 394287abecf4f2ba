"""Looking inside the train net after a forward pass: per-layer values for ``debug_info``,
and the first layer whose output went non-finite when the loss diverges.

Both replay the last forward node by node: values that are still in ``net.blobs`` (the last
version of each blob, as after Caffe's forward) are taken from there; the others (blobs
that an in-place layer overwrote later) are recomputed with each op's reference forward,
on copies of the params so that layers which update their params while running forward
(BatchNorm's statistics) are not changed a second time.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..ops import get_op
from ..ops.base import Context


def replay_forward(net) -> Iterator[tuple]:
    """Yield (node, [output arrays]) for every node of ``net.graph`` in order."""
    g = net.graph
    last = g.blob_versions()
    blobs = getattr(net, "blobs", {})

    def stored(v):
        blob = g.blob_of.get(v, v)
        if last.get(blob) == v and blob in blobs:
            return np.asarray(blobs[blob])
        return None

    env = {v: stored(v) for v in g.inputs}
    ctx = Context(phase=getattr(net, "phase", "train"), rng=np.random.default_rng(0))
    for n in g.nodes:
        outs = [stored(o) for o in n.outputs]
        if any(o is None for o in outs):
            ins = [env.get(i) for i in n.inputs]
            if any(i is None for i in ins):
                return
            ctx.node = n
            params = [np.array(g.params[p].data, copy=True) for p in n.params]
            computed = get_op(n.op).forward(n.attrs, ins, params, ctx)
            outs = [c if o is None else o for o, c in zip(outs, computed)]
        for o, a in zip(n.outputs, outs):
            env[o] = a
        yield n, outs


def mean_abs(a) -> np.float32:
    """Caffe's ``asum / count`` in float."""
    a = np.asarray(a, np.float32)
    return np.float32(np.abs(a, dtype=np.float32).sum(dtype=np.float64) / max(a.size, 1))


def first_nonfinite(net) -> dict | None:
    """Where the forward first produced a NaN or Inf: {"node", "output", "inputs_finite",
    "bad_params"}, or None if every replayed value is finite."""
    g = net.graph
    try:
        for n, outs in replay_forward(net):
            for v, a in zip(n.outputs, outs):
                if a is not None and not np.all(np.isfinite(a)):
                    bad_params = [p for p in n.params
                                  if not np.all(np.isfinite(g.params[p].data))]
                    return {"node": n, "output": g.blob_of.get(v, v), "bad_params": bad_params,
                            "value": a}
    except Exception:  # the diagnosis must not hide the divergence it is reporting
        return None
    return None
