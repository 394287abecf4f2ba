"""MobileNet v1 (shicai/MobileNet-Caffe mobilenet_deploy.prototxt): a 3x3 stem, then 13
depthwise-separable blocks (3x3 depthwise convolution with group = channels, 1x1
pointwise), each convolution followed by BatchNorm, Scale and ReLU; a 1x1 convolution
classifier over global average pooling.

The published file declares its input the legacy way (net-level ``input``/``input_dim``);
Caffe upgrades that to an Input layer named "input" with top "data", which is what this
builder writes."""
from __future__ import annotations

from graphc.frontend.netspec import L, NetSpec

# separable blocks: (name, output channels, stride of the depthwise convolution)
BLOCKS = [("2_1", 64, 1), ("2_2", 128, 2), ("3_1", 128, 1), ("3_2", 256, 2),
          ("4_1", 256, 1), ("4_2", 512, 2), ("5_1", 512, 1), ("5_2", 512, 1),
          ("5_3", 512, 1), ("5_4", 512, 1), ("5_5", 512, 1), ("5_6", 1024, 2),
          ("6", 1024, 1)]

WEIGHT = [dict(lr_mult=1, decay_mult=1)]
FROZEN = [dict(lr_mult=0, decay_mult=0)] * 3        # BatchNorm's mean, variance, factor
SCALE = [dict(lr_mult=1, decay_mult=0)] * 2


def _conv_bn_relu(n: NetSpec, conv: str, relu: str, bottom, **conv_args):
    """Bias-free convolution ``conv``, then in-place ``conv/bn``, ``conv/scale``, ``relu``."""
    n[conv] = L.Convolution(bottom, param=WEIGHT, bias_term=False, **conv_args,
                            weight_filler=dict(type="msra"))
    n[f"{conv}/bn"] = L.BatchNorm(n[conv], in_place=True, param=FROZEN,
                                  use_global_stats=True, eps=1e-5)
    n[f"{conv}/scale"] = L.Scale(n[f"{conv}/bn"], in_place=True, param=SCALE,
                                 filler=dict(value=1), bias_term=True,
                                 bias_filler=dict(value=0))
    n[relu] = L.ReLU(n[f"{conv}/scale"], in_place=True)
    return n[relu]


def mobilenet(batch: int = 1, num_classes: int = 1000) -> NetSpec:
    n = NetSpec("MOBILENET")
    n.data = L.Input(name="input", shape=dict(dim=[batch, 3, 224, 224]))
    x = _conv_bn_relu(n, "conv1", "relu1", n.data, num_output=32, pad=1, kernel_size=3,
                      stride=2)
    channels = 32
    for name, out, stride in BLOCKS:
        x = _conv_bn_relu(n, f"conv{name}/dw", f"relu{name}/dw", x, num_output=channels,
                          pad=1, kernel_size=3, group=channels, engine="CAFFE",
                          stride=stride)
        x = _conv_bn_relu(n, f"conv{name}/sep", f"relu{name}/sep", x, num_output=out,
                          pad=0, kernel_size=1, stride=1)
        channels = out
    n.pool6 = L.Pooling(x, pool="AVE", global_pooling=True)
    n.fc7 = L.Convolution(n.pool6, param=[dict(lr_mult=1, decay_mult=1),
                                          dict(lr_mult=2, decay_mult=0)],
                          num_output=num_classes, kernel_size=1,
                          weight_filler=dict(type="msra"),
                          bias_filler=dict(type="constant", value=0))
    n.prob = L.Softmax(n.fc7)
    return n
