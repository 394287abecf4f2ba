"""Export an IR graph (test phase, with its weights) to an ONNX model, with Caffe's exact
semantics.

    from graphc.export.onnx import export_onnx
    model = export_onnx(net, "net.onnx")          # a graphc.Net or a Graph with param data

    graphc export NET.prototxt [--weights W] [--batch N] -o net.onnx

Shapes are static (the graph's); opset 17.  Where ONNX and Caffe disagree the exporter
spells Caffe's rule out:

* Pooling: Caffe rounds the output size up and drops a last window starting in the end
  padding, and AVE divides by the window clipped to the padded extent.  The export gives
  explicit asymmetric pads (``ceil_mode=0``) so the last window ends exactly at the padded
  edge (see ``graphc.export.pooling``), uses ``count_include_pad=1`` (every window then
  holds kh*kw elements) and multiplies by kh*kw / Caffe's divisor where they differ.
* LRN: ONNX's ``alpha / size * sum`` is Caffe's ACROSS_CHANNELS (same bias ``k``);
  WITHIN_CHANNEL is spelled out as AVE pooling of x^2 (padding counted) and a power.
* BatchNorm: the third blob is a scale factor: mean and variance are divided by it
  (0 when it is 0) before they become ONNX BatchNormalization's inputs.
* InnerProduct flattens from ``axis`` (Flatten, Gemm, then Reshape when axis > 1);
  Deconvolution weights (in, out/group, kh, kw) are ConvTranspose's layout already.
* Scale/Bias broadcast along ``axis .. axis + rank(factor)``: the factor is reshaped with
  trailing 1s so ONNX's right-aligned broadcasting means the same thing.

Graph outputs keep their Caffe blob names; ``outputs=`` can add any other blob (its last
in-place version, as ``net.blobs`` shows it).  Layers with no ONNX form here (losses, data
layers, ArgMax, STOCHASTIC pooling, ...) raise GraphcError naming the layer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GraphcError
from ..ir.graph import Graph, Node
from ..ir.types import TensorType
from ..ops.base import canonical_axis, get_op
from .pooling import FLT_MAX, pool_plan

OPSET = 17
IR_VERSION = 8          # the ONNX IR version of opset 17, read by every current runtime

INSTALL_HINT = "install the optional dependency: pip install 'graphc[onnx]' (or pip install onnx)"


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise GraphcError("exporting to ONNX needs the 'onnx' package, which is not installed",
                          hint=INSTALL_HINT) from None
    return onnx, helper, numpy_helper


class _Step:
    """One op to export: a graph node, or one step of a Fused node."""

    def __init__(self, op: str, name: str, attrs: dict, inputs: list[str],
                 in_types: list[TensorType], out_types: list[TensorType],
                 params: list[np.ndarray], param_names: list[str], loc: str | None):
        self.op, self.name, self.attrs, self.loc = op, name, attrs, loc
        self.inputs, self.in_types, self.out_types = inputs, in_types, out_types
        self.params, self.param_names = params, param_names

    def error(self, message: str, hint: str | None = None) -> GraphcError:
        return GraphcError(message, where=self.loc, layer=self.name, layer_type=self.op,
                           hint=hint)


class _Builder:
    """Collects ONNX nodes and initializers with unique names."""

    def __init__(self, reserved: set[str]):
        _, self.helper, self.numpy_helper = _onnx()
        self.nodes: list = []
        self.inits: dict[str, object] = {}
        self.param_names: dict[str, str] = {}    # IR param -> initializer name
        self.taken: set[str] = set(reserved)     # value and initializer names
        self.node_names: set[str] = set()

    def fresh(self, base: str, taken: set[str] | None = None) -> str:
        taken = self.taken if taken is None else taken
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def const(self, base: str, array, dtype=np.float32) -> str:
        name = self.fresh(base)
        self.inits[name] = self.numpy_helper.from_array(np.asarray(array, dtype=dtype), name)
        return name

    def shape(self, base: str, dims) -> str:
        return self.const(base, np.asarray(list(dims), dtype=np.int64), np.int64)

    def param(self, name: str, data: np.ndarray) -> str:
        """A learned blob as an initializer under its param name (once, even if shared)."""
        if name not in self.param_names:
            init = self.fresh(name)
            self.param_names[name] = init
            self.inits[init] = self.numpy_helper.from_array(
                np.ascontiguousarray(data, dtype=np.float32), init)
        return self.param_names[name]

    def add(self, op: str, inputs: list[str], out: str | None, name: str, **attrs) -> str:
        """Add a node; ``out`` is its output name (None: a fresh one from ``name``)."""
        out = out or self.fresh(name)
        self.taken.add(out)
        self.nodes.append(self.helper.make_node(
            op, inputs, [out], name=self.fresh(name, self.node_names), **attrs))
        return out


Exporter = Callable[[_Builder, _Step, list[str]], list[str]]
_EXPORTERS: dict[str, Exporter] = {}


def _exports(*types: str):
    def deco(fn):
        for t in types:
            _EXPORTERS[t] = fn
        return fn
    return deco


def supported_ops() -> list[str]:
    return sorted(_EXPORTERS)


# ---- convolution ------------------------------------------------------------------------
@_exports("Convolution", "Deconvolution")
def _conv(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    from ..ops.conv import Geometry
    geo = Geometry(s.attrs, s.in_types[0].shape, s.op == "Deconvolution")
    ins = [b.param(s.param_names[0], s.params[0])]
    if s.attrs.get("bias_term", True):
        ins.append(b.param(s.param_names[1], s.params[1]))
    kw = dict(kernel_shape=list(geo.kernel), strides=list(geo.stride),
              pads=list(geo.pad) * 2, dilations=list(geo.dilation), group=geo.group)
    onnx_op = "ConvTranspose" if s.op == "Deconvolution" else "Conv"
    plain = geo.axis == 1 and len(geo.lead) == 1
    outs = []
    for x, out in zip(s.inputs, want):
        if plain:
            outs.append(b.add(onnx_op, [x, *ins], out, s.name, **kw))
            continue
        # axes before ``axis`` are one batch axis for Caffe: fold them, convolve, unfold
        x3 = b.add("Reshape", [x, b.shape(f"{s.name}/in_shape",
                                          (geo.num, geo.channels, *geo.spatial))],
                   None, f"{s.name}/fold")
        y3 = b.add(onnx_op, [x3, *ins], None, s.name, **kw)
        outs.append(b.add("Reshape", [y3, b.shape(f"{s.name}/out_shape", geo.out_shape())],
                          out, f"{s.name}/unfold"))
    return outs


# ---- pooling -------------------------------------------------------------------------------
@_exports("Pooling")
def _pool(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    a = s.attrs
    if a["pool"] == "STOCHASTIC":
        raise s.error("STOCHASTIC pooling has no ONNX form",
                      hint="use MAX or AVE pooling to export this net")
    if a.get("top_mask"):
        raise s.error("the argmax (mask) top of MAX pooling has no ONNX form here",
                      hint="remove the second top to export this net")
    x, out = s.inputs[0], want[0]
    plan = pool_plan(a, s.in_types[0].shape)
    if plan.global_pooling:
        op = "GlobalMaxPool" if plan.method == "MAX" else "GlobalAveragePool"
        return [b.add(op, [x], out, s.name)]
    h, w = s.in_types[0].shape[2:]
    if any(plan.crop_end):
        x = b.add("Slice", [x, b.shape(f"{s.name}/starts", [0, 0]),
                            b.shape(f"{s.name}/ends", [h - plan.crop_end[0],
                                                       w - plan.crop_end[1]]),
                            b.shape(f"{s.name}/axes", [2, 3])], None, f"{s.name}/crop")
    pads = plan.pad_begin + plan.pad_end
    n, c = s.in_types[0].shape[:2]
    size = [h - plan.crop_end[0], w - plan.crop_end[1]]
    for ax in (0, 1):
        if plan.pad_end[ax] >= plan.kernel[ax]:
            # runtimes refuse pool pads >= the kernel: append the padding as a constant
            # block (a Pad op would be fused back into the pool by onnxruntime)
            shape = [n, c, *size]
            shape[2 + ax] = plan.pad_end[ax]
            fill = np.full(shape, 0.0 if plan.method == "AVE" else -np.inf, np.float32)
            x = b.add("Concat", [x, b.const(f"{s.name}/pad{ax}", fill)], None,
                      f"{s.name}/pad", axis=2 + ax)
            size[ax] += plan.pad_end[ax]
            pads[2 + ax] = 0
    last = plan.method == "MAX" and not plan.empty or plan.method == "AVE" and \
        plan.ave_ratio is None
    kw = dict(kernel_shape=plan.kernel, strides=plan.stride, pads=pads, ceil_mode=0)
    if plan.method == "MAX":
        y = b.add("MaxPool", [x], out if last else None, s.name, **kw)
        if plan.empty:   # windows with no image pixel: Caffe's -FLT_MAX, not -inf
            y = b.add("Max", [y, b.const(f"{s.name}/lowest", -FLT_MAX)], out,
                      f"{s.name}/empty")
        return [y]
    y = b.add("AveragePool", [x], out if last else None, s.name, count_include_pad=1, **kw)
    if plan.ave_ratio is not None:   # sum/(kh*kw) -> sum / Caffe's divisor
        y = b.add("Mul", [y, b.const(f"{s.name}/divisor_fix", plan.ave_ratio[None, None])],
                  out, f"{s.name}/divisor")
    return [y]


# ---- linear, normalization ------------------------------------------------------------
@_exports("InnerProduct")
def _inner_product(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    shape = s.in_types[0].shape
    axis = canonical_axis(int(s.attrs.get("axis", 1)), len(shape))
    x = s.inputs[0]
    out_shape = s.out_types[0].shape
    two_d = axis == 1 and len(shape) == 2
    if not two_d:
        x = b.add("Flatten", [x], None, f"{s.name}/flatten", axis=axis)
    ins = [x, b.param(s.param_names[0], s.params[0])]
    if s.attrs.get("bias_term", True):
        ins.append(b.param(s.param_names[1], s.params[1]))
    direct = axis == 1
    y = b.add("Gemm", ins, want[0] if direct else None, s.name,
              transB=0 if s.attrs.get("transpose") else 1)
    if not direct:
        y = b.add("Reshape", [y, b.shape(f"{s.name}/shape", out_shape)], want[0],
                  f"{s.name}/unflatten")
    return [y]


@_exports("LRN")
def _lrn(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    a = s.attrs
    n, alpha, beta = int(a["local_size"]), float(a["alpha"]), float(a["beta"])
    x = s.inputs[0]
    if a.get("norm_region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS":
        return [b.add("LRN", [x], want[0], s.name, size=n, alpha=alpha, beta=beta,
                      bias=float(a["k"]))]
    # WITHIN_CHANNEL: x * (1 + alpha * avgpool(x^2, n, pad (n-1)/2, stride 1))^-beta, the
    # average always over n*n (every window lies inside the padded extent)
    pre = (n - 1) // 2
    sq = b.add("Mul", [x, x], None, f"{s.name}/square")
    avg = b.add("AveragePool", [sq], None, f"{s.name}/pool", kernel_shape=[n, n],
                strides=[1, 1], pads=[pre] * 4, count_include_pad=1)
    scale = b.add("Mul", [avg, b.const(f"{s.name}/alpha", alpha)], None, f"{s.name}/alpha")
    scale = b.add("Add", [scale, b.const(f"{s.name}/one", 1.0)], None, f"{s.name}/shift")
    scale = b.add("Pow", [scale, b.const(f"{s.name}/neg_beta", -beta)], None,
                  f"{s.name}/power")
    return [b.add("Mul", [x, scale], want[0], s.name)]


@_exports("BatchNorm")
def _batch_norm(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    if not s.attrs.get("use_global_stats", True):
        raise s.error("BatchNorm with batch statistics (use_global_stats: false) has no "
                      "inference form", hint="export the test phase with "
                                              "use_global_stats true (Caffe's TEST default)")
    if s.in_types[0].rank < 2:
        raise s.error(f"BatchNorm of a {s.in_types[0].rank}-D input has no ONNX form",
                      hint="give the input a channel axis (N, C, ...)")
    c = s.in_types[0].shape[1]
    sf = np.float32(np.asarray(s.params[2]).reshape(-1)[0])
    factor = np.float32(0.0) if sf == 0 else np.float32(1.0) / sf
    mean = factor * np.asarray(s.params[0], np.float32)
    var = factor * np.asarray(s.params[1], np.float32)
    ins = [s.inputs[0], b.const(f"{s.name}/gamma", np.ones(c)),
           b.const(f"{s.name}/beta", np.zeros(c)), b.const(f"{s.name}/mean", mean),
           b.const(f"{s.name}/var", var)]
    return [b.add("BatchNormalization", ins, want[0], s.name,
                  epsilon=float(s.attrs.get("eps", 1e-5)))]


def _factor_shape(s: _Step, factor_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The factor's shape padded with trailing 1s for right-aligned broadcasting."""
    rank = s.in_types[0].rank
    if not factor_shape:
        return ()
    axis = canonical_axis(int(s.attrs.get("axis", 1)), rank)
    return tuple(factor_shape) + (1,) * (rank - axis - len(factor_shape))


def _broadcast_factor(b: _Builder, s: _Step, what: str, value: str | None,
                      vtype: TensorType | None, data=None, pname: str | None = None) -> str:
    if value is None:   # a learned blob
        shape = _factor_shape(s, np.shape(data))
        return b.const(f"{pname}/{what}", np.asarray(data, np.float32).reshape(shape))
    shape = _factor_shape(s, vtype.shape)
    if shape == vtype.shape:
        return value
    return b.add("Reshape", [value, b.shape(f"{s.name}/{what}_shape", shape)], None,
                 f"{s.name}/{what}_broadcast")


@_exports("Scale")
def _scale(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    two = len(s.inputs) == 2
    if two:
        factor = _broadcast_factor(b, s, "scale", s.inputs[1], s.in_types[1])
        rest = list(zip(s.params, s.param_names))
    else:
        factor = _broadcast_factor(b, s, "scale", None, None, s.params[0], s.param_names[0])
        rest = list(zip(s.params[1:], s.param_names[1:]))
    bias = bool(s.attrs.get("bias_term"))
    y = b.add("Mul", [s.inputs[0], factor], None if bias else want[0], s.name)
    if bias:
        data, pname = rest[0]
        y = b.add("Add", [y, _broadcast_factor(b, s, "bias", None, None, data, pname)],
                  want[0], f"{s.name}/bias")
    return [y]


@_exports("Bias")
def _bias(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    if len(s.inputs) == 2:
        f = _broadcast_factor(b, s, "bias", s.inputs[1], s.in_types[1])
    else:
        f = _broadcast_factor(b, s, "bias", None, None, s.params[0], s.param_names[0])
    return [b.add("Add", [s.inputs[0], f], want[0], s.name)]


# ---- elementwise ----------------------------------------------------------------------------
@_exports("Eltwise")
def _eltwise(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    op = s.attrs["operation"]
    xs = list(s.inputs)
    if op == "SUM":
        coeff = s.attrs.get("coeff") or [1.0] * len(xs)
        xs = [x if c == 1 else b.add("Mul", [x, b.const(f"{s.name}/coeff{i}", c)], None,
                                     f"{s.name}/coeff{i}")
              for i, (x, c) in enumerate(zip(xs, coeff))]
    onnx_op = {"SUM": "Add", "PROD": "Mul", "MAX": "Max"}[op]
    y = xs[0]
    for i, x in enumerate(xs[1:], 1):   # in bottom order, as Caffe accumulates
        y = b.add(onnx_op, [y, x], want[0] if i == len(xs) - 1 else None, s.name)
    return [y]


def _unary(onnx_op: str, **fixed):
    def fn(b: _Builder, s: _Step, want: list[str]) -> list[str]:
        return [b.add(onnx_op, [s.inputs[0]], want[0], s.name, **fixed)]
    return fn


_exports("Sigmoid")(_unary("Sigmoid"))
_exports("TanH")(_unary("Tanh"))
_exports("AbsVal")(_unary("Abs"))
_exports("BNLL")(_unary("Softplus"))


@_exports("ReLU")
def _relu(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    slope = float(s.attrs.get("negative_slope", 0.0))
    if slope == 0:
        return [b.add("Relu", [s.inputs[0]], want[0], s.name)]
    return [b.add("LeakyRelu", [s.inputs[0]], want[0], s.name, alpha=slope)]


@_exports("ELU")
def _elu(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    return [b.add("Elu", [s.inputs[0]], want[0], s.name, alpha=float(s.attrs["alpha"]))]


@_exports("PReLU")
def _prelu(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    rank = s.in_types[0].rank
    slope = np.asarray(s.params[0], np.float32)
    shape = (1,) if s.attrs["channel_shared"] else (slope.size,) + (1,) * (rank - 2)
    f = b.const(f"{s.param_names[0]}/slope", slope.reshape(shape))
    return [b.add("PRelu", [s.inputs[0], f], want[0], s.name)]


def _chain(b: _Builder, s: _Step, steps: list[tuple[str, float | None]], want: str) -> str:
    """Apply ``steps`` (ONNX op, constant operand or None for a unary op) to the step's
    input in order; the last result is named ``want`` (an Identity if there is none)."""
    x = s.inputs[0]
    if not steps:
        return b.add("Identity", [x], want, s.name)
    for i, (op, c) in enumerate(steps):
        label = f"{s.name}/{op.lower()}"
        ins = [x] if c is None else [x, b.const(label, c)]
        x = b.add(op, ins, want if i == len(steps) - 1 else None, label)
    return x


def _when(cond, op: str, c) -> list[tuple[str, float]]:
    return [(op, float(c))] if cond else []


@_exports("Power")
def _power(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    """Caffe: (shift + scale * x) ^ power as separate float steps, each skipped when its
    constant is neutral; a constant output when power * scale == 0."""
    power, scale, shift = (np.float32(s.attrs[k]) for k in ("power", "scale", "shift"))
    if power * scale == 0:
        value = np.float32(1.0) if power == 0 else np.power(shift, power)
        _, _, numpy_helper = _onnx()
        tensor = numpy_helper.from_array(np.asarray([value], np.float32), f"{s.name}/value")
        return [b.add("ConstantOfShape", [b.shape(f"{s.name}/shape", s.in_types[0].shape)],
                      want[0], s.name, value=tensor)]
    steps = _when(scale != 1, "Mul", scale) + _when(shift != 0, "Add", shift) + \
        _when(power != 1, "Pow", power)
    return [_chain(b, s, steps, want[0])]


@_exports("Exp")
def _exp(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    """Caffe: outer * exp(inner * x), inner = log(base) * scale, outer = base ^ shift."""
    inner, outer = get_op("Exp")._scales(s.attrs, np.dtype(np.float32))
    steps = _when(inner != 1, "Mul", inner) + [("Exp", None)] + _when(outer != 1, "Mul", outer)
    return [_chain(b, s, steps, want[0])]


@_exports("Log")
def _log(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    """Caffe: log(x * scale + shift) * (1 / log(base))."""
    scale, shift = np.float32(s.attrs["scale"]), np.float32(s.attrs["shift"])
    base_scale = get_op("Log")._base_scale(s.attrs, np.dtype(np.float32))
    steps = _when(scale != 1, "Mul", scale) + _when(shift != 0, "Add", shift) + \
        [("Log", None)] + _when(base_scale != 1, "Mul", base_scale)
    return [_chain(b, s, steps, want[0])]


@_exports("Threshold")
def _threshold(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    gt = b.add("Greater", [s.inputs[0], b.const(f"{s.name}/threshold",
                                                s.attrs["threshold"])], None, s.name)
    return [b.add("Cast", [gt], want[0], f"{s.name}/cast", to=1)]   # 1: FLOAT


@_exports("Dropout")
def _dropout(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    if s.attrs.get("train"):
        raise s.error("a training-phase Dropout has no inference form",
                      hint="export the test phase (Dropout is the identity there)")
    return [s.inputs[0]]   # the identity: an alias, no node


@_exports("Split")
def _split(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    return [s.inputs[0]] * len(want)


# ---- tensor ops ----------------------------------------------------------------------------
@_exports("Softmax")
def _softmax(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    axis = canonical_axis(int(s.attrs.get("axis", 1)), s.in_types[0].rank, "softmax axis")
    return [b.add("Softmax", [s.inputs[0]], want[0], s.name, axis=axis)]


@_exports("Concat")
def _concat(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    if len(s.inputs) == 1:
        return [s.inputs[0]]
    axis = canonical_axis(int(s.attrs.get("axis", 1)), s.in_types[0].rank)
    return [b.add("Concat", list(s.inputs), want[0], s.name, axis=axis)]


@_exports("Flatten", "Reshape")
def _reshape(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    return [b.add("Reshape", [s.inputs[0], b.shape(f"{s.name}/shape", s.out_types[0].shape)],
                  want[0], s.name)]


@_exports("Crop")
def _crop(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    off, shape = get_op("Crop").plan(s.attrs, s.in_types[0].shape, s.in_types[1].shape)
    axes = [i for i, (o, n, m) in enumerate(zip(off, shape, s.in_types[0].shape))
            if o != 0 or n != m]
    if not axes:
        return [s.inputs[0]]
    return [b.add("Slice", [s.inputs[0],
                            b.shape(f"{s.name}/starts", [off[i] for i in axes]),
                            b.shape(f"{s.name}/ends", [off[i] + shape[i] for i in axes]),
                            b.shape(f"{s.name}/axes", axes)], want[0], s.name)]


@_exports("Slice")
def _slice(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    rank = s.in_types[0].rank
    axis = canonical_axis(int(s.attrs.get("axis", 1)), rank)
    outs, start = [], 0
    for t, out in zip(s.out_types, want):
        end = start + t.shape[axis]
        outs.append(b.add("Slice", [s.inputs[0], b.shape(f"{s.name}/starts", [start]),
                                    b.shape(f"{s.name}/ends", [end]),
                                    b.shape(f"{s.name}/axes", [axis])], out, s.name))
        start = end
    return outs


@_exports("Tile")
def _tile(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    rank = s.in_types[0].rank
    axis = canonical_axis(int(s.attrs.get("axis", 1)), rank)
    reps = [1] * rank
    reps[axis] = int(s.attrs["tiles"])
    return [b.add("Tile", [s.inputs[0], b.shape(f"{s.name}/repeats", reps)], want[0],
                  s.name)]


@_exports("Silence")
def _silence(b: _Builder, s: _Step, want: list[str]) -> list[str]:
    return []


# ---- the graph ------------------------------------------------------------------------------
def _node_params(g: Graph, n: Node) -> list[np.ndarray]:
    params = []
    for p in n.params:
        data = g.params[p].data
        if data is None:
            raise GraphcError(f"param ${p} has no values", where=n.loc, layer=n.name,
                              layer_type=n.op,
                              hint="load weights (--weights W.caffemodel) or fill the params "
                                   "(graphc.Net fills them from the layers' fillers)")
        params.append(data)
    return params


def _steps(g: Graph, n: Node, ins: list[str]) -> list[_Step]:
    """The ops of node ``n``: itself, or a Fused node's body steps in order.  A body
    step's ``"prev"`` input is left as None, for the caller to fill in."""
    params = _node_params(g, n)
    in_types = [g.types[v] for v in n.inputs]
    if n.op != "Fused":
        return [_Step(n.op, n.name, n.attrs, list(ins), in_types,
                      [g.types[v] for v in n.outputs], params, list(n.params), n.loc)]
    types = get_op("Fused").step_types(n.attrs, in_types, [g.params[p].type for p in n.params])
    steps = []
    for i, step in enumerate(n.attrs["body"]):
        refs, pidx = step.get("inputs", []), step.get("params", [])
        steps.append(_Step(step["op"], step.get("name") or f"{n.name}/{i}",
                           step.get("attrs", {}),
                           [None if r == "prev" else ins[r] for r in refs],
                           [types[i - 1] if r == "prev" else in_types[r] for r in refs],
                           [types[i]], [params[j] for j in pidx],
                           [n.params[j] for j in pidx], n.loc))
    return steps


def export_onnx(net_or_graph, path=None, *, outputs: list[str] | None = None,
                opset: int = OPSET):
    """The ONNX ModelProto of a graphc.Net or an IR Graph (test phase, every param with
    data); written to ``path`` (atomically) if given.  ``outputs``: Caffe blob names to
    output (default: the graph's outputs), each the blob's last in-place version."""
    onnx, helper, _ = _onnx()
    g: Graph = getattr(net_or_graph, "graph", net_or_graph)
    if opset < OPSET:
        raise GraphcError(f"opset {opset} is too old for this exporter",
                          hint=f"use opset {OPSET} or newer")
    for v in g.inputs:
        if g.types[v].dtype != "f32":
            raise GraphcError(f"input '{v}' has dtype {g.types[v].dtype}; only f32 exports",
                              hint="feed float32 inputs")
    versions = g.blob_versions()
    if outputs is None:
        out_values = list(g.outputs)
    else:
        unknown = [o for o in outputs if o not in versions]
        if unknown:
            raise GraphcError(f"no blob named {', '.join(unknown)} in the net",
                              hint=f"blobs: {', '.join(versions)}")
        out_values = list(dict.fromkeys(versions[o] for o in outputs))
    # graph outputs are named by their Caffe blob; an IR value holding such a name (the
    # first version of an in-place blob) is renamed
    out_names = {v: g.blob_of.get(v, v) for v in out_values}
    b = _Builder(set(g.types) | set(out_names.values()))
    names: dict[str, str] = {v: v for v in g.inputs}

    def onnx_name(v: str) -> str:
        if v in out_names:
            return out_names[v]
        return b.fresh(f"{v}#") if v in out_names.values() else v

    for n in g.nodes:
        if n.op != "Fused" and n.op not in _EXPORTERS:
            raise GraphcError(f"{n.op} has no ONNX export", where=n.loc, layer=n.name,
                              layer_type=n.op,
                              hint="export a deploy net (test phase, no loss or data layers); "
                                   f"exportable: {', '.join(supported_ops())}")
        steps = _steps(g, n, [names[v] for v in n.inputs])
        got: list[str] = []
        for i, step in enumerate(steps):
            step.inputs = [got[0] if x is None else x for x in step.inputs]
            fn = _EXPORTERS.get(step.op)
            if fn is None:
                raise step.error(f"{step.op} has no ONNX export",
                                 hint=f"exportable: {', '.join(supported_ops())}")
            last = i == len(steps) - 1
            want = [onnx_name(v) for v in n.outputs] if last else [b.fresh(f"{step.name}#")]
            got = fn(b, step, want)
        for v, o in zip(n.outputs, got):
            names[v] = o
    graph_outputs = []
    for v in out_values:
        final = out_names[v]
        if names[v] != final:   # an alias (Split, test Dropout, ...) or a graph input
            b.add("Identity", [names[v]], final, f"{final}/output")
        graph_outputs.append(helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT,
                                                           list(g.types[v].shape)))
    graph_inputs = [helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT,
                                                  list(g.types[v].shape)) for v in g.inputs]
    graph = helper.make_graph(b.nodes, g.name, graph_inputs, graph_outputs,
                              initializer=list(b.inits.values()))
    model = helper.make_model(graph, producer_name="graphc",
                              opset_imports=[helper.make_opsetid("", opset)])
    if opset == OPSET:
        model.ir_version = IR_VERSION
    model.doc_string = f"exported by graphc from the Caffe net '{g.name}' (test phase)"
    if path is not None:
        _write_atomic(Path(path), model.SerializeToString())
    return model


def _write_atomic(path: Path, data: bytes) -> None:
    import os
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=str(path.parent or Path(".")), prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- the command --------------------------------------------------------------------------
def cmd_export(args) -> int:
    """``graphc export NET.prototxt [--weights W] [--batch N] -o net.onnx``."""
    import sys
    from ..net import Net
    _onnx()
    net = Net(args.net, weights=args.weights, phase="test", batch=args.batch)
    model = export_onnx(net, args.output, opset=args.opset)
    g = net.graph
    ins = ", ".join(f"{g.blob_of[v]} {g.types[v]}" for v in g.inputs)
    outs = ", ".join(f"{o.name} f32[{','.join(str(d.dim_value) for d in o.type.tensor_type.shape.dim)}]"
                     for o in model.graph.output)
    note = "" if args.weights else " (no --weights: params from the layers' fillers)"
    sys.stdout.write(f"wrote {args.output}: {len(model.graph.node)} ONNX nodes, opset "
                     f"{args.opset}; inputs {ins}; outputs {outs}{note}\n")
    return 0
