"""CIFAR-10 "quick" net (BVLC examples/cifar10/cifar10_quick.prototxt): three 5x5 conv
stages (max pooling first, average pooling after), two fully connected layers."""
from __future__ import annotations

from graphc.frontend.netspec import L, NetSpec

LR = [dict(lr_mult=1), dict(lr_mult=2)]


def cifar10_quick(batch: int = 1) -> NetSpec:
    n = NetSpec("CIFAR10_quick_test")
    n.data = L.Input(shape=dict(dim=[batch, 3, 32, 32]))
    x = n.data
    # conv1 -> pool1 (MAX) -> relu1; conv2 -> relu2 -> pool2 (AVE); conv3 -> relu3 -> pool3
    for i, (c, pool) in enumerate([(32, "MAX"), (32, "AVE"), (64, "AVE")], start=1):
        n[f"conv{i}"] = L.Convolution(x, param=LR, num_output=c, pad=2, kernel_size=5,
                                      stride=1)
        x = n[f"conv{i}"]
        if pool == "MAX":               # the first stage pools before the ReLU
            n[f"pool{i}"] = L.Pooling(x, pool=pool, kernel_size=3, stride=2)
            n[f"relu{i}"] = L.ReLU(n[f"pool{i}"], in_place=True)
            x = n[f"relu{i}"]
        else:
            n[f"relu{i}"] = L.ReLU(x, in_place=True)
            n[f"pool{i}"] = L.Pooling(n[f"relu{i}"], pool=pool, kernel_size=3, stride=2)
            x = n[f"pool{i}"]
    n.ip1 = L.InnerProduct(x, param=LR, num_output=64)
    n.ip2 = L.InnerProduct(n.ip1, param=LR, num_output=10)
    n.prob = L.Softmax(n.ip2)
    return n
