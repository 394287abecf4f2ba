"""The ``Python`` layer: a user class with pycaffe's interface, run by the reference
executor.

    layer { type: "Python" bottom: "data" top: "out"
            python_param { module: "my_layers" layer: "Double" param_str: "2" } }

``my_layers.py`` (on sys.path, or next to the prototxt: attribute ``search_dir``)::

    import graphc
    class Double(graphc.PythonLayer):
        def setup(self, bottom, top):   self.k = float(self.param_str)
        def reshape(self, bottom, top): top[0].reshape(*bottom[0].shape)
        def forward(self, bottom, top): top[0].data[...] = self.k * bottom[0].data
        def backward(self, top, propagate_down, bottom): ...

As in Caffe: ``param_str`` and ``phase`` (TRAIN = 0, TEST = 1, pycaffe's ints) are set
before ``setup``; ``setup`` then ``reshape`` run once when the layer is set up, and every
forward calls ``reshape`` then ``forward`` (Caffe's Layer::Forward reshapes first).  Top
blobs keep their memory between calls.  Shape inference runs setup+reshape on a
throwaway instance with zero-filled bottoms.  The class need not subclass PythonLayer
(duck typing), so layers written against ``caffe.Layer`` work once that import is changed.

Backward (training) calls the instance's ``backward(top, propagate_down, bottom)``: the
tops hold the forward's data and the gradients in ``diff``; the layer writes
``bottom[i].diff``.

Limitation: learnable blobs of a Python layer (``self.blobs``) live on the instance only;
they are not graph parameters, so they are neither loaded from a .caffemodel, nor
trained, nor saved.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import traceback

import numpy as np

from ..errors import OpError
from ..ir.types import TensorType
from .base import Cost, Op, register

TRAIN, TEST = 0, 1          # pycaffe's caffe.TRAIN / caffe.TEST


class Blob:
    """pycaffe-like blob: ``data`` and ``diff`` ndarrays (float32) of ``shape``."""

    def __init__(self, shape=None, data: np.ndarray | None = None):
        self._shaped = shape is not None or data is not None
        if data is not None:
            self._data = np.array(data, dtype=np.float32)
        else:
            self._data = np.zeros(tuple(shape or ()), np.float32)
        self._diff = np.zeros_like(self._data)

    # data/diff are views a layer writes into (top[0].data[...] = x); assigning a whole
    # array copies it in, broadcasting like numpy
    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value) -> None:
        self._data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._diff

    @diff.setter
    def diff(self, value) -> None:
        self._diff[...] = value

    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    @property
    def count(self) -> int:
        return int(self._data.size)

    def reshape(self, *shape) -> None:
        """``reshape(n, c, h, w)`` or ``reshape((n, c, h, w))``.  Same element count: the
        data is kept (re-viewed, as Caffe keeps the memory); otherwise new zeros."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        try:
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise TypeError(f"Blob.reshape takes integer dimensions, got {shape!r}") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"Blob.reshape: negative dimension in {shape}")
        self._shaped = True
        if shape == self._data.shape:
            return
        if math.prod(shape) == self._data.size:
            self._data = self._data.reshape(shape)
            self._diff = self._diff.reshape(shape)
        else:
            self._data = np.zeros(shape, np.float32)
            self._diff = np.zeros(shape, np.float32)

    def _legacy(self, i: int) -> int:
        if self._data.ndim > 4:
            raise ValueError(f"num/channels/height/width need a blob of at most 4 axes; this "
                             f"one has shape {self.shape}")
        return self.shape[i] if i < self._data.ndim else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape})"


class BlobVec(list):
    """``self.blobs``: a list of Blob with pycaffe's ``add_blob(*shape)``."""

    def add_blob(self, *shape) -> None:
        b = Blob(())
        b.reshape(*shape)
        self.append(b)


class PythonLayer:
    """Base class for Python layers (pycaffe's ``caffe.Layer``); override setup, reshape,
    forward and, for training, backward."""

    param_str: str = ""
    phase: int = TEST

    def __init__(self, *args, **kwargs):
        self.blobs = BlobVec()

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        raise NotImplementedError("a Python layer must define reshape(self, bottom, top) "
                                  "to give its tops their shapes")

    def forward(self, bottom, top):
        raise NotImplementedError("a Python layer must define forward(self, bottom, top)")

    def backward(self, top, propagate_down, bottom):
        pass


# ---------------------------------------------------------------------------------------
def _describe(attrs) -> str:
    return f"'{attrs.get('module', '')}.{attrs.get('layer', '')}'"


def _user_frame(exc: BaseException) -> str:
    """'file:line' of the innermost traceback frame outside graphc, if any."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    where = ""
    for fr in traceback.extract_tb(exc.__traceback__):
        if not os.path.abspath(fr.filename).startswith(here + os.sep):
            where = f"{fr.filename}:{fr.lineno}"
    return where


def load_class(attrs):
    """Import python_param.module (from sys.path, then ``search_dir``) and return the
    class python_param.layer."""
    module, name = attrs.get("module", ""), attrs.get("layer", "")
    if not module or not name:
        raise OpError("a Python layer needs python_param { module: \"...\" layer: \"...\" }",
                      hint="name the Python module (file without .py) and the class in it")
    search_dir = attrs.get("search_dir")
    importlib.invalidate_caches()          # the module may have been written just now
    try:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing_self = e.name == module or module.startswith(f"{e.name}.")
            if not (missing_self and search_dir and os.path.isdir(search_dir)):
                raise
            if search_dir not in sys.path:
                sys.path.append(search_dir)
                importlib.invalidate_caches()
            mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module or module.startswith(f"{e.name}."):
            where = f"sys.path or {search_dir}" if search_dir else "sys.path"
            raise OpError(f"Python layer: cannot import module '{module}' (not found on "
                          f"{where})", hint=f"check python_param.module; put {module}.py next "
                          f"to the prototxt or add its directory to PYTHONPATH") from e
        raise OpError(f"Python layer: importing module '{module}' failed: {e}",
                      hint=f"module '{module}' imports '{e.name}', which is not installed; "
                           f"install it or fix the import") from e
    except Exception as e:
        at = _user_frame(e)
        raise OpError(f"Python layer: importing module '{module}' raised "
                      f"{type(e).__name__}: {e}" + (f" (at {at})" if at else ""),
                      hint=f"fix the error in module '{module}'") from e
    cls = getattr(mod, name, None)
    if cls is None or not isinstance(cls, type):
        classes = sorted(k for k, v in vars(mod).items()
                         if isinstance(v, type) and v.__module__ == mod.__name__)
        raise OpError(f"Python layer: module '{module}' ({getattr(mod, '__file__', '?')}) has "
                      f"no class '{name}'",
                      hint="check python_param.layer; classes defined there: "
                           + (", ".join(classes) or "(none)"))
    for method in ("reshape", "forward"):
        if not callable(getattr(cls, method, None)):
            raise OpError(f"Python layer class {_describe(attrs)} has no {method}() method",
                          hint="subclass graphc.PythonLayer and define setup, reshape, forward")
    return cls


def _call(attrs, layer, method: str, *args):
    try:
        getattr(layer, method)(*args)
    except OpError:
        raise
    except Exception as e:
        at = _user_frame(e)
        raise OpError(f"Python layer {_describe(attrs)}: {method}() raised "
                      f"{type(e).__name__}: {e}" + (f" (at {at})" if at else ""),
                      hint=f"fix {method}() in module '{attrs.get('module')}'"
                           + ("; check python_param.param_str" if method == "setup" else "")) \
            from e


def instantiate(attrs, bottoms: list[Blob], tops: list[Blob]):
    """Create the layer, set param_str and phase, and run setup then reshape."""
    cls = load_class(attrs)
    try:
        layer = cls()
    except Exception as e:
        raise OpError(f"Python layer {_describe(attrs)}: creating the instance raised "
                      f"{type(e).__name__}: {e}",
                      hint="the class must be constructible without arguments; do the work "
                           "in setup()") from e
    if not isinstance(getattr(layer, "blobs", None), list):
        layer.blobs = BlobVec()
    layer.param_str = attrs.get("param_str", "")
    layer.phase = TRAIN if attrs.get("phase", "test") == "train" else TEST
    _call(attrs, layer, "setup", bottoms, tops)
    _call(attrs, layer, "reshape", bottoms, tops)
    return layer


@register
class Python(Op):
    type = "Python"
    caffe_param = "python_param"
    num_inputs = (0, None)
    num_outputs = (0, None)

    def from_caffe(self, layer, phase):
        p = layer.python_param
        return {"module": p.module, "layer": p.layer, "param_str": p.param_str,
                "share_in_parallel": bool(p.share_in_parallel), "phase": phase,
                "num_top": len(layer.top), "search_dir": None}

    def _top_types(self, attrs, tops: list[Blob]) -> list[TensorType]:
        for i, t in enumerate(tops):
            if not t._shaped:
                raise OpError(f"Python layer {_describe(attrs)} did not give top {i} a shape",
                              hint="call top[i].reshape(...) in reshape() for every top")
        return [TensorType(t.shape, "f32") for t in tops]

    def infer(self, attrs, in_types, param_types):
        bottoms = [Blob(t.shape) for t in in_types]
        tops = [Blob() for _ in range(int(attrs.get("num_top", 1)))]
        instantiate(attrs, bottoms, tops)
        return self._top_types(attrs, tops)

    def forward(self, attrs, inputs, params, ctx):
        st = ctx.state
        bottoms = [Blob(data=x) for x in inputs]
        if "layer" not in st:
            tops = [Blob() for _ in range(int(attrs.get("num_top", 1)))]
            st["layer"] = instantiate(attrs, bottoms, tops)
            st["tops"] = tops
        layer, tops = st["layer"], st["tops"]
        _call(attrs, layer, "reshape", bottoms, tops)
        self._top_types(attrs, tops)
        _call(attrs, layer, "forward", bottoms, tops)
        return [np.array(t.data, dtype=np.float32, copy=True) for t in tops]

    def backward(self, attrs, inputs, params, outputs, grad_outputs, need_inputs,
                 need_params, ctx):
        """The layer's ``backward(top, propagate_down, bottom)`` on the instance of the
        forward call: the tops keep their forward data and get the gradients as ``diff``
        (zeros where none reaches a top); the bottoms hold the forward inputs, with zero
        ``diff`` the layer fills in."""
        st = ctx.state
        if "layer" not in st:
            raise OpError(f"Python layer {_describe(attrs)}: backward before forward",
                          hint="run forward before backward")
        layer, tops = st["layer"], st["tops"]
        for t, dy in zip(tops, grad_outputs):
            t.diff[...] = 0 if dy is None else np.asarray(dy).reshape(t.shape)
        bottoms = [Blob(data=x) for x in inputs]
        _call(attrs, layer, "backward", tops, list(need_inputs), bottoms)
        grads = []
        for i, (b, need) in enumerate(zip(bottoms, need_inputs)):
            if not need:
                grads.append(None)
                continue
            if b.diff.shape != np.shape(inputs[i]):
                raise OpError(f"Python layer {_describe(attrs)}: backward() reshaped bottom "
                              f"{i} to {list(b.diff.shape)} (it is {list(np.shape(inputs[i]))})",
                              hint="write the gradient into bottom[i].diff[...] without "
                                   "reshaping the bottom")
            grads.append(np.array(b.diff, copy=True))
        return grads, []

    def cost(self, attrs, in_types, param_types, out_types):
        return Cost(flops=sum(t.numel for t in out_types),
                    bytes=sum(t.nbytes for t in (*in_types, *out_types)))
