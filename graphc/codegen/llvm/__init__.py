"""The CPU backend: LLVM IR generated with llvmlite.

    jit.py    target machines ("native", "generic" x86-64 baseline, ...), -O3, MCJIT, objects
    gemm.py   SGEMM: packing, cache blocking, register-blocked FMA microkernel, epilogue hook
    peak.py   the machine's FP32 peak, measured with an FMA-bound loop
    lower.py  the optimized IR -> one module of parallel steps + the schedule (Program)
    irutil.py small helpers for writing kernels (loops, pointers, the step signature)
    kernels/  one generator per op family: conv, linear, pool, lrn, softmax, pointwise
              (elementwise programs, also run in GEMM epilogues), tensor (copies)
"""
