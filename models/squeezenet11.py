"""SqueezeNet v1.1 (DeepScale's deploy.prototxt): fire modules (1x1 squeeze, then 1x1 and
3x3 expand concatenated), global average pooling over a 1x1 classifier convolution."""
from __future__ import annotations

from graphc.frontend.netspec import L, NetSpec

# fire module: (squeeze width, expand width per branch); a max pooling follows fire3, fire5
FIRES = {2: (16, 64), 3: (16, 64), 4: (32, 128), 5: (32, 128),
         6: (48, 192), 7: (48, 192), 8: (64, 256), 9: (64, 256)}
POOL_BEFORE = {4: "pool3", 6: "pool5"}


def _conv_relu(n: NetSpec, name: str, relu: str, bottom, **conv):
    n[name] = L.Convolution(bottom, **conv)
    n[relu] = L.ReLU(n[name], in_place=True)
    return n[relu]


def _fire(n: NetSpec, i: int, bottom, squeeze: int, expand: int):
    s = f"fire{i}"
    x = _conv_relu(n, f"{s}/squeeze1x1", f"{s}/relu_squeeze1x1", bottom,
                   num_output=squeeze, kernel_size=1)
    e1 = _conv_relu(n, f"{s}/expand1x1", f"{s}/relu_expand1x1", x,
                    num_output=expand, kernel_size=1)
    e3 = _conv_relu(n, f"{s}/expand3x3", f"{s}/relu_expand3x3", x,
                    num_output=expand, pad=1, kernel_size=3)
    n[f"{s}/concat"] = L.Concat(e1, e3)
    return n[f"{s}/concat"]


def squeezenet11(batch: int = 10, num_classes: int = 1000) -> NetSpec:
    n = NetSpec()
    n.data = L.Input(shape=dict(dim=[batch, 3, 227, 227]))
    x = _conv_relu(n, "conv1", "relu_conv1", n.data, num_output=64, kernel_size=3, stride=2)
    n.pool1 = L.Pooling(x, pool="MAX", kernel_size=3, stride=2)
    x = n.pool1
    for i, (squeeze, expand) in FIRES.items():
        if i in POOL_BEFORE:
            n[POOL_BEFORE[i]] = L.Pooling(x, pool="MAX", kernel_size=3, stride=2)
            x = n[POOL_BEFORE[i]]
        x = _fire(n, i, x, squeeze, expand)
    n.drop9 = L.Dropout(x, in_place=True, dropout_ratio=0.5)
    x = _conv_relu(n, "conv10", "relu_conv10", n.drop9, num_output=num_classes, kernel_size=1)
    n.pool10 = L.Pooling(x, pool="AVE", global_pooling=True)
    n.prob = L.Softmax(n.pool10)
    return n
