"""The reference executor: runs an IR graph node by node with each op's numpy reference.

It is the ground truth every backend is checked against (and it is checked against real
Caffe).  Like PyTorch FX's Interpreter, it frees each value after its last use unless
asked to keep it.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .errors import GraphcError, OpError
from .ir.graph import Graph
from .ops import get_op
from .ops.base import Context


def last_uses(g: Graph) -> dict[str, int]:
    """value -> index of the last node reading it (graph outputs: len(nodes))."""
    last: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            last[v] = i
    for v in g.outputs:
        last[v] = len(g.nodes)
    return last


def check_feed(g: Graph, name: str, array) -> np.ndarray:
    t = g.types[name]
    a = np.asarray(array)
    if a.shape != t.shape:
        raise GraphcError(f"input '{g.blob_of.get(name, name)}' has shape {list(a.shape)}, "
                          f"the net expects {list(t.shape)}",
                          hint="reshape the net for this input shape (Net.reshape) or pass "
                               "an array of the expected shape")
    return np.ascontiguousarray(a, dtype=t.np_dtype)


class ReferenceExecutor:
    def __init__(self, graph: Graph, ctx: Context | None = None):
        self.graph = graph
        self.ctx = ctx or Context()
        self._last = last_uses(graph)

    def run(self, feeds: dict[str, np.ndarray], keep: Iterable[str] | str = ()) -> dict[str, np.ndarray]:
        """Run the graph. ``feeds``: graph input value -> array. Returns the graph outputs
        plus the values named in ``keep`` (or every value with ``keep="all"``)."""
        g = self.graph
        missing = [v for v in g.inputs if v not in feeds]
        if missing:
            raise GraphcError(f"no data given for input(s) {', '.join(missing)}",
                              hint=f"pass {', '.join(f'{m}=array' for m in missing)}")
        keep_all = keep == "all"
        keep_set = set(g.outputs) | (set() if keep_all else set(keep))
        env: dict[str, np.ndarray] = {v: check_feed(g, v, feeds[v]) for v in g.inputs}
        for i, n in enumerate(g.nodes):
            op = get_op(n.op)
            params = []
            for p in n.params:
                data = g.params[p].data
                if data is None:
                    raise GraphcError(f"param ${p} has no values",
                                      where=n.loc, layer=n.name, layer_type=n.op,
                                      hint="load weights or fill the params first")
                params.append(data)
            self.ctx.node = n
            try:
                outs = op.forward(n.attrs, [env[v] for v in n.inputs], params, self.ctx)
            except OpError as e:
                raise e.located(where=n.loc, layer=n.name, layer_type=n.op)
            if len(outs) != len(n.outputs):
                raise RuntimeError(f"{n.op}.forward returned {len(outs)} outputs for "
                                   f"{len(n.outputs)} declared ({n.name})")
            for v, a in zip(n.outputs, outs):
                t = g.types[v]
                if a.shape != t.shape:
                    raise RuntimeError(f"{n.op}.forward gave {v} shape {a.shape}, inferred "
                                       f"{t.shape} ({n.name})")
                env[v] = a
            if not keep_all:
                for v in n.inputs:
                    if self._last.get(v, -1) <= i and v not in keep_set:
                        env.pop(v, None)
        self.ctx.node = None
        return env if keep_all else {v: env[v] for v in env if v in keep_set}
