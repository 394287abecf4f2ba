"""Unit tests of the Python net builder (graphc.frontend.netspec)."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from graphc.errors import GraphcError
from graphc.frontend import caffe_pb2
from graphc.frontend.netspec import L, P, TEST, TRAIN, NetSpec, param_field_for, to_proto


def parse_net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def parse_layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def small_net() -> NetSpec:
    n = NetSpec("small")
    n.data, n.label = L.Input(ntop=2, shape=[dict(dim=[4, 1, 8, 8]), dict(dim=[4])])
    n.conv1 = L.Convolution(n.data, num_output=3, kernel_size=3, pad=[1],
                            param=[dict(lr_mult=1), dict(lr_mult=2, decay_mult=0)],
                            weight_filler=dict(type="gaussian", std=0.01))
    n.relu1 = L.ReLU(n.conv1, in_place=True, negative_slope=0.1)
    n.pool1 = L.Pooling(n.relu1, pool="AVE", kernel_size=2, stride=2)
    n.ip = L.InnerProduct(n.pool1, num_output=10, bias_term=False)
    n.loss = L.SoftmaxWithLoss(n.ip, n.label, include=dict(phase=TRAIN),
                               loss_param=dict(ignore_label=-1))
    n.acc = L.Accuracy(n.ip, n.label, include=dict(phase="TEST"), top_k=5)
    return n


# written by hand: what pycaffe's NetSpec makes of the same calls
SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 1 dim: 8 dim: 8 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 3 pad: 1 kernel_size: 3
                            weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1"
        relu_param { negative_slope: 0.1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip"
        inner_product_param { num_output: 10 bias_term: false } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
        include { phase: TRAIN } loss_param { ignore_label: -1 } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
        include { phase: TEST } accuracy_param { top_k: 5 } }
"""


def test_small_net_matches_hand_written_prototxt():
    assert small_net().to_proto() == parse_net(SMALL_NET)


def test_prototxt_round_trip():
    n = small_net()
    text = n.to_prototxt()
    assert text_format.Parse(text, caffe_pb2.NetParameter()) == n.to_proto()
    assert 'name: "small"' in text and "pool: AVE" in text


# ---------------------------------------------------------------- naming

def test_in_place_keeps_blob_name_and_takes_layer_name():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.fc = L.InnerProduct(n.data, num_output=2)
    n.relu = L.ReLU(n.fc, in_place=True)
    n.drop = L.Dropout(n.relu, in_place=True)
    n.out = L.Softmax(n.drop)
    layers = n.to_proto().layer
    assert [(l.name, list(l.bottom), list(l.top)) for l in layers] == [
        ("data", [], ["data"]), ("fc", ["data"], ["fc"]), ("relu", ["fc"], ["fc"]),
        ("drop", ["fc"], ["fc"]), ("out", ["fc"], ["out"])]


def test_ntop_names_each_top_and_layer_after_first():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 6]))
    n.a, n.b, n.c = L.Slice(n.data, ntop=3, slice_point=[1, 3])
    n.s = L.Eltwise(n.a, n.c)
    layer = n.to_proto().layer[1]
    assert layer.name == "a" and list(layer.top) == ["a", "b", "c"]
    assert list(layer.slice_param.slice_point) == [1, 3]
    assert list(n.to_proto().layer[2].bottom) == ["a", "c"]


def test_unassigned_tops_and_layers_get_auto_names():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    n.a, _ = L.Slice(n.data, ntop=2)           # second top never named
    x = L.InnerProduct(n.a, num_output=2)     # intermediate layers never named
    y = L.InnerProduct(x, num_output=2)
    n.out = L.ReLU(y)
    layers = n.to_proto().layer
    assert [l.name for l in layers] == ["data", "a", "InnerProduct1", "InnerProduct2", "out"]
    assert list(layers[1].top) == ["a", "Slice1"]
    assert list(layers[3].bottom) == ["InnerProduct1"]


def test_module_to_proto_auto_names_everything():
    top = L.ReLU(L.Convolution(L.Input(shape=dict(dim=[1, 1, 4, 4])), num_output=1,
                               kernel_size=1), in_place=True)
    net = to_proto(top)
    assert net == top.to_proto()
    assert [(l.name, list(l.top)) for l in net.layer] == [
        ("Input1", ["Input1"]), ("Convolution1", ["Convolution1"]),
        ("ReLU1", ["Convolution1"])]


def test_ntop_zero_returns_the_layer():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1]))
    n.silence = L.Silence(n.data, ntop=0)
    layer = n.to_proto().layer[1]
    assert (layer.name, layer.type, list(layer.bottom), list(layer.top)) == \
        ("silence", "Silence", ["data"], [])


def test_item_assignment_for_names_with_slashes_and_explicit_name():
    n = NetSpec()
    n["in/data"] = L.Input(name="input", shape=dict(dim=[1, 3]))
    n["fc/1x1"] = L.InnerProduct(n["in/data"], num_output=2)
    assert "fc/1x1" in n and n["fc/1x1"] is n.tops["fc/1x1"]
    layers = n.to_proto().layer
    assert (layers[0].name, list(layers[0].top)) == ("input", ["in/data"])
    assert (layers[1].name, list(layers[1].bottom)) == ("fc/1x1", ["in/data"])


def test_layers_follow_dependencies_then_assignment_order():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3]))
    a = L.InnerProduct(n.data, num_output=2)
    n.c = L.Concat(L.ReLU(a), a)              # its inputs come out first
    n.b = L.Sigmoid(n.data)
    assert [l.type for l in n.to_proto().layer] == \
        ["Input", "InnerProduct", "ReLU", "Concat", "Sigmoid"]


def test_long_chain_needs_no_recursion():
    n = NetSpec()
    x = n.data = L.Input(shape=dict(dim=[1, 1]))
    for _ in range(3000):
        x = L.TanH(x)
    n.out = x
    assert len(n.to_proto().layer) == 3001


# ---------------------------------------------------------------- parameters

@pytest.mark.parametrize("layer_type, field", [
    ("Convolution", "convolution_param"), ("Deconvolution", "convolution_param"),
    ("InnerProduct", "inner_product_param"), ("SoftmaxWithLoss", "softmax_param"),
    ("ReLU", "relu_param"), ("PReLU", "prelu_param"), ("BatchNorm", "batch_norm_param"),
    ("LRN", "lrn_param"), ("HDF5Data", "hdf5_data_param"), ("ArgMax", "argmax_param"),
    ("TanH", "tanh_param"), ("Input", "input_param"), ("LSTM", "recurrent_param"),
    ("Split", None), ("AbsVal", None),
])
def test_param_field_table(layer_type, field):
    assert param_field_for(layer_type) == field


def test_deconvolution_uses_convolution_param():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 3, 3]))
    n.up = L.Deconvolution(n.data, num_output=4, kernel_size=2, stride=2, group=2)
    assert n.to_proto().layer[1] == parse_layer(
        'name: "up" type: "Deconvolution" bottom: "data" top: "up" '
        'convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 }')


def test_param_specs_and_layer_fields():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3]))
    n.fc = L.InnerProduct(n.data, num_output=2,
                          param=[dict(name="w", lr_mult=1, share_mode="PERMISSIVE"),
                                 dict(lr_mult=2, decay_mult=0)])
    n.bn = L.BatchNorm(n.fc, param=dict(lr_mult=0))          # one dict: a list of one
    n.loss = L.EuclideanLoss(n.fc, n.bn, loss_weight=[0.5], propagate_down=[True, False],
                             exclude=[dict(stage="deploy"), dict(min_level=2)])
    fc, bn, loss = n.to_proto().layer[1:]
    assert [(p.name, p.lr_mult, p.decay_mult, p.share_mode) for p in fc.param] == \
        [("w", 1, 1, caffe_pb2.ParamSpec.PERMISSIVE), ("", 2, 0, caffe_pb2.ParamSpec.STRICT)]
    assert not fc.param[1].HasField("name") and not fc.param[0].HasField("decay_mult")
    assert [p.lr_mult for p in bn.param] == [0]
    assert list(loss.loss_weight) == [0.5] and list(loss.propagate_down) == [True, False]
    assert [list(r.stage) for r in loss.exclude] == [["deploy"], []]
    assert loss.exclude[1].min_level == 2


def test_enum_by_name_by_constant_and_by_number_agree():
    def pool(v):
        return L.Pooling(L.Input(shape=dict(dim=[1, 1, 4, 4])), pool=v,
                         kernel_size=2).to_proto().layer[1]
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
    assert pool("AVE") == pool(P.Pooling.AVE) == pool(1) == pool(np.int32(1))
    assert pool("AVE").pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert pool("STOCHASTIC") != pool("MAX")


def test_phase_rules():
    x = L.Input(shape=dict(dim=[1]))
    a = L.Dropout(x, include=dict(phase=TRAIN)).to_proto().layer[1]
    b = L.Dropout(x, include=[dict(phase="TEST", stage=["s1", "s2"])],
                  phase=TEST).to_proto().layer[1]
    assert [r.phase for r in a.include] == [caffe_pb2.TRAIN]
    assert b.include[0].phase == caffe_pb2.TEST and list(b.include[0].stage) == ["s1", "s2"]
    assert b.phase == caffe_pb2.TEST


def test_values_message_instances_empty_dicts_and_numpy():
    shape = caffe_pb2.BlobShape(dim=[2, 5])
    x = L.Input(shape=shape)
    y = L.InnerProduct(x, num_output=np.int64(7), weight_filler=dict(),
                       bias_filler=dict(type="constant", value=np.float32(0.5)),
                       transform_param=dict(mean_value=[1, 2.5], mirror=True))
    layer = y.to_proto().layer[1]
    assert list(y.to_proto().layer[0].input_param.shape[0].dim) == [2, 5]
    p = layer.inner_product_param
    assert p.num_output == 7 and p.HasField("weight_filler")     # an empty dict counts
    assert p.bias_filler.value == 0.5
    assert list(layer.transform_param.mean_value) == [1.0, 2.5]


def test_repeated_fields_take_a_single_value():
    x = L.Input(shape=dict(dim=[1, 1, 5, 5]))
    layer = L.Convolution(x, num_output=1, kernel_size=3, pad=1).to_proto().layer[1]
    assert list(layer.convolution_param.kernel_size) == [3]
    assert list(layer.convolution_param.pad) == [1]


# ---------------------------------------------------------------- errors

def test_unknown_keyword_names_layer_field_and_message():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3]))
    with pytest.raises(GraphcError) as ei:
        n.conv1 = L.Convolution(n.data, num_outputs=3, kernel_size=1)
    e = ei.value
    assert (e.layer, e.layer_type) == ("conv1", "Convolution")
    assert "num_outputs" in e.message and "ConvolutionParameter" in e.message
    assert "num_output" in e.hint
    assert "conv1" in str(e)
    assert "conv1" not in n


def test_unknown_nested_field_and_loss_param_hint():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3]))
    with pytest.raises(GraphcError, match="sdt.*FillerParameter"):
        n.fc = L.InnerProduct(n.data, num_output=1, weight_filler=dict(sdt=1))
    with pytest.raises(GraphcError) as ei:
        n.loss = L.SoftmaxWithLoss(n.data, n.data, ignore_label=0)
    assert "SoftmaxParameter" in ei.value.message and "loss_param" in ei.value.hint
    with pytest.raises(GraphcError, match="unknown field 'lr_mul' in ParamSpec"):
        n.fc = L.InnerProduct(n.data, num_output=1, param=[dict(lr_mul=1)])


def test_unnamed_layer_errors_at_to_proto_with_its_auto_name():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3]))
    hidden = L.InnerProduct(n.data, num_outptu=1)
    n.out = L.ReLU(n.data)
    n["x"] = L.Concat(hidden, n.out)
    with pytest.raises(GraphcError) as ei:
        n.to_proto()
    assert ei.value.layer == "InnerProduct1" and "num_outptu" in ei.value.message


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(pool="MAXIMUM"), "'MAXIMUM' is not a value of enum PoolMethod"),
    (dict(pool=7), "7 is not a value of enum"),
    (dict(kernel_size=2.5), "expects an integer"),
    (dict(kernel_size=-1), "out of range"),
    (dict(global_pooling=1), "expects true or false"),
    (dict(pool=True), "True is not a value of enum"),
    (dict(stride=[1, 2]), "takes one value"),
    (dict(top=["x"]), "'top' cannot be given"),
    (dict(type="Convolution"), "'type' cannot be given"),
    (dict(include=5), "NetStateRule expects a dict"),
])
def test_bad_values(kwargs, pattern):
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    with pytest.raises(GraphcError, match=pattern) as ei:
        n.pool = L.Pooling(n.data, **kwargs)
    assert ei.value.layer == "pool"


def test_keyword_for_type_without_param_message():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1]))
    with pytest.raises(GraphcError, match="'AbsVal' has no parameter message"):
        n.a = L.AbsVal(n.data, axis=1)


def test_bad_bottoms_and_assignments():
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4]))
    with pytest.raises(GraphcError, match="tuple of 2 tops"):
        L.ReLU(L.Slice(n.data, ntop=2))
    with pytest.raises(GraphcError, match="not a top"):
        L.ReLU("data")
    with pytest.raises(GraphcError, match="tuple of 2 tops"):
        n.s = L.Slice(n.data, ntop=2)
    with pytest.raises(GraphcError, match="in_place needs as many tops"):
        L.Eltwise(n.data, n.data, in_place=True)
    with pytest.raises(GraphcError, match="NetSpec method"):
        n.to_proto = L.ReLU(n.data)
    with pytest.raises(GraphcError, match="must be assigned a top"):
        n.x = 3
    n.alias = n.data
    with pytest.raises(GraphcError, match="two names, 'data' and 'alias'"):
        n.to_proto()
    with pytest.raises(AttributeError, match="no top named 'nothing'"):
        n.nothing


@pytest.mark.parametrize("value, pattern", [
    (True, "expects a number"), ("0.5", "expects a number"), (None, "expects a number")])
def test_bad_float_values(value, pattern):
    with pytest.raises(GraphcError, match=pattern):
        L.Dropout(L.Input(shape=dict(dim=[1])), dropout_ratio=value).to_proto()
