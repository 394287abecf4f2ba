"""Training real nets (HDF5 data, Dropout, test nets): exact resume in-process and through
``graphc train --snapshot``, snapshots that survive SIGKILL, Ctrl-C, ``graphc test``,
debug_info, and divergence naming the layer."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import graphc
from graphc.frontend.caffemodel import read_caffemodel, read_solverstate
from graphc.frontend.prototxt import read_solver
from graphc.train import TrainingDiverged

NET = """name: "Tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
        hdf5_data_param { source: "train.txt" batch_size: 8 shuffle: true } }
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
        hdf5_data_param { source: "test.txt" batch_size: 10 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: HIDDEN weight_filler { type: "gaussian" std: 0.3 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
        include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """net: "tiny.prototxt"
test_iter: 2
test_interval: 5
type: "Adam"
base_lr: 0.02
momentum: 0.9
weight_decay: 0.001
lr_policy: "step"
gamma: 0.5
stepsize: 7
iter_size: 2
display: 1
max_iter: 20
snapshot: 10
snapshot_prefix: "snaps/tiny"
random_seed: 7
"""

LOSS_LINE = re.compile(r"\] (Iteration (\d+) \(.*\), loss = \S+)$")
TEST_LINE = re.compile(r"\] (    Test net output #\d+: .*)$")


def make_dir(path: Path, hidden: int = 16, solver: str = SOLVER, seed: int = 0) -> Path:
    import h5py
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 3))
    for name, n in (("train", 64), ("test", 20)):
        x = rng.normal(size=(n, 6)).astype(np.float32)
        y = np.argmax(x @ w, axis=1).astype(np.float32)
        with h5py.File(path / f"{name}.h5", "w") as f:
            f["data"] = x
            f["label"] = y
        (path / f"{name}.txt").write_text(f"{name}.h5\n")
    (path / "tiny.prototxt").write_text(NET.replace("HIDDEN", str(hidden)))
    (path / "solver.prototxt").write_text(solver)
    (path / "snaps").mkdir(exist_ok=True)
    return path


def run_graphc(args, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "graphc.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, **kw)


def loss_lines(log: str) -> dict[int, str]:
    return {int(m.group(2)): m.group(1) for line in log.splitlines()
            if (m := LOSS_LINE.search(line))}


# ---------------------------------------------------------------- resume

def test_resume_is_exact_in_process(tmp_path, monkeypatch):
    monkeypatch.chdir(make_dir(tmp_path))

    def run(resume=None):
        solver = graphc.get_solver("solver.prototxt")
        losses = {}
        solver.add_callback(on_gradients_ready=lambda: losses.__setitem__(solver.iter,
                                                                           solver.loss))
        solver.solve(resume)
        return solver, losses

    full, full_losses = run()
    assert sorted(full_losses) == list(range(20))
    assert len(set(float(v) for v in full_losses.values())) > 10   # it trains on new batches
    assert full.test_results[0]["accuracy"] > 0
    resumed, resumed_losses = run("snaps/tiny_iter_10.solverstate")
    assert sorted(resumed_losses) == list(range(10, 20))
    for it in range(10, 20):                       # bit-exact, not approximately equal
        assert resumed_losses[it] == full_losses[it], it
    for name in full.learnable:
        np.testing.assert_array_equal(resumed.net.graph.params[name].data,
                                      full.net.graph.params[name].data)
    for a, b in zip(resumed.history, full.history):
        np.testing.assert_array_equal(a, b)
    assert resumed.test_results == full.test_results


def test_resume_through_the_cli(tmp_path):
    d = make_dir(tmp_path)
    full = run_graphc(["train", "solver.prototxt"], d)
    assert full.returncode == 0, full.stderr
    assert (d / "snaps/tiny_iter_10.solverstate").exists()
    assert (d / "snaps/tiny_iter_20.caffemodel").exists()
    state = read_solverstate(d / "snaps/tiny_iter_10.solverstate")
    assert state.iter == 10 and state.learned_net == "snaps/tiny_iter_10.caffemodel"
    assert len(state.history) == 8          # Adam: m then v for 4 params
    assert state.current_step == 1          # step policy, stepsize 7

    resumed = run_graphc(["train", "solver.prototxt", "--snapshot",
                          "snaps/tiny_iter_10.solverstate"], d)
    assert resumed.returncode == 0, resumed.stderr
    a, b = loss_lines(full.stderr), loss_lines(resumed.stderr)
    assert sorted(a) == list(range(20)) and sorted(b) == list(range(10, 20))
    for it in range(10, 20):
        assert a[it].split(", loss =")[1] == b[it].split(", loss =")[1]
    # the tests at iterations 10, 15, 20 agree too
    tests_a = [m.group(1) for l in full.stderr.splitlines() if (m := TEST_LINE.search(l))]
    tests_b = [m.group(1) for l in resumed.stderr.splitlines() if (m := TEST_LINE.search(l))]
    assert tests_a[-len(tests_b):] == tests_b and len(tests_b) == 6
    assert "Restoring previous solver status from snaps/tiny_iter_10.solverstate" \
        in resumed.stderr
    w1 = read_caffemodel(d / "snaps/tiny_iter_20.caffemodel")
    assert list(w1) == ["ip1", "ip2"]

    # fine-tuning from weights, and both flags at once
    ft = run_graphc(["train", "solver.prototxt", "--weights", "snaps/tiny_iter_20.caffemodel",
                     "--iterations", "3"], d)
    assert ft.returncode == 0, ft.stderr
    assert "Finetuning from snaps/tiny_iter_20.caffemodel" in ft.stderr
    assert (d / "snaps/tiny_iter_3.caffemodel").exists()
    both = run_graphc(["train", "solver.prototxt", "--weights", "x", "--snapshot", "y"], d)
    assert both.returncode == 1 and "not both" in both.stderr

    # graphc test scores the trained weights like the solver's test did at iteration 20
    t = run_graphc(["test", "--model", "tiny.prototxt", "--weights",
                    "snaps/tiny_iter_20.caffemodel", "--iterations", "2"], d)
    assert t.returncode == 0, t.stderr
    assert re.search(r"\] Batch 0, accuracy = \S+$", t.stderr, re.M)
    final_acc = re.search(r"\] accuracy = (\S+)$", t.stderr, re.M).group(1)
    solver_acc = [l for l in full.stderr.splitlines() if "Test net output #0" in l][-1]
    assert solver_acc.endswith(f"accuracy = {final_acc}")
    assert re.search(r"\] loss = \S+ \(\* 1 = \S+ loss\)$", t.stderr, re.M)


def test_hdf5_snapshot_format_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(make_dir(tmp_path, solver=SOLVER.replace("max_iter: 20", "max_iter: 12")
                               + "snapshot_format: HDF5\n"))
    full = graphc.get_solver("solver.prototxt")
    full.solve()
    assert os.path.exists("snaps/tiny_iter_10.caffemodel.h5")
    assert os.path.exists("snaps/tiny_iter_12.solverstate.h5")
    resumed = graphc.get_solver("solver.prototxt")
    resumed.solve("snaps/tiny_iter_10.solverstate.h5")
    for name in full.learnable:
        np.testing.assert_array_equal(resumed.net.graph.params[name].data,
                                      full.net.graph.params[name].data)


# ---------------------------------------------------------------- signals and crashes

def _wait_for(proc, pattern: str, timeout: float = 60.0) -> list[str]:
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"never saw {pattern!r}:\n{''.join(seen)}")


def test_sigint_snapshots_and_stops(tmp_path):
    d = make_dir(tmp_path, solver=SOLVER.replace("max_iter: 20", "max_iter: 100000")
                 .replace("snapshot: 10", "snapshot: 0"))
    proc = subprocess.Popen([sys.executable, "-m", "graphc.cli", "train", "solver.prototxt"],
                            cwd=d, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, r"Iteration 3 \(")
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, rest
    assert "Optimization stopped early." in rest
    states = list((d / "snaps").glob("tiny_iter_*.solverstate"))
    assert len(states) == 1
    it = int(re.search(r"_iter_(\d+)", states[0].name).group(1))
    assert 3 < it < 100000
    assert read_solverstate(states[0]).iter == it
    assert list(read_caffemodel(d / f"snaps/tiny_iter_{it}.caffemodel")) == ["ip1", "ip2"]


def test_sighup_snapshots_and_goes_on(tmp_path):
    d = make_dir(tmp_path, solver=SOLVER.replace("max_iter: 20", "max_iter: 100000")
                 .replace("snapshot: 10", "snapshot: 0"))
    proc = subprocess.Popen([sys.executable, "-m", "graphc.cli", "train", "solver.prototxt",
                             "--sigint-effect", "none"], cwd=d, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for(proc, r"Iteration 2 \(")
        proc.send_signal(signal.SIGHUP)
        _wait_for(proc, r"Snapshotting solver state")
        _wait_for(proc, r"Iteration \d+ \(")          # still training
        proc.send_signal(signal.SIGINT)                 # ignored (--sigint-effect none)
        _wait_for(proc, r"Iteration \d+ \(")
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()
    assert len(list((d / "snaps").glob("tiny_iter_*.solverstate"))) == 1


def test_sigkill_never_leaves_a_truncated_snapshot(tmp_path):
    """Snapshot every iteration with big params, kill -9 at random moments: every file
    under a final name is complete."""
    d = make_dir(tmp_path, hidden=40000,
                 solver=SOLVER.replace("max_iter: 20", "max_iter: 100000")
                 .replace("snapshot: 10", "snapshot: 1").replace("test_interval: 5",
                                                                   "test_interval: 100000"))
    rng = np.random.default_rng()
    leftovers = 0
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "graphc.cli", "train",
                                 "solver.prototxt"], cwd=d, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(proc, r"Snapshotting to binary proto file snaps/tiny_iter_2\.")
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            proc.kill()
        models = sorted((d / "snaps").glob("tiny_iter_*.caffemodel"))
        assert len(models) >= 1        # iteration 1's snapshot at least
        leftovers += len(list((d / "snaps").glob(".*.tmp")))   # killed mid-write
        for m in models:
            w = read_caffemodel(m)
            assert [b.shape for b in w["ip1"].blobs] == [(40000, 6), (40000,)]
            assert [b.shape for b in w["ip2"].blobs] == [(3, 40000), (3,)]
        for s in (d / "snaps").glob("tiny_iter_*.solverstate"):
            st = read_solverstate(s)
            assert len(st.history) == 8
            assert [list(h.shape.dim) for h in st.history[:3]] == [[40000, 6], [40000],
                                                                   [3, 40000]]
            assert all(len(h.data) == int(np.prod(h.shape.dim)) for h in st.history)
            assert (d / st.learned_net).exists()
        for f in (d / "snaps").iterdir():      # start the next attempt clean
            f.unlink()


# ---------------------------------------------------------------- debug_info, divergence

def test_debug_info(tmp_path, monkeypatch):
    import io
    monkeypatch.chdir(make_dir(tmp_path))
    sp = read_solver("solver.prototxt")
    sp.debug_info = True
    sp.snapshot_after_train = False
    log = io.StringIO()
    solver = graphc.get_solver(sp, log=log)
    solver.step(1)
    text = log.getvalue()
    w = solver.net.graph.params["ip1.0"].data
    mean = np.abs(w.astype(np.float64)).mean()
    m = re.search(r"\[Update\] Layer ip1, param 0 data: (\S+); diff: (\S+)", text)
    assert m and abs(float(m.group(1)) - mean) <= 1e-5 * mean
    assert abs(float(m.group(2)) - np.abs(solver.diffs["ip1.0"]).mean()) <= \
        1e-5 * np.abs(solver.diffs["ip1.0"]).mean()
    fw = re.search(r"\[Forward\] Layer ip2, top blob ip2 data: (\S+)", text)
    assert abs(float(fw.group(1)) - np.abs(solver.net.blobs["ip2"]).mean()) <= 1e-5
    assert "[Forward] Layer relu1, top blob ip1 data:" in text
    assert re.search(r"\[Backward\] Layer ip2, bottom blob ip1 diff: \S+", text)
    assert re.search(r"\[Backward\] Layer ip1, param blob 0 diff: \S+", text)
    assert "[Backward] Layer ip1, bottom blob data" not in text     # data needs no diff
    assert "[Backward] All net params (data, diff): L1 norm = (" in text


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_names_the_layer(tmp_path, monkeypatch):
    monkeypatch.chdir(make_dir(tmp_path, solver=SOLVER.replace('type: "Adam"', 'type: "SGD"')
                               .replace("base_lr: 0.02", "base_lr: 1e12")))
    solver = graphc.get_solver("solver.prototxt")
    with pytest.raises(TrainingDiverged) as e:
        solver.solve()
    err = e.value
    assert err.layer in ("ip1", "ip2", "relu1", "drop1", "loss")
    assert err.layer_type is not None and "tiny.prototxt:" in err.where
    assert "first layer whose output" in str(err)
    assert "base_lr" in err.hint
    bad = solver.net.blobs[solver.net.graph.blob_of[solver.net.graph.node(err.layer).outputs[0]]]
    assert not np.all(np.isfinite(bad))
    # the CLI reports it as one clear error (exit status 1, no traceback)
    r = run_graphc(["train", "solver.prototxt"], tmp_path)
    assert r.returncode == 1
    assert "graphc: error:" in r.stderr and "Traceback" not in r.stderr
    assert f"layer '{err.layer}'" in r.stderr


def test_paths_relative_to_cwd_then_solver_dir(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    exp.mkdir()
    make_dir(exp, solver=SOLVER.replace("max_iter: 20", "max_iter: 2"))
    monkeypatch.chdir(tmp_path)
    # the net and its data are found beside the solver; snapshot_prefix is relative to
    # the working directory, as in Caffe, and a missing directory fails before training
    with pytest.raises(graphc.GraphcError, match="cannot write snapshots") as e:
        graphc.get_solver("exp/solver.prototxt")
    assert "snapshot_prefix" in e.value.hint
    (tmp_path / "snaps").mkdir()
    solver = graphc.get_solver("exp/solver.prototxt")
    solver.solve()
    assert (tmp_path / "snaps/tiny_iter_2.caffemodel").exists()
    missing = read_solver(exp / "solver.prototxt")
    missing.net = "nope.prototxt"
    with pytest.raises(graphc.GraphcError, match="'nope.prototxt' does not exist"):
        graphc.get_solver(missing)
