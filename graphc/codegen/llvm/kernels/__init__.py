"""Kernel generators, one module per op family, and the dispatch from IR nodes to them.

``lower_node(kctx, node)`` emits the node's step(s) into ``kctx.mod`` and schedules them.
A Fused node is lowered by the shape of its body:

* Convolution / InnerProduct + elementwise tail: one GEMM-based kernel whose epilogue
  computes the tail on each register tile; when the tail cannot run there (an operand
  broadcast along another axis), the anchor writes a temporary and a pointwise kernel
  computes the tail from it;
* LRN + Pooling: one kernel, each plane normalized into scratch and pooled from there;
* elementwise ops only: one pointwise kernel.
"""
from __future__ import annotations

import math

from ....ir.graph import Graph, Node
from ....passes.alias import VIEW_OPS
from . import conv, deconv, embed, linear, lrn, pointwise, pool, reduce, softmax, tensor
from .pointwise import NotPointwise

ANCHORS = {"Convolution": conv, "InnerProduct": linear}
SINGLE = {"Pooling": pool.lower_pool, "LRN": lrn.lower_lrn, "Softmax": softmax.lower_softmax,
          "Concat": tensor.lower_concat, "Slice": tensor.lower_slice,
          "Crop": tensor.lower_crop, "Tile": tensor.lower_tile,
          "Deconvolution": deconv.lower_deconv, "Embed": embed.lower_embed,
          "ArgMax": reduce.lower_argmax, "Reduction": reduce.lower_reduction,
          "MVN": reduce.lower_mvn}


class NotEpilogue(Exception):
    """The tail cannot be computed in the anchor's epilogue."""


def _node_body(n: Node) -> list[dict]:
    if n.op == "Fused":
        return n.attrs["body"]
    attrs = {k: v for k, v in n.attrs.items() if k not in ("inplace", "by_slices")}
    return [{"op": n.op, "attrs": attrs, "inputs": list(range(len(n.inputs))),
             "params": list(range(len(n.params))), "name": n.name}]


def supported(g: Graph, n: Node) -> tuple[str, str] | None:
    """None when the backend can compile node n, else (why, hint)."""
    body = _node_body(n)
    if n.op in VIEW_OPS:
        return None
    if n.op == "Python":
        return ("a Python layer runs Python code, which a compiled library cannot",
                "run this net with the reference executor (backend='reference'), or "
                "replace the layer by built-in layers")
    if not n.inputs:
        return (f"a {n.op} layer produces data by itself (reads a file or draws numbers), "
                f"which a compiled net cannot do",
                "feed the blob from outside: replace the layer by an Input layer, or give "
                "its tops with --input BLOB=D1,D2,...")
    if len(n.outputs) != 1 and not (n.op == "Slice" or
                                    (n.op == "Pooling" and n.attrs.get("top_mask"))):
        return (f"{n.op} with {len(n.outputs)} tops", "use one top")
    first = body[0]["op"]
    if n.op == "Fused":
        if first in ANCHORS or first == "LRN" and len(body) == 2 and body[1]["op"] == "Pooling":
            rest = body[1:] if first in ANCHORS else []
        else:
            rest = body
        for s in rest:
            if s["op"] not in pointwise.POINTWISE_OPS:
                return (f"a fused {s['op']} step after {first}", "run the pipeline without "
                        "the 'fuse' pass, or report the pattern")
        anchor = body[0] if first in ANCHORS else None
        if anchor is not None:
            why = ANCHORS[first].supported(g, n, anchor)
            if why:
                return why
        return None
    if first in ANCHORS:
        return ANCHORS[first].supported(g, n, body[0])
    if first in SINGLE:
        mod = {"Pooling": pool, "LRN": lrn, "Softmax": softmax, "Deconvolution": deconv,
               "Embed": embed, "ArgMax": reduce, "Reduction": reduce,
               "MVN": reduce}.get(first, tensor)
        return mod.supported(g, n)
    if first in pointwise.POINTWISE_OPS:
        if first == "Dropout" and n.attrs.get("train"):
            return ("Dropout in training mode", "compile the test phase")
        if first == "BatchNorm" and not n.attrs.get("use_global_stats", True):
            return ("BatchNorm with batch statistics (training)",
                    "compile the test phase, or set use_global_stats: true")
        return None
    return (f"there is no CPU kernel for {n.op} layers",
            "kernels exist for Convolution, Deconvolution, InnerProduct, Embed, Pooling, "
            "LRN, Softmax, ArgMax, Reduction, MVN, Concat, "
            "Slice, Crop, Tile, Eltwise, Scale, Bias, BatchNorm, ReLU, PReLU, ELU, Sigmoid, "
            "TanH, AbsVal, Power, Exp, Log, BNLL, Threshold, Dropout, Reshape, Flatten, Split; "
            "run this net with the reference executor (backend='reference')")


def lower_node(k, n: Node) -> None:
    body = _node_body(n)
    first = body[0]["op"]
    if n.op in VIEW_OPS:   # a view the planner did not alias: copy
        tensor.lower_copy(k, n)
    elif first in ANCHORS:
        lower_anchored(k, n, body)
    elif first == "LRN" and len(body) == 2:
        lrn.lower_lrn_pool(k, n, body)
    elif n.op != "Fused" and first in SINGLE:
        SINGLE[first](k, n)
    else:
        lower_pointwise(k, n, body)


def lower_pointwise(k, n: Node, body: list[dict]) -> None:
    out = n.outputs[0]
    shape = k.shape(out)
    node_ins, tensors = pointwise.site_inputs(k, n, shape, body)
    steps = pointwise.build_steps(k, body, node_ins, n.params, shape)
    pointwise.emit_pointwise_kernel(k, k.step_name(n.name), steps, k.loc(out), tensors, shape)


def lower_anchored(k, n: Node, body: list[dict]) -> None:
    """Convolution / InnerProduct (body[0]) followed by elementwise steps."""
    family = ANCHORS[body[0]["op"]]
    anchor, tail = body[0], body[1:]
    out = n.outputs[0]
    shape = k.shape(out)
    node_ins, tensors = pointwise.site_inputs(k, n, shape, tail)
    steps = pointwise.build_steps(k, tail, node_ins, n.params, shape) if tail else []
    try:
        family.lower(k, n, anchor, steps, tensors, k.loc(out))
        return
    except (NotEpilogue, NotPointwise):
        pass
    # the anchor into a temporary, then the tail as a pointwise kernel reading it
    anchor_shape = family.out_shape(k, n, anchor)
    nbytes = 4 * math.prod(anchor_shape)
    tmp = k.temp(nbytes, "anchor")
    family.lower(k, n, anchor, [], [], tmp)
    pointwise.emit_pointwise_kernel(k, k.step_name(n.name + "_tail"), steps, k.loc(out),
                                    tensors + [tmp], shape, prev_tensor=len(tensors))
