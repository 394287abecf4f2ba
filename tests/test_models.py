"""The reference nets in models/ (written with the builder) against the real model-zoo
prototxt files in ../shared/zoo, and their blob shapes against real Caffe's
(../shared/golden/SHAPES.md)."""
from __future__ import annotations

import difflib
import re
from collections import Counter

import pytest
from google.protobuf import text_format

from graphc.frontend import caffe_pb2
from graphc.frontend.upgrade import upgrade_net
from models import MODELS

# model -> (zoo file, golden directory, the batch its builder defaults to)
ZOO = {
    "lenet": ("lenet.prototxt", "lenet", 64),
    "cifar10_quick": ("cifar10_quick.prototxt", "cifar10_quick", 1),
    "caffenet": ("caffenet_deploy.prototxt", "caffenet_deploy", 10),
    "googlenet": ("googlenet_deploy.prototxt", "googlenet_deploy", 10),
    "resnet50": ("resnet50_deploy.prototxt", "resnet50_deploy", 1),
    "squeezenet11": ("squeezenet11_deploy.prototxt", "squeezenet11_deploy", 10),
    "mobilenet": ("mobilenet_deploy.prototxt", "mobilenet_deploy", 1),
}


def test_every_model_is_checked():
    assert set(MODELS) == set(ZOO)


def _load_zoo(shared_dir, fname) -> caffe_pb2.NetParameter:
    """The zoo net as Caffe sees it: parsed, then upgraded (legacy net-level inputs become
    an Input layer named "input")."""
    net = text_format.Parse((shared_dir / "zoo" / fname).read_text(),
                            caffe_pb2.NetParameter())
    return upgrade_net(net)[0]


def _filled(msg):
    """A copy of ``msg`` with every unset singular scalar field set to its default, in it and
    in every submessage that is present, so that "x: 1" and a default of 1 compare equal."""
    out = type(msg)()
    out.CopyFrom(msg)
    _fill_defaults(out)
    return out


def _fill_defaults(msg) -> None:
    for fd in msg.DESCRIPTOR.fields:
        if fd.is_repeated:
            if fd.message_type is not None:
                for item in getattr(msg, fd.name):
                    _fill_defaults(item)
        elif fd.message_type is not None:
            if msg.HasField(fd.name):
                _fill_defaults(getattr(msg, fd.name))
        elif not msg.HasField(fd.name):
            setattr(msg, fd.name, fd.default_value)


def _layer_mismatch(mine, ref) -> str | None:
    if (mine.name, mine.type) != (ref.name, ref.type):
        return f"layer {ref.name} ({ref.type}) built as {mine.name} ({mine.type})"
    if list(mine.bottom) != list(ref.bottom) or list(mine.top) != list(ref.top):
        return (f"layer {ref.name}: bottoms/tops {list(mine.bottom)} -> {list(mine.top)}, "
                f"zoo has {list(ref.bottom)} -> {list(ref.top)}")
    a, b = _filled(mine), _filled(ref)
    if a != b:
        diff = difflib.unified_diff(text_format.MessageToString(b).splitlines(),
                                    text_format.MessageToString(a).splitlines(),
                                    "zoo", "built", lineterm="")
        return f"layer {ref.name} differs after filling defaults:\n" + "\n".join(diff)
    return None


@pytest.mark.parametrize("model", sorted(ZOO))
def test_model_matches_zoo(model, shared_dir):
    fname, _, batch = ZOO[model]
    ref = _load_zoo(shared_dir, fname)
    mine = MODELS[model]().to_proto()
    assert mine.name == ref.name
    assert [(l.name, l.type) for l in mine.layer] == [(l.name, l.type) for l in ref.layer]
    for a, b in zip(mine.layer, ref.layer):
        problem = _layer_mismatch(a, b)
        assert problem is None, problem
    # whole-net equality, now that every layer matched (also covers net-level fields)
    assert _filled(mine) == _filled(ref)
    assert ref.layer[0].input_param.shape[0].dim[0] == batch


@pytest.mark.parametrize("model", sorted(ZOO))
def test_model_batch_and_prototxt_round_trip(model):
    net = MODELS[model](batch=3).to_proto()
    inputs = [l for l in net.layer if l.type == "Input"]
    assert len(inputs) == 1 and inputs[0].top[0] == "data"
    assert inputs[0].input_param.shape[0].dim[0] == 3
    text = MODELS[model](batch=3).to_prototxt()
    assert text_format.Parse(text, caffe_pb2.NetParameter()) == net
    # every bottom is made by an earlier layer; a top is only rewritten in place
    made = set()
    for layer in net.layer:
        assert set(layer.bottom) <= made, layer.name
        for t in layer.top:
            assert t not in made or t in layer.bottom, (layer.name, t)
        made.update(layer.top)
    names = [l.name for l in net.layer]
    assert len(names) == len(set(names))


# ---------------------------------------------------------------- blob shapes

def _golden_shapes(shared_dir) -> dict[str, dict[str, tuple[int, ...]]]:
    """SHAPES.md: per net, Caffe blob name -> shape, in net.blobs order."""
    text = (shared_dir / "golden" / "SHAPES.md").read_text()
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"## (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        m = re.match(r"[* ]\s+(\S+)\s+\[([\d, ]*)\]\s*$", line)
        if m and cur is not None:
            cur[m.group(1)] = tuple(int(d) for d in m.group(2).split(",") if d.strip())
    return out


def _caffe_split_blobs(net) -> dict[str, str]:
    """The blobs of the Split layers Caffe's InsertSplits adds: a blob version read by k > 1
    layers gets a Split with tops ``<blob>_<producer layer>_<top index>_split_<0..k-1>``.
    Returns split blob -> the blob it copies."""
    producer: dict[str, tuple[str, str, int]] = {}
    readers: Counter = Counter()
    for layer in net.layer:
        for b in layer.bottom:                 # read before an in-place layer rewrites it
            readers[producer[b]] += 1
        for i, t in enumerate(layer.top):
            producer[t] = (t, layer.name, i)
    return {f"{b}_{lname}_{i}_split_{k}": b
            for (b, lname, i), count in readers.items() if count > 1 for k in range(count)}


@pytest.mark.parametrize("model", sorted(ZOO))
def test_model_blob_shapes_match_caffe(model, shared_dir):
    _, golden, _ = ZOO[model]
    expected = _golden_shapes(shared_dir)[golden]
    assert expected, f"no shapes for {golden} in SHAPES.md"
    batch = expected["data"][0]
    spec = MODELS[model](batch=batch)
    # Caffe's split blobs (copies of a blob read by several layers) are where expected
    splits = _caffe_split_blobs(spec.to_proto())
    assert {b for b in expected if "_split_" in b} == set(splits)
    for split, src in splits.items():
        assert expected[split] == expected[src], split

    graph = spec.to_graph("test", batch=batch)
    got = {blob: tuple(graph.types[v].shape) for blob, v in graph.blob_versions().items()}
    assert list(got) == list(expected)          # Caffe's blob creation order
    assert got == expected
