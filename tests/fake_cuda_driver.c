/* A stand-in for the NVIDIA driver (libcuda.so.1), so the CUDA host runtime of a compiled
 * net can be tested on a machine without a GPU (GRAPHC_CUDA_DRIVER=path/to/this.so).
 *
 * Device memory is host memory, tracked allocation by allocation: a kernel argument or a
 * copy that points outside every live allocation is an illegal address (reported at the
 * next synchronization, as a GPU does).  The cubin must be an ELF image for the CUDA
 * machine that contains the kernel's name; the kernels themselves are the test program's,
 * run here on the CPU from their argument lists ("affine", "rowsum": see
 * tests/test_cuda_runtime.py), or any kernels, run by a launcher the test registers
 * (fake_set_kernels: graphc's CUDA emulator running the module's CUDA C on the CPU).  Work runs when it is enqueued; stream capture records
 * launches into a graph that cuGraphLaunch replays.  Every call that needs a current
 * context checks there is one.
 *
 * FAKE_CUDA (read at cuInit): comma-separated settings
 *     devices=N       the number of GPUs (default 1)
 *     cc=MAJOR.MINOR  their compute capability (default 9.0)
 *     fail=NAME:CODE  the driver function NAME (e.g. cuMemAlloc_v2) returns CODE
 *     mem=BYTES       device memory (default 1 GiB): more gives CUDA_ERROR_OUT_OF_MEMORY
 * fake_stats() reports live allocations, contexts retained, graph and kernel launches. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

enum { OK = 0, E_INVALID_VALUE = 1, E_OOM = 2, E_NOT_INIT = 3, E_NO_DEVICE = 100,
       E_INVALID_DEVICE = 101, E_INVALID_IMAGE = 200, E_INVALID_CONTEXT = 201,
       E_NOT_FOUND = 500, E_ILLEGAL_ADDRESS = 700, E_LAUNCH_FAILED = 719,
       E_CAPTURE_UNSUPPORTED = 900 };

static struct {
    int inited, devices, cc_major, cc_minor;
    char fail_name[64];
    int fail_code;
    size_t mem_limit, mem_used;
    int sticky;                    /* an error from "the GPU", reported at synchronization */
    int ctx_retained, ctx_depth;
    int graph_launches, kernel_launches;
} S;

typedef struct { uint64_t ptr; size_t size; int host; } alloc_t;
static alloc_t allocs[4096];
static int nallocs;

struct CUctx_st { int dev; };
static struct CUctx_st ctxs[8];

struct CUmod_st { const char *image; size_t size; };
/* kind 0 affine, 1 rowsum (built in), 2 any other kernel, run by the launcher a test sets
 * with fake_set_kernels (e.g. graphc's CUDA emulator); its parameters' sizes come from the
 * signature callback: one letter per parameter, p pointer, l 64-bit int, d double (8
 * bytes), i 32-bit int, f float (4 bytes) */
struct CUfunc_st { int kind; int max_smem; char name[128]; int nparams; unsigned char size[64]; };
static struct CUfunc_st funcs[2] = { { 0, 48 * 1024, "affine", 5, { 8, 8, 8, 4, 4 } },
                                     { 1, 48 * 1024, "rowsum", 4, { 8, 8, 8, 4 } } };
static struct CUfunc_st ext_funcs[256];
static int n_ext_funcs;
typedef int (*launch_cb_t)(const char *name, const unsigned *grid_block, unsigned smem,
                           const unsigned char *params, int nparams);
typedef int (*signature_cb_t)(const char *name, char *sig, int cap);
static launch_cb_t ext_launch;
static signature_cb_t ext_signature;

void fake_set_kernels(launch_cb_t launch, signature_cb_t signature) {
    ext_launch = launch;
    ext_signature = signature;
}

typedef struct {
    struct CUfunc_st *f;
    unsigned grid[3], block[3], smem;
    unsigned char params[512];
} rec_t;
struct CUstream_st { int capturing; rec_t *recs; int nrecs; };
struct CUgraph_st { rec_t *recs; int nrecs; };
struct CUgraphExec_st { rec_t *recs; int nrecs; };
struct CUevent_st { double t; int recorded; };

static int failing(const char *name) {
    return S.fail_name[0] && strcmp(S.fail_name, name) == 0;
}
#define CHECK_FAIL(name) do { if (failing(name)) return S.fail_code; } while (0)
#define NEED_CTX() do { if (S.ctx_depth <= 0) return E_INVALID_CONTEXT; } while (0)

static void configure(void) {
    const char *env = getenv("FAKE_CUDA");
    char buf[512], *tok, *save;
    S.devices = 1; S.cc_major = 9; S.cc_minor = 0; S.mem_limit = (size_t)1 << 30;
    if (!env) return;
    snprintf(buf, sizeof buf, "%s", env);
    for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (sscanf(tok, "devices=%d", &S.devices) == 1) continue;
        if (sscanf(tok, "cc=%d.%d", &S.cc_major, &S.cc_minor) == 2) continue;
        if (sscanf(tok, "mem=%zu", &S.mem_limit) == 1) continue;
        if (sscanf(tok, "fail=%63[^:]:%d", S.fail_name, &S.fail_code) == 2) continue;
    }
}

/* ---- memory ------------------------------------------------------------------------- */

static alloc_t *find_alloc(uint64_t p, size_t n) {
    for (int i = 0; i < nallocs; i++)
        if (p >= allocs[i].ptr && p + n <= allocs[i].ptr + allocs[i].size) return &allocs[i];
    return NULL;
}

static CUresult add_alloc(void **out, size_t n, int host) {
    if (nallocs == 4096) return E_OOM;
    if (!host && S.mem_used + n > S.mem_limit) return E_OOM;
    void *p = malloc(n ? n : 1);
    if (!p) return E_OOM;
    memset(p, 0xa5, n);            /* fresh device memory is not zero */
    allocs[nallocs++] = (alloc_t){ (uint64_t)(uintptr_t)p, n, host };
    if (!host) S.mem_used += n;
    *out = p;
    return OK;
}

static CUresult free_alloc(uint64_t p, int host) {
    for (int i = 0; i < nallocs; i++)
        if (allocs[i].ptr == p && allocs[i].host == host) {
            if (!host) S.mem_used -= allocs[i].size;
            free((void *)(uintptr_t)p);
            allocs[i] = allocs[--nallocs];
            return OK;
        }
    return E_INVALID_VALUE;
}

/* a device access of n bytes at p; outside every allocation: the GPU faults */
static int dev_ok(uint64_t p, size_t n) {
    alloc_t *a = find_alloc(p, n);
    if (!a || a->host) {
        S.sticky = E_ILLEGAL_ADDRESS;
        return 0;
    }
    return 1;
}

/* ---- the kernels of the test program -------------------------------------------------- */

/* affine(float *y, const float *x, const float *w, int n, float a): y = a * x + w
 * rowsum(float *z, const float *y, long long cols, int rows): z[r] = sum of row r */
static void run_kernel(const rec_t *r) {
    const unsigned char *p = r->params;
    uint64_t a0, a1, a2;
    S.kernel_launches++;
    if (r->smem > (unsigned)r->f->max_smem) { S.sticky = E_INVALID_VALUE; return; }
    if (r->f->kind == 2) {
        unsigned gb[6] = { r->grid[0], r->grid[1], r->grid[2], r->block[0], r->block[1],
                           r->block[2] };
        if (!ext_launch || ext_launch(r->f->name, gb, r->smem, p, r->f->nparams) != 0)
            S.sticky = E_LAUNCH_FAILED;
        return;
    }
    memcpy(&a0, p, 8); memcpy(&a1, p + 8, 8); memcpy(&a2, p + 16, 8);
    long threads = (long)r->grid[0] * r->block[0];
    if (r->f->kind == 0) {
        int32_t n; float a;
        memcpy(&n, p + 24, 4); memcpy(&a, p + 28, 4);
        if (n > threads) n = (int32_t)threads;
        if (n <= 0) return;
        if (!dev_ok(a0, 4 * (size_t)n) || !dev_ok(a1, 4 * (size_t)n) || !dev_ok(a2, 4 * (size_t)n)) return;
        float *y = (float *)(uintptr_t)a0;
        const float *x = (const float *)(uintptr_t)a1, *w = (const float *)(uintptr_t)a2;
        for (int32_t i = 0; i < n; i++) y[i] = a * x[i] + w[i];
    } else {
        int64_t cols; int32_t rows;
        memcpy(&cols, p + 16, 8); memcpy(&rows, p + 24, 4);
        if (rows > threads) rows = (int32_t)threads;
        if (rows <= 0) return;
        if (!dev_ok(a0, 4 * (size_t)rows) || !dev_ok(a1, 4 * (size_t)rows * (size_t)cols)) return;
        float *z = (float *)(uintptr_t)a0;
        const float *y = (const float *)(uintptr_t)a1;
        for (int32_t i = 0; i < rows; i++) {
            float s = 0;
            for (int64_t c = 0; c < cols; c++) s += y[i * cols + c];
            z[i] = s;
        }
    }
}

/* ---- the driver API ------------------------------------------------------------------- */

CUresult fake_stats(int *live_allocs, int *contexts, int *graph_launches, int *kernel_launches) {
    *live_allocs = nallocs; *contexts = S.ctx_retained;
    *graph_launches = S.graph_launches; *kernel_launches = S.kernel_launches;
    return OK;
}

CUresult cuInit(unsigned flags) {
    (void)flags;
    configure();
    CHECK_FAIL("cuInit");
    S.inited = 1;
    return S.devices > 0 ? OK : E_NO_DEVICE;
}
CUresult cuDriverGetVersion(int *v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int *n) {
    if (!S.inited) return E_NOT_INIT;
    CHECK_FAIL("cuDeviceGetCount");
    *n = S.devices;
    return OK;
}
CUresult cuDeviceGet(int *d, int i) {
    if (i < 0 || i >= S.devices) return E_INVALID_DEVICE;
    *d = i;
    return OK;
}
CUresult cuDeviceGetName(char *name, int len, int d) {
    snprintf(name, (size_t)len, "Fake GPU %d", d);
    return OK;
}
CUresult cuDeviceGetAttribute(int *v, int attr, int d) {
    (void)d;
    if (attr == 75) *v = S.cc_major;
    else if (attr == 76) *v = S.cc_minor;
    else return E_INVALID_VALUE;
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(struct CUctx_st **c, int d) {
    CHECK_FAIL("cuDevicePrimaryCtxRetain");
    ctxs[d].dev = d;
    *c = &ctxs[d];
    S.ctx_retained++;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(int d) { (void)d; S.ctx_retained--; return OK; }
CUresult cuCtxPushCurrent_v2(struct CUctx_st *c) {
    if (!c) return E_INVALID_CONTEXT;
    S.ctx_depth++;
    return OK;
}
CUresult cuCtxPopCurrent_v2(struct CUctx_st **c) {
    if (S.ctx_depth <= 0) return E_INVALID_CONTEXT;
    S.ctx_depth--;
    if (c) *c = &ctxs[0];
    return OK;
}
CUresult cuModuleLoadData(struct CUmod_st **m, const void *image) {
    NEED_CTX();
    CHECK_FAIL("cuModuleLoadData");
    const unsigned char *e = image;
    if (memcmp(e, "\x7f" "ELF", 4) != 0 || e[18] != 190) return E_INVALID_IMAGE;  /* EM_CUDA */
    uint64_t shoff; uint16_t shentsize, shnum;   /* the image's size: the end of its section headers */
    memcpy(&shoff, e + 40, 8); memcpy(&shentsize, e + 58, 2); memcpy(&shnum, e + 60, 2);
    *m = calloc(1, sizeof **m);
    (*m)->image = image;
    (*m)->size = shoff + (size_t)shentsize * shnum;
    return OK;
}
CUresult cuModuleUnload(struct CUmod_st *m) { NEED_CTX(); free(m); return OK; }
CUresult cuModuleGetFunction(struct CUfunc_st **f, struct CUmod_st *m, const char *name) {
    NEED_CTX();
    if (!memmem(m->image, m->size, name, strlen(name) + 1)) return E_NOT_FOUND;
    if (ext_signature) {      /* every kernel through the test's launcher */
        char sig[65];
        struct CUfunc_st *e;
        if (n_ext_funcs == 256 || strlen(name) >= sizeof e->name ||
            ext_signature(name, sig, sizeof sig) != 0) return E_NOT_FOUND;
        e = &ext_funcs[n_ext_funcs++];
        memset(e, 0, sizeof *e);
        e->kind = 2;
        e->max_smem = 48 * 1024;
        strcpy(e->name, name);
        for (int i = 0; sig[i] && i < 64; i++, e->nparams++)
            e->size[i] = (sig[i] == 'i' || sig[i] == 'f') ? 4 : 8;
        *f = e;
        return OK;
    }
    if (strcmp(name, "affine") == 0) *f = &funcs[0];
    else if (strcmp(name, "rowsum") == 0) *f = &funcs[1];
    else return E_NOT_FOUND;
    return OK;
}
CUresult cuFuncSetAttribute(struct CUfunc_st *f, int attr, int v) {
    if (attr != 8 || v > 227 * 1024) return E_INVALID_VALUE;
    f->max_smem = v;
    return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    NEED_CTX();
    CHECK_FAIL("cuMemAlloc_v2");
    void *q;
    CUresult r = add_alloc(&q, n, 0);
    if (r == OK) *p = (CUdeviceptr)(uintptr_t)q;
    return r;
}
CUresult cuMemFree_v2(CUdeviceptr p) { NEED_CTX(); return free_alloc(p, 0); }
CUresult cuMemGetInfo_v2(size_t *f, size_t *t) { *f = S.mem_limit - S.mem_used; *t = S.mem_limit; return OK; }
CUresult cuMemAllocHost_v2(void **p, size_t n) { NEED_CTX(); return add_alloc(p, n, 1); }
CUresult cuMemFreeHost(void *p) { NEED_CTX(); return free_alloc((uint64_t)(uintptr_t)p, 1); }

static CUresult copy(uint64_t dst, int dst_dev, uint64_t src, int src_dev, size_t n,
                     struct CUstream_st *s) {
    NEED_CTX();
    if (s && s->capturing) return E_CAPTURE_UNSUPPORTED;
    if ((dst_dev && !dev_ok(dst, n)) || (src_dev && !dev_ok(src, n))) return OK;   /* faults */
    memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void *h, size_t n) {
    return copy(d, 1, (uint64_t)(uintptr_t)h, 0, n, NULL);
}
CUresult cuMemcpyDtoH_v2(void *h, CUdeviceptr d, size_t n) {
    CUresult r = copy((uint64_t)(uintptr_t)h, 0, d, 1, n, NULL);
    return r == OK && S.sticky ? S.sticky : r;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *h, size_t n, struct CUstream_st *s) {
    /* an async host-to-device copy must come from page-locked memory to be async */
    if (!find_alloc((uint64_t)(uintptr_t)h, n)) return E_INVALID_VALUE;
    return copy(d, 1, (uint64_t)(uintptr_t)h, 0, n, s);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, struct CUstream_st *s) {
    return copy(d, 1, src, 1, n, s);
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, struct CUstream_st *s) {
    NEED_CTX();
    if (s && s->capturing) return E_CAPTURE_UNSUPPORTED;
    if (n && !dev_ok(d, 4 * n)) return OK;
    for (size_t i = 0; i < n; i++) memcpy((char *)(uintptr_t)d + 4 * i, &v, 4);
    return OK;
}
CUresult cuStreamCreate(struct CUstream_st **s, unsigned flags) {
    (void)flags;
    NEED_CTX();
    *s = calloc(1, sizeof **s);
    return OK;
}
CUresult cuStreamDestroy_v2(struct CUstream_st *s) { NEED_CTX(); free(s->recs); free(s); return OK; }
CUresult cuStreamSynchronize(struct CUstream_st *s) {
    (void)s;
    NEED_CTX();
    CHECK_FAIL("cuStreamSynchronize");
    return S.sticky;
}
CUresult cuStreamBeginCapture_v2(struct CUstream_st *s, int mode) {
    (void)mode;
    NEED_CTX();
    if (s->capturing) return E_INVALID_VALUE;
    s->capturing = 1;
    s->nrecs = 0;
    return OK;
}
CUresult cuStreamEndCapture(struct CUstream_st *s, struct CUgraph_st **g) {
    NEED_CTX();
    if (!s->capturing) return E_INVALID_VALUE;
    s->capturing = 0;
    *g = calloc(1, sizeof **g);
    (*g)->recs = s->recs;
    (*g)->nrecs = s->nrecs;
    s->recs = NULL;
    s->nrecs = 0;
    return OK;
}
CUresult cuGraphInstantiateWithFlags(struct CUgraphExec_st **e, struct CUgraph_st *g,
                                     unsigned long long flags) {
    (void)flags;
    NEED_CTX();
    CHECK_FAIL("cuGraphInstantiateWithFlags");
    *e = calloc(1, sizeof **e);
    (*e)->recs = malloc(sizeof(rec_t) * (size_t)(g->nrecs ? g->nrecs : 1));
    memcpy((*e)->recs, g->recs, sizeof(rec_t) * (size_t)g->nrecs);
    (*e)->nrecs = g->nrecs;
    return OK;
}
CUresult cuGraphLaunch(struct CUgraphExec_st *e, struct CUstream_st *s) {
    NEED_CTX();
    if (s && s->capturing) return E_CAPTURE_UNSUPPORTED;
    S.graph_launches++;
    for (int i = 0; i < e->nrecs && !S.sticky; i++) run_kernel(&e->recs[i]);
    return OK;
}
CUresult cuGraphDestroy(struct CUgraph_st *g) { free(g->recs); free(g); return OK; }
CUresult cuGraphExecDestroy(struct CUgraphExec_st *e) { free(e->recs); free(e); return OK; }
CUresult cuLaunchKernel(struct CUfunc_st *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned smem, struct CUstream_st *s,
                        void **params, void **extra) {
    NEED_CTX();
    CHECK_FAIL("cuLaunchKernel");
    if (extra || (f->nparams && !params) || !gx || !gy || !gz || !bx || !by || !bz ||
        (unsigned long)bx * by * bz > 1024 || (f->kind != 2 && (gy != 1 || gz != 1 || by != 1 || bz != 1)))
        return E_INVALID_VALUE;
    if (smem > (unsigned)f->max_smem) return E_INVALID_VALUE;
    rec_t r = { f, { gx, gy, gz }, { bx, by, bz }, smem, { 0 } };
    size_t at = 0;
    for (int i = 0; i < f->nparams; i++) {   /* the driver copies the values now */
        if (at + f->size[i] > sizeof r.params) return E_INVALID_VALUE;
        memcpy(r.params + at, params[i], f->size[i]);
        at += f->size[i];
    }
    if (s->capturing) {
        s->recs = realloc(s->recs, sizeof(rec_t) * (size_t)(s->nrecs + 1));
        s->recs[s->nrecs++] = r;
        return OK;
    }
    if (!S.sticky) run_kernel(&r);
    return OK;
}
CUresult cuEventCreate(struct CUevent_st **e, unsigned flags) {
    (void)flags;
    NEED_CTX();
    *e = calloc(1, sizeof **e);
    return OK;
}
CUresult cuEventDestroy_v2(struct CUevent_st *e) { free(e); return OK; }
CUresult cuEventRecord(struct CUevent_st *e, struct CUstream_st *s) {
    struct timespec ts;
    NEED_CTX();
    if (s && s->capturing) return E_CAPTURE_UNSUPPORTED;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->t = (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    e->recorded = 1;
    return OK;
}
CUresult cuEventSynchronize(struct CUevent_st *e) {
    NEED_CTX();
    if (!e->recorded) return OK;
    return S.sticky;
}
CUresult cuEventElapsedTime_v2(float *ms, struct CUevent_st *a, struct CUevent_st *b) {
    if (!a->recorded || !b->recorded) return E_INVALID_VALUE;
    *ms = (float)(1e3 * (b->t - a->t));
    return OK;
}

static const char *err_name(CUresult r) {
    switch (r) {
    case OK: return "CUDA_SUCCESS";
    case E_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case E_OOM: return "CUDA_ERROR_OUT_OF_MEMORY";
    case E_NOT_INIT: return "CUDA_ERROR_NOT_INITIALIZED";
    case E_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case E_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case E_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case E_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case 209: return "CUDA_ERROR_NO_BINARY_FOR_GPU";
    case E_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case E_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case E_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case E_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    default: return NULL;
    }
}
CUresult cuGetErrorName(CUresult r, const char **s) {
    *s = err_name(r);
    return *s ? OK : E_INVALID_VALUE;
}
CUresult cuGetErrorString(CUresult r, const char **s) {
    *s = err_name(r) ? "as the fake driver reports it" : NULL;
    return *s ? OK : E_INVALID_VALUE;
}
