"""The default pipeline on every zoo net of ../shared/golden (weights by the golden rule,
batch 1): same numbers before and after (relative L2 <= 1e-5 on the outputs and on every
value both graphs have), the optimized graph run inside its planned arena gives exactly
its reference result, and the memory targets hold."""
import numpy as np
import pytest

import graphc
from golden import NETS, apply_rule, manifest
from graphc.passes import run_pipeline
from graphc.passes.memory import memory_report

from test_passes_common import rel_l2, run
from test_passes_memory import run_in_arena

_CACHE: dict = {}


def _reference(shared_dir, name):
    """(lowered graph with the golden weights at batch 1, feeds, every value) -- once."""
    if name not in _CACHE:
        d = shared_dir / "golden" / name
        net = graphc.Net(str(d / "net.prototxt"), phase="test", batch=1)
        apply_rule(net, manifest(d))
        feeds = {net.graph.inputs[0]: np.load(d / "input.npy")[:1]}
        _CACHE.clear()   # keep one net's values at a time
        _CACHE[name] = (net.graph, feeds, run(net.graph, feeds))
    return _CACHE[name]


@pytest.mark.parametrize("passes", [["dead-code"], ["fold-batchnorm"], ["fuse"], None],
                         ids=["dead-code", "fold-batchnorm", "fuse", "pipeline"])
@pytest.mark.parametrize("name", NETS)   # each takes well under 10 s: none is marked slow
def test_passes_keep_the_numbers(shared_dir, name, passes):
    g, feeds, want = _reference(shared_dir, name)
    opt = run_pipeline(g, passes)
    got = run(opt, feeds)
    assert [g.blob_of[v] for v in g.outputs] == [opt.blob_of[v] for v in opt.outputs]
    compared = 0
    for v in opt.types:
        if v in want and v not in g.inputs and np.linalg.norm(want[v]) > 0:
            assert rel_l2(got[v], want[v]) <= 1e-5, v
            compared += 1
    for vg, vo in zip(g.outputs, opt.outputs):
        assert rel_l2(got[vo], want[vg]) <= 1e-5, vg
    assert compared >= len(opt.nodes) // 2
    if passes is None:
        assert len(opt.nodes) < len(g.nodes)
        # the planned arena (in-place, by-slices Concats) computes exactly the same
        arena = run_in_arena(opt, feeds)
        for v in opt.outputs:
            np.testing.assert_array_equal(arena[v], got[v])


TARGETS = {"resnet50_deploy": 0.15, "googlenet_deploy": 0.20}


@pytest.mark.parametrize("name", NETS)
def test_memory_targets(shared_dir, name):
    from graphc.frontend.lower import lower
    from graphc.frontend.prototxt import read_net
    g = lower(read_net(shared_dir / "golden" / name / "net.prototxt"), "test", batch=1)
    rep = memory_report(g)
    assert rep["lower_bound_bytes"] <= rep["planned_bytes"] <= 1.1 * rep["lower_bound_bytes"]
    assert rep["planned_bytes"] <= TARGETS.get(name, 1.0) * rep["naive_bytes"]


@pytest.mark.parametrize("name", NETS)
def test_naive_is_what_caffe_holds(shared_dir, name):
    """naive_bytes at the golden batch = the bytes of every blob real Caffe listed, less
    the Split tops Caffe inserted (they share their bottom's data)."""
    import math
    from graphc.frontend.lower import lower
    from graphc.frontend.prototxt import read_net
    from graphc.passes.memory import naive_bytes
    d = shared_dir / "golden" / name
    man = manifest(d)
    caffe = sum(4 * math.prod(s["shape"]) for blob, s in man["blob_stats"].items()
                if "_split_" not in blob)
    g = lower(read_net(d / "net.prototxt"), "test", batch=man["input_shape"][0])
    assert naive_bytes(g) == caffe
