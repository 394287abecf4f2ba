// CUDA C on the CPU, for tests and for debugging kernels without a GPU.
//
// emulate.py compiles a module's CUDA C as C++20 with this header force-included, and
// one launcher per kernel.  A launch runs its blocks on a few worker threads; the
// threads of a block run as fibers (cooperative, on their worker's OS thread) that
// switch at __syncthreads and the warp intrinsics, so the threads of a block run in
// order until they must wait: reading shared memory another thread has not written yet
// gives the poison value instead of a lucky right answer.
//
// What a GPU would report is reported here too, with the kernel's source line where
// there is one: a divergent __syncthreads, a deadlock, a warp intrinsic whose mask
// names an exited or missing lane, a misaligned access (alignment sanitizer), an array
// index past a fixed bound (bounds sanitizer, shared arrays included), a write past the
// dynamic shared memory, too much shared memory, a misaligned wmma pointer or stride,
// __trap().  Global memory bounds are checked by emulate.py (poisoned guard regions).
//
// wmma: CUDA does not specify how a fragment's elements spread over a warp's lanes, so
// here every lane holds the whole tile (num_elements = rows * cols) and computes each
// load / mma / store whole.  Code that treats fragment elements uniformly (all CUDA
// allows) is right under both.  tf32 operands are truncated to 10 mantissa bits in the
// mma (as the tensor cores read a plain fp32), __float_to_tf32 rounds to nearest, ties
// away (cvt.rna); half / bf16 conversions round to nearest even; products are exact and
// accumulate in fp32.
#pragma once
#define __GRAPHC_EMULATE__ 1

#include <atomic>
#include <cstdarg>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

// ---- qualifiers --------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __constant__
#define __managed__
#define __grid_constant__
// Plain `__shared__ T name[dims];` declarations are rewritten by emulate.py into a
// per-block allocation; any other form falls back to per-worker static storage.
#define __shared__ static thread_local

#ifndef CUDART_INF_F
#define CUDART_INF_F (std::numeric_limits<float>::infinity())
#define CUDART_NAN_F (std::numeric_limits<float>::quiet_NaN())
#define CUDART_INF (std::numeric_limits<double>::infinity())
#define CUDART_NAN (std::numeric_limits<double>::quiet_NaN())
#define CUDART_PI_F 3.141592654f
#endif

// ---- vector types ------------------------------------------------------------------
#define __EMU_VEC2(T, N, A) struct __attribute__((aligned(A))) N##2 { T x, y; }; \
    static inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define __EMU_VEC3(T, N) struct N##3 { T x, y, z; }; \
    static inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define __EMU_VEC4(T, N, A) struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
    static inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
#define __EMU_VEC1(T, N) struct N##1 { T x; }; static inline N##1 make_##N##1(T x) { return N##1{x}; }
#define __EMU_VECS(T, N, A2, A4) __EMU_VEC1(T, N) __EMU_VEC2(T, N, A2) __EMU_VEC3(T, N) \
    __EMU_VEC4(T, N, A4)
__EMU_VECS(float, float, 8, 16)
__EMU_VECS(int, int, 8, 16)
__EMU_VECS(unsigned int, uint, 8, 16)
__EMU_VECS(short, short, 4, 8)
__EMU_VECS(unsigned short, ushort, 4, 8)
__EMU_VECS(signed char, char, 2, 4)
__EMU_VECS(unsigned char, uchar, 2, 4)
__EMU_VECS(long long, longlong, 16, 16)
__EMU_VECS(unsigned long long, ulonglong, 16, 16)
__EMU_VECS(double, double, 16, 16)
#undef __EMU_VECS

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---- the emulator core -------------------------------------------------------------
namespace __emu {

enum { WAIT_NONE = 0, WAIT_BLOCK = 1, WAIT_WARP = 2 };
enum { WOP_SYNC = 0, WOP_SHFL = 1, WOP_BALLOT = 2, WOP_ALL = 3, WOP_ANY = 4 };

struct Fiber {
    void *sp = nullptr;
    char *stack = nullptr;         // lowest usable byte (a guard page lies below)
    size_t stack_size = 0;
    uint3 tid{0, 0, 0};
    int linear = 0, lane = 0, warp = 0;
    bool done = false;
    int wait = WAIT_NONE;
    // block barrier
    int bar_result = 0;
    // warp exchange
    unsigned mask = 0;
    int wop = WOP_SYNC;
    int src = 0;                   // shfl: the lane to read
    size_t mma_calls = 0;          // wmma::mma_sync calls of this thread in this block
    int pred = 0;                  // vote: this lane's predicate
    unsigned char slot[16];        // shfl: this lane's value
    unsigned char out[16];         // shfl result, or the vote as an int
};

// A warp's wmma::mma_sync results, by call number: every lane holds the whole tile, so
// each lane repeats its warp's products; a lane whose operands are the same bytes as the
// first lane's n-th call takes that result instead of computing it again.
struct MmaMemo {
    std::vector<unsigned char> key, val;
};

struct WarpState {
    unsigned exists = 0;           // lanes of the block that exist
    unsigned exited = 0;
    unsigned arrived = 0;
    std::vector<MmaMemo> mma;
    size_t nmma = 0;               // entries in use this block
};

struct Launch {
    uint3 grid, block;
    size_t smem;
    void (*body)(void *);
    void *ctx;
    std::atomic<long long> next{0};
    std::atomic<int> failed{0};
    pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;
    char *err;                     // the first error (err_cap bytes)
    size_t err_cap;
};

struct SharedVar { const void *key; void *ptr; };

struct Worker {
    Launch *L = nullptr;
    Fiber *fibers = nullptr;
    char *pool = nullptr;          // the fibers' stacks
    size_t pool_bytes = 0;
    int nalloc = 0;
    int n = 0;                     // threads of the current block
    int cur = 0;
    int nexited = 0;
    void *sched_sp = nullptr;
    bool failed = false;
    // block barrier
    int bar_arrived = 0, bar_line = 0, bar_count = 0;
    int bar_first = -1;
    WarpState warps[32];
    // shared memory
    unsigned char *static_smem = nullptr;   // STATIC_SMEM bytes
    size_t static_used = 0;
    SharedVar vars[256];
    int nvars = 0;
    unsigned char *dyn_smem = nullptr;      // dyn_cap bytes + DYN_GUARD guard
    size_t dyn_cap = 0;
    uint3 block_idx{0, 0, 0};
    char *alt_stack = nullptr;
};

constexpr size_t STACK_SIZE = 256 * 1024;
constexpr size_t CANARY = 64;                  // bytes at the bottom of each fiber stack
constexpr unsigned char CANARY_BYTE = 0xc5;
constexpr size_t STATIC_SMEM = 48 * 1024;      // the static shared memory limit of CUDA
constexpr size_t MAX_SMEM = 227 * 1024;        // static + dynamic, opt-in maximum (sm_90)
constexpr size_t DYN_GUARD = 4096;
constexpr int MAX_WORKERS = 64;

inline Worker g_workers[MAX_WORKERS];
inline thread_local Worker *t_worker = nullptr;
inline thread_local bool t_in_fiber = false;
inline thread_local uint3 t_threadIdx, t_blockIdx;
inline thread_local dim3 t_blockDim, t_gridDim;

[[noreturn]] inline void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace __emu

#define threadIdx (::__emu::t_threadIdx)
#define blockIdx (::__emu::t_blockIdx)
#define blockDim (::__emu::t_blockDim)
#define gridDim (::__emu::t_gridDim)
#define warpSize 32

// ---- fibers ------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" __attribute__((visibility("hidden"))) void __emu_swap(void **save, void *to);
asm(R"(
    .text
    .p2align 4
    .hidden __emu_swap
    .globl __emu_swap
    .type __emu_swap, @function
__emu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size __emu_swap, .-__emu_swap
)");
#elif defined(__aarch64__)
extern "C" __attribute__((visibility("hidden"))) void __emu_swap(void **save, void *to);
asm(R"(
    .text
    .p2align 4
    .hidden __emu_swap
    .globl __emu_swap
    .type __emu_swap, %function
__emu_swap:
    sub sp, sp, #176
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #176
    ret
    .size __emu_swap, .-__emu_swap
)");
#else
#error "the CUDA emulator switches fibers on x86-64 and aarch64 only"
#endif

namespace __emu {

inline void fiber_entry();

inline void fiber_reset(Fiber &f) {
    std::memset(f.stack, CANARY_BYTE, CANARY);
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
#if defined(__x86_64__)
    // popped by __emu_swap: r15 r14 r13 r12 rbx rbp, then `ret` into fiber_entry with
    // the stack as a call would leave it (rsp = 8 mod 16)
    uint64_t *s = reinterpret_cast<uint64_t *>(top) - 8;
    for (int i = 0; i < 6; i++) s[i] = 0;
    s[6] = reinterpret_cast<uint64_t>(&fiber_entry);
    s[7] = 0;
    f.sp = s;
#else
    uint64_t *s = reinterpret_cast<uint64_t *>(top - 176 - 16);
    std::memset(s, 0, 176);
    s[11] = reinterpret_cast<uint64_t>(&fiber_entry);   // x30 (lr)
    f.sp = s;
#endif
}

inline Fiber &cur_fiber() { return t_worker->fibers[t_worker->cur]; }

inline void yield() {
    Worker *w = t_worker;
    __emu_swap(&w->fibers[w->cur].sp, w->sched_sp);
}

inline void record_error(Launch *L, const char *msg) {
    pthread_mutex_lock(&L->err_lock);
    if (!L->failed.load()) {
        std::snprintf(L->err, L->err_cap, "%s", msg);
        L->failed.store(1);
    }
    pthread_mutex_unlock(&L->err_lock);
}

// An error of the running thread: recorded with the block and thread; the launch stops.
[[noreturn]] inline void vfail(const char *fmt, va_list ap) {
    char msg[768], full[1024];
    std::vsnprintf(msg, sizeof msg, fmt, ap);
    Worker *w = t_worker;
    if (w == nullptr) {
        std::fprintf(stderr, "graphc CUDA emulator: %s\n", msg);
        std::abort();
    }
    Fiber &f = w->fibers[w->cur];
    std::snprintf(full, sizeof full, "block (%u,%u,%u) thread (%u,%u,%u): %s", w->block_idx.x,
                  w->block_idx.y, w->block_idx.z, f.tid.x, f.tid.y, f.tid.z, msg);
    record_error(w->L, full);
    w->failed = true;
    for (;;) yield();   // never resumed: the scheduler abandons the block
}

inline void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(fmt, ap);
}

// ---- block barrier -----------------------------------------------------------------
inline void check_block_barrier(Worker *w) {
    if (w->bar_arrived == 0 || w->bar_arrived + w->nexited < w->n) return;
    int result = w->bar_count;
    for (int i = 0; i < w->n; i++) {
        Fiber &f = w->fibers[i];
        if (f.wait == WAIT_BLOCK) { f.wait = WAIT_NONE; f.bar_result = result; }
    }
    w->bar_arrived = 0;
    w->bar_count = 0;
    w->bar_first = -1;
}

inline int block_barrier(const char *file, int line, int pred) {
    Worker *w = t_worker;
    Fiber &f = w->fibers[w->cur];
    if (w->bar_arrived > 0 && w->bar_line != line)
        fail("%s:%d: __syncthreads while thread %d of the block waits at the __syncthreads of "
             "line %d (a barrier in divergent code)", file, line, w->bar_first, w->bar_line);
    if (w->bar_arrived == 0) { w->bar_line = line; w->bar_first = f.linear; }
    w->bar_arrived++;
    w->bar_count += pred != 0;
    f.wait = WAIT_BLOCK;
    check_block_barrier(w);
    while (f.wait != WAIT_NONE) yield();
    return f.bar_result;
}

// ---- warp exchange -----------------------------------------------------------------
inline void warp_release(Worker *w, int warp, unsigned group) {
    Fiber *lanes = w->fibers + warp * 32;
    unsigned ballot = 0;
    int all = 1, any = 0;
    for (int l = 0; l < 32; l++)
        if (group >> l & 1) {
            ballot |= unsigned(lanes[l].pred != 0) << l;
            all &= lanes[l].pred != 0;
            any |= lanes[l].pred != 0;
        }
    for (int l = 0; l < 32; l++) {
        if (!(group >> l & 1)) continue;
        Fiber &f = lanes[l];
        switch (f.wop) {
        case WOP_SHFL:      // from a lane that does not take part: undefined, so poison
            if (group >> f.src & 1) std::memcpy(f.out, lanes[f.src].slot, sizeof f.out);
            else std::memset(f.out, 0xff, sizeof f.out);
            break;
        case WOP_BALLOT: std::memcpy(f.out, &ballot, 4); break;
        case WOP_ALL: std::memcpy(f.out, &all, 4); break;
        case WOP_ANY: std::memcpy(f.out, &any, 4); break;
        default: break;
        }
        f.wait = WAIT_NONE;
    }
    w->warps[warp].arrived &= ~group;
}

// Lanes named in a mask that do not exist (a partial last warp) or have exited do not
// take part (CUDA: "all non-exited threads named in mask must execute the same
// intrinsic"); a shuffle reading one of them gets the poison.
inline void check_warp(Worker *w, int warp) {
    WarpState &ws = w->warps[warp];
    for (int l = 0; l < 32; l++) {
        if (!(ws.arrived >> l & 1)) continue;
        unsigned need = w->fibers[warp * 32 + l].mask & ws.exists & ~ws.exited;
        if ((ws.arrived & need) == need) { warp_release(w, warp, need); }
    }
}

inline void warp_op(const char *what, unsigned mask, int wop) {
    Worker *w = t_worker;
    Fiber &f = w->fibers[w->cur];
    WarpState &ws = w->warps[f.warp];
    if (!(mask >> f.lane & 1))
        fail("%s with mask 0x%08x that leaves out the calling lane %d", what, mask, f.lane);
    for (int l = 0; l < 32; l++) {       // a lane waiting with another mask: divergent code
        const Fiber &o = w->fibers[f.warp * 32 + l];
        if ((ws.arrived >> l & 1) && ((mask >> l & 1) || (o.mask >> f.lane & 1)) &&
            (o.mask & ws.exists) != (mask & ws.exists))
            fail("%s with mask 0x%08x while lane %d waits in one with mask 0x%08x", what, mask,
                 l, o.mask);
    }
    f.mask = mask;
    f.wop = wop;
    f.wait = WAIT_WARP;
    ws.arrived |= 1u << f.lane;
    check_warp(w, f.warp);
    while (f.wait != WAIT_NONE) yield();
}

inline void on_exit(Worker *w, Fiber &f) {
    w->nexited++;
    w->warps[f.warp].exited |= 1u << f.lane;
    check_warp(w, f.warp);          // lanes waiting for this one go on without it
    check_block_barrier(w);
}

inline void fiber_entry() {
    Worker *w = t_worker;
    w->L->body(w->L->ctx);
    Fiber &f = w->fibers[w->cur];
    f.done = true;
    on_exit(w, f);
    for (;;) yield();
}

// ---- shared memory -----------------------------------------------------------------
template <class T, size_t Align>
inline T &shared_var(const void *key) {
    Worker *w = t_worker;
    for (int i = 0; i < w->nvars; i++)
        if (w->vars[i].key == key) return *static_cast<T *>(w->vars[i].ptr);
    constexpr size_t a = Align > alignof(T) ? Align : alignof(T);
    size_t off = (w->static_used + a - 1) / a * a;
    if (off + sizeof(T) > STATIC_SMEM)
        fail("static __shared__ memory exceeds %zu bytes (CUDA's limit for static shared "
             "memory; use dynamic shared memory)", STATIC_SMEM);
    if (w->nvars == 256) fail("more than 256 __shared__ variables");
    if (off + sizeof(T) + w->L->smem > MAX_SMEM)
        fail("static (%zu) + dynamic (%zu) shared memory exceed %zu bytes per block",
             off + sizeof(T), w->L->smem, MAX_SMEM);
    void *p = w->static_smem + off;
    std::memset(p, 0xff, sizeof(T));    // poison: NaN in every floating type
    w->static_used = off + sizeof(T);
    w->vars[w->nvars++] = SharedVar{key, p};
    return *static_cast<T *>(p);
}

inline unsigned char *dynamic_smem() { return t_worker->dyn_smem; }

// ---- running a launch --------------------------------------------------------------
// All fiber stacks of a worker in one mapping (two memory areas, however many threads):
// an inaccessible page below the lowest, and a canary at the bottom of each, checked
// after every block (a thread whose locals outgrow its stack is reported).

inline bool worker_prepare(Worker *w, int n, size_t smem, char *err, size_t cap) {
    if (w->nalloc < n) {
        size_t page = size_t(sysconf(_SC_PAGESIZE));
        size_t bytes = page + size_t(n) * STACK_SIZE;
        void *p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            std::snprintf(err, cap, "out of memory for the stacks of %d threads", n);
            return false;
        }
        mprotect(p, page, PROT_NONE);
        if (w->pool) munmap(w->pool, w->pool_bytes);
        w->pool = static_cast<char *>(p);
        w->pool_bytes = bytes;
        delete[] w->fibers;
        w->fibers = new Fiber[n];
        for (int i = 0; i < n; i++) {
            w->fibers[i].stack = w->pool + page + size_t(i) * STACK_SIZE;
            w->fibers[i].stack_size = STACK_SIZE;
        }
        w->nalloc = n;
    }
    if (!w->static_smem) w->static_smem = static_cast<unsigned char *>(std::aligned_alloc(256, STATIC_SMEM));
    if (w->dyn_cap < smem || !w->dyn_smem) {
        std::free(w->dyn_smem);
        size_t cap2 = (smem + 255) / 256 * 256;
        w->dyn_smem = static_cast<unsigned char *>(std::aligned_alloc(256, cap2 + DYN_GUARD));
        w->dyn_cap = cap2;
    }
    return true;
}

inline bool run_block(Worker *w, long long b) {
    Launch *L = w->L;
    uint3 bi;
    bi.x = unsigned(b % L->grid.x);
    bi.y = unsigned(b / L->grid.x % L->grid.y);
    bi.z = unsigned(b / L->grid.x / L->grid.y);
    w->block_idx = bi;
    t_blockIdx = bi;
    t_blockDim = dim3(L->block.x, L->block.y, L->block.z);
    t_gridDim = dim3(L->grid.x, L->grid.y, L->grid.z);
    int n = int(L->block.x * L->block.y * L->block.z);
    w->n = n;
    w->nexited = 0;
    w->failed = false;
    w->bar_arrived = w->bar_count = 0;
    w->bar_first = -1;
    w->static_used = 0;
    w->nvars = 0;
    std::memset(w->dyn_smem, 0xff, L->smem + DYN_GUARD);
    for (int wp = 0; wp < 32; wp++) {
        WarpState &ws = w->warps[wp];
        ws.exists = ws.exited = ws.arrived = 0;
        ws.nmma = 0;
    }
    for (int i = 0; i < n; i++) {
        Fiber &f = w->fibers[i];
        fiber_reset(f);
        f.tid = uint3{unsigned(i % L->block.x), unsigned(i / L->block.x % L->block.y),
                      unsigned(i / L->block.x / L->block.y)};
        f.linear = i;
        f.lane = i % 32;
        f.warp = i / 32;
        f.done = false;
        f.wait = WAIT_NONE;
        f.mma_calls = 0;
        w->warps[f.warp].exists |= 1u << f.lane;
    }
    // odd blocks run their threads last to first: a read of shared memory that another
    // thread has not written yet (a missing __syncthreads) finds the poison either way
    const bool reverse = b & 1;
    for (;;) {
        bool ran = false;
        for (int j = 0; j < n; j++) {
            const int i = reverse ? n - 1 - j : j;
            Fiber &f = w->fibers[i];
            if (f.done || f.wait != WAIT_NONE) continue;
            w->cur = i;
            t_threadIdx = f.tid;
            t_in_fiber = true;
            __emu_swap(&w->sched_sp, f.sp);
            t_in_fiber = false;
            ran = true;
            if (w->failed) return false;
        }
        if (w->nexited == n) break;
        if (!ran) {
            char msg[512];
            int at_bar = 0, at_warp = 0, first_warp = -1;
            for (int i = 0; i < n; i++) {
                if (w->fibers[i].wait == WAIT_BLOCK) at_bar++;
                if (w->fibers[i].wait == WAIT_WARP) { at_warp++; if (first_warp < 0) first_warp = i; }
            }
            std::snprintf(msg, sizeof msg,
                          "block (%u,%u,%u): deadlock: %d threads wait at the __syncthreads of "
                          "line %d, %d in warp-synchronous intrinsics (first: thread %d), %d "
                          "exited", bi.x, bi.y, bi.z, at_bar, w->bar_line, at_warp, first_warp,
                          w->nexited);
            record_error(L, msg);
            return false;
        }
    }
    for (int i = 0; i < n; i++) {
        uint64_t c[CANARY / 8], want;
        std::memcpy(c, w->fibers[i].stack, CANARY);
        std::memset(&want, CANARY_BYTE, 8);
        for (size_t j = 0; j < CANARY / 8; j++)
            if (c[j] != want) {
                char msg[256];
                Fiber &f = w->fibers[i];
                std::snprintf(msg, sizeof msg, "block (%u,%u,%u) thread (%u,%u,%u): stack "
                              "overflow (the thread's locals exceed %zu KiB)", bi.x, bi.y, bi.z,
                              f.tid.x, f.tid.y, f.tid.z, STACK_SIZE / 1024);
                record_error(L, msg);
                return false;
            }
    }
    for (size_t i = 0; i < DYN_GUARD; i++)
        if (w->dyn_smem[L->smem + i] != 0xff) {
            char msg[256];
            std::snprintf(msg, sizeof msg, "block (%u,%u,%u): wrote past the %zu bytes of dynamic "
                          "shared memory (at byte %zu)", bi.x, bi.y, bi.z, L->smem, L->smem + i);
            record_error(L, msg);
            return false;
        }
    return true;
}

// ---- memory faults: a kernel's bad access becomes the launch's error ------------------
// SIGSEGV/SIGBUS in a fiber: record where (block, thread, address) and leave the handler
// for the worker's scheduler, abandoning the block (as a GPU aborts the launch).  The
// handler runs on an alternate stack (a fiber's overflow faults on its guard page).
constexpr size_t ALT_STACK = 64 * 1024;
inline struct sigaction g_old_segv, g_old_bus;

inline void restore_fault_handlers() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
}

inline void on_fault(int sig, siginfo_t *si, void *) {
    Worker *w = t_worker;
    if (w == nullptr || !t_in_fiber) {
        restore_fault_handlers();   // not a kernel's fault: the previous handler sees it again
        return;
    }
    Fiber &f = w->fibers[w->cur];
    uintptr_t a = reinterpret_cast<uintptr_t>(si->si_addr);
    uintptr_t lo = reinterpret_cast<uintptr_t>(f.stack);
    char msg[512];
    if (a < lo && a + (1u << 20) >= lo)
        std::snprintf(msg, sizeof msg, "block (%u,%u,%u) thread (%u,%u,%u): stack overflow "
                      "(the thread's locals exceed %zu KiB)", w->block_idx.x, w->block_idx.y,
                      w->block_idx.z, f.tid.x, f.tid.y, f.tid.z, f.stack_size / 1024);
    else
        std::snprintf(msg, sizeof msg, "block (%u,%u,%u) thread (%u,%u,%u): invalid memory "
                      "access at address 0x%lx (%s; a GPU reports 'an illegal memory access "
                      "was encountered')", w->block_idx.x, w->block_idx.y, w->block_idx.z,
                      f.tid.x, f.tid.y, f.tid.z, (unsigned long)a,
                      sig == SIGBUS ? "SIGBUS" : "SIGSEGV");
    record_error(w->L, msg);
    w->failed = true;
    t_in_fiber = false;
    void *dead;
    __emu_swap(&dead, w->sched_sp);   // never returns here
}

inline void *worker_main(void *arg) {
    Worker *w = static_cast<Worker *>(arg);
    t_worker = w;
    stack_t ss{}, old_ss{};
    if (!w->alt_stack) w->alt_stack = static_cast<char *>(std::malloc(ALT_STACK));
    ss.ss_sp = w->alt_stack;
    ss.ss_size = ALT_STACK;
    sigaltstack(&ss, &old_ss);
    Launch *L = w->L;
    long long nblocks = (long long)L->grid.x * L->grid.y * L->grid.z;
    for (;;) {
        if (L->failed.load()) break;
        long long b = L->next.fetch_add(1);
        if (b >= nblocks) break;
        if (!run_block(w, b)) break;
    }
    t_worker = nullptr;
    sigaltstack(&old_ss, nullptr);
    return nullptr;
}

inline pthread_mutex_t g_launch_lock = PTHREAD_MUTEX_INITIALIZER;

inline int launch(const unsigned *cfg, size_t smem, int workers, void (*body)(void *), void *ctx,
                  char *err, size_t cap) {
    Launch L;
    L.grid = uint3{cfg[0], cfg[1], cfg[2]};
    L.block = uint3{cfg[3], cfg[4], cfg[5]};
    L.smem = smem;
    L.body = body;
    L.ctx = ctx;
    L.err = err;
    L.err_cap = cap;
    err[0] = 0;
    long long nthreads = (long long)cfg[3] * cfg[4] * cfg[5];
    if (nthreads < 1 || nthreads > 1024 || cfg[5] > 64) {
        std::snprintf(err, cap, "block (%u,%u,%u) is not a valid CUDA block (at most 1024 "
                      "threads, z at most 64)", cfg[3], cfg[4], cfg[5]);
        return 1;
    }
    if (cfg[0] < 1 || cfg[1] < 1 || cfg[2] < 1 || cfg[1] > 65535 || cfg[2] > 65535) {
        std::snprintf(err, cap, "grid (%u,%u,%u) is not a valid CUDA grid (y and z at most "
                      "65535)", cfg[0], cfg[1], cfg[2]);
        return 1;
    }
    if (smem > MAX_SMEM) {
        std::snprintf(err, cap, "%zu bytes of dynamic shared memory exceed the %zu bytes a "
                      "block can have", smem, MAX_SMEM);
        return 1;
    }
    long long nblocks = (long long)cfg[0] * cfg[1] * cfg[2];
    if (workers < 1) workers = 1;
    if (workers > MAX_WORKERS) workers = MAX_WORKERS;
    if (workers > nblocks) workers = int(nblocks);
    pthread_mutex_lock(&g_launch_lock);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    for (int i = 0; i < workers; i++) {
        g_workers[i].L = &L;
        if (!worker_prepare(&g_workers[i], int(nthreads), smem, err, cap)) {
            restore_fault_handlers();
            pthread_mutex_unlock(&g_launch_lock);
            return 1;
        }
    }
    pthread_t th[MAX_WORKERS];
    int started = 0;
    for (int i = 1; i < workers; i++) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20);
        if (pthread_create(&th[i], &attr, worker_main, &g_workers[i]) == 0) started = i;
        pthread_attr_destroy(&attr);
        if (started != i) break;
    }
    worker_main(&g_workers[0]);
    for (int i = 1; i <= started; i++) pthread_join(th[i], nullptr);
    restore_fault_handlers();
    pthread_mutex_unlock(&g_launch_lock);
    return L.failed.load() ? 1 : 0;
}

// Launch arguments arrive as 8-byte slots: pointers and 64-bit integers whole, 32-bit
// scalars in the low 4 bytes.
template <class T>
inline T arg_from_slot(const uint64_t &slot) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                  "the emulator passes pointer, integer and float kernel parameters only");
    T v;
    std::memcpy(&v, &slot, sizeof(T));
    return v;
}

template <class T>
constexpr char kind_of() {
    if constexpr (std::is_pointer_v<T>) return 'p';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else if constexpr (std::is_same_v<T, double>) return 'd';
    else if constexpr (std::is_integral_v<T> && sizeof(T) == 4) return 'i';
    else if constexpr (std::is_integral_v<T> && sizeof(T) == 8) return 'l';
    else return '?';
}

template <class T>
constexpr char log2_align_of() {
    if constexpr (std::is_pointer_v<T> && !std::is_void_v<std::remove_pointer_t<T>>) {
        constexpr size_t a = alignof(std::remove_pointer_t<T>);
        int l = 0;
        while ((size_t(1) << l) < a) l++;
        return "0123456789abcdef"[l];
    } else {
        return '0';
    }
}

template <class... P>
struct Kernel {
    void (*fn)(P...);
    std::tuple<P...> args;
    static void body(void *self) {
        Kernel *k = static_cast<Kernel *>(self);
        std::apply(k->fn, k->args);
    }
    // one letter per parameter (kind_of), ':', then per parameter log2 of the alignment a
    // pointer's target needs (hex; 0 for scalars)
    static const char *signature() {
        static const char sig[] = {kind_of<P>()..., ':', log2_align_of<P>()..., '\0'};
        return sig;
    }
};

template <class... P, size_t... I>
inline std::tuple<P...> unpack(const uint64_t *slots, std::index_sequence<I...>) {
    return std::tuple<P...>(arg_from_slot<P>(slots[I])...);
}

template <class... P>
inline int launch_kernel(void (*fn)(P...), const unsigned *cfg, size_t smem, int workers,
                         const uint64_t *slots, int nslots, char *err, size_t cap) {
    if (nslots != int(sizeof...(P))) {
        std::snprintf(err, cap, "the launch passes %d arguments; the kernel takes %d", nslots,
                      int(sizeof...(P)));
        return 1;
    }
    Kernel<P...> k{fn, unpack<P...>(slots, std::index_sequence_for<P...>{})};
    return launch(cfg, smem, workers, &Kernel<P...>::body, &k, err, cap);
}

template <class... P>
inline const char *signature_of(void (*)(P...)) { return Kernel<P...>::signature(); }

}  // namespace __emu

// ---- sanitizer hooks: misaligned accesses and fixed-bound array indices ---------------
namespace __emu {
struct SrcLoc { const char *file; uint32_t line, column; };
struct TypeDesc { uint16_t kind, info; char name[1]; };
struct MismatchData { SrcLoc loc; const TypeDesc *type; unsigned char log_align, check_kind; };
struct BoundsData { SrcLoc loc; const TypeDesc *array, *index; };
}  // namespace __emu
extern "C" __attribute__((visibility("hidden"))) void
__ubsan_handle_type_mismatch_v1(__emu::MismatchData *d, uintptr_t p) {
    unsigned long a = 1ul << d->log_align;
    if (p == 0) ::__emu::fail("%s:%u: null pointer access of %s", d->loc.file, d->loc.line,
                              d->type->name);
    ::__emu::fail("%s:%u: misaligned access of %s at address 0x%lx (needs %lu-byte "
                  "alignment; a GPU reports 'misaligned address')", d->loc.file, d->loc.line,
                  d->type->name, (unsigned long)p, a);
}
extern "C" __attribute__((visibility("hidden"))) void
__ubsan_handle_type_mismatch_v1_abort(__emu::MismatchData *d, uintptr_t p) {
    __ubsan_handle_type_mismatch_v1(d, p);
}
extern "C" __attribute__((visibility("hidden"))) void
__ubsan_handle_out_of_bounds(__emu::BoundsData *d, uintptr_t index) {
    ::__emu::fail("%s:%u: index %ld is out of the bounds of an array of type %s",
                  d->loc.file, d->loc.line, (long)index, d->array->name);
}
extern "C" __attribute__((visibility("hidden"))) void
__ubsan_handle_out_of_bounds_abort(__emu::BoundsData *d, uintptr_t index) {
    __ubsan_handle_out_of_bounds(d, index);
}

// ---- synchronization and warp intrinsics -------------------------------------------
#define __syncthreads() ((void)::__emu::block_barrier(__FILE__, __LINE__, 0))
#define __syncthreads_count(p) (::__emu::block_barrier(__FILE__, __LINE__, (p)))
#define __syncthreads_or(p) (::__emu::block_barrier(__FILE__, __LINE__, (p)) != 0)
#define __syncthreads_and(p) (::__emu::block_barrier(__FILE__, __LINE__, !(p)) == 0)

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::__emu::warp_op("__syncwarp", mask, ::__emu::WOP_SYNC);
}
inline unsigned __activemask() {
    ::__emu::Worker *w = ::__emu::t_worker;
    ::__emu::Fiber &f = ::__emu::cur_fiber();
    return w->warps[f.warp].exists & ~w->warps[f.warp].exited;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    ::__emu::Fiber &f = ::__emu::cur_fiber();
    f.pred = pred;
    ::__emu::warp_op("__ballot_sync", mask, ::__emu::WOP_BALLOT);
    unsigned r; std::memcpy(&r, f.out, 4); return r;
}
inline int __all_sync(unsigned mask, int pred) {
    ::__emu::Fiber &f = ::__emu::cur_fiber();
    f.pred = pred;
    ::__emu::warp_op("__all_sync", mask, ::__emu::WOP_ALL);
    int r; std::memcpy(&r, f.out, 4); return r;
}
inline int __any_sync(unsigned mask, int pred) {
    ::__emu::Fiber &f = ::__emu::cur_fiber();
    f.pred = pred;
    ::__emu::warp_op("__any_sync", mask, ::__emu::WOP_ANY);
    int r; std::memcpy(&r, f.out, 4); return r;
}

namespace __emu {
template <class T>
inline T shfl(const char *what, unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a big type");
    Fiber &f = cur_fiber();
    std::memcpy(f.slot, &v, sizeof(T));
    f.src = src;
    warp_op(what, mask, WOP_SHFL);
    T r;
    std::memcpy(&r, cur_fiber().out, sizeof(T));
    return r;
}
inline void check_width(const char *what, int width) {
    if (width < 1 || width > 32 || (width & (width - 1)))
        fail("%s with width %d (must be a power of 2 up to 32)", what, width);
}
}  // namespace __emu

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    ::__emu::check_width("__shfl_sync", width);
    int lane = ::__emu::cur_fiber().lane;
    int s = (lane & ~(width - 1)) + (src & (width - 1));
    return ::__emu::shfl("__shfl_sync", mask, v, s);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    ::__emu::check_width("__shfl_up_sync", width);
    int lane = ::__emu::cur_fiber().lane;
    int s = (lane & (width - 1)) >= int(delta) ? lane - int(delta) : lane;
    return ::__emu::shfl("__shfl_up_sync", mask, v, s);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    ::__emu::check_width("__shfl_down_sync", width);
    int lane = ::__emu::cur_fiber().lane;
    int s = (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : lane;
    return ::__emu::shfl("__shfl_down_sync", mask, v, s);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    ::__emu::check_width("__shfl_xor_sync", width);
    int lane = ::__emu::cur_fiber().lane;
    int s = lane ^ lane_mask;
    if (s >= ((lane & ~(width - 1)) + width) || s > 31) s = lane;
    return ::__emu::shfl("__shfl_xor_sync", mask, v, s);
}

inline void __trap() { ::__emu::fail("__trap()"); }
inline void __brkpt() { ::__emu::fail("__brkpt()"); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}
template <class T> inline T __ldg(const T *p) { return *p; }
template <class T> inline T __ldcg(const T *p) { return *p; }
template <class T> inline T __ldca(const T *p) { return *p; }
template <class T> inline T __ldcs(const T *p) { return *p; }
template <class T> inline T __ldlu(const T *p) { return *p; }
template <class T> inline T __ldcv(const T *p) { return *p; }
template <class T> inline void __stcg(T *p, T v) { *p = v; }
template <class T> inline void __stcs(T *p, T v) { *p = v; }
template <class T> inline void __stwt(T *p, T v) { *p = v; }
template <class T> inline void __stwb(T *p, T v) { *p = v; }
inline long long clock64() { return 0; }

// ---- atomics -----------------------------------------------------------------------
#define __EMU_ATOMIC(NAME, T, EXPR)                                                       \
    inline T NAME(T *p, T v) { std::atomic_ref<T> a(*p); return EXPR; }                  \
    inline T NAME##_block(T *p, T v) { return NAME(p, v); }                               \
    inline T NAME##_system(T *p, T v) { return NAME(p, v); }
#define __EMU_ATOMIC_CAS_LOOP(T, NEW)                                                     \
    T old = a.load(), want;                                                               \
    do { want = (NEW); } while (!a.compare_exchange_weak(old, want));                     \
    return old
#define __EMU_ATOMIC_INT(T)                                                               \
    __EMU_ATOMIC(atomicAdd, T, a.fetch_add(v))                                            \
    __EMU_ATOMIC(atomicSub, T, a.fetch_sub(v))                                            \
    __EMU_ATOMIC(atomicExch, T, a.exchange(v))                                            \
    __EMU_ATOMIC(atomicAnd, T, a.fetch_and(v))                                            \
    __EMU_ATOMIC(atomicOr, T, a.fetch_or(v))                                              \
    __EMU_ATOMIC(atomicXor, T, a.fetch_xor(v))                                            \
    __EMU_ATOMIC(atomicMax, T, [&] { __EMU_ATOMIC_CAS_LOOP(T, old > v ? old : v); }())   \
    __EMU_ATOMIC(atomicMin, T, [&] { __EMU_ATOMIC_CAS_LOOP(T, old < v ? old : v); }())   \
    inline T atomicCAS(T *p, T cmp, T v) {                                                \
        std::atomic_ref<T> a(*p); a.compare_exchange_strong(cmp, v); return cmp; }
__EMU_ATOMIC_INT(int)
__EMU_ATOMIC_INT(unsigned int)
__EMU_ATOMIC_INT(unsigned long long)
__EMU_ATOMIC(atomicMax, long long, [&] { __EMU_ATOMIC_CAS_LOOP(long long, old > v ? old : v); }())
__EMU_ATOMIC(atomicMin, long long, [&] { __EMU_ATOMIC_CAS_LOOP(long long, old < v ? old : v); }())
__EMU_ATOMIC(atomicAdd, float, a.fetch_add(v))
__EMU_ATOMIC(atomicAdd, double, a.fetch_add(v))
__EMU_ATOMIC(atomicExch, float, a.exchange(v))
inline unsigned short atomicCAS(unsigned short *p, unsigned short cmp, unsigned short v) {
    std::atomic_ref<unsigned short> a(*p); a.compare_exchange_strong(cmp, v); return cmp;
}
inline unsigned atomicInc(unsigned *p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    __EMU_ATOMIC_CAS_LOOP(unsigned, old >= v ? 0u : old + 1);
}
inline unsigned atomicDec(unsigned *p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    __EMU_ATOMIC_CAS_LOOP(unsigned, (old == 0 || old > v) ? v : old - 1);
}

// ---- math --------------------------------------------------------------------------
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

template <class A, class B>
inline std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, std::common_type_t<A, B>>
max(A a, B b) { using C = std::common_type_t<A, B>; return C(a) > C(b) ? C(a) : C(b); }
template <class A, class B>
inline std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, std::common_type_t<A, B>>
min(A a, B b) { using C = std::common_type_t<A, B>; return C(a) < C(b) ? C(a) : C(b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }

inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float *s, float *c) { *s = sinf(x); *c = cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x != x ? 0.0f : x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline int __float2int_rd(float x) { return int(floorf(x)); }
inline int __float2int_ru(float x) { return int(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return unsigned(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return unsigned(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; std::memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline int __mul24(int a, int b) { return int((long long)(a << 8 >> 8) * (b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffff) * (b & 0xffffff); }
inline int __mulhi(int a, int b) { return int(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned(((unsigned long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}

// ---- half, bfloat16, tf32 ----------------------------------------------------------
namespace __emu {
inline uint32_t fbits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bitsf(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// float -> binary16, round to nearest even (subnormals, overflow to inf, NaN kept)
inline uint16_t f2h(float f) {
    uint32_t x = fbits(f);
    uint16_t sign = uint16_t((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return uint16_t(sign | 0x7fff);
    if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00);      // rounds to >= 65536: inf
    if (x < 0x38800000u) {                                      // below 2^-14: subnormal
        float a = bitsf(x) * 16777216.0f;                       // exact: units of 2^-24
        return uint16_t(sign | uint16_t(nearbyintf(a)));        // 1024 is the least normal
    }
    return uint16_t(sign | ((x - 0x38000000u + 0xfffu + ((x >> 13) & 1u)) >> 13));
}
inline float h2f(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) { float v = float(m) * 5.9604644775390625e-08f; return sign ? -v : v; }
    if (e == 31) return bitsf(sign | 0x7f800000u | (m << 13));
    return bitsf(sign | ((e + 112) << 23) | (m << 13));
}
// float -> bfloat16, round to nearest even
inline uint16_t f2bf(float f) {
    uint32_t x = fbits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t(((x >> 16) & 0x8000) | 0x7fff);
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf2f(uint16_t b) { return bitsf(uint32_t(b) << 16); }
// fp32 -> tf32 as cvt.rna.tf32.f32: nearest, ties away from zero (low 13 bits cleared)
inline float to_tf32(float f) {
    uint32_t x = fbits(f);
    if ((x & 0x7f800000u) == 0x7f800000u) return f;
    return bitsf((x + 0x1000u) & 0xffffe000u);
}
// what a tensor core reads of a plain fp32 operand: the top 19 bits
inline float tf32_trunc(float f) {
    uint32_t x = fbits(f);
    if ((x & 0x7f800000u) == 0x7f800000u) return f;
    return bitsf(x & 0xffffe000u);
}
}  // namespace __emu

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

struct __attribute__((aligned(2))) __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(__half_raw r) : __x(r.x) {}
    __half(float f) : __x(::__emu::f2h(f)) {}
    __half(double f) : __x(::__emu::f2h(float(f))) {}
    __half(int v) : __x(::__emu::f2h(float(v))) {}
    __half(unsigned v) : __x(::__emu::f2h(float(v))) {}
    __half(long long v) : __x(::__emu::f2h(float(v))) {}
    __half(unsigned long long v) : __x(::__emu::f2h(float(v))) {}
    __half(short v) : __x(::__emu::f2h(float(v))) {}
    __half(unsigned short v) : __x(::__emu::f2h(float(v))) {}
    operator float() const { return ::__emu::h2f(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
};
struct __attribute__((aligned(2))) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(::__emu::f2bf(f)) {}
    __nv_bfloat16(double f) : __x(::__emu::f2bf(float(f))) {}
    __nv_bfloat16(int v) : __x(::__emu::f2bf(float(v))) {}
    __nv_bfloat16(unsigned v) : __x(::__emu::f2bf(float(v))) {}
    __nv_bfloat16(long long v) : __x(::__emu::f2bf(float(v))) {}
    __nv_bfloat16(unsigned long long v) : __x(::__emu::f2bf(float(v))) {}
    __nv_bfloat16(short v) : __x(::__emu::f2bf(float(v))) {}
    __nv_bfloat16(unsigned short v) : __x(::__emu::f2bf(float(v))) {}
    operator float() const { return ::__emu::bf2f(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;
struct __attribute__((aligned(4))) __half2 { __half x, y; };
struct __attribute__((aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

#define __EMU_HALF_OPS(H, H2, F2H, SFX)                                                   \
    inline H operator+(const H &a, const H &b) { return H(float(a) + float(b)); }         \
    inline H operator-(const H &a, const H &b) { return H(float(a) - float(b)); }         \
    inline H operator*(const H &a, const H &b) { return H(float(a) * float(b)); }         \
    inline H operator/(const H &a, const H &b) { return H(float(a) / float(b)); }         \
    inline H operator-(const H &a) { H r = a; r.__x ^= 0x8000; return r; }               \
    inline H operator+(const H &a) { return a; }                                         \
    inline H &operator+=(H &a, const H &b) { return a = a + b; }                          \
    inline H &operator-=(H &a, const H &b) { return a = a - b; }                          \
    inline H &operator*=(H &a, const H &b) { return a = a * b; }                          \
    inline H &operator/=(H &a, const H &b) { return a = a / b; }                          \
    inline bool operator==(const H &a, const H &b) { return float(a) == float(b); }       \
    inline bool operator!=(const H &a, const H &b) { return float(a) != float(b); }       \
    inline bool operator<(const H &a, const H &b) { return float(a) < float(b); }         \
    inline bool operator>(const H &a, const H &b) { return float(a) > float(b); }         \
    inline bool operator<=(const H &a, const H &b) { return float(a) <= float(b); }       \
    inline bool operator>=(const H &a, const H &b) { return float(a) >= float(b); }       \
    inline H __hadd(H a, H b) { return a + b; }

__EMU_HALF_OPS(__half, __half2, f2h, )
__EMU_HALF_OPS(__nv_bfloat16, __nv_bfloat162, f2bf, _bf)
inline __half2 make_half2(__half a, __half b) { return __half2{a, b}; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
#undef __EMU_HALF_OPS

// conversions
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __half __double2half(double d) { return __half(float(d)); }
inline __half __int2half_rn(int v) { return __half(float(v)); }
inline int __half2int_rn(__half h) { return int(nearbyintf(float(h))); }
inline int __half2int_rz(__half h) { return int(float(h)); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return short(h.__x); }
inline __half __ushort_as_half(unsigned short v) { return __half(__half_raw{v}); }
inline __half __short_as_half(short v) { return __half(__half_raw{(unsigned short)v}); }
inline __half2 __float2half2_rn(float f) { return __half2{__half(f), __half(f)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __half2{__half(v.x), __half(v.y)}; }
inline float2 __half22float2(__half2 h) { return float2{float(h.x), float(h.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __half2half2(__half a) { return __half2{a, a}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16(__nv_bfloat16_raw{v}); }
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return __nv_bfloat162{__nv_bfloat16(f), __nv_bfloat16(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __nv_bfloat162{__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{float(h.x), float(h.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162{a, a}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }

// arithmetic intrinsics: computed in fp32 and rounded once (exact for + - * /, since
// fp32 carries more than twice the bits of either format); fma in double
#define __EMU_HALF_MATH(H, H2, S, S2)                                                     \
    inline H __h##sub##S(H a, H b) { return a - b; }                                      \
    inline H __h##mul##S(H a, H b) { return a * b; }                                      \
    inline H __h##div##S(H a, H b) { return a / b; }                                      \
    inline H __h##neg##S(H a) { return -a; }                                              \
    inline H __h##fma##S(H a, H b, H c) { return H(float(double(float(a)) * float(b) + float(c))); } \
    inline H __h##max##S(H a, H b) { return H(fmaxf(float(a), float(b))); }               \
    inline H __h##min##S(H a, H b) { return H(fminf(float(a), float(b))); }               \
    inline bool __h##gt##S(H a, H b) { return a > b; }                                    \
    inline bool __h##lt##S(H a, H b) { return a < b; }                                    \
    inline bool __h##ge##S(H a, H b) { return a >= b; }                                   \
    inline bool __h##le##S(H a, H b) { return a <= b; }                                   \
    inline bool __h##eq##S(H a, H b) { return a == b; }                                   \
    inline bool __h##isnan##S(H a) { return float(a) != float(a); }                      \
    inline H2 __h##add2##S2(H2 a, H2 b) { return H2{a.x + b.x, a.y + b.y}; }             \
    inline H2 __h##sub2##S2(H2 a, H2 b) { return H2{a.x - b.x, a.y - b.y}; }             \
    inline H2 __h##mul2##S2(H2 a, H2 b) { return H2{a.x * b.x, a.y * b.y}; }             \
    inline H2 __h##fma2##S2(H2 a, H2 b, H2 c) {                                          \
        return H2{__h##fma##S(a.x, b.x, c.x), __h##fma##S(a.y, b.y, c.y)}; }             \
    inline H2 __h##max2##S2(H2 a, H2 b) { return H2{__h##max##S(a.x, b.x), __h##max##S(a.y, b.y)}; } \
    inline H2 __h##min2##S2(H2 a, H2 b) { return H2{__h##min##S(a.x, b.x), __h##min##S(a.y, b.y)}; }
__EMU_HALF_MATH(__half, __half2, , )
__EMU_HALF_MATH(__nv_bfloat16, __nv_bfloat162, , )
#undef __EMU_HALF_MATH
inline __half hexp(__half a) { return __half(expf(float(a))); }
inline __half hlog(__half a) { return __half(logf(float(a))); }
inline __half hsqrt(__half a) { return __half(sqrtf(float(a))); }
inline __half hrsqrt(__half a) { return __half(1.0f / sqrtf(float(a))); }
inline __half __habs(__half a) { a.__x &= 0x7fff; return a; }
inline __nv_bfloat16 hexp(__nv_bfloat16 a) { return __nv_bfloat16(expf(float(a))); }
inline __nv_bfloat16 hlog(__nv_bfloat16 a) { return __nv_bfloat16(logf(float(a))); }
inline __nv_bfloat16 hsqrt(__nv_bfloat16 a) { return __nv_bfloat16(sqrtf(float(a))); }
inline __nv_bfloat16 hrsqrt(__nv_bfloat16 a) { return __nv_bfloat16(1.0f / sqrtf(float(a))); }
inline __nv_bfloat16 __habs(__nv_bfloat16 a) { a.__x &= 0x7fff; return a; }

inline __half atomicAdd(__half *p, __half v) {
    std::atomic_ref<unsigned short> a(*reinterpret_cast<unsigned short *>(p));
    unsigned short old = a.load(), want;
    do { want = __half(float(__ushort_as_half(old)) + float(v)).__x; } while (!a.compare_exchange_weak(old, want));
    return __ushort_as_half(old);
}
inline __half2 atomicAdd(__half2 *p, __half2 v) {
    std::atomic_ref<unsigned> a(*reinterpret_cast<unsigned *>(p));
    unsigned old = a.load(), want;
    do {
        __half2 o; std::memcpy(&o, &old, 4);
        __half2 n = __hadd2(o, v); std::memcpy(&want, &n, 4);
    } while (!a.compare_exchange_weak(old, want));
    __half2 r; std::memcpy(&r, &old, 4); return r;
}

// ---- wmma --------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision { struct tf32 {}; }

inline float __float_to_tf32(float f) { return ::__emu::to_tf32(f); }

template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <class Use, int M, int N, int K, class T>
constexpr bool valid_shape() {
    if constexpr (std::is_same_v<Use, accumulator>)
        return (std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, int> ||
                std::is_same_v<T, double>) &&
               ((M == 16 && N == 16 && (K == 16 || K == 8)) || (M == 32 && N == 8 && K == 16) ||
                (M == 8 && N == 32 && K == 16) || (M == 8 && N == 8 && K == 4));
    else if constexpr (std::is_same_v<T, precision::tf32>)
        return M == 16 && N == 16 && K == 8;
    else if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16> ||
                       std::is_same_v<T, signed char> || std::is_same_v<T, unsigned char>)
        return (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
               (M == 8 && N == 32 && K == 16);
    else if constexpr (std::is_same_v<T, double>)
        return M == 8 && N == 8 && K == 4;
    else
        return false;
}

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(valid_shape<Use, M, N, K, T>(), "not a wmma fragment shape/type CUDA has");
    static_assert(std::is_same_v<Use, accumulator> == std::is_same_v<Layout, void>,
                  "matrix_a/matrix_b fragments take a layout, accumulators do not");
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    using element_type = typename storage<T>::type;
    using storage_element_type = element_type;
    enum { num_elements = rows * cols };
    element_type x[rows * cols];   // every lane holds the whole tile, row-major
};

template <class E>
inline void check_ptr(const char *what, const void *p, unsigned ldm) {
    if (reinterpret_cast<uintptr_t>(p) % 32)
        ::__emu::fail("%s: pointer %p is not 256-bit aligned", what, p);
    if ((ldm * sizeof(E)) % 16)
        ::__emu::fail("%s: ldm %u is not a multiple of 16 bytes (%zu elements)", what, ldm,
                      16 / sizeof(E));
}

template <class Use, int M, int N, int K, class T, class Layout, class P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout> &f, const P *p, unsigned ldm) {
    using F = fragment<Use, M, N, K, T, Layout>;
    static_assert(std::is_same_v<P, typename F::element_type>, "load_matrix_sync pointer type");
    check_ptr<P>("load_matrix_sync", p, ldm);
    for (int r = 0; r < F::rows; r++)
        for (int c = 0; c < F::cols; c++)
            f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}
template <int M, int N, int K, class T, class P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T> &f, const P *p, unsigned ldm,
                             layout_t layout) {
    static_assert(std::is_same_v<P, T>, "load_matrix_sync pointer type");
    check_ptr<P>("load_matrix_sync", p, ldm);
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++)
            f.x[r * N + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}
template <int M, int N, int K, class T, class P>
inline void store_matrix_sync(P *p, const fragment<accumulator, M, N, K, T> &f, unsigned ldm,
                              layout_t layout) {
    static_assert(std::is_same_v<P, T>, "store_matrix_sync pointer type");
    check_ptr<P>("store_matrix_sync", p, ldm);
    for (int r = 0; r < M; r++)
        for (int c = 0; c < N; c++)
            (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
}
template <class Use, int M, int N, int K, class T, class Layout, class V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout> &f, const V &v) {
    using E = typename fragment<Use, M, N, K, T, Layout>::element_type;
    for (auto &e : f.x) e = E(v);
}

constexpr size_t MMA_MEMO_MAX = 1 << 16;   // calls remembered per warp and block

template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC, class TD>
inline void mma_sync(fragment<accumulator, M, N, K, TD> &d,
                     const fragment<matrix_a, M, N, K, TA, LA> &a,
                     const fragment<matrix_b, M, N, K, TB, LB> &b,
                     const fragment<accumulator, M, N, K, TC> &c, bool satf = false) {
    static_assert(std::is_same_v<TA, TB>, "wmma::mma_sync: a and b of different types");
    constexpr bool tf32 = std::is_same_v<TA, precision::tf32>;
    constexpr size_t na = sizeof a.x, nb = sizeof b.x, nc = sizeof c.x, nd = sizeof d.x;
    ::__emu::Worker *w = ::__emu::t_worker;
    ::__emu::Fiber &f = ::__emu::cur_fiber();
    ::__emu::WarpState &ws = w->warps[f.warp];
    size_t call = f.mma_calls++;
    if (call < ws.nmma) {
        ::__emu::MmaMemo &m = ws.mma[call];
        if (m.key.size() == na + nb + nc + 1 && m.key[na + nb + nc] == satf &&
            std::memcmp(m.key.data(), a.x, na) == 0 &&
            std::memcmp(m.key.data() + na, b.x, nb) == 0 &&
            std::memcmp(m.key.data() + na + nb, c.x, nc) == 0) {
            std::memcpy(d.x, m.val.data(), nd);
            return;
        }
    }
    bool remember = call == ws.nmma && call < MMA_MEMO_MAX;
    if (remember) {
        if (ws.mma.size() <= call) ws.mma.resize(call + 1);
        ::__emu::MmaMemo &m = ws.mma[call];
        m.key.resize(na + nb + nc + 1);
        std::memcpy(m.key.data(), a.x, na);
        std::memcpy(m.key.data() + na, b.x, nb);
        std::memcpy(m.key.data() + na + nb, c.x, nc);
        m.key[na + nb + nc] = satf;
    }
    float A[M * K], B[K * N];
    for (int i = 0; i < M * K; i++) A[i] = tf32 ? ::__emu::tf32_trunc(float(a.x[i])) : float(a.x[i]);
    for (int i = 0; i < K * N; i++) B[i] = tf32 ? ::__emu::tf32_trunc(float(b.x[i])) : float(b.x[i]);
    float D[M * N];
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float acc = float(c.x[m * N + n]);
            for (int k = 0; k < K; k++) acc += A[m * K + k] * B[k * N + n];
            if (satf) acc = acc != acc ? 0.0f : acc < 0.0f ? 0.0f : acc > 1.0f ? 1.0f : acc;
            D[m * N + n] = acc;
        }
    for (int i = 0; i < M * N; i++) d.x[i] = TD(D[i]);
    if (remember) {
        ::__emu::MmaMemo &m = ws.mma[call];
        m.val.resize(nd);
        std::memcpy(m.val.data(), d.x, nd);
        ws.nmma = call + 1;
    }
}
}  // namespace wmma
}  // namespace nvcuda
