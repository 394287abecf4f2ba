"""Convolution: GEMM over image columns, Winograd's F(4x4, 3x3) for most 3x3 stride-1
layers (winograd.py), or a direct depthwise kernel.

For image n and group g, Caffe's convolution is the matrix product

    Y[n, g] (Og x P) = W[g] (Og x K) @ cols (K x P),   K = Cg * KH * KW, P = OH * OW

where ``cols`` is im2col of the group's input channels; W[g] is packed into the GEMM's
panel layout at compile time (gemm.pack_a_panels), so no run packs the weights.  A node
is two steps: one writes the columns of a chunk of images into a temporary region of
the arena (its parts split (image, channel, pixel block) items), the next runs the packed,
register-blocked SGEMM (gemm.py) on them, each product split among the parts by the
GEMM itself (whole register tiles of rows or columns), with an epilogue that adds the
bias and computes the fused tail (ReLU, a residual add, ...) on each register tile.  A
1x1 convolution with stride 1 and no padding needs no columns: its input is the matrix.
im2col copies a stride-1 "same"-width tap as one shifted run of the flattened plane and
a stride-2 row with vector loads and a shuffle.

Mostly no columns are written: a step copies the images zero-padded (for stride S,
split into the S x S phases of the padded image, so that a tap reads an output row as
one run of a phase's row), and the GEMM packs its B panels straight from them (gemm.py,
gathered B: per row of B (input channel, kh, kw) an offset in the padded image, per
vector of output pixels the one or two runs of a row they read), so the column matrix
-- KH*KW times the image, 7 MB for a ResNet-50 res2 3x3 -- is never written and read
back.  Output rows too short for a vector of pixels to be two runs keep im2col.

When the fused tail adds a residual that the output overwrites in place, the GEMM
accumulates onto the output (which holds the residual) instead of reading it in the
epilogue (a K longer than one cache block would otherwise see partial sums).

Small images in a batch (P <= BATCH_P, e.g. ResNet's last stages): the columns of the
images side by side make one wider product, so the weights are packed once for all of
them; a last step moves the rows into place and computes the tail.

Depthwise (one input and one output channel per group) is direct: see depthwise.py.  A
1x1 convolution of 1x1 images is an inner product (linear.gemv).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from ....ops.conv import Geometry
from ..irutil import F32, I32, I64, PTR, constant_table, floor_div, fptr, get, i64, imax, \
    imin, load, loop, new_function, part_range, step_function, store, var
from . import depthwise, linear, winograd
from .epilogue import ProgramEpilogue
from .pointwise import FlatSite, channel_structure, emit_program

MIB = 1 << 20


def _geometry(k, n, anchor) -> Geometry:
    x = n.inputs[anchor["inputs"][0]]
    return Geometry(anchor["attrs"], k.shape(x), transposed=False)


def supported(g, n, anchor):
    if len(anchor.get("inputs", [])) != 1:
        return ("a Convolution with several bottoms", "use one Convolution layer per bottom")
    x = n.inputs[anchor["inputs"][0]]
    geo = Geometry(anchor["attrs"], g.types[x].shape, transposed=False)
    if geo.nsp > 2:
        return (f"a {geo.nsp}-D convolution", "the CPU backend has 1-D and 2-D convolutions")
    return None


def out_shape(k, n, anchor):
    return _geometry(k, n, anchor).out_shape()


def _dims(geo: Geometry):
    """(H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW), a 1-D convolution as H = 1."""
    if geo.nsp == 1:
        return (1, geo.spatial[0], 1, geo.kernel[0], 1, geo.stride[0], 0, geo.pad[0], 1,
                geo.dilation[0], 1, geo.out_spatial[0])
    return (*geo.spatial, *geo.kernel, *geo.stride, *geo.pad, *geo.dilation, *geo.out_spatial)


def lower(k, n, anchor, steps, tensors, out_off):
    from . import NotEpilogue
    geo = _geometry(k, n, anchor)
    x = n.inputs[anchor["inputs"][0]]
    params = [n.params[i] for i in anchor.get("params", [])]
    bias = len(params) > 1
    cg, og = geo.channels // geo.group, geo.num_output // geo.group
    if cg == 1 and og == 1:
        return depthwise.lower(k, n, geo, _dims(geo), k.loc(x), params, steps, tensors,
                               out_off)
    if geo.group == 1 and math.prod(geo.spatial) == 1 and all(v == 1 for v in geo.kernel) \
            and not any(geo.pad) and geo.num <= linear.SMALL_M:
        # a 1x1 convolution of a 1x1 image (MobileNet's classifier) is an inner product
        return linear.gemv(k, n, k.loc(x), k.param_src(params[0]),
                           k.param_src(params[1]) if bias else None, geo.num,
                           geo.channels, geo.num_output,
                           geo.out_shape(), steps, tensors, out_off)
    dim, inner = channel_structure(geo.out_shape())
    if winograd.applies(geo, k.gemm_config) and \
            ProgramEpilogue(steps, "row", False).fits(dim, inner):
        return winograd.lower(k, n, geo, k.loc(x), params, steps, tensors, out_off)
    if geo.num > 1 and math.prod(geo.out_spatial) <= BATCH_P:
        return _batched_conv(k, n, geo, k.loc(x), params, steps, tensors, out_off)
    alias = [j for j, off in enumerate(tensors) if off == out_off]
    skip, accumulate = set(), False
    if alias:
        j = alias[0]
        if _accumulates(steps, j):
            skip, accumulate = {j}, True
        elif cg * math.prod(geo.kernel) > k.gemm_config.kc:
            raise NotEpilogue("in-place residual with a long K")
    epi = ProgramEpilogue(steps, "row", bias, skip)
    if not epi.fits(dim, inner):
        raise NotEpilogue("operand not per output channel")
    _gemm_conv(k, n, geo, k.loc(x), params, epi, tensors, out_off, accumulate,
               packable=x if _sole_reader_of_input(k, n, anchor, x) else None)


def _sole_reader_of_input(k, n, anchor, x) -> bool:
    """May node n take graph input x packed at set-input time (lower.KernelContext.
    input_packers): it is not an output, and only the convolution reads it (no other
    node, nor a step of n's fused tail)?"""
    g = k.g
    if k.input_packers is None or x not in g.inputs or x in g.outputs or \
            sum(v == x for m in g.nodes for v in m.inputs) != 1:
        return False
    i = n.inputs.index(x)
    tail = [s for s in n.attrs.get("body", []) if s is not anchor] if n.op == "Fused" else []
    return all(i not in s.get("inputs", []) for s in tail)


def _accumulates(steps, j) -> bool:
    """Is the first tail step ``prev + tensor j`` (Eltwise SUM, coefficients 1), and
    tensor j read nowhere else?  Then the GEMM can start from C = tensor j."""
    if not steps or steps[0].op != "Eltwise" or steps[0].attrs.get("operation") != "SUM":
        return False
    s = steps[0]
    coeff = list(s.attrs.get("coeff") or [1.0] * len(s.inputs))
    terms = dict(zip(map(str, s.inputs), coeff))
    if terms.get("prev") != 1 or terms.get(str(("t", j))) != 1 or s.inputs.count(("t", j)) != 1:
        return False
    return all(("t", j) not in t.inputs for t in steps[1:])


# ---------------------------------------------------------------------------------------
# GEMM convolution

#: bytes of image columns built per im2col step (at least one image's)
COLS_BUDGET = 16 * MIB
#: pixels per im2col work item
COL_BLOCK = 2048
#: images with at most this many output pixels are convolved a batch at a time
BATCH_P = 256
#: parts per thread of a convolution's GEMM step (the GEMM splits whole tiles among
#: them; the threads take parts as they come): after an idle pause the second CPU wakes
#: late and runs slowly for a while, and with 4 parts per thread the caller takes more
#: of such a step's work instead of waiting for one big late half (SqueezeNet 1.1, runs
#: 100 ms apart: 0.91-0.96x in three interleaved runs; back to back 0.98x; MobileNet v1
#: and ResNet-50 0.99-1.01x; bench/results/cpu_gemm_parts.md)
GEMM_PARTS_PER_THREAD = 4
#: ... and of a GEMM at least WIDE_PANELS register tiles wide (>= 512 pixels on AVX2):
#: the two vCPUs often run at different speeds (a traced MobileNet run: one CPU ~15%
#: slower on every equal part), and 16 parts split a step closer to the speeds than 8
#: while a column split still leaves each part 2 or more tiles.  Narrower GEMMs keep 4:
#: there the extra parts repeat B's packing or A's streaming (ResNet-50 res4/res5 1.07-1.13x
#: with 8 everywhere).  MobileNet v1's wide layers 0.90-0.97x, ResNet-50's 0.89-0.95x,
#: whole nets 0.97-0.99x (bench/results/cpu_gemm_parts.md)
WIDE_PARTS_PER_THREAD = 8
WIDE_PANELS = 32


def _gemm_parts(k, cols: int) -> int:
    """Parts per thread for a convolution GEMM step of ``cols`` output columns."""
    return WIDE_PARTS_PER_THREAD if -(-cols // k.gemm_config.nr) >= WIDE_PANELS \
        else GEMM_PARTS_PER_THREAD


def _gemm_conv(k, n, geo, x_off, params, epi, tensors, out_off, accumulate,
               packable: str | None = None):
    """The convolution as GEMMs, image by image; with ``packable`` (the input's value,
    a graph input read by this node alone) the zero-padded phase planes are written by an input
    packer when the input is set, into the persistent region, instead of by a step of
    every run (it saves the run's copy of the input and that step: MobileNet v1 and
    SqueezeNet 1.1 0.96-0.98x at batch 1, bench/results/cpu_input_packer.md)."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    Cg, Og = C // G, O // G
    K, P, HW = Cg * KH * KW, OH * OW, H * W
    direct = KH == KW == 1 and SH == SW == 1 and PH == PW == 0
    gather = None if direct else _gather_tables(k, n.name, _dims(geo), C, Cg)
    k.need_scratch(k.gemm_workspace_bytes())
    w_src, w_group = k.packed_weights(params[0], G)
    b_src = k.param_src(params[1]) if epi.bias else None
    # B read from zero-padded copies of the images (no column matrix) where it can be
    per_image = 4 * (C * gather.plane if gather else G * K * P)
    chunk = N if direct else max(1, min(N, COLS_BUDGET // max(per_image, 1)))
    packed = packable is not None and gather is not None
    if packed:      # all the images, packed when the input is set
        chunk, cols = N, k.persistent(4 * gather.floats(N * C))
        k.input_packers[packable] = (_input_packer(k, n, cols, N, geo, gather), N * C)
    else:
        cols = None if direct else \
            k.temp(4 * gather.floats(chunk * C), "padded") if gather else \
            k.temp(chunk * per_image, "im2col")
    for first in range(0, N, chunk):
        imgs = min(chunk, N - first)
        if gather and not packed:
            _phase_step(k, n, x_off, cols, first, imgs, geo, gather)
        elif not direct and not packed:
            _im2col_step(k, n, x_off, cols, first, imgs, geo)
        fn, b, a = step_function(k.mod, k.step_name(n.name))
        xp = k.ptr(b, a, _arena(x_off))
        cp = None if cols is None else k.persistent_ptr(b, a, cols) if packed else \
            k.ptr(b, a, _arena(cols))
        yp = k.ptr(b, a, _arena(out_off))
        wp = k.ptr(b, a, w_src)
        bp = k.ptr(b, a, b_src) if b_src else None
        chp = [k.ptr(b, a, c.src) for c in epi.chans]
        tp = {j: k.ptr(b, a, _arena(tensors[j])) for j in epi.tensors}
        gemm = k.gemm(epi, packed_a=True, gathered_b=bool(gather))
        for i in range(imgs):          # the GEMM splits each product among the parts
            img = first + i
            for g in range(G):
                ch0 = g * Og
                if direct:
                    bmat = fptr(b, xp, (img * C + g * Cg) * HW)
                elif gather:
                    bmat = fptr(b, cp, (i * C + g * Cg) * gather.plane)
                else:
                    bmat = fptr(b, cp, (i * G + g) * K * P)
                coff = (img * O + ch0) * P
                extra = list(gather.tables) if gather else []
                extra += [fptr(b, bp, ch0)] if bp is not None else []
                extra += [p if c.dim == 1 else fptr(b, p, ch0) for c, p in zip(epi.chans, chp)]
                extra += [fptr(b, tp[j], coff) for j in epi.tensors]
                if epi.tensors:
                    extra.append(i64(P))
                b.call(gemm, [i64(Og), i64(P), i64(K), fptr(b, wp, g * w_group), i64(K), bmat,
                              i64(P), fptr(b, yp, coff), i64(P),
                              ir.Constant(I32, int(accumulate)), a["part"], a["nparts"],
                              a["scratch"], *extra])
        b.ret_void()
        k.add_step(fn.name, 2 * imgs * O * P * K, per_thread=_gemm_parts(k, P))


@dataclass(frozen=True)
class Gathered:
    """How a convolution's GEMM reads B from zero-padded images (see _gather_tables)."""
    layout: tuple   # (Hq, Wq, phases): each input channel is len(phases) planes of Hq x Wq
    tables: tuple   # (brows, bvecs) constant globals: the gathered GEMM's extra arguments
    vw: int         # floats per vector: a blended vector may read this far past the end

    @property
    def plane(self) -> int:
        """Floats of one input channel's phase planes."""
        Hq, Wq, phases = self.layout
        return len(phases) * Hq * Wq

    def floats(self, channels: int) -> int:
        """Floats of a buffer holding ``channels`` channels' planes (with the slack)."""
        return channels * self.plane + self.vw


def _gather_tables(k, name: str, dims, channels: int, group_channels: int,
                   images: int = 1) -> Gathered | None:
    """A convolution as a GEMM whose B is gathered from the zero-padded image (gemm.py,
    gathered B).  With stride S the padded image is split into its S x S phases (phase
    (py, px) holds the padded pixels (i*SH + py, j*SW + px)), only those some tap reads:
    then every tap reads each output row as one run of one phase's row, as in a stride-1
    convolution.  Returns the layout and the tables brows, bvecs as constant globals;
    None where the output rows are too short for a vector of pixels to be two runs (e.g.
    7 x 7 images with 16-float vectors).  ``dims``: the geometry as _dims gives it;
    images of ``channels`` channels, B's rows those of ``group_channels`` of them;
    ``images``: the columns of that many images side by side (image i's pixels after
    image i-1's)."""
    from ..gemm import gather_vectors
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = dims
    Hq, Wq = -(-(H + 2 * PH) // SH), -(-(W + 2 * PW) // SW)
    phases = sorted({(kh * DH % SH, kw * DW % SW) for kh in range(KH) for kw in range(KW)})
    slot = {ph: i for i, ph in enumerate(phases)}
    plane = len(phases) * Hq * Wq
    img, oh, ow = np.unravel_index(np.arange(images * OH * OW), (images, OH, OW))
    bvecs = gather_vectors(img * channels * plane + oh * Wq + ow, k.gemm_config)
    if bvecs is None:
        return None
    brows = [c * plane + slot[kh * DH % SH, kw * DW % SW] * Hq * Wq
             + kh * DH // SH * Wq + kw * DW // SW
             for c in range(group_channels) for kh in range(KH) for kw in range(KW)]
    if images * channels * plane >= 2 ** 31:
        return None
    name = k.step_name(name + "_gather")
    return Gathered((Hq, Wq, phases), (constant_table(k.mod, f"{name}_rows", I32, brows),
                                       constant_table(k.mod, f"{name}_vecs", I32, bvecs)),
                    k.gemm_config.vw)


def _phase_function(k, name, src, dst, planes, geo, gather: Gathered):
    """A step function writing ``planes`` input planes (from ``src(b, args)``) as
    zero-padded phase planes (``gather.layout``: per channel, phase after phase, Hq x Wq
    each) to ``dst(b, args)``; its items are the planes."""
    H, W = _dims(geo)[:2]
    fn, b, a = step_function(k.mod, k.step_name(name))
    xp, dp = src(b, a), dst(b, a)
    lo, hi = part_range(b, planes, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as t:
        emit_phases(b, fptr(b, xp, b.mul(t, i64(H * W))),
                    fptr(b, dp, b.mul(t, i64(gather.plane))), _dims(geo), gather.layout)
    b.ret_void()
    return fn


def _phase_step(k, n, x_off, dst, first, imgs, geo, gather: Gathered):
    """A step writing images first..first+imgs to the arena at ``dst`` as phase planes."""
    H, W = _dims(geo)[:2]
    C = geo.channels
    fn = _phase_function(k, n.name + "_pad",
                         lambda b, a: fptr(b, k.ptr(b, a, _arena(x_off)), first * C * H * W),
                         lambda b, a: k.ptr(b, a, _arena(dst)), imgs * C, geo, gather)
    k.add_step(fn.name, imgs * C * gather.plane // 4)


def _input_packer(k, n, dst, imgs, geo, gather: Gathered) -> str:
    """The input packer writing all ``imgs`` images, from the caller's data (the
    function's third argument), to the persistent region at ``dst`` as phase planes."""
    return _phase_function(k, n.name + "_pack", lambda b, a: a["scratch"],
                           lambda b, a: k.persistent_ptr(b, a, dst), imgs * geo.channels,
                           geo, gather).name


def emit_phases(b, src, out, dims, layout) -> None:
    """Code writing one input plane at ``src`` as its zero-padded phase planes at ``out``
    (``dims`` as for _gather_tables, ``layout`` of its result).  Which rows and columns
    of a phase are inside the image is known here, so the loops hold no bounds checks."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = dims
    Hq, Wq, phases = layout
    zero = ir.Constant(F32, 0.0)

    def inside(p, pad, s, size, count):
        """[lo, hi) of the phase positions i with 0 <= i*s + p - pad < size."""
        lo = min(max(0, -(-(pad - p) // s)), count)
        return lo, max(lo, min(count, (size - 1 + pad - p) // s + 1))

    for q, (py, px) in enumerate(phases):
        ph = fptr(b, out, q * Hq * Wq)
        r_lo, r_hi = inside(py, PH, SH, H, Hq)
        c_lo, c_hi = inside(px, PW, SW, W, Wq)
        for z0, z1 in ((0, r_lo * Wq), (r_hi * Wq, Hq * Wq)):
            if z0 < z1:
                with loop(b, z0, z1, name="zrow") as j:
                    store(b, zero, ph, j)
        with loop(b, r_lo, r_hi, name="row") as i:
            orow = fptr(b, ph, b.mul(i, i64(Wq)))
            # input (i*SH + py - PH, j*SW + px - PW): one index, never before src
            base = b.add(b.mul(i, i64(SH * W)), i64((py - PH) * W + px - PW))
            for z0, z1 in ((0, c_lo), (c_hi, Wq)):
                if z0 < z1:
                    with loop(b, z0, z1, name="zcol") as j:
                        store(b, zero, orow, j)
            with loop(b, c_lo, c_hi, name="col") as j:
                store(b, load(b, src, b.add(base, b.mul(j, i64(SW)))), orow, j)


def _batched_conv(k, n, geo, x_off, params, steps, tensors, out_off):
    """Small images (P <= BATCH_P) in a batch: the columns of a chunk of images side by
    side (K x imgs*P per group; gathered from the padded images where _gather_tables
    allows, else written by im2col), one GEMM per group (the weights are packed once for all
    the images instead of once per image), into a temporary (O x imgs*P) with the bias
    added; then a step moving each row into its image's place in the output, computing
    the tail on the way (it may read the output's own residual: each element is read
    before it is written)."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    N, C, O, G = geo.num, geo.channels, geo.num_output, geo.group
    Cg, Og = C // G, O // G
    K, P = Cg * KH * KW, OH * OW
    dim, inner = channel_structure(geo.out_shape())
    k.need_scratch(k.gemm_workspace_bytes())
    w_src, w_group = k.packed_weights(params[0], G)
    b_src = k.param_src(params[1]) if len(params) > 1 else None
    epi = ProgramEpilogue([], "row", b_src is not None)
    chunk = max(1, min(N, COLS_BUDGET // max(4 * G * K * P, 1)))
    gathers = {m: _gather_tables(k, n.name, _dims(geo), C, Cg, m)
               for m in {chunk, N % chunk or chunk}}
    if all(gathers.values()):   # B gathered from the padded images (phases), as _gemm_conv
        cols = k.temp(4 * gathers[chunk].floats(chunk * C), "padded")
    else:
        gathers = {}
        cols = k.temp(4 * chunk * G * K * P, "im2col")
    cmat = k.temp(4 * chunk * O * P, "gemm")
    for first in range(0, N, chunk):
        imgs = min(chunk, N - first)
        ld = imgs * P
        gather = gathers.get(imgs)
        if gather:
            _phase_step(k, n, x_off, cols, first, imgs, geo, gather)
        else:
            _im2col_step(k, n, x_off, cols, first, imgs, geo, side_by_side=True)
        fn, b, a = step_function(k.mod, k.step_name(n.name))
        gemm = k.gemm(epi, packed_a=True, gathered_b=bool(gather))
        cp, tp = k.ptr(b, a, _arena(cols)), k.ptr(b, a, _arena(cmat))
        wp = k.ptr(b, a, w_src)
        bp = k.ptr(b, a, b_src) if b_src else None
        for g in range(G):
            extra = list(gather.tables) if gather else []
            extra += [fptr(b, bp, g * Og)] if bp is not None else []
            bmat = fptr(b, cp, g * Cg * gather.plane if gather else g * K * ld)
            b.call(gemm, [i64(Og), i64(ld), i64(K), fptr(b, wp, g * w_group), i64(K),
                          bmat, i64(ld), fptr(b, tp, g * Og * ld), i64(ld),
                          ir.Constant(I32, 0), a["part"], a["nparts"], a["scratch"], *extra])
        b.ret_void()
        k.add_step(fn.name, 2 * imgs * O * P * K, per_thread=_gemm_parts(k, ld))
        # scatter: out[first + i, o, p] = tail(cmat[o, i * P + p])
        fn, b, a = step_function(k.mod, k.step_name(n.name + "_out"))
        tp = k.ptr(b, a, _arena(cmat))
        yp = k.ptr(b, a, _arena(out_off))
        lo, hi = part_range(b, imgs * O, a["part"], a["nparts"])
        with loop(b, lo, hi, name="row") as r:
            i, o = b.udiv(r, i64(O)), b.urem(r, i64(O))
            src = fptr(b, tp, b.add(b.mul(o, i64(ld)), b.mul(i, i64(P))))
            base = b.mul(b.add(r, i64(first * O)), i64(P))
            with loop(b, 0, P, name="p") as p:
                j = b.add(base, p)
                site = FlatSite(b, k, a, tensors, j, o, dim, inner)
                store(b, emit_program(site, steps, load(b, src, p)), yp, j)
        b.ret_void()
        k.add_step(fn.name, imgs * O * P)


def _im2col_step(k, n, x_off, cols, first, imgs, geo, side_by_side: bool = False):
    """A step writing the column matrices of images first..first+imgs to the arena at
    ``cols``: one (G x K x P) after the other, or ``side_by_side`` (G x K x imgs*P: image
    i's columns at i*P of each row); its items are (image, input channel, pixel block)."""
    H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _dims(geo)
    C, P = geo.channels, OH * OW
    # the column stride is built in (a constant stride 2 copy vectorizes; a variable one
    # only when it happens to be 1)
    flat = SH == SW == 1 and OW == W
    if flat:
        im2col = k.helper("gk_im2col_flat", _make_im2col_flat)
    else:
        im2col = k.helper(f"gk_im2col_sw{SW}", lambda mod, nm: _make_im2col(mod, nm, SW))
    im2col.attributes.add("alwaysinline")
    nblk = -(-P // COL_BLOCK)
    fn, b, a = step_function(k.mod, k.step_name(n.name + "_im2col"))
    xp = k.ptr(b, a, _arena(x_off))
    cp = k.ptr(b, a, _arena(cols))
    lo, hi = part_range(b, imgs * C * nblk, a["part"], a["nparts"])
    with loop(b, lo, hi, name="t") as t:
        blk = b.urem(t, i64(nblk))
        plane = b.udiv(t, i64(nblk))                 # (image in chunk, channel)
        p0 = b.mul(blk, i64(COL_BLOCK))
        plen = imin(b, i64(COL_BLOCK), b.sub(i64(P), p0))
        src = fptr(b, xp, b.mul(b.add(plane, i64(first * C)), i64(H * W)))
        # channel c's rows start at row c * KH * KW of the columns (groups are contiguous)
        if side_by_side:
            img, c = b.udiv(plane, i64(C)), b.urem(plane, i64(C))
            ld = imgs * P
            dst = fptr(b, cp, b.add(b.add(b.mul(c, i64(KH * KW * ld)), b.mul(img, i64(P))), p0))
        else:
            ld = P
            dst = fptr(b, cp, b.add(b.mul(plane, i64(KH * KW * P)), p0))
        if flat:
            b.call(im2col, [src, dst, i64(H), i64(W), i64(OH), i64(KH), i64(KW), i64(PH),
                            i64(PW), i64(DH), i64(DW), p0, plen, i64(ld)])
        else:
            b.call(im2col, [src, dst, i64(1), i64(H), i64(W), i64(KH), i64(KW), i64(SH),
                            i64(SW), i64(PH), i64(PW), i64(DH), i64(DW), i64(OW), p0, plen,
                            i64(ld)])
    b.ret_void()
    k.add_step(fn.name, imgs * C * KH * KW * P // 4)


def _arena(off):
    from .pointwise import Src
    return Src("arena", off)


def _make_im2col(mod, name, sw: int):
    """dst[kk * ldd + j] for kk = (c, kh, kw) and output pixels p0 + j, j < plen: the
    input at (c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW), 0 outside the image."""
    args = [("src", PTR), ("dst", PTR), ("C", I64), ("H", I64), ("W", I64), ("KH", I64),
            ("KW", I64), ("SH", I64), ("SW", I64), ("PH", I64), ("PW", I64), ("DH", I64),
            ("DW", I64), ("OW", I64), ("p0", I64), ("plen", I64), ("ldd", I64)]
    fn, b, a = new_function(mod, name, args, internal=True)
    for i in (0, 1):
        fn.args[i].add_attribute("noalias")
    H, W, OW, SH, SW = a["H"], a["W"], a["OW"], a["SH"], i64(sw)
    p0, plen = a["p0"], a["plen"]
    oh0 = b.udiv(p0, OW)
    oh1 = b.add(b.udiv(b.sub(b.add(p0, plen), i64(1)), OW), i64(1))
    kk = var(b, i64(0), "kk")
    with loop(b, 0, a["C"], name="c") as c:
        plane = fptr(b, a["src"], b.mul(c, b.mul(H, W)))
        with loop(b, 0, a["KH"], name="kh") as kh:
            with loop(b, 0, a["KW"], name="kw") as kw:
                row = fptr(b, a["dst"], b.mul(get(b, kk), a["ldd"]))
                iw0 = b.sub(b.mul(kw, a["DW"]), a["PW"])        # input column of ow = 0
                with loop(b, oh0, oh1, name="oh") as oh:
                    ow_a = imax(b, b.sub(p0, b.mul(oh, OW)), i64(0))
                    ow_b = imin(b, b.sub(b.add(p0, plen), b.mul(oh, OW)), OW)
                    base = b.sub(b.mul(oh, OW), p0)             # j = base + ow
                    ih = b.add(b.sub(b.mul(oh, SH), a["PH"]), b.mul(kh, a["DH"]))
                    inside = b.and_(b.icmp_signed(">=", ih, i64(0)), b.icmp_signed("<", ih, H))
                    with b.if_else(inside) as (then, other):
                        with then:
                            src_row = fptr(b, plane, b.mul(ih, W))
                            v_lo, v_hi = _valid_range_rt(b, iw0, SW, W, OW)
                            v_lo = imin(b, imax(b, v_lo, ow_a), ow_b)
                            v_hi = imin(b, imax(b, v_hi, v_lo), ow_b)
                            with loop(b, ow_a, v_lo, name="z0") as ow:
                                store(b, ir.Constant(F32, 0.0), row, b.add(base, ow))
                            if sw == 2:
                                v_lo = _copy_stride2(b, src_row, row, base, iw0, W, v_lo, v_hi)
                            with loop(b, v_lo, v_hi, name="cp") as ow:
                                v = load(b, src_row, b.add(b.mul(ow, SW), iw0))
                                store(b, v, row, b.add(base, ow))
                            with loop(b, v_hi, ow_b, name="z1") as ow:
                                store(b, ir.Constant(F32, 0.0), row, b.add(base, ow))
                        with other:
                            with loop(b, ow_a, ow_b, name="z") as ow:
                                store(b, ir.Constant(F32, 0.0), row, b.add(base, ow))
                b.store(b.add(get(b, kk), i64(1)), kk)
    b.ret_void()
    return fn


def _make_im2col_flat(mod, name):
    """im2col of one channel for stride 1 and an output as wide as the input: the row of
    tap (kh, kw) is the flattened plane shifted by dh * W + dw, so it is one copy (and
    zeros before and after), then the |dw| columns the shift wrapped around are zeroed.
    Same arguments as gk_im2col minus C, SH, SW (one channel) plus OH."""
    args = [("src", PTR), ("dst", PTR), ("H", I64), ("W", I64), ("OH", I64), ("KH", I64),
            ("KW", I64), ("PH", I64), ("PW", I64), ("DH", I64), ("DW", I64), ("p0", I64),
            ("plen", I64), ("ldd", I64)]
    fn, b, a = new_function(mod, name, args, internal=True)
    for i in (0, 1):
        fn.args[i].add_attribute("noalias")
    H, W, OH, p0, plen = a["H"], a["W"], a["OH"], a["p0"], a["plen"]
    p1 = b.add(p0, plen)
    hw = b.mul(H, W)
    kk = var(b, i64(0), "kk")
    with loop(b, 0, a["KH"], name="kh") as kh:
        dh = b.sub(b.mul(kh, a["DH"]), a["PH"])
        r_lo = imax(b, b.sub(i64(0), dh), 0)                # output rows whose input row
        r_hi = imin(b, b.sub(H, dh), OH)                    # oh + dh is inside
        with loop(b, 0, a["KW"], name="kw") as kw:
            dw = b.sub(b.mul(kw, a["DW"]), a["PW"])
            shift = b.add(b.mul(dh, W), dw)
            row = fptr(b, a["dst"], b.mul(get(b, kk), a["ldd"]))
            lo = imax(b, imax(b, p0, b.mul(r_lo, W)), b.sub(i64(0), shift))
            hi = imin(b, imin(b, p1, b.mul(r_hi, W)), b.sub(hw, shift))
            hi = imax(b, hi, lo)
            lo = imin(b, lo, p1)
            hi = imin(b, hi, p1)
            with loop(b, p0, lo, name="z0") as j:
                store(b, ir.Constant(F32, 0.0), row, b.sub(j, p0))
            with loop(b, lo, hi, name="cp") as j:
                store(b, load(b, a["src"], b.add(j, shift)), row, b.sub(j, p0))
            with loop(b, hi, p1, name="z1") as j:
                store(b, ir.Constant(F32, 0.0), row, b.sub(j, p0))
            # the wrapped columns: ow < -dw (dw < 0) or ow >= W - dw (dw > 0)
            c_lo = imax(b, b.sub(i64(0), dw), 0)
            c_hi = imin(b, b.sub(W, dw), W)
            with b.if_then(b.and_(b.icmp_signed("<", lo, hi),
                                  b.or_(b.icmp_signed(">", c_lo, i64(0)),
                                        b.icmp_signed("<", c_hi, W)))):
                with loop(b, b.sdiv(lo, W), b.add(b.sdiv(b.sub(hi, i64(1)), W), i64(1)),
                          name="er") as oh:
                    start = b.mul(oh, W)
                    for c0, c1 in ((i64(0), c_lo), (c_hi, W)):
                        j0 = imax(b, b.add(start, c0), lo)
                        j1 = imin(b, b.add(start, c1), hi)
                        with loop(b, j0, j1, name="ez") as j:
                            store(b, ir.Constant(F32, 0.0), row, b.sub(j, p0))
            b.store(b.add(get(b, kk), i64(1)), kk)
    b.ret_void()
    return fn


def _copy_stride2(b, src_row, row, base, iw0, W, v_lo, v_hi, vw: int = 8):
    """row[base + ow] = src_row[2 * ow + iw0] for ow from v_lo, vw at a time: two vectors
    loaded and their even lanes kept (LLVM would gather), while the loaded elements stay
    inside the input row.  Returns where the scalar copy must go on."""
    vt = ir.VectorType(F32, 2 * vw)
    # ow may start a vector while ow + vw <= v_hi and 2 * ow + iw0 + 2 * vw <= W
    last = floor_div(b, b.sub(b.sub(W, iw0), i64(2 * vw)), 2)       # the last allowed start
    count = imin(b, b.sdiv(b.sub(v_hi, v_lo), i64(vw)),
                 b.add(floor_div(b, b.sub(last, v_lo), vw), i64(1)))
    count = imax(b, count, i64(0))
    even = ir.Constant(ir.VectorType(I32, vw), list(range(0, 2 * vw, 2)))
    with loop(b, 0, count, name="v2") as t:
        ow = b.add(v_lo, b.mul(t, i64(vw)))
        x = b.load(fptr(b, src_row, b.add(b.mul(ow, i64(2)), iw0)), typ=vt, align=4)
        b.store(b.shuffle_vector(x, x, even), fptr(b, row, b.add(base, ow)), align=4)
    return b.add(v_lo, b.mul(count, i64(vw)))


def _valid_range_rt(b, start, step, size, n_out):
    """Output positions o in [0, n_out) with 0 <= start + o*step < size, as (o_lo, o_hi)
    clamped to [0, n_out] (runtime values; start may be negative)."""
    # o >= ceil(-start / step) = -floor(start / step);  o <= floor((size - 1 - start) / step)
    def fdiv(x, d):
        q = b.sdiv(x, d)
        r = b.srem(x, d)
        return b.select(b.icmp_signed("<", r, i64(0)), b.sub(q, i64(1)), q)
    o_lo = b.sub(i64(0), fdiv(start, step))
    o_hi = b.add(fdiv(b.sub(b.sub(size, i64(1)), start), step), i64(1))
    o_lo = imin(b, imax(b, o_lo, i64(0)), n_out)
    o_hi = imax(b, imin(b, o_hi, n_out), o_lo)
    return o_lo, o_hi
