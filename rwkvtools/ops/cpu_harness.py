"""CPU harness of the CUDA WKV kernels: kernels/cpu_harness.cpp runs the kernels' per-thread
functions (kernels/wkv4.h, wkv_diag.h, wkv7.h, the same code the CUDA kernels call) over the
same grid, phase by phase, on the CPU. Built with the system C++ compiler by torch's extension
loader (no CUDA needed; cached under ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), registered as ``torch.ops.rwkvtools_cpu``.

It exists to test the kernels' arithmetic on machines without a GPU (tests/test_kernels.py);
it is not a fast path. The functions have the contracts of ops/naive.py and take CPU tensors;
:func:`wkv7` is differentiable through the backward kernel's per-thread code."""
from __future__ import annotations

import threading

from . import cuda

_lock = threading.Lock()
_lib = None


def load(verbose: bool = False):
    """Build (first call; cached on disk afterwards) and load the harness library."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = cuda.build_library("rwkvtools_wkv_cpu_harness", ("cpu_harness.cpp",), "rwkvtools_cpu",
                                      cuda=False, verbose=verbose)
    return _lib


def head_sizes() -> tuple[int, ...]:
    return load().head_sizes


def wkv4(w, u, k, v, state):
    """ops.naive.wkv4_naive contract (forward only)."""
    return cuda.run_wkv4(load(), w, u, k, v, state)


def wkv_diag(r, k, v, g, u, S):
    """ops.naive.wkv_diag_naive contract (forward only)."""
    return cuda.run_wkv_diag(load(), r, k, v, g, u, S)


def wkv7(r, g, k, v, a, b, S):
    """ops.naive.wkv7_naive contract; differentiable (the backward kernel's code)."""
    return cuda.run_wkv7(load(), r, g, k, v, a, b, S)
