"""The ``graphc`` command line.  Input errors print one clear message (file:line, layer,
what to change) and exit with status 1, never a Python traceback."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import GraphcError


def _add_net_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("net", help="the net's .prototxt")
    p.add_argument("--weights", help="a .caffemodel to load")
    p.add_argument("--phase", choices=("train", "test"), default="test")
    p.add_argument("--level", type=int, help="NetState level (include/exclude rules)")
    p.add_argument("--stage", action="append", default=[], help="NetState stage (repeatable)")
    p.add_argument("--batch", type=int, help="batch size for the net's inputs")
    p.add_argument("--input", action="append", default=[], metavar="BLOB=D1,D2,...",
                   type=_input_shape,
                   help="shape of an input blob; naming every top of a data layer feeds "
                        "those blobs instead of reading the layer's source (repeatable)")


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        shape = None
    if not sep or not name or shape is None or any(d < 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected BLOB=D1,D2,... (e.g. data=1,3,224,224), "
                                         f"got {text!r}")
    return name, shape


def _load_graph(args):
    from .frontend.lower import lower
    from .frontend.prototxt import read_net
    g = lower(read_net(args.net), args.phase, level=getattr(args, "level", None),
              stages=getattr(args, "stage", None) or (),
              batch=args.batch, input_shapes=dict(getattr(args, "input", None) or []))
    if args.weights:
        from .frontend.weights import load_weights_into
        load_weights_into(g, args.weights)
    return g


def cmd_dump(args) -> int:
    from .cost import graph_cost, human, node_cost
    from .ir.text import print_graph
    from .passes import run_pipeline
    g = _load_graph(args)
    shown = []

    def show(name, graph):
        shown.append((name, graph))

    from .passes import TRAIN_PIPELINE
    names = TRAIN_PIPELINE if args.phase == "train" else None
    if args.passes is not None:
        names = [x.strip() for x in args.passes.split(",") if x.strip()]
    g = run_pipeline(g, names, after=args.after,
                     on_pass=show if args.print_after_all else None)
    if args.json:
        per, total = graph_cost(g)
        doc = {
            "graph": g.name,
            "inputs": [{"name": v, "blob": g.blob_of[v], "type": str(g.types[v])} for v in g.inputs],
            "outputs": g.outputs,
            "params": [{"name": p.name, "type": str(p.type), "lr_mult": p.lr_mult,
                        "decay_mult": p.decay_mult} for p in g.params.values()],
            "nodes": [{"name": n.name, "op": n.op, "inputs": n.inputs, "params": n.params,
                       "outputs": [{"name": o, "blob": g.blob_of[o], "type": str(g.types[o])}
                                   for o in n.outputs],
                       "attrs": n.attrs, "loc": n.loc,
                       "flops": per[n.name].flops, "bytes": per[n.name].bytes} for n in g.nodes],
            "losses": [{"value": v, "weight": w} for v, w in g.losses],
            "param_grads": g.param_grads,
            "totals": {"flops": total.flops, "bytes": total.bytes,
                       "param_count": sum(p.type.numel for p in g.params.values()),
                       "param_bytes": sum(p.type.nbytes for p in g.params.values())},
        }
        json.dump(doc, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    for name, graph in shown:
        sys.stdout.write(f"// ---- IR after {name} ----\n")
        sys.stdout.write(print_graph(graph))
    if shown:
        return 0

    def note(n):
        c = node_cost(g, n)
        return f"flops={human(c.flops)} bytes={human(c.bytes, 'B')}"

    sys.stdout.write(print_graph(g, annotate=note))
    per, total = graph_cost(g)
    nparam = sum(p.type.numel for p in g.params.values())
    sys.stdout.write(f"// totals: {len(g.nodes)} nodes, flops={human(total.flops)} "
                     f"({total.flops}), bytes={human(total.bytes, 'B')} ({total.bytes}), "
                     f"params={nparam} ({human(4 * nparam, 'B')})\n")
    return 0


def _cmd_memory(args) -> int:
    from .passes.memory import cmd_memory
    return cmd_memory(args)


def _cmd_viz(args) -> int:
    from .viz import cmd_viz
    return cmd_viz(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="graphc", description="A static graph compiler for Caffe nets.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dump", help="print the IR (with shapes, flops and bytes per node)")
    _add_net_args(p)
    p.add_argument("--after", metavar="PASS", help="print the IR after this pass")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--passes", metavar="P1,P2,...",
                   help="run these passes, in this order, instead of the default pipeline "
                        "(e.g. dead-code,fold-batchnorm,fuse,layout; '' for none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_dump)
    p = sub.add_parser("memory", help="memory report: Caffe's naive allocation, the lower "
                                      "bound, and the planned arena")
    _add_net_args(p)
    p.add_argument("--recompute", action="store_true",
                   help="train phase: also plan with cheap layers recomputed in backward "
                        "(used when that lowers the peak)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_memory)
    p = sub.add_parser("viz", help="draw the graph as SVG: fused groups, buffer sharing, memory")
    _add_net_args(p)
    p.add_argument("--after", metavar="PASS",
                   help="draw the IR after this pass (default: after the whole pipeline)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.svg", help="the SVG to write")
    p.set_defaults(func=_cmd_viz)
    from .data.convert import add_convert_data_parser
    add_convert_data_parser(sub)
    from .train.cli import add_train_parsers
    add_train_parsers(sub)
    from .runtime.commands import add_parsers as add_cpu_parsers
    add_cpu_parsers(sub)
    from .export import add_export_parser
    add_export_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GraphcError as e:
        print(f"graphc: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        name = getattr(e, "filename", None)
        print(f"graphc: error: {name + ': ' if name else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
