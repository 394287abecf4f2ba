"""Loading a compiled net (``graphc compile`` output) with ctypes.

    net = graphc.load("net.so")            # one context (arena + worker threads)
    out = net.forward(data=x)              # {output blob name: ndarray}
    net.inputs, net.outputs                # {name: shape}
    net.profile(iterations=10)             # per-layer seconds (the runtime's timers)

The same loader opens libraries of both targets (``net.target`` is "cpu" or "cuda"); a
CUDA library also takes inputs from and gives outputs as device pointers
(``set_input_device``, ``output_device_ptr``) and runs on a given stream (``run``).

A ``CompiledNet`` owns one context; forward calls on it are serialized by a lock.  Two
CompiledNets (of the same library or not) run concurrently: ctypes releases the GIL while
the net runs.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from ..errors import GraphcError

_i64p = ctypes.POINTER(ctypes.c_int64)
F32 = 0

_SIGNATURES = {
    "graphc_create_ex": (ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                        ctypes.c_char_p]),
    "graphc_destroy": (None, [ctypes.c_void_p]),
    "graphc_set_input": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                        ctypes.c_void_p, _i64p, ctypes.c_int]),
    "graphc_run": (ctypes.c_int, [ctypes.c_void_p]),
    "graphc_get_output": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                         ctypes.c_void_p, ctypes.c_int64]),
    "graphc_error_message": (ctypes.c_char_p, [ctypes.c_void_p]),
    "graphc_net_name": (ctypes.c_char_p, []),
    "graphc_num_inputs": (ctypes.c_int, []),
    "graphc_num_outputs": (ctypes.c_int, []),
    "graphc_input_name": (ctypes.c_char_p, [ctypes.c_int]),
    "graphc_output_name": (ctypes.c_char_p, [ctypes.c_int]),
    "graphc_input_ndim": (ctypes.c_int, [ctypes.c_int]),
    "graphc_output_ndim": (ctypes.c_int, [ctypes.c_int]),
    "graphc_input_shape": (_i64p, [ctypes.c_int]),
    "graphc_output_shape": (_i64p, [ctypes.c_int]),
    "graphc_num_threads": (ctypes.c_int, [ctypes.c_void_p]),
    "graphc_num_nodes": (ctypes.c_int, []),
    "graphc_node_name": (ctypes.c_char_p, [ctypes.c_int]),
    "graphc_node_op": (ctypes.c_char_p, [ctypes.c_int]),
    "graphc_node_flops": (ctypes.c_double, [ctypes.c_int]),
    "graphc_set_profiling": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "graphc_node_times": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_double),
                                         ctypes.c_int]),
}


#: the CUDA target's additions (a library for --target cuda exports them too)
_CUDA_SIGNATURES = {
    "graphc_target": (ctypes.c_char_p, []),
    "graphc_cuda_arch": (ctypes.c_char_p, []),
    "graphc_precision": (ctypes.c_char_p, []),
    "graphc_create_device": (ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                            ctypes.c_char_p]),
    "graphc_set_input_device": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                               ctypes.c_uint64, _i64p, ctypes.c_int]),
    "graphc_get_output_device": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                                ctypes.POINTER(ctypes.c_uint64)]),
    "graphc_run_async": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint64]),
    "graphc_synchronize": (ctypes.c_int, [ctypes.c_void_p]),
    "graphc_device_name": (ctypes.c_char_p, [ctypes.c_void_p]),
}


def library_target(lib) -> str:
    """"cuda" for a library built with --target cuda, else "cpu"."""
    return "cuda" if hasattr(lib, "graphc_target") else "cpu"


def open_library(path) -> ctypes.CDLL:
    """The library with its C API's prototypes declared (the CUDA target's too, for a
    library built for it)."""
    path = Path(path)
    if not path.is_file():
        raise GraphcError(f"{path}: no such compiled net",
                          hint="build it with: graphc compile NET.prototxt -o " + str(path))
    try:
        lib = ctypes.CDLL(str(path.resolve()))
    except OSError as e:
        raise GraphcError(f"{path}: cannot load the library ({e})",
                          hint="it must be a library written by graphc compile for this "
                               "machine") from None
    try:
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        if library_target(lib) == "cuda":
            for name, (res, args) in _CUDA_SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
    except AttributeError as e:
        raise GraphcError(f"{path}: not a graphc compiled net ({e})",
                          hint="load a library written by graphc compile") from None
    return lib


def _shapes(lib, count, name_fn, ndim_fn, shape_fn) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in range(count()):
        nd = ndim_fn(i)
        dims = shape_fn(i)
        out[name_fn(i).decode()] = tuple(int(dims[d]) for d in range(nd))
    return out


class CompiledNet:
    def __init__(self, path, num_threads: int | None = None, weights: str | None = None,
                 device: int | None = None):
        self.path = Path(path)
        self.lib = lib = open_library(self.path)
        self.target = library_target(lib)
        ctx = ctypes.c_void_p()
        wp = None if weights is None else str(weights).encode()
        if self.target == "cuda" and device is not None:
            rc = lib.graphc_create_device(ctypes.byref(ctx), int(device), wp)
        else:
            if device is not None:
                raise GraphcError(f"{self.path} is compiled for the CPU: it has no device "
                                  f"to choose", hint="leave device out")
            rc = lib.graphc_create_ex(ctypes.byref(ctx), int(num_threads or 0), wp)
        if rc != 0:
            raise GraphcError(f"{self.path}: {lib.graphc_error_message(None).decode()}",
                              hint="check the GPU, its driver and GRAPHC_CUDA_DEVICE, and the "
                                   "weights file" if self.target == "cuda" else
                                   "check GRAPHC_NUM_THREADS and the weights file")
        self._ctx = ctx
        self._lock = threading.Lock()
        self.name = lib.graphc_net_name().decode()
        self.inputs = _shapes(lib, lib.graphc_num_inputs, lib.graphc_input_name,
                              lib.graphc_input_ndim, lib.graphc_input_shape)
        self.outputs = _shapes(lib, lib.graphc_num_outputs, lib.graphc_output_name,
                               lib.graphc_output_ndim, lib.graphc_output_shape)
        self.num_threads = lib.graphc_num_threads(ctx)
        if self.target == "cuda":
            self.device = lib.graphc_device_name(ctx).decode(errors="replace")
            self.arch = lib.graphc_cuda_arch().decode()
            self.precision = lib.graphc_precision().decode()

    # ---- running --------------------------------------------------------------------
    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = self.lib.graphc_error_message(self._ctx).decode()
            raise GraphcError(f"{what}: {msg}", hint=f"the net's inputs are "
                              + ", ".join(f"{k} {list(v)}" for k, v in self.inputs.items()))

    def _feed(self, name: str, value) -> None:
        if name not in self.inputs:
            raise GraphcError(f"the compiled net has no input '{name}'",
                              hint="its inputs are: " + ", ".join(self.inputs))
        a = np.asarray(value)
        if a.dtype.kind not in "fiub":
            raise GraphcError(f"input '{name}' has dtype {a.dtype}; the net takes float32",
                              hint="pass a numeric array (it is converted to float32)")
        a = np.ascontiguousarray(a, dtype=np.float32)
        shape = (ctypes.c_int64 * max(a.ndim, 1))(*a.shape)
        self._check(self.lib.graphc_set_input(self._ctx, name.encode(), F32,
                                              a.ctypes.data, shape, a.ndim),
                    f"input '{name}'")

    def forward(self, **inputs) -> dict[str, np.ndarray]:
        """Run the net on ``inputs`` (by blob name; all of them) and return every output."""
        missing = [k for k in self.inputs if k not in inputs]
        if missing:
            raise GraphcError(f"no data given for input(s) {', '.join(missing)}",
                              hint="pass " + ", ".join(f"{m}=array" for m in missing))
        with self._lock:
            self._ensure_open()
            for name, value in inputs.items():
                self._feed(name, value)
            self._check(self.lib.graphc_run(self._ctx), "run")
            return self._fetch()

    def _fetch(self) -> dict[str, np.ndarray]:
        out = {}
        for name, shape in self.outputs.items():
            a = np.empty(shape, np.float32)
            self._check(self.lib.graphc_get_output(self._ctx, name.encode(), F32, a.ctypes.data,
                                                   a.size), f"output '{name}'")
            out[name] = a
        return out

    __call__ = forward

    # ---- the CUDA target: device pointers and streams ------------------------------
    def _cuda_only(self, what: str) -> None:
        if self.target != "cuda":
            raise GraphcError(f"{what} needs a library compiled with --target cuda; "
                              f"{self.path} is compiled for the CPU",
                              hint="use forward() with arrays")

    def set_input_device(self, name: str, ptr: int) -> None:
        """Read input ``name`` from device memory at address ``ptr`` (a CUdeviceptr) at
        every run, until it is set again; the memory must hold the input's float32 values
        (its shape, C order) and stay valid."""
        self._cuda_only("set_input_device")
        if name not in self.inputs:
            raise GraphcError(f"the compiled net has no input '{name}'",
                              hint="its inputs are: " + ", ".join(self.inputs))
        shape = self.inputs[name]
        dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        with self._lock:
            self._ensure_open()
            self._check(self.lib.graphc_set_input_device(self._ctx, name.encode(), F32,
                                                          int(ptr), dims, len(shape)),
                        f"input '{name}'")

    def output_device_ptr(self, name: str) -> int:
        """The device address (CUdeviceptr) of output ``name`` inside the net's memory: it
        holds the output after a run, until the next run starts."""
        self._cuda_only("output_device_ptr")
        out = ctypes.c_uint64()
        with self._lock:
            self._ensure_open()
            self._check(self.lib.graphc_get_output_device(self._ctx, name.encode(), F32,
                                                           ctypes.byref(out)),
                        f"output '{name}'")
        return int(out.value)

    def run(self, stream: int | None = None, wait: bool = True) -> None:
        """Run once on the inputs as last set (arrays or device pointers); on the CUDA
        target ``stream`` (a CUstream; None: the context's own) and ``wait=False`` enqueue
        the run and return at once (``synchronize`` waits)."""
        with self._lock:
            self._ensure_open()
            if self.target == "cuda" and (stream is not None or not wait):
                self._check(self.lib.graphc_run_async(self._ctx, int(stream or 0)), "run")
                if wait:
                    self._check(self.lib.graphc_synchronize(self._ctx), "run")
            else:
                self._check(self.lib.graphc_run(self._ctx), "run")

    def synchronize(self) -> None:
        """Wait for the last run (CUDA target; a no-op on the CPU, whose runs wait)."""
        if self.target == "cuda":
            with self._lock:
                self._ensure_open()
                self._check(self.lib.graphc_synchronize(self._ctx), "run")

    def fetch(self) -> dict[str, np.ndarray]:
        """Every output of the last run, copied out."""
        with self._lock:
            self._ensure_open()
            return self._fetch()

    # ---- timing ---------------------------------------------------------------------
    @property
    def nodes(self) -> list[tuple[str, str, float]]:
        """(name, op, flops) of every node, in execution order."""
        lib = self.lib
        return [(lib.graphc_node_name(i).decode(), lib.graphc_node_op(i).decode(),
                 lib.graphc_node_flops(i)) for i in range(lib.graphc_num_nodes())]

    def profile(self, iterations: int = 10, warmup: int = 1, **inputs):
        """Run ``iterations`` timed forward passes (after ``warmup`` untimed ones) and
        return ([(node name, op, mean seconds)], mean seconds per forward pass)."""
        import time
        if not inputs:
            inputs = {k: np.zeros(v, np.float32) for k, v in self.inputs.items()}
        with self._lock:
            self._ensure_open()
            for name, value in inputs.items():
                self._feed(name, value)
            for _ in range(warmup):
                self._check(self.lib.graphc_run(self._ctx), "run")
            self.lib.graphc_set_profiling(self._ctx, 1)
            t0 = time.perf_counter()
            for _ in range(iterations):
                self._check(self.lib.graphc_run(self._ctx), "run")
            total = (time.perf_counter() - t0) / max(iterations, 1)
            n = self.lib.graphc_num_nodes()
            secs = (ctypes.c_double * max(n, 1))()
            runs = self.lib.graphc_node_times(self._ctx, secs, n)
            self.lib.graphc_set_profiling(self._ctx, 0)
        per = [(name, op, secs[i] / max(runs, 1)) for i, (name, op, _) in enumerate(self.nodes)]
        return per, total

    # ---- lifetime -------------------------------------------------------------------
    def _ensure_open(self):
        if self._ctx is None:
            raise GraphcError("this compiled net was closed", hint="load it again")

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self.lib.graphc_destroy(self._ctx)
                self._ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        if getattr(self, "inputs", None) is None:
            return f"CompiledNet({str(self.path)!r}, not created)"
        where = (f"device={self.device!r}, arch={self.arch}, precision={self.precision}"
                 if self.target == "cuda" else f"threads={self.num_threads}")
        return (f"CompiledNet({str(self.path)!r}, inputs={self.inputs}, outputs={self.outputs}, "
                f"{where})")


def load(path, num_threads: int | None = None, weights: str | None = None,
         device: int | None = None) -> CompiledNet:
    """Load a library written by ``graphc compile`` (either target); ``num_threads`` None
    or 0: the default (GRAPHC_NUM_THREADS, else the CPUs this process may use); ``weights``:
    a weights file to use instead of the embedded one (or the one beside the library);
    ``device``: the GPU of a CUDA library (default GRAPHC_CUDA_DEVICE, else 0)."""
    return CompiledNet(path, num_threads, weights, device)
