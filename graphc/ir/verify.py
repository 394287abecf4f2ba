"""The IR verifier: structural rules (SSA, order, references) and, with ``check_types``,
that every recorded type is what the op's shape rule infers.

Layouts (ir/types.py): a blocked layout only on 4-D f32 values; graph inputs, graph
outputs and params plain; and, with ``check_types``, every node's values in layouts it
accepts (ops/layout.py: all plain, or all in one blocked layout the op can run on; a
Reorder writes the layout it names).  Shape rules see the logical (plain) types."""
from __future__ import annotations

from ..errors import GraphcError, OpError
from .graph import Graph


def _fail(g: Graph, msg: str, node=None, hint: str | None = None) -> GraphcError:
    return GraphcError(f"invalid IR in graph '{g.name}': {msg}",
                       where=getattr(node, "loc", None),
                       layer=getattr(node, "name", None),
                       layer_type=getattr(node, "op", None), hint=hint)


def verify(g: Graph, check_types: bool = True) -> Graph:
    """Raise GraphcError on the first broken rule; return ``g`` when it is valid."""
    from ..ops.base import get_op, has_op
    from ..ops.layout import layout_problem

    defined: set[str] = set()
    for v in g.inputs:
        if v in defined:
            raise _fail(g, f"input %{v} is declared twice")
        if v not in g.types:
            raise _fail(g, f"input %{v} has no type")
        defined.add(v)
    for name, p in g.params.items():
        if p.name != name:
            raise _fail(g, f"param table key {name!r} names param {p.name!r}")
        if p.type.layout is not None:
            raise _fail(g, f"param ${name} has layout {p.type.layout}; params are plain")
        if p.data is not None and tuple(p.data.shape) != p.type.shape:
            raise _fail(g, f"param ${name} holds data of shape {list(p.data.shape)} but its "
                           f"type is {p.type}")
    for v, t in g.types.items():
        if t.layout is not None and (t.rank != 4 or t.dtype != "f32"):
            raise _fail(g, f"value %{v} of type {t}: a blocked layout needs a 4-D f32 value",
                        hint="keep other values plain (no {layout} after the type)")
    for what, vs in (("input", g.inputs), ("output", g.outputs)):
        for v in vs:
            if v in g.types and g.types[v].layout is not None:
                raise _fail(g, f"graph {what} %{v} has layout {g.types[v].layout}; graph "
                               f"inputs and outputs are plain",
                            hint="reorder it inside the graph (a Reorder node)")
    names: set[str] = set()
    for n in g.nodes:
        if n.name in names:
            raise _fail(g, f"two nodes are named '{n.name}'", n, "give every layer a unique name")
        names.add(n.name)
        for i in n.inputs:
            if i not in defined:
                raise _fail(g, f"input %{i} is used before it is defined", n)
        for p in n.params:
            if p not in g.params:
                raise _fail(g, f"param ${p} does not exist", n)
        for o in n.outputs:
            if o in defined:
                raise _fail(g, f"value %{o} is defined twice (the IR is SSA)", n)
            if o not in g.types:
                raise _fail(g, f"output %{o} has no type", n)
            defined.add(o)
        if check_types:
            if not has_op(n.op):
                raise _fail(g, f"unknown op '{n.op}'", n)
            op = get_op(n.op)
            in_types = [g.types[i] for i in n.inputs]
            param_types = [g.params[p].type for p in n.params]
            try:
                op.check_arity(len(n.inputs), len(n.outputs))
                inferred = op.infer(n.attrs, [t.plain for t in in_types], param_types)
            except OpError as e:
                raise e.located(where=n.loc, layer=n.name, layer_type=n.op)
            recorded = [g.types[o] for o in n.outputs]
            if [t.plain for t in inferred] != [t.plain for t in recorded]:
                raise _fail(g, f"recorded output types {[str(t) for t in recorded]} differ from "
                               f"the inferred {[str(t) for t in inferred]}", n)
            why = layout_problem(n.op, n.attrs, in_types, param_types, recorded)
            if why:
                raise _fail(g, f"layouts: {why}", n,
                            hint="put a Reorder between values of different layouts "
                                 "(the layout pass places them)")
    for o in g.outputs:
        if o not in defined:
            raise _fail(g, f"graph output %{o} is never defined")
    for v, _ in g.losses:
        if v not in defined:
            raise _fail(g, f"loss term %{v} is never defined")
    for p, v in g.param_grads.items():
        if p not in g.params:
            raise _fail(g, f"gradient of param ${p}, which does not exist")
        if v not in defined or g.types[v].shape != g.params[p].type.shape:
            raise _fail(g, f"gradient %{v} of param ${p} is not a defined value of its shape")
    for x, v in g.value_grads.items():
        if x not in defined or v not in defined or g.types[v].shape != g.types[x].shape:
            raise _fail(g, f"gradient %{v} of %{x} is not a defined value of its shape")
    return g
