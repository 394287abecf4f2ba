"""graphc's intermediate representation: typed values, nodes, graph, verifier, text form."""
from .types import TensorType, DTYPES, f32
from .graph import Node, Param, Graph
from .text import print_graph, parse_graph
from .verify import verify

__all__ = ["TensorType", "DTYPES", "f32", "Node", "Param", "Graph", "print_graph",
           "parse_graph", "verify"]
