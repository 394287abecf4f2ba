"""Caffe's weight fillers: ``fill(filler_dict, shape, rng) -> np.float32 array``.

``filler_dict`` is what ``ops.base.filler_to_dict`` makes from a FillerParameter (missing
keys take Caffe's defaults: type "constant", value 0, min 0, max 1, mean 0, std 1,
sparse -1, variance_norm FAN_IN).  The values are drawn from ``rng`` (a numpy Generator),
so they follow Caffe's distributions, not its exact random stream.

Caffe's conventions that matter:

* fan_in = count / shape[0] and fan_out = count / shape[1] (count for a 1-D blob), whatever
  the layer: for a Convolution weight (out, in/g, kh, kw) that is in/g*kh*kw and
  out*kh*kw; for a Deconvolution weight (in, out/g, kh, kw) the roles are swapped.
* xavier: U(-a, a) with a = sqrt(3 / n); msra: N(0, 2 / n), n = fan_in, fan_out or their
  mean (``variance_norm``).
* gaussian with ``sparse`` >= 0 keeps each value with probability sparse / shape[0].
* positive_unitball: U(0, 1), then every slice along axis 0 is divided by its sum.
* bilinear: the upsampling kernel for a square 4-D Deconvolution weight,
  f = ceil(k / 2), c = (k - 1) / (2 f), w(x, y) = (1 - |x/f - c|) (1 - |y/f - c|).
* Only gaussian accepts ``sparse``; Caffe rejects it elsewhere, and so does this module.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import OpError

DEFAULTS = {"type": "constant", "value": 0.0, "min": 0.0, "max": 1.0, "mean": 0.0,
            "std": 1.0, "sparse": -1, "variance_norm": "FAN_IN"}

VARIANCE_NORMS = ("FAN_IN", "FAN_OUT", "AVERAGE")


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape:
        raise OpError("the xavier/msra fillers need a blob with at least one axis")
    count = math.prod(shape)
    fan_in = count // shape[0]
    fan_out = count // shape[1] if len(shape) > 1 else count
    return fan_in, fan_out


def _n(f: dict, shape) -> float:
    """The variance-normalising count of xavier/msra."""
    fan_in, fan_out = _fans(shape)
    norm = f["variance_norm"]
    if norm not in VARIANCE_NORMS:
        raise OpError(f"unknown filler variance_norm {norm!r}",
                      hint=f"use one of {', '.join(VARIANCE_NORMS)}")
    if norm == "FAN_OUT":
        return float(fan_out)
    if norm == "AVERAGE":
        return (fan_in + fan_out) / 2.0
    return float(fan_in)


def _constant(f, shape, rng):
    return np.full(shape, f["value"], dtype=np.float64)


def _uniform(f, shape, rng):
    if f["max"] < f["min"]:
        raise OpError(f"uniform filler has min {f['min']} > max {f['max']}",
                      hint="swap min and max")
    return rng.uniform(f["min"], f["max"], shape)


def _gaussian(f, shape, rng):
    if f["std"] < 0:
        raise OpError(f"gaussian filler has a negative std {f['std']}",
                      hint="give std >= 0")
    data = rng.normal(f["mean"], f["std"], shape)
    sparse = int(f["sparse"])
    if sparse >= 0:
        if not shape:
            raise OpError("a sparse gaussian filler needs a blob with at least one axis")
        p = sparse / shape[0]
        data = data * (rng.random(shape) < p)
    return data


def _positive_unitball(f, shape, rng):
    data = rng.uniform(0.0, 1.0, shape)
    num = shape[0] if shape else 1
    rows = data.reshape(num, -1)
    return (rows / rows.sum(axis=1, keepdims=True)).reshape(shape)


def _xavier(f, shape, rng):
    scale = math.sqrt(3.0 / _n(f, shape))
    return rng.uniform(-scale, scale, shape)


def _msra(f, shape, rng):
    return rng.normal(0.0, math.sqrt(2.0 / _n(f, shape)), shape)


def _bilinear(f, shape, rng):
    if len(shape) != 4 or shape[2] != shape[3]:
        raise OpError(f"the bilinear filler needs a 4-D blob with a square kernel, got "
                      f"shape {list(shape)}",
                      hint="use it for a Deconvolution weight with kernel_h == kernel_w")
    k = shape[3]
    fsz = math.ceil(k / 2.0)
    c = (k - 1) / (2.0 * fsz)
    t = 1.0 - np.abs(np.arange(k) / fsz - c)
    return np.broadcast_to(np.outer(t, t), shape).copy()


FILLERS = {"constant": _constant, "uniform": _uniform, "gaussian": _gaussian,
           "positive_unitball": _positive_unitball, "xavier": _xavier, "msra": _msra,
           "bilinear": _bilinear}


#: the FillerParameter fields each filler reads
USES = {"constant": ("value",), "uniform": ("min", "max"), "gaussian": ("mean", "std", "sparse"),
        "positive_unitball": (), "xavier": ("variance_norm",), "msra": ("variance_norm",),
        "bilinear": ()}


def compact(filler: dict) -> dict:
    """Only the fields ``filler``'s type reads (what a readable IR dump should show);
    ``sparse`` only when set.  Unknown types keep everything (``fill`` rejects them)."""
    kind = filler.get("type", "constant")
    if kind not in USES:
        return dict(filler)
    out = {"type": kind}
    for key in USES[kind]:
        if key in filler and not (key == "sparse" and int(filler[key]) == -1):
            out[key] = filler[key]
    return out


def fill(filler: dict | None, shape, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a float32 array of ``shape`` as Caffe's filler ``filler`` would."""
    f = dict(DEFAULTS)
    f.update({k: v for k, v in (filler or {}).items() if v is not None})
    shape = tuple(int(d) for d in shape)
    kind = f["type"]
    if kind not in FILLERS:
        raise OpError(f"unknown filler type {kind!r}",
                      hint=f"use one of {', '.join(sorted(FILLERS))}")
    if any(d < 0 for d in shape):
        raise OpError(f"cannot fill a blob of shape {list(shape)}")
    if math.prod(shape) == 0:
        raise OpError(f"cannot fill an empty blob (shape {list(shape)})",
                      hint="every dimension of a filled blob must be positive")
    if kind != "gaussian" and int(f["sparse"]) != -1:
        raise OpError(f"the {kind} filler does not support sparse (got sparse: {f['sparse']})",
                      hint="remove sparse, or use the gaussian filler")
    if kind == "gaussian" and int(f["sparse"]) < -1:
        raise OpError(f"sparse must be >= -1, got {f['sparse']}")
    if rng is None:
        rng = np.random.default_rng()
    return np.asarray(FILLERS[kind](f, shape, rng), dtype=np.float32)
