"""Pooling (graphc/ops/pool.py) against naive float64 loops written from Caffe's rules."""
import math

import numpy as np
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings, strategies as st

from graphc.errors import OpError
from graphc.ir.types import f32
from graphc.ops import get_op
from graphc.ops.base import Context

POOL = get_op("Pooling")
HYP = settings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])
FLT_MAX = float(np.finfo(np.float32).max)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert not np.any(np.isnan(a)), "some output element was not written"
    ref = np.linalg.norm(b)
    return np.linalg.norm(a - b) / ref if ref > 0 else np.linalg.norm(a)


def layer(text):
    from graphc.frontend import caffe_pb2
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def attrs_for(pool, kernel, stride=1, pad=0, round_mode="CEIL", top_mask=False, train=False):
    lst = lambda v: list(v) if isinstance(v, (list, tuple)) else [v, v]
    a = {"pool": pool, "kernel": lst(kernel) if kernel is not None else None,
         "stride": lst(stride), "pad": lst(pad), "global_pooling": kernel is None,
         "round_mode": round_mode, "top_mask": top_mask}
    if pool == "STOCHASTIC":
        a["train"] = train
    return a


def run(attrs, x, ctx=None):
    out_t = POOL.infer(attrs, [f32(x.shape)], [])
    outs = POOL.forward(attrs, [x], [], ctx or Context())
    assert [o.shape for o in outs] == [t.shape for t in out_t]
    assert all(o.dtype == np.float32 for o in outs)
    return outs


# ------------------------------------------------------------------ naive reference
def naive_out_size(n, k, s, p, round_mode):
    q = (n + 2 * p - k) / s
    out = (math.ceil(q) if round_mode == "CEIL" else math.floor(q)) + 1
    return out


def naive_pool(x, method, k, s, p, round_mode="CEIL"):
    """Caffe's MAX/AVE loops in float64; returns (values, mask)."""
    n, c, h, w = x.shape
    oh, ow = (naive_out_size(h, k[0], s[0], p[0], round_mode),
              naive_out_size(w, k[1], s[1], p[1], round_mode))
    if p[0] or p[1]:
        if (oh - 1) * s[0] >= h + p[0]:
            oh -= 1
        if (ow - 1) * s[1] >= w + p[1]:
            ow -= 1
    y = np.full((n, c, oh, ow), np.nan)
    mask = np.full((n, c, oh, ow), np.nan)
    for ni in range(n):
        for ci in range(c):
            for i in range(oh):
                for j in range(ow):
                    h0, w0 = i * s[0] - p[0], j * s[1] - p[1]
                    if method == "AVE":
                        h1, w1 = min(h0 + k[0], h + p[0]), min(w0 + k[1], w + p[1])
                        size = (h1 - h0) * (w1 - w0)
                        win = x[ni, ci, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)]
                        y[ni, ci, i, j] = win.astype(np.float64).sum() / size
                    else:
                        best, arg = -FLT_MAX, -1
                        for hh in range(max(h0, 0), min(h0 + k[0], h)):
                            for ww in range(max(w0, 0), min(w0 + k[1], w)):
                                if x[ni, ci, hh, ww] > best:
                                    best, arg = float(x[ni, ci, hh, ww]), hh * w + ww
                        y[ni, ci, i, j], mask[ni, ci, i, j] = best, arg
    return y, mask


# ------------------------------------------------------------------ MAX / AVE
@HYP
@given(method=st.sampled_from(["MAX", "AVE"]), h=st.integers(1, 9), w=st.integers(1, 9),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 3), pw=st.integers(0, 3), floor=st.booleans(), ties=st.booleans())
def test_pool_matches_naive(rng, method, h, w, kh, kw, sh, sw, ph, pw, floor, ties):
    if ph >= kh or pw >= kw:
        return
    mode = "FLOOR" if floor else "CEIL"
    oh, ow = naive_out_size(h, kh, sh, ph, mode), naive_out_size(w, kw, sw, pw, mode)
    if oh <= 0 or ow <= 0:
        return
    if (ph == 0 and (oh - 1) * sh >= h) or (pw == 0 and (ow - 1) * sw >= w):
        return   # a window entirely outside the image: test_empty_last_window
    x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
    if ties:   # few distinct values: the first maximum in row-major order must win
        x = np.round(x).astype(np.float32)
    attrs = attrs_for(method, [kh, kw], [sh, sw], [ph, pw], mode, top_mask=method == "MAX")
    outs = run(attrs, x)
    ref, mask = naive_pool(x, method, [kh, kw], [sh, sw], [ph, pw], mode)
    assert rel_err(outs[0], ref) < 1e-6
    if method == "MAX":
        np.testing.assert_array_equal(outs[1], mask)


def test_last_window_starting_in_padding_is_dropped(rng):
    # H=3, k=2, s=2, p=1: ceil((3+2-2)/2)+1 = 3 windows, but the 3rd starts at 4 - 1 = 3 >= H
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    for method in ("MAX", "AVE"):
        (y, *_) = run(attrs_for(method, 2, 2, 1), x)
        assert y.shape == (1, 2, 2, 2)
        ref, _ = naive_pool(x, method, [2, 2], [2, 2], [1, 1])
        assert rel_err(y, ref) < 1e-6
    # AVE divisors: window 0 spans padded rows -1..0 (2), window 1 rows 1..2 (2): all 4
    (y,) = run(attrs_for("AVE", 2, 2, 1), x)
    np.testing.assert_allclose(y[0, 0, 0, 0], x[0, 0, 0, 0] / 4, rtol=1e-6)


def test_ave_divides_by_window_clipped_to_padded_extent(rng):
    # H=W=4, k=3, s=2, p=1: ceil(3/2)+1 = 3 windows starting at -1, 1, 3; the last covers
    # rows 3..5 but the padded extent ends at 5 (H + p), so it divides by 2 rows, not 3
    x = rng.standard_normal((1, 1, 4, 4)).astype(np.float32)
    (y,) = run(attrs_for("AVE", 3, 2, 1), x)
    assert y.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(y[0, 0, 2, 2], x[0, 0, 3, 3] / 4, rtol=1e-6)
    np.testing.assert_allclose(y[0, 0, 0, 0], x[0, 0, :2, :2].sum() / 9, rtol=1e-5)
    # without padding, CEIL windows running off the image divide by the clipped size
    x = rng.standard_normal((1, 1, 6, 6)).astype(np.float32)
    (y,) = run(attrs_for("AVE", 3, 2, 0), x)
    assert y.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(y[0, 0, 2, 2], x[0, 0, 4:, 4:].sum() / 4, rtol=1e-5)


def test_empty_last_window_behaves_like_caffe(rng):
    # No pad, stride > kernel: ceil((4 - 1) / 2) + 1 = 3 windows; the last one starts at row 4
    # of a 4-row input, so it holds nothing.  Caffe keeps the row and leaves -FLT_MAX (mask -1)
    # for MAX, and divides 0 by a window size of 0 for AVE.
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    val, mask = run(attrs_for("MAX", 1, 2, top_mask=True), x)
    assert val.shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(val[:, :, :2, :2], x[:, :, ::2, ::2])
    assert np.all(val[:, :, 2, :] == -FLT_MAX) and np.all(mask[:, :, :, 2] == -1)
    (ave,) = run(attrs_for("AVE", 1, 2), x)
    np.testing.assert_array_equal(ave[:, :, :2, :2], x[:, :, ::2, ::2])
    assert np.all(np.isnan(ave[:, :, 2, :]))


def test_floor_mode(rng):
    x = rng.standard_normal((1, 2, 6, 7)).astype(np.float32)
    (y,) = run(attrs_for("MAX", 3, 2, 0, "FLOOR"), x)
    assert y.shape == (1, 2, 2, 3)
    (y2,) = run(attrs_for("MAX", 3, 2, 0, "CEIL"), x)
    assert y2.shape == (1, 2, 3, 3)


def test_global_pooling(rng):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    (a,) = run(attrs_for("AVE", None), x)
    assert a.shape == (2, 3, 1, 1)
    assert rel_err(a[..., 0, 0], x.astype(np.float64).mean(axis=(2, 3))) < 1e-6
    m, idx = run({**attrs_for("MAX", None), "top_mask": True}, x)
    assert rel_err(m[..., 0, 0], x.max(axis=(2, 3))) == 0
    np.testing.assert_array_equal(idx[..., 0, 0], x.reshape(2, 3, -1).argmax(axis=2))


def test_max_ignores_padding_even_when_everything_is_negative(rng):
    x = -np.abs(rng.standard_normal((1, 1, 3, 3))).astype(np.float32) - 1
    (y,) = run(attrs_for("MAX", 3, 1, 1), x)
    assert np.all(y < -1)    # padding would have given 0
    ref, _ = naive_pool(x, "MAX", [3, 3], [1, 1], [1, 1])
    assert rel_err(y, ref) == 0


# ------------------------------------------------------------------ STOCHASTIC
def test_stochastic_test_phase(rng):
    x = rng.uniform(0, 1, (2, 3, 5, 6)).astype(np.float32)
    (y,) = run(attrs_for("STOCHASTIC", 2, 2), x)
    assert y.shape == (2, 3, 3, 3)
    ref = np.empty(y.shape)
    for i in range(3):
        for j in range(3):
            win = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].astype(np.float64)
            ref[:, :, i, j] = (win ** 2).sum(axis=(2, 3)) / win.sum(axis=(2, 3))
    assert rel_err(y, ref) < 1e-6


def test_stochastic_train_phase_samples_proportionally(rng):
    # each window holds (1, 3): pick 3 with probability 3/4
    x = np.tile(np.array([1, 3], np.float32), (1, 20000, 1, 1))
    (y,) = run(attrs_for("STOCHASTIC", [1, 2], train=True), x, Context("train", rng))
    assert y.shape == (1, 20000, 1, 1)
    assert set(np.unique(y)) <= {1.0, 3.0}
    assert abs(np.mean(y == 3) - 0.75) < 0.02


# ------------------------------------------------------------------ from_caffe, errors, cost
def test_from_caffe():
    a = POOL.from_caffe(layer('type: "Pooling" bottom: "x" top: "y" top: "m" pooling_param { '
                              'pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 }'),
                        "test")
    assert a == {"pool": "MAX", "kernel": [3, 2], "stride": [2, 1], "pad": [1, 0],
                 "global_pooling": False, "round_mode": "CEIL", "top_mask": True}
    g = POOL.from_caffe(layer('type: "Pooling" pooling_param { pool: AVE global_pooling: true '
                              'round_mode: FLOOR }'), "test")
    assert g["kernel"] is None and g["round_mode"] == "FLOOR" and g["pool"] == "AVE"
    s = POOL.from_caffe(layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 }'),
                        "train")
    assert s["train"] is True
    with pytest.raises(OpError, match="kernel size is missing"):
        POOL.from_caffe(layer('type: "Pooling" pooling_param { pool: MAX }'), "test")
    with pytest.raises(OpError, match="global_pooling takes no kernel"):
        POOL.from_caffe(layer('type: "Pooling" pooling_param { global_pooling: true '
                              'kernel_size: 2 }'), "test")
    with pytest.raises(OpError, match="global_pooling needs pad 0 and stride 1"):
        POOL.from_caffe(layer('type: "Pooling" pooling_param { global_pooling: true stride: 2 }'),
                        "test")
    with pytest.raises(OpError, match="pad .* must be smaller than the kernel"):
        POOL.from_caffe(layer('type: "Pooling" pooling_param { kernel_size: 2 pad: 2 }'), "test")
    with pytest.raises(OpError, match="STOCHASTIC pooling does not support padding"):
        POOL.from_caffe(layer('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 '
                              'pad: 1 }'), "test")
    with pytest.raises(OpError, match="only MAX pooling has a second"):
        POOL.from_caffe(layer('type: "Pooling" top: "a" top: "b" pooling_param { pool: AVE '
                              'kernel_size: 3 }'), "test")


def test_infer_errors_and_cost():
    with pytest.raises(OpError, match="4-D"):
        POOL.infer(attrs_for("MAX", 2), [f32(2, 3, 4)], [])
    with pytest.raises(OpError, match="pooled output would be"):
        POOL.infer(attrs_for("MAX", 5, round_mode="FLOOR"), [f32(1, 1, 3, 3)], [])
    attrs = attrs_for("MAX", 3, 2)
    out_t = POOL.infer(attrs, [f32(2, 4, 9, 9)], [])
    assert out_t[0].shape == (2, 4, 4, 4)
    assert POOL.cost(attrs, [f32(2, 4, 9, 9)], [], out_t).flops == 2 * 4 * 16 * 9


# ------------------------------------------------------------------ real Caffe
@pytest.mark.parametrize("net,bottom,top,attrs", [
    ("googlenet_deploy", "conv1/7x7_s2", "pool1/3x3_s2", attrs_for("MAX", 3, 2)),
    ("googlenet_deploy", "pool2/3x3_s2", "inception_3a/pool", attrs_for("MAX", 3, 1, 1)),
    ("googlenet_deploy", "inception_5b/output", "pool5/7x7_s1", attrs_for("AVE", 7, 1)),
    ("caffenet_deploy", "conv1", "pool1", attrs_for("MAX", 3, 2)),
    ("squeezenet11_deploy", "conv10", "pool10", attrs_for("AVE", None)),
])
def test_pool_matches_caffe(shared_dir, net, bottom, top, attrs):
    blobs = np.load(shared_dir / "golden" / net / "outputs.npz")
    (y,) = POOL.forward(attrs, [blobs[bottom]], [], Context())
    assert rel_err(y, blobs[top]) < 1e-6
