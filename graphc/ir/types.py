"""Tensor types of IR values.

A type is the *logical* shape and dtype (what the reference executor, the ops' shape
rules and the user see) plus an optional physical ``layout`` saying how a backend
arranges the bytes (passes/layout.py chooses it):

* ``None``: plain row-major (C order) -- every value unless the ``layout`` pass ran;
* ``"NCHW<x>c"`` (e.g. ``NCHW8c``): a blocked channel layout of a 4-D (N, C, H, W) f32
  value, stored as the row-major array (N, ceil(C/x), H, W, x): logical channel c is at
  block c // x, lane c % x.  When x does not divide C the last block is padded with
  channels that hold zeros (a backend writing a blocked value writes zeros there), so
  ``nbytes`` counts ceil(C/x) * x channels.

Two types are equal only when their layouts are too.  Text form: ``f32[1,64,56,56]{NCHW8c}``.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import re

import numpy as np

# IR dtype name -> numpy dtype
DTYPES = {
    "f32": np.dtype(np.float32),
    "f64": np.dtype(np.float64),
    "f16": np.dtype(np.float16),
    "i32": np.dtype(np.int32),
    "i64": np.dtype(np.int64),
}

_BLOCKED = re.compile(r"NCHW([1-9][0-9]*)c\Z")


def blocked_layout(block: int) -> str:
    """The name of the blocked channel layout with ``block`` channels per block."""
    return f"NCHW{int(block)}c"


def layout_block(layout: str | None) -> int | None:
    """Channels per block of a blocked layout name (``"NCHW8c"`` -> 8); None for plain.
    Raises ValueError for a name that is neither."""
    if layout is None:
        return None
    m = _BLOCKED.match(layout) if isinstance(layout, str) else None
    if not m:
        raise ValueError(f"unknown layout {layout!r}; known: NCHW<x>c (e.g. NCHW8c) or "
                         f"none (plain row-major)")
    return int(m.group(1))


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str = "f32"
    layout: str | None = None     # None: plain row-major; "NCHW8c": see the module doc

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        layout_block(self.layout)   # a known layout name (rank and dtype: ir/verify.py)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def block(self) -> int | None:
        """Channels per block of a blocked layout, None when plain."""
        return layout_block(self.layout)

    @property
    def physical_shape(self) -> tuple[int, ...]:
        """The shape of the array the bytes form: the logical shape when plain; for
        NCHW<x>c (N, ceil(C/x), H, W, x) -- axis 1 split into blocks of x channels, the
        lane innermost."""
        x = self.block
        if x is None or self.rank < 2:
            return self.shape
        n, c, *rest = self.shape
        return (n, -(-c // x), *rest, x)

    @property
    def nbytes(self) -> int:
        """Bytes of storage, with a blocked layout's padding channels."""
        return math.prod(self.physical_shape) * self.itemsize

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def with_shape(self, shape) -> "TensorType":
        """The same dtype with another shape, plain (a layout belongs to one shape)."""
        return TensorType(tuple(shape), self.dtype)

    def with_layout(self, layout: str | None) -> "TensorType":
        return TensorType(self.shape, self.dtype, layout)

    @property
    def plain(self) -> "TensorType":
        """This type without a layout (the logical type)."""
        return self if self.layout is None else TensorType(self.shape, self.dtype)

    def __str__(self) -> str:
        text = f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"
        return text if self.layout is None else f"{text}{{{self.layout}}}"

    @staticmethod
    def of(array: np.ndarray) -> "TensorType":
        for name, dt in DTYPES.items():
            if dt == array.dtype:
                return TensorType(array.shape, name)
        raise ValueError(f"no IR dtype for numpy dtype {array.dtype}")


def f32(*shape) -> TensorType:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return TensorType(tuple(shape), "f32")
