"""ResNet-50 (Kaiming He's ResNet-50-deploy.prototxt): bottleneck residual blocks with
BatchNorm (global statistics) and a separate Scale layer after every convolution.

The published file declares its input the legacy way (net-level ``input``/``input_dim``);
Caffe upgrades that to an Input layer named "input" with top "data", which is what this
builder writes."""
from __future__ import annotations

from graphc.frontend.netspec import L, NetSpec

# stage: (blocks, bottleneck width, output width, stride of the first block)
STAGES = {2: (3, 64, 256, 1), 3: (4, 128, 512, 2), 4: (6, 256, 1024, 2),
          5: (3, 512, 2048, 2)}


def _conv_bn(n: NetSpec, suffix: str, bottom, num_output: int, kernel_size: int,
             pad: int, stride: int):
    """Bias-free convolution ``res<suffix>``, then in-place ``bn<suffix>``, ``scale<suffix>``."""
    n[f"res{suffix}"] = L.Convolution(bottom, num_output=num_output, kernel_size=kernel_size,
                                      pad=pad, stride=stride, bias_term=False)
    n[f"bn{suffix}"] = L.BatchNorm(n[f"res{suffix}"], in_place=True, use_global_stats=True)
    n[f"scale{suffix}"] = L.Scale(n[f"bn{suffix}"], in_place=True, bias_term=True)
    return n[f"scale{suffix}"]


def _bottleneck(n: NetSpec, block: str, bottom, width: int, out: int, stride: int,
                project: bool):
    """Block ``res<block>``: 1x1 (stride) -> 3x3 -> 1x1, plus the shortcut (a strided 1x1
    projection ``branch1`` when the shape changes), summed and passed through a ReLU."""
    if project:
        shortcut = _conv_bn(n, f"{block}_branch1", bottom, out, 1, 0, stride)
    else:
        shortcut = bottom
    x = bottom
    for branch, (c, k, pad, s) in zip("abc", [(width, 1, 0, stride), (width, 3, 1, 1),
                                               (out, 1, 0, 1)]):
        x = _conv_bn(n, f"{block}_branch2{branch}", x, c, k, pad, s)
        if branch != "c":
            n[f"res{block}_branch2{branch}_relu"] = L.ReLU(x, in_place=True)
            x = n[f"res{block}_branch2{branch}_relu"]
    n[f"res{block}"] = L.Eltwise(shortcut, x)
    n[f"res{block}_relu"] = L.ReLU(n[f"res{block}"], in_place=True)
    return n[f"res{block}_relu"]


def resnet50(batch: int = 1, num_classes: int = 1000) -> NetSpec:
    n = NetSpec("ResNet-50")
    n.data = L.Input(name="input", shape=dict(dim=[batch, 3, 224, 224]))
    n.conv1 = L.Convolution(n.data, num_output=64, kernel_size=7, pad=3, stride=2)
    n.bn_conv1 = L.BatchNorm(n.conv1, in_place=True, use_global_stats=True)
    n.scale_conv1 = L.Scale(n.bn_conv1, in_place=True, bias_term=True)
    n.conv1_relu = L.ReLU(n.scale_conv1, in_place=True)
    n.pool1 = L.Pooling(n.conv1_relu, kernel_size=3, stride=2, pool="MAX")
    x = n.pool1
    for stage, (blocks, width, out, stride) in STAGES.items():
        for i in range(blocks):
            x = _bottleneck(n, f"{stage}{'abcdef'[i]}", x, width, out,
                            stride if i == 0 else 1, project=(i == 0))
    n.pool5 = L.Pooling(x, kernel_size=7, stride=1, pool="AVE")
    n.fc1000 = L.InnerProduct(n.pool5, num_output=num_classes)
    n.prob = L.Softmax(n.fc1000)
    return n
