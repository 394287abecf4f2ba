"""``graphc convert-data``: build LMDB or HDF5 data sets for the data layers.

    graphc convert-data --from imagelist LIST --root DIR --out DB [--backend lmdb|hdf5]
                        [--resize H W] [--gray] [--shuffle] [--encoded]
    graphc convert-data --from mnist IMAGES LABELS --out DB
    graphc convert-data --from digits --out DB      (needs scikit-learn)

LMDB (Caffe's convert_imageset / convert_mnist_data): one caffe.Datum per image, keyed
``%08d_<name>`` (``%08d`` for MNIST and digits), pixels as C x H x W uint8 bytes in BGR
order, or the encoded file (``--encoded``: the original bytes when no resize or colour
change is needed, else re-encoded as ``--encode-type`` or the file's own format).
HDF5 (for HDF5Data): datasets ``data`` (N x C x H x W float32 = pixels x ``--scale``) and
``label`` (N float32), plus a list file ``<out>.txt`` naming the .h5 file.  The digits
set in HDF5 has scale 1/16 by default, giving the golden layout (images / 16, in [0, 1]).
``--range A:B`` keeps records A..B-1 of the source order (before ``--shuffle``).
Outputs are written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from ..errors import FileFormatError, GraphcError
from .images import encode_image, image_format, read_image, stored_channels


class Record(NamedTuple):
    key: str
    label: int
    image: np.ndarray          # C x H x W uint8 (BGR or gray)
    encoded: bytes | None = None


# ---------------------------------------------------------------- sources

def imagelist_records(list_path: str, root: str = "", resize=None, gray: bool = False,
                      encoded: bool = False, encode_type: str | None = None,
                      order=None) -> Iterator[Record]:
    """Records of an image list (``path label`` lines, as ImageData reads them)."""
    from .sources import read_image_list
    _, lines = read_image_list(list_path)
    h, w = resize or (0, 0)
    for i, idx in enumerate(order if order is not None else range(len(lines))):
        name, label = lines[idx]
        path = os.path.join(root, name)
        img = read_image(path, h, w, color=not gray)
        data = None
        if encoded:
            fmt = encode_type or image_format(name) or "png"
            if not resize and fmt == image_format(name) and stored_channels(path) == img.shape[0]:
                data = Path(path).read_bytes()       # Caffe's ReadFileToDatum
            else:
                data = encode_image(img, fmt)
        yield Record(f"{i:08d}_{name}", label, img, data)


def _read_idx(path: str, magic: int, what: str) -> np.ndarray:
    """An MNIST idx file (optionally gzipped): big-endian int32 magic, counts, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise GraphcError(f"{what} file '{path}' does not exist",
                          hint="pass the MNIST idx files, e.g. train-images-idx3-ubyte "
                               "train-labels-idx1-ubyte") from None
    except (OSError, EOFError) as e:
        raise FileFormatError(f"cannot read {what} file: {e}", where=str(path),
                              hint="the file is damaged; download it again") from None
    ndim = 3 if magic == 2051 else 1
    header = 4 * (1 + ndim)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise FileFormatError(f"this is not an MNIST {what} file (magic number {got}, "
                              f"expected {magic})", where=str(path),
                              hint="images are *-images-idx3-ubyte, labels "
                                   "*-labels-idx1-ubyte; check the order of the two files")
    dims = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise FileFormatError(f"the {what} file holds {len(raw) - header} bytes of data, "
                              f"the header says {count}", where=str(path),
                              hint="the file is truncated; download it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def mnist_records(images: str, labels: str, order=None, resize=None) -> Iterator[Record]:
    """Records of MNIST idx files, as Caffe's convert_mnist_data writes them."""
    x = _read_idx(images, 2051, "images")
    y = _read_idx(labels, 2049, "labels")
    if len(x) != len(y):
        raise GraphcError(f"{len(x)} images but {len(y)} labels",
                          hint="pass the images and labels of the same set")
    for i, idx in enumerate(order if order is not None else range(len(x))):
        yield Record(f"{i:08d}", int(y[idx]), _resized(x[idx][None], resize))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (N x 8 x 8 pixel values 0..16, N labels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GraphcError("--from digits needs scikit-learn, which is not installed",
                          hint="pip install scikit-learn (an optional dependency of graphc)") \
            from None
    d = load_digits()
    return np.asarray(d.images), np.asarray(d.target)


def digits_records(order=None, resize=None) -> Iterator[Record]:
    images, target = load_digits_arrays()
    for i, idx in enumerate(order if order is not None else range(len(images))):
        yield Record(f"{i:08d}", int(target[idx]),
                     _resized(images[idx].astype(np.uint8)[None], resize))


def _resized(img: np.ndarray, resize) -> np.ndarray:
    from .images import resize_bilinear
    return resize_bilinear(img, *resize) if resize else img


# ---------------------------------------------------------------- writers

def _check_new(out: Path) -> None:
    if out.exists():
        raise GraphcError(f"'{out}' already exists",
                          hint="remove it first, or choose another --out")
    if not out.parent.is_dir():
        raise GraphcError(f"the directory of '{out}' does not exist",
                          hint="create the directory first")


def write_lmdb(out, records) -> tuple[int, tuple | None]:
    """Write Datum records to a new LMDB directory ``out`` (atomically: a temporary
    directory renamed at the end).  Returns (count, first image's shape)."""
    import lmdb
    from ..frontend import caffe_pb2
    out = Path(out)
    _check_new(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    count, shape, env = 0, None, None
    try:
        env = lmdb.open(str(tmp), map_size=1 << 26, subdir=True)
        pending = []
        for rec in records:
            d = caffe_pb2.Datum()
            d.label = int(rec.label)
            if rec.encoded is not None:
                d.data, d.encoded = rec.encoded, True
            else:
                d.channels, d.height, d.width = (int(s) for s in rec.image.shape)
                d.data = np.ascontiguousarray(rec.image, np.uint8).tobytes()
            pending.append((rec.key.encode("utf-8"), d.SerializeToString()))
            shape = shape or tuple(rec.image.shape)
            count += 1
            if len(pending) == 1000:           # Caffe commits every 1000 records
                _commit(env, pending)
                pending = []
        _commit(env, pending)
        env.sync(True)
        env.close()
        env = None
        if count == 0:
            raise GraphcError("the source has no records", hint="check the input")
        os.rename(tmp, out)
    except BaseException:
        if env is not None:
            env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count, shape


def _commit(env, items) -> None:
    import lmdb
    while items:
        try:
            with env.begin(write=True) as txn:
                for k, v in items:
                    txn.put(k, v)
            return
        except lmdb.MapFullError:               # grow the map and redo the transaction
            env.set_mapsize(env.info()["map_size"] * 2)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def hdf5_list_path(out) -> Path:
    out = Path(out)
    return out.with_suffix(".txt") if out.suffix == ".h5" else Path(str(out) + ".txt")


def write_hdf5(out, records, scale: float = 1.0) -> tuple[int, tuple | None]:
    """Write records to a new HDF5 file ``out`` (``data`` = pixels x scale as float32,
    ``label`` float32) and the list file naming it.  Atomic (temporary file, rename)."""
    import h5py
    from ..frontend.atomic import atomic_write
    out = Path(out)
    _check_new(out)
    images, labels = [], []
    for rec in records:
        if images and rec.image.shape != images[0].shape:
            raise GraphcError(f"record {rec.key} is {list(rec.image.shape)} but the first is "
                              f"{list(images[0].shape)}",
                              hint="an HDF5 data set needs images of one size: use --resize H W")
        images.append(rec.image)
        labels.append(rec.label)
    if not images:
        raise GraphcError("the source has no records", hint="check the input")
    data = (np.stack(images).astype(np.float64) * scale).astype(np.float32)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("data", data=data)
            f.create_dataset("label", data=np.asarray(labels, np.float32))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write(hdf5_list_path(out), (out.name + "\n").encode())
    return len(images), tuple(images[0].shape)


# ---------------------------------------------------------------- command line

def _range(text: str | None, n: int) -> range:
    if not text:
        return range(n)
    a, sep, b = text.partition(":")
    try:
        start, stop = int(a or 0), int(b) if b else n
    except ValueError:
        start = stop = None
    if not sep or start is None:
        raise GraphcError(f"--range expects START:END, got {text!r}", hint="e.g. --range 0:1500")
    return range(n)[start:stop]


def _order(n: int, args) -> list[int]:
    idx = list(_range(args.range, n))
    if not idx:
        raise GraphcError(f"--range {args.range} selects no records of {n}",
                          hint=f"use a range within 0:{n}")
    if args.shuffle:
        np.random.default_rng(args.seed).shuffle(idx)
    return idx


def cmd_convert_data(args) -> int:
    kind, inputs = args.kind, list(args.inputs)
    want = {"imagelist": 1, "mnist": 2, "digits": 0}[kind]
    if len(inputs) != want:
        usage = {"imagelist": "--from imagelist LIST", "mnist": "--from mnist IMAGES LABELS",
                 "digits": "--from digits"}[kind]
        raise GraphcError(f"--from {kind} takes {want} input file(s), got {len(inputs)}",
                          hint=f"usage: graphc convert-data {usage} --out DB")
    hdf5 = args.backend == "hdf5"
    if hdf5 and args.encoded:
        raise GraphcError("--encoded applies to LMDB only",
                          hint="drop --encoded, or use --backend lmdb")
    if args.scale is not None and not hdf5:
        raise GraphcError("--scale applies to HDF5 only (LMDB stores the pixels; scale them "
                          "with transform_param { scale })", hint="drop --scale")
    if args.resize and min(args.resize) <= 0:
        raise GraphcError(f"--resize {args.resize[0]} {args.resize[1]}: sizes must be > 0",
                          hint="e.g. --resize 256 256")
    resize = tuple(args.resize) if args.resize else None
    if kind == "imagelist":
        from .sources import read_image_list
        _, lines = read_image_list(inputs[0])
        records = imagelist_records(inputs[0], args.root, resize, args.gray, args.encoded,
                                    args.encode_type, _order(len(lines), args))
    elif kind == "mnist":
        n = len(_read_idx(inputs[1], 2049, "labels"))
        records = mnist_records(inputs[0], inputs[1], _order(n, args), resize)
    else:
        n = len(load_digits_arrays()[1])
        records = digits_records(_order(n, args), resize)
    if hdf5:
        scale = args.scale if args.scale is not None else (1 / 16 if kind == "digits" else 1.0)
        count, shape = write_hdf5(args.out, records, scale)
        extra = f" and list file {hdf5_list_path(args.out)}"
    else:
        count, shape = write_lmdb(args.out, records)
        extra = ""
    dims = " x ".join(str(s) for s in shape) if shape else "?"
    print(f"wrote {count} records ({dims}) to {args.out}{extra}")
    return 0


def add_convert_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-data", help="build an LMDB or HDF5 data set (image list, MNIST, digits)",
        description="Build an LMDB (Data layer) or HDF5 (HDF5Data layer) data set.")
    p.add_argument("--from", dest="kind", required=True, choices=("imagelist", "mnist", "digits"),
                   help="imagelist LIST | mnist IMAGES LABELS | digits (needs scikit-learn)")
    p.add_argument("inputs", nargs="*", metavar="FILE", help="the input file(s) of --from")
    p.add_argument("--out", required=True, help="the LMDB directory or .h5 file to create")
    p.add_argument("--backend", choices=("lmdb", "hdf5"), default="lmdb")
    p.add_argument("--root", default="", help="directory the image list's paths are relative to")
    p.add_argument("--resize", nargs=2, type=int, metavar=("H", "W"),
                   help="resize every image to H x W (bilinear, as OpenCV)")
    p.add_argument("--gray", action="store_true", help="read images as 1-channel grayscale")
    p.add_argument("--shuffle", action="store_true", help="shuffle the records (with --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    p.add_argument("--encoded", action="store_true",
                   help="LMDB: store images encoded (PNG/JPEG) instead of raw pixels")
    p.add_argument("--encode-type", choices=("png", "jpg"),
                   help="format for --encoded (default: each file's own format)")
    p.add_argument("--scale", type=float,
                   help="HDF5: multiply pixels by this (default 1; 1/16 for digits)")
    p.add_argument("--range", metavar="START:END",
                   help="keep only these records of the source order (before --shuffle)")
    p.set_defaults(func=cmd_convert_data)
    return p
