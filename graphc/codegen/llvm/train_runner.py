"""A small C thread pool that runs a compiled training pass's steps in process.

The steps are the JIT-compiled functions of a training program (``train.py``), each

    void step(i8 *arena, const i8 *weights, i8 *scratch, i64 part, i64 nparts)

run as ``nparts`` parts claimed by the threads from an atomic counter; a step starts
when every part of the one before it has finished.  The calling thread is thread 0; the
others spin for a while between steps and sleep between passes.  ``weights`` is the
net's parameter buffer (numpy memory the solver updates in place), ``arena`` the
planned activations, gradients and temporaries, ``scratch`` one region per thread.

The C source below is compiled once with the system C compiler into the graphc cache
(keyed by its hash) and loaded with ctypes; ``run`` releases the GIL.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from ...errors import GraphcError

SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*kfn)(char *, const char *, char *, int64_t, int64_t);

typedef struct pool {
    int nthreads;
    pthread_t *threads;
    /* the current pass */
    kfn *fns;
    const int64_t *nparts;
    int nsteps;
    char *arena;
    const char *weights;
    char *scratch;
    int64_t scratch_stride;
    _Atomic int64_t *claimed;
    _Atomic int64_t *done;
    int64_t cap;
    /* synchronisation */
    atomic_uint gen;
    atomic_int finished;
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool;

struct arg { pool *p; int tid; };

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void work(pool *p, int tid) {
    char *scr = p->scratch + (int64_t)tid * p->scratch_stride;
    for (int s = 0; s < p->nsteps; s++) {
        int64_t n = p->nparts[s];
        for (;;) {
            int64_t i = atomic_fetch_add_explicit(&p->claimed[s], 1, memory_order_acq_rel);
            if (i >= n) break;
            p->fns[s](p->arena, p->weights, scr, i, n);
            atomic_fetch_add_explicit(&p->done[s], 1, memory_order_acq_rel);
        }
        int spins = 0;
        while (atomic_load_explicit(&p->done[s], memory_order_acquire) < n) {
            relax();
            if (++spins > 100000) { sched_yield(); spins = 0; }
        }
    }
}

static void *worker(void *v) {
    struct arg *a = v;
    pool *p = a->p;
    int tid = a->tid;
    free(a);
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load_explicit(&p->gen, memory_order_acquire);
        for (int i = 0; g == seen && i < 20000 && !atomic_load(&p->stop); i++) {
            relax();
            g = atomic_load_explicit(&p->gen, memory_order_acquire);
        }
        if (g == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->gen)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = g;
        work(p, tid);
        atomic_fetch_add_explicit(&p->finished, 1, memory_order_acq_rel);
    }
}

void *gtr_create(int nthreads) {
    pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->nthreads = nthreads < 1 ? 1 : nthreads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = calloc((size_t)p->nthreads, sizeof(pthread_t));
    for (int t = 1; t < p->nthreads; t++) {
        struct arg *a = malloc(sizeof *a);
        a->p = p;
        a->tid = t;
        pthread_create(&p->threads[t], NULL, worker, a);
    }
    return p;
}

int gtr_num_threads(void *v) { return ((pool *)v)->nthreads; }

int gtr_run(void *v, kfn *fns, const int64_t *nparts, int nsteps, char *arena,
            const char *weights, char *scratch, int64_t scratch_stride) {
    pool *p = v;
    if (nsteps > p->cap) {
        free((void *)p->claimed);
        free((void *)p->done);
        p->claimed = calloc((size_t)nsteps, sizeof(int64_t));
        p->done = calloc((size_t)nsteps, sizeof(int64_t));
        if (!p->claimed || !p->done) return 1;
        p->cap = nsteps;
    }
    for (int s = 0; s < nsteps; s++) {
        atomic_store_explicit(&p->claimed[s], 0, memory_order_relaxed);
        atomic_store_explicit(&p->done[s], 0, memory_order_relaxed);
    }
    p->fns = fns; p->nparts = nparts; p->nsteps = nsteps;
    p->arena = arena; p->weights = weights; p->scratch = scratch;
    p->scratch_stride = scratch_stride;
    atomic_store(&p->finished, 0);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->gen, 1, memory_order_acq_rel);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    work(p, 0);
    while (atomic_load_explicit(&p->finished, memory_order_acquire) < p->nthreads - 1) relax();
    return 0;
}

void gtr_destroy(void *v) {
    pool *p = v;
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int t = 1; t < p->nthreads; t++) pthread_join(p->threads[t], NULL);
    free(p->threads);
    free((void *)p->claimed);
    free((void *)p->done);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}
"""

_lock = threading.Lock()
_lib = None


def _library() -> ctypes.CDLL:
    """The compiled pool (built into the cache on first use)."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        from ...runtime.build import cache_dir, find_cc
        digest = hashlib.blake2b(SOURCE.encode(), digest_size=12).hexdigest()
        root = cache_dir()
        path = root / f"train-runner-{digest}.so"
        if not path.is_file():
            root.mkdir(parents=True, exist_ok=True)
            cc = find_cc()
            with tempfile.TemporaryDirectory(prefix="graphc-runner-") as d:
                src = Path(d) / "runner.c"
                src.write_text(SOURCE)
                out = Path(d) / "runner.so"
                cmd = [*cc, "-shared", "-fPIC", "-O2", "-std=gnu11", "-o", str(out), str(src),
                       "-lpthread"]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise GraphcError(f"the C compiler failed to build the training runner:\n"
                                      f"{r.stderr.strip()}",
                                      hint="set CC to a working C compiler, or train with "
                                           "--backend reference")
                tmp = root / f".{path.name}.{os.getpid()}.tmp"
                tmp.write_bytes(out.read_bytes())
                os.replace(tmp, path)
        lib = ctypes.CDLL(str(path))
        lib.gtr_create.restype = ctypes.c_void_p
        lib.gtr_create.argtypes = [ctypes.c_int]
        lib.gtr_num_threads.restype = ctypes.c_int
        lib.gtr_num_threads.argtypes = [ctypes.c_void_p]
        lib.gtr_run.restype = ctypes.c_int
        lib.gtr_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int64]
        lib.gtr_destroy.restype = None
        lib.gtr_destroy.argtypes = [ctypes.c_void_p]
        _lib = lib
        return lib


def default_threads() -> int:
    """$GRAPHC_NUM_THREADS, else the CPUs this process may use."""
    env = os.environ.get("GRAPHC_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise GraphcError(f"GRAPHC_NUM_THREADS={env!r} is not a number",
                              hint="set it to a positive integer") from None
        if n < 1:
            raise GraphcError(f"GRAPHC_NUM_THREADS={n}", hint="set it to a positive integer")
        return n
    return max(1, len(os.sched_getaffinity(0)))


class StepRunner:
    """A pool of ``num_threads`` threads (the caller included) running step lists."""

    def __init__(self, num_threads: int | None = None):
        self._lib = _library()
        self.num_threads = num_threads or default_threads()
        self._pool = self._lib.gtr_create(self.num_threads)
        if not self._pool:
            raise GraphcError("out of memory starting the training thread pool")

    def run(self, fns, nparts, nsteps: int, arena: int, weights: int, scratch: int,
            scratch_stride: int) -> None:
        """``fns``/``nparts``: ctypes arrays (function addresses, part counts)."""
        if self._pool is None:
            raise GraphcError("the training runner was closed")
        rc = self._lib.gtr_run(self._pool, ctypes.addressof(fns), ctypes.addressof(nparts),
                               nsteps, arena, weights, scratch, scratch_stride)
        if rc:
            raise GraphcError("out of memory running the training steps")

    def close(self) -> None:
        if self._pool is not None:
            self._lib.gtr_destroy(self._pool)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
