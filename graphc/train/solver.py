"""Caffe's solvers: the training loop of ``Solver::Step``/``Solve`` and the update rules of
``sgd_solvers`` (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam), pycaffe-style:

    solver = graphc.get_solver("solver.prototxt")      # or graphc.AdamSolver(...)
    solver.net.copy_from("init.caffemodel")             # fine-tuning
    solver.step(100); solver.solve(); solver.snapshot()

One iteration, as Caffe does it: test (every ``test_interval``, and at iteration 0 unless
``test_initialization: false``), then ``iter_size`` forward/backward passes whose
gradients are summed, then ``ApplyUpdate``: the learning rate of the policy; gradient
clipping (the L2 norm over all params of the summed diffs, before dividing by
``iter_size``); per param: divide by ``iter_size``, add weight decay to the diff
(L2: ``decay * w``, L1: ``decay * sign(w)``, decay = ``weight_decay * decay_mult``), the
rule's update value (with ``local_rate = rate * lr_mult``), ``w -= update``; then
``iter += 1`` and a snapshot every ``snapshot`` iterations.  All arithmetic is float32 in
Caffe's order of operations (the history lives in ``solver.history``, in Caffe's order:
one blob per learnable param, a second set after the first for AdaDelta and Adam).

Exact resume: besides what Caffe's solver state holds (iteration, weights, history,
current_step), the random numbers and the data position must continue.  Every forward
call draws from generators seeded by (``random_seed``, which net, iteration, sub-step,
layer name), and restoring a state replays the data layers' reads up to that iteration,
so the losses after a resume equal those of an uninterrupted run.  Without
``random_seed`` the seed is random and nets with random layers (Dropout, shuffling,
random crops) do not resume bit-exactly.
"""
from __future__ import annotations

import math
import os
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import GraphcError
from ..frontend import caffe_pb2 as pb
from ..frontend.prototxt import NetSource, read_net, read_solver, to_text
from ..frontend.upgrade import UpgradeError, upgrade_solver
from .inspect import first_nonfinite, mean_abs, replay_forward
from .log import TrainLog, g
from .policies import check_policy, learning_rate
from .snapshot import SnapshotLayer, SolverStateData, read_state, write_state, write_weights

f32 = np.float32

__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
           "AdaDeltaSolver", "AdamSolver", "get_solver", "SOLVER_TYPES", "TrainingDiverged"]

SOLVER_TYPES: "OrderedDict[str, type[Solver]]" = OrderedDict()


class TrainingDiverged(GraphcError):
    """The training loss became NaN or infinite."""


def _register(cls):
    SOLVER_TYPES[cls.type] = cls
    return cls


class _NodeStreams:
    """Stands in for a net's ``ctx.rng`` during one forward call: each layer draws from its
    own generator, seeded by (solver seed, call key, layer name), so what a layer draws
    depends only on which call this is, never on what other layers drew before it."""

    def __init__(self, ctx, key: tuple[int, ...]):
        self._ctx = ctx
        self._key = key
        self._gens: dict[str, np.random.Generator] = {}

    def _gen(self) -> np.random.Generator:
        node = getattr(self._ctx, "node", None)
        name = getattr(node, "name", "") or ""
        gen = self._gens.get(name)
        if gen is None:
            gen = np.random.default_rng([*self._key, zlib.crc32(name.encode())])
            self._gens[name] = gen
        return gen

    def __getattr__(self, attr):
        return getattr(self._gen(), attr)


def _axpby(a, x, b, y) -> None:
    """Caffe's ``caffe_cpu_axpby``: y = a * x + b * y, in place, as scal then axpy."""
    y *= b
    y += a * x


class Solver:
    """The training loop shared by every solver type; subclasses give the update rule."""

    type = ""
    history_sets = 1

    def __init__(self, param, *, log=None, net=None, test_nets=None,
                 filename: str | None = None, backend: str = "reference"):
        """``param``: a solver .prototxt path or a caffe_pb2.SolverParameter.  ``log``: a
        stream for Caffe-style log lines, or a TrainLog (default: only the ``graphc.train``
        logging logger).  ``net``/``test_nets``: use these nets instead of building them
        from the solver's net fields (they need ``graph``, ``forward_backward`` and
        ``grads``, like graphc.Net).  ``filename``: the solver file a SolverParameter came
        from (for messages, and to find the net file beside it).  ``backend``: how the
        train net runs: "reference" (numpy), "cpu" (compiled by the CPU backend; a layer
        it cannot compile is an error) or "auto" (cpu, else the reference executor, saying
        why in the log).  Test nets run on the reference executor."""
        self.param, self.filename = _load_param(param)
        self.filename = self.filename or filename
        self.log = log if isinstance(log, TrainLog) else TrainLog(log)
        self.log.info("Initializing solver from parameters: \n" + to_text(self.param).rstrip(),
                      "solver.cpp:45")
        sp = self.param
        self._check_param()
        self.seed = int(sp.random_seed) if sp.random_seed >= 0 else \
            int.from_bytes(os.urandom(4), "little")
        if backend not in ("reference", "cpu", "auto"):
            raise GraphcError(f"unknown training backend '{backend}'",
                              hint="use 'cpu', 'reference' or 'auto'")
        self.backend = backend
        self.net = net if net is not None else self._init_train_net()
        if net is None and backend != "reference":
            self._check_compiled()
        self._load_weights([self.net])
        self.test_nets = list(test_nets) if test_nets is not None else self._init_test_nets()
        if test_nets is not None:
            self._load_weights(self.test_nets)
        if len(self.test_nets) != len(sp.test_iter):
            raise GraphcError(f"{len(self.test_nets)} test net(s) but {len(sp.test_iter)} "
                              "test_iter value(s)", where=self.filename,
                              hint="give one test_iter per test net")
        self.log.info("Solver scaffolding done.", "solver.cpp:57")
        self.iter = 0
        self.current_step = 0
        self.lr = f32(sp.base_lr)
        self.smoothed_loss = f32(0)
        self.loss = None               # the last iteration's (iter_size-averaged) loss
        self.test_results: list[OrderedDict] = [OrderedDict() for _ in self.test_nets]
        self._losses: list[np.float32] = []
        self._callbacks: list[tuple] = []
        self._action = None
        self._early_exit = False
        self._consumed = [0] * (1 + len(self.test_nets))   # forward calls per net
        self._outputs_cache: dict[int, list] = {}
        self.learnable = _learnable_params(self.net)
        params = self.net.graph.params
        self.history = [np.zeros(params[n].type.shape, np.float32)
                        for _ in range(self.history_sets) for n in self.learnable]
        self.diffs: dict[str, np.ndarray] = {}

    # ---- construction ---------------------------------------------------------------
    def _check_param(self) -> None:
        sp, where = self.param, self.filename
        if sp.average_loss < 1:
            raise GraphcError(f"average_loss is {sp.average_loss}", where=where,
                              hint="average_loss must be >= 1 (1: no smoothing)")
        if sp.iter_size < 1:
            raise GraphcError(f"iter_size is {sp.iter_size}", where=where,
                              hint="iter_size must be >= 1")
        if sp.regularization_type not in ("L1", "L2"):
            raise GraphcError(f"unknown regularization_type \"{sp.regularization_type}\"",
                              where=where, hint="use \"L2\" or \"L1\"")
        if sp.test_iter and sp.test_interval <= 0:
            raise GraphcError("the solver has test nets (test_iter) but no test_interval",
                              where=where, hint="set test_interval: N (iterations), or "
                                                "remove test_iter")
        if any(n < 0 for n in sp.test_iter):
            raise GraphcError("test_iter is negative", where=where,
                              hint="test_iter is the number of test batches")
        check_policy(sp, where)
        self.check_rule(sp)
        if sp.snapshot > 0:
            if not sp.snapshot_prefix:
                raise GraphcError("snapshot is set but snapshot_prefix is not",
                                  where=self.filename,
                                  hint="set snapshot_prefix: \"path/name\" (files are written "
                                       "as name_iter_N.caffemodel)")
            self._check_snapshot_dir()

    def check_rule(self, sp) -> None:
        """Rule-specific checks (Caffe's constructor sanity checks)."""

    def _check_snapshot_dir(self) -> None:
        """Fail before training, not after it, when snapshots cannot be written."""
        sp = self.param
        directory = Path(sp.snapshot_prefix + "_").parent
        if not directory.is_dir() or not os.access(directory, os.W_OK):
            raise GraphcError(f"cannot write snapshots to prefix '{sp.snapshot_prefix}': "
                              f"directory '{directory}' does not exist or is not writable",
                              where=self.filename,
                              hint="create the directory or change snapshot_prefix")

    def _net_file(self, path: str) -> NetSource:
        """Read a net file named in the solver: relative to the working directory, as Caffe
        does; then relative to the solver file's directory."""
        p = Path(path)
        if not p.exists() and self.filename and not p.is_absolute():
            alt = Path(self.filename).parent / p
            if alt.exists():
                p = alt
        if not p.exists():
            raise GraphcError(f"the net file '{path}' does not exist", where=self.filename,
                              hint="paths in a solver are relative to the working directory "
                                   "(as in Caffe) or to the solver file")
        return read_net(p)

    def _net_from_param(self, msg) -> NetSource:
        from ..frontend.lower import load_net_source
        return load_net_source(msg)

    def _build_net(self, src: NetSource, state: pb.NetState):
        from ..net import Net
        net = pb.NetParameter()
        net.CopyFrom(src.net)
        net.ClearField("state")
        phase = "train" if state.phase == pb.TRAIN else "test"
        backend = "cpu" if phase == "train" and self.backend != "reference" else "reference"
        return Net(NetSource(net, src.filename, list(src.layer_lines)), phase=phase,
                   level=int(state.level), stages=list(state.stage), seed=self.seed,
                   backend=backend)

    def _check_compiled(self) -> None:
        """Compile the train net's pass now: with backend "auto", fall back to the
        reference executor (logging why) when a layer has no CPU kernel."""
        try:
            self.net.compiled_train()
        except GraphcError as e:
            if self.backend != "auto":
                raise
            self.log.info(f"The CPU backend cannot compile this net's training pass, so it "
                          f"trains on the reference executor: {e}", "solver.cpp:60")
            self.net.backend = "reference"
            return
        self.log.info("Training pass compiled by the CPU backend", "solver.cpp:60")

    def _init_train_net(self):
        sp = self.param
        fields = [f for f in ("net", "net_param", "train_net", "train_net_param")
                  if sp.HasField(f)]
        if len(fields) != 1:
            raise GraphcError("the solver names " + ("no train net" if not fields else
                              "more than one train net (" + ", ".join(fields) + ")"),
                              where=self.filename,
                              hint="give exactly one of: net, net_param, train_net, "
                                   "train_net_param")
        f = fields[0]
        if f.endswith("_param"):
            self.log.info(f"Creating training net specified in {f}.", "solver.cpp:102")
            src = self._net_from_param(getattr(sp, f))
        else:
            self.log.info(f"Creating training net from {'train_net ' if f == 'train_net' else ''}"
                          f"net file: {getattr(sp, f)}", "solver.cpp:102")
            src = self._net_file(getattr(sp, f))
        state = pb.NetState(phase=pb.TRAIN)
        state.MergeFrom(src.net.state)
        state.MergeFrom(sp.train_state)
        return self._build_net(src, state)

    def _init_test_nets(self) -> list:
        sp = self.param
        generic = sp.HasField("net") + sp.HasField("net_param")
        n_specific = len(sp.test_net_param) + len(sp.test_net)
        if generic > 1:
            raise GraphcError("the solver gives both net and net_param", where=self.filename,
                              hint="keep one of them")
        if (generic and len(sp.test_iter) < n_specific) or \
                (not generic and len(sp.test_iter) != n_specific):
            raise GraphcError(f"{len(sp.test_iter)} test_iter value(s) for {n_specific} test "
                              "net(s)", where=self.filename,
                              hint="test_iter must be specified for each test network")
        count = len(sp.test_iter)
        if sp.test_state and len(sp.test_state) != count:
            raise GraphcError(f"{len(sp.test_state)} test_state value(s) for {count} test "
                              "net(s)", where=self.filename,
                              hint="give test_state once per test net, or not at all")
        sources: list[tuple[str, NetSource]] = []
        for msg in sp.test_net_param:
            sources.append(("test_net_param", self._net_from_param(msg)))
        for path in sp.test_net:
            sources.append((f"test_net file: {path}", self._net_file(path)))
        for _ in range(count - len(sources)):
            if sp.HasField("net_param"):
                sources.append(("net_param", self._net_from_param(sp.net_param)))
            else:
                sources.append((f"net file: {sp.net}", self._net_file(sp.net)))
        nets = []
        for i, (what, src) in enumerate(sources):
            state = pb.NetState(phase=pb.TEST)
            state.MergeFrom(src.net.state)
            if sp.test_state:
                state.MergeFrom(sp.test_state[i])
            self.log.info(f"Creating test net (#{i}) specified by {what}", "solver.cpp:190")
            net = self._build_net(src, state)
            self._load_weights([net])
            nets.append(net)
        return nets

    def _load_weights(self, nets) -> None:
        for entry in self.param.weights:
            for path in entry.split(","):
                self.log.info(f"Finetuning from {path}", "solver.cpp:72")
                for net in nets:
                    net.copy_from(path)

    # ---- the training loop ------------------------------------------------------------
    def add_callback(self, on_start=None, on_gradients_ready=None) -> None:
        """pycaffe's callbacks: ``on_start()`` before each iteration's forward passes,
        ``on_gradients_ready()`` after them, before the update (``solver.diffs`` then holds
        the summed gradients and may be changed)."""
        self._callbacks.append((on_start, on_gradients_ready))

    def set_action_function(self, fn) -> None:
        """``fn() -> "none" | "stop" | "snapshot"``, polled after every iteration and test
        batch (Caffe's SetActionFunction; the CLI's signal handler)."""
        self._action = fn

    def _requested_action(self) -> str:
        return self._action() if self._action is not None else "none"

    def step(self, iters: int) -> None:
        """Run ``iters`` iterations (Caffe's Solver::Step)."""
        sp = self.param
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        average_loss = sp.average_loss
        self._losses = []
        self.smoothed_loss = f32(0)
        t0 = timer = time.perf_counter()
        iter_last = self.iter
        while self.iter < stop_iter:
            if self._tests_at(self.iter):
                self.test_all()
                if self._early_exit:
                    break
            for on_start, _ in self._callbacks:
                if on_start:
                    on_start()
            display = bool(sp.display) and self.iter % sp.display == 0
            debug = display and sp.debug_info
            loss = self._forward_backward()
            self.loss = loss
            self._update_smoothed_loss(loss, start_iter, average_loss)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iter_last) / (lapse or 1.0)
                self.log.info(f"Iteration {self.iter} ({g(per_s)} iter/s, {g(lapse)}s/"
                              f"{sp.display} iters), loss = {g(self.smoothed_loss)}",
                              "solver.cpp:239")
                timer, iter_last = time.perf_counter(), self.iter
                self._log_outputs(self.net, "Train", "solver.cpp:258")
                if debug:
                    self._debug_forward_backward()
            if not np.isfinite(loss):
                raise self._divergence(loss)
            for _, on_ready in self._callbacks:
                if on_ready:
                    on_ready()
            self.apply_update(display=display, debug=debug)
            self.iter += 1
            self.log.bar(self.iter, start_iter, stop_iter, self.smoothed_loss, self.lr, t0)
            request = self._requested_action()
            if (sp.snapshot and self.iter % sp.snapshot == 0) or request == "snapshot":
                self.snapshot()
            if request == "stop":
                self._early_exit = True
                break
        self.log.end_bar()

    def solve(self, resume_file=None) -> None:
        """Train to ``max_iter`` (Caffe's Solver::Solve), first restoring ``resume_file``
        (a .solverstate) if given; snapshot at the end unless ``snapshot_after_train`` is
        false; then one more forward pass to display the loss and a final test, as Caffe
        does."""
        sp = self.param
        self.log.info(f"Solving {self.net.graph.name}", "solver.cpp:289")
        self.log.info(f"Learning Rate Policy: {sp.lr_policy}", "solver.cpp:290")
        self._early_exit = False
        if resume_file is not None:
            self.log.info(f"Restoring previous solver status from {resume_file}",
                          "solver.cpp:293")
            self.restore(resume_file)
        if sp.snapshot_after_train:
            self._check_snapshot_dir()
        start_iter = self.iter
        self.step(sp.max_iter - self.iter)
        if sp.snapshot_after_train and (not sp.snapshot or self.iter % sp.snapshot != 0):
            self.snapshot()
        if self._early_exit:
            self.log.info("Optimization stopped early.", "solver.cpp:312")
            return
        if sp.display and self.iter % sp.display == 0:
            self._seed_net(self.net, (0, self.iter, 0))
            outs = self.net.forward()
            self._consumed[0] += 1
            loss = _weighted_loss(self.net, outs)
            self._update_smoothed_loss(loss, start_iter, sp.average_loss)
            self.log.info(f"Iteration {self.iter}, loss = {g(self.smoothed_loss)}",
                          "solver.cpp:327")
        if sp.test_interval and self.iter % sp.test_interval == 0:
            self.test_all()
        self.log.info("Optimization Done.", "solver.cpp:332")

    def _tests_at(self, it: int) -> bool:
        sp = self.param
        return bool(self.test_nets) and sp.test_interval > 0 and it % sp.test_interval == 0 \
            and (it > 0 or sp.test_initialization)

    def _forward_backward(self) -> np.float32:
        """``iter_size`` forward/backward passes; the summed gradients go to ``self.diffs``
        (one float32 array per learnable param); returns the mean loss."""
        n = self.param.iter_size
        loss = f32(0)
        acc: dict[str, np.ndarray] = {}
        params = self.net.graph.params
        for s in range(n):
            self._seed_net(self.net, (0, self.iter, s))
            loss = f32(loss + f32(self.net.forward_backward()))
            self._consumed[0] += 1
            grads = self.net.grads
            for name in self.learnable:
                grad = grads.get(name)
                if s == 0:
                    acc[name] = (np.array(grad, np.float32, copy=True) if grad is not None
                                 else np.zeros(params[name].type.shape, np.float32))
                elif grad is not None:
                    acc[name] += grad
        self.diffs = acc
        return f32(loss / f32(n))

    def _update_smoothed_loss(self, loss, start_iter: int, average_loss: int) -> None:
        """Caffe's UpdateSmoothedLoss: the mean of the last ``average_loss`` losses."""
        loss = f32(loss)
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = f32((self.smoothed_loss * f32(size - 1) + loss) / f32(size))
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss = f32(self.smoothed_loss +
                                     (loss - self._losses[idx]) / f32(average_loss))
            self._losses[idx] = loss

    # ---- the update -------------------------------------------------------------------
    def apply_update(self, *, display: bool | None = None, debug: bool = False) -> None:
        """Caffe's ApplyUpdate on ``self.diffs``: learning rate, clipping, then per param
        normalize, regularize, the rule's update value, ``data -= update``.  Afterwards
        ``self.diffs`` holds the updates (what Caffe's param diffs hold)."""
        sp = self.param
        if display is None:
            display = bool(sp.display) and self.iter % sp.display == 0
        step_before = self.current_step
        rate, self.current_step = learning_rate(sp, self.iter, self.current_step)
        if sp.lr_policy == "multistep" and self.current_step != step_before:
            self.log.info(f"MultiStep Status: Iteration {self.iter}, step = "
                          f"{self.current_step}", "sgd_solver.cpp:53")
        self.lr = rate
        if display:
            self.log.info(f"Iteration {self.iter}, lr = {g(rate)}", "sgd_solver.cpp:112")
        params = self.net.graph.params
        for name in self.learnable:
            if name not in self.diffs:
                self.diffs[name] = np.zeros(params[name].type.shape, np.float32)
        self._clip_gradients()
        for i, name in enumerate(self.learnable):
            p = params[name]
            diff = self.diffs[name]
            if sp.iter_size != 1:
                diff *= f32(f32(1) / f32(sp.iter_size))
            self._regularize(p, diff)
            self.compute_update_value(i, diff, rate)
            np.subtract(p.data, diff, out=p.data)
        if debug:
            self._debug_update()

    def _clip_gradients(self) -> None:
        clip = f32(self.param.clip_gradients)
        if clip < 0:
            return
        sumsq = f32(0)
        for name in self.learnable:
            d = self.diffs[name].ravel()
            sumsq = f32(sumsq + f32(np.dot(d.astype(np.float64), d)))
        l2 = f32(np.sqrt(sumsq))
        if l2 > clip:
            scale = f32(clip / l2)
            self.log.info(f"Gradient clipping: scaling down gradients (L2 norm {g(l2)} > "
                          f"{g(clip)}) by scale factor {g(scale)}", "sgd_solver.cpp:96")
            for name in self.learnable:
                self.diffs[name] *= scale

    def _regularize(self, p, diff) -> None:
        decay = f32(f32(self.param.weight_decay) * f32(p.decay_mult))
        if not decay:
            return
        if self.param.regularization_type == "L2":
            diff += decay * p.data
        else:
            diff += decay * np.sign(p.data).astype(np.float32)

    def _local_rate(self, i: int, rate) -> np.float32:
        return f32(f32(rate) * f32(self.net.graph.params[self.learnable[i]].lr_mult))

    def compute_update_value(self, i: int, diff: np.ndarray, rate) -> None:
        """Replace ``diff`` (param ``i``'s regularized gradient) by its update value."""
        raise NotImplementedError

    # ---- testing ----------------------------------------------------------------------
    def test_all(self) -> None:
        for j in range(len(self.test_nets)):
            if self._early_exit:
                break
            self.test(j)

    def test(self, j: int = 0) -> OrderedDict | None:
        """Run test net ``j`` for ``test_iter[j]`` batches with the train net's current
        weights; log and return the mean of each output (``self.test_results[j]``)."""
        sp = self.param
        net = self.test_nets[j]
        self.log.info(f"Iteration {self.iter}, Testing net (#{j})", "solver.cpp:347")
        _share_trained_layers(net, self.net)
        outputs = self._net_outputs(net)
        n_batches = sp.test_iter[j]
        scores = None
        loss = f32(0)
        for b in range(n_batches):
            request = self._requested_action()
            while request != "none":
                if request == "snapshot":
                    self.snapshot()
                elif request == "stop":
                    self._early_exit = True
                request = self._requested_action()
            if self._early_exit:
                break
            self._seed_net(net, (1 + j, self.iter, b))
            outs = net.forward()
            self._consumed[1 + j] += 1
            if sp.test_compute_loss:
                loss = f32(loss + _weighted_loss(net, outs))
            vec = np.concatenate([np.asarray(_output_value(net, outs, blob, v), np.float32)
                                  .ravel() for blob, v, _ in outputs]) if outputs \
                else np.zeros(0, np.float32)
            scores = vec.copy() if scores is None else scores + vec
        if self._early_exit:
            self.log.info("Test interrupted.", "solver.cpp:392")
            return None
        if sp.test_compute_loss:
            loss = f32(loss / f32(n_batches))
            self.log.info(f"Test loss: {g(loss)}", "solver.cpp:396")
        results: OrderedDict = OrderedDict()
        if scores is not None:
            k = 0
            for blob, v, w in outputs:
                count = int(np.prod(net.graph.types[v].shape, dtype=np.int64))
                means = [f32(s / f32(n_batches)) for s in scores[k:k + count]]
                for m in means:
                    extra = f" (* {g(w)} = {g(f32(w) * m)} loss)" if w else ""
                    self.log.info(f"    Test net output #{k}: {blob} = {g(m)}{extra}",
                                  "solver.cpp:414")
                    k += 1
                results[blob] = means[0] if count == 1 else np.array(means, np.float32)
        self.test_results[j] = results
        return results

    # ---- snapshots --------------------------------------------------------------------
    def _snapshot_filename(self, ext: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{ext}"

    def snapshot(self) -> str:
        """Write ``<prefix>_iter_<iter>.caffemodel`` then ``.solverstate`` (``.h5`` with
        ``snapshot_format: HDF5``), each atomically; returns the solver state's path."""
        sp = self.param
        hdf5 = sp.snapshot_format == pb.SolverParameter.HDF5
        model = self._snapshot_filename(".caffemodel.h5" if hdf5 else ".caffemodel")
        kind = "HDF5 file" if hdf5 else "binary proto file"
        self.log.info(f"Snapshotting to {kind} {model}", "solver.cpp:464")
        g_ = self.net.graph
        layers = []
        for n in g_.nodes:
            if n.params:
                diff = [self.diffs.get(p, np.zeros(g_.params[p].type.shape, np.float32))
                        for p in n.params] if sp.snapshot_diff else None
                layers.append(SnapshotLayer(n.name, n.op, [g_.params[p].data for p in n.params],
                                            diff))
        write_weights(model, layers, g_.name, hdf5=hdf5)
        state_file = self._snapshot_filename(".solverstate.h5" if hdf5 else ".solverstate")
        self.log.info(f"Snapshotting solver state to {kind} {state_file}", "sgd_solver.cpp:284")
        write_state(state_file, SolverStateData(self.iter, model, self.current_step,
                                                self.history), hdf5=hdf5)
        return state_file

    def restore(self, state_file) -> None:
        """Load a .solverstate (binary or HDF5): the weights of its ``learned_net``, the
        iteration, current_step and history; then bring the data layers to the position
        an uninterrupted run would have at that iteration."""
        st = read_state(state_file)
        where = str(state_file)
        if len(st.history) != len(self.history):
            raise GraphcError(
                f"the solver state holds {len(st.history)} history blob(s); this {self.type} "
                f"solver on this net needs {len(self.history)} ({self.history_sets} per "
                f"learnable param, {len(self.learnable)} params)", where=where,
                hint="resume with the solver type and net that wrote the snapshot")
        for i, (h, a) in enumerate(zip(self.history, st.history)):
            if a.size != h.size:
                name = self.learnable[i % len(self.learnable)]
                raise GraphcError(f"history blob {i} has shape {list(a.shape)}, param ${name} "
                                  f"has shape {list(h.shape)}", where=where,
                                  hint="resume with the net that wrote the snapshot")
        if st.learned_net:
            self.net.copy_from(_resolve_beside(st.learned_net, state_file))
        self.iter = int(st.iter)
        self.current_step = int(st.current_step)
        self.log.info("SGDSolver: restoring history", "sgd_solver.cpp:326")
        for h, a in zip(self.history, st.history):
            h[...] = a.reshape(h.shape)
        self._fast_forward_data()

    # ---- random numbers and data position ---------------------------------------------
    def _seed_net(self, net, key: tuple[int, ...]) -> None:
        ctx = getattr(net, "_ctx", None)
        if ctx is not None:
            ctx.rng = _NodeStreams(ctx, (self.seed, *key))

    def _fast_forward_data(self) -> None:
        if any(self._consumed):
            self.log.info("note: the data layers have already been read from; they are not "
                          "repositioned for the restored iteration", "solver.cpp:0")
            return
        sp = self.param
        keys = [(0, it, s) for it in range(self.iter) for s in range(sp.iter_size)]
        replayed = self._replay_data(self.net, keys)
        self._consumed[0] = len(keys)
        for j, net in enumerate(self.test_nets):
            keys = [(1 + j, it, b) for it in range(self.iter) if self._tests_at(it)
                    for b in range(sp.test_iter[j])]
            replayed += self._replay_data(net, keys)
            self._consumed[1 + j] = len(keys)
        if replayed:
            self.log.info(f"Data layers repositioned for iteration {self.iter} "
                          f"({replayed} batches skipped)", "solver.cpp:0")

    def _replay_data(self, net, keys) -> int:
        """Run only the data layers (nodes without bottoms) once per key, as the forward
        calls of an uninterrupted run would have; returns the number of layer calls."""
        from ..ops import get_op
        ctx = getattr(net, "_ctx", None)
        g_ = net.graph
        nodes = [n for n in g_.nodes if not n.inputs and n.outputs]
        if ctx is None or not nodes or not keys:
            return 0
        for key in keys:
            self._seed_net(net, key)
            for n in nodes:
                ctx.node = n
                get_op(n.op).forward(n.attrs, [], [g_.params[p].data for p in n.params], ctx)
        ctx.node = None
        return len(keys) * len(nodes)

    # ---- logging helpers --------------------------------------------------------------
    def _net_outputs(self, net) -> list[tuple[str, str, float]]:
        """(blob, value, loss weight) of each net output, in Caffe's order (its output
        blobs come from a std::set, so they are sorted by name)."""
        key = id(net.graph)
        cached = self._outputs_cache.get(key)
        if cached is None:
            cached = sorted(_outputs_with_weights(net.graph), key=lambda t: t[0].encode())
            self._outputs_cache[key] = cached
        return cached

    def _log_outputs(self, net, what: str, where: str) -> None:
        k = 0
        for blob, v, w in self._net_outputs(net):
            for x in np.asarray(net.blobs[blob], np.float32).ravel():
                extra = f" (* {g(w)} = {g(f32(w) * x)} loss)" if w else ""
                self.log.info(f"    {what} net output #{k}: {blob} = {g(x)}{extra}", where)
                k += 1

    def _divergence(self, loss) -> TrainingDiverged:
        g_ = self.net.graph
        info = first_nonfinite(self.net)
        msg = f"the training loss is {g(loss)} at iteration {self.iter}"
        hint = (f"lower base_lr (the learning rate was {g(self.lr)}), set clip_gradients, or "
                "check the data for NaN/Inf")
        if info is None:
            bad = [n for n in self.learnable if not np.all(np.isfinite(g_.params[n].data))]
            if bad:
                msg += "; params holding NaN/Inf: " + ", ".join(f"${n}" for n in bad)
            self.log.info("Training diverged: " + msg, "solver.cpp:0")
            return TrainingDiverged(msg, where=self.filename, hint=hint)
        node = info["node"]
        msg += (f"; this is the first layer whose output (top '{info['output']}') is NaN or "
                "infinite")
        if info["bad_params"]:
            msg += (" — its params " + ", ".join(f"${p}" for p in info["bad_params"]) +
                    " already hold NaN/Inf (a previous update made them so)")
        elif not node.inputs:
            hint = "the data layer produced NaN or Inf: check the data source"
        self.log.info(f"Training diverged: layer '{node.name}': " + msg, "solver.cpp:0")
        return TrainingDiverged(msg, where=node.loc, layer=node.name, layer_type=node.op,
                                hint=hint)

    def _debug_forward_backward(self) -> None:
        net, g_ = self.net, self.net.graph
        for n, outs in replay_forward(net):
            for v, a in zip(n.outputs, outs):
                self.log.info(f"    [Forward] Layer {n.name}, top blob {g_.blob_of.get(v, v)} "
                              f"data: {g(mean_abs(a))}", "net.cpp:593")
            for i, p in enumerate(n.params):
                self.log.info(f"    [Forward] Layer {n.name}, param blob {i} data: "
                              f"{g(mean_abs(g_.params[p].data))}", "net.cpp:604")
        blob_diffs = getattr(net, "blob_diffs", None) or {}
        has_grad = getattr(getattr(net, "train_graph", None), "value_grads", {})
        for n in reversed(g_.nodes):
            for v in n.inputs:
                b = g_.blob_of.get(v, v)
                if v in has_grad and b in blob_diffs:
                    self.log.info(f"    [Backward] Layer {n.name}, bottom blob {b} diff: "
                                  f"{g(mean_abs(blob_diffs[b]))}", "net.cpp:621")
            for i, p in enumerate(n.params):
                if p in self.diffs and g_.params[p].lr_mult != 0:
                    self.log.info(f"    [Backward] Layer {n.name}, param blob {i} diff: "
                                  f"{g(mean_abs(self.diffs[p]))}", "net.cpp:632")
        asum_data = asum_diff = sumsq_data = sumsq_diff = 0.0
        for name in self.learnable:
            d = np.asarray(g_.params[name].data, np.float64)
            df = np.asarray(self.diffs[name], np.float64)
            asum_data += np.abs(d).sum()
            asum_diff += np.abs(df).sum()
            sumsq_data += (d * d).sum()
            sumsq_diff += (df * df).sum()
        self.log.info(f"    [Backward] All net params (data, diff): L1 norm = ({g(asum_data)}, "
                      f"{g(asum_diff)}); L2 norm = ({g(math.sqrt(sumsq_data))}, "
                      f"{g(math.sqrt(sumsq_diff))})", "net.cpp:649")

    def _debug_update(self) -> None:
        g_ = self.net.graph
        owners = _param_owners(g_)
        for name in self.learnable:
            layer, idx = owners[name]
            shown = str(idx) if name == f"{layer}.{idx}" else name
            self.log.info(f"    [Update] Layer {layer}, param {shown} data: "
                          f"{g(mean_abs(g_.params[name].data))}; diff: "
                          f"{g(mean_abs(self.diffs[name]))}", "net.cpp:665")


# ---------------------------------------------------------------- the update rules

@_register
class SGDSolver(Solver):
    """history = local_rate * g + momentum * history; update = history."""
    type = "SGD"

    def compute_update_value(self, i, diff, rate):
        h = self.history[i]
        _axpby(self._local_rate(i, rate), diff, f32(self.param.momentum), h)
        diff[...] = h


@_register
class NesterovSolver(Solver):
    """h_new = local_rate * g + momentum * h; update = (1 + momentum) * h_new - momentum * h."""
    type = "Nesterov"

    def compute_update_value(self, i, diff, rate):
        m = f32(self.param.momentum)
        h = self.history[i]
        update = h.copy()
        _axpby(self._local_rate(i, rate), diff, m, h)
        _axpby(f32(1) + m, h, -m, update)
        diff[...] = update


class _NoMomentum(Solver):
    def check_rule(self, sp):
        if sp.momentum != 0:
            raise GraphcError(f"momentum cannot be used with {self.type} (it is "
                              f"{g(sp.momentum)})", where=self.filename,
                              hint="remove momentum (or set it to 0)")


@_register
class AdaGradSolver(_NoMomentum):
    """history += g^2; update = local_rate * g / (sqrt(history) + delta)."""
    type = "AdaGrad"

    def compute_update_value(self, i, diff, rate):
        h = self.history[i]
        h += diff * diff
        update = np.sqrt(h)
        update += f32(self.param.delta)
        diff[...] = self._local_rate(i, rate) * (diff / update)


@_register
class RMSPropSolver(_NoMomentum):
    """history = (1 - rms_decay) * g^2 + rms_decay * history;
    update = local_rate * g / (sqrt(history) + delta)."""
    type = "RMSProp"

    def check_rule(self, sp):
        super().check_rule(sp)
        if not 0 <= sp.rms_decay < 1:
            raise GraphcError(f"rms_decay is {g(sp.rms_decay)}", where=self.filename,
                              hint="rms_decay must lie in [0, 1)")

    def compute_update_value(self, i, diff, rate):
        decay = f32(self.param.rms_decay)
        h = self.history[i]
        _axpby(f32(1) - decay, diff * diff, decay, h)
        update = np.sqrt(h)
        update += f32(self.param.delta)
        diff[...] = self._local_rate(i, rate) * (diff / update)


@_register
class AdaDeltaSolver(Solver):
    """hg = (1-m) g^2 + m hg; dx = g * sqrt((hx + delta) / (hg + delta));
    hx = (1-m) dx^2 + m hx (the unscaled dx); update = local_rate * dx.  hg is the first
    history set, hx the second."""
    type = "AdaDelta"
    history_sets = 2

    def compute_update_value(self, i, diff, rate):
        m = f32(self.param.momentum)
        delta = f32(self.param.delta)
        hg = self.history[i]
        hx = self.history[len(self.learnable) + i]
        _axpby(f32(1) - m, diff * diff, m, hg)
        update = np.sqrt((delta + hx) / (delta + hg))
        diff *= update
        _axpby(f32(1) - m, diff * diff, m, hx)
        diff *= self._local_rate(i, rate)


@_register
class AdamSolver(Solver):
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    update = local_rate * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + delta), t = iter + 1
    (b1 = momentum, b2 = momentum2; the correction is computed in double, as in Caffe).
    m is the first history set, v the second."""
    type = "Adam"
    history_sets = 2

    def compute_update_value(self, i, diff, rate):
        b1, b2 = f32(self.param.momentum), f32(self.param.momentum2)
        t = self.iter + 1
        correction = f32(math.sqrt(1.0 - float(b2) ** t) / (1.0 - float(b1) ** t))
        m = self.history[i]
        v = self.history[len(self.learnable) + i]
        _axpby(f32(1) - b1, diff, b1, m)
        _axpby(f32(1) - b2, diff * diff, b2, v)
        update = np.sqrt(v)
        update += f32(self.param.delta)
        diff[...] = f32(self._local_rate(i, rate) * correction) * (m / update)


def get_solver(param, **kwargs) -> Solver:
    """The solver of the parameter's ``type`` (pycaffe's ``caffe.get_solver``)."""
    sp, filename = _load_param(param)
    cls = SOLVER_TYPES.get(sp.type)
    if cls is None:
        raise GraphcError(f"unknown solver type \"{sp.type}\"", where=filename,
                          hint="use one of: " + ", ".join(SOLVER_TYPES))
    return cls(param, **kwargs)


# ---------------------------------------------------------------- helpers

def _load_param(param) -> tuple[pb.SolverParameter, str | None]:
    """A SolverParameter (upgraded) and its file name.  From a file, an unset
    ``snapshot_prefix`` becomes the solver's path without extension, and a prefix naming a
    directory gets the solver file's stem appended (Caffe's UpgradeSnapshotPrefixProperty)."""
    if isinstance(param, pb.SolverParameter):
        try:
            return upgrade_solver(param), None
        except UpgradeError as e:
            raise e.located(where="<solver>")
    path = str(param)
    sp = read_solver(path)
    if not sp.HasField("snapshot_prefix"):
        sp.snapshot_prefix = str(Path(path).with_suffix(""))
    elif Path(sp.snapshot_prefix).is_dir():
        sp.snapshot_prefix = str(Path(sp.snapshot_prefix) / Path(path).stem)
    return sp, path


def _learnable_params(net) -> list[str]:
    """Param names in Caffe's learnable_params order: by layer, then blob; a shared param
    once, where it first appears."""
    seen: dict[str, None] = {}
    for n in net.graph.nodes:
        for p in n.params:
            seen.setdefault(p, None)
    for p in net.graph.params:     # params no node lists (none in a lowered net)
        seen.setdefault(p, None)
    return list(seen)


def _param_owners(graph) -> dict[str, tuple[str, int]]:
    owners: dict[str, tuple[str, int]] = {}
    for n in graph.nodes:
        for i, p in enumerate(n.params):
            owners.setdefault(p, (n.name, i))
    return owners


def _outputs_with_weights(graph) -> list[tuple[str, str, float]]:
    producers = graph.producers()
    out = []
    for v in graph.outputs:
        w = 0.0
        n = producers.get(v)
        if n is not None:
            weights = n.attrs.get("loss_weight") or []
            k = n.outputs.index(v)
            w = float(weights[k]) if k < len(weights) else 0.0
        out.append((graph.blob_of.get(v, v), v, w))
    return out


def _output_value(net, outs: dict, blob: str, v: str):
    if blob in outs:
        return outs[blob]
    return net.blobs[blob]


def _weighted_loss(net, outs: dict) -> np.float32:
    """The loss Caffe's Net::Forward returns: the sum over tops with a loss weight of
    weight * sum(top)."""
    g_ = net.graph
    last = g_.blob_versions()
    loss = f32(0)
    for n in g_.nodes:
        for v, w in zip(n.outputs, n.attrs.get("loss_weight") or []):
            if not w:
                continue
            blob = g_.blob_of.get(v, v)
            if blob in outs and v in g_.outputs:
                a = outs[blob]
            elif last.get(blob) == v:
                a = net.blobs[blob]
            else:
                continue
            loss = f32(loss + f32(w) * f32(np.asarray(a, np.float32).sum(dtype=np.float32)))
    return loss


def _share_trained_layers(test_net, train_net) -> None:
    """Caffe's ShareTrainedLayersWith: layers of the test net with the name of a train net
    layer use that layer's param arrays."""
    src = {n.name: n for n in train_net.graph.nodes if n.params}
    tg, sg = test_net.graph, train_net.graph
    for n in tg.nodes:
        other = src.get(n.name)
        if other is None or not n.params:
            continue
        if len(other.params) != len(n.params):
            raise GraphcError(f"layer '{n.name}' has {len(other.params)} param blob(s) in the "
                              f"train net and {len(n.params)} in the test net",
                              where=n.loc, layer=n.name, layer_type=n.op,
                              hint="a layer of the same name must be the same layer in both "
                                   "phases")
        for p, q in zip(n.params, other.params):
            tp, sq = tg.params[p], sg.params[q]
            if tuple(tp.type.shape) != tuple(sq.type.shape):
                raise GraphcError(f"param ${p} has shape {list(tp.type.shape)} in the test net "
                                  f"but {list(sq.type.shape)} in the train net",
                                  where=n.loc, layer=n.name, layer_type=n.op,
                                  hint="a layer of the same name must have the same shapes in "
                                       "both phases")
            tp.data = sq.data


def _resolve_beside(path: str, state_file) -> str:
    """``path`` as Caffe opens it (relative to the working directory); if absent there,
    the file of that name beside the state file."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return str(p)
    for alt in (Path(state_file).parent / p, Path(state_file).parent / p.name):
        if alt.exists():
            return str(alt)
    return str(p)
