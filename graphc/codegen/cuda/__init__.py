"""The CUDA backend: kernels from Jinja2 CUDA C templates (templates/cuda/), compiled with
NVRTC (optional extra: pip install graphc[cuda]); runs through the C host runtime.

    program.py  what code generation hands the runtime (CudaProgram, Launch, Arg)
"""
