"""Convolution / Deconvolution (graphc/ops/conv.py) against naive float64 loops."""
import itertools
import math
import zlib

import numpy as np
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings, strategies as st

from graphc.errors import OpError
from graphc.ir.types import f32
from graphc.ops import get_op
from graphc.ops.base import Context

CONV = get_op("Convolution")
DECONV = get_op("Deconvolution")
HYP = settings(max_examples=30, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "some output element was not written (or is not finite)"
    ref = np.linalg.norm(b)
    # an all-zero reference (e.g. every window in padding, no bias) must be matched exactly
    return np.linalg.norm(a - b) / ref if ref > 0 else np.linalg.norm(a)


def layer(text):
    from graphc.frontend import caffe_pb2
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def attrs_for(num_output, kernel, stride=1, pad=0, dilation=1, group=1, bias=True, axis=1):
    lst = lambda v: list(v) if isinstance(v, (list, tuple)) else [v, v]
    return {"num_output": num_output, "bias_term": bias, "kernel": lst(kernel),
            "stride": lst(stride), "pad": lst(pad), "dilation": lst(dilation),
            "group": group, "axis": axis}


def run(op, attrs, x, params):
    in_t = [f32(x.shape)]
    specs = op.param_specs(attrs, in_t)
    assert [tuple(s.shape) for s in specs] == [p.shape for p in params]
    out_t = op.infer(attrs, in_t, [f32(p.shape) for p in params])
    (y,) = op.forward(attrs, [x], params, Context())
    assert y.dtype == np.float32 and y.shape == out_t[0].shape
    return y


# ------------------------------------------------------------------ naive references
def naive_conv(x, w, b, stride, pad, dil, group):
    """N-D direct convolution, float64, every output written exactly once."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c = x.shape[:2]
    o, cg = w.shape[:2]
    sp, k = x.shape[2:], w.shape[2:]
    out = [(sp[i] + 2 * pad[i] - (dil[i] * (k[i] - 1) + 1)) // stride[i] + 1 for i in range(len(sp))]
    og = o // group
    y = np.full((n, o, *out), np.nan)
    for ni, oi in itertools.product(range(n), range(o)):
        g = oi // og
        for opos in itertools.product(*map(range, out)):
            acc = 0.0 if b is None else float(b[oi])
            for ci in range(cg):
                for kpos in itertools.product(*map(range, k)):
                    ipos = [opos[d] * stride[d] - pad[d] + kpos[d] * dil[d] for d in range(len(sp))]
                    if all(0 <= ipos[d] < sp[d] for d in range(len(sp))):
                        acc += x[(ni, g * cg + ci, *ipos)] * w[(oi, ci, *kpos)]
            y[(ni, oi, *opos)] = acc
    return y


def naive_deconv(x, w, b, stride, pad, dil, group):
    """Transposed convolution by scattering every input value through the kernel."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c = x.shape[:2]
    og = w.shape[1]
    sp, k = x.shape[2:], w.shape[2:]
    o, cg = og * group, c // group
    out = [stride[i] * (sp[i] - 1) + dil[i] * (k[i] - 1) + 1 - 2 * pad[i] for i in range(len(sp))]
    y = np.zeros((n, o, *out))
    if b is not None:
        y += np.asarray(b, np.float64).reshape((1, o) + (1,) * len(sp))
    for ni, ci in itertools.product(range(n), range(c)):
        g = ci // cg
        for ipos in itertools.product(*map(range, sp)):
            for oj in range(og):
                for kpos in itertools.product(*map(range, k)):
                    opos = [ipos[d] * stride[d] - pad[d] + kpos[d] * dil[d] for d in range(len(sp))]
                    if all(0 <= opos[d] < out[d] for d in range(len(sp))):
                        y[(ni, g * og + oj, *opos)] += x[(ni, ci, *ipos)] * w[(ci, oj, *kpos)]
    return y


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------ Convolution
@HYP
@given(n=st.integers(1, 2), cg=st.integers(1, 3), og=st.integers(1, 3), group=st.integers(1, 3),
       h=st.integers(1, 9), w=st.integers(1, 9), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2),
       dh=st.integers(1, 3), dw=st.integers(1, 3), bias=st.booleans())
def test_conv2d_matches_naive(rng, n, cg, og, group, h, w, kh, kw, sh, sw, ph, pw, dh, dw, bias):
    if dh * (kh - 1) + 1 > h + 2 * ph or dw * (kw - 1) + 1 > w + 2 * pw:
        return   # invalid geometry; tested separately
    c, o = cg * group, og * group
    attrs = attrs_for(o, [kh, kw], [sh, sw], [ph, pw], [dh, dw], group, bias)
    x = rand(rng, n, c, h, w)
    params = [rand(rng, o, cg, kh, kw)] + ([rand(rng, o)] if bias else [])
    y = run(CONV, attrs, x, params)
    ref = naive_conv(x, params[0], params[1] if bias else None, [sh, sw], [ph, pw], [dh, dw], group)
    assert rel_err(y, ref) < 1e-5


def test_conv_grouped_dilated_strided(rng):
    attrs = attrs_for(6, 3, stride=2, pad=2, dilation=2, group=3)
    x = rand(rng, 2, 6, 11, 9)
    params = [rand(rng, 6, 2, 3, 3), rand(rng, 6)]
    y = run(CONV, attrs, x, params)
    assert y.shape == (2, 6, 6, 5)   # (11 + 4 - 5) // 2 + 1, (9 + 4 - 5) // 2 + 1
    ref = naive_conv(x, params[0], params[1], [2, 2], [2, 2], [2, 2], 3)
    assert rel_err(y, ref) < 1e-5


def test_conv1d_and_3d(rng):
    x1 = rand(rng, 2, 4, 10)
    a1 = {**attrs_for(3, 3, stride=2, pad=1, group=1), "kernel": [3], "stride": [2],
          "pad": [1], "dilation": [1]}
    p1 = [rand(rng, 3, 4, 3), rand(rng, 3)]
    assert rel_err(run(CONV, a1, x1, p1), naive_conv(x1, p1[0], p1[1], [2], [1], [1], 1)) < 1e-5
    x3 = rand(rng, 1, 2, 5, 4, 6)
    a3 = attrs_for(4, [3, 2, 3], [1, 2, 2], [1, 0, 1], [1, 1, 2], group=2)
    p3 = [rand(rng, 4, 1, 3, 2, 3), rand(rng, 4)]
    ref = naive_conv(x3, p3[0], p3[1], [1, 2, 2], [1, 0, 1], [1, 1, 2], 2)
    assert rel_err(run(CONV, a3, x3, p3), ref) < 1e-5
    # a uniform 2-value list (what kernel_size: 3 becomes) applies to 3 spatial axes too
    a3u = attrs_for(2, 3, pad=1)
    p3u = [rand(rng, 2, 2, 3, 3, 3), rand(rng, 2)]
    ref = naive_conv(x3, p3u[0], p3u[1], [1] * 3, [1] * 3, [1] * 3, 1)
    assert rel_err(run(CONV, a3u, x3, p3u), ref) < 1e-5


def test_conv_axis_flattens_leading_axes(rng):
    # axis=2: (A, B, C, H, W) is (A*B) images of C channels
    x = rand(rng, 2, 3, 4, 5, 5)
    attrs = attrs_for(2, 3, axis=2)
    params = [rand(rng, 2, 4, 3, 3), rand(rng, 2)]
    y = run(CONV, attrs, x, params)
    assert y.shape == (2, 3, 2, 3, 3)
    ref = naive_conv(x.reshape(6, 4, 5, 5), params[0], params[1], [1, 1], [0, 0], [1, 1], 1)
    assert rel_err(y, ref.reshape(y.shape)) < 1e-5


def test_conv_multiple_bottoms_share_weights(rng):
    attrs = attrs_for(3, 2)
    xs = [rand(rng, 1, 2, 4, 4), rand(rng, 1, 2, 4, 4)]
    params = [rand(rng, 3, 2, 2, 2), rand(rng, 3)]
    outs = CONV.forward(attrs, xs, params, Context())
    assert len(CONV.infer(attrs, [f32(x.shape) for x in xs], [f32(p.shape) for p in params])) == 2
    for x, y in zip(xs, outs):
        assert rel_err(y, naive_conv(x, params[0], params[1], [1, 1], [0, 0], [1, 1], 1)) < 1e-5


def test_conv_errors():
    x = f32(2, 6, 8, 8)
    with pytest.raises(OpError, match="6 channels, which group 4"):
        CONV.infer(attrs_for(8, 3, group=4), [x], [f32(8, 1, 3, 3), f32(8)])
    with pytest.raises(OpError, match="num_output 5 is not a multiple of group 2"):
        CONV.infer(attrs_for(5, 3, group=2), [x], [f32(5, 3, 3, 3), f32(5)])
    with pytest.raises(OpError, match="kernel extent 9 .* larger than the padded input 8"):
        CONV.infer(attrs_for(4, 5, dilation=2), [x], [f32(4, 6, 5, 5), f32(4)])
    with pytest.raises(OpError, match=r"weight blob has shape \[4, 6, 3, 3\] but this layer needs "
                                      r"\[4, 3, 3, 3\]"):
        CONV.infer(attrs_for(4, 3, group=2), [x], [f32(4, 6, 3, 3), f32(4)])
    with pytest.raises(OpError, match=r"bias blob has shape \[5\]"):
        CONV.infer(attrs_for(4, 3), [x], [f32(4, 6, 3, 3), f32(5)])
    with pytest.raises(OpError, match="spatial axis"):
        CONV.infer(attrs_for(4, 3), [f32(2, 6)], [f32(4, 6, 3, 3), f32(4)])
    with pytest.raises(OpError, match="3 values"):
        CONV.infer({**attrs_for(4, 3), "kernel": [1, 2, 3]}, [x], [])


def test_conv_cost():
    attrs = attrs_for(8, 3, pad=1, group=2)
    in_t, p_t = [f32(2, 4, 6, 6)], [f32(8, 2, 3, 3), f32(8)]
    out_t = CONV.infer(attrs, in_t, p_t)
    c = CONV.cost(attrs, in_t, p_t, out_t)
    assert c.flops == 2 * (2 * 8 * 36) * (2 * 9) + 2 * 8 * 36
    assert c.bytes == 4 * (2 * 4 * 36 + 8 * 2 * 9 + 8 + 2 * 8 * 36)


def test_conv_from_caffe():
    lp = layer('type: "Convolution" bottom: "x" top: "y" convolution_param { num_output: 16 '
               'kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 1 pad_h: 1 group: 2 bias_term: false '
               'weight_filler { type: "xavier" } }')
    a = CONV.from_caffe(lp, "test")
    assert (a["kernel"], a["stride"], a["pad"], a["dilation"]) == ([3, 5], [2, 1], [1, 0], [1, 1])
    assert a["group"] == 2 and a["bias_term"] is False and a["axis"] == 1
    assert a["weight_filler"] == {"type": "xavier", "variance_norm": "FAN_IN"}
    assert a["bias_filler"] == {"type": "constant", "value": 0.0}   # Caffe's default filler
    specs = CONV.param_specs(a, [f32(1, 4, 9, 9)])
    assert [s.shape for s in specs] == [(16, 2, 3, 5)]
    b = CONV.from_caffe(layer('type: "Convolution" bottom: "x" top: "y" convolution_param { '
                              'num_output: 4 kernel_size: 3 kernel_size: 1 stride: 2 dilation: 2 }'),
                        "train")
    assert (b["kernel"], b["stride"], b["pad"], b["dilation"]) == ([3, 1], [2, 2], [0, 0], [2, 2])
    assert [s.shape for s in CONV.param_specs(b, [f32(1, 3, 9, 9)])] == [(4, 3, 3, 1), (4,)]
    with pytest.raises(OpError, match="both kernel_size and kernel_h"):
        CONV.from_caffe(layer('type: "Convolution" convolution_param { num_output: 1 '
                              'kernel_size: 3 kernel_h: 3 kernel_w: 3 }'), "test")
    with pytest.raises(OpError, match="kernel size is missing"):
        CONV.from_caffe(layer('type: "Convolution" convolution_param { num_output: 1 }'), "test")
    with pytest.raises(OpError, match="num_output"):
        CONV.from_caffe(layer('type: "Convolution" convolution_param { kernel_size: 1 }'), "test")


# ------------------------------------------------------------------ Deconvolution
@HYP
@given(n=st.integers(1, 2), cg=st.integers(1, 3), og=st.integers(1, 3), group=st.integers(1, 2),
       h=st.integers(1, 5), w=st.integers(1, 5), k=st.integers(1, 4), s=st.integers(1, 3),
       p=st.integers(0, 2), d=st.integers(1, 2), bias=st.booleans())
def test_deconv_matches_naive(rng, n, cg, og, group, h, w, k, s, p, d, bias):
    if min(s * (h - 1), s * (w - 1)) + d * (k - 1) + 1 - 2 * p <= 0:
        return
    c, o = cg * group, og * group
    attrs = attrs_for(o, k, s, p, d, group, bias)
    x = rand(rng, n, c, h, w)
    params = [rand(rng, c, og, k, k)] + ([rand(rng, o)] if bias else [])
    y = run(DECONV, attrs, x, params)
    ref = naive_deconv(x, params[0], params[1] if bias else None, [s, s], [p, p], [d, d], group)
    assert rel_err(y, ref) < 1e-5


def test_deconv_stride_upsampling(rng):
    # FCN-style 2x upsampling: kernel 4, stride 2, pad 1 -> out = 2*(in-1) + 4 - 2 = 2*in
    attrs = attrs_for(6, 4, stride=2, pad=1, group=2)
    x = rand(rng, 2, 4, 5, 3)
    params = [rand(rng, 4, 3, 4, 4), rand(rng, 6)]
    y = run(DECONV, attrs, x, params)
    assert y.shape == (2, 6, 10, 6)
    assert rel_err(y, naive_deconv(x, params[0], params[1], [2, 2], [1, 1], [1, 1], 2)) < 1e-5


def test_deconv_is_conv_adjoint(rng):
    # <conv(x), y> == <x, deconv(y)> with the same weight blob read as (C_conv_out, C_conv_in)
    attrs_c = attrs_for(6, 3, stride=2, pad=1, dilation=2, group=3, bias=False)
    attrs_d = attrs_for(3, 3, stride=2, pad=1, dilation=2, group=3, bias=False)
    wgt = rand(rng, 6, 1, 3, 3)
    x = rand(rng, 2, 3, 9, 7)
    cx = CONV.forward(attrs_c, [x], [wgt], Context())[0]
    assert cx.shape == (2, 6, 4, 3)
    yv = rand(rng, *cx.shape)
    dy = DECONV.forward(attrs_d, [yv], [wgt], Context())[0]
    assert dy.shape == x.shape
    lhs = float(np.sum(cx.astype(np.float64) * yv))
    rhs = float(np.sum(x.astype(np.float64) * dy))
    assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + 1)


def test_deconv_params_and_errors():
    attrs = attrs_for(8, 4, stride=2, group=2)
    specs = DECONV.param_specs(attrs, [f32(1, 6, 5, 5)])
    assert [s.shape for s in specs] == [(6, 4, 4, 4), (8,)]
    with pytest.raises(OpError, match=r"weight blob has shape \[8, 3, 4, 4\] but this layer needs "
                                      r"\[6, 4, 4, 4\]"):
        DECONV.infer(attrs, [f32(1, 6, 5, 5)], [f32(8, 3, 4, 4), f32(8)])
    with pytest.raises(OpError, match="output would have spatial size"):
        DECONV.infer(attrs_for(2, 1, pad=1), [f32(1, 2, 1, 1)], [f32(2, 2, 1, 1), f32(2)])


# ------------------------------------------------------------------ real Caffe
def golden_weight(layer_name, i, shape):
    rng = np.random.default_rng(zlib.crc32(f"{layer_name}/{i}".encode()))
    if i == 0:
        v = rng.standard_normal(shape) * np.sqrt(2.0 / math.prod(shape[1:]))
    else:
        v = rng.uniform(-0.1, 0.1, shape)
    return np.asarray(v, dtype=np.float32)


@pytest.mark.parametrize("net,layer_name,bottom,top,attrs,relu", [
    ("lenet", "conv1", "data", "conv1", attrs_for(20, 5), False),
    ("caffenet_deploy", "conv2", "norm1", "conv2", attrs_for(256, 5, pad=2, group=2), True),
    ("squeezenet11_deploy", "conv1", "data", "conv1", attrs_for(64, 3, stride=2), True),
])
def test_conv_matches_caffe(shared_dir, net, layer_name, bottom, top, attrs, relu):
    blobs = np.load(shared_dir / "golden" / net / "outputs.npz")
    x = blobs[bottom]
    in_t = [f32(x.shape)]
    params = [golden_weight(layer_name, i, s.shape)
              for i, s in enumerate(CONV.param_specs(attrs, in_t))]
    (y,) = CONV.forward(attrs, [x], params, Context())
    if relu:   # Caffe's in-place ReLU overwrote the stored blob
        y = np.maximum(y, 0)
    assert rel_err(y, blobs[top]) < 2e-6
