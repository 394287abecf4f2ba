"""Compiled nets: the build (optimize, lower, emit, render the C runtime, cc), the cache,
the ctypes loader, and the ``graphc compile`` / ``graphc time`` commands.

    build.py     build_library (NET -> net.so + net.h [+ net.weights]), cached_library
    loader.py    graphc.load("net.so") -> CompiledNet with .forward(**inputs)
    commands.py  the CLI subcommands
    testing.py   helpers for testing the backend against the reference executor

The C runtime itself is templates/runtime.c.j2 (arena, thread pool, API), its header
templates/net.h.j2.
"""
