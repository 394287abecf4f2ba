"""Batch sources: the readers behind Caffe's data layers.

Each source has ``shapes`` (the shape of every top, batch first) and ``next_batch()``
(a list of fresh float32 arrays, one per top), and reads in exactly Caffe's order:

* ``HDF5Source`` (HDF5Data): a list file of .h5 paths; each file holds one dataset per
  top, named after the top, with the rows first.  Files are loaded one at a time and the
  rows are served in order, moving to the next file after the last row and back to the
  first file after the last file.  With ``shuffle`` the file order is permuted at the
  start and at every pass over the files, and the rows of a file every time it is (re)read
  or restarted, as Caffe's HDF5DataLayer does (with our own seeded generator).
* ``LMDBSource`` (Data): Datum records in key order, wrapping around at the end.
* ``ImageListSource`` (ImageData): lines ``path label`` (the label after the last space),
  optionally shuffled at the start and at every pass, ``rand_skip`` skipping a random
  number of lines at the start.

Records are transformed with a ``Transformer``; every record of a batch must have the
first record's shape (graphc's shapes are static; Caffe would reshape per batch).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import OpError
from .images import decode_image, read_image
from .transform import Transformer, resolve_path


def _label_array(n: int) -> np.ndarray:
    return np.empty((n,), np.float32)


# ---------------------------------------------------------------- HDF5

def read_hdf5_list(source: str, source_dir: str | None = None) -> list[str]:
    """The .h5 paths named in an HDF5Data source list (whitespace-separated, as Caffe reads
    it), each resolved against the working directory, the prototxt's directory, then the
    list file's own directory."""
    path = resolve_path(source, source_dir, "hdf5_data_param source",
                        "the source is a text file listing .h5 files, one per line; fix the "
                        "path, or run from the directory it is relative to")
    with open(path, encoding="utf-8", errors="replace") as f:
        names = f.read().split()
    if not names:
        raise OpError(f"the HDF5 list file '{path}' names no files",
                      hint="list one .h5 path per line")
    list_dir = os.path.dirname(os.path.abspath(path))
    out = []
    for name in names:
        tried = [name] if os.path.isabs(name) else \
            [name] + [os.path.join(d, name) for d in (source_dir, list_dir) if d]
        found = next((p for p in tried if os.path.exists(p)), None)
        if found is None:
            raise OpError(f"'{name}' listed in '{path}' does not exist (tried "
                          + ", ".join(f"'{os.path.abspath(p)}'" for p in tried) + ")",
                          hint="fix the list file, or create the .h5 file "
                               "(graphc convert-data --backend hdf5)")
        out.append(found)
    return out


def _h5py():
    import h5py
    return h5py


def hdf5_shapes(path: str, tops: list[str]) -> list[tuple[int, ...]]:
    """(rows, *item shape) of the dataset named after each top in one .h5 file."""
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise OpError(f"cannot open '{path}' as HDF5: {e}",
                      hint="the list file must name HDF5 (.h5) files") from None
    with f:
        shapes = []
        for top in tops:
            ds = f.get(top)
            if not isinstance(ds, h5py.Dataset):
                have = ", ".join(k for k in f.keys()) or "none"
                raise OpError(f"'{path}' has no dataset named '{top}' (it has: {have})",
                              hint="HDF5Data reads one dataset per top, named after the top; "
                                   "rename the top or the dataset")
            if ds.ndim < 1 or ds.shape[0] == 0:
                raise OpError(f"dataset '{top}' in '{path}' has shape {list(ds.shape)}; "
                              "it needs at least one row", hint="write the rows first")
            shapes.append(tuple(int(d) for d in ds.shape))
    rows = {s[0] for s in shapes}
    if len(rows) > 1:
        raise OpError(f"the datasets in '{path}' have different numbers of rows: "
                      + ", ".join(f"{t} {s[0]}" for t, s in zip(tops, shapes)),
                      hint="every dataset of a file needs one row per example")
    return shapes


class HDF5Source:
    def __init__(self, source: str, tops: list[str], batch_size: int, shuffle: bool = False,
                 rng: np.random.Generator | None = None, source_dir: str | None = None):
        self.files = read_hdf5_list(source, source_dir)
        self.tops = list(tops)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.file_order = np.arange(len(self.files))
        if self.shuffle:
            self.rng.shuffle(self.file_order)
        self.current_file = 0
        first = hdf5_shapes(self.files[self.file_order[0]], self.tops)
        self.item_shapes = [s[1:] for s in first]
        self.shapes = [(self.batch_size,) + s for s in self.item_shapes]
        self._load(self.file_order[0])

    def _load(self, index: int) -> None:
        path = self.files[index]
        shapes = hdf5_shapes(path, self.tops)
        for top, s, want in zip(self.tops, shapes, self.item_shapes):
            if s[1:] != want:
                raise OpError(f"dataset '{top}' in '{path}' has rows of shape {list(s[1:])}, "
                              f"but the first file's rows are {list(want)}",
                              hint="every file of an HDF5Data list needs the same row shapes")
        with _h5py().File(path, "r") as f:
            self.data = [np.asarray(f[top][...], dtype=np.float32) for top in self.tops]
        self.rows = shapes[0][0]
        self.row_order = np.arange(self.rows)
        if self.shuffle:
            self.rng.shuffle(self.row_order)
        self.current_row = 0

    def _next_file(self) -> None:
        """Caffe's HDF5DataLayer::Next() after the last row of a file."""
        if len(self.files) > 1:
            self.current_file += 1
            if self.current_file == len(self.files):
                self.current_file = 0
                if self.shuffle:
                    self.rng.shuffle(self.file_order)
            self._load(self.file_order[self.current_file])
        self.current_row = 0
        if self.shuffle:
            self.rng.shuffle(self.row_order)

    def next_batch(self) -> list[np.ndarray]:
        out = [np.empty(s, np.float32) for s in self.shapes]
        filled = 0
        while filled < self.batch_size:
            take = min(self.batch_size - filled, self.rows - self.current_row)
            rows = self.row_order[self.current_row:self.current_row + take]
            for o, d in zip(out, self.data):
                o[filled:filled + take] = d[rows]
            filled += take
            self.current_row += take
            if self.current_row == self.rows:
                self._next_file()
        return out

    def close(self) -> None:
        self.data = []


# ---------------------------------------------------------------- LMDB (Datum records)

def datum_to_array(datum, color: bool | None = None, what: str = "a record") -> np.ndarray:
    """A caffe Datum -> C x H x W array: uint8 for ``data`` bytes and encoded images,
    float32 for ``float_data``."""
    if datum.encoded:
        return decode_image(datum.data, color, what)
    c, h, w = datum.channels, datum.height, datum.width
    n = c * h * w
    if datum.data:
        if len(datum.data) != n:
            raise OpError(f"{what} holds {len(datum.data)} bytes for channels x height x "
                          f"width = {c} x {h} x {w}",
                          hint="the data set is damaged or was written wrongly; rebuild it")
        return np.frombuffer(datum.data, np.uint8).reshape(c, h, w)
    if len(datum.float_data) != n or n == 0:
        raise OpError(f"{what} holds {len(datum.float_data)} float values for channels x "
                      f"height x width = {c} x {h} x {w}",
                      hint="the data set is damaged or was written wrongly; rebuild it")
    return np.asarray(datum.float_data, np.float32).reshape(c, h, w)


def _parse_datum(value: bytes, what: str):
    from google.protobuf.message import DecodeError
    from ..frontend import caffe_pb2
    d = caffe_pb2.Datum()
    try:
        d.ParseFromString(value)
    except DecodeError as e:
        raise OpError(f"{what} is not a Datum ({e})",
                      hint="a Data layer reads LMDB sets of caffe.Datum records (made by "
                           "convert_imageset or graphc convert-data)") from None
    return d


_ENVS: dict[tuple, list] = {}          # (dev, inode) -> [Environment, users]
_ENVS_LOCK = threading.Lock()


def open_lmdb(source: str, source_dir: str | None = None):
    """(Environment, resolved path) of a read-only LMDB.  LMDB allows one Environment per
    database and process, so environments are shared and reference counted; give each
    back with ``release_lmdb``."""
    import lmdb
    path = resolve_path(source, source_dir, "data_param source",
                        "the source is an LMDB directory (made by convert_imageset or graphc "
                        "convert-data); fix the path, or run from the directory it is "
                        "relative to")
    subdir = os.path.isdir(path)
    probe = os.path.join(path, "data.mdb") if subdir else path
    st = os.stat(probe if os.path.exists(probe) else path)
    key = (st.st_dev, st.st_ino)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            try:
                env = lmdb.open(path, readonly=True, lock=False, readahead=False,
                                subdir=subdir)
            except lmdb.Error as e:
                raise OpError(f"cannot open '{path}' as an LMDB database: {e}",
                              hint="the source must be an LMDB directory (holding data.mdb)") \
                    from None
            entry = _ENVS[key] = [env, 0]
        entry[1] += 1
    return entry[0], path


def release_lmdb(env) -> None:
    with _ENVS_LOCK:
        for key, entry in list(_ENVS.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] == 0:
                    del _ENVS[key]
                    env.close()
                return


class LMDBSource:
    def __init__(self, source: str, batch_size: int, transformer: Transformer,
                 labels: bool = True, rng: np.random.Generator | None = None,
                 source_dir: str | None = None):
        self.env, self.path = open_lmdb(source, source_dir)
        self.batch_size = int(batch_size)
        self.transformer = transformer
        self.labels = labels
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._key: bytes | None = None            # next record's key; None = the first
        try:
            with self.env.begin() as txn:
                first = txn.cursor()
                if not first.first():
                    raise OpError(f"the LMDB database '{self.path}' is empty",
                                  hint="fill it with graphc convert-data or convert_imageset")
                self.item_shape = self._image(first.key(), first.value())[0].shape
            self.out_item_shape = transformer.out_shape(*self.item_shape)
        except BaseException:
            self.close()
            raise
        self.shapes = [(self.batch_size,) + self.out_item_shape]
        if labels:
            self.shapes.append((self.batch_size,))

    def _image(self, key: bytes, value: bytes):
        what = f"record {key.decode('utf-8', 'replace')!r} of '{self.path}'"
        d = _parse_datum(value, what)
        img = datum_to_array(d, self.transformer.decode_color, what)
        if img.ndim != 3:
            raise OpError(f"{what} is not a C x H x W image", hint="rebuild the data set")
        return img, d.label, what

    def next_batch(self) -> list[np.ndarray]:
        data = np.empty(self.shapes[0], np.float32)
        labels = _label_array(self.batch_size)
        with self.env.begin() as txn:
            cur = txn.cursor()
            ok = cur.set_key(self._key) if self._key is not None else cur.first()
            if not ok:
                ok = cur.first()
            for i in range(self.batch_size):
                img, label, what = self._image(cur.key(), cur.value())
                if img.shape != self.item_shape:
                    raise OpError(f"{what} is {list(img.shape)} but the first record is "
                                  f"{list(self.item_shape)}",
                                  hint="graphc needs records of one size: rebuild the set "
                                       "with convert-data --resize H W, or use crop_size")
                data[i] = self.transformer(img, self.rng)
                labels[i] = label
                if not cur.next():           # Caffe: restart from the first record
                    cur.first()
            self._key = cur.key()
        return [data, labels] if self.labels else [data]

    def close(self) -> None:
        if self.env is not None:
            release_lmdb(self.env)
            self.env = None


# ---------------------------------------------------------------- image lists

def read_image_list(source: str,
                    source_dir: str | None = None) -> tuple[str, list[tuple[str, int]]]:
    """(resolved path, [(image path, label)]) of an ImageData list: each line is a path and
    an integer label, the label after the last space (so paths may contain spaces)."""
    path = resolve_path(source, source_dir, "image_data_param source",
                        "the source is a text file of 'image_path label' lines; fix the path, "
                        "or run from the directory it is relative to")
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            name, sep, label = line.rpartition(" ")
            try:
                value = int(label)
            except ValueError:
                value = None
            if not sep or not name or value is None:
                raise OpError(f"{path}:{n}: expected 'image_path label', got {line!r}",
                              hint="each line is a path, a space and an integer label")
            lines.append((name, value))
    if not lines:
        raise OpError(f"the image list '{path}' is empty", hint="add 'image_path label' lines")
    return path, lines


class ImageListSource:
    def __init__(self, source: str, batch_size: int, transformer: Transformer, *,
                 root_folder: str = "", new_height: int = 0, new_width: int = 0,
                 is_color: bool = True, shuffle: bool = False, rand_skip: int = 0,
                 rng: np.random.Generator | None = None, source_dir: str | None = None):
        if (new_height > 0) != (new_width > 0):
            raise OpError("new_height and new_width must be given together",
                          hint="set both (to resize) or neither")
        self.path, self.lines = read_image_list(source, source_dir)
        self.batch_size = int(batch_size)
        self.transformer = transformer
        self.root, self.size = root_folder, (int(new_height), int(new_width))
        self.color, self.shuffle = bool(is_color), bool(shuffle)
        self.source_dir = source_dir
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.order = np.arange(len(self.lines))
        if self.shuffle:
            self.rng.shuffle(self.order)
        self.pos = 0
        if rand_skip:
            self.pos = int(self.rng.integers(rand_skip))
            if self.pos >= len(self.lines):
                raise OpError(f"rand_skip drew {self.pos}, but the list has only "
                              f"{len(self.lines)} lines", hint="use a smaller rand_skip")
        self.item_shape = self._read(self.order[self.pos]).shape
        self.shapes = [(self.batch_size,) + transformer.out_shape(*self.item_shape),
                       (self.batch_size,)]

    def _read(self, index: int) -> np.ndarray:
        name = self.root + self.lines[index][0]          # Caffe concatenates the strings
        found = name
        if not os.path.exists(name) and self.source_dir and not os.path.isabs(name):
            alt = os.path.join(self.source_dir, name)
            found = alt if os.path.exists(alt) else name
        if not os.path.exists(found):
            raise OpError(f"image '{name}' (line {index + 1} of '{self.path}') does not exist",
                          hint="fix the list or root_folder (root_folder is prepended as is, "
                               "so it usually ends with '/')")
        return read_image(found, *self.size, color=self.color)

    def next_batch(self) -> list[np.ndarray]:
        data = np.empty(self.shapes[0], np.float32)
        labels = _label_array(self.batch_size)
        for i in range(self.batch_size):
            index = self.order[self.pos]
            img = self._read(index)
            if img.shape != self.item_shape:
                raise OpError(f"image '{self.lines[index][0]}' is {list(img.shape)} but the "
                              f"first image is {list(self.item_shape)}",
                              hint="set new_height and new_width to resize every image, or "
                                   "use images of one size")
            data[i] = self.transformer(img, self.rng)
            labels[i] = self.lines[index][1]
            self.pos += 1
            if self.pos >= len(self.lines):
                self.pos = 0
                if self.shuffle:
                    self.rng.shuffle(self.order)
        return [data, labels]

    def close(self) -> None:
        pass
