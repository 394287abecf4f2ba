"""``graphc convert-data``: image lists, MNIST idx files and the scikit-learn digits, to
LMDB and HDF5, read back with the data layers' own readers."""
import gzip
import os
import sys

import h5py
import lmdb
import numpy as np
import pytest
from PIL import Image

from graphc.cli import main
from graphc.data.sources import HDF5Source, LMDBSource
from graphc.data.transform import Transformer
from graphc.frontend import caffe_pb2


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_all(db):
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        items = [(k.decode(), caffe_pb2.Datum.FromString(v)) for k, v in txn.cursor()]
    env.close()
    return items


@pytest.fixture
def image_list(tmp_path, rng):
    root = tmp_path / "imgs"
    root.mkdir()
    rgb = rng.integers(0, 256, (4, 6, 5, 3)).astype(np.uint8)
    for i, a in enumerate(rgb):
        Image.fromarray(a).save(root / f"p{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"p{i}.png {7 * i}\n" for i in range(4)))
    return tmp_path, rgb[..., ::-1].transpose(0, 3, 1, 2)        # BGR, CHW


def test_imagelist_to_lmdb_raw(capsys, image_list):
    d, bgr = image_list
    code, out, err = run(capsys, "convert-data", "--from", "imagelist", d / "list.txt",
                         "--root", d / "imgs", "--out", d / "db")
    assert code == 0, err
    assert "wrote 4 records (3 x 6 x 5)" in out
    items = read_all(d / "db")
    assert [k for k, _ in items] == [f"{i:08d}_p{i}.png" for i in range(4)]
    for i, (_, datum) in enumerate(items):
        assert (datum.channels, datum.height, datum.width, datum.label) == (3, 6, 5, 7 * i)
        assert datum.data == bgr[i].tobytes() and not datum.encoded
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]       # no temp left
    # existing output: refused
    code, _, err = run(capsys, "convert-data", "--from", "imagelist", d / "list.txt",
                       "--root", d / "imgs", "--out", d / "db")
    assert code == 1 and "already exists" in err


def test_imagelist_to_lmdb_encoded_resized_gray_shuffled(capsys, image_list):
    d, bgr = image_list
    code, _, err = run(capsys, "convert-data", "--from", "imagelist", d / "list.txt",
                       "--root", d / "imgs", "--out", d / "enc", "--encoded")
    assert code == 0, err
    items = read_all(d / "enc")
    # unchanged PNGs are stored as the original file bytes (Caffe's ReadFileToDatum)
    assert all(dt.encoded and dt.data == (d / "imgs" / f"p{i}.png").read_bytes()
               for i, (_, dt) in enumerate(items))
    x, y = LMDBSource(str(d / "enc"), 4, Transformer()).next_batch()
    np.testing.assert_array_equal(x, bgr.astype(np.float32))

    code, _, err = run(capsys, "convert-data", "--from", "imagelist", d / "list.txt",
                       "--root", d / "imgs", "--out", d / "small", "--encoded", "--gray",
                       "--resize", 3, 4, "--shuffle", "--seed", 2)
    assert code == 0, err
    x, y = LMDBSource(str(d / "small"), 4, Transformer()).next_batch()
    assert x.shape == (4, 1, 3, 4)
    assert sorted(y) == [0, 7, 14, 21] and list(y) != [0, 7, 14, 21]


def test_imagelist_to_hdf5_with_list_file(capsys, image_list):
    d, bgr = image_list
    code, out, err = run(capsys, "convert-data", "--from", "imagelist", d / "list.txt",
                         "--root", d / "imgs", "--out", d / "set.h5", "--backend", "hdf5",
                         "--scale", 0.5)
    assert code == 0, err
    assert (d / "set.txt").read_text() == "set.h5\n"
    with h5py.File(d / "set.h5", "r") as f:
        assert f["data"].dtype == np.float32 and f["label"].shape == (4,)
        np.testing.assert_array_equal(f["data"][...], bgr * np.float32(0.5))
    x, y = HDF5Source(str(d / "set.txt"), ["data", "label"], 4).next_batch()
    assert list(y) == [0, 7, 14, 21]


def write_idx(path, arr, magic, gz=False):
    head = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in arr.shape)
    (gzip.open if gz else open)(path, "wb").write(head + arr.astype(np.uint8).tobytes())


def test_mnist_idx(capsys, tmp_path, rng):
    x = rng.integers(0, 256, (5, 4, 3))
    y = rng.integers(0, 10, 5)
    write_idx(tmp_path / "img-idx3-ubyte.gz", x, 2051, gz=True)
    write_idx(tmp_path / "lab-idx1-ubyte", y, 2049)
    code, out, err = run(capsys, "convert-data", "--from", "mnist", tmp_path / "img-idx3-ubyte.gz",
                         tmp_path / "lab-idx1-ubyte", "--out", tmp_path / "mnist_lmdb")
    assert code == 0, err
    items = read_all(tmp_path / "mnist_lmdb")
    assert [k for k, _ in items] == [f"{i:08d}" for i in range(5)]
    for i, (_, dt) in enumerate(items):
        assert (dt.channels, dt.height, dt.width, dt.label) == (1, 4, 3, y[i])
        assert dt.data == x[i].astype(np.uint8).tobytes()
    # files swapped: a clear error
    code, _, err = run(capsys, "convert-data", "--from", "mnist", tmp_path / "lab-idx1-ubyte",
                       tmp_path / "img-idx3-ubyte.gz", "--out", tmp_path / "m2")
    assert code == 1 and "magic number" in err and not (tmp_path / "m2").exists()


def test_digits_matches_golden(capsys, tmp_path, shared_dir):
    pytest.importorskip("sklearn")
    code, _, err = run(capsys, "convert-data", "--from", "digits", "--backend", "hdf5",
                       "--range", "0:1500", "--out", tmp_path / "digits_train.h5")
    assert code == 0, err
    gold = shared_dir / "golden" / "train_digits" / "digits_train.h5"
    with h5py.File(tmp_path / "digits_train.h5", "r") as a, h5py.File(gold, "r") as b:
        for k in ("data", "label"):
            assert a[k].dtype == b[k].dtype == np.float32
            np.testing.assert_array_equal(a[k][...], b[k][...])


def test_digits_without_sklearn(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    code, _, err = run(capsys, "convert-data", "--from", "digits", "--out", tmp_path / "d")
    assert code == 1 and "scikit-learn" in err and "pip install scikit-learn" in err


@pytest.mark.parametrize("args, match", [
    (["--from", "mnist", "only_one"], "takes 2 input file"),
    (["--from", "digits", "--encoded", "--backend", "hdf5"], "LMDB only"),
    (["--from", "digits", "--scale", "2"], "HDF5 only"),
    (["--from", "imagelist", "missing_list.txt"], "does not exist"),
])
def test_usage_errors(capsys, tmp_path, args, match):
    code, _, err = run(capsys, "convert-data", *args, "--out", tmp_path / "o")
    assert code == 1 and match in err
