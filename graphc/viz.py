"""``graphc viz``: draw a graph as an SVG picture a person can read.

What the picture shows:

* one box per node: op type (bold), layer name, output shape; a ``Fused`` node is a dashed
  group box listing its steps top to bottom (with the BatchNorm/Scale layers that
  ``fold-batchnorm`` folded into a step's weights, read from the folded params' names);
* graph inputs and outputs as rounded terminals; one edge per read of a value, labelled
  with the value's shape below the node that writes it (where the label fits);
* buffer sharing from the memory planner (passes/memory.py): values living in one arena
  buffer (in place, views, Concat slices) share a colour, and their nodes carry a tag with
  the buffer id (``B7``, ``B7 in-place``, ``B7 slice``); values with a buffer of their own
  are grey.  A legend lists the shared buffers with size, arena offset and members; the
  title gives the net, the phase, the passes run and planned vs naive (Caffe) memory.

The layout is computed here (no graphviz): longest-path layers, long edges split by
dummy points (one chain per value, shared by its far readers), barycenter sweeps to order
each layer, then x positions by repeated least-squares placement (pool-adjacent-violators)
towards the neighbours' centres.  Graphs flow top to bottom, so deep nets come out tall
and narrow; the canvas is sized from the layout.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from .ir.graph import Graph, Node

FONT = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"
PALETTE = ["#1f77b4", "#e6550d", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939"]
GREY_EDGE, GREY_STRIPE = "#8a9099", "#c9ced4"
MARGIN, LAYER_GAP, NODE_GAP, DUMMY_GAP = 24, 38, 22, 8

# ---- text metrics (DejaVu Sans advance widths, rounded up; in em) ---------------------------
_W = {**{c: 0.30 for c in "iljI.,:;'|!"}, **{c: 0.40 for c in "ft()[]{}/\\ r-"},
      **{c: 0.90 for c in "mwMW×→%@"}, "_": 0.52, "·": 0.34, "…": 1.0}


def text_width(s: str, size: float, bold: bool = False) -> float:
    em = sum(_W.get(c, 0.74 if c.isupper() else 0.64) for c in s)
    return em * size * (1.1 if bold else 1.0)


def _mib(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def _shape(t) -> str:
    s = "×".join(str(d) for d in t.shape) or "scalar"
    return s if t.dtype == "f32" else f"{t.dtype} {s}"


def _x(s) -> str:
    return escape(str(s), {'"': "&quot;"})


def _folded(g: Graph, layer: str | None, params: list[str]) -> list[str]:
    """Layers ``fold-batchnorm`` folded into ``layer``'s weights: it names the new weight
    ``<layer>.0+<bn>[+<scale>]`` (``#k`` appended when taken)."""
    if not layer or not params:
        return []
    head = f"{layer}.0+"
    p = params[0]
    if not p.startswith(head):
        return []
    return [s for s in p[len(head):].split("#")[0].split("+") if s]


# ---- what is drawn ---------------------------------------------------------------------------
@dataclass
class _Box:
    key: str
    kind: str                        # node | fused | input | output | dummy
    w: float = 8.0
    h: float = 0.0
    layer: int = 0
    x: float = 0.0                   # centre
    y: float = 0.0                   # top
    node: Node | None = None
    value: str | None = None         # terminals and dummies: the value
    order: float = 0.0               # initial ordering key
    lines: list = field(default_factory=list)   # [(text parts, size, height)]
    steps: list = field(default_factory=list)   # fused: [(op, name, folded)]
    tag: tuple | None = None         # (text, colour)


class _Memory:
    """Buffer ids and colours from the memory plan."""

    def __init__(self, g: Graph):
        from .passes.alias import alias_parents, root_of
        from .passes.memory import plan_memory
        self.plan = plan = plan_memory(g)
        parents = alias_parents(g)
        self.root = {v: root_of(v, parents)[0] for v in g.types}
        bufs = sorted(plan.buffers, key=lambda b: (b.start, b.root))
        self.id = {b.root: f"B{i}" for i, b in enumerate(bufs)}
        self.shared = [b for b in bufs if len(b.members) > 1]
        self.colour = {b.root: PALETTE[i % len(PALETTE)] for i, b in enumerate(self.shared)}

    def edge_colour(self, v: str) -> str:
        return self.colour.get(self.root.get(v), GREY_EDGE)

    def stripe(self, v: str) -> str:
        return self.colour.get(self.root.get(v), GREY_STRIPE)

    def is_shared(self, v: str) -> bool:
        return self.root.get(v) in self.colour


def _node_tag(g: Graph, n: Node, mem: _Memory) -> tuple | None:
    if not n.outputs or not mem.is_shared(n.outputs[0]):
        return None
    out = n.outputs[0]
    bid = mem.id[mem.root[out]]
    if n.attrs.get("inplace") is not None:
        return f"{bid} in-place", mem.stripe(out)
    if n.op == "Concat" and n.attrs.get("by_slices"):
        return f"{bid} slices", mem.stripe(out)
    if n.op in ("Reshape", "Flatten", "Split"):
        return f"{bid} view", mem.stripe(out)
    if mem.root[out] != out:
        return f"{bid} slice", mem.stripe(out)
    return bid, mem.stripe(out)


def _out_shapes(g: Graph, n: Node) -> str:
    shapes = [_shape(g.types[o]) for o in n.outputs]
    if len(shapes) <= 2:
        return ", ".join(shapes) or "no outputs"
    return f"{len(shapes)} outputs"


def _make_node_box(g: Graph, n: Node, mem: _Memory, order: float) -> _Box:
    b = _Box("n:" + n.name, "fused" if n.op == "Fused" else "node", node=n, order=order)
    b.tag = _node_tag(g, n, mem)
    tag_w = text_width(b.tag[0], 9) + 16 if b.tag else 0
    pad = 10
    if b.kind == "fused":
        body = n.attrs.get("body", [])
        for step in body:
            ps = [n.params[i] for i in step.get("params", []) if i < len(n.params)]
            b.steps.append((step.get("op", "?"), step.get("name", ""),
                            _folded(g, step.get("name"), ps)))
        head = [("Fused", 12, True), (f"  {len(body)} layers", 10, False)]
        widths = [sum(text_width(t, s, bo) for t, s, bo in head) + tag_w]
        for op, name, folded in b.steps:
            widths.append(text_width(op, 11, True) + text_width("  " + name, 11) + 16)
            if folded:
                widths.append(text_width("+ folded " + ", ".join(folded), 9) + 16)
        widths.append(text_width(_out_shapes(g, n), 10))
        b.w = max(widths) + 2 * pad + 4
        b.h = 24 + sum(_step_h(s) + 8 for s in b.steps) + 14
        b.lines = [head]
        return b
    folded = _folded(g, n.name, n.params)
    b.lines = [[(n.op, 12, True)], [(n.name, 11, False)], [(_out_shapes(g, n), 10, False)]]
    if folded:
        b.lines.append([("+ folded " + ", ".join(folded), 9, False)])
    widths = [text_width(n.op, 12, True) + tag_w, text_width(n.name, 11),
              text_width(_out_shapes(g, n), 10)]
    if folded:
        widths.append(text_width(b.lines[-1][0][0], 9))
    b.w = max(widths) + 2 * pad + 6
    b.h = 10 + 15 + 14 + 13 + (12 if folded else 0)
    return b


def _step_h(step) -> float:
    return 19 + (12 if step[2] else 0)


def _make_terminal(g: Graph, v: str, kind: str, order: float) -> _Box:
    b = _Box(("i:" if kind == "input" else "o:") + v, kind, value=v, order=order)
    label = g.blob_of.get(v, v) if kind == "input" else v
    b.lines = [[(kind, 10, False), ("  " + label, 11, True)], [(_shape(g.types[v]), 10, False)]]
    b.w = max(text_width(kind + "  ", 10) + text_width(label, 11, True),
              text_width(_shape(g.types[v]), 10)) + 36
    b.h = 38
    return b


# ---- layout ----------------------------------------------------------------------------------
class _Layout:
    def __init__(self, g: Graph, mem: _Memory):
        self.g = g
        self.boxes: dict[str, _Box] = {}
        producer: dict[str, str] = {}
        index = {n.name: i for i, n in enumerate(g.nodes)}
        for v in g.inputs:
            self._add(_make_terminal(g, v, "input", -1))
            producer[v] = "i:" + v
        for n in g.nodes:
            self._add(_make_node_box(g, n, mem, index[n.name]))
            for o in n.outputs:
                producer[o] = "n:" + n.name
        for v in g.outputs:
            self._add(_make_terminal(g, v, "output", len(g.nodes)))
        self.producer = producer
        # reads: (value, source box, target box)
        self.reads = [(v, producer[v], "n:" + n.name) for n in g.nodes for v in n.inputs
                      if v in producer]
        self.reads += [(v, producer[v], "o:" + v) for v in g.outputs if v in producer]
        self._layers()
        self._dummies()
        self._order()
        self._place_x()
        self._place_y()

    def _add(self, b: _Box) -> None:
        self.boxes[b.key] = b

    def _layers(self) -> None:
        preds: dict[str, list[str]] = {k: [] for k in self.boxes}
        succs: dict[str, list[str]] = {k: [] for k in self.boxes}
        for _, s, t in self.reads:
            preds[t].append(s)
            succs[s].append(t)
        lay = {}
        for k in self.boxes:                 # insertion order is topological
            lay[k] = 1 + max((lay[p] for p in preds[k]), default=-1)
        # sources (inputs, nodes reading nothing) sit just above their first reader
        for k in reversed(list(self.boxes)):
            if not preds[k] and succs[k]:
                lay[k] = max(0, min(lay[s] for s in succs[k]) - 1)
        for k, b in self.boxes.items():
            b.layer = lay[k]
        self.n_layers = max(lay.values(), default=-1) + 1

    def _dummies(self) -> None:
        """Split reads spanning several layers with one dummy chain per value."""
        self.routes: list[tuple[str, list[str]]] = []
        segs: dict[tuple[str, str], float] = {}
        for v, s, t in self.reads:
            ls, lt = self.boxes[s].layer, self.boxes[t].layer
            path = [s]
            for L in range(ls + 1, lt):
                key = f"d:{v}:{L}"
                if key not in self.boxes:
                    self._add(_Box(key, "dummy", value=v, layer=L,
                                   order=self.boxes[s].order + 0.5))
                path.append(key)
            path.append(t)
            self.routes.append((v, path))
            for a, b in zip(path, path[1:]):
                da, db = self.boxes[a].kind == "dummy", self.boxes[b].kind == "dummy"
                segs[(a, b)] = 8.0 if da and db else 2.0 if da or db else 1.0
        self.segs = segs
        self.up = {k: [] for k in self.boxes}
        self.down = {k: [] for k in self.boxes}
        for (a, b), w in segs.items():
            self.down[a].append((b, w))
            self.up[b].append((a, w))

    def _order(self) -> None:
        layers: list[list[str]] = [[] for _ in range(self.n_layers)]
        for k, b in sorted(self.boxes.items(), key=lambda kb: kb[1].order):
            layers[b.layer].append(k)
        pos = {k: i for layer in layers for i, k in enumerate(layer)}
        best = ([list(x) for x in layers], self._crossings(layers, pos))
        for sweep in range(8):
            rng = range(1, self.n_layers) if sweep % 2 == 0 else range(self.n_layers - 2, -1, -1)
            nbrs = self.up if sweep % 2 == 0 else self.down
            for L in rng:
                def bary(k):
                    ns = nbrs[k]
                    return (sum(pos[n] for n, _ in ns) / len(ns) if ns else pos[k], pos[k])
                layers[L].sort(key=bary)
                for i, k in enumerate(layers[L]):
                    pos[k] = i
            c = self._crossings(layers, pos)
            if c < best[1]:
                best = ([list(x) for x in layers], c)
        self.layers = best[0]

    def _crossings(self, layers, pos) -> int:
        total = 0
        for L in range(len(layers) - 1):
            pairs = sorted((pos[a], pos[b]) for a in layers[L] for b, _ in self.down[a])
            seen: list[int] = []
            for _, q in pairs:
                total += len(seen) - bisect.bisect_right(seen, q)
                bisect.insort(seen, q)
        return total

    def _place_x(self) -> None:
        B = self.boxes
        for layer in self.layers:   # start packed, centred on 0
            x = 0.0
            for k in layer:
                B[k].x = x + B[k].w / 2
                x += B[k].w + NODE_GAP
            for k in layer:
                B[k].x -= x / 2
        for sweep in range(14):
            both = sweep >= 10
            down = sweep % 2 == 0
            order = range(len(self.layers)) if down else range(len(self.layers) - 1, -1, -1)
            for L in order:
                layer = self.layers[L]
                desired, weights = [], []
                for k in layer:
                    ns = (self.up[k] + self.down[k]) if both else (self.up[k] if down
                                                                    else self.down[k])
                    if ns:
                        tw = sum(w for _, w in ns)
                        desired.append(sum(B[n].x * w for n, w in ns) / tw)
                        weights.append(tw if B[k].kind == "dummy" else 1.0 + tw / 4)
                    else:
                        desired.append(B[k].x)
                        weights.append(0.25)
                seps = [(B[a].w + B[b].w) / 2 + (DUMMY_GAP if "dummy" in (B[a].kind, B[b].kind)
                                                  else NODE_GAP)
                        for a, b in zip(layer, layer[1:])]
                for k, x in zip(layer, _pav(desired, seps, weights)):
                    B[k].x = x
        left = min((b.x - b.w / 2 for b in B.values()), default=0.0)
        for b in B.values():
            b.x += MARGIN - left
        self.width = max((b.x + b.w / 2 for b in B.values()), default=0.0) + MARGIN

    def _place_y(self) -> None:
        y = 0.0
        self.band: list[tuple[float, float]] = []
        for layer in self.layers:
            h = max((self.boxes[k].h for k in layer), default=0.0)
            for k in layer:
                self.boxes[k].y = y
            self.band.append((y, h))
            y += h + LAYER_GAP
        self.height = max(0.0, y - LAYER_GAP)


def _pav(desired: list[float], seps: list[float], weights: list[float]) -> list[float]:
    """Centres x_i closest (weighted least squares) to ``desired`` with
    ``x[i+1] - x[i] >= seps[i]``: shift by the running separation, then fit a
    non-decreasing sequence by pooling adjacent violators."""
    off = [0.0]
    for s in seps:
        off.append(off[-1] + s)
    blocks: list[list[float]] = []       # [weighted sum, weight, count]
    for d, o, w in zip(desired, off, weights):
        blocks.append([(d - o) * w, w, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, w2, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += w2
            blocks[-1][2] += c
    ys = [b[0] / b[1] for b in blocks for _ in range(int(b[2]))]
    return [y + o for y, o in zip(ys, off)]


# ---- SVG -------------------------------------------------------------------------------------
class _Svg:
    def __init__(self):
        self.parts: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def text(self, x, y, parts, anchor="start", fill="#222"):
        """``parts``: [(text, size, bold)] run together on one line."""
        bold_attr = ' font-weight="bold"'
        spans = "".join(f'<tspan font-size="{size}"{bold_attr if bold else ""}>{_x(t)}</tspan>'
                        for t, size, bold in parts)
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}" xml:space="preserve">'
                 f'{spans}</text>')


def _tooltip(g: Graph, b: _Box, mem: _Memory) -> str:
    plan = mem.plan
    vals = b.node.outputs if b.node is not None else [b.value]
    lines = [f"{b.node.op} {b.node.name}" if b.node is not None else f"{b.kind} {b.value}"]
    if b.node is not None and b.node.loc:
        lines.append(b.node.loc)
    for v in vals:
        root = mem.root.get(v, v)
        if v in plan.offsets:
            lines.append(f"%{v}: {g.types[v]} in {mem.id.get(root, '?')} at arena offset "
                         f"{plan.offsets[v]} ({_mib(g.types[v].nbytes)})")
    return "\n".join(lines)


def _draw_tag(svg: _Svg, right: float, top: float, tag) -> None:
    text, colour = tag
    w = text_width(text, 9) + 10
    svg.add(f'<rect x="{right - w - 5:.1f}" y="{top + 5:.1f}" width="{w:.1f}" height="15" '
            f'rx="7.5" fill="{colour}"/>')
    svg.text(right - w / 2 - 5, top + 16, [(text, 9, True)], anchor="middle", fill="#fff")


def _draw_box(svg: _Svg, g: Graph, b: _Box, mem: _Memory) -> None:
    left, top = b.x - b.w / 2, b.y
    svg.add(f'<g><title>{_x(_tooltip(g, b, mem))}</title>')
    if b.kind in ("input", "output"):
        fill = "#e8f4ea" if b.kind == "input" else "#fdeede"
        stroke = "#4a8a57" if b.kind == "input" else "#c2703a"
        svg.add(f'<rect x="{left:.1f}" y="{top:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" '
                f'rx="{b.h / 2:.1f}" fill="{fill}" stroke="{stroke}" stroke-width="1.3"/>')
        (kind, ks, _), (name, ns, nb) = b.lines[0]
        svg.text(b.x, top + 16, [(kind, ks, False), (name, ns, nb)], anchor="middle")
        svg.text(b.x, top + 30, [b.lines[1][0]], anchor="middle", fill="#555")
    elif b.kind == "node":
        n = b.node
        stripe = mem.stripe(n.outputs[0]) if n.outputs else GREY_STRIPE
        svg.add(f'<rect x="{left:.1f}" y="{top:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" '
                f'rx="4" fill="#fff" stroke="#555" stroke-width="1"/>')
        svg.add(f'<rect x="{left:.1f}" y="{top:.1f}" width="6" height="{b.h:.1f}" rx="3" '
                f'fill="{stripe}"/>')
        y = top + 18
        fills = ["#111", "#222", "#555", "#777"]
        for i, line in enumerate(b.lines):
            svg.text(left + 13, y, line, fill=fills[i])
            y += (14, 13, 12, 12)[i]
        if b.tag:
            _draw_tag(svg, left + b.w, top, b.tag)
    elif b.kind == "fused":
        n = b.node
        stripe = mem.stripe(n.outputs[0]) if n.outputs else GREY_STRIPE
        svg.add(f'<rect x="{left:.1f}" y="{top:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" '
                f'rx="6" fill="#f3f5f8" stroke="#555" stroke-width="1.2" '
                f'stroke-dasharray="5 3"/>')
        svg.add(f'<rect x="{left:.1f}" y="{top:.1f}" width="6" height="{b.h:.1f}" rx="3" '
                f'fill="{stripe}"/>')
        svg.text(left + 13, top + 17, b.lines[0], fill="#111")
        if b.tag:
            _draw_tag(svg, left + b.w, top, b.tag)
        y = top + 24
        for i, step in enumerate(b.steps):
            op, name, folded = step
            h = _step_h(step)
            if i:
                svg.add(f'<path d="M{b.x:.1f},{y - 8:.1f} V{y - 1:.1f}" stroke="#777" '
                        f'stroke-width="1" marker-end="url(#mstep)"/>')
            svg.add(f'<rect x="{left + 12:.1f}" y="{y:.1f}" width="{b.w - 20:.1f}" '
                    f'height="{h:.1f}" rx="3" fill="#fff" stroke="#aab"/>')
            svg.text(left + 18, y + 14, [(op, 11, True), ("  " + name, 11, False)])
            if folded:
                svg.text(left + 18, y + 27, [("+ folded " + ", ".join(folded), 9, False)],
                         fill="#777")
            y += h + 8
        svg.text(left + 13, y + 7, [(_out_shapes(g, n), 10, False)], fill="#555")
    svg.add("</g>")


def _edges(svg: _Svg, lay: _Layout, mem: _Memory, obstacles: list) -> None:
    B = lay.boxes
    # input ports: spread the reads of a box across its top, ordered by where they come from
    incoming: dict[str, list[int]] = {}
    for i, (_, path) in enumerate(lay.routes):
        incoming.setdefault(path[-1], []).append(i)
    in_x: dict[int, float] = {}
    for t, idx in incoming.items():
        b = B[t]
        idx.sort(key=lambda i: B[lay.routes[i][1][-2]].x)
        span = min(b.w - 24, 30 * (len(idx) - 1))
        for j, i in enumerate(idx):
            in_x[i] = b.x if len(idx) == 1 else b.x - span / 2 + span * j / (len(idx) - 1)

    def out_port(key: str, v: str) -> tuple[float, float]:
        b = B[key]
        outs = b.node.outputs if b.node is not None else [v]
        j, k = outs.index(v), len(outs)
        return b.x - b.w / 2 + b.w * (j + 1) / (k + 1), b.y + b.h

    reads: dict[str, int] = {}
    for v, _ in lay.routes:
        reads[v] = reads.get(v, 0) + 1
    labelled: set[str] = set()
    labels = []
    for i, (v, path) in enumerate(lay.routes):
        colour = mem.edge_colour(v)
        width = 2.2 if mem.is_shared(v) else 1.3
        pts = [out_port(path[0], v)]
        for d in path[1:-1]:
            top, h = lay.band[B[d].layer]
            pts += [(B[d].x, top), (B[d].x, top + h)]
        pts.append((in_x[i], B[path[-1]].y))
        d = [f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"]
        for j, ((x0, y0), (x1, y1)) in enumerate(zip(pts, pts[1:])):
            if j % 2 == 0:
                my = (y1 - y0) / 2
                d.append(f"C{x0:.1f},{y0 + my:.1f} {x1:.1f},{y1 - my:.1f} {x1:.1f},{y1:.1f}")
            else:
                d.append(f"L{x1:.1f},{y1:.1f}")
        svg.add(f'<path d="{" ".join(d)}" fill="none" stroke="{colour}" '
                f'stroke-width="{width}" marker-end="url(#{_marker_id(colour)})"/>')
        if v not in labelled and reads[v] == 1:   # a fan-out's label would sit on its edges
            labelled.add(v)
            labels.append((v, pts[0], pts[1][0] - pts[0][0]))
    for v, (px, py), dx in labels:   # value shapes, below their writer, where they fit
        if B[lay.producer[v]].kind == "input":
            continue
        text = _shape(lay.g.types[v])
        w = text_width(text, 9)
        # on the side the edge does not bend to
        sides = (px - 5 - w, px + 5) if dx > 4 else (px + 5, px - 5 - w)
        for x0 in sides:
            rect = (x0, py + 2, x0 + w, py + 14)
            if not any(_hit(rect, o) for o in obstacles):
                obstacles.append(rect)
                svg.text(x0, py + 12, [(text, 9, False)], fill="#666")
                break


def _hit(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _marker_id(colour: str) -> str:
    return "m" + colour.lstrip("#")


def render_svg(g: Graph, *, phase: str = "test", stage: str = "",
               naive_bytes: int | None = None) -> str:
    """The SVG text of graph ``g`` (already through the passes).  ``stage`` says which
    passes ran; ``naive_bytes`` is Caffe's allocation for the lowered net (passes/memory.py
    ``naive_bytes``), shown beside the planned arena."""
    mem = _Memory(g)
    lay = _Layout(g, mem)
    plan = mem.plan

    # title
    title = [(g.name, 17, True), (f"   {phase} phase", 12, False)]
    if stage:
        title.append((f" · {stage}", 12, False))
    planned = (f"activations: planned arena {_mib(plan.arena_bytes)} "
               f"(lower bound {_mib(plan.lower_bound_bytes)})")
    if naive_bytes:
        planned += (f" vs naive (Caffe) {_mib(naive_bytes)} = "
                    f"{plan.arena_bytes / naive_bytes:.1%}")
    params = sum(p.type.nbytes for p in g.params.values())
    counts = (f"{len(g.nodes)} nodes · {len(plan.buffers)} buffers for {len(plan.offsets)} "
              f"values · params {_mib(params)}")
    key = ("colour = values sharing one arena buffer (grey: a buffer of its own) · "
           "dashed box = Fused node (its layers top to bottom)")
    title_lines = [title, [(planned, 11, False)], [(counts, 11, False)], [(key, 10, False)]]
    title_h = 22 + 18 * len(title_lines)
    title_w = max(sum(text_width(t, s, b) for t, s, b in line) for line in title_lines)

    # legend: the shared buffers
    legend_w = 330.0
    legend = []
    for b in mem.shared:
        head = (f"{mem.id[b.root]}  {_mib(b.size)} at {_mib(plan.buffer_offsets[b.root])}"
                f"  ({len(b.members)} values)")
        members = [b.root] + [m for m in b.members if m != b.root]
        legend.append((b.root, head, _wrap(", ".join(members), legend_w - 24, 9)))
    legend_h = 30 + sum(18 + 12 * len(m) + 6 for _, _, m in legend) + (16 if not legend else 0)

    gx, gy = 0.0, title_h
    lx = lay.width + 16
    width = max(title_w + 2 * MARGIN, lx + legend_w + MARGIN)
    height = gy + max(lay.height, legend_h) + MARGIN

    svg = _Svg()
    svg.add('<?xml version="1.0" encoding="UTF-8"?>')
    svg.add(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}">')
    svg.add(f'<title>{_x(g.name)}</title>')
    colours = {GREY_EDGE, *mem.colour.values()}
    svg.add("<defs>")
    for c in sorted(colours):
        svg.add(f'<marker id="{_marker_id(c)}" viewBox="0 0 10 10" refX="9" refY="5" '
                f'markerWidth="7" markerHeight="7" markerUnits="userSpaceOnUse" '
                f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>')
    svg.add('<marker id="mstep" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" '
            'markerHeight="6" markerUnits="userSpaceOnUse" orient="auto">'
            '<path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker>')
    svg.add("</defs>")
    svg.add(f'<rect width="{width:.0f}" height="{height:.0f}" fill="#fff"/>')
    y = 28
    for i, line in enumerate(title_lines):
        svg.text(MARGIN, y, line, fill="#111" if i == 0 else "#444")
        y += 22 if i == 0 else 17

    svg.add(f'<g transform="translate({gx:.0f},{gy:.0f})">')
    obstacles = [(b.x - b.w / 2, b.y, b.x + b.w / 2, b.y + b.h)
                 for b in lay.boxes.values() if b.kind != "dummy"]
    svg.add('<g class="edges">')
    _edges(svg, lay, mem, obstacles)
    svg.add("</g>")
    svg.add('<g class="nodes">')
    for b in lay.boxes.values():
        if b.kind != "dummy":
            _draw_box(svg, g, b, mem)
    svg.add("</g>")

    # legend
    svg.add(f'<g class="legend" transform="translate({lx:.0f},0)">')
    svg.add(f'<rect x="0" y="0" width="{legend_w:.0f}" height="{legend_h:.0f}" rx="6" '
            f'fill="#fafbfc" stroke="#ccd"/>')
    svg.text(12, 20, [("Shared buffers", 12, True), ("  (size at arena offset)", 10, False)])
    y = 30
    if not legend:
        svg.text(12, y + 12, [("none: every value has a buffer of its own", 10, False)],
                 fill="#555")
    for root, head, members in legend:
        c = mem.colour[root]
        svg.add(f'<rect x="12" y="{y + 3:.0f}" width="14" height="12" rx="2" fill="{c}"/>')
        svg.text(32, y + 13, [(head, 10, True)], fill="#222")
        y += 18
        for m in members:
            svg.text(32, y + 9, [(m, 9, False)], fill="#555")
            y += 12
        y += 6
    svg.add("</g>")
    svg.add("</g>")
    svg.add("</svg>")
    return "\n".join(svg.parts) + "\n"


def _wrap(text: str, width: float, size: float, max_lines: int = 4) -> list[str]:
    """Break ``text`` after ", " so each line fits ``width``; at most ``max_lines``."""
    items = text.split(", ")
    lines, cur = [], ""
    for it in items:
        cand = f"{cur}, {it}" if cur else it
        if cur and text_width(cand + ",", size) > width:
            lines.append(cur + ",")
            cur = it
        else:
            cur = cand
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        rest = sum(len(line.split(", ")) for line in lines[max_lines - 1:])
        lines = lines[:max_lines - 1] + [f"… and {rest} more"]
    return lines


def cmd_viz(args) -> int:
    """``graphc viz NET [--phase] [--batch] [--after PASS] -o net.svg``."""
    from .cli import _load_graph
    from .frontend.atomic import atomic_write
    from .passes import DEFAULT_PIPELINE, TRAIN_PIPELINE, run_pipeline
    from .passes.memory import naive_bytes
    lowered = _load_graph(args)
    names = TRAIN_PIPELINE if args.phase == "train" else DEFAULT_PIPELINE
    g = run_pipeline(lowered, names, after=args.after)
    if args.after:
        stage = f"after pass {args.after}"
    elif names:
        stage = "after " + ", ".join(names)
    else:
        stage = "as lowered"
    svg = render_svg(g, phase=args.phase, stage=stage,
                     naive_bytes=naive_bytes(lowered, args.phase))
    atomic_write(args.output, svg.encode("utf-8"))
    print(f"wrote {args.output} ({len(g.nodes)} nodes)")
    return 0
