"""``graphc.Net``: pycaffe habits on top of the IR and the reference executor.

    net = graphc.Net("net.prototxt", weights="net.caffemodel", phase="test")
    out = net.forward(data=x)          # dict: output blob name -> ndarray
    net.blobs["conv1"]                 # ndarray after forward (the last in-place version)
    net.params["conv1"][0][...] = w    # writable parameters
    net.save("out.caffemodel")

    net = graphc.Net("train.prototxt", phase="train")
    loss = net.forward_backward(data=x, label=y)   # total weighted loss
    net.grads["conv1.0"]               # gradient of each param (by param name)

    net = graphc.Net("net.prototxt", weights=..., backend="cuda", precision="fp32")
    # forward compiles for the GPU (cached) and runs there; backend="cpu" likewise
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


def _updates_params(n) -> bool:
    from .ops import get_op
    return get_op(n.op).updates_params and not n.attrs.get("use_global_stats", True)


class Net:
    def __init__(self, model, weights=None, phase: str = "test", *, level: int | None = None,
                 stages=(), batch: int | None = None, seed: int | None = None,
                 backend: str = "reference", arch: str = "sm_90", precision: str = "tf32"):
        if backend not in ("reference", "cpu", "cuda"):
            raise GraphcError(f"backend '{backend}' is not available in this build",
                              hint="use backend='reference', 'cpu' or 'cuda'")
        if backend == "cuda":      # fail now, not at the first forward
            from .runtime.cuda_build import check_precision, parse_arch, require_cuda_bindings
            parse_arch(arch)
            check_precision(precision)
            require_cuda_bindings()
        self.backend = backend
        self._cuda = (arch, precision)   # the cuda backend's --arch and --precision
        self._compiled = None      # the CompiledNet of the cpu/cuda backend, built on demand
        self.source: NetSource = load_net_source(model)
        self.phase = phase
        self._lower_args = dict(phase=phase, level=level, stages=tuple(stages))
        self.graph: Graph = lower(self.source, batch=batch, **self._lower_args)
        self._ctx = Context(phase=phase, rng=np.random.default_rng(seed))
        self._fill_params(np.random.default_rng(seed))
        self._reset_blobs()
        if weights is not None:
            self.copy_from(weights)
        self._ctrain = None        # the cpu backend's compiled train pass (train phase)
        if backend == "cpu" and phase == "train":
            # the params move into one buffer the compiled pass reads (the arrays in
            # net.params are views of it: in-place updates reach the next pass)
            from .codegen.llvm.train import ParamBuffer
            self._param_buffer = ParamBuffer(self.graph.params)
            self._param_buffer.adopt(self.graph.params)

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
        self.recompile()
        self._close_train()
        self._reset_blobs()

    # ---- running --------------------------------------------------------------------
    def forward(self, **inputs) -> dict[str, np.ndarray]:
        """Run forward; inputs by blob name (others are taken from ``self.blobs``).
        Returns {output blob name: array}. An input of a new shape reshapes the net."""
        feeds = self._feeds(inputs)
        g = self.graph
        self._remember(feeds)
        if self.backend == "cpu" and self.phase == "train":
            return self._run_compiled_train(forward_only=True)
        if self.backend in ("cpu", "cuda"):
            out = self._cpu_net().forward(**{b: self.blobs[b] for b in self.inputs})
            for blob, value in out.items():
                self.blobs[blob] = value
            return out
        versions = g.blob_versions()
        env = ReferenceExecutor(g, self._ctx).run(feeds, keep=set(versions.values()))
        self._store_blobs(env, feeds)
        return {g.blob_of[v]: env[v] for v in g.outputs}

    def _feeds(self, inputs: dict) -> dict[str, np.ndarray]:
        """Check and copy the given inputs into ``self.blobs`` (reshaping the net for a new
        shape); return the graph inputs' arrays."""
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
        return {v: self.blobs[g.blob_of[v]] for v in g.inputs}

    def _store_blobs(self, env: dict, feeds: dict) -> None:
        for blob, v in self.graph.blob_versions().items():
            if v in env and v not in feeds:
                self.blobs[blob] = env[v]

    # ---- training -------------------------------------------------------------------
    @property
    def train_graph(self) -> Graph:
        """The forward graph plus its backward graph (``passes.TRAIN_PIPELINE``: autodiff,
        no inference-only rewrites), built on first use and after a reshape.  Its params
        are this net's arrays."""
        if getattr(self, "_train_src", None) is not self.graph:
            from .passes import TRAIN_PIPELINE, run_pipeline
            self._train_graph = run_pipeline(self.graph, TRAIN_PIPELINE)
            self._train_src = self.graph
        tg = self._train_graph
        for name, p in tg.params.items():
            p.data = self.graph.params[name].data
        return tg

    def forward_backward(self, **inputs) -> float:
        """Run forward and backward (inputs as for ``forward``); return the total loss,
        ``sum(loss_weight * top)`` accumulated in float32 as Caffe's Net::Forward does.
        Fills ``self.blobs`` (as ``forward``), ``self.grads`` (param name -> gradient of the
        loss; zeros for a param no gradient reaches, e.g. ``lr_mult: 0``) and
        ``self.blob_diffs`` (blob name -> gradient, as Caffe's blob diff after backward:
        for an in-place blob, that of its first version; zeros where none)."""
        feeds = self._feeds(inputs)
        self._remember(feeds)
        return self._run_train(feeds)

    def backward(self) -> dict[str, np.ndarray]:
        """pycaffe's ``net.backward()`` after ``net.forward(...)``: the gradients of that
        forward pass (same inputs, same Dropout masks; BatchNorm statistics are not
        updated twice).  It runs that forward again with the backward graph, so a Python
        layer sees a second forward call.  Fills ``grads``/``blob_diffs`` as
        ``forward_backward``; returns {input blob: gradient} for inputs that have one
        (``force_backward``)."""
        last = getattr(self, "_last_forward", None)
        if last is None or last[0] is not self.graph:
            raise GraphcError("backward() needs a forward() pass first",
                              hint="call net.forward(...) (or use net.forward_backward(...))")
        _, feeds, rng_state, saved = last
        self._ctx.rng.bit_generator.state = rng_state
        for name, data in saved.items():
            self.graph.params[name].data[...] = data
        self._run_train(feeds)
        g = self.graph
        return {g.blob_of[v]: self.blob_diffs[g.blob_of[v]] for v in g.inputs
                if v in self.train_graph.value_grads
                and g.blob_of[v] in self.blob_diffs}   # the compiled pass keeps none

    def _remember(self, feeds: dict) -> None:
        """What ``backward`` needs to redo this forward: the inputs, the random state and
        the params the forward updates in place (BatchNorm statistics in training)."""
        g = self.graph
        updated = {p for n in g.nodes if _updates_params(n) for p in n.params}
        self._last_forward = (g, {v: np.array(a, copy=True) for v, a in feeds.items()},
                              self._ctx.rng.bit_generator.state,
                              {p: np.array(g.params[p].data, copy=True) for p in updated})

    def _run_train(self, feeds: dict) -> float:
        if self.backend == "cpu" and self.phase == "train":
            return self._run_compiled_train()
        g, tg = self.graph, self.train_graph
        versions = g.blob_versions()
        keep = (set(versions.values()) | set(tg.value_grads.values())
                | set(tg.param_grads.values()) | {v for v, _ in tg.losses})
        env = ReferenceExecutor(tg, self._ctx).run(feeds, keep=keep)
        self._store_blobs(env, feeds)
        loss = np.float32(0)
        for v, w in tg.losses:
            loss += np.float32(w) * env[v].sum(dtype=np.float32)
        self.grads = OrderedDict(
            (name, np.array(env[tg.param_grads[name]], dtype=np.float32, copy=True)
             if name in tg.param_grads else np.zeros(p.type.shape, np.float32))
            for name, p in g.params.items())
        diffs: OrderedDict[str, np.ndarray] = OrderedDict()
        for v in [*g.inputs, *(o for n in g.nodes for o in n.outputs)]:
            blob = g.blob_of.get(v, v)
            if blob not in diffs and v in tg.value_grads:
                diffs[blob] = np.array(env[tg.value_grads[v]], dtype=np.float32, copy=True)
        self.blob_diffs = OrderedDict(
            (blob, diffs[blob] if blob in diffs else np.zeros(self.blobs[blob].shape, np.float32))
            for blob in versions)
        return float(loss)

    # ---- the cpu backend ------------------------------------------------------------
    def compiled_train(self):
        """The cpu backend's compiled train pass (codegen/llvm/train.py), built on first
        use; a GraphcError names the first layer it cannot compile."""
        if self._ctrain is None or self._ctrain_src is not self.graph:
            from .codegen.llvm.train import CompiledTrainNet, train_graph
            self._close_train()
            self._ctrain = CompiledTrainNet(train_graph(self.graph), self._param_buffer,
                                            source_params=self.graph.params)
            self._ctrain_src = self.graph
        return self._ctrain

    def _run_compiled_train(self, forward_only: bool = False):
        """forward (``forward_only``: returns the outputs) or forward_backward (returns
        the loss) on the compiled train pass.  ``grads`` are views of its memory, valid
        until the next pass; ``blob_diffs`` are not kept (empty); ``blobs`` hold the
        inputs, the data layers' tops and the outputs only (the planned memory reuses
        the other blobs' space within the pass)."""
        c = self.compiled_train()
        for blob, arr in c.inputs.items():
            arr[...] = self.blobs[blob]
        loss = c.run(forward_only=forward_only, ctx=self._ctx)
        out = {}
        for blob, arr in c.outputs.items():
            self.blobs[blob] = out[blob] = np.array(arr, copy=True)
        g = self.graph
        for v, a in c.host_values.items():         # the data layers' tops
            self.blobs[g.blob_of.get(v, v)] = a
        # the other blobs' memory was reused within the pass: not kept (not stale zeros)
        keep = set(self.inputs) | set(out) | {g.blob_of.get(v, v) for v in c.host_values}
        for blob in [b for b in self.blobs if b not in keep]:
            del self.blobs[blob]
        if forward_only:
            return out
        self.grads = OrderedDict(
            (name, c.grads[name] if name in c.grads else np.zeros(p.type.shape, np.float32))
            for name, p in self.graph.params.items())
        self.blob_diffs = OrderedDict()
        return loss

    def _close_train(self) -> None:
        if getattr(self, "_ctrain", None) is not None:
            self._ctrain.close()
            self._ctrain = None

    def _cpu_net(self):
        """The compiled net of the cpu or cuda backend (built through the cache)."""
        if self._compiled is None:
            from .runtime.loader import load
            if self.backend == "cuda":
                from .runtime.cuda_build import cached_cuda_library
                self._compiled = load(cached_cuda_library(self.graph, *self._cuda))
            else:
                from .runtime.build import cached_library
                self._compiled = load(cached_library(self.graph))
        return self._compiled

    def recompile(self) -> None:
        """Forget the compiled library (the cpu backend builds it again, from the current
        params, at the next forward)."""
        if getattr(self, "_compiled", None) is not None:
            self._compiled.close()
            self._compiled = None

    # ---- weights --------------------------------------------------------------------
    def copy_from(self, path) -> None:
        """Load weights by layer name, as Caffe's CopyTrainedLayersFrom: layers absent from
        this net are ignored; a count or shape mismatch is an error naming the layer."""
        from .frontend.weights import load_weights_into
        load_weights_into(self.graph, path)
        self.recompile()

    def save(self, path) -> None:
        """Write the params as a V2 .caffemodel (atomically)."""
        from .frontend.caffemodel import write_caffemodel
        layers = [(n.name, n.op, [self.graph.params[p].data for p in n.params])
                  for n in self.graph.nodes if n.params]
        write_caffemodel(path, layers, name=self.graph.name)
