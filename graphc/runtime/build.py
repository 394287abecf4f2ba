"""Building a net into a self-contained shared library (``graphc compile``).

    optimize (the inference pipeline) -> lower to LLVM IR (codegen/llvm) -> object file
    + the C runtime (templates/runtime.c.j2: arena, thread pool, API) + net.h
    + the weights (a file with a 64-byte header; embedded by an assembler ``.incbin``,
      or left beside the library with ``weights_file=True``)
    -> cc -shared -> net.so   (needs only libc, libm and pthreads at run time)

``cached_library`` builds into a cache directory ($GRAPHC_CACHE, else ~/.cache/graphc)
keyed by a hash of the optimized IR text, the weights, the options, the graphc version
and the code generator's own sources, so an unchanged net is compiled once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import GraphcError
from ..ir.graph import Graph

ROOT = Path(__file__).resolve().parents[2]


def _templates_dir() -> Path:
    """templates/: inside the package once installed (graphc/templates, see setup.py), at
    the top of the source tree otherwise."""
    installed = Path(__file__).resolve().parents[1] / "templates"
    return installed if installed.is_dir() else ROOT / "templates"


TEMPLATES = _templates_dir()
EXPORTS = ["graphc_create", "graphc_create_ex", "graphc_destroy", "graphc_set_input",
           "graphc_run", "graphc_get_output", "graphc_error_message", "graphc_net_name",
           "graphc_num_inputs", "graphc_num_outputs", "graphc_input_name",
           "graphc_output_name", "graphc_input_ndim", "graphc_output_ndim",
           "graphc_input_shape", "graphc_output_shape", "graphc_num_threads",
           "graphc_num_nodes", "graphc_node_name", "graphc_node_op", "graphc_node_flops",
           "graphc_set_profiling", "graphc_node_times"]
WEIGHTS_MAGIC = b"GRAPHCW1"


@dataclass
class BuildResult:
    library: Path
    header: Path
    weights: Path | None
    program: object = field(repr=False, default=None)
    seconds: dict = field(default_factory=dict)   # phase -> seconds


def find_cc() -> list[str]:
    """The C compiler: $CC (may carry flags), else cc, gcc or clang on PATH."""
    env = os.environ.get("CC")
    if env:
        cmd = shlex.split(env)
        if cmd and shutil.which(cmd[0]):
            return cmd
        raise GraphcError(f"the C compiler CC={env!r} was not found",
                          hint="set CC to an installed compiler (e.g. CC=gcc) or unset it")
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise GraphcError("no C compiler found (looked for $CC, cc, gcc and clang on PATH); the "
                      "CPU backend needs one to link the generated library",
                      hint="install gcc (e.g. apt-get install gcc) or set CC=/path/to/compiler")


def optimize(g: Graph) -> Graph:
    """The inference pipeline (what the backend compiles)."""
    from ..passes import run_pipeline
    return run_pipeline(g)


def fill_params(g: Graph, seed: int = 0) -> None:
    """Give every param without data its filler's values (as Caffe initializes a net
    without weights)."""
    from ..ops.fillers import fill
    rng = np.random.default_rng(seed)
    for p in g.params.values():
        if p.data is None:
            p.data = fill(p.filler or {"type": "constant", "value": 0.0}, p.type.shape, rng)


def _cstr(s) -> str:
    """A C string literal of ``s`` (UTF-8; quotes, backslashes, non-printable and non-ASCII
    bytes as octal escapes)."""
    out = []
    for byte in str(s).encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\?':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _env():
    import jinja2
    if not (TEMPLATES / "runtime.c.j2").is_file():
        raise GraphcError(f"the runtime templates are missing (looked in {TEMPLATES})",
                          hint="install graphc from its source tree (pip install -e .)")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["cstr"] = _cstr
    env.filters["ccomment"] = lambda v: "".join(
        c if 32 <= ord(c) < 127 else "?" for c in str(v)).replace("*/", "*?")
    return env


def _guard(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.upper())


def write_weights_file(program, path: Path) -> None:
    """The weights file: a 64-byte header (magic, payload size, fingerprint), then the
    packed weights."""
    blob = program.weights
    header = (WEIGHTS_MAGIC + blob.size.to_bytes(8, "little") + blob.digest().encode("ascii"))
    with open(path, "wb") as f:
        f.write(header.ljust(64, b"\0"))
        blob.write(f)


def render_sources(program, header_name: str, embedded: bool, weights_file: str) -> dict:
    """{file name: text} of the runtime C file and the header (graphc_net.h while
    building; ``header_name`` is the name it gets)."""
    from .. import __version__
    env = _env()
    ctx = dict(name=program.name, version=__version__, header_name=header_name,
               guard=_guard(Path(header_name).stem + "_" + program.name),
               steps=program.steps, nodes=program.nodes, inputs=program.inputs,
               outputs=program.outputs, arena_bytes=program.arena_bytes,
               persistent_bytes=program.persistent_bytes,
               scratch_bytes=program.scratch_bytes, weights_bytes=program.weights.size,
               fingerprint=program.weights.digest(), embedded=embedded,
               weights_file=weights_file,
               max_ndim=max([len(t.shape) for t in program.inputs + program.outputs] + [1]))
    return {"runtime.c": env.get_template("runtime.c.j2").render(**ctx),
            "graphc_net.h": env.get_template("net.h.j2").render(**ctx)}


WEIGHTS_ASM = """\t.section .rodata.graphc_weights,"a",@progbits
\t.balign 64
\t.globl graphc_weights_blob
\t.hidden graphc_weights_blob
\t.type graphc_weights_blob, @object
graphc_weights_blob:
\t.incbin "weights.bin"
\t.size graphc_weights_blob, . - graphc_weights_blob
\t.section .note.GNU-stack,"",@progbits
"""


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def build_library(g_opt: Graph, output, *, cpu: str = "native", weights_file: bool = False,
                  header=None, keep_sources=None) -> BuildResult:
    """Compile an optimized graph (params with data) into the shared library ``output``,
    its header (default: ``output`` with suffix .h) and, with ``weights_file``, the
    weights beside it (suffix .weights).  ``keep_sources``: a directory to keep the
    generated C, assembly, LLVM IR and object in."""
    from ..codegen.llvm import jit
    from ..codegen.llvm.lower import lower_graph
    seconds = {}
    output = Path(output)
    header = Path(header) if header else output.with_suffix(".h")
    wpath = output.with_suffix(".weights") if weights_file else None
    cc = find_cc()
    t = time.perf_counter()
    target = jit.target(cpu)
    program = lower_graph(g_opt, target)
    seconds["lower"] = time.perf_counter() - t
    t = time.perf_counter()
    obj = jit.emit_object(program.ir, target)
    seconds["llvm"] = time.perf_counter() - t
    t = time.perf_counter()
    srcs = render_sources(program, header.name, embedded=not weights_file,
                          weights_file=wpath.name if wpath else "")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_lib = _tmp_beside(output).resolve()
    with tempfile.TemporaryDirectory(prefix="graphc-build-") as d:
        d = Path(d)
        for name, text in srcs.items():
            (d / name).write_text(text)
        (d / "kernels.o").write_bytes(obj)
        (d / "exports.map").write_text("{\n  global:\n" + "".join(f"    {e};\n" for e in EXPORTS)
                                       + "  local: *;\n};\n")
        files = ["runtime.c", "kernels.o"]
        if not weights_file:
            write_weights_file(program, d / "weights.bin")
            (d / "weights.S").write_text(WEIGHTS_ASM)
            files.insert(1, "weights.S")
        cmd = [*cc, "-shared", "-fPIC", "-O2", "-std=gnu11", "-fvisibility=hidden", "-Wall",
               "-o", str(tmp_lib), *files, "-Wl,--version-script=exports.map",
               "-Wl,-z,noexecstack", "-Wl,-Bsymbolic", "-lm", "-lpthread"]
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            tmp_lib.unlink(missing_ok=True)
            raise GraphcError(f"the C compiler failed ({shlex.join(cmd)}):\n{r.stderr.strip()}",
                              hint="this is a bug in graphc's runtime generator, or the "
                                   "compiler cannot build shared libraries; set CC to another")
        if keep_sources:
            keep = Path(keep_sources)
            keep.mkdir(parents=True, exist_ok=True)
            for name in (*srcs, "kernels.o", "exports.map"):
                shutil.copy(d / name, keep / name)
            (keep / "kernels.ll").write_text(program.ir)
        # the files appear complete or not at all (written aside, then renamed)
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


# ---------------------------------------------------------------------------------------
# the cache


def cache_dir() -> Path:
    env = os.environ.get("GRAPHC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "graphc"


def _sources_digest() -> str:
    """A hash of the code generator, the runtime templates and this module, so a cached
    library is rebuilt when graphc's code changes."""
    h = hashlib.blake2b(digest_size=16)
    pkg = ROOT / "graphc"
    files = sorted([*(pkg / "codegen" / "llvm").rglob("*.py"), *(pkg / "runtime").glob("*.py"),
                    *(pkg / "passes").glob("*.py"), *TEMPLATES.glob("*.j2")])
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(g_opt: Graph, cpu: str = "native", weights_file: bool = False) -> str:
    from .. import __version__
    from ..codegen.llvm import jit
    from ..codegen.llvm.kernels import winograd
    from ..ir.text import print_graph
    t = jit.target(cpu)
    h = hashlib.blake2b(digest_size=20)
    h.update(print_graph(g_opt).encode())
    for name, p in g_opt.params.items():
        h.update(name.encode())
        if p.data is not None:
            h.update(np.ascontiguousarray(p.data, dtype=np.float32).tobytes())
    h.update(json.dumps([__version__, _sources_digest(), t.cpu_name, t.features,
                         bool(weights_file), winograd.settings()]).encode())
    return h.hexdigest()


def cached_library(g: Graph, cpu: str = "native", *, optimized: bool = False) -> Path:
    """The library for graph ``g`` (lowered, params with data), from the cache or built
    into it.  Safe against concurrent builders (each builds in its own directory and
    renames it into place)."""
    g_opt = g if optimized else optimize(g)
    key = cache_key(g_opt, cpu)
    root = cache_dir()
    final = root / key
    lib = final / "net.so"
    if lib.is_file():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=root))
    try:
        build_library(g_opt, work / "net.so", cpu=cpu)
        try:
            os.rename(work, final)
        except OSError:
            if not lib.is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return lib
