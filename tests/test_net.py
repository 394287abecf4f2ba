"""graphc.Net: the pycaffe habits."""
from pathlib import Path

import numpy as np
import pytest

import graphc
from graphc.errors import GraphcError

ROOT = Path(__file__).resolve().parents[1]
LENET = str(ROOT / "examples" / "lenet.prototxt")


def test_forward_blobs_params(rng):
    net = graphc.Net(LENET, seed=1)
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    out = net.forward(data=x)
    assert list(out) == ["prob"] and out["prob"].shape == (1, 10)
    assert np.isclose(out["prob"].sum(), 1.0, atol=1e-5)
    assert list(net.blobs) == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"]
    # in-place ReLU: the blob holds the value after the ReLU, as in Caffe
    assert (net.blobs["ip1"] >= 0).all() and (net.blobs["ip1"] > 0).any()
    np.testing.assert_array_equal(net.blobs["data"], x)
    # params are writable: zero weights and biases -> uniform softmax
    for blobs in net.params.values():
        for b in blobs:
            b[...] = 0
    out = net.forward(data=x)
    np.testing.assert_allclose(out["prob"], np.full((1, 10), 0.1), rtol=1e-6)


def test_forward_from_blobs_like_pycaffe(rng):
    net = graphc.Net(LENET, seed=1)
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    want = net.forward(data=x)["prob"].copy()
    net.blobs["data"][...] = 0
    net.blobs["data"][...] = x
    np.testing.assert_array_equal(net.forward()["prob"], want)


def test_new_batch_reshapes_and_keeps_params(rng):
    net = graphc.Net(LENET, seed=1)
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    one = [net.forward(data=x[i:i + 1])["prob"][0] for i in range(3)]
    three = net.forward(data=x)["prob"]
    assert three.shape == (3, 10)
    np.testing.assert_allclose(three, np.stack(one), rtol=1e-5)


def test_save_and_copy_from_round_trip(tmp_path, rng):
    a = graphc.Net(LENET, seed=1)
    b = graphc.Net(LENET, seed=2)
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    assert not np.allclose(a.forward(data=x)["prob"], b.forward(data=x)["prob"])
    a.save(str(tmp_path / "a.caffemodel"))
    b.copy_from(str(tmp_path / "a.caffemodel"))
    np.testing.assert_array_equal(a.forward(data=x)["prob"], b.forward(data=x)["prob"])
    c = graphc.Net(LENET, weights=str(tmp_path / "a.caffemodel"))
    for layer in a.params:
        for pa, pc in zip(a.params[layer], c.params[layer]):
            np.testing.assert_array_equal(pa, pc)


def test_shared_params_are_one_array():
    text = '''
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }
    layer { name: "a" type: "InnerProduct" bottom: "data" top: "a"
            param { name: "w" } param { name: "bias" } inner_product_param { num_output: 4 } }
    layer { name: "b" type: "InnerProduct" bottom: "a" top: "b"
            param { name: "w" } param { name: "bias" } inner_product_param { num_output: 4 } }
    '''
    from graphc.frontend.prototxt import parse_net_text
    net = graphc.Net(parse_net_text(text, "shared.prototxt"))
    assert net.params["a"][0] is net.params["b"][0]
    assert set(net.graph.params) == {"w", "bias"}


def test_unknown_input_name():
    net = graphc.Net(LENET)
    with pytest.raises(GraphcError, match="no input blob named dat"):
        net.forward(dat=np.zeros((1, 1, 28, 28), np.float32))


def test_netspec_net_runs(rng):
    from models.lenet import lenet
    net = graphc.Net(lenet(batch=2), seed=0)
    out = net.forward(data=rng.standard_normal((2, 1, 28, 28)).astype(np.float32))
    assert out["prob"].shape == (2, 10)


def test_weights_of_layers_absent_from_the_net_are_ignored(tmp_path, rng):
    """Caffe's CopyTrainedLayersFrom: matched by layer name, extra layers ignored."""
    full = graphc.Net(LENET, seed=3)
    full.save(str(tmp_path / "lenet.caffemodel"))
    text = (ROOT / "examples" / "lenet.prototxt").read_text()
    head = text[:text.index('layer {\n  name: "pool1"')]      # data + conv1 only
    (tmp_path / "head.prototxt").write_text(head)
    net = graphc.Net(str(tmp_path / "head.prototxt"), weights=str(tmp_path / "lenet.caffemodel"))
    assert list(net.params) == ["conv1"]
    np.testing.assert_array_equal(net.params["conv1"][0], full.params["conv1"][0])
    x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
    full.forward(data=x)
    np.testing.assert_array_equal(net.forward(data=x)["conv1"], full.blobs["conv1"])
