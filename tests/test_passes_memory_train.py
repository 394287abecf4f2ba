"""Training memory: Grad nodes read only what their op's backward declares
(``Op.backward_reads``), the backward graph is planned in one arena (in place where
legal, param gradients pinned, op state counted), ``pool-argmax`` and ``recompute``
keep less from forward to backward, and the planned training graph computes exactly
the losses and gradients of the plain one when run inside its arena."""
import argparse
import itertools
import json

import numpy as np
import pytest
from google.protobuf import text_format

from graphc.frontend import caffe_pb2
from graphc.frontend.lower import load_net_source, lower
from graphc.ir import Graph, Node, f32, verify
from graphc.ir.types import TensorType
from graphc.ops import Context, get_op
from graphc.ops.grad import _StateKey, grad_node_attrs
from graphc.passes import PASSES, TRAIN_PIPELINE, run_pipeline
from graphc.passes.memory import (cmd_memory, memory_report, naive_bytes, plan_memory,
                                  plan_train, train_pipelines)
from graphc.passes.recompute import backward_start
from graphc.reference import ReferenceExecutor

import test_passes_memory as tpm
from test_grad_ops import CASES
from test_passes_memory import random_graph

# ---- the declarations: a Grad node reads only what backward_reads says ------------------

# Reorder is left out: blocked layouts exist only in inference graphs (autodiff runs on
# plain graphs), so no Grad node ever reads a Reorder's blocked output.
CASES_HERE = {k: v for k, v in CASES.items() if k != "Reorder"}
CASES_HERE["Pooling-MAX-keep-argmax"] = lambda r: dict(
    CASES["Pooling-MAX"](r), attrs={**CASES["Pooling-MAX"](r)["attrs"], "keep_argmax": True})
CASES_HERE["ReLU-negative-slope"] = lambda r: dict(
    op_type="ReLU", attrs={"negative_slope": -0.3}, inputs=[r.standard_normal((2, 3, 4))])
CASES_HERE["ELU-negative-alpha"] = lambda r: dict(
    op_type="ELU", attrs={"alpha": -0.5}, inputs=[r.standard_normal((2, 3, 4))])


def _need_sets(op, attrs, n_in, n_params, need_in, need_p):
    """The case's need flags, and each single needed input / param alone."""
    need_in = list(op.grad_inputs(attrs, n_in)) if need_in is None else list(need_in)
    need_p = [True] * n_params if need_p is None else list(need_p)
    sets = [(need_in, need_p)]
    for i, b in enumerate(need_in):
        if b:
            sets.append(([j == i for j in range(n_in)], [False] * n_params))
    for j, b in enumerate(need_p):
        if b:
            sets.append(([False] * n_in, [k == j for k in range(n_params)]))
    return sets


@pytest.mark.parametrize("case", sorted(CASES_HERE))
def test_grad_node_reads_only_what_backward_declares(case, rng):
    """The Grad node, given only the declared forward inputs/outputs (the others NaN
    placeholders), gives bit for bit what ``backward`` gives with everything; and so
    does ``backward`` with the undeclared ones replaced by random garbage (a rule that
    only compares an undeclared value would pass the NaN test but not this one)."""
    kw = CASES_HERE[case](rng)
    op, attrs = get_op(kw["op_type"]), kw["attrs"]
    ins = [np.asarray(x, np.float32) for x in kw["inputs"]]
    ps = [np.asarray(p, np.float32) for p in kw.get("params", ())]
    ctx = Context(phase=kw.get("phase", "train"), rng=np.random.default_rng(5))
    ctx.node = _StateKey("layer")
    outs = op.forward(attrs, ins, [p.copy() for p in ps], ctx)
    which = kw.get("grads_for", range(len(outs)))
    dys = [rng.standard_normal(y.shape).astype(np.float32) if k in which else None
           for k, y in enumerate(outs)]
    grads = [k for k, d in enumerate(dys) if d is not None]
    checked = 0
    for need_in, need_p in _need_sets(op, attrs, len(ins), len(ps), kw.get("need_inputs"),
                                      kw.get("need_params")):
        if not any(need_in) and not any(need_p):
            continue
        ctx.node = _StateKey("layer")
        full_outs = outs if op.backward_uses_outputs(attrs) else [None] * len(outs)
        want_i, want_p = op.backward(attrs, ins, [p.copy() for p in ps], full_outs, dys,
                                     need_in, need_p, ctx)
        want = [g for g, n in zip(want_i, need_in) if n] + [g for g, n in zip(want_p, need_p)
                                                          if n]
        ga = grad_node_attrs(op, attrs, "layer", [TensorType.of(x) for x in ins], len(outs),
                             need_in, need_p, grads)
        reads_in, reads_out = op.backward_reads(attrs, need_in, need_p, len(outs))
        assert ga["inputs"] == [i for i, r in enumerate(reads_in) if r]
        assert ga["outputs"] == [k for k, r in enumerate(reads_out) if r]
        node_in = ([ins[i] for i in ga["inputs"]] + [outs[k] for k in ga["outputs"]]
                   + [dys[k] for k in grads])
        grad = get_op("Grad")
        types = grad.infer(ga, [TensorType.of(a) for a in node_in],
                           [TensorType.of(p) for p in ps])
        ctx.node = None
        got = grad.forward(ga, node_in, [p.copy() for p in ps], ctx)
        assert len(got) == len(want) == len(types)
        for g, w, t in zip(got, want, types):
            assert g.shape == t.shape and g.dtype == np.float32
            np.testing.assert_array_equal(g, np.asarray(w, np.float32).reshape(g.shape))
        garbage = [x if r else rng.standard_normal(x.shape).astype(x.dtype) * 7
                   for x, r in zip(ins, reads_in)]
        kept_outs = [y if r else None for y, r in zip(outs, reads_out)]
        ctx.node = _StateKey("layer")
        gi, gp = op.backward(attrs, garbage, [p.copy() for p in ps], kept_outs, dys,
                             need_in, need_p, ctx)
        again = [g for g, n in zip(gi, need_in) if n] + [g for g, n in zip(gp, need_p) if n]
        for g, w in zip(again, want):
            np.testing.assert_array_equal(np.asarray(g, np.float32).reshape(np.shape(w)), w)
        checked += 1
    assert checked


def test_declarations_narrow_what_matters():
    """The reads that decide training memory, stated by hand."""
    def reads(op, attrs, need_in=(True,), need_p=(), n_out=1):
        return get_op(op).backward_reads(attrs, list(need_in), list(need_p), n_out)
    conv = {"num_output": 2, "bias_term": True, "kernel": [1, 1], "stride": [1, 1],
            "pad": [0, 0], "dilation": [1, 1], "group": 1, "axis": 1}
    assert reads("ReLU", {"negative_slope": 0.0}) == ([False], [True])
    assert reads("ReLU", {"negative_slope": -1.0}) == ([True], [False])
    assert reads("Convolution", conv, [True], [False, True]) == ([False], [False])
    assert reads("Convolution", conv, [False], [True, True]) == ([True], [False])
    assert reads("BatchNorm", {"use_global_stats": False}) == ([False], [True])
    assert reads("BatchNorm", {"use_global_stats": True}) == ([False], [False])
    assert reads("Scale", {"axis": 1, "num_axes": 1, "bias_term": True},
                 [True], [False, True]) == ([False], [False])
    assert reads("Eltwise", {"operation": "SUM", "coeff": []}, [True, True]) \
        == ([False, False], [False])
    assert reads("Sigmoid", {}) == ([False], [True])
    assert reads("LRN", {"norm_region": "ACROSS_CHANNELS"}) == ([True], [False])
    assert reads("Pooling", {"pool": "MAX"}) == ([True], [False])
    assert reads("Pooling", {"pool": "MAX", "keep_argmax": True}) == ([False], [False])
    assert reads("Dropout", {"train": True, "dropout_ratio": 0.5}) == ([False], [False])


# ---- small training nets -----------------------------------------------------------

BLOCKS = """
name: "blocks"
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: %(n)d dim: 3 dim: 12 dim: 12 } shape { dim: %(n)d } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "bn1" type: "BatchNorm" bottom: "pool1" top: "pool1" }
layer { name: "sc1" type: "Scale" bottom: "pool1" top: "pool1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer { name: "a" type: "Convolution" bottom: "pool1" top: "a"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "bna" type: "BatchNorm" bottom: "a" top: "a" }
layer { name: "sca" type: "Scale" bottom: "a" top: "a" scale_param { bias_term: true } }
layer { name: "relua" type: "ReLU" bottom: "a" top: "a" }
layer { name: "b" type: "Convolution" bottom: "a" top: "b"
        convolution_param { num_output: 8 kernel_size: 1 bias_term: false } }
layer { name: "bnb" type: "BatchNorm" bottom: "b" top: "b" }
layer { name: "sum" type: "Eltwise" bottom: "pool1" bottom: "b" top: "sum" }
layer { name: "relus" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "lrn" type: "LRN" bottom: "sum" top: "lrn" lrn_param { local_size: 3 alpha: 0.1 } }
layer { name: "c3" type: "Convolution" bottom: "lrn" top: "c3"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "r3" type: "ReLU" bottom: "c3" top: "c3" }
layer { name: "cat" type: "Concat" bottom: "c3" bottom: "lrn" top: "cat" }
layer { name: "sig" type: "Sigmoid" bottom: "cat" top: "sig" }
layer { name: "pool2" type: "Pooling" bottom: "sig" top: "pool2"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param { num_output: 16 } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

LENET = """
name: "lenet-train"
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: %(n)d dim: 1 dim: 28 dim: 28 } shape { dim: %(n)d } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 20 kernel_size: 5 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 50 kernel_size: 5 } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param { num_output: 500 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def lowered(text: str, batch: int, rng=None) -> Graph:
    g = lower(load_net_source(text_format.Parse(text % {"n": batch},
                                                caffe_pb2.NetParameter())), "train")
    if rng is not None:
        for p in g.params.values():
            fan = int(np.prod(p.type.shape[1:])) if p.type.rank > 1 else 1
            p.data = (rng.standard_normal(p.type.shape) / np.sqrt(fan)).astype(np.float32)
    return g


def feeds(g: Graph, rng) -> dict:
    out = {}
    for v in g.inputs:
        t = g.types[v]
        out[v] = (rng.integers(0, 5, t.shape).astype(np.float32) if v == "label"
                  else rng.standard_normal(t.shape).astype(np.float32))
    return out


def run_planned(tg: Graph, fd: dict) -> dict:
    """``tg`` run inside the arena of its training plan (param gradients pinned),
    with the arena runner of test_passes_memory."""
    saved = tpm.plan_memory
    tpm.plan_memory = lambda g: plan_memory(g, pinned=g.param_grads.values())
    try:
        return tpm.run_in_arena(tg, fd)
    finally:
        tpm.plan_memory = saved


def assert_same_training(g: Graph, tg: Graph, fd: dict) -> int:
    """``tg`` (planned, run in its arena) gives bit for bit the losses, param gradients
    and input gradients of the plain autodiff graph (reference executor); returns how
    many gradients are nonzero."""
    params = {k: p.data.copy() for k, p in g.params.items() if p.data is not None}
    ref = run_pipeline(g, TRAIN_PIPELINE)
    want = ReferenceExecutor(ref, Context()).run(fd)
    for k, a in params.items():          # BatchNorm statistics: start again
        g.params[k].data[...] = a
    got = run_planned(tg, fd)
    for k, a in params.items():
        g.params[k].data[...] = a
    assert [w for _, w in tg.losses] == [w for _, w in ref.losses] and ref.losses
    for (v, _), (u, _) in zip(tg.losses, ref.losses):
        np.testing.assert_array_equal(got[v], want[u])
    assert tg.param_grads.keys() == ref.param_grads.keys()
    nonzero = 0
    for p, v in ref.param_grads.items():
        np.testing.assert_array_equal(got[tg.param_grads[p]], want[v], err_msg=p)
        nonzero += bool(np.any(want[v]))
    for x, v in ref.value_grads.items():
        if x in ref.inputs:
            np.testing.assert_array_equal(got[tg.value_grads[x]], want[v], err_msg=x)
    return nonzero


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("text", [BLOCKS, LENET], ids=["blocks", "lenet"])
def test_planned_training_runs_in_its_arena(text, recompute, rng):
    g = lowered(text, 4, rng)
    tg, plan = plan_train(g, recompute)
    assert plan.arena_bytes >= plan.lower_bound_bytes
    nonzero = assert_same_training(g, tg, feeds(g, rng))
    assert nonzero >= len(tg.param_grads) - 1     # (a bias before BatchNorm: 0)
    assert any("inplace" in n.attrs for n in tg.nodes[backward_start(tg):])
    if recompute and text is BLOCKS:
        assert any(n.name.endswith("@re") for n in tg.nodes)
        assert any(n.op == "Recompute" for n in tg.nodes)   # BatchNorm's copies


def test_the_arena_check_catches_a_bad_training_plan(rng, monkeypatch):
    import graphc.passes.memory as mem
    g = lowered(LENET, 2, rng)
    tg, _ = plan_train(g)
    fd = feeds(g, rng)
    monkeypatch.setattr(mem, "_place", lambda bufs: ({b.root: 0 for b in bufs},
                                                     max(b.size for b in bufs)))
    with pytest.raises(AssertionError):
        assert_same_training(g, tg, fd)


def _with_loss(g: Graph, rng) -> Graph:
    """A random graph of test_passes_memory made trainable: a SUMSQ loss on each output,
    BatchNorm statistics frozen, and (half the time) gradients for the input too."""
    g = g.copy()
    for n in g.nodes:
        if n.op == "BatchNorm":
            for p in n.params:
                g.params[p].lr_mult = 0.0
    for k, v in enumerate(list(g.outputs)):
        name = f"loss{k}"
        node = Node("Reduction", name, [v], [name], [],
                    {"operation": "SUMSQ", "axis": 0, "coeff": 1.0, "loss_weight": [0.5]})
        g.add_node(node, get_op("Reduction").infer(node.attrs, [g.types[v]], []))
    g.outputs = [f"loss{k}" for k in range(len(g.outputs))]
    g.force_backward = bool(rng.random() < 0.5)
    return tpm.fill_params(verify(g), rng)


def test_random_training_graphs_run_in_their_arena(rng):
    """In place in backward (Sums, elementwise gradients over dead buffers), Concat
    slices, views, recomputation: the arena run gives the reference's gradients."""
    checked = 0
    for _ in range(12):
        g = _with_loss(random_graph(rng), rng)
        fd = {"x": rng.standard_normal(g.types["x"].shape).astype(np.float32)}
        for recompute in (False, True):
            tg, _ = plan_train(g, recompute)
            checked += assert_same_training(g, tg, fd) > 0
    assert checked >= 12


# ---- what the plan keeps ---------------------------------------------------------------

def test_backward_keeps_only_what_it_reads():
    g = lowered(BLOCKS, 4)
    tg = run_pipeline(g, TRAIN_PIPELINE)
    fwd = {n.name: n for n in tg.nodes[:backward_start(tg)]}
    grads = {n.attrs["node"]: n for n in tg.nodes if n.op == "Grad"}
    for name, n in grads.items():
        f = fwd[name]
        reads_in, reads_out = get_op(f.op).backward_reads(
            f.attrs, n.attrs["need_inputs"], n.attrs["need_params"], len(f.outputs))
        k = sum(reads_in) + sum(reads_out)
        assert n.inputs[:k] == ([v for v, r in zip(f.inputs, reads_in) if r]
                                + [v for v, r in zip(f.outputs, reads_out) if r]), name
    assert grads["relu1"].inputs[0] == fwd["relu1"].outputs[0]       # the top, not x
    assert len(grads["sum"].inputs) == 1                              # just the gradient
    assert grads["bn1"].inputs[0] == fwd["bn1"].outputs[0]
    assert "data" in grads["conv1"].inputs         # the weight gradient needs it
    # the ReLU and BatchNorm forward nodes may now write over their inputs
    planned, _ = plan_train(g)
    byname = {n.name: n for n in planned.nodes}
    assert byname["bn1"].attrs.get("inplace") == 0 and byname["relua"].attrs.get("inplace") == 0
    # pool1 follows conv1 directly: it keeps its argmax, and conv1's output dies
    assert byname["pool1"].attrs.get("keep_argmax") is True
    pg = byname["pool1@grad"]
    assert "conv1" not in pg.inputs and pg.attrs["inputs"] == []


def test_param_grads_are_pinned_and_state_is_counted(rng):
    g = lowered(BLOCKS, 4)
    tg, plan = plan_train(g)
    pinned = [b for b in plan.buffers if b.pinned]
    assert {v for b in pinned for v in b.members} >= set(tg.param_grads.values())
    assert all(b.start == -1 and b.end == len(tg.nodes) for b in pinned)
    assert plan.pinned_raw_bytes == sum(tg.types[v].nbytes for v in tg.param_grads.values())
    states = {b.state_of: b.nbytes for b in plan.buffers if b.state_of}
    n = 4
    assert states["drop"] == 4 * n * 16                  # the Dropout mask
    assert states["bn1"] == states["bna"] == states["bnb"] == 4 * 8   # batch variances
    assert states["pool1"] == 4 * n * 8 * 6 * 6          # the argmax
    drop = next(b for b in plan.buffers if b.state_of == "drop")
    grad = next(i for i, m in enumerate(tg.nodes) if m.op == "Grad" and m.attrs["node"] == "drop")
    assert drop.end == grad and tg.nodes[drop.start].name == "drop"


def test_recompute_keeps_less_and_places_copies_late():
    g = lowered(BLOCKS, 8)
    plain, p0 = plan_train(g)
    re, p1 = plan_train(g, recompute=True)
    rep = memory_report(g, phase="train", recompute=True)
    assert rep["with_recompute"]["kept_bytes"] < rep["without_recompute"]["kept_bytes"]
    start = backward_start(re)
    copies = [i for i, n in enumerate(re.nodes) if n.name.endswith("@re")]
    assert copies and min(copies) > start
    for i in copies:                       # right before their first reader
        outs = set(re.nodes[i].outputs)
        first = min(j for j, n in enumerate(re.nodes) if outs & set(n.inputs))
        assert all(re.nodes[k].name.endswith("@re") for k in range(i + 1, first))
    # forward nodes still read the originals; no Grad node reads a recomputed value's
    # original any more
    originals = {n.outputs[0][:-3] for n in re.nodes if n.name.endswith("@re")}
    assert not any(v in originals for n in re.nodes[start:] if n.op == "Grad" for v in n.inputs)
    assert rep["planned_bytes"] == min(rep["with_recompute"]["planned_bytes"],
                                       rep["without_recompute"]["planned_bytes"])


def test_recompute_leaves_a_graph_without_backward_alone():
    g = lowered(LENET, 2)
    assert PASSES["recompute"](g).nodes == g.nodes
    assert PASSES["pool-argmax"](g).nodes == g.nodes


@pytest.mark.parametrize("text,batch", [(BLOCKS, 32), (LENET, 32)], ids=["blocks", "lenet"])
def test_targets_on_small_nets(text, batch):
    """planned <= 1.1 x lower bound, and at most half of Caffe's blob data + diff."""
    g = lowered(text, batch)
    for recompute in (False, True):
        rep = memory_report(g, phase="train", recompute=recompute)
        assert rep["lower_bound_bytes"] <= rep["planned_bytes"] <= 1.1 * rep["lower_bound_bytes"]
        assert rep["planned_bytes"] <= 0.5 * rep["naive_bytes"], rep
    assert rep["naive_bytes"] == naive_bytes(g, "train")
    assert rep["param_grad_bytes"] == sum(p.type.nbytes for p in g.params.values()
                                          if p.lr_mult != 0)


def test_hand_checked_train_plan():
    """x -> InnerProduct -> ReLU (in place) -> EuclideanLoss: the ReLU output is kept
    for its Grad (it reads only its top); the InnerProduct output is not kept."""
    text = '''graph "tiny" {
  input %x: f32[4,8]
  input %t: f32[4,16]
  param $w: f32[16,8] {lr_mult=1.0, decay_mult=1.0}
  %y: f32[4,16] = InnerProduct(%x, $w) {num_output=16, bias_term=false, axis=1, transpose=false} name="ip"
  %r: f32[4,16] = ReLU(%y) {negative_slope=0.0} name="relu"
  %loss: f32[] = EuclideanLoss(%r, %t) {loss_weight=[1.0]} name="loss"
  output %loss
}
'''
    from graphc.ir import parse_graph
    g = verify(parse_graph(text))
    rep = memory_report(g, phase="train")
    tg, plan = plan_train(g)
    names = [n.name for n in tg.nodes]
    assert names == ["ip", "relu", "loss", "loss@seed", "loss@grad", "relu@grad", "ip@grad"]
    byname = {n.name: n for n in tg.nodes}
    assert byname["relu"].attrs.get("inplace") == 0           # y is dead after relu
    assert byname["relu@grad"].inputs == ["r", "r@grad"]
    assert byname["relu@grad"].attrs.get("inplace") is not None
    # bytes: x 128, t 256, y/r 256 (one buffer), loss and its seed 4 each, r@grad and
    # y@grad 256 (one buffer), $w@grad 512 (pinned)
    live = {b.root for b in plan.buffers if b.start <= 3 <= b.end and not b.pinned}
    assert live == {"x", "t", "y", "loss", "loss@grad"}     # when backward starts
    assert rep["param_grad_bytes"] == 512
    assert rep["naive_bytes"] == 2 * (128 + 256 + 256 + 256 + 4)
    # the most at once: the loss's Grad node writing r@grad while x, t, r, the loss and
    # its seed are live
    assert rep["lower_bound_bytes"] == 128 + 256 + 256 + 4 + 4 + 256
    assert rep["planned_bytes"] == 128 + 256 + 256 + 64 + 64 + 256   # 64-byte aligned


# ---- the CLI ---------------------------------------------------------------------------

def _args(path, **kw):
    base = dict(net=str(path), weights=None, phase="train", level=None, stage=[], batch=None,
                input=[], json=True, recompute=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cmd_memory_train(tmp_path, capsys):
    path = tmp_path / "blocks.prototxt"
    path.write_text(BLOCKS % {"n": 2})
    assert cmd_memory(_args(path, batch=16)) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["phase"] == "train" and "note" not in rep
    g = lowered(BLOCKS, 16)
    assert rep["naive_bytes"] == naive_bytes(g, "train")
    assert rep["lower_bound_bytes"] <= rep["planned_bytes"] <= rep["naive_bytes"]
    assert rep["backward_nodes"] > 10 and rep["param_grad_bytes"] > 0
    assert cmd_memory(_args(path, batch=16, recompute=True)) == 0
    rep2 = json.loads(capsys.readouterr().out)
    assert rep2["without_recompute"]["planned_bytes"] == rep["planned_bytes"]
    assert rep2["planned_bytes"] <= rep["planned_bytes"]
    assert cmd_memory(_args(path, batch=16, recompute=True, json=False)) == 0
    text = capsys.readouterr().out
    for words in ("train phase", "naive (Caffe: blob data + diff)", "param gradients",
                  "with recompute:", "without recompute:", "recomputation"):
        assert words in text


def test_graphc_memory_command_line(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "lenet.prototxt"
    path.write_text(LENET % {"n": 2})
    out = subprocess.run([sys.executable, "-m", "graphc.cli", "memory", str(path), "--phase",
                          "train", "--batch", "32", "--recompute", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rep = json.loads(out)
    assert rep["planned_over_naive"] <= 0.5 and "with_recompute" in rep


ZOO_TRAIN = {"lenet_train_test": (1, 28, 28), "cifar10_quick_train_test": (3, 32, 32),
             "cifar10_bn_train_test": (3, 32, 32)}


@pytest.mark.parametrize("name", sorted(ZOO_TRAIN))
def test_zoo_train_nets_meet_the_targets(shared_dir, name):
    """The zoo's small training nets at batch 32, data fed: planned <= 1.1 x lower bound
    and <= 50% of Caffe's blob data + diff, without recomputation."""
    from graphc.frontend.prototxt import read_net
    g = lower(read_net(shared_dir / "zoo" / f"{name}.prototxt"), "train",
              input_shapes={"data": (32, *ZOO_TRAIN[name]), "label": (32,)})
    rep = memory_report(g, phase="train")
    assert rep["lower_bound_bytes"] <= rep["planned_bytes"] <= 1.1 * rep["lower_bound_bytes"]
    assert rep["planned_bytes"] <= 0.5 * rep["naive_bytes"]
