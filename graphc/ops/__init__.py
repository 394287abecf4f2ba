"""Ops: one module per op family; each op's shape rule, reference, cost (and gradient)
live together on one class (see base.py). Importing this package registers them all."""
from .base import (Op, ParamSpec, Cost, Context, register, get_op, has_op, all_ops)  # noqa: F401
from . import activation, elementwise  # noqa: F401,E402
from . import tensor, softmax, loss, python_layer  # noqa: F401,E402
from . import fillers, conv, pool, linear, norm, data  # noqa: F401,E402
from . import fused  # noqa: F401,E402
from . import data_layers  # noqa: F401,E402
from . import grad  # noqa: F401,E402
from . import layout  # noqa: F401,E402
