"""CUDA kernels checked on the CPU: the emulator (graphc/codegen/cuda/emulate.py + .h)
on kernels written here against numpy, the faults a GPU would report, and whole
programs from the CUDA code generator against the reference executor."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from graphc.codegen.cuda.emulate import compile_module, run_program
from graphc.codegen.cuda.program import Arg, CudaProgram, Launch
from graphc.codegen.llvm.lower import NodeInfo, TensorInfo
from graphc.errors import GraphcError
from graphc.runtime.testing import rel_l2

if shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("the CUDA emulator needs a C++20 compiler (g++, or set CXX)",
                allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def emu_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CACHE", str(tmp_path_factory.mktemp("graphc-cache")))
    yield
    mp.undo()


KERNELS = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
using namespace nvcuda;

extern "C" __global__ void vadd(const float *__restrict__ a, const float *__restrict__ b,
                                float *__restrict__ c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}

// one partial sum per block: a tree in shared memory, 2D blocks
extern "C" __global__ void block_sum(const float *x, float *out, int n) {
    __shared__ float s[16][16];
    int t = threadIdx.y * blockDim.x + threadIdx.x;
    int i = blockIdx.x * 256 + t;
    (&s[0][0])[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int k = 128; k > 0; k >>= 1) {
        if (t < k) (&s[0][0])[t] += (&s[0][0])[t + k];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0][0];
}

// per-warp max by __shfl_xor_sync, sum by __shfl_down_sync, count of positives by ballot
extern "C" __global__ void warp_reduce(const float *x, float *wmax, float *wsum, int *npos,
                                       int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int warp = i / 32;
    float v = i < n ? x[i] : __int_as_float(0xff800000);   // -inf
    float m = v;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = i < n ? x[i] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    unsigned b = __ballot_sync(0xffffffffu, i < n && x[i] > 0.0f);
    float first = __shfl_sync(0xffffffffu, v, 0);
    if ((threadIdx.x & 31) == 0) {
        wmax[warp] = m;
        wsum[warp] = s;
        npos[warp] = __popc(b);
    } else if ((threadIdx.x & 31) == 5) {
        // every lane holds lane 0's value after the broadcast
        if (first != m && first > m) npos[warp] = -1;
    }
}

extern "C" __global__ void atomics(const float *x, const int *bin, float *sums, int *maxv,
                                   unsigned *count, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicAdd(&sums[bin[i]], x[i]);
    atomicMax(&maxv[bin[i]], __float2int_rn(x[i] * 1000.0f));
    atomicAdd(count, 1u);
}

// C[M,N] = A[M,K] B[K,N], one 16x16 tile per warp, 2 x 2 warps per block
#define WMMA_GEMM(NAME, T, K_STEP, PREC, CONVERT)                                      \
extern "C" __global__ void NAME(const T *A, const T *B, float *C, int M, int N, int K) { \
    int warp = threadIdx.x / 32;                                                         \
    int tm = (blockIdx.y * 2 + warp / 2) * 16, tn = (blockIdx.x * 2 + warp % 2) * 16;    \
    if (tm >= M || tn >= N) return;                                                      \
    wmma::fragment<wmma::matrix_a, 16, 16, K_STEP, PREC, wmma::row_major> a;             \
    wmma::fragment<wmma::matrix_b, 16, 16, K_STEP, PREC, wmma::col_major> b;             \
    wmma::fragment<wmma::accumulator, 16, 16, K_STEP, float> c;                          \
    wmma::fill_fragment(c, 0.0f);                                                        \
    for (int k = 0; k < K; k += K_STEP) {                                                \
        wmma::load_matrix_sync(a, A + tm * K + k, K);                                    \
        wmma::load_matrix_sync(b, B + tn * K + k, K);                                    \
        CONVERT                                                                          \
        wmma::mma_sync(c, a, b, c);                                                      \
    }                                                                                    \
    wmma::store_matrix_sync(C + tm * N + tn, c, N, wmma::mem_row_major);                 \
}
#define TO_TF32                                                                          \
    for (int e = 0; e < a.num_elements; e++) a.x[e] = wmma::__float_to_tf32(a.x[e]);    \
    for (int e = 0; e < b.num_elements; e++) b.x[e] = wmma::__float_to_tf32(b.x[e]);
WMMA_GEMM(gemm_tf32, float, 8, wmma::precision::tf32, TO_TF32)
WMMA_GEMM(gemm_f16, __half, 16, __half, )
WMMA_GEMM(gemm_bf16, __nv_bfloat16, 16, __nv_bfloat16, )

extern "C" __global__ void convert(const float *x, unsigned short *h, unsigned short *bf,
                                   float *tf, float *back, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    __half hv = __float2half_rn(x[i]);
    __nv_bfloat16 bv = __float2bfloat16(x[i]);
    h[i] = __half_as_ushort(hv);
    bf[i] = __bfloat16_as_ushort(bv);
    tf[i] = wmma::__float_to_tf32(x[i]);
    back[i] = __half2float(hv);
}

// y = alpha * x + b[c], over n elements of C channels of `inner` each, dynamic smem for b
extern "C" __global__ void scale_bias(const float *x, const float *b, float *y, float alpha,
                                      long long n, int C, int inner) {
    extern __shared__ __align__(16) float sb[];
    for (int c = threadIdx.x; c < C; c += blockDim.x) sb[c] = b[c];
    __syncthreads();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = alpha * x[i] + sb[(i / inner) % C];
}
"""

FAULTS = r"""
extern "C" __global__ void shared_index(float *out) {
    __shared__ float s[32];
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}
extern "C" __global__ void divergent_barrier(float *out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void barrier_deadlock(float *out) {
    if (threadIdx.x == 0) {
        while (true) __syncwarp();
    }
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void shfl_exited(float *out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, float(threadIdx.x), threadIdx.x ^ 20);
}
extern "C" __global__ void shfl_partial_warp(float *out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}
extern "C" __global__ void shfl_mask_mismatch(float *out) {
    out[threadIdx.x] = threadIdx.x < 16 ? __shfl_sync(0xffffffffu, 1.0f, 0)
                                        : __shfl_sync(0xffff0000u, 2.0f, 16);
}
extern "C" __global__ void misaligned(float *out) {
    *reinterpret_cast<float4 *>(out + 1) = make_float4(1.0f, 2.0f, 3.0f, 4.0f);
}
extern "C" __global__ void missing_sync(float *out) {
    __shared__ float s[64];
    s[threadIdx.x] = float(threadIdx.x);
    out[blockIdx.x * 64 + threadIdx.x] = s[(threadIdx.x + 1) % 64];
}
extern "C" __global__ void dyn_overrun(float *out, int n) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = buf[n - 1 - threadIdx.x];
}
extern "C" __global__ void trap(float *out) {
    if (threadIdx.x == 3) __trap();
    out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void wmma_unaligned(const float *A, float *C) {
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> c;
    wmma::load_matrix_sync(c, A + 4, 16, wmma::mem_row_major);
    wmma::store_matrix_sync(C, c, 16, wmma::mem_row_major);
}
"""

KERNEL_NAMES = ["vadd", "block_sum", "warp_reduce", "atomics", "gemm_tf32", "gemm_f16",
                "gemm_bf16", "convert", "scale_bias"]
FAULT_NAMES = ["shared_index", "divergent_barrier", "barrier_deadlock", "shfl_exited",
               "shfl_partial_warp", "shfl_mask_mismatch", "misaligned", "missing_sync", "dyn_overrun", "trap",
               "wmma_unaligned"]


@pytest.fixture(scope="module")
def kernels():
    return compile_module(KERNELS, KERNEL_NAMES)


@pytest.fixture(scope="module")
def faults():
    src = "#include <mma.h>\nusing namespace nvcuda;\n" + FAULTS
    return compile_module(src, FAULT_NAMES)


def dev(a: np.ndarray) -> np.ndarray:
    """A 256-byte aligned copy of ``a`` (as cudaMalloc gives)."""
    a = np.ascontiguousarray(a)
    raw = np.empty(a.nbytes + 256, np.uint8)
    off = (-raw.ctypes.data) % 256
    out = raw[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def poisoned(shape, dtype=np.float32) -> np.ndarray:
    d = np.dtype(dtype)
    return dev(np.full(shape, np.nan if d.kind == "f" else np.iinfo(d).max // 3, d))


def P(a: np.ndarray):
    return ("p", a.ctypes.data)


def test_test_kernels_are_cuda():
    """What the emulator runs here NVRTC compiles too (so the emulator is not tested on
    C++ that only looks like CUDA)."""
    from graphc.codegen.cuda import nvrtc
    if not nvrtc.nvrtc_available():
        pytest.skip("NVRTC (cuda-bindings, nvidia-cuda-nvrtc) is not installed")
    for src in (KERNELS, "#include <mma.h>\nusing namespace nvcuda;\n" + FAULTS, HAND):
        module = nvrtc.compile_module(src, "sm_90")
        assert len(module.cubin) > 0


# ---------------------------------------------------------------------------------------
# the emulator on kernels written here


@pytest.mark.parametrize("workers", [1, 3])
def test_vector_add(kernels, rng, workers):
    n = int(rng.integers(300, 3000))
    a, b = dev(rng.standard_normal(n).astype(np.float32)), dev(rng.standard_normal(n).astype(np.float32))
    c = poisoned(n)
    kernels.launch("vadd", ((n + 127) // 128,), (128,), 0, [P(a), P(b), P(c), ("i", n)],
                   workers=workers)
    np.testing.assert_array_equal(c, a + b)


def test_shared_memory_block_reduction(kernels, rng):
    n = int(rng.integers(1000, 5000))
    x = dev(rng.standard_normal(n).astype(np.float32))
    nb = (n + 255) // 256
    out = poisoned(nb)
    kernels.launch("block_sum", (nb,), (16, 16), 0, [P(x), P(out), ("i", n)])
    want = np.pad(x.astype(np.float64), (0, nb * 256 - n)).reshape(nb, 256).sum(1)
    assert rel_l2(out, want) < 1e-6


def test_warp_shuffle_and_ballot(kernels, rng):
    n = int(rng.integers(200, 2000))
    x = dev(rng.standard_normal(n).astype(np.float32))
    nw = (n + 31) // 32
    wmax, wsum, npos = poisoned(nw), poisoned(nw), poisoned(nw, np.int32)
    kernels.launch("warp_reduce", ((n + 127) // 128,), (128,), 0,
                   [P(x), P(wmax), P(wsum), P(npos), ("i", n)])
    xp = np.pad(x.astype(np.float64), (0, nw * 32 - n), constant_values=np.nan).reshape(nw, 32)
    np.testing.assert_array_equal(wmax, np.nanmax(xp, 1).astype(np.float32))
    assert rel_l2(wsum, np.nansum(xp, 1)) < 1e-6
    np.testing.assert_array_equal(npos, (xp > 0).sum(1))


@pytest.mark.parametrize("workers", [1, 4])
def test_atomics(kernels, rng, workers):
    n, bins = int(rng.integers(2000, 6000)), 7
    x = dev(rng.standard_normal(n).astype(np.float32))
    b = dev(rng.integers(0, bins, n).astype(np.int32))
    sums, maxv, count = dev(np.zeros(bins, np.float32)), dev(np.full(bins, -10**9, np.int32)), \
        dev(np.zeros(1, np.uint32))
    kernels.launch("atomics", ((n + 63) // 64,), (64,), 0,
                   [P(x), P(b), P(sums), P(maxv), P(count), ("i", n)], workers=workers)
    assert rel_l2(sums, np.bincount(b, x.astype(np.float64), bins)) < 1e-5
    want = [np.rint(x[b == k].astype(np.float64) * 1000).max() for k in range(bins)]
    np.testing.assert_array_equal(maxv, want)
    assert count[0] == n


def _tf32(a):
    """cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits."""
    u = a.astype(np.float32).view(np.uint32)
    r = ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(np.isfinite(a), r, a)


def _bf16(a):
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("prec,tol", [("tf32", 1e-6), ("f16", 1e-6), ("bf16", 1e-6)])
def test_wmma_gemm(kernels, rng, prec, tol):
    M, N = 16 * int(rng.integers(1, 5)), 16 * int(rng.integers(1, 5))
    K = 16 * int(rng.integers(1, 4))
    a = rng.standard_normal((M, K)).astype(np.float32)
    bt = rng.standard_normal((N, K)).astype(np.float32)        # B col-major = B^T row-major
    if prec == "tf32":
        A, B = dev(a), dev(bt)
        ra, rb = _tf32(a), _tf32(bt)
    elif prec == "f16":
        A, B = dev(a.astype(np.float16)), dev(bt.astype(np.float16))
        ra, rb = A.astype(np.float32), B.astype(np.float32)
    else:
        A, B = dev(_bf16(a)), dev(_bf16(bt))
        ra = (A.astype(np.uint32) << 16).view(np.float32)
        rb = (B.astype(np.uint32) << 16).view(np.float32)
    C = poisoned((M, N))
    kernels.launch(f"gemm_{prec}", ((N + 31) // 32, (M + 31) // 32), (128,), 0,
                   [P(A), P(B), P(C), ("i", M), ("i", N), ("i", K)])
    want = ra.astype(np.float64) @ rb.astype(np.float64).T
    assert rel_l2(C, want) < tol
    # and the rounding matters: against unrounded fp32 inputs the error is the format's
    if prec != "tf32":
        assert rel_l2(C, a.astype(np.float64) @ bt.astype(np.float64).T) > 1e-5


def test_conversions_round_like_the_hardware(kernels, rng):
    x = np.concatenate([
        rng.standard_normal(20000) * 1e-5, rng.standard_normal(20000) * 3e4,
        rng.standard_normal(20000),
        [65504, 65519.99, 65520, 7e4, 6e-8, 3e-8, 2.98e-8, 1e-9, np.inf, -np.inf, 0.0, -0.0,
         1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20]]).astype(np.float32)
    # exact ties of the tf32 and bf16 roundings
    ties = (rng.integers(1, 2**10, 2000).astype(np.uint32) << 13 | 0x1000) | (127 << 23)
    x = dev(np.concatenate([x, ties.view(np.float32), (ties | 0x80000000).view(np.float32)]))
    n = x.size
    h, bf = poisoned(n, np.uint16), poisoned(n, np.uint16)
    tf, back = poisoned(n), poisoned(n)
    kernels.launch("convert", ((n + 255) // 256,), (256,), 0,
                   [P(x), P(h), P(bf), P(tf), P(back), ("i", n)])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(h, x.astype(np.float16).view(np.uint16))
        np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(bf, _bf16(x))
    np.testing.assert_array_equal(tf.view(np.uint32), _tf32(x).view(np.uint32))


def test_scalar_arguments_and_dynamic_shared_memory(kernels, rng):
    C, inner, batch = int(rng.integers(2, 40)), int(rng.integers(1, 50)), 2
    n = batch * C * inner
    x = dev(rng.standard_normal(n).astype(np.float32))
    b = dev(rng.standard_normal(C).astype(np.float32))
    y = poisoned(n)
    alpha = float(rng.uniform(0.5, 2.0))
    kernels.launch("scale_bias", ((n + 63) // 64,), (64,), C * 4,
                   [P(x), P(b), P(y), ("f", alpha), ("l", n), ("i", C), ("i", inner)])
    want = np.float32(alpha) * x.reshape(batch, C, inner) + b[None, :, None]
    assert rel_l2(y.reshape(batch, C, inner), want) < 1e-6


@pytest.mark.parametrize("kernel,block,smem,extra,message", [
    ("shared_index", 64, 0, [], "shared_index:3: index 32 is out of the bounds of an array of "
                                "type 'float [32]'"),
    ("divergent_barrier", 32, 0, [], "divergent_barrier:5: __syncthreads while thread 0 of the "
                                     "block waits at the __syncthreads of line 3 (a barrier in "
                                     "divergent code)"),
    ("barrier_deadlock", 64, 0, [], "deadlock"),
    ("shfl_mask_mismatch", 32, 0, [], "thread (16,0,0): __shfl_sync with mask 0xffff0000 "
                                      "while lane 0 waits in one with mask 0xffffffff"),
    ("misaligned", 1, 0, [], "misaligned:2: misaligned access of 'struct float4'"),
    ("dyn_overrun", 64, 128, [("i", 64)], "wrote past the 128 bytes of dynamic shared memory"),
    ("trap", 32, 0, [], "thread (3,0,0): __trap()"),
    ("wmma_unaligned", 32, 0, [], "not 256-bit aligned"),
])
def test_faults_a_gpu_reports(faults, kernel, block, smem, extra, message):
    out = poisoned(256)
    args = [P(out)] if kernel != "wmma_unaligned" else [P(dev(np.ones(512, np.float32))), P(out)]
    with pytest.raises(GraphcError, match="kernel '" + kernel) as e:
        faults.launch(kernel, (1,), (block,), smem, args + extra)
    assert message in str(e.value)


def test_lanes_that_exited_or_do_not_exist_take_no_part(faults):
    # CUDA: the non-exited lanes named in the mask must all call; a shuffle reading an
    # exited lane gets an undefined value (the poison here)
    out = dev(np.zeros(64, np.float32))
    faults.launch("shfl_exited", (1,), (32,), 0, [P(out)])
    assert np.isnan(out[:16]).all() and (out[16:] == 0).all()
    # a partial last warp: lanes 32..47 exchange among themselves
    faults.launch("shfl_partial_warp", (1,), (48,), 0, [P(out)])
    np.testing.assert_array_equal(out[:48], np.arange(48) ^ 1)


def test_missing_syncthreads_reads_poison(faults):
    # threads run one after another until they wait (block 0 first to last, block 1 last
    # to first): a read of a slot another thread has not written yet finds the poison
    # (shared memory starts NaN in every block)
    out = poisoned((2, 64))
    faults.launch("missing_sync", (2,), (64,), 0, [P(out)])
    assert np.isnan(out[0, :63]).all() and out[0, 63] == 0.0     # thread 63 reads slot 0
    # block 1: thread 63 runs first, before slot 0 is written; the others read written slots
    assert np.isnan(out[1, 63]) and not np.isnan(out[1, :63]).any()


# ---------------------------------------------------------------------------------------
# run_program: a hand-made program (two layers) through the arena


def _program(source, launches, arena_bytes, weights, inputs, outputs, nodes):
    return CudaProgram(name="hand", arch="sm_90", precision="fp32", source=source, cubin=b"",
                       launches=launches, nodes=nodes, inputs=inputs, outputs=outputs,
                       arena_bytes=arena_bytes, weights=weights)


HAND = r"""
extern "C" __global__ void affine(const float *x, const float *w, float *y, int n, float s) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = s * x[i] * w[i % 8] + w[8];
}
extern "C" __global__ void relu_off_by_one(const float *x, float *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = fmaxf(x[i], 0.0f);
}
extern "C" __global__ void relu_half(const float *x, float *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n / 2) y[i] = fmaxf(x[i], 0.0f);
}
extern "C" __global__ void scribble(float *w) { w[threadIdx.x] = 0.0f; }
extern "C" __global__ void read_before(const float *x, float *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i - 300000];
}
"""


def _hand(rng, second="relu_half", n=None, second_args=None):
    n = n or int(rng.integers(40, 400))
    nodes = [NodeInfo("scale", "Scale", n), NodeInfo("relu", "ReLU", n)]
    x_off, h_off, y_off = 0, 4 * n, 8 * n
    w = rng.standard_normal(9).astype(np.float32)
    s = float(rng.uniform(0.5, 2))
    launches = [
        Launch("affine", ((n + 31) // 32, 1, 1), (32, 1, 1), 0,
               [Arg("arena", x_off), Arg("weights", 0), Arg("arena", h_off), Arg("i32", n),
                Arg("f32", s)], 0),
        Launch(second, ((n + 31) // 32, 1, 1), (32, 1, 1), 0,
               second_args or [Arg("arena", h_off), Arg("arena", y_off), Arg("i32", n)], 1),
    ]
    prog = _program(HAND, launches, 12 * n, w.tobytes(),
                    [TensorInfo("data", "%data", (n,), x_off)],
                    [TensorInfo("out", "%out", (n,), y_off)], nodes)
    x = rng.standard_normal(n).astype(np.float32)
    want = np.maximum(np.float32(s) * x * np.resize(w[:8], n) + w[8], 0)
    return prog, x, want


def test_run_program_unwritten_output(rng):
    prog, x, _ = _hand(rng)
    with pytest.raises(GraphcError, match="output 'out' were never written"):
        run_program(prog, {"data": x})


@pytest.mark.parametrize("n,message", [
    # the output ends the arena: one element past it is poisoned slack (caught after the
    # launch) or, when the arena ends on 256 bytes, an inaccessible page (a fault)
    (60, r"wrote out of bounds, after the arena \(byte 720 of 720\)"),
    (64, r"kernel 'relu_off_by_one' grid \(3, 1, 1\) block \(32, 1, 1\): block \(2,0,0\) "
         r"thread \(0,0,0\): invalid memory access at address 0x[0-9a-f]+ \(0 bytes past the "
         r"end of the 768-byte arena\)"),
])
def test_run_program_out_of_bounds_names_the_layer(rng, n, message):
    prog, x, _ = _hand(rng, "relu_off_by_one", n=n)
    prog.launches[1].grid = (3, 1, 1)
    with pytest.raises(GraphcError, match=r"layer 'relu' \(ReLU\): launch 1.*" + message):
        run_program(prog, {"data": x})


def test_run_program_wild_read(rng):
    prog, x, _ = _hand(rng, "read_before")
    prog.launches[1].grid = (1, 1, 1)       # one block: thread 0 is the first to fault
    with pytest.raises(GraphcError, match=r"layer 'relu'.*block \(0,0,0\) thread \(0,0,0\): "
                                          r"invalid memory access at address 0x[0-9a-f]+ "
                                          r"\(\d+ bytes before the arena\)"):
        run_program(prog, {"data": x})


def test_run_program_writes_to_weights_and_bad_arguments(rng):
    prog, x, _ = _hand(rng, "scribble", second_args=[Arg("weights", 0)])
    prog.launches[1].grid, prog.launches[1].block = (1, 1, 1), (4, 1, 1)
    with pytest.raises(GraphcError, match=r"layer 'relu'.*thread \(0,0,0\): invalid memory access "
                                          r"at address 0x[0-9a-f]+ \(byte 0 of the weights, "
                                          r"which kernels must not write\)"):
        run_program(prog, {"data": x})
    prog, x, _ = _hand(rng, "relu_half", second_args=[Arg("arena", 0), Arg("f32", 1.0),
                                                      Arg("i32", 3)])
    with pytest.raises(GraphcError, match="argument 1 is f32 .a float.; the kernel's parameter 1 "
                                          "is a pointer"):
        run_program(prog, {"data": x})
    prog, x, _ = _hand(rng, "relu_half", second_args=[Arg("arena", 0), Arg("arena", 6),
                                                      Arg("i32", 3)])
    with pytest.raises(GraphcError, match="argument 1: arena offset 6 is not a multiple of 4"):
        run_program(prog, {"data": x})


def test_run_program_good(rng):
    prog, x, want = _hand(rng, "relu_off_by_one")
    prog.launches[1].args[2] = Arg("i32", len(x) - 1)      # i <= n-1: exactly the n elements
    got = run_program(prog, {"data": x})
    assert list(got) == ["out"]
    assert rel_l2(got["out"], want) < 1e-6


# ---------------------------------------------------------------------------------------
# whole programs from the CUDA code generator against the reference executor

#: rel L2 error allowed per precision (fp32 storage with tf32 products; exact fp32;
#: half / bfloat16 storage with fp32 accumulation)
TOL = {"tf32": 1e-2, "fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
PRECISIONS = list(TOL)


def lower_for_emulation(g, precision: str) -> CudaProgram:
    """The optimized graph's CudaProgram (source and launches; NVRTC's compile of the
    same source is the code generator's tests' business), or a skip when this build has
    no CUDA code generator."""
    try:
        from graphc.codegen.cuda.lower import lower_graph
    except ImportError as e:
        pytest.skip(f"the CUDA code generator is not in this build ({e})")
    from graphc.passes import run_pipeline
    return lower_graph(run_pipeline(g), "sm_90", precision, compile=False)


def check_emulated(net, feeds: dict, precision: str) -> dict:
    """Every output of the emulated program against the reference, within the precision's
    tolerance; outputs unwritten by any kernel fail in run_program (the arena starts NaN)."""
    want = net.forward(**feeds)
    prog = lower_for_emulation(net.graph, precision)
    got = run_program(prog, feeds)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    errors = {}
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape, (k, g.shape, w.shape)
        assert np.isfinite(g).all(), f"{k}: {int((~np.isfinite(g)).sum())} values not finite"
        if not np.any(w):       # e.g. a ReLU of a small, all-negative blob: exactly zero too
            errors[k] = float(np.abs(g).max())
            continue
        errors[k] = rel_l2(g, w)
    bad = {k: e for k, e in errors.items() if not e <= TOL[precision]}
    assert not bad, f"{precision}: rel L2 above {TOL[precision]}: {bad} (all: {errors})"
    return got


def _inputs_layer(shapes: dict) -> str:
    tops = "".join(f' top: "{k}"' for k in shapes)
    dims = "".join("shape {" + "".join(f" dim: {d}" for d in s) + " } " for s in shapes.values())
    return f'layer {{ name: "in" type: "Input"{tops} input_param {{ {dims}}} }}\n'


def _layer(name, type_, bottoms, top, params=""):
    b = "".join(f' bottom: "{x}"' for x in bottoms)
    return f'layer {{ name: "{name}" type: "{type_}"{b} top: "{top}" {params} }}\n'


def layer_zoo(rng) -> tuple[str, dict]:
    """One net of independent small branches, one (or a fused few) layers each, with
    random shapes and attributes: every op family the code generator compiles."""
    shapes, text = {}, []
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))    # noqa: E731

    def inp(name, shape):
        shapes[name] = tuple(shape)
        return name

    # convolutions: general (stride, pad, dilation, bias, fused ReLU), grouped, depthwise, 1x1
    for i, kind in enumerate(["general", "group", "depthwise", "1x1"]):
        g = {"general": 1, "group": r(2, 3), "depthwise": r(3, 6), "1x1": 1}[kind]
        cg, og = (1, 1) if kind == "depthwise" else (r(1, 5), r(2, 8))
        k = 1 if kind == "1x1" else r(2, 3) if kind != "depthwise" else 3
        s = 1 if kind == "1x1" else r(1, 2)
        p = 0 if kind == "1x1" else r(0, 1)
        d = r(1, 2) if kind == "general" else 1
        x = inp(f"conv{i}_in", (r(1, 2), g * cg, r(d * (k - 1) + 2, 11), r(d * (k - 1) + 2, 11)))
        text.append(_layer(f"conv{i}", "Convolution", [x], f"conv{i}",
                           f"convolution_param {{ num_output: {g * og} kernel_size: {k} "
                           f"stride: {s} pad: {p} dilation: {d} group: {g} "
                           f"bias_term: {'true' if i != 3 else 'false'} }}"))
        if kind in ("general", "1x1"):
            text.append(_layer(f"conv{i}_relu", "ReLU", [f"conv{i}"], f"conv{i}"))
    # a convolution of several tiles in each GEMM dimension, a leaky ReLU fused
    x = inp("big_in", (2, r(20, 40), r(10, 16), r(10, 16)))
    text.append(_layer("big", "Convolution", [x], "big",
                       f"convolution_param {{ num_output: {r(40, 90)} kernel_size: 3 pad: 1 }}"))
    text.append(_layer("big_relu", "ReLU", ["big"], "big", "relu_param { negative_slope: 0.1 }"))
    # deconvolution
    x = inp("dec_in", (r(1, 2), r(2, 8), r(3, 8), r(3, 8)))
    text.append(_layer("dec", "Deconvolution", [x], "dec",
                       f"convolution_param {{ num_output: {r(2, 10)} kernel_size: {r(2, 4)} "
                       f"stride: {r(1, 2)} pad: {r(0, 1)} }}"))
    # pooling: MAX / AVE with padding and CEIL rounding, global
    for i, (pool, k, s, p) in enumerate([("MAX", 3, 2, 1), ("AVE", 3, 2, 1), ("MAX", 2, 2, 0)]):
        x = inp(f"pool{i}_in", (r(1, 2), r(1, 5), r(k, 12), r(k, 12)))
        text.append(_layer(f"pool{i}", "Pooling", [x], f"pool{i}",
                           f"pooling_param {{ pool: {pool} kernel_size: {k} stride: {s} "
                           f"pad: {p} }}"))
    x = inp("gpool_in", (2, r(1, 6), r(2, 7), r(2, 7)))
    text.append(_layer("gpool", "Pooling", [x], "gpool",
                       "pooling_param { pool: AVE global_pooling: true }"))
    # LRN, both regions
    for i, region in enumerate(["ACROSS_CHANNELS", "WITHIN_CHANNEL"]):
        x = inp(f"lrn{i}_in", (r(1, 2), r(3, 8), r(3, 9), r(3, 9)))
        text.append(_layer(f"lrn{i}", "LRN", [x], f"lrn{i}",
                           f"lrn_param {{ local_size: {3 + 2 * i} alpha: 0.3 beta: 0.75 k: 1.5 "
                           f"norm_region: {region} }}"))
    # softmax over channels of a 4D blob and over the last axis of a 2D one
    x = inp("sm0_in", (2, r(2, 10), r(1, 4), r(1, 4)))
    text.append(_layer("sm0", "Softmax", [x], "sm0"))
    x = inp("sm1_in", (r(1, 3), r(5, 300)))
    text.append(_layer("sm1", "Softmax", [x], "sm1"))
    # inner product (+ ReLU), a residual InnerProduct + Eltwise SUM + ReLU
    x = inp("ipb_in", (r(1, 40), r(100, 700)))
    text.append(_layer("ipb", "InnerProduct", [x], "ipb",
                       f"inner_product_param {{ num_output: {r(30, 200)} }}"))
    x = inp("ip_in", (r(1, 9), r(3, 7), r(1, 4), r(1, 4)))
    text.append(_layer("ip", "InnerProduct", [x], "ip",
                       f"inner_product_param {{ num_output: {r(1, 40)} }}"))
    text.append(_layer("ip_relu", "ReLU", ["ip"], "ip"))
    x = inp("res_in", (r(1, 4), r(10, 60)))
    n = r(5, 30)
    text.append(_layer("res_a", "InnerProduct", [x], "res_a", f"inner_product_param {{ num_output: {n} }}"))
    text.append(_layer("res_b", "InnerProduct", [x], "res_b", f"inner_product_param {{ num_output: {n} }}"))
    text.append(_layer("res", "Eltwise", ["res_a", "res_b"], "res"))
    text.append(_layer("res_relu", "ReLU", ["res"], "res"))
    # eltwise SUM with coefficients, PROD, MAX; concat along channels
    sh = (r(1, 2), r(1, 6), r(1, 7), r(1, 7))
    a, b = inp("elt_a", sh), inp("elt_b", sh)
    text.append(_layer("elt_sum", "Eltwise", [a, b], "elt_sum",
                       "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }"))
    text.append(_layer("elt_prod", "Eltwise", [a, b], "elt_prod", "eltwise_param { operation: PROD }"))
    text.append(_layer("elt_max", "Eltwise", [a, b], "elt_max", "eltwise_param { operation: MAX }"))
    c = inp("cat_c", (sh[0], r(1, 5), sh[2], sh[3]))
    text.append(_layer("cat", "Concat", [a, c, b], "cat"))
    # fused epilogues: conv + per-channel Scale with bias + Sigmoid; conv + Eltwise SUM + ReLU
    x = inp("epi_in", (2, r(1, 6), r(3, 9), r(3, 9)))
    text.append(_layer("epi", "Convolution", [x], "epi",
                       f"convolution_param {{ num_output: {r(2, 12)} kernel_size: 3 pad: 1 }}"))
    text.append(_layer("epi_scale", "Scale", ["epi"], "epi", "scale_param { bias_term: true }"))
    text.append(_layer("epi_sig", "Sigmoid", ["epi"], "epi"))
    x = inp("rc_in", (r(1, 2), 8, r(3, 8), r(3, 8)))
    text.append(_layer("rc_proj", "Convolution", [x], "rc_proj",
                       "convolution_param { num_output: 12 kernel_size: 1 }"))
    text.append(_layer("rc_conv", "Convolution", [x], "rc_conv",
                       "convolution_param { num_output: 12 kernel_size: 3 pad: 1 }"))
    text.append(_layer("rc", "Eltwise", ["rc_proj", "rc_conv"], "rc"))
    text.append(_layer("rc_relu", "ReLU", ["rc"], "rc"))
    # pointwise: a chain (BatchNorm, Scale, PReLU fuse into one kernel) and single ops
    x = inp("pt_in", (2, r(1, 6), r(1, 6), r(1, 6)))
    text.append(_layer("ptbn", "BatchNorm", [x], "pt"))
    text.append(_layer("ptsc", "Scale", ["pt"], "pt", "scale_param { bias_term: true }"))
    text.append(_layer("ptpr", "PReLU", ["pt"], "pt"))
    x = inp("un_in", (r(1, 3), r(8, 50)))
    for name, params in [("TanH", ""), ("ELU", ""), ("AbsVal", ""), ("BNLL", ""),
                         ("Threshold", "threshold_param { threshold: 0.3 }"),
                         ("Power", "power_param { power: 2 scale: 0.5 shift: 1 }"),
                         ("Dropout", ""), ("Bias", "")]:
        text.append(_layer(f"un_{name.lower()}", name, [x], f"un_{name.lower()}", params))
    text.append(_layer("un_exp", "Exp", [x], "un_exp", "exp_param { base: 2 scale: 0.5 }"))
    text.append(_layer("un_log", "Log", ["un_exp"], "un_log", "log_param { scale: 2 shift: 1 }"))
    # data movement: Slice, Crop, Tile; a pooling with its argmax mask
    x = inp("mv_in", (2, r(3, 7), r(3, 7), r(4, 9)))
    text.append(f'layer {{ name: "mv_slice" type: "Slice" bottom: "{x}" top: "mv_a" top: "mv_b" '
                f'slice_param {{ axis: 1 slice_point: 1 }} }}\n')
    text.append(_layer("mv_tile", "Tile", ["mv_b"], "mv_tile", "tile_param { axis: 2 tiles: 2 }"))
    text.append(f'layer {{ name: "mv_pool" type: "Pooling" bottom: "{x}" top: "mv_pool" '
                f'top: "mv_mask" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}\n')
    text.append(_layer("mv_crop", "Crop", [x, "mv_pool"], "mv_crop",
                       "crop_param { axis: 2 offset: 1 }"))
    return _inputs_layer(shapes) + "".join(text), shapes


@pytest.mark.parametrize("precision", PRECISIONS)
def test_layer_zoo(tmp_path, rng, precision):
    from graphc.runtime.testing import net_from_text
    text, shapes = layer_zoo(rng)
    net = net_from_text(text, tmp_path, rng=rng)
    params = net.graph.params
    params["ptbn.1"].data[...] = np.abs(params["ptbn.1"].data) + 0.5   # a variance
    params["ptbn.2"].data[...] = 1.0                                    # the scale factor
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    check_emulated(net, feeds, precision)


@pytest.mark.parametrize("model,precision", [
    ("lenet", "tf32"), ("lenet", "fp32"), ("lenet", "fp16"), ("lenet", "bf16"),
    ("cifar10_quick", "tf32"), ("cifar10_quick", "fp16"),
])
def test_model(rng, model, precision):
    import importlib
    import graphc
    from graphc.runtime.testing import randomize_params
    spec = getattr(importlib.import_module(f"models.{model}"), model)(batch=2)
    net = graphc.Net(spec)
    randomize_params(net.graph, rng)
    feeds = {name: rng.standard_normal(net.blobs[name].shape).astype(np.float32)
             for name in net.inputs}
    check_emulated(net, feeds, precision)


# ---------------------------------------------------------------------------------------
# the emulator against a real GPU (marked gpu: skipped without one)


class _Gpu:
    """The CUDA driver API through ctypes: a module from a cubin, device buffers, launches."""

    def __init__(self):
        import ctypes
        self.ct = ctypes
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._ok(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self._ok(self.lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        self.ctx = ctypes.c_void_p()
        self._ok(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "ctx")
        self._ok(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
        self.lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
        self.arch = f"sm_{major.value}{minor.value}"

    def _ok(self, rc, what):
        assert rc == 0, f"{what}: CUDA error {rc}"

    def function(self, cubin: bytes, name: str):
        mod, fn = self.ct.c_void_p(), self.ct.c_void_p()
        self._ok(self.lib.cuModuleLoadData(self.ct.byref(mod), cubin), "cuModuleLoadData")
        self._ok(self.lib.cuModuleGetFunction(self.ct.byref(fn), mod, name.encode()), name)
        return fn

    def launch(self, fn, grid, block, smem, args) -> list:
        """``args``: numpy arrays (copied to the device and back; returned) or (kind,
        value) scalars as for EmulatedModule.launch."""
        ct = self.ct
        vals, ptrs, out = [], [], []
        for a in args:
            if isinstance(a, np.ndarray):
                p = ct.c_uint64()
                self._ok(self.lib.cuMemAlloc_v2(ct.byref(p), max(a.nbytes, 1)), "cuMemAlloc")
                self._ok(self.lib.cuMemcpyHtoD_v2(p, ct.c_void_p(a.ctypes.data),
                                                  ct.c_size_t(a.nbytes)), "HtoD")
                ptrs.append((p, a))
                vals.append(p)
            else:
                kind, v = a
                vals.append({"i": ct.c_int32, "l": ct.c_int64, "f": ct.c_float}[kind](v))
        params = (ct.c_void_p * len(vals))(*[ct.cast(ct.byref(v), ct.c_void_p) for v in vals])
        g, b = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        self._ok(self.lib.cuLaunchKernel(fn, *[ct.c_uint(x) for x in g + b], ct.c_uint(smem),
                                         None, params, None), "cuLaunchKernel")
        self._ok(self.lib.cuCtxSynchronize(), "cuCtxSynchronize")
        for p, a in ptrs:
            r = np.empty_like(a)
            self._ok(self.lib.cuMemcpyDtoH_v2(ct.c_void_p(r.ctypes.data), p,
                                              ct.c_size_t(a.nbytes)), "DtoH")
            self.lib.cuMemFree_v2(p)
            out.append(r)
        return out


@pytest.mark.gpu
def test_emulator_matches_gpu_on_test_kernels(kernels, rng):
    """The kernels above on the GPU and in the emulator, same inputs: conversions bit for
    bit, everything else to the rounding of a different summation order."""
    from graphc.codegen.cuda import nvrtc
    gpu = _Gpu()
    cubin = nvrtc.compile_module(KERNELS, gpu.arch).cubin

    def both(name, grid, block, smem, args):
        emu_args = [dev(a) if isinstance(a, np.ndarray) else a for a in args]
        kernels.launch(name, grid, block, smem,
                       [P(a) if isinstance(a, np.ndarray) else a for a in emu_args])
        return [a for a in emu_args if isinstance(a, np.ndarray)], \
            gpu.launch(gpu.function(cubin, name), grid, block, smem, args)

    x = np.concatenate([rng.standard_normal(30000) * 10.0 ** rng.integers(-9, 6, 30000),
                        [65519.99, 65520, 2.98e-8, np.inf, -0.0]]).astype(np.float32)
    ties = (rng.integers(1, 2**10, 3000).astype(np.uint32) << 13 | 0x1000) | (127 << 23)
    x = np.concatenate([x, ties.view(np.float32), (ties | 0x80000000).view(np.float32)])
    n = x.size
    emu, ref = both("convert", ((n + 255) // 256,), (256,), 0,
                    [x, np.zeros(n, np.uint16), np.zeros(n, np.uint16), np.zeros(n, np.float32),
                     np.zeros(n, np.float32), ("i", n)])
    for e, r, what in zip(emu[1:], ref[1:], ["half", "bfloat16", "tf32", "half->float"]):
        e, r = e.view(np.uint8), r.view(np.uint8)
        assert np.array_equal(e, r), f"{what}: {int((e != r).sum())} bytes differ"
    for prec, dt in [("tf32", np.float32), ("f16", np.float16), ("bf16", np.uint16)]:
        M, N, K = 48, 32, 64
        a, bt = rng.standard_normal((M, K)), rng.standard_normal((N, K))
        if dt == np.uint16:
            a, bt = _bf16(a), _bf16(bt)
        else:
            a, bt = a.astype(dt), bt.astype(dt)
        emu, ref = both(f"gemm_{prec}", (1, 2), (128,), 0,
                        [a, bt, np.full((M, N), np.nan, np.float32), ("i", M), ("i", N),
                         ("i", K)])
        print(f"wmma {prec}: rel L2 emulator vs GPU {rel_l2(emu[2], ref[2]):.2e}")
        assert rel_l2(emu[2], ref[2]) < 1e-6, prec
    n = 5000
    x = rng.standard_normal(n).astype(np.float32)
    nw = (n + 31) // 32
    emu, ref = both("warp_reduce", ((n + 127) // 128,), (128,), 0,
                    [x, np.zeros(nw, np.float32), np.zeros(nw, np.float32),
                     np.zeros(nw, np.int32), ("i", n)])
    np.testing.assert_array_equal(emu[1], ref[1])
    np.testing.assert_array_equal(emu[3], ref[3])
    assert rel_l2(emu[2], ref[2]) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", ["layer_zoo", "lenet", "cifar10_quick"])
def test_emulator_matches_gpu_on_generated_programs(tmp_path, rng, model, precision):
    """A program on the GPU (graphc's CUDA runtime) and in the emulator, same weights and
    inputs: the same numbers up to summation order and libm differences."""
    pytest.importorskip("graphc.codegen.cuda.lower",
                        reason="the CUDA code generator is not in this build")
    import importlib
    import graphc
    from graphc.codegen.cuda.lower import lower_graph
    from graphc.passes import run_pipeline
    from graphc.runtime.cuda_build import build_cuda_library
    from graphc.runtime.testing import net_from_text, randomize_params
    if model == "layer_zoo":
        text, shapes = layer_zoo(rng)
        net = net_from_text(text, tmp_path, rng=rng)
        params = net.graph.params
        params["ptbn.1"].data[...] = np.abs(params["ptbn.1"].data) + 0.5
        params["ptbn.2"].data[...] = 1.0
    else:
        net = graphc.Net(getattr(importlib.import_module(f"models.{model}"), model)(batch=4))
        randomize_params(net.graph, rng)
        shapes = {k: net.blobs[k].shape for k in net.inputs}
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    prog = lower_graph(run_pipeline(net.graph), _Gpu().arch, precision)
    emu = run_program(prog, feeds)
    build_cuda_library(prog, tmp_path / "gpu" / "net.so")
    cn = graphc.load(tmp_path / "gpu" / "net.so")
    try:
        got = cn.forward(**feeds)
    finally:
        cn.close()
    errors = {k: rel_l2(emu[k], got[k]) if np.any(got[k]) else float(np.abs(emu[k]).max())
              for k in got}
    print(f"{model} {precision}: rel L2 emulator vs GPU, worst {max(errors.values()):.2e}")
    # one layer: only summation order (tensor cores add in their own order and rounding);
    # a deep net in a reduced precision: such a difference can flip the rounding of the
    # next layer's operands, so up to about one unit roundoff of the format
    tol = 1e-6 if precision == "fp32" else 1e-5 if model == "layer_zoo" else \
        {"tf32": 1e-3, "fp16": 1e-3, "bf16": 4e-3}[precision]
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"{precision}: emulator vs GPU above {tol}: {bad}"
