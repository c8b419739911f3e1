"""ONNX nodes for quantized linears (model/quantized.py), weights kept packed in the graph.

Both kinds use onnxruntime's weight-only ``com.microsoft.MatMulNBits`` (y = x W^T with W
dequantized block by block inside the kernel, never materialised):

* int4: ``bits=4``, ``block_size`` = the group size; B = the packed weight as stored
  ((N, K/G, G/2) bytes, column 2j in the low nibble), scales (N*K/G), zero points packed two per
  byte (N, ceil(K/G/2)), low nibble first. W = (q - zero) * scale: exactly Int4Linear's formula.
* int8: ``bits=8`` with q + 128 as unsigned bytes and zero point 128, the per-channel scale
  repeated over the row's blocks (rows padded with zero bytes to a whole block).

``accuracy_level`` (MatMulNBits' compute type) is 0 by default: fp32 arithmetic on the
dequantized blocks, equal to the torch model within 1e-4. ``RWKVTOOLS_MATMULNBITS_ACCURACY=4``
at export time selects int8 compute (activations quantized on the fly, as ggml/rwkv.cpp do):
several times faster per token on CPUs with int8 dot products, but the logits then differ from
the torch model by more than the default validation tolerance (pass ``--tol``, e.g. 0.05).

Why not ``DequantizeLinear`` + ``MatMul`` for int8: onnxruntime 1.31's graph optimizer rewrites a
per-axis int8 DequantizeLinear feeding a MatMul into an 8-bit MatMulNBits with wrong results
(max error 0.1 on unit-scale inputs in our check); the direct MatMulNBits node is exact.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..model.quantized import Int4Linear, Int8Linear

MS_DOMAIN = "com.microsoft"
INT8_BLOCK = 128


def accuracy_level() -> int:
    v = os.environ.get("RWKVTOOLS_MATMULNBITS_ACCURACY", "0")
    if v not in ("0", "1", "2", "3", "4"):
        from .onnx import ExportError
        raise ExportError(f"RWKVTOOLS_MATMULNBITS_ACCURACY must be 0..4 (MatMulNBits accuracy_level), got {v!r}")
    return int(v)


def _scales(em, s: torch.Tensor) -> np.ndarray:
    return s.detach().float().cpu().numpy().astype(em.act, copy=False)


def emit_int4(em, mod: Int4Linear, x: str) -> str:
    N, K, G = mod.out_features, mod.in_features, mod.group_size
    ng = K // G
    g = em.g
    g.use_domain(MS_DOMAIN, 1)
    B = mod.weight_int4.detach().cpu().numpy().reshape(N, ng, G // 2)
    z = mod.weight_zero.detach().cpu().numpy().astype(np.uint8)          # integers 0..15
    if ng % 2:
        z = np.concatenate([z, np.zeros((N, 1), np.uint8)], axis=1)
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    b = g.tensor(B, name=f"{mod.prefix}.weight_int4")
    s = g.tensor(_scales(em, mod.weight_scale).reshape(-1), name=f"{mod.prefix}.weight_scale")
    zn = g.tensor(zp, name=f"{mod.prefix}.weight_zero")
    return g.op("MatMulNBits", x, b, s, zn, domain=MS_DOMAIN, K=K, N=N, bits=4, block_size=G,
                accuracy_level=accuracy_level())


def emit_int8(em, mod: Int8Linear, x: str) -> str:
    N, K = mod.out_features, mod.in_features
    bs = INT8_BLOCK if K >= INT8_BLOCK else max(16, 1 << (K - 1).bit_length())
    nb = -(-K // bs)
    g = em.g
    g.use_domain(MS_DOMAIN, 1)
    q = (mod.weight_int8.detach().cpu().numpy().astype(np.int16) + 128).astype(np.uint8)
    if nb * bs != K:
        q = np.concatenate([q, np.full((N, nb * bs - K), 128, np.uint8)], axis=1)
    b = g.tensor(q.reshape(N, nb, bs), name=f"{mod.prefix}.weight_int8")
    s = g.tensor(np.repeat(_scales(em, mod.weight_scale), nb), name=f"{mod.prefix}.weight_scale")
    zn = g.tensor(np.full(N * nb, 128, np.uint8), name=f"{mod.prefix}.weight_zero")
    return g.op("MatMulNBits", x, b, s, zn, domain=MS_DOMAIN, K=K, N=N, bits=8, block_size=bs,
                accuracy_level=accuracy_level())


def register(register_onnx_linear) -> None:
    register_onnx_linear(Int4Linear, emit_int4)
    register_onnx_linear(Int8Linear, emit_int8)
