"""The autodiff pass and training through Net: whole-net float64 gradient checks, Caffe's
rules (shared params, blobs read twice, in-place layers, lr_mult 0, propagate_down,
force_backward, loss weights), the IR text of train graphs, the CLI, and real Caffe's
training losses on the digits net."""
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import graphc
from graphc.errors import GraphcError
from graphc.frontend import caffe_pb2
from graphc.ir import parse_graph, print_graph, verify
from graphc.passes import PASSES, run_pipeline, TRAIN_PIPELINE

from gradcheck import check_net

autodiff = PASSES["autodiff"]


def make_net(text: str, rng=None, seed=0, scale=0.5) -> graphc.Net:
    """A train-phase Net from prototxt text; with ``rng``, learnable params get fresh
    N(0, scale^2) values."""
    net = graphc.Net(text_format.Parse(text, caffe_pb2.NetParameter()), phase="train",
                     seed=seed)
    if rng is not None:
        for p in net.graph.params.values():
            if p.lr_mult != 0:
                p.data[...] = scale * rng.standard_normal(p.type.shape)
    return net


def grad_nodes(g):
    return [n for n in g.nodes if n.op == "Grad"]


LENET = """
name: "lenet-ish"
force_backward: %s
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 3 dim: 2 dim: 7 dim: 7 } shape { dim: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 6 } }
layer { name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 4 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" }
"""


def lenet_feeds(rng):
    return {"data": rng.standard_normal((3, 2, 7, 7)),
            "label": rng.integers(0, 4, 3).astype(np.float64)}


def test_lenet_like_gradients(rng):
    net = make_net(LENET % "false", rng)
    tg, errs = check_net(net.graph, lenet_feeds(rng), rng=rng)
    assert set(errs) == {"conv1.0", "conv1.1", "ip1.0", "ip1.1", "ip2.0", "ip2.1"}
    assert "data" not in tg.value_grads          # data needs no gradient ...
    assert not any(n.attrs["need_inputs"][0] for n in grad_nodes(tg)
                   if n.attrs["node"] == "conv1")
    assert not any(n.attrs["node"] == "acc" for n in grad_nodes(tg))   # not differentiable


def test_force_backward_gives_the_data_gradient(rng):
    net = make_net(LENET % "true", rng)
    assert net.graph.force_backward
    tg, errs = check_net(net.graph, lenet_feeds(rng), rng=rng, check_inputs=["data"])
    assert "data" in tg.value_grads and "label" not in tg.value_grads
    assert tg.value_grads["data"] in tg.outputs


SHARED = """
name: "shared"
force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 4 } } }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a"
        param { name: "w" } param { name: "b" } inner_product_param { num_output: 4 } }
layer { name: "tanh" type: "TanH" bottom: "a" top: "h" }
layer { name: "b" type: "InnerProduct" bottom: "h" top: "b2"
        param { name: "w" } param { name: "b" lr_mult: 2 } inner_product_param { num_output: 4 } }
layer { name: "sum" type: "Eltwise" bottom: "b2" bottom: "x" bottom: "h" top: "s" }
layer { name: "loss" type: "EuclideanLoss" bottom: "s" bottom: "t" top: "loss" }
"""


def test_shared_params_and_blobs_read_twice_accumulate(rng):
    net = make_net(SHARED, rng)
    feeds = {"x": rng.standard_normal((3, 4)), "t": rng.standard_normal((3, 4))}
    tg, errs = check_net(net.graph, feeds, rng=rng, check_inputs=["x", "t"])
    assert set(tg.param_grads) == {"w", "b"}
    sums = {n.outputs[0]: n for n in tg.nodes if n.op == "Sum"}
    assert len(sums[tg.param_grads["w"]].inputs) == 2       # two layers share w
    split = [n for n in tg.nodes if n.op == "Grad" and n.attrs["op"] == "Split"]
    assert len(split) == 2 and all(len(n.attrs["grads"]) == 2 for n in split)
    assert tg.value_grads["t"] in tg.outputs    # EuclideanLoss reaches both bottoms


INPLACE = """
name: "inplace"
layer { name: "in" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } shape { dim: 2 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 stride: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" relu_param { negative_slope: 0.1 } }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "power" type: "Power" bottom: "conv" top: "conv"
        power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "drop" type: "Dropout" bottom: "conv" top: "conv" dropout_param { dropout_ratio: 0.4 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "ip" bottom: "target" top: "loss" }
"""


def test_inplace_chain_with_dropout_mask(rng):
    net = make_net(INPLACE, rng)
    feeds = {"data": rng.standard_normal((2, 3, 4, 4)), "target": rng.random((2, 5))}
    tg, errs = check_net(net.graph, feeds, rng=rng)
    assert set(errs) == {"conv.0", "conv.1", "scale.0", "scale.1", "ip.0", "ip.1"}
    chain = [n.attrs["node"] for n in grad_nodes(tg)]
    assert chain == ["loss", "ip", "drop", "power", "scale", "relu", "conv"]


def test_net_blob_diffs_follow_caffe_for_inplace_blobs(rng):
    net = make_net(INPLACE, rng, seed=3)
    x, t = rng.standard_normal((2, 3, 4, 4)), rng.random((2, 5))
    loss = net.forward_backward(data=x, target=t)
    tg = net.train_graph
    assert loss == pytest.approx(float(net.blobs["loss"]))
    # Caffe's diff of an in-place blob is the gradient of its first version (conv's top)
    direct = graphc.reference.ReferenceExecutor(tg, graphc.ops.Context(
        "train", np.random.default_rng(3))).run({"data": x, "target": t},
                                                keep=[tg.value_grads["conv"]])
    np.testing.assert_allclose(net.blob_diffs["conv"], direct[tg.value_grads["conv"]],
                               rtol=1e-6)
    assert not net.blob_diffs["data"].any()


BN = """
name: "bn"
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 2 dim: 5 dim: 5 } shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_batchnorm_train_mode(rng):
    net = make_net(BN, rng)
    bn = net.graph.node("bn")
    assert bn.attrs["use_global_stats"] is False
    feeds = {"data": rng.standard_normal((4, 2, 5, 5)),
             "label": rng.integers(0, 3, 4).astype(np.float64)}
    # the conv bias is a per-channel constant that BatchNorm subtracts: gradient 0
    tg, errs = check_net(net.graph, feeds, rng=rng, zero={"conv.1"})
    assert not any(p.startswith("bn.") for p in tg.param_grads)   # statistics: lr_mult 0
    assert {"conv.0", "sc.0", "sc.1", "ip.0"} <= set(errs)


BN_DROP = BN.replace('top: "conv" }\nlayer { name: "sc"',
                     'top: "conv" }\nlayer { name: "drop" type: "Dropout" bottom: "conv" '
                     'top: "conv" }\nlayer { name: "sc"')


def test_backward_replays_the_last_forward(rng):
    assert "Dropout" in BN_DROP
    net = make_net(BN_DROP, rng, seed=5)
    start = {n: p.data.copy() for n, p in net.graph.params.items()}
    feeds = dict(data=rng.standard_normal((4, 2, 5, 5)).astype(np.float32),
                 label=rng.integers(0, 3, 4).astype(np.float32))
    net.forward(**feeds)
    stats = [a.copy() for a in net.params["bn"]]
    net.backward()
    for a, b in zip(net.params["bn"], stats):          # statistics updated once, not twice
        np.testing.assert_array_equal(a, b)
    # the same pass in one call, on a twin net (same seed: same Dropout mask)
    twin = make_net(BN_DROP, seed=5)
    for n, p in twin.graph.params.items():
        p.data[...] = start[n]
    twin.forward_backward(**feeds)
    assert set(net.grads) == set(net.graph.params)
    for n in net.grads:
        np.testing.assert_array_equal(net.grads[n], twin.grads[n])
    assert net.grads["conv.0"].any() and not net.grads["bn.0"].any()
    with pytest.raises(GraphcError, match="forward"):
        make_net(BN_DROP).backward()


MISC = """
name: "misc"
layer { name: "in" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 2 dim: 2 dim: 4 dim: 4 } shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "up" type: "Deconvolution" bottom: "x" top: "up"
        convolution_param { num_output: 2 kernel_size: 3 stride: 2 } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "x" top: "crop" crop_param { offset: 2 } }
layer { name: "cat" type: "Concat" bottom: "crop" bottom: "x" top: "cat" }
layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn" lrn_param { local_size: 3 alpha: 0.3 } }
layer { name: "slice" type: "Slice" bottom: "lrn" top: "s0" top: "s1" slice_param { slice_point: 3 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "s0" bottom: "t" top: "loss" loss_weight: 2 }
layer { name: "red" type: "Reduction" bottom: "s1" top: "r" loss_weight: 0.25
        reduction_param { operation: SUMSQ } }
"""


def test_deconv_crop_concat_lrn_slice_and_loss_weights(rng):
    net = make_net(MISC, rng)
    feeds = {"x": rng.standard_normal((2, 2, 4, 4)), "t": rng.standard_normal((2, 3, 4, 4))}
    tg, errs = check_net(net.graph, feeds, rng=rng)
    assert set(errs) == {"up.0", "up.1"}
    assert dict(tg.losses) == {"loss": 2.0, "r": 0.25}
    seeds = {n.outputs[0]: n.attrs["value"] for n in tg.nodes if n.op == "Fill"}
    assert sorted(seeds.values()) == [0.25, 2.0]


def test_lr_mult_zero_and_propagate_down_skip_work(rng):
    text = LENET % "false"
    frozen = text.replace('top: "conv1"\n        convolution_param',
                          'top: "conv1" param { lr_mult: 0 } param { lr_mult: 0 }\n'
                          '        convolution_param')
    g = autodiff(make_net(frozen).graph)
    names = [n.attrs["node"] for n in grad_nodes(g)]
    # nothing below pool1 needs a gradient: no Grad for pool1, relu1, conv1
    assert names == ["loss", "ip2_ip2_0_split", "ip2", "relu2", "ip1"]
    assert not any(n.attrs["need_inputs"][0] for n in grad_nodes(g) if n.attrs["node"] == "ip1")
    assert "conv1.0" not in g.param_grads and "ip1.0" in g.param_grads
    # freezing only the bias: the weight still gets its gradient, the bias no work
    half = text.replace('top: "ip2"\n', 'top: "ip2" param { lr_mult: 1 } param { lr_mult: 0 }\n')
    g = autodiff(make_net(half).graph)
    ip2 = [n for n in grad_nodes(g) if n.attrs["node"] == "ip2"][0]
    assert ip2.attrs["need_params"] == [True, False] and "ip2.1" not in g.param_grads
    # propagate_down false on ip2's bottom: ip2 still trains, nothing below does
    pd = text.replace('bottom: "ip1" top: "ip2"', 'bottom: "ip1" top: "ip2" propagate_down: false')
    g = autodiff(make_net(pd).graph)
    assert [n.attrs["node"] for n in grad_nodes(g)] == ["loss", "ip2_ip2_0_split", "ip2"]
    assert set(g.param_grads) == {"ip2.0", "ip2.1"}
    net = make_net(pd, rng)
    feeds = lenet_feeds(rng)
    net.forward_backward(data=feeds["data"].astype(np.float32),
                         label=feeds["label"].astype(np.float32))
    assert not net.grads["conv1.0"].any() and net.grads["ip2.0"].any()


IR_TWICE = """
graph "twice" {
  input %x: f32[2,3]
  param $w: f32[3,3] {lr_mult=1.0, decay_mult=1.0}
  %y: f32[2,3] = InnerProduct(%x, $w) {num_output=3, bias_term=false, axis=1, transpose=false} name="ip"
  %sq: f32[2,3] = Eltwise(%y, %y) {operation="PROD", coeff=[1.0, 1.0], stable_prod_grad=true} name="sq"
  %s: f32[2,3] = Sigmoid(%y) name="sig"
  %loss: f32[] = EuclideanLoss(%sq, %s) {loss_weight=[0.5]} name="loss"
  output %loss
}
"""


def test_ir_without_splits_sums_every_read(rng):
    """IR written directly (no Caffe Split nodes): a value read three times gets one Sum
    of three partial gradients."""
    g = parse_graph(IR_TWICE)
    g.params["w"].data = rng.standard_normal((3, 3))
    tg, errs = check_net(g, {"x": rng.standard_normal((2, 3))}, rng=rng)
    sums = [n for n in tg.nodes if n.op == "Sum"]
    assert len(sums) == 1 and sums[0].outputs == ["y@grad"]
    assert sums[0].inputs == ["y@grad.0", "y@grad.1", "y@grad.2"]
    assert tg.losses == [("loss", 0.5)]


def test_no_loss_means_no_backward():
    g = autodiff(make_net("""
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }
""").graph)
    assert not grad_nodes(g) and not g.param_grads and not g.losses


def test_train_graph_text_round_trip(rng):
    g = run_pipeline(make_net(SHARED).graph, TRAIN_PIPELINE)
    text = print_graph(g)
    assert "  loss %loss weight=1.0" in text
    assert "  grad $w = %$w@grad" in text and "force_backward" in text
    g2 = verify(parse_graph(text))
    assert print_graph(g2) == text
    assert g2.param_grads == g.param_grads and g2.losses == g.losses
    assert g2.value_grads == g.value_grads and g2.force_backward
    copy = g.copy()
    assert print_graph(copy) == text


@pytest.mark.parametrize("text", [LENET % "false", SHARED, MISC], ids=["lenet", "shared", "misc"])
def test_inference_passes_keep_the_gradients(text, rng):
    """The backward graph is ordinary IR: the inference pipeline (dead-code drops Caffe's
    Split nodes, ...) may run on it and the gradients stay the same."""
    from graphc.ops import Context
    from graphc.passes import DEFAULT_PIPELINE
    from graphc.reference import ReferenceExecutor
    net = make_net(text, rng)
    tg = run_pipeline(net.graph, TRAIN_PIPELINE)
    opt = run_pipeline(tg, DEFAULT_PIPELINE)
    assert opt.param_grads.keys() == tg.param_grads.keys() and opt.losses
    feeds = {v: rng.integers(0, 3, t.shape).astype(np.float32) if v == "label"
             else rng.standard_normal(t.shape).astype(np.float32)
             for v, t in tg.types.items() if v in tg.inputs}
    envs = [ReferenceExecutor(g, Context("train", np.random.default_rng(1))).run(feeds)
            for g in (tg, opt)]
    for p in tg.param_grads:
        np.testing.assert_allclose(envs[1][opt.param_grads[p]], envs[0][tg.param_grads[p]],
                                   rtol=1e-6, atol=1e-7)


def test_autodiff_twice_and_fused_nodes_are_refused():
    g = autodiff(make_net(SHARED).graph)
    with pytest.raises(GraphcError, match="already has a backward graph"):
        autodiff(g)
    fused = run_pipeline(make_net(LENET % "false").graph, ["fuse"])
    assert any(n.op == "Fused" for n in fused.nodes)
    with pytest.raises(GraphcError, match="no gradient rule") as e:
        autodiff(fused)
    assert "autodiff before the fuse pass" in str(e.value)


def test_cli_dump_after_autodiff(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(LENET % "false")
    out = subprocess.run([sys.executable, "-m", "graphc.cli", "dump", str(path), "--phase",
                          "train", "--after", "autodiff"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "= Grad(" in out.stdout and "grad $conv1.0 = %$conv1.0@grad" in out.stdout
    assert "Fill()" in out.stdout and "// totals" in out.stdout
    js = subprocess.run([sys.executable, "-m", "graphc.cli", "dump", str(path), "--phase",
                         "train", "--json"], capture_output=True, text=True)
    import json
    doc = json.loads(js.stdout)
    assert doc["losses"] == [{"value": "loss", "weight": 1.0}]
    assert doc["param_grads"]["ip2.1"] == "$ip2.1@grad"
    test = subprocess.run([sys.executable, "-m", "graphc.cli", "dump", str(path)],
                          capture_output=True, text=True)
    assert test.returncode == 0 and "Grad(" not in test.stdout


PYNET = """
name: "py"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 3 } }
layer { name: "cube" type: "Python" bottom: "y" top: "z" loss_weight: 1
        python_param { module: "%s" layer: "CubeSum" } }
"""

CUBE = '''
import numpy as np
from graphc.ops.python_layer import PythonLayer

class CubeSum(PythonLayer):
    def reshape(self, bottom, top):
        top[0].reshape(1)
    def forward(self, bottom, top):
        top[0].data[...] = (bottom[0].data ** 3).sum()
    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 3 * bottom[0].data ** 2 * top[0].diff[0]
'''


def test_python_layer_in_a_net(rng, tmp_path, monkeypatch):
    import uuid
    name = f"cube_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(CUBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    net = make_net(PYNET % name, rng)
    tg, errs = check_net(net.graph, {"x": rng.standard_normal((2, 3))}, rng=rng)
    assert set(errs) == {"ip.0", "ip.1"}


# ---- real Caffe -----------------------------------------------------------------------------
def _digits_net(shared_dir, monkeypatch):
    d = shared_dir / "golden" / "train_digits"
    if not (d / "init.caffemodel").exists():
        pytest.skip("golden/train_digits is absent")
    monkeypatch.chdir(d)     # Caffe opens the HDF5 list relative to the working directory
    return d, graphc.Net(str(d / "digits_train_test.prototxt"), phase="train",
                         weights=str(d / "init.caffemodel"))


def test_digits_sgd_losses_match_real_caffe(shared_dir, monkeypatch):
    """30 SGD iterations (lr policy inv, momentum 0.9, weight decay 5e-4, lr_mult 1/2),
    the update written out here: every loss equals Caffe's to 1e-5 relative, so every
    gradient is Caffe's."""
    d, net = _digits_net(shared_dir, monkeypatch)
    losses = np.load(d / "losses_sgd.npy")
    history = {n: np.zeros_like(p.data) for n, p in net.graph.params.items()}
    for it in range(30):
        loss = net.forward_backward()     # HDF5Data reads rows [50 it, 50 it + 50)
        assert loss == pytest.approx(float(losses[it]), rel=1e-5), f"iteration {it}"
        rate = np.float32(0.01) * np.float32((1 + 0.0001 * it) ** -0.75)
        for name, p in net.graph.params.items():
            g = net.grads[name] + np.float32(0.0005 * p.decay_mult) * p.data
            history[name] = np.float32(0.9) * history[name] + rate * np.float32(p.lr_mult) * g
            p.data -= history[name]


def test_digits_first_loss_with_fed_batch(shared_dir, monkeypatch):
    """The same net with its HDF5Data layer replaced by fed inputs (rows 0..49)."""
    import h5py
    d, _ = _digits_net(shared_dir, monkeypatch)
    msg = text_format.Parse((d / "digits_train_test.prototxt").read_text(),
                            caffe_pb2.NetParameter())
    layers = [l for l in msg.layer if l.type != "HDF5Data"]
    del msg.layer[:]
    inp = msg.layer.add()
    text_format.Parse('name: "data" type: "Input" top: "data" top: "label" input_param { '
                      'shape { dim: 50 dim: 1 dim: 8 dim: 8 } shape { dim: 50 } }', inp)
    msg.layer.extend(layers)
    net = graphc.Net(msg, phase="train", weights=str(d / "init.caffemodel"))
    with h5py.File(d / "digits_train.h5", "r") as f:
        data, label = f["data"][:50], f["label"][:50]
    loss = net.forward_backward(data=data, label=label)
    assert loss == pytest.approx(float(np.load(d / "losses_sgd.npy")[0]), rel=1e-5)
    assert set(net.grads) == {"conv1.0", "conv1.1", "ip1.0", "ip1.1", "ip2.0", "ip2.1"}
