"""The CUDA host runtime (templates/cuda_runtime.c.j2, graphc/runtime/cuda_build.py): a
library built from a hand-made CudaProgram (a tiny CUDA C module compiled with NVRTC
through codegen/cuda/nvrtc.py, or nvcc where cuda-bindings is not installed) links only against libc/libdl/pthreads and exports only
the C API; its header compiles in a C program; it loads in Python; without a driver
graphc_create says so.  Run against a stand-in driver (tests/fake_cuda_driver.c: device
memory is host memory with bounds checks, the two kernels run on the CPU, capture records
a graph that replays) it computes the right outputs through the CUDA Graph, profiles per
layer, takes and gives device pointers, reports driver failures (no device, wrong
architecture, out of memory, a failed launch naming its layer, a fault) as error codes
and messages without leaking, and validates its arguments.

Tests marked ``gpu`` run on an NVIDIA GPU with its driver (skipped here): the same tiny
program on the real driver, and zoo nets compiled for cuda against the reference
executor (TF32 rel L2 <= 1e-2, fp32 <= 1e-4, fp16/bf16 <= 2e-2)."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphc
from graphc.cli import main
from graphc.codegen.cuda.program import Arg, CudaProgram, Launch
from graphc.codegen.llvm.lower import NodeInfo, TensorInfo, WeightsBlob
from graphc.errors import GraphcError
from graphc.runtime.build import find_cc
from graphc.runtime.cuda_build import (build_cuda_library, parse_arch, require_cuda_bindings,
                                       runtime_tables)
from graphc.runtime.loader import open_library

HERE = Path(__file__).resolve().parent
ERR = dict(ARGUMENT=1, NAME=2, SHAPE=3, DTYPE=4, MEMORY=5, IO=6, STATE=8, DEVICE=9)

SOURCE = r"""
extern "C" __global__ void affine(float *y, const float *x, const float *w, int n, float a) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + w[i];
}
extern "C" __global__ void rowsum(float *z, const float *y, long long cols, int rows) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) {
        float s = 0.0f;
        for (long long c = 0; c < cols; c++) s += y[r * cols + c];
        z[r] = s;
    }
}
"""


def compile_cubin(arch: str = "sm_90") -> bytes:
    """SOURCE as a cubin: graphc's NVRTC module if cuda-bindings is installed, else nvcc,
    else skip."""
    from graphc.codegen.cuda.nvrtc import compile_module, nvrtc_available
    if nvrtc_available():
        return compile_module(SOURCE, arch, cache=False).cubin
    nvcc = shutil.which("nvcc")
    if not nvcc:
        pytest.skip("neither cuda-bindings (NVRTC) nor nvcc is installed to compile a cubin")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tiny.cu").write_text(SOURCE)
        subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-o", "tiny.cubin", "tiny.cu"],
                       cwd=d, check=True, capture_output=True)
        return (Path(d) / "tiny.cubin").read_bytes()


def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


def tiny_program(cubin: bytes, *, rows: int = 5, cols: int = 37, a: float = 1.5,
                 weights=None, arch: str = "sm_90", n=None, arena_extra: int = 0,
                 name: str = "tiny") -> CudaProgram:
    """Two nodes: y = a * x + w (elementwise, w a weight), z = row sums of y."""
    numel = rows * cols
    xo, yo = 0, _align(4 * numel)
    zo = yo + _align(4 * numel)
    blob = WeightsBlob()
    woff = blob.add("w", np.asarray(weights if weights is not None
                                    else np.zeros((rows, cols)), np.float32))
    launches = [
        Launch("affine", ((numel + 127) // 128, 1, 1), (128, 1, 1), 0,
               [Arg("arena", yo), Arg("arena", xo), Arg("weights", woff),
                Arg("i32", numel if n is None else n), Arg("f32", a)], 0),
        Launch("rowsum", (1, 1, 1), (32, 1, 1), 0,
               [Arg("arena", zo), Arg("arena", yo), Arg("i64", cols), Arg("i32", rows)], 1),
    ]
    return CudaProgram(name, arch, "fp32", SOURCE, cubin, launches,
                       [NodeInfo("scale", "Affine", 2 * numel), NodeInfo("sum", "RowSum", numel)],
                       [TensorInfo("x", "x", (rows, cols), xo)],
                       [TensorInfo("z", "z", (rows,), zo)],
                       zo + _align(4 * rows) + arena_extra, blob)


@pytest.fixture(scope="session")
def cubin():
    return compile_cubin()


@pytest.fixture(scope="session")
def weights():
    # fixed per session (the library is built once); inputs are fresh per test
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little")).standard_normal(
        (5, 37)).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_lib(tmp_path_factory, cubin, weights):
    out = tmp_path_factory.mktemp("tiny") / "tiny.so"
    build_cuda_library(tiny_program(cubin, weights=weights), out)
    return out


@pytest.fixture(scope="session")
def fake_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake") / "libfakecuda.so"
    r = subprocess.run([*find_cc(), "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o",
                        str(out), str(HERE / "fake_cuda_driver.c")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return out


def fresh(path: Path, tmp_path: Path, name: str) -> Path:
    """A copy under a new name: dlopen loads it anew (the runtime loads the driver once
    per process and library; the stand-in driver keeps its state per copy)."""
    d = tmp_path / name
    i = 0
    while d.exists():   # never overwrite a loaded library
        i += 1
        d = tmp_path / f"{name}{i}"
    d.mkdir()
    shutil.copy(path, d / path.name)
    return d / path.name


@pytest.fixture
def fake(fake_build, tmp_path, monkeypatch):
    """Set up the stand-in driver; returns (lib copy maker, stats())."""
    drv = fresh(fake_build, tmp_path, "driver")
    monkeypatch.setenv("GRAPHC_CUDA_DRIVER", str(drv))
    monkeypatch.delenv("FAKE_CUDA", raising=False)
    monkeypatch.delenv("GRAPHC_CUDA_DEVICE", raising=False)
    handle = ctypes.CDLL(str(drv))

    def stats():
        v = [ctypes.c_int() for _ in range(4)]
        handle.fake_stats(*[ctypes.byref(x) for x in v])
        return dict(zip(("allocs", "contexts", "graph_launches", "kernel_launches"),
                        (x.value for x in v)))
    return drv, stats


_LAUNCH_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint),
                              ctypes.c_uint, ctypes.c_void_p, ctypes.c_int)
_SIGNATURE_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int)
_PARAM = {"p": ("<Q", 8), "l": ("<q", 8), "d": ("<d", 8), "i": ("<i", 4), "f": ("<f", 4)}


class EmulatedKernels:
    """Makes the stand-in driver run every kernel of ``source`` with graphc's CUDA emulator
    (codegen/cuda/emulate.py: the CUDA C compiled for the CPU), on the driver's memory."""

    def __init__(self, driver_path, source: str, kernels):
        import struct
        emulate = pytest.importorskip("graphc.codegen.cuda.emulate")
        self.module = emulate.compile_module(source, sorted(set(kernels)))
        self.errors = []

        def kinds(name) -> str:
            """One letter per parameter (the emulator gives (kind, alignment) pairs)."""
            sig = self.module.signature(name)
            return sig if isinstance(sig, str) else "".join(k for k, _ in sig)

        def signature(name, buf, cap):
            try:
                sig = kinds(name.decode()).encode()
            except Exception as e:   # noqa: BLE001 -- reported by the test
                self.errors.append(e)
                return 1
            if len(sig) >= cap or any(c not in b"plidf" for c in sig):
                self.errors.append(f"kernel {name}: signature {sig!r}")
                return 1
            ctypes.memmove(buf, sig + b"\0", len(sig) + 1)
            return 0

        def launch(name, gb, smem, params, nparams):
            try:
                sig = kinds(name.decode())
                raw = ctypes.string_at(params, sum(_PARAM[c][1] for c in sig)) if sig else b""
                args, at = [], 0
                for c in sig:
                    fmt, size = _PARAM[c]
                    args.append((c, struct.unpack_from(fmt, raw, at)[0]))
                    at += size
                self.module.launch(name.decode(), tuple(gb[:3]), tuple(gb[3:6]), smem, args)
                return 0
            except Exception as e:   # noqa: BLE001 -- reported by the test
                self.errors.append(e)
                return 1

        self._callbacks = (_LAUNCH_CB(launch), _SIGNATURE_CB(signature))   # kept alive
        ctypes.CDLL(str(driver_path)).fake_set_kernels(*self._callbacks)


def want(x, w, a=1.5):
    return (a * x.astype(np.float64) + w).sum(axis=1)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


class Driver:
    """The few driver calls the tests make themselves (device buffers), via ctypes."""

    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(str(path))
        assert lib.cuInit(0) == 0
        self.ctx = ctypes.c_void_p()
        assert lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), 0) == 0
        lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]

    def _call(self, fn, *args):
        assert self.lib.cuCtxPushCurrent_v2(self.ctx) == 0
        try:
            assert fn(*args) == 0
        finally:
            self.lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))

    def upload(self, a: np.ndarray) -> int:
        p = ctypes.c_uint64()
        self._call(self.lib.cuMemAlloc_v2, ctypes.byref(p), ctypes.c_size_t(a.nbytes))
        self._call(self.lib.cuMemcpyHtoD_v2, p.value, a.ctypes.data, a.nbytes)
        return p.value

    def download(self, ptr: int, shape) -> np.ndarray:
        out = np.empty(shape, np.float32)
        self._call(self.lib.cuMemcpyDtoH_v2, out.ctypes.data, ptr, out.nbytes)
        return out

    def free(self, ptr: int) -> None:
        self._call(self.lib.cuMemFree_v2, ptr)

    def close(self) -> None:
        self.lib.cuDevicePrimaryCtxRelease_v2(0)


# ---------------------------------------------------------------------------------------
# building, linking, the header (no driver needed)


def test_library_exports_links_and_embeds(tiny_lib, cubin):
    dyn = subprocess.run(["readelf", "-d", str(tiny_lib)], capture_output=True, text=True).stdout
    needed = set(re.findall(r"Shared library: \[(.+?)\]", dyn))
    assert needed and all(re.match(r"(lib(c|dl|pthread)|ld-linux[-\w]*)\.so", n)
                          for n in needed), needed
    syms = subprocess.run(["nm", "-D", "--defined-only", str(tiny_lib)], capture_output=True,
                          text=True).stdout
    exported = {line.split()[-1] for line in syms.splitlines() if line.strip()}
    assert all(s.startswith("graphc_") for s in exported), exported
    for s in ("graphc_create", "graphc_run", "graphc_set_input_device",
              "graphc_get_output_device", "graphc_run_async", "graphc_target"):
        assert s in exported
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(tiny_lib)],
                               capture_output=True, text=True).stdout
    assert "cuInit" not in undefined        # the driver is found with dlopen, at run time
    assert cubin in tiny_lib.read_bytes()   # the cubin is embedded whole
    lib = open_library(tiny_lib)
    assert lib.graphc_target() == b"cuda" and lib.graphc_cuda_arch() == b"sm_90"
    assert lib.graphc_precision() == b"fp32" and lib.graphc_num_nodes() == 2
    assert [lib.graphc_node_name(i) for i in range(2)] == [b"scale", b"sum"]
    assert lib.graphc_input_shape(0)[1] == 37 and lib.graphc_output_ndim(0) == 1


C_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include "tiny.h"

int main(void) {
    graphc_ctx *ctx = NULL;
    static float x[GRAPHC_INPUT0_NUMEL], z[GRAPHC_OUTPUT0_NUMEL];
    const int64_t shape[] = GRAPHC_INPUT0_SHAPE;
    uint64_t dz = 0;
    for (int i = 0; i < GRAPHC_INPUT0_NUMEL; i++) x[i] = (float)(i % 7) - 3.0f;
    printf("%s %s %s %s\n", graphc_net_name(), graphc_target(), GRAPHC_CUDA_ARCH, GRAPHC_PRECISION);
    int rc = graphc_create(&ctx);
    if (rc != GRAPHC_OK) {
        printf("create failed %d: %s\n", rc, graphc_error_message(NULL));
        return rc == GRAPHC_ERR_DEVICE ? 0 : 2;
    }
    if (graphc_set_input(ctx, GRAPHC_INPUT0_NAME, GRAPHC_F32, x, shape, GRAPHC_INPUT0_NDIM) ||
        graphc_run_async(ctx, 0) || graphc_synchronize(ctx) ||
        graphc_get_output(ctx, GRAPHC_OUTPUT0_NAME, GRAPHC_F32, z, GRAPHC_OUTPUT0_NUMEL) ||
        graphc_get_output_device(ctx, GRAPHC_OUTPUT0_NAME, GRAPHC_F32, &dz) || !dz) {
        printf("failed: %s\n", graphc_error_message(ctx));
        return 3;
    }
    printf("on %s:", graphc_device_name(ctx));
    for (int i = 0; i < GRAPHC_OUTPUT0_NUMEL; i++) printf(" %.6f", z[i]);
    printf("\n");
    graphc_destroy(ctx);
    return 0;
}
"""


def test_header_compiles_in_c(tiny_lib, tmp_path, fake, weights):
    shutil.copy(tiny_lib.with_suffix(".h"), tmp_path / "tiny.h")
    lib = shutil.copy(tiny_lib, tmp_path / "tiny.so")
    (tmp_path / "main.c").write_text(C_PROGRAM)
    exe = tmp_path / "main"
    r = subprocess.run([*find_cc(), "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic",
                        "-I", str(tmp_path), str(tmp_path / "main.c"), str(lib),
                        f"-Wl,-rpath,{tmp_path}", "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "GRAPHC_CUDA_DRIVER"}
    env["GRAPHC_CUDA_DRIVER"] = str(tmp_path / "no" / "libcuda.so.1")
    r = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tiny cuda sm_90 fp32" in r.stdout
    assert "create failed 9: cannot load the CUDA driver" in r.stdout
    # with the stand-in driver (inherited from the fixture's environment) it runs
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    got = np.array([float(v) for v in r.stdout.split("Fake GPU 0:")[1].split()])
    x = (np.arange(5 * 37) % 7 - 3.0).reshape(5, 37)
    assert rel(got, want(x, weights)) < 1e-5


def test_no_driver_is_an_error_not_a_crash(tiny_lib, tmp_path, monkeypatch):
    lib_path = fresh(tiny_lib, tmp_path, "nodriver")
    monkeypatch.setenv("GRAPHC_CUDA_DRIVER", str(tmp_path / "missing" / "libcuda.so.1"))
    lib = open_library(lib_path)
    ctx = ctypes.c_void_p()
    assert lib.graphc_create_ex(ctypes.byref(ctx), 0, None) == ERR["DEVICE"] and not ctx.value
    msg = lib.graphc_error_message(None).decode()
    assert "cannot load the CUDA driver" in msg and "NVIDIA GPU" in msg
    assert lib.graphc_create_ex(None, 0, None) == ERR["ARGUMENT"]
    assert lib.graphc_create_device(ctypes.byref(ctx), -1, None) == ERR["ARGUMENT"]
    assert "device -1" in lib.graphc_error_message(None).decode()
    assert lib.graphc_create_ex(ctypes.byref(ctx), -3, None) == ERR["ARGUMENT"]
    assert lib.graphc_run(None) == ERR["ARGUMENT"]
    lib.graphc_destroy(None)
    with pytest.raises(GraphcError, match="cannot load the CUDA driver") as e:
        graphc.load(lib_path)
    assert "driver" in e.value.hint


# ---------------------------------------------------------------------------------------
# running on the stand-in driver


def test_forward_through_the_cuda_graph(tiny_lib, tmp_path, fake, weights, rng, monkeypatch):
    _, stats = fake
    monkeypatch.setenv("GRAPHC_POISON", "1")   # the arena is NaN-filled before each run
    net = graphc.load(fresh(tiny_lib, tmp_path, "lib"))
    assert net.target == "cuda" and net.device == "Fake GPU 0" and net.arch == "sm_90"
    assert net.inputs == {"x": (5, 37)} and net.outputs == {"z": (5,)}
    s0 = stats()
    assert s0["contexts"] == 1 and s0["kernel_launches"] == 0   # recorded, not run yet
    for _ in range(3):
        x = rng.standard_normal((5, 37)).astype(np.float32)
        got = net.forward(x=x)["z"]
        assert np.isfinite(got).all() and rel(got, want(x, weights)) < 1e-5
    s = stats()
    assert s["graph_launches"] == 3 and s["kernel_launches"] == 6   # one graph per run
    per, total = net.profile(iterations=4, x=x)
    assert [p[:2] for p in per] == [("scale", "Affine"), ("sum", "RowSum")]
    assert all(t > 0 for _, _, t in per) and total > 0
    assert stats()["graph_launches"] == 3 + 1   # profiled runs launch the kernels one by one
    net.close()
    s = stats()
    assert s["allocs"] == 0 and s["contexts"] == 0   # everything released


def test_device_pointers_and_streams(tiny_lib, tmp_path, fake, weights, rng):
    drv_path, stats = fake
    net = graphc.load(fresh(tiny_lib, tmp_path, "lib"))
    drv = Driver(drv_path)
    x = rng.standard_normal((5, 37)).astype(np.float32)
    dx = drv.upload(x)
    net.set_input_device("x", dx)
    net.run()
    dz = net.output_device_ptr("z")
    assert rel(drv.download(dz, (5,)), want(x, weights)) < 1e-5
    assert rel(net.fetch()["z"], want(x, weights)) < 1e-5
    x2 = rng.standard_normal((5, 37)).astype(np.float32)       # read again at every run
    drv._call(drv.lib.cuMemcpyHtoD_v2, dx, x2.ctypes.data, x2.nbytes)
    net.run(stream=0, wait=False)
    net.synchronize()
    assert rel(drv.download(dz, (5,)), want(x2, weights)) < 1e-5
    with pytest.raises(GraphcError, match="NULL"):
        net.set_input_device("x", 0)
    with pytest.raises(GraphcError, match="no output 'y'"):
        net.output_device_ptr("y")
    net.close()
    drv.free(dx)
    drv.close()
    assert stats()["allocs"] == 0


def test_two_contexts_and_weights_file(cubin, tmp_path, fake, rng):
    _, stats = fake
    w = rng.standard_normal((5, 37)).astype(np.float32)
    out = tmp_path / "side" / "net.so"
    r = build_cuda_library(tiny_program(cubin, weights=w, name="side"), out, weights_file=True)
    assert r.weights == out.with_suffix(".weights") and r.weights.is_file()
    a, b = graphc.load(out), graphc.load(out)
    x = rng.standard_normal((5, 37)).astype(np.float32)
    assert rel(a.forward(x=x)["z"], want(x, w)) < 1e-5
    assert rel(b.forward(x=2 * x)["z"], want(2 * x, w)) < 1e-5
    assert rel(a.fetch()["z"], want(x, w)) < 1e-5              # separate arenas
    a.close(), b.close()
    (tmp_path / "bad.weights").write_bytes(b"GRAPHCW1" + b"\0" * 100)
    with pytest.raises(GraphcError, match="another net or another build"):
        graphc.load(out, weights=tmp_path / "bad.weights")
    assert stats()["allocs"] == 0 and stats()["contexts"] == 0


@pytest.mark.parametrize("setting, code, text", [
    ("devices=0", "DEVICE", "CUDA_ERROR_NO_DEVICE"),
    ("cc=8.0", "DEVICE", "compiled for sm_90 but GPU 0 (Fake GPU 0) has compute capability "
                         "8.0; recompile with --arch sm_80"),
    ("fail=cuInit:35", "DEVICE", "update the driver"),
    ("fail=cuModuleLoadData:209", "DEVICE", "CUDA_ERROR_NO_BINARY_FOR_GPU"),
    ("mem=1000", "MEMORY", "allocating the net's arena (1792 bytes) on GPU 0"),
    ("fail=cuLaunchKernel:1", "DEVICE", "layer 'scale' (Affine): recording kernel affine"),
    ("fail=cuGraphInstantiateWithFlags:2", "MEMORY", "instantiating the CUDA Graph"),
    ("fail=cuDevicePrimaryCtxRetain:101", "DEVICE", "creating a context on GPU 0"),
])
def test_driver_failures_at_create(tiny_lib, tmp_path, fake, monkeypatch, setting, code, text):
    _, stats = fake
    monkeypatch.setenv("FAKE_CUDA", setting)
    lib = open_library(fresh(tiny_lib, tmp_path, "lib"))
    ctx = ctypes.c_void_p()
    assert lib.graphc_create_ex(ctypes.byref(ctx), 0, None) == ERR[code]
    assert not ctx.value
    msg = lib.graphc_error_message(None).decode()
    assert text in msg, msg
    s = stats()
    assert s["allocs"] == 0 and s["contexts"] == 0, s   # nothing leaked on the way out


def test_bad_device_number(tiny_lib, tmp_path, fake, monkeypatch):
    monkeypatch.setenv("GRAPHC_CUDA_DEVICE", "3")
    with pytest.raises(GraphcError, match=r"GPU 3 does not exist: 1 GPU\(s\) are visible"):
        graphc.load(fresh(tiny_lib, tmp_path, "lib"))
    monkeypatch.setenv("GRAPHC_CUDA_DEVICE", "x")
    with pytest.raises(GraphcError, match="GRAPHC_CUDA_DEVICE=x is not a device number"):
        graphc.load(fresh(tiny_lib, tmp_path, "lib"))


@pytest.mark.parametrize("profiling", [False, True])
def test_a_fault_while_running_is_reported(cubin, tmp_path, fake, rng, profiling):
    # the first kernel is told the tensor is 64x larger than it is: it reads past the end
    # of the weights, the (stand-in) GPU faults, the run reports it; with profiling on
    # (each layer waited for), naming the layer
    out = tmp_path / "bad" / "net.so"
    build_cuda_library(tiny_program(cubin, n=64 * 5 * 37), out)
    net = graphc.load(out)
    x = rng.standard_normal((5, 37)).astype(np.float32)
    if profiling:
        with pytest.raises(GraphcError, match=r"layer 'scale' \(Affine\): running its kernel"
                                              r".*ILLEGAL_ADDRESS"):
            net.profile(iterations=1, warmup=0, x=x)
    else:
        with pytest.raises(GraphcError, match="running the net on the GPU.*ILLEGAL_ADDRESS"):
            net.forward(x=x)


def test_argument_validation(tiny_lib, tmp_path, fake, rng):
    lib = open_library(fresh(tiny_lib, tmp_path, "lib"))
    msg = lambda ctx: lib.graphc_error_message(ctx).decode()  # noqa: E731
    ctx = ctypes.c_void_p()
    assert lib.graphc_create_ex(ctypes.byref(ctx), 0, None) == 0 and ctx.value
    try:
        x = rng.standard_normal((5, 37)).astype(np.float32)
        shape = (ctypes.c_int64 * 2)(5, 37)
        short = (ctypes.c_int64 * 2)(5, 36)
        z = np.empty(5, np.float32)
        dz = ctypes.c_uint64()
        assert lib.graphc_run(ctx) == ERR["STATE"] and "'x' was never set" in msg(ctx)
        assert lib.graphc_get_output(ctx, b"z", 0, z.ctypes.data, 5) == ERR["STATE"]
        d = x.ctypes.data
        cases = [
            (lambda: lib.graphc_set_input(None, b"x", 0, d, shape, 2), "ARGUMENT", None,
             "context is NULL"),
            (lambda: lib.graphc_set_input(ctx, None, 0, d, shape, 2), "ARGUMENT", ctx,
             "name is NULL"),
            (lambda: lib.graphc_set_input(ctx, b"x", 0, None, shape, 2), "ARGUMENT", ctx,
             "data pointer"),
            (lambda: lib.graphc_set_input(ctx, b"x", 0, d, None, 2), "ARGUMENT", ctx,
             "shape pointer"),
            (lambda: lib.graphc_set_input(ctx, b"y", 0, d, shape, 2), "NAME", ctx,
             "inputs are: 'x'"),
            (lambda: lib.graphc_set_input(ctx, b"x", 2, d, shape, 2), "DTYPE", ctx,
             "dtype code 2"),
            (lambda: lib.graphc_set_input(ctx, b"x", 0, d, short, 2), "SHAPE", ctx,
             "has shape [5,36], the net was compiled for [5,37]"),
            (lambda: lib.graphc_set_input(ctx, b"x", 0, d, shape, 1), "SHAPE", ctx, "[5]"),
            (lambda: lib.graphc_set_input_device(ctx, b"x", 0, 0, shape, 2), "ARGUMENT", ctx,
             "graphc_set_input_device: the data pointer"),
            (lambda: lib.graphc_set_input_device(ctx, b"x", 0, 64, short, 2), "SHAPE", ctx,
             "[5,36]"),
            (lambda: lib.graphc_get_output_device(ctx, b"z", 0, None), "ARGUMENT", ctx,
             "buffer for output 'z' is NULL"),
            (lambda: lib.graphc_get_output_device(ctx, b"q", 0, ctypes.byref(dz)), "NAME", ctx,
             "outputs are: 'z'"),
            (lambda: lib.graphc_run_async(None, 0), "ARGUMENT", None, "context is NULL"),
            (lambda: lib.graphc_synchronize(None), "ARGUMENT", None, "context is NULL"),
        ]
        for call, code, c, text in cases:
            assert call() == ERR[code], text
            assert text in msg(c), (text, msg(c))
        assert lib.graphc_set_input(ctx, b"x", 0, d, shape, 2) == 0 and msg(ctx) == ""
        assert lib.graphc_run(ctx) == 0
        assert lib.graphc_get_output(ctx, b"z", 0, z.ctypes.data, 4) == ERR["SHAPE"]
        assert "holds 4 floats" in msg(ctx)
        assert lib.graphc_get_output(ctx, b"z", 1, z.ctypes.data, 5) == ERR["DTYPE"]
        assert lib.graphc_get_output(ctx, b"z", 0, z.ctypes.data, 5) == 0
        assert np.isfinite(z).all()
    finally:
        lib.graphc_destroy(ctx)


def test_python_errors(tiny_lib, tmp_path, fake, rng):
    net = graphc.load(fresh(tiny_lib, tmp_path, "lib"))
    with pytest.raises(GraphcError, match=r"has shape \[5,36\]"):
        net.forward(x=np.zeros((5, 36), np.float32))
    with pytest.raises(GraphcError, match="no input 'y'"):
        net.forward(x=np.zeros((5, 37)), y=1)
    assert "device='Fake GPU 0'" in repr(net)
    net.close()
    with pytest.raises(GraphcError, match="closed"):
        net.run()


def test_emulated_kernels_through_the_runtime(tiny_lib, tmp_path, fake, weights, rng):
    # the same library, its kernels now run from their CUDA C by graphc's emulator
    drv_path, stats = fake
    emu = EmulatedKernels(drv_path, SOURCE, ["affine", "rowsum"])
    net = graphc.load(fresh(tiny_lib, tmp_path, "lib"))
    x = rng.standard_normal((5, 37)).astype(np.float32)
    got = net.forward(x=x)["z"]
    assert not emu.errors, emu.errors
    assert rel(got, want(x, weights)) < 1e-5 and stats()["kernel_launches"] == 2
    net.close()


SMALL_NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_generated_net_through_the_runtime(tmp_path, fake, rng, monkeypatch, precision):
    """A net lowered by the CUDA code generator, built with this runtime, run on the
    stand-in driver with the emulator executing its kernels, against the reference."""
    pytest.importorskip("graphc.codegen.cuda.lower",
                        reason="the CUDA code generator is not in this build")
    from graphc.codegen.cuda.lower import lower_graph
    from graphc.runtime.build import optimize
    from graphc.runtime.testing import assert_close, net_from_text
    monkeypatch.setenv("GRAPHC_POISON", "1")
    net = net_from_text(SMALL_NET, tmp_path, rng=rng)
    program = lower_graph(optimize(net.graph), "sm_90", precision)
    out = tmp_path / "small" / "net.so"
    build_cuda_library(program, out)
    emu = EmulatedKernels(fake[0], program.source, [l.kernel for l in program.launches])
    cn = graphc.load(out)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    got = cn.forward(data=x)
    assert not emu.errors, emu.errors
    assert_close(got, net.forward(data=x), TOLERANCE[precision])
    per, _ = cn.profile(iterations=1, data=x)
    assert [p[0] for p in per] == [n.name for n in program.nodes]
    cn.close()
    # the same through Net(backend="cuda") (compiled into the cache)
    monkeypatch.setenv("GRAPHC_CACHE", str(tmp_path / "cache"))
    gpu_net = graphc.Net(str(tmp_path / "net.prototxt"), backend="cuda", precision=precision)
    for name, p in gpu_net.graph.params.items():
        p.data[...] = net.graph.params[name].data
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert_close(gpu_net.forward(data=x), net.forward(data=x), TOLERANCE[precision])
    assert not emu.errors, emu.errors


def test_compile_command_for_cuda(tmp_path, capsys):
    """``graphc compile --target cuda`` on a machine without a GPU: a library and header."""
    pytest.importorskip("graphc.codegen.cuda.lower",
                        reason="the CUDA code generator is not in this build")
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) is not installed")
    net = tmp_path / "small.prototxt"
    net.write_text(SMALL_NET)
    out = tmp_path / "small.so"
    assert main(["compile", str(net), "--target", "cuda", "--precision", "fp16",
                 "--keep-sources", str(tmp_path / "src"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "for sm_90 (fp16)" in text and "kernel launches" in text
    header = (tmp_path / "small.h").read_text()
    assert 'GRAPHC_CUDA_ARCH "sm_90"' in header and 'GRAPHC_PRECISION "fp16"' in header
    assert (tmp_path / "src" / "kernels.cu").is_file()
    lib = open_library(out)
    assert lib.graphc_target() == b"cuda" and lib.graphc_precision() == b"fp16"
    assert lib.graphc_input_shape(0)[3] == 12


# ---------------------------------------------------------------------------------------
# what the build checks


def test_build_checks_the_program(cubin, tmp_path):
    bad = tiny_program(cubin)
    bad.launches[1].args[0] = Arg("arena", bad.arena_bytes + 4)
    with pytest.raises(GraphcError, match=r"layer 'sum', kernel rowsum: arena offset \d+ is "
                                          r"outside the arena"):
        runtime_tables(bad)
    bad = tiny_program(cubin)
    bad.launches[0].block = (2048, 1, 1)
    with pytest.raises(GraphcError, match="layer 'scale', kernel affine: launch configuration"):
        runtime_tables(bad)
    bad = tiny_program(cubin)
    bad.launches[0].args[3] = Arg("i32", 2**31)
    with pytest.raises(GraphcError, match="i32 argument 2147483648 is out of range"):
        runtime_tables(bad)
    with pytest.raises(GraphcError, match="not an ELF image"):
        build_cuda_library(tiny_program(b"// PTX"), tmp_path / "x.so")
    with pytest.raises(GraphcError, match="'sm90' is not a GPU architecture"):
        build_cuda_library(tiny_program(cubin, arch="sm90"), tmp_path / "x.so")
    assert not (tmp_path / "x.so").exists()
    assert parse_arch("sm_90a") == (9, 0, True) and parse_arch("sm_120") == (12, 0, False)
    t = runtime_tables(tiny_program(cubin))
    assert [g["node"] for g in t["groups"]] == [0, 1] and len(t["args"]) == 9
    assert t["args"][4]["value"] == 0x3fc00000          # 1.5f, as its bits


def test_cuda_target_without_cuda_bindings(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", None)
    with pytest.raises(GraphcError) as e:
        require_cuda_bindings()
    assert e.value.hint.startswith("pip install 'graphc[cuda]'")
    net = tmp_path / "net.prototxt"
    net.write_text('name: "n"\nlayer { name: "data" type: "Input" top: "data" input_param '
                   '{ shape { dim: 1 dim: 4 } } }\nlayer { name: "ip" type: "InnerProduct" '
                   'bottom: "data" top: "ip" inner_product_param { num_output: 3 } }\n')
    assert main(["compile", str(net), "--target", "cuda", "-o", str(tmp_path / "n.so")]) == 1
    err = capsys.readouterr().err
    assert "pip install 'graphc[cuda]'" in err and "Traceback" not in err
    assert main(["compile", str(net), "--target", "cuda", "--arch", "90",
                 "-o", str(tmp_path / "n.so")]) == 1
    assert "'90' is not a GPU architecture" in capsys.readouterr().err
    with pytest.raises(GraphcError, match="pip install 'graphc\\[cuda\\]'"):
        graphc.Net(str(net), backend="cuda")


def test_time_command_on_a_cuda_library(tiny_lib, tmp_path, fake, capsys):
    assert main(["time", str(fresh(tiny_lib, tmp_path, "lib")), "-i", "3"]) == 0
    out = capsys.readouterr().out
    assert "Fake GPU 0 (sm_90, fp32; per-layer times from CUDA events" in out
    assert re.search(r"^\s+scale\s+Affine\s", out, re.M) and "CUDA Graph replay:" in out


# ---------------------------------------------------------------------------------------
# on a GPU


def _have_gpu() -> bool:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    n = ctypes.c_int()
    return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0


HAVE_GPU = _have_gpu()
gpu = pytest.mark.gpu   # skipped without a usable GPU (tests/conftest.py)


def _device_arch() -> str:
    lib = ctypes.CDLL("libcuda.so.1")
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    lib.cuInit(0)
    lib.cuDeviceGet(ctypes.byref(dev), 0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    return f"sm_{major.value}{minor.value}"


@gpu
def test_gpu_tiny_program(tmp_path, rng, monkeypatch):
    monkeypatch.delenv("GRAPHC_CUDA_DRIVER", raising=False)
    monkeypatch.setenv("GRAPHC_POISON", "1")
    arch = _device_arch()
    w = rng.standard_normal((5, 37)).astype(np.float32)
    out = tmp_path / "gpu" / "net.so"
    build_cuda_library(tiny_program(compile_cubin(arch), weights=w, arch=arch), out)
    net = graphc.load(out)
    x = rng.standard_normal((5, 37)).astype(np.float32)
    assert rel(net.forward(x=x)["z"], want(x, w)) < 1e-5
    per, total = net.profile(iterations=3, x=x)
    assert all(t > 0 for _, _, t in per)
    drv = Driver("libcuda.so.1")
    dx = drv.upload(2 * x)
    net.set_input_device("x", dx)
    net.run()
    assert rel(drv.download(net.output_device_ptr("z"), (5,)), want(2 * x, w)) < 1e-5
    net.close()
    drv.free(dx)
    drv.close()
    # a cubin for another architecture is refused with a message, not a crash
    other = "sm_80" if arch != "sm_80" else "sm_90"
    out2 = tmp_path / "other" / "net.so"
    build_cuda_library(tiny_program(compile_cubin(other), arch=other), out2)
    with pytest.raises(GraphcError, match=f"compiled for {other} but GPU 0"):
        graphc.load(out2)
    # an arena larger than the GPU: out of memory, an error
    out3 = tmp_path / "huge" / "net.so"
    build_cuda_library(tiny_program(compile_cubin(arch), arch=arch, arena_extra=2**50), out3)
    with pytest.raises(GraphcError, match="allocating the net's arena"):
        graphc.load(out3)


TOLERANCE = {"tf32": 1e-2, "fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
GPU_NETS = ["lenet", "cifar10_quick", "squeezenet11_deploy", "googlenet_deploy",
            "resnet50_deploy", "mobilenet_deploy"]


@gpu
@pytest.mark.parametrize("precision", list(TOLERANCE))
@pytest.mark.parametrize("name", GPU_NETS)
def test_gpu_zoo_net(shared_dir, tmp_path, monkeypatch, name, precision):
    pytest.importorskip("graphc.codegen.cuda.lower",
                        reason="the CUDA code generator is not in this build")
    from golden import apply_rule, manifest
    from graphc.runtime.cuda_build import cached_cuda_library
    from graphc.runtime.testing import assert_close
    monkeypatch.setenv("GRAPHC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRAPHC_CUDA_DRIVER", raising=False)
    monkeypatch.setenv("GRAPHC_POISON", "1")
    d = shared_dir / "golden" / name
    man = manifest(d)
    model = d / f"{name}.caffemodel"
    net = graphc.Net(str(d / "net.prototxt"), weights=str(model) if model.exists() else None)
    if not model.exists():
        apply_rule(net, man)
    x = np.load(d / "input.npy")
    blob = man["input_blob"]
    expect = net.forward(**{blob: x})
    cn = graphc.load(cached_cuda_library(net.graph, _device_arch(), precision))
    try:
        got = cn.forward(**{blob: x})
    finally:
        cn.close()
    assert_close(got, expect, TOLERANCE[precision])


def test_gpu_bench_parses_its_arguments_and_fails_clearly_without_a_gpu(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "gpu_inference", HERE.parent / "bench" / "gpu_inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = bench.parse_args(["--nets", "resnet50_deploy,mobilenet_deploy", "--precision", "fp16",
                          "--runs", "3", "--batch", "8"])
    assert a.nets.split(",") == ["resnet50_deploy", "mobilenet_deploy"]
    assert (a.precision, a.runs, a.batch, a.runs64) == ("fp16", 3, 8, 50)
    with pytest.raises(SystemExit):
        bench.parse_args(["--nets", "alexnet_deploy"])
    assert "unknown net(s) alexnet_deploy" in capsys.readouterr().err
    if HAVE_GPU:
        return
    with pytest.raises(SystemExit) as e:     # no GPU (or no PyTorch): a message, no traceback
        bench.main(["--runs", "1"])
    assert re.search(r"needs (an NVIDIA GPU|PyTorch)", str(e.value)), e.value
