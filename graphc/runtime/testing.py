"""Helpers for testing the CPU backend against the reference executor.

    net = net_from_text(PROTOTXT, tmp_path)      # a graphc.Net, params random
    got = run_compiled(net.graph, {"data": x})   # compiled (cached), outputs poisoned first
    want = net.forward(data=x)                   # the numpy reference
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def net_from_text(text: str, directory, name: str = "net.prototxt", rng=None, **kw):
    """A graphc.Net from prototxt text (written to ``directory``), its params filled with
    random values (normal, scaled by 1/sqrt(fan-in) for weights) when ``rng`` is given."""
    import graphc
    path = Path(directory) / name
    path.write_text(text)
    net = graphc.Net(str(path), **kw)
    if rng is not None:
        randomize_params(net.graph, rng)
    return net


def randomize_params(g, rng) -> None:
    for p in g.params.values():
        shape = p.type.shape
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        v = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        if p.data is None:
            p.data = v.astype(np.float32)
        else:
            p.data[...] = v


def compile_graph(g, *, pipeline=None, cpu: str | None = None, optimized: bool = False,
                  num_threads: int | None = None, poison: bool = True):
    """Optimize ``g`` (``pipeline``: pass names, default the inference pipeline), build it
    through the cache and load it (with GRAPHC_POISON set: every run NaN-fills the arena
    and scratch first).  ``cpu`` None: $GRAPHC_TEST_CPU, else "native"."""
    from ..passes import run_pipeline
    from .build import cached_library
    from .loader import load
    cpu = cpu or os.environ.get("GRAPHC_TEST_CPU", "native")
    opt = g if optimized else run_pipeline(g, pipeline)
    lib = cached_library(opt, cpu, optimized=True)
    old = os.environ.get("GRAPHC_POISON")
    os.environ["GRAPHC_POISON"] = "1" if poison else "0"
    try:
        return load(lib, num_threads=num_threads)
    finally:
        if old is None:
            del os.environ["GRAPHC_POISON"]
        else:
            os.environ["GRAPHC_POISON"] = old


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    if denom == 0:
        raise AssertionError("the reference is all zeros: the comparison would be meaningless")
    return float(np.linalg.norm(a - b) / denom)


def assert_close(got: dict, want: dict, tol: float = 1e-4) -> None:
    """Every output: same shape, finite wherever the reference is (nothing left poisoned;
    where Caffe's arithmetic itself gives NaN/inf, e.g. an empty AVE window, the same),
    relative L2 <= tol over the finite values."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k in want:
        g, w = np.asarray(got[k]), np.asarray(want[k])
        assert g.shape == w.shape, (k, g.shape, w.shape)
        fin = np.isfinite(w)
        bad = fin & ~np.isfinite(g)
        assert not bad.any(), f"{k}: {int(bad.sum())} values not finite (unwritten?)"
        np.testing.assert_array_equal(np.isnan(g[~fin]), np.isnan(w[~fin]), err_msg=k)
        g, w = g[fin], w[fin]
        if not np.any(w):   # e.g. a convolution whose every window lies in the padding
            assert np.all(g == 0), f"{k}: the reference is all zeros, the result is not"
            continue
        err = rel_l2(g, w)
        assert err <= tol, f"{k}: relative L2 error {err:.3g} > {tol}"
