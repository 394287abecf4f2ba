"""Memory planning: liveness, aliasing, offsets; checked by hand on small graphs and by
running random graphs inside one arena at the planned offsets (a wrong plan clobbers a
live value and changes the result)."""
import argparse
import json

import numpy as np
import pytest

from graphc.ir import Graph, Node, Param, f32, parse_graph, verify
from graphc.ops import Context, get_op
from graphc.passes import run_pipeline
from graphc.passes.memory import (ALIGN, buffers, check_plan, cmd_memory, memory_report,
                                  naive_bytes, plan_memory)

from test_passes_common import fill_params, run


def run_in_arena(g: Graph, feeds: dict) -> dict:
    """Run ``g`` with every value at its planned offset in one float32 arena (NaN where
    nothing was written).  By-slices Concats and view ops copy nothing."""
    plan = plan_memory(g)
    check_plan(g, plan)
    arena = np.full(plan.arena_bytes // 4 + 1, np.nan, np.float32)

    def at(v):
        off, t = plan.offsets[v], g.types[v]
        assert off % 4 == 0
        return arena[off // 4: off // 4 + t.numel].reshape(t.shape)

    for v in g.inputs:
        at(v)[...] = feeds[v]
    ctx = Context()
    for n in g.nodes:
        if n.op == "Concat" and n.attrs.get("by_slices"):
            continue
        ctx.node = n
        outs = get_op(n.op).forward(n.attrs, [at(v) for v in n.inputs],
                                    [g.params[p].data for p in n.params], ctx)
        for v, a in zip(n.outputs, outs):
            at(v)[...] = a
    return {v: at(v).copy() for v in g.outputs}


def assert_arena_run_matches(g: Graph, feeds: dict) -> None:
    want = run(g, feeds, keep=())
    got = run_in_arena(g, feeds)
    for v in g.outputs:
        np.testing.assert_array_equal(got[v], want[v], err_msg=v)


# ---- a hand-checked plan ---------------------------------------------------------------

CHAIN = '''graph "chain" {
  input %x: f32[16]
  %a: f32[16] = Power(%x) {power=1.0, scale=2.0, shift=0.0} name="a"
  %b: f32[16] = TanH(%a) name="b"
  %c: f32[32] = Concat(%a, %b) {axis=0} name="c"
  %d: f32[32] = Sigmoid(%c) name="d"
  %e: f32[16] = TanH(%b) name="e"
  output %d
}
'''


def test_hand_plan():
    # no passes: every value its own buffer, live from its definition to its last read
    # (an output: to the end, time 5; a value nobody reads: its definition only)
    g = verify(parse_graph(CHAIN))
    bufs = {b.root: (b.start, b.end, b.size) for b in buffers(g)}
    assert bufs == {"x": (-1, 0, 64), "a": (0, 2, 64), "b": (1, 4, 64), "c": (2, 3, 128),
                    "d": (3, 5, 128), "e": (4, 4, 64)}
    plan = plan_memory(g)
    check_plan(g, plan)
    # at time 3: b, c, d live (320 B) -- the most
    assert plan.lower_bound_bytes == 320
    assert plan.arena_bytes == 320
    assert naive_bytes(g) == 64 * 4 + 128 * 2
    # train: + the diffs; Caffe's inserted Splits for %a and %b (each read twice) have
    # 2 more diffs each
    assert naive_bytes(g, "train") == 2 * (64 * 4 + 128 * 2) + 4 * 64


def test_alignment_and_aliases():
    text = '''graph "al" {
  input %x: f32[3]
  input %z: f32[5]
  %a: f32[3] = TanH(%x) name="a"
  %b: f32[3] = ReLU(%a) {negative_slope=0.0, inplace=0} name="b"
  %r: f32[1,3] = Reshape(%b) {shape=[1, 3], axis=0, num_axes=-1} name="r"
  %y: f32[5] = TanH(%z) name="y"
  %w: f32[3] = Sigmoid(%x) name="w"
  %c: f32[8] = Concat(%w, %y) {axis=0, by_slices=true} name="c"
  output %c, %r
}
'''
    g = verify(parse_graph(text))
    plan = plan_memory(g)
    check_plan(g, plan)
    assert all(off % ALIGN == 0 for off in plan.buffer_offsets.values())
    o = plan.offsets
    assert o["a"] == o["b"] == o["r"]
    assert o["w"] == o["c"] and o["y"] == o["c"] + 12
    assert {b.root for b in plan.buffers} == {"x", "z", "a", "c"}
    # Caffe: the Reshape top shares data; b is a separate blob from a (not in place there)
    assert naive_bytes(g) == 4 * (3 + 5 + 3 + 3 + 5 + 3 + 8)


# ---- random graphs run inside the arena ------------------------------------------------

def random_graph(rng, n_nodes: int = 14) -> Graph:
    """1x1 convolutions, BatchNorm (+ Scale), elementwise ops, sums, channel Concats and
    Reshapes at batch 1 over random earlier values (mostly ones nobody reads yet, so
    folding, fusion, in-place and by-slices chances come up).  Params have no data."""
    g = Graph("rand")
    g.add_input("x", f32(1, int(rng.integers(1, 4)), 2, 2))
    vals = ["x"]

    def pick():
        unread = [u for u in vals if not any(u in n.inputs for n in g.nodes)]
        pool = unread if unread and rng.random() < 0.7 else vals
        return pool[int(rng.integers(len(pool)))]

    for i in range(n_nodes):
        kind = rng.choice(["tanh", "relu", "sum", "concat", "reshape", "sigmoid", "conv",
                           "bn", "scale"])
        name = f"n{i}"
        params: list[Param] = []
        v = pick()
        t = g.types[v]
        if kind in ("conv", "bn", "scale") and t.shape[2:] != (2, 2):
            kind = "tanh"   # keep those on (1, C, 2, 2) values
        if kind == "conv":
            c = int(rng.integers(1, 5))
            params = [Param(f"{name}.0", f32(c, t.shape[1], 1, 1)), Param(f"{name}.1", f32(c))]
            node = Node("Convolution", name, [v], [name], [], {
                "num_output": c, "kernel": [1, 1], "stride": [1, 1], "pad": [0, 0],
                "dilation": [1, 1], "group": 1, "bias_term": True, "axis": 1})
        elif kind == "bn":
            c = t.shape[1]
            params = [Param(f"{name}.0", f32(c)), Param(f"{name}.1", f32(c)),
                      Param(f"{name}.2", f32(1))]
            node = Node("BatchNorm", name, [v], [name], [], {
                "use_global_stats": True, "moving_average_fraction": 0.999, "eps": 1e-5})
        elif kind == "scale":
            params = [Param(f"{name}.0", f32(t.shape[1])), Param(f"{name}.1", f32(t.shape[1]))]
            node = Node("Scale", name, [v], [name], [],
                        {"axis": 1, "num_axes": 1, "bias_term": True})
        elif kind in ("tanh", "relu", "sigmoid"):
            v = pick()
            op = {"tanh": "TanH", "relu": "ReLU", "sigmoid": "Sigmoid"}[kind]
            attrs = {"negative_slope": 0.0} if op == "ReLU" else {}
            node = Node(op, name, [v], [name], [], attrs)
        elif kind == "sum":
            same = [u for u in vals if g.types[u] == g.types[v]]
            u = same[int(rng.integers(len(same)))]
            node = Node("Eltwise", name, [v, u], [name], [],
                        {"operation": "SUM", "coeff": [1.0, 1.0], "stable_prod_grad": True})
        elif kind == "concat":
            k = int(rng.integers(1, 4))
            picks = [v]
            for _ in range(k - 1):
                u = pick()
                if g.types[u].shape[2:] == g.types[picks[0]].shape[2:]:
                    picks.append(u)
            node = Node("Concat", name, picks, [name], [], {"axis": 1})
        else:
            node = Node("Reshape", name, [v], [name], [],
                        {"shape": [0, -1, 1, 1], "axis": 0, "num_axes": -1})
        for p in params:
            g.add_param(p)
        node.params = [p.name for p in params]
        out = get_op(node.op).infer(node.attrs, [g.types[u] for u in node.inputs],
                                    [p.type for p in params])
        g.add_node(node, out)
        vals.append(name)
    read = {u for n in g.nodes for u in n.inputs}
    g.outputs = [v for v in vals[1:] if v not in read or rng.random() < 0.15]
    return verify(g)


def test_random_graphs_keep_their_numbers_and_run_in_the_arena(rng):
    """Only fold-batchnorm changes the arithmetic: the rest of the pipeline must give
    bit-identical results to the folded graph.  Folding is checked to 1e-5 of the
    output's norm, plus 1e-5 of the largest value in the net per element, since a
    random net can cancel large values into small ones after a BatchNorm."""
    nonzero = 0
    for _ in range(40):
        g = fill_params(random_graph(rng), rng)
        opt = run_pipeline(g)
        folded = run_pipeline(g, ["dead-code", "fold-batchnorm"])
        feeds = {"x": rng.standard_normal(g.types["x"].shape).astype(np.float32)}
        want = run(g, feeds)
        scale = max(float(np.abs(a).max()) for a in want.values())
        mid, got = run(folded, feeds), run(opt, feeds)
        for v in g.outputs:
            np.testing.assert_array_equal(got[v], mid[v], err_msg=v)
            err = np.linalg.norm(mid[v].astype(np.float64) - want[v])
            assert err <= 1e-5 * (np.linalg.norm(want[v]) + scale * np.sqrt(want[v].size)), v
            nonzero += bool(np.linalg.norm(want[v]) > 0)
        plan = plan_memory(opt)
        assert plan.arena_bytes >= plan.lower_bound_bytes
        assert plan.arena_bytes <= sum(b.size for b in plan.buffers)
        assert_arena_run_matches(opt, feeds)
    assert nonzero >= 40


def test_the_arena_check_catches_a_bad_plan(rng, monkeypatch):
    """The arena run is a real check: with every buffer put at offset 0 it fails."""
    import graphc.passes.memory as mem
    g = run_pipeline(verify(parse_graph(CHAIN)))
    monkeypatch.setattr(mem, "_place", lambda bufs: ({b.root: 0 for b in bufs},
                                                     max(b.size for b in bufs)))
    with pytest.raises(AssertionError):
        assert_arena_run_matches(g, {"x": rng.standard_normal(16).astype(np.float32)})


# ---- report and CLI --------------------------------------------------------------------

def test_memory_report_and_train_phase():
    g = verify(parse_graph(CHAIN))
    rep = memory_report(g)
    assert rep["phase"] == "test" and rep["naive_bytes"] == naive_bytes(g)
    assert rep["planned_bytes"] >= rep["lower_bound_bytes"] > 0
    train = memory_report(g, phase="train")
    assert train["naive_bytes"] == 2 * rep["naive_bytes"] + 4 * 64
    assert "forward" in train["note"]


PROTO = '''name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "a" type: "Convolution" bottom: "conv" top: "a" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b" type: "Convolution" bottom: "conv" top: "b" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }
layer { name: "prob" type: "Softmax" bottom: "cat" top: "prob" }
'''


def test_cmd_memory(tmp_path, capsys):
    path = tmp_path / "tiny.prototxt"
    path.write_text(PROTO)
    args = argparse.Namespace(net=str(path), weights=None, phase="test", level=0, stage=[],
                              batch=1, json=True)
    assert cmd_memory(args) == 0
    rep = json.loads(capsys.readouterr().out)
    # batch 1: data 768 B, conv 2048 B (in place x2), a, b 1024 B each, cat, prob 2048 B
    assert rep["naive_bytes"] == 4 * (3 * 64 + 8 * 64 + 4 * 64 * 2 + 8 * 64 * 2)
    assert rep["planned_bytes"] <= rep["naive_bytes"]
    args.json = False
    assert cmd_memory(args) == 0
    text = capsys.readouterr().out
    assert "planned arena" in text and "naive" in text
