"""The CPU backend: LLVM IR generated with llvmlite.

    jit.py    target machines ("native", "generic" x86-64 baseline, ...), -O3, MCJIT, objects
    gemm.py   SGEMM: packing, cache blocking, register-blocked FMA microkernel, epilogue hook
    peak.py   the machine's FP32 peak, measured with an FMA-bound loop
"""
