"""Reading net and solver prototxt: layer lines, Caffe's upgrades, FilterNet, errors."""
import pytest
from google.protobuf import text_format

from graphc.errors import GraphcError
from graphc.frontend import caffe_pb2 as pb
from graphc.frontend.prototxt import (NetSource, filter_net, parse_net_text,
                                      parse_solver_text, read_net, read_solver, to_text)
from graphc.frontend.upgrade import V1_TYPE_NAMES


# ---------------------------------------------------------------- layer lines

TRICKY = '''# layer { in a comment }
name: "t"   # layers { also a comment
layer {
  name: "a{"  type: "Python"
  python_param { layer: "MyLayer" module: "m" }   # nested field named layer
  top: "x"
}

layer { name: 'b}' type: "ReLU" bottom: "x" top: "x" }
layer
{
  name: "c" type: "ReLU" bottom: "x" top: "x"
}
layer [ { name: "d" }, {
  name: "e" } ]
'''


def test_layer_lines_skip_comments_strings_and_nesting():
    src = parse_net_text(TRICKY, "t.prototxt")
    assert [l.name for l in src.net.layer] == ["a{", "b}", "c", "d", "e"]
    assert src.layer_lines == [3, 9, 10, 14, 14]
    assert src.where(2) == "t.prototxt:10"


def test_layer_lines_match_zoo_files(shared_dir):
    for f in sorted((shared_dir / "zoo").glob("*.prototxt")):
        if "solver" in f.name:
            continue
        src = read_net(f)
        lines = f.read_text().splitlines()
        assert len(src.layer_lines) == len(src.net.layer)
        for layer, line in zip(src.net.layer, src.layer_lines):
            text = lines[line - 1]
            if layer.type == "Input" and layer.name == "input":  # from legacy input fields
                assert text.startswith("input"), (f, line)
            else:
                assert text.lstrip().startswith("layer"), (f, line)
                # the layer's name is written within the next few lines
                assert any(f'"{layer.name}"' in l for l in lines[line - 1:line + 3]), (f, line)


# ---------------------------------------------------------------- upgrades

V1_NET = '''name: "old"
input: "data"
input_dim: 10
input_dim: 3
input_dim: 32
input_dim: 32
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  param: "w_shared"
  convolution_param { num_output: 8 kernel_size: 3 }
  include { phase: TRAIN }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv1" bottom: "label" top: "loss"
  loss_weight: 2 loss_param { ignore_label: 3 } }
'''


def test_v1_upgrade():
    src = parse_net_text(V1_NET, "v1.prototxt")
    net = src.net
    assert not net.layers and not net.input and not net.input_dim
    assert [(l.name, l.type) for l in net.layer] == \
        [("input", "Input"), ("conv1", "Convolution"), ("loss", "SoftmaxWithLoss")]
    assert src.layer_lines == [2, 7, 14]
    assert list(net.layer[0].top) == ["data"]
    assert list(net.layer[0].input_param.shape[0].dim) == [10, 3, 32, 32]
    conv = net.layer[1]
    assert [(p.name, p.lr_mult, p.decay_mult) for p in conv.param] == \
        [("w_shared", 1.0, 1.0), ("", 2.0, 0.0)]
    assert conv.convolution_param.num_output == 8
    assert list(conv.convolution_param.kernel_size) == [3]
    assert conv.include[0].phase == pb.TRAIN
    loss = net.layer[2]
    assert list(loss.loss_weight) == [2.0] and loss.loss_param.ignore_label == 3


def test_every_v1_type_has_a_name():
    values = pb.V1LayerParameter.LayerType.values()
    assert sorted(V1_TYPE_NAMES) == sorted(values)
    for v in values:
        text = f'layers {{ name: "l" type: {pb.V1LayerParameter.LayerType.Name(v)} }}'
        layer = parse_net_text(text).net.layer[0]
        assert layer.type == V1_TYPE_NAMES[v]
        assert (layer.type == "") == (v == pb.V1LayerParameter.NONE)


def test_v1_data_transform_upgrade():
    text = '''layers { name: "d" type: DATA top: "data"
      data_param { source: "db" batch_size: 4 scale: 0.00390625 mirror: true crop_size: 5
                   mean_file: "m.binaryproto" } }
    layers { name: "i" type: IMAGE_DATA top: "x" image_data_param { source: "l" scale: 2 } }'''
    net = parse_net_text(text).net
    d = net.layer[0]
    assert d.transform_param.scale == pytest.approx(0.00390625)
    assert d.transform_param.mirror and d.transform_param.crop_size == 5
    assert d.transform_param.mean_file == "m.binaryproto"
    for f in ("scale", "mirror", "crop_size", "mean_file"):
        assert not d.data_param.HasField(f)
    assert d.data_param.source == "db" and d.data_param.batch_size == 4
    assert net.layer[1].transform_param.scale == 2
    assert not net.layer[1].image_data_param.HasField("scale")


V0_NET = '''name: "v0"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers {
  layer { name: "pad1" type: "padding" pad: 2 }
  bottom: "data" top: "pad1"
}
layers {
  layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 5 stride: 1 group: 1
          biasterm: false blobs_lr: 1 weight_decay: 1
          weight_filler { type: "gaussian" std: 0.01 } }
  bottom: "pad1" top: "conv1"
}
layers {
  layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 }
  bottom: "conv1" top: "pool1"
}
layers {
  layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.5 beta: 0.7 }
  bottom: "pool1" top: "norm1"
}
'''


def test_v0_upgrade_folds_padding():
    src = parse_net_text(V0_NET, "v0.prototxt")
    net = src.net
    assert [(l.name, l.type) for l in net.layer] == [
        ("input", "Input"), ("conv1", "Convolution"), ("pool1", "Pooling"), ("norm1", "LRN")]
    assert src.layer_lines == [2, 8, 14, 18]
    conv = net.layer[1]
    assert list(conv.bottom) == ["data"]  # the padding layer is gone
    cp = conv.convolution_param
    assert (cp.num_output, list(cp.kernel_size), list(cp.stride), list(cp.pad), cp.bias_term) \
        == (4, [5], [1], [2], False)
    assert cp.weight_filler.type == "gaussian"
    assert conv.param[0].lr_mult == 1 and conv.param[0].decay_mult == 1
    pp = net.layer[2].pooling_param
    assert (pp.pool, pp.kernel_size, pp.stride) == (pb.PoolingParameter.AVE, 3, 2)
    lp = net.layer[3].lrn_param
    assert (lp.local_size, lp.alpha, lp.beta) == (3, 0.5, pytest.approx(0.7))


def test_input_shape_and_several_inputs():
    text = '''input: "a" input_shape { dim: 2 dim: 5 }
    input: "b" input_shape { dim: 2 }
    layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" }'''
    net = parse_net_text(text).net
    inp = net.layer[0]
    assert inp.type == "Input" and list(inp.top) == ["a", "b"]
    assert [list(s.dim) for s in inp.input_param.shape] == [[2, 5], [2]]
    assert net.layer[1].name == "c"


def test_input_dim_count_mismatch_is_an_error():
    with pytest.raises(GraphcError) as e:
        parse_net_text('name: "x"\ninput: "a"\ninput_dim: 1\ninput_dim: 2\n', "n.prototxt")
    assert e.value.where == "n.prototxt:2" and "input_dim" in str(e.value) and e.value.hint


def test_batch_norm_three_params_get_zero_lr():
    text = '''layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 }
                      param { lr_mult: 1 decay_mult: 3 } }
              layer { name: "bn2" type: "BatchNorm" param { lr_mult: 1 } }'''
    net = parse_net_text(text).net
    assert [(p.lr_mult, p.decay_mult) for p in net.layer[0].param] == [(0, 0)] * 3
    assert net.layer[1].param[0].lr_mult == 1


def test_layer_and_layers_together_is_an_error():
    with pytest.raises(GraphcError) as e:
        parse_net_text('layer { name: "a" }\nlayers { name: "b" }', "m.prototxt")
    assert e.value.where == "m.prototxt:2"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("text,line,words", [
    ('name: "x"\nlayer {\n  nme: "a"\n}\n', 3, ["nme", "'name'"]),
    ('layer {\n  pooling_param { pool: AVG }\n}', 2, ["pool", "AVG", "AVE"]),
    ('layer {\n convolution_param {\n   num_output: 2.5 } }', 3, ["num_output", "whole number"]),
    ('layer { name: "a"\n name: "b" }', 2, ["name", "more than once"]),
    ('name: "n"\nlayer { name: "a"\n', 2, ["opened on line 2"]),
    ('base_lr: 0.1\n', 1, ["base_lr", "solver"]),
])
def test_parse_errors_name_file_line_and_fix(text, line, words):
    with pytest.raises(GraphcError) as e:
        parse_net_text(text, "bad.prototxt")
    assert e.value.where == f"bad.prototxt:{line}"
    full = str(e.value)
    for w in words:
        assert w in full, full
    assert e.value.hint


def test_binary_file_given_as_prototxt(tmp_path):
    f = tmp_path / "net.caffemodel"
    f.write_bytes(pb.NetParameter(layer=[pb.LayerParameter(name="a")]).SerializeToString()
                  + b"\x00\x01\xff")
    with pytest.raises(GraphcError) as e:
        read_net(f)
    assert "binary" in str(e.value) and ".prototxt" in e.value.hint
    with pytest.raises(GraphcError):
        read_net(tmp_path / "missing.prototxt")


# ---------------------------------------------------------------- FilterNet

def _naive_keep(state_phase, level, stages, include, exclude):
    """Caffe's rules restated: a rule is met when every condition it sets holds."""
    def met(rule):
        ok = True
        if rule.HasField("phase"):
            ok = ok and rule.phase == state_phase
        if rule.HasField("min_level"):
            ok = ok and level >= rule.min_level
        if rule.HasField("max_level"):
            ok = ok and level <= rule.max_level
        for s in rule.stage:
            ok = ok and s in stages
        for s in rule.not_stage:
            ok = ok and s not in stages
        return ok
    if include:
        return sum(met(r) for r in include) > 0
    return sum(met(r) for r in exclude) == 0


def _random_rule(rng):
    r = pb.NetStateRule()
    if rng.random() < 0.5:
        r.phase = int(rng.integers(2))
    if rng.random() < 0.3:
        r.min_level = int(rng.integers(-1, 3))
    if rng.random() < 0.3:
        r.max_level = int(rng.integers(-1, 3))
    r.stage.extend(rng.choice(["a", "b", "c"], size=rng.integers(0, 3), replace=False))
    r.not_stage.extend(rng.choice(["a", "b", "c"], size=rng.integers(0, 2), replace=False))
    return r


def test_filter_net_matches_naive_rules(rng):
    for _ in range(30):
        net = pb.NetParameter()
        net.state.stage.extend(rng.choice(["a", "b"], size=rng.integers(0, 2), replace=False))
        for i in range(12):
            layer = net.layer.add(name=f"l{i}")
            target = layer.include if rng.random() < 0.5 else layer.exclude
            for _ in range(rng.integers(0, 3)):
                target.add().CopyFrom(_random_rule(rng))
        phase = ["train", "test"][rng.integers(2)]
        level = int(rng.integers(-1, 3))
        extra = list(rng.choice(["b", "c"], size=rng.integers(0, 2), replace=False))
        out, kept = filter_net(net, phase, level=level, stages=extra)
        stages = set(net.state.stage) | set(extra)
        ph = pb.TRAIN if phase == "train" else pb.TEST
        expect = [i for i, l in enumerate(net.layer)
                  if _naive_keep(ph, level, stages, l.include, l.exclude)]
        assert kept == expect
        assert [l.name for l in out.layer] == [f"l{i}" for i in expect]
        assert out.state.phase == ph and out.state.level == level
        assert set(out.state.stage) == stages


def test_filter_net_defaults_from_net_state():
    net = text_format.Parse('''state { phase: TRAIN level: 2 stage: "deploy" }
      layer { name: "a" include { phase: TRAIN min_level: 2 stage: "deploy" } }
      layer { name: "b" include { phase: TEST } }
      layer { name: "c" exclude { not_stage: "deploy" } }''', pb.NetParameter())
    assert filter_net(net)[1] == [0, 2]
    assert filter_net(net, "test", level=0)[1] == [1, 2]


def test_filter_net_lenet_train_test(shared_dir):
    src = read_net(shared_dir / "zoo" / "lenet_train_test.prototxt")
    train, _ = filter_net(src, "train")
    test, _ = filter_net(src, "test")
    names_train = [l.name for l in train.layer]
    names_test = [l.name for l in test.layer]
    assert names_train.count("mnist") == 1 and names_test.count("mnist") == 1
    assert "accuracy" in names_test and "accuracy" not in names_train
    assert train.layer[0].data_param.source != test.layer[0].data_param.source


def test_filter_net_include_and_exclude_is_an_error():
    src = parse_net_text('layer { name: "a" }\nlayer { name: "b" include { phase: TRAIN }\n'
                         '  exclude { phase: TEST } }', "f.prototxt")
    with pytest.raises(GraphcError) as e:
        filter_net(src, "train")
    assert e.value.where == "f.prototxt:2" and e.value.layer == "b"


# ---------------------------------------------------------------- solvers, text

def test_read_solver_upgrades_solver_type():
    s = parse_solver_text('net: "n.prototxt"\nbase_lr: 0.01\nsolver_type: ADAM\n')
    assert s.type == "Adam" and not s.HasField("solver_type")
    assert parse_solver_text('solver_type: NESTEROV').type == "Nesterov"
    assert parse_solver_text('base_lr: 1').type == "SGD"
    with pytest.raises(GraphcError) as e:
        parse_solver_text('type: "SGD"\nsolver_type: ADAM\n', "s.prototxt")
    assert e.value.where == "s.prototxt:2"
    with pytest.raises(GraphcError) as e:
        parse_solver_text('base_lr: 0.1\nlayer { name: "x" }', "s.prototxt")
    assert e.value.where == "s.prototxt:2" and "net definition" in e.value.hint


def test_read_solver_zoo(shared_dir):
    s = read_solver(shared_dir / "zoo" / "lenet_solver.prototxt")
    assert s.net.endswith("lenet_train_test.prototxt") and s.base_lr > 0
    for f in sorted((shared_dir / "golden" / "train_digits").glob("solver_*.prototxt")):
        s = read_solver(f)
        assert s.type.lower() == f.stem.split("_")[1]


def test_to_text_round_trip(shared_dir):
    for name in ("googlenet_deploy", "lenet_train_test"):
        src = read_net(shared_dir / "zoo" / f"{name}.prototxt")
        again = parse_net_text(to_text(src.net)).net
        assert again == src.net
    assert isinstance(src, NetSource)
