"""CUDA WKV kernels (sources in ``kernels/``), used by ops/__init__'s dispatch when the tensors
are on a CUDA device and the kernels build.

* Nothing is compiled or imported at package import: the first call of :func:`available` on a
  CUDA machine builds ``kernels/wkv_cuda.cu`` + ``kernels/wkv_cuda_binding.cpp`` with torch's
  extension loader (ninja + nvcc; cached under ``$TORCH_EXTENSIONS_DIR``, default
  ``~/.cache/torch_extensions``, rebuilt only when a source or header changes) and logs the
  outcome once. A failed build is logged with its reason and the chunked PyTorch path is used.
* ``RWKVTOOLS_CUDA=0`` opts out.
* :func:`wkv4`, :func:`wkv_diag`, :func:`wkv7` have the contracts of ops/naive.py. Inputs are
  float32, float16 or bfloat16 activations (one storage dtype per call; the others are cast to
  it), log-decays and states are float32, all arithmetic is fp32. Outputs: y in the activation
  dtype, states float32.
* Autograd: v7 has a backward kernel (:class:`WKV7Function`); v4 and v5/v6 calls that need
  gradients, head sizes without a compiled kernel, float64 inputs and empty sequences go to
  the chunked PyTorch path (logged once each).

The same operators, built for the CPU from the same per-thread code, are the CPU harness
(ops/cpu_harness.py); the generic wrappers below serve both.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import threading
import time

import torch

log = logging.getLogger("rwkvtools")

KERNEL_FILES = ("wkv_common.h", "wkv4.h", "wkv_diag.h", "wkv7.h", "wkv_launch.h", "wkv_binding.h",
                "wkv_cuda.cu", "wkv_cuda_binding.cpp", "cpu_harness.cpp")
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
V7_CHUNK = 16  # kernels/wkv_common.h V7_CHUNK: steps between the saved v7 states

_lock = threading.Lock()
_lib = None            # _Lib once built
_build_error: str | None = None
_logged: set = set()


def _log_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, msg, *args)


def kernel_dir() -> pathlib.Path:
    """Folder of the kernel sources: ``rwkvtools/kernels/`` after ``pip install`` (package data),
    else ``kernels/`` at the top of the repository (editable installs, a plain checkout).

    The repository's ``kernels/`` has no ``__init__.py`` on purpose: as a regular package it would
    shadow any installed package named ``kernels`` (Hugging Face's, which transformers imports)
    whenever the repository root is on ``sys.path`` (``python -m ...`` run from there)."""
    pkg = pathlib.Path(__file__).resolve().parents[1]          # .../rwkvtools
    for d in (pkg / "kernels", pkg.parent / "kernels"):
        if (d / "wkv_cuda.cu").is_file():
            return d
    raise FileNotFoundError(f"rwkvtools kernel sources not found (neither {pkg / 'kernels'} "
                            f"nor {pkg.parent / 'kernels'})")


class _Lib:
    """A built operator library (torch.ops.<namespace>) and how to call it."""

    def __init__(self, namespace: str, cuda: bool):
        self.namespace = namespace
        self.cuda = cuda
        self.ops = getattr(torch.ops, namespace)
        self.head_sizes = tuple(int(n) for n in self.ops.head_sizes())

    def stream(self, x) -> int:
        return torch.cuda.current_stream(x.device).cuda_stream if self.cuda else 0

    def guard(self, x):
        return torch.cuda.device(x.device) if self.cuda else contextlib.nullcontext()


def build_library(name: str, sources, namespace: str, cuda: bool, verbose: bool = False) -> _Lib:
    """Compile (or reuse the cached build of) kernels/<sources> into a torch operator library."""
    from torch.utils.cpp_extension import load
    kd = kernel_dir()
    load(name=name, sources=[str(kd / s) for s in sources], extra_include_paths=[str(kd)],
         extra_cflags=["-O2"], extra_cuda_cflags=["-O3"] if cuda else None,
         is_python_module=False, verbose=verbose)
    return _Lib(namespace, cuda)


def _load() -> _Lib | None:
    global _lib, _build_error
    if _lib is not None or _build_error is not None:
        return _lib
    with _lock:
        if _lib is None and _build_error is None:
            t0 = time.perf_counter()
            try:
                _lib = build_library("rwkvtools_wkv_cuda", ("wkv_cuda.cu", "wkv_cuda_binding.cpp"),
                                     "rwkvtools_cuda", cuda=True,
                                     verbose=os.environ.get("RWKVTOOLS_CUDA_VERBOSE") == "1")
                log.info("rwkvtools: CUDA WKV kernels ready (%.1f s; head sizes %s)",
                         time.perf_counter() - t0, ", ".join(map(str, _lib.head_sizes)))
            except Exception as e:  # a failed build must not stop eval: log it, use PyTorch
                _build_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
                log.warning("rwkvtools: CUDA WKV kernels unavailable (%s); using the chunked PyTorch path "
                            "(RWKVTOOLS_CUDA_VERBOSE=1 shows the compiler output)", _build_error)
                log.debug("rwkvtools: CUDA WKV build error: %s", e)
    return _lib


def available() -> bool:
    """True when a CUDA device is present, RWKVTOOLS_CUDA is not 0 and the kernels build."""
    if os.environ.get("RWKVTOOLS_CUDA", "1") == "0":
        _log_once("optout", logging.INFO, "rwkvtools: CUDA WKV kernels disabled by RWKVTOOLS_CUDA=0")
        return False
    if not torch.cuda.is_available():
        return False
    return _load() is not None


def build_error() -> str | None:
    """Why the kernels did not build (None if they did or were not tried)."""
    return _build_error


# ------------------------------------------------------------------------- generic wrappers
def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs)


def _act_dtype(x) -> torch.dtype | None:
    return x.dtype if x.dtype in ACT_DTYPES else None


def _vec(x, n: int):
    x = x.float().reshape(-1)
    return (x.expand(n) if x.numel() == 1 else x).contiguous()


def run_wkv4(lib: _Lib, w, u, k, v, state):
    aa, bb, pp = state
    B, T, C = k.shape
    dt = k.dtype  # the storage type of this call (the operator refuses anything but fp32/fp16/bf16)
    with lib.guard(k):
        y, aa, bb, pp = lib.ops.wkv4(_vec(w, C), _vec(u, C), k.contiguous(), v.to(dt).contiguous(),
                                     aa.float().expand(B, C).contiguous(), bb.float().expand(B, C).contiguous(),
                                     pp.float().expand(B, C).contiguous(), lib.stream(k))
    return y, (aa, bb, pp)


def run_wkv_diag(lib: _Lib, r, k, v, g, u, S):
    B, T, H, N = r.shape
    dt = r.dtype
    g = g.float().expand(B, T, H, N) if g.dim() == 4 else g.float().expand(H, N)
    with lib.guard(r):
        y, S = lib.ops.wkv_diag(r.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(), g.contiguous(),
                                u.float().expand(H, N).contiguous(), S.float().expand(B, H, N, N).contiguous(),
                                lib.stream(r))
    return y, S


class WKV7Function(torch.autograd.Function):
    """v7 WKV with the backward kernel. The forward saves sa_t = S_{t-1} a_t (fp32, B*T*C floats)
    and the state before every 16th step (fp32, B*H*ceil(T/16)*N*N floats); the backward
    recomputes the states of each 16-step chunk from its checkpoint."""

    @staticmethod
    def forward(ctx, lib, r, g, k, v, a, b, S):
        B, T, H, N = r.shape
        dt = r.dtype
        xs = [r.contiguous()] + [x.to(dt).contiguous() for x in (k, v, a, b)]
        gc = g.float().expand(B, T, H, N).contiguous()
        with lib.guard(r):
            y, S_out, sa, ck = lib.ops.wkv7_fwd(xs[0], gc, xs[1], xs[2], xs[3], xs[4],
                                                S.float().expand(B, H, N, N).contiguous(), True, lib.stream(r))
        ctx.save_for_backward(xs[0], gc, *xs[1:], sa, ck)
        ctx.lib = lib
        ctx.in_dtypes = (g.dtype, k.dtype, v.dtype, a.dtype, b.dtype, S.dtype)
        ctx.g_shape, ctx.S_shape = g.shape, S.shape
        return y, S_out

    @staticmethod
    def backward(ctx, dy, dS):
        r, g, k, v, a, b, sa, ck = ctx.saved_tensors
        lib = ctx.lib
        B, T, H, N = r.shape
        dy = torch.zeros_like(r) if dy is None else dy.to(r.dtype).contiguous()
        dS = r.new_zeros((B, H, N, N), dtype=torch.float32) if dS is None else dS.float().contiguous()
        with lib.guard(r):
            dr, dg, dk, dv, da, db, dS0 = lib.ops.wkv7_bwd(r, g, k, v, a, b, sa, ck, dy, dS, lib.stream(r))
        tg, tk, tv, ta, tb, tS = ctx.in_dtypes
        dg = dg.to(tg)
        if dg.shape != ctx.g_shape:  # g was broadcast
            dg = dg.sum_to_size(ctx.g_shape)
        dS0 = dS0.to(tS)
        if dS0.shape != ctx.S_shape:
            dS0 = dS0.sum_to_size(ctx.S_shape)
        return None, dr, dg, dk.to(tk), dv.to(tv), da.to(ta), db.to(tb), dS0


def run_wkv7(lib: _Lib, r, g, k, v, a, b, S):
    if _needs_grad(r, g, k, v, a, b, S):
        return WKV7Function.apply(lib, r, g, k, v, a, b, S)
    B, T, H, N = r.shape
    dt = r.dtype
    with lib.guard(r):
        y, S_out, _, _ = lib.ops.wkv7_fwd(r.contiguous(), g.float().expand(B, T, H, N).contiguous(),
                                          k.to(dt).contiguous(), v.to(dt).contiguous(), a.to(dt).contiguous(),
                                          b.to(dt).contiguous(), S.float().expand(B, H, N, N).contiguous(),
                                          False, lib.stream(r))
    return y, S_out


# ------------------------------------------------------------------ public (CUDA) functions
def _fallback(why: str):
    from . import chunked
    _log_once("fallback:" + why, logging.INFO, "rwkvtools: WKV on CUDA uses the chunked PyTorch path for %s", why)
    return chunked


def _usable(x, N: int | None = None, grad: bool = False, what: str = "") -> str | None:
    """None if the kernel can take this call, else the reason to fall back."""
    if not x.is_cuda or not available():
        return "tensors off the GPU or kernels unavailable"
    if _act_dtype(x) is None:
        return f"{x.dtype} inputs"
    if x.shape[1] == 0:
        return "empty sequences"
    if N is not None and N not in _lib.head_sizes:
        return f"head size {N} (kernels: {', '.join(map(str, _lib.head_sizes))})"
    if grad:
        return f"{what} calls that need gradients (only v7 has a backward kernel)"
    return None


def wkv4(w, u, k, v, state):
    """Same contract as ops.naive.wkv4_naive."""
    why = _usable(k, grad=_needs_grad(w, u, k, v, *state), what="v4")
    if why:
        return _fallback(why).wkv4_chunked(w, u, k, v, state)
    return run_wkv4(_lib, w, u, k, v, state)


def wkv_diag(r, k, v, g, u, S):
    """Same contract as ops.naive.wkv_diag_naive."""
    why = _usable(r, r.shape[-1], grad=_needs_grad(r, k, v, g, u, S), what="v5/v6")
    if why:
        return _fallback(why).wkv_diag_chunked(r, k, v, g, u, S)
    return run_wkv_diag(_lib, r, k, v, g, u, S)


def wkv7(r, g, k, v, a, b, S):
    """Same contract as ops.naive.wkv7_naive; differentiable (backward kernel)."""
    why = _usable(r, r.shape[-1])
    if why:
        return _fallback(why).wkv7_chunked(r, g, k, v, a, b, S)
    return run_wkv7(_lib, r, g, k, v, a, b, S)
