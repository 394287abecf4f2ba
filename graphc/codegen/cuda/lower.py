"""Lowering the optimized IR to CUDA kernels and launches (a CudaProgram).

    lower_graph(g_opt, arch="sm_90", precision="tf32") -> CudaProgram

Input: a graph after the inference pipeline (dead-code, fold-batchnorm, fuse,
concat-slices, inplace) whose params hold data.  Every activation lives in one device
arena at the offsets of the memory plan (passes/memory.py; float32, row-major NCHW as the
ops define them), temporaries past the plan; the params, packed as the kernels want them
(a convolution's weight as OC x K rows, in half / bfloat16 for those precisions), in one
weights blob.  Each node becomes one or more launches of kernels rendered from
templates/cuda/*.cu.j2; one instantiation per distinct set of compile-time choices (tile,
precision, fused epilogue), shapes and offsets are launch arguments.  The whole source is
one translation unit compiled by NVRTC for ``arch`` (nvrtc.py).

Which kernel runs a node:

* Convolution / InnerProduct (+ the fused elementwise tail): the implicit GEMM
  (gemm_conv: tensor cores for tf32/fp16/bf16, FMA for fp32), the tail in its epilogue;
  depthwise and thin grouped convolutions: direct_conv.  A tail that cannot run on the
  anchor's elements (it reads a tensor of another shape) runs as a pointwise kernel over
  a temporary the anchor writes.
* Deconvolution: deconv (gather).  Pooling: pool.  LRN: lrn; LRN + Pooling fused:
  lrn_pool (each pooled output normalizes its window's elements; STOCHASTIC pooling: lrn
  into a temporary, then pool).  Softmax: softmax.  Elementwise ops and fused chains: pointwise.
* Concat (unless its producers already wrote their slices: ``by_slices``), Slice, Crop,
  Tile and views the plan did not alias: copy (strided).
"""
from __future__ import annotations

import hashlib
import math
import re

import numpy as np

from ...errors import GraphcError
from ...ir.graph import Graph, Node
from ...ops import get_op
from ...ops.base import canonical_axis
from ...ops.conv import Geometry
from ...ops.pool import pool_geometry
from ...passes.alias import VIEW_OPS
from ...passes.memory import MemoryPlan, plan_memory
from ..llvm.kernels.pointwise import (POINTWISE_OPS, NotPointwise, Src, build_steps,
                                      channel_structure, site_inputs)
from ..llvm.lower import NodeInfo, TensorInfo, WeightsBlob
from .pointwise import Epilogue, build_epilogue
from .program import Arg, CudaProgram, Launch
from .tiles import choose_tile

ALIGN = 256
PRECISIONS = ("tf32", "fp32", "fp16", "bf16")
ANCHORS = ("Convolution", "InnerProduct")
SINGLE = ("Pooling", "LRN", "Softmax", "Concat", "Slice", "Crop", "Tile", "Deconvolution")
#: threads of the elementwise-style kernels; their grids are capped (grid-stride loops)
THREADS = 256
MAX_BLOCKS = 65535 * 4


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _ident(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", s) or "net"


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, np.float32))
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


class CudaWeights(WeightsBlob):
    """The weights blob, with arrays kept in their own element type (float32, float16,
    bfloat16 bits as uint16); 256-byte aligned for the kernels' vector loads."""

    def add(self, key, array: np.ndarray, dtype=np.float32) -> int:
        if key in self._offsets:
            return self._offsets[key]
        a = np.ascontiguousarray(array, dtype=dtype)
        self._digest = None
        off = self.size
        self._arrays.append((off, a))
        self._offsets[key] = off
        self.size = _align(off + a.nbytes)
        return off


class CudaContext:
    """What the lowering of one node needs (duck-compatible with the CPU backend's
    KernelContext where the shared pointwise-program builder uses it)."""

    def __init__(self, g: Graph, plan: MemoryPlan, arch: str, precision: str):
        self.g, self.plan, self.arch, self.precision = g, plan, arch, precision
        self.weights = CudaWeights()
        self.temp_base = _align(plan.arena_bytes)
        self.temp_bytes = 0
        self._temp_used: dict[int, int] = {}
        self._temps: dict[tuple[int, str], int] = {}
        self.node_index = -1
        self.node: Node | None = None
        self.kernels: dict[str, tuple[str, str]] = {}    # key -> (name, source)
        self.launches: list[Launch] = []
        self.uses_wmma = False
        from ...runtime.build import _env
        self.env = _env()

    # ---- where things are (as the CPU KernelContext) -----------------------------------
    def loc(self, value: str) -> int:
        return self.plan.offsets[value]

    def shape(self, value: str) -> tuple[int, ...]:
        return tuple(self.g.types[value].shape)

    def param_data(self, pname: str) -> np.ndarray:
        p = self.g.params[pname]
        if p.data is None:
            n = self.node
            raise GraphcError(f"param ${pname} has no values",
                              where=getattr(n, "loc", None), layer=getattr(n, "name", None),
                              layer_type=getattr(n, "op", None),
                              hint="give the weights (--weights W.caffemodel), or fill the "
                                   "params before compiling")
        return np.asarray(p.data, dtype=np.float32)

    def param_shape(self, pname: str) -> tuple[int, ...]:
        return tuple(self.g.params[pname].type.shape)

    def param_src(self, pname: str) -> Src:
        return Src("weights", self.weights.add(("param", pname), self.param_data(pname)))

    def weights_src(self, array: np.ndarray, key) -> Src:
        return Src("weights", self.weights.add(key, array))

    def temp(self, nbytes: int, slot: str = "") -> int:
        key = (self.node_index, slot)
        if key not in self._temps:
            used = self._temp_used.get(self.node_index, 0)
            self._temps[key] = self.temp_base + used
            self._temp_used[self.node_index] = used + _align(nbytes)
            self.temp_bytes = max(self.temp_bytes, used + _align(nbytes))
        return self._temps[key]

    # ---- kernels and launches ------------------------------------------------------------
    def kernel(self, template: str, kind: str, key, **ctx) -> str:
        """The name of the instantiation of ``template`` for ``key`` (rendered once)."""
        full = repr((template, key))
        if full not in self.kernels:
            # named by what it is: the same instantiation has the same name in every net
            digest = hashlib.blake2b(full.encode(), digest_size=6).hexdigest()
            name = f"gc_{kind}_{digest}"
            layer = self.node.name if self.node is not None else "?"
            src = self.env.get_template(f"cuda/{template}.cu.j2").render(kname=name, **ctx)
            self.kernels[full] = (name, f"// layer: {_comment(layer)}\n{src.strip()}\n")
        return self.kernels[full][0]

    def launch(self, kernel: str, grid, block, args: list[Arg], smem: int = 0) -> None:
        grid = tuple(int(v) for v in (tuple(grid) + (1, 1, 1))[:3])
        block = tuple(int(v) for v in (tuple(block) + (1, 1, 1))[:3])
        self.launches.append(Launch(kernel, grid, block, int(smem), list(args),
                                    self.node_index))

    def launch_flat(self, kernel: str, total: int, args: list[Arg]) -> None:
        blocks = max(1, min(MAX_BLOCKS, -(-int(total) // THREADS)))
        self.launch(kernel, (blocks,), (THREADS,), args)


def _comment(s: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in str(s)).replace("*/", "*?")


def _a(v: str) -> Arg:
    return Arg("arena", int(v))


def _err(n: Node, why: str, hint: str) -> GraphcError:
    return GraphcError(f"the CUDA backend cannot compile this layer: {why}", where=n.loc,
                       layer=n.name, layer_type=n.op, hint=hint)


# ---------------------------------------------------------------------------------------
# which nodes


def _body(n: Node) -> list[dict]:
    if n.op == "Fused":
        return n.attrs["body"]
    attrs = {k: v for k, v in n.attrs.items() if k not in ("inplace", "by_slices")}
    return [{"op": n.op, "attrs": attrs, "inputs": list(range(len(n.inputs))),
             "params": list(range(len(n.params))), "name": n.name}]


def check_supported(g: Graph) -> None:
    """Raise GraphcError for the first node the CUDA backend cannot compile."""
    for n in g.nodes:
        why = _unsupported(g, n)
        if why:
            raise _err(n, *why)


def _unsupported(g: Graph, n: Node):
    for v in (*n.inputs, *n.outputs):
        if getattr(g.types[v], "layout", None) is not None:
            return (f"value %{v} has the blocked layout {g.types[v].layout}",
                    "compile without the 'layout' pass")
    if n.op in VIEW_OPS:
        return None
    if not n.inputs:
        return (f"a {n.op} layer produces data by itself", "feed the blob from outside: "
                "replace the layer by an Input layer")
    body = _body(n)
    first = body[0]["op"]
    multi = n.op == "Slice" or (n.op == "Pooling" and n.attrs.get("top_mask"))
    if len(n.outputs) != 1 and not multi:
        return (f"{n.op} with {len(n.outputs)} tops", "use one top")
    if n.op == "Fused":
        if first == "LRN" and len(body) == 2 and body[1]["op"] == "Pooling":
            return _pool_unsupported(body[1]["attrs"])
        rest = body[1:] if first in ANCHORS else body
        for s in rest:
            if s["op"] not in POINTWISE_OPS:
                return (f"a fused {s['op']} step after {first}",
                        "run the pipeline without the 'fuse' pass, or report the pattern")
            why = _pointwise_unsupported(s["op"], s.get("attrs", {}))
            if why:
                return why
        if first in ANCHORS:
            return _anchor_unsupported(g, n, body[0])
        return None
    if first in ANCHORS:
        return _anchor_unsupported(g, n, body[0])
    if first == "Deconvolution":
        geo = Geometry(n.attrs, g.types[n.inputs[0]].shape, transposed=True)
        if geo.axis != 1 or geo.nsp not in (1, 2):
            return ("a Deconvolution with other than 1 or 2 spatial axes after axis 1",
                    "use 2-D deconvolution on (N, C, H, W) blobs")
        return None
    if first == "Pooling":
        return _pool_unsupported(n.attrs)
    if first in SINGLE:
        return None
    if first in POINTWISE_OPS:
        return _pointwise_unsupported(first, n.attrs)
    return (f"there is no CUDA kernel for {n.op} layers",
            "CUDA kernels exist for Convolution, Deconvolution, InnerProduct, Pooling, LRN, "
            "Softmax, Concat, Slice, Crop, Tile, Eltwise, Scale, Bias, BatchNorm, ReLU, PReLU, "
            "ELU, Sigmoid, TanH, AbsVal, Power, Exp, Log, BNLL, Threshold, Dropout and views; "
            "compile for the CPU (--target cpu) or run with the reference executor")


def _pointwise_unsupported(op, attrs):
    if op == "Dropout" and attrs.get("train"):
        return ("Dropout in training mode", "compile the test phase")
    if op == "BatchNorm" and not attrs.get("use_global_stats", True):
        return ("BatchNorm with batch statistics (training)",
                "compile the test phase, or set use_global_stats: true")
    return None


def _pool_unsupported(attrs):
    if attrs["pool"] == "STOCHASTIC" and attrs.get("train"):
        return ("STOCHASTIC pooling in training mode draws random numbers",
                "compile the test phase")
    return None


def _anchor_unsupported(g, n, anchor):
    if len(anchor.get("inputs", [])) != 1:
        return (f"a {anchor['op']} with several bottoms", "use one bottom")
    if anchor["op"] == "Convolution":
        x = n.inputs[anchor["inputs"][0]]
        geo = Geometry(anchor["attrs"], g.types[x].shape, transposed=False)
        if geo.axis != 1 or geo.nsp not in (1, 2):
            return ("a Convolution with other than 1 or 2 spatial axes after axis 1",
                    "use 2-D convolution on (N, C, H, W) blobs")
    return None


# ---------------------------------------------------------------------------------------
# lowering


def lower_node(k: CudaContext, n: Node) -> None:
    body = _body(n)
    first = body[0]["op"]
    if n.op in VIEW_OPS:
        for o in n.outputs:
            if k.loc(o) != k.loc(n.inputs[0]):
                numel = math.prod(k.shape(n.inputs[0]))
                copy(k, k.loc(n.inputs[0]), k.loc(o), [numel], [1], [1])
    elif first in ANCHORS:
        lower_anchored(k, n, body)
    elif first == "LRN" and len(body) == 2:
        x, y = n.inputs[0], n.outputs[0]
        if body[1]["attrs"]["pool"] in ("MAX", "AVE"):
            lrn_pool(k, body[0]["attrs"], body[1]["attrs"], k.loc(x), k.loc(y), k.shape(x))
        else:
            tmp = k.temp(4 * math.prod(k.shape(x)), "lrn")
            lrn(k, body[0]["attrs"], k.loc(x), tmp, k.shape(x))
            pool(k, body[1]["attrs"], tmp, [k.loc(y)], k.shape(x))
    elif n.op != "Fused" and first in SINGLE:
        {"Pooling": lower_pooling, "LRN": lower_lrn, "Softmax": lower_softmax,
         "Concat": lower_concat, "Slice": lower_slice, "Crop": lower_crop,
         "Tile": lower_tile, "Deconvolution": lower_deconv}[first](k, n)
    else:
        lower_pointwise(k, n, body)


def lower_pointwise(k: CudaContext, n: Node, body: list[dict]) -> None:
    out = n.outputs[0]
    shape = k.shape(out)
    node_ins, tensors = site_inputs(k, n, shape, body)
    steps = build_steps(k, body, node_ins, n.params, shape)
    pointwise(k, steps, tensors, k.loc(out), shape)


def pointwise(k: CudaContext, steps, tensors: list[int], out_off: int, shape,
              prev: int | None = None) -> None:
    """out = program(tensors...) elementwise; ``prev``: the arena offset v starts from."""
    dim, inner = channel_structure(shape)
    epi = build_epilogue(steps, shape, tensors, natural=(dim, inner))
    name = k.kernel("pointwise", "pw", (epi.key, prev is not None), epi=epi,
                    has_prev=prev is not None)
    total = math.prod(shape)
    args = [_a(prev if prev is not None else out_off), _a(out_off), Arg("i32", dim),
            Arg("i32", max(inner, 1)), Arg("i64", total), *epi.args]
    k.launch_flat(name, total, args)


def lower_anchored(k: CudaContext, n: Node, body: list[dict]) -> None:
    anchor, tail = body[0], body[1:]
    out = n.outputs[0]
    shape = k.shape(out)
    node_ins, tensors = site_inputs(k, n, shape, tail)
    try:
        steps = build_steps(k, tail, node_ins, n.params, shape) if tail else []
    except NotPointwise:
        steps = None
    if steps is not None:
        anchor_op(k, n, anchor, steps, tensors, k.loc(out), shape)
        return
    # the anchor into a temporary, then the tail as a pointwise kernel reading it
    ashape = anchor_shape(k, n, anchor)
    tmp = k.temp(4 * math.prod(ashape), "anchor")
    anchor_op(k, n, anchor, [], [], tmp, ashape)
    node_ins, tensors = site_inputs(k, n, shape, tail)
    steps = build_steps(k, tail, node_ins, n.params, shape)
    pointwise(k, steps, tensors, k.loc(out), shape, prev=tmp)


def anchor_shape(k, n, anchor):
    x = n.inputs[anchor["inputs"][0]]
    if anchor["op"] == "Convolution":
        return Geometry(anchor["attrs"], k.shape(x), transposed=False).out_shape()
    axis, _, _, nout = get_op("InnerProduct")._mk(anchor["attrs"], k.shape(x))
    return (*k.shape(x)[:axis], nout)


class ConvDims:
    """A convolution / inner product as the kernels see it (2-D, NCHW)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def ints(self) -> list[Arg]:
        return [Arg("i32", int(getattr(self, f))) for f in
                ("C", "H", "W", "Cg", "M", "OC", "OH", "OW", "KH", "KW", "SH", "SW", "PH",
                 "PW", "DH", "DW")]


def _conv_dims(geo: Geometry) -> ConvDims:
    if geo.nsp == 1:
        (H,), (OH,) = geo.spatial, geo.out_spatial
        return ConvDims(N=geo.num, C=geo.channels, H=1, W=H, OH=1, OW=OH, KH=1,
                        KW=geo.kernel[0], SH=1, SW=geo.stride[0], PH=0, PW=geo.pad[0], DH=1,
                        DW=geo.dilation[0], G=geo.group, Cg=geo.channels // geo.group,
                        OC=geo.num_output, M=geo.num_output // geo.group)
    (H, W), (OH, OW) = geo.spatial, geo.out_spatial
    return ConvDims(N=geo.num, C=geo.channels, H=H, W=W, OH=OH, OW=OW, KH=geo.kernel[0],
                    KW=geo.kernel[1], SH=geo.stride[0], SW=geo.stride[1], PH=geo.pad[0],
                    PW=geo.pad[1], DH=geo.dilation[0], DW=geo.dilation[1], G=geo.group,
                    Cg=geo.channels // geo.group, OC=geo.num_output,
                    M=geo.num_output // geo.group)


def anchor_op(k: CudaContext, n: Node, anchor: dict, steps, tensors, out_off: int,
              out_shape) -> None:
    """A Convolution / InnerProduct with ``steps`` in its epilogue."""
    x = n.inputs[anchor["inputs"][0]]
    prm = [n.params[i] for i in anchor.get("params", [])]
    attrs = anchor["attrs"]
    if anchor["op"] == "Convolution":
        geo = Geometry(attrs, k.shape(x), transposed=False)
        d = _conv_dims(geo)
        w = k.param_data(prm[0]).reshape(d.OC, -1)
        has_bias = bool(attrs.get("bias_term", True)) and len(prm) > 1
        natural = (d.OC, d.OH * d.OW)
        wkey = ("conv-w", prm[0])
    else:
        axis, outer, kk, nout = get_op("InnerProduct")._mk(attrs, k.shape(x))
        d = ConvDims(N=outer, C=kk, H=1, W=1, OH=1, OW=1, KH=1, KW=1, SH=1, SW=1, PH=0, PW=0,
                     DH=1, DW=1, G=1, Cg=kk, OC=nout, M=nout)
        w = k.param_data(prm[0])
        w = (w.reshape(kk, nout).T if attrs.get("transpose") else w.reshape(nout, kk))
        has_bias = bool(attrs.get("bias_term", True)) and len(prm) > 1
        natural = (nout, 1)
        wkey = ("ip-w", prm[0], bool(attrs.get("transpose")))
    epi = build_epilogue(steps, out_shape, tensors, natural=natural)
    bias = Arg("weights", k.weights.add(("param", prm[1]), k.param_data(prm[1]).reshape(-1))
               if has_bias else 0)
    npix = d.N * d.OH * d.OW
    direct = anchor["op"] == "Convolution" and d.G > 1 and (d.Cg * d.KH * d.KW < 32 or d.M < 16)
    if direct:
        woff = k.weights.add(wkey + ("f32",), w)
        name = k.kernel("direct_conv", "dconv", (epi.key, has_bias), epi=epi,
                        has_bias=has_bias)
        total = d.N * d.OC * d.OH * d.OW
        k.launch_flat(name, total, [_a(k.loc(x)), Arg("weights", woff), bias, _a(out_off),
                                    *d.ints(), Arg("i64", total), *epi.args])
        return
    prec = k.precision
    tile = choose_tile(d.M, npix, d.G, tensor_cores=prec != "fp32")
    if prec in ("fp16", "bf16"):
        wdata = w.astype(np.float16) if prec == "fp16" else to_bf16_bits(w)
        woff = k.weights.add(wkey + (prec,), wdata, dtype=wdata.dtype)
    else:
        woff = k.weights.add(wkey + ("f32",), w)
    pointwise_b = d.KH == d.KW == d.SH == d.SW == 1 and d.PH == d.PW == 0
    ctx = dict(epi=epi, has_bias=has_bias, pointwise_b=pointwise_b, BM=tile.BM, BN=tile.BN,
               BK=tile.BK, NT=tile.threads, wmma=tile.wmma, precision=prec)
    if tile.wmma:
        k.uses_wmma = True
        half = prec in ("fp16", "bf16")
        stype = {"fp16": "half", "bf16": "__nv_bfloat16", "tf32": "float"}[prec]
        conv_b = {"fp16": "__float2half(b)", "bf16": "__float2bfloat16(b)",
                  "tf32": "nvcuda::wmma::__float_to_tf32(b)"}[prec]
        ctx.update(WM=tile.WM, WN=tile.WN, WARPS_N=tile.BN // tile.WN,
                   NWARPS=tile.threads // 32, FM=tile.WM // 16, FN=tile.WN // 16,
                   FK=16 if half else 8, LDA=tile.BK + (8 if half else 4),
                   LDB=tile.BN + (8 if half else 4), stype=stype, atype=stype,
                   azero={"fp16": "__float2half(0.0f)", "bf16": "__float2bfloat16(0.0f)",
                          "tf32": "0.0f"}[prec],
                   a_to_s="a" if half else "nvcuda::wmma::__float_to_tf32(a)", b_to_s=conv_b,
                   wtype={"fp16": "half", "bf16": "__nv_bfloat16",
                          "tf32": "nvcuda::wmma::precision::tf32"}[prec])
    else:
        ctx.update(TM=tile.BM // 16, TN=tile.BN // 16, atype="float", azero="0.0f")
    name = k.kernel("gemm_conv", "conv", (epi.key, has_bias, pointwise_b, tile, prec), **ctx)
    grid = (-(-npix // tile.BN), -(-d.M // tile.BM), d.G)
    if grid[1] > 65535 or grid[2] > 65535:
        raise _err(n, f"{d.M} output channels in {d.G} groups need more blocks than a grid "
                      "holds", "use fewer output channels per layer")
    k.launch(name, grid, (tile.threads,), [_a(k.loc(x)), Arg("weights", woff), bias,
                                           _a(out_off), *d.ints(), Arg("i32", npix),
                                           *epi.args])


def lower_deconv(k: CudaContext, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    geo = Geometry(n.attrs, k.shape(x), transposed=True)
    d = _conv_dims(geo)
    has_bias = bool(n.attrs.get("bias_term", True)) and len(n.params) > 1
    woff = k.weights.add(("param", n.params[0]), k.param_data(n.params[0]))
    bias = Arg("weights", k.weights.add(("param", n.params[1]),
                                        k.param_data(n.params[1]).reshape(-1))
               if has_bias else 0)
    epi = Epilogue()
    name = k.kernel("deconv", "deconv", (has_bias,), epi=epi, has_bias=has_bias)
    total = d.N * d.OC * d.OH * d.OW
    k.launch_flat(name, total, [_a(k.loc(x)), Arg("weights", woff), bias, _a(k.loc(y)),
                                *d.ints(), Arg("i64", total)])


def pool(k: CudaContext, attrs: dict, x_off: int, outs: list[int], in_shape) -> None:
    kernel, stride, pad, out = pool_geometry(attrs, in_shape)
    method = attrs["pool"]
    mask = len(outs) > 1
    name = k.kernel("pool", "pool", (method, mask), method=method, mask=mask)
    N, C, H, W = in_shape
    total = N * C * out[0] * out[1]
    k.launch_flat(name, total, [_a(x_off), _a(outs[0]), _a(outs[1] if mask else outs[0]),
                                *[Arg("i32", v) for v in (H, W, out[0], out[1], kernel[0],
                                                          kernel[1], stride[0], stride[1],
                                                          pad[0], pad[1])],
                                Arg("i64", total)])


def lower_pooling(k: CudaContext, n: Node) -> None:
    pool(k, n.attrs, k.loc(n.inputs[0]), [k.loc(o) for o in n.outputs], k.shape(n.inputs[0]))


def _lrn_args(attrs: dict, shape) -> list[Arg]:
    """C, H, W, local size, k, alpha / n, alpha, -beta (float32 as the reference)."""
    size = int(attrs["local_size"])
    alpha, beta = np.float32(attrs["alpha"]), np.float32(attrs["beta"])
    _, C, H, W = shape
    return [Arg("i32", C), Arg("i32", H), Arg("i32", W), Arg("i32", size),
            Arg("f32", float(np.float32(attrs.get("k", 1.0)))),
            Arg("f32", float(alpha / np.float32(size))), Arg("f32", float(alpha)),
            Arg("f32", float(-beta))]


def lrn(k: CudaContext, attrs: dict, x_off: int, y_off: int, shape) -> None:
    region = attrs.get("norm_region", "ACROSS_CHANNELS")
    name = k.kernel("lrn", "lrn", (region,), region=region)
    total = math.prod(shape)
    k.launch_flat(name, total, [_a(x_off), _a(y_off), *_lrn_args(attrs, shape),
                                Arg("i64", total)])


def lrn_pool(k: CudaContext, lattrs: dict, pattrs: dict, x_off: int, y_off: int,
             shape) -> None:
    """LRN then MAX / AVE pooling in one kernel (the normalized blob is never stored)."""
    region = lattrs.get("norm_region", "ACROSS_CHANNELS")
    kernel, stride, pad, out = pool_geometry(pattrs, shape)
    method = pattrs["pool"]
    name = k.kernel("lrn_pool", "lrnpool", (region, method), region=region, method=method)
    total = shape[0] * shape[1] * out[0] * out[1]
    k.launch_flat(name, total, [_a(x_off), _a(y_off), *_lrn_args(lattrs, shape),
                                *[Arg("i32", v) for v in (out[0], out[1], kernel[0], kernel[1],
                                                          stride[0], stride[1], pad[0],
                                                          pad[1])],
                                Arg("i64", total)])


def lower_lrn(k: CudaContext, n: Node) -> None:
    lrn(k, n.attrs, k.loc(n.inputs[0]), k.loc(n.outputs[0]), k.shape(n.inputs[0]))


def lower_softmax(k: CudaContext, n: Node) -> None:
    shape = k.shape(n.inputs[0])
    axis = canonical_axis(int(n.attrs.get("axis", 1)), len(shape))
    outer, C, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    rows = inner == 1
    name = k.kernel("softmax", "softmax", (rows,), rows=rows)
    args = [_a(k.loc(n.inputs[0])), _a(k.loc(n.outputs[0])), Arg("i32", C),
            Arg("i32", inner), Arg("i64", outer)]
    if rows:
        k.launch(name, (max(1, min(outer, MAX_BLOCKS)),), (THREADS,), args)
    else:
        k.launch_flat(name, outer * inner, args)


def copy(k: CudaContext, src: int, dst: int, sizes, xstrides, ystrides) -> None:
    """dst[sum i_d * ystrides_d] = src[sum i_d * xstrides_d] (float offsets) for every
    index of ``sizes`` (at most 6 axes)."""
    sizes, xs, ys = list(sizes), list(xstrides), list(ystrides)
    if len(sizes) > 6:
        raise GraphcError(f"internal: a copy of {len(sizes)} axes (at most 6)")
    total = math.prod(sizes)
    if total == 0:
        return
    pad = 6 - len(sizes)
    sizes, xs, ys = [1] * pad + sizes, [0] * pad + xs, [0] * pad + ys
    name = k.kernel("copy", "copy", ())
    k.launch_flat(name, total, [_a(src), _a(dst), *[Arg("i32", s) for s in sizes],
                                *[Arg("i64", s) for s in xs], *[Arg("i64", s) for s in ys],
                                Arg("i64", total)])


def lower_concat(k: CudaContext, n: Node) -> None:
    if n.attrs.get("by_slices"):
        return
    out = n.outputs[0]
    shape = k.shape(out)
    axis = canonical_axis(int(n.attrs["axis"]), len(shape))
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    at = 0
    for v in n.inputs:
        s = k.shape(v)[axis]
        copy(k, k.loc(v), k.loc(out) + 4 * at * inner, [outer, s * inner],
             [s * inner, 1], [shape[axis] * inner, 1])
        at += s


def lower_slice(k: CudaContext, n: Node) -> None:
    x = n.inputs[0]
    shape = k.shape(x)
    axis, sizes = get_op("Slice").sizes(n.attrs, shape)
    outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    at = 0
    for v, s in zip(n.outputs, sizes):
        copy(k, k.loc(x) + 4 * at * inner, k.loc(v), [outer, s * inner],
             [shape[axis] * inner, 1], [s * inner, 1])
        at += s


def lower_crop(k: CudaContext, n: Node) -> None:
    x, y = n.inputs[0], n.outputs[0]
    s0, s1 = k.shape(x), k.shape(n.inputs[1])
    off, oshape = get_op("Crop").plan(n.attrs, s0, s1)
    rank = len(s0)
    xst = [math.prod(s0[i + 1:]) for i in range(rank)]
    yst = [math.prod(oshape[i + 1:]) for i in range(rank)]
    src = k.loc(x) + 4 * sum(o * s for o, s in zip(off, xst))
    # merge leading axes into groups of at most 6 by keeping the last 5 and flattening the rest
    if rank > 6:
        lead = math.prod(oshape[:rank - 5])
        if any(oshape[i] != s0[i] or off[i] for i in range(1, rank - 5)):
            raise _err(n, "a crop of more than 6 axes with cropped leading axes",
                       "crop at most the last 5 axes")
        oshape, xst, yst = [lead, *oshape[rank - 5:]], [xst[rank - 6], *xst[rank - 5:]], \
            [yst[rank - 6], *yst[rank - 5:]]
    copy(k, src, k.loc(y), oshape, xst, yst)


def lower_tile(k: CudaContext, n: Node) -> None:
    x = n.inputs[0]
    shape = k.shape(x)
    axis = canonical_axis(int(n.attrs.get("axis", 1)), len(shape))
    tiles = int(n.attrs["tiles"])
    outer, block = math.prod(shape[:axis]), math.prod(shape[axis:])
    copy(k, k.loc(x), k.loc(n.outputs[0]), [outer, tiles, block], [block, 0, 1],
         [tiles * block, block, 1])


# ---------------------------------------------------------------------------------------


def generate(g: Graph, arch: str = "sm_90", precision: str = "tf32",
             plan: MemoryPlan | None = None) -> tuple[CudaContext, list[NodeInfo]]:
    """The kernels and launches of an optimized graph (no compiling)."""
    from ...cost import node_cost
    if precision not in PRECISIONS:
        raise GraphcError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                          hint="tf32 (default): fp32 data, TF32 tensor-core products; fp32: "
                               "exact IEEE single precision; fp16/bf16: half-precision "
                               "products with fp32 accumulation")
    from .nvrtc import parse_arch
    number, _ = parse_arch(arch)
    need = {"tf32": 80, "bf16": 80, "fp16": 70}.get(precision, 0)
    if number < need:
        raise GraphcError(f"precision {precision} needs tensor cores of sm_{need} or newer; "
                          f"{arch} has none for it",
                          hint="use precision fp32 (or fp16 on sm_70+) for this GPU, or a "
                               "newer --arch")
    check_supported(g)
    plan = plan or plan_memory(g)
    k = CudaContext(g, plan, arch, precision)
    nodes = []
    for n in g.nodes:
        k.node_index, k.node = len(nodes), n
        nodes.append(NodeInfo(n.name, n.op if n.op != "Fused" else
                              "+".join(s["op"] for s in n.attrs["body"]),
                              int(node_cost(g, n).flops)))
        try:
            lower_node(k, n)
        except GraphcError as e:
            raise e.located(where=n.loc, layer=n.name, layer_type=n.op)
    return k, nodes


def render_source(k: CudaContext, name: str) -> str:
    prelude = k.env.get_template("cuda/prelude.cu.j2").render(
        name=name, precision=k.precision, arch=k.arch, wmma=k.uses_wmma)
    return prelude.strip() + "\n\n" + "\n".join(src for _, src in k.kernels.values())


def lower_graph(g: Graph, arch: str = "sm_90", precision: str = "tf32", *,
                plan: MemoryPlan | None = None, compile: bool = True) -> CudaProgram:
    """Lower an optimized graph (params with data) to a CudaProgram; with ``compile`` the
    source is compiled by NVRTC for ``arch`` (the cubin, ptxas's resources per kernel)."""
    k, nodes = generate(g, arch, precision, plan)
    source = render_source(k, g.name)
    cubin, log, kinfo = b"", "", {}
    if compile:
        from .nvrtc import compile_module
        cubin, log, kinfo = compile_module(source, arch, name=f"{_ident(g.name)}.cu")[:3]
    inputs = [TensorInfo(g.blob_of.get(v, v), v, k.shape(v), k.loc(v)) for v in g.inputs]
    outputs = [TensorInfo(g.blob_of.get(v, v), v, k.shape(v), k.loc(v)) for v in g.outputs]
    return CudaProgram(name=g.name, arch=arch, precision=precision, source=source,
                       cubin=cubin, launches=k.launches, nodes=nodes, inputs=inputs,
                       outputs=outputs, arena_bytes=_align(k.temp_base + k.temp_bytes),
                       weights=k.weights, kernels=kinfo, compile_log=log)
