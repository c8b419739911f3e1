"""WKV recurrences behind one dispatch: CUDA kernel (when the tensors are on a CUDA device and
the kernel builds; see ops/cuda.py), chunked PyTorch (fast on CPU, autograd-able), and the naive
per-token loop that is the readable truth. T == 1 (the RNN step) always uses the direct step."""
from __future__ import annotations

import logging
import os

from . import chunked, naive

log = logging.getLogger("rwkvtools")
_announced: set = set()

BACKENDS = ("auto", "cuda", "chunked", "naive")
_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend for every call ("naive", "chunked", "cuda"), or None for automatic."""
    global _forced
    if name not in (None, *BACKENDS):
        raise ValueError(f"unknown backend '{name}'; known: {', '.join(BACKENDS)}")
    _forced = None if name == "auto" else name


def _cuda_ok(x) -> bool:
    if not x.is_cuda or os.environ.get("RWKVTOOLS_CUDA", "1") == "0":
        return False
    try:
        from . import cuda
    except ImportError:
        return False
    return cuda.available()


def backend_for(x, T: int) -> str:
    if _forced:
        return _forced
    if T == 1:
        return "naive"
    if _cuda_ok(x):
        return "cuda"
    return "chunked"


def _announce(name: str) -> None:
    if name not in _announced:
        _announced.add(name)
        log.info("rwkvtools: WKV backend %s", name)


def wkv4(w, u, k, v, state):
    be = backend_for(k, k.shape[1])
    _announce(be)
    if be == "cuda":
        from . import cuda
        return cuda.wkv4(w, u, k, v, state)
    if be == "chunked":
        return chunked.wkv4_chunked(w, u, k, v, state)
    return naive.wkv4_naive(w, u, k, v, state)


def wkv_diag(r, k, v, g, u, S):
    be = backend_for(r, r.shape[1])
    _announce(be)
    if be == "cuda":
        from . import cuda
        return cuda.wkv_diag(r, k, v, g, u, S)
    if be == "chunked":
        return chunked.wkv_diag_chunked(r, k, v, g, u, S)
    return naive.wkv_diag_naive(r, k, v, g, u, S)


def wkv7(r, g, k, v, a, b, S):
    be = backend_for(r, r.shape[1])
    _announce(be)
    if be == "cuda":
        from . import cuda
        return cuda.wkv7(r, g, k, v, a, b, S)
    if be == "chunked":
        return chunked.wkv7_chunked(r, g, k, v, a, b, S)
    return naive.wkv7_naive(r, g, k, v, a, b, S)


def last_backend(x, T: int) -> str:
    return backend_for(x, T)
