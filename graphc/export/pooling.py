"""Caffe's pooling geometry, restated for frameworks that pool with plain floor rounding.

Caffe's output size rounds up and then drops a last window that would start in the end
padding (``graphc.ops.pool``); AVE divides by the window clipped to the *padded* extent.
Other frameworks round differently and divide differently, so an exporter should not
rely on their ``ceil_mode``.  ``pool_plan`` gives an equivalent recipe in the terms every
framework shares:

1. crop ``crop_end`` trailing rows/columns no window reads (a FLOOR-rounded pooling can
   leave some), then pad ``pad_begin`` before and ``pad_end`` after each spatial axis so the
   last window ends exactly at the padded edge;
2. pool with floor rounding and no further padding: MAX over the padded window (padding
   never wins), AVE as ``sum / (kh * kw)`` (every window lies inside the padded tensor);
3. AVE: multiply by ``ave_ratio`` = kh*kw / Caffe's divisor (None when it is 1 everywhere);
   MAX: where a window holds no image pixel (``empty``) Caffe outputs -FLT_MAX, so clamp
   the result from below at -FLT_MAX.

The output size of step 2 is exactly Caffe's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ops.pool import FLT_MAX, ave_pool_divisor, pool_geometry

__all__ = ["PoolPlan", "pool_plan", "FLT_MAX"]


@dataclass
class PoolPlan:
    method: str                 # "MAX" | "AVE" | "STOCHASTIC"
    global_pooling: bool
    kernel: list[int]
    stride: list[int]
    pad: list[int]              # Caffe's symmetric pad
    out: list[int]              # Caffe's output size (H, W)
    pad_begin: list[int]        # = pad
    pad_end: list[int]          # >= 0: padding after, so the last window ends at the edge
    crop_end: list[int]         # >= 0: trailing input rows/cols no window reads
    empty: bool                 # some window covers no image pixel (Caffe: -FLT_MAX for MAX)
    ave_ratio: np.ndarray | None  # (OH, OW) float32 kh*kw / divisor, None when all 1


def pool_plan(attrs: dict, in_shape) -> PoolPlan:
    """The recipe above for a Pooling node with ``attrs`` on an (N, C, H, W) input."""
    kernel, stride, pad, out = pool_geometry(attrs, tuple(in_shape))
    hw = list(in_shape[2:])
    pad_end, crop_end, empty = [], [], False
    for n, k, s, p, o in zip(hw, kernel, stride, pad, out):
        need = (o - 1) * s + k - n - p          # padded extent the last window needs past n
        pad_end.append(max(need, 0))
        crop_end.append(max(-need, 0))
        starts = np.arange(o) * s - p
        lo, hi = np.maximum(starts, 0), np.minimum(starts + k, n)
        empty = empty or bool((hi <= lo).any())
    ratio = None
    if attrs["pool"] == "AVE":
        div = ave_pool_divisor(hw, kernel, stride, pad, out).astype(np.float64)
        with np.errstate(divide="ignore"):
            r = (kernel[0] * kernel[1]) / div
        if not np.all(r == 1.0):
            ratio = r.astype(np.float32)
    return PoolPlan(attrs["pool"], bool(attrs.get("global_pooling")), list(kernel),
                    list(stride), list(pad), list(out), list(pad), pad_end, crop_end, empty,
                    ratio)
