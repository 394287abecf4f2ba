"""The IR verifier: structural rules (SSA, order, references) and, with ``check_types``,
that every recorded type is what the op's shape rule infers."""
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
        if p.data is not None and tuple(p.data.shape) != p.type.shape:
            raise _fail(g, f"param ${name} holds data of shape {list(p.data.shape)} but its "
                           f"type is {p.type}")
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
            try:
                op.check_arity(len(n.inputs), len(n.outputs))
                inferred = op.infer(n.attrs, [g.types[i] for i in n.inputs],
                                    [g.params[p].type for p in n.params])
            except OpError as e:
                raise e.located(where=n.loc, layer=n.name, layer_type=n.op)
            recorded = [g.types[o] for o in n.outputs]
            if list(inferred) != recorded:
                raise _fail(g, f"recorded output types {[str(t) for t in recorded]} differ from "
                               f"the inferred {[str(t) for t in inferred]}", n)
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
