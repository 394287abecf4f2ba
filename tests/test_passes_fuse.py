"""fuse: conv/IP + activations, conv + Eltwise SUM (+ ReLU) with the shortcut as an extra
input, LRN + Pooling, and chains of elementwise ops, as Fused nodes."""
from graphc.ir import parse_graph, verify
from graphc.passes import PASSES

from test_passes_common import assert_equivalent, check_text, fill_params

P = "{lr_mult=1.0, decay_mult=1.0}"
C = ("{num_output=4, kernel=[1, 1], stride=[1, 1], pad=[0, 0], dilation=[1, 1], group=1, "
     "bias_term=true, axis=1}")
R = "{negative_slope=0.0}"
SUM = '{operation="SUM", coeff=[1.0, 1.0], stable_prod_grad=true}'

RES_IN = f'''graph "res" {{
  input %x: f32[1,4,3,3]
  param $a.0: f32[4,4,1,1] {P}
  param $a.1: f32[4] {P}
  param $b.0: f32[4,4,1,1] {P}
  param $b.1: f32[4] {P}
  param $c.0: f32[4,4,1,1] {P}
  param $c.1: f32[4] {P}
  %a: f32[1,4,3,3] = Convolution(%x, $a.0, $a.1) {C} name="a"
  %b: f32[1,4,3,3] = Convolution(%x, $b.0, $b.1) {C} name="b"
  %b~b_relu: f32[1,4,3,3] = ReLU(%b) {R} name="b_relu" blobs=["b"]
  %c: f32[1,4,3,3] = Convolution(%b~b_relu, $c.0, $c.1) {C} name="c"
  %sum: f32[1,4,3,3] = Eltwise(%a, %c) {SUM} name="sum"
  %sum~relu: f32[1,4,3,3] = ReLU(%sum) {R} name="relu" blobs=["sum"]
  output %sum~relu
}}
'''

CS = C.replace("{", "").replace("}", "")
RES_OUT = f'''graph "res" {{
  input %x: f32[1,4,3,3]
  param $a.0: f32[4,4,1,1] {P}
  param $a.1: f32[4] {P}
  param $b.0: f32[4,4,1,1] {P}
  param $b.1: f32[4] {P}
  param $c.0: f32[4,4,1,1] {P}
  param $c.1: f32[4] {P}
  %a: f32[1,4,3,3] = Convolution(%x, $a.0, $a.1) {C} name="a"
  %b~b_relu: f32[1,4,3,3] = Fused(%x, $b.0, $b.1) {{body=[{{op="Convolution", name="b", attrs={{{CS}}}, inputs=[0], params=[0, 1]}}, {{op="ReLU", name="b_relu", attrs={R}, inputs=["prev"], params=[]}}]}} name="b+b_relu" blobs=["b"]
  %sum~relu: f32[1,4,3,3] = Fused(%b~b_relu, %a, $c.0, $c.1) {{body=[{{op="Convolution", name="c", attrs={{{CS}}}, inputs=[0], params=[0, 1]}}, {{op="Eltwise", name="sum", attrs={SUM}, inputs=[1, "prev"], params=[]}}, {{op="ReLU", name="relu", attrs={R}, inputs=["prev"], params=[]}}]}} name="c+sum+relu" blobs=["sum"]
  output %sum~relu
}}
'''


def test_residual_block(rng):
    check_text("fuse", RES_IN, RES_OUT, rng)


def test_residual_then_inplace_overwrites_the_shortcut(rng):
    g = fill_params(verify(parse_graph(RES_IN)), rng)
    out = PASSES["inplace"](PASSES["fuse"](g))
    assert out.node("c+sum+relu").attrs["inplace"] == 1     # the shortcut %a
    assert "inplace" not in out.node("b+b_relu").attrs       # %x is a graph input
    assert_equivalent(g, out, rng)


def test_no_fusion_into_a_conv_whose_output_is_read_twice(rng):
    text = RES_IN.replace("  output %sum~relu", "  output %sum~relu, %c")
    g = fill_params(verify(parse_graph(text)), rng)
    out = PASSES["fuse"](g)
    assert [n.name for n in out.nodes] == ["a", "b+b_relu", "c", "sum+relu"]
    assert_equivalent(g, out, rng)


def test_eltwise_goes_into_the_conv_computed_last(rng):
    # the sum's bottoms in the other order: still fused into c, with %a as input 1
    text = RES_IN.replace("Eltwise(%a, %c)", "Eltwise(%c, %a)")
    g = fill_params(verify(parse_graph(text)), rng)
    out = PASSES["fuse"](g)
    f = out.node("c+sum+relu")
    assert f.inputs == ["b~b_relu", "a"]
    assert f.attrs["body"][1]["inputs"] == ["prev", 1]
    assert_equivalent(g, out, rng)


CHAIN_IN = '''graph "chain" {
  input %x: f32[2,5]
  %p: f32[2,5] = Power(%x) {power=2.0, scale=0.5, shift=1.0} name="p"
  %t: f32[2,5] = TanH(%p) name="t"
  %s: f32[2,5] = Sigmoid(%t) name="s"
  %m: f32[2,5] = Softmax(%s) {axis=1} name="m"
  %e: f32[2,5] = ELU(%m) {alpha=1.0} name="e"
  output %e
}
'''

CHAIN_OUT = '''graph "chain" {
  input %x: f32[2,5]
  %s: f32[2,5] = Fused(%x) {body=[{op="Power", name="p", attrs={power=2.0, scale=0.5, shift=1.0}, inputs=[0], params=[]}, {op="TanH", name="t", attrs={}, inputs=["prev"], params=[]}, {op="Sigmoid", name="s", attrs={}, inputs=["prev"], params=[]}]} name="p+t+s"
  %m: f32[2,5] = Softmax(%s) {axis=1} name="m"
  %e: f32[2,5] = ELU(%m) {alpha=1.0} name="e"
  output %e
}
'''


def test_elementwise_chain(rng):
    check_text("fuse", CHAIN_IN, CHAIN_OUT, rng)


LRN_IN = '''graph "lrn" {
  input %x: f32[1,6,5,5]
  %n: f32[1,6,5,5] = LRN(%x) {local_size=5, alpha=0.0001, beta=0.75, k=1.0, norm_region="ACROSS_CHANNELS"} name="norm"
  %pool: f32[1,6,2,2] = Pooling(%n) {pool="MAX", kernel=[3, 3], stride=[2, 2], pad=[0, 0], global_pooling=false, round_mode="CEIL", top_mask=false} name="pool"
  output %pool
}
'''


def test_lrn_then_pooling(rng):
    g = fill_params(verify(parse_graph(LRN_IN)), rng)
    out = PASSES["fuse"](g)
    assert [(n.op, n.name, n.outputs) for n in out.nodes] == [("Fused", "norm+pool", ["pool"])]
    assert [s["op"] for s in out.nodes[0].attrs["body"]] == ["LRN", "Pooling"]
    assert_equivalent(g, out, rng)


IP_IN = f'''graph "ip" {{
  input %x: f32[3,4]
  param $ip.0: f32[2,4] {P}
  param $pr.0: f32[2] {P}
  %ip: f32[3,2] = InnerProduct(%x, $ip.0) {{num_output=2, bias_term=false, axis=1, transpose=false}} name="ip"
  %ip~pr: f32[3,2] = PReLU(%ip, $pr.0) {{channel_shared=false, filler={{type="constant", value=0.25}}}} name="pr" blobs=["ip"]
  output %ip~pr
}}
'''


def test_inner_product_prelu(rng):
    g = fill_params(verify(parse_graph(IP_IN)), rng)
    out = PASSES["fuse"](g)
    (f,) = out.nodes
    assert f.op == "Fused" and f.params == ["ip.0", "pr.0"]
    assert [s["params"] for s in f.attrs["body"]] == [[0], [1]]
    assert_equivalent(g, out, rng)


def test_training_dropout_does_not_join_but_nothing_breaks():
    text = '''graph "d" {
  input %x: f32[2,3]
  %t: f32[2,3] = TanH(%x) name="t"
  %d: f32[2,3] = Dropout(%t) {dropout_ratio=0.5, train=true} name="d"
  output %d
}
'''
    check_text("fuse", text, text)
