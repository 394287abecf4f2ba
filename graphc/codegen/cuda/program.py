"""What the CUDA code generator hands the CUDA runtime: one compiled module and the
launches that run the net's forward, in order.

    optimized IR --codegen/cuda/lower.py--> CudaProgram
        .source    the CUDA C of every kernel (one translation unit, from templates/cuda/)
        .cubin     that source compiled by NVRTC for .arch (SASS; the runtime loads it)
        .launches  kernel, grid, block, dynamic shared memory, arguments; in execution order
        .inputs / .outputs   float32, row-major (NCHW) blobs at offsets of the arena
        .weights   the params as the kernels want them (packed, transposed, half, ...)

Every pointer a kernel takes is a base (the device arena or the device weights) plus a
byte offset known at compile time, so the runtime can record the whole forward once (a
CUDA Graph) and replay it.  Layout changes (NCHW <-> NHWC) and precision changes inside
the net are launches like any other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: argument kinds: a device pointer into the arena / the weights (value = byte offset),
#: or a scalar of that C type
ARG_KINDS = ("arena", "weights", "i32", "i64", "f32")


@dataclass(frozen=True)
class Arg:
    kind: str
    value: int | float

    def __post_init__(self):
        if self.kind not in ARG_KINDS:
            raise ValueError(f"argument kind {self.kind!r} is not one of {ARG_KINDS}")


@dataclass
class Launch:
    kernel: str                        # an extern "C" __global__ function of the module
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int                          # dynamic shared memory, bytes
    args: list[Arg]
    node: int                          # index into CudaProgram.nodes


@dataclass
class KernelInfo:
    """Resources of one compiled kernel, as ptxas reports them."""
    name: str
    registers: int
    shared_bytes: int                  # static shared memory
    spill_stores: int                  # bytes
    spill_loads: int                   # bytes
    local_bytes: int = 0               # stack frame


@dataclass
class CudaProgram:
    name: str
    arch: str                          # e.g. "sm_90"
    precision: str                     # "tf32" | "fp32" | "fp16" | "bf16"
    source: str
    cubin: bytes
    launches: list[Launch]
    nodes: list                        # codegen.llvm.lower.NodeInfo (name, op, flops)
    inputs: list                       # codegen.llvm.lower.TensorInfo (offset in the arena)
    outputs: list
    arena_bytes: int
    weights: object                    # codegen.llvm.lower.WeightsBlob
    kernels: dict[str, KernelInfo] = field(default_factory=dict)
    compile_log: str = ""

    def resource_report(self) -> str:
        """ptxas's registers, shared memory, stack and spills per kernel (Markdown)."""
        from .check import descriptions, resource_table
        return resource_table(self.kernels, descriptions([self.source]))
