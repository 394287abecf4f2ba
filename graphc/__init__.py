"""graphc: a static graph compiler for Caffe nets.

    net = graphc.Net("net.prototxt", weights="net.caffemodel", phase="test")
    out = net.forward(data=x)
"""
from .errors import GraphcError
from .net import Net
from .runtime.loader import load
from .ops.python_layer import PythonLayer
from .frontend.netspec import NetSpec, L, P, to_proto
from .train import (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver,
                    AdamSolver, get_solver)
layers, params = L, P   # pycaffe spells them caffe.layers and caffe.params

__all__ = ["Net", "load", "NetSpec", "L", "P", "layers", "params", "to_proto", "PythonLayer", "GraphcError",
           "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver", "get_solver"]
__version__ = "0.1.0"
