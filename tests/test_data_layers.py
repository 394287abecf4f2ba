"""The data-layer ops (HDF5Data, Data, ImageData, MemoryData) through prototxt, the
lowering and graphc.Net, on real files."""
import os
import shutil

import h5py
import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

import graphc
from graphc.data import set_input_arrays
from graphc.errors import GraphcError, OpError
from graphc.frontend import caffe_pb2
from graphc.frontend.lower import lower
from graphc.frontend.prototxt import read_net
from graphc.ir import parse_graph, print_graph
from graphc.ops import get_op


def layer(text):
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def write_lmdb(path, imgs, labels):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (im, lab) in enumerate(zip(imgs, labels)):
            d = caffe_pb2.Datum(channels=im.shape[0], height=im.shape[1], width=im.shape[2],
                                label=int(lab), data=im.astype(np.uint8).tobytes())
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()


DATA_NET = """
name: "reader"
layer {{
  name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ {transform} }}
  data_param {{ source: "{source}" batch_size: {batch} backend: {backend} }}
}}
"""


# ---------------------------------------------------------------- attributes

def test_from_caffe_attrs():
    a = get_op("Data").from_caffe(layer("""
        type: "Data" top: "data" top: "label"
        transform_param { mirror: true crop_size: 227 mean_value: 104 mean_value: 117 }
        data_param { source: "x_lmdb" batch_size: 256 backend: LMDB }"""), "train")
    assert a == {"source": "x_lmdb", "batch_size": 256, "backend": "LMDB", "prefetch": 4,
                 "train": True, "labels": True, "source_dir": None,
                 "transform": {"scale": 1.0, "mirror": True, "crop_size": 227,
                               "mean_file": None, "mean_value": [104.0, 117.0],
                               "force_color": False, "force_gray": False}}
    h = get_op("HDF5Data").from_caffe(layer("""
        type: "HDF5Data" top: "data" top: "label"
        hdf5_data_param { source: "l.txt" batch_size: 50 shuffle: true }"""), "test")
    assert h == {"source": "l.txt", "batch_size": 50, "shuffle": True,
                 "tops": ["data", "label"], "source_dir": None}
    i = get_op("ImageData").from_caffe(layer("""
        type: "ImageData" top: "data" top: "label"
        image_data_param { source: "l.txt" new_height: 4 new_width: 5 is_color: false }"""),
        "test")
    assert (i["batch_size"], i["new_height"], i["new_width"], i["is_color"], i["train"]) == \
        (1, 4, 5, False, False)


@pytest.mark.parametrize("text, match", [
    ('type: "Data" top: "d" data_param { source: "s" }', "batch_size is 0"),
    ('type: "Data" top: "d" data_param { source: "s" batch_size: 2 scale: 0.5 }',
     "move scale into transform_param"),
    ('type: "Data" top: "d" transform_param { mean_file: "m" mean_value: 1 } '
     'data_param { source: "s" batch_size: 2 }', "both mean_file and mean_value"),
    ('type: "ImageData" top: "d" top: "l" image_data_param { source: "s" new_height: 3 }',
     "only one of new_height"),
    ('type: "MemoryData" top: "d" top: "l" memory_data_param { batch_size: 2 channels: 1 }',
     "all > 0"),
])
def test_from_caffe_errors(text, match):
    lp = layer(text)
    with pytest.raises(OpError, match=match):
        get_op(lp.type).from_caffe(lp, "train")


# ---------------------------------------------------------------- the golden digits net

def test_digits_hdf5_batches_and_wrap(shared_dir, tmp_path, monkeypatch):
    d = shared_dir / "golden" / "train_digits"
    with h5py.File(d / "digits_train.h5", "r") as f:
        X, y = f["data"][...], f["label"][...]
    monkeypatch.chdir(tmp_path)             # the relative list file resolves via source_dir
    net = graphc.Net(str(d / "digits_train_test.prototxt"), phase="train", seed=0)
    assert net.graph.nodes[0].attrs["source_dir"] == str(d)
    for call in range(31):
        net.forward()
        rows = slice((call % 30) * 50, (call % 30) * 50 + 50)
        if call in (0, 1, 29, 30):
            np.testing.assert_array_equal(net.blobs["data"], X[rows])
            np.testing.assert_array_equal(net.blobs["label"], y[rows])
    assert call == 30 and np.array_equal(net.blobs["data"], X[:50])   # the 31st wrapped
    monkeypatch.chdir(d)                    # as Caffe was run: cwd = train_digits/
    test = graphc.Net("digits_train_test.prototxt", phase="test")
    test.forward()
    with h5py.File(d / "digits_test.h5", "r") as f:
        np.testing.assert_array_equal(test.blobs["data"], f["data"][:99])


# ---------------------------------------------------------------- Data (LMDB) in a net

def test_data_layer_in_net_center_crop_scale(tmp_path, rng, monkeypatch):
    imgs = rng.integers(0, 256, (6, 3, 5, 7)).astype(np.uint8)
    labels = rng.integers(0, 100, 6)
    write_lmdb(tmp_path / "train_lmdb", imgs, labels)
    proto = tmp_path / "net.prototxt"
    proto.write_text(DATA_NET.format(transform="crop_size: 3 scale: 0.25 mean_value: 3",
                                     source="train_lmdb", batch=4, backend="LMDB"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    net = graphc.Net(str(proto), phase="test", seed=3)
    assert net.graph.types[net.graph.nodes[0].outputs[0]].shape == (4, 3, 3, 3)
    for k in range(3):
        net.forward()
        idx = [(4 * k + i) % 6 for i in range(4)]
        ref = (imgs[idx][:, :, 1:4, 2:5].astype(np.float64) - 3) * 0.25
        assert np.linalg.norm(net.blobs["data"] - ref) / np.linalg.norm(ref) < 1e-6
        np.testing.assert_array_equal(net.blobs["label"], labels[idx])
    # the IR text (with the data layer's attributes) round-trips
    g = lower(read_net(str(proto)), "test")
    assert print_graph(parse_graph(print_graph(g))) == print_graph(g)


def test_random_transforms_are_seeded(tmp_path, rng):
    imgs = rng.integers(0, 256, (4, 1, 6, 6)).astype(np.uint8)
    write_lmdb(tmp_path / "db", imgs, range(4))
    proto = tmp_path / "net.prototxt"
    proto.write_text(DATA_NET.format(transform="crop_size: 3 mirror: true", source="db",
                                     batch=4, backend="LMDB"))

    def run(seed):
        net = graphc.Net(str(proto), phase="train", seed=seed)
        return np.concatenate([net.forward()["data"].copy() for _ in range(3)])
    a, b, c = run(7), run(7), run(8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_missing_source_error_names_paths(tmp_path, monkeypatch):
    proto = tmp_path / "net.prototxt"
    proto.write_text(DATA_NET.format(transform="", source="no_such_lmdb", batch=2,
                                     backend="LMDB"))
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(GraphcError) as e:
        graphc.Net(str(proto))
    msg = str(e.value)
    assert f"{proto}:3" in msg and "layer 'data' (Data)" in msg
    assert str(tmp_path.parent / "no_such_lmdb") in msg and str(tmp_path / "no_such_lmdb") in msg
    assert "hint:" in msg


def test_leveldb_backend_is_refused_with_hint(tmp_path, rng):
    write_lmdb(tmp_path / "db", rng.integers(0, 256, (1, 1, 2, 2)), [0])
    proto = tmp_path / "net.prototxt"
    proto.write_text(DATA_NET.format(transform="", source="db", batch=1, backend="LEVELDB"))
    with pytest.raises(GraphcError, match="LMDB only") as e:
        graphc.Net(str(proto))
    assert "add backend: LMDB" in str(e.value)


def test_fed_data_layer_needs_no_source(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(DATA_NET.format(transform="", source="absent", batch=2, backend="LMDB"))
    g = lower(read_net(str(proto)), "train", input_shapes={"data": (2, 1, 3, 3), "label": (2,)})
    assert not g.nodes and len(g.inputs) == 2


# ---------------------------------------------------------------- ImageData in a net

def test_image_data_layer(tmp_path, rng):
    from PIL import Image
    rows = []
    for i in range(3):
        a = rng.integers(0, 256, (4, 4)).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / f"g{i}.png")
        rows.append(a)
    (tmp_path / "list.txt").write_text("".join(f"g{i}.png {i}\n" for i in range(3)))
    proto = tmp_path / "net.prototxt"
    proto.write_text("""layer { name: "d" type: "ImageData" top: "data" top: "label"
        image_data_param { source: "list.txt" batch_size: 2 is_color: false } }""")
    net = graphc.Net(str(proto))
    out = net.forward()
    np.testing.assert_array_equal(out["data"], np.stack(rows[:2])[:, None])
    np.testing.assert_array_equal(net.forward()["label"], [2, 0])


# ---------------------------------------------------------------- MemoryData

MEM_NET = """layer { name: "mem" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }"""


def test_memory_data(tmp_path, rng):
    proto = tmp_path / "mem.prototxt"
    proto.write_text(MEM_NET)
    net = graphc.Net(str(proto))
    with pytest.raises(GraphcError, match="set_input_arrays"):
        net.forward()
    x = rng.standard_normal((4, 1, 2, 3)).astype(np.float32)
    y = np.arange(4, dtype=np.float32)
    set_input_arrays(net, x, y)
    for k in range(3):
        out = net.forward()
        rows = slice(2 * (k % 2), 2 * (k % 2) + 2)
        np.testing.assert_array_equal(out["data"], x[rows])
        np.testing.assert_array_equal(out["label"], y[rows])
    with pytest.raises(GraphcError, match="multiple of batch_size"):
        set_input_arrays(net, x[:3], y[:3])
    with pytest.raises(GraphcError, match="N x 1 x 2 x 3"):
        set_input_arrays(net, x.reshape(4, 1, 3, 2), y)
    with pytest.raises(GraphcError, match="no MemoryData layer named 'x'"):
        set_input_arrays(net, x, y, layer="x")
