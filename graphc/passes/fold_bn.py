"""``fold-batchnorm``: BatchNorm (+ Scale) at inference becomes weights.

Caffe's BatchNorm with ``use_global_stats`` computes, per channel c (axis 1),

    y = (x - mean_c) / sqrt(var_c + eps),   mean = blob0 * f, var = blob1 * f,
    f = 0 if blob2 == 0 else 1 / blob2      (blob2 is the moving-average scale factor)

and a following Scale (one bottom, axis 1, one value per channel) computes
``z = y * gamma_c (+ beta_c)``.  Together: ``z = x * a_c + d_c`` with
``a = gamma / sqrt(var + eps)`` and ``d = beta - mean * a``.

* When x is the only use of the output of a Convolution / Deconvolution / InnerProduct
  with channels on axis 1 and a single bottom, the affine goes into that layer's weights:
  ``W'[c] = W[c] * a_c``, ``b' = b * a + d`` (a bias is added when there was none).  The
  layer keeps its name and writes the value the BatchNorm/Scale wrote; its params are
  new (``<layer>.w+bn`` style names, new arrays).
* Otherwise the BatchNorm (+ Scale) becomes one ``Scale`` node with bias (a, d).

The folded values are computed in float64 and stored as float32.  Params without data
(a net dumped without weights) fold to params of the right shape with ``data=None``.
A BatchNorm lowered for training (``use_global_stats`` false) is left alone.
"""
from __future__ import annotations

import numpy as np

from ..ir.graph import Graph, Node, Param
from ..ir.types import TensorType
from ..ops.base import canonical_axis
from . import register_pass
from .util import cleanup, fresh_name, readers, sole_reader

_FOLD_INTO = ("Convolution", "Deconvolution", "InnerProduct")


def _data(g: Graph, names: list[str]) -> list[np.ndarray] | None:
    arrays = [g.params[p].data for p in names]
    if any(a is None for a in arrays):
        return None
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _affine(g: Graph, bn: Node, scale: Node | None, channels: int):
    """(a, d) per channel as float64 arrays, or None when some blob has no data."""
    stats = _data(g, bn.params)
    extra = _data(g, scale.params) if scale is not None else []
    if stats is None or extra is None:
        return None
    mean, var, s = stats
    f = 0.0 if s.reshape(-1)[0] == 0 else 1.0 / s.reshape(-1)[0]
    eps = float(bn.attrs.get("eps", 1e-5))
    inv_std = 1.0 / np.sqrt(var * f + eps)
    gamma = extra[0].reshape(channels) if scale is not None else np.ones(channels)
    beta = (extra[1].reshape(channels) if scale is not None and scale.attrs.get("bias_term")
            else np.zeros(channels))
    a = gamma * inv_std
    return a, beta - mean * f * a


def _bn_foldable(g: Graph, n: Node) -> bool:
    return (n.op == "BatchNorm" and n.attrs.get("use_global_stats", True)
            and len(n.inputs) == 1 and len(n.params) == 3 and g.types[n.inputs[0]].rank >= 2)


def _mergeable_scale(g: Graph, bn: Node, rd) -> Node | None:
    """The Scale right after ``bn`` that can join it: the sole reader of bn's output, one
    bottom, a learned per-channel factor on axis 1."""
    y = bn.outputs[0]
    s = sole_reader(g, y, rd)
    if s is None or s.op != "Scale" or len(s.inputs) != 1 or s.inputs[0] != y:
        return None
    t = g.types[y]
    if canonical_axis(int(s.attrs.get("axis", 1)), t.rank) != 1:
        return None
    if not s.params or g.params[s.params[0]].type.shape != (t.shape[1],):
        return None
    return s


def _producer_foldable(g: Graph, n: Node | None, x: str, rd) -> bool:
    if n is None or n.op not in _FOLD_INTO or len(n.inputs) != 1 or len(n.outputs) != 1:
        return False
    if sole_reader(g, x, rd) is None:
        return False
    t = g.types[x]
    if n.op == "InnerProduct":
        return canonical_axis(int(n.attrs.get("axis", 1)), g.types[n.inputs[0]].rank) == 1
    return canonical_axis(int(n.attrs.get("axis", 1)), t.rank) == 1


def _scaled_weight(op: str, attrs: dict, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Multiply the weight's output-channel slices by a."""
    if op == "InnerProduct":
        return w * (a[None, :] if attrs.get("transpose") else a[:, None])
    if op == "Convolution":
        return w * a.reshape((-1,) + (1,) * (w.ndim - 1))
    # Deconvolution: (in, out/group, k...); output channel = group g's block + j
    group = int(attrs.get("group", 1))
    cin, opg = w.shape[0], w.shape[1]
    wg = w.reshape((group, cin // group, opg) + w.shape[2:])
    ag = a.reshape((group, 1, opg) + (1,) * (w.ndim - 2))
    return (wg * ag).reshape(w.shape)


def _new_param(g: Graph, base: str, t: TensorType, data, like: Param | None) -> str:
    name = fresh_name(base, g.params)
    g.add_param(Param(name, t, like.lr_mult if like else 1.0, like.decay_mult if like else 1.0,
                      None if data is None else np.asarray(data, dtype=np.float32),
                      dict(like.filler) if like and like.filler else None))
    return name


def _fold_into_producer(g: Graph, prod: Node, bn: Node, scale: Node | None, out: str) -> Node:
    channels = g.types[bn.inputs[0]].shape[1]
    ab = _affine(g, bn, scale, channels)
    wp = g.params[prod.params[0]]
    has_bias = bool(prod.attrs.get("bias_term", True))
    bp = g.params[prod.params[1]] if has_bias else None
    w_new = b_new = None
    if ab is not None and wp.data is not None and (bp is None or bp.data is not None):
        a, d = ab
        w_new = _scaled_weight(prod.op, prod.attrs, np.asarray(wp.data, np.float64), a)
        b = np.asarray(bp.data, np.float64) if bp is not None else np.zeros(channels)
        b_new = b * a + d
    tag = "+".join([bn.name] + ([scale.name] if scale else []))
    node = prod.copy()
    node.params = [_new_param(g, f"{prod.name}.0+{tag}", wp.type, w_new, wp),
                   _new_param(g, f"{prod.name}.1+{tag}", TensorType((channels,)), b_new, bp)]
    node.attrs["bias_term"] = True
    node.outputs = [out]
    return node


def _affine_node(g: Graph, bn: Node, scale: Node | None, out: str) -> Node:
    channels = g.types[bn.inputs[0]].shape[1]
    ab = _affine(g, bn, scale, channels)
    name = "+".join([bn.name] + ([scale.name] if scale else []))
    t = TensorType((channels,))
    a, d = ab if ab is not None else (None, None)
    params = [_new_param(g, f"{name}.0", t, a, None), _new_param(g, f"{name}.1", t, d, None)]
    attrs = {"axis": 1, "num_axes": 1, "bias_term": True,
             "filler": {"type": "constant", "value": 1.0},
             "bias_filler": {"type": "constant", "value": 0.0}}
    return Node("Scale", name, [bn.inputs[0]], [out], params, attrs, bn.loc)


@register_pass("fold-batchnorm")
def fold_batchnorm(g: Graph) -> Graph:
    g = g.copy()
    rd = readers(g)
    producer = g.producers()
    replace: dict[str, Node] = {}     # node name -> its replacement
    drop: set[str] = set()
    for bn in g.nodes:
        if bn.name in drop or not _bn_foldable(g, bn):
            continue
        scale = _mergeable_scale(g, bn, rd)
        out = (scale or bn).outputs[0]
        x = bn.inputs[0]
        prod = producer.get(x)
        if prod is not None and prod.name in replace:   # already folded once
            prod = None
        if _producer_foldable(g, prod, x, rd):
            replace[prod.name] = _fold_into_producer(g, prod, bn, scale, out)
            drop.add(bn.name)
        else:
            replace[bn.name] = _affine_node(g, bn, scale, out)
        if scale is not None:
            drop.add(scale.name)
    g.nodes = [replace.get(n.name, n) for n in g.nodes if n.name not in drop]
    return cleanup(g)
