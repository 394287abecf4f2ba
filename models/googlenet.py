"""GoogLeNet (BVLC bvlc_googlenet deploy.prototxt): Inception v1, nine inception modules.

Every convolution is followed by an in-place ReLU named ``<scope>/relu_<branch>``; the
xavier ``std`` values of the original training net are kept (Caffe's xavier filler ignores
them, but they are part of the published definition)."""
from __future__ import annotations

from graphc.frontend.netspec import L, NetSpec

LR = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
# a max pooling (3x3, stride 2) comes before these modules
POOL_BEFORE = {"3a": "pool2/3x3_s2", "4a": "pool3/3x3_s2", "5a": "pool4/3x3_s2"}


def _conv_relu(n: NetSpec, scope: str, branch: str, bottom, num_output: int,
               kernel_size: int, std: float, pad: int = 0, stride: int = 1,
               relu: str | None = None):
    """``<scope>/<branch>`` convolution + in-place ReLU ``<scope>/<relu>`` (by default
    ``relu_<branch>``); returns the ReLU's top."""
    conv = dict(num_output=num_output, kernel_size=kernel_size)
    if pad:
        conv["pad"] = pad
    if stride != 1:
        conv["stride"] = stride
    n[f"{scope}/{branch}"] = L.Convolution(
        bottom, param=LR, **conv,
        weight_filler=dict(type="xavier", std=std),
        bias_filler=dict(type="constant", value=0.2))
    relu = f"{scope}/{relu or 'relu_' + branch}"
    n[relu] = L.ReLU(n[f"{scope}/{branch}"], in_place=True)
    return n[relu]


def _inception(n: NetSpec, name: str, bottom, widths):
    c1, c3r, c3, c5r, c5, cp = widths
    s = f"inception_{name}"
    b1 = _conv_relu(n, s, "1x1", bottom, c1, 1, std=0.03)
    b3 = _conv_relu(n, s, "3x3_reduce", bottom, c3r, 1, std=0.09)
    b3 = _conv_relu(n, s, "3x3", b3, c3, 3, std=0.03, pad=1)
    b5 = _conv_relu(n, s, "5x5_reduce", bottom, c5r, 1, std=0.2)
    b5 = _conv_relu(n, s, "5x5", b5, c5, 5, std=0.03, pad=2)
    n[f"{s}/pool"] = L.Pooling(bottom, pool="MAX", kernel_size=3, stride=1, pad=1)
    bp = _conv_relu(n, s, "pool_proj", n[f"{s}/pool"], cp, 1, std=0.1)
    n[f"{s}/output"] = L.Concat(b1, b3, b5, bp)
    return n[f"{s}/output"]


def _lrn(bottom):
    return L.LRN(bottom, local_size=5, alpha=0.0001, beta=0.75)


def googlenet(batch: int = 10, num_classes: int = 1000) -> NetSpec:
    n = NetSpec("GoogleNet")
    n.data = L.Input(shape=dict(dim=[batch, 3, 224, 224]))
    x = _conv_relu(n, "conv1", "7x7_s2", n.data, 64, 7, std=0.1, pad=3, stride=2,
                   relu="relu_7x7")
    n["pool1/3x3_s2"] = L.Pooling(x, pool="MAX", kernel_size=3, stride=2)
    n["pool1/norm1"] = _lrn(n["pool1/3x3_s2"])
    x = _conv_relu(n, "conv2", "3x3_reduce", n["pool1/norm1"], 64, 1, std=0.1)
    x = _conv_relu(n, "conv2", "3x3", x, 192, 3, std=0.03, pad=1)
    n["conv2/norm2"] = _lrn(x)
    x = n["conv2/norm2"]
    for name, widths in INCEPTION.items():
        if name in POOL_BEFORE:
            n[POOL_BEFORE[name]] = L.Pooling(x, pool="MAX", kernel_size=3, stride=2)
            x = n[POOL_BEFORE[name]]
        x = _inception(n, name, x, widths)
    n["pool5/7x7_s1"] = L.Pooling(x, pool="AVE", kernel_size=7, stride=1)
    n["pool5/drop_7x7_s1"] = L.Dropout(n["pool5/7x7_s1"], in_place=True, dropout_ratio=0.4)
    n["loss3/classifier"] = L.InnerProduct(
        n["pool5/drop_7x7_s1"], param=LR, num_output=num_classes,
        weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0))
    n.prob = L.Softmax(n["loss3/classifier"])
    return n
