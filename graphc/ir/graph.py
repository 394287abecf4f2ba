"""Nodes, parameters and the graph.

SSA form: every value is defined once, by a graph input or by one node output.  A Caffe
in-place layer (``bottom == top``) defines a new version of the blob, named
``<blob>~<layer>``; ``Value.blob`` / ``Graph.blob_of`` keep the Caffe blob name so a user
can still ask for ``net.blobs["conv1"]`` (the last version, as in Caffe).
Learnable blobs are ``Param``s, referenced by nodes by name (``$name`` in the text form).

Training (the ``autodiff`` pass): ``losses`` lists the loss terms (value, loss weight) whose
weighted sum is the net's loss; ``param_grads`` / ``value_grads`` map a param / a value to
the value holding its gradient; ``force_backward`` is NetParameter.force_backward (the
graph inputs get gradients too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from .types import TensorType


@dataclass
class Node:
    op: str                      # op type (a Caffe layer type or an internal op)
    name: str                    # unique within the graph (the Caffe layer name)
    inputs: list[str]            # value names
    outputs: list[str]           # value names
    params: list[str] = field(default_factory=list)   # param names
    attrs: dict[str, Any] = field(default_factory=dict)
    loc: str | None = None       # "file:line" of the layer in the user's prototxt

    def copy(self) -> "Node":
        import copy
        return Node(self.op, self.name, list(self.inputs), list(self.outputs),
                    list(self.params), copy.deepcopy(self.attrs), self.loc)


@dataclass
class Param:
    name: str
    type: TensorType
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    data: np.ndarray | None = None    # the values, when known
    filler: dict | None = None        # how to initialize it (ops/fillers.py), when known

    def copy(self) -> "Param":
        return Param(self.name, self.type, self.lr_mult, self.decay_mult, self.data, self.filler)


class Graph:
    """An ordered (topologically sorted) list of nodes over typed values."""

    def __init__(self, name: str = "net"):
        self.name = name
        self.inputs: list[str] = []                 # graph inputs (fed by the user)
        self.outputs: list[str] = []                # graph outputs
        self.types: dict[str, TensorType] = {}      # value name -> type
        self.blob_of: dict[str, str] = {}           # value name -> Caffe blob name
        self.params: dict[str, Param] = {}          # param name -> Param
        self.nodes: list[Node] = []
        # training
        self.losses: list[tuple[str, float]] = []   # (value, loss weight)
        self.param_grads: dict[str, str] = {}       # param name -> its gradient value
        self.value_grads: dict[str, str] = {}       # value -> its gradient value
        self.force_backward: bool = False

    # ---- construction ---------------------------------------------------------
    def add_input(self, name: str, type: TensorType, blob: str | None = None) -> str:
        self.inputs.append(name)
        self.types[name] = type
        self.blob_of[name] = blob or name
        return name

    def add_param(self, param: Param) -> Param:
        self.params[param.name] = param
        return param

    def add_node(self, node: Node, out_types: list[TensorType],
                 blobs: list[str] | None = None) -> Node:
        for i, (o, t) in enumerate(zip(node.outputs, out_types)):
            self.types[o] = t
            self.blob_of[o] = blobs[i] if blobs else o
        self.nodes.append(node)
        return node

    # ---- queries ----------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        cons: dict[str, list[Node]] = {v: [] for v in self.types}
        for n in self.nodes:
            for i in n.inputs:
                cons.setdefault(i, []).append(n)
        return cons

    def values(self) -> Iterator[str]:
        return iter(self.types)

    def blob_versions(self) -> dict[str, str]:
        """Caffe blob name -> its last value (what Caffe holds after forward), in the
        order blobs were first created (Caffe's ``net.blobs`` order)."""
        last: dict[str, str] = {}
        for v in [*self.inputs, *(o for n in self.nodes for o in n.outputs)]:
            last[self.blob_of.get(v, v)] = v
        return last

    def copy(self) -> "Graph":
        g = Graph(self.name)
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.types = dict(self.types)
        g.blob_of = dict(self.blob_of)
        g.params = {k: p.copy() for k, p in self.params.items()}
        g.nodes = [n.copy() for n in self.nodes]
        g.losses = list(self.losses)
        g.param_grads = dict(self.param_grads)
        g.value_grads = dict(self.value_grads)
        g.force_backward = self.force_backward
        return g

    def __str__(self) -> str:
        from .text import print_graph
        return print_graph(self)
