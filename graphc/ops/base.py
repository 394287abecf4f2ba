"""The op registry: one ``Op`` subclass per Caffe layer type (and per internal op).

Everything about one op lives on its class, side by side:

* ``from_caffe(layer, phase)``  LayerParameter (protobuf) -> plain attribute dict
* ``param_specs(attrs, in_types)``  the learnable blobs it owns (shape, filler), Caffe order
* ``infer(attrs, in_types, param_types)``  output tensor types (shape inference + checks)
* ``forward(attrs, inputs, params, ctx)``  reference semantics in numpy, exactly Caffe's
* ``cost(attrs, in_types, param_types, out_types)``  flops and bytes
* ``backward(...)``  the gradient rule (Caffe's Backward_cpu), numpy, beside ``forward``

Attributes are plain data (int, float, bool, str, lists of those, dicts of those), so the
IR text printer/parser can round-trip them.  Ops raise ``OpError(message, hint=...)``; the
caller adds file, line and layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..errors import OpError
from ..ir.types import TensorType

_REGISTRY: dict[str, "Op"] = {}


def register(cls):
    """Class decorator: instantiate and register an Op subclass under ``cls.type``."""
    inst = cls()
    if not inst.type:
        raise TypeError(f"{cls.__name__} has no type")
    if inst.type in _REGISTRY:
        raise TypeError(f"op {inst.type!r} registered twice")
    _REGISTRY[inst.type] = inst
    return cls


def get_op(type_name: str) -> "Op":
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise OpError(f"unknown layer type '{type_name}'",
                      hint=f"known types: {', '.join(sorted(_REGISTRY))}") from None


def has_op(type_name: str) -> bool:
    return type_name in _REGISTRY


def all_ops() -> dict[str, "Op"]:
    return dict(_REGISTRY)


@dataclass(frozen=True)
class ParamSpec:
    """A learnable blob an op owns: its shape and its filler (a dict like
    ``{"type": "xavier", "variance_norm": "FAN_IN"}``; see ops/fillers.py)."""
    shape: tuple[int, ...]
    filler: dict = field(default_factory=lambda: {"type": "constant", "value": 0.0})


@dataclass
class Cost:
    flops: int = 0
    bytes: int = 0


class Context:
    """What a forward call may need beyond its inputs: the phase, a random generator
    (Dropout, DummyData), and a per-node persistent state dict (Python layers)."""

    def __init__(self, phase: str = "test", rng: np.random.Generator | None = None):
        self.phase = phase
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._state: dict[str, dict] = {}
        self.node = None  # the Node being executed, set by the executor

    @property
    def state(self) -> dict:
        key = self.node.name if self.node is not None else ""
        return self._state.setdefault(key, {})


class Op:
    type: ClassVar[str] = ""
    #: LayerParameter field holding this op's parameters, e.g. "convolution_param"
    caffe_param: ClassVar[str | None] = None
    #: number of data inputs (bottoms): exact int, or (min, max) with max None = unbounded
    num_inputs: ClassVar[int | tuple[int, int | None]] = 1
    #: number of outputs (tops): exact int, or (min, max)
    num_outputs: ClassVar[int | tuple[int, int | None]] = 1
    #: a loss layer: its first top gets loss_weight 1 by default (Caffe's rule)
    is_loss: ClassVar[bool] = False
    #: forward updates its params in place (BatchNorm moving averages in training)
    updates_params: ClassVar[bool] = False
    #: elementwise op that may legally run in place (output may alias input 0)
    inplace_ok: ClassVar[bool] = False
    #: attributes needed only to initialize params (fillers): the lowering moves them onto
    #: the Params and drops them from the node
    init_attrs: ClassVar[tuple[str, ...]] = ()
    #: Caffe fixes the learning rate of all this op's blobs (BatchNorm: 0)
    fixed_lr_mult: ClassVar[float | None] = None
    #: data-producing layer with no bottoms whose outputs are fed from outside the graph
    #: (Input): lowered to graph inputs, not to a node
    is_graph_input: ClassVar[bool] = False
    #: gradients flow through this op; False (Accuracy, ArgMax, data layers, Threshold)
    #: stops them, as a layer Caffe never runs backward for
    differentiable: ClassVar[bool] = True

    # ---- Caffe -> attributes -------------------------------------------------
    def from_caffe(self, layer, phase: str) -> dict:
        """Read this op's attributes from a LayerParameter. ``phase`` is "train"/"test"."""
        return {}

    # ---- parameters ---------------------------------------------------------
    def param_specs(self, attrs: dict, in_types: list[TensorType]) -> list[ParamSpec]:
        return []

    # ---- shapes -------------------------------------------------------------
    def infer(self, attrs: dict, in_types: list[TensorType],
              param_types: list[TensorType]) -> list[TensorType]:
        raise NotImplementedError(f"{self.type}.infer")

    # ---- reference semantics ------------------------------------------------
    def forward(self, attrs: dict, inputs: list[np.ndarray], params: list[np.ndarray],
                ctx: Context) -> list[np.ndarray]:
        raise NotImplementedError(f"{self.type}.forward")

    # ---- gradient -----------------------------------------------------------
    def grad_inputs(self, attrs: dict, n_inputs: int) -> list[bool]:
        """Which bottoms can receive a gradient at all.  Default: every bottom of a
        differentiable op.  Labels of losses, Embed's indices and Crop's reference bottom
        cannot (Caffe refuses or ignores ``propagate_down`` for them)."""
        return [self.differentiable] * n_inputs

    def backward_uses_outputs(self, attrs: dict) -> bool:
        """True when ``backward`` reads the forward outputs (as Caffe's reads top data:
        Sigmoid, TanH, Softmax, ...); the Grad node then takes them as inputs."""
        return False

    def backward_reads(self, attrs: dict, need_inputs: list[bool], need_params: list[bool],
                       n_outputs: int) -> tuple[list[bool], list[bool]]:
        """Which forward inputs and which forward outputs ``backward`` reads the values of
        when it computes the gradients in ``need_inputs`` / ``need_params``.  The autodiff
        pass gives the Grad node only these, so a value no backward reads dies after the
        forward pass (the memory planner counts on it); the others reach ``backward`` as
        read-only placeholders of the right shape and dtype whose values must not matter
        (``outputs`` entries: None).  Default: every input, and every output when
        ``backward_uses_outputs``."""
        return [True] * len(need_inputs), [self.backward_uses_outputs(attrs)] * n_outputs

    def backward_inplace_ok(self, attrs: dict) -> bool:
        """The backward is elementwise (after any per-channel reductions): the gradient of
        the first input may be written over a value of the same size the Grad node reads
        (the top's gradient, a forward input or output).  Default: ``inplace_ok``."""
        return self.inplace_ok

    def backward_state_bytes(self, attrs: dict, in_types: list[TensorType],
                             out_types: list[TensorType]) -> int:
        """Bytes ``forward`` keeps in ``ctx.state`` for ``backward`` (Dropout's mask,
        BatchNorm's batch variance): memory held from the forward to the backward of this
        node, besides the values it reads."""
        return 0

    def backward(self, attrs: dict, inputs: list[np.ndarray], params: list[np.ndarray],
                 outputs: list[np.ndarray | None], grad_outputs: list[np.ndarray | None],
                 need_inputs: list[bool], need_params: list[bool],
                 ctx: Context) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
        """The gradient rule: ``grad_outputs[k]`` is dLoss/d(output k) (None: no gradient
        reaches that output; treat as zero); ``outputs`` holds the forward outputs when
        ``backward_uses_outputs`` (else None entries).  Returns (gradient per input, gradient
        per param), None where ``need_inputs`` / ``need_params`` is false.  ``ctx.state``
        is the forward node's state (e.g. Dropout's mask)."""
        raise OpError(f"{self.type} has no gradient rule",
                      hint="set propagate_down: false on the bottoms that feed it, or lr_mult: "
                           "0 on the layers before it, so no gradient has to pass through")

    def grad_cost(self, attrs: dict, in_types: list[TensorType], param_types: list[TensorType],
                  out_types: list[TensorType], need_inputs: list[bool],
                  need_params: list[bool]) -> int:
        """Flops of the backward: by default the forward's flops once for the input
        gradients and once more for the param gradients (a matmul's backward is two
        matmuls of the forward's size)."""
        f = self.cost(attrs, in_types, param_types, out_types).flops
        return f * max(1, int(any(need_inputs)) + int(any(need_params)))

    # ---- cost ---------------------------------------------------------------
    def cost(self, attrs: dict, in_types: list[TensorType], param_types: list[TensorType],
             out_types: list[TensorType]) -> Cost:
        """Default: one flop per output element; bytes = everything read + written."""
        return Cost(flops=sum(t.numel for t in out_types),
                    bytes=sum(t.nbytes for t in (*in_types, *param_types, *out_types)))

    # ---- helpers ------------------------------------------------------------
    def check_arity(self, n_in: int, n_out: int) -> None:
        for what, n, want in (("bottom", n_in, self.num_inputs), ("top", n_out, self.num_outputs)):
            lo, hi = (want, want) if isinstance(want, int) else want
            if n < lo or (hi is not None and n > hi):
                exp = str(lo) if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                raise OpError(f"{self.type} takes {exp} {what}(s), got {n}",
                              hint=f"give the layer {exp} '{what}' field(s)")


def filler_to_dict(msg) -> dict:
    """FillerParameter message -> attribute dict (only what a filler needs)."""
    d = {"type": msg.type}
    for name in ("value", "min", "max", "mean", "std", "sparse"):
        d[name] = getattr(msg, name)
    # enum VarianceNorm: FAN_IN=0, FAN_OUT=1, AVERAGE=2
    d["variance_norm"] = ("FAN_IN", "FAN_OUT", "AVERAGE")[msg.variance_norm]
    return d


def expect_same_shape(types: list[TensorType], what: str, hint: str | None = None) -> None:
    first = types[0].shape
    for i, t in enumerate(types[1:], 1):
        if t.shape != first:
            raise OpError(f"{what}: bottom 0 has shape {list(first)} but bottom {i} has "
                          f"shape {list(t.shape)}", hint=hint)


def check_param_shapes(layer_type: str, param_types: list[TensorType],
                       want: list[tuple[int, ...]], hint: str) -> None:
    """Weight (and bias) blobs must have exactly the shapes the layer needs."""
    if len(param_types) != len(want):
        raise OpError(f"{layer_type} needs {len(want)} param blob(s), got {len(param_types)}",
                      hint="check bias_term and the weights file")
    for i, (t, w) in enumerate(zip(param_types, want)):
        if tuple(t.shape) != tuple(w):
            what = "weight" if i == 0 else "bias"
            raise OpError(f"the {what} blob has shape {list(t.shape)} but this layer needs "
                          f"{list(w)}", hint=hint)


def canonical_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < rank:
        raise OpError(f"{what} {axis} is out of range for a {rank}-D blob",
                      hint=f"use an {what} in [{-rank}, {rank - 1}]")
    return axis + rank if axis < 0 else axis
