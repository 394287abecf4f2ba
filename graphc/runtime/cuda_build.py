"""Building a net for the CUDA target into a self-contained shared library
(``graphc compile --target cuda``).

    optimized IR --codegen/cuda/lower.py--> CudaProgram (cubin from NVRTC, launches, ...)
    + the CUDA host runtime (templates/cuda_runtime.c.j2: driver loaded with dlopen, arena
      and weights on the device, the forward pass as one CUDA Graph, C API)
    + net.h (templates/net.h.j2 with target "cuda")
    + the cubin and the weights (assembler ``.incbin``; the weights may instead stay beside
      the library with ``weights_file=True``)
    -> cc -shared -> net.so   (needs only libc, libdl and pthreads: no CUDA library, no GPU,
                               to build; the driver is found when a context is created)

``build_cuda_library`` takes a CudaProgram (so the runtime can be built and tested apart
from code generation); ``build_cuda`` lowers an optimized graph first; ``cached_cuda_library``
builds through the cache of build.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import GraphcError
from .build import (EXPORTS, BuildResult, _env, _guard, _sources_digest, _tmp_beside, cache_dir,
                    find_cc, write_weights_file)

CUDA_EXPORTS = [*EXPORTS, "graphc_create_device", "graphc_set_input_device",
                "graphc_get_output_device", "graphc_run_async", "graphc_synchronize",
                "graphc_device_name", "graphc_target", "graphc_cuda_arch", "graphc_precision"]
PRECISIONS = ("tf32", "fp32", "fp16", "bf16")
DEFAULT_ARCH = "sm_90"
ARG_CODES = {"arena": 0, "weights": 1, "i32": 2, "i64": 3, "f32": 4}
_ARCH_RE = re.compile(r"^sm_(\d+)(\d)([af]?)$")

BLOBS_ASM = """\t.section .rodata.graphc_blobs,"a",@progbits
\t.balign 256
\t.globl graphc_cubin
\t.hidden graphc_cubin
\t.type graphc_cubin, @object
graphc_cubin:
\t.incbin "kernels.cubin"
\t.size graphc_cubin, . - graphc_cubin
{weights}\t.section .note.GNU-stack,"",@progbits
"""
WEIGHTS_PART = """\t.balign 64
\t.globl graphc_weights_blob
\t.hidden graphc_weights_blob
\t.type graphc_weights_blob, @object
graphc_weights_blob:
\t.incbin "weights.bin"
\t.size graphc_weights_blob, . - graphc_weights_blob
"""


def require_cuda_bindings():
    """NVIDIA's cuda-python NVRTC bindings, or a GraphcError saying how to install them
    (``pip install 'graphc[cuda]'``)."""
    from ..codegen.cuda.nvrtc import require_nvrtc
    return require_nvrtc()


def parse_arch(arch: str) -> tuple[int, int, bool]:
    """"sm_90" -> (9, 0, False); "sm_90a" -> (9, 0, True) (an arch-specific cubin)."""
    m = _ARCH_RE.match(str(arch))
    if not m:
        raise GraphcError(f"--arch {arch!r} is not a GPU architecture",
                          hint="give it as sm_XY, e.g. sm_90 (H100/H200), sm_80 (A100), "
                               "sm_89 (L4, RTX 40xx)")
    return int(m.group(1)), int(m.group(2)), m.group(3) == "a"


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise GraphcError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                          hint="tf32 (the default) is fp32 storage with TF32 tensor-core "
                               "matrix products; fp32 is exact IEEE single precision")
    return precision


def _bits(kind: str, value, where: str) -> int:
    """The argument's value as the runtime's table holds it (see cuda_runtime.c.j2)."""
    if kind == "f32":
        return struct.unpack("<I", struct.pack("<f", float(value)))[0]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GraphcError(f"{where}: a {kind} argument must be an integer, got {value!r}",
                          hint="this is a bug in the CUDA code generator")
    v = int(value)
    lo, hi = {"i32": (-2**31, 2**31), "i64": (-2**63, 2**63)}.get(kind, (0, 2**63))
    if not lo <= v < hi:
        raise GraphcError(f"{where}: {kind} argument {v} is out of range",
                          hint="this is a bug in the CUDA code generator")
    return v & 0xffffffff if kind == "i32" else v & 0xffffffffffffffff


def runtime_tables(program) -> dict:
    """The kernels, launches, arguments and profiling groups of ``program`` as the runtime
    template takes them, checked: every offset inside the arena / the weights, every
    launch's dimensions within CUDA's limits."""
    nodes = program.nodes
    kernels: dict[str, dict] = {}
    launches, args, groups = [], [], []
    wbytes = program.weights.size
    for i, l in enumerate(program.launches):
        if not 0 <= l.node < len(nodes):
            raise GraphcError(f"launch {i} ({l.kernel}) names node {l.node}, the program has "
                              f"{len(nodes)}", hint="this is a bug in the CUDA code generator")
        where = f"layer '{nodes[l.node].name}', kernel {l.kernel}"
        grid, block = tuple(int(v) for v in l.grid), tuple(int(v) for v in l.block)
        if (len(grid) != 3 or len(block) != 3 or min(grid + block) < 1 or grid[0] >= 2**31
                or max(grid[1:]) > 65535 or block[0] * block[1] * block[2] > 1024
                or block[2] > 64 or not 0 <= int(l.smem) < 2**31):
            raise GraphcError(f"{where}: launch configuration grid {grid} block {block} smem "
                              f"{l.smem} is outside CUDA's limits",
                              hint="this is a bug in the CUDA code generator")
        k = kernels.setdefault(l.kernel, {"name": l.kernel, "index": len(kernels),
                                          "max_smem": 0, "node": l.node})
        k["max_smem"] = max(k["max_smem"], int(l.smem))
        arg0 = len(args)
        for a in l.args:
            if a.kind in ("arena", "weights"):
                limit = program.arena_bytes if a.kind == "arena" else wbytes
                if not isinstance(a.value, (int, np.integer)) or not 0 <= int(a.value) <= limit:
                    raise GraphcError(f"{where}: {a.kind} offset {a.value} is outside the "
                                      f"{a.kind} ({limit} bytes)",
                                      hint="this is a bug in the CUDA code generator")
            args.append({"kind": ARG_CODES[a.kind], "value": _bits(a.kind, a.value, where)})
        launches.append({"kernel": k["index"], "grid": grid, "block": block,
                         "smem": int(l.smem), "arg0": arg0, "nargs": len(l.args),
                         "node": l.node})
        if groups and groups[-1]["node"] == l.node:
            groups[-1]["end"] = i + 1
        else:
            groups.append({"node": l.node, "first": i, "end": i + 1})
    for t in [*program.inputs, *program.outputs]:
        if t.offset < 0 or t.offset + 4 * t.numel > program.arena_bytes:
            raise GraphcError(f"blob '{t.name}' at arena offset {t.offset} ({4 * t.numel} "
                              f"bytes) lies outside the arena ({program.arena_bytes} bytes)",
                              hint="this is a bug in the CUDA code generator")
    return {"kernels": sorted(kernels.values(), key=lambda k: k["index"]),
            "launches": launches, "args": args, "groups": groups}


def render_cuda_sources(program, header_name: str, embedded: bool, weights_file: str) -> dict:
    """{file name: text} of the CUDA host runtime and the header."""
    from .. import __version__
    major, minor, exact = parse_arch(program.arch)
    check_precision(program.precision)
    env = _env()
    if not (Path(env.loader.searchpath[0]) / "cuda_runtime.c.j2").is_file():
        raise GraphcError("the CUDA runtime template cuda_runtime.c.j2 is missing",
                          hint="install graphc from its source tree (pip install -e .)")
    ctx = dict(name=program.name, version=__version__, header_name=header_name,
               guard=_guard(Path(header_name).stem + "_" + program.name),
               nodes=program.nodes, inputs=program.inputs, outputs=program.outputs,
               arena_bytes=program.arena_bytes, weights_bytes=program.weights.size,
               fingerprint=program.weights.digest(), embedded=embedded,
               weights_file=weights_file, target="cuda", arch=program.arch,
               arch_major=major, arch_minor=minor, arch_exact=exact,
               precision=program.precision,
               max_ndim=max([len(t.shape) for t in program.inputs + program.outputs] + [1]),
               **runtime_tables(program))
    return {"cuda_runtime.c": env.get_template("cuda_runtime.c.j2").render(**ctx),
            "graphc_net.h": env.get_template("net.h.j2").render(**ctx)}


def _check_cubin(program) -> None:
    cubin = bytes(program.cubin or b"")
    if cubin[:4] != b"\x7fELF":
        raise GraphcError(f"the program's cubin ({len(cubin)} bytes) is not an ELF image",
                          hint="the CUDA runtime loads SASS cubins (NVRTC's nvrtcGetCUBIN), "
                               "not PTX")


def build_cuda_library(program, output, *, weights_file: bool = False, header=None,
                       keep_sources=None) -> BuildResult:
    """Link a CudaProgram with the CUDA host runtime into the shared library ``output``,
    its header (default: ``output`` with suffix .h) and, with ``weights_file``, the
    weights beside it (suffix .weights)."""
    seconds = {}
    output = Path(output)
    header = Path(header) if header else output.with_suffix(".h")
    wpath = output.with_suffix(".weights") if weights_file else None
    cc = find_cc()
    _check_cubin(program)
    t = time.perf_counter()
    srcs = render_cuda_sources(program, header.name, embedded=not weights_file,
                               weights_file=wpath.name if wpath else "")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_lib = _tmp_beside(output).resolve()
    with tempfile.TemporaryDirectory(prefix="graphc-build-") as d:
        d = Path(d)
        for name, text in srcs.items():
            (d / name).write_text(text)
        (d / "kernels.cubin").write_bytes(bytes(program.cubin))
        if not weights_file:
            write_weights_file(program, d / "weights.bin")
        (d / "blobs.S").write_text(BLOBS_ASM.format(weights="" if weights_file else WEIGHTS_PART))
        (d / "exports.map").write_text("{\n  global:\n" + "".join(
            f"    {e};\n" for e in CUDA_EXPORTS) + "  local: *;\n};\n")
        if program.source:
            (d / "kernels.cu").write_text(program.source)
        cmd = [*cc, "-shared", "-fPIC", "-O2", "-std=gnu11", "-fvisibility=hidden", "-Wall",
               "-o", str(tmp_lib), "cuda_runtime.c", "blobs.S",
               "-Wl,--version-script=exports.map", "-Wl,-z,noexecstack", "-Wl,-Bsymbolic",
               "-ldl", "-lpthread"]
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            tmp_lib.unlink(missing_ok=True)
            raise GraphcError(f"the C compiler failed ({shlex.join(cmd)}):\n{r.stderr.strip()}",
                              hint="this is a bug in graphc's CUDA runtime generator, or the "
                                   "compiler cannot build shared libraries; set CC to another")
        if keep_sources:
            keep = Path(keep_sources)
            keep.mkdir(parents=True, exist_ok=True)
            for name in (*srcs, "kernels.cubin", "blobs.S", "exports.map",
                         *(["kernels.cu"] if program.source else [])):
                shutil.copy(d / name, keep / name)
        header.parent.mkdir(parents=True, exist_ok=True)
        tmp_h = _tmp_beside(header)
        tmp_w = _tmp_beside(wpath) if wpath is not None else None
        try:
            shutil.copy(d / "graphc_net.h", tmp_h)
            if tmp_w is not None:
                write_weights_file(program, tmp_w)
                os.replace(tmp_w, wpath)
            os.replace(tmp_h, header)
            os.replace(tmp_lib, output)
        finally:
            for t_ in (tmp_h, tmp_w, tmp_lib):
                if t_ is not None:
                    t_.unlink(missing_ok=True)
    seconds["cc"] = time.perf_counter() - t
    return BuildResult(output, header, wpath, program, seconds)


def lower_for_cuda(g_opt, arch: str = DEFAULT_ARCH, precision: str = "tf32"):
    """The CudaProgram of an optimized graph (code generation + NVRTC)."""
    parse_arch(arch)
    check_precision(precision)
    require_cuda_bindings()
    try:
        from ..codegen.cuda.lower import lower_graph
    except ImportError as e:
        raise GraphcError(f"the CUDA code generator is not available in this build ({e})",
                          hint="use the CPU target (--target cpu, backend='cpu')") from None
    return lower_graph(g_opt, arch, precision)


def build_cuda(g_opt, output, *, arch: str = DEFAULT_ARCH, precision: str = "tf32",
               weights_file: bool = False, header=None, keep_sources=None) -> BuildResult:
    """Compile an optimized graph (params with data) for the GPU into ``output``."""
    t = time.perf_counter()
    program = lower_for_cuda(g_opt, arch, precision)
    lower_s = time.perf_counter() - t
    r = build_cuda_library(program, output, weights_file=weights_file, header=header,
                           keep_sources=keep_sources)
    r.seconds = {"lower+nvrtc": lower_s, **r.seconds}
    return r


# ---------------------------------------------------------------------------------------
# the cache (the same directory as the CPU libraries; the key says cuda, arch, precision)


def _cuda_sources_digest() -> str:
    from .build import ROOT
    h = hashlib.blake2b(digest_size=16)
    h.update(_sources_digest().encode())
    cuda = ROOT / "graphc" / "codegen" / "cuda"
    tdir = Path(_env().loader.searchpath[0])
    for f in sorted([*cuda.rglob("*.py"), *(tdir / "cuda").rglob("*")]):
        if f.is_file():
            h.update(str(f.relative_to(f.parents[1])).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def cuda_cache_key(g_opt, arch: str, precision: str) -> str:
    from .. import __version__
    from ..ir.text import print_graph
    h = hashlib.blake2b(digest_size=20)
    h.update(print_graph(g_opt).encode())
    for name, p in g_opt.params.items():
        h.update(name.encode())
        if p.data is not None:
            h.update(np.ascontiguousarray(p.data, dtype=np.float32).tobytes())
    h.update(json.dumps(["cuda", __version__, _cuda_sources_digest(), arch,
                         precision]).encode())
    return h.hexdigest()


def cached_cuda_library(g, arch: str = DEFAULT_ARCH, precision: str = "tf32", *,
                        optimized: bool = False) -> Path:
    """The CUDA library for graph ``g`` (lowered, params with data), from the cache or
    built into it (concurrent builders each build aside and rename into place)."""
    from .build import optimize
    parse_arch(arch)
    check_precision(precision)
    g_opt = g if optimized else optimize(g)
    key = cuda_cache_key(g_opt, arch, precision)
    root = cache_dir()
    final = root / key
    lib = final / "net.so"
    if lib.is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=root))
    try:
        build_cuda(g_opt, work / "net.so", arch=arch, precision=precision)
        try:
            os.rename(work, final)
        except OSError:
            if not lib.is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return lib
