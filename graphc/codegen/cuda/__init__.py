"""The CUDA backend: kernels from Jinja2 CUDA C templates (templates/cuda/), compiled with
NVRTC (optional extra: pip install graphc[cuda]); runs through the C host runtime.

    program.py    what code generation hands the runtime (CudaProgram, Launch, Arg)
    lower.py      optimized IR -> CudaProgram (lower_graph): which kernel runs each node
    pointwise.py  fused elementwise programs (epilogues, standalone chains) as CUDA C
    tiles.py      the tile table of the implicit-GEMM conv / GEMM and the rule picking one
    nvrtc.py      CUDA C -> cubin (compile_module), ptxas resources, disk cache, errors
    check.py      compile checks of many nets' kernels, resource tables, spill check
    emulate.py    runs a CudaProgram on the CPU (tests, debugging)
"""
