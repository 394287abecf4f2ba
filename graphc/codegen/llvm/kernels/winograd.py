"""3x3 stride-1 convolution by Winograd's minimal filtering, F(4x4, 3x3).

Each 4 x 4 block ("tile") of an output channel is computed from the 6 x 6 input patch
under it (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):

    Y[o] (tile) = AT . ( sum_c  U[o, c] * V[c] ) . AT^T,
    U[o, c] = G . w[o, c] . G^T   (6 x 6, the weights: computed once, at compile time),
    V[c]    = BT . d[c] . BT^T    (6 x 6, the input patch d of channel c),

with * elementwise.  For each of the 36 positions e of the 6 x 6 transforms the sum over
input channels is a matrix product, M[e] (O x T) = U[e] (O x C) @ V[e] (C x T) over the
T tiles, so 36 GEMMs of depth C do the work of one of depth 9C: 4x fewer multiply-adds
for a plane made of whole tiles (e.g. ResNet-50 res2, 56 x 56: 14 x 14 tiles).

A node is three steps (per chunk of images):

* input transform, parts over input channels: each plane is copied zero-padded into
  the thread's scratch; per row of tiles the vertical pass (BT on the 6 rows) runs
  along whole rows, the horizontal one on VW tiles at a time, after a shuffle that
  de-interleaves the columns of VW adjacent tiles (stride 4); V[e] (channels x tiles)
  is stored as the GEMM's packed B panels (NR tiles wide), so the GEMM packs nothing;
* the 36 GEMMs (gemm.py, the weights U pre-packed), parts over the positions e;
* output transform, parts over (image, output channel): AT on each tile's 6 x 6 from
  the 36 M[e], the 4 tile columns interleaved back into output rows, then the bias and
  the fused tail (ReLU, a residual add, ...: the convolution's epilogue program) on each
  vector before the one store.  Rows and columns past the output's edge are not stored.

The transform points are 0, +-1, +-2 (and infinity); in float32 the result differs
from the direct sum by a relative L2 of a few 1e-6 (C = 256).  The transformed weights
take 4x the room of the 3x3 ones, so large layers keep the GEMM convolution
(WEIGHT_BUDGET).
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir

from ....errors import GraphcError
from ..gemm import pack_a_panels
from ..irutil import I1, I32, fptr, i64, load_vec, loop, part_range, step_function, \
    store_vec
from .epilogue import ProgramEpilogue

#: output tile (m) and input tile (m + 2) of F(m x m, 3 x 3)
TILE, ALPHA = 4, 6
BT = np.array([[4, 0, -5, 0, 1, 0],
               [0, -4, -4, 1, 1, 0],
               [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0],
               [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 2, -2, 0],
               [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], dtype=np.float64)

#: False: every convolution keeps the GEMM lowering (for tests and comparisons; part of
#: the build cache's key, as are the limits below and GRAPHC_WINOGRAD, through settings())
ENABLED = True
#: transformed weights (36 * O * C floats) larger than this keep the GEMM convolution
WEIGHT_BUDGET = 16 << 20
#: tiles computed per output pixel at most (edge tiles past the plane are wasted work)
MAX_WASTE = 1.6
#: tiles per image at least (fewer make GEMMs too narrow to run well)
MIN_TILES = 8
#: bytes of V and M (the transforms) per chunk of images
CHUNK_BUDGET = 16 << 20
#: bytes of a chunk's transformed tiles of one channel (per-thread scratch)
SCRATCH_BUDGET = 1 << 20


def enabled() -> bool:
    """ENABLED, and not turned off by GRAPHC_WINOGRAD=0 when the net is compiled (for a
    smaller library: the transformed weights take 4x the room of the 3x3 ones)."""
    env = os.environ.get("GRAPHC_WINOGRAD", "1")
    if env not in ("0", "1"):
        raise GraphcError(f"GRAPHC_WINOGRAD={env} is not 0 or 1",
                          hint="set GRAPHC_WINOGRAD=0 to compile every convolution as a "
                               "GEMM, 1 (the default) to use Winograd where it pays, or "
                               "unset it")
    return ENABLED and env == "1"


def settings() -> list:
    """What, besides the graph and the code, decides which convolutions this lowers."""
    return [enabled(), WEIGHT_BUDGET, MAX_WASTE, MIN_TILES, CHUNK_BUDGET, SCRATCH_BUDGET]


def tiles(oh: int, ow: int) -> tuple[int, int]:
    return -(-oh // TILE), -(-ow // TILE)


def applies(geo, config) -> bool:
    """Is this convolution one Winograd's F(4x4, 3x3) does well?  3x3, stride 1, no
    dilation, no groups, a 2-D plane mostly made of whole tiles, channels enough for the
    36 products to be worth their transforms (input channels a multiple of the GEMM's
    unroll: V is written as its packed B panels), transformed weights within budget."""
    if not enabled() or geo.nsp != 2 or geo.group != 1 or tuple(geo.kernel) != (3, 3) \
            or tuple(geo.stride) != (1, 1) or tuple(geo.dilation) != (1, 1) \
            or max(geo.pad) > 2:
        return False
    oh, ow = geo.out_spatial
    th, tw = tiles(oh, ow)
    return (th * tw >= MIN_TILES and TILE * TILE * th * tw <= MAX_WASTE * oh * ow
            and geo.channels >= 16 and geo.channels % config.unroll == 0
            and geo.num_output >= 16
            and ALPHA * ALPHA * geo.channels * geo.num_output * 4 <= WEIGHT_BUDGET)


def transform_weights(w: np.ndarray) -> np.ndarray:
    """U[e, o, c] = (G . w[o, c] . G^T)[e // 6, e % 6], computed in float64."""
    u = np.einsum("ai,ocij,bj->aboc", G, np.asarray(w, np.float64), G)
    return u.reshape(ALPHA * ALPHA, w.shape[0], w.shape[1]).astype(np.float32)


# ---------------------------------------------------------------------------------------
# code


def _combine(b, coeffs, vals):
    """sum_i coeffs[i] * vals[i] for constant coefficients (zeros skipped, +-1 as adds)."""
    acc = None
    for c, v in zip(coeffs, vals):
        if c == 0:
            continue
        if abs(c) != 1:
            v = b.fmul(v, ir.Constant(v.type, [float(abs(c))] * v.type.count))
        if acc is None:
            acc = v if c > 0 else b.fneg(v)
        else:
            acc = b.fadd(acc, v, flags=("contract",)) if c > 0 else \
                b.fsub(acc, v, flags=("contract",))
    return acc


def _concat(b, vals):
    """One vector of ``vals`` side by side (all of one width, a power of two count)."""
    while len(vals) > 1:
        n = vals[0].type.count
        idx = ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n)))
        vals = [b.shuffle_vector(vals[i], vals[i + 1], idx) for i in range(0, len(vals), 2)]
    return vals[0]


def _shuffle(b, x, y, lanes):
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, len(lanes)), lanes))


def _transpose8x4(b, v):
    """For 4 vectors of 8 floats (columns x0 .. x0 + 32), the 4 vectors q[j] with lane
    t = column x0 + 4t + j: a 4 x 4 transpose within each 128-bit half after swapping
    halves (vperm2f128, then unpck*ps / unpck*pd: no lane-crossing permutes)."""
    m = [_shuffle(b, v[0], v[2], [0, 1, 2, 3, 8, 9, 10, 11]),     # v0.lo | v2.lo
         _shuffle(b, v[0], v[2], [4, 5, 6, 7, 12, 13, 14, 15]),   # v0.hi | v2.hi
         _shuffle(b, v[1], v[3], [0, 1, 2, 3, 8, 9, 10, 11]),
         _shuffle(b, v[1], v[3], [4, 5, 6, 7, 12, 13, 14, 15])]
    lo01 = _shuffle(b, m[0], m[1], [0, 8, 1, 9, 4, 12, 5, 13])
    hi01 = _shuffle(b, m[0], m[1], [2, 10, 3, 11, 6, 14, 7, 15])
    lo23 = _shuffle(b, m[2], m[3], [0, 8, 1, 9, 4, 12, 5, 13])
    hi23 = _shuffle(b, m[2], m[3], [2, 10, 3, 11, 6, 14, 7, 15])
    # lane order within a half: tiles (m0, m1, m2, m3) = (0, 1, 2, 3); halves: 4..7
    return [_shuffle(b, lo01, lo23, [0, 1, 8, 9, 4, 5, 12, 13]),
            _shuffle(b, lo01, lo23, [2, 3, 10, 11, 6, 7, 14, 15]),
            _shuffle(b, hi01, hi23, [0, 1, 8, 9, 4, 5, 12, 13]),
            _shuffle(b, hi01, hi23, [2, 3, 10, 11, 6, 7, 14, 15])]


def _deinterleave(b, loads, vw, shifted=None):
    """From 5 vectors holding columns x0 .. x0 + 5*vw, the 6 vectors q[j] (j < 6) with
    lane t = column x0 + 4t + j: the j-th column of each of vw adjacent tiles.  With 8
    lanes (AVX2) and ``shifted`` (the 4 vectors from column x0 + 4): two in-lane
    transposes instead of general permutes."""
    if vw == 8 and shifted is not None:
        return _transpose8x4(b, loads[:4]) + _transpose8x4(b, shifted)[:2]
    wide = _concat(b, loads[:4])                          # 4 vw lanes
    tail = _concat(b, [loads[4], loads[4], loads[4], loads[4]])
    out = []
    for j in range(ALPHA):
        idx = ir.Constant(ir.VectorType(I32, vw), [TILE * t + j for t in range(vw)])
        out.append(b.shuffle_vector(wide, tail, idx))
    return out


def _interleave(b, ys, vw):
    """The inverse: from ys[j] (j < 4, lane t = column 4t + j of a row of vw tiles) the 4
    vectors of that row's 4 vw consecutive columns."""
    pairs = [_concat(b, [ys[0], ys[1]]), _concat(b, [ys[2], ys[3]])]   # 2 vw lanes each
    out = []
    for v in range(TILE):
        # column x = v * vw + u of the row is column j = x % 4 of tile t = x // 4
        lanes = [(x % TILE) * vw + x // TILE for x in range(v * vw, (v + 1) * vw)]
        out.append(b.shuffle_vector(pairs[0], pairs[1],
                                    ir.Constant(ir.VectorType(I32, vw), lanes)))
    return out


def _mask(vw, n):
    return None if n >= vw else ir.Constant(ir.VectorType(I1, vw), [u < n for u in range(vw)])


def lower(k, n, geo, x_off, params, steps, tensors, out_off):
    """Steps for convolution node ``n`` (see the module docstring); ``steps``: its fused
    tail program, ``tensors``: the arena offsets of the tensors the tail reads."""
    from .conv import _arena
    vw = k.gemm_config.vw
    H, W = geo.spatial
    PH, PW = geo.pad
    OH, OW = geo.out_spatial
    N, C, O = geo.num, geo.channels, geo.num_output
    TH, TW = tiles(OH, OW)
    T = TH * TW
    nblk = -(-TW // vw)                      # blocks of vw tiles per row of tiles
    Wq = vw * (TILE * nblk + 1)              # padded plane width: covers every block's reads
    Hq = TILE * TH + 2
    plane = Hq * Wq
    E = ALPHA * ALPHA

    bias = len(params) > 1
    epi = ProgramEpilogue(steps, "row", bias)
    u = transform_weights(k.param_data(params[0]).reshape(O, C, 3, 3))
    packed = [pack_a_panels(u[e], k.gemm_config) for e in range(E)]
    u_src = k.weights_src(np.concatenate(packed), ("winograd-u", params[0], k.gemm_config))
    u_stride = packed[0].size
    b_src = k.param_src(params[1]) if bias else None

    chunk = max(1, min(N, CHUNK_BUDGET // (4 * E * (C + O) * T),
                       (SCRATCH_BUDGET // (4 * E) - 2 * k.gemm_config.nr) // T))
    # tiles per row of M: 64-byte rows, and room for the vector that reads past the last
    # tile (its lanes are not stored)
    ld = -(-(chunk * T + vw) // 16) * 16
    # V[e]: the GEMM's B (C x tiles) as its packed panels of NR tiles (gemm.pack_b_panels)
    nr = k.gemm_config.nr
    v_stride = -(-chunk * T // nr) * nr * C
    v_off = k.temp(4 * E * v_stride, "winograd_v")
    m_off = k.temp(4 * E * O * ld, "winograd_m")
    # scratch: the padded plane, the rows of the vertical pass (6 x Wq), a channel's
    # transformed tiles (E rows of sld: with room for the vector past the last tile and
    # the last panel's columns past it), and slack for the vertical pass reading past
    # the plane's end
    sld = -(-(chunk * T + vw) // nr) * nr
    k.need_scratch(4 * (plane + ALPHA * Wq + E * sld + 2 * vw))
    k.need_scratch(k.gemm_workspace_bytes())
    gemm = k.gemm(ProgramEpilogue([], "row", False), packed_a=True, packed_b=True)
    dims = (H, W, 3, 3, 1, 1, PH, PW, 1, 1, OH, OW)

    for first in range(0, N, chunk):
        imgs = min(chunk, N - first)
        _input_step(k, n, x_off, v_off, first, imgs, geo, dims, (Hq, Wq), v_stride, sld)
        # the 36 products
        fn, b, a = step_function(k.mod, k.step_name(n.name + "_wgemm"))
        up = k.ptr(b, a, u_src)
        vp, mp = k.ptr(b, a, _arena(v_off)), k.ptr(b, a, _arena(m_off))
        lo, hi = part_range(b, E, a["part"], a["nparts"])
        with loop(b, lo, hi, name="e") as e:
            b.call(gemm, [i64(O), i64(imgs * T), i64(C), fptr(b, up, b.mul(e, i64(u_stride))),
                          i64(C), fptr(b, vp, b.mul(e, i64(v_stride))), i64(nr),
                          fptr(b, mp, b.mul(e, i64(O * ld))), i64(ld), ir.Constant(I32, 0),
                          i64(0), i64(1), a["scratch"]])
        b.ret_void()
        k.add_step(fn.name, 2 * E * O * C * imgs * T, per_thread=E, max_parts=E)
        _output_step(k, n, m_off, out_off, first, imgs, geo, ld, epi, b_src, tensors)


def _input_step(k, n, x_off, v_off, first, imgs, geo, dims, hw, v_stride, sld):
    """Parts over input channels; per channel, the images' tiles go to the thread's
    scratch (row e: the tiles in order, sld floats apart; a vector of tiles past a row
    of tiles is overwritten by the next row's), then into channel c's row of each packed
    panel of V[e] with whole-vector copies (a channel's panel rows are its part's alone)."""
    from .conv import _arena, emit_phases
    vw, nr = k.gemm_config.vw, k.gemm_config.nr
    Hq, Wq = hw
    H, W = geo.spatial
    C = geo.channels
    TH, TW = tiles(*geo.out_spatial)
    T, nblk, E = TH * TW, -(-TW // vw), ALPHA * ALPHA
    fn, b, a = step_function(k.mod, k.step_name(n.name + "_win"))
    xp, vp = k.ptr(b, a, _arena(x_off)), k.ptr(b, a, _arena(v_off))
    pp = a["scratch"]                                  # the padded plane
    rp = fptr(b, pp, Hq * Wq)                          # the vertical pass: ALPHA rows of Wq
    sp = fptr(b, rp, ALPHA * Wq)                       # the channel's tiles: E rows of sld
    lo, hi = part_range(b, C, a["part"], a["nparts"])
    with loop(b, lo, hi, name="c") as c:
        with loop(b, 0, imgs, name="img") as img:
            plane = b.add(b.mul(b.add(img, i64(first)), i64(C)), c)
            emit_phases(b, fptr(b, xp, b.mul(plane, i64(H * W))), pp, dims, (Hq, Wq, [(0, 0)]))
            with loop(b, 0, TH, name="ty") as ty:
                src = fptr(b, pp, b.mul(ty, i64(TILE * Wq)))
                with loop(b, 0, Wq, vw, name="x") as x:
                    rows = [load_vec(b, src, b.add(x, i64(i * Wq)), vw) for i in range(ALPHA)]
                    for r in range(ALPHA):
                        store_vec(b, _combine(b, BT[r], rows), rp, b.add(x, i64(r * Wq)))
                dst = fptr(b, sp, b.add(b.mul(img, i64(T)), b.mul(ty, i64(TW))))
                for blk in range(nblk):
                    for r in range(ALPHA):
                        x0 = r * Wq + TILE * vw * blk
                        loads = [load_vec(b, rp, x0 + v * vw, vw) for v in range(5)]
                        shifted = [load_vec(b, rp, x0 + TILE + v * vw, vw) for v in range(4)]
                        q = _deinterleave(b, loads, vw, shifted)
                        for s in range(ALPHA):
                            store_vec(b, _combine(b, BT[s], q), dst,
                                      (r * ALPHA + s) * sld + blk * vw)
        # panel q of V[e]: columns q*nr.. at q * C * nr, channel c's row at c * nr in it
        with loop(b, 0, -(-imgs * T // nr), name="q") as q:
            src = fptr(b, sp, b.mul(q, i64(nr)))
            dst = fptr(b, vp, b.add(b.mul(q, i64(C * nr)), b.mul(c, i64(nr))))
            for e in range(E):
                for v in range(0, nr, vw):
                    store_vec(b, load_vec(b, src, e * sld + v, vw), dst, e * v_stride + v)
    b.ret_void()
    k.add_step(fn.name, imgs * C * (Hq * Wq + T * E * 8))


def _output_step(k, n, m_off, out_off, first, imgs, geo, ld, epi, b_src, tensors):
    from .conv import _arena
    vw = k.gemm_config.vw
    OH, OW = geo.out_spatial
    O = geo.num_output
    P = OH * OW
    TH, TW = tiles(OH, OW)
    T, nblk, E = TH * TW, -(-TW // vw), ALPHA * ALPHA
    fn, b, a = step_function(k.mod, k.step_name(n.name + "_wout"))
    mp, yp = k.ptr(b, a, _arena(m_off)), k.ptr(b, a, _arena(out_off))
    bp = k.ptr(b, a, b_src) if b_src else None
    chp = [k.ptr(b, a, c.src) for c in epi.chans]
    tp = {j: k.ptr(b, a, _arena(tensors[j])) for j in epi.tensors}
    lo, hi = part_range(b, imgs * O, a["part"], a["nparts"])
    with loop(b, lo, hi, name="plane") as item:
        img, o = b.udiv(item, i64(O)), b.urem(item, i64(O))
        ybase = b.mul(b.add(item, i64(first * O)), i64(P))     # the output plane
        args = {}
        if bp is not None:
            args["bias"] = bp
        for i, p in enumerate(chp):
            args[f"ch{i}"] = p
        img_off = b.mul(b.add(img, i64(first)), i64(O * P))
        for j in epi.tensors:
            args[f"t{j}"] = fptr(b, tp[j], img_off)
        if epi.tensors:
            args["ldt"] = i64(P)
        yplane = fptr(b, yp, ybase)
        mrow = fptr(b, mp, b.add(b.mul(o, i64(ld)), b.mul(img, i64(T))))
        with loop(b, 0, TH, name="ty") as ty:
            trow = fptr(b, mrow, b.mul(ty, i64(TW)))
            for blk in range(nblk):
                ms = [load_vec(b, trow, e * O * ld + blk * vw, vw) for e in range(E)]
                for i in range(TILE):
                    oy = b.add(b.mul(ty, i64(TILE)), i64(i))
                    with b.if_then(b.icmp_signed("<", oy, i64(OH)), likely=True):
                        z = [_combine(b, AT[i], [ms[r * ALPHA + s] for r in range(ALPHA)])
                             for s in range(ALPHA)]
                        ys = [_combine(b, AT[j], z) for j in range(TILE)]
                        for v, val in enumerate(_interleave(b, ys, vw)):
                            x0 = TILE * vw * blk + v * vw
                            if x0 >= OW:
                                continue
                            mask = _mask(vw, OW - x0)
                            col = b.add(b.mul(oy, i64(OW)), i64(x0))
                            val = epi.vector(b, val, o, col, args, mask)
                            store_vec(b, val, yplane, col, mask)
    b.ret_void()
    k.add_step(fn.name, imgs * O * T * E * 6)
