"""Snapshot files, in Caffe's formats, written atomically.

* weights: ``<prefix>_iter_<N>.caffemodel`` — a binary NetParameter with one layer per
  layer that has params (name, type, blobs; with ``snapshot_diff`` each blob also holds
  its diff), or ``.caffemodel.h5`` — ``data/<layer>/<i>`` (and ``diff/<layer>/<i>``).
* solver state: ``<prefix>_iter_<N>.solverstate`` — a binary SolverState (iter,
  learned_net = the weights file's name as written, history blobs, current_step), or
  ``.solverstate.h5`` — scalar datasets ``iter``, ``learned_net``, ``current_step`` and
  a group ``history`` with datasets ``0``, ``1``, ...

Caffe writes the weights first and the state second; a state file therefore always has
its weights file.  Each file goes to a temporary name, is fsynced and renamed over the
final name (``atomic_write``), so a process killed at any moment never leaves a truncated
file under a final name.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import FileFormatError
from ..frontend import caffe_pb2 as pb
from ..frontend.atomic import atomic_write
from ..frontend.caffemodel import HDF5_MAGIC, array_to_blob, blob_to_array, read_solverstate


@dataclass
class SnapshotLayer:
    name: str
    type: str
    data: Sequence[np.ndarray]
    diff: Sequence[np.ndarray] | None = None


@dataclass
class SolverStateData:
    iter: int
    learned_net: str | None
    current_step: int
    history: list[np.ndarray]


def write_weights(path, layers: Sequence[SnapshotLayer], name: str = "", *,
                  hdf5: bool = False) -> None:
    if hdf5:
        atomic_write(path, _hdf5_bytes(lambda f: _fill_weights_h5(f, layers)))
        return
    net = pb.NetParameter()
    if name:
        net.name = name
    for layer in layers:
        lp = net.layer.add(name=layer.name, type=layer.type)
        for i, a in enumerate(layer.data):
            blob = array_to_blob(a, lp.blobs.add())
            if layer.diff is not None:
                blob.diff.extend(np.asarray(layer.diff[i], np.float32).ravel().tolist())
    atomic_write(path, net.SerializeToString())


def _fill_weights_h5(f, layers) -> None:
    data = f.create_group("data")
    diff = f.create_group("diff") if any(l.diff is not None for l in layers) else None
    for layer in layers:
        gd = data.require_group(layer.name)
        for i, a in enumerate(layer.data):
            gd.create_dataset(str(i), data=np.asarray(a, np.float32))
        if diff is not None and layer.diff is not None:
            gf = diff.require_group(layer.name)
            for i, a in enumerate(layer.diff):
                gf.create_dataset(str(i), data=np.asarray(a, np.float32))


def write_state(path, state: SolverStateData, *, hdf5: bool = False) -> None:
    if hdf5:
        def fill(f):
            f.create_dataset("iter", data=np.int32(state.iter))
            name = (state.learned_net or "").encode()
            # NUL-terminated, as H5LTmake_dataset_string writes it (Caffe reads a C string)
            f.create_dataset("learned_net", data=np.array(name + b"\0", f"S{len(name) + 1}"))
            f.create_dataset("current_step", data=np.int32(state.current_step))
            h = f.create_group("history")
            for i, a in enumerate(state.history):
                h.create_dataset(str(i), data=np.asarray(a, np.float32))
        atomic_write(path, _hdf5_bytes(fill))
        return
    msg = pb.SolverState(iter=int(state.iter), current_step=int(state.current_step))
    if state.learned_net is not None:
        msg.learned_net = state.learned_net
    for a in state.history:
        array_to_blob(a, msg.history.add())
    atomic_write(path, msg.SerializeToString())


def read_state(path) -> SolverStateData:
    """Read a binary or HDF5 solver state (recognised by content)."""
    p = Path(path)
    try:
        head = p.open("rb").read(8)
    except OSError as e:
        raise FileFormatError(f"cannot read the solver state: {e.strerror or e}",
                              where=str(path), hint="check the --snapshot path") from None
    if head == HDF5_MAGIC:
        return _read_state_h5(p)
    msg = read_solverstate(p)
    history = [blob_to_array(b, where=str(path), layer="history", index=i)[0]
               for i, b in enumerate(msg.history)]
    return SolverStateData(msg.iter, msg.learned_net if msg.HasField("learned_net") else None,
                           msg.current_step, history)


def _read_state_h5(p: Path) -> SolverStateData:
    import h5py
    where = str(p)
    hint = "pass a .solverstate.h5 written by Caffe or graphc"
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise FileFormatError(f"cannot open the HDF5 solver state: {e}", where=where,
                              hint="the file is damaged or truncated") from None
    with f:
        if "iter" not in f or "history" not in f:
            what = "HDF5 weights (a .caffemodel.h5)" if "data" in f else "another HDF5 file"
            raise FileFormatError(f"this is not a solver state; it looks like {what}",
                                  where=where, hint=hint)
        learned = None
        if "learned_net" in f:
            v = f["learned_net"][()]
            learned = (v.decode() if isinstance(v, bytes) else str(v)).rstrip("\0")
        group = f["history"]
        keys = sorted(group.keys(), key=lambda k: (len(k), k))
        if keys != [str(i) for i in range(len(keys))]:
            raise FileFormatError(f"the history group has datasets {keys}; expected "
                                  f"0..{len(keys) - 1}", where=where, hint=hint)
        history = [np.asarray(group[k][()], np.float32) for k in keys]
        step = int(f["current_step"][()]) if "current_step" in f else 0
        return SolverStateData(int(f["iter"][()]), learned, step, history)


def _hdf5_bytes(fill) -> bytes:
    import h5py
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    return buf.getvalue()
