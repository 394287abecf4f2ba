"""`graphc viz`: the SVG parses, shows every node, fused groups list their layers, buffer
sharing is coloured, and the layout keeps boxes apart and edges pointing down."""
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from graphc.cli import main

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "examples" / "lenet.prototxt"
SVG = "{http://www.w3.org/2000/svg}"

# conv a and conv b read x; Eltwise SUM(a, b) -> ReLU.  The fuse pass makes
# b + sum + relu one Fused node reading a, which the inplace pass lets it overwrite.
RESIDUAL = '''name: "res"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 4 dim: 6 dim: 6 } } }
layer { name: "a" type: "Convolution" bottom: "x" top: "a"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b" type: "Convolution" bottom: "x" top: "b"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "s" }
layer { name: "relu" type: "ReLU" bottom: "s" top: "s" }
'''


def viz(capsys, tmp_path, net, *extra):
    out = tmp_path / "net.svg"
    code = main(["viz", str(net), "-o", str(out), *map(str, extra)])
    _, err = capsys.readouterr()
    assert code == 0, err
    return ET.parse(out).getroot()


def all_text(root) -> str:
    return "\n".join("".join(e.itertext()) for e in root.iter(SVG + "text")) + "\n" + \
        "\n".join(e.text or "" for e in root.iter(SVG + "title"))


def test_lenet_default_pipeline(capsys, tmp_path):
    from graphc.cli import _load_graph, build_parser
    from graphc.passes import run_pipeline
    root = viz(capsys, tmp_path, LENET)
    assert root.tag == SVG + "svg" and float(root.get("width")) > 100
    g = run_pipeline(_load_graph(build_parser().parse_args(["viz", str(LENET), "-o", "x"])))
    text = all_text(root)
    for n in g.nodes:
        assert n.name in text
    assert "LeNet" in text and "planned arena" in text and "naive (Caffe)" in text
    # the fused ip1 + relu1 is one group listing both layers, in order
    fused = [grp for grp in root.iter(SVG + "g")
             if (grp.findtext(SVG + "title") or "").startswith("Fused ip1+relu1")]
    assert len(fused) == 1
    inner = [("".join(t.itertext())).split() for t in fused[0].iter(SVG + "text")]
    assert ["InnerProduct", "ip1"] in inner and ["ReLU", "relu1"] in inner
    assert inner.index(["InnerProduct", "ip1"]) < inner.index(["ReLU", "relu1"])
    assert "input  data" in text and "output  prob" in text


def test_after_lower_has_no_groups(capsys, tmp_path):
    root = viz(capsys, tmp_path, LENET, "--after", "lower", "--batch", "3")
    text = all_text(root)
    assert "Fused" not in text.replace("Fused node", "")
    for name in ("conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"):
        assert name in text
    assert "3×20×24×24" in text and "after pass lower" in text


def test_shared_buffer_is_coloured(capsys, tmp_path):
    net = tmp_path / "res.prototxt"
    net.write_text(RESIDUAL)
    root = viz(capsys, tmp_path, net)
    text = all_text(root)
    assert "in-place" in text                    # the fused node's tag
    assert "Shared buffers" in text and "(2 values)" in text
    # the edge carrying a and the edge carrying the fused output share a colour that no
    # unshared edge has
    strokes = [p.get("stroke") for p in root.iter(SVG + "path")
               if p.get("fill") == "none"]
    colours = {c for c in strokes if c != "#8a9099"}
    assert len(colours) == 1 and strokes.count(colours.pop()) == 2
    fused = [grp for grp in root.iter(SVG + "g")
             if (grp.findtext(SVG + "title") or "").startswith("Fused ")]
    steps = [("".join(t.itertext())).split() for t in fused[0].iter(SVG + "text")]
    assert ["Convolution", "b"] in steps and ["Eltwise", "sum"] in steps \
        and ["ReLU", "relu"] in steps


def test_cli_errors(capsys, tmp_path):
    code = main(["viz", str(LENET), "--after", "nope", "-o", str(tmp_path / "x.svg")])
    assert code == 1 and "unknown pass 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.svg").exists()
    code = main(["viz", str(LENET), "-o", str(tmp_path / "missing" / "x.svg")])
    assert code == 1 and "cannot write" in capsys.readouterr().err


def test_layout_googlenet(shared_dir):
    """Boxes of a layer do not overlap; every edge goes down a layer."""
    import argparse
    from graphc.cli import _load_graph
    from graphc.passes import run_pipeline
    from graphc.viz import _Layout, _Memory, render_svg
    args = argparse.Namespace(net=str(shared_dir / "zoo" / "googlenet_deploy.prototxt"),
                              weights=None, phase="test", batch=1)
    g = run_pipeline(_load_graph(args))
    lay = _Layout(g, _Memory(g))
    for layer in lay.layers:
        boxes = sorted((lay.boxes[k] for k in layer), key=lambda b: b.x)
        for a, b in zip(boxes, boxes[1:]):
            assert a.x + a.w / 2 <= b.x - b.w / 2 + 1e-6
    for (a, b) in lay.segs:
        assert lay.boxes[b].layer == lay.boxes[a].layer + 1
    assert {k for _, path in lay.routes for k in path} >= {"n:" + n.name for n in g.nodes}
    pos = {k: i for layer in lay.layers for i, k in enumerate(layer)}
    assert lay._crossings(lay.layers, pos) == 0          # the ordering sweeps untangle it
    root = ET.fromstring(render_svg(g, naive_bytes=1))
    text = all_text(root)
    assert all(n.name in text for n in g.nodes)
    assert "slices" in text                     # Concat by slices at batch 1


def test_pav_least_squares(rng):
    """_pav against brute force: the closest (weighted) positions keeping the gaps."""
    from graphc.viz import _pav
    import numpy as np
    for _ in range(20):
        k = int(rng.integers(1, 5))
        d = rng.normal(0, 30, k).tolist()
        seps = rng.uniform(5, 40, k - 1).tolist()
        w = rng.uniform(0.2, 3, k).tolist()
        x = np.array(_pav(d, seps, w))
        assert all(x[i + 1] - x[i] >= seps[i] - 1e-9 for i in range(k - 1))
        cost = float(np.sum(np.array(w) * (x - d) ** 2))
        # brute force: the optimum makes some blocks of consecutive items tight; try all
        best = None
        for mask in range(2 ** (k - 1)):   # bit i set: items i and i+1 are tight
            blocks, cur = [], [0]
            for i in range(k - 1):
                if mask >> i & 1:
                    cur.append(i + 1)
                else:
                    blocks.append(cur)
                    cur = [i + 1]
            blocks.append(cur)
            off = np.concatenate([[0.0], np.cumsum(seps)])
            y = np.empty(k)
            for blk in blocks:
                ww = np.array([w[i] for i in blk])
                t = np.array([d[i] - off[i] for i in blk])
                y[blk] = float(np.sum(ww * t) / np.sum(ww))
            cand = y + off
            if all(cand[i + 1] - cand[i] >= seps[i] - 1e-9 for i in range(k - 1)):
                c = float(np.sum(np.array(w) * (cand - d) ** 2))
                best = c if best is None else min(best, c)
        assert cost <= best + 1e-6 * max(1.0, best)


def test_ordering_untangles_crossed_branches():
    """Nodes listed p1, p2, q1(p2), q2(p1): the first order crosses, the sweeps fix it."""
    from graphc.ir import Graph, Node, f32
    from graphc.viz import _Layout, _Memory
    g = Graph("crossed")
    g.add_input("x", f32(1, 8))
    for name, src in (("p1", "x"), ("p2", "x"), ("q1", "p2"), ("q2", "p1")):
        g.add_node(Node("ReLU", name, [src], [name], attrs={"negative_slope": 0.0}),
                   [f32(1, 8)])
    g.outputs = ["q1", "q2"]
    lay = _Layout(g, _Memory(g))
    pos = {k: i for layer in lay.layers for i, k in enumerate(layer)}
    assert lay._crossings([[k for k in lay.layers[1]], [k for k in lay.layers[2]]], pos) == 0
    assert lay._crossings([["n:p1", "n:p2"], ["n:q1", "n:q2"]],
                          {"n:p1": 0, "n:p2": 1, "n:q1": 0, "n:q2": 1}) == 1
