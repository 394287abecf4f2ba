"""A GEMM epilogue that runs a pointwise program on each register tile.

The GEMM (gemm.py) calls ``vector(b, x, row, col, args, mask)`` for every vector of a
finished C tile.  Here the bias is added and the program (ReLU, a residual Eltwise SUM,
a per-channel Scale, ...) is computed on it before the single store to C.

``mode`` says which index is the channel: "row" for a convolution (C is channels x
pixels), "col" for an inner product (C is samples x outputs).  The generated GEMM gets
extra arguments: the bias, one pointer per per-channel operand (already offset to the
channel of C's first row or column), one pointer per tensor read (offset like C, rows
``ldt`` apart).  Tensors in ``skip`` were already added by an accumulating GEMM.
"""
from __future__ import annotations

from ..gemm import Epilogue
from ..irutil import I64, PTR, load, load_vec, splat
from .pointwise import Chan, PStep, Site, chan_operands, emit_program, program_key, \
    tensor_inputs


class ProgramEpilogue(Epilogue):
    def __init__(self, steps: list[PStep], mode: str, bias: bool, skip=frozenset()):
        self.steps, self.mode, self.bias, self.skip = steps, mode, bias, frozenset(skip)
        self.chans = chan_operands(steps)
        self.tensors = tensor_inputs(steps)
        args = [("bias", PTR)] if bias else []
        args += [(f"ch{i}", PTR) for i in range(len(self.chans))]
        args += [(f"t{j}", PTR) for j in self.tensors]
        if self.tensors:
            args.append(("ldt", I64))
        self.args = tuple(args)

    def key(self) -> str:
        uses = [[self.chans.index(c) for _, c in sorted(s.chans.items())] for s in self.steps]
        return (f"prog:{self.mode}:bias{int(self.bias)}:skip{sorted(self.skip)}:"
                f"t{self.tensors}:c{uses}:{program_key(self.steps)}")

    @property
    def is_identity(self) -> bool:
        return not self.bias and not self.steps

    def fits(self, dim: int, inner: int) -> bool:
        """Can every per-channel operand be indexed by this mode's channel, for an output
        whose channel structure is (dim, inner)?"""
        return all(c.dim == 1 or (c.dim, c.inner) == (dim, inner) for c in self.chans)

    def vector(self, b, x, row, col, args, mask):
        width = x.type.count
        if self.bias:
            if self.mode == "row":
                x = b.fadd(x, splat(b, load(b, args["bias"], row), width))
            else:
                x = b.fadd(x, load_vec(b, args["bias"], col, width, mask))
        site = _TileSite(b, self, args, row, col, mask, width)
        return emit_program(site, self.steps, x)


class _TileSite(Site):
    def __init__(self, b, epi: ProgramEpilogue, args, row, col, mask, width: int):
        super().__init__(b)
        self.epi, self.args, self.row, self.col, self.mask = epi, args, row, col, mask
        self.width = width

    def tensor(self, k: int):
        b = self.b
        idx = b.add(b.mul(self.row, self.args["ldt"]), self.col)
        return load_vec(b, self.args[f"t{k}"], idx, self.width, self.mask)

    def chan(self, c: Chan):
        b = self.b
        p = self.args[f"ch{self.epi.chans.index(c)}"]
        if c.dim == 1:
            return splat(b, load(b, p, 0), self.width)
        if self.epi.mode == "row":
            return splat(b, load(b, p, self.row), self.width)
        return load_vec(b, p, self.col, self.width, self.mask)

    def skip_tensor(self, k: int) -> bool:
        return k in self.epi.skip
