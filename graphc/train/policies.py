"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``).

    fixed      base_lr
    step       base_lr * gamma ^ floor(iter / stepsize)
    exp        base_lr * gamma ^ iter
    inv        base_lr * (1 + gamma * iter) ^ (-power)
    multistep  base_lr * gamma ^ (number of stepvalue entries passed)
    poly       base_lr * (1 - iter / max_iter) ^ power
    sigmoid    base_lr / (1 + exp(-gamma * (iter - stepsize)))

The arithmetic follows Caffe's C++ types so the rate has the same float32 bits: ``step``,
``exp`` and ``multistep`` call ``pow(float, int)``, which C++ evaluates in double; ``inv``,
``poly`` and ``sigmoid`` stay in float.  ``multistep`` advances ``current_step`` by at most
one per call (Caffe calls it once per iteration); ``step`` recomputes it from ``iter``.
"""
from __future__ import annotations

import numpy as np

from ..errors import GraphcError

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

f32 = np.float32


def check_policy(sp, where: str | None = None) -> None:
    """Raise a GraphcError for a policy Caffe would reject (at its first use)."""
    policy = sp.lr_policy
    if not policy:
        raise GraphcError("the solver has no lr_policy", where=where,
                          hint="add lr_policy: \"fixed\" (or one of "
                               + ", ".join(POLICIES[1:]) + ")")
    if policy not in POLICIES:
        raise GraphcError(f"unknown lr_policy \"{policy}\"", where=where,
                          hint="use one of: " + ", ".join(POLICIES))
    if policy in ("step", "sigmoid") and sp.stepsize <= 0:
        raise GraphcError(f"lr_policy \"{policy}\" needs stepsize > 0 (it is {sp.stepsize})",
                          where=where, hint="set stepsize: N (iterations)")
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and sp.gamma < 0:
        raise GraphcError(f"lr_policy \"{policy}\" needs gamma >= 0 (it is {sp.gamma:g})",
                          where=where, hint="set gamma to a non-negative value")
    if policy == "poly" and sp.max_iter <= 0:
        raise GraphcError("lr_policy \"poly\" needs max_iter > 0", where=where,
                          hint="set max_iter: N")


def learning_rate(sp, it: int, current_step: int) -> tuple[np.float32, int]:
    """(rate, current_step) at iteration ``it``, exactly as Caffe computes them."""
    policy = sp.lr_policy
    base = f32(sp.base_lr)
    if policy == "fixed":
        return base, current_step
    if policy == "step":
        current_step = it // sp.stepsize
        return f32(float(base) * float(f32(sp.gamma)) ** current_step), current_step
    if policy == "exp":
        return f32(float(base) * float(f32(sp.gamma)) ** it), current_step
    if policy == "multistep":
        if current_step < len(sp.stepvalue) and it >= sp.stepvalue[current_step]:
            current_step += 1
        return f32(float(base) * float(f32(sp.gamma)) ** current_step), current_step
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if policy == "inv":
            return base * np.power(f32(1) + f32(sp.gamma) * f32(it), -f32(sp.power)), \
                current_step
        if policy == "poly":
            return base * np.power(f32(1) - f32(it) / f32(sp.max_iter), f32(sp.power)), \
                current_step
        if policy == "sigmoid":
            e = np.exp(-f32(sp.gamma) * (f32(it) - f32(sp.stepsize)))
            return base * (f32(1) / (f32(1) + e)), current_step
    check_policy(sp)  # raises: the policy is unknown
    raise GraphcError(f"unknown lr_policy \"{policy}\"", hint="use one of: " + ", ".join(POLICIES))
