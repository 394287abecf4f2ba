"""fold-batchnorm: BatchNorm (+ Scale) into the producing layer's weights, or into one
per-channel affine; checked on IR text and on numbers against an independent float64
computation of Caffe's BatchNorm."""
import numpy as np
import pytest

from graphc.ir import parse_graph, print_graph, verify
from graphc.passes import PASSES

from test_passes_common import (assert_equivalent, check_text, feeds_for, fill_params, rel_l2,
                                run)

CONV = ('{num_output=4, kernel=[3, 3], stride=[1, 1], pad=[1, 1], dilation=[1, 1], group=1, '
        'bias_term=BIAS, axis=1}')
BN = '{use_global_stats=true, moving_average_fraction=0.999, eps=1e-05}'
P = '{lr_mult=1.0, decay_mult=1.0}'
P0 = '{lr_mult=0.0, decay_mult=0.0}'

CONV_BN_SCALE = f'''graph "f" {{
  input %data: f32[2,3,5,5]
  param $conv.0: f32[4,3,3,3] {P}
  param $bn.0: f32[4] {P0}
  param $bn.1: f32[4] {P0}
  param $bn.2: f32[1] {P0}
  param $sc.0: f32[4] {P}
  param $sc.1: f32[4] {P}
  %conv: f32[2,4,5,5] = Convolution(%data, $conv.0) {CONV.replace("BIAS", "false")} name="conv"
  %conv~bn: f32[2,4,5,5] = BatchNorm(%conv, $bn.0, $bn.1, $bn.2) {BN} name="bn" blobs=["conv"]
  %conv~sc: f32[2,4,5,5] = Scale(%conv~bn, $sc.0, $sc.1) {{axis=1, num_axes=1, bias_term=true}} name="sc" blobs=["conv"]
  %relu: f32[2,4,5,5] = ReLU(%conv~sc) {{negative_slope=0.0}} name="relu"
  output %relu
}}
'''

CONV_BN_SCALE_OUT = f'''graph "f" {{
  input %data: f32[2,3,5,5]
  param $conv.0+bn+sc: f32[4,3,3,3] {P}
  param $conv.1+bn+sc: f32[4] {P}
  %conv~sc: f32[2,4,5,5] = Convolution(%data, $conv.0+bn+sc, $conv.1+bn+sc) {CONV.replace("BIAS", "true")} name="conv" blobs=["conv"]
  %relu: f32[2,4,5,5] = ReLU(%conv~sc) {{negative_slope=0.0}} name="relu"
  output %relu
}}
'''


def naive_bn(x, mean, var, s, eps, gamma=None, beta=None):
    """Caffe's BatchNorm with global stats (+ Scale), float64, loops over channels."""
    y = np.empty(x.shape, np.float64)
    f = 0.0 if s == 0 else 1.0 / float(s)
    for c in range(x.shape[1]):
        v = (x[:, c].astype(np.float64) - mean[c] * f) / np.sqrt(var[c] * f + eps)
        if gamma is not None:
            v = v * gamma[c] + (beta[c] if beta is not None else 0.0)
        y[:, c] = v
    return y


def test_conv_bn_scale_folds_into_conv_with_new_bias(rng):
    g, out = check_text("fold-batchnorm", CONV_BN_SCALE, CONV_BN_SCALE_OUT, rng)
    # against the independent float64 BatchNorm + Scale on the convolution's output
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    conv = run(g, {"data": x})["conv"]
    p = {k: g.params[k].data for k in g.params}
    want = np.maximum(naive_bn(conv, p["bn.0"], p["bn.1"], p["bn.2"][0], 1e-5,
                               p["sc.0"], p["sc.1"]), 0)
    assert rel_l2(run(out, {"data": x})["relu"], want) <= 1e-5
    assert out.params["conv.0+bn+sc"].data is not g.params["conv.0"].data


def test_conv_with_bias_and_bn_alone(rng):
    text = (CONV_BN_SCALE.replace('bias_term=false', 'bias_term=true')
            .replace(f"  param $conv.0: f32[4,3,3,3] {P}\n",
                     f"  param $conv.0: f32[4,3,3,3] {P}\n  param $conv.1: f32[4] {{lr_mult=2.0, decay_mult=0.0}}\n")
            .replace("Convolution(%data, $conv.0)", "Convolution(%data, $conv.0, $conv.1)")
            .replace(f"  param $sc.0: f32[4] {P}\n  param $sc.1: f32[4] {P}\n", "")
            .replace('  %conv~sc: f32[2,4,5,5] = Scale(%conv~bn, $sc.0, $sc.1) {axis=1, num_axes=1, '
                     'bias_term=true} name="sc" blobs=["conv"]\n', "")
            .replace("ReLU(%conv~sc)", "ReLU(%conv~bn)"))
    out_text = (CONV_BN_SCALE_OUT.replace("conv.0+bn+sc", "conv.0+bn")
                .replace(f"$conv.1+bn+sc: f32[4] {P}", "$conv.1+bn: f32[4] {lr_mult=2.0, decay_mult=0.0}")
                .replace("conv.1+bn+sc", "conv.1+bn").replace("%conv~sc", "%conv~bn"))
    check_text("fold-batchnorm", text, out_text, rng)


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_bn_scale_without_bias(rng, transpose):
    w = "f32[5,6]" if transpose else "f32[6,5]"
    text = f'''graph "ip" {{
  input %x: f32[3,5]
  param $ip.0: {w} {P}
  param $ip.1: f32[6] {P}
  param $bn.0: f32[6] {P0}
  param $bn.1: f32[6] {P0}
  param $bn.2: f32[1] {P0}
  param $sc.0: f32[6] {P}
  %ip: f32[3,6] = InnerProduct(%x, $ip.0, $ip.1) {{num_output=6, bias_term=true, axis=1, transpose={str(transpose).lower()}}} name="ip"
  %bn: f32[3,6] = BatchNorm(%ip, $bn.0, $bn.1, $bn.2) {BN} name="bn"
  %sc: f32[3,6] = Scale(%bn, $sc.0) {{axis=1, num_axes=1, bias_term=false}} name="sc"
  output %sc
}}
'''
    g = fill_params(verify(parse_graph(text)), rng)
    out = PASSES["fold-batchnorm"](g)
    assert [n.op for n in out.nodes] == ["InnerProduct"]
    assert out.outputs == ["sc"] and out.nodes[0].outputs == ["sc"]
    assert_equivalent(g, out, rng)


def test_deconvolution_with_groups(rng):
    text = f'''graph "d" {{
  input %x: f32[1,4,3,3]
  param $de.0: f32[4,3,2,2] {P}
  param $bn.0: f32[6] {P0}
  param $bn.1: f32[6] {P0}
  param $bn.2: f32[1] {P0}
  %de: f32[1,6,6,6] = Deconvolution(%x, $de.0) {{num_output=6, kernel=[2, 2], stride=[2, 2], pad=[0, 0], dilation=[1, 1], group=2, bias_term=false, axis=1}} name="de"
  %bn: f32[1,6,6,6] = BatchNorm(%de, $bn.0, $bn.1, $bn.2) {BN} name="bn"
  output %bn
}}
'''
    g = fill_params(verify(parse_graph(text)), rng)
    out = PASSES["fold-batchnorm"](g)
    assert [n.op for n in out.nodes] == ["Deconvolution"]
    assert_equivalent(g, out, rng)


AFFINE_IN = f'''graph "a" {{
  input %x: f32[2,3,4]
  param $bn.0: f32[3] {P0}
  param $bn.1: f32[3] {P0}
  param $bn.2: f32[1] {P0}
  param $sc.0: f32[3] {P}
  param $sc.1: f32[3] {P}
  %x~bn: f32[2,3,4] = BatchNorm(%x, $bn.0, $bn.1, $bn.2) {BN} name="bn" blobs=["x"]
  %x~sc: f32[2,3,4] = Scale(%x~bn, $sc.0, $sc.1) {{axis=1, num_axes=1, bias_term=true}} name="sc" blobs=["x"]
  output %x~sc
}}
'''

AFFINE_OUT = f'''graph "a" {{
  input %x: f32[2,3,4]
  param $bn+sc.0: f32[3] {P}
  param $bn+sc.1: f32[3] {P}
  %x~sc: f32[2,3,4] = Scale(%x, $bn+sc.0, $bn+sc.1) {{axis=1, num_axes=1, bias_term=true, filler={{type="constant", value=1.0}}, bias_filler={{type="constant", value=0.0}}}} name="bn+sc" blobs=["x"]
  output %x~sc
}}
'''


def test_bn_without_producer_becomes_one_affine(rng):
    g, out = check_text("fold-batchnorm", AFFINE_IN, AFFINE_OUT, rng)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    p = {k: g.params[k].data for k in g.params}
    want = naive_bn(x, p["bn.0"], p["bn.1"], p["bn.2"][0], 1e-5, p["sc.0"], p["sc.1"])
    assert rel_l2(run(out, {"x": x})["x~sc"], want) <= 1e-6


def test_zero_scale_factor_means_zero_statistics(rng):
    g = fill_params(verify(parse_graph(AFFINE_IN)), rng)
    g.params["bn.2"].data[...] = 0
    out = PASSES["fold-batchnorm"](g)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    p = {k: g.params[k].data for k in g.params}
    want = naive_bn(x, p["bn.0"], p["bn.1"], 0.0, 1e-5, p["sc.0"], p["sc.1"])
    assert rel_l2(run(out, {"x": x})["x~sc"], want) <= 1e-6
    assert_equivalent(g, out, rng, feeds={"x": x})


def test_conv_output_read_twice_is_not_folded(rng):
    text = CONV_BN_SCALE.replace("  output %relu", "  %t: f32[2,4,5,5] = TanH(%conv) name=\"t\"\n"
                                                   "  output %relu, %t")
    g = fill_params(verify(parse_graph(text)), rng)
    out = PASSES["fold-batchnorm"](g)
    assert [n.op for n in out.nodes] == ["Convolution", "Scale", "ReLU", "TanH"]
    assert out.nodes[1].name == "bn+sc" and out.nodes[1].inputs == ["conv"]
    assert_equivalent(g, out, rng)


def test_scale_not_merged_when_bn_output_is_read_elsewhere(rng):
    text = CONV_BN_SCALE.replace("  output %relu", "  output %relu, %conv~bn")
    g = fill_params(verify(parse_graph(text)), rng)
    out = PASSES["fold-batchnorm"](g)
    assert [n.op for n in out.nodes] == ["Convolution", "Scale", "ReLU"]
    assert out.nodes[0].outputs == ["conv~bn"] and out.nodes[1].name == "sc"
    assert_equivalent(g, out, rng)


def test_training_batchnorm_is_left_alone():
    text = CONV_BN_SCALE.replace("use_global_stats=true", "use_global_stats=false")
    check_text("fold-batchnorm", text, text)


def test_params_without_data_fold_to_params_without_data():
    g = verify(parse_graph(CONV_BN_SCALE))
    out = PASSES["fold-batchnorm"](g)
    assert print_graph(out) == CONV_BN_SCALE_OUT
    assert all(p.data is None for p in out.params.values())
    a = PASSES["fold-batchnorm"](verify(parse_graph(AFFINE_IN)))
    assert [p.type.shape for p in a.params.values()] == [(3,), (3,)]
    assert all(p.data is None for p in a.params.values())


def test_half_known_data_gives_no_data(rng):
    g = verify(parse_graph(CONV_BN_SCALE))
    g.params["conv.0"].data = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    out = PASSES["fold-batchnorm"](g)
    assert all(p.data is None for p in out.params.values())
    assert feeds_for(out, rng)  # still a valid graph to feed
