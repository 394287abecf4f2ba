"""Caffe's reading data layers: HDF5Data, Data (LMDB), ImageData and MemoryData.

They have no bottoms.  ``infer`` opens the source to learn the top shapes (the first
record, or the datasets' shapes); ``forward`` returns the next batch from a reader kept in
``ctx.state``, which prefetches on a background thread (graphc/data/prefetch.py).  Paths
are opened relative to the working directory, as Caffe does, and then relative to the
prototxt's directory (``source_dir``, filled in by the lowering).  The reader's random
generator (shuffling, random crops and mirrors) is seeded from ``ctx.rng`` on the first
forward, so a Net built with a seed reads the same batches every time.

Differences from Caffe, by design: every record must have the first record's shape
(graphc's shapes are static; Caffe reshapes per batch); only the LMDB backend is read;
Data ignores ``rand_skip`` as Caffe 1.0 does; the deprecated transform fields inside
``data_param``/``image_data_param`` (which Caffe ignores in a V2 layer) are an error, so a
setting is never silently dropped.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import OpError
from ..ir.types import TensorType
from .base import Cost, Op, register

_LEGACY_TRANSFORM = ("scale", "mean_file", "crop_size", "mirror")


def _batch_size(value: int, param: str) -> int:
    if int(value) <= 0:
        raise OpError(f"{param}.batch_size is {int(value)}",
                      hint=f"set {param} {{ batch_size: N }} with N > 0")
    return int(value)


def _no_legacy_transform(msg, param: str) -> None:
    given = [f for f in _LEGACY_TRANSFORM if msg.HasField(f)]
    if given:
        raise OpError(f"{param} sets {', '.join(given)}, which Caffe ignores here "
                      "(deprecated fields)",
                      hint=f"move {', '.join(given)} into transform_param {{ }}")


def _need_source(attrs, param: str) -> None:
    if not attrs["source"]:
        raise OpError(f"the layer has no {param}.source",
                      hint=f"set {param} {{ source: \"...\" }}")


def _types(shapes) -> list[TensorType]:
    return [TensorType(tuple(int(d) for d in s), "f32") for s in shapes]


class _ReadingOp(Op):
    """A data layer backed by a batch source (graphc.data.sources) and a Prefetcher."""
    num_inputs = 0
    differentiable = False
    #: dict key of the prefetch depth in attrs (Caffe's data_param.prefetch), else 4
    depth_attr: str | None = None

    def make_source(self, attrs: dict, rng: np.random.Generator):
        raise NotImplementedError

    def infer(self, attrs, in_types, param_types):
        src = self.make_source(attrs, np.random.default_rng(0))
        try:
            return _types(src.shapes)
        finally:
            src.close()

    def forward(self, attrs, inputs, params, ctx):
        from ..data.prefetch import Prefetcher
        st = ctx.state
        key = json.dumps(attrs, sort_keys=True, default=str)
        if st.get("key") != key:          # first call, or the layer changed (reshape)
            old = st.pop("reader", None)
            if old is not None:
                old.close()
            rng = np.random.default_rng(int(ctx.rng.integers(2 ** 63)))
            src = self.make_source(attrs, rng)
            depth = attrs.get(self.depth_attr, 4) if self.depth_attr else 4
            st["reader"] = Prefetcher(src.next_batch, depth, on_exit=src.close,
                                      name=f"graphc-{self.type}")
            st["key"] = key
        return st["reader"].next()

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=0, bytes=sum(t.nbytes for t in out_types))


@register
class HDF5Data(_ReadingOp):
    """Rows of HDF5 datasets named after the tops; no transform_param (Caffe applies
    none).  Values are converted to float32."""
    type = "HDF5Data"
    caffe_param = "hdf5_data_param"
    num_outputs = (1, None)

    def from_caffe(self, layer, phase):
        p = layer.hdf5_data_param
        return {"source": p.source, "batch_size": _batch_size(p.batch_size, "hdf5_data_param"),
                "shuffle": bool(p.shuffle), "tops": list(layer.top), "source_dir": None}

    def infer(self, attrs, in_types, param_types):
        # only the dataset shapes of the first file (Caffe's top shapes), no rows read
        from ..data.sources import hdf5_shapes, read_hdf5_list
        _need_source(attrs, "hdf5_data_param")
        files = read_hdf5_list(attrs["source"], attrs.get("source_dir"))
        shapes = hdf5_shapes(files[0], attrs["tops"])
        return _types([(attrs["batch_size"],) + s[1:] for s in shapes])

    def make_source(self, attrs, rng):
        from ..data.sources import HDF5Source
        _need_source(attrs, "hdf5_data_param")
        return HDF5Source(attrs["source"], attrs["tops"], attrs["batch_size"],
                          attrs["shuffle"], rng, attrs.get("source_dir"))


def _transform(layer, phase) -> dict:
    from ..data.transform import transform_attrs
    return transform_attrs(layer.transform_param)


def _transformer(attrs):
    from ..data.transform import Transformer
    return Transformer(attrs["transform"], attrs["train"], attrs.get("source_dir"))


@register
class Data(_ReadingOp):
    """Datum records from an LMDB database (raw uint8 bytes, float_data, or encoded
    JPEG/PNG), transformed; top 0 the images, top 1 (optional) the labels."""
    type = "Data"
    caffe_param = "data_param"
    num_outputs = (1, 2)
    depth_attr = "prefetch"

    def from_caffe(self, layer, phase):
        p = layer.data_param
        _no_legacy_transform(p, "data_param")
        backend = "LMDB" if p.backend == 1 else "LEVELDB"      # enum DB { LEVELDB=0; LMDB=1 }
        return {"source": p.source, "batch_size": _batch_size(p.batch_size, "data_param"),
                "backend": backend,
                "prefetch": max(1, int(p.prefetch)), "train": phase == "train",
                "labels": len(layer.top) > 1, "transform": _transform(layer, phase),
                "source_dir": None}

    def make_source(self, attrs, rng):
        from ..data.sources import LMDBSource
        _need_source(attrs, "data_param")
        if attrs["backend"] != "LMDB":
            src = attrs["source"]
            lmdb_here = any(os.path.exists(os.path.join(d, src, "data.mdb"))
                            for d in ("", attrs.get("source_dir") or ""))
            raise OpError("data_param backend is LEVELDB (the default); graphc reads LMDB only",
                          hint="this source is an LMDB database: add backend: LMDB to data_param"
                          if lmdb_here else "convert the data set to LMDB (graphc convert-data) "
                                            "and set backend: LMDB")
        return LMDBSource(attrs["source"], attrs["batch_size"], _transformer(attrs),
                          attrs["labels"], rng, attrs.get("source_dir"))


@register
class ImageData(_ReadingOp):
    """Images named in a list file (``path label`` lines), read with Caffe's conventions
    (BGR, optional resize to new_height x new_width), transformed."""
    type = "ImageData"
    caffe_param = "image_data_param"
    num_outputs = 2

    def from_caffe(self, layer, phase):
        p = layer.image_data_param
        _no_legacy_transform(p, "image_data_param")
        if (p.new_height > 0) != (p.new_width > 0):
            raise OpError("image_data_param sets only one of new_height and new_width",
                          hint="set both (to resize every image) or neither")
        return {"source": p.source,
                "batch_size": _batch_size(p.batch_size, "image_data_param"),
                "shuffle": bool(p.shuffle), "rand_skip": int(p.rand_skip),
                "new_height": int(p.new_height), "new_width": int(p.new_width),
                "is_color": bool(p.is_color), "root_folder": p.root_folder,
                "train": phase == "train", "transform": _transform(layer, phase),
                "source_dir": None}

    def make_source(self, attrs, rng):
        from ..data.sources import ImageListSource
        _need_source(attrs, "image_data_param")
        return ImageListSource(attrs["source"], attrs["batch_size"], _transformer(attrs),
                               root_folder=attrs["root_folder"],
                               new_height=attrs["new_height"], new_width=attrs["new_width"],
                               is_color=attrs["is_color"], shuffle=attrs["shuffle"],
                               rand_skip=attrs["rand_skip"], rng=rng,
                               source_dir=attrs.get("source_dir"))


@register
class MemoryData(Op):
    """Arrays handed over by the program (pycaffe's ``net.set_input_arrays``; here
    ``graphc.data.set_input_arrays``), served batch_size rows at a time and wrapping
    around.  Like Caffe's Reset path, the arrays are used as given (no transform)."""
    type = "MemoryData"
    caffe_param = "memory_data_param"
    num_inputs = 0
    differentiable = False
    num_outputs = 2

    def from_caffe(self, layer, phase):
        p = layer.memory_data_param
        attrs = {k: int(getattr(p, k)) for k in ("batch_size", "channels", "height", "width")}
        if min(attrs.values()) <= 0:
            raise OpError("memory_data_param needs batch_size, channels, height and width, "
                          f"all > 0 (got {attrs})",
                          hint="set all four fields of memory_data_param")
        return attrs

    def infer(self, attrs, in_types, param_types):
        b = attrs["batch_size"]
        return _types([(b, attrs["channels"], attrs["height"], attrs["width"]), (b,)])

    def forward(self, attrs, inputs, params, ctx):
        st = ctx.state
        if "data" not in st:
            raise OpError("the MemoryData layer has no arrays to serve",
                          hint="call graphc.data.set_input_arrays(net, data, labels) before "
                               "forward (pycaffe's net.set_input_arrays)")
        b, pos, n = attrs["batch_size"], st["pos"], st["data"].shape[0]
        st["pos"] = (pos + b) % n
        return [st["data"][pos:pos + b].copy(), st["labels"][pos:pos + b].copy()]

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=0, bytes=sum(t.nbytes for t in out_types))


def set_memory_arrays(state: dict, attrs: dict, data, labels) -> None:
    """Check ``data`` (N x channels x height x width) and ``labels`` (N values) against a
    MemoryData layer's attrs and store copies in its state (Caffe's MemoryDataLayer::Reset:
    N must be a multiple of batch_size; serving restarts at row 0)."""
    data = np.asarray(data, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    item = (attrs["channels"], attrs["height"], attrs["width"])
    if data.ndim != 4 or data.shape[1:] != item:
        raise OpError(f"data has shape {list(data.shape)}; the MemoryData layer needs "
                      f"N x {item[0]} x {item[1]} x {item[2]}",
                      hint="pass a 4-D array with the layer's channels, height and width")
    n = data.shape[0]
    if labels.size != n or (labels.ndim > 1 and any(d != 1 for d in labels.shape[1:])):
        raise OpError(f"labels has shape {list(labels.shape)} for {n} data rows",
                      hint="pass one label per row (shape (N,) or (N, 1, 1, 1))")
    if n == 0 or n % attrs["batch_size"]:
        raise OpError(f"{n} rows is not a positive multiple of batch_size "
                      f"{attrs['batch_size']}",
                      hint="pass a multiple of batch_size rows, as Caffe requires")
    state["data"] = np.ascontiguousarray(data).copy()
    state["labels"] = labels.reshape(n).copy()
    state["pos"] = 0
