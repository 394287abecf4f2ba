"""Copying trained weights into a graph's params, as Caffe's CopyTrainedLayersFrom does:
layers are matched by name, layers of the file that the net lacks are ignored, and a blob
count or shape mismatch is an error naming the layer and both shapes."""
from __future__ import annotations

import numpy as np

from ..errors import GraphcError
from ..ir.graph import Graph
from .caffemodel import WeightsFile, read_caffemodel


def load_weights_into(g: Graph, weights) -> list[str]:
    """Copy ``weights`` (a path or a WeightsFile) into ``g``'s params, in place where the
    params already hold arrays. Returns the names of the layers that were copied."""
    wf = weights if isinstance(weights, WeightsFile) else read_caffemodel(weights)
    copied = []
    for node in g.nodes:
        if not node.params or node.name not in wf:
            continue
        stored = wf[node.name]
        if len(stored.blobs) != len(node.params):
            raise GraphcError(f"the weights file has {len(stored.blobs)} blob(s) for this layer "
                              f"but the net's layer has {len(node.params)}",
                              where=wf.path, layer=node.name, layer_type=node.op,
                              hint="the weights were made for a different definition of this "
                                   "layer (e.g. bias_term); fix the layer or rename it so its "
                                   "weights are not copied")
        for i, pname in enumerate(node.params):
            param = g.params[pname]
            blob = wf.blob_for(node.name, i, param.type.shape, node.op)
            if param.data is None:
                param.data = np.array(blob, dtype=np.float32)
            else:
                param.data[...] = blob
        copied.append(node.name)
    return copied
