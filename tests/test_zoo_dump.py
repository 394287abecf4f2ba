"""Every net in ../shared/zoo lowers, verifies, dumps, and its IR text round-trips.
Train/test nets read LMDB sets that are not shipped: their data blobs are fed instead
(--input), which is also how a user dumps a net without its data."""
import json
import re

import pytest

from graphc.cli import main
from graphc.ir import parse_graph, print_graph

DEPLOY = ["alexnet_deploy", "caffenet_deploy", "cifar10_quick", "googlenet_deploy", "lenet",
          "mobilenet_deploy", "resnet50_deploy", "squeezenet11_deploy"]
# net -> (extra args, {phase: [--input ...]})
TRAIN = {
    "lenet_train_test": {"train": ["data=64,1,28,28", "label=64"],
                         "test": ["data=100,1,28,28", "label=100"]},
    "cifar10_quick_train_test": {"train": ["data=100,3,32,32", "label=100"],
                                 "test": ["data=100,3,32,32", "label=100"]},
    "cifar10_bn_train_test": {"train": ["data=100,3,32,32", "label=100"],
                              "test": ["data=100,3,32,32", "label=100"]},
    "alexnet_train_val": {"train": ["data=256,3,227,227", "label=256"],
                          "test": ["data=50,3,227,227", "label=50"]},
    "mnist_autoencoder": {"train": ["data=100,1,28,28"], "test": ["data=100,1,28,28"]},
}


def dump(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def round_trips(out: str):
    text = "".join(re.sub(r"\s*//.*", "", line) + "\n"
                   for line in out.splitlines() if not line.startswith("//"))
    g = parse_graph(text)
    assert print_graph(g) == text
    return g


@pytest.mark.parametrize("name", DEPLOY)
def test_deploy_nets_dump(shared_dir, capsys, name):
    path = shared_dir / "zoo" / f"{name}.prototxt"
    g = round_trips(dump(capsys, "dump", path, "--after", "lower"))
    assert g.nodes and g.outputs
    round_trips(dump(capsys, "dump", path))               # after the default pipeline
    doc = json.loads(dump(capsys, "dump", path, "--json", "--batch", "1"))
    assert all(i["type"].startswith("f32[1,") for i in doc["inputs"])
    assert doc["totals"]["flops"] > 0


@pytest.mark.parametrize("name", sorted(TRAIN))
@pytest.mark.parametrize("phase", ["train", "test"])
def test_train_test_nets_dump(shared_dir, capsys, name, phase):
    path = shared_dir / "zoo" / f"{name}.prototxt"
    args = ["dump", path, "--phase", phase, "--after", "lower"]
    if name == "mnist_autoencoder" and phase == "test":
        args += ["--stage", "test-on-test"]
    for spec in TRAIN[name][phase]:
        args += ["--input", spec]
    g = round_trips(dump(capsys, *args))
    losses = [n for n in g.nodes if "loss_weight" in n.attrs]
    assert losses, "a train/test net has a loss"


def test_resnet50_flops(shared_dir, capsys):
    doc = json.loads(dump(capsys, "dump", shared_dir / "zoo" / "resnet50_deploy.prototxt",
                          "--json", "--after", "lower"))
    # ~3.86 G multiply-adds = ~7.7 GFLOP at batch 1
    assert 7.0e9 < doc["totals"]["flops"] < 8.5e9
