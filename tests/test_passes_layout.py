"""Physical layouts: TensorType's layout and its text form, the verifier's layout rules,
the Reorder op, and the ``layout`` pass (its decisions on small graphs, optimality of
its cut against brute force, numbers unchanged on random nets and the zoo, the memory
planner on blocked values, ``graphc dump --passes``)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from graphc.errors import GraphcError
from graphc.ir import Graph, Node, Param, TensorType, parse_graph, print_graph, verify
from graphc.ops import Context, get_op
from graphc.ops.layout import blocked_problem
from graphc.passes import DEFAULT_PIPELINE, PASSES, run_pipeline
from graphc.passes import layout as L
from graphc.passes.memory import check_plan, plan_memory

from golden import NETS
from gradcheck import check_op
from test_passes_common import fill_params, feeds_for, rel_l2, run
from test_passes_memory import run_in_arena

B8 = "NCHW8c"


# ---- TensorType and the text form ----------------------------------------------------

def test_type_layout_padding_and_equality():
    plain = TensorType((2, 20, 3, 5))
    t = TensorType((2, 20, 3, 5), "f32", B8)
    assert t != plain and t.plain == plain and plain.with_layout(B8) == t
    assert t.block == 8 and plain.block is None
    assert t.physical_shape == (2, 3, 3, 5, 8)            # 20 channels -> 3 blocks of 8
    assert t.numel == plain.numel == 600
    assert plain.nbytes == 600 * 4 and t.nbytes == 2 * 24 * 15 * 4
    assert TensorType((1, 32, 7, 7), "f32", "NCHW16c").nbytes == 32 * 49 * 4  # no padding
    assert t.with_shape((2, 20)) == TensorType((2, 20))   # a new shape is plain
    assert str(t) == "f32[2,20,3,5]{NCHW8c}" and str(plain) == "f32[2,20,3,5]"
    for bad in ("NHWC", "NCHW0c", "nchw8c", "NCHW8"):
        with pytest.raises(ValueError, match="unknown layout"):
            TensorType((1, 8, 1, 1), "f32", bad)


TEXT = '''graph "t" {
  input %x: f32[1,12,4,4]
  param $s: f32[12] {lr_mult=1.0, decay_mult=1.0}
  %x@NCHW8c: f32[1,12,4,4]{NCHW8c} = Reorder(%x) {to="NCHW8c"} name="x@NCHW8c" blobs=["x"]
  %y: f32[1,12,4,4]{NCHW8c} = Scale(%x@NCHW8c, $s) {axis=1, num_axes=1, bias_term=false} name="y"
  %y@plain: f32[1,12,4,4] = Reorder(%y) {to=null} name="y@plain" blobs=["y"]
  output %y@plain
}
'''


def test_text_round_trip_with_layouts():
    g = verify(parse_graph(TEXT))
    assert g.types["y"] == TensorType((1, 12, 4, 4), "f32", B8)
    assert g.types["x"].layout is None and g.params["s"].type.layout is None
    assert print_graph(g) == TEXT
    with pytest.raises(GraphcError, match=r"<ir>:5:.*unknown layout 'NHWC'"):
        parse_graph(TEXT.replace("12,4,4]{NCHW8c} = Scale", "12,4,4]{NHWC} = Scale"))


# ---- the verifier --------------------------------------------------------------------

@pytest.mark.parametrize("old, new, message", [
    ("  output %y@plain", "  %f: f32[1,192]{NCHW8c} = Flatten(%x) {axis=1, end_axis=-1} "
     "name=\"f\"\n  output %y@plain", "value %f .* needs a 4-D f32 value"),
    ("$s: f32[12]", "$s: f32[12]{NCHW8c}", "param \\$s has layout NCHW8c"),
    ("output %y@plain", "output %y", "graph output %y has layout NCHW8c"),
    ("%y: f32[1,12,4,4]{NCHW8c}", "%y: f32[1,12,4,4]", "different layouts"),
    ('Reorder(%x) {to="NCHW8c"}', 'Reorder(%x) {to="NCHW4c"}', "writes a value in layout"),
    ("$s: f32[12] {", "$s: f32[12,4,4] {", None),    # a per-element Scale cannot be blocked
])
def test_verify_layout_rules(old, new, message):
    verify(parse_graph(TEXT))
    assert old in TEXT
    g = parse_graph(TEXT.replace(old, new))
    if message is None:
        g.node("y").attrs["num_axes"] = 3
        message = "cannot run on NCHW8c values: Scale with axis 1 and num_axes 3"
    with pytest.raises(GraphcError, match=message):
        verify(g)


def test_verify_rejects_blocked_inner_product_and_odd_concat():
    text = '''graph "t" {
  input %x: f32[1,16,2,2]
  param $w: f32[10,64]
  %a: f32[1,16,2,2]{NCHW8c} = Reorder(%x) {to="NCHW8c"} name="a"
  %y: f32[1,10]{NCHW8c} = InnerProduct(%a, $w) {num_output=10, bias_term=false, axis=1, transpose=false} name="y"
  output %y
}'''
    with pytest.raises(GraphcError, match="4-D f32"):
        verify(parse_graph(text))
    assert "plain values only" in blocked_problem(
        "InnerProduct", {}, [TensorType((1, 16, 2, 2))], [], [TensorType((1, 10, 1, 1))], 8)
    t12, t20 = TensorType((1, 12, 2, 2)), TensorType((1, 20, 2, 2))
    assert "not whole blocks" in blocked_problem("Concat", {"axis": 1}, [t12, t20], [],
                                                 [TensorType((1, 32, 2, 2))], 8)
    assert blocked_problem("Concat", {"axis": 1}, [t20, t12], [],
                           [TensorType((1, 32, 2, 2))], 4) is None
    assert "across channels" in blocked_problem("LRN", {"norm_region": "ACROSS_CHANNELS"},
                                                [t12], [], [t12], 8)


# ---- the Reorder op ------------------------------------------------------------------

def test_reorder_op_is_the_identity(rng):
    op = get_op("Reorder")
    x = TensorType((2, 20, 3, 3))
    (y,) = op.infer({"to": B8}, [x], [])
    assert y == x.with_layout(B8)
    assert op.infer({"to": None}, [y], []) == [x]
    c = op.cost({"to": B8}, [x], [], [y])
    assert (c.flops, c.bytes) == (0, 20 * 9 * 2 * 4 + 24 * 9 * 2 * 4)
    a = rng.standard_normal(x.shape).astype(np.float32)
    (out,) = op.forward({"to": B8}, [a], [], Context())
    np.testing.assert_array_equal(out, a)
    assert out is not a
    dy = rng.standard_normal(x.shape).astype(np.float32)
    (dx,), dp = op.backward({"to": B8}, [np.full(x.shape, np.nan, np.float32)], [], [None],
                            [dy], [True], [], Context())
    np.testing.assert_array_equal(dx, dy)
    assert dp == []
    check_op("Reorder", {"to": B8}, [rng.standard_normal((2, 12, 3, 3))], rng=rng)
    for bad in ({"to": "NHWC"}, {"to": 3}):
        with pytest.raises(Exception, match="Reorder to"):
            op.infer(bad, [x], [])
    with pytest.raises(Exception, match="4-D f32"):
        op.infer({"to": B8}, [TensorType((2, 20))], [])


# ---- decisions on small graphs ---------------------------------------------------------

def _conv(o, k, g=1):
    return (f"{{num_output={o}, bias_term=true, kernel=[{k}, {k}], stride=[1, 1], "
            f"pad=[{k // 2}, {k // 2}], dilation=[1, 1], group={g}, axis=1}}")


P = "{lr_mult=1.0, decay_mult=1.0}"

CHAIN = f'''graph "chain" {{
  input %x: f32[1,16,16,16]
  param $w1: f32[32,16,3,3] {P}
  param $b1: f32[32] {P}
  param $w2: f32[32,32,3,3] {P}
  param $b2: f32[32] {P}
  %c1: f32[1,32,16,16] = Convolution(%x, $w1, $b1) {_conv(32, 3)} name="c1"
  %r1: f32[1,32,16,16] = ReLU(%c1) {{negative_slope=0.0}} name="r1"
  %c2: f32[1,32,16,16] = Convolution(%r1, $w2, $b2) {_conv(32, 3)} name="c2"
  %r2: f32[1,32,16,16] = ReLU(%c2) {{negative_slope=0.0}} name="r2"
  output %r2
}}
'''

CHAIN_OUT = f'''graph "chain" {{
  input %x: f32[1,16,16,16]
  param $w1: f32[32,16,3,3] {P}
  param $b1: f32[32] {P}
  param $w2: f32[32,32,3,3] {P}
  param $b2: f32[32] {P}
  %x@NCHW8c: f32[1,16,16,16]{{NCHW8c}} = Reorder(%x) {{to="NCHW8c"}} name="x@NCHW8c" blobs=["x"]
  %c1: f32[1,32,16,16]{{NCHW8c}} = Convolution(%x@NCHW8c, $w1, $b1) {_conv(32, 3)} name="c1"
  %r1: f32[1,32,16,16]{{NCHW8c}} = ReLU(%c1) {{negative_slope=0.0}} name="r1"
  %c2: f32[1,32,16,16]{{NCHW8c}} = Convolution(%r1, $w2, $b2) {_conv(32, 3)} name="c2"
  %r2: f32[1,32,16,16]{{NCHW8c}} = ReLU(%c2) {{negative_slope=0.0}} name="r2"
  %r2@plain: f32[1,32,16,16] = Reorder(%r2) {{to=null}} name="r2@plain" blobs=["r2"]
  output %r2@plain
}}
'''


def test_conv_chain_is_blocked_with_reorders_at_the_ends(rng):
    g = fill_params(verify(parse_graph(CHAIN)), rng)
    out = L.layout_pass(g, 8)
    assert print_graph(out) == CHAIN_OUT
    assert print_graph(g) == CHAIN            # the pass is pure
    assert print_graph(L.layout_pass(out, 8)) == CHAIN_OUT      # and idempotent
    _same_numbers(g, out, rng)


HEAD = f'''graph "head" {{
  input %x: f32[1,16,8,8]
  param $w: f32[16,16,3,3] {P}
  param $b: f32[16] {P}
  param $fw: f32[10,256] {P}
  %c: f32[1,16,8,8] = Convolution(%x, $w, $b) {_conv(16, 3)} name="c"
  %p: f32[1,16,4,4] = Pooling(%c) {{pool="MAX", kernel=[2, 2], stride=[2, 2], pad=[0, 0], global_pooling=false, round_mode="CEIL", top_mask=false}} name="p"
  %fc: f32[1,10] = InnerProduct(%p, $fw) {{num_output=10, bias_term=false, axis=1, transpose=false}} name="fc"
  output %fc
}}
'''


def test_inner_product_head_gets_a_reorder_before_it(rng):
    g = fill_params(verify(parse_graph(HEAD)), rng)
    out = L.layout_pass(g, 8)
    ops = [(n.op, n.name, n.inputs) for n in out.nodes]
    assert ops == [("Reorder", "x@NCHW8c", ["x"]), ("Convolution", "c", ["x@NCHW8c"]),
                   ("Pooling", "p", ["c"]), ("Reorder", "p@plain", ["p"]),
                   ("InnerProduct", "fc", ["p@plain"])]
    assert out.types["p"].layout == B8 and out.types["fc"].layout is None
    _same_numbers(g, out, rng)


def _first_layer(k: int) -> str:
    return f'''graph "first" {{
  input %x: f32[1,3,32,32]
  param $w1: f32[32,3,{k},{k}] {P}
  param $b1: f32[32] {P}
  param $w2: f32[32,32,3,3] {P}
  param $b2: f32[32] {P}
  %c1: f32[1,32,32,32] = Convolution(%x, $w1, $b1) {_conv(32, k)} name="c1"
  %r1: f32[1,32,32,32] = ReLU(%c1) {{negative_slope=0.0}} name="r1"
  %c2: f32[1,32,32,32] = Convolution(%r1, $w2, $b2) {_conv(32, 3)} name="c2"
  %out: f32[1,32,32,32] = Pooling(%c2) {{pool="MAX", kernel=[3, 3], stride=[1, 1], pad=[1, 1], global_pooling=false, round_mode="CEIL", top_mask=false}} name="out"
  output %out
}}
'''


def test_first_layer_with_three_channels_decided_by_the_cost_model(rng):
    """Blocked, a 3-channel convolution works on 8 channels (8/3 of the flops, at half the
    time per flop): a 7x7 kernel loses more than reordering its 32-channel output costs,
    so it stays plain; a 1x1 kernel loses less than that and joins the blocked chain
    (the 3-channel input is reordered instead)."""
    for k, c1_blocked in ((7, False), (1, True)):
        g = fill_params(verify(parse_graph(_first_layer(k))), rng)
        mode = L.assign_layouts(g, 8)
        assert mode == {"c1": B8 if c1_blocked else None, "r1": B8, "c2": B8, "out": B8}, k
        c1 = g.node("c1")
        extra = L.node_time(g, c1, 8) - L.node_time(g, c1, None)
        to_blocked = L.reorder_time(g.types["x"], 8) + extra   # c1 blocked: reorder x
        assert (to_blocked < L.reorder_time(g.types["c1"], 8)) == c1_blocked
        out = L.layout_pass(g, 8)
        where = [n.inputs[0] for n in out.nodes if n.op == "Reorder"]
        assert where == (["x", "out"] if c1_blocked else ["c1", "out"])
        _same_numbers(g, out, rng)


def test_small_or_odd_convolutions_stay_plain():
    # a 1x1 convolution of 8 channels saves 64 flops a pixel, less than Reordering 8
    # channels there and back costs, whatever the size; a 3x3 of 16 channels pays
    tiny = f'''graph "tiny" {{
  input %x: f32[1,8,64,64]
  param $w: f32[8,8,1,1]
  param $b: f32[8]
  %c: f32[1,8,64,64] = Convolution(%x, $w, $b) {_conv(8, 1)} name="c"
  %r: f32[1,8,64,64] = ReLU(%c) {{negative_slope=0.0}} name="r"
  output %r
}}'''
    g = verify(parse_graph(tiny))
    assert L.assign_layouts(g, 8) == {"c": None, "r": None}
    assert L.layout_pass(g, 8).nodes == g.nodes
    g = verify(parse_graph(tiny.replace("8,64,64]", "16,64,64]").replace(
        "[8,8,1,1]", "[16,16,3,3]").replace("[8]", "[16]").replace(_conv(8, 1), _conv(16, 3))))
    assert L.assign_layouts(g, 8) == {"c": B8, "r": B8}
    # grouped convolutions of 12 channels per group cannot run on blocks of 8
    text = CHAIN.replace("$w2: f32[32,32,3,3]", "$w2: f32[24,16,3,3]").replace(
        "%c2: f32[1,32,16,16]", "%c2: f32[1,24,16,16]").replace(
        "%r2: f32[1,32,16,16]", "%r2: f32[1,24,16,16]").replace("$b2: f32[32]", "$b2: f32[24]")
    text = text.replace(f"Convolution(%r1, $w2, $b2) {_conv(32, 3)}",
                        f"Convolution(%r1, $w2, $b2) {_conv(24, 3, 2)}")
    g = verify(parse_graph(text))
    assert "not whole blocks" in blocked_problem("Convolution", g.node("c2").attrs,
                                                 [g.types["r1"]], [], [g.types["c2"]], 8)
    mode = L.assign_layouts(g, 8)
    assert mode["c2"] is None and mode["c1"] == B8
    # ... but can on blocks of 4
    assert L.assign_layouts(g, 4)["c2"] == "NCHW4c"


def test_node_time_counts_channel_padding():
    """The model's numbers on one convolution 12 -> 20 channels (blocks of 8: 16 x 24
    channels of work and 16 / 24 channels of bytes)."""
    text = '''graph "t" {
  input %x: f32[1,12,5,5]
  param $w: f32[20,12,1,1]
  %y: f32[1,20,5,5] = Convolution(%x, $w) {num_output=20, bias_term=false, kernel=[1, 1], stride=[1, 1], pad=[0, 0], dilation=[1, 1], group=1, axis=1} name="y"
  output %y
}'''
    g = verify(parse_graph(text))
    n = g.node("y")
    flops = 2 * 25 * 20 * 12
    assert L.node_time(g, n, None) == pytest.approx(flops + L.BYTE_TIME * 4 * 25 * (12 + 20))
    want = (flops * L.BLOCKED_SPEED["Convolution"] * (16 * 24) / (12 * 20)
            + L.BYTE_TIME * 4 * 25 * (16 + 24))
    assert L.node_time(g, n, 8) == pytest.approx(want)
    assert L.reorder_time(g.types["x"], 8) == pytest.approx(L.BYTE_TIME * 4 * 25 * (12 + 16))


# ---- random nets: numbers and optimality ------------------------------------------------

def _conv_attrs(o, k, group=1):
    return {"num_output": o, "bias_term": True, "kernel": [k, k], "stride": [1, 1],
            "pad": [k // 2, k // 2], "dilation": [1, 1], "group": group, "axis": 1}


def _pool_attrs(k, s, p):
    return {"pool": "MAX", "kernel": [k, k], "stride": [s, s], "pad": [p, p],
            "global_pooling": False, "round_mode": "CEIL", "top_mask": False}


def random_net(rng, layers: int) -> Graph:
    """A random DAG of convolutions (some depthwise, some of odd channel counts), ReLU,
    pooling, LRN, Eltwise, Concat and Scale, maybe with an InnerProduct head, and a few
    graph outputs (one of them possibly an inner value)."""
    g = Graph("random")
    c0 = int(rng.choice([3, 8, 12, 16]))
    g.add_input("x", TensorType((1, c0, 8, 8)))
    vals = ["x"]

    def add(op, ins, attrs):
        o = get_op(op)
        in_t = [g.types[v] for v in ins]
        params = []
        for i, spec in enumerate(o.param_specs(attrs, in_t)):
            p = g.add_param(Param(f"n{len(g.nodes)}.{i}", TensorType(spec.shape)))
            params.append(p.name)
        name = f"n{len(g.nodes)}"
        out_t = o.infer(attrs, in_t, [g.params[p].type for p in params])
        g.add_node(Node(op, name, list(ins), [name], params, attrs), out_t)
        vals.append(name)
        return name

    for _ in range(layers):
        v = vals[int(rng.integers(max(0, len(vals) - 3), len(vals)))]
        t = g.types[v]
        c, h = t.shape[1], t.shape[2]
        kind = rng.choice(["conv", "conv", "conv", "dw", "relu", "pool", "lrn", "sum",
                           "concat", "scale"])
        same = [u for u in vals if u != v and g.types[u].shape == t.shape]
        cat = [u for u in vals if u != v and g.types[u].shape[2:] == t.shape[2:]]
        if kind == "conv":
            add("Convolution", [v], _conv_attrs(int(rng.choice([4, 8, 12, 16, 24])),
                                                int(rng.choice([1, 3]))))
        elif kind == "dw":
            add("Convolution", [v], _conv_attrs(c, 3, group=c))
        elif kind == "relu":
            add("ReLU", [v], {"negative_slope": 0.0})
        elif kind == "pool":
            add("Pooling", [v], _pool_attrs(2, 2, 0) if h >= 4 and rng.random() < 0.5
                else _pool_attrs(3, 1, 1))
        elif kind == "lrn":
            add("LRN", [v], {"local_size": 3, "alpha": 1e-3, "beta": 0.75, "k": 1.0,
                             "norm_region": str(rng.choice(["ACROSS_CHANNELS",
                                                            "WITHIN_CHANNEL"]))})
        elif kind == "sum" and same:
            add("Eltwise", [v, same[-1]], {"operation": "SUM", "coeff": [1.0, 1.0],
                                           "stable_prod_grad": True})
        elif kind == "concat" and cat:
            add("Concat", [cat[-1], v], {"axis": 1})
        else:
            add("Scale", [v], {"axis": 1, "num_axes": 1, "bias_term": True,
                               "filler": {"type": "constant", "value": 1.0},
                               "bias_filler": {"type": "constant", "value": 0.0}})
    g.outputs = [vals[-1]]
    if rng.random() < 0.5:
        g.outputs = [add("InnerProduct", [vals[-1]], {"num_output": 5, "bias_term": True,
                                                      "axis": 1, "transpose": False})]
    if len(vals) > 3 and rng.random() < 0.5:
        g.outputs.append(vals[len(vals) // 2])
    return verify(g)


def _same_numbers(before: Graph, after: Graph, rng) -> None:
    """Exactly the same values (Reorder is the identity on logical arrays): every output
    by Caffe blob name, and every value both graphs have."""
    feeds = feeds_for(before, rng)
    a, b = run(before, feeds), run(after, feeds)
    assert [before.blob_of[v] for v in before.outputs] == \
        [after.blob_of[v] for v in after.outputs]
    for vb, va in zip(before.outputs, after.outputs):
        assert np.linalg.norm(a[vb]) > 0
        np.testing.assert_array_equal(b[va], a[vb])
    for v in before.types:
        np.testing.assert_array_equal(b[v], a[v])


def total_time(g: Graph, block: int) -> float:
    """The model's time of a layout-annotated graph: its nodes in their layouts and its
    Reorders (computed from the rewritten graph, apart from the cut)."""
    t = 0.0
    for n in g.nodes:
        if n.op == "Reorder":
            t += L.reorder_time(g.types[n.inputs[0]], block)
        else:
            blocked = any(g.types[v].layout for v in (*n.inputs, *n.outputs))
            t += L.node_time(g, n, block if blocked else None)
    return t


@pytest.mark.parametrize("block", [4, 8, 16])
def test_random_nets_keep_their_numbers_and_the_cut_is_optimal(rng, block):
    checked = 0
    for trial in range(12):
        g = fill_params(random_net(rng, int(rng.integers(3, 10))), rng)
        out = L.layout_pass(g, block)
        verify(out)
        assert all(out.types[v].layout is None for v in (*out.inputs, *out.outputs))
        assert print_graph(parse_graph(print_graph(out))) == print_graph(out)
        _same_numbers(g, out, rng)
        # brute force over every assignment of the nodes that can run blocked
        free = [n.name for n in g.nodes if L.can_block(g, n, block)]
        if len(free) > 10:
            continue
        best = min(total_time(L.apply_layouts(g, {n: L.blocked_layout(block) if on else None
                                                  for n, on in zip(free, bits)}), block)
                   for bits in itertools.product([False, True], repeat=len(free)))
        assert total_time(out, block) == pytest.approx(best, rel=1e-9, abs=1e-6)
        checked += 1
    assert checked >= 6


# ---- the memory planner, other passes, the zoo -------------------------------------------

def test_memory_plan_counts_padding_and_runs_in_its_arena(rng):
    g = fill_params(random_net(rng, 8), rng)
    text = (CHAIN.replace("[32,", "[20,").replace(",32,", ",20,").replace("[32]", "[20]")
            .replace("num_output=32", "num_output=20"))  # 20 channels: 24 in blocks of 8
    chain = fill_params(verify(parse_graph(text)), rng)
    for g in (g, chain):
        for names in (["layout", "concat-slices", "inplace"],
                      ["concat-slices", "inplace", "layout"]):
            L.BLOCK, saved = 8, L.BLOCK
            try:
                out = run_pipeline(g, names)
            finally:
                L.BLOCK = saved
            plan = plan_memory(out)
            check_plan(out, plan)
            for b in plan.buffers:
                assert b.nbytes == out.types[b.root].nbytes
            feeds = feeds_for(g, rng)
            want = run(g, feeds)
            got = run_in_arena(out, feeds)
            for vg, vo in zip(g.outputs, out.outputs):
                np.testing.assert_array_equal(got[vo], want[vg])
    c2 = out.types["c2"]
    assert c2.layout == B8 and c2.nbytes == 24 * 16 * 16 * 4
    assert [b.nbytes for b in plan.buffers if "c2" in b.members] == [c2.nbytes]


def test_registered_but_not_in_the_default_pipeline(monkeypatch):
    assert "layout" in PASSES and "layout" not in DEFAULT_PIPELINE
    monkeypatch.setattr(L, "BLOCK", 16)
    assert L.default_block() == 16
    assert L.host_block() in (8, 16)
    out = run_pipeline(verify(parse_graph(CHAIN)), ["layout"])
    assert {out.types[v].layout for v in ("c1", "r1", "c2", "r2")} == {"NCHW16c"}


#: Reorders placed on the zoo nets at batch 1 (after dead-code, fold-batchnorm, fuse), for
#: blocks of 8 and 16: one into the blocked region after the first layers, one out of it
#: before the classifier; GoogLeNet's LRNs across channels run plain (two more)
REORDERS = {"resnet50_deploy": 2, "mobilenet_deploy": 2, "googlenet_deploy": 4,
            "squeezenet11_deploy": 2}


@pytest.mark.parametrize("name", NETS)
def test_zoo_nets_keep_their_numbers(shared_dir, name):
    """The golden weights and input at batch 1: the blocked graph gives exactly the
    numbers of the plain one (so, like it, Caffe's to 1e-5; test_passes_zoo.py)."""
    import graphc
    from golden import apply_rule, manifest
    d = shared_dir / "golden" / name
    net = graphc.Net(str(d / "net.prototxt"), phase="test", batch=1)
    apply_rule(net, manifest(d))
    feeds = {net.graph.inputs[0]: np.load(d / "input.npy")[:1]}
    fused = run_pipeline(net.graph, ["dead-code", "fold-batchnorm", "fuse"])
    want = run(fused, feeds, keep=())
    for block in (8, 16):
        out = verify(L.layout_pass(fused, block))
        if block == 8:      # (the reference runs logical arrays: any block gives the same)
            got = run(out, feeds, keep=())
            for vf, vo in zip(fused.outputs, out.outputs):
                assert np.linalg.norm(want[vf]) > 0
                assert rel_l2(got[vo], want[vf]) <= 1e-5
                np.testing.assert_array_equal(got[vo], want[vf])
        if name in REORDERS:
            assert sum(n.op == "Reorder" for n in out.nodes) == REORDERS[name], block
            assert sum(1 for t in out.types.values() if t.layout) > 0.8 * len(out.nodes)


def test_dump_passes_option(capsys, tmp_path, monkeypatch):
    from graphc.cli import main
    proto = tmp_path / "net.prototxt"
    proto.write_text('''name: "tiny"
input: "data"
input_shape { dim: 1 dim: 16 dim: 16 dim: 16 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 32 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "conv2" type: "Convolution" bottom: "conv" top: "conv2"
  convolution_param { num_output: 32 kernel_size: 3 pad: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv2" top: "fc"
  inner_product_param { num_output: 10 } }
''')
    monkeypatch.setattr(L, "BLOCK", 8)
    assert main(["dump", str(proto), "--passes", "dead-code,fuse,layout"]) == 0
    text = capsys.readouterr().out
    assert "Fused(%data@NCHW8c" in text and "{NCHW8c}" in text
    assert text.count("= Reorder(") == 2
    assert main(["dump", str(proto), "--passes", ""]) == 0      # the lowered IR
    text = capsys.readouterr().out
    assert "Reorder" not in text and "ReLU(%conv" in text
    assert main(["dump", str(proto), "--passes", "fuse,nope"]) == 1
    assert "unknown pass 'nope'" in capsys.readouterr().err
