"""Pointwise programs: chains of elementwise ops (ReLU & co, Scale/Bias/BatchNorm per
channel, Eltwise of same-shape tensors), emitted on a scalar or on a vector of floats.

One program serves three places:

* a standalone kernel (a ReLU node, a Fused chain of elementwise ops);
* the epilogue of a convolution / inner-product GEMM, applied to a register tile before
  it is stored (``epilogue.ProgramEpilogue``);
* the tail of the small-batch inner product and the depthwise convolution.

A program is a list of ``PStep`` s.  Each step reads ``"prev"`` (the previous step's
value, or the anchor's result) and/or tensor inputs (``("t", k)``: the k-th full-shape
tensor of the site), and may use per-channel operands (``Chan``: a vector indexed by the
channel, e.g. a Scale's factors; a ``dim`` of 1 is a scalar).  The *site* knows where
the value lives and loads those operands (see ``Site``).

Each op follows Caffe's arithmetic step by step in float32 (Sigmoid and BNLL in double,
as Caffe's CPU code), like the numpy references in graphc/ops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir

from ....errors import GraphcError
from ....ops import get_op
from ....ops.elementwise import broadcast_dims
from ..irutil import F32, F64, I32, const_like, i64, intrinsic

#: single-input ops a program can compute (besides Eltwise, which takes several)
UNARY_OPS = {"ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log",
             "BNLL", "Threshold", "Dropout", "Scale", "Bias", "BatchNorm"}
POINTWISE_OPS = UNARY_OPS | {"Eltwise"}


class NotPointwise(Exception):
    """A step this program form cannot express (the caller picks another lowering)."""


@dataclass(frozen=True)
class Src:
    """Where an array lives: ``base`` "arena" or "weights", at a byte offset."""
    base: str
    offset: int


@dataclass(frozen=True)
class Chan:
    """A per-channel operand: element c of ``src`` for the channel c of the position, as
    Scale/Bias broadcast: the position's flat index i has c = (i // inner) % dim."""
    src: Src
    dim: int
    inner: int


@dataclass
class PStep:
    op: str
    attrs: dict
    inputs: list            # "prev" | ("t", k)
    chans: dict = field(default_factory=dict)   # name -> Chan
    name: str = ""

    def key(self) -> str:
        """What a GEMM epilogue's code depends on (the constants, and which operands are
        scalars; not where the operands are nor how many channels): equal keys share one
        generated GEMM."""
        consts = {k: v for k, v in self.attrs.items() if k not in ("name",)}
        chans = {k: c.dim == 1 for k, c in sorted(self.chans.items())}
        return f"{self.op}{sorted(consts.items())!r}{self.inputs!r}{chans!r}"


# ---------------------------------------------------------------------------------------
# building a program from IR steps


def channel_structure(shape) -> tuple[int, int]:
    """(dim, inner) of Caffe's channel axis 1 for a blob shape."""
    if len(shape) < 2:
        return 1, 1
    return int(shape[1]), int(math.prod(shape[2:]))


@dataclass(frozen=True)
class NodeIn:
    """A node input as a program sees it: its arena offset and shape, and its index in
    the site's tensors when it is read element by element (None: operand only)."""
    offset: int
    shape: tuple
    tensor: int | None = None


def element_reads(steps: list[dict]) -> set[int]:
    """Node input positions that steps read element by element (as x or Eltwise
    operands, not as broadcast factors)."""
    reads = set()
    for s in steps:
        refs = s.get("inputs", [])
        for r in (refs if s["op"] == "Eltwise" else refs[:1]):
            if r != "prev":
                reads.add(r)
    return reads


def site_inputs(kctx, node, out_shape, steps: list[dict]) -> tuple[list[NodeIn], list[int]]:
    """NodeIns for a node's inputs and the site tensor offsets: the inputs ``steps`` read
    element by element (of the output's shape) become site tensors, in order."""
    ins, tensors = [], []
    reads = element_reads(steps)
    for k, v in enumerate(node.inputs):
        shape = tuple(kctx.shape(v))
        off = kctx.loc(v)
        if shape == tuple(out_shape) and k in reads:
            if off not in tensors:
                tensors.append(off)
            ins.append(NodeIn(off, shape, tensors.index(off)))
        else:
            ins.append(NodeIn(off, shape, None))
    return ins, tensors


def build_steps(kctx, steps: list[dict], node_ins: list[NodeIn], params: list[str],
                shape: tuple[int, ...]) -> list[PStep]:
    """IR steps (Fused body dicts) -> PSteps.  ``node_ins``: the node's inputs (see
    NodeIn); ``params``: the node's param names.  Raises NotPointwise for a step that is
    not elementwise or reads something a program cannot."""
    out = []
    for s in steps:
        op, attrs = s["op"], {k: v for k, v in s.get("attrs", {}).items() if k != "inplace"}
        if op not in POINTWISE_OPS:
            raise NotPointwise(op)
        refs = s.get("inputs", [])
        prefs = [params[p] for p in s.get("params", [])]
        ins, chans = [], {}
        reads = refs if op == "Eltwise" else refs[:1]
        for r in reads:
            if r == "prev":
                ins.append("prev")
            else:
                t = node_ins[r]
                if t.tensor is None:
                    raise NotPointwise(f"{op} reads a tensor of another shape")
                ins.append(("t", t.tensor))
        if op != "Eltwise":
            _operands(kctx, op, attrs, refs[1:], node_ins, prefs, shape, chans)
        if op == "Dropout" and attrs.get("train"):
            raise NotPointwise("Dropout in training mode")
        if op == "BatchNorm" and not attrs.get("use_global_stats", True):
            raise NotPointwise("BatchNorm with batch statistics")
        out.append(PStep(op, attrs, ins, chans, s.get("name", "")))
    return out


def _operands(kctx, op, attrs, extra_refs, node_ins, prefs, shape, chans):
    """Per-channel operands of a unary op (from its params or its second bottom)."""
    if op in ("Scale", "Bias"):
        if extra_refs:     # the factor is bottom 1
            t = node_ins[extra_refs[0]]
            src, fshape = Src("arena", t.offset), t.shape
            rest = prefs
        else:
            src, fshape = kctx.param_src(prefs[0]), kctx.param_shape(prefs[0])
            rest = prefs[1:]
        _, dim, inner = broadcast_dims(op, shape, fshape, attrs.get("axis", 1))
        chans["scale" if op == "Scale" else "bias"] = Chan(src, dim, inner)
        if op == "Scale" and attrs.get("bias_term"):
            bshape = kctx.param_shape(rest[0])
            _, dim, inner = broadcast_dims(op, shape, bshape, attrs.get("axis", 1))
            chans["bias"] = Chan(kctx.param_src(rest[0]), dim, inner)
    elif op == "PReLU":
        dim, inner = channel_structure(shape)
        if attrs.get("channel_shared"):
            dim, inner = 1, int(math.prod(shape))
        chans["slope"] = Chan(kctx.param_src(prefs[0]), dim, inner)
    elif op == "BatchNorm":
        dim, inner = channel_structure(shape)
        mean, sd = batchnorm_arrays(kctx, prefs, attrs)
        chans["mean"] = Chan(kctx.weights_src(mean, ("bn-mean", *prefs)), dim, inner)
        chans["sd"] = Chan(kctx.weights_src(sd, ("bn-sd", *prefs)), dim, inner)


def batchnorm_arrays(kctx, prefs, attrs) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's inference BatchNorm as (x - mean) / sd, both float32 exactly as computed
    by the reference: mean = f * blob0, sd = sqrt(f * blob1 + eps), f = 1 / blob2."""
    m, v, s = (kctx.param_data(p) for p in prefs)
    s0 = np.float32(np.asarray(s).reshape(-1)[0])
    factor = np.float32(0.0) if s0 == 0 else np.float32(1.0) / s0
    mean = (factor * np.asarray(m, np.float32)).astype(np.float32)
    var = (factor * np.asarray(v, np.float32)).astype(np.float32)
    sd = np.sqrt(var + np.float32(attrs.get("eps", 1e-5))).astype(np.float32)
    return mean, sd


def program_key(steps: list[PStep]) -> str:
    return "|".join(s.key() for s in steps)


def tensor_inputs(steps: list[PStep]) -> list[int]:
    """The site tensor indices a program reads, in order of first use."""
    seen = []
    for s in steps:
        for r in s.inputs:
            if r != "prev" and r[1] not in seen:
                seen.append(r[1])
    return seen


def chan_operands(steps: list[PStep]) -> list[Chan]:
    """Every distinct per-channel operand, in order."""
    seen = []
    for s in steps:
        for c in s.chans.values():
            if c not in seen:
                seen.append(c)
    return seen


# ---------------------------------------------------------------------------------------
# emitting a program


class Site:
    """Where a program runs.  Subclasses load tensor inputs and channel operands at the
    current position; ``width`` is None for scalar code, else the vector lane count."""
    width: int | None = None

    def __init__(self, b: ir.IRBuilder):
        self.b = b

    def tensor(self, k: int):
        raise NotImplementedError

    def chan(self, c: Chan):
        raise NotImplementedError

    def skip_tensor(self, k: int) -> bool:
        """True when tensor k is already added into the value (GEMM accumulate)."""
        return False


def emit_program(site: Site, steps: list[PStep], prev=None):
    """The value after all steps; ``prev`` is the anchor's result (None when the first
    step reads only tensors)."""
    for s in steps:
        prev = _emit_step(site, s, prev)
    return prev


def _fn(b: ir.IRBuilder, name: str, x, ty=F32):
    """Apply a unary libm function (``expf``...) per lane of x (or to scalar x)."""
    fn = intrinsic(b.module, name, ty, [ty])
    if not isinstance(x.type, ir.VectorType):
        return b.call(fn, [x])
    out = ir.Constant(x.type, ir.Undefined)
    for lane in range(x.type.count):
        v = b.call(fn, [b.extract_element(x, ir.Constant(I32, lane))])
        out = b.insert_element(out, v, ir.Constant(I32, lane))
    return out


def _intr(b: ir.IRBuilder, base: str, x, nargs: int = 1, *more):
    """An overloaded LLVM math intrinsic (llvm.fabs / sqrt / exp / log / pow) on x."""
    t = x.type
    if isinstance(t, ir.VectorType):
        suffix = f"v{t.count}{'f32' if t.element == F32 else 'f64'}"
    else:
        suffix = "f32" if t == F32 else "f64"
    fn = intrinsic(b.module, f"llvm.{base}.{suffix}", t, [t] * nargs)
    return b.call(fn, [x, *more])


def _fpext(b, x):
    t = ir.VectorType(F64, x.type.count) if isinstance(x.type, ir.VectorType) else F64
    return b.fpext(x, t)


def _fptrunc(b, x):
    t = ir.VectorType(F32, x.type.count) if isinstance(x.type, ir.VectorType) else F32
    return b.fptrunc(x, t)


def _sel_neg(b, x, neg):
    """x < 0 ? neg : x (NaN stays NaN, like Caffe's max/min formulation)."""
    zero = const_like(x, 0.0)
    return b.select(b.fcmp_ordered("<", x, zero), neg, x)


def _emit_step(site: Site, s: PStep, prev):
    b = site.b
    vals = []
    for r in s.inputs:
        vals.append(prev if r == "prev" else site.tensor(r[1]))
    x = vals[0] if vals else None
    a = s.attrs
    op = s.op
    if op == "Eltwise":
        return _eltwise(site, s, vals)
    c = lambda v: const_like(x, v)  # noqa: E731
    if op == "ReLU":
        slope = float(np.float32(a.get("negative_slope", 0.0)))
        return _sel_neg(b, x, b.fmul(x, c(slope)) if slope != 0 else c(0.0))
    if op == "PReLU":
        return _sel_neg(b, x, b.fmul(x, site.chan(s.chans["slope"])))
    if op == "ELU":
        alpha = float(np.float32(a["alpha"]))
        e = b.fsub(_intr(b, "exp", x), c(1.0))
        return _sel_neg(b, x, b.fmul(c(alpha), e))
    if op == "Sigmoid":
        xd = _fpext(b, x)
        t = _fn(b, "tanh", b.fmul(xd, const_like(xd, 0.5)), F64)
        return _fptrunc(b, b.fadd(b.fmul(t, const_like(xd, 0.5)), const_like(xd, 0.5)))
    if op == "TanH":
        return _fn(b, "tanhf", x)
    if op == "AbsVal":
        return _intr(b, "fabs", x)
    if op == "Threshold":
        t = float(np.float32(a["threshold"]))
        return b.select(b.fcmp_ordered(">", x, c(t)), c(1.0), c(0.0))
    if op == "Dropout":
        return x
    if op == "Power":
        power, scale, shift = (np.float32(a[k]) for k in ("power", "scale", "shift"))
        if power * scale == 0:
            value = np.float32(1) if power == 0 else np.power(shift, power)
            return c(float(value))
        y = x
        if scale != 1:
            y = b.fmul(y, c(float(scale)))
        if shift != 0:
            y = b.fadd(y, c(float(shift)))
        if power == 2:
            y = b.fmul(y, y)
        elif power == 0.5:
            y = _intr(b, "sqrt", y)
        elif power != 1:
            y = _intr(b, "pow", y, 2, c(float(power)))
        return y
    if op == "Exp":
        inner, outer = get_op("Exp")._scales(a, np.dtype(np.float32))
        y = x if inner == 1 else b.fmul(x, c(float(inner)))
        y = _intr(b, "exp", y)
        return y if outer == 1 else b.fmul(y, c(float(outer)))
    if op == "Log":
        scale, shift = np.float32(a["scale"]), np.float32(a["shift"])
        y = x
        if scale != 1:
            y = b.fmul(y, c(float(scale)))
        if shift != 0:
            y = b.fadd(y, c(float(shift)))
        y = _intr(b, "log", y)
        bs = get_op("Log")._base_scale(a, np.dtype(np.float32))
        return y if bs == 1 else b.fmul(y, c(float(bs)))
    if op == "BNLL":
        xd = _fpext(b, x)
        one = const_like(xd, 1.0)
        pos = b.fadd(xd, _intr(b, "log", b.fadd(one, _fpext(b, _intr(b, "exp", b.fneg(x))))))
        neg = _intr(b, "log", b.fadd(one, _fpext(b, _intr(b, "exp", x))))
        return _fptrunc(b, b.select(b.fcmp_ordered(">", x, c(0.0)), pos, neg))
    if op == "Scale":
        y = b.fmul(x, site.chan(s.chans["scale"]))
        if "bias" in s.chans:
            y = b.fadd(y, site.chan(s.chans["bias"]))
        return y
    if op == "Bias":
        return b.fadd(x, site.chan(s.chans["bias"]))
    if op == "BatchNorm":
        return b.fdiv(b.fsub(x, site.chan(s.chans["mean"])), site.chan(s.chans["sd"]))
    raise GraphcError(f"internal: no pointwise code for {op}")


def _eltwise(site: Site, s: PStep, vals):
    b = site.b
    op = s.attrs.get("operation", "SUM")
    if op == "SUM":
        coeff = list(s.attrs.get("coeff") or [1.0] * len(vals))
        acc = None
        for r, v, cf in zip(s.inputs, vals, coeff):
            if r != "prev" and site.skip_tensor(r[1]):
                continue   # already in the value (the GEMM accumulated it)
            term = v if cf == 1 else b.fmul(const_like(v, float(np.float32(cf))), v)
            acc = term if acc is None else b.fadd(acc, term)
        return acc
    if op == "PROD":
        acc = vals[0]
        for v in vals[1:]:
            acc = b.fmul(acc, v)
        return acc
    # MAX: bottoms 0 and 1 with a > b ? a : b, then later ones only where strictly greater
    acc = b.select(b.fcmp_ordered(">", vals[0], vals[1]), vals[0], vals[1])
    for v in vals[2:]:
        acc = b.select(b.fcmp_ordered(">", v, acc), v, acc)
    return acc


# ---------------------------------------------------------------------------------------
# the standalone kernel


class FlatSite(Site):
    """Scalar code at flat index ``i`` of tensors of ``numel`` elements, inside a row of
    channel structure (dim, inner) whose channel is ``c``."""

    def __init__(self, b, kctx, args, tensors: list[int], i, c, dim, inner):
        super().__init__(b)
        self.kctx, self.args, self.tensors = kctx, args, tensors
        self.i, self.c, self.dim, self.inner = i, c, dim, inner
        self._ptrs = {}

    def _ptr(self, src: Src):
        if src not in self._ptrs:
            self._ptrs[src] = self.kctx.ptr(self.b, self.args, src)
        return self._ptrs[src]

    def tensor(self, k):
        p = self._ptr(Src("arena", self.tensors[k]))
        return self.b.load(self.b.gep(p, [self.i], source_etype=F32, inbounds=True), typ=F32)

    def chan(self, ch: Chan):
        b = self.b
        if ch.dim == 1:
            idx = i64(0)
        elif (ch.dim, ch.inner) == (self.dim, self.inner):
            idx = self.c
        else:
            idx = b.urem(b.udiv(self.i, i64(ch.inner)), i64(ch.dim))
        return b.load(b.gep(self._ptr(ch.src), [idx], source_etype=F32, inbounds=True), typ=F32)


def emit_pointwise_kernel(kctx, name: str, steps: list[PStep], out_offset: int,
                          tensors: list[int], shape, prev_tensor: int | None = None) -> None:
    """A step computing ``steps`` over every element: out[i] = program(tensors[*][i]);
    with ``prev_tensor`` the program starts from that tensor's value ("prev").

    Work is split over rows of the channel structure (channel axis 1, or the first
    broadcast operand's), so each inner loop has one channel and vectorizes."""
    from ..irutil import imax, imin, loop, part_range, step_function
    numel = int(math.prod(shape))
    dim, inner = channel_structure(shape)
    for ch in chan_operands(steps):
        if ch.dim > 1:
            dim, inner = ch.dim, ch.inner
            break
    fn, b, a = step_function(kctx.mod, name)
    lo, hi = part_range(b, numel, a["part"], a["nparts"], align=16)
    out = kctx.ptr(b, a, Src("arena", out_offset))
    r0 = b.udiv(lo, i64(inner))
    r1 = b.udiv(b.add(hi, i64(inner - 1)), i64(inner))
    with loop(b, r0, r1, name="row") as row:
        c = b.urem(row, i64(dim))
        start = imax(b, lo, b.mul(row, i64(inner)))
        stop = imin(b, hi, b.mul(b.add(row, i64(1)), i64(inner)))
        with loop(b, start, stop, name="i") as i:
            site = FlatSite(b, kctx, a, tensors, i, c, dim, inner)
            prev = None if prev_tensor is None else site.tensor(prev_tensor)
            y = emit_program(site, steps, prev)
            b.store(y, b.gep(out, [i], source_etype=F32, inbounds=True))
    b.ret_void()
    kctx.add_step(name, numel)
