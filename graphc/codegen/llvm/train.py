"""Compiled training passes on the CPU: the train graph (forward in train mode, the
derived backward graph, the losses) lowered to one LLVM module and run in process.

    tg = run_pipeline(g, TRAIN_PIPELINE + ["pool-argmax", "inplace"])   # train_graph()
    program = lower_train(tg, params)      # LLVM IR + steps, planned arena
    net = CompiledTrainNet(tg, params)     # JIT + thread pool; numpy views:
    net.inputs["data"][...] = x; net.run(); net.losses, net.grads["conv1.0"]

Memory: every value of the train graph (forward activations kept for backward, their
gradients, the ops' saved state such as MAX pooling's argmax, and the param gradients,
pinned) at the offsets of the memory plan (passes/memory.py) in one arena; kernels'
temporaries above it.  The parameters live in a separate buffer (``ParamBuffer``), the
``weights`` argument of every step: the net's param arrays are numpy views of it, so the
solver's update (graphc/train, Caffe's rules) writes straight into what the next pass
reads, and the param gradients are views of the arena.  Data layers stay in Python: the
graph inputs are views of the arena the caller fills.

Nodes: forward nodes use the inference kernels (kernels/) where those read the params
through ``param_src`` (Pooling, ReLU and the other pointwise ops); Convolution and
InnerProduct (whose inference kernels pack or transpose the weights at compile time),
MAX pooling that keeps its argmax, Dropout in training, SoftmaxWithLoss and Accuracy have
training versions (kernels/grad_conv.py, grad_linear.py, grad_pool.py, grad_pointwise.py,
loss.py).  Grad nodes dispatch on the forward op: grad_conv, grad_linear, grad_pool,
grad_lrn, loss, grad_pointwise; Sum and Fill are elementwise.  Data layers and Dropout's random
masks run in Python before each pass (the masks drawn from the net's generator as the
reference op draws them).
A node without a kernel is a GraphcError naming the layer, with the hint to train with
``--backend reference``.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field

import numpy as np

from ...errors import GraphcError
from ...ir.graph import Graph, Node
from ...passes.alias import VIEW_OPS
from ...passes.memory import plan_memory
from . import jit
from .lower import ALIGN, KernelContext, Program, Step, _align, unsupported

#: the passes a lowered net goes through before it is compiled for training
TRAIN_PASSES = ["pool-argmax", "inplace"]


def train_graph(g: Graph) -> Graph:
    from ...passes import TRAIN_PIPELINE, run_pipeline
    return run_pipeline(g, [*TRAIN_PIPELINE, *TRAIN_PASSES])


# ---------------------------------------------------------------------------------------
# the parameter buffer


class ParamBuffer:
    """Every param of a graph at a 64-byte aligned offset of one float32 buffer (in the
    order of ``g.params``); ``views[name]`` is the param's array in it."""

    def __init__(self, params):
        self.offsets: dict[str, int] = {}
        size = 0
        for name, p in params.items():
            self.offsets[name] = size
            size = _align(size + 4 * math.prod(p.type.shape))
        self.nbytes = max(size, ALIGN)
        self._raw = np.zeros(self.nbytes + ALIGN, np.uint8)
        start = (-self._raw.ctypes.data) % ALIGN
        self.buffer = self._raw[start:start + self.nbytes]
        self.views = {name: self.buffer[off:off + 4 * math.prod(p.type.shape)]
                      .view(np.float32).reshape(p.type.shape)
                      for (name, p), off in zip(params.items(), self.offsets.values())}

    @property
    def address(self) -> int:
        return self.buffer.ctypes.data

    def adopt(self, params) -> None:
        """Copy each param's values into the buffer and make its data the view."""
        for name, p in params.items():
            view = self.views[name]
            if p.data is not view:
                if p.data is not None:
                    view[...] = np.asarray(p.data, np.float32).reshape(view.shape)
                p.data = view

    def sync(self, params) -> None:
        """Copy in the values of params whose array is not the view (replaced since)."""
        for name, p in params.items():
            view = self.views[name]
            if p.data is not view and p.data is not None:
                view[...] = np.asarray(p.data, np.float32).reshape(view.shape)


# ---------------------------------------------------------------------------------------
# lowering


@dataclass
class GradParts:
    """A Grad node's inputs and outputs by their place in the forward node."""
    fwd_attrs: dict
    inputs: dict            # forward input index -> value read
    outputs: dict           # forward output index -> value read
    grads: dict             # forward output index -> its gradient
    input_grads: dict       # forward input index -> its gradient (an output of the node)
    param_grads: dict       # param index -> its gradient (an output of the node)
    input_shapes: list = field(default_factory=list)


def grad_parts(g: Graph, n: Node) -> GradParts:
    a = n.attrs
    n_in = len(a["need_inputs"])
    ins = list(a["inputs"]) if "inputs" in a else list(range(n_in))
    outs, grads = list(a.get("outputs", [])), list(a["grads"])
    vals = list(n.inputs)
    inputs = dict(zip(ins, vals[:len(ins)]))
    outputs = dict(zip(outs, vals[len(ins):len(ins) + len(outs)]))
    gr = dict(zip(grads, vals[len(ins) + len(outs):]))
    it = iter(n.outputs)
    input_grads = {i: next(it) for i, need in enumerate(a["need_inputs"]) if need}
    param_grads = {j: next(it) for j, need in enumerate(a["need_params"]) if need}
    shapes = [tuple(s) for s in a["input_shapes"]] if "input_shapes" in a else \
        [g.types[inputs[i]].shape for i in range(n_in)]
    return GradParts(a["attrs"], inputs, outputs, gr, input_grads, param_grads, shapes)


_HINT = "train with --backend reference (graphc.Net(..., backend='reference'))"


def is_host_node(n: Node) -> bool:
    """A node that makes data by itself (a data layer, DummyData): it runs in Python
    before each pass, writing its outputs into the arena."""
    return not n.inputs and n.op != "Fill"


def _why_not(g: Graph, n: Node):
    """None when lower_train can compile node n, else (why, hint)."""
    from .kernels import grad_conv, grad_pointwise, grad_pool, loss, supported
    if n.op in VIEW_OPS or n.op in ("Sum", "Fill") or is_host_node(n):
        return None
    if n.op == "Python":
        return ("a Python layer runs Python code inside the pass", "replace it by built-in "
                "layers")
    if n.op == "Grad":
        op = n.attrs["op"]
        p = grad_parts(g, n)
        if op == "Convolution":
            from ...ops.conv import Geometry
            return grad_conv.supported(Geometry(p.fwd_attrs, p.input_shapes[0],
                                                transposed=False))
        if op == "InnerProduct":
            return None
        if op == "Pooling":
            return grad_pool.supported(p.fwd_attrs, p.input_shapes[0])
        if op == "SoftmaxWithLoss":
            return loss.supported(p.fwd_attrs, p.input_shapes[0])
        if op == "Split":
            return None
        if op == "LRN":
            from .kernels import grad_lrn
            return grad_lrn.supported(p.fwd_attrs, p.input_shapes[0])
        return grad_pointwise.supported(op, p.fwd_attrs)
    if n.op in ("InnerProduct", "Convolution"):
        return None if len(n.inputs) == 1 else (f"a {n.op} with several bottoms",
                                                "use one bottom")
    if n.op == "SoftmaxWithLoss":
        return loss.supported(n.attrs, g.types[n.inputs[0]].shape)
    if n.op == "Dropout":
        return None
    if n.op == "Accuracy":
        return loss.supported_accuracy(n.attrs)
    if n.op == "Pooling" and n.attrs.get("keep_argmax"):
        return grad_pool.supported(n.attrs, g.types[n.inputs[0]].shape)
    return supported(g, n)


def check_supported(tg: Graph) -> None:
    """Raise GraphcError for the first node of the train graph ``tg`` the CPU backend
    cannot compile."""
    for n in tg.nodes:
        why = _why_not(tg, n)
        if why:
            hint = why[1] if "reference" in why[1] else f"{why[1]}; or {_HINT}"
            if n.op == "Grad":     # name the user's layer, not the derived node
                raise GraphcError(f"the CPU backend cannot train this layer: {why[0]}",
                                  where=n.loc, layer=n.attrs["node"],
                                  layer_type=n.attrs["op"], hint=hint)
            raise unsupported(n, why[0], hint)


def _lower_node(k: KernelContext, tg: Graph, n: Node) -> None:
    from .kernels import grad_conv, grad_linear, grad_pointwise, grad_pool, loss, lower_node
    if n.op in VIEW_OPS and all(k.loc(o) == k.loc(n.inputs[0]) for o in n.outputs):
        return
    if n.op == "Concat" and n.attrs.get("by_slices"):
        return
    if n.op == "Grad":
        op = n.attrs["op"]
        p = grad_parts(tg, n)
        if op == "Convolution":
            grad_conv.lower_grad(k, n, p)
        elif op == "InnerProduct":
            grad_linear.lower_grad(k, n, p)
        elif op == "Pooling":
            grad_pool.lower_grad(k, n, p)
        elif op == "SoftmaxWithLoss":
            loss.lower_grad(k, n, p)
        elif op == "Split":
            _lower_split_grad(k, n, p)
        elif op == "LRN":
            from .kernels import grad_lrn
            grad_lrn.lower_grad(k, n, p)
        else:
            grad_pointwise.lower_grad(k, n, p)
    elif n.op == "Sum":
        grad_pointwise.lower_sum(k, n)
    elif n.op == "Fill":
        grad_pointwise.lower_fill(k, n)
    elif n.op == "InnerProduct":
        grad_linear.lower_forward(k, n)
    elif n.op == "Convolution":
        grad_conv.lower_forward(k, n)
    elif n.op == "SoftmaxWithLoss":
        loss.lower_forward(k, n)
    elif n.op == "Accuracy":
        loss.lower_accuracy(k, n)
    elif n.op == "Pooling" and n.attrs.get("keep_argmax"):
        grad_pool.lower_forward_argmax(k, n)
    elif n.op == "Dropout":
        mask = None
        if n.attrs.get("train"):
            mask = grad_pool.state_offset(k, n.name)
            k.masks.append((n, mask))
        grad_pointwise.lower_dropout(k, n, mask)
    else:
        lower_node(k, n)


def _lower_split_grad(k, n, p) -> None:
    """Split's gradient: the sum of its tops' gradients (in order)."""
    from .kernels import grad_pointwise
    fake = Node(op="Sum", inputs=[p.grads[i] for i in sorted(p.grads)],
                outputs=[p.input_grads[0]], name=n.name)
    grad_pointwise.lower_sum(k, fake)


@dataclass
class TrainProgram:
    program: Program
    backward_step: int          # index of the first step of the backward graph
    param_offsets: dict
    host_nodes: list            # nodes run in Python before the pass (data layers)
    masks: list                 # (Dropout node, arena offset of its mask) in node order


def lower_train(tg: Graph, params: ParamBuffer, target: jit.Target | str = "native"
                ) -> TrainProgram:
    """Lower the train graph ``tg`` (after ``train_graph``); params read from ``params``'
    layout."""
    from ...cost import node_cost
    from .lower import NodeInfo, TensorInfo
    target = target if isinstance(target, jit.Target) else jit.target(target)
    check_supported(tg)
    plan = plan_memory(tg, pinned=tg.param_grads.values())
    k = KernelContext(tg, plan, target)
    k.masks = []
    # the params first, in the buffer's layout: param_src(name) is then its offset there
    for name, p in tg.params.items():
        off = k.weights.add(("param", name), np.zeros(p.type.shape, np.float32))
        if off != params.offsets[name]:
            raise AssertionError(f"param layout differs for {name}")
    nodes, backward, host = [], None, []
    for n in tg.nodes:
        if is_host_node(n):
            if k.steps:
                raise unsupported(n, "a data layer after layers that compute",
                                  "put the data layers first, or " + _HINT)
            host.append(n)
            continue
        k.node_index, k.node = len(nodes), n
        if backward is None and n.op in ("Grad", "Fill", "Sum"):
            backward = len(k.steps)
        nodes.append(NodeInfo(n.name, n.op if n.op != "Grad" else f"Grad({n.attrs['op']})",
                              int(node_cost(tg, n).flops)))
        _lower_node(k, tg, n)
    extra = [key for key in k.weights._offsets if key[0] != "param"]
    if extra:
        raise GraphcError(f"a kernel of this net precomputes data from its weights "
                          f"({extra[0][0]}), which training changes every iteration",
                          hint=_HINT)
    inputs = [TensorInfo(tg.blob_of.get(v, v), v, tg.types[v].shape, k.loc(v))
              for v in tg.inputs]
    outputs = [TensorInfo(tg.blob_of.get(v, v), v, tg.types[v].shape, k.loc(v))
               for v in tg.outputs]
    prog = Program(tg.name, str(k.mod), k.steps, nodes, inputs, outputs,
                   _align(k.temp_base + k.temp_bytes), k.scratch_bytes, k.weights, plan)
    return TrainProgram(prog, len(k.steps) if backward is None else backward,
                        dict(params.offsets), host, k.masks)


# ---------------------------------------------------------------------------------------
# running


def _aligned(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw, raw[start:start + nbytes]


class _Code:
    """A shared library of compiled steps; ``address(name)`` of a step function."""

    def __init__(self, path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))

    def address(self, name: str) -> int:
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value


def load_code(module_ir: str, cpu: str = "native") -> _Code:
    """The module compiled (-O3) into a shared library in the graphc cache, keyed by the
    IR and the target (an unchanged net compiles once per machine)."""
    import hashlib
    import os
    import subprocess
    import tempfile
    from pathlib import Path
    from ...runtime.build import cache_dir, find_cc
    t = jit.target(cpu)
    h = hashlib.blake2b(digest_size=20)
    for part in (module_ir, t.cpu_name, t.features):
        h.update(part.encode())
        h.update(b"\0")
    root = cache_dir()
    path = root / f"train-{h.hexdigest()}.so"
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        obj = jit.emit_object(module_ir, t)
        with tempfile.TemporaryDirectory(prefix="graphc-train-") as d:
            (Path(d) / "steps.o").write_bytes(obj)
            tmp = root / f".{path.name}.{os.getpid()}.tmp"
            cmd = [*find_cc(), "-shared", "-o", str(tmp), str(Path(d) / "steps.o"), "-lm",
                   "-Wl,-z,noexecstack"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise GraphcError(f"the C compiler failed to link the training steps:\n"
                                  f"{r.stderr.strip()}",
                                  hint="set CC to a working C compiler, or " + _HINT)
            os.replace(tmp, path)
    return _Code(path)


class CompiledTrainNet:
    """A train graph compiled for the CPU, run in this process.

    ``inputs``: blob -> array view of the arena to fill before ``run``; ``losses``: [(view,
    weight)]; ``grads``: param name -> its gradient (view; fresh each pass);
    ``params``: the ParamBuffer (the solver updates its views in place)."""

    def __init__(self, tg: Graph, params: ParamBuffer | None = None, *,
                 cpu: str = "native", num_threads: int | None = None, poison: bool = False,
                 source_params=None):
        from .train_runner import StepRunner
        self.graph = tg
        self.source_params = tg.params if source_params is None else source_params
        self.params = params or ParamBuffer(tg.params)
        if params is None:
            self.params.adopt(tg.params)
        self.train = lower_train(tg, self.params, cpu)
        prog = self.train.program
        self.program = prog
        self._code = load_code(prog.ir, cpu)
        self.runner = StepRunner(num_threads)
        nt = self.runner.num_threads
        self._raw_arena, self.arena = _aligned(max(prog.arena_bytes, ALIGN))
        self.scratch_stride = _align(max(prog.scratch_bytes, ALIGN))
        self._raw_scratch, self.scratch = _aligned(self.scratch_stride * nt)
        self._fns = (ctypes.c_void_p * len(prog.steps))(
            *(self._code.address(s.fn) for s in prog.steps))
        self._parts = (ctypes.c_int64 * len(prog.steps))(
            *(self._nparts(s, nt) for s in prog.steps))
        self.poison = poison
        import threading
        self._lock = threading.Lock()      # one pass at a time (one arena)

        def view(v: str) -> np.ndarray:
            t = tg.types[v]
            off = prog.plan.offsets[v]
            return self.arena[off:off + t.nbytes].view(t.np_dtype).reshape(t.shape)

        self.inputs = {tg.blob_of.get(v, v): view(v) for v in tg.inputs}
        self.losses = [(view(v), w) for v, w in tg.losses]
        self.grads = {name: view(v) for name, v in tg.param_grads.items()}
        self.outputs = {tg.blob_of.get(v, v): view(v) for v in tg.outputs
                        if v not in tg.param_grads.values()}
        self._view = view

    @staticmethod
    def _nparts(s: Step, nthreads: int) -> int:
        return max(1, min(s.max_parts, nthreads * s.per_thread))

    def value(self, v: str) -> np.ndarray:
        """The arena view of value ``v`` (meaningful only while its buffer is live)."""
        return self._view(v)

    def run(self, forward_only: bool = False, ctx=None) -> float:
        with self._lock:
            return self._run(forward_only, ctx)

    def _run(self, forward_only: bool, ctx) -> float:
        """One pass (the forward steps only with ``forward_only``); returns the total
        weighted loss, summed in float32 as Caffe's Net::Forward.  ``ctx``: the ops'
        Context for the data layers run in Python (default: a fresh one)."""
        self.params.sync(self.source_params)
        if self.poison:
            saved = {k: v.copy() for k, v in self.inputs.items()}
            self.arena.view(np.float32)[...] = np.nan
            self.scratch.view(np.float32)[...] = np.nan
            for k, v in saved.items():
                self.inputs[k][...] = v
        self._run_host_nodes(ctx)
        n = self.train.backward_step if forward_only else len(self.program.steps)
        self.runner.run(self._fns, self._parts, n, self.arena.ctypes.data,
                        self.params.address, self.scratch.ctypes.data, self.scratch_stride)
        loss = np.float32(0)
        for a, w in self.losses:
            loss += np.float32(w) * a.sum(dtype=np.float32)
        return float(loss)

    def profile(self, repeats: int = 5, inner: int = 10) -> list[tuple[str, str, int, float]]:
        """Per node of the pass: (name, op, flops, seconds).  After a whole pass, each step
        runs ``inner`` times back to back in one call to the pool (so waking the threads
        is not counted), ``repeats`` such calls; its time is the best call / ``inner``
        (the arena holds that pass's values, and a step run again does the same work).
        Nodes in execution order."""
        import time
        self.run()
        prog = self.program
        times = [0.0] * len(prog.nodes)
        for i, s in enumerate(prog.steps):
            fns = (ctypes.c_void_p * inner)(*([self._fns[i]] * inner))
            parts = (ctypes.c_int64 * inner)(*([self._parts[i]] * inner))
            best = float("inf")
            for _ in range(repeats):
                with self._lock:
                    t0 = time.perf_counter()
                    self.runner.run(fns, parts, inner, self.arena.ctypes.data,
                                    self.params.address, self.scratch.ctypes.data,
                                    self.scratch_stride)
                    best = min(best, (time.perf_counter() - t0) / inner)
            times[s.node] += best
        return [(n.name, n.op, n.flops, t) for n, t in zip(prog.nodes, times)]

    def _run_host_nodes(self, ctx) -> None:
        """The data layers, then the Dropout masks: drawn from ``ctx.rng`` in node order,
        as the reference ops draw them."""
        from ...errors import OpError
        from ...ops import get_op
        from ...ops.base import Context
        self.host_values = {}
        if not self.train.host_nodes and not self.train.masks:
            return
        if ctx is None:
            ctx = self._ctx = getattr(self, "_ctx", None) or Context(phase="train")
        g = self.graph
        for n in self.train.host_nodes:
            ctx.node = n
            try:
                outs = get_op(n.op).forward(n.attrs, [], [g.params[p].data for p in n.params],
                                            ctx)
            except OpError as e:
                raise e.located(where=n.loc, layer=n.name, layer_type=n.op)
            finally:
                ctx.node = None
            for v, a in zip(n.outputs, outs):
                self._view(v)[...] = a
                self.host_values[v] = a
        for n, off in self.train.masks:
            shape = self.graph.types[n.inputs[0]].shape
            keep = ctx.rng.random(shape) < 1.0 - n.attrs["dropout_ratio"]
            nbytes = 4 * math.prod(shape)
            self.arena[off:off + nbytes].view(np.float32).reshape(shape)[...] = keep

    def close(self) -> None:
        self.runner.close()
