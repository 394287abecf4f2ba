"""InnerProduct, Embed (ops/linear.py) and LRN, BatchNorm, MVN (ops/norm.py) against naive
float64 references."""
import math
import zlib

import numpy as np
import pytest
from google.protobuf import text_format

from graphc.errors import OpError
from graphc.ir.types import f32
from graphc.ops import get_op
from graphc.ops.base import Context

IP, EMBED = get_op("InnerProduct"), get_op("Embed")
LRN, BN, MVN = get_op("LRN"), get_op("BatchNorm"), get_op("MVN")


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "some output element was not written (or is not finite)"
    assert np.linalg.norm(b) > 0, "reference is all zeros: the test would prove nothing"
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def layer(text):
    from graphc.frontend import caffe_pb2
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def check_types(op, attrs, inputs, params, outs):
    out_t = op.infer(attrs, [f32(x.shape) for x in inputs], [f32(p.shape) for p in params])
    assert [o.shape for o in outs] == [t.shape for t in out_t]
    assert all(o.dtype == np.float32 for o in outs)


# ------------------------------------------------------------------ InnerProduct
def naive_ip(x, w, b, axis, transpose):
    lead = x.shape[:axis]
    m, k = math.prod(lead), math.prod(x.shape[axis:])
    xf = x.reshape(m, k).astype(np.float64)
    w = w.astype(np.float64)
    n = w.shape[1] if transpose else w.shape[0]
    y = np.full((m, n), np.nan)
    for i in range(m):
        for j in range(n):
            acc = 0.0 if b is None else float(b[j])
            for t in range(k):
                acc += xf[i, t] * (w[t, j] if transpose else w[j, t])
            y[i, j] = acc
    return y.reshape(lead + (n,))


@pytest.mark.parametrize("shape,axis,transpose,bias", [
    ((3, 4, 2, 2), 1, False, True),
    ((3, 4, 2, 2), 2, False, True),        # (3, 4) rows of 2*2 values
    ((3, 4, 5), 2, True, False),
    ((2, 3, 4), -1, True, True),
    ((6,), 0, False, True),
])
def test_inner_product(rng, shape, axis, transpose, bias):
    attrs = {"num_output": 5, "bias_term": bias, "axis": axis, "transpose": transpose}
    x = rand(rng, *shape)
    specs = IP.param_specs(attrs, [f32(shape)])
    ax = axis % len(shape)
    k = math.prod(shape[ax:])
    assert specs[0].shape == ((k, 5) if transpose else (5, k))
    assert len(specs) == (2 if bias else 1)
    params = [rand(rng, *s.shape) for s in specs]
    (y,) = IP.forward(attrs, [x], params, Context())
    check_types(IP, attrs, [x], params, [y])
    assert y.shape == shape[:ax] + (5,)
    assert rel_err(y, naive_ip(x, params[0], params[1] if bias else None, ax, transpose)) < 1e-5


def test_inner_product_errors_and_from_caffe():
    attrs = {"num_output": 10, "bias_term": True, "axis": 1, "transpose": False}
    with pytest.raises(OpError, match=r"input has 12 values per row .* \[10, 20\]"):
        IP.infer(attrs, [f32(2, 3, 4)], [f32(10, 20), f32(10)])
    with pytest.raises(OpError, match=r"bias blob has shape \[9\] but this layer needs \[10\]"):
        IP.infer(attrs, [f32(2, 12)], [f32(10, 12), f32(9)])
    with pytest.raises(OpError, match="axis 3 is out of range"):
        IP.infer({**attrs, "axis": 3}, [f32(2, 12)], [])
    a = IP.from_caffe(layer('type: "InnerProduct" inner_product_param { num_output: 7 axis: 2 '
                            'transpose: true bias_term: false weight_filler { type: "gaussian" '
                            'std: 0.01 } }'), "test")
    assert (a["num_output"], a["axis"], a["transpose"], a["bias_term"]) == (7, 2, True, False)
    assert a["weight_filler"]["std"] == pytest.approx(0.01)
    with pytest.raises(OpError, match="num_output"):
        IP.from_caffe(layer('type: "InnerProduct"'), "test")
    c = IP.cost(attrs, [f32(2, 12)], [f32(10, 12), f32(10)], [f32(2, 10)])
    assert c.flops == 2 * 2 * 12 * 10 + 20


# ------------------------------------------------------------------ Embed
def test_embed(rng):
    attrs = {"num_output": 4, "input_dim": 7, "bias_term": True}
    idx = rng.integers(0, 7, (3, 5)).astype(np.float32)
    params = [rand(rng, 7, 4), rand(rng, 4)]
    assert [s.shape for s in EMBED.param_specs(attrs, [f32(3, 5)])] == [(7, 4), (4,)]
    (y,) = EMBED.forward(attrs, [idx], params, Context())
    check_types(EMBED, attrs, [idx], params, [y])
    ref = np.full((3, 5, 4), np.nan)
    for i in range(3):
        for j in range(5):
            ref[i, j] = params[0][int(idx[i, j])].astype(np.float64) + params[1]
    assert rel_err(y, ref) < 1e-6
    for bad in (7.0, -1.0, 2.5, np.nan):
        with pytest.raises(OpError, match=r"not indices in \[0, 7\)"):
            EMBED.forward(attrs, [np.array([1.0, bad], np.float32)], params, Context())
    a = EMBED.from_caffe(layer('type: "Embed" embed_param { num_output: 3 input_dim: 10 '
                               'bias_term: false }'), "test")
    assert a["bias_term"] is False and [s.shape for s in EMBED.param_specs(a, [f32(2)])] == [(10, 3)]
    with pytest.raises(OpError, match="input_dim"):
        EMBED.from_caffe(layer('type: "Embed" embed_param { num_output: 3 }'), "test")


# ------------------------------------------------------------------ LRN
def naive_lrn(x, n, alpha, beta, k, region):
    x = x.astype(np.float64)
    N, C, H, W = x.shape
    pre = (n - 1) // 2
    y = np.full(x.shape, np.nan)
    for ni in range(N):
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    if region == "ACROSS_CHANNELS":
                        s = sum(x[ni, cc, h, w] ** 2 for cc in range(c - pre, c + pre + 1)
                                if 0 <= cc < C)
                        scale = k + alpha / n * s
                    else:
                        s = sum(x[ni, c, hh, ww] ** 2
                                for hh in range(h - pre, h + pre + 1)
                                for ww in range(w - pre, w + pre + 1)
                                if 0 <= hh < H and 0 <= ww < W)
                        scale = 1 + alpha * s / (n * n)
                    y[ni, c, h, w] = x[ni, c, h, w] * scale ** -beta
    return y


@pytest.mark.parametrize("region,n", [("ACROSS_CHANNELS", 5), ("ACROSS_CHANNELS", 3),
                                      ("WITHIN_CHANNEL", 3), ("WITHIN_CHANNEL", 5)])
def test_lrn(rng, region, n):
    attrs = {"local_size": n, "alpha": 0.7, "beta": 0.75, "k": 2.0, "norm_region": region}
    x = 2 * rand(rng, 2, 6, 4, 5)
    (y,) = LRN.forward(attrs, [x], [], Context())
    check_types(LRN, attrs, [x], [], [y])
    assert rel_err(y, naive_lrn(x, n, 0.7, 0.75, 2.0, region)) < 1e-5


def test_lrn_from_caffe_and_errors():
    a = LRN.from_caffe(layer('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 '
                             'norm_region: WITHIN_CHANNEL }'), "test")
    assert a == {"local_size": 3, "alpha": 0.5, "beta": 0.75, "k": 1.0,
                 "norm_region": "WITHIN_CHANNEL"}
    with pytest.raises(OpError, match="odd"):
        LRN.from_caffe(layer('type: "LRN" lrn_param { local_size: 4 }'), "test")
    with pytest.raises(OpError, match="4-D"):
        LRN.infer(a, [f32(2, 3)], [])


# ------------------------------------------------------------------ BatchNorm
def test_batchnorm_global_stats(rng):
    attrs = {"use_global_stats": True, "moving_average_fraction": 0.999, "eps": 1e-3}
    x = rand(rng, 2, 3, 4, 5)
    mean, var = rand(rng, 3), rng.uniform(0.5, 2, 3).astype(np.float32)
    s = np.array([4.0], np.float32)
    params = [mean * 4, var * 4, s]
    (y,) = BN.forward(attrs, [x], params, Context())
    check_types(BN, attrs, [x], params, [y])
    ref = np.empty(x.shape)
    for c in range(3):
        ref[:, c] = (x[:, c] - float(mean[c])) / math.sqrt(float(var[c]) + 1e-3)
    assert rel_err(y, ref) < 1e-5
    # scale factor 0: Caffe uses a factor of 0, so mean = var = 0
    params0 = [mean * 4, var * 4, np.zeros(1, np.float32)]
    (y0,) = BN.forward(attrs, [x], params0, Context())
    assert rel_err(y0, x / math.sqrt(1e-3)) < 1e-6


def test_batchnorm_train_updates_moving_averages(rng):
    attrs = {"use_global_stats": False, "moving_average_fraction": 0.9, "eps": 1e-5}
    x = rand(rng, 3, 2, 2, 3) * 3 + 1
    old = [rand(rng, 2), rng.uniform(0.5, 1, 2).astype(np.float32), np.array([2.0], np.float32)]
    params = [p.copy() for p in old]
    (y,) = BN.forward(attrs, [x], params, Context("train"))
    xd = x.astype(np.float64)
    m = 3 * 2 * 3
    bmean = np.array([xd[:, c].mean() for c in range(2)])
    bvar = np.array([((xd[:, c] - bmean[c]) ** 2).mean() for c in range(2)])
    ref = np.empty(x.shape)
    for c in range(2):
        ref[:, c] = (xd[:, c] - bmean[c]) / math.sqrt(bvar[c] + 1e-5)
    assert rel_err(y, ref) < 1e-5
    assert rel_err(params[0], old[0] * 0.9 + bmean) < 1e-6
    assert rel_err(params[1], old[1] * 0.9 + bvar * m / (m - 1)) < 1e-6
    assert params[2][0] == pytest.approx(2.0 * 0.9 + 1)
    # the updated blobs, used as global stats, normalize with mean/s and var/s
    g = {**attrs, "use_global_stats": True}
    (yg,) = BN.forward(g, [x], params, Context())
    s = params[2][0]
    ref = (xd - (params[0] / s)[None, :, None, None]) / np.sqrt(params[1] / s + 1e-5)[None, :, None, None]
    assert rel_err(yg, ref) < 1e-5


def test_batchnorm_2d_input_and_specs(rng):
    attrs = {"use_global_stats": False, "moving_average_fraction": 0.999, "eps": 1e-5}
    x = rand(rng, 8, 3)
    specs = BN.param_specs(attrs, [f32(8, 3)])
    assert [s.shape for s in specs] == [(3,), (3,), (1,)]
    assert all(s.filler["type"] == "constant" and s.filler["value"] == 0 for s in specs)
    params = [np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(1, np.float32)]
    (y,) = BN.forward(attrs, [x], params, Context("train"))
    xd = x.astype(np.float64)
    assert rel_err(y, (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-5)) < 1e-5
    assert params[2][0] == 1.0 and rel_err(params[1], xd.var(0) * 8 / 7) < 1e-6
    with pytest.raises(OpError, match=r"variance blob has shape \[4\] but this layer needs \[3\]"):
        BN.infer(attrs, [f32(8, 3)], [f32(3), f32(4), f32(1)])


def test_batchnorm_from_caffe():
    lp = 'type: "BatchNorm" batch_norm_param { eps: 0.001 }'
    assert BN.from_caffe(layer(lp), "test")["use_global_stats"] is True
    train = BN.from_caffe(layer(lp), "train")
    assert train["use_global_stats"] is False and train["eps"] == pytest.approx(1e-3)
    assert train["moving_average_fraction"] == pytest.approx(0.999)
    forced = BN.from_caffe(layer('type: "BatchNorm" batch_norm_param { use_global_stats: true }'),
                           "train")
    assert forced["use_global_stats"] is True
    ok = 'type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }'
    BN.from_caffe(layer(ok), "train")
    with pytest.raises(OpError, match="lr_mult 1; its blobs are statistics"):
        BN.from_caffe(layer('type: "BatchNorm" param { decay_mult: 0 }'), "train")
    assert BN.updates_params and BN.fixed_lr_mult == 0


# ------------------------------------------------------------------ MVN
@pytest.mark.parametrize("shape,across,normvar", [
    ((2, 3, 4, 5), False, True), ((2, 3, 4, 5), True, True), ((2, 3, 4, 5), False, False),
    ((2, 3, 6), False, True), ((3, 4), True, True), ((3, 4), True, False),
])
def test_mvn(rng, shape, across, normvar):
    attrs = {"normalize_variance": normvar, "across_channels": across, "eps": 1e-3}
    x = rand(rng, *shape) * 2 + 3
    (y,) = MVN.forward(attrs, [x], [], Context())
    check_types(MVN, attrs, [x], [], [y])
    xd = x.astype(np.float64)
    lead = shape[:1] if across or len(shape) < 2 else shape[:2]
    ref = np.empty(xd.shape)
    for idx in np.ndindex(*lead):
        v = xd[idx]
        out = v - v.mean()
        if normvar:   # Caffe adds eps to the standard deviation
            out = out / (math.sqrt(((v - v.mean()) ** 2).mean()) + 1e-3)
        ref[idx] = out
    assert rel_err(y, ref) < 1e-5
    with pytest.raises(OpError, match="at most 4 axes"):
        MVN.infer(attrs, [f32(1, 1, 1, 1, 1)], [])


# ------------------------------------------------------------------ real Caffe
def golden_weight(layer_name, i, shape, layer_type):
    rng = np.random.default_rng(zlib.crc32(f"{layer_name}/{i}".encode()))
    if layer_type == "BatchNorm":
        v = [lambda: rng.uniform(-0.1, 0.1, shape), lambda: rng.uniform(0.5, 1.5, shape),
             lambda: np.ones(shape)][i]()
    elif layer_type == "Scale":
        v = rng.uniform(0.8, 1.2, shape) if i == 0 else rng.uniform(-0.1, 0.1, shape)
    elif i == 0:
        v = rng.standard_normal(shape) * np.sqrt(2.0 / math.prod(shape[1:]))
    else:
        v = rng.uniform(-0.1, 0.1, shape)
    return np.asarray(v, dtype=np.float32)


def test_inner_product_matches_caffe(shared_dir):
    blobs = np.load(shared_dir / "golden" / "lenet" / "outputs.npz")
    x = blobs["pool2"]                      # (2, 50, 4, 4), flattened from axis 1
    attrs = {"num_output": 500, "bias_term": True, "axis": 1, "transpose": False}
    params = [golden_weight("ip1", i, s.shape, "InnerProduct")
              for i, s in enumerate(IP.param_specs(attrs, [f32(x.shape)]))]
    (y,) = IP.forward(attrs, [x], params, Context())
    assert rel_err(np.maximum(y, 0), blobs["ip1"]) < 2e-6    # relu1 runs in place on ip1


@pytest.mark.parametrize("net,bottom,top", [("caffenet_deploy", "pool1", "norm1"),
                                            ("googlenet_deploy", "pool1/3x3_s2", "pool1/norm1")])
def test_lrn_matches_caffe(shared_dir, net, bottom, top):
    blobs = np.load(shared_dir / "golden" / net / "outputs.npz")
    attrs = {"local_size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0,
             "norm_region": "ACROSS_CHANNELS"}
    x = blobs[bottom]
    (y,) = LRN.forward(attrs, [x], [], Context())
    assert rel_err(y, blobs[top]) < 1e-6
    # alpha is tiny, so also compare what LRN changes, not only the (almost identity) output
    assert rel_err(y.astype(np.float64) - x, blobs[top].astype(np.float64) - x) < 2e-2


def test_conv_batchnorm_matches_caffe(shared_dir):
    """MobileNet conv1 -> BatchNorm (global stats) -> Scale -> ReLU, all in place in Caffe."""
    blobs = np.load(shared_dir / "golden" / "mobilenet_deploy" / "outputs.npz")
    conv = get_op("Convolution")
    ca = {"num_output": 32, "bias_term": False, "kernel": [3, 3], "stride": [2, 2],
          "pad": [1, 1], "dilation": [1, 1], "group": 1, "axis": 1}
    x = blobs["data"]
    w = golden_weight("conv1", 0, conv.param_specs(ca, [f32(x.shape)])[0].shape, "Convolution")
    (c,) = conv.forward(ca, [x], [w], Context())
    ba = BN.from_caffe(layer('type: "BatchNorm" batch_norm_param { use_global_stats: true '
                             'eps: 1e-5 }'), "test")
    bp = [golden_weight("conv1/bn", i, s.shape, "BatchNorm")
          for i, s in enumerate(BN.param_specs(ba, [f32(c.shape)]))]
    (b,) = BN.forward(ba, [c], bp, Context())
    gamma = golden_weight("conv1/scale", 0, (32,), "Scale")
    beta = golden_weight("conv1/scale", 1, (32,), "Scale")
    y = np.maximum(b * gamma[:, None, None] + beta[:, None, None], 0)
    assert rel_err(y, blobs["conv1"]) < 2e-6
