"""CUDA C -> cubin with NVRTC (NVIDIA's cuda-python bindings, ``cuda.bindings.nvrtc``; the
optional extra ``pip install 'graphc[cuda]'``; no GPU is needed to compile).

    module = compile_module(source, arch="sm_90")
    module.cubin      SASS for that architecture (what the runtime loads)
    module.log        NVRTC's program log, ptxas's verbose report included
    module.kernels    {kernel: KernelInfo(registers, shared_bytes, spill_stores, ...)}
    cubin, log, kernels = module          # it is a tuple too

Compiled modules are cached on disk by content hash (source, architecture, options, NVRTC
version) under $GRAPHC_CACHE (else ~/.cache/graphc)/cuda-nvrtc/.  The CUDA headers the
kernels include (mma.h, cuda_fp16.h, cuda_bf16.h) are the ones bundled inside NVRTC,
extracted once into the cache.

A compile error is a GraphcError quoting NVRTC's message, the generated source line, the
kernel it is in and the layer that kernel was generated for (the generator marks each
layer's code with a ``// layer: NAME`` comment line).

``ptx_fallback=True``: when NVRTC cannot emit SASS for ``arch`` (an architecture newer than
it knows), the module holds PTX for the newest virtual architecture it supports instead
(``module.ptx``, ``module.cubin`` empty).  Prefer cubins: a driver older than this NVRTC
cannot load its PTX.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

from ...errors import GraphcError
from .program import KernelInfo

DEFAULT_ARCH = "sm_90"
#: options every compile gets (ptxas's verbose report gives registers, smem and spills)
BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v", "-default-device", "--extra-device-vectorization")
INSTALL_HINT = ("pip install 'graphc[cuda]' (cuda-bindings and nvidia-cuda-nvrtc; "
                "no GPU is needed to compile)")

_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)([af]?)$")
_LOCK = threading.Lock()
_MEMO: dict[str, "CompiledModule"] = {}
_HEADERS: dict[str, Path] = {}


class CompiledModule(NamedTuple):
    cubin: bytes
    log: str
    kernels: dict            # {name: KernelInfo}
    arch: str = DEFAULT_ARCH
    ptx: str = ""            # only with ptx_fallback, when no cubin could be made


def require_nvrtc():
    """``cuda.bindings.nvrtc``, or a GraphcError saying how to install it."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise GraphcError(f"the CUDA backend needs NVIDIA's cuda-bindings and NVRTC, which "
                          f"are not installed ({e})", hint=INSTALL_HINT) from None
    return nvrtc


def nvrtc_available() -> bool:
    try:
        require_nvrtc()
        nvrtc_version()
    except Exception:
        return False
    return True


def _check(nvrtc, result, what: str):
    """Unpack a cuda-python (status, *values) tuple; raise on a bad status."""
    if isinstance(result, tuple):
        status, *values = result
    else:
        status, values = result, []
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(status)
        raise GraphcError(f"NVRTC: {what} failed: {msg.decode() if isinstance(msg, bytes) else msg}",
                          hint=INSTALL_HINT if status == nvrtc.nvrtcResult
                          .NVRTC_ERROR_BUILTIN_OPERATION_FAILURE else None)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def nvrtc_version() -> tuple[int, int]:
    nvrtc = require_nvrtc()
    major, minor = _check(nvrtc, nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """The SASS architectures this NVRTC can compile for, e.g. [75, 80, ..., 90, 100, ...]."""
    nvrtc = require_nvrtc()
    return [int(a) for a in _check(nvrtc, nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


def parse_arch(arch: str) -> tuple[int, str]:
    """"sm_90" -> (90, ""); "sm_90a" -> (90, "a")."""
    m = _ARCH_RE.match(str(arch))
    if not m:
        raise GraphcError(f"{arch!r} is not a GPU architecture",
                          hint="give it as sm_XY, e.g. sm_90 (H100/H200), sm_80 (A100), "
                               "sm_89 (L4, RTX 40xx)")
    return int(m.group(2)), m.group(3)


def _cache_root() -> Path:
    env = os.environ.get("GRAPHC_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "graphc") / "cuda-nvrtc"


def headers_dir() -> Path:
    """The CUDA headers bundled with NVRTC, extracted (once) into the cache."""
    nvrtc = require_nvrtc()
    major, minor = nvrtc_version()
    key = f"{major}.{minor}"
    with _LOCK:
        if key in _HEADERS:
            return _HEADERS[key]
        d = _cache_root() / f"headers-{key}"
        if not (d / "mma.h").is_file():
            d.parent.mkdir(parents=True, exist_ok=True)
            res = nvrtc.nvrtcInstallBundledHeaders(
                str(d).encode(), nvrtc.NVRTC_INSTALL_HEADERS_SKIP_IF_EXISTS)
            status = res[0] if isinstance(res, tuple) else res
            if status != nvrtc.nvrtcResult.NVRTC_SUCCESS or not (d / "mma.h").is_file():
                detail = res[1] if isinstance(res, tuple) and len(res) > 1 else None
                raise GraphcError(f"NVRTC {key} could not extract its bundled CUDA headers into "
                                  f"{d} ({status}{': ' + str(detail) if detail else ''})",
                                  hint="make the cache directory writable (or set "
                                       "GRAPHC_CACHE), or reinstall nvidia-cuda-nvrtc")
        _HEADERS[key] = d
        return d


# ---------------------------------------------------------------------------------------
# ptxas's report

_FUNC = re.compile(r"ptxas info\s*:\s*(?:Compiling entry function|Function properties for)\s+'?([\w$.]+)'?")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*:\s*Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, KernelInfo]:
    """{kernel: KernelInfo} from ptxas's verbose output (``--ptxas-options=-v``)."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _FUNC.search(line)
        if m:
            current = m.group(1)
            out.setdefault(current, dict(registers=0, shared_bytes=0, spill_stores=0,
                                         spill_loads=0, local_bytes=0))
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            out[current].update(local_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                                spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            out[current]["registers"] = int(m.group(1))
            s = _SMEM.search(m.group(2))
            out[current]["shared_bytes"] = int(s.group(1)) if s else 0
    return {k: KernelInfo(name=k, **v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# errors

_DIAG = re.compile(r"^(?P<file>[^()\n]+)\((?P<line>\d+)\): (?P<kind>(?:catastrophic )?error"
                   r"|warning)(?: #\S+)?: (?P<msg>.*)$", re.M)
_KERNEL_DEF = re.compile(r'__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(\w+)\s*\(')
_LAYER_MARK = re.compile(r"^\s*//\s*layer:\s*(.+?)\s*$")


def locate(source: str, line: int) -> tuple[str | None, str | None]:
    """(kernel, layer) of 1-based ``line`` of the generated source: the nearest kernel
    definition and ``// layer: NAME`` mark at or above it."""
    lines = source.splitlines()
    kernel = layer = None
    for i in range(min(line, len(lines)) - 1, -1, -1):
        text = lines[i]
        if kernel is None:
            m = _KERNEL_DEF.search(text)
            if m:
                kernel = m.group(1)
        if layer is None:
            m = _LAYER_MARK.match(text)
            if m:
                layer = m.group(1)
        if kernel is not None and layer is not None:
            break
    return kernel, layer


def compile_error(source: str, log: str, arch: str, name: str) -> GraphcError:
    """The GraphcError of a failed compile: the first error, its source line, the
    kernel and the layer."""
    errors = [m for m in _DIAG.finditer(log) if "error" in m.group("kind")]
    if not errors:
        return GraphcError(f"NVRTC could not compile the generated CUDA C for {arch}:\n"
                           f"{log.strip()[:4000]}",
                           hint="this is a bug in graphc's CUDA code generator")
    first = errors[0]
    line = int(first.group("line"))
    lines = source.splitlines()
    text = lines[line - 1].strip() if 0 < line <= len(lines) else "?"
    kernel, layer = locate(source, line)
    where = f"{name}:{line}"
    msg = (f"NVRTC error compiling kernel '{kernel or '?'}' for {arch}: "
           f"{first.group('msg').strip()}\n  {line} | {text}")
    if len(errors) > 1:
        msg += f"\n  ({len(errors) - 1} more error(s); the full log is in the error's .log)"
    err = GraphcError(msg, where=where, layer=layer,
                      hint="this is a bug in graphc's CUDA code generator (or its templates, "
                           "templates/cuda/); report it with the layer's parameters")
    err.log = log
    err.kernel = kernel
    return err


# ---------------------------------------------------------------------------------------
# compiling


def _options(arch: str, extra, include: Path, target: str) -> list[str]:
    return [f"--gpu-architecture={target}", *BASE_OPTIONS, f"-I{include}",
            f"-I{include / 'cccl'}", *extra]


def _key(source: str, arch: str, options, version) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([arch, list(options), list(version)]).encode())
    h.update(b"\0")
    h.update(source.encode())
    return h.hexdigest()


def _log(nvrtc, prog) -> str:
    n = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    buf = b" " * int(n)
    _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
    return buf.rstrip(b"\0 ").decode(errors="replace")


def _run(nvrtc, source: str, name: str, opts: list[str], want_ptx: bool):
    prog = _check(nvrtc, nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        enc = [o.encode() for o in opts]
        res = nvrtc.nvrtcCompileProgram(prog, len(enc), enc)
        status = res[0] if isinstance(res, tuple) else res
        log = _log(nvrtc, prog)
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return None, log
        if want_ptx:
            n = _check(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            buf = b" " * int(n)
            _check(nvrtc, nvrtc.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
            return buf.rstrip(b"\0"), log
        n = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        buf = b" " * int(n)
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        return bytes(buf), log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_module(source: str, arch: str = DEFAULT_ARCH, *, options=(), name: str = "kernels.cu",
                   cache: bool = True, ptx_fallback: bool = False) -> CompiledModule:
    """Compile CUDA C ``source`` to a cubin for ``arch`` (e.g. "sm_90", "sm_80", "sm_90a")."""
    nvrtc = require_nvrtc()
    number, suffix = parse_arch(arch)
    version = nvrtc_version()
    options = tuple(options)
    key = _key(source, arch, options, version) + ("-ptx" if ptx_fallback else "")
    with _LOCK:
        if cache and key in _MEMO:
            return _MEMO[key]
    root = _cache_root()
    if cache:
        hit = _load(root, key, arch)
        if hit is not None:
            with _LOCK:
                _MEMO[key] = hit
            return hit
    include = headers_dir()
    supported = supported_archs()
    if number in supported:
        code, log = _run(nvrtc, source, name, _options(arch, options, include, f"sm_{number}{suffix}"),
                         False)
        if code is None:
            raise compile_error(source, log, arch, name)
        mod = CompiledModule(code, log, parse_ptxas_log(log), arch)
    elif ptx_fallback:
        virtual = max(a for a in supported if a <= number) if any(a <= number for a in supported) \
            else None
        if virtual is None:
            raise GraphcError(f"NVRTC {version[0]}.{version[1]} cannot compile for {arch} "
                              f"(it supports sm_{', sm_'.join(map(str, supported))})",
                              hint="choose one of those architectures")
        opts = [o for o in _options(arch, options, include, f"compute_{virtual}")
                if o != "--ptxas-options=-v"]
        code, log = _run(nvrtc, source, name, opts, True)
        if code is None:
            raise compile_error(source, log, f"compute_{virtual}", name)
        mod = CompiledModule(b"", log, {}, arch, code.decode())
    else:
        raise GraphcError(f"NVRTC {version[0]}.{version[1]} cannot make SASS for {arch} "
                          f"(it supports sm_{', sm_'.join(map(str, supported))})",
                          hint="choose one of those architectures, or upgrade nvidia-cuda-nvrtc")
    if cache:
        _store(root, key, mod)
    with _LOCK:
        _MEMO[key] = mod
    return mod


def _load(root: Path, key: str, arch: str) -> CompiledModule | None:
    meta, blob = root / f"{key}.json", root / f"{key}.bin"
    try:
        info = json.loads(meta.read_text())
        data = blob.read_bytes()
    except (OSError, ValueError):
        return None
    kernels = {k: KernelInfo(**v) for k, v in info["kernels"].items()}
    if info.get("ptx"):
        return CompiledModule(b"", info["log"], kernels, arch, data.decode())
    return CompiledModule(data, info["log"], kernels, arch)


def _store(root: Path, key: str, mod: CompiledModule) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        info = {"log": mod.log, "ptx": bool(mod.ptx),
                "kernels": {k: vars(v) for k, v in mod.kernels.items()}}
        for suffix, data in ((".bin", mod.ptx.encode() if mod.ptx else mod.cubin),
                             (".json", json.dumps(info).encode())):
            fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{key[:8]}-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, root / f"{key}{suffix}")
    except OSError:
        pass                       # an unwritable cache only costs a recompile
