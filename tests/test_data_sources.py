"""The batch sources behind HDF5Data, Data and ImageData, on real HDF5/LMDB/image files
written in tmp_path, against plain-Python expectations of Caffe's reading order."""
import io

import h5py
import lmdb
import numpy as np
import pytest
from PIL import Image

from graphc.data.sources import HDF5Source, ImageListSource, LMDBSource
from graphc.data.transform import Transformer
from graphc.errors import OpError
from graphc.frontend import caffe_pb2


# ---------------------------------------------------------------- helpers

def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)


def write_datums(path, datums):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, d in enumerate(datums):
            txn.put(f"{i:08d}".encode(), d.SerializeToString())
    env.close()


def raw_datum(img, label):
    d = caffe_pb2.Datum(channels=img.shape[0], height=img.shape[1], width=img.shape[2],
                        label=int(label))
    d.data = img.astype(np.uint8).tobytes()
    return d


def png_bytes(hwc):
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format="PNG")
    return buf.getvalue()


def batches(src, n):
    return [src.next_batch() for _ in range(n)]


# ---------------------------------------------------------------- HDF5

@pytest.fixture
def two_h5(tmp_path, rng):
    a = rng.standard_normal((7, 2, 3)).astype(np.float32)
    b = rng.standard_normal((5, 2, 3)).astype(np.float32)
    write_h5(tmp_path / "a.h5", data=a, label=np.arange(7, dtype=np.float64))
    write_h5(tmp_path / "b.h5", data=b, label=np.arange(100, 105, dtype=np.int32))
    (tmp_path / "list.txt").write_text("a.h5\n  b.h5 \n")
    return tmp_path, np.concatenate([a, b]), np.r_[np.arange(7), np.arange(100, 105)]


def test_hdf5_order_crosses_files_and_wraps(two_h5):
    d, data, labels = two_h5
    src = HDF5Source("list.txt", ["data", "label"], 4, source_dir=str(d))
    assert src.shapes == [(4, 2, 3), (4,)]
    rows = [i % 12 for i in range(4 * 7)]             # file a, then b, then a again ...
    for k, (x, y) in enumerate(batches(src, 7)):
        want = rows[4 * k:4 * k + 4]
        assert x.dtype == np.float32 and y.dtype == np.float32
        assert np.array_equal(x, data[want]) and np.array_equal(y, labels[want])


def test_hdf5_shuffle_is_per_file_permutation_and_seeded(two_h5):
    d, data, labels = two_h5
    src = HDF5Source("list.txt", ["data", "label"], 6, shuffle=True,
                     rng=np.random.default_rng(5), source_dir=str(d))
    seq = np.concatenate([y for _, y in batches(src, 6)])      # 3 passes over 12 rows
    for p in range(3):
        epoch = seq[12 * p:12 * p + 12]
        assert sorted(epoch) == sorted(labels)                # every row once per pass
        first = epoch[:7] if epoch[0] < 100 else epoch[:5]    # a file's rows stay together
        assert len({v < 100 for v in first}) == 1
    again = HDF5Source("list.txt", ["data", "label"], 6, shuffle=True,
                       rng=np.random.default_rng(5), source_dir=str(d))
    assert np.array_equal(np.concatenate([y for _, y in batches(again, 6)]), seq)
    assert not np.array_equal(seq[:12], labels)


def test_hdf5_errors(tmp_path, rng):
    with pytest.raises(OpError, match="does not exist") as e:
        HDF5Source("missing.txt", ["data"], 2, source_dir=str(tmp_path))
    assert str(tmp_path / "missing.txt") in str(e.value)
    write_h5(tmp_path / "x.h5", data=np.zeros((3, 2)), other=np.zeros(3))
    (tmp_path / "l.txt").write_text(f"{tmp_path / 'x.h5'}\n")
    with pytest.raises(OpError, match="no dataset named 'label'.*data, other"):
        HDF5Source(str(tmp_path / "l.txt"), ["data", "label"], 2)
    write_h5(tmp_path / "y.h5", data=np.zeros((3, 2)), label=np.zeros(4))
    (tmp_path / "l2.txt").write_text(f"{tmp_path / 'y.h5'}\n")
    with pytest.raises(OpError, match="different numbers of rows"):
        HDF5Source(str(tmp_path / "l2.txt"), ["data", "label"], 2)
    (tmp_path / "l3.txt").write_text("gone.h5\n")
    with pytest.raises(OpError, match="'gone.h5' listed in"):
        HDF5Source(str(tmp_path / "l3.txt"), ["data"], 2)


# ---------------------------------------------------------------- LMDB

def test_lmdb_raw_records_wrap_around(tmp_path, rng):
    imgs = rng.integers(0, 256, (5, 3, 4, 6)).astype(np.uint8)
    labels = rng.integers(0, 10, 5)
    write_datums(tmp_path / "db", [raw_datum(im, l) for im, l in zip(imgs, labels)])
    t = Transformer({"scale": 0.5, "mean_value": [1.0, 2.0, 3.0]})
    src = LMDBSource(str(tmp_path / "db"), 3, t)
    assert src.shapes == [(3, 3, 4, 6), (3,)]
    mv = np.array([1.0, 2.0, 3.0])[:, None, None]
    for k, (x, y) in enumerate(batches(src, 4)):
        idx = [(3 * k + i) % 5 for i in range(3)]
        ref = (imgs[idx].astype(np.float64) - mv) * 0.5
        assert np.linalg.norm(x - ref) / np.linalg.norm(ref) < 1e-6
        assert np.array_equal(y, labels[idx].astype(np.float32))
    src.close()


def test_lmdb_float_data_and_no_label_top(tmp_path, rng):
    vals = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    datums = []
    for v in vals:
        d = caffe_pb2.Datum(channels=2, height=2, width=2, label=1)
        d.float_data.extend(v.ravel().tolist())
        datums.append(d)
    write_datums(tmp_path / "fdb", datums)
    src = LMDBSource(str(tmp_path / "fdb"), 2, Transformer(), labels=False)
    out = src.next_batch()
    assert len(out) == 1 and np.array_equal(out[0], vals[:2])


def test_lmdb_encoded_png_color_and_gray(tmp_path, rng):
    rgb = rng.integers(0, 256, (2, 5, 4, 3)).astype(np.uint8)      # N x H x W x RGB
    datums = [caffe_pb2.Datum(data=png_bytes(im), encoded=True, label=i)
              for i, im in enumerate(rgb)]
    write_datums(tmp_path / "enc", datums)
    x, y = LMDBSource(str(tmp_path / "enc"), 2, Transformer()).next_batch()
    bgr_chw = rgb[..., ::-1].transpose(0, 3, 1, 2)                 # Caffe/OpenCV layout
    assert np.array_equal(x, bgr_chw.astype(np.float32)) and list(y) == [0, 1]

    gray = rng.integers(0, 256, (2, 3, 3)).astype(np.uint8)
    write_datums(tmp_path / "genc", [caffe_pb2.Datum(data=png_bytes(g), encoded=True)
                                     for g in gray])
    x, _ = LMDBSource(str(tmp_path / "genc"), 2, Transformer()).next_batch()
    assert np.array_equal(x, gray[:, None].astype(np.float32))
    x, _ = LMDBSource(str(tmp_path / "genc"), 2, Transformer({"force_color": True})).next_batch()
    assert x.shape == (2, 3, 3, 3) and all(np.array_equal(x[:, c], gray) for c in range(3))


def test_lmdb_errors(tmp_path, rng):
    with pytest.raises(OpError, match="does not exist") as e:
        LMDBSource("nodb", 1, Transformer(), source_dir=str(tmp_path))
    assert str(tmp_path / "nodb") in str(e.value)
    write_datums(tmp_path / "empty", [])
    with pytest.raises(OpError, match="empty"):
        LMDBSource(str(tmp_path / "empty"), 1, Transformer())
    imgs = [rng.integers(0, 256, (1, 4, 4)), rng.integers(0, 256, (1, 5, 4))]
    write_datums(tmp_path / "mixed", [raw_datum(im, 0) for im in imgs])
    src = LMDBSource(str(tmp_path / "mixed"), 2, Transformer())
    with pytest.raises(OpError, match="first record"):
        src.next_batch()
    bad = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc")
    write_datums(tmp_path / "bad", [bad])
    with pytest.raises(OpError, match="3 bytes"):
        LMDBSource(str(tmp_path / "bad"), 1, Transformer())


# ---------------------------------------------------------------- image lists

@pytest.fixture
def image_list(tmp_path, rng):
    (tmp_path / "im").mkdir()
    imgs, lines = [], []
    for i in range(5):
        a = rng.integers(0, 256, (4, 6, 3)).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / "im" / f"pic {i}.png")
        imgs.append(a[..., ::-1].transpose(2, 0, 1))
        lines.append(f"pic {i}.png {10 + i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path, np.stack(imgs)


def test_image_list_order_labels_and_wrap(image_list):
    d, imgs = image_list
    src = ImageListSource(str(d / "list.txt"), 2, Transformer(), root_folder=str(d / "im") + "/")
    assert src.shapes == [(2, 3, 4, 6), (2,)]
    for k, (x, y) in enumerate(batches(src, 4)):
        idx = [(2 * k + i) % 5 for i in range(2)]
        assert np.array_equal(x, imgs[idx].astype(np.float32))
        assert list(y) == [10 + i for i in idx]


def test_image_list_resize_gray_shuffle(image_list):
    d, imgs = image_list
    src = ImageListSource(str(d / "list.txt"), 5, Transformer(), root_folder=str(d / "im") + "/",
                          new_height=3, new_width=8, is_color=False, shuffle=True,
                          rng=np.random.default_rng(1))
    assert src.shapes == [(5, 1, 3, 8), (5,)]
    epochs = [sorted(src.next_batch()[1]) for _ in range(3)]
    assert all(e == [10, 11, 12, 13, 14] for e in epochs)


def test_image_list_errors(tmp_path):
    (tmp_path / "l.txt").write_text("no_label_here\n")
    with pytest.raises(OpError, match="expected 'image_path label'"):
        ImageListSource(str(tmp_path / "l.txt"), 1, Transformer())
    (tmp_path / "l2.txt").write_text("missing.png 3\n")
    with pytest.raises(OpError, match="'missing.png'.*does not exist"):
        ImageListSource(str(tmp_path / "l2.txt"), 1, Transformer())
    with pytest.raises(OpError, match="together"):
        ImageListSource(str(tmp_path / "l2.txt"), 1, Transformer(), new_height=3)


def test_two_readers_share_one_lmdb(tmp_path, rng):
    """LMDB allows one environment per database and process (a TRAIN net and a
    test-on-train net read the same set): readers share it, the last one closes it."""
    imgs = rng.integers(0, 256, (3, 1, 2, 2)).astype(np.uint8)
    write_datums(tmp_path / "db", [raw_datum(im, i) for i, im in enumerate(imgs)])
    a = LMDBSource(str(tmp_path / "db"), 2, Transformer())
    b = LMDBSource(str(tmp_path / "db"), 3, Transformer())
    assert list(a.next_batch()[1]) == [0, 1] and list(b.next_batch()[1]) == [0, 1, 2]
    a.close()
    assert list(b.next_batch()[1]) == [0, 1, 2]
    b.close()
    c = LMDBSource(str(tmp_path / "db"), 1, Transformer())      # reopened after release
    assert list(c.next_batch()[1]) == [0]
    c.close()
