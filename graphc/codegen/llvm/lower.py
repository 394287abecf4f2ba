"""Lowering the optimized IR to one LLVM module plus a schedule for the C runtime.

Input: a graph after the inference pipeline (dead-code, fold-batchnorm, fuse,
concat-slices, inplace) whose params hold data, and its memory plan.  Output
(``Program``): the module's IR text; the steps in execution order, each a generated
function ``void f(i8 *arena, const i8 *weights, i8 *scratch, i64 part, i64 nparts)``
tagged with its node and how many parts its work is worth; the packed weights; the
arena layout (the plan's offsets, plus one temporary region for nodes that need it, then
a persistent region for what input packers write); the per-thread scratch size; and
per input, the packer that set-input runs, if its only reader takes it packed (a
convolution's zero-padded phase planes, kernels/conv.py).

Views (Reshape, Flatten, Split) and Concats marked ``by_slices`` need no code: the
memory plan already placed their outputs.  Each other node is lowered by the kernel
module of its op family (``kernels/``); a node of an op the backend cannot compile is a
GraphcError naming the layer.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir

from ...errors import GraphcError
from ...ir.graph import Graph, Node
from ...passes.alias import VIEW_OPS
from ...passes.memory import MemoryPlan, plan_memory
from . import jit
from .gemm import Epilogue, GemmGenerator, default_config
from .irutil import byte_ptr

ALIGN = 64
#: work units (about flops) per part: a step is split into at most work / GRAIN parts
GRAIN = 1 << 15


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class WeightsBlob:
    """Every parameter array (and every array derived from one at compile time, such as
    a transposed inner-product weight) at a 64-byte aligned offset of one blob."""

    def __init__(self):
        self._offsets: dict = {}
        self._arrays: list[tuple[int, np.ndarray]] = []
        self._digest: str | None = None
        self.size = 0

    def add(self, key, array: np.ndarray) -> int:
        if key in self._offsets:
            return self._offsets[key]
        a = np.ascontiguousarray(array, dtype=np.float32)
        self._digest = None
        off = self.size
        self._arrays.append((off, a))
        self._offsets[key] = off
        self.size = _align(off + a.nbytes)
        return off

    def write(self, f) -> None:
        """Write the blob (``size`` bytes) to a binary file object."""
        at = 0
        for off, a in self._arrays:
            f.write(b"\0" * (off - at))
            f.write(memoryview(a).cast("B"))
            at = off + a.nbytes
        f.write(b"\0" * (self.size - at))

    def digest(self) -> str:
        """A 32-hex-digit fingerprint of the layout and the values."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            for off, a in self._arrays:
                h.update(off.to_bytes(8, "little"))
                h.update(memoryview(a).cast("B"))
            self._digest = h.hexdigest()
        return self._digest


@dataclass
class Step:
    fn: str          # the generated function
    node: int        # index into Program.nodes
    max_parts: int   # split the work into at most this many parts
    per_thread: int = 4   # and into at most this many parts per thread (finer parts balance
                          # better when a thread is slowed; a GEMM's parts repack operands)


@dataclass
class NodeInfo:
    name: str
    op: str
    flops: int


@dataclass
class TensorInfo:
    name: str        # the Caffe blob name
    value: str       # the IR value
    shape: tuple[int, ...]
    offset: int      # in the arena
    packer: str | None = None   # an input's packer (see KernelContext.input_packers)
    pack_parts: int = 0         # and the parts its work splits into

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Program:
    name: str
    ir: str
    steps: list[Step]
    nodes: list[NodeInfo]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    arena_bytes: int
    scratch_bytes: int
    weights: WeightsBlob
    plan: MemoryPlan = field(repr=False, default=None)
    #: the arena's last bytes: what input packers wrote (kept from one run to the next)
    persistent_bytes: int = 0


class KernelContext:
    """What a kernel generator needs: the module, where values and params live, and the
    bookkeeping of steps, scratch and temporaries."""

    def __init__(self, g: Graph, plan: MemoryPlan, target: jit.Target):
        self.g, self.plan, self.target = g, plan, target
        self.mod = ir.Module(name=_ident(g.name))
        self.gemm_config = default_config(target)
        self.weights = WeightsBlob()
        self.steps: list[Step] = []
        self.scratch_bytes = 0
        self.temp_base = _align(plan.arena_bytes)
        self.temp_bytes = 0
        self._temps: dict[tuple[int, str], int] = {}
        self._temp_used: dict[int, int] = {}
        self.node_index = -1
        self.node: Node | None = None
        self._gemms: dict[str, str] = {}
        self._helpers: dict[str, ir.Function] = {}
        self._nstep = 0
        #: where a graph input's only reader packs it at set-input time instead of in a
        #: step of each run (lower_graph: {input value: (packer function, parts)}; None:
        #: not allowed, as in training, whose runner copies its inputs itself).  A packer
        #: is a step function that graphc_set_input runs on the thread pool with the
        #: caller's data as its third argument; it writes into the persistent region.
        self.input_packers: dict[str, tuple[str, int]] | None = None
        self.persistent_bytes = 0
        self._persistent_base: ir.GlobalVariable | None = None

    # ---- where things are -----------------------------------------------------------
    def loc(self, value: str) -> int:
        return self.plan.offsets[value]

    def shape(self, value: str) -> tuple[int, ...]:
        return self.g.types[value].shape

    def ptr(self, b: ir.IRBuilder, args: dict, src) -> ir.Value:
        return byte_ptr(b, args[src.base], src.offset)

    def persistent(self, nbytes: int) -> int:
        """Offset (in the persistent region, past the activations and temporaries) of a
        new buffer that keeps its contents from one run to the next."""
        off = self.persistent_bytes
        self.persistent_bytes += _align(nbytes)
        return off

    def persistent_ptr(self, b: ir.IRBuilder, args: dict, off: int) -> ir.Value:
        """Pointer to offset ``off`` of the persistent region (its base in the arena is
        known once every node is lowered: a constant global that lower_graph sets)."""
        if self._persistent_base is None:
            gv = ir.GlobalVariable(self.mod, ir.IntType(64), "gk_persistent_base")
            gv.linkage, gv.global_constant = "internal", True
            self._persistent_base = gv
        base = b.load(self._persistent_base, typ=ir.IntType(64))
        return byte_ptr(b, args["arena"], b.add(base, ir.Constant(ir.IntType(64), off)))

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
        return self.g.params[pname].type.shape

    def param_src(self, pname: str):
        from .kernels.pointwise import Src
        return Src("weights", self.weights.add(("param", pname), self.param_data(pname)))

    def packed_weights(self, pname: str, groups: int = 1):
        """Param ``pname`` as the A operand of a ``gemm(..., packed_a=True)``: its rows
        (the first axis) split into ``groups`` equal groups, each (rows x K) packed into
        panels (gemm.pack_a_panels) at compile time; returns (Src, floats per group)."""
        from .gemm import pack_a_panels
        w = self.param_data(pname)
        w = w.reshape(groups, w.shape[0] // groups, -1)
        packed = [pack_a_panels(wg, self.gemm_config) for wg in w]
        key = ("packed-a", pname, groups, self.gemm_config)
        return self.weights_src(np.concatenate(packed), key), packed[0].size

    def weights_src(self, array: np.ndarray, key):
        from .kernels.pointwise import Src
        return Src("weights", self.weights.add(key, array))

    # ---- resources --------------------------------------------------------------------
    def need_scratch(self, nbytes: int) -> None:
        """The current step needs ``nbytes`` of per-thread scratch."""
        self.scratch_bytes = max(self.scratch_bytes, _align(nbytes))

    def temp(self, nbytes: int, slot: str = "") -> int:
        """Arena offset of temporary buffer ``slot`` of the current node (past the planned
        activations; the slots of one node do not overlap, nodes reuse the region)."""
        key = (self.node_index, slot)
        if key not in self._temps:
            used = self._temp_used.get(self.node_index, 0)
            self._temps[key] = self.temp_base + used
            self._temp_used[self.node_index] = used + _align(nbytes)
            self.temp_bytes = max(self.temp_bytes, used + _align(nbytes))
        return self._temps[key]

    # ---- code -------------------------------------------------------------------------
    def step_name(self, hint: str = "") -> str:
        self._nstep += 1
        tail = f"_{_ident(hint)[:40]}" if hint else ""
        return f"gk_s{self._nstep}{tail}"

    def add_step(self, fn: str, work: int, per_thread: int = 4,
                 max_parts: int = 1 << 16) -> None:
        """Schedule ``fn`` (already emitted) for the current node: ``work`` (about flops)
        bounds the number of parts, as do ``max_parts`` and ``per_thread`` (the parts
        per thread)."""
        parts = max(1, min(max_parts, int(work) // GRAIN))
        self.steps.append(Step(fn, self.node_index, parts, per_thread))

    def gemm(self, epilogue: Epilogue, packed_a: bool = False,
             packed_b: bool = False, gathered_b: bool = False) -> ir.Function:
        """The SGEMM entry for an epilogue (one instance per distinct epilogue and
        packing); with ``packed_a``, A is pre-packed (``packed_weights``), with
        ``packed_b`` B is in gemm.pack_b_panels' layout, with ``gathered_b`` B is read
        from an image through offset tables (see gemm.py)."""
        key = (epilogue.key(), bool(packed_a), bool(packed_b), bool(gathered_b))
        if key not in self._gemms:
            name = f"gk_gemm{len(self._gemms)}"
            GemmGenerator(self.gemm_config, epilogue, name, self.target.has_fma,
                          packed_a, packed_b, gathered_b).emit(self.mod)
            self._gemms[key] = name
        return self.mod.globals[self._gemms[key]]

    def helper(self, name: str, make) -> ir.Function:
        """A module-level internal function made once by ``make(mod, name)``."""
        if name not in self._helpers:
            self._helpers[name] = make(self.mod, name)
        return self._helpers[name]

    def gemm_workspace_bytes(self) -> int:
        return _align(4 * self.gemm_config.workspace_floats)


def _ident(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", s) or "net"


# ---------------------------------------------------------------------------------------


def unsupported(n: Node, why: str, hint: str) -> GraphcError:
    return GraphcError(f"the CPU backend cannot compile this layer: {why}", where=n.loc,
                       layer=n.name, layer_type=n.op, hint=hint)


def check_supported(g: Graph) -> None:
    """Raise GraphcError for the first node the backend cannot compile."""
    from .kernels import supported
    for n in g.nodes:
        for v in (*n.inputs, *n.outputs):
            layout = getattr(g.types[v], "layout", None)
            if layout is not None:
                raise unsupported(n, f"value %{v} has the blocked layout {layout}; the "
                                     f"kernels read and write plain (row-major) blobs",
                                  "compile without the 'layout' pass")
    for n in g.nodes:
        why = supported(g, n)
        if why:
            raise unsupported(n, why[0], why[1])


def lower_graph(g: Graph, target: jit.Target | str = "native",
                plan: MemoryPlan | None = None) -> Program:
    """Lower an optimized graph (params with data) to a Program."""
    from .kernels import lower_node
    from ...cost import node_cost
    target = target if isinstance(target, jit.Target) else jit.target(target)
    check_supported(g)
    plan = plan or plan_memory(g)
    k = KernelContext(g, plan, target)
    k.input_packers = {}
    nodes = []
    for i, n in enumerate(g.nodes):
        k.node_index, k.node = len(nodes), n
        nodes.append(NodeInfo(n.name, n.op if n.op != "Fused" else
                              "+".join(s["op"] for s in n.attrs["body"]),
                              int(node_cost(g, n).flops)))
        if n.op in VIEW_OPS and all(k.loc(o) == k.loc(n.inputs[0]) for o in n.outputs):
            continue
        if n.op == "Concat" and n.attrs.get("by_slices"):
            continue
        lower_node(k, n)
    inputs = [TensorInfo(g.blob_of.get(v, v), v, g.types[v].shape, k.loc(v),
                         *k.input_packers.get(v, (None, 0))) for v in g.inputs]
    outputs = [TensorInfo(g.blob_of.get(v, v), v, g.types[v].shape, k.loc(v))
               for v in g.outputs]
    persistent_base = _align(k.temp_base + k.temp_bytes)
    if k._persistent_base is not None:
        k._persistent_base.initializer = ir.Constant(ir.IntType(64), persistent_base)
    return Program(g.name, str(k.mod), k.steps, nodes, inputs, outputs,
                   persistent_base + k.persistent_bytes, k.scratch_bytes, k.weights, plan,
                   k.persistent_bytes)
