"""Lowering: a Caffe NetParameter (already upgraded to the V2 `layer` form) -> IR Graph.

What Caffe's Net::Init does, made explicit:
* phase/level/stage filtering (``filter_net``);
* Input layers become graph inputs (``--batch``/``input_shapes`` override their shapes);
* every other layer becomes a node; its learnable blobs become ``Param``s named
  ``<layer>.<i>``, or the ``param { name }`` the user gave (shared across layers);
* in-place layers (top == bottom) define a new SSA value ``<blob>~<layer>`` that keeps
  the Caffe blob name, so ``net.blobs[...]`` still means what it means in Caffe;
* loss weights: the ``loss_weight`` fields, or 1 on the first top of a loss layer;
* graph outputs are the blobs no layer consumes (Caffe's net outputs).
Every error names file:line and the layer.
"""
from __future__ import annotations

import difflib

from ..errors import GraphcError, OpError
from ..ir.graph import Graph, Node, Param
from ..ir.types import TensorType
from ..ops import get_op, has_op, all_ops
from .prototxt import NetSource, filter_net

PHASES = ("train", "test")


def _phase_name(phase) -> str:
    p = str(phase).lower()
    if p not in PHASES:
        raise GraphcError(f"unknown phase {phase!r}", hint="use 'train' or 'test'")
    return p


def lower(src: NetSource, phase: str = "test", *, level: int = 0, stages=(),
          input_shapes: dict[str, tuple[int, ...]] | None = None,
          batch: int | None = None) -> Graph:
    """Lower ``src`` to a verified Graph for ``phase``.

    ``input_shapes`` overrides the shapes of named graph inputs; ``batch`` sets the first
    dimension of every graph input (and of data layers that know a batch size)."""
    phase = _phase_name(phase)
    net, kept = filter_net(src.net, phase, level, tuple(stages))
    lines = [src.layer_lines[i] if i < len(src.layer_lines) else None for i in kept]
    g = Graph(net.name or "net")
    current: dict[str, str] = {}          # Caffe blob name -> current SSA value
    node_names: set[str] = set()
    consumed: set[str] = set()
    input_shapes = dict(input_shapes or {})

    for layer, line in zip(net.layer, lines):
        where = f"{src.filename}:{line}" if line else src.filename
        lname = layer.name or f"{layer.type.lower()}{len(node_names)}"
        try:
            _lower_layer(g, layer, lname, phase, where, current, node_names, consumed,
                         input_shapes, batch)
        except GraphcError as e:
            raise e.located(where=where, layer=lname, layer_type=layer.type)

    unknown = set(input_shapes) - set(g.inputs)
    if unknown:
        raise GraphcError(f"no input blob named {', '.join(sorted(unknown))}",
                          where=src.filename,
                          hint=f"the net's inputs are: {', '.join(g.inputs) or '(none)'}")
    g.outputs = [v for v in current.values() if v not in consumed]
    from ..ir.verify import verify
    verify(g, check_types=False)
    return g


def _unique(name: str, taken) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}#{k}" in taken:
        k += 1
    return f"{name}#{k}"


def _lower_layer(g: Graph, layer, lname: str, phase: str, where: str, current: dict,
                 node_names: set, consumed: set, input_shapes: dict, batch) -> None:
    if not layer.type:
        raise GraphcError("the layer has no type", hint='add a field like type: "Convolution"')
    if not has_op(layer.type):
        close = difflib.get_close_matches(layer.type, list(all_ops()), n=3)
        hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                else "graphc knows: " + ", ".join(sorted(all_ops())))
        raise GraphcError(f"unknown layer type '{layer.type}'", hint=hint)
    op = get_op(layer.type)
    attrs = op.from_caffe(layer, phase)
    bottoms, tops = list(layer.bottom), list(layer.top)
    op.check_arity(len(bottoms), len(tops))

    in_values = []
    for b in bottoms:
        if b not in current:
            raise GraphcError(f"bottom '{b}' is not produced by any earlier layer",
                              hint=f"add a layer with top: \"{b}\" before this one, or fix the "
                                   f"name (blobs so far: {', '.join(current) or 'none'})")
        in_values.append(current[b])
    in_types = [g.types[v] for v in in_values]

    if op.is_graph_input:
        out_types = op.infer(attrs, [], [])
        for top, t in zip(tops, out_types):
            if top in current:
                raise GraphcError(f"top '{top}' is produced by more than one layer",
                                  hint="rename one of the tops")
            shape = tuple(input_shapes.pop(top, t.shape))
            if batch is not None and shape:
                shape = (int(batch),) + shape[1:]
            current[top] = g.add_input(_unique(top, g.types), t.with_shape(shape), top)
        return

    # learnable blobs
    specs = op.param_specs(attrs, in_types)
    if len(layer.param) > len(specs):
        raise GraphcError(f"{len(layer.param)} param {{}} entries given but the layer has "
                          f"{len(specs)} learnable blob(s)",
                          hint=f"give at most {len(specs)} param {{}} entries")
    pnames = []
    for i, spec in enumerate(specs):
        ps = layer.param[i] if i < len(layer.param) else None
        lr = ps.lr_mult if ps is not None else 1.0
        decay = ps.decay_mult if ps is not None else 1.0
        if op.fixed_lr_mult is not None:
            if ps is not None and ps.HasField("lr_mult") and ps.lr_mult != op.fixed_lr_mult:
                raise GraphcError(f"{layer.type} blob {i} must have lr_mult {op.fixed_lr_mult}, "
                                  f"got {ps.lr_mult}",
                                  hint=f"remove lr_mult or set it to {op.fixed_lr_mult}")
            lr = op.fixed_lr_mult
        t = TensorType(tuple(spec.shape), "f32")
        shared = ps.name if ps is not None and ps.name else None
        if shared and shared in g.params:
            if g.params[shared].type != t:
                raise GraphcError(f"shared param '{shared}' has shape "
                                  f"{list(g.params[shared].type.shape)} in an earlier layer but "
                                  f"{list(t.shape)} here",
                                  hint="layers sharing a param must give it the same shape")
            pnames.append(shared)
            continue
        pname = shared or _unique(f"{lname}.{i}", g.params)
        g.add_param(Param(pname, t, float(lr), float(decay), None, dict(spec.filler)))
        pnames.append(pname)
    param_types = [g.params[p].type for p in pnames]
    out_types = op.infer(attrs, in_types, param_types)

    # tops: in-place ones get a new SSA version of the blob
    out_values = []
    for top in tops:
        if top in bottoms:
            v = _unique(f"{top}~{lname}", g.types)
        else:
            if top in current:
                raise GraphcError(f"top '{top}' is already produced by an earlier layer",
                                  hint="rename the top, or use it in place (list it as a bottom "
                                       "too) if the layer supports that")
            v = _unique(top, g.types)
        out_values.append(v)

    # loss weights (Caffe: a loss layer's first top weighs 1 unless told otherwise)
    if len(layer.loss_weight) not in (0, len(tops)):
        raise GraphcError(f"{len(layer.loss_weight)} loss_weight values for {len(tops)} tops",
                          hint="give one loss_weight per top, or none")
    weights = list(layer.loss_weight) or ([1.0] + [0.0] * (len(tops) - 1) if op.is_loss and tops
                                          else [])
    if any(w != 0 for w in weights):
        attrs["loss_weight"] = [float(w) for w in weights]
    if layer.propagate_down:
        attrs["propagate_down"] = [bool(p) for p in layer.propagate_down]

    name = _unique(lname, node_names)
    node_names.add(name)
    consumed.update(in_values)
    g.add_node(Node(layer.type, name, in_values, out_values, pnames, attrs, where),
               list(out_types), tops)
    for top, v in zip(tops, out_values):
        current[top] = v
