"""Passes: each a pure function Graph -> Graph registered under a name; a pipeline is a
list of names.  ``graphc dump --after NAME`` prints the IR after that pass."""
from __future__ import annotations

from typing import Callable

from ..errors import GraphcError
from ..ir.graph import Graph
from ..ir.verify import verify

PASSES: dict[str, Callable[[Graph], Graph]] = {}

#: the inference pipeline, in order
DEFAULT_PIPELINE: list[str] = []

#: the training pipeline (``--phase train``): no inference-only rewrites (they fold away
#: Dropout, BatchNorm statistics updates and Split nodes a backward graph needs)
TRAIN_PIPELINE: list[str] = []


def register_pass(name: str):
    def deco(fn):
        if name in PASSES:
            raise TypeError(f"pass {name!r} registered twice")
        PASSES[name] = fn
        fn.pass_name = name
        return fn
    return deco


def run_pipeline(g: Graph, names: list[str] | None = None, *, after: str | None = None,
                 on_pass: Callable[[str, Graph], None] | None = None) -> Graph:
    """Run ``names`` (default: DEFAULT_PIPELINE), verifying after each pass; stop after
    ``after`` if given. ``on_pass(name, graph)`` sees the IR after each pass; the
    pseudo-pass "lower" is the IR as lowered from Caffe."""
    names = list(DEFAULT_PIPELINE if names is None else names)
    known = ["lower", *names]
    if after is not None and after not in known:
        raise GraphcError(f"unknown pass '{after}'",
                          hint=f"passes in this pipeline: {', '.join(known)}")
    if on_pass:
        on_pass("lower", g)
    if after == "lower":
        return g
    for name in names:
        if name not in PASSES:
            raise GraphcError(f"unknown pass '{name}'", hint=f"known: {', '.join(PASSES)}")
        g = verify(PASSES[name](g))
        if on_pass:
            on_pass(name, g)
        if name == after:
            break
    return g


# ---- the passes (each module registers itself) ------------------------------------------
from . import dead_code, fold_bn, fuse, concat, inplace  # noqa: E402,F401

DEFAULT_PIPELINE[:] = ["dead-code", "fold-batchnorm", "fuse", "concat-slices", "inplace"]

from . import autodiff, recompute, pool_argmax  # noqa: E402,F401
TRAIN_PIPELINE[:] = ["autodiff"]

# opt-in, for the backends that run blocked kernels: run_pipeline(g, [..., "layout"])
from . import layout  # noqa: E402,F401
