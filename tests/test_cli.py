"""`graphc dump` and the errors a user sees: exit status 1, file:line, the layer, what to
change, and no traceback."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphc.cli import main

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "examples" / "lenet.prototxt"

HEAD = '''name: "t"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
'''


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_dump_lenet(capsys):
    code, out, err = run(capsys, "dump", LENET, "--after", "lower")
    assert code == 0, err
    assert '%conv1: f32[1,20,24,24] = Convolution(%data, $conv1.0, $conv1.1)' in out
    assert '%ip1~relu1: f32[1,500] = ReLU(%ip1)' in out
    assert "flops=" in out and "// totals:" in out
    assert "output %prob" in out
    # the dump parses back as IR (costs are comments)
    from graphc.ir import parse_graph, print_graph
    import re
    g = parse_graph(out)
    without_comments = "".join(re.sub(r"\s*//.*", "", line) + "\n"
                               for line in out.splitlines() if not line.startswith("//"))
    assert print_graph(g) == without_comments and len(g.nodes) == 8


def test_dump_default_pipeline_fuses(capsys):
    code, out, err = run(capsys, "dump", LENET)
    assert code == 0, err
    assert "Fused(" in out and 'name="ip1+relu1"' in out


def test_print_after_all(capsys):
    code, out, _ = run(capsys, "dump", LENET, "--print-after-all")
    assert code == 0
    assert "// ---- IR after lower ----" in out and "// ---- IR after fuse ----" in out


def test_dump_batch_and_json(capsys):
    code, out, _ = run(capsys, "dump", LENET, "--batch", "8", "--json")
    assert code == 0
    doc = json.loads(out)
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert nodes["conv1"]["outputs"][0]["type"] == "f32[8,20,24,24]"
    assert nodes["conv1"]["flops"] >= 2 * 8 * 20 * 24 * 24 * 25
    assert doc["totals"]["flops"] == sum(n["flops"] for n in doc["nodes"])
    assert doc["totals"]["param_count"] == 20 * 25 + 20 + 50 * 500 + 50 + 500 * 800 + 500 + 5010


def test_dump_after_unknown_pass(capsys):
    code, _, err = run(capsys, "dump", LENET, "--after", "no-such-pass")
    assert code == 1 and "unknown pass 'no-such-pass'" in err


def write(tmp_path, text, name="net.prototxt"):
    p = tmp_path / name
    p.write_text(text)
    return p


ERRORS = {
    "malformed": (HEAD + 'layer { name: "c" type: "ReLU" bottom: "data" top: "data" \n',
                  ["net.prototxt:3"]),
    "unknown_type": (HEAD + 'layer { name: "c" type: "Convolutoin" bottom: "data" top: "c" }\n',
                     ["net.prototxt:3", "layer 'c'", "unknown layer type 'Convolutoin'",
                      "Convolution"]),
    "unknown_field": (HEAD + 'layer { name: "c" type: "ReLU" bottom: "data" top: "c"\n'
                      '  relu_param { negative_slop: 0.1 } }\n',
                      ["net.prototxt:4", "negative_slop"]),
    "missing_bottom": (HEAD + 'layer { name: "r" type: "ReLU" bottom: "dat" top: "r" }\n',
                       ["net.prototxt:3", "layer 'r'", "bottom 'dat'"]),
    "duplicate_top": (HEAD + 'layer { name: "r1" type: "ReLU" bottom: "data" top: "r" }\n'
                      'layer { name: "r2" type: "Sigmoid" bottom: "data" top: "r" }\n',
                      ["net.prototxt:4", "layer 'r2'", "top 'r'"]),
    "cycle": (HEAD + 'layer { name: "a" type: "Eltwise" bottom: "data" bottom: "b" top: "a" }\n'
              'layer { name: "b" type: "ReLU" bottom: "a" top: "b" }\n',
              ["net.prototxt:3", "layer 'a'", "cycle"]),
    "out_of_order": (HEAD + 'layer { name: "s" type: "Sigmoid" bottom: "r" top: "s" }\n'
                     'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n',
                     ["net.prototxt:3", "later layer 'r'", "move layer 'r'"]),
    "eltwise_shapes": (HEAD + 'layer { name: "p" type: "Pooling" bottom: "data" top: "p"\n'
                       '  pooling_param { kernel_size: 2 stride: 2 } }\n'
                       'layer { name: "e" type: "Eltwise" bottom: "data" bottom: "p" top: "e" }\n',
                       ["net.prototxt:5", "layer 'e' (Eltwise)", "[2, 3, 8, 8]", "[2, 3, 4, 4]"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_input_errors(capsys, tmp_path, case):
    text, expected = ERRORS[case]
    code, out, err = run(capsys, "dump", write(tmp_path, text))
    assert code == 1
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, f"{piece!r} not in {err!r}"


def test_weights_shape_mismatch(capsys, tmp_path):
    import graphc
    net = graphc.Net(str(LENET))
    model = tmp_path / "lenet.caffemodel"
    net.save(str(model))
    other = write(tmp_path, LENET.read_text().replace("num_output: 500", "num_output: 400"))
    code, _, err = run(capsys, "dump", other, "--weights", model)
    assert code == 1
    assert "layer 'ip1'" in err and "(400, 800)" in err and "(500, 800)" in err


def test_truncated_and_corrupt_caffemodel(capsys, tmp_path):
    import graphc
    model = tmp_path / "lenet.caffemodel"
    graphc.Net(str(LENET)).save(str(model))
    data = model.read_bytes()
    (tmp_path / "trunc.caffemodel").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.caffemodel").write_bytes(bytes([0xFF] * 64) + data[64:])
    for bad in ("trunc.caffemodel", "corrupt.caffemodel"):
        code, _, err = run(capsys, "dump", LENET, "--weights", tmp_path / bad)
        assert code == 1 and bad in err and "Traceback" not in err


def test_wrong_file_kinds(capsys, tmp_path):
    import graphc
    model = tmp_path / "lenet.caffemodel"
    graphc.Net(str(LENET)).save(str(model))
    code, _, err = run(capsys, "dump", model)          # weights given as the net
    assert code == 1 and "lenet.caffemodel" in err and "prototxt" in err
    code, _, err = run(capsys, "dump", LENET, "--weights", LENET)   # net given as weights
    assert code == 1 and "lenet.prototxt" in err and "caffemodel" in err


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "dump", tmp_path / "nope.prototxt")
    assert code == 1 and "nope.prototxt" in err


def test_entry_point_has_no_traceback(tmp_path):
    bad = write(tmp_path, HEAD + 'layer { name: "x" type: "Nope" bottom: "data" top: "x" }\n')
    r = subprocess.run([sys.executable, "-m", "graphc.cli", "dump", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "unknown layer type 'Nope'" in r.stderr
