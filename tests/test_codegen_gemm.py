"""The generated SGEMM (graphc/codegen/llvm): correct on awkward shapes, leading dimensions,
thread counts, the x86-64 baseline target and the fused epilogue; the JIT wrapper and the
FMA peak loop."""
import ctypes

import llvmlite.binding as llvm
import numpy as np
import pytest

from graphc.codegen.llvm import gemm, jit, peak
from graphc.errors import GraphcError


def _host_has(*features):
    f = llvm.get_host_cpu_features()
    return all(f.get(x, False) for x in features)


# min_flops_per_thread=0: small problems too run on as many threads as asked

@pytest.fixture(scope="module")
def native():
    return gemm.Gemm("native", min_flops_per_thread=0)


@pytest.fixture(scope="module")
def baseline():
    return gemm.Gemm("generic", min_flops_per_thread=0)


@pytest.fixture(scope="module")
def avx2():
    if not _host_has("avx2", "fma"):
        pytest.skip("the host has no AVX2 + FMA")
    return gemm.Gemm("avx2", min_flops_per_thread=0)


def rel_l2(got, want):
    return np.linalg.norm(got.astype(np.float64) - want) / max(np.linalg.norm(want), 1e-300)


def view(rng, rows, cols, pad_rows=0, pad_cols=0, fill=None):
    """A rows x cols float32 view into a larger array (leading dimension cols + pad_cols)."""
    big = rng.standard_normal((rows + pad_rows, cols + pad_cols)).astype(np.float32)
    if fill is not None:
        big[:] = fill
    return big, big[pad_rows:pad_rows + rows, :cols] if rows else big[:0, :cols]


# (M, N, K): 1s, primes, tile edges on every side, more than one K / M / N cache block
SHAPES = [(1, 1, 1), (7, 13, 17), (17, 7, 13), (1, 100, 300), (100, 1, 13), (13, 17, 1),
          (33, 65, 257), (300, 40, 50), (5, 700, 30), (200, 33, 600), (3, 4100, 5),
          (64, 98, 72)]


def check(g, rng, M, N, K, threads, accumulate=False, pads=(3, 5, 7)):
    _, A = view(rng, M, K, 1, pads[0])
    _, B = view(rng, K, N, 2, pads[1])
    Cbig, C = view(rng, M, N, 1, pads[2])
    if accumulate:
        want = C.astype(np.float64) + A.astype(np.float64) @ B
    else:
        C[:] = np.nan  # every element must be written
        want = A.astype(np.float64) @ B
    Cbig[0, :] = 7.0  # row above the view and the columns right of it: never written
    Cbig[1:, N:] = 7.0
    out = g(A, B, C, accumulate=accumulate, threads=threads)
    assert out is C
    assert np.isfinite(C).all(), f"unwritten or bad elements for {(M, N, K)}"
    err = rel_l2(C, want)
    assert err <= 1e-5, f"rel L2 {err} for {(M, N, K)} threads={threads}"
    assert (Cbig[0, :] == 7.0).all() and (Cbig[1:, N:] == 7.0).all(), "wrote outside C"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_matches_numpy(native, rng, threads):
    for M, N, K in SHAPES:
        check(native, rng, M, N, K, threads)


@pytest.mark.parametrize("M,N,K", [(300, 40, 50), (5, 700, 30), (64, 64, 9)])
def test_parts_partition_c(native, rng, M, N, K):
    """Each part of the compiled entry point writes its own slice (or nothing, where the
    split's whole tiles run out before the last part), and the parts cover C."""
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    C = np.full((M, N), np.nan, np.float32)
    nparts = 3
    written = np.zeros((M, N), bool)
    busy = 0
    for part in range(nparts):
        native.function(M, N, K, A.ctypes.data, K, B.ctypes.data, N, C.ctypes.data, N, 0,
                        part, nparts, native.workspace(part))
        now = np.isfinite(C)
        busy += bool((now & ~written).any())
        written = now
    assert busy >= 2 and written.all()
    assert rel_l2(C, A.astype(np.float64) @ B) <= 1e-5


def test_last_panel_tiles(native, rng):
    """A last panel of 1-3 columns runs the column tile (vectors along the rows), of up
    to VW the one-vector tile, wider ones the full tile: each remainder, with a bottom
    edge, several K blocks, accumulating or not, on 1 and 2 threads."""
    cfg = gemm.default_config(jit.target("native"))
    assert "_ukernel_cols" in gemm.gemm_ir(cfg, name="t") or cfg.mr > cfg.vw
    for extra in (1, 2, 3, 4, cfg.vw, cfg.vw + 1):
        for threads in (1, 2):
            check(native, rng, 2 * cfg.mr + 1, cfg.nr + extra, 300, threads)
            check(native, rng, cfg.mr - 1, extra, 7, threads, accumulate=True)


def test_native_accumulate(native, rng):
    for M, N, K in [(7, 13, 17), (200, 33, 600), (5, 700, 30)]:
        for threads in (1, 2):
            check(native, rng, M, N, K, threads, accumulate=True)


def test_contiguous_and_allocated_output(native, rng):
    A = rng.standard_normal((37, 29)).astype(np.float32)
    B = rng.standard_normal((29, 51)).astype(np.float32)
    C = native(A, B, threads=2)
    assert C.shape == (37, 51) and rel_l2(C, A.astype(np.float64) @ B) <= 1e-5


def test_k_zero_and_empty(native, rng):
    A = np.zeros((5, 0), np.float32)
    B = np.zeros((0, 9), np.float32)
    C = np.full((5, 9), np.nan, np.float32)
    native(A, B, C)
    assert (C == 0).all()
    C[:] = 3.0
    native(A, B, C, accumulate=True)
    assert (C == 3.0).all()
    assert native(np.zeros((0, 4), np.float32), np.zeros((4, 6), np.float32)).shape == (0, 6)


def test_baseline_target(baseline, rng):
    """cpu="generic": SSE2 only, no FMA: no AVX/FMA instruction in the code, right results."""
    t = baseline.target
    assert t.cpu_name == "x86-64" and t.vector_bits == 128 and not t.has_fma
    asm = jit.emit_assembly(gemm.gemm_ir(baseline.config, fma=False), t)
    assert "ymm" not in asm and "zmm" not in asm and "vfmadd" not in asm and "vmov" not in asm
    for M, N, K in [(7, 13, 17), (33, 65, 257), (200, 33, 600), (5, 700, 30)]:
        for threads in (1, 2):
            check(baseline, rng, M, N, K, threads)
    check(baseline, rng, 33, 65, 257, 2, accumulate=True)


def test_avx2_target(avx2, rng):
    """The CI machines' level (AVX2 + FMA, no AVX-512): 8-wide vectors, FMA, no zmm."""
    assert avx2.target.vector_bits == 256 and avx2.target.has_fma
    for M, N, K in [(7, 13, 17), (33, 65, 257), (200, 33, 600), (5, 700, 30)]:
        check(avx2, rng, M, N, K, 2)


def test_native_code_uses_vector_fma(native):
    t = native.target
    if not t.has_fma:
        pytest.skip("the host has no FMA")
    asm = jit.emit_assembly(gemm.gemm_ir(native.config), t)
    reg = {512: "zmm", 256: "ymm"}.get(t.vector_bits, "xmm")
    assert f"vfmadd231ps\t%{reg}" in asm or "vfmadd231ps" in asm and reg in asm


@pytest.mark.parametrize("cpu", ["native", "avx2", "generic"])
@pytest.mark.parametrize("packed_a,packed_b", [(True, False), (True, True), (False, True)])
def test_prepacked_operands(rng, cpu, packed_a, packed_b):
    """A pre-packed into panels (as a compiled conv's weights), B pre-packed (as its
    im2col columns): same results on every target, with row and column splits, K
    blocks, accumulation and tile edges."""
    if cpu == "avx2" and not _host_has("avx2", "fma"):
        pytest.skip("the host has no AVX2 + FMA")
    g = gemm.Gemm(cpu, packed_a=packed_a, packed_b=packed_b, min_flops_per_thread=0)
    shapes = [(1, 1, 1), (17, 7, 13), (33, 65, 257), (300, 40, 50), (200, 33, 600),
              (64, 49, 576), (int(rng.integers(2, 90)), int(rng.integers(2, 90)),
                              int(rng.integers(2, 700)))]
    for M, N, K in shapes:
        for threads in (1, 2, 3):
            check(g, rng, M, N, K, threads)
    check(g, rng, 200, 33, 600, 2, accumulate=True)


def test_pack_b_panels_layout(rng):
    cfg = gemm.GemmConfig(vw=4, mr=3, nv=2, kc=8, mc=6, nc=8, unroll=4)
    b = rng.standard_normal((6, 11)).astype(np.float32)
    p = gemm.pack_b_panels(b, cfg).reshape(2, 8, 8)     # [panel, k, column in panel]
    for k in range(6):
        for j in range(11):
            assert p[j // 8, k, j % 8] == b[k, j]
    assert (p[1, :, 3:] == 0).all() and (p[:, 6:, :] == 0).all()


def test_pack_a_panels_layout(rng):
    cfg = gemm.GemmConfig(vw=4, mr=3, nv=1, kc=8, mc=6, nc=8, unroll=4)
    a = rng.standard_normal((5, 13)).astype(np.float32)
    # K = 13 runs as two blocks of 8 and 5 (padded to 8): each block 2 panels x 8 x 3
    assert gemm.k_block(13, cfg) == 8 and gemm.packed_depth(13, cfg) == 16
    p = gemm.pack_a_panels(a, cfg)
    assert p.shape == (2 * 16 * 3,)
    for i in range(5):
        for k in range(13):
            blk, kk = divmod(k, 8)
            assert p[blk * 8 * 6 + (i // 3) * 8 * 3 + kk * 3 + i % 3] == a[i, k]
    blocks = p.reshape(2, 2, 8, 3)         # [K block, panel, k, row in panel]
    assert (blocks[:, 1, :, 2] == 0).all() and (blocks[1, :, 5:, :] == 0).all()


def naive_bias_act(acc, bias, mode, slope):
    """Reference: acc + bias (per row or per column), then Caffe's ReLU."""
    y = acc + (bias[:, None] if mode == "row" else bias[None, :])
    return np.maximum(y, 0) + slope * np.minimum(y, 0)


@pytest.mark.parametrize("mode,slope", [("row", 0.0), ("col", 0.1)])
def test_epilogue_bias_relu(rng, mode, slope):
    g = gemm.Gemm("native", epilogue=gemm.BiasAct(bias=mode, relu=True, negative_slope=slope),
                  min_flops_per_thread=0)
    # K = 600 spans several K blocks: the epilogue must run once, after the last one
    for M, N, K in [(7, 13, 17), (200, 33, 600), (5, 70, 30)]:
        for threads in (1, 2):
            for accumulate in (False, True):
                _, A = view(rng, M, K, 0, 3)
                _, B = view(rng, K, N, 0, 1)
                _, C = view(rng, M, N, 0, 2)
                bias = rng.standard_normal(M if mode == "row" else N).astype(np.float32)
                acc = A.astype(np.float64) @ B + (C if accumulate else 0.0)
                if not accumulate:
                    C[:] = np.nan
                g(A, B, C, accumulate=accumulate, threads=threads, bias=bias)
                want = naive_bias_act(acc, bias.astype(np.float64), mode, slope)
                assert np.isfinite(C).all()
                assert rel_l2(C, want) <= 1e-5, (M, N, K, threads, accumulate)
                assert (C < 0).any() == (slope != 0.0)


def test_epilogue_on_baseline(rng):
    g = gemm.Gemm("generic", epilogue=gemm.BiasAct(bias="col", relu=True), min_flops_per_thread=0)
    A = rng.standard_normal((9, 21)).astype(np.float32)
    B = rng.standard_normal((21, 19)).astype(np.float32)
    bias = rng.standard_normal(19).astype(np.float32)
    C = g(A, B, bias=bias, threads=2)
    want = naive_bias_act(A.astype(np.float64) @ B, bias.astype(np.float64), "col", 0.0)
    assert rel_l2(C, want) <= 1e-5


def test_user_errors(native, rng):
    A = rng.standard_normal((4, 5)).astype(np.float32)
    B = rng.standard_normal((5, 6)).astype(np.float32)
    with pytest.raises(GraphcError, match="float32"):
        native(A.astype(np.float64), B)
    with pytest.raises(GraphcError, match="do not agree"):
        native(A, B[:4])
    with pytest.raises(GraphcError, match="expected"):
        native(A, B, np.zeros((4, 7), np.float32))
    with pytest.raises(GraphcError, match="column stride"):
        native(np.asfortranarray(A), B)
    with pytest.raises(GraphcError, match="needs the C"):
        native(A, B, accumulate=True)
    with pytest.raises(GraphcError, match="unknown GEMM arguments"):
        native(A, B, bias=np.zeros(4, np.float32))
    g = gemm.Gemm("native", epilogue=gemm.BiasAct(bias="row", relu=True))  # compiled above
    with pytest.raises(GraphcError, match="needs argument 'bias'"):
        g(A, B)
    with pytest.raises(GraphcError, match="length 4"):
        g(A, B, bias=np.zeros(6, np.float32))
    with pytest.raises(GraphcError, match="bias mode"):
        gemm.BiasAct(bias="channel")


def test_num_threads(monkeypatch):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "3")
    assert gemm.num_threads() == 3
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "zero")
    with pytest.raises(GraphcError, match="GRAPHC_NUM_THREADS"):
        gemm.num_threads()
    monkeypatch.delenv("GRAPHC_NUM_THREADS")
    assert gemm.num_threads() >= 1


def test_jit_wrapper():
    src = """
define i64 @add3(i64 %a) {
  %r = add i64 %a, 3
  ret i64 %r
}
"""
    mod = jit.compile_ir(src, "generic")
    f = mod.function("add3", ctypes.c_int64, ctypes.c_int64)
    del mod  # the function keeps its engine alive
    assert f(39) == 42
    obj = jit.emit_object(src)
    assert obj[:4] == b"\x7fELF"
    with pytest.raises(GraphcError, match="invalid"):
        jit.compile_ir("define i64 @f() { ret i32 0 }")
    with pytest.raises(GraphcError, match="no function"):
        jit.compile_ir(src).address("missing")


def test_peak_loop_runs():
    """The FMA loop runs acc_i <- acc_i * 1 + y for ``iters`` steps from acc_i = i, and
    stores lane 0 of the sum of the accumulators: sum_i (i + iters * y)."""
    fn, width, nacc = peak.compile_peak("native")
    buf = (ctypes.c_float * 4)(1.0, 0.5, 0.0, 0.0)
    fn(1000, ctypes.cast(buf, ctypes.POINTER(ctypes.c_float)))
    # lane 0 of the sum of all accumulators
    assert buf[2] == pytest.approx(sum(range(nacc)) + nacc * 1000 * 0.5, rel=1e-6)
