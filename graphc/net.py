"""``graphc.Net``: pycaffe habits on top of the IR and the reference executor.

    net = graphc.Net("net.prototxt", weights="net.caffemodel", phase="test")
    out = net.forward(data=x)          # dict: output blob name -> ndarray
    net.blobs["conv1"]                 # ndarray after forward (the last in-place version)
    net.params["conv1"][0][...] = w    # writable parameters
    net.save("out.caffemodel")
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import GraphcError
from .frontend.lower import load_net_source, lower
from .frontend.prototxt import NetSource
from .ir.graph import Graph
from .ops.base import Context
from .reference import ReferenceExecutor


class Net:
    def __init__(self, model, weights=None, phase: str = "test", *, level: int | None = None,
                 stages=(), batch: int | None = None, seed: int | None = None,
                 backend: str = "reference"):
        if backend != "reference":
            raise GraphcError(f"backend '{backend}' is not available in this build",
                              hint="use backend='reference'")
        self.source: NetSource = load_net_source(model)
        self.phase = phase
        self._lower_args = dict(phase=phase, level=level, stages=tuple(stages))
        self.graph: Graph = lower(self.source, batch=batch, **self._lower_args)
        self._ctx = Context(phase=phase, rng=np.random.default_rng(seed))
        self._fill_params(np.random.default_rng(seed))
        self._reset_blobs()
        if weights is not None:
            self.copy_from(weights)

    # ---- structure ------------------------------------------------------------------
    @property
    def inputs(self) -> list[str]:
        return [self.graph.blob_of[v] for v in self.graph.inputs]

    @property
    def outputs(self) -> list[str]:
        return [self.graph.blob_of[v] for v in self.graph.outputs]

    @property
    def layers(self) -> list[str]:
        return [n.name for n in self.graph.nodes]

    @property
    def params(self) -> "OrderedDict[str, list[np.ndarray]]":
        """layer name -> its learnable blobs (writable arrays; shared params are the same
        array in every layer that shares them)."""
        return OrderedDict((n.name, [self.graph.params[p].data for p in n.params])
                           for n in self.graph.nodes if n.params)

    def _fill_params(self, rng: np.random.Generator) -> None:
        from .ops.fillers import fill
        for p in self.graph.params.values():
            if p.data is None:
                p.data = fill(p.filler or {"type": "constant", "value": 0.0}, p.type.shape, rng)

    def _reset_blobs(self) -> None:
        self.blobs: OrderedDict[str, np.ndarray] = OrderedDict(
            (blob, np.zeros(self.graph.types[v].shape, self.graph.types[v].np_dtype))
            for blob, v in self.graph.blob_versions().items())

    def reshape(self, **shapes) -> None:
        """Change input shapes (like pycaffe's blob.reshape + net.reshape); params are kept."""
        old = self.graph
        new = lower(self.source, input_shapes={k: tuple(v) for k, v in shapes.items()},
                    **self._lower_args)
        for name, p in new.params.items():
            if p.type != old.params[name].type:
                raise GraphcError(f"reshaping changes the shape of param ${name} from "
                                  f"{old.params[name].type} to {p.type}",
                                  hint="only shapes that keep every weight's shape can change")
            p.data = old.params[name].data
        self.graph = new
        self._reset_blobs()

    # ---- running --------------------------------------------------------------------
    def forward(self, **inputs) -> dict[str, np.ndarray]:
        """Run forward; inputs by blob name (others are taken from ``self.blobs``).
        Returns {output blob name: array}. An input of a new shape reshapes the net."""
        known = set(self.inputs)
        unknown = set(inputs) - known
        if unknown:
            raise GraphcError(f"no input blob named {', '.join(sorted(unknown))}",
                              hint=f"the net's inputs are: {', '.join(self.inputs) or '(none)'}")
        new_shapes = {k: np.shape(v) for k, v in inputs.items()
                      if tuple(np.shape(v)) != tuple(self.blobs[k].shape)}
        if new_shapes:
            self.reshape(**new_shapes)
        g = self.graph
        for name, value in inputs.items():     # copied in, as pycaffe copies into blob.data
            self.blobs[name][...] = value
        feeds = {v: self.blobs[g.blob_of[v]] for v in g.inputs}
        versions = g.blob_versions()
        env = ReferenceExecutor(g, self._ctx).run(feeds, keep=set(versions.values()))
        for blob, v in versions.items():
            if v in env and v not in feeds:
                self.blobs[blob] = env[v]
        return {g.blob_of[v]: env[v] for v in g.outputs}

    # ---- weights --------------------------------------------------------------------
    def copy_from(self, path) -> None:
        """Load weights by layer name, as Caffe's CopyTrainedLayersFrom: layers absent from
        this net are ignored; a count or shape mismatch is an error naming the layer."""
        from .frontend.weights import load_weights_into
        load_weights_into(self.graph, path)

    def save(self, path) -> None:
        """Write the params as a V2 .caffemodel (atomically)."""
        from .frontend.caffemodel import write_caffemodel
        layers = [(n.name, n.op, [self.graph.params[p].data for p in n.params])
                  for n in self.graph.nodes if n.params]
        write_caffemodel(path, layers, name=self.graph.name)
