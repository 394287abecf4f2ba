"""Pointwise programs (chains of elementwise ops: the tails of fused groups, standalone
ReLU/Eltwise/Scale chains) as CUDA C statements.

The programs themselves are built by the CPU backend's ``build_steps`` (one reading of the
fused IR for both backends: ``PStep`` s with per-channel operands ``Chan`` and full-shape
tensor reads); here each step becomes C that updates ``float v`` at flat output index
``i`` whose channel (Caffe's axis 1) is ``c``.  The arithmetic follows the CPU kernels and
the numpy references of graphc/ops step by step (float32; Sigmoid and BNLL in double).

``Epilogue`` holds the C (its parameters and body, what a kernel's instantiation depends
on: ``key``) and the launch arguments (where the operands are: per layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...errors import GraphcError
from ...ops import get_op
from ..llvm.kernels.pointwise import PStep, channel_structure, chan_operands, tensor_inputs
from .program import Arg


def cfloat(x) -> str:
    """A C float literal that is exactly float32(x)."""
    f = float(np.float32(x))
    if math.isnan(f):
        return "__int_as_float(0x7fc00000)"
    if math.isinf(f):
        return "__int_as_float(0x7f800000)" if f > 0 else "__int_as_float(0xff800000)"
    s = "%.9g" % f
    if "e" not in s and "." not in s and "n" not in s:
        s += ".0"
    return s + "f"


@dataclass
class Epilogue:
    params: str = ""                 # extra kernel parameters, each starting with ", "
    body: str = ""                   # statements on float v (index i: long long, channel c)
    key: str = ""
    args: list = field(default_factory=list)
    uses_channel: bool = False       # the body reads c

    @property
    def empty(self) -> bool:
        return not self.body


def build_epilogue(steps: list[PStep], out_shape, tensors: list[int],
                   natural=None) -> Epilogue:
    """The C of ``steps`` applied to v at flat index i of an output of ``out_shape``;
    ``tensors``: arena byte offsets of the site's full-shape tensors; ``natural``: the
    (dim, inner) structure whose channel the kernel has at hand as ``c`` (default Caffe's
    axis 1 of the output): operands indexed that way read element c."""
    if not steps:
        return Epilogue()
    dim, inner = natural or channel_structure(out_shape)
    chans = chan_operands(steps)
    used = tensor_inputs(steps)
    params, args, modes = [], [], []
    for j, ch in enumerate(chans):
        if ch.dim == 1:
            mode = "s"
        elif (ch.dim, ch.inner) == (dim, inner):
            mode = "c"
        else:
            mode = "g"
        modes.append(mode)
        params.append(f", const float *__restrict__ e_ch{j}")
        args.append(Arg(ch.src.base, ch.src.offset))
        if mode == "g":
            params.append(f", int e_ch{j}_dim, int e_ch{j}_inner")
            args += [Arg("i32", ch.dim), Arg("i32", ch.inner)]
    for k in used:
        params.append(f", const float *e_t{k}")
        args.append(Arg("arena", tensors[k]))

    def chan(c) -> str:
        j = chans.index(c)
        return {"s": f"__ldg(e_ch{j})", "c": f"__ldg(e_ch{j} + c)",
                "g": f"__ldg(e_ch{j} + (int)((i / e_ch{j}_inner) % e_ch{j}_dim))"}[modes[j]]

    lines = []
    for s in steps:
        lines += _step(s, chan)
    body = "\n".join("    " + ln for ln in lines)
    key = repr((modes, used, body))
    return Epilogue("".join(params), body, key, args, "c" in modes)


def _in(r) -> str:
    return "v" if r == "prev" else f"e_t{r[1]}[i]"


def _step(s: PStep, chan) -> list[str]:
    a, op = s.attrs, s.op
    out = [f"// {op}"]
    if op == "Eltwise":
        return out + _eltwise(s)
    x = _in(s.inputs[0]) if s.inputs else "v"
    if x != "v":
        out.append(f"v = {x};")
    if op == "ReLU":
        slope = np.float32(a.get("negative_slope", 0.0))
        neg = f"v * {cfloat(slope)}" if slope != 0 else "0.0f"
        out.append(f"v = v < 0.0f ? {neg} : v;")
    elif op == "PReLU":
        out.append(f"v = v < 0.0f ? v * {chan(s.chans['slope'])} : v;")
    elif op == "ELU":
        out.append(f"v = v < 0.0f ? {cfloat(a['alpha'])} * (expf(v) - 1.0f) : v;")
    elif op == "Sigmoid":
        out.append("v = (float)(tanh((double)v * 0.5) * 0.5 + 0.5);")
    elif op == "TanH":
        out.append("v = tanhf(v);")
    elif op == "AbsVal":
        out.append("v = fabsf(v);")
    elif op == "Threshold":
        out.append(f"v = v > {cfloat(a['threshold'])} ? 1.0f : 0.0f;")
    elif op == "Dropout":
        pass
    elif op == "Power":
        power, scale, shift = (np.float32(a[k]) for k in ("power", "scale", "shift"))
        if power * scale == 0:
            value = np.float32(1) if power == 0 else np.power(shift, power)
            out.append(f"v = {cfloat(value)};")
        else:
            if scale != 1:
                out.append(f"v = v * {cfloat(scale)};")
            if shift != 0:
                out.append(f"v = v + {cfloat(shift)};")
            if power == 2:
                out.append("v = v * v;")
            elif power == 0.5:
                out.append("v = sqrtf(v);")
            elif power != 1:
                out.append(f"v = powf(v, {cfloat(power)});")
    elif op == "Exp":
        inner, outer = get_op("Exp")._scales(a, np.dtype(np.float32))
        y = "v" if inner == 1 else f"v * {cfloat(inner)}"
        out.append(f"v = expf({y});")
        if outer != 1:
            out.append(f"v = v * {cfloat(outer)};")
    elif op == "Log":
        scale, shift = np.float32(a["scale"]), np.float32(a["shift"])
        if scale != 1:
            out.append(f"v = v * {cfloat(scale)};")
        if shift != 0:
            out.append(f"v = v + {cfloat(shift)};")
        out.append("v = logf(v);")
        bs = get_op("Log")._base_scale(a, np.dtype(np.float32))
        if bs != 1:
            out.append(f"v = v * {cfloat(bs)};")
    elif op == "BNLL":
        out.append("v = v > 0.0f ? (float)((double)v + log(1.0 + (double)expf(-v))) "
                   ": (float)log(1.0 + (double)expf(v));")
    elif op == "Scale":
        out.append(f"v = v * {chan(s.chans['scale'])};")
        if "bias" in s.chans:
            out.append(f"v = v + {chan(s.chans['bias'])};")
    elif op == "Bias":
        out.append(f"v = v + {chan(s.chans['bias'])};")
    elif op == "BatchNorm":
        out.append(f"v = (v - {chan(s.chans['mean'])}) / {chan(s.chans['sd'])};")
    else:
        raise GraphcError(f"internal: no CUDA pointwise code for {op}")
    return out


def _eltwise(s: PStep) -> list[str]:
    op = s.attrs.get("operation", "SUM")
    vals = [_in(r) for r in s.inputs]
    out = []
    # the operands first (v may be one of them and is overwritten)
    for j, x in enumerate(vals):
        out.append(f"const float e_{j} = {x};")
    names = [f"e_{j}" for j in range(len(vals))]
    if op == "SUM":
        coeff = list(s.attrs.get("coeff") or [1.0] * len(vals))
        expr = None
        for x, cf in zip(names, coeff):
            term = x if cf == 1 else f"{cfloat(cf)} * {x}"
            expr = term if expr is None else f"({expr}) + {term}"
        out.append(f"v = {expr};")
    elif op == "PROD":
        expr = names[0]
        for x in names[1:]:
            expr = f"({expr}) * {x}"
        out.append(f"v = {expr};")
    else:
        out.append(f"v = {names[0]} > {names[1]} ? {names[0]} : {names[1]};")
        for x in names[2:]:
            out.append(f"v = {x} > v ? {x} : v;")
    return ["{", *("    " + ln for ln in out), "}"]
