"""dead-code: Silence, Split, inference Dropout and unread nodes go; losses, graph outputs
and training Dropout stay."""
from graphc.ir import parse_graph, verify
from graphc.passes import PASSES

from test_passes_common import check_text

IN = '''graph "dc" {
  input %data: f32[2,4]
  input %label: f32[2]
  param $ip.0: f32[3,4] {lr_mult=1.0, decay_mult=1.0}
  param $dead.0: f32[5,4] {lr_mult=1.0, decay_mult=1.0}
  %data_0: f32[2,4], %data_1: f32[2,4] = Split(%data) {num_top=2} name="split"
  %ip: f32[2,3] = InnerProduct(%data_0, $ip.0) {num_output=3, bias_term=false, axis=1, transpose=false} name="ip"
  %ip~drop: f32[2,3] = Dropout(%ip) {dropout_ratio=0.5, train=false} name="drop" blobs=["ip"]
  %dead: f32[2,5] = InnerProduct(%data_1, $dead.0) {num_output=5, bias_term=false, axis=1, transpose=false} name="dead"
  %dead2: f32[2,5] = ReLU(%dead) {negative_slope=0.0} name="dead2"
  () = Silence(%dead2, %label) name="silence"
  %ip~relu: f32[2,3] = ReLU(%ip~drop) {negative_slope=0.0} name="relu" blobs=["ip"]
  %loss: f32[] = EuclideanLoss(%ip~drop, %ip~relu) {loss_weight=[1.0]} name="loss"
  %prob: f32[2,3] = Softmax(%ip~relu) {axis=1} name="prob"
  %side: f32[2,3] = TanH(%ip~relu) name="side"
  output %loss, %prob, %side
}
'''

OUT = '''graph "dc" {
  input %data: f32[2,4]
  input %label: f32[2]
  param $ip.0: f32[3,4] {lr_mult=1.0, decay_mult=1.0}
  %ip: f32[2,3] = InnerProduct(%data, $ip.0) {num_output=3, bias_term=false, axis=1, transpose=false} name="ip"
  %ip~relu: f32[2,3] = ReLU(%ip) {negative_slope=0.0} name="relu" blobs=["ip"]
  %loss: f32[] = EuclideanLoss(%ip, %ip~relu) {loss_weight=[1.0]} name="loss"
  %prob: f32[2,3] = Softmax(%ip~relu) {axis=1} name="prob"
  %side: f32[2,3] = TanH(%ip~relu) name="side"
  output %loss, %prob, %side
}
'''


def test_dead_code_text_and_numbers(rng):
    check_text("dead-code", IN, OUT, rng)


def test_unread_node_goes_but_a_loss_stays_when_not_an_output():
    text = IN.replace("  output %loss, %prob, %side", "  output %prob")
    out = PASSES["dead-code"](verify(parse_graph(text)))
    assert [n.name for n in out.nodes] == ["ip", "relu", "loss", "prob"]
    assert list(out.params) == ["ip.0"]


def test_loss_without_readers_stays_even_if_not_an_output():
    text = IN.replace("  output %loss, %prob, %side", "  output %prob")
    text = text.replace('{loss_weight=[1.0]} name="loss"', 'name="loss"')
    out = PASSES["dead-code"](verify(parse_graph(text)))
    assert "loss" in [n.name for n in out.nodes]   # a loss op keeps its weight 1


TRAIN = '''graph "t" {
  input %x: f32[2,3]
  %x~drop: f32[2,3] = Dropout(%x) {dropout_ratio=0.5, train=true} name="drop" blobs=["x"]
  %y: f32[2,3] = ReLU(%x~drop) {negative_slope=0.0} name="relu"
  output %y
}
'''


def test_training_dropout_is_kept():
    check_text("dead-code", TRAIN, TRAIN)


KEEP = '''graph "k" {
  input %x: f32[2,3]
  %y: f32[2,3] = TanH(%x) name="tanh"
  %out: f32[2,3] = Dropout(%y) {dropout_ratio=0.5, train=false} name="drop"
  output %out
}
'''


def test_identity_writing_a_differently_named_output_blob_stays():
    # removing it would rename the net's output blob from "out" to "y"
    check_text("dead-code", KEEP, KEEP)


def test_in_place_dropout_at_the_output_goes(rng):
    text = KEEP.replace('%out: f32[2,3] = Dropout(%y) {dropout_ratio=0.5, train=false} '
                        'name="drop"',
                        '%y~drop: f32[2,3] = Dropout(%y) {dropout_ratio=0.5, train=false} '
                        'name="drop" blobs=["y"]').replace("output %out", "output %y~drop")
    check_text("dead-code", text, '''graph "k" {
  input %x: f32[2,3]
  %y: f32[2,3] = TanH(%x) name="tanh"
  output %y
}
''', rng)
