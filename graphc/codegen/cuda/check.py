"""Compile-checking the CUDA kernels of nets without a GPU, and their resources.

    kernels = instantiations(graphs, precisions)      # {kernel name: source}, each once
    info = compile_check(graphs, arch="sm_90")         # NVRTC, one translation unit per net
    print(resource_table(info))                        # registers, smem, spills per kernel

A kernel's name says what it is (template, tile, precision, fused epilogue), so an
instantiation two nets (or two precisions) share is compiled once: each net's unit holds
only the kernels no earlier unit had.  ``spilling(info)`` lists the main convolution /
GEMM kernels whose registers spill to local memory (a performance bug the tests reject).
"""
from __future__ import annotations

from ...errors import GraphcError
from .lower import PRECISIONS, generate
from .nvrtc import compile_module
from .program import KernelInfo

#: the kernels whose spills fail the build's check (the implicit-GEMM conv / GEMM)
MAIN_KINDS = ("gc_conv_",)

_PRELUDE_ALL = """// graphc kernel compile check ({what})
#include <mma.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define GC_FLT_MAX 3.402823466e+38f
#define GC_FLT_MIN 1.175494351e-38f
"""


#: the data-layer tops of the train/test nets of Caffe's examples, fed at their test batch
#: (a compile check needs shapes, not data), and the stages their test phase needs
TRAIN_NET_FEEDS = {
    "lenet_train_test": ({"data": (100, 1, 28, 28), "label": (100,)}, ()),
    "cifar10_quick_train_test": ({"data": (100, 3, 32, 32), "label": (100,)}, ()),
    "cifar10_bn_train_test": ({"data": (1000, 3, 32, 32), "label": (1000,)}, ()),
    "alexnet_train_val": ({"data": (50, 3, 227, 227), "label": (50,)}, ()),
    "mnist_autoencoder": ({"data": (100, 1, 28, 28)}, ("test-on-test",)),
}


def inference_graph(path, feeds=None, stages=()):
    """A net's test phase, optimized, params filled, without its loss and accuracy
    layers (their bottoms become outputs): what the CUDA backend compiles of it."""
    from ...frontend.lower import lower
    from ...frontend.prototxt import read_net
    from ...passes import run_pipeline
    from ...runtime.build import fill_params
    g = lower(read_net(str(path)), "test", input_shapes=feeds or {}, stages=stages)
    keep, outs = [], []
    for n in g.nodes:
        if n.op.endswith("Loss") or n.op == "Accuracy":
            outs += n.inputs[:1]
        else:
            keep.append(n)
    made = {v for n in keep for v in n.outputs}
    g.nodes = keep
    g.outputs = list(dict.fromkeys([v for v in g.outputs if v in made] + outs))
    fill_params(g)
    return run_pipeline(g)


def zoo_graphs(zoo) -> dict:
    """{net name: optimized graph} of every net prototxt in directory ``zoo``."""
    from pathlib import Path
    graphs = {}
    for f in sorted(Path(zoo).glob("*.prototxt")):
        if "solver" in f.name:
            continue
        feeds, stages = TRAIN_NET_FEEDS.get(f.stem, ({}, ()))
        graphs[f.stem] = inference_graph(f, feeds, stages)
    return graphs


def instantiations(g_opt, precisions=PRECISIONS, arch: str = "sm_90") -> dict[str, str]:
    """{kernel name: its source} of an optimized graph in each of ``precisions``."""
    out: dict[str, str] = {}
    for prec in precisions:
        k, _ = generate(g_opt, arch, prec)
        for name, src in k.kernels.values():
            out.setdefault(name, src)
    return out


def compile_check(graphs: dict, arch: str = "sm_90", precisions=PRECISIONS,
                  seen: dict | None = None) -> dict[str, KernelInfo]:
    """Compile every distinct kernel instantiation of the optimized graphs
    ``{name: g_opt}`` (one NVRTC unit per graph, each instantiation once) and return
    ptxas's resources per kernel.  ``seen``: kernels already compiled (updated)."""
    seen = {} if seen is None else seen
    for gname, g in graphs.items():
        fresh = {n: s for n, s in instantiations(g, precisions, arch).items() if n not in seen}
        if not fresh:
            continue
        source = _PRELUDE_ALL.format(what=gname) + "\n" + "\n".join(fresh.values())
        try:
            mod = compile_module(source, arch, name=f"{gname}.cu")
        except GraphcError as e:
            e.message = f"net {gname}: {e.message}"
            raise
        missing = sorted(set(fresh) - set(mod.kernels))
        if missing:
            raise GraphcError(f"net {gname}: ptxas reported no resources for "
                              f"{', '.join(missing)}")
        for n in fresh:
            seen[n] = mod.kernels[n]
    return seen


def descriptions(sources) -> dict[str, str]:
    """{kernel: what it is} from the ``// kernel NAME: ...`` line each template starts
    with (``sources``: texts, or a {name: source} dict)."""
    import re
    texts = sources.values() if isinstance(sources, dict) else sources
    out = {}
    for text in texts:
        for m in re.finditer(r"^// kernel (\w+): (.*)$", text, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def spilling(info: dict[str, KernelInfo], kinds=MAIN_KINDS) -> list[KernelInfo]:
    return [ki for name, ki in sorted(info.items())
            if name.startswith(kinds) and (ki.spill_stores or ki.spill_loads)]


def resource_table(info: dict[str, KernelInfo], what: dict | None = None) -> str:
    """A Markdown table of ptxas's resources per kernel (``what``: descriptions)."""
    what = what or {}
    rows = ["| kernel | what | registers | static smem (B) | stack (B) | spill stores (B) | "
            "spill loads (B) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, ki in sorted(info.items()):
        rows.append(f"| {name} | {what.get(name, '')} | {ki.registers} | {ki.shared_bytes} | "
                    f"{ki.local_bytes} | {ki.spill_stores} | {ki.spill_loads} |")
    return "\n".join(rows)
