"""Solvers on synthetic gradients: every update rule, learning-rate policy, weight decay,
clipping, iter_size and loss smoothing against a naive float64 implementation written from
Caffe's formulas; solver states (binary and HDF5) and resuming; parameter checks; the log
format; divergence; signals.  Training real nets: test_solver_train.py."""
from __future__ import annotations

import io
import math
import os
import re
import signal

import numpy as np
import pytest

from graphc.errors import GraphcError
from graphc.frontend import caffe_pb2 as pb
from graphc.frontend.caffemodel import read_caffemodel
from graphc.frontend.prototxt import parse_solver_text
from graphc.frontend.weights import load_weights_into
from graphc.ir.graph import Graph, Node, Param
from graphc.ir.types import TensorType
from graphc.train import SOLVER_TYPES, TrainingDiverged, get_solver
from graphc.train.policies import learning_rate
from graphc.train.signals import SignalHandler
from graphc.train.snapshot import read_state

# ---------------------------------------------------------------- a fake net


class QuadNet:
    """A net whose loss is sum_p 0.5 * sum(A_p * (w_p - T_p - 0.1 k)^2), k = the call number
    (so every forward/backward call sees a different "batch").  Layer "a" has params a.0
    and "shared", layer "b" has "shared" (the same param again) and b.1."""

    LAYERS = {"a": ["a.0", "shared"], "b": ["shared", "b.1"]}

    def __init__(self, rng, lr_mult=None, decay_mult=None, scale=1.0):
        shapes = {"a.0": (3, 4), "shared": (5,), "b.1": (2, 2, 2)}
        g = Graph("quad")
        for name, shape in shapes.items():
            g.add_param(Param(name, TensorType(shape), (lr_mult or {}).get(name, 1.0),
                              (decay_mult or {}).get(name, 1.0),
                              rng.normal(size=shape).astype(np.float32)))
        for layer, ps in self.LAYERS.items():
            g.add_node(Node("InnerProduct", layer, [], [f"{layer}_out"], list(ps)),
                       [TensorType((1,))])
        g.add_node(Node("EuclideanLoss", "loss", [], ["loss"], attrs={"loss_weight": [1.0]}),
                   [TensorType(())])
        g.outputs = ["loss"]
        self.graph = g
        self.A = {n: rng.uniform(0.5, 2.0, size=s).astype(np.float32) * scale
                  for n, s in shapes.items()}
        self.T = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
        self.calls = 0
        self.blobs = {}
        self.grads = {}

    def targets(self, name, k):
        return self.T[name].astype(np.float64) + 0.1 * k

    def forward_backward(self):
        k = self.calls
        self.calls += 1
        loss = np.float32(0)
        self.grads = {}
        for name, p in self.graph.params.items():
            r = p.data - self.targets(name, k).astype(np.float32)
            self.grads[name] = (self.A[name] * r).astype(np.float32)
            loss += np.float32(0.5) * np.float32((self.A[name] * r * r).sum())
        self.blobs["loss"] = np.array(loss, np.float32)
        return float(loss)

    def forward(self):
        self.forward_backward()
        return {"loss": self.blobs["loss"]}

    def copy_from(self, path):
        load_weights_into(self.graph, path)


def solver_param(kind: str, text: str = "") -> pb.SolverParameter:
    defaults = {"SGD": "momentum: 0.9", "Nesterov": "momentum: 0.95", "AdaGrad": "",
                "RMSProp": "rms_decay: 0.9", "AdaDelta": "momentum: 0.95 delta: 1e-6",
                "Adam": "momentum: 0.9 momentum2: 0.999"}
    base_lr = {"AdaDelta": 1.0, "Adam": 0.05}.get(kind, 0.05)
    sp = parse_solver_text(f'type: "{kind}" base_lr: {base_lr} lr_policy: "fixed" '
                           f'display: 0 max_iter: 10 snapshot_after_train: false '
                           f'{defaults[kind]}')
    sp.MergeFrom(parse_solver_text(text))     # later settings win
    return sp


# ---------------------------------------------------------------- the naive reference

def ref_rate(sp, it, state):
    base, gamma, power = sp.base_lr, sp.gamma, sp.power
    p = sp.lr_policy
    if p == "fixed":
        return base
    if p == "step":
        return base * gamma ** math.floor(it / sp.stepsize)
    if p == "exp":
        return base * gamma ** it
    if p == "inv":
        return base * (1 + gamma * it) ** (-power)
    if p == "multistep":
        if state["step"] < len(sp.stepvalue) and it >= sp.stepvalue[state["step"]]:
            state["step"] += 1
        return base * gamma ** state["step"]
    if p == "poly":
        return base * (1 - it / sp.max_iter) ** power
    if p == "sigmoid":
        return base / (1 + math.exp(-gamma * (it - sp.stepsize)))
    raise ValueError(p)


def reference_train(net0: QuadNet, sp, iters: int):
    """Caffe's Step + ApplyUpdate in float64 with plain loops.  Returns (weights, history
    as two dicts, losses)."""
    kind = sp.type
    names = ["a.0", "shared", "b.1"]
    w = {n: net0.graph.params[n].data.astype(np.float64).ravel().tolist() for n in names}
    h1 = {n: [0.0] * len(w[n]) for n in names}
    h2 = {n: [0.0] * len(w[n]) for n in names}
    A = {n: net0.A[n].astype(np.float64).ravel().tolist() for n in names}
    state = {"step": 0}
    losses = []
    for it in range(iters):
        acc = {n: [0.0] * len(w[n]) for n in names}
        loss = 0.0
        for s in range(sp.iter_size):
            k = it * sp.iter_size + s
            for n in names:
                t = net0.targets(n, k).ravel().tolist()
                for j in range(len(w[n])):
                    r = w[n][j] - t[j]
                    acc[n][j] += A[n][j] * r
                    loss += 0.5 * A[n][j] * r * r
        losses.append(loss / sp.iter_size)
        rate = ref_rate(sp, it, state)
        if sp.clip_gradients >= 0:
            norm = math.sqrt(sum(x * x for n in names for x in acc[n]))
            if norm > sp.clip_gradients:
                for n in names:
                    acc[n] = [x * sp.clip_gradients / norm for x in acc[n]]
        for n in names:
            p = net0.graph.params[n]
            lr = rate * p.lr_mult
            decay = sp.weight_decay * p.decay_mult
            for j in range(len(w[n])):
                gj = acc[n][j] / sp.iter_size
                if sp.regularization_type == "L2":
                    gj += decay * w[n][j]
                else:
                    gj += decay * ((w[n][j] > 0) - (w[n][j] < 0))
                m, delta = sp.momentum, sp.delta
                if kind == "SGD":
                    h1[n][j] = m * h1[n][j] + lr * gj
                    u = h1[n][j]
                elif kind == "Nesterov":
                    old = h1[n][j]
                    h1[n][j] = m * h1[n][j] + lr * gj
                    u = (1 + m) * h1[n][j] - m * old
                elif kind == "AdaGrad":
                    h1[n][j] += gj * gj
                    u = lr * gj / (math.sqrt(h1[n][j]) + delta)
                elif kind == "RMSProp":
                    d = sp.rms_decay
                    h1[n][j] = d * h1[n][j] + (1 - d) * gj * gj
                    u = lr * gj / (math.sqrt(h1[n][j]) + delta)
                elif kind == "AdaDelta":
                    h1[n][j] = m * h1[n][j] + (1 - m) * gj * gj
                    dx = gj * math.sqrt((h2[n][j] + delta) / (h1[n][j] + delta))
                    h2[n][j] = m * h2[n][j] + (1 - m) * dx * dx
                    u = lr * dx
                elif kind == "Adam":
                    b1, b2, t = sp.momentum, sp.momentum2, it + 1
                    h1[n][j] = b1 * h1[n][j] + (1 - b1) * gj
                    h2[n][j] = b2 * h2[n][j] + (1 - b2) * gj * gj
                    u = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * h1[n][j] / \
                        (math.sqrt(h2[n][j]) + delta)
                w[n][j] -= u
    return w, h1, h2, losses


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_against_reference(rng, kind, text="", iters=8, lr_mult=None, decay_mult=None,
                            tol=2e-5):
    sp = solver_param(kind, text)
    net = QuadNet(rng, lr_mult, decay_mult)
    ref_net = QuadNet(np.random.default_rng(0), lr_mult, decay_mult)
    for n in net.graph.params:       # the same start for both
        ref_net.graph.params[n].data = net.graph.params[n].data.copy()
    ref_net.A, ref_net.T = net.A, net.T
    w0 = {n: p.data.copy() for n, p in net.graph.params.items()}
    losses = []
    solver = get_solver(sp, net=net, test_nets=[])
    solver.add_callback(on_gradients_ready=lambda: losses.append(float(solver.loss)))
    solver.step(iters)
    w, h1, h2, ref_losses = reference_train(ref_net, sp, iters)
    names = solver.learnable
    assert names == ["a.0", "shared", "b.1"]
    got = np.concatenate([net.graph.params[n].data.ravel() for n in names])
    want = np.concatenate([w[n] for n in names])
    moved = np.concatenate([(net.graph.params[n].data - w0[n]).ravel() for n in names])
    assert np.abs(moved).max() > 1e-3, "the weights did not move; the test would prove nothing"
    assert rel_err(got, want) < tol, (kind, text, rel_err(got, want))
    assert rel_err(losses, ref_losses) < tol
    hist = solver.history
    assert len(hist) == solver.history_sets * 3
    assert rel_err(np.concatenate([h.ravel() for h in hist[:3]]),
                   np.concatenate([h1[n] for n in names])) < tol
    if solver.history_sets == 2:
        assert rel_err(np.concatenate([h.ravel() for h in hist[3:]]),
                       np.concatenate([h2[n] for n in names])) < tol
    assert solver.iter == iters
    return solver


# ---------------------------------------------------------------- update rules

@pytest.mark.parametrize("kind", list(SOLVER_TYPES))
def test_rule_matches_reference(rng, kind):
    check_against_reference(rng, kind, "weight_decay: 0.01")


@pytest.mark.parametrize("kind", list(SOLVER_TYPES))
def test_rule_lr_mult_decay_mult_l1_iter_size(rng, kind):
    check_against_reference(rng, kind, 'weight_decay: 0.02 regularization_type: "L1" '
                                       'iter_size: 3 lr_policy: "inv" gamma: 0.1 power: 0.75',
                            lr_mult={"a.0": 2.0, "b.1": 0.0}, decay_mult={"shared": 0.0,
                                                                         "b.1": 3.0})


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_clip_gradients(rng, kind):
    solver = check_against_reference(rng, kind, "clip_gradients: 0.5 weight_decay: 0.001")
    # the clip happened (the summed gradient norm is far above 0.5)
    assert solver.param.clip_gradients == 0.5


@pytest.mark.parametrize("policy", [
    'lr_policy: "fixed"', 'lr_policy: "step" stepsize: 3 gamma: 0.5',
    'lr_policy: "exp" gamma: 0.9', 'lr_policy: "inv" gamma: 0.2 power: 0.75',
    'lr_policy: "multistep" stepvalue: 2 stepvalue: 5 gamma: 0.3',
    'lr_policy: "poly" power: 1.5', 'lr_policy: "sigmoid" gamma: 0.5 stepsize: 4'])
def test_policy_in_training(rng, policy):
    check_against_reference(rng, "SGD", policy)


def test_learning_rate_values():
    sp = parse_solver_text('base_lr: 0.01 gamma: 0.1 power: 0.75 stepsize: 10 max_iter: 100 '
                           'stepvalue: 5 stepvalue: 7 stepvalue: 30')
    for policy in ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid"):
        sp.lr_policy = policy
        state = {"step": 0}
        cs = 0
        for it in range(0, 60):
            rate, cs = learning_rate(sp, it, cs)
            want = ref_rate(sp, it, state)
            assert isinstance(rate, np.float32)
            assert abs(float(rate) - want) <= 1e-6 * abs(want) + 1e-30, (policy, it)
        if policy == "multistep":
            assert cs == 3


def test_inv_rate_matches_caffe_log():
    """The lr values Caffe logged for the golden SGD run (lenet_solver settings)."""
    sp = parse_solver_text('base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75')
    logged = {0: "0.01", 1: "0.00999925", 2: "0.0099985", 192: "0.00985838",
              199: "0.0098533"}
    for it, text in logged.items():
        assert "%g" % learning_rate(sp, it, 0)[0] == text


def test_smoothed_loss(rng):
    sp = solver_param("SGD", "average_loss: 4")
    net = QuadNet(rng)
    solver = get_solver(sp, net=net, test_nets=[])
    losses, smoothed = [], []

    def ready():
        losses.append(float(solver.loss))
        smoothed.append(float(solver.smoothed_loss))

    solver.add_callback(on_gradients_ready=ready)
    solver.step(9)
    for i in range(9):
        window = losses[max(0, i - 3):i + 1]
        assert abs(smoothed[i] - sum(window) / len(window)) < 1e-5 * abs(smoothed[i])


# ---------------------------------------------------------------- checks

@pytest.mark.parametrize("text,what", [
    ('type: "AdaGrad" momentum: 0.9', "momentum cannot be used with AdaGrad"),
    ('type: "RMSProp" momentum: 0.9', "momentum cannot be used with RMSProp"),
    ('type: "RMSProp" rms_decay: 1.5', "rms_decay"),
    ('type: "Foo"', "unknown solver type"),
    ('lr_policy: "bogus"', "unknown lr_policy"),
    ('lr_policy: "step"', "stepsize"),
    ('regularization_type: "L3"', "regularization_type"),
    ('test_iter: 3', "test_interval"),
    ('snapshot: 10 snapshot_prefix: "/nonexistent/dir/x"', "cannot write snapshots"),
    ('average_loss: 0', "average_loss"),
])
def test_bad_solver_params(rng, text, what):
    base = 'base_lr: 0.1 lr_policy: "fixed" '
    sp = parse_solver_text(base + text if "lr_policy" not in text else "base_lr: 0.1 " + text)
    with pytest.raises(GraphcError) as e:
        get_solver(sp, net=QuadNet(rng), test_nets=[])
    assert what in str(e.value)
    assert e.value.hint


def test_no_lr_policy(rng):
    with pytest.raises(GraphcError, match="no lr_policy"):
        get_solver(parse_solver_text("base_lr: 0.1"), net=QuadNet(rng), test_nets=[])


# ---------------------------------------------------------------- snapshots

@pytest.mark.parametrize("kind,fmt", [("SGD", "BINARYPROTO"), ("Adam", "BINARYPROTO"),
                                      ("AdaDelta", "HDF5"), ("Nesterov", "HDF5")])
def test_snapshot_restore_continues_exactly(rng, tmp_path, monkeypatch, kind, fmt):
    monkeypatch.chdir(tmp_path)
    sp = solver_param(kind, f'weight_decay: 0.01 snapshot_prefix: "snap" '
                            f'snapshot_format: {fmt} lr_policy: "multistep" gamma: 0.5 '
                            f'stepvalue: 3 stepvalue: 8')
    seed_net = QuadNet(rng)

    def fresh():
        net = QuadNet(np.random.default_rng(1))
        for n, p in seed_net.graph.params.items():
            net.graph.params[n].data = p.data.copy()
        net.A, net.T = seed_net.A, seed_net.T
        return net

    full = get_solver(sp, net=fresh(), test_nets=[])
    full.step(10)
    first = get_solver(sp, net=fresh(), test_nets=[])
    first.step(5)
    state_file = first.snapshot()
    ext = ".h5" if fmt == "HDF5" else ""
    assert state_file == f"snap_iter_5.solverstate{ext}"
    assert os.path.exists(f"snap_iter_5.caffemodel{ext}")
    st = read_state(state_file)
    assert st.iter == 5 and st.current_step == 1
    assert st.learned_net == f"snap_iter_5.caffemodel{ext}"
    assert len(st.history) == first.history_sets * 3
    for a, b in zip(st.history, first.history):
        np.testing.assert_array_equal(a, b)
    weights = read_caffemodel(f"snap_iter_5.caffemodel{ext}")
    np.testing.assert_array_equal(weights["a"].blobs[0], first.net.graph.params["a.0"].data)
    np.testing.assert_array_equal(weights["b"].blobs[0], first.net.graph.params["shared"].data)

    net = fresh()
    net.calls = 5          # the fake net's "data position" (real nets are replayed)
    resumed = get_solver(sp, net=net, test_nets=[])
    resumed.restore(state_file)
    assert resumed.iter == 5 and resumed.current_step == 1
    resumed.step(5)
    for n in full.learnable:
        np.testing.assert_array_equal(resumed.net.graph.params[n].data,
                                      full.net.graph.params[n].data)
    for a, b in zip(resumed.history, full.history):
        np.testing.assert_array_equal(a, b)


def test_binary_solverstate_is_caffes_message(rng, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    solver = get_solver(solver_param("Adam", 'snapshot_prefix: "p"'), net=QuadNet(rng),
                        test_nets=[])
    solver.step(2)
    path = solver.snapshot()
    msg = pb.SolverState()
    msg.ParseFromString(open(path, "rb").read())
    assert msg.iter == 2 and msg.learned_net == "p_iter_2.caffemodel"
    assert len(msg.history) == 6
    assert list(msg.history[3].shape.dim) == [3, 4]      # second set: v of a.0
    np.testing.assert_array_equal(np.array(msg.history[4].data, np.float32),
                                  solver.history[4].ravel())
    net = pb.NetParameter()
    net.ParseFromString(open("p_iter_2.caffemodel", "rb").read())
    assert [(l.name, l.type, len(l.blobs)) for l in net.layer] == \
        [("a", "InnerProduct", 2), ("b", "InnerProduct", 2)]


def test_snapshot_diff(rng, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    solver = get_solver(solver_param("SGD", 'snapshot_prefix: "d" snapshot_diff: true'),
                        net=QuadNet(rng), test_nets=[])
    solver.step(1)
    solver.snapshot()
    net = pb.NetParameter()
    net.ParseFromString(open("d_iter_1.caffemodel", "rb").read())
    np.testing.assert_array_equal(np.array(net.layer[0].blobs[0].diff, np.float32),
                                  solver.diffs["a.0"].ravel())
    assert np.abs(solver.diffs["a.0"]).max() > 0


def test_restore_wrong_solver_type(rng, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sgd = get_solver(solver_param("SGD", 'snapshot_prefix: "s"'), net=QuadNet(rng),
                     test_nets=[])
    sgd.step(1)
    path = sgd.snapshot()
    adam = get_solver(solver_param("Adam"), net=QuadNet(rng), test_nets=[])
    with pytest.raises(GraphcError, match="history blob") as e:
        adam.restore(path)
    assert "same" in e.value.hint or "solver type" in e.value.hint


def test_restore_not_a_state(rng, tmp_path):
    p = tmp_path / "x.solverstate"
    p.write_text('net: "a.prototxt"\n')
    s = get_solver(solver_param("SGD"), net=QuadNet(rng), test_nets=[])
    with pytest.raises(GraphcError, match="not a binary .solverstate"):
        s.restore(p)


def test_solve_snapshots_after_train_and_every_n(rng, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sp = solver_param("SGD", 'snapshot: 4 snapshot_prefix: "out/m" max_iter: 10 display: 5')
    (tmp_path / "out").mkdir()
    sp.snapshot_after_train = True
    log = io.StringIO()
    solver = get_solver(sp, net=QuadNet(rng), test_nets=[], log=log)
    solver.solve()
    names = sorted(os.listdir("out"))
    assert names == ["m_iter_10.caffemodel", "m_iter_10.solverstate", "m_iter_4.caffemodel",
                     "m_iter_4.solverstate", "m_iter_8.caffemodel", "m_iter_8.solverstate"]
    text = log.getvalue()
    assert "Snapshotting solver state to binary proto file out/m_iter_8.solverstate" in text
    assert "Optimization Done." in text


# ---------------------------------------------------------------- log, divergence, signals

GLOG = re.compile(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] (.*)$")


def test_log_lines_parse_like_caffes(rng):
    log = io.StringIO()
    sp = solver_param("SGD", "display: 2 max_iter: 6")
    solver = get_solver(sp, net=QuadNet(rng), test_nets=[], log=log)
    losses = []
    solver.add_callback(on_gradients_ready=lambda: losses.append(float(solver.loss)))
    solver.solve()
    lines = log.getvalue().splitlines()
    msgs = []
    for line in lines:
        m = GLOG.match(line)
        assert m, line
        msgs.append(m.group(1))
    # the regular expressions of Caffe's tools/extra/parse_log.py
    iters = [(int(m.group(1)), float(m.group(2))) for s in msgs
             if (m := re.search(r"Iteration (\d+) \(.*\), loss = ([\.\deE+-]+)", s))]
    assert [i for i, _ in iters] == [0, 2, 4]
    for i, loss in iters:
        assert loss == float("%g" % np.float32(losses[i]))
    lrs = [s for s in msgs if re.search(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)", s)]
    assert lrs[0] == "Iteration 0, lr = 0.05"
    outs = [s for s in msgs if "Train net output #0" in s]
    assert re.fullmatch(r"    Train net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)",
                        outs[0])
    assert msgs[-1] == "Optimization Done."
    assert any(re.fullmatch(r"Iteration 6, loss = [\d.e+-]+", s) for s in msgs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_is_an_error(rng):
    net = QuadNet(rng, scale=1e3)
    solver = get_solver(solver_param("SGD", "base_lr: 10"), net=net, test_nets=[])
    with pytest.raises(TrainingDiverged) as e:
        solver.step(100)
    assert "training loss is" in str(e.value)
    assert re.search(r"loss is (nan|inf)", str(e.value))
    assert "base_lr" in e.value.hint
    assert solver.iter < 100


def test_signal_handler_actions():
    # the handler the process had (SIG_IGN where pytest was started in the background)
    before = signal.getsignal(signal.SIGINT)
    with SignalHandler("stop", "snapshot") as h:
        assert h.action() == "none"
        os.kill(os.getpid(), signal.SIGHUP)
        assert h.action() == "snapshot"
        assert h.action() == "none"
        os.kill(os.getpid(), signal.SIGINT)
        assert h.action() == "stop"
        with pytest.raises(KeyboardInterrupt):     # a second Ctrl-C: quit now
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_action_function_stops_and_snapshots(rng, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sp = solver_param("SGD", 'max_iter: 50 snapshot_prefix: "a"')
    sp.snapshot_after_train = True
    requests = iter(["none", "snapshot", "none", "stop"])
    solver = get_solver(sp, net=QuadNet(rng), test_nets=[])
    solver.set_action_function(lambda: next(requests, "none"))
    solver.solve()
    assert solver.iter == 4
    assert sorted(os.listdir(".")) == ["a_iter_2.caffemodel", "a_iter_2.solverstate",
                                       "a_iter_4.caffemodel", "a_iter_4.solverstate"]
