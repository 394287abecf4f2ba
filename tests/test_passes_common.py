"""Helpers shared by the pass tests (imported by tests/test_passes_*.py), and tests of
passes/util.py and the pass registry."""
from __future__ import annotations

import numpy as np
import pytest

from graphc.errors import GraphcError
from graphc.ir import Graph, parse_graph, print_graph, verify
from graphc.passes import DEFAULT_PIPELINE, PASSES, run_pipeline
from graphc.passes.util import cleanup, fresh_name, readers, sole_reader
from graphc.reference import ReferenceExecutor

TOL = 1e-5


def fill_params(g: Graph, rng) -> Graph:
    """Random data for every param without data: BatchNorm variances in [0.5, 1.5] and
    its scale factor in [0.5, 2]; everything else standard normal."""
    bn_blobs = {n.params[i]: i for n in g.nodes if n.op == "BatchNorm"
                for i in range(len(n.params))}
    for name, p in g.params.items():
        if p.data is not None:
            continue
        shape = p.type.shape
        which = bn_blobs.get(name)
        if which == 1:
            v = rng.uniform(0.5, 1.5, shape)
        elif which == 2:
            v = rng.uniform(0.5, 2.0, shape)
        else:
            v = rng.standard_normal(shape)
        p.data = np.asarray(v, dtype=np.float32)
    return g


def feeds_for(g: Graph, rng) -> dict:
    return {v: rng.standard_normal(g.types[v].shape).astype(np.float32) for v in g.inputs}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    assert denom > 0, "reference is all zeros: the comparison would mean nothing"
    return float(np.linalg.norm(a - b) / denom)


def run(g: Graph, feeds: dict, keep="all") -> dict:
    return ReferenceExecutor(verify(g)).run(feeds, keep=keep)


def assert_equivalent(before: Graph, after: Graph, rng, *, tol: float = TOL,
                      feeds: dict | None = None) -> None:
    """Run both graphs on the same random inputs: the same graph outputs (by Caffe blob
    name), and every value both still have agrees, to relative L2 ``tol`` (an all-zero
    reference must be matched exactly, and some output must be non-zero).  Random
    inputs are drawn again (up to 10 draws) while every reference output is zero: a tiny
    net ending in a ReLU can map one unlucky draw to all zeros."""
    given = feeds is not None
    for _ in range(1 if given else 10):
        feeds = feeds if given else feeds_for(before, rng)
        a = run(before, feeds)
        if any(np.linalg.norm(a[v]) > 0 for v in before.outputs):
            break
    b = run(after, {v: feeds[v] for v in after.inputs})
    assert [before.blob_of[v] for v in before.outputs] == [after.blob_of[v] for v in after.outputs]
    nonzero = 0
    for vb, va in zip(before.outputs, after.outputs):
        assert b[va].shape == a[vb].shape
        assert np.isfinite(b[va]).all()
        if np.linalg.norm(a[vb]) > 0:
            assert rel_l2(b[va], a[vb]) <= tol, vb
            nonzero += 1
        else:   # e.g. a ReLU of negatives: must be exactly zero too
            np.testing.assert_array_equal(b[va], a[vb])
    assert nonzero, "every output is zero: the comparison would mean nothing"
    for v in after.types:
        if v in a and v not in before.inputs and np.linalg.norm(a[v]) > 0:
            assert rel_l2(b[v], a[v]) <= tol, v


def snapshot(g: Graph):
    """What a pure pass must leave unchanged in its input."""
    return print_graph(g), {k: None if p.data is None else p.data.copy()
                            for k, p in g.params.items()}


def assert_unchanged(g: Graph, snap) -> None:
    text, data = snap
    assert print_graph(g) == text
    for k, d in data.items():
        if d is None:
            assert g.params[k].data is None
        else:
            np.testing.assert_array_equal(g.params[k].data, d)


def check_text(pass_name: str, text_in: str, text_out: str, rng=None) -> tuple[Graph, Graph]:
    """parse -> pass -> print equals ``text_out`` (which must itself verify); the input
    graph is left as it was.  With ``rng``: the params get random values first and both
    graphs must compute the same (``assert_equivalent``).  Returns (input, output)."""
    g = verify(parse_graph(text_in))
    if rng is not None:
        fill_params(g, rng)
    snap = snapshot(g)
    out = verify(PASSES[pass_name](g))
    assert print_graph(out) == text_out
    assert_unchanged(g, snap)
    verify(parse_graph(text_out))
    if rng is not None:
        assert_equivalent(g, out, rng)
    return g, out


# ---- tests of the shared helpers and the registry ---------------------------------------

SMALL = '''graph "g" {
  input %x: f32[2,3]
  param $unused: f32[3] {lr_mult=1.0, decay_mult=1.0}
  %y: f32[2,3] = ELU(%x) {alpha=1.0} name="r"
  %z: f32[2,3] = TanH(%y) name="t"
  %w: f32[2,3] = Eltwise(%y, %y) {operation="SUM", coeff=[1.0, 1.0], stable_prod_grad=true} name="e"
  output %z, %w
}
'''


def test_readers_count_each_position():
    g = parse_graph(SMALL)
    rd = readers(g)
    assert [n.name for n in rd["y"]] == ["t", "e", "e"]
    assert sole_reader(g, "y", rd) is None
    assert sole_reader(g, "z", rd) is None          # a graph output
    assert sole_reader(g, "x", rd) is None          # a graph input


def test_fresh_name_and_cleanup():
    assert fresh_name("a", {"b"}) == "a"
    assert fresh_name("a", {"a", "a#2"}) == "a#3"
    g = parse_graph(SMALL)
    g.nodes = g.nodes[:2]
    g.outputs = ["z"]
    cleanup(g)
    assert set(g.types) == {"x", "y", "z"} and set(g.blob_of) == {"x", "y", "z"}
    assert g.params == {}


def test_default_pipeline_is_registered():
    assert DEFAULT_PIPELINE[:5] == ["dead-code", "fold-batchnorm", "fuse", "concat-slices",
                                    "inplace"]
    assert all(name in PASSES for name in DEFAULT_PIPELINE)
    with pytest.raises(GraphcError, match="unknown pass"):
        run_pipeline(parse_graph(SMALL), ["no-such-pass"])


def test_pipeline_keeps_meaning_of_small_graph(rng):
    g = verify(parse_graph(SMALL))
    out = run_pipeline(g)
    assert_equivalent(g, out, rng)


TRAIN = '''graph "train" {
  input %x: f32[2,3,4,4]
  param $conv.0: f32[3,3,1,1] {lr_mult=1.0, decay_mult=1.0}
  param $conv.1: f32[3] {lr_mult=2.0, decay_mult=0.0}
  param $bn.0: f32[3] {lr_mult=0.0, decay_mult=0.0}
  param $bn.1: f32[3] {lr_mult=0.0, decay_mult=0.0}
  param $bn.2: f32[1] {lr_mult=0.0, decay_mult=0.0}
  param $sc.0: f32[3] {lr_mult=1.0, decay_mult=1.0}
  %conv: f32[2,3,4,4] = Convolution(%x, $conv.0, $conv.1) {num_output=3, kernel=[1, 1], stride=[1, 1], pad=[0, 0], dilation=[1, 1], group=1, bias_term=true, axis=1} name="conv"
  %conv~bn: f32[2,3,4,4] = BatchNorm(%conv, $bn.0, $bn.1, $bn.2) {use_global_stats=false, moving_average_fraction=0.999, eps=1e-05} name="bn" blobs=["conv"]
  %conv~sc: f32[2,3,4,4] = Scale(%conv~bn, $sc.0) {axis=1, num_axes=1, bias_term=false} name="sc" blobs=["conv"]
  %conv~drop: f32[2,3,4,4] = Dropout(%conv~sc) {dropout_ratio=0.5, train=true} name="drop" blobs=["conv"]
  output %conv~drop
}
'''


def test_pipeline_on_a_training_graph_keeps_batchnorm_and_dropout():
    out = run_pipeline(verify(parse_graph(TRAIN)))
    assert [n.op for n in out.nodes] == ["Convolution", "BatchNorm", "Scale", "Dropout"]
    assert list(out.params) == ["conv.0", "conv.1", "bn.0", "bn.1", "bn.2", "sc.0"]
