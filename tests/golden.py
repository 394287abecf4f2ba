"""The weight rule of ../shared/golden/README.md, to rebuild the exact weights real Caffe ran
with where no .caffemodel was saved."""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np

NETS = ["lenet", "cifar10_quick", "caffenet_deploy", "alexnet_deploy", "googlenet_deploy",
        "squeezenet11_deploy", "resnet50_deploy", "mobilenet_deploy"]


def rule_blob(layer: str, ltype: str, index: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{layer}/{index}".encode("utf-8")))
    if ltype in ("Convolution", "InnerProduct", "Deconvolution"):
        if index == 0:
            fan_in = int(np.prod(shape[1:]))
            v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        else:
            v = rng.uniform(-0.1, 0.1, shape)
    elif ltype == "BatchNorm":
        v = [lambda: rng.uniform(-0.1, 0.1, shape), lambda: rng.uniform(0.5, 1.5, shape),
             lambda: np.full(shape, 1.0)][index]()
    elif ltype == "Scale":
        v = rng.uniform(0.8, 1.2, shape) if index == 0 else rng.uniform(-0.1, 0.1, shape)
    else:
        raise ValueError(f"no weight rule for layer type {ltype}")
    return np.asarray(v, dtype=np.float32)


def manifest(net_dir: Path) -> dict:
    return json.loads((net_dir / "manifest.json").read_text())


def apply_rule(net, man: dict) -> None:
    """Fill ``net.params`` by the rule, checking each blob against the manifest's SHA-256."""
    expected = {(p["layer"], p["index"]): p for p in man["params"]}
    for node in net.graph.nodes:
        for i, pname in enumerate(node.params):
            param = net.graph.params[pname]
            blob = rule_blob(node.name, node.op, i, param.type.shape)
            want = expected[(node.name, i)]
            assert list(blob.shape) == list(want["shape"]), (node.name, i)
            assert hashlib.sha256(blob.tobytes()).hexdigest() == want["sha256"], (node.name, i)
            param.data[...] = blob


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    assert denom > 0, "reference is all zeros: comparison would be meaningless"
    return float(np.linalg.norm(a - b) / denom)
