"""A small llvmlite wrapper: target machines, -O3 compilation, JIT and object emission.

``cpu`` selects the code the backend may use:

    "native"    the host CPU (name and features as LLVM detects them)
    "generic"   the x86-64 baseline (SSE2 only): runs on any x86-64 machine
    "avx2"      x86-64-v3 (AVX2 + FMA), the CI machines' level
    "avx512"    x86-64-v4 (AVX-512F/BW/DQ/VL)
    other       any LLVM CPU name ("znver3", "haswell", ...); ``features`` may add to it

``Target.vector_bits`` and ``Target.has_fma`` tell code generators what the chosen
machine has (for presets and names they are probed from the code LLVM emits).
"""
from __future__ import annotations

import ctypes
import functools
import threading

import llvmlite.binding as llvm

from graphc.errors import GraphcError

_PRESETS = {"generic": "x86-64", "avx2": "x86-64-v3", "avx512": "x86-64-v4"}
# LLVM's global context is not thread-safe: one compilation at a time
_llvm_lock = threading.RLock()
_initialized = False


def _init() -> None:
    global _initialized
    with _llvm_lock:
        if not _initialized:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            _initialized = True


class Target:
    """An x86-64 code-generation target (cpu name + feature string) and what it offers."""

    def __init__(self, cpu: str = "native", features: str | None = None):
        _init()
        self.request = cpu
        if cpu == "native":
            name = llvm.get_host_cpu_name()
            feats = llvm.get_host_cpu_features().flatten() if features is None else features
        else:
            name = _PRESETS.get(cpu, cpu)
            feats = features or ""
        self.cpu_name = name
        self.features = feats
        self._llvm_target = llvm.Target.from_triple(llvm.get_process_triple())
        try:
            with _llvm_lock:
                self.machine(jit=True)
        except RuntimeError as e:
            raise GraphcError(f"LLVM cannot make a target machine for cpu '{cpu}' ({e})",
                              hint="use cpu='native', 'generic', 'avx2', 'avx512' or an "
                                   "LLVM x86 CPU name such as 'znver3'") from None
        self.vector_bits, self.has_fma = _probe_isa(self)

    def machine(self, *, jit: bool, pic: bool = False) -> llvm.TargetMachine:
        return self._llvm_target.create_target_machine(
            cpu=self.cpu_name, features=self.features, opt=3,
            reloc="pic" if pic else "default",
            codemodel="jitdefault" if jit else "default", jit=jit)

    @property
    def triple(self) -> str:
        return llvm.get_process_triple()

    def __repr__(self) -> str:
        return (f"Target({self.request!r}: cpu={self.cpu_name}, vector_bits={self.vector_bits}, "
                f"fma={self.has_fma})")


@functools.lru_cache(maxsize=None)
def target(cpu: str = "native", features: str | None = None) -> Target:
    """The (cached) Target for a cpu request."""
    return Target(cpu, features)


_PROBE = """
define void @probe(ptr %p) {
  %a = load <16 x float>, ptr %p, align 4
  %r = call <16 x float> @llvm.fma.v16f32(<16 x float> %a, <16 x float> %a, <16 x float> %a)
  store <16 x float> %r, ptr %p, align 4
  ret void
}
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
"""


def _probe_isa(t: Target) -> tuple[int, bool]:
    """Widest float vector register and FMA support, read off the code LLVM emits."""
    asm = emit_assembly(_PROBE, t)
    bits = 512 if "zmm" in asm else 256 if "ymm" in asm else 128
    return bits, "vfmadd" in asm


def _optimize(mod: llvm.ModuleRef, tm: llvm.TargetMachine) -> None:
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)


def _parse(module_ir: str, t: Target) -> llvm.ModuleRef:
    try:
        mod = llvm.parse_assembly(module_ir)
        mod.verify()
    except RuntimeError as e:
        raise GraphcError(f"generated LLVM IR is invalid: {e}",
                          hint="this is a bug in graphc's code generator; please report it") \
            from None
    mod.triple = t.triple
    return mod


def _as_target(t: Target | str) -> Target:
    return t if isinstance(t, Target) else target(t)


def _compile(module_ir: str, t: Target, *, jit: bool, pic: bool = False):
    """(target machine, optimized module) for ``module_ir``."""
    tm = t.machine(jit=jit, pic=pic)
    mod = _parse(module_ir, t)
    mod.data_layout = str(tm.target_data)
    _optimize(mod, tm)
    return tm, mod


def optimized_ir(module_ir: str, cpu: Target | str = "native") -> str:
    """The module after the -O3 pipeline (for inspection and tests)."""
    with _llvm_lock:
        _, mod = _compile(module_ir, _as_target(cpu), jit=False)
        return str(mod)


def emit_assembly(module_ir: str, cpu: Target | str = "native") -> str:
    with _llvm_lock:
        tm, mod = _compile(module_ir, _as_target(cpu), jit=False)
        return tm.emit_assembly(mod)


def emit_object(module_ir: str, cpu: Target | str = "native") -> bytes:
    """An ELF relocatable object (position-independent) for linking into a .so."""
    with _llvm_lock:
        tm, mod = _compile(module_ir, _as_target(cpu), jit=False, pic=True)
        return tm.emit_object(mod)


class JitModule:
    """A module compiled at -O3 into an MCJIT engine.

    The engine lives as long as this object; every ctypes function returned by
    :meth:`function` holds a reference to it, so a function pointer never outlives
    its code.
    """

    def __init__(self, module_ir: str, cpu: Target | str = "native"):
        self.target = _as_target(cpu)
        with _llvm_lock:
            self._tm, self._module = _compile(module_ir, self.target, jit=True)
            self.engine = llvm.create_mcjit_compiler(self._module, self._tm)
            self.engine.finalize_object()
            self.engine.run_static_constructors()

    def address(self, name: str) -> int:
        with _llvm_lock:
            addr = self.engine.get_function_address(name)
        if not addr:
            raise GraphcError(f"the compiled module has no function '{name}'",
                              hint="this is a bug in graphc's code generator")
        return addr

    def function(self, name: str, restype, *argtypes):
        """A ctypes function for ``name`` (the GIL is released while it runs)."""
        fn = ctypes.CFUNCTYPE(restype, *argtypes)(self.address(name))
        fn._jit_owner = self  # keep the engine (and so the code) alive
        return fn

    @property
    def ir(self) -> str:
        return str(self._module)


def compile_ir(module_ir: str, cpu: Target | str = "native") -> JitModule:
    return JitModule(module_ir, cpu)
