"""Every zoo net of ../shared/golden compiled for the CPU: the outputs (and the scores
the final Softmax reads, which random weights can saturate) match the reference executor
and real Caffe's golden blobs, at batch 1 and at the golden batch.  The arena is
NaN-filled before every run, so an unwritten element fails."""
from __future__ import annotations

import numpy as np
import pytest

import graphc
from golden import NETS, apply_rule, manifest
from graphc.runtime.testing import assert_close, compile_graph, rel_l2

TOL = 1e-4


@pytest.fixture(scope="module")
def cpu_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CACHE", str(tmp_path_factory.mktemp("graphc-cache")))
    yield
    mp.undo()


def _golden_net(d, name):
    man = manifest(d)
    model = d / f"{name}.caffemodel"
    net = graphc.Net(str(d / "net.prototxt"), phase="test",
                     weights=str(model) if model.exists() else None)
    if not model.exists():
        apply_rule(net, man)
    return net, man


@pytest.mark.parametrize("batch", ["1", "golden"])
@pytest.mark.parametrize("name", NETS)
def test_zoo_net(shared_dir, cpu_cache, name, batch):
    d = shared_dir / "golden" / name
    net, man = _golden_net(d, name)
    x = np.load(d / "input.npy")
    if batch == "1":
        x = x[:1]
    elif x.shape[0] == 1:
        pytest.skip("the golden batch is 1: the batch-1 case covers it")
    blob = man["input_blob"]
    want = net.forward(**{blob: x})
    g = net.graph.copy()
    # also compare what the final Softmax reads: random weights can saturate it
    scores = [n.inputs[0] for n in g.nodes if n.op == "Softmax" and n.outputs[0] in g.outputs]
    for v in scores:
        if v not in g.outputs:
            g.outputs.append(v)
            want[g.blob_of[v]] = net.blobs[g.blob_of[v]]
    cn = compile_graph(g)
    try:
        got = cn.forward(**{blob: x})
    finally:
        cn.close()
    assert_close(got, want, TOL)
    golden = np.load(d / "outputs.npz")
    compared = 0
    for k, v in got.items():
        if k in golden.files:
            ref = golden[k][:v.shape[0]]
            assert v.shape == ref.shape
            err = rel_l2(v, ref)
            assert err <= TOL, f"{name}: {k} differs from Caffe's by {err:.3g}"
            compared += 1
    assert compared >= 1
