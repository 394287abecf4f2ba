"""ONNX export (graphc/export/onnx.py): the exported model, run by onnxruntime, against
graphc's reference executor (every op, Caffe's pooling corner cases against naive loops) and,
for every zoo net, every saved blob against real Caffe's output."""
import math
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx package is not installed "
                                          "(pip install 'graphc[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed "
                                                "(pip install onnxruntime)")

import graphc  # noqa: E402
from graphc.errors import GraphcError  # noqa: E402
from graphc.export.onnx import export_onnx  # noqa: E402
from graphc.ir.graph import Graph, Node, Param  # noqa: E402
from graphc.ir.types import f32  # noqa: E402
from graphc.ops import get_op  # noqa: E402
from graphc.ops.base import Context  # noqa: E402
from graphc.reference import ReferenceExecutor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLT_MAX = float(np.finfo(np.float32).max)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    ref = np.linalg.norm(b)
    assert ref > 0, "the expected output is all zeros: the comparison would be meaningless"
    return float(np.linalg.norm(a - b) / ref)


def run_onnx(model, feeds: dict) -> list[np.ndarray]:
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def one_op(rng, op, attrs, in_shapes, param_data=None, ninputs=None) -> Graph:
    """A graph of one node of ``op`` over inputs x0, x1, ... (params random unless given)."""
    g = Graph(f"one_{op}")
    ins = [g.add_input(f"x{i}", f32(s)) for i, s in enumerate(in_shapes)]
    in_types = [g.types[v] for v in ins]
    o = get_op(op)
    specs = o.param_specs(attrs, in_types)
    pnames = []
    for i, spec in enumerate(specs):
        data = (param_data[i] if param_data is not None else
                rng.standard_normal(spec.shape).astype(np.float32))
        name = f"{op.lower()}.{i}"
        g.add_param(Param(name, f32(spec.shape), data=np.asarray(data, np.float32)))
        pnames.append(name)
    outs = o.infer(attrs, in_types, [g.params[p].type for p in pnames])
    onames = [f"y{i}" for i in range(len(outs))]
    g.add_node(Node(op, "layer", ins, onames, pnames, dict(attrs)), outs)
    g.outputs = onames
    return g


def check_graph(g: Graph, feeds: dict, tol: float = 1e-5):
    ref = ReferenceExecutor(g, Context("test")).run(dict(feeds), keep=set(g.outputs))
    got = run_onnx(export_onnx(g), feeds)
    assert len(got) == len(g.outputs)
    for v, y in zip(g.outputs, got):
        assert rel_l2(y, ref[v]) <= tol, v


# ---- every op ------------------------------------------------------------------------------
def conv_attrs(num_output, kernel, stride=(1, 1), pad=(0, 0), dilation=(1, 1), group=1,
               bias=True, axis=1):
    return {"num_output": num_output, "bias_term": bias, "kernel": list(kernel),
            "stride": list(stride), "pad": list(pad), "dilation": list(dilation),
            "group": group, "axis": axis}


CASES = {
    "conv_group_dilation_pad": ("Convolution", conv_attrs(6, (3, 2), (2, 1), (1, 2), (2, 1), 2),
                                [(2, 4, 11, 9)]),
    "conv_no_bias_two_bottoms": ("Convolution", conv_attrs(5, (3, 3), bias=False),
                                 [(2, 3, 7, 7), (2, 3, 7, 7)]),
    "conv_axis2": ("Convolution", conv_attrs(4, (3,), axis=2), [(2, 3, 5, 9)]),
    "deconv": ("Deconvolution", conv_attrs(6, (4, 3), (2, 3), (1, 1), (1, 2), 2),
               [(2, 4, 5, 6)]),
    "ip": ("InnerProduct", {"num_output": 7, "bias_term": True, "axis": 1,
                            "transpose": False}, [(3, 4, 2, 5)]),
    "ip_axis2_transpose": ("InnerProduct", {"num_output": 5, "bias_term": False, "axis": 2,
                                            "transpose": True}, [(2, 3, 4, 6)]),
    "ip_axis_last": ("InnerProduct", {"num_output": 3, "bias_term": True, "axis": -1,
                                      "transpose": False}, [(2, 3, 4)]),
    "lrn_across": ("LRN", {"local_size": 5, "alpha": 1e-2, "beta": 0.75, "k": 2.0,
                           "norm_region": "ACROSS_CHANNELS"}, [(2, 7, 4, 5)]),
    "lrn_within": ("LRN", {"local_size": 3, "alpha": 0.3, "beta": 0.75, "k": 1.0,
                           "norm_region": "WITHIN_CHANNEL"}, [(2, 3, 6, 5)]),
    "scale_bias": ("Scale", {"axis": 1, "num_axes": 1, "bias_term": True,
                             "filler": {}, "bias_filler": {}}, [(2, 4, 3, 5)]),
    "scale_two_axes": ("Scale", {"axis": 1, "num_axes": 2, "bias_term": False,
                                 "filler": {}, "bias_filler": {}}, [(2, 4, 3, 5)]),
    "scale_bottom": ("Scale", {"axis": 1, "num_axes": 1, "bias_term": True, "filler": {},
                               "bias_filler": {}}, [(2, 4, 3, 5), (4, 3)]),
    "bias_param": ("Bias", {"axis": 2, "num_axes": 1, "filler": {}}, [(2, 4, 3, 5)]),
    "bias_bottom": ("Bias", {"axis": 0, "num_axes": 1, "filler": {}}, [(2, 4, 3), (2,)]),
    "eltwise_sum": ("Eltwise", {"operation": "SUM", "coeff": [1.0, -0.5, 2.0],
                                "stable_prod_grad": True}, [(2, 3, 4)] * 3),
    "eltwise_prod": ("Eltwise", {"operation": "PROD", "coeff": [1.0, 1.0],
                                 "stable_prod_grad": True}, [(2, 3, 4)] * 2),
    "eltwise_max": ("Eltwise", {"operation": "MAX", "coeff": [1.0] * 3,
                                "stable_prod_grad": True}, [(2, 3, 4)] * 3),
    "concat": ("Concat", {"axis": 2}, [(2, 3, 4), (2, 3, 1), (2, 3, 2)]),
    "relu": ("ReLU", {"negative_slope": 0.0}, [(2, 3, 4)]),
    "leaky_relu": ("ReLU", {"negative_slope": 0.1}, [(2, 3, 4)]),
    "prelu": ("PReLU", {"channel_shared": False, "filler": {}}, [(2, 3, 4, 2)]),
    "prelu_shared": ("PReLU", {"channel_shared": True, "filler": {}}, [(2, 3, 4)]),
    "elu": ("ELU", {"alpha": 0.7}, [(2, 3, 4)]),
    "sigmoid": ("Sigmoid", {}, [(2, 3, 4)]),
    "tanh": ("TanH", {}, [(2, 3, 4)]),
    "absval": ("AbsVal", {}, [(2, 3, 4)]),
    "power": ("Power", {"power": 2.0, "scale": 0.5, "shift": 3.0}, [(2, 3, 4)]),
    "power_const": ("Power", {"power": 2.0, "scale": 0.0, "shift": 3.0}, [(2, 3, 4)]),
    "exp": ("Exp", {"base": 2.0, "scale": 0.5, "shift": 0.25}, [(2, 3, 4)]),
    "exp_e": ("Exp", {"base": -1.0, "scale": 1.0, "shift": 0.0}, [(2, 3, 4)]),
    "log": ("Log", {"base": 10.0, "scale": 2.0, "shift": 10.0}, [(2, 3, 4)]),
    "bnll": ("BNLL", {}, [(2, 3, 4)]),
    "threshold": ("Threshold", {"threshold": 0.2}, [(2, 3, 4)]),
    "softmax": ("Softmax", {"axis": 1}, [(2, 5, 3)]),
    "softmax_axis2": ("Softmax", {"axis": -1}, [(2, 5, 3)]),
    "dropout": ("Dropout", {"dropout_ratio": 0.5, "train": False}, [(2, 3, 4)]),
    "flatten": ("Flatten", {"axis": 1, "end_axis": 2}, [(2, 3, 4, 5)]),
    "reshape": ("Reshape", {"shape": [0, -1, 2], "axis": 0, "num_axes": -1}, [(2, 3, 4)]),
    "crop": ("Crop", {"axis": 2, "offset": [1, 2]}, [(2, 3, 7, 8), (1, 1, 4, 5)]),
    "slice": ("Slice", {"axis": 1, "slice_point": [1, 4], "num_top": 3}, [(2, 6, 3)]),
    "tile": ("Tile", {"axis": 1, "tiles": 3}, [(2, 3, 4)]),
    "split": ("Split", {"num_top": 2}, [(2, 3, 4)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_reference(rng, case):
    op, attrs, shapes = CASES[case]
    g = one_op(rng, op, attrs, shapes)
    feeds = {f"x{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    if op == "Log":
        feeds["x0"] = np.abs(feeds["x0"]) + np.float32(0.1)
    check_graph(g, feeds)


@pytest.mark.parametrize("factor", [2.5, 0.0])
def test_batchnorm_scale_factor(rng, factor):
    """Caffe divides mean and variance by the third blob (0 when it is 0)."""
    c = 4
    data = [rng.standard_normal(c).astype(np.float32),
            rng.uniform(0.5, 2.0, c).astype(np.float32), np.array([factor], np.float32)]
    g = one_op(rng, "BatchNorm", {"use_global_stats": True, "moving_average_fraction": 0.999,
                                  "eps": 1e-3}, [(2, c, 3, 5)], param_data=data)
    check_graph(g, {"x0": rng.standard_normal((2, c, 3, 5)).astype(np.float32)})


# ---- Caffe's pooling ------------------------------------------------------------------------
def naive_pool(x, method, k, s, p, round_mode):
    """Caffe's MAX/AVE loops in float64, from its rules (not from graphc's code)."""
    n, c, h, w = x.shape

    def size(n_, k_, s_, p_):
        q = (n_ + 2 * p_ - k_) / s_
        o = (math.ceil(q) if round_mode == "CEIL" else math.floor(q)) + 1
        return o - 1 if (p[0] or p[1]) and (o - 1) * s_ >= n_ + p_ else o

    oh, ow = size(h, k[0], s[0], p[0]), size(w, k[1], s[1], p[1])
    y = np.full((n, c, oh, ow), np.nan)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s[0] - p[0], j * s[1] - p[1]
            h1, w1 = min(h0 + k[0], h + p[0]), min(w0 + k[1], w + p[1])
            win = x[:, :, max(h0, 0):min(h1, h), max(w0, 0):min(w1, w)].astype(np.float64)
            if method == "MAX":
                y[:, :, i, j] = win.max(axis=(2, 3)) if win.size else -FLT_MAX
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    y[:, :, i, j] = win.sum(axis=(2, 3)) / ((h1 - h0) * (w1 - w0))
    return y


POOLS = [  # (H, W), kernel, stride, pad, round_mode
    ((6, 6), (3, 3), (2, 2), (1, 1), "CEIL"),    # last window crosses H + pad: AVE divisor 2
    ((5, 7), (2, 3), (2, 2), (1, 1), "CEIL"),    # the "last window starts in the pad" clip
    ((13, 13), (3, 3), (2, 2), (0, 0), "CEIL"),  # GoogLeNet/SqueezeNet: ceil, partial window
    ((6, 9), (3, 2), (2, 3), (0, 0), "CEIL"),    # partial last window without padding
    ((7, 8), (2, 2), (2, 2), (0, 0), "FLOOR"),   # floor: a trailing row no window reads
    ((7, 7), (3, 3), (1, 1), (1, 1), "CEIL"),    # GoogLeNet's stride-1 pad-1
    ((9, 8), (3, 3), (2, 2), (2, 1), "FLOOR"),
    ((5, 4), (1, 1), (3, 2), (0, 0), "CEIL"),    # kernel < stride: a window past the image
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("hw,k,s,p,mode", POOLS)
def test_pooling_matches_caffe(rng, method, hw, k, s, p, mode):
    attrs = {"pool": method, "kernel": list(k), "stride": list(s), "pad": list(p),
             "global_pooling": False, "round_mode": mode, "top_mask": False}
    x = rng.standard_normal((2, 3, *hw)).astype(np.float32)
    g = one_op(rng, "Pooling", attrs, [x.shape])
    (y,) = run_onnx(export_onnx(g), {"x0": x})
    want = naive_pool(x, method, k, s, p, mode)
    assert y.shape == want.shape
    ok = np.isfinite(want)          # an AVE window past the image: Caffe's 0/0
    assert np.array_equal(np.isfinite(y), ok)
    assert np.allclose(y[ok], want[ok], rtol=1e-5, atol=1e-6)
    ref = ReferenceExecutor(g, Context("test")).run({"x0": x}, keep={"y0"})["y0"]
    assert np.allclose(y[ok], ref[ok], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(rng, method):
    attrs = {"pool": method, "kernel": None, "stride": [1, 1], "pad": [0, 0],
             "global_pooling": True, "round_mode": "CEIL", "top_mask": False}
    g = one_op(rng, "Pooling", attrs, [(2, 3, 5, 7)])
    check_graph(g, {"x0": rng.standard_normal((2, 3, 5, 7)).astype(np.float32)})


# ---- whole nets -----------------------------------------------------------------------------
def _golden():
    import sys
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import golden
    return golden


@pytest.mark.parametrize("name", _golden().NETS)
def test_zoo_net_matches_caffe_and_reference(shared_dir, name):
    """A zoo net with the golden weights: every blob (as an ONNX output) within relative
    L2 1e-4 of graphc's reference, and of real Caffe's where the golden set saved it."""
    golden = _golden()
    d = shared_dir / "golden" / name
    man = golden.manifest(d)
    model = d / f"{name}.caffemodel"
    net = graphc.Net(str(d / "net.prototxt"), batch=man["input_shape"][0],
                     weights=str(model) if model.exists() else None)
    if not model.exists():
        golden.apply_rule(net, man)
    x = np.load(d / "input.npy")
    saved = np.load(d / "outputs.npz")
    blobs = [b for b in man["blob_order"] if b != man["input_blob"]]
    ys = run_onnx(export_onnx(net, outputs=blobs), {man["input_blob"]: x})
    net.forward(**{man["input_blob"]: x})
    compared = 0
    for blob, y in zip(blobs, ys):
        assert rel_l2(y, net.blobs[blob]) <= 1e-4, f"blob {blob} against the reference"
        if blob in saved.files:
            assert rel_l2(y, saved[blob]) <= 1e-4, f"blob {blob} against Caffe"
            compared += 1
    assert compared >= min(len(saved.files) - 1, 5)


def test_optimized_graph_with_fused_nodes(rng):
    """The graph after the inference passes (Fused nodes, folded BatchNorm) exports too."""
    from graphc.passes import run_pipeline
    proto = ROOT / "examples" / "lenet.prototxt"
    net = graphc.Net(str(proto), batch=2, seed=int(rng.integers(1 << 30)))
    for blobs in net.params.values():
        for b in blobs:
            b[...] = rng.standard_normal(b.shape).astype(np.float32) * np.float32(0.1)
    opt = run_pipeline(net.graph)
    assert any(n.op == "Fused" for n in opt.nodes)
    x = rng.standard_normal(net.graph.types[net.graph.inputs[0]].shape).astype(np.float32)
    want = net.forward(data=x)
    (y,) = run_onnx(export_onnx(opt), {"data": x})
    assert rel_l2(y, want[net.outputs[0]]) <= 1e-5


def test_inplace_blob_output_keeps_its_name(rng):
    """An in-place blob exported as an output is its last version, under its blob name."""
    g = Graph("inplace")
    g.add_input("x", f32(2, 3))
    g.add_node(Node("TanH", "t", ["x"], ["h"]), [f32(2, 3)])
    g.add_node(Node("ReLU", "r", ["h"], ["h~r"], attrs={"negative_slope": 0.0}), [f32(2, 3)],
               ["h"])
    g.add_node(Node("Sigmoid", "s", ["h~r"], ["y"]), [f32(2, 3)])
    g.outputs = ["y"]
    model = export_onnx(g, outputs=["h", "y"])
    assert [o.name for o in model.graph.output] == ["h", "y"]
    x = rng.standard_normal((2, 3)).astype(np.float32)
    h, y = run_onnx(model, {"x": x})
    assert np.allclose(h, np.maximum(np.tanh(x), 0), rtol=1e-6, atol=1e-7)
    assert np.allclose(y, 1 / (1 + np.exp(-np.maximum(np.tanh(x), 0))), rtol=1e-5)


def test_unsupported_op_names_the_layer(rng):
    g = one_op(rng, "ArgMax", {"out_max_val": False, "top_k": 1, "axis": None},
               [(2, 5)])
    with pytest.raises(GraphcError, match="layer 'layer' \\(ArgMax\\).*no ONNX export"):
        export_onnx(g)


def test_stochastic_pooling_and_missing_weights_are_errors(rng):
    attrs = {"pool": "STOCHASTIC", "kernel": [2, 2], "stride": [2, 2], "pad": [0, 0],
             "global_pooling": False, "round_mode": "CEIL", "top_mask": False,
             "train": False}
    with pytest.raises(GraphcError, match="STOCHASTIC"):
        export_onnx(one_op(rng, "Pooling", attrs, [(1, 2, 4, 4)]))
    g = one_op(rng, "InnerProduct", CASES["ip"][1], [(2, 3)])
    g.params["innerproduct.0"].data = None
    with pytest.raises(GraphcError, match="has no values"):
        export_onnx(g)


def test_cli_export(tmp_path, rng, capsys):
    from graphc.cli import main
    proto = ROOT / "examples" / "lenet.prototxt"
    net = graphc.Net(str(proto), batch=3)
    for blobs in net.params.values():
        for b in blobs:
            b[...] = rng.standard_normal(b.shape).astype(np.float32) * np.float32(0.1)
    net.save(tmp_path / "w.caffemodel")
    out = tmp_path / "lenet.onnx"
    assert main(["export", str(proto), "--weights", str(tmp_path / "w.caffemodel"),
                 "--batch", "3", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    (y,) = run_onnx(onnx.load(str(out)), {"data": x})
    assert rel_l2(y, net.forward(data=x)["prob"]) <= 1e-5
    # an unsupported layer: exit status 1 and a message naming it, no traceback
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "in" type: "Input" top: "x" top: "l" '
                   'input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }\n'
                   'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "l" '
                   'top: "loss" }\n')
    assert main(["export", str(bad), "-o", str(tmp_path / "bad.onnx")]) == 1
    assert "layer 'loss' (SoftmaxWithLoss)" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()
