"""The same net in PyTorch, built from graphc's IR: an ``nn.Module`` holding the same
weights, that runs the graph's nodes in order with Caffe's semantics (pooling rounding,
AVE divisor, LRN's alpha / size, BatchNorm's scale factor, InnerProduct's flattening).

    from torch_nets import require_torch, TorchNet, check_against_reference
    torch = require_torch()                      # a clear message if PyTorch is missing
    module = TorchNet(net.graph)                 # a graphc.Net's lowered graph
    out = module(data=torch.from_numpy(x))       # {output blob: tensor}

Pooling uses PyTorch's own ``ceil_mode`` where its output size equals Caffe's (PyTorch's
rule drops a last window that starts in the padding, as Caffe's does, and its AVE divisor
is Caffe's); elsewhere it pads explicitly as ``graphc.export.pooling`` describes.  Train
graphs (``SoftmaxWithLoss``; Dropout and BatchNorm in the train phase are not supported)
return the weighted loss under the key ``"loss"``.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from graphc.errors import GraphcError  # noqa: E402
from graphc.export.pooling import FLT_MAX, pool_plan  # noqa: E402
from graphc.ir.graph import Graph  # noqa: E402
from graphc.ops.base import canonical_axis, get_op  # noqa: E402

INSTALL = "pip install torch==2.13.0   (the CPU wheel; e.g. into the project's venv)"


def require_torch():
    """Import torch, or exit with a message saying how to install it."""
    try:
        import torch
    except ImportError:
        raise SystemExit(f"this benchmark needs PyTorch, which is not installed:\n  {INSTALL}")
    return torch


#: glibc malloc settings (read from the environment when the process starts)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
              "MALLOC_TOP_PAD_": str(512 << 20)}


def tuned_malloc(enabled: bool = True) -> str:
    """Keep freed memory in glibc's heap instead of handing it back to the kernel; returns
    a line for the report.  Re-executes the script once with the settings in its
    environment (glibc reads them at start-up only).

    PyTorch's CPU allocator is plain malloc: with glibc's defaults a large tensor is a
    fresh mmap, page-faulted in and unmapped again on every run, so eager PyTorch spends
    a large part of a batch-16 ResNet-50 in the kernel (about 0.5-0.9 million page faults
    per run here, more once ONNX Runtime has run in the same process; 1.1-1.5 s against
    0.55 s with these settings).  PyTorch's CPU performance guides recommend jemalloc or
    tcmalloc, or tuning glibc like this.  graphc and ONNX Runtime allocate arenas once."""
    if not enabled:
        return "glibc malloc defaults"
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return ("glibc malloc tuned for the whole process (" +
            ", ".join(f"{k}={int(v) >> 20} MiB" for k, v in MALLOC_ENV.items()) +
            "; PyTorch's big tensors otherwise cost a page fault per 4 KiB on every run)")


def _torch_pool_size(n, k, s, p, ceil: bool) -> int:
    """PyTorch's pooling output size (dilation 1)."""
    q = (n + 2 * p - k)
    o = (-(-q // s) if ceil else q // s) + 1
    if ceil and (o - 1) * s >= n + p:
        o -= 1
    return o


def _ops(torch):
    """op type -> fn(module, node-like, inputs, params) -> list of outputs."""
    F = torch.nn.functional
    ops = {}

    def op(*names):
        def deco(fn):
            for n in names:
                ops[n] = fn
            return fn
        return deco

    @op("Convolution", "Deconvolution")
    def conv(m, n, xs, ps):
        from graphc.ops.conv import Geometry
        geo = Geometry(n.attrs, tuple(xs[0].shape), n.op == "Deconvolution")
        w = ps[0]
        b = ps[1] if n.attrs.get("bias_term", True) else None
        nsp = geo.nsp
        if n.op == "Deconvolution":
            fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nsp]
            call = lambda x: fn(x, w, b, geo.stride, geo.pad, 0, geo.group, geo.dilation)
        else:
            fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nsp]
            call = lambda x: fn(x, w, b, geo.stride, geo.pad, geo.dilation, geo.group)
        outs = []
        for x in xs:
            x3 = x.reshape(geo.num, geo.channels, *geo.spatial)
            outs.append(call(x3).reshape(geo.out_shape()))
        return outs

    @op("Pooling")
    def pool(m, n, xs, ps):
        a, x = n.attrs, xs[0]
        if a["pool"] not in ("MAX", "AVE") or a.get("top_mask"):
            raise GraphcError(f"layer '{n.name}': {a['pool']} pooling"
                              f"{' with a mask top' if a.get('top_mask') else ''} is not "
                              "supported in the PyTorch build", hint="use MAX or AVE")
        plan = pool_plan(a, tuple(x.shape))
        if plan.global_pooling:
            return [x.amax(dim=(2, 3), keepdim=True) if a["pool"] == "MAX"
                    else x.mean(dim=(2, 3), keepdim=True)]
        k, s, p = plan.kernel, plan.stride, plan.pad
        ceil = a.get("round_mode", "CEIL") == "CEIL"
        native = all(2 * pi <= ki for pi, ki in zip(p, k)) and all(
            _torch_pool_size(hw, ki, si, pi, ceil) == o
            for hw, ki, si, pi, o in zip(x.shape[2:], k, s, p, plan.out))
        if native:
            if a["pool"] == "MAX":
                return [F.max_pool2d(x, k, s, p, ceil_mode=ceil)]
            return [F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=True)]
        # explicit: pad (negative pads crop) so floor rounding gives Caffe's windows
        widths = []
        for ax in (1, 0):
            widths += [p[ax], plan.pad_end[ax] - plan.crop_end[ax]]
        if a["pool"] == "MAX":
            y = F.max_pool2d(F.pad(x, widths, value=-math.inf), k, s)
            return [y.clamp_min(-FLT_MAX) if plan.empty else y]
        y = F.avg_pool2d(F.pad(x, widths, value=0.0), k, s, count_include_pad=True)
        return [y if plan.ave_ratio is None else y * m.const(n.name, "ratio", plan.ave_ratio)]

    @op("InnerProduct")
    def inner_product(m, n, xs, ps):
        x = xs[0]
        axis = canonical_axis(int(n.attrs.get("axis", 1)), x.dim())
        lead = tuple(x.shape[:axis])
        w = ps[0].t() if n.attrs.get("transpose") else ps[0]
        b = ps[1] if n.attrs.get("bias_term", True) else None
        y = F.linear(x.reshape(math.prod(lead), -1), w, b)
        return [y.reshape(*lead, y.shape[-1])]

    @op("LRN")
    def lrn(m, n, xs, ps):
        a, x = n.attrs, xs[0]
        size, alpha, beta = int(a["local_size"]), float(a["alpha"]), float(a["beta"])
        if a.get("norm_region", "ACROSS_CHANNELS") == "ACROSS_CHANNELS":
            # PyTorch's LRN: x / (k + alpha / size * sum over the window)^beta: Caffe's
            return [F.local_response_norm(x, size, alpha, beta, float(a["k"]))]
        pre = (size - 1) // 2
        avg = F.avg_pool2d(x * x, size, 1, pre, count_include_pad=True)
        return [x * (1.0 + alpha * avg).pow(-beta)]

    @op("BatchNorm")
    def batch_norm(m, n, xs, ps):
        if not n.attrs.get("use_global_stats", True):
            raise GraphcError(f"layer '{n.name}': BatchNorm with batch statistics is not "
                              "supported in the PyTorch build",
                              hint="use_global_stats: true (the TEST phase)")
        mean, var = m.bn_stats(n.name, ps)
        return [F.batch_norm(xs[0], mean, var, None, None, False, 0.0,
                             float(n.attrs.get("eps", 1e-5)))]

    def broadcast(n, x, f):
        """Caffe's Scale/Bias broadcast: f covers axes axis .. axis + f.dim()."""
        if f.dim() == 0:
            return f
        axis = canonical_axis(int(n.attrs.get("axis", 1)), x.dim())
        return f.reshape(*f.shape, *([1] * (x.dim() - axis - f.dim())))

    @op("Scale")
    def scale(m, n, xs, ps):
        x = xs[0]
        f, rest = (xs[1], ps) if len(xs) == 2 else (ps[0], ps[1:])
        y = x * broadcast(n, x, f)
        if n.attrs.get("bias_term"):
            y = y + broadcast(n, x, rest[0])
        return [y]

    @op("Bias")
    def bias(m, n, xs, ps):
        f = xs[1] if len(xs) == 2 else ps[0]
        return [xs[0] + broadcast(n, xs[0], f)]

    @op("Eltwise")
    def eltwise(m, n, xs, ps):
        o = n.attrs["operation"]
        if o == "SUM":
            coeff = n.attrs.get("coeff") or [1.0] * len(xs)
            y = xs[0] if coeff[0] == 1 else xs[0] * coeff[0]
            for c, x in zip(coeff[1:], xs[1:]):
                y = y + (x if c == 1 else x * c)
            return [y]
        y = xs[0]
        for x in xs[1:]:
            y = y * x if o == "PROD" else torch.maximum(y, x)
        return [y]

    @op("ReLU")
    def relu(m, n, xs, ps):
        slope = float(n.attrs.get("negative_slope", 0.0))
        return [F.relu(xs[0]) if slope == 0 else F.leaky_relu(xs[0], slope)]

    @op("PReLU")
    def prelu(m, n, xs, ps):
        return [F.prelu(xs[0], ps[0].reshape(-1))]

    @op("ELU")
    def elu(m, n, xs, ps):
        return [F.elu(xs[0], float(n.attrs["alpha"]))]

    simple = {"Sigmoid": torch.sigmoid, "TanH": torch.tanh, "AbsVal": torch.abs,
              "BNLL": F.softplus}
    for name, fn in simple.items():
        ops[name] = (lambda f: lambda m, n, xs, ps: [f(xs[0])])(fn)

    @op("Power")
    def power(m, n, xs, ps):
        pw, sc, sh = (float(n.attrs[k]) for k in ("power", "scale", "shift"))
        if pw * sc == 0:
            return [torch.full_like(xs[0], 1.0 if pw == 0 else sh ** pw)]
        y = xs[0] * sc if sc != 1 else xs[0]
        y = y + sh if sh != 0 else y
        return [y.pow(pw) if pw != 1 else y]

    @op("Exp")
    def exp(m, n, xs, ps):
        inner, outer = get_op("Exp")._scales(n.attrs, np.dtype(np.float32))
        y = torch.exp(xs[0] * float(inner) if inner != 1 else xs[0])
        return [y * float(outer) if outer != 1 else y]

    @op("Log")
    def log(m, n, xs, ps):
        sc, sh = float(n.attrs["scale"]), float(n.attrs["shift"])
        base_scale = float(get_op("Log")._base_scale(n.attrs, np.dtype(np.float32)))
        y = xs[0] * sc if sc != 1 else xs[0]
        y = torch.log(y + sh if sh != 0 else y)
        return [y * base_scale if base_scale != 1 else y]

    @op("Threshold")
    def threshold(m, n, xs, ps):
        return [(xs[0] > float(n.attrs["threshold"])).to(xs[0].dtype)]

    @op("Dropout")
    def dropout(m, n, xs, ps):
        if n.attrs.get("train"):
            return [F.dropout(xs[0], float(n.attrs["dropout_ratio"]), training=True)]
        return [xs[0]]

    @op("Split")
    def split(m, n, xs, ps):
        return [xs[0]] * int(n.attrs["num_top"])

    @op("Softmax")
    def softmax(m, n, xs, ps):
        return [torch.softmax(xs[0], canonical_axis(int(n.attrs.get("axis", 1)), xs[0].dim()))]

    @op("Concat")
    def concat(m, n, xs, ps):
        return [torch.cat(xs, canonical_axis(int(n.attrs.get("axis", 1)), xs[0].dim()))]

    @op("Flatten", "Reshape")
    def reshape(m, n, xs, ps):
        return [xs[0].reshape(m.graph.types[n.outputs[0]].shape)]

    @op("Crop")
    def crop(m, n, xs, ps):
        off, shape = get_op("Crop").plan(n.attrs, tuple(xs[0].shape), tuple(xs[1].shape))
        return [xs[0][tuple(slice(o, o + s) for o, s in zip(off, shape))]]

    @op("Slice")
    def slice_(m, n, xs, ps):
        axis = canonical_axis(int(n.attrs.get("axis", 1)), xs[0].dim())
        sizes = [m.graph.types[o].shape[axis] for o in n.outputs]
        return list(torch.split(xs[0], sizes, dim=axis))

    @op("Tile")
    def tile(m, n, xs, ps):
        reps = [1] * xs[0].dim()
        reps[canonical_axis(int(n.attrs.get("axis", 1)), xs[0].dim())] = int(n.attrs["tiles"])
        return [xs[0].repeat(*reps)]

    @op("Silence")
    def silence(m, n, xs, ps):
        return []

    @op("SoftmaxWithLoss")
    def softmax_loss(m, n, xs, ps):
        a = n.attrs
        x, label = xs
        axis = canonical_axis(int(a.get("axis", 1)), x.dim())
        c = x.shape[axis]
        logits = x.movedim(axis, -1).reshape(-1, c)
        lab = label.reshape(-1).to(torch.int64)
        ignore = a.get("ignore_label")
        total = F.cross_entropy(logits, lab, reduction="sum",
                                ignore_index=-100 if ignore is None else int(ignore))
        count = logits.shape[0]
        valid = count if ignore is None else int((lab != int(ignore)).sum())
        outer = math.prod(x.shape[:axis])
        norm = {"FULL": count, "VALID": valid, "BATCH_SIZE": outer,
                "NONE": 1}[a.get("normalization", "VALID")]
        return [total / max(norm, 1)]

    return ops


class _Node:
    """A node, or a step of a Fused node, as the op functions see it."""

    def __init__(self, op, name, attrs, outputs):
        self.op, self.name, self.attrs, self.outputs = op, name, attrs, outputs


def TorchNet(graph: Graph, *, train: bool = False):
    """An ``nn.Module`` running ``graph`` (its params are copied into ``nn.Parameter``s,
    trainable when ``train``).  ``module(**inputs)`` returns {output blob: tensor}, plus
    ``"loss"`` (the weighted sum of the graph's loss terms) when the graph has losses;
    ``keep=[value, ...]`` adds those IR values."""
    torch = require_torch()
    ops = _ops(torch)

    class _TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.graph = graph
            self.pindex = {name: i for i, name in enumerate(graph.params)}
            self.weights = torch.nn.ParameterList([
                torch.nn.Parameter(torch.from_numpy(np.array(p.data, np.float32, copy=True)),
                                   requires_grad=train and p.lr_mult != 0)
                for p in graph.params.values()])
            self._consts = {}
            for n in graph.nodes:
                for step in self._steps(n):
                    if step[0].op not in ops:
                        raise GraphcError(f"layer '{n.name}' ({step[0].op}) has no PyTorch "
                                          "form here", hint="use a deploy net or a net of "
                                                            "supported layers")

        def const(self, layer, what, array):
            key = (layer, what)
            if key not in self._consts:
                self._consts[key] = torch.from_numpy(np.asarray(array, np.float32))
            return self._consts[key]

        def bn_stats(self, layer, ps):
            """Caffe: mean and variance divided by the scale factor (0 if it is 0)."""
            key = (layer, "bn")
            if key not in self._consts:
                s = float(ps[2].detach().reshape(-1)[0])
                f = 0.0 if s == 0 else 1.0 / s
                self._consts[key] = (ps[0].detach() * f, ps[1].detach() * f)
            return self._consts[key]

        def _steps(self, n):
            """[(node-like, input refs, param names)]: one step, or a Fused body."""
            if n.op != "Fused":
                return [(n, list(n.inputs), list(n.params))]
            body = n.attrs["body"]
            steps = []
            for i, st in enumerate(body):
                outs = list(n.outputs) if i == len(body) - 1 else [f"{n.name}#{i}"]
                refs = [f"{n.name}#{i - 1}" if r == "prev" else n.inputs[r]
                        for r in st.get("inputs", [])]
                steps.append((_Node(st["op"], st.get("name") or n.name, st.get("attrs", {}),
                                    outs), refs, [n.params[j] for j in st.get("params", [])]))
            return steps

        def forward(self, keep=(), **inputs):
            g = self.graph
            env = {}
            for v in g.inputs:
                blob = g.blob_of.get(v, v)
                if blob not in inputs:
                    raise GraphcError(f"no value given for input '{blob}'")
                env[v] = inputs[blob]
            for n in g.nodes:
                for node, refs, pnames in self._steps(n):
                    ps = [self.weights[self.pindex[p]] for p in pnames]
                    outs = ops[node.op](self, node, [env[r] for r in refs], ps)
                    env.update(zip(node.outputs, outs))
            result = {g.blob_of.get(v, v): env[v] for v in g.outputs}
            if g.losses:
                result["loss"] = sum(w * env[v] for v, w in g.losses)
            for v in keep:
                result[v] = env[v]
            return result

    return _TorchNet()


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def logits_value(graph: Graph) -> str | None:
    """The input of a final Softmax (a softmax saturated by random weights compares
    poorly, its input does not)."""
    prod = graph.producers()
    for o in graph.outputs:
        n = prod.get(o)
        if n is not None and n.op == "Softmax":
            return n.inputs[0]
    return None


def check_against_reference(module, net, x: np.ndarray, tol: float = 1e-4) -> float:
    """Run ``module`` and graphc's reference on ``x`` (a graphc.Net's first input) and
    return the worst relative L2 error over the outputs and the logits; raise if > tol."""
    torch = require_torch()
    g = net.graph
    blob = g.blob_of[g.inputs[0]]
    logits = logits_value(g)
    from graphc.reference import ReferenceExecutor
    from graphc.ops.base import Context
    keep = set(g.outputs) | ({logits} if logits else set())
    ref = ReferenceExecutor(g, Context("test")).run({g.inputs[0]: x}, keep=keep)
    with torch.inference_mode():
        got = module(keep=[logits] if logits else [], **{blob: torch.from_numpy(x)})
    worst = 0.0
    for v in keep:
        key = g.blob_of.get(v, v) if v in g.outputs else v
        worst = max(worst, rel_l2(got[key].numpy(), ref[v]))
    if worst > tol:
        raise SystemExit(f"the PyTorch build of {g.name} differs from graphc's reference: "
                         f"relative L2 {worst:.3g} > {tol}")
    return worst
