"""Reading training data the way Caffe's data layers do.

* ``sources``: readers for HDF5 lists, LMDB Datum sets and image lists (Caffe's order)
* ``transform``: Caffe's DataTransformer (crop, mirror, mean, scale)
* ``images``: decoding/resizing with OpenCV's conventions (BGR, CHW)
* ``prefetch``: the background thread that reads batches ahead of the compute
* ``convert``: ``graphc convert-data`` (image lists, MNIST idx files, scikit-learn digits)

The layers themselves are ops in graphc/ops/data_layers.py.
"""
from __future__ import annotations

from ..errors import GraphcError


def set_input_arrays(net, data, labels, layer: str | None = None) -> None:
    """Give a MemoryData layer of ``net`` (a graphc.Net) its arrays, like pycaffe's
    ``net.set_input_arrays(data, labels)``: data is N x C x H x W, labels N values, N a
    multiple of the layer's batch_size.  ``layer`` names the layer when there are several
    (default: the first MemoryData layer)."""
    from ..ops.data_layers import set_memory_arrays
    nodes = [n for n in net.graph.nodes if n.op == "MemoryData"
             and (layer is None or n.name == layer)]
    if not nodes:
        which = f"named '{layer}'" if layer else "at all"
        raise GraphcError(f"the net has no MemoryData layer {which}",
                          hint="set_input_arrays feeds MemoryData layers only")
    node, ctx = nodes[0], net._ctx
    saved, ctx.node = ctx.node, node
    try:
        state = ctx.state
    finally:
        ctx.node = saved
    try:
        set_memory_arrays(state, node.attrs, data, labels)
    except GraphcError as e:
        raise e.located(where=node.loc, layer=node.name, layer_type=node.op)
