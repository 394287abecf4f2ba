"""Run a CudaProgram on the CPU: the CUDA C of its kernels compiled as C++ against
emulate.h, its launches run in order on a numpy arena.  For tests (every generated
kernel checked against the reference executor without a GPU) and for debugging kernels.

    run_program(program, {"data": x})  ->  {"prob": y, ...}
    module = compile_module(source, ["vadd"]);  module.launch("vadd", grid, block, 0, args)

What a GPU would catch is caught here too and raised as a GraphcError naming the kernel,
the layer, and where it can the block, thread, source line and address: accesses outside
the arena or the weights (poisoned guard bytes around both, checked after every launch,
then inaccessible pages: an access there faults), writes to the weights (read-only while
kernels run), outputs left unwritten (the arena starts as NaN), launch arguments that do
not match the kernel's parameters, and everything emulate.h checks inside a launch
(divergent or deadlocked barriers, bad warp masks, misaligned accesses, fixed-bound array
indices, shared memory overruns, stack overflows).

Compiling needs a C++20 compiler (g++ or $CXX); each kernel is built once into the graphc
cache ($GRAPHC_CACHE, else ~/.cache/graphc) under cuda-emu/, and programs that share a
kernel share its build.
"""
from __future__ import annotations

import bisect
import ctypes
import hashlib
import mmap
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import GraphcError
from .program import Arg, CudaProgram

HEADER = Path(__file__).with_name("emulate.h")

#: headers a kernel may include, answered by emulate.h
CUDA_HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "mma.h", "cuda_runtime.h", "cuda_runtime_api.h",
                "cuda.h", "device_launch_parameters.h", "vector_types.h", "math_constants.h",
                "cuda_fp16.hpp", "cuda_bf16.hpp", "device_functions.h", "sm_60_atomic_functions.h")

#: bytes of poison before the arena and the weights (a write there is out of bounds), and
#: of inaccessible pages around them (an access there faults)
GUARD = 64 << 10
_NOACCESS = 4 << 20
#: every byte of fresh memory: NaN as float32, float16 and bfloat16 alike
POISON = 0xFF

#: the parameter kinds of emulate.h's signature string, for each Arg kind
_PARAM_OF_ARG = {"arena": "p", "weights": "p", "i32": "i", "i64": "l", "f32": "f"}
_PARAM_WORDS = {"p": "a pointer", "i": "a 32-bit integer", "l": "a 64-bit integer",
                "f": "a float", "d": "a double", "?": "a type the emulator cannot pass"}

_ERR_CAP = 2048


# ---------------------------------------------------------------------------------------
# the source as C++


_ALIGN = r"(?:__align__\s*\(\s*\d+\s*\)\s*)?"
_TYPE = r"((?:(?:const|volatile|unsigned|signed|struct)\s+)*[A-Za-z_][\w:]*(?:\s*<[^<>;{}]*>)?)"
_SHARED = re.compile(
    r"\b__shared__\s+(" + _ALIGN + r")" + _TYPE + r"\s+(" + _ALIGN + r")"
    r"([A-Za-z_]\w*)\s*((?:\[[^\[\];]+\]\s*)*);")
_EXTERN_SHARED = re.compile(
    r"\bextern\s+__shared__\s+" + _ALIGN + _TYPE + r"\s+" + _ALIGN +
    r"([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_ALIGN_N = re.compile(r"__align__\s*\(\s*(\d+)\s*\)")


def _scan(source: str, start: int):
    """(position, char) of the code characters from ``start`` (comments, strings and
    character literals skipped)."""
    i, n = start, len(source)
    while i < n:
        if source.startswith("//", i):
            j = source.find("\n", i)
            i = n if j < 0 else j
            continue
        if source.startswith("/*", i):
            j = source.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        c = source[i]
        if c in "\"'":
            j = i + 1
            while j < n and source[j] != c:
                j += 2 if source[j] == "\\" else 1
            i = j + 1
            continue
        yield i, c
        i += 1


def _depth_at(source: str):
    """A function: position -> brace depth there (comments and strings ignored)."""
    marks, depth = [], 0
    for i, c in _scan(source, 0):
        if c in "{}":
            depth += 1 if c == "{" else -1
            marks.append((i, depth))
    starts = [m[0] for m in marks]

    def at(pos: int) -> int:
        k = bisect.bisect_left(starts, pos)
        return marks[k - 1][1] if k else 0
    return at


def emulation_source(source: str) -> str:
    """The module's CUDA C with its shared memory declarations made per-block: a plain
    ``__shared__ T name[dims];`` inside a function becomes a reference into the running
    block's shared memory (poisoned when the block starts), ``extern __shared__ T name[];``
    a pointer to the launch's dynamic shared memory."""
    depth = _depth_at(source)
    counter = iter(range(1 << 30))

    def shared(m: re.Match) -> str:
        if depth(m.start()) == 0:
            return m.group(0)          # namespace scope: stays per-worker static storage
        aligns = [int(a) for a in _ALIGN_N.findall(m.group(1) + m.group(3))] or [0]
        t, name, dims = m.group(2), m.group(4), re.sub(r"\s+", "", m.group(5))
        key = f"__emu_shared_key_{next(counter)}"
        return (f"static const char {key} = 0; "
                f"auto &{name} = ::__emu::shared_var<{t}{dims}, {max(aligns)}>(&{key});")

    def extern_shared(m: re.Match) -> str:
        t, name = m.group(1), m.group(2)
        if depth(m.start()) == 0:
            return (f"#define {name} (reinterpret_cast<{t} *>(::__emu::dynamic_smem()))\n")
        return f"{t} *const {name} = reinterpret_cast<{t} *>(::__emu::dynamic_smem());"

    out = _EXTERN_SHARED.sub(extern_shared, source)
    depth = _depth_at(out)
    return _SHARED.sub(shared, out)


def _launchers(kernels: list[str]) -> str:
    lines = ["\n// ---- emulator launchers ----"]
    for k in kernels:
        lines.append(
            f'extern "C" __attribute__((visibility("default"))) int __emu_launch_{k}('
            f"const unsigned *cfg, unsigned long smem, int workers, const uint64_t *args, "
            f"int nargs, char *err, unsigned long cap) {{ return ::__emu::launch_kernel(&{k}, "
            f"cfg, smem, workers, args, nargs, err, cap); }}")
        lines.append(f'extern "C" __attribute__((visibility("default"))) const char '
                     f"*__emu_signature_{k}(void) {{ return ::__emu::signature_of(&{k}); }}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# building


def _cache_root() -> Path:
    from ...runtime.build import cache_dir
    return cache_dir() / "cuda-emu"


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


_COMPILER_ID: dict[str, str] = {}


def _compiler_id(cxx: str) -> str:
    if cxx not in _COMPILER_ID:
        try:
            out = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise GraphcError(f"the CUDA emulator needs a C++20 compiler; '{cxx}' does not run "
                              f"({e})", hint="install g++ or set CXX") from None
        _COMPILER_ID[cxx] = out.splitlines()[0] if out else cxx
    return _COMPILER_ID[cxx]


_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-w", "-fvisibility=hidden",
          "-fsanitize=bounds", "-fno-sanitize-recover=all"]
#: the alignment sanitizer (a compile about half again as long) where a kernel could
#: misalign an access: casts between pointer types, vector types (otherwise every typed
#: pointer stays aligned; launch arguments are checked against their parameter's type)
_ALIGN_FLAGS = [*_FLAGS, "-fsanitize=alignment"]
_CAN_MISALIGN = re.compile(
    r"\b(?:reinterpret_cast|(?:float|int|uint|short|ushort|char|uchar|double|longlong|"
    r"ulonglong)[1-4]|__half2|half2|__nv_bfloat162|nv_bfloat162)\b"
    r"|\(\s*(?:const\s+)?(?:volatile\s+)?[A-Za-z_]\w*\s*\*+\s*\)")


@dataclass
class EmulatedModule:
    """One compiled module: its kernels, launchable on host memory (each kernel from the
    cached library that holds it)."""
    kernels: tuple[str, ...]
    libs: dict        # kernel -> ctypes.CDLL

    def signature(self, kernel: str) -> list[tuple[str, int]]:
        """Per parameter: its kind (p pointer, i 32-bit int, l 64-bit int, f float,
        d double, ? other) and the alignment a pointer's target needs (1 for scalars)."""
        fn = getattr(self.libs[kernel], f"__emu_signature_{kernel}")
        fn.restype = ctypes.c_char_p
        kinds, aligns = fn().decode().split(":")
        return [(k, 1 << int(a, 16)) for k, a in zip(kinds, aligns)]

    def launch(self, kernel: str, grid, block, smem: int, args: list, *,
               workers: int | None = None) -> None:
        """Run one launch.  ``args``: (kind, value) pairs: "p" an address (int), "i"/"l"
        an integer, "f" a float.  Raises GraphcError with what went wrong."""
        if kernel not in self.kernels:
            raise GraphcError(f"kernel '{kernel}' is not in the emulated module "
                              f"(it has {', '.join(self.kernels)})")
        slots = (ctypes.c_uint64 * max(1, len(args)))()
        for i, (kind, value) in enumerate(args):
            if kind == "f":
                slots[i] = int(np.array([value], np.float32).view(np.uint32)[0])
            elif kind == "i":
                slots[i] = int(value) & 0xFFFFFFFF
            else:
                slots[i] = int(value) & 0xFFFFFFFFFFFFFFFF
        cfg = (ctypes.c_uint * 6)(*_dim3(grid), *_dim3(block))
        err = ctypes.create_string_buffer(_ERR_CAP)
        fn = getattr(self.libs[kernel], f"__emu_launch_{kernel}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong]
        rc = fn(cfg, int(smem), int(workers or default_workers()), slots, len(args), err,
                _ERR_CAP)
        if rc:
            raise GraphcError(f"kernel '{kernel}' grid {tuple(_dim3(grid))} block "
                              f"{tuple(_dim3(block))}: {err.value.decode(errors='replace')}")


def _dim3(v) -> tuple[int, int, int]:
    t = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))
    return (t + (1, 1, 1))[:3]


def default_workers() -> int:
    """Blocks run on this many threads at once ($GRAPHC_EMU_THREADS, else the CPUs, at
    most 4)."""
    env = os.environ.get("GRAPHC_EMU_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


_LOADED: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def compile_module(source: str, kernels, *, arch: str = "sm_90") -> EmulatedModule:
    """Compile CUDA C ``source`` for the emulator, with a launcher for each of
    ``kernels`` (names of its ``extern "C" __global__`` functions).

    Each kernel is cached by its own text and what the source has outside its kernels
    (includes, macros, device functions), so programs that share kernels compile each
    once; the kernels not yet in the cache compile together, into one library.  A kernel's
    line numbers (in messages) count from its own first line."""
    kernels = tuple(dict.fromkeys(kernels))
    for k in kernels:
        if not re.fullmatch(r"[A-Za-z_]\w*", k):
            raise GraphcError(f"'{k}' is not a kernel name")
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    cuda_arch = int(m.group(1)) * 10 if m else 900
    spans = _kernel_spans(source)
    if all(k in spans for k in kernels):
        common = _strip_comment_lines(_without(source, spans.values()))
        units = {k: f'#line 1 "{k}"\n{source[slice(*spans[k])]}\n' for k in kernels}
    else:                          # a kernel not in the usual form: the source as one unit
        common, units = "", {k: "" for k in kernels}
        whole = '#line 1 "kernels.cu"\n' + source + "\n"
    cxx = _compiler()
    libs: dict = {}
    with _LOCK:
        todo: dict[tuple, list[str]] = {}
        keys = {}
        for k in kernels:
            unit = units[k] if common or units[k] else whole
            flags = _ALIGN_FLAGS if _CAN_MISALIGN.search(common + unit) else _FLAGS
            inc = _include_dir(cxx, flags)
            h = hashlib.blake2b(digest_size=16)
            for part in (inc.name, str(cuda_arch), common, unit if units[k] else whole, k):
                h.update(part.encode())
                h.update(b"\0")
            keys[k] = h.hexdigest()
            so = _cached_kernel(inc.parent, keys[k])
            if so is not None:
                libs[k] = _load(so)
            else:
                todo.setdefault((tuple(flags), inc), []).append(k)
        for (flags, inc), ks in todo.items():
            body = (common + "".join(units[k] for k in ks)) if units[ks[0]] else whole
            text = (f'#include "emulate.h"\n#define __CUDA_ARCH__ {cuda_arch}\n'
                    + emulation_source(body) + _launchers(ks))
            name = hashlib.blake2b(text.encode() + inc.name.encode(), digest_size=16).hexdigest()
            so = inc.parent / f"{name}.so"
            if not so.exists():
                _build(text, inc, so, cxx, list(flags))
            for k in ks:
                _remember_kernel(inc.parent, keys[k], so)
                libs[k] = _load(so)
    return EmulatedModule(kernels, libs)


def _load(so: Path) -> ctypes.CDLL:
    lib = _LOADED.get(str(so))
    if lib is None:
        lib = _LOADED[str(so)] = ctypes.CDLL(str(so))
    return lib


def _cached_kernel(root: Path, key: str) -> Path | None:
    try:
        so = root / (root / "kernels" / key).read_text().strip()
    except OSError:
        return None
    return so if so.is_file() else None


def _remember_kernel(root: Path, key: str, so: Path) -> None:
    d = root / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{key}.{os.getpid()}"
    tmp.write_text(so.name)
    os.replace(tmp, d / key)


_KERNEL_HEAD = re.compile(
    r'\bextern\s+"C"\s+(?:__global__\s+|__launch_bounds__\s*\([^)]*\)\s*|void\s+)+'
    r"([A-Za-z_]\w*)\s*\(")


_MACRO_KERNEL = re.compile(r'#\s*define[^\n]*(?:\\\n[^\n]*)*\bextern\s+"C"')


def _kernel_spans(source: str) -> dict[str, tuple[int, int]]:
    """{kernel: (start, end)} of each ``extern "C" __global__`` definition at file scope
    (from ``extern`` to its closing brace)."""
    if _MACRO_KERNEL.search(source):
        return {}                       # kernels made by macros: not split
    depth_at = _depth_at(source)
    spans = {}
    for m in _KERNEL_HEAD.finditer(source):
        if "__global__" not in m.group(0) or depth_at(m.start()) != 0:
            continue
        open_ = _next_code_char(source, m.end(), "{;")
        if open_ < 0 or source[open_] != "{":
            continue                    # a declaration
        close = _matching_brace(source, open_)
        if close < 0 or m.group(1) in spans:
            return {}
        spans[m.group(1)] = (m.start(), close + 1)
    return spans


def _next_code_char(source: str, start: int, chars: str) -> int:
    for i, c in _scan(source, start):
        if c in chars:
            return i
    return -1


def _matching_brace(source: str, open_: int) -> int:
    depth = 0
    for i, c in _scan(source, open_):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _without(source: str, spans) -> str:
    out, at = [], 0
    for a, b in sorted(spans):
        out.append(source[at:a])
        at = b
    out.append(source[at:])
    return "".join(out)


_CUDA_INCLUDE = re.compile(r"\s*#\s*include\s*[<\"](?:" +
                           "|".join(re.escape(h) for h in CUDA_HEADERS) + r")[>\"]\s*$")


def _strip_comment_lines(text: str) -> str:
    """``text`` without its whole-line // comments (what names the net or a kernel's
    tile choice, not code), blank lines, and includes of the CUDA headers (emulate.h,
    included first, stands for all of them)."""
    return "".join(ln + "\n" for ln in text.splitlines()
                   if ln.strip() and not ln.lstrip().startswith("//")
                   and not _CUDA_INCLUDE.match(ln))


def _run_compiler(cmd: list[str], cxx: str) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise GraphcError(f"the CUDA emulator could not run '{cxx}': {e}",
                          hint="install g++ or set CXX to a C++20 compiler") from None
    if r.returncode:
        log = "\n".join((r.stderr or r.stdout).splitlines()[:40])
        raise GraphcError(f"the CUDA emulator could not compile the kernels as C++:\n{log}",
                          hint="the kernel uses CUDA that emulate.h does not provide, "
                               "or is not valid CUDA C")


def _include_dir(cxx: str, flags: list[str]) -> Path:
    """The directory of emulate.h, the CUDA headers that stand for it, and its
    precompiled form, for this header, compiler and flags (built once)."""
    header = HEADER.read_bytes()
    h = hashlib.blake2b(digest_size=16)
    for part in (header, _compiler_id(cxx).encode(), " ".join(flags).encode()):
        h.update(part)
        h.update(b"\0")
    inc = _cache_root() / f"include-{h.hexdigest()}"
    if (inc / "emulate.h.gch").exists():
        return inc
    inc.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=inc.parent) as tmp:
        t = Path(tmp) / "include"
        t.mkdir()
        (t / "emulate.h").write_bytes(header)
        for name in CUDA_HEADERS:
            (t / name).write_text('#include "emulate.h"\n')
        _run_compiler([cxx, *flags, "-x", "c++-header", str(t / "emulate.h"), "-o",
                       str(t / "emulate.h.gch")], cxx)
        try:
            os.rename(t, inc)
        except OSError:            # built meanwhile by another process
            if not (inc / "emulate.h.gch").exists():
                raise
    return inc


def _build(text: str, inc: Path, so: Path, cxx: str, flags: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        t = Path(tmp)
        src, obj = t / "kernels.cpp", t / "kernels.o"
        src.write_text(text)
        # compiled and linked apart: the sanitizer checks call emulate.h's handlers, so
        # the library needs no sanitizer runtime
        _run_compiler([cxx, *flags, "-I", str(inc), "-c", str(src), "-o", str(obj)], cxx)
        _run_compiler([cxx, "-shared", "-pthread", str(obj), "-o", str(t / "out.so")], cxx)
        os.replace(t / "out.so", so)


# ---------------------------------------------------------------------------------------
# running a program


_PAGE = mmap.PAGESIZE
_PROT_NONE = 0
_libc = None


def _mprotect(addr: int, size: int, prot: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if _libc.mprotect(addr, size, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")


class _Guarded:
    """Device memory on the host: ``nbytes`` at a 256-byte aligned ``base``, between
    poisoned slack (a write there is out of bounds: ``damage``) and inaccessible pages (an
    access there faults, and the launch reports the thread and the address)."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        r = -(-max(self.nbytes, 1) // 256) * 256
        self.size = -(-(r + GUARD) // _PAGE) * _PAGE           # the accessible pages
        self.map = mmap.mmap(-1, self.size + 2 * _NOACCESS)
        self.all = np.frombuffer(self.map, np.uint8)
        self.addr = self.all.ctypes.data
        _mprotect(self.addr, _NOACCESS, _PROT_NONE)
        _mprotect(self.addr + _NOACCESS + self.size, _NOACCESS, _PROT_NONE)
        self.window = self.all[_NOACCESS:_NOACCESS + self.size]
        self.window[:] = POISON
        self.start = self.size - r                              # ends near the inaccessible pages
        self.data = self.window[self.start:self.start + self.nbytes]
        self.base = self.addr + _NOACCESS + self.start

    def damage(self) -> tuple[str, int] | None:
        """Where a guard was written: ("before"/"after", byte offset from the buffer)."""
        bad = np.flatnonzero(self.window[:self.start] != POISON)
        if bad.size:
            return "before", int(bad[-1]) - self.start
        bad = np.flatnonzero(self.window[self.start + self.nbytes:] != POISON)
        if bad.size:
            return "after", self.nbytes + int(bad[0])
        return None

    def read_only(self, yes: bool) -> None:
        _mprotect(self.addr + _NOACCESS, self.size,
                  mmap.PROT_READ if yes else mmap.PROT_READ | mmap.PROT_WRITE)

    def describe(self, address: int, what: str) -> str | None:
        lo, hi = self.addr, self.addr + self.size + 2 * _NOACCESS
        if not lo <= address < hi:
            return None
        off = address - self.base
        if off < 0:
            return f"{-off} bytes before the {what}"
        if off >= self.nbytes:
            return f"{off - self.nbytes} bytes past the end of the {self.nbytes}-byte {what}"
        return f"byte {off} of the {what}"


def weights_bytes(weights) -> bytes:
    """The program's weights blob as bytes (a WeightsBlob, bytes or an array)."""
    if weights is None:
        return b""
    if isinstance(weights, (bytes, bytearray, memoryview)):
        return bytes(weights)
    if isinstance(weights, np.ndarray):
        return weights.tobytes()
    if hasattr(weights, "write"):
        import io
        f = io.BytesIO()
        weights.write(f)
        return f.getvalue()
    raise GraphcError(f"the program's weights are a {type(weights).__name__}, which the "
                      "emulator cannot read")


def _layer_of(program: CudaProgram, node: int) -> tuple[str | None, str | None]:
    try:
        info = program.nodes[node]
        return getattr(info, "name", None), getattr(info, "op", None)
    except (IndexError, TypeError):
        return None, None


def run_program(program: CudaProgram, inputs: dict[str, np.ndarray], *,
                workers: int | None = None) -> dict[str, np.ndarray]:
    """Run ``program``'s launches on the CPU and return its outputs (float32, by blob
    name).  ``inputs``: float32 arrays by blob name, each of its input's shape."""
    names = [t.name for t in program.outputs]
    missing = [t.name for t in program.inputs if t.name not in inputs]
    if missing:
        raise GraphcError(f"net '{program.name}': no value for input(s) {', '.join(missing)}")
    unknown = sorted(set(inputs) - {t.name for t in program.inputs})
    if unknown:
        raise GraphcError(f"net '{program.name}' has no input(s) {', '.join(unknown)} "
                          f"(its inputs: {', '.join(t.name for t in program.inputs)})")
    module = compile_module(program.source, [ln.kernel for ln in program.launches],
                            arch=program.arch)
    arena = _Guarded(program.arena_bytes)
    wbytes = weights_bytes(program.weights)
    weights = _Guarded(len(wbytes))
    weights.data[:] = np.frombuffer(wbytes, np.uint8)
    weights.read_only(True)                 # a kernel writing the weights faults
    for t in program.inputs:
        x = np.asarray(inputs[t.name], dtype=np.float32)
        if x.shape != tuple(t.shape):
            raise GraphcError(f"input '{t.name}' has shape {x.shape}; the program was compiled "
                              f"for {tuple(t.shape)}", hint="recompile for this shape")
        _check_range(program, "input", t.name, t.offset, x.nbytes, arena.nbytes)
        arena.data[t.offset:t.offset + x.nbytes] = np.ascontiguousarray(x).view(np.uint8).ravel()
    signatures: dict[str, list] = {}
    for i, ln in enumerate(program.launches):
        layer, op = _layer_of(program, ln.node)
        where = f"launch {i} (kernel '{ln.kernel}')"
        sig = signatures.get(ln.kernel)
        if sig is None:
            sig = signatures[ln.kernel] = module.signature(ln.kernel)
        args = _resolve(ln.args, sig, arena, weights, where, layer, op)
        try:
            module.launch(ln.kernel, ln.grid, ln.block, ln.smem, args, workers=workers)
        except GraphcError as e:
            msg = e.message
            for m in re.finditer(r"address (0x[0-9a-f]+)", msg):
                a = int(m.group(1), 16)
                place = arena.describe(a, "arena") or weights.describe(a, "weights")
                if place:
                    if place.startswith("byte") and "weights" in place:
                        place += ", which kernels must not write"
                    msg = msg.replace(m.group(0), f"{m.group(0)} ({place})", 1)
            raise GraphcError(f"launch {i}: {msg}", layer=layer, layer_type=op) from None
        for buf, what in ((arena, "arena"), (weights, "weights")):
            hit = buf.damage()
            if hit:
                side, off = hit
                raise GraphcError(f"{where} wrote out of bounds, {side} the {what} (byte "
                                  f"{off} of {buf.nbytes})", layer=layer, layer_type=op)
    out = {}
    for t in program.outputs:
        n = int(np.prod(t.shape)) * 4
        _check_range(program, "output", t.name, t.offset, n, arena.nbytes)
        raw = arena.data[t.offset:t.offset + n].view(np.uint32)
        unwritten = np.flatnonzero(raw == 0xFFFFFFFF)
        if unwritten.size:
            raise GraphcError(f"net '{program.name}': {unwritten.size} of {raw.size} elements of "
                              f"output '{t.name}' were never written (first: flat index "
                              f"{int(unwritten[0])})")
        out[t.name] = raw.view(np.float32).reshape(t.shape).copy()
    return {k: out[k] for k in names}


def _check_range(program, what, name, offset, nbytes, size):
    if offset < 0 or offset + nbytes > size:
        raise GraphcError(f"net '{program.name}': {what} '{name}' at bytes "
                          f"[{offset}, {offset + nbytes}) lies outside the {size}-byte arena")


def _resolve(args: list[Arg], sig: list, arena: _Guarded, weights: _Guarded, where, layer, op):
    def err(msg):
        return GraphcError(f"{where}: {msg}", layer=layer, layer_type=op)
    if len(args) != len(sig):
        raise err(f"the launch passes {len(args)} arguments; the kernel takes {len(sig)}")
    out = []
    for j, (a, (p, align)) in enumerate(zip(args, sig)):
        want = _PARAM_OF_ARG[a.kind]
        if want != p:
            raise err(f"argument {j} is {a.kind} ({_PARAM_WORDS[want]}); the kernel's parameter "
                      f"{j} is {_PARAM_WORDS.get(p, p)}")
        if a.kind in ("arena", "weights"):
            buf = arena if a.kind == "arena" else weights
            off = int(a.value)
            if not 0 <= off <= buf.nbytes:
                raise err(f"argument {j}: offset {off} is outside the {buf.nbytes}-byte {a.kind}")
            if off % align:
                raise err(f"argument {j}: {a.kind} offset {off} is not a multiple of {align}, "
                          f"the alignment of what parameter {j} points to (a GPU reports "
                          f"'misaligned address')")
            out.append(("p", buf.base + off))
        elif a.kind == "f32":
            out.append(("f", float(a.value)))
        else:
            out.append(("i" if a.kind == "i32" else "l", int(a.value)))
    return out
