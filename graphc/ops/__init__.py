"""Ops: one module per op family; each op's shape rule, reference, cost (and gradient)
live together on one class (see base.py). Importing this package registers them all."""
from .base import (Op, ParamSpec, Cost, Context, register, get_op, has_op, all_ops)  # noqa: F401
