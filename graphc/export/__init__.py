"""Exporting graphc nets to other formats: ONNX (``graphc.export.onnx``, needs the optional
``onnx`` package: ``pip install 'graphc[onnx]'``)."""
from __future__ import annotations


def export_onnx(net_or_graph, path=None, **kwargs):
    """See ``graphc.export.onnx.export_onnx`` (imported lazily: onnx is optional)."""
    from .onnx import export_onnx as _export
    return _export(net_or_graph, path, **kwargs)


def add_export_parser(sub) -> None:
    """The ``graphc export`` subcommand."""
    p = sub.add_parser("export", help="write the net (test phase, with its weights) as an "
                                      "ONNX model (needs: pip install 'graphc[onnx]')")
    p.add_argument("net", help="the net's .prototxt")
    p.add_argument("--weights", help="a .caffemodel to load (default: the layers' fillers)")
    p.add_argument("--batch", type=int, help="batch size for the net's inputs")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("-o", "--output", required=True, metavar="NET.onnx",
                   help="the ONNX file to write")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .onnx import cmd_export
    return cmd_export(args)
