"""LeNet for MNIST (BVLC examples/mnist/lenet.prototxt): two conv/pool stages and two
fully connected layers, softmax output."""
from __future__ import annotations

from graphc.frontend.netspec import L, NetSpec

# weights learn at the base rate, biases at twice it (Caffe's usual convention)
LR = [dict(lr_mult=1), dict(lr_mult=2)]
XAVIER = dict(weight_filler=dict(type="xavier"), bias_filler=dict(type="constant"))


def lenet(batch: int = 64) -> NetSpec:
    n = NetSpec("LeNet")
    n.data = L.Input(shape=dict(dim=[batch, 1, 28, 28]))
    n.conv1 = L.Convolution(n.data, param=LR, num_output=20, kernel_size=5, stride=1, **XAVIER)
    n.pool1 = L.Pooling(n.conv1, pool="MAX", kernel_size=2, stride=2)
    n.conv2 = L.Convolution(n.pool1, param=LR, num_output=50, kernel_size=5, stride=1, **XAVIER)
    n.pool2 = L.Pooling(n.conv2, pool="MAX", kernel_size=2, stride=2)
    n.ip1 = L.InnerProduct(n.pool2, param=LR, num_output=500, **XAVIER)
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, param=LR, num_output=10, **XAVIER)
    n.prob = L.Softmax(n.ip2)
    return n
