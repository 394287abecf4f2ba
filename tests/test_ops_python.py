"""The Python layer: a user module written to tmp_path, run through infer and forward."""
import sys
import uuid

import numpy as np
import pytest
from google.protobuf import text_format

from graphc.errors import OpError
from graphc.ir.types import TensorType
from graphc.ops import Context, get_op
from graphc.ops.python_layer import Blob

LAYERS = '''
import numpy as np
from graphc.ops.python_layer import PythonLayer

CALLS = []

class ScaleAndSum(PythonLayer):
    """top0 = k * bottom0 + bottom1; top1 = per-example sum of bottom0, shape (N,)."""
    def setup(self, bottom, top):
        CALLS.append("setup")
        if len(bottom) != 2:
            raise Exception("need two bottoms")
        self.k = float(self.param_str)
        self.seen_phase = self.phase

    def reshape(self, bottom, top):
        CALLS.append("reshape")
        top[0].reshape(*bottom[0].shape)
        top[1].reshape(bottom[0].num)

    def forward(self, bottom, top):
        CALLS.append("forward")
        top[0].data[...] = self.k * bottom[0].data + bottom[1].data
        top[1].data[...] = bottom[0].data.reshape(bottom[0].num, -1).sum(axis=1)

    def backward(self, top, propagate_down, bottom):
        pass

class Counter:
    """Duck-typed (no base class): counts forward calls into its top."""
    def setup(self, bottom, top):
        self.n = 0
    def reshape(self, bottom, top):
        top[0].reshape(1)
    def forward(self, bottom, top):
        self.n += 1
        top[0].data[0] = self.n

class BadSetup(PythonLayer):
    def setup(self, bottom, top):
        raise ValueError("param_str must be a number, got " + repr(self.param_str))
    def reshape(self, bottom, top):
        top[0].reshape(1)

class NoTopShape(PythonLayer):
    def reshape(self, bottom, top):
        pass
    def forward(self, bottom, top):
        pass
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A fresh module name (so imports never hit a cached module) on sys.path."""
    name = f"pylayers_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def attrs(module, layer, param_str="", num_top=1, phase="test", search_dir=None):
    return {"module": module, "layer": layer, "param_str": param_str,
            "share_in_parallel": False, "phase": phase, "num_top": num_top,
            "search_dir": search_dir}


def test_python_layer_infer_and_forward(rng, module):
    op = get_op("Python")
    a = attrs(module, "ScaleAndSum", param_str="2.5", num_top=2, phase="train")
    types = op.infer(a, [TensorType((3, 2, 4)), TensorType((3, 2, 4))], [])
    assert [t.shape for t in types] == [(3, 2, 4), (3,)]

    ctx = Context("train")
    for shape in [(3, 2, 4), (3, 2, 4), (5, 3)]:       # the last call changes the shapes
        x = rng.standard_normal(shape).astype(np.float32)
        y = rng.standard_normal(shape).astype(np.float32)
        t0, t1 = op.forward(a, [x, y], [], ctx)
        want0 = np.full(shape, np.nan)
        want1 = np.full(shape[0], np.nan)
        for idx in np.ndindex(*shape):
            want0[idx] = 2.5 * float(x[idx]) + float(y[idx])
        for n in range(shape[0]):
            want1[n] = sum(float(v) for v in x[n].ravel())
        assert t0.dtype == np.float32 and t0.shape == shape and t1.shape == (shape[0],)
        assert np.linalg.norm(t0 - want0) / np.linalg.norm(want0) < 1e-6
        assert np.linalg.norm(t1 - want1) / np.linalg.norm(want1) < 1e-6

    calls = sys.modules[module].CALLS
    # infer: setup + reshape on a throwaway instance; forward: setup + reshape once, then
    # (as Caffe's Layer::Forward) reshape + forward on every call
    assert calls == ["setup", "reshape"] + ["setup", "reshape"] + ["reshape", "forward"] * 3
    inst = ctx.state["layer"]
    assert inst.seen_phase == 0 and inst.param_str == "2.5"    # caffe.TRAIN == 0


def test_python_layer_state_persists_and_outputs_are_copies(module):
    op = get_op("Python")
    a = attrs(module, "Counter")
    ctx = Context()
    x = np.zeros((2, 3), np.float32)
    outs = [op.forward(a, [x], [], ctx)[0] for _ in range(3)]
    assert [float(o[0]) for o in outs] == [1.0, 2.0, 3.0]
    assert op.infer(a, [TensorType((2, 3))], [])[0].shape == (1,)


def test_python_layer_search_dir(tmp_path, monkeypatch):
    name = f"nearby_{uuid.uuid4().hex[:10]}"
    d = tmp_path / "netdir"
    d.mkdir()
    (d / f"{name}.py").write_text(LAYERS)
    monkeypatch.setattr(sys, "path", list(sys.path))       # undo the append afterwards
    try:
        with pytest.raises(OpError, match="cannot import module"):
            get_op("Python").infer(attrs(name, "Counter"), [TensorType((1,))], [])
        t = get_op("Python").infer(attrs(name, "Counter", search_dir=str(d)),
                                   [TensorType((1,))], [])
        assert t[0].shape == (1,)
    finally:
        sys.modules.pop(name, None)


def test_python_layer_errors(module):
    op = get_op("Python")
    with pytest.raises(OpError, match="no_such_module_xyz") as e:
        op.infer(attrs("no_such_module_xyz", "X"), [TensorType((1,))], [])
    assert "PYTHONPATH" in e.value.hint

    with pytest.raises(OpError, match="has no class 'Missing'") as e:
        op.infer(attrs(module, "Missing"), [TensorType((1,))], [])
    assert "ScaleAndSum" in e.value.hint and "Counter" in e.value.hint

    with pytest.raises(OpError) as e:
        op.infer(attrs(module, "BadSetup", param_str="abc"), [TensorType((1,))], [])
    msg = str(e.value)
    assert f"{module}.BadSetup" in msg and "setup()" in msg and "ValueError" in msg
    assert "'abc'" in msg and f"{module}.py:" in msg and "param_str" in e.value.hint

    with pytest.raises(OpError, match="need two bottoms"):
        op.infer(attrs(module, "ScaleAndSum", "1", num_top=2), [TensorType((2,))], [])

    with pytest.raises(OpError, match="did not give top 0 a shape"):
        op.infer(attrs(module, "NoTopShape"), [TensorType((2,))], [])


def test_python_layer_import_error_in_module(tmp_path, monkeypatch):
    name = f"broken_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text("import not_installed_pkg_abc\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(OpError, match="not_installed_pkg_abc"):
        get_op("Python").infer(attrs(name, "X"), [TensorType((1,))], [])
    sys.modules.pop(name, None)


def test_blob_interface():
    b = Blob()
    b.reshape(2, 3, 4)
    assert b.shape == (2, 3, 4) and b.count == 24
    assert (b.num, b.channels, b.height, b.width) == (2, 3, 4, 1)
    b.data[...] = np.arange(24).reshape(2, 3, 4)
    b.reshape((6, 4))                         # same count: data kept
    assert b.data[5, 3] == 23 and b.diff.shape == (6, 4)
    b.reshape(5)
    assert b.shape == (5,) and not b.data.any()
    b.data = 7.0                              # assignment copies in
    assert (b.data == 7).all()


def test_python_from_caffe():
    from graphc.frontend import caffe_pb2
    layer = text_format.Parse(
        'name: "py" type: "Python" bottom: "a" top: "b" top: "c" '
        'python_param { module: "m" layer: "L" param_str: "{\'k\': 1}" }',
        caffe_pb2.LayerParameter())
    assert get_op("Python").from_caffe(layer, "train") == {
        "module": "m", "layer": "L", "param_str": "{'k': 1}", "share_in_parallel": False,
        "phase": "train", "num_top": 2, "search_dir": None}
