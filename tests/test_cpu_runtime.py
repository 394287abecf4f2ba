"""The compiled library as users see it: `graphc compile` / `graphc time`, the C example
built with cc, the C API's errors for wrong inputs (called through ctypes), concurrent
contexts, thread counts, weights beside the library, the build cache, Net(backend="cpu"),
and what the library links against."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

import graphc
from graphc.cli import main
from graphc.errors import GraphcError
from graphc.runtime.build import cached_library, find_cc
from graphc.runtime.loader import open_library
from graphc.runtime.testing import assert_close, compile_graph, net_from_text

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "examples" / "lenet.prototxt"

NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 20 dim: 20 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 16 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 24 kernel_size: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv2" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.fixture(autouse=True)
def cpu_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE", str(tmp_path_factory.getbasetemp() / "graphc-cache"))


@pytest.fixture
def small(tmp_path, rng):
    """(net with random weights, its library path, an input)."""
    net = net_from_text(NET, tmp_path, rng=rng)
    return net, cached_library(net.graph), rng.standard_normal((2, 3, 20, 20)).astype(np.float32)


def lenet_golden(shared_dir):
    d = shared_dir / "golden" / "lenet"
    return d, np.load(d / "input.npy"), np.load(d / "outputs.npz")["prob"]


# ---------------------------------------------------------------------------------------
# command line and C


def test_compile_and_c_example(shared_dir, tmp_path, capsys):
    d, x, prob = lenet_golden(shared_dir)
    out = tmp_path / "net.so"
    assert main(["compile", str(d / "net.prototxt"), "--weights", str(d / "lenet.caffemodel"),
                 "--batch", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "net.h" in text and "weights embedded" in text
    header = (tmp_path / "net.h").read_text()
    assert "GRAPHC_INPUT0_SHAPE { 2, 1, 28, 28 }" in header
    assert "int graphc_set_input(" in header
    # the same library from Python
    got = graphc.load(out).forward(data=x)["prob"]
    assert np.abs(got - prob).max() < 1e-5
    # the C example, built with cc against the header and the library
    exe = tmp_path / "classify"
    cc = find_cc()
    r = subprocess.run([*cc, "-O2", "-Wall", "-Werror", "-I", str(tmp_path),
                        str(ROOT / "examples" / "classify.c"), str(out),
                        f"-Wl,-rpath,{tmp_path}", "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.save(tmp_path / "input.npy", x)
    r = subprocess.run([str(exe), str(tmp_path / "input.npy"), "--check-errors", "--top", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout + r.stderr
    assert r.stdout.count("\nok ") + r.stdout.startswith("ok ") == 10
    for item, row in enumerate(prob):
        m = re.search(rf"item {item}: (\d+) \(([0-9.]+)\)", r.stdout)
        assert m, r.stdout
        assert int(m.group(1)) == int(np.argmax(row))
        assert abs(float(m.group(2)) - row.max()) < 1e-4
    # a wrong input file is reported, not crashed on
    (tmp_path / "short.f32").write_bytes(b"\0" * 12)
    r = subprocess.run([str(exe), str(tmp_path / "short.f32")], capture_output=True, text=True)
    assert r.returncode == 1 and "needs 1568 floats" in r.stderr


def test_time_command(tmp_path, capsys, rng):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    assert main(["time", str(path), "--iterations", "3", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "Average Forward pass:" in out
    for layer in ("conv1+relu1", "pool1", "conv2", "ip", "prob"):
        assert re.search(rf"^\s+{re.escape(layer)}\s", out, re.M), out
    ms = float(re.search(r"Average Forward pass: ([0-9.]+) ms", out).group(1))
    assert 0 < ms < 1000


def test_compile_errors(tmp_path, capsys, monkeypatch):
    path = tmp_path / "net.prototxt"
    # BatchNorm with batch statistics: a training-time computation the backend refuses
    path.write_text(NET.replace('type: "Softmax" bottom: "ip" top: "prob"',
                                'type: "BatchNorm" bottom: "ip" top: "prob" '
                                'batch_norm_param { use_global_stats: false }'))
    assert main(["compile", str(path), "-o", str(tmp_path / "x.so")]) == 1
    err = capsys.readouterr().err
    assert "layer 'prob' (BatchNorm)" in err and "hint:" in err and "Traceback" not in err
    assert not (tmp_path / "x.so").exists()
    path.write_text(NET)
    monkeypatch.setenv("CC", "/no/such/compiler")
    assert main(["compile", str(path), "-o", str(tmp_path / "x.so")]) == 1
    assert "CC='/no/such/compiler'" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC")
    with pytest.raises(GraphcError, match="no C compiler found"):
        find_cc()


# ---------------------------------------------------------------------------------------
# the C API through ctypes: wrong inputs give an error code and a message


def test_c_api_errors(small):
    net, lib_path, x = small
    lib = open_library(lib_path)
    msg = lambda ctx: lib.graphc_error_message(ctx).decode()  # noqa: E731
    assert lib.graphc_create_ex(None, 0, None) == 1 and "NULL" in msg(None)
    assert lib.graphc_create_ex(ctypes.byref(ctypes.c_void_p()), -3, None) == 1
    assert "num_threads -3" in msg(None)
    ctx = ctypes.c_void_p()
    assert lib.graphc_create_ex(ctypes.byref(ctx), 2, None) == 0 and ctx.value
    try:
        shape = (ctypes.c_int64 * 4)(2, 3, 20, 20)
        data = x.ctypes.data
        out = np.empty((2, 10), np.float32)
        assert lib.graphc_run(ctx) == 8 and "'data' was never set" in msg(ctx)
        assert lib.graphc_get_output(ctx, b"prob", 0, out.ctypes.data, 20) == 8
        short = (ctypes.c_int64 * 4)(1, 3, 20, 20)
        cases = [   # (call, status, context holding the message, text of the message)
            (lambda: lib.graphc_set_input(None, b"data", 0, data, shape, 4), 1, None,
             "context is NULL"),
            (lambda: lib.graphc_set_input(ctx, None, 0, data, shape, 4), 1, ctx, "name is NULL"),
            (lambda: lib.graphc_set_input(ctx, b"data", 0, None, shape, 4), 1, ctx,
             "data pointer"),
            (lambda: lib.graphc_set_input(ctx, b"data", 0, data, None, 4), 1, ctx,
             "shape pointer"),
            (lambda: lib.graphc_set_input(ctx, b"dta", 0, data, shape, 4), 2, ctx,
             "inputs are: 'data'"),
            (lambda: lib.graphc_set_input(ctx, b"data", 3, data, shape, 4), 4, ctx,
             "dtype code 3"),
            (lambda: lib.graphc_set_input(ctx, b"data", 0, data, shape, 3), 3, ctx, "[2,3,20]"),
            (lambda: lib.graphc_set_input(ctx, b"data", 0, data, short, 4), 3, ctx,
             "compiled for [2,3,20,20]"),
            (lambda: lib.graphc_set_input(ctx, b"data", 0, data, shape, 99), 3, ctx, "ndim 99"),
        ]
        for call, want, c, text in cases:
            rc = call()
            assert rc == want, (text, rc)
            assert text in msg(c), (text, msg(c))
        assert lib.graphc_set_input(ctx, b"data", 0, data, shape, 4) == 0
        assert lib.graphc_run(ctx) == 0 and msg(ctx) == ""
        assert lib.graphc_get_output(ctx, b"prob", 0, out.ctypes.data, 19) == 3
        assert "holds 19 floats" in msg(ctx)
        assert lib.graphc_get_output(ctx, b"ip", 0, out.ctypes.data, 20) == 2
        assert lib.graphc_get_output(ctx, b"prob", 1, out.ctypes.data, 20) == 4
        assert lib.graphc_get_output(ctx, b"prob", 0, None, 20) == 1
        assert lib.graphc_get_output(ctx, b"prob", 0, out.ctypes.data, 20) == 0
        np.testing.assert_allclose(out, net.forward(data=x)["prob"], rtol=1e-4, atol=1e-6)
        assert lib.graphc_input_shape(5) is None or not lib.graphc_input_shape(5)
        assert lib.graphc_node_name(-1) is None
    finally:
        lib.graphc_destroy(ctx)
    lib.graphc_destroy(None)   # a no-op, like free(NULL)


def test_input_packed_when_set(tmp_path, rng, monkeypatch):
    """An input whose only reader is a gathered convolution is packed by
    graphc_set_input (its padded phase planes written once, into the arena's persistent
    region); no run copies or pads it again.  A run without a new set_input reuses the
    planes (the poisoned arena leaves them alone); a new input replaces them.  An input
    that another layer reads too (here an Eltwise) is staged and copied as before."""
    from graphc.codegen.llvm.lower import lower_graph
    from graphc.passes import run_pipeline
    text = """name: "packed"
layer { name: "in" type: "Input" top: "data" top: "y" input_param { shape { dim: 2 dim: 3 dim: 41 dim: 40 } shape { dim: 2 dim: 8 dim: 21 dim: 20 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "cy" type: "Convolution" bottom: "y" top: "cy" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "s" type: "Eltwise" bottom: "cy" bottom: "y" bottom: "c1" top: "s" }
"""
    net = net_from_text(text, tmp_path, rng=rng)
    prog = lower_graph(run_pipeline(net.graph), "native")
    packers = {t.name: t.packer for t in prog.inputs}
    assert packers["data"] and packers["y"] is None, packers
    assert prog.persistent_bytes > 0
    assert not any(s.fn.endswith("_pad") for s in prog.steps if "c1" in s.fn), prog.steps
    monkeypatch.setenv("GRAPHC_POISON", "1")
    cn = graphc.load(cached_library(net.graph), num_threads=2)
    try:
        for _ in range(2):
            feed = {"data": rng.standard_normal((2, 3, 41, 40)).astype(np.float32),
                    "y": rng.standard_normal((2, 8, 21, 20)).astype(np.float32)}
            want = net.forward(**feed)["s"]
            assert_close(cn.forward(**feed), {"s": want}, 1e-5)
            assert cn.lib.graphc_run(cn._ctx) == 0       # the same inputs, run again
            assert_close(cn._fetch(), {"s": want}, 1e-5)
    finally:
        cn.close()


def test_python_forward_errors(small):
    net, lib_path, x = small
    cn = graphc.load(lib_path)
    with pytest.raises(GraphcError, match="no input 'dat'"):
        cn.forward(data=x, dat=x)
    with pytest.raises(GraphcError, match=r"no data given for input\(s\) data"):
        cn.forward()
    with pytest.raises(GraphcError, match=r"has shape \[2,3,20,21\]"):
        cn.forward(data=np.zeros((2, 3, 20, 21), np.float32))
    with pytest.raises(GraphcError, match="dtype <U1"):
        cn.forward(data=np.full((2, 3, 20, 20), "a"))
    got = cn.forward(data=x.astype(np.float64))       # numbers are converted
    np.testing.assert_allclose(got["prob"], net.forward(data=x)["prob"], rtol=1e-4, atol=1e-6)
    cn.close()
    with pytest.raises(GraphcError, match="closed"):
        cn.forward(data=x)
    with pytest.raises(GraphcError, match="no such compiled net"):
        graphc.load(lib_path.parent / "missing.so")


# ---------------------------------------------------------------------------------------
# threads


def test_concurrent_contexts(small, rng):
    """Two contexts of one library in two threads give what each gives alone."""
    net, lib_path, _ = small
    xs = [rng.standard_normal((2, 3, 20, 20)).astype(np.float32) for _ in range(4)]
    a, b = graphc.load(lib_path, num_threads=2), graphc.load(lib_path, num_threads=2)
    alone = [a.forward(data=x)["prob"] for x in xs]
    results = {}

    def work(cn, key, order):
        out = []
        for _ in range(15):
            for i in order:
                out.append((i, cn.forward(data=xs[i])["prob"]))
        results[key] = out

    ts = [threading.Thread(target=work, args=(a, "a", [0, 1, 2, 3])),
          threading.Thread(target=work, args=(b, "b", [3, 2, 1, 0]))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for key in "ab":
        assert len(results[key]) == 60
        for i, p in results[key]:
            np.testing.assert_array_equal(p, alone[i])
    a.close()
    b.close()


def test_thread_counts(small, monkeypatch):
    net, lib_path, x = small
    outs = []
    for n in (1, 3, 5):
        cn = graphc.load(lib_path, num_threads=n)
        assert cn.num_threads == n
        outs.append(cn.forward(data=x)["prob"])
        cn.close()
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])   # the split never changes the sums
    cn = graphc.load(lib_path, num_threads=4)      # more threads than CPUs: many handoffs
    for _ in range(100):
        np.testing.assert_array_equal(cn.forward(data=x)["prob"], outs[0])
    cn.close()
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "3")
    assert graphc.load(lib_path).num_threads == 3
    monkeypatch.delenv("GRAPHC_NUM_THREADS")
    assert graphc.load(lib_path).num_threads == len(os.sched_getaffinity(0))
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "lots")
    with pytest.raises(GraphcError, match="GRAPHC_NUM_THREADS=lots"):
        graphc.load(lib_path)


@pytest.mark.parametrize("spin", ["0", "50", "2000"])
def test_spin_times(small, monkeypatch, spin):
    """GRAPHC_SPIN_US: workers that sleep at once (0), after a short spin, or after the
    default 2 ms give the same results, with idle pauses longer than the spin between
    runs (each run wakes a sleeping worker) and runs back to back."""
    import time
    net, lib_path, x = small
    want = graphc.load(lib_path, num_threads=1).forward(data=x)["prob"]
    monkeypatch.setenv("GRAPHC_SPIN_US", spin)
    cn = graphc.load(lib_path, num_threads=3)
    for i in range(40):
        np.testing.assert_array_equal(cn.forward(data=x)["prob"], want)
        if i % 8 == 0:
            time.sleep(0.005)
    cn.close()


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("pin", [None, "0", "1"])
def test_placement(small, monkeypatch, pin):
    """The workers' placement (GRAPHC_PIN): by default they are kept off the CPU the
    caller runs on, so a woken worker never waits for a time slice there; this follows the
    caller when it moves.  GRAPHC_PIN=0 leaves their affinity alone, GRAPHC_PIN=1 pins
    them.  The results are the same in every mode."""
    net, lib_path, x = small
    want = graphc.load(lib_path, num_threads=1).forward(data=x)["prob"]
    if pin is not None:
        monkeypatch.setenv("GRAPHC_PIN", pin)
    allowed = os.sched_getaffinity(0)
    before = _threads()
    cn = graphc.load(lib_path, num_threads=2)
    (worker,) = _threads() - before
    try:
        for cpu in sorted(allowed)[:2]:
            os.sched_setaffinity(0, {cpu})       # the caller on one CPU
            for _ in range(5):
                np.testing.assert_array_equal(cn.forward(data=x)["prob"], want)
            expect = {None: allowed - {cpu}, "0": allowed, "1": {sorted(allowed)[1]}}[pin]
            assert os.sched_getaffinity(worker) == expect
    finally:
        os.sched_setaffinity(0, allowed)
        cn.close()


def test_spin_time_errors(small, monkeypatch):
    net, lib_path, x = small
    for bad in ("-1", "2ms", "5000000"):
        monkeypatch.setenv("GRAPHC_SPIN_US", bad)
        with pytest.raises(GraphcError, match=f"GRAPHC_SPIN_US={bad} is not a number of "
                                              "microseconds"):
            graphc.load(lib_path)


# ---------------------------------------------------------------------------------------
# weights, cache, linking


def test_weights_beside_the_library(tmp_path, capsys, rng, small):
    net, _, x = small
    path = tmp_path / "small.prototxt"
    path.write_text(NET)
    model = tmp_path / "small.caffemodel"
    net.save(model)
    out = tmp_path / "lib" / "small.so"
    assert main(["compile", str(path), "--weights", str(model), "--weights-file",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    wfile = out.with_suffix(".weights")
    assert wfile.is_file()
    syms = subprocess.run(["nm", str(out)], capture_output=True, text=True).stdout
    assert "graphc_weights_blob" not in syms          # not embedded
    want = net.forward(data=x)["prob"]
    np.testing.assert_allclose(graphc.load(out).forward(data=x)["prob"], want,
                               rtol=1e-4, atol=1e-6)
    # moved without its weights: a clear error; given the path explicitly: works
    moved = tmp_path / "moved.so"
    shutil.copy(out, moved)
    with pytest.raises(GraphcError, match="cannot open the weights file .*small.weights"):
        graphc.load(moved)
    np.testing.assert_allclose(graphc.load(moved, weights=wfile).forward(data=x)["prob"],
                               want, rtol=1e-4, atol=1e-6)
    # another net's weights are refused
    other = tmp_path / "other.so"
    assert main(["compile", str(path), "--weights-file", "-o", str(other)]) == 0
    with pytest.raises(GraphcError, match="another net or another build"):
        graphc.load(out, weights=other.with_suffix(".weights"))
    (tmp_path / "junk.weights").write_bytes(b"x" * 100)
    with pytest.raises(GraphcError, match="not a graphc weights file"):
        graphc.load(out, weights=tmp_path / "junk.weights")


def test_cache_reuse_and_keys(small, rng):
    net, lib_path, _ = small
    mtime = lib_path.stat().st_mtime_ns
    assert cached_library(net.graph) == lib_path and lib_path.stat().st_mtime_ns == mtime
    p = next(iter(net.graph.params.values()))
    p.data[...] += 1.0
    assert cached_library(net.graph) != lib_path          # new weights, new library


def test_library_links_only_libc_libm_pthread(small):
    _, lib_path, _ = small
    if not shutil.which("readelf"):
        pytest.skip("readelf is not installed")
    dyn = subprocess.run(["readelf", "-d", str(lib_path)], capture_output=True, text=True).stdout
    needed = set(re.findall(r"Shared library: \[(.+?)\]", dyn))
    # (ld-linux: glibc's loader, which provides thread-local storage)
    assert needed and all(re.match(r"(lib(c|m|pthread)|ld-linux[-\w]*)\.so", n)
                          for n in needed), needed
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib_path)], capture_output=True,
                          text=True).stdout
    exported = {line.split()[-1] for line in syms.splitlines() if line.strip()}
    assert "graphc_create" in exported and "graphc_run" in exported
    assert all(s.startswith("graphc_") for s in exported), exported


def test_net_backend_cpu(shared_dir):
    d, x, prob = lenet_golden(shared_dir)
    net = graphc.Net(str(d / "net.prototxt"), weights=str(d / "lenet.caffemodel"),
                     backend="cpu")
    assert np.abs(net.forward(data=x)["prob"] - prob).max() < 1e-5
    assert np.abs(net.blobs["prob"] - prob).max() < 1e-5
    ref = graphc.Net(str(d / "net.prototxt"), weights=str(d / "lenet.caffemodel"))
    one = ref.forward(data=x[:1])["prob"]
    assert_close(net.forward(data=x[:1]), {"prob": one})      # a new shape recompiles
    for blobs in net.params.values():                          # new weights: recompile()
        for b in blobs:
            b[...] *= 0.5
    net.recompile()
    ref_params = ref.params
    for name, blobs in net.params.items():
        for rb, b in zip(ref_params[name], blobs):
            rb[...] = b
    assert_close(net.forward(data=x[:1]), ref.forward(data=x[:1]))
    with pytest.raises(GraphcError, match="backend 'tpu'"):
        graphc.Net(str(d / "net.prototxt"), backend="tpu")


def test_generic_cpu_target(tmp_path, rng):
    """--cpu generic (x86-64 baseline: SSE2, 4-wide vectors, no FMA) computes the same."""
    net = net_from_text(NET, tmp_path, rng=rng)
    x = rng.standard_normal((2, 3, 20, 20)).astype(np.float32)
    cn = compile_graph(net.graph, cpu="generic")
    assert_close(cn.forward(data=x), net.forward(data=x))
    cn.close()


def test_odd_names(tmp_path, rng):
    """Quotes, comment ends, slashes and non-ASCII in net and blob names survive into the
    generated C (the header compiles and names the blobs exactly)."""
    text = ('name: "we\\"ird */ n\u00e9t"\n'
            'layer { name: "in" type: "Input" top: "in/p\\"ut \u00e9" input_param { shape { dim: 1 dim: 3 } } }\n'
            'layer { name: "r*/" type: "ReLU" bottom: "in/p\\"ut \u00e9" top: "out */" }\n')
    net = net_from_text(text, tmp_path)
    lib = cached_library(net.graph)
    cn = graphc.load(lib)
    assert cn.name == 'we"ird */ n\u00e9t'
    assert list(cn.inputs) == ['in/p"ut \u00e9'] and list(cn.outputs) == ["out */"]
    x = rng.standard_normal((1, 3)).astype(np.float32)
    np.testing.assert_array_equal(cn.forward(**{'in/p"ut \u00e9': x})["out */"], np.maximum(x, 0))
    src = tmp_path / "use.c"
    src.write_text('#include "graphc_net.h"\n#include <string.h>\n'
                   'int main(void) { return strcmp(GRAPHC_INPUT0_NAME, graphc_input_name(0)) != 0; }\n')
    shutil.copy(lib.with_suffix(".h"), tmp_path / "graphc_net.h")
    r = subprocess.run([*find_cc(), "-Wall", "-Werror", str(src), str(lib), f"-Wl,-rpath,{lib.parent}",
                        "-o", str(tmp_path / "use")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert subprocess.run([str(tmp_path / "use")]).returncode == 0
