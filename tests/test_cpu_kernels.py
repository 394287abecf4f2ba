"""The CPU backend's kernels against the numpy reference executor, on fresh random shapes,
attributes and data.  Each case is a small net (several independent branches share one
compiled library); the runtime NaN-fills the arena and scratch before every run
(GRAPHC_POISON), so an output element no kernel writes fails the comparison."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from graphc.runtime.testing import assert_close, compile_graph, net_from_text

pytestmark = pytest.mark.usefixtures("cpu_cache")
# each example compiles a library (about a second): few examples, no shrinking
SETTINGS = settings(max_examples=4, deadline=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def cpu_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CACHE", str(tmp_path_factory.mktemp("graphc-cache")))
    yield
    mp.undo()


def inputs_layer(shapes: dict) -> str:
    tops = "".join(f' top: "{k}"' for k in shapes)
    dims = "".join("shape {" + "".join(f" dim: {d}" for d in s) + " } " for s in shapes.values())
    return f'layer {{ name: "in" type: "Input"{tops} input_param {{ {dims}}} }}\n'


def check(tmp_path, text: str, shapes: dict, rng, pipeline=None, tol=1e-4, positive=False,
          threads=None, cpu=None):
    net = net_from_text(text, tmp_path, rng=rng)
    feeds = {}
    for k, s in shapes.items():
        x = rng.standard_normal(s).astype(np.float32)
        feeds[k] = np.abs(x) + 0.1 if positive else x
    want = net.forward(**feeds)
    cn = compile_graph(net.graph, pipeline=pipeline, num_threads=threads, cpu=cpu)
    try:
        for _ in range(2):   # a second run must give the same (the arena is poisoned again)
            got = cn.forward(**feeds)
            assert_close(got, want, tol)
    finally:
        cn.close()
    return got


# ---------------------------------------------------------------------------------------
# convolution


@st.composite
def conv_branch(draw, i):
    kind = draw(st.sampled_from(["general", "general", "1x1", "depthwise"]))
    g = 1 if kind == "1x1" else draw(st.sampled_from([1, 1, 2, 3]))
    if kind == "depthwise":
        g = draw(st.integers(1, 6))
        cg = og = 1
        kh = kw = draw(st.sampled_from([3, 3, 5]))
    else:
        cg, og = draw(st.integers(1, 5)), draw(st.integers(1, 7))
        kh, kw = (1, 1) if kind == "1x1" else (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (1, 1) if kind == "1x1" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = (0, 0) if kind == "1x1" else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dil = (1, 1) if kind != "general" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    ext = [d * (k - 1) + 1 for d, k in zip(dil, (kh, kw))]
    h = draw(st.integers(max(1, ext[0] - 2 * pad[0]), 13))
    w = draw(st.integers(max(1, ext[1] - 2 * pad[1]), 13))
    n = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    relu = draw(st.booleans())
    shape = (n, g * cg, h, w)
    text = (f'layer {{ name: "c{i}" type: "Convolution" bottom: "x{i}" top: "c{i}" '
            f'convolution_param {{ num_output: {g * og} kernel_h: {kh} kernel_w: {kw} '
            f'stride_h: {stride[0]} stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]} '
            f'dilation: {dil[0]} dilation: {dil[1]} group: {g} bias_term: {str(bias).lower()} }} }}\n')
    if relu:
        text += f'layer {{ name: "r{i}" type: "ReLU" bottom: "c{i}" top: "c{i}" }}\n'
    return shape, text


@SETTINGS
@given(data=st.data())
def test_convolution(tmp_path_factory, data, rng):
    branches = [data.draw(conv_branch(i)) for i in range(4)]
    shapes = {f"x{i}": s for i, (s, _) in enumerate(branches)}
    text = inputs_layer(shapes) + "".join(t for _, t in branches)
    check(tmp_path_factory.mktemp("conv"), text, shapes, rng)


def test_convolution_big_blocks(tmp_path, rng):
    """Enough output channels and pixels that the work is cut into many GEMM items, a K
    longer than one cache block, and an edge tile in both directions."""
    shapes = {"x": (2, 37, 23, 29)}
    text = inputs_layer(shapes) + (
        'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { '
        'num_output: 83 kernel_size: 3 pad: 1 } }\n'
        'layer { name: "r" type: "ReLU" bottom: "c" top: "c" relu_param { negative_slope: 0.1 } }\n'
        'layer { name: "p" type: "Convolution" bottom: "x" top: "p" convolution_param { '
        'num_output: 29 kernel_size: 1 } }\n')
    check(tmp_path, text, shapes, rng)


@pytest.mark.parametrize("cpu", ["generic", "avx2", "native"])
def test_convolution_prepacked_panels(tmp_path, rng, cpu):
    """The GEMM convolutions with weights pre-packed at compile time, on each target's
    tile (x86-64 baseline 6x8, AVX2 6x16, native): random sizes so M, the pixels and K
    end mid-tile, mid-panel and mid-block; a stride-2 "same" conv, a grouped one (a
    packed panel array per group), a 1x1 and 2 threads."""
    import llvmlite.binding as llvm
    if cpu == "avx2" and not llvm.get_host_cpu_features().get("avx2", False):
        pytest.skip("the host has no AVX2")
    c, h, w = int(rng.integers(20, 40)), int(rng.integers(9, 20)), int(rng.integers(9, 20))
    o = int(rng.integers(9, 30))
    shapes = {"x": (1, 2 * c, h, w)}
    text = inputs_layer(shapes) + (
        f'layer {{ name: "a" type: "Convolution" bottom: "x" top: "a" convolution_param {{ '
        f'num_output: {o} kernel_size: 3 pad: 1 }} }}\n'
        f'layer {{ name: "r" type: "ReLU" bottom: "a" top: "a" }}\n'
        f'layer {{ name: "b" type: "Convolution" bottom: "x" top: "b" convolution_param {{ '
        f'num_output: {o} kernel_size: 3 pad: 1 stride: 2 }} }}\n'
        f'layer {{ name: "g" type: "Convolution" bottom: "x" top: "g" convolution_param {{ '
        f'num_output: {2 * o} kernel_size: 3 pad: 0 group: 2 }} }}\n'
        f'layer {{ name: "p" type: "Convolution" bottom: "x" top: "p" convolution_param {{ '
        f'num_output: {o} kernel_size: 1 }} }}\n')
    check(tmp_path, text, shapes, rng, threads=2, cpu=cpu)


@pytest.mark.parametrize("cpu", ["generic", "native"])
def test_depthwise(tmp_path, rng, cpu):
    """Depthwise (MobileNet): output rows just below, at and above one and two vectors
    (a row's last vector stored whole, masked only where it would leave the plane),
    strides 1, 2 (two column phases) and 3, padding 0 to beyond the kernel's reach,
    dilation, non-square kernels and strides, several images, 1-column rows over many
    planes in 2 parts; fused tails: ReLU, a per-channel Scale + PReLU, a residual add
    written over the residual (so the last vector of every row is stored masked),
    2 threads."""
    from graphc.codegen.llvm import gemm, jit
    vw = gemm.default_config(jit.target(cpu)).vw
    cases = [(vw - 1, "kernel_size: 3 pad: 1"), (vw, "kernel_size: 3 pad: 1"),
             (vw + 1, "kernel_size: 3 pad: 1 stride: 2"), (2 * vw, "kernel_size: 3 pad: 1 stride: 2"),
             (2 * vw + 3, "kernel_size: 3 stride: 2"),
             (2 * vw + 1, "kernel_size: 5 pad: 2"), (3, "kernel_size: 3 pad: 0"),
             (2 * vw + 3, "kernel_size: 3 pad: 2 dilation: 2"),
             (3 * vw - 2, "kernel_size: 3 pad: 3 stride: 3"),
             (vw + 3, "kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0"),
             (2 * vw - 3, "kernel_h: 1 kernel_w: 3 stride_h: 2 stride_w: 1 pad_w: 1"),
             (4 * vw + 1, "kernel_size: 3 pad: 1 stride_h: 1 stride_w: 2 dilation: 2")]
    layers, shapes = "", {}
    for i, (w, geom) in enumerate(cases):
        shapes[f"x{i}"] = (2, 3, 6 + i % 3, w)
        layers += (f'layer {{ name: "c{i}" type: "Convolution" bottom: "x{i}" top: "c{i}" '
                   f'convolution_param {{ num_output: 3 group: 3 bias_term: {str(i % 2 == 0).lower()} '
                   f'{geom} }} }}\n'
                   f'layer {{ name: "r{i}" type: "ReLU" bottom: "c{i}" top: "c{i}" }}\n')
    # rows much narrower than a vector, enough planes for the step to run in 2 parts: a
    # row's last vector must not spill into the next part's plane
    shapes["n"] = (2, 128, 20, 3)
    layers += ('layer { name: "nn" type: "Convolution" bottom: "n" top: "nn" convolution_param { '
               'num_output: 128 group: 128 kernel_size: 3 } }\n')
    shapes["y"] = (1, 5, 9, vw + 5)     # residual t dies at the add: written in place
    layers += ('layer { name: "e" type: "Convolution" bottom: "y" top: "e" convolution_param { '
               'num_output: 5 group: 5 kernel_size: 3 stride: 2 } }\n'
               'layer { name: "sc" type: "Scale" bottom: "e" top: "e" scale_param { bias_term: true } }\n'
               'layer { name: "pr" type: "PReLU" bottom: "e" top: "e" }\n'
               'layer { name: "t" type: "Convolution" bottom: "y" top: "t" convolution_param { '
               'num_output: 5 kernel_size: 1 } }\n'
               'layer { name: "d" type: "Convolution" bottom: "y" top: "d" convolution_param { '
               'num_output: 5 group: 5 kernel_size: 3 pad: 1 } }\n'
               'layer { name: "s" type: "Eltwise" bottom: "d" bottom: "t" top: "s" }\n')
    check(tmp_path, inputs_layer(shapes) + layers, shapes, rng, threads=2, cpu=cpu)


@pytest.mark.parametrize("cpu", ["generic", "native"])
def test_convolution_gathered_b(tmp_path, rng, cpu, monkeypatch):
    """Convolutions read B straight from the zero-padded image (no im2col), strided
    ones from its phases: output widths just below, at and above one and two vectors,
    so vectors of pixels cross image rows at every lane; dilation, non-square kernels
    and strides, no padding, groups, strides 2 and 3 (a 1x1 stride 2 reads one phase of
    four), a K longer than one cache block, a fused residual add, 2 images, and a batch
    of small images side by side (vectors of pixels crossing images too).  Checks
    that the gathered path is the one compiled (its offset tables are in the module);
    Winograd's lowering (which would take layer d) is off."""
    from graphc.codegen.llvm import gemm, jit
    from graphc.codegen.llvm.kernels import winograd
    monkeypatch.setattr(winograd, "ENABLED", False)
    from graphc.codegen.llvm.lower import lower_graph
    from graphc.passes import run_pipeline
    vw = gemm.default_config(jit.target(cpu)).vw
    layers, shapes = "", {}
    cases = [(vw - 1, "kernel_size: 3 pad: 1"), (vw, "kernel_size: 3 pad: 2 dilation: 2"),
             (vw + 1, "kernel_h: 1 kernel_w: 3 pad_w: 1"),
             (2 * vw - 1, "kernel_size: 3 pad: 1 group: 2"), (2 * vw + 3, "kernel_size: 2"),
             (2 * vw + 1, "kernel_size: 3 pad: 1 stride: 2"), (2 * vw, "kernel_size: 1 stride: 2"),
             (3 * vw + 2, "kernel_size: 7 pad: 3 stride: 2"),
             (4 * vw, "kernel_size: 3 pad: 2 stride: 3 dilation: 2"),
             (2 * vw + 2, "kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1")]
    for i, (w, geom) in enumerate(cases):
        shapes[f"x{i}"] = (1, 6, 7, w)
        layers += (f'layer {{ name: "c{i}" type: "Convolution" bottom: "x{i}" top: "c{i}" '
                   f'convolution_param {{ num_output: 10 {geom} }} }}\n')
    shapes["y"] = (2, 40, 50, vw + 2)   # K = 360: two K blocks; P > BATCH_P: image by image
    layers += ('layer { name: "d" type: "Convolution" bottom: "y" top: "d" '
               'convolution_param { num_output: 40 kernel_size: 3 pad: 1 } }\n'
               'layer { name: "s" type: "Eltwise" bottom: "d" bottom: "y" top: "s" }\n'
               'layer { name: "r" type: "ReLU" bottom: "s" top: "s" }\n')
    shapes["z"] = (3, 6, 5, 2 * vw + 3)  # small images, a batch: one GEMM for all three
    layers += ('layer { name: "e" type: "Convolution" bottom: "z" top: "e" '
               'convolution_param { num_output: 9 kernel_size: 3 pad: 1 stride_h: 1 stride_w: 2 } }\n')
    text = inputs_layer(shapes) + layers
    check(tmp_path, text, shapes, rng, threads=2, cpu=cpu)
    net = net_from_text(text, tmp_path, rng=rng)
    ir_text = lower_graph(run_pipeline(net.graph), cpu).ir
    gathered = set(re.findall(r'@"?gk_s\d+_(\w+?)_gather_rows"? = internal', ir_text))
    assert gathered == {f"c{i}" for i in range(len(cases))} | {"d_s_r", "e"}, gathered


def test_convolution_gemm_parts(tmp_path, rng):
    """A convolution GEMM at least WIDE_PANELS register tiles wide is cut into
    WIDE_PARTS_PER_THREAD parts per thread, a narrower one into GEMM_PARTS_PER_THREAD;
    both give the reference on 3 threads (24 and 12 parts, not a multiple of the tiles)."""
    from graphc.codegen.llvm import gemm, jit
    from graphc.codegen.llvm.kernels import conv
    from graphc.codegen.llvm.lower import lower_graph
    from graphc.passes import run_pipeline
    nr = gemm.default_config(jit.target("native")).nr
    wide = conv.WIDE_PANELS * nr    # pixels in WIDE_PANELS tiles (w: the last has one)
    shapes = {"w": (1, 8, 1, wide - nr + 1), "n": (1, 8, 1, wide - nr)}
    text = inputs_layer(shapes) + "".join(
        f'layer {{ name: "{x}c" type: "Convolution" bottom: "{x}" top: "{x}c" '
        f'convolution_param {{ num_output: 12 kernel_size: 1 }} }}\n' for x in shapes)
    check(tmp_path, text, shapes, rng, threads=3)
    net = net_from_text(text, tmp_path, rng=rng)
    steps = lower_graph(run_pipeline(net.graph), "native").steps
    per = {x: [s.per_thread for s in steps if f"_{x}c" in s.fn] for x in shapes}
    assert per == {"w": [conv.WIDE_PARTS_PER_THREAD], "n": [conv.GEMM_PARTS_PER_THREAD]}, per


@pytest.mark.parametrize("cpu,threads", [("generic", 3), ("native", 1), ("native", 2)])
def test_winograd(tmp_path, rng, cpu, threads, monkeypatch):
    """3x3 stride-1 convolutions by Winograd's F(4x4, 3x3) (kernels/winograd.py): planes
    of whole tiles, and with a last partial row and column of tiles (output widths one
    tile past a vector of tiles, and just below two), pad 0, 1 and 2, no bias, a fused
    ReLU, an in-place residual add + ReLU, odd output channel counts, and a batch of 3 in
    chunks of 2 images (a small CHUNK_BUDGET).  Checks that exactly those layers are
    lowered so (their transform steps are in the module): not a 7 x 7 plane (4 tiles),
    nor one of 8 input channels, nor 18 (not a multiple of the GEMM's unroll)."""
    from graphc.codegen.llvm import gemm, jit
    from graphc.codegen.llvm.kernels import winograd
    from graphc.codegen.llvm.lower import lower_graph
    from graphc.passes import run_pipeline
    monkeypatch.setattr(winograd, "CHUNK_BUDGET", 100_000)
    vw = gemm.default_config(jit.target(cpu)).vw
    shapes = {"a": (1, 16, 16, 8 * vw), "b": (1, 20, 13, 4 * vw + 3), "c": (3, 16, 12, 14),
              "d": (1, 16, 11, 2 * vw + 1), "e": (1, 16, 12, 12), "f": (1, 32, 7, 7),
              "g": (1, 8, 16, 16), "h": (1, 18, 16, 16)}
    conv = ('layer {{ name: "{0}c" type: "Convolution" bottom: "{0}" top: "{0}c" '
            'convolution_param {{ num_output: {1} kernel_size: 3 {2} }} }}\n')
    text = inputs_layer(shapes) + "".join([
        conv.format("a", 16, "pad: 1"),
        conv.format("b", 19, "pad: 1"),
        'layer { name: "br" type: "ReLU" bottom: "bc" top: "bc" }\n',
        conv.format("c", 16, "pad: 0 bias_term: false"),
        conv.format("d", 24, "pad: 2"),
        conv.format("e", 16, "pad: 1"),
        'layer { name: "es" type: "Eltwise" bottom: "ec" bottom: "e" top: "es" }\n',
        'layer { name: "er" type: "ReLU" bottom: "es" top: "es" }\n',
        conv.format("f", 32, "pad: 1"),
        conv.format("g", 16, "pad: 1"),
        conv.format("h", 16, "pad: 1")])
    check(tmp_path, text, shapes, rng, threads=threads, cpu=cpu)
    net = net_from_text(text, tmp_path, rng=rng)
    ir_text = lower_graph(run_pipeline(net.graph), cpu).ir
    lowered = set(re.findall(r'define void @"?gk_s\d+_(\w+?)_win"?\(', ir_text))
    assert lowered == {"ac", "bc_br", "cc", "dc", "ec_es_er"}, lowered
    # chunks of 2 images: the batch of 3 runs as two input transforms
    assert len(re.findall(r'define void @"?gk_s\d+_cc_win"?\(', ir_text)) == 2


def test_winograd_off(tmp_path, rng, monkeypatch):
    """GRAPHC_WINOGRAD=0 at compile time keeps a layer Winograd would take on the GEMM
    (same results; a separate cached library); any value but 0 or 1 is an error."""
    from graphc.codegen.llvm.lower import lower_graph
    from graphc.errors import GraphcError
    from graphc.passes import run_pipeline
    shapes = {"x": (1, 16, 16, 16)}
    text = inputs_layer(shapes) + ('layer { name: "c" type: "Convolution" bottom: "x" '
                                   'top: "c" convolution_param { num_output: 16 '
                                   'kernel_size: 3 pad: 1 } }\n')
    net = net_from_text(text, tmp_path, rng=rng)
    win = re.compile(r'define void @"?gk_s\d+_c_win"?\(')
    assert win.search(lower_graph(run_pipeline(net.graph), "native").ir)
    monkeypatch.setenv("GRAPHC_WINOGRAD", "0")
    assert not win.search(lower_graph(run_pipeline(net.graph), "native").ir)
    check(tmp_path, text, shapes, rng)
    monkeypatch.setenv("GRAPHC_WINOGRAD", "yes")
    with pytest.raises(GraphcError, match="GRAPHC_WINOGRAD=yes is not 0 or 1"):
        lower_graph(run_pipeline(net.graph), "native")


def test_winograd_weights():
    """The transformed weights give the direct 3x3 sum on every 6 x 6 patch (float64)."""
    from graphc.codegen.llvm.kernels import winograd as wg
    r = np.random.default_rng(0)
    w = r.standard_normal((3, 2, 3, 3))
    d = r.standard_normal((2, 6, 6))
    u = wg.transform_weights(w).astype(np.float64).reshape(6, 6, 3, 2)
    v = np.einsum("ai,cij,bj->abc", wg.BT, d, wg.BT)
    y = np.einsum("ia,aboc,abc,jb->oij", wg.AT, u, v, wg.AT)
    want = np.array([[[np.sum(w[o] * d[:, i:i + 3, j:j + 3]) for j in range(4)]
                      for i in range(4)] for o in range(3)])
    assert np.abs(y - want).max() < 1e-5 * np.abs(want).max()


def test_gather_vectors():
    """bvecs: each vector of columns as at most two runs; None where a vector needs more."""
    from graphc.codegen.llvm import gemm
    cfg = gemm.GemmConfig(vw=4, mr=2, nv=2, kc=8, mc=4, nc=16)
    oh, ow = np.divmod(np.arange(10), 5)            # a 2 x 5 output, rows 7 apart
    v = gemm.gather_vectors(oh * 7 + ow, cfg).reshape(-1, 3)
    assert v.shape == (4, 3)                         # two whole 8-column panels
    lanes = np.arange(4)
    offs = np.concatenate([np.where(lanes < s, b0, b1) + lanes for b0, b1, s in v])
    np.testing.assert_array_equal(offs[:10], oh * 7 + ow)
    np.testing.assert_array_equal(v[1], [4, 6, 1])  # lane 0 at 4; lanes 1-3 at 6 + lane (row 1)
    np.testing.assert_array_equal(v[3], [0, 0, 4])  # past the end: offset 0
    oh, ow = np.divmod(np.arange(12), 3)             # rows of 3: any 4 columns in two runs
    assert gemm.gather_vectors(oh * 4 + ow, cfg) is not None
    assert gemm.gather_vectors(np.arange(12) * 2, cfg) is None   # rows of 1: four runs


def test_convolution_of_one_pixel(tmp_path, rng):
    """A 1x1 convolution of 1x1 images (MobileNet's classifier: an inner product), and a
    3x3 one with padding (not one)."""
    shapes = {"x": (2, 40, 1, 1)}
    text = inputs_layer(shapes) + (
        'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { '
        'num_output: 33 kernel_size: 1 } }\n'
        'layer { name: "r" type: "ReLU" bottom: "c" top: "c" }\n'
        'layer { name: "d" type: "Convolution" bottom: "x" top: "d" convolution_param { '
        'num_output: 7 kernel_size: 3 pad: 1 } }\n')
    check(tmp_path, text, shapes, rng)


@pytest.mark.parametrize("pin", ["1", "0", None])
def test_thread_placement_modes(tmp_path, rng, monkeypatch, pin):
    """GRAPHC_PIN=1 (threads pinned), 0 (left alone) and unset (workers kept off the
    caller's CPU): same results, run after run, with idle pauses between runs
    (the workers fall asleep and are woken again)."""
    import time
    if pin is None:
        monkeypatch.delenv("GRAPHC_PIN", raising=False)
    else:
        monkeypatch.setenv("GRAPHC_PIN", pin)
    shapes = {"x": (1, 6, 15, 13)}
    text = inputs_layer(shapes) + (
        'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { '
        'num_output: 20 kernel_size: 3 pad: 1 } }\n'
        'layer { name: "p" type: "Pooling" bottom: "c" top: "p" pooling_param { '
        'pool: MAX kernel_size: 2 stride: 2 } }\n')
    net = net_from_text(text, tmp_path, rng=rng)
    x = rng.standard_normal(shapes["x"]).astype(np.float32)
    want = net.forward(x=x)
    cn = compile_graph(net.graph, num_threads=2)   # pinned where 2 CPUs are available
    try:
        for _ in range(3):
            assert_close(cn.forward(x=x), want, 1e-4)
            time.sleep(0.02)
    finally:
        cn.close()


def test_convolution_1d_and_threads(tmp_path, rng):
    """A 1-D convolution, and the same results with 1 and 3 threads."""
    shapes = {"x": (2, 5, 17)}
    text = inputs_layer(shapes) + (
        'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { '
        'num_output: 6 kernel_size: 3 stride: 2 pad: 1 } }\n')
    a = check(tmp_path, text, shapes, rng, threads=1)
    rng2 = np.random.default_rng(0)
    net = net_from_text(text, tmp_path, rng=rng2)
    x = rng2.standard_normal(shapes["x"]).astype(np.float32)
    outs = []
    for t in (1, 3):
        cn = compile_graph(net.graph, num_threads=t)
        outs.append(cn.forward(x=x)["c"])
        cn.close()
    assert a["c"].shape == outs[0].shape
    np.testing.assert_array_equal(outs[0], outs[1])


RESIDUAL = """
layer {{ name: "proj" type: "Convolution" bottom: "x" top: "s" convolution_param {{ num_output: 24 kernel_size: 1 }} }}
layer {{ name: "a" type: "Convolution" bottom: "x" top: "a" convolution_param {{ num_output: {mid} kernel_size: 1 }} }}
layer {{ name: "a_relu" type: "ReLU" bottom: "a" top: "a" }}
layer {{ name: "b" type: "Convolution" bottom: "a" top: "b" convolution_param {{ num_output: 24 kernel_size: {k} pad: {pad} }} }}
layer {{ name: "sum" type: "Eltwise" bottom: {order} top: "sum" eltwise_param {{ operation: SUM {coeff} }} }}
layer {{ name: "sum_relu" type: "ReLU" bottom: "sum" top: "sum" }}
"""


@pytest.mark.parametrize("mid,k,coeff,order", [
    (300, 1, "", '"s" bottom: "b"'),          # K > one cache block: the GEMM accumulates
    (20, 3, "", '"b" bottom: "s"'),           # short K: the epilogue reads the residual
    (300, 1, "coeff: 0.5 coeff: 2", '"s" bottom: "b"'),   # coefficients, long K: a temporary
    (20, 1, "coeff: -1 coeff: 1.5", '"s" bottom: "b"'),
])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_residual(tmp_path, rng, mid, k, coeff, order, batch):
    """ResNet's conv + Eltwise SUM + ReLU, the output written over the shortcut (at batch
    3 the small images go a batch at a time through one GEMM, then into place)."""
    shapes = {"x": (batch, 16, 9, 11)}
    text = inputs_layer(shapes) + RESIDUAL.format(mid=mid, k=k, pad=k // 2, coeff=coeff,
                                                  order=order)
    net = net_from_text(text, tmp_path, rng=rng)
    from graphc.passes import run_pipeline
    opt = run_pipeline(net.graph)
    fused = [n for n in opt.nodes if n.op == "Fused" and
             [s["op"] for s in n.attrs["body"]] == ["Convolution", "Eltwise", "ReLU"]]
    assert fused and "inplace" in fused[0].attrs, [n.name for n in opt.nodes]
    check(tmp_path, text, shapes, rng)


@pytest.mark.parametrize("tail", [
    'layer { name: "t" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }',
    'layer { name: "t" type: "PReLU" bottom: "c" top: "c" }',
    'layer { name: "t" type: "TanH" bottom: "c" top: "c" }\n'
    'layer { name: "t2" type: "Sigmoid" bottom: "c" top: "c" }',
    'layer { name: "t" type: "Scale" bottom: "c" top: "c" scale_param { axis: 2 num_axes: 1 } }',
    'layer { name: "t" type: "BatchNorm" bottom: "c" top: "c" }\n'
    'layer { name: "t2" type: "ELU" bottom: "c" top: "c" }',
])
def test_fused_conv_tails(tmp_path, rng, tail):
    """Elementwise tails in the GEMM epilogue (per-channel operands, libm functions per
    lane), and one that is not per channel (a temporary, then a pointwise kernel)."""
    shapes = {"x": (2, 6, 8, 7)}
    text = inputs_layer(shapes) + (
        'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { '
        'num_output: 10 kernel_size: 3 pad: 1 } }\n' + tail + "\n")
    pipeline = ["dead-code", "fuse", "concat-slices", "inplace"] if "BatchNorm" in tail else None
    net = net_from_text(text, tmp_path, rng=rng)
    for p in net.graph.params.values():      # BatchNorm: a positive variance, scale 1
        if p.type.shape == (1,):
            p.data[...] = 1.0
        elif p.name.startswith("t.1"):
            p.data[...] = np.abs(p.data) + 0.5
    x = rng.standard_normal(shapes["x"]).astype(np.float32)
    want = net.forward(x=x)
    cn = compile_graph(net.graph, pipeline=pipeline)
    assert_close(cn.forward(x=x), want)
    cn.close()


# ---------------------------------------------------------------------------------------
# inner product


@pytest.mark.parametrize("batch", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product(tmp_path, rng, batch, transpose):
    """Few rows (dot products over W's rows) and many (the GEMM, "col" epilogue)."""
    k_in, n_out = int(rng.integers(1, 300)), int(rng.integers(1, 70))
    shapes = {"x": (batch, k_in, 1, 1), "y": (2, 3, 5, 4)}
    t = str(transpose).lower()
    text = inputs_layer(shapes) + (
        f'layer {{ name: "ip" type: "InnerProduct" bottom: "x" top: "ip" inner_product_param {{ '
        f'num_output: {n_out} transpose: {t} }} }}\n'
        f'layer {{ name: "relu" type: "ReLU" bottom: "ip" top: "ip" }}\n'
        f'layer {{ name: "ip2" type: "InnerProduct" bottom: "y" top: "ip2" inner_product_param {{ '
        f'num_output: 7 axis: 2 bias_term: false transpose: {t} }} }}\n')
    check(tmp_path, text, shapes, rng)


@pytest.mark.parametrize("batch,k_in", [(2, 300), (16, 300), (16, 40)])
def test_inner_product_residual(tmp_path, rng, batch, k_in):
    """InnerProduct + Eltwise SUM + ReLU fused, written over the shortcut (few rows; many
    rows with a long K, where the GEMM accumulates; a short K)."""
    shapes = {"x": (batch, k_in)}
    text = inputs_layer(shapes) + (
        'layer { name: "s" type: "InnerProduct" bottom: "x" top: "s" inner_product_param { num_output: 50 } }\n'
        'layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 50 } }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "s" bottom: "a" top: "sum" }\n'
        'layer { name: "relu" type: "ReLU" bottom: "sum" top: "sum" }\n'
        'layer { name: "e" type: "Eltwise" bottom: "x" bottom: "x" top: "e" eltwise_param { operation: PROD } }\n'
        'layer { name: "e_relu" type: "TanH" bottom: "e" top: "e" }\n')
    net = net_from_text(text, tmp_path, rng=rng)
    from graphc.passes import run_pipeline
    bodies = [[s["op"] for s in n.attrs["body"]] for n in run_pipeline(net.graph).nodes
              if n.op == "Fused"]
    assert ["InnerProduct", "Eltwise", "ReLU"] in bodies and ["Eltwise", "TanH"] in bodies
    check(tmp_path, text, shapes, rng)


# ---------------------------------------------------------------------------------------
# pooling, LRN, softmax


@st.composite
def pool_branch(draw, i):
    method = draw(st.sampled_from(["MAX", "AVE"]))
    if draw(st.integers(0, 5)) == 0:
        shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 9)),
                 draw(st.integers(1, 9)))
        return shape, (f'layer {{ name: "p{i}" type: "Pooling" bottom: "x{i}" top: "p{i}" '
                       f'pooling_param {{ pool: {method} global_pooling: true }} }}\n')
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(kh, 12)),
             draw(st.integers(kw, 12)))
    rnd = draw(st.sampled_from(["CEIL", "CEIL", "FLOOR"]))
    return shape, (f'layer {{ name: "p{i}" type: "Pooling" bottom: "x{i}" top: "p{i}" '
                   f'pooling_param {{ pool: {method} kernel_h: {kh} kernel_w: {kw} stride_h: {sh} '
                   f'stride_w: {sw} pad_h: {ph} pad_w: {pw} round_mode: {rnd} }} }}\n')


@SETTINGS
@given(data=st.data())
def test_pooling(tmp_path_factory, data, rng):
    branches = [data.draw(pool_branch(i)) for i in range(5)]
    shapes = {f"x{i}": s for i, (s, _) in enumerate(branches)}
    text = inputs_layer(shapes) + "".join(t for _, t in branches)
    check(tmp_path_factory.mktemp("pool"), text, shapes, rng)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_global_pooling(tmp_path, rng, method):
    """One window over the whole plane (the vector reduction of pool._make_global_plane):
    planes of 1 float (the tail alone), under a vector, one vector, under and over the
    accumulators' block, SqueezeNet's 13 x 13; global_pooling and a kernel as large as
    the image, both."""
    sizes = [(1, 1), (1, 7), (2, 4), (4, 8), (5, 8), (7, 7), (13, 13), (3, 50)]
    shapes = {f"x{i}": (2, 3, h, w) for i, (h, w) in enumerate(sizes)}
    text = inputs_layer(shapes)
    for i, (h, w) in enumerate(sizes):
        how = "global_pooling: true" if i % 2 else f"kernel_h: {h} kernel_w: {w}"
        text += (f'layer {{ name: "p{i}" type: "Pooling" bottom: "x{i}" top: "p{i}" '
                 f'pooling_param {{ pool: {method} {how} }} }}\n')
    check(tmp_path, text, shapes, rng)


def test_pooling_mask(tmp_path, rng):
    shapes = {"x": (2, 3, 9, 8)}
    text = inputs_layer(shapes) + (
        'layer { name: "p" type: "Pooling" bottom: "x" top: "p" top: "mask" pooling_param { '
        'pool: MAX kernel_size: 3 stride: 2 pad: 1 } }\n')
    check(tmp_path, text, shapes, rng)


@pytest.mark.parametrize("region,size,beta", [("ACROSS_CHANNELS", 5, 0.75),
                                               ("ACROSS_CHANNELS", 3, 0.6),
                                               ("WITHIN_CHANNEL", 3, 0.75),
                                               ("WITHIN_CHANNEL", 5, 1.0)])
def test_lrn_and_lrn_pool(tmp_path, rng, region, size, beta):
    """LRN alone, and LRN + Pooling fused (the normalized planes live in scratch)."""
    shapes = {"x": (2, 7, 11, 10)}
    lrn = (f'lrn_param {{ local_size: {size} alpha: 0.3 beta: {beta} k: 1.5 '
           f'norm_region: {region} }}')
    text = inputs_layer(shapes) + (
        f'layer {{ name: "n1" type: "LRN" bottom: "x" top: "n1" {lrn} }}\n'
        f'layer {{ name: "n2" type: "LRN" bottom: "x" top: "n2" {lrn} }}\n'
        'layer { name: "p" type: "Pooling" bottom: "n2" top: "p" pooling_param { '
        'pool: MAX kernel_size: 3 stride: 2 } }\n')
    from graphc.passes import run_pipeline
    net = net_from_text(text, tmp_path)
    assert any(n.op == "Fused" for n in run_pipeline(net.graph).nodes)
    check(tmp_path, text, shapes, rng)


@pytest.mark.parametrize("shape,axis", [((3, 10), 1), ((2, 5, 3, 4), 1), ((2, 3, 7), -1),
                                        ((1, 1000), 1), ((4, 6, 2), 0)])
def test_softmax(tmp_path, rng, shape, axis):
    shapes = {"x": shape}
    text = inputs_layer(shapes) + (
        f'layer {{ name: "s" type: "Softmax" bottom: "x" top: "s" softmax_param {{ axis: {axis} }} }}\n')
    check(tmp_path, text, shapes, rng)


# ---------------------------------------------------------------------------------------
# elementwise


UNARY = [
    'type: "ReLU"', 'type: "ReLU" relu_param { negative_slope: 0.2 }', 'type: "ELU"',
    'type: "Sigmoid"', 'type: "TanH"', 'type: "AbsVal"', 'type: "BNLL"',
    'type: "Threshold" threshold_param { threshold: 0.3 }',
    'type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }',
    'type: "Power" power_param { power: 0 }',
    'type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.1 }', 'type: "Exp"',
    'type: "Dropout"', 'type: "PReLU"', 'type: "PReLU" prelu_param { channel_shared: true }',
    'type: "Scale" scale_param { bias_term: true }', 'type: "Bias"',
    'type: "Scale" scale_param { axis: 0 num_axes: -1 }',
]


def test_unary_ops(tmp_path, rng):
    shape = (2, 5, 4, 3)
    shapes = {"x": shape}
    text = inputs_layer(shapes)
    for i, op in enumerate(UNARY):
        text += f'layer {{ name: "u{i}" {op} bottom: "x" top: "u{i}" }}\n'
    check(tmp_path, text, shapes, rng)


def test_positive_ops_and_chains(tmp_path, rng):
    """Log / fractional Power need positive inputs; chains of elementwise ops fuse."""
    shapes = {"x": (3, 4, 5)}
    text = inputs_layer(shapes) + (
        'layer { name: "l" type: "Log" bottom: "x" top: "l" log_param { base: 10 scale: 2 shift: 1 } }\n'
        'layer { name: "q" type: "Power" bottom: "x" top: "q" power_param { power: 0.5 scale: 3 } }\n'
        'layer { name: "r" type: "Power" bottom: "x" top: "r" power_param { power: -1.3 } }\n'
        'layer { name: "a" type: "AbsVal" bottom: "x" top: "a" }\n'
        'layer { name: "a2" type: "ReLU" bottom: "a" top: "a" }\n'
        'layer { name: "a3" type: "TanH" bottom: "a" top: "a" }\n')
    check(tmp_path, text, shapes, rng, positive=True)


def test_eltwise_scale_bias_batchnorm(tmp_path, rng):
    shapes = {"x": (2, 6, 5, 4), "y": (2, 6, 5, 4), "z": (2, 6, 5, 4), "f": (2, 6),
              "g": (6, 5)}
    text = inputs_layer(shapes) + (
        'layer { name: "s" type: "Eltwise" bottom: "x" bottom: "y" bottom: "z" top: "s" '
        'eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 } }\n'
        'layer { name: "p" type: "Eltwise" bottom: "x" bottom: "y" top: "p" eltwise_param { operation: PROD } }\n'
        'layer { name: "m" type: "Eltwise" bottom: "x" bottom: "y" bottom: "z" top: "m" eltwise_param { operation: MAX } }\n'
        'layer { name: "sc" type: "Scale" bottom: "x" bottom: "f" top: "sc" scale_param { axis: 0 } }\n'
        'layer { name: "bi" type: "Bias" bottom: "y" bottom: "g" top: "bi" bias_param { axis: 1 } }\n'
        'layer { name: "bn" type: "BatchNorm" bottom: "z" top: "bn" }\n'
        'layer { name: "bn2" type: "BatchNorm" bottom: "x" top: "bn2" }\n'
        'layer { name: "bn2s" type: "Scale" bottom: "bn2" top: "bn2" scale_param { bias_term: true } }\n')
    net = net_from_text(text, tmp_path, rng=rng)
    for name in ("bn", "bn2"):
        m, v, s = net.params[name]
        v[...] = np.abs(v) + 0.5
        s[...] = 2.0
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    want = net.forward(**feeds)
    for pipeline in (None, ["dead-code", "fuse", "concat-slices", "inplace"]):
        cn = compile_graph(net.graph, pipeline=pipeline)
        assert_close(cn.forward(**feeds), want)
        cn.close()


# ---------------------------------------------------------------------------------------
# data movement


@pytest.mark.parametrize("batch", [1, 2])
def test_concat_slice_crop_tile_views(tmp_path, rng, batch):
    """Concat written in place by its producers (batch 1) or copied (batch 2), Slice,
    Crop, Tile, Flatten and Reshape."""
    shapes = {"x": (batch, 4, 6, 5), "r": (batch, 2, 3, 2)}
    text = inputs_layer(shapes) + (
        'layer { name: "c1" type: "Convolution" bottom: "x" top: "c1" convolution_param { num_output: 3 kernel_size: 1 } }\n'
        'layer { name: "c2" type: "Convolution" bottom: "x" top: "c2" convolution_param { num_output: 5 kernel_size: 3 pad: 1 } }\n'
        'layer { name: "cat" type: "Concat" bottom: "c1" bottom: "c2" top: "cat" }\n'
        'layer { name: "cat2" type: "Concat" bottom: "x" bottom: "x" top: "cat2" concat_param { axis: 2 } }\n'
        'layer { name: "sl" type: "Slice" bottom: "cat" top: "s1" top: "s2" top: "s3" slice_param { slice_point: 2 slice_point: 7 } }\n'
        'layer { name: "cr" type: "Crop" bottom: "x" bottom: "r" top: "cr" crop_param { axis: 1 offset: 1 offset: 2 offset: 3 } }\n'
        'layer { name: "ti" type: "Tile" bottom: "r" top: "ti" tile_param { axis: 2 tiles: 3 } }\n'
        'layer { name: "fl" type: "Flatten" bottom: "s1" top: "fl" }\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "fl" top: "ip" inner_product_param { num_output: 4 } }\n'
        'layer { name: "re" type: "Reshape" bottom: "s3" top: "re" reshape_param { shape { dim: 0 dim: -1 } } }\n')
    check(tmp_path, text, shapes, rng)


PYLAYER = """
import graphc
class Copy(graphc.PythonLayer):
    def setup(self, bottom, top): pass
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top): top[0].data[...] = bottom[0].data
"""


@pytest.mark.parametrize("layer,name,what", [
    ('layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" }', "acc",
     "no CPU kernel"),
    ('layer { name: "py" type: "Python" bottom: "x" top: "py" '
     'python_param { module: "cpu_test_layer" layer: "Copy" } }', "py", "Python code"),
    ('layer { name: "dd" type: "DummyData" top: "dd" dummy_data_param { shape { dim: 2 } } }',
     "dd", "produces data by itself"),
])
def test_unsupported_layer_is_an_error(tmp_path, layer, name, what):
    """A layer the backend cannot compile is a GraphcError naming it, at compile time."""
    from graphc.errors import GraphcError
    (tmp_path / "cpu_test_layer.py").write_text(PYLAYER)
    shapes = {"x": (2, 5), "label": (2,)}
    net = net_from_text(inputs_layer(shapes) + layer + "\n", tmp_path)
    with pytest.raises(GraphcError) as e:
        compile_graph(net.graph)
    assert f"layer '{name}'" in str(e.value) and what in str(e.value) and e.value.hint
