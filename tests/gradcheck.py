"""Finite-difference gradient checking, in float64, for single ops and whole nets.

The ops compute in float32 like Caffe (many cast with ``np.float32`` on purpose).  To
check their gradient rules with float64 precision, ``float64_ops()`` swaps the ``np`` of
every graphc.ops module for a proxy whose ``float32`` is ``float64``: the same code then runs in
double, and central differences with a small step are accurate to ~1e-9.  Every check
first asserts the forward really produced float64.

The scalar checked is ``L = sum_k <r_k, y_k>`` with random weights ``r_k`` on the chosen
outputs (their gradients are ``r_k``).  For each tensor that needs a gradient, ``L`` is
differenced along up to ``max_coords`` coordinates and along one random direction, and
the relative L2 error against the op's ``backward`` must be below ``rtol``.
"""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np

import graphc.ops as ops_pkg
from graphc.ir.types import TensorType
from graphc.ops import Context, get_op



class _Numpy64(types.ModuleType):
    """numpy, except that ``float32`` means ``float64``."""
    float32 = np.float64

    def __init__(self):
        super().__init__("numpy_float64")

    def __getattr__(self, name):
        return getattr(np, name)


@contextlib.contextmanager
def float64_ops():
    proxy = _Numpy64()
    mods = [m for name, m in list(sys.modules.items())
            if name.startswith(ops_pkg.__name__ + ".") and getattr(m, "np", None) is np]
    saved = [m.np for m in mods]
    try:
        for m in mods:
            m.np = proxy
        yield
    finally:
        for m, s in zip(mods, saved):
            m.np = s


def rel_err(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _numeric(f, x: np.ndarray, coords, h: float, direction: np.ndarray):
    """Central differences of f (a function of nothing; x is perturbed in place) along
    the given flat coordinates and along ``direction``."""
    flat = x.reshape(-1)
    num = np.empty(len(coords))
    for k, i in enumerate(coords):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        num[k] = (fp - fm) / (2 * h)
    x0 = x.copy()
    x[...] = x0 + h * direction
    fp = f()
    x[...] = x0 - h * direction
    fm = f()
    x[...] = x0
    return num, (fp - fm) / (2 * h)


def _check_tensor(what, f, x, analytic, h, rtol, max_coords, rng, allow_zero=False):
    assert analytic is not None, f"{what}: backward gave no gradient"
    analytic = np.asarray(analytic, np.float64).reshape(x.shape)
    n = x.size
    coords = np.arange(n) if n <= max_coords else rng.choice(n, max_coords, replace=False)
    direction = rng.standard_normal(x.shape)
    num, dnum = _numeric(f, x, coords, h, direction)
    ana = analytic.reshape(-1)[coords]
    if np.linalg.norm(num) < 1e-8:
        assert allow_zero, f"{what}: the numeric gradient is all zeros"
        assert np.linalg.norm(ana) < 1e-8, f"{what}: should be 0, got {ana[:8]}"
        return 0.0
    err = rel_err(ana, num)
    assert err <= rtol, (f"{what}: relative error {err:.3g} > {rtol:g}\n"
                         f"analytic {ana[:8]}\nnumeric  {num[:8]}")
    dana = float((analytic * direction).sum())
    derr = abs(dana - dnum) / max(abs(dnum), 1e-12)
    assert derr <= max(rtol, 1e-12) * 10, f"{what}: directional error {derr:.3g}"
    return err


def check_op(op_type: str, attrs: dict, inputs, params=(), *, rng, grads_for=None,
             need_inputs=None, need_params=None, phase="train", seed=1234,
             h=1e-6, rtol=1e-6, rtol32=2e-3, max_coords=24, allow_zero=(), compare32=True):
    """Check ``op_type``'s backward against finite differences of its forward.

    ``grads_for``: indices of the outputs that get a (random) gradient (default: all);
    ``need_inputs``/``need_params``: default every input the op can differentiate and
    every param.  Each forward call gets a fresh Context seeded with ``seed`` (so Dropout
    masks and stochastic pooling draws repeat).  Also runs forward+backward in float32
    and checks dtypes, shapes and agreement with the float64 gradient (``rtol32``; off
    with ``compare32=False`` where float32 draws different random numbers).
    Returns {"inputs": [...], "params": [...]} relative errors."""
    op = get_op(op_type)
    ins = [np.array(x, dtype=np.float64) for x in inputs]
    ps = [np.array(p, dtype=np.float64) for p in params]
    if need_inputs is None:
        need_inputs = list(op.grad_inputs(attrs, len(ins)))
    if need_params is None:
        need_params = [True] * len(ps)
    need_inputs, need_params = [bool(b) for b in need_inputs], [bool(b) for b in need_params]
    assert any(need_inputs) or any(need_params), "nothing to check"

    def ctx():
        return Context(phase=phase, rng=np.random.default_rng(seed))

    def run_forward(xs, qs, c):
        return op.forward(attrs, xs, [q.copy() for q in qs], c)

    with float64_ops():
        outs = run_forward(ins, ps, ctx())
        for k, y in enumerate(outs):
            assert y.dtype == np.float64, f"{op_type} output {k} is {y.dtype} in float64 mode"
        which = list(range(len(outs))) if grads_for is None else list(grads_for)
        r = [rng.standard_normal(y.shape) if k in which else None for k, y in enumerate(outs)]

        def loss():
            ys = run_forward(ins, ps, ctx())
            return sum(float((rk * y).sum()) for rk, y in zip(r, ys) if rk is not None)

        c = ctx()
        outs = run_forward(ins, ps, c)
        gi, gp = op.backward(attrs, ins, [p.copy() for p in ps],
                             outs if op.backward_uses_outputs(attrs) else [None] * len(outs),
                             r, need_inputs, need_params, c)
        errs = {"inputs": [], "params": []}
        for i, need in enumerate(need_inputs):
            if need:
                errs["inputs"].append(_check_tensor(
                    f"{op_type} input {i}", loss, ins[i], gi[i], h, rtol, max_coords, rng,
                    ("i", i) in allow_zero))
        for j, need in enumerate(need_params):
            if need:
                errs["params"].append(_check_tensor(
                    f"{op_type} param {j}", loss, ps[j], gp[j], h, rtol, max_coords, rng,
                    ("p", j) in allow_zero))

    # float32: the real path
    ins32 = [x.astype(np.float32) for x in ins]
    ps32 = [p.astype(np.float32) for p in ps]
    r32 = [None if rk is None else rk.astype(np.float32) for rk in r]
    c = ctx()
    outs32 = op.forward(attrs, ins32, [p.copy() for p in ps32], c)
    gi32, gp32 = op.backward(attrs, ins32, [p.copy() for p in ps32],
                             outs32 if op.backward_uses_outputs(attrs) else [None] * len(outs32),
                             r32, need_inputs, need_params, c)
    for kind, got32, got64, like, need in (("input", gi32, gi, ins, need_inputs),
                                           ("param", gp32, gp, ps, need_params)):
        for i, wanted in enumerate(need):
            if not wanted:
                continue
            g32 = np.asarray(got32[i])
            assert g32.dtype == np.float32, f"{op_type} {kind} {i} gradient is {g32.dtype}"
            assert g32.shape == like[i].shape, f"{op_type} {kind} {i} gradient shape"
            assert np.all(np.isfinite(g32))
            e = rel_err(g32, got64[i]) if compare32 else 0.0
            assert e <= rtol32, f"{op_type} {kind} {i}: float32 vs float64 gradient {e:.3g}"
    return errs


# ---- whole nets ---------------------------------------------------------------------------
def to_float64(g):
    """A copy of graph ``g`` whose values and params are float64 (params copied)."""
    g64 = g.copy()
    g64.types = {v: TensorType(t.shape, "f64") if t.dtype == "f32" else t
                 for v, t in g.types.items()}
    for p in g64.params.values():
        p.type = TensorType(p.type.shape, "f64")
        p.data = np.array(p.data, dtype=np.float64)
    return g64


def check_net(forward_graph, feeds: dict, *, rng, seed=7, phase="train", h=1e-6, rtol=1e-6,
              max_coords=12, check_inputs=(), zero=()):
    """Gradcheck a whole net: ``autodiff`` on ``forward_graph`` (params filled), run the
    train graph in float64, and compare ``param_grads`` (and the gradients of the graph
    inputs in ``check_inputs``) with central differences of the total loss computed by
    the forward graph (``zero``: params whose gradient is 0 by construction).  Returns
    (train graph, {name: relative error})."""
    from graphc.passes import PASSES
    from graphc.reference import ReferenceExecutor
    from graphc.ir.verify import verify

    tg = verify(PASSES["autodiff"](forward_graph))
    fg64, tg64 = to_float64(forward_graph), to_float64(tg)
    for name, p in tg64.params.items():      # one set of float64 arrays for both graphs
        p.data = fg64.params[name].data
    feeds64 = {v: np.array(a, dtype=np.float64) for v, a in feeds.items()}

    def ctx():
        return Context(phase=phase, rng=np.random.default_rng(seed))

    def loss():
        env = ReferenceExecutor(fg64, ctx()).run(feeds64, keep=[v for v, _ in tg.losses])
        return sum(w * float(env[v].sum()) for v, w in tg.losses)

    errs = {}
    with float64_ops():
        keep = set(tg64.param_grads.values()) | set(tg64.value_grads.values())
        env = ReferenceExecutor(tg64, ctx()).run(feeds64, keep=keep)
        for v in keep:
            assert env[v].dtype == np.float64, f"{v} is not float64"
        for name, gv in tg64.param_grads.items():
            errs[name] = _check_tensor(f"param ${name}", loss, fg64.params[name].data,
                                       env[gv], h, rtol, max_coords, rng, name in zero)
        for v in check_inputs:
            errs[v] = _check_tensor(f"input %{v}", loss, feeds64[v], env[tg64.value_grads[v]],
                                    h, rtol, max_coords, rng)
    return tg, errs
