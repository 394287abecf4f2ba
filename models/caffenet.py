"""CaffeNet (BVLC reference model: AlexNet with pooling before LRN), deploy version."""
from __future__ import annotations

from graphc.frontend.netspec import L, NetSpec


def caffenet(batch: int = 10, num_classes: int = 1000) -> NetSpec:
    n = NetSpec("CaffeNet")
    n.data = L.Input(shape=dict(dim=[batch, 3, 227, 227]))

    def conv_relu(i, bottom, **conv):
        n[f"conv{i}"] = L.Convolution(bottom, **conv)
        n[f"relu{i}"] = L.ReLU(n[f"conv{i}"], in_place=True)
        return n[f"relu{i}"]

    def pool_norm(i, bottom):
        n[f"pool{i}"] = L.Pooling(bottom, pool="MAX", kernel_size=3, stride=2)
        n[f"norm{i}"] = L.LRN(n[f"pool{i}"], local_size=5, alpha=0.0001, beta=0.75)
        return n[f"norm{i}"]

    x = conv_relu(1, n.data, num_output=96, kernel_size=11, stride=4)
    x = pool_norm(1, x)
    x = conv_relu(2, x, num_output=256, pad=2, kernel_size=5, group=2)
    x = pool_norm(2, x)
    x = conv_relu(3, x, num_output=384, pad=1, kernel_size=3)
    x = conv_relu(4, x, num_output=384, pad=1, kernel_size=3, group=2)
    x = conv_relu(5, x, num_output=256, pad=1, kernel_size=3, group=2)
    n.pool5 = L.Pooling(x, pool="MAX", kernel_size=3, stride=2)
    x = n.pool5
    for i in (6, 7):
        n[f"fc{i}"] = L.InnerProduct(x, num_output=4096)
        n[f"relu{i}"] = L.ReLU(n[f"fc{i}"], in_place=True)
        n[f"drop{i}"] = L.Dropout(n[f"relu{i}"], in_place=True, dropout_ratio=0.5)
        x = n[f"drop{i}"]
    n.fc8 = L.InnerProduct(x, num_output=num_classes)
    n.prob = L.Softmax(n.fc8)
    return n
