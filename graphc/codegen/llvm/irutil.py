"""Small helpers for writing kernels with ``llvmlite.ir``: types, constants, counted
loops, pointer arithmetic, intrinsics, and the work split of a parallel step.

Every generated step (one parallel piece of a node) has the signature

    void step(i8 *arena, const i8 *weights, i8 *scratch, i64 part, i64 nparts)

``arena`` holds every activation at the offsets of the memory plan, ``weights`` the
packed parameters, ``scratch`` the calling thread's private scratch; the step does the
share ``part`` of ``nparts`` of its work.  Pointers into the arena are formed with
constant offsets from the one ``arena`` argument, so LLVM's alias analysis sees exactly
which accesses may overlap (an in-place ReLU is recognisably the same address).
"""
from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir

F32 = ir.FloatType()
F64 = ir.DoubleType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()

STEP_ARGS = (("arena", PTR), ("weights", PTR), ("scratch", PTR), ("part", I64),
             ("nparts", I64))
#: fast-math flags that let LLVM vectorize a float reduction (sum order may change)
REASSOC = ("reassoc", "nsz")


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, int(v))


def f32(v: float) -> ir.Constant:
    return ir.Constant(F32, float(v))


def as_i64(v) -> ir.Value:
    return i64(v) if isinstance(v, int) else v


def new_function(mod: ir.Module, name: str, args, ret=VOID, internal: bool = False):
    """A function with named args; returns (fn, builder at its entry, {name: arg})."""
    fn = ir.Function(mod, ir.FunctionType(ret, [t for _, t in args]), name)
    for a, (n, _) in zip(fn.args, args):
        a.name = n
    if internal:
        fn.linkage = "internal"
    fn.attributes.add("nounwind")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    return fn, b, {n: a for a, (n, _) in zip(fn.args, args)}


def step_function(mod: ir.Module, name: str):
    """A step with the standard signature; arena, weights and scratch never alias."""
    fn, b, a = new_function(mod, name, STEP_ARGS)
    for i in range(3):
        fn.args[i].add_attribute("noalias")
    return fn, b, a


def var(b: ir.IRBuilder, init, name: str = "") -> ir.AllocaInstr:
    """A mutable local (an entry-block alloca; -O3 turns it into SSA values)."""
    with b.goto_entry_block():
        p = b.alloca(init.type, name=name)
    b.store(init, p)
    return p


def get(b: ir.IRBuilder, slot, name: str = ""):
    return b.load(slot, typ=slot.allocated_type, name=name)


@contextmanager
def loop(b: ir.IRBuilder, start, stop, step=1, name: str = "i"):
    """``for (i = start; i < stop; i += step)``; yields i (an i64 value)."""
    start, stop, step = as_i64(start), as_i64(stop), as_i64(step)
    slot = var(b, start, name)
    cond = b.append_basic_block(f"{name}.cond")
    body = b.append_basic_block(f"{name}.body")
    end = b.append_basic_block(f"{name}.end")
    b.branch(cond)
    b.position_at_end(cond)
    i = b.load(slot, typ=I64, name=name)
    b.cbranch(b.icmp_signed("<", i, stop), body, end)
    b.position_at_end(body)
    yield i
    b.store(b.add(i, step), slot)
    b.branch(cond)
    b.position_at_end(end)


def byte_ptr(b: ir.IRBuilder, base, offset) -> ir.Value:
    """base + offset bytes."""
    if isinstance(offset, int) and offset == 0:
        return base
    return b.gep(base, [as_i64(offset)], source_etype=I8, inbounds=True)


def fptr(b: ir.IRBuilder, base, idx) -> ir.Value:
    """&((float *) base)[idx]."""
    if isinstance(idx, int) and idx == 0:
        return base
    return b.gep(base, [as_i64(idx)], source_etype=F32, inbounds=True)


def load(b: ir.IRBuilder, base, idx=0, ty=F32, align: int = 4):
    return b.load(fptr(b, base, idx), typ=ty, align=align)


def store(b: ir.IRBuilder, value, base, idx=0, align: int = 4) -> None:
    b.store(value, fptr(b, base, idx), align=align)


def imin(b, x, y):
    x, y = as_i64(x), as_i64(y)
    return b.select(b.icmp_signed("<", x, y), x, y)


def imax(b, x, y):
    x, y = as_i64(x), as_i64(y)
    return b.select(b.icmp_signed(">", x, y), x, y)


def ceil_div(b, x, d: int):
    return b.sdiv(b.add(as_i64(x), i64(d - 1)), i64(d))


def floor_div(b, x, d: int):
    """Floor division of a possibly negative i64 by a positive constant."""
    x = as_i64(x)
    q = b.sdiv(x, i64(d))
    r = b.srem(x, i64(d))
    return b.select(b.icmp_signed("<", r, i64(0)), b.sub(q, i64(1)), q)


def part_range(b: ir.IRBuilder, total, part, nparts, align: int = 1):
    """[lo, hi) of ``total`` items for ``part`` of ``nparts`` (even split; the boundaries
    are multiples of ``align`` so parts do not share cache lines)."""
    total = as_i64(total)
    lo = b.sdiv(b.mul(total, part), nparts)
    hi = b.sdiv(b.mul(total, b.add(part, i64(1))), nparts)
    if align > 1:
        lo = imin(b, b.mul(b.sdiv(b.add(lo, i64(align - 1)), i64(align)), i64(align)), total)
        hi = imin(b, b.mul(b.sdiv(b.add(hi, i64(align - 1)), i64(align)), i64(align)), total)
    return lo, hi


def constant_table(mod: ir.Module, name: str, ty, values) -> ir.GlobalVariable:
    """An internal constant global array of ``ty`` holding ``values``."""
    arr = ir.ArrayType(ty, len(values))
    table = ir.GlobalVariable(mod, arr, name)
    table.linkage = "internal"
    table.global_constant = True
    table.initializer = ir.Constant(arr, [int(v) for v in values])
    return table


def intrinsic(mod: ir.Module, name: str, ret, args) -> ir.Function:
    """Declare (once) an LLVM intrinsic or a libm/libc function."""
    if name in mod.globals:
        return mod.globals[name]
    fn = ir.Function(mod, ir.FunctionType(ret, list(args)), name)
    return fn


def splat(b: ir.IRBuilder, x, n: int):
    vt = ir.VectorType(x.type, n)
    v = b.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(I32, 0))
    return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), [0] * n))


def const_like(x, value: float):
    """A float constant of x's type (scalar or vector)."""
    if isinstance(x.type, ir.VectorType):
        return ir.Constant(x.type, [float(value)] * x.type.count)
    return ir.Constant(x.type, float(value))


def memcpy(b: ir.IRBuilder, dst, src, nbytes) -> None:
    fn = intrinsic(b.module, "llvm.memcpy.p0.p0.i64", VOID, [PTR, PTR, I64, I1])
    b.call(fn, [dst, src, as_i64(nbytes), ir.Constant(I1, 0)])


def memset0(b: ir.IRBuilder, dst, nbytes) -> None:
    fn = intrinsic(b.module, "llvm.memset.p0.i64", VOID, [PTR, I8, I64, I1])
    b.call(fn, [dst, ir.Constant(I8, 0), as_i64(nbytes), ir.Constant(I1, 0)])


FLT_MAX = 3.4028234663852886e38


def load_vec(b: ir.IRBuilder, base, idx, width: int, mask=None):
    """``width`` floats at &base[idx]; with ``mask`` (<width x i1>) only those lanes are
    read (the others are 0)."""
    vt = ir.VectorType(F32, width)
    p = fptr(b, base, idx)
    if mask is None:
        return b.load(p, typ=vt, align=4)
    mt = ir.VectorType(I1, width)
    fn = intrinsic(b.module, f"llvm.masked.load.v{width}f32.p0", vt, [PTR, I32, mt, vt])
    return b.call(fn, [p, ir.Constant(I32, 4), mask, ir.Constant(vt, [0.0] * width)])


def store_vec(b: ir.IRBuilder, x, base, idx, mask=None) -> None:
    """Store vector ``x`` at &base[idx]; with ``mask`` only those lanes are written."""
    p = fptr(b, base, idx)
    if mask is None:
        b.store(x, p, align=4)
        return
    mt = ir.VectorType(I1, x.type.count)
    fn = intrinsic(b.module, f"llvm.masked.store.v{x.type.count}f32.p0", VOID,
                   [x.type, PTR, I32, mt])
    b.call(fn, [x, p, ir.Constant(I32, 4), mask])
