"""The IR's text form: a printer and a parser that round-trip.

    graph "LeNet" {
      input %data: f32[64,1,28,28]
      param $conv1.0: f32[20,1,5,5] {lr_mult=1.0, decay_mult=1.0}
      %conv1: f32[64,20,24,24] = Convolution($conv1.0, ...) ...
      %conv1~relu1: f32[64,20,24,24] = ReLU(%conv1) {negative_slope=0.0} name="relu1" blobs=["conv1"]
      () = Silence(%label) name="silence"
      loss %loss weight=1.0
      grad $conv1.0 = %$conv1.0@grad
      grad %data = %data@grad
      force_backward
      output %prob
    }

A type is ``dtype[dims]``, with ``{LAYOUT}`` after it when the value has a physical
layout (``f32[1,64,56,56]{NCHW8c}``; ir/types.py).  ``%`` marks values, ``$`` parameters; names outside ``[A-Za-z0-9_./-~#+@$]`` are quoted
(``%"odd name"``).  A node line is ``outputs = Op(inputs, params) {attrs} name=... loc=...
blobs=[...]``; ``blobs`` appears only when an output's Caffe blob name differs from its
value name (in-place layers).  ``//`` starts a comment (the dump puts costs there).
Attribute values are ints, floats, true/false, null, strings, lists and ``{k=v}`` dicts.
Training graphs add ``loss`` lines (a loss term and its weight), ``grad`` lines (a param
or value and the value holding its gradient) and ``force_backward``.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from ..errors import GraphcError
from .graph import Graph, Node, Param
from .types import TensorType

_BARE = re.compile(r"[A-Za-z0-9_./\-~#+@$]+\Z")


def _name(sigil: str, name: str) -> str:
    return sigil + (name if _BARE.match(name) else json.dumps(name))


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={format_value(x)}" for k, x in v.items()) + "}"
    if hasattr(v, "item"):  # numpy scalar
        return format_value(v.item())
    raise TypeError(f"attribute value {v!r} of type {type(v).__name__} has no IR text form")


def format_attrs(attrs: dict) -> str:
    return format_value(dict(attrs)) if attrs else ""


def print_graph(g: Graph, annotate: Callable[[Node], str] | None = None) -> str:
    """The text form of ``g``. ``annotate(node)`` may return a comment for each node line."""
    lines = [f"graph {json.dumps(g.name)} {{"]
    for v in g.inputs:
        line = f"  input {_name('%', v)}: {g.types[v]}"
        if g.blob_of.get(v, v) != v:
            line += f" blob={json.dumps(g.blob_of[v])}"
        lines.append(line)
    for p in g.params.values():
        extra = {"lr_mult": p.lr_mult, "decay_mult": p.decay_mult}
        lines.append(f"  param {_name('$', p.name)}: {p.type} {format_attrs(extra)}")
    for n in g.nodes:
        outs = ", ".join(f"{_name('%', o)}: {g.types[o]}" for o in n.outputs) or "()"
        args = ", ".join([_name("%", i) for i in n.inputs] + [_name("$", p) for p in n.params])
        line = f"  {outs} = {n.op}({args})"
        if n.attrs:
            line += " " + format_attrs(n.attrs)
        line += f" name={json.dumps(n.name)}"
        if n.loc:
            line += f" loc={json.dumps(n.loc)}"
        blobs = [g.blob_of.get(o, o) for o in n.outputs]
        if blobs != list(n.outputs):
            line += f" blobs={format_value(blobs)}"
        if annotate is not None:
            note = annotate(n)
            if note:
                line += f"  // {note}"
        lines.append(line)
    for v, w in g.losses:
        lines.append(f"  loss {_name('%', v)} weight={format_value(float(w))}")
    for p, v in g.param_grads.items():
        lines.append(f"  grad {_name('$', p)} = {_name('%', v)}")
    for x, v in g.value_grads.items():
        lines.append(f"  grad {_name('%', x)} = {_name('%', v)}")
    if g.force_backward:
        lines.append("  force_backward")
    if g.outputs:
        lines.append("  output " + ", ".join(_name("%", o) for o in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# parser

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+|//[^\n]*)
  | (?P<nl>\n)
  | (?P<val>[%$](?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_./\-~#+@$]+))
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|-inf\b)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}()\[\],:=])
""", re.VERBOSE)


class _Tok:
    __slots__ = ("kind", "text", "line", "col")

    def __init__(self, kind, text, line, col):
        self.kind, self.text, self.line, self.col = kind, text, line, col


def _tokenize(text: str, filename: str) -> list[_Tok]:
    toks, pos, line, line_start = [], 0, 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise GraphcError(f"unexpected character {text[pos]!r} in IR text",
                              where=f"{filename}:{line}:{pos - line_start + 1}")
        kind = m.lastgroup
        if kind == "nl":
            line, line_start = line + 1, m.end()
        elif kind != "ws":
            toks.append(_Tok(kind, m.group(), line, m.start() - line_start + 1))
        pos = m.end()
    toks.append(_Tok("eof", "", line, pos - line_start + 1))
    return toks


class _Parser:
    def __init__(self, text: str, filename: str):
        self.filename = filename
        self.toks = _tokenize(text, filename)
        self.i = 0

    # -- token helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def error(self, msg: str, tok: _Tok | None = None) -> GraphcError:
        t = tok or self.tok
        return GraphcError(f"{msg} (found {t.text!r})" if t.text else msg,
                           where=f"{self.filename}:{t.line}:{t.col}")

    def next(self) -> _Tok:
        t = self.tok
        self.i += 1
        return t

    def accept(self, text: str) -> bool:
        if self.tok.text == text and self.tok.kind in ("punct", "ident"):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> _Tok:
        if not (self.tok.text == text and self.tok.kind in ("punct", "ident")):
            raise self.error(f"expected {text!r}")
        return self.next()

    def expect_kind(self, kind: str, what: str) -> _Tok:
        if self.tok.kind != kind:
            raise self.error(f"expected {what}")
        return self.next()

    def ref(self, sigil: str) -> str:
        t = self.tok
        if t.kind != "val" or t.text[0] != sigil:
            raise self.error(f"expected a {'value (%name)' if sigil == '%' else 'param ($name)'}")
        self.i += 1
        body = t.text[1:]
        return json.loads(body) if body.startswith('"') else body

    # -- grammar
    def type_(self) -> TensorType:
        dtok = self.expect_kind("ident", "a tensor type like f32[1,2]")
        dtype = dtok.text
        self.expect("[")
        dims = []
        while not self.accept("]"):
            if dims:
                self.expect(",")
            dims.append(int(self.expect_kind("num", "a dimension").text))
        layout = None
        # a layout is `{NAME}`; a param's `{lr_mult=...}` that may follow a type is not
        if self.tok.text == "{" and self.toks[self.i + 2].text == "}" \
                and self.toks[self.i + 1].kind == "ident":
            self.i += 1
            ltok = self.next()
            layout = ltok.text
            self.expect("}")
            try:
                TensorType((), layout=layout)
            except ValueError as e:
                raise self.error(str(e), ltok)
        try:
            return TensorType(tuple(dims), dtype, layout)
        except ValueError as e:
            raise self.error(str(e), dtok)

    def value(self) -> Any:
        t = self.tok
        if t.kind == "num":
            self.i += 1
            if t.text == "-inf":
                return -math.inf
            return float(t.text) if any(c in t.text for c in ".eE") else int(t.text)
        if t.kind == "str":
            self.i += 1
            return json.loads(t.text)
        if t.kind == "ident":
            consts = {"true": True, "false": False, "null": None, "inf": math.inf, "nan": math.nan}
            if t.text in consts:
                self.i += 1
                return consts[t.text]
        if self.accept("["):
            items = []
            while not self.accept("]"):
                if items:
                    self.expect(",")
                items.append(self.value())
            return items
        if t.text == "{":
            return self.attrs()
        raise self.error("expected an attribute value")

    def attrs(self) -> dict:
        self.expect("{")
        d: dict = {}
        while not self.accept("}"):
            if d:
                self.expect(",")
            key = self.expect_kind("ident", "an attribute name").text
            self.expect("=")
            d[key] = self.value()
        return d

    def graph(self) -> Graph:
        self.expect("graph")
        g = Graph(json.loads(self.expect_kind("str", "the graph's name in quotes").text))
        self.expect("{")
        while not self.accept("}"):
            self.statement(g)
        if self.tok.kind != "eof":
            raise self.error("text after the end of the graph")
        return g

    def statement(self, g: Graph) -> None:
        t = self.tok
        if t.kind == "ident" and t.text == "input":
            self.i += 1
            name = self.ref("%")
            self.expect(":")
            typ = self.type_()
            blob = None
            if self.accept("blob"):
                self.expect("=")
                blob = json.loads(self.expect_kind("str", "a blob name").text)
            g.add_input(name, typ, blob)
        elif t.kind == "ident" and t.text == "param":
            self.i += 1
            name = self.ref("$")
            self.expect(":")
            typ = self.type_()
            extra = self.attrs() if self.tok.text == "{" else {}
            g.add_param(Param(name, typ, float(extra.get("lr_mult", 1.0)),
                              float(extra.get("decay_mult", 1.0))))
        elif t.kind == "ident" and t.text == "loss":
            self.i += 1
            v = self.ref("%")
            self.expect("weight")
            self.expect("=")
            w = self.value()
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise self.error("expected a number for the loss weight")
            g.losses.append((v, float(w)))
        elif t.kind == "ident" and t.text == "grad":
            self.i += 1
            if self.tok.kind == "val" and self.tok.text[0] == "$":
                p = self.ref("$")
                self.expect("=")
                g.param_grads[p] = self.ref("%")
            else:
                x = self.ref("%")
                self.expect("=")
                g.value_grads[x] = self.ref("%")
        elif t.kind == "ident" and t.text == "force_backward":
            self.i += 1
            g.force_backward = True
        elif t.kind == "ident" and t.text == "output":
            self.i += 1
            g.outputs.append(self.ref("%"))
            while self.accept(","):
                g.outputs.append(self.ref("%"))
        else:
            self.node(g)

    def node(self, g: Graph) -> None:
        first = self.tok
        outs: list[tuple[str, TensorType]] = []
        if self.accept("("):
            self.expect(")")
        else:
            while True:
                name = self.ref("%")
                self.expect(":")
                outs.append((name, self.type_()))
                if not self.accept(","):
                    break
        self.expect("=")
        op = self.expect_kind("ident", "an op name").text
        self.expect("(")
        inputs, params = [], []
        while not self.accept(")"):
            if inputs or params:
                self.expect(",")
            if self.tok.kind == "val" and self.tok.text[0] == "$":
                params.append(self.ref("$"))
            else:
                if params:
                    raise self.error("values (%) must come before params ($)")
                inputs.append(self.ref("%"))
        attrs = self.attrs() if self.tok.text == "{" else {}
        meta: dict[str, Any] = {}
        while self.tok.kind == "ident" and self.tok.text in ("name", "loc", "blobs"):
            key = self.next().text
            self.expect("=")
            meta[key] = self.value()
        if "name" not in meta:
            raise self.error("a node needs name=\"...\"", first)
        blobs = meta.get("blobs")
        if blobs is not None and len(blobs) != len(outs):
            raise self.error(f"blobs= lists {len(blobs)} names for {len(outs)} outputs", first)
        g.add_node(Node(op, meta["name"], inputs, [o for o, _ in outs], params, attrs,
                        meta.get("loc")), [t for _, t in outs], blobs)


def parse_graph(text: str, filename: str = "<ir>") -> Graph:
    """Parse the text form back into a Graph (raises GraphcError with file:line:col)."""
    return _Parser(text, filename).graph()
