"""The CPU backend's Deconvolution, Embed, ArgMax, Reduction and MVN kernels against the
numpy reference, on fresh random shapes, attributes and data (outputs poisoned before
every run, so an element no kernel writes fails)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from graphc.runtime.testing import assert_close, compile_graph, net_from_text

SETTINGS = settings(max_examples=3, deadline=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True, scope="module")
def cpu_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CACHE", str(tmp_path_factory.mktemp("graphc-cache")))
    yield
    mp.undo()


def _input(name, shape):
    dims = "".join(f" dim: {d}" for d in shape)
    return f'layer {{ name: "in_{name}" type: "Input" top: "{name}" ' \
           f'input_param {{ shape {{{dims} }} }} }}\n'


def _run(tmp_path, text, feeds, rng, tol=1e-5, threads=None):
    net = net_from_text(text, tmp_path, rng=rng)
    want = net.forward(**feeds)
    cn = compile_graph(net.graph, num_threads=threads)
    try:
        for _ in range(2):
            got = cn.forward(**feeds)
            assert_close(got, want, tol)
    finally:
        cn.close()
    return got, want


@st.composite
def deconv_case(draw):
    d2 = draw(st.booleans())
    g = draw(st.sampled_from([1, 1, 2, 3]))
    c = g * draw(st.integers(1, 3))
    o = g * draw(st.integers(1, 3))
    n = draw(st.integers(1, 2))
    k = [draw(st.integers(1, 4)) for _ in range(2 if d2 else 1)]
    s = [draw(st.integers(1, 3)) for _ in k]
    d = [draw(st.integers(1, 2)) for _ in k]
    size = [draw(st.integers(1, 7)) for _ in k]
    # pad small enough for a positive output size
    pad = [draw(st.integers(0, max(0, (si * (x - 1) + di * (ki - 1)) // 2)))
           for si, x, di, ki in zip(s, size, d, k)]
    bias = draw(st.booleans())
    return n, c, o, g, k, s, d, size, pad, bias


@SETTINGS
@given(case=deconv_case())
def test_deconvolution(tmp_path_factory, rng, case):
    n, c, o, g, k, s, d, size, pad, bias = case
    geo = "".join(f" kernel_size: {v}" for v in k) + "".join(f" stride: {v}" for v in s) \
        + "".join(f" dilation: {v}" for v in d) + "".join(f" pad: {v}" for v in pad)
    text = _input("x", [n, c, *size]) + (
        f'layer {{ name: "up" type: "Deconvolution" bottom: "x" top: "y" convolution_param '
        f'{{ num_output: {o} group: {g} bias_term: {str(bias).lower()}{geo} }} }}\n')
    x = rng.standard_normal((n, c, *size)).astype(np.float32)
    _run(tmp_path_factory.mktemp("deconv"), text, {"x": x}, rng, threads=2)


def test_deconvolution_bilinear_upsampling(tmp_path, rng):
    """FCN's habit: group = channels, bilinear weights, stride 2, kernel 4, pad 1."""
    text = _input("x", [1, 5, 6, 7]) + (
        'layer { name: "up" type: "Deconvolution" bottom: "x" top: "y" convolution_param '
        '{ num_output: 5 group: 5 kernel_size: 4 stride: 2 pad: 1 bias_term: false '
        'weight_filler { type: "bilinear" } } }\n')
    x = rng.standard_normal((1, 5, 6, 7)).astype(np.float32)
    net = net_from_text(text, tmp_path)            # the bilinear filler's weights
    want = net.forward(x=x)
    cn = compile_graph(net.graph)
    try:
        assert_close(cn.forward(x=x), want, 1e-6)
        assert cn.forward(x=x)["y"].shape == (1, 5, 12, 14)
    finally:
        cn.close()


@SETTINGS
@given(k=st.integers(1, 30), nout=st.integers(1, 20), shape=st.lists(
    st.integers(1, 5), min_size=1, max_size=3), bias=st.booleans())
def test_embed(tmp_path_factory, rng, k, nout, shape, bias):
    text = _input("x", shape) + (
        f'layer {{ name: "emb" type: "Embed" bottom: "x" top: "y" embed_param {{ '
        f'num_output: {nout} input_dim: {k} bias_term: {str(bias).lower()} }} }}\n')
    x = rng.integers(0, k, size=shape).astype(np.float32)
    _run(tmp_path_factory.mktemp("embed"), text, {"x": x}, rng)


def test_embed_bad_index_gives_nan_row(tmp_path, rng):
    text = _input("x", [4]) + ('layer { name: "emb" type: "Embed" bottom: "x" top: "y" '
                               'embed_param { num_output: 3 input_dim: 5 } }\n')
    net = net_from_text(text, tmp_path, rng=rng)
    cn = compile_graph(net.graph)
    try:
        y = cn.forward(x=np.array([1, 5, -1, 2.5], np.float32))["y"]
    finally:
        cn.close()
    w, b = (np.asarray(p) for p in net.params["emb"])
    np.testing.assert_allclose(y[0], w[1] + b, rtol=1e-6)
    assert np.isnan(y[1:]).all()


@SETTINGS
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_argmax(tmp_path_factory, rng, shape, data):
    branches, layers = [], ""
    per = int(np.prod(shape[1:]))
    axis = data.draw(st.sampled_from([None] + list(range(-len(shape), len(shape)))))
    size = per if axis is None else shape[axis]
    for i, out_max in enumerate([False, True]):
        top_k = data.draw(st.integers(1, size))
        ax = "" if axis is None else f" axis: {axis}"
        layers += (f'layer {{ name: "am{i}" type: "ArgMax" bottom: "x" top: "y{i}" '
                   f'argmax_param {{ top_k: {top_k} out_max_val: {str(out_max).lower()}'
                   f'{ax} }} }}\n')
    # whole numbers from a few values: many ties, which Caffe orders larger index first
    x = rng.integers(-3, 4, size=shape).astype(np.float32)
    if not np.any(x):
        x.flat[0] = 1.0
    _run(tmp_path_factory.mktemp("argmax"), _input("x", shape) + layers, {"x": x}, rng,
         tol=0.0)


@SETTINGS
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_reduction(tmp_path_factory, rng, shape, data):
    layers = ""
    for i, op in enumerate(("SUM", "ASUM", "SUMSQ", "MEAN")):
        axis = data.draw(st.integers(-len(shape), len(shape) - 1))
        coeff = data.draw(st.sampled_from([1.0, -0.5, 2.5]))
        layers += (f'layer {{ name: "r{i}" type: "Reduction" bottom: "x" top: "y{i}" '
                   f'reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }} }}\n')
    x = rng.standard_normal(shape).astype(np.float32) + 0.5
    _run(tmp_path_factory.mktemp("reduce"), _input("x", shape) + layers, {"x": x}, rng)


@SETTINGS
@given(shape=st.lists(st.integers(1, 7), min_size=2, max_size=4), data=st.data())
def test_mvn(tmp_path_factory, rng, shape, data):
    layers = ""
    for i in range(3):
        norm = data.draw(st.booleans())
        across = data.draw(st.booleans())
        layers += (f'layer {{ name: "m{i}" type: "MVN" bottom: "x" top: "y{i}" mvn_param {{ '
                   f'normalize_variance: {str(norm).lower()} across_channels: '
                   f'{str(across).lower()} eps: 0.001 }} }}\n')
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    # a row of one value has a centred output of zeros: compare the others
    _run(tmp_path_factory.mktemp("mvn"), _input("x", shape) + layers, {"x": x}, rng, tol=1e-5)
