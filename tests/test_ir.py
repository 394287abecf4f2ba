"""The IR: text form round-trips, the parser reports positions, the verifier catches
broken graphs."""
import math

import pytest

from graphc.errors import GraphcError
from graphc.ir import Graph, Node, Param, f32, parse_graph, print_graph, verify
from graphc.ir.text import format_value

SMALL = '''graph "small" {
  input %data: f32[2,3,8,8]
  param $conv.0: f32[4,3,3,3] {lr_mult=1.0, decay_mult=1.0}
  param $conv.1: f32[4] {lr_mult=2.0, decay_mult=0.0}
  %conv: f32[2,4,6,6] = Convolution(%data, $conv.0, $conv.1) {num_output=4, kernel=[3, 3], stride=[1, 1], pad=[0, 0], dilation=[1, 1], group=1, bias_term=true, axis=1} name="conv" loc="n.prototxt:7"
  %conv~relu: f32[2,4,6,6] = ReLU(%conv) {negative_slope=0.0} name="relu" loc="n.prototxt:20" blobs=["conv"]
  output %conv~relu
}
'''


def test_round_trip_exact():
    g = parse_graph(SMALL)
    assert print_graph(g) == SMALL
    assert g.blob_of["conv~relu"] == "conv"
    assert g.params["conv.1"].lr_mult == 2.0
    assert g.nodes[0].params == ["conv.0", "conv.1"]
    assert g.nodes[0].inputs == ["data"]


@pytest.mark.parametrize("value", [0, -3, 1.5, -2.5e-7, 1e300, True, False, None, "a \"q\" \n",
                                   [], [1, 2.0, "x"], {"a": {"b": [1, {"c": None}]}},
                                   math.inf, -math.inf])
def test_attribute_values_round_trip(value):
    g = Graph("v")
    g.add_input("x", f32(2))
    g.add_node(Node("ReLU", "n", ["x"], ["y"], [], {"v": value}), [f32(2)])
    back = parse_graph(print_graph(g)).nodes[0].attrs["v"]
    assert back == value and type(back) is type(value)


def test_nan_and_odd_names_round_trip():
    g = Graph("odd names")
    g.add_input("in put:1", f32(1, 2))
    g.add_param(Param("w/0 x", f32(2)))
    g.add_node(Node("Scale", "inception_3a/1x1", ["in put:1"], ["out\"q"], ["w/0 x"],
                    {"nan": math.nan}), [f32(1, 2)])
    g.add_node(Node("Silence", "sink", ["out\"q"], [], [], {}), [])
    text = print_graph(g)
    g2 = parse_graph(text)
    assert print_graph(g2) == text
    assert math.isnan(g2.nodes[0].attrs["nan"])
    assert g2.nodes[1].outputs == []


@pytest.mark.parametrize("text,where", [
    ('graph "g" {\n  input %x: f32[2\n}', ":3:1"),
    ('graph "g" {\n  input %x: q7[2]\n}', ":2:"),
    ('graph "g" {\n  %y: f32[2] = ReLU(%x) {a=}\n}', ":2:"),
    ('graph "g" {\n  %y: f32[2] = ReLU(%x)\n}', ":2:3"),   # no name=
    ('graph "g" {\n  input %x: f32[2] ?\n}', ":2:"),
])
def test_parse_errors_have_positions(text, where):
    with pytest.raises(GraphcError) as e:
        parse_graph(text, "bad.ir")
    assert f"bad.ir{where}" in str(e.value)


def _two_relus():
    g = Graph("g")
    g.add_input("x", f32(2, 3))
    g.add_node(Node("ReLU", "r1", ["x"], ["y"], [], {"negative_slope": 0.0}), [f32(2, 3)])
    g.add_node(Node("ReLU", "r2", ["y"], ["z"], [], {"negative_slope": 0.0}), [f32(2, 3)])
    g.outputs = ["z"]
    return g


def test_verifier_accepts_valid_graph():
    verify(_two_relus())


@pytest.mark.parametrize("breakage,msg", [
    (lambda g: g.nodes.reverse(), "used before it is defined"),
    (lambda g: setattr(g.nodes[1], "outputs", ["y"]), "defined twice"),
    (lambda g: setattr(g.nodes[1], "name", "r1"), "two nodes are named"),
    (lambda g: g.nodes[0].params.append("nope"), "param $nope does not exist"),
    (lambda g: setattr(g, "outputs", ["w"]), "never defined"),
    (lambda g: g.types.__setitem__("z", f32(3, 2)), "differ from the inferred"),
    (lambda g: setattr(g.nodes[0], "op", "NoSuchOp"), "unknown op"),
])
def test_verifier_rejects(breakage, msg):
    g = _two_relus()
    breakage(g)
    with pytest.raises(GraphcError) as e:
        verify(g)
    assert msg in str(e.value)
