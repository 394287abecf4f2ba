"""The reference executor against real BVLC Caffe (../shared/golden): every saved blob of
every zoo net, relative L2 <= 1e-5; blobs the golden set dropped are checked by their
saved L2 norm and shape."""
import hashlib

import numpy as np
import pytest

import graphc
from golden import NETS, apply_rule, manifest, rel_l2

TOL = 1e-5


@pytest.mark.parametrize("name", NETS)
def test_matches_caffe(shared_dir, name):
    d = shared_dir / "golden" / name
    man = manifest(d)
    x = np.load(d / "input.npy")
    model = d / f"{name}.caffemodel"
    net = graphc.Net(str(d / "net.prototxt"), phase="test",
                     weights=str(model) if model.exists() else None)
    if not model.exists():
        apply_rule(net, man)
    else:  # the loaded weights are the ones Caffe ran with
        want = {(p["layer"], p["index"]): p["sha256"] for p in man["params"]}
        got = {(layer, i): hashlib.sha256(b.tobytes()).hexdigest()
               for layer, blobs in net.params.items() for i, b in enumerate(blobs)}
        assert got == want
    out = net.forward(**{man["input_blob"]: x})
    assert sorted(out) == sorted(man["outputs"])
    assert list(net.blobs) == man["blob_order"]
    golden = np.load(d / "outputs.npz")
    for blob in man["blob_order"]:
        ours = net.blobs[blob]
        stats = man["blob_stats"][blob]
        assert list(ours.shape) == stats["shape"], blob
        assert np.isfinite(ours).all(), blob
        if blob in golden.files:
            err = rel_l2(ours, golden[blob])
        else:
            err = abs(np.linalg.norm(ours.astype(np.float64)) - stats["l2"]) / stats["l2"]
        assert err <= TOL, f"{name}: blob {blob}: relative L2 error {err:.3g} > {TOL}"
