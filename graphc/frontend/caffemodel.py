"""Reading and writing Caffe weight files.

- ``.caffemodel``: a binary NetParameter whose layers carry ``blobs``.  Both the current
  (``layer``, field 100) and V1/V0 (``layers``, field 2) layouts are read; they are
  upgraded the way Caffe upgrades them, so V1 enum types become type strings.
- ``.caffemodel.h5``: Caffe's HDF5 snapshot format, ``data/<layer name>/<i>`` datasets.
- ``.binaryproto``: one BlobProto (mean files).

A blob's shape comes from its BlobShape, or from the legacy num/channels/height/width
fields of old files.  Caffe compares a legacy blob with a layer's parameter shape
leniently (Blob::ShapeEquals: the parameter shape is padded with leading 1s to 4 axes), so
the reader keeps a per-blob ``legacy`` flag; ``WeightsFile.blob_for`` and ``blob_matches``
implement that rule.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from google.protobuf.message import DecodeError

from graphc.errors import FileFormatError, GraphcError
from graphc.frontend import caffe_pb2 as pb
from graphc.frontend.atomic import atomic_write
from graphc.frontend.upgrade import UpgradeError, upgrade_net

__all__ = ["WeightsLayer", "WeightsFile", "read_caffemodel", "write_caffemodel",
           "read_binaryproto", "write_binaryproto", "read_solverstate", "blob_matches",
           "blob_to_array", "array_to_blob", "atomic_write"]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_LEGACY_FIELDS = ("num", "channels", "height", "width")


class WeightsLayer(NamedTuple):
    """One layer of a weights file: its type ("" where the file does not say, as in HDF5)
    and its blobs, float32 arrays in Caffe's order."""
    type: str
    blobs: list[np.ndarray]


class WeightsFile(Mapping):
    """Ordered mapping: layer name -> WeightsLayer(type, blobs).

    If a file holds two layers with the same name the later one wins, as when Caffe copies
    them one after the other.  ``legacy[name][i]`` is True when blob i of that layer had a
    legacy 4-D shape (then its array is 4-D: num, channels, height, width).
    """

    def __init__(self, path: str, layers: dict[str, WeightsLayer],
                 legacy: dict[str, list[bool]], format: str):
        self.path = path
        self.format = format  # "binaryproto" or "hdf5"
        self._layers = layers
        self.legacy = legacy

    def __getitem__(self, name: str) -> WeightsLayer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"WeightsFile({self.path!r}, {len(self)} layers)"

    def blob_for(self, name: str, index: int, shape: Sequence[int],
                 layer_type: str | None = None) -> np.ndarray:
        """Blob ``index`` of layer ``name`` as an array of the parameter ``shape``.

        Checks it the way Caffe's Net::CopyTrainedLayersFrom does (Blob::ShapeEquals,
        lenient for legacy blobs) and raises GraphcError naming both shapes otherwise.
        """
        layer = self._layers[name]
        if not 0 <= index < len(layer.blobs):
            raise GraphcError(
                f"the weights file has {len(layer.blobs)} blob(s) for this layer, "
                f"not enough for parameter {index}", where=self.path, layer=name,
                layer_type=layer_type,
                hint="the weights were trained for a different layer definition")
        blob = layer.blobs[index]
        shape = tuple(int(d) for d in shape)
        if not blob_matches(shape, blob, legacy=self.legacy[name][index]):
            raise GraphcError(
                f"cannot copy parameter {index}: shape mismatch; the weights file has "
                f"{_fmt(blob.shape)}, the layer needs {_fmt(shape)}", where=self.path,
                layer=name, layer_type=layer_type,
                hint="check num_output, kernel size and group of this layer against the "
                     "weights, or rename the layer so that its weights are not copied")
        return blob.reshape(shape)


def blob_matches(shape: Sequence[int], blob, legacy: bool | None = None) -> bool:
    """Caffe's Blob::ShapeEquals between a parameter ``shape`` and a stored blob.

    ``blob`` is a caffe_pb2.BlobProto, or an array read from one (then pass ``legacy``).
    A legacy blob (num/channels/height/width) matches a shape of at most 4 axes that equals
    (num, channels, height, width) after padding with leading 1s, e.g. an InnerProduct
    bias (10,) matches a legacy 1x1x1x10 blob.  Otherwise the shapes must be equal.
    """
    shape = tuple(int(d) for d in shape)
    if isinstance(blob, pb.BlobProto):
        legacy = any(blob.HasField(f) for f in _LEGACY_FIELDS)
        other = (blob.num, blob.channels, blob.height, blob.width) if legacy \
            else tuple(blob.shape.dim)
    else:
        other = tuple(np.shape(blob))
        legacy = bool(legacy)
    if legacy:
        return len(shape) <= 4 and (1,) * (4 - len(shape)) + shape == tuple(other)
    return shape == tuple(other)


# ---------------------------------------------------------------- blobs

def blob_to_array(blob: pb.BlobProto, *, where: str = "<blob>", layer: str | None = None,
                  index: int = 0) -> tuple[np.ndarray, bool]:
    """(float32 array, legacy flag) of a BlobProto, like Caffe's Blob::FromProto: the shape
    is the legacy (num, channels, height, width) when any of those is set, else
    BlobShape; values come from ``double_data`` when it is non-empty, else ``data``."""
    legacy = any(blob.HasField(f) for f in _LEGACY_FIELDS)
    shape = (blob.num, blob.channels, blob.height, blob.width) if legacy \
        else tuple(blob.shape.dim)
    what = f"blob {index}" if layer is not None else "the blob"
    if any(d < 0 for d in shape):
        raise FileFormatError(f"{what} has a negative dimension in shape {_fmt(shape)}",
                              where=where, layer=layer,
                              hint="the file is damaged; re-export the weights")
    count = int(np.prod(shape, dtype=np.int64))
    if len(blob.double_data):
        with np.errstate(over="ignore"):  # out-of-range doubles become inf, as in C++
            values = np.array(blob.double_data, dtype=np.float64).astype(np.float32)
    else:
        values = np.array(blob.data, dtype=np.float32)
    if values.size != count:
        raise FileFormatError(
            f"{what} has shape {_fmt(shape)} ({count} values) but holds {values.size} values",
            where=where, layer=layer,
            hint="the file is damaged, truncated, or was saved without blob data; "
                 "re-export the weights")
    return values.reshape(shape), legacy


def array_to_blob(array, blob: pb.BlobProto | None = None) -> pb.BlobProto:
    """A BlobProto holding ``array`` as float32 with a BlobShape (no legacy fields)."""
    a = np.asarray(array, dtype=np.float32)
    blob = pb.BlobProto() if blob is None else blob
    blob.shape.SetInParent()  # present even for a 0-axis blob, as Caffe's ToProto writes
    blob.shape.dim.extend(int(d) for d in a.shape)
    blob.data.extend(a.ravel().tolist())
    return blob


# ---------------------------------------------------------------- caffemodel

def read_caffemodel(path) -> WeightsFile:
    """Read trained weights: a binary .caffemodel (V2, V1 or V0 layout) or Caffe's HDF5
    weights (recognised by content, whatever the file name)."""
    data = _read_bytes(path)
    if data.startswith(HDF5_MAGIC):
        return _read_hdf5_weights(path)
    net = _parse_net_binary(data, str(path))
    try:
        net, _ = upgrade_net(net)
    except UpgradeError as e:
        raise e.located(where=str(path))
    layers: dict[str, WeightsLayer] = {}
    legacy: dict[str, list[bool]] = {}
    for layer in net.layer:
        arrays, flags = [], []
        for i, blob in enumerate(layer.blobs):
            a, f = blob_to_array(blob, where=str(path), layer=layer.name, index=i)
            arrays.append(a)
            flags.append(f)
        layers.pop(layer.name, None)  # a repeated name moves to its last position
        layers[layer.name] = WeightsLayer(layer.type, arrays)
        legacy[layer.name] = flags
    return WeightsFile(str(path), layers, legacy, "binaryproto")


def write_caffemodel(path, layers: Sequence[tuple[str, str, Sequence[np.ndarray]]],
                     name: str | None = None) -> None:
    """Write ``layers`` — (layer name, layer type, [arrays]) — as a binary .caffemodel
    (current ``layer`` layout, float32 blobs with BlobShape), atomically."""
    net = pb.NetParameter()
    if name:
        net.name = name
    for lname, ltype, arrays in layers:
        layer = net.layer.add(name=lname, type=ltype)
        for a in arrays:
            array_to_blob(a, layer.blobs.add())
    atomic_write(path, net.SerializeToString())


def _parse_net_binary(data: bytes, where: str) -> pb.NetParameter:
    hint = "pass the binary .caffemodel weights file written by Caffe (or graphc)"
    # field 1 of NetParameter is a string: a first byte 0x08 (field 1 as a varint) is
    # what SolverState (iter) and legacy BlobProto (num) files start with
    if data[:1] != b"\x08":
        net = pb.NetParameter()
        try:
            net.ParseFromString(data)
        except DecodeError as e:
            kind = _guess_kind(data)
            if kind:
                raise FileFormatError(f"this is not a .caffemodel; it looks like {kind}",
                                      where=where, hint=hint) from None
            raise FileFormatError(
                f"cannot decode the file as a .caffemodel; it is truncated or corrupted ({e})",
                where=where, hint="re-download or re-export the weights") from None
        if net.layer or net.layers:
            return net
    kind = _guess_kind(data)
    if kind:
        raise FileFormatError(f"this is not a .caffemodel; it looks like {kind}",
                              where=where, hint=hint)
    raise FileFormatError("the file holds no layers; it is not a Caffe weights file",
                          where=where, hint=hint)


def _guess_kind(data: bytes) -> str | None:
    """A description of what ``data`` seems to be, for error messages (None: no idea)."""
    if data.startswith(HDF5_MAGIC):
        return "an HDF5 file"
    if _looks_like_text(data):
        return "a text file (a .prototxt net or solver definition?)"
    if data[:1] == b"\x08":
        state = pb.SolverState()
        try:
            state.ParseFromString(data)
        except DecodeError:
            pass
        else:
            if state.learned_net or state.history:
                named = f" for {state.learned_net}" if state.learned_net else ""
                return f"a solver state (.solverstate{named}, iteration {state.iter})"
    blob = pb.BlobProto()
    try:
        blob.ParseFromString(data)
        array, _ = blob_to_array(blob)
    except (DecodeError, FileFormatError):
        pass
    else:
        if array.size and array.ndim:
            return f"a single blob of shape {_fmt(array.shape)} (a .binaryproto, e.g. a mean file)"
    return None


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # the 4 KiB cut may split a multi-byte character
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


# ---------------------------------------------------------------- HDF5

def _read_hdf5_weights(path) -> WeightsFile:
    """Caffe's HDF5 weights (Net::ToHDF5): group ``data`` with one group per layer and
    datasets ``0``, ``1``, ... for its blobs.  Layer types are not stored; layers come in
    the file's group order (by name)."""
    import h5py

    where = str(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FileFormatError(f"cannot open the HDF5 file: {e}", where=where,
                              hint="the file is damaged or truncated; re-export it") from None
    with f:
        if "data" not in f:
            if "history" in f or "iter" in f:
                learned = f["learned_net"][()] if "learned_net" in f else b""
                learned = learned.decode() if isinstance(learned, bytes) else str(learned)
                named = f" (its weights are in {learned})" if learned else ""
                raise FileFormatError(
                    f"this is an HDF5 solver state{named}, not weights", where=where,
                    hint="pass the .caffemodel.h5 weights file; a solver state is given "
                         "with --snapshot")
            raise FileFormatError("this HDF5 file has no 'data' group; it is not a Caffe "
                                  "weights file", where=where,
                                  hint="pass a .caffemodel or .caffemodel.h5 written by Caffe")
        if not isinstance(f["data"], h5py.Group):
            raise FileFormatError(
                "this HDF5 file has a 'data' dataset, not a group of layers: it looks like "
                "input data for an HDF5Data layer, not weights", where=where,
                hint="pass a .caffemodel or .caffemodel.h5 weights file")
        layers: dict[str, WeightsLayer] = {}
        legacy: dict[str, list[bool]] = {}
        for name, group in f["data"].items():
            if not isinstance(group, h5py.Group):
                raise FileFormatError(f"'data/{name}' is not a group of blobs", where=where,
                                      hint="the file was not written by Caffe")
            keys = sorted(group.keys(), key=lambda k: (len(k), k))
            if keys != [str(i) for i in range(len(keys))]:
                raise FileFormatError(
                    f"layer '{name}' has blob datasets {keys}; expected 0..{len(keys) - 1}",
                    where=where, hint="the file was not written by Caffe")
            layers[name] = WeightsLayer("", [np.asarray(group[k][()], dtype=np.float32)
                                             for k in keys])
            legacy[name] = [False] * len(keys)
    return WeightsFile(where, layers, legacy, "hdf5")


# ---------------------------------------------------------------- binaryproto

def read_binaryproto(path) -> np.ndarray:
    """Read a BlobProto file (e.g. a mean image) as a float32 array of its shape (a legacy
    blob gives the 4-D num x channels x height x width)."""
    data = _read_bytes(path)
    where = str(path)
    hint = "pass a .binaryproto blob file (such as the mean file made by compute_image_mean)"
    if data.startswith(HDF5_MAGIC) or _looks_like_text(data):
        raise FileFormatError(f"this is not a .binaryproto; it looks like {_guess_kind(data)}",
                              where=where, hint=hint)
    blob = pb.BlobProto()
    try:
        blob.ParseFromString(data)
    except DecodeError as e:
        raise FileFormatError(f"cannot decode the file as a blob; it is truncated, corrupted "
                              f"or of another kind ({e})", where=where, hint=hint) from None
    if not len(blob.data) and not len(blob.double_data):
        kind = _guess_kind(data)
        if kind is None:
            net = pb.NetParameter()
            try:
                net.ParseFromString(data)
                kind = "a .caffemodel" if net.layer or net.layers else None
            except DecodeError:
                pass
        raise FileFormatError("the file holds no blob data" +
                              (f"; it looks like {kind}" if kind else ""), where=where, hint=hint)
    array, _ = blob_to_array(blob, where=where)
    return array


def write_binaryproto(path, array) -> None:
    """Write ``array`` as a BlobProto (float32, BlobShape), atomically."""
    atomic_write(path, array_to_blob(array).SerializeToString())


def read_solverstate(path) -> pb.SolverState:
    """Read a binary .solverstate (iteration, learned_net file name, history blobs)."""
    data = _read_bytes(path)
    where = str(path)
    hint = "pass the .solverstate written with the snapshot"
    if data.startswith(HDF5_MAGIC) or _looks_like_text(data):
        raise FileFormatError(f"this is not a binary .solverstate; it looks like "
                              f"{_guess_kind(data)}", where=where, hint=hint)
    state = pb.SolverState()
    try:
        state.ParseFromString(data)
    except DecodeError as e:
        raise FileFormatError(f"cannot decode the solver state; it is truncated or corrupted "
                              f"({e})", where=where, hint=hint) from None
    if data[:1] != b"\x08" or not state.HasField("iter"):
        kind = _guess_kind(data)
        raise FileFormatError("this is not a solver state" +
                              (f"; it looks like {kind}" if kind else ""), where=where, hint=hint)
    return state


# ---------------------------------------------------------------- helpers

def _read_bytes(path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FileFormatError(f"cannot read the file: {e.strerror or e}", where=str(path),
                              hint="check the path") from None
    if not data:
        raise FileFormatError("the file is empty", where=str(path),
                              hint="the file was not written completely; re-export it")
    return data


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"
