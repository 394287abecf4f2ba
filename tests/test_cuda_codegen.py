"""The CUDA code generator: every kernel checked against the numpy reference executor on
the CPU emulator (graphc/codegen/cuda/emulate.py: the generated CUDA C compiled as C++,
the arena NaN-poisoned and guarded, every output element must be written), in each
precision; NVRTC compile checks of every kernel instantiation the zoo nets need, with
ptxas's registers / shared memory / spills (spills in the main conv / GEMM kernels fail);
and the errors a user sees."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from graphc.codegen.cuda import nvrtc
from graphc.codegen.cuda.lower import lower_graph
from graphc.codegen.cuda.tiles import SIMT_TILES, WMMA_TILES, choose_tile
from graphc.errors import GraphcError
from graphc.passes import run_pipeline
from graphc.runtime.testing import assert_close, net_from_text

needs_nvrtc = pytest.mark.skipif(not nvrtc.nvrtc_available(),
                                 reason="cuda-bindings / NVRTC not installed "
                                        "(pip install 'graphc[cuda]')")
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None,
                               reason="the CUDA emulator needs g++ (C++20)")

#: relative L2 error allowed per precision (a few layers deep, fp32 accumulation)
TOL = {"fp32": 2e-5, "tf32": 4e-3, "fp16": 4e-3, "bf16": 3e-2}


@pytest.fixture(scope="module", autouse=True)
def cuda_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHC_CACHE", str(tmp_path_factory.mktemp("graphc-cache")))
    yield
    mp.undo()


def _input(shapes: dict) -> str:
    tops = "".join(f' top: "{k}"' for k in shapes)
    dims = "".join("shape {" + "".join(f" dim: {d}" for d in s) + " } "
                   for s in shapes.values())
    return f'layer {{ name: "in" type: "Input"{tops} input_param {{ {dims}}} }}\n'


def _layer(name, type_, bottoms, tops=None, **params) -> str:
    b = "".join(f' bottom: "{x}"' for x in bottoms)
    t = "".join(f' top: "{x}"' for x in (tops or [name]))
    p = " ".join(f"{k} {{ {v} }}" for k, v in params.items())
    return f'layer {{ name: "{name}" type: "{type_}"{b}{t} {p} }}\n'


def conv_net(rng) -> tuple[str, dict]:
    """Convolutions and inner products with fused tails, sizes drawn from ``rng``: the
    implicit GEMM (general, 1x1 with a residual sum, strided + dilated + grouped,
    non-square without bias), the direct depthwise kernel with folded BatchNorm + Scale
    and PReLU, inner products (one transposed)."""
    c0 = int(rng.integers(3, 8))
    h, w = int(rng.integers(9, 14)), int(rng.integers(9, 14))
    c1 = 2 * int(rng.integers(10, 21))
    c3 = 2 * int(rng.integers(6, 12))
    shapes = {"data": (2, c0, h, w)}
    t = _input(shapes)
    t += _layer("conv1", "Convolution", ["data"],
                convolution_param=f"num_output: {c1} kernel_size: 3 pad: 1")
    t += _layer("relu1", "ReLU", ["conv1"], ["conv1"], relu_param="negative_slope: 0.1")
    t += _layer("conv2", "Convolution", ["conv1"],
                convolution_param=f"num_output: {c1} kernel_size: 1")
    t += _layer("sum2", "Eltwise", ["conv2", "conv1"])
    t += _layer("relu2", "ReLU", ["sum2"], ["sum2"])
    t += _layer("conv3", "Convolution", ["sum2"],
                convolution_param=f"num_output: {c3} kernel_size: 3 stride: 2 pad: 2 "
                                  f"dilation: 2 group: 2")
    t += _layer("dw", "Convolution", ["conv3"],
                convolution_param=f"num_output: {c3} kernel_size: 3 pad: 1 group: {c3}")
    t += _layer("bn", "BatchNorm", ["dw"], ["dw"])
    t += _layer("scale", "Scale", ["dw"], ["dw"], scale_param="bias_term: true")
    t += _layer("prelu", "PReLU", ["dw"], ["dw"])
    t += _layer("conv5", "Convolution", ["data"],
                convolution_param="num_output: 17 kernel_h: 5 kernel_w: 3 pad_h: 2 pad_w: 1 "
                                  "stride_h: 1 stride_w: 2 bias_term: false")
    t += _layer("elu5", "ELU", ["conv5"], ["conv5"], elu_param="alpha: 0.7")
    t += _layer("sig5", "Sigmoid", ["conv5"], ["conv5"])
    t += _layer("ip1", "InnerProduct", ["dw"], inner_product_param="num_output: 37")
    t += _layer("tanh1", "TanH", ["ip1"], ["ip1"])
    t += _layer("ip2", "InnerProduct", ["ip1"],
                inner_product_param="num_output: 11 transpose: true")
    return t, shapes


def other_net(rng) -> tuple[str, dict]:
    """Every other kernel: pooling (MAX / AVE with Caffe's rounding and padding, global,
    the mask top), LRN (both regions, and fused with a pooling), softmax (channels of an
    image; rows), concat (by slices and by copying), slice, crop, tile, deconvolution
    (plain and grouped), elementwise ops standalone."""
    c = 2 * int(rng.integers(3, 6))
    h, w = int(rng.integers(10, 15)), int(rng.integers(10, 15))
    shapes = {"data": (2, c, h, w), "other": (2, c, h, w)}
    t = _input(shapes)
    t += _layer("pmax", "Pooling", ["data"], ["pmax", "pmask"],
                pooling_param="pool: MAX kernel_size: 3 stride: 2")
    t += _layer("pave", "Pooling", ["data"], pooling_param="pool: AVE kernel_size: 3 stride: 2 pad: 1")
    t += _layer("pglob", "Pooling", ["data"], pooling_param="pool: AVE global_pooling: true")
    t += _layer("pmaxpad", "Pooling", ["data"],
                pooling_param="pool: MAX kernel_size: 2 stride: 2 pad: 1")
    t += _layer("lrn1", "LRN", ["data"], lrn_param="local_size: 5 alpha: 0.3 beta: 0.75 k: 2")
    t += _layer("lrn2", "LRN", ["data"],
                lrn_param="local_size: 3 alpha: 0.2 beta: 0.5 norm_region: WITHIN_CHANNEL")
    t += _layer("lrn3", "LRN", ["other"], lrn_param="local_size: 3 alpha: 0.1 beta: 0.75")
    t += _layer("plrn", "Pooling", ["lrn3"], pooling_param="pool: MAX kernel_size: 3 stride: 2")
    t += _layer("lrn4", "LRN", ["data"],
                lrn_param="local_size: 3 alpha: 0.4 beta: 0.6 norm_region: WITHIN_CHANNEL")
    t += _layer("plrn4", "Pooling", ["lrn4"],
                pooling_param="pool: AVE kernel_size: 3 stride: 2 pad: 1")
    t += _layer("soft", "Softmax", ["data"])
    t += _layer("flat", "Flatten", ["pave"])
    t += _layer("softrows", "Softmax", ["flat"])
    t += _layer("relu_a", "ReLU", ["data"], ["ra"])
    t += _layer("tanh_b", "TanH", ["other"], ["tb"])
    t += _layer("cat", "Concat", ["ra", "tb"])
    t += _layer("cat2", "Concat", ["data", "other"], concat_param="axis: 2")
    t += _layer("slice", "Slice", ["other"], ["s1", "s2"], slice_param="axis: 1 slice_point: 2")
    t += _layer("crop", "Crop", ["data", "pave"], crop_param="axis: 2 offset: 1")
    t += _layer("tile", "Tile", ["s1"], tile_param="axis: 1 tiles: 3")
    t += _layer("deconv", "Deconvolution", ["pmax"],
                convolution_param="num_output: 3 kernel_size: 4 stride: 2 pad: 1")
    t += _layer("deconv2", "Deconvolution", ["pave"],
                convolution_param="num_output: 4 kernel_size: 3 stride: 1 group: 2")
    t += _layer("emax", "Eltwise", ["data", "other"], eltwise_param="operation: MAX")
    t += _layer("eprod", "Eltwise", ["data", "other", "data"], eltwise_param="operation: PROD")
    t += _layer("esum", "Eltwise", ["data", "other"], eltwise_param="coeff: 0.5 coeff: -2")
    t += _layer("abs", "AbsVal", ["other"], ["ab"])
    t += _layer("pow", "Power", ["ab"], ["pw"], power_param="power: 1.5 scale: 0.5 shift: 1")
    t += _layer("log", "Log", ["pw"], ["lg"])
    t += _layer("exp", "Exp", ["lg"], ["ex"], exp_param="base: 2 scale: 0.5")
    t += _layer("bnll", "BNLL", ["data"], ["bl"])
    t += _layer("thr", "Threshold", ["data"], ["th"], threshold_param="threshold: 0.2")
    return t, shapes


def _net(text, tmp_path, rng):
    net = net_from_text(text, tmp_path, rng=rng)
    for n in net.graph.nodes:       # BatchNorm: a positive variance, scale factor 1
        if n.op == "BatchNorm":
            var, factor = (net.graph.params[p] for p in n.params[1:3])
            var.data[...] = np.abs(var.data) + 0.5
            factor.data[...] = 1.0
    return net


def _run(tmp_path, rng, text, shapes, precision):
    from graphc.codegen.cuda.emulate import run_program
    net = _net(text, tmp_path, rng)
    feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    want = net.forward(**feeds)
    program = lower_graph(run_pipeline(net.graph), precision=precision, compile=False)
    got = run_program(program, feeds)
    return program, got, want


@needs_cxx
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
def test_conv_kernels_match_reference(tmp_path, rng, precision):
    text, shapes = conv_net(rng)
    program, got, want = _run(tmp_path, rng, text, shapes, precision)
    assert_close(got, want, TOL[precision])
    kinds = {ln.kernel.split("_")[1] for ln in program.launches}
    assert {"conv", "dconv"} <= kinds, kinds        # the GEMM and the direct kernel ran
    fused = [n.op for n in program.nodes if "+" in n.op]
    assert any("Eltwise" in op for op in fused), fused
    if precision != "fp32":
        assert "nvcuda::wmma::mma_sync" in program.source
    else:
        assert "wmma" not in program.source


@needs_cxx
def test_other_kernels_match_reference(tmp_path, rng):
    text, shapes = other_net(rng)
    program, got, want = _run(tmp_path, rng, text, shapes, "fp32")
    assert_close(got, want, TOL["fp32"])
    kinds = {ln.kernel.split("_")[1] for ln in program.launches}
    assert {"pool", "lrn", "lrnpool", "softmax", "copy", "deconv", "pw"} <= kinds, kinds
    assert sum(n.op == "LRN+Pooling" for n in program.nodes) == 2


# ---------------------------------------------------------------------------------------
# NVRTC


@needs_nvrtc
def test_zoo_kernels_compile_without_spills(shared_dir, capsys):
    """Every kernel instantiation of every zoo net, in every precision, compiles to SASS
    for sm_90; ptxas's report per kernel is printed; no main conv/GEMM kernel spills."""
    from graphc.codegen.cuda.check import compile_check, instantiations, resource_table, \
        spilling, zoo_graphs
    graphs = zoo_graphs(shared_dir / "zoo")
    assert len(graphs) >= 10
    info = compile_check(graphs, "sm_90")
    for name, g in graphs.items():
        assert set(instantiations(g)) <= set(info), name
    with capsys.disabled():
        print(f"\nCUDA kernels of the zoo (sm_90, all precisions): {len(info)}")
        print(resource_table(info))
    assert any(k.startswith("gc_conv_") for k in info)
    bad = spilling(info)
    assert not bad, f"conv/GEMM kernels spill registers: {bad}"
    assert all(ki.registers > 0 for ki in info.values())


@needs_nvrtc
def test_program_carries_cubin_and_resources(tmp_path, rng):
    text, _ = conv_net(rng)
    net = _net(text, tmp_path, rng)
    p = lower_graph(run_pipeline(net.graph), "sm_90", "tf32")
    assert p.cubin[:4] == b"\x7fELF" and p.cubin[18] == 190      # ELF for NVIDIA CUDA
    assert {ln.kernel for ln in p.launches} <= set(p.kernels)
    assert "ptxas" in p.compile_log
    report = p.resource_report()
    assert all(k in report for k in p.kernels) and "wmma" in report
    for ln in p.launches:
        for a in ln.args:
            if a.kind == "arena":
                assert 0 <= a.value <= p.arena_bytes
            elif a.kind == "weights":
                assert 0 <= a.value <= p.weights.size


@needs_nvrtc
def test_spill_check_sees_spills():
    """A register-starved kernel spills; the check reports it from ptxas's log."""
    from graphc.codegen.cuda.check import spilling
    src = """extern "C" __global__ void gc_conv_starved(const float *x, float *y) {
        float a[64];
        for (int i = 0; i < 64; i++) a[i] = x[i * threadIdx.x];
        float s = 0.0f;
        for (int j = 0; j < 64; j++) for (int i = 0; i < 64; i++) s += a[i] * a[(i + j) % 64];
        y[threadIdx.x] = s;
    }"""
    mod = nvrtc.compile_module(src, "sm_90", options=["--maxrregcount=16"], cache=False)
    ki = mod.kernels["gc_conv_starved"]
    assert ki.spill_stores > 0 and ki.spill_loads > 0 and ki.local_bytes > 0
    assert [k.name for k in spilling(mod.kernels)] == ["gc_conv_starved"]


@needs_nvrtc
def test_compile_cache_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE", str(tmp_path))
    src = 'extern "C" __global__ void k(float *y) { y[threadIdx.x] = 2.0f; }\n'
    a = nvrtc.compile_module(src, "sm_90")
    files = sorted(p.name for p in (tmp_path / "cuda-nvrtc").glob("*.bin"))
    assert len(files) == 1
    monkeypatch.setattr(nvrtc, "_MEMO", {})
    monkeypatch.setattr(nvrtc, "_run", lambda *a, **k: pytest.fail("compiled again"))
    b = nvrtc.compile_module(src, "sm_90")
    assert a.cubin == b.cubin and a.cubin[:4] == b"\x7fELF" and b.kernels == a.kernels


@needs_nvrtc
def test_nvrtc_error_names_line_kernel_and_layer():
    src = ("// layer: conv7\n"
           'extern "C" __global__ void gc_conv_bad(float *y) {\n'
           "    y[0] = undefined_thing;\n"
           "}\n")
    with pytest.raises(GraphcError) as e:
        nvrtc.compile_module(src, "sm_90", name="net.cu", cache=False)
    err = e.value
    assert err.layer == "conv7" and err.kernel == "gc_conv_bad"
    assert err.where == "net.cu:3"
    assert "undefined_thing" in str(err) and "3 | y[0] = undefined_thing;" in str(err)


@needs_nvrtc
def test_bad_arch_is_a_clear_error():
    with pytest.raises(GraphcError, match="not a GPU architecture"):
        nvrtc.compile_module('extern "C" __global__ void k() {}', "volta")
    with pytest.raises(GraphcError, match="cannot make SASS for sm_10"):
        nvrtc.compile_module('extern "C" __global__ void k() {}', "sm_10")


def test_missing_cuda_bindings_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", None)
    with pytest.raises(GraphcError) as e:
        nvrtc.compile_module('extern "C" __global__ void k() {}')
    assert "pip install 'graphc[cuda]'" in str(e.value)
    assert not nvrtc.nvrtc_available()


def test_unsupported_layer_names_it(tmp_path, rng):
    text = _input({"data": (2, 5)}) + _layer("am", "ArgMax", ["data"])
    net = net_from_text(text, tmp_path, rng=rng)
    with pytest.raises(GraphcError) as e:
        lower_graph(run_pipeline(net.graph), compile=False)
    assert e.value.layer == "am" and "no CUDA kernel for ArgMax" in str(e.value)


def test_bad_precision(tmp_path, rng):
    text = _input({"data": (2, 5)}) + _layer("r", "ReLU", ["data"])
    net = net_from_text(text, tmp_path, rng=rng)
    with pytest.raises(GraphcError, match="precision 'fp8'"):
        lower_graph(run_pipeline(net.graph), precision="fp8", compile=False)
    with pytest.raises(GraphcError, match="needs tensor cores of sm_80"):
        lower_graph(run_pipeline(net.graph), "sm_75", "tf32", compile=False)


# ---------------------------------------------------------------------------------------
# the tile table


def test_tiles_are_consistent():
    for t in WMMA_TILES:
        assert t.BM % t.WM == 0 and t.BN % t.WN == 0 and t.WM % 16 == 0 and t.WN % 16 == 0
        assert t.BN <= t.threads and t.threads % t.BN == 0 and t.threads <= 1024
        assert (t.threads // t.BN) <= t.BK
    for t in WMMA_TILES + SIMT_TILES:     # whole register tiles per thread (the pipeline)
        assert t.BM * t.BK % t.threads == 0 and t.BK * t.BN % t.threads == 0
    for t in SIMT_TILES:
        assert t.BM % 16 == 0 and t.BN % 16 == 0 and t.threads % t.BN == 0


@pytest.mark.parametrize("M,npix,groups,want", [
    (256, 10 * 27 * 27, 1, (128, 64)),      # a big layer: a big tile
    (384, 10 * 55 * 55, 1, (128, 128)),
    (4096, 10, 1, (64, 16)),                # an inner product of batch 10: thin N
    (16, 56 * 56, 1, (32, 64)),             # few channels
])
def test_tile_choice(M, npix, groups, want):
    t = choose_tile(M, npix, groups)
    assert (t.BM, t.BN) == want
    assert not choose_tile(M, npix, groups, tensor_cores=False).wmma


def test_tile_choice_wastes_little(rng):
    for _ in range(50):
        M, npix = int(rng.integers(1, 3000)), int(rng.integers(1, 100000))
        t = choose_tile(M, npix)
        used = M * npix / (-(-M // t.BM) * t.BM * -(-npix // t.BN) * t.BN)
        best = max(M * npix / (-(-M // u.BM) * u.BM * -(-npix // u.BN) * u.BN)
                   for u in WMMA_TILES)
        assert used >= 0.4 * best, (M, npix, t)
