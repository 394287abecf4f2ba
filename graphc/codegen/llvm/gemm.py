"""SGEMM as generated LLVM IR: packing, cache blocking, a register-blocked FMA microkernel.

    C[M x N] = A[M x K] @ B[K x N]   (+ C when accumulating), fp32, row-major,
    leading dimensions lda, ldb, ldc (in elements).

Structure (the loop nest of Goto's algorithm / BLIS):

    for jc in this part's columns, step NC:        B block KC x NC  -> L3
      for pc in 0..K, step KC:
        pack B[pc:pc+KC, jc:jc+NC] into NR-wide panels (zero padded)
        for ic in this part's rows, step MC:       A block MC x KC  -> L2
          pack A[ic:ic+MC, pc:pc+KC] into MR-high panels (zero padded)
          for jr in 0..NC, step NR:                B micro-panel    -> L1
            for ir in 0..MC, step MR:
              ukernel: MR x NR tile of C += A panel @ B panel (MR*NR/VW vector accumulators)

The microkernel keeps the whole MR x NR tile of C in vector registers: each k step
loads NR/VW vectors of the B panel, broadcasts MR values of the A panel, and issues
MR*NR/VW independent FMAs. Edge tiles are computed in full on the zero-padded panels;
only their valid rows are written, the last columns with masked loads and stores.
Blocks are balanced (K = 300 with KC = 256 runs as 152 + 148, not 256 + 44).

On the last K block, an :class:`Epilogue` hook (e.g. bias + ReLU, for convolution as
implicit GEMM) is applied to the tile while it is still in registers, so the result is
written once.

Pre-packed A (``packed_a=True``): A is given already in the microkernel's panel layout
(:func:`pack_a_panels`, done once at compile time for a convolution's weights), so no
run packs it again; the argument lda is then unused.

Pre-packed B (``packed_b=True``): B is given in NR-wide panels of depth Kp
(:func:`pack_b_panels`), so no run packs it; ldb is then unused.  (Measured on Zen5,
an im2col writing those panels directly, one NR-pixel panel per item, was slower than
im2col + packing: its per-row set-up is paid 64 times as often; the convolutions keep
packing B.)

Gathered B (``gathered_b=True``, convolution without im2col): B is not a matrix but
read out of a (padded) input image: element (k, j) is ``B[brows[k] + off(j)]``, where
``brows`` (int32, one per row of B) holds each row's offset, and ``off`` is given per
vector of VW columns by ``bvecs`` (int32 triples ``base0, base1, split``): lanes below
``split`` read at ``base0 + lane``, the others at ``base1 + lane`` -- the output pixels of
a stride-1 convolution are at most two runs of one padded image row per vector, so the
packing reads two vectors and blends them, with no column matrix written and read
again.  ``bvecs`` covers whole NR panels (entries past N may point anywhere readable;
their columns are not stored); ldb is unused; the two tables are the arguments after
``workspace``.  :func:`gather_vectors` builds ``bvecs``.

Threading: ``gemm(..., part, nparts, workspace)`` computes the slice of C that belongs
to ``part`` (whole MR-tiles of rows or NR-tiles of columns, whichever split gives the
busiest part less work, packing included) with its own packing workspace of
``<name>_workspace_bytes()`` bytes (64-byte aligned), so any thread pool can drive it.
:class:`Gemm` compiles once and runs on a Python thread pool (ctypes releases the GIL).
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from graphc.codegen.llvm import jit
from graphc.codegen.llvm.irutil import imin, loop, new_function, splat, var
from graphc.errors import GraphcError

F32 = ir.FloatType()
I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


# ---------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class GemmConfig:
    """Register and cache blocking.

    vw: floats per vector register; mr x (nv*vw): the register tile; kc, mc, nc: cache
    blocks (mc a multiple of mr, nc of nr); unroll: k steps per microkernel loop trip;
    prefetch_c: prefetch the C tile from inside the k loop.
    """
    vw: int
    mr: int
    nv: int
    kc: int
    mc: int
    nc: int
    unroll: int = 4
    prefetch_c: bool = True

    @property
    def nr(self) -> int:
        return self.nv * self.vw

    def __post_init__(self):
        if self.mc % self.mr or self.nc % self.nr or self.kc % self.unroll or self.kc <= 0:
            raise GraphcError(f"bad GEMM blocking {self}",
                              hint="mc must be a multiple of mr, nc of nv*vw, kc of unroll")

    @property
    def workspace_floats(self) -> int:
        """Packed A block + packed B block (each 64-byte aligned)."""
        return _round_up(self.mc * self.kc, 16) + _round_up(self.kc * self.nc, 16)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def default_config(t: jit.Target) -> GemmConfig:
    """Blocking for the target's vector width (tuned on Zen3/Zen5-class caches:
    L1d 32-48 KiB, L2 0.5-1 MiB per core, shared L3)."""
    if t.vector_bits >= 512:
        # 8 x 32 tile = 16 zmm accumulators (+ 2 B vectors + 1 broadcast): measured on
        # Zen5 it beats 14 x 32 and 8 x 48 (the B micro-panel, 32 KiB at kc=256, stays in
        # L1; 8-row A panels pack fast; conv shapes have M a multiple of 8)
        return GemmConfig(vw=16, mr=8, nv=2, kc=256, mc=8 * 24, nc=4096)
    if t.vector_bits >= 256:
        # 16 ymm registers: 6 x 16 tile = 12 accumulators + 2 B vectors + 1 broadcast
        return GemmConfig(vw=8, mr=6, nv=2, kc=256, mc=6 * 24, nc=4096)
    # x86-64 baseline: 16 xmm registers, no FMA (fmuladd becomes mul + add)
    return GemmConfig(vw=4, mr=6, nv=2, kc=256, mc=6 * 16, nc=2048)


def packed_depth(k: int, config: GemmConfig) -> int:
    """K rounded up to the microkernel's unroll: the depth of a pre-packed A panel."""
    return _round_up(max(k, 1), config.unroll)


def k_block(k: int, config: GemmConfig) -> int:
    """The GEMM's K block for depth k (as the generated driver computes it): as few
    blocks as KC allows, of equal size rounded up to the unroll."""
    nblocks = max(1, -(-k // config.kc))
    return _round_up(-(-k // nblocks), config.unroll)


def gather_vectors(offsets: np.ndarray, config: GemmConfig) -> np.ndarray | None:
    """``bvecs`` of a gathered B (see the module doc) whose column j is read at
    ``offsets[j]``: (base0, base1, split) per vector of VW columns, over whole NR panels
    (columns past the end read at offset 0); None where some vector of columns is not
    two runs of consecutive offsets."""
    vw, n = config.vw, len(offsets)
    nvec = -(-max(n, 1) // config.nr) * config.nr // vw
    out = np.zeros((nvec, 3), np.int64)
    out[:, 2] = vw
    lanes = np.arange(vw)
    for v in range(nvec):
        seg = np.asarray(offsets[v * vw:(v + 1) * vw], np.int64)
        if len(seg) == 0:
            continue
        step = np.flatnonzero(np.diff(seg) != 1)
        if len(step) > 1:
            return None
        split = int(step[0]) + 1 if len(step) else vw
        base0 = int(seg[0])
        base1 = int(seg[split]) - split if split < len(seg) else base0
        if base1 < 0 or not np.array_equal(np.where(lanes[:len(seg)] < split, base0, base1)
                                           + lanes[:len(seg)], seg):
            return None
        out[v] = (base0, base1, split)
    if out.max(initial=0) >= 2 ** 31:
        return None
    return out.astype(np.int32).reshape(-1)


def pack_a_panels(a: np.ndarray, config: GemmConfig) -> np.ndarray:
    """A (M x K) in the layout a ``packed_a`` GEMM reads, flat float32: for each K block
    (k_block; depth kc, padded to kcp, a multiple of the unroll) in turn, ceil(M / MR)
    panels of kcp x MR, ``panel[k, r] = A[p * MR + r, pc + k]``, zeros past M and K.
    The block at depth pc starts at pc * Mp (Mp = M rounded up to MR), so one K block of
    an MC-row block is one contiguous run, read in order by the microkernels."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 2:
        raise GraphcError(f"pack_a_panels needs a 2-D matrix, got shape {a.shape}",
                          hint="reshape the weights to (rows, K)")
    m, k = a.shape
    mr, kp = config.mr, packed_depth(k, config)
    panels = -(-m // mr)
    full = np.zeros((panels * mr, kp), np.float32)
    full[:m, :k] = a
    kb, out = k_block(k, config), []
    for pc in range(0, kp, kb):
        blk = full[:, pc:pc + kb]              # kcp columns (the last block: kp - pc)
        out.append(blk.reshape(panels, mr, blk.shape[1]).transpose(0, 2, 1).reshape(-1))
    return np.ascontiguousarray(np.concatenate(out))


def pack_b_panels(b: np.ndarray, config: GemmConfig) -> np.ndarray:
    """B (K x N) in the layout a ``packed_b`` GEMM reads, flat float32: ceil(N / NR)
    panels of Kp x NR (Kp = packed_depth(K)), ``panel_q[k, j] = B[k, q * NR + j]``, zeros
    past K and N.  The GEMM reads it with aligned vector loads: place it at a 64-byte
    aligned address."""
    b = np.asarray(b, dtype=np.float32)
    if b.ndim != 2:
        raise GraphcError(f"pack_b_panels needs a 2-D matrix, got shape {b.shape}",
                          hint="reshape the operand to (K, columns)")
    k, n = b.shape
    nr, kp = config.nr, packed_depth(k, config)
    panels = -(-n // nr)
    full = np.zeros((kp, panels * nr), np.float32)
    full[:k, :n] = b
    return np.ascontiguousarray(full.reshape(kp, panels, nr).transpose(1, 0, 2)).reshape(-1)


# ---------------------------------------------------------------------------------------
# epilogue hooks


class Epilogue:
    """A hook applied to each element of C once its sum over K is complete, while the tile
    is still in registers: ``C = f(A @ B [+ C], row, col)``.

    Subclasses add arguments to the generated functions (``args``: (name, LLVM type)) and
    emit IR for one vector of a C row (``vector``): ``x`` holds ``vw`` lanes of row ``row``
    starting at column ``col`` (i64 indices into the whole C); ``mask`` is None when all
    lanes are inside C, else an <vw x i1> of the lanes that are (an operand read per
    column must then use a masked load). ``args`` maps argument names to values.
    """
    args: tuple = ()

    def key(self) -> str:
        """Identifies the generated code (for caching compiled modules)."""
        return "none"

    def arg_length(self, name: str, m: int, n: int) -> int:
        """Number of floats argument ``name`` must hold for an M x N C."""
        raise NotImplementedError

    def vector(self, b: ir.IRBuilder, x, row, col, args, mask):
        return x

    @property
    def is_identity(self) -> bool:
        return type(self) is Epilogue


class BiasAct(Epilogue):
    """``y = act(x + bias)``: bias per row ("row": bias[M], a conv's output channel when
    C is (channels x pixels)) or per column ("col": bias[N]); act is Caffe's ReLU,
    ``max(x, 0) + negative_slope * min(x, 0)``, when ``relu``."""

    def __init__(self, bias: str | None = None, relu: bool = False,
                 negative_slope: float = 0.0):
        if bias not in (None, "row", "col"):
            raise GraphcError(f"unknown bias mode {bias!r}", hint="use None, 'row' or 'col'")
        self.bias, self.relu, self.negative_slope = bias, bool(relu), float(negative_slope)
        self.args = (("bias", PTR),) if bias else ()

    def key(self) -> str:
        return f"bias{self.bias or ''}_relu{int(self.relu)}_{self.negative_slope!r}"

    def arg_length(self, name, m, n):
        return m if self.bias == "row" else n

    def vector(self, b, x, row, col, args, mask):
        vt = x.type
        zero = ir.Constant(vt, [0.0] * vt.count)
        if self.bias == "row":
            x = b.fadd(x, splat(b, _load(b, F32, args["bias"], row), vt.count))
        elif self.bias == "col":
            x = b.fadd(x, _load_vec(b, vt, args["bias"], col, mask))
        if self.relu:
            # select(x > 0, x, slope * x) == max(x, 0) + slope * min(x, 0)
            neg = zero if self.negative_slope == 0.0 else \
                b.fmul(x, ir.Constant(vt, [self.negative_slope] * vt.count))
            x = b.select(b.fcmp_ordered(">", x, zero), x, neg)
        return x


# ---------------------------------------------------------------------------------------
# IR helpers


def _addr(b, ty, base, idx):
    """&base[idx] for elements of type ``ty`` (idx: i64 value or int)."""
    if isinstance(idx, int):
        if idx == 0:
            return base
        idx = i64(idx)
    return b.gep(base, [idx], source_etype=ty)


def _load(b, ty, base, idx, align=None):
    """Load ``ty`` at &base[idx] where idx counts floats."""
    return b.load(_addr(b, F32, base, idx), typ=ty, align=align)


def _store(b, val, base, idx, align=None):
    b.store(val, _addr(b, F32, base, idx), align=align)


def _masked_intrinsic(mod, kind, vt):
    name = f"llvm.masked.{kind}.v{vt.count}f32.p0"
    if name in mod.globals:
        return mod.globals[name]
    mt = ir.VectorType(I1, vt.count)
    fty = ir.FunctionType(vt, [PTR, I32, mt, vt]) if kind == "load" else \
        ir.FunctionType(VOID, [vt, PTR, I32, mt])
    return ir.Function(mod, fty, name)


def _load_vec(b, vt, base, idx, mask=None):
    """A vector of floats at &base[idx]; lanes outside ``mask`` are not read (zero)."""
    if mask is None:
        return _load(b, vt, base, idx, align=4)
    fn = _masked_intrinsic(b.module, "load", vt)
    return b.call(fn, [_addr(b, F32, base, idx), ir.Constant(I32, 4), mask,
                       ir.Constant(vt, [0.0] * vt.count)])


def _store_vec(b, x, base, idx, mask=None):
    # not irutil.store_vec: no inbounds, as a masked-off vector may start past C's end
    if mask is None:
        _store(b, x, base, idx, align=4)
    else:
        fn = _masked_intrinsic(b.module, "store", x.type)
        b.call(fn, [x, _addr(b, F32, base, idx), ir.Constant(I32, 4), mask])


def _flag(b, a, bit: int):
    """Whether the tile kernel's ``flags`` argument has ``bit``."""
    return b.icmp_unsigned("!=", b.and_(a["flags"], ir.Constant(I32, bit)), ir.Constant(I32, 0))














# ---------------------------------------------------------------------------------------
# the generator


FLAG_LOAD_C = 1  # add the tile to the existing C (accumulate, or K blocks after the first)
FLAG_EPILOGUE = 2  # last K block: apply the epilogue


class GemmGenerator:
    """Emits the SGEMM functions into an llvmlite module.

    Functions (``p`` is the name prefix):
      ``p_ukernel(kcp, ap, bp, c, ldc, mr, nr, flags, row, col, *epilogue args)``
          (internal) C tile (mr x nr valid of MR x NR) from packed panels of depth kcp
      ``p_pack_a(mc, kc, kcp, a, lda, ap)``, ``p_pack_b(kc, kcp, nc, b, ldb, bp)`` (internal)
      ``p(M, N, K, A, lda, B, ldb, C, ldc, accumulate, part, nparts, workspace, *epi args)``
      ``i64 p_workspace_bytes()``: bytes of workspace each part needs (64-byte aligned)
    With ``packed_a``, ``A`` of ``p`` is the panel array of :func:`pack_a_panels` (lda is
    unused) and no A block is packed at run time.
    The microkernel and packers are reusable by other drivers (implicit-GEMM convolution).
    """

    # packing one element of A / of B, in flops of microkernel time (measured on Zen5:
    # ~0.1-0.16 ns per A element, ~0.1 ns per B element at ~240 GFLOP/s).  B's is set 4x
    # that: every part of a split by rows packs all of B again into its own workspace,
    # and on Zen 3 (0.5 MiB L2, 2 threads) a split by columns was measured faster where
    # the model called it close (a 512-channel 1x1 convolution of 14 x 14 pixels: 0.78
    # instead of 0.87 ms; bench/results/cpu_gemm_split.md)
    PACK_A_COST = 40
    PACK_B_COST = 96
    #: floats ahead of the microkernel that a pre-packed A is prefetched (0: none)
    PREFETCH_A = 1024

    def __init__(self, config: GemmConfig, epilogue: Epilogue | None = None,
                 name: str = "sgemm", fma: bool = True, packed_a: bool = False,
                 packed_b: bool = False, gathered_b: bool = False):
        if packed_b and gathered_b:
            raise GraphcError("a GEMM's B is either pre-packed or gathered, not both",
                              hint="choose packed_b or gathered_b")
        self.cfg = config
        self.epi = epilogue or Epilogue()
        self.name = name
        self.fma = fma
        self.packed_a = bool(packed_a)
        self.packed_b = bool(packed_b)
        self.gathered_b = bool(gathered_b)
        self.vt = ir.VectorType(F32, config.vw)

    # -- microkernel --------------------------------------------------------------------

    def _fma_fn(self, mod):
        # llvm.fma is always fused (a libm call per lane without hardware FMA);
        # llvm.fmuladd fuses only where the target has FMA and is mul+add elsewhere.
        kind = "fma" if self.fma else "fmuladd"
        name = f"llvm.{kind}.v{self.cfg.vw}f32"
        if name in mod.globals:
            return mod.globals[name]
        return ir.Function(mod, ir.FunctionType(self.vt, [self.vt] * 3), name)

    def _tile_function(self, mod, name):
        """A tile kernel's function: (kcp, ap, bp, c, ldc, mr, nr, flags, row, col,
        *epilogue args) -> (fn, builder, args)."""
        args = [("kcp", I64), ("ap", PTR), ("bp", PTR), ("c", PTR), ("ldc", I64),
                ("mr", I64), ("nr", I64), ("flags", I32), ("row", I64), ("col", I64),
                *self.epi.args]
        fn, b, a = new_function(mod, name, args, internal=True)
        for p in ("ap", "bp", "c"):
            fn.args[[n for n, _ in args].index(p)].add_attribute("noalias")
        return fn, b, a

    def emit_ukernel(self, mod, nv: int | None = None):
        """The MR x (nv * VW) microkernel (nv: the config's, or fewer vectors for the
        narrow last panel; the B panel rows stay NR floats apart)."""
        c, vt = self.cfg, self.vt
        MR, VW, NR = c.mr, c.vw, c.nr
        NV = nv or c.nv
        TW = NV * VW                    # the tile's width
        suffix = "" if NV == c.nv else f"_n{NV}"
        fn, b, a = self._tile_function(mod, f"{self.name}_ukernel{suffix}")
        fma = self._fma_fn(mod)
        zero = ir.Constant(vt, [0.0] * VW)

        prefetch = mod.globals.get("llvm.prefetch.p0") or ir.Function(
            mod, ir.FunctionType(VOID, [PTR, I32, I32, I32]), "llvm.prefetch.p0")

        entry = b.block
        kloop = b.append_basic_block("k.loop")
        done = b.append_basic_block("k.done")
        b.cbranch(b.icmp_signed(">", a["kcp"], i64(0)), kloop, done)

        # k loop: kcp is a multiple of `unroll` (the packers zero-pad the panels)
        b.position_at_end(kloop)
        k = b.phi(I64, "k")
        acc = [[b.phi(vt, f"acc{r}_{v}") for v in range(NV)] for r in range(MR)]
        cur = [[x for x in row] for row in acc]
        if c.prefetch_c:
            # Prefetch (for writing) row min(trip, MR-1) of the C tile: its cache misses
            # overlap the k loop instead of stalling the loads and stores after it. Spread
            # over the first trips, not all at once; past-the-end addresses are harmless.
            ro = b.mul(imin(b, b.udiv(k, i64(c.unroll)), i64(MR - 1)), a["ldc"])
            for off in [*range(0, TW, 16), TW - 1]:
                b.call(prefetch, [_addr(b, F32, a["c"], b.add(ro, i64(off))),
                                  ir.Constant(I32, 1), ir.Constant(I32, 3), ir.Constant(I32, 1)])
        if self.packed_a and self.PREFETCH_A:
            # pre-packed A streams from memory (the weights): prefetch it (the next panels
            # follow in the same run) far enough ahead to hide the latency
            ao = b.add(b.mul(k, i64(MR)), i64(self.PREFETCH_A))
            for off in range(0, MR * c.unroll, 16):
                b.call(prefetch, [_addr(b, F32, a["ap"], b.add(ao, i64(off))),
                                  ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])
        for u in range(c.unroll):
            ku = b.add(k, i64(u)) if u else k
            bo = b.mul(ku, i64(NR))
            ao = b.mul(ku, i64(MR))
            bv = [_load(b, vt, a["bp"], b.add(bo, i64(v * VW)), align=4 * VW) for v in range(NV)]
            for r in range(MR):
                ar = splat(b, _load(b, F32, a["ap"], b.add(ao, i64(r)), align=4), VW)
                for v in range(NV):
                    cur[r][v] = b.call(fma, [ar, bv[v], cur[r][v]])
        k_next = b.add(k, i64(c.unroll))
        k.add_incoming(i64(0), entry)
        k.add_incoming(k_next, kloop)
        for r in range(MR):
            for v in range(NV):
                acc[r][v].add_incoming(zero, entry)
                acc[r][v].add_incoming(cur[r][v], kloop)
        b.cbranch(b.icmp_signed("<", k_next, a["kcp"]), kloop, done)

        b.position_at_end(done)
        res = []
        for r in range(MR):
            row = []
            for v in range(NV):
                p = b.phi(vt)
                p.add_incoming(zero, entry)
                p.add_incoming(cur[r][v], kloop)
                row.append(p)
            res.append(row)

        load_c, do_epi = _flag(b, a, FLAG_LOAD_C), _flag(b, a, FLAG_EPILOGUE)
        with b.if_else(b.icmp_signed("==", a["nr"], i64(TW)), likely=True) as (then, otherwise):
            with then:
                self._store_tile(b, a, res, load_c, do_epi, masks=[None] * NV)
            with otherwise:  # the last columns of C: masked loads and stores
                iota = [ir.Constant(ir.VectorType(I32, VW), list(range(v * VW, (v + 1) * VW)))
                        for v in range(NV)]
                nr = splat(b, b.trunc(a["nr"], I32), VW)
                masks = [b.icmp_signed("<", iota[v], nr) for v in range(NV)]
                self._store_tile(b, a, res, load_c, do_epi, masks=masks)
        b.ret_void()
        return fn

    def _store_tile(self, b, a, res, load_c, do_epi, masks):
        """Rows r < mr of the tile: (+ C), (epilogue on the last K block), store to C."""
        for r in range(self.cfg.mr):
            # row 0 always exists; the others only where mr says so (bottom edge of C)
            in_c = b.icmp_signed("<", i64(r), a["mr"])
            with b.if_then(in_c, likely=True) if r else nullcontext():
                self._store_row(b, a, res[r], r, load_c, do_epi, masks)

    def _store_row(self, b, a, acc, r, load_c, do_epi, masks):
        """One row of the tile (``len(acc)`` vectors; masks: one per vector, None = all
        lanes)."""
        c, vt = self.cfg, self.vt
        nv = len(acc)
        o = b.mul(i64(r), a["ldc"])
        slots = [var(b, x) for x in acc]
        offs = [b.add(o, i64(v * c.vw)) for v in range(nv)]
        with b.if_then(load_c):
            for v in range(nv):
                x = _load_vec(b, vt, a["c"], offs[v], masks[v])
                b.store(b.fadd(b.load(slots[v], typ=vt), x), slots[v])
        if not self.epi.is_identity:
            with b.if_then(do_epi):
                row = b.add(a["row"], i64(r))
                for v in range(nv):
                    col = b.add(a["col"], i64(v * c.vw))
                    x = self.epi.vector(b, b.load(slots[v], typ=vt), row, col, a, masks[v])
                    b.store(x, slots[v])
        for v in range(nv):
            _store_vec(b, b.load(slots[v], typ=vt), a["c"], offs[v], masks[v])

    #: a last panel of at most this many columns runs the column tile (emit_ukernel_cols)
    COLS_MAX = 3

    def emit_ukernel_cols(self, mod):
        """The tile of the last ``nr <= COLS_MAX`` columns, column by column with the
        vectors along the MR rows: per k one load of the A panel's MR values, one
        broadcast of B and one FMA (the one-vector tile would spend MR FMAs and a
        masked store per row on a column); ``unroll`` partial sums hide the FMA
        latency.  Needs MR <= VW.  Same arguments as the microkernel."""
        c, vt = self.cfg, self.vt
        MR, VW, NR = c.mr, c.vw, c.nr
        fn, b, a = self._tile_function(mod, f"{self.name}_ukernel_cols")
        fma = self._fma_fn(mod)
        zero = ir.Constant(vt, [0.0] * VW)
        rows = ir.Constant(ir.VectorType(I1, VW), [i < MR for i in range(VW)])
        load_c, do_epi = _flag(b, a, FLAG_LOAD_C), _flag(b, a, FLAG_EPILOGUE)
        v1 = ir.VectorType(F32, 1)
        with loop(b, 0, a["nr"], name="j") as j:
            parts = [var(b, zero, f"part{u}") for u in range(c.unroll)]
            with loop(b, 0, a["kcp"], c.unroll, name="k") as k:
                for u, slot in enumerate(parts):
                    ku = b.add(k, i64(u)) if u else k
                    av = _load_vec(b, vt, a["ap"], b.mul(ku, i64(MR)), rows)
                    bk = splat(b, _load(b, F32, a["bp"], b.add(b.mul(ku, i64(NR)), j),
                                        align=4), VW)
                    b.store(b.call(fma, [av, bk, b.load(slot, typ=vt)]), slot)
            sums = [b.load(slot, typ=vt) for slot in parts]
            while len(sums) > 1:
                sums = [b.fadd(sums[i], sums[i + 1]) if i + 1 < len(sums) else sums[i]
                        for i in range(0, len(sums), 2)]
            acc = sums[0]
            col = b.add(a["col"], j)
            for r in range(MR):
                in_c = b.icmp_signed("<", i64(r), a["mr"])
                with b.if_then(in_c, likely=True) if r else nullcontext():
                    at = b.add(b.mul(i64(r), a["ldc"]), j)
                    slot = var(b, b.extract_element(acc, ir.Constant(I32, r)))
                    with b.if_then(load_c):
                        b.store(b.fadd(b.load(slot, typ=F32), _load(b, F32, a["c"], at)), slot)
                    if not self.epi.is_identity:
                        with b.if_then(do_epi):
                            x = b.insert_element(ir.Constant(v1, ir.Undefined),
                                                 b.load(slot, typ=F32), ir.Constant(I32, 0))
                            x = self.epi.vector(b, x, b.add(a["row"], i64(r)), col, a, None)
                            b.store(b.extract_element(x, ir.Constant(I32, 0)), slot)
                    _store(b, b.load(slot, typ=F32), a["c"], at)
        b.ret_void()
        return fn

    # -- packing ------------------------------------------------------------------------

    def emit_pack_a(self, mod):
        """Ap[p][k][r] = A[p*MR + r][k] for panels p of MR rows; zeros past mc and kc."""
        c = self.cfg
        MR = c.mr
        args = [("mc", I64), ("kc", I64), ("kcp", I64), ("a", PTR), ("lda", I64), ("ap", PTR)]
        fn, b, a = new_function(mod, f"{self.name}_pack_a", args, internal=True)
        zero = ir.Constant(F32, 0.0)
        with loop(b, 0, a["mc"], MR, name="p") as p0:
            dst = _addr(b, F32, a["ap"], b.mul(p0, a["kcp"]))
            rows = imin(b, i64(MR), b.sub(a["mc"], p0))
            src = _addr(b, F32, a["a"], b.mul(p0, a["lda"]))
            with b.if_else(b.icmp_signed("==", rows, i64(MR)), likely=True) as (then, otherwise):
                with then:
                    # scalar code: LLVM's vectorizer turns it into loads along k and
                    # in-register transposes
                    rowp = [_addr(b, F32, src, b.mul(i64(r), a["lda"])) for r in range(MR)]
                    with loop(b, 0, a["kc"], name="k") as k:
                        for r in range(MR):
                            x = _load(b, F32, rowp[r], k)
                            _store(b, x, dst, b.add(b.mul(k, i64(MR)), i64(r)))
                with otherwise:
                    with loop(b, 0, a["kc"], name="k") as k:
                        with loop(b, 0, i64(MR), name="r") as r:
                            o = b.add(b.mul(k, i64(MR)), r)
                            _store(b, zero, dst, o)
                            with b.if_then(b.icmp_signed("<", r, rows)):
                                _store(b, _load(b, F32, src, b.add(b.mul(r, a["lda"]), k)), dst, o)
            with loop(b, b.mul(a["kc"], i64(MR)), b.mul(a["kcp"], i64(MR)), name="z") as z:
                _store(b, zero, dst, z)
        b.ret_void()
        return fn

    def emit_pack_b(self, mod):
        """Bp[q][k][j] = B[k][q*NR + j] for panels q of NR columns; zeros past nc and kc."""
        c, vt = self.cfg, self.vt
        NR, VW, NV = c.nr, c.vw, c.nv
        args = [("kc", I64), ("kcp", I64), ("nc", I64), ("b", PTR), ("ldb", I64), ("bp", PTR)]
        fn, b, a = new_function(mod, f"{self.name}_pack_b", args, internal=True)
        iota = [ir.Constant(ir.VectorType(I32, VW), list(range(v * VW, (v + 1) * VW)))
                for v in range(NV)]
        zero = ir.Constant(vt, [0.0] * VW)

        def copy_panel(q, masks):
            src = _addr(b, F32, a["b"], q)
            dst = _addr(b, F32, a["bp"], b.mul(q, a["kcp"]))
            with loop(b, 0, a["kc"], name="k") as k:
                so, do = b.mul(k, a["ldb"]), b.mul(k, i64(NR))
                for v in range(NV):
                    x = _load_vec(b, vt, src, b.add(so, i64(v * VW)), masks[v])
                    _store(b, x, dst, b.add(do, i64(v * VW)), align=4 * VW)
            with loop(b, a["kc"], a["kcp"], name="kz") as k:  # zero rows kc..kcp
                for v in range(NV):
                    _store(b, zero, dst, b.add(b.mul(k, i64(NR)), i64(v * VW)), align=4 * VW)

        with loop(b, 0, a["nc"], NR, name="q") as q:
            cols = b.sub(a["nc"], q)
            with b.if_else(b.icmp_signed(">=", cols, i64(NR)), likely=True) as (full, part):
                with full:
                    copy_panel(q, [None] * NV)
                with part:  # the last, partial panel: masked loads, zeros beyond nc
                    n = splat(b, b.trunc(cols, I32), VW)
                    copy_panel(q, [b.icmp_signed("<", iota[v], n) for v in range(NV)])
        b.ret_void()
        return fn

    def emit_pack_b_gathered(self, mod):
        """Bp[q][k][j] = x[brows[k] + off(q*NR + j)] for panels q of NR columns (``bvecs``
        starting at the block's first column); zeros in rows kc..kcp."""
        c, vt = self.cfg, self.vt
        NR, VW, NV = c.nr, c.vw, c.nv
        args = [("kc", I64), ("kcp", I64), ("nc", I64), ("x", PTR), ("brows", PTR),
                ("bvecs", PTR), ("bp", PTR)]
        fn, b, a = new_function(mod, f"{self.name}_pack_b", args, internal=True)
        for i in (3, 6):
            fn.args[i].add_attribute("noalias")
        iota = ir.Constant(ir.VectorType(I32, VW), list(range(VW)))
        zero = ir.Constant(vt, [0.0] * VW)

        def table(ptr, i):
            return b.sext(b.load(b.gep(ptr, [i], source_etype=I32), typ=I32), I64)

        with loop(b, 0, a["nc"], NR, name="q") as q:
            dst = _addr(b, F32, a["bp"], b.mul(q, a["kcp"]))
            vecs = []
            for v in range(NV):
                e = b.mul(b.add(b.udiv(q, i64(VW)), i64(v)), i64(3))
                lo, hi = (_addr(b, F32, a["x"], table(a["bvecs"], b.add(e, i64(j))))
                          for j in (0, 1))
                split = b.trunc(table(a["bvecs"], b.add(e, i64(2))), I32)
                vecs.append((lo, hi, b.icmp_signed("<", iota, splat(b, split, VW))))
            with loop(b, 0, a["kc"], name="k") as k:
                r = table(a["brows"], k)
                do = b.mul(k, i64(NR))
                for v, (lo, hi, first) in enumerate(vecs):
                    x = b.select(first, _load(b, vt, lo, r, align=4),
                                 _load(b, vt, hi, r, align=4))
                    _store(b, x, dst, b.add(do, i64(v * VW)), align=4 * VW)
            with loop(b, a["kc"], a["kcp"], name="kz") as k:  # zero rows kc..kcp
                for v in range(NV):
                    _store(b, zero, dst, b.add(b.mul(k, i64(NR)), i64(v * VW)), align=4 * VW)
        b.ret_void()
        return fn

    # -- driver -------------------------------------------------------------------------

    def emit_gemm(self, mod, ukernel, pack_a, pack_b, narrow=None, cols=None):
        c = self.cfg
        MR, NR, KC, MC, NC = c.mr, c.nr, c.kc, c.mc, c.nc
        args = [("M", I64), ("N", I64), ("K", I64), ("A", PTR), ("lda", I64), ("B", PTR),
                ("ldb", I64), ("C", PTR), ("ldc", I64), ("accumulate", I32), ("part", I64),
                ("nparts", I64), ("workspace", PTR),
                *([("brows", PTR), ("bvecs", PTR)] if self.gathered_b else []), *self.epi.args]
        fn, b, a = new_function(mod, self.name, args)
        M, N, K, part, nparts = a["M"], a["N"], a["K"], a["part"], a["nparts"]
        ap = a["workspace"]
        bp = _addr(b, F32, ap, _round_up(MC * KC, 16))

        def ceil_div(x, y):
            return b.sdiv(b.add(x, b.sub(y, i64(1))), y)

        def balanced(length, most, unit):
            """Block size for ``length``: as few blocks as ``most`` allows, of equal size
            (rounded up to ``unit``), so no short remainder block is left."""
            nblocks = ceil_div(length, i64(most))
            nblocks = b.select(b.icmp_signed("<", nblocks, i64(1)), i64(1), nblocks)
            return b.mul(ceil_div(ceil_div(length, nblocks), i64(unit)), i64(unit))

        # This part's slice: whole tiles of rows or of columns, whichever split leaves the
        # busiest part less work: 2 flops per multiply-add, plus the packing it repeats
        # (each part packs the A rows and B columns it uses; costs in flop equivalents).
        tm, tn = ceil_div(M, i64(MR)), ceil_div(N, i64(NR))
        rows_m = b.mul(ceil_div(tm, nparts), i64(MR))  # busiest part's rows, split by rows
        cols_n = b.mul(ceil_div(tn, nparts), i64(NR))  # busiest part's columns, split by columns
        m_pad, n_pad = b.mul(tm, i64(MR)), b.mul(tn, i64(NR))
        # the last panel's cost in columns of the full tile: the column tile spends one
        # FMA per column where the full tile spends MR * NV on NR columns
        rem = b.sub(N, b.mul(b.sub(tn, i64(1)), i64(NR)))
        last_cost = i64(NR)
        if narrow is not None:
            last_cost = b.select(b.icmp_signed("<=", rem, i64(c.vw)), i64(c.vw), last_cost)
        if cols is not None:
            cost = b.sdiv(b.add(b.mul(rem, i64(NR)), i64(MR * c.nv - 1)), i64(MR * c.nv))
            last_cost = b.select(b.icmp_signed("<=", rem, i64(self.COLS_MAX)), cost, last_cost)
        n_pad = b.add(b.sub(n_pad, i64(NR)), last_cost)
        pa = i64(0 if self.packed_a else self.PACK_A_COST)
        pb = i64(0 if self.packed_b else self.PACK_B_COST)
        work_m = b.add(b.add(b.mul(i64(2), b.mul(rows_m, n_pad)), b.mul(pb, N)),
                       b.mul(pa, b.mul(rows_m, ceil_div(N, i64(NC)))))
        work_n = b.add(b.add(b.mul(i64(2), b.mul(cols_n, m_pad)), b.mul(pb, cols_n)),
                       b.mul(pa, b.mul(M, ceil_div(cols_n, i64(NC)))))
        by_m = b.icmp_signed("<=", work_m, work_n)
        per_m, per_n = ceil_div(tm, nparts), ceil_div(tn, nparts)
        m_lo = imin(b, b.mul(b.mul(part, per_m), i64(MR)), M)
        m_hi = imin(b, b.mul(b.mul(b.add(part, i64(1)), per_m), i64(MR)), M)
        n_lo = imin(b, b.mul(b.mul(part, per_n), i64(NR)), N)
        n_hi = imin(b, b.mul(b.mul(b.add(part, i64(1)), per_n), i64(NR)), N)
        m0, m1 = b.select(by_m, m_lo, i64(0)), b.select(by_m, m_hi, M)
        n0, n1 = b.select(by_m, i64(0), n_lo), b.select(by_m, N, n_hi)
        with b.if_then(b.or_(b.icmp_signed(">=", m0, m1), b.icmp_signed(">=", n0, n1))):
            b.ret_void()

        acc_flag = b.select(b.icmp_unsigned("!=", a["accumulate"], ir.Constant(I32, 0)),
                            ir.Constant(I32, FLAG_LOAD_C), ir.Constant(I32, 0))
        epi_args = [a[n] for n, _ in self.epi.args]
        nc_blk = balanced(b.sub(n1, n0), NC, NR)
        mc_blk = balanced(b.sub(m1, m0), MC, MR)
        kc_blk = balanced(K, KC, c.unroll)
        kp = b.mul(ceil_div(b.select(b.icmp_signed("<", K, i64(1)), i64(1), K), i64(c.unroll)),
                   i64(c.unroll))                     # packed_depth(K)
        with loop(b, n0, n1, nc_blk, name="jc") as jc:
            nc = imin(b, nc_blk, b.sub(n1, jc))
            # do { ... } while (pc < K): one pass even when K == 0 (C = 0 or C, + epilogue)
            pc_var = var(b, i64(0), "pc")
            body = b.append_basic_block("pc.body")
            b.branch(body)
            b.position_at_end(body)
            pc = b.load(pc_var, typ=I64, name="pc")
            kc = imin(b, kc_blk, b.sub(K, pc))
            kcp = b.mul(ceil_div(kc, i64(c.unroll)), i64(c.unroll))
            pc_next = b.add(pc, kc_blk)
            last = b.icmp_signed(">=", pc_next, K)
            flags = b.or_(b.select(b.icmp_signed(">", pc, i64(0)), ir.Constant(I32, FLAG_LOAD_C),
                                   acc_flag),
                          b.select(last, ir.Constant(I32, FLAG_EPILOGUE), ir.Constant(I32, 0)))
            if self.packed_b:
                # panel q (columns q*NR..) at q * Kp * NR, row k at k * NR in it
                bblk = _addr(b, F32, a["B"], b.add(b.mul(jc, kp), b.mul(pc, i64(NR))))
            elif self.gathered_b:
                b.call(pack_b, [kc, kcp, nc, a["B"], b.gep(a["brows"], [pc], source_etype=I32),
                                b.gep(a["bvecs"], [b.mul(b.udiv(jc, i64(c.vw)), i64(3))],
                                      source_etype=I32), bp])
            else:
                b.call(pack_b, [kc, kcp, nc,
                                _addr(b, F32, a["B"], b.add(b.mul(pc, a["ldb"]), jc)),
                                a["ldb"], bp])
            with loop(b, m0, m1, mc_blk, name="ic") as ic:
                mc = imin(b, mc_blk, b.sub(m1, ic))
                if self.packed_a:
                    # K block pc starts at pc * Mp; rows ic.. (a multiple of MR) at
                    # ic * kcp in it, panel after panel (pack_a_panels)
                    ablk = _addr(b, F32, a["A"], b.add(b.mul(pc, m_pad), b.mul(ic, kcp)))
                else:
                    b.call(pack_a, [mc, kc, kcp,
                                    _addr(b, F32, a["A"], b.add(b.mul(ic, a["lda"]), pc)),
                                    a["lda"], ap])
                with loop(b, 0, nc, NR, name="jr") as jr:
                    nr = imin(b, i64(NR), b.sub(nc, jr))
                    col = b.add(jc, jr)
                    b_panel = _addr(b, F32, bblk, b.mul(jr, kp)) if self.packed_b \
                        else _addr(b, F32, bp, b.mul(jr, kcp))

                    def tiles(uk):
                        with loop(b, 0, mc, MR, name="ir") as ir_:
                            mr = imin(b, i64(MR), b.sub(mc, ir_))
                            row = b.add(ic, ir_)
                            cptr = _addr(b, F32, a["C"], b.add(b.mul(row, a["ldc"]), col))
                            a_panel = _addr(b, F32, ablk if self.packed_a else ap,
                                            b.mul(ir_, kcp))
                            b.call(uk, [kcp, a_panel, b_panel, cptr, a["ldc"],
                                        mr, nr, flags, row, col, *epi_args])

                    # a last panel of at most COLS_MAX columns: the column tile; of at
                    # most VW: the one-vector tile
                    kinds = [(k_, w) for k_, w in ((cols, self.COLS_MAX), (narrow, c.vw))
                             if k_ is not None]

                    def dispatch(kinds):
                        if not kinds:
                            tiles(ukernel)
                            return
                        (kern, width), rest = kinds[0], kinds[1:]
                        with b.if_else(b.icmp_signed("<=", nr, i64(width))) as (thin, wide):
                            with thin:
                                tiles(kern)
                            with wide:
                                dispatch(rest)

                    dispatch(kinds)
            b.store(pc_next, pc_var)
            after = b.append_basic_block("pc.end")
            b.cbranch(b.icmp_signed("<", pc_next, K), body, after)
            b.position_at_end(after)
        b.ret_void()

        ws, _, _ = new_function(mod, f"{self.name}_workspace_bytes", [], ret=I64)
        wb = ir.IRBuilder(ws.blocks[0])
        wb.ret(i64(4 * c.workspace_floats))
        return fn

    def emit(self, mod: ir.Module | None = None) -> ir.Module:
        mod = mod or ir.Module(name=self.name)
        uk = self.emit_ukernel(mod)
        # N rarely ends on a whole panel (a 14x14 image: 196 = 6 x 32 + 4): a last panel
        # of at most VW columns runs the one-vector tile, half the wasted FMAs
        narrow = self.emit_ukernel(mod, nv=1) if self.cfg.nv > 1 else None
        # and a last panel of a few columns (a 7x7 image: 49 = 3 x 16 + 1) the column tile
        cols = self.emit_ukernel_cols(mod) if self.cfg.mr <= self.cfg.vw else None
        pack_a = None if self.packed_a else self.emit_pack_a(mod)
        pack_b = None if self.packed_b else \
            self.emit_pack_b_gathered(mod) if self.gathered_b else self.emit_pack_b(mod)
        self.emit_gemm(mod, uk, pack_a, pack_b, narrow, cols)
        return mod


def gemm_ir(config: GemmConfig, epilogue: Epilogue | None = None, name: str = "sgemm",
            fma: bool = True, packed_a: bool = False, packed_b: bool = False) -> str:
    return str(GemmGenerator(config, epilogue, name, fma, packed_a, packed_b).emit())


# ---------------------------------------------------------------------------------------
# Python driver


def num_threads() -> int:
    """GRAPHC_NUM_THREADS, else the CPUs this process may run on."""
    env = os.environ.get("GRAPHC_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise GraphcError(f"GRAPHC_NUM_THREADS={env!r} is not a positive integer",
                              hint="set GRAPHC_NUM_THREADS to a thread count, or unset it")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_c_i64, _c_i32, _c_p = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
_compiled_lock = threading.Lock()
_compiled: dict = {}


def compile_gemm(target: jit.Target, config: GemmConfig, epilogue: Epilogue,
                 packed_a: bool = False, packed_b: bool = False) -> jit.JitModule:
    """The JIT-compiled module for (target, config, epilogue, packing), compiled once
    per process."""
    key = (target.cpu_name, target.features, config, epilogue.key(), bool(packed_a),
           bool(packed_b))
    with _compiled_lock:
        mod = _compiled.get(key)
        if mod is None:
            mod = jit.compile_ir(gemm_ir(config, epilogue, fma=target.has_fma,
                                         packed_a=packed_a, packed_b=packed_b), target)
            _compiled[key] = mod
        return mod


def _leading_dim(name: str, x) -> int:
    """Row stride in elements of a row-major float32 matrix (any stride on a length-1 axis)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise GraphcError(f"GEMM operand {name} must be a 2-D float32 numpy array, got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}",
                          hint="convert with np.asarray(x, dtype=np.float32)")
    rows, cols = x.shape
    if rows == 0 or cols == 0:  # no elements: nothing is read or written
        return max(cols, 1)
    if cols > 1 and x.strides[1] != 4:
        raise GraphcError(f"GEMM operand {name} must have unit column stride (strides "
                          f"{x.strides})", hint="pass np.ascontiguousarray(x)")
    if rows > 1:
        if x.strides[0] % 4 or x.strides[0] < 4 * cols:
            raise GraphcError(f"GEMM operand {name} is not row-major (strides {x.strides})",
                              hint="pass np.ascontiguousarray(x)")
        return x.strides[0] // 4
    return cols


def _aligned64(x: np.ndarray) -> np.ndarray:
    """A copy of the 1-D float32 ``x`` starting at a 64-byte aligned address."""
    raw = np.empty(x.size + 16, np.float32)
    off = (-raw.ctypes.data % 64) // 4
    out = raw[off:off + x.size]
    out[:] = x
    return out


class Gemm:
    """SGEMM compiled once for a target; ``gemm(A, B, C=None, accumulate=False, ...)`` runs
    C = A @ B (+ C) on ``threads`` threads: a Python thread pool where each thread calls the
    compiled function for its part (the ctypes call releases the GIL).

    Epilogue arguments are passed by name (``BiasAct(bias="row")`` needs ``bias=``).
    ``packed_a=True`` / ``packed_b=True`` run the pre-packed kernels: the call packs A
    with :func:`pack_a_panels` / B with :func:`pack_b_panels` first (a compiled net packs
    its convolution weights once, at compile time).
    A call uses at most one thread per ``min_flops_per_thread`` of work (handing a part to
    a pool thread costs tens of microseconds).
    """

    def __init__(self, cpu: str | jit.Target = "native", epilogue: Epilogue | None = None,
                 config: GemmConfig | None = None, threads: int | None = None,
                 min_flops_per_thread: float = 24e6, packed_a: bool = False,
                 packed_b: bool = False):
        self.target = jit.target(cpu) if isinstance(cpu, str) else cpu
        self.packed_a, self.packed_b = bool(packed_a), bool(packed_b)
        self.min_flops_per_thread = min_flops_per_thread
        self.config = config or default_config(self.target)
        self.epilogue = epilogue or Epilogue()
        self.threads = threads or num_threads()
        self.module = compile_gemm(self.target, self.config, self.epilogue, self.packed_a,
                                   self.packed_b)
        argtypes = [_c_i64, _c_i64, _c_i64, _c_p, _c_i64, _c_p, _c_i64, _c_p, _c_i64, _c_i32,
                    _c_i64, _c_i64, _c_p] + [_c_p] * len(self.epilogue.args)
        #: the compiled entry point: fn(M, N, K, A, lda, B, ldb, C, ldc, accumulate, part,
        #: nparts, workspace, *epilogue args), for callers that bring their own threads
        self.function = self._fn = self.module.function("sgemm", None, *argtypes)
        self.workspace_bytes = self.module.function("sgemm_workspace_bytes", _c_i64)()
        self._workspaces: list[np.ndarray] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._lock = threading.Lock()

    def workspace(self, i: int) -> int:
        """Address of part ``i``'s packing workspace (``workspace_bytes``, 64-byte aligned)."""
        return self._workspace(i)

    def _workspace(self, i: int) -> int:
        while len(self._workspaces) <= i:
            raw = np.empty(self.workspace_bytes + 64, np.uint8)
            off = (-raw.ctypes.data) % 64
            self._workspaces.append(raw[off:off + self.workspace_bytes])
        return self._workspaces[i].ctypes.data

    def __call__(self, A: np.ndarray, B: np.ndarray, C: np.ndarray | None = None, *,
                 accumulate: bool = False, threads: int | None = None, **epi_args) -> np.ndarray:
        lda, ldb = _leading_dim("A", A), _leading_dim("B", B)
        M, K = A.shape
        if B.shape[0] != K:
            raise GraphcError(f"GEMM shapes do not agree: A {A.shape} @ B {B.shape}",
                              hint="A's columns must equal B's rows")
        N = B.shape[1]
        if C is None:
            if accumulate:
                raise GraphcError("accumulate=True needs the C to add to", hint="pass C=")
            C = np.empty((M, N), np.float32)
        ldc = _leading_dim("C", C)
        if C.shape != (M, N):
            raise GraphcError(f"GEMM output C has shape {C.shape}, expected {(M, N)}",
                              hint="C must be M x N for A (M x K) @ B (K x N)")
        extra = []
        for name, _ in self.epilogue.args:
            if name not in epi_args:
                raise GraphcError(f"this GEMM's epilogue needs argument '{name}'",
                                  hint=f"pass {name}=")
            v = epi_args.pop(name)
            want = self.epilogue.arg_length(name, M, N)
            if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 1
                    and v.shape[0] == want and (want <= 1 or v.strides[0] == 4)):
                raise GraphcError(f"epilogue argument '{name}' must be a contiguous float32 "
                                  f"vector of length {want}, got {getattr(v, 'dtype', '')} "
                                  f"{getattr(v, 'shape', type(v).__name__)}",
                                  hint="check the bias shape")
            extra.append(v.ctypes.data)
        if epi_args:
            raise GraphcError(f"unknown GEMM arguments {sorted(epi_args)}",
                              hint="remove them, or build the Gemm with that epilogue")
        if M == 0 or N == 0:
            return C
        nt = threads or self.threads
        if self.min_flops_per_thread > 0:
            nt = min(nt, int(2.0 * M * N * max(K, 1) // self.min_flops_per_thread))
        nt = max(1, nt)
        if self.packed_a:
            A = pack_a_panels(A, self.config)   # (kept alive until the call returns)
        if self.packed_b:   # the microkernel loads B panels with aligned vector loads
            B = _aligned64(pack_b_panels(B, self.config))
        common = (M, N, K, A.ctypes.data, lda, B.ctypes.data, ldb, C.ctypes.data, ldc,
                  int(bool(accumulate)))
        with self._lock:  # the workspaces belong to one call at a time
            wss = [self._workspace(i) for i in range(nt)]
            if nt > 1 and self._pool_size < nt - 1:
                self.close()
                self._pool = ThreadPoolExecutor(nt - 1, thread_name_prefix="graphc-gemm")
                self._pool_size = nt - 1
            # parts 1.. on the pool, part 0 on this thread
            futs = [self._pool.submit(self._fn, *common, i, nt, wss[i], *extra)
                    for i in range(1, nt)]
            self._fn(*common, 0, nt, wss[0], *extra)
            for f in futs:
                f.result()
        return C

    def close(self):
        """Stop the thread pool (a later call starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool, self._pool_size = None, 0
