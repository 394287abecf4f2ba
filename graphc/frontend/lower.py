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
from .prototxt import NetSource, filter_net, read_net

PHASES = ("train", "test")


def load_net_source(model) -> NetSource:
    """A net from a .prototxt path, a NetSource, a caffe_pb2.NetParameter, or anything with
    ``to_proto()`` (a NetSpec)."""
    from . import caffe_pb2
    if isinstance(model, NetSource):
        return model
    if hasattr(model, "to_proto"):
        model = model.to_proto()
    if isinstance(model, caffe_pb2.NetParameter):
        from .upgrade import upgrade_net
        net, _ = upgrade_net(model)
        return NetSource(net, f"<net {net.name or 'unnamed'}>", [])
    return read_net(model)


def _phase_name(phase) -> str:
    p = str(phase).lower()
    if p not in PHASES:
        raise GraphcError(f"unknown phase {phase!r}", hint="use 'train' or 'test'")
    return p


def lower(src: NetSource, phase: str = "test", *, level: int | None = None, stages=(),
          input_shapes: dict[str, tuple[int, ...]] | None = None,
          batch: int | None = None) -> Graph:
    """Lower ``src`` to a verified Graph for ``phase``.

    ``input_shapes`` overrides the shapes of named graph inputs; a data layer (no bottoms)
    all of whose tops are named there becomes graph inputs of those shapes, fed by the
    caller instead of read from its source. ``batch`` sets the first dimension of every
    graph input. ``level`` None keeps the net's own ``state { level }``."""
    phase = _phase_name(phase)
    net, kept = filter_net(src.net, phase, level, tuple(stages))
    lines = [src.layer_lines[i] if i < len(src.layer_lines) else None for i in kept]
    net, lines = insert_splits(net, lines)
    g = Graph(net.name or "net")
    current: dict[str, str] = {}          # Caffe blob name -> current SSA value
    node_names: set[str] = set()
    consumed: set[str] = set()
    input_shapes = dict(input_shapes or {})

    for idx, (layer, line) in enumerate(zip(net.layer, lines)):
        where = f"{src.filename}:{line}" if line else src.filename
        lname = layer.name or f"{layer.type.lower()}{len(node_names)}"
        try:
            for b in layer.bottom:
                if b not in current:
                    raise _missing_bottom(net, lines, src.filename, idx, b, current)
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
    g.force_backward = bool(net.force_backward)
    from ..ir.verify import verify
    verify(g, check_types=False)
    return g


def split_blob_name(layer: str, blob: str, top_index: int, k: int) -> str:
    return f"{blob}_{layer}_{top_index}_split_{k}"


def insert_splits(net, lines):
    """Caffe's InsertSplits: a blob version read by more than one layer (a top with a
    nonzero explicit loss_weight counts as one reader) gets a Split layer right after its
    producer, and each reader reads its own split top.  Caffe's names
    (``<blob>_<layer>_<i>_split[_k]``) are kept so blobs match pycaffe's ``net.blobs``.
    Returns (new net, line of each new layer). Unknown bottoms are left for the lowering
    to report."""
    from . import caffe_pb2
    last_top: dict[str, tuple[int, int]] = {}
    source: dict[tuple[int, int], tuple[int, int]] = {}
    count: dict[tuple[int, int], int] = {}
    loss_w: dict[tuple[int, int], float] = {}
    for i, layer in enumerate(net.layer):
        for j, b in enumerate(layer.bottom):
            if b in last_top:
                source[(i, j)] = last_top[b]
                count[last_top[b]] = count.get(last_top[b], 0) + 1
        for j, t in enumerate(layer.top):
            last_top[t] = (i, j)
        for j in range(min(len(layer.loss_weight), len(layer.top))):
            idx = last_top[layer.top[j]]
            loss_w[idx] = layer.loss_weight[j]
            if loss_w[idx]:
                count[idx] = count.get(idx, 0) + 1
    if not any(c > 1 for c in count.values()):
        return net, lines
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    out.ClearField("layer")
    out_lines = []
    next_split: dict[tuple[int, int], int] = {}
    for i, layer in enumerate(net.layer):
        new = out.layer.add()
        new.CopyFrom(layer)
        out_lines.append(lines[i])
        for j, b in enumerate(layer.bottom):
            idx = source.get((i, j))
            if idx is not None and count[idx] > 1:
                k = next_split.get(idx, 0)
                next_split[idx] = k + 1
                new.bottom[j] = split_blob_name(net.layer[idx[0]].name, b, idx[1], k)
        for j, t in enumerate(layer.top):
            n = count.get((i, j), 0)
            if n <= 1:
                continue
            split = out.layer.add()
            split.name = f"{t}_{layer.name}_{j}_split"
            split.type = "Split"
            split.bottom.append(t)
            w = loss_w.get((i, j), 0.0)
            for k in range(n):
                split.top.append(split_blob_name(layer.name, t, j, k))
                if w:
                    split.loss_weight.append(w if k == 0 else 0.0)
            if w:
                new.ClearField("loss_weight")
                next_split[(i, j)] = next_split.get((i, j), 0) + 1
            out_lines.append(lines[i])
    return out, out_lines


def _missing_bottom(net, lines, filename, idx, blob, current) -> GraphcError:
    """The error for a bottom no earlier layer produces: a typo, a layer out of order, or
    a cycle (Caffe runs layers in file order, so a net's blobs must flow forward)."""
    later = [j for j in range(idx + 1, len(net.layer)) if blob in net.layer[j].top]
    if not later:
        return GraphcError(f"bottom '{blob}' is not produced by any layer",
                           hint=f"add a layer with top: \"{blob}\" before this one, or fix the "
                                f"name (blobs so far: {', '.join(current) or 'none'})")
    import networkx as nx
    dg = nx.DiGraph()
    producers: dict[str, list[int]] = {}
    for j, layer in enumerate(net.layer):
        for t in layer.top:
            producers.setdefault(t, []).append(j)
    for j, layer in enumerate(net.layer):
        for b in layer.bottom:
            for p in producers.get(b, []):
                if p != j:
                    dg.add_edge(p, j)
    j = later[0]
    at = f"{filename}:{lines[j]}" if lines[j] else filename
    try:
        cycle = nx.find_cycle(dg, idx)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        names = " -> ".join(net.layer[a].name for a, _ in cycle) + f" -> {net.layer[idx].name}"
        return GraphcError(f"bottom '{blob}' comes from layer '{net.layer[j].name}' ({at}), "
                           f"which depends on this layer: the layers form a cycle ({names})",
                           hint="a Caffe net must be acyclic; rename the blob that closes the loop")
    return GraphcError(f"bottom '{blob}' is produced only by a later layer "
                       f"'{net.layer[j].name}' ({at})",
                       hint=f"Caffe runs layers in file order: move layer '{net.layer[j].name}' "
                            f"before this one")


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
    # Python layers (search_dir) and data layers (source_dir) also look for files next to
    # the prototxt: an attr present with value None is set to the prototxt's directory
    for key in ("search_dir", "source_dir"):
        if key in attrs and attrs[key] is None:
            import os
            attrs[key] = os.path.dirname(os.path.abspath(where.rsplit(":", 1)[0]))
    bottoms, tops = list(layer.bottom), list(layer.top)
    if op.is_loss and not tops:   # Caffe's AutoTopBlobs: a loss layer always has a top
        tops = ["(automatic)"]
    op.check_arity(len(bottoms), len(tops))

    in_values = [current[b] for b in bottoms]
    in_types = [g.types[v] for v in in_values]

    # Input layers, and data layers whose every top the caller gives a shape for (the
    # caller then feeds those blobs), become graph inputs
    fed = not bottoms and tops and all(t in input_shapes for t in tops)
    if op.is_graph_input or fed:
        out_types = ([TensorType(tuple(input_shapes[t]), "f32") for t in tops] if fed
                     else op.infer(attrs, [], []))
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
    for key in op.init_attrs:
        attrs.pop(key, None)
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
