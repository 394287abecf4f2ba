"""Weights files: .caffemodel (V2 and V1), .caffemodel.h5, .binaryproto, atomic writes."""
import hashlib
import json
import os
import stat

import numpy as np
import pytest

from graphc.errors import GraphcError
from graphc.frontend import caffe_pb2 as pb
from graphc.frontend.atomic import atomic_write
from graphc.frontend.caffemodel import (blob_matches, read_binaryproto, read_caffemodel,
                                        read_solverstate, write_binaryproto, write_caffemodel)


def _random_layers(rng):
    return [
        ("conv1", "Convolution", [rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                                  rng.standard_normal(4).astype(np.float32)]),
        ("relu1", "ReLU", []),
        ("ip", "InnerProduct", [rng.standard_normal((5, 36)).astype(np.float32)]),
        ("scalar", "Parameter", [np.array(rng.standard_normal(), dtype=np.float32)]),
    ]


def test_round_trip(tmp_path, rng):
    layers = _random_layers(rng)
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, layers, name="net")
    w = read_caffemodel(path)
    assert list(w) == [name for name, _, _ in layers]
    for name, ltype, arrays in layers:
        assert w[name].type == ltype
        assert len(w[name].blobs) == len(arrays)
        for got, want in zip(w[name].blobs, arrays):
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got, want)
        assert w.legacy[name] == [False] * len(arrays)
    net = pb.NetParameter.FromString(path.read_bytes())
    assert net.name == "net" and not net.layers
    assert list(net.layer[0].blobs[0].shape.dim) == [4, 3, 3, 3]


def test_lenet_golden_weights(shared_dir):
    d = shared_dir / "golden" / "lenet"
    manifest = json.loads((d / "manifest.json").read_text())
    w = read_caffemodel(d / "lenet.caffemodel")
    assert manifest["params"]
    for p in manifest["params"]:
        layer = w[p["layer"]]
        assert layer.type == p["type"]
        blob = layer.blobs[p["index"]]
        assert list(blob.shape) == p["shape"]
        assert hashlib.sha256(blob.astype("<f4").tobytes()).hexdigest() == p["sha256"]
    assert sum(b.size for l in w.values() for b in l.blobs) == manifest["num_params"]


def _v1_net(rng):
    """A V1-format net (``layers``, enum types, legacy 4-D blob shapes)."""
    w = rng.standard_normal((10, 20)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    net = pb.NetParameter(name="v1")
    ip = net.layers.add(name="ip", type=pb.V1LayerParameter.INNER_PRODUCT, blobs_lr=[1, 2])
    for arr, shape in ((w, (1, 1, 10, 20)), (b, (1, 1, 1, 10))):
        blob = ip.blobs.add(num=shape[0], channels=shape[1], height=shape[2], width=shape[3])
        blob.data.extend(arr.ravel().tolist())
    net.layers.add(name="prob", type=pb.V1LayerParameter.SOFTMAX)
    return net, w, b


def test_v1_caffemodel_and_legacy_shapes(tmp_path, rng):
    net, w, b = _v1_net(rng)
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(net.SerializeToString())
    wf = read_caffemodel(path)
    assert list(wf) == ["ip", "prob"]
    assert wf["ip"].type == "InnerProduct" and wf["prob"].type == "Softmax"
    assert wf["ip"].blobs[0].shape == (1, 1, 10, 20) and wf.legacy["ip"] == [True, True]
    assert np.array_equal(wf.blob_for("ip", 0, (10, 20)), w)
    assert np.array_equal(wf.blob_for("ip", 1, (10,)), b)
    with pytest.raises(GraphcError) as e:
        wf.blob_for("ip", 0, (20, 10), layer_type="InnerProduct")
    assert "(1, 1, 10, 20)" in str(e.value) and "(20, 10)" in str(e.value)
    with pytest.raises(GraphcError):
        wf.blob_for("ip", 2, (10,))


def _naive_shape_equals(shape, legacy, stored):
    if legacy:
        if len(shape) > 4:
            return False
        padded = [1] * (4 - len(shape)) + list(shape)
        return all(padded[i] == stored[i] for i in range(4))
    return list(shape) == list(stored)


def test_blob_matches_against_naive(rng):
    for _ in range(300):
        legacy = bool(rng.integers(2))
        stored = tuple(int(d) for d in rng.integers(1, 3, size=4 if legacy else rng.integers(0, 5)))
        shape = tuple(int(d) for d in rng.integers(1, 3, size=rng.integers(0, 6)))
        expect = _naive_shape_equals(shape, legacy, stored)
        assert blob_matches(shape, np.zeros(stored), legacy=legacy) == expect
        proto = pb.BlobProto()
        if legacy:
            proto.num, proto.channels, proto.height, proto.width = stored
        else:
            proto.shape.dim.extend(stored)
        assert blob_matches(shape, proto) == expect


def test_double_data_blob(tmp_path, rng):
    vals = rng.standard_normal(6)
    net = pb.NetParameter()
    blob = net.layer.add(name="s", type="Scale").blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.double_data.extend(vals.tolist())
    path = tmp_path / "d.caffemodel"
    path.write_bytes(net.SerializeToString())
    got = read_caffemodel(path)["s"].blobs[0]
    assert got.dtype == np.float32
    assert np.array_equal(got, vals.astype(np.float32).reshape(2, 3))


def test_hdf5_weights(tmp_path, rng):
    h5py = pytest.importorskip("h5py")
    arrays = [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(3)]
    path = tmp_path / "w.caffemodel.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("data").create_group("fc")
        for i, a in enumerate(arrays):
            g.create_dataset(str(i), data=a)
        f["data"].create_group("relu")
    w = read_caffemodel(path)
    assert w.format == "hdf5" and sorted(w) == ["fc", "relu"]
    assert np.array_equal(w["fc"].blobs[0], arrays[0])
    assert np.array_equal(w["fc"].blobs[1], arrays[1].astype(np.float32))
    assert w["relu"].blobs == []

    state = tmp_path / "s.solverstate.h5"
    with h5py.File(state, "w") as f:
        f["iter"] = 10
        f["learned_net"] = "w.caffemodel.h5"
        f.create_group("history")
    with pytest.raises(GraphcError) as e:
        read_caffemodel(state)
    assert "solver state" in str(e.value) and "w.caffemodel.h5" in str(e.value)
    with pytest.raises(GraphcError) as e:
        read_binaryproto(path)
    assert "HDF5" in str(e.value)


# ---------------------------------------------------------------- damaged and wrong files

def test_empty_truncated_corrupt(tmp_path, rng):
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, [("ip", "InnerProduct", [rng.standard_normal((50, 40))])])
    good = path.read_bytes()

    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"")
    with pytest.raises(GraphcError, match="empty"):
        read_caffemodel(bad)

    bad.write_bytes(good[:len(good) // 2])  # cut inside the only layer
    with pytest.raises(GraphcError, match="truncated"):
        read_caffemodel(bad)

    bad.write_bytes(good[:5] + b"\xff" * 12 + good[17:])  # a length field destroyed
    with pytest.raises(GraphcError) as e:
        read_caffemodel(bad)
    assert e.value.where == str(bad) and e.value.hint

    for _ in range(20):  # arbitrary bytes: always a GraphcError, never a traceback
        bad.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 200)), dtype=np.uint8)
                        .tobytes())
        with pytest.raises(GraphcError):
            read_caffemodel(bad)

    with pytest.raises(GraphcError):
        read_caffemodel(tmp_path / "missing.caffemodel")


def test_blob_length_mismatch(tmp_path):
    net = pb.NetParameter()
    blob = net.layer.add(name="conv", type="Convolution").blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([1.0] * 5)
    path = tmp_path / "m.caffemodel"
    path.write_bytes(net.SerializeToString())
    with pytest.raises(GraphcError) as e:
        read_caffemodel(path)
    assert e.value.layer == "conv" and "6 values" in str(e.value) and "holds 5" in str(e.value)


def test_wrong_kinds_of_file(tmp_path, rng):
    text = tmp_path / "net.prototxt"
    text.write_text('name: "x"\nlayer { name: "a" type: "ReLU" }\n')
    with pytest.raises(GraphcError) as e:
        read_caffemodel(text)
    assert ".prototxt" in str(e.value) and ".caffemodel" in e.value.hint

    state = pb.SolverState(iter=100, learned_net="snap_iter_100.caffemodel")
    state.history.add().data.extend([0.0])
    ss = tmp_path / "snap_iter_100.solverstate"
    ss.write_bytes(state.SerializeToString())
    with pytest.raises(GraphcError) as e:
        read_caffemodel(ss)
    assert "solver state" in str(e.value) and "snap_iter_100.caffemodel" in str(e.value)
    assert read_solverstate(ss).iter == 100

    mean = tmp_path / "mean.binaryproto"
    write_binaryproto(mean, rng.standard_normal((1, 3, 4, 4)))
    with pytest.raises(GraphcError) as e:
        read_caffemodel(mean)
    assert "binaryproto" in str(e.value)
    with pytest.raises(GraphcError):
        read_solverstate(mean)

    model = tmp_path / "w.caffemodel"
    write_caffemodel(model, [("ip", "InnerProduct", [np.ones((2, 2))])])
    with pytest.raises(GraphcError) as e:
        read_binaryproto(model)
    assert ".caffemodel" in str(e.value)


def test_golden_solverstate(shared_dir):
    path = shared_dir / "golden" / "train_digits" / "sgd_iter_200.solverstate"
    assert read_solverstate(path).iter == 200
    with pytest.raises(GraphcError, match="solver state"):
        read_caffemodel(path)


# ---------------------------------------------------------------- binaryproto, atomic

def test_binaryproto_round_trip_and_legacy(tmp_path, rng):
    a = rng.standard_normal((3, 5, 7)).astype(np.float32)
    path = tmp_path / "b.binaryproto"
    write_binaryproto(path, a)
    assert np.array_equal(read_binaryproto(path), a)

    legacy = pb.BlobProto(num=1, channels=2, height=3, width=4)
    legacy.data.extend(a.ravel()[:24].tolist())
    path.write_bytes(legacy.SerializeToString())
    got = read_binaryproto(path)
    assert got.shape == (1, 2, 3, 4) and np.array_equal(got.ravel(), a.ravel()[:24])


def test_atomic_write(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~_umask()
    os.chmod(path, 0o640)
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temp files left
    with pytest.raises(GraphcError):
        atomic_write(tmp_path / "no" / "such" / "dir", b"x")


def _umask():
    m = os.umask(0o022)
    os.umask(m)
    return m
