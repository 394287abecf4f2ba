"""Layers without bottoms: Input (``input_param``) and DummyData (``dummy_data_param``).

Input declares the net's fed blobs: ``shape`` is given once (shared by every top) or once
per top.  Input layers become graph inputs; they are never executed.

DummyData makes its tops from fillers: ``shape`` (once or once per top), or the legacy
``num``/``channels``/``height``/``width`` (each once or once per top); ``data_filler`` is
absent (constant 0), given once (used for every top) or once per top.  Every forward draws
fresh values (Caffe refills all non-constant tops on each forward).
"""
from __future__ import annotations

from ..errors import OpError
from ..ir.types import TensorType
from .base import Cost, Op, filler_to_dict, register
from .fillers import FILLERS, compact, fill


def _per_top(values: list, n_top: int, what: str, allow_none: bool = False) -> list:
    if len(values) == n_top:
        return list(values)
    if len(values) == 1:
        return [values[0]] * n_top
    once = "once" if not allow_none else "not at all, once"
    raise OpError(f"{what} is given {len(values)} times for {n_top} top(s)",
                  hint=f"give {what} {once}, or once per top")


def _shape_of(blob_shape, what: str) -> list[int]:
    dims = [int(d) for d in blob_shape.dim]
    if any(d < 0 for d in dims):
        raise OpError(f"{what} has a negative dimension: {dims}",
                      hint="every dimension must be >= 0")
    return dims


def _types(attrs) -> list[TensorType]:
    return [TensorType(tuple(s), "f32") for s in attrs["shapes"]]


@register
class Input(Op):
    type = "Input"
    differentiable = False
    caffe_param = "input_param"
    num_inputs = 0
    num_outputs = (1, None)
    is_graph_input = True

    def from_caffe(self, layer, phase: str) -> dict:
        shapes = [_shape_of(s, "input_param shape") for s in layer.input_param.shape]
        if not shapes:
            raise OpError("the Input layer has no shape",
                          hint="add input_param { shape { dim: N dim: C dim: H dim: W } }")
        return {"shapes": _per_top(shapes, len(layer.top), "input_param shape")}

    def infer(self, attrs, in_types, param_types):
        return _types(attrs)

    def forward(self, attrs, inputs, params, ctx):
        raise OpError("an Input layer is fed by the caller, not computed",
                      hint="pass the input arrays to the executor")

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(0, 0)


@register
class DummyData(Op):
    type = "DummyData"
    differentiable = False
    caffe_param = "dummy_data_param"
    num_inputs = 0
    num_outputs = (1, None)

    def from_caffe(self, layer, phase: str) -> dict:
        p = layer.dummy_data_param
        n_top = len(layer.top)
        legacy = {name: [int(v) for v in getattr(p, name)]
                  for name in ("num", "channels", "height", "width")}
        if any(legacy.values()):
            if len(p.shape):
                raise OpError("both shape and the legacy num/channels/height/width are given",
                              hint="give only shape")
            cols = [_per_top(legacy[name], n_top, name) for name in legacy]
            shapes = [list(dims) for dims in zip(*cols)]
        else:
            given = [_shape_of(s, "dummy_data_param shape") for s in p.shape]
            if not given:
                raise OpError("the DummyData layer has no shape",
                              hint="add dummy_data_param { shape { dim: ... } }")
            shapes = _per_top(given, n_top, "shape")
        fillers = [compact(filler_to_dict(f)) for f in p.data_filler]
        if not fillers:
            fillers = [{"type": "constant", "value": 0.0}]
        fillers = _per_top(fillers, n_top, "data_filler", allow_none=True)
        attrs = {"shapes": shapes, "fillers": fillers}
        self._check(attrs)
        return attrs

    @staticmethod
    def _check(attrs) -> None:
        if len(attrs["shapes"]) != len(attrs["fillers"]):
            raise OpError(f"{len(attrs['shapes'])} shapes but {len(attrs['fillers'])} fillers",
                          hint="give one filler per top")
        for f in attrs["fillers"]:
            if f.get("type", "constant") not in FILLERS:
                raise OpError(f"unknown filler type {f.get('type')!r}",
                              hint=f"use one of {', '.join(sorted(FILLERS))}")

    def infer(self, attrs, in_types, param_types):
        self._check(attrs)
        return _types(attrs)

    def forward(self, attrs, inputs, params, ctx):
        return [fill(f, s, ctx.rng) for f, s in zip(attrs["fillers"], attrs["shapes"])]

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=0, bytes=sum(t.nbytes for t in out_types))
