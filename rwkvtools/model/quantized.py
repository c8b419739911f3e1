"""Quantized linears: the weights stay packed in memory and the forward multiplies with them.

Storage (chosen by the tensor names present under a linear's prefix ``P``, never by flags):

* int8, symmetric per output channel:
  ``P.weight_int8`` int8 (out, in) and ``P.weight_scale`` float32 (out,);
  ``W[o, i] = q[o, i] * scale[o]``.
* int4, asymmetric, group-wise along the input dimension (group size G = in / n_groups):
  ``P.weight_int4`` uint8 (out, in/2), two values per byte (column 2j in the low nibble, column
  2j+1 in the high nibble), ``P.weight_scale`` float16 (out, in/G) and ``P.weight_zero`` float16
  (out, in/G) holding integer zero points 0..15; ``W[o, i] = (q[o, i] - zero[o, g]) * scale[o, g]``
  with ``g = i // G``.

The forward never holds more than one layer's dense weight, and only transiently: int8 with
bf16/fp16 inputs of a few rows (token-by-token generation) uses torch's weight-only int8 CPU
kernel, otherwise it dequantizes the layer for the call; int4 unpacks the layer for the call.
The result equals ``F.linear(x, dequantized weight)`` up to float rounding.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError
from .linear import register_linear

INT8_SUFFIXES = ("weight_int8", "weight_scale")
INT4_SUFFIXES = ("weight_int4", "weight_scale", "weight_zero")

# rows (batch x time) up to which int8 uses torch's weight-only kernel instead of dequantizing
INT8_KERNEL_MAX_ROWS = int(os.environ.get("RWKVTOOLS_INT8_KERNEL_ROWS", "8"))


# ------------------------------------------------------------------------------------ formulas
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) integers 0..15 -> (out, in/2) uint8, column 2j low nibble, 2j+1 high nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even row length, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) uint8 values 0..15."""
    lo = p & 0x0F
    hi = p >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype=torch.float32) -> torch.Tensor:
    out, n_groups = scale.shape
    q = unpack_int4(packed).to(dtype).view(out, n_groups, -1)
    w = (q - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)
    return w.view(out, -1)


def stored_kind(tensors, prefix: str) -> str | None:
    """'int8', 'int4' or None for the linear stored under ``prefix``."""
    if f"{prefix}.weight_int8" in tensors and f"{prefix}.weight_scale" in tensors:
        return "int8"
    if all(f"{prefix}.{s}" in tensors for s in INT4_SUFFIXES):
        return "int4"
    return None


def dequantize_linear(tensors, prefix: str, dtype=torch.float32) -> torch.Tensor:
    """Dense (out, in) weight of a quantized linear stored under ``prefix``."""
    kind = stored_kind(tensors, prefix)
    if kind == "int8":
        return dequantize_int8(tensors[f"{prefix}.weight_int8"], tensors[f"{prefix}.weight_scale"], dtype)
    if kind == "int4":
        return dequantize_int4(tensors[f"{prefix}.weight_int4"], tensors[f"{prefix}.weight_scale"],
                               tensors[f"{prefix}.weight_zero"], dtype)
    raise KeyError(f"'{prefix}' is not a quantized linear")


# ------------------------------------------------------------------------------------- modules
class Int8Linear(nn.Module):
    """y = x W^T with W = q * scale[:, None]; q int8 (out, in), scale float32 (out,)."""

    kind = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32):
        super().__init__()
        self.register_buffer("weight_int8", q.contiguous())
        self.weight_scale = nn.Parameter(scale.to(torch.float32).clone(), requires_grad=False)
        self.compute_dtype = dtype

    @property
    def out_features(self):
        return self.weight_int8.shape[0]

    @property
    def in_features(self):
        return self.weight_int8.shape[1]

    def dense_weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_scale, self.compute_dtype)

    def scale_output_params(self):
        return [self.weight_scale]

    def forward(self, x):
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= INT8_KERNEL_MAX_ROWS and _int8_kernel_ok(x):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1), self.weight_int8,
                                                   self.weight_scale.to(x.dtype))
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, dequantize_int8(self.weight_int8, self.weight_scale, x.dtype))


class Int4Linear(nn.Module):
    """y = x W^T with W = (q - zero) * scale per group of G input columns."""

    kind = "int4"

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32):
        super().__init__()
        out, half = packed.shape
        if scale.shape != zero.shape or scale.shape[0] != out or (2 * half) % scale.shape[1]:
            raise FormatError(f"int4 linear: packed weight {tuple(packed.shape)}, scale {tuple(scale.shape)} and "
                              f"zero {tuple(zero.shape)} do not fit together")
        self.register_buffer("weight_int4", packed.contiguous())
        # as stored: fp16 scales, zero points (integers 0..15) as bytes; widened per call (exact)
        self.weight_scale = nn.Parameter(scale.to(torch.float16).clone(), requires_grad=False)
        self.register_buffer("weight_zero", zero.to(torch.uint8).clone())
        self.compute_dtype = dtype

    @property
    def out_features(self):
        return self.weight_int4.shape[0]

    @property
    def in_features(self):
        return self.weight_int4.shape[1] * 2

    @property
    def group_size(self):
        return self.in_features // self.weight_scale.shape[1]

    def dense_weight(self) -> torch.Tensor:
        return dequantize_int4(self.weight_int4, self.weight_scale, self.weight_zero, self.compute_dtype)

    def scale_output_params(self):
        return [self.weight_scale]

    def forward(self, x):
        w = dequantize_int4(self.weight_int4, self.weight_scale, self.weight_zero, torch.float32)
        return F.linear(x, w.to(x.dtype))


_KERNEL_STATE: dict = {}


def _int8_kernel_ok(x: torch.Tensor) -> bool:
    """torch's weight-only int8 CPU kernel: CPU tensors only; disabled by RWKVTOOLS_INT8_KERNEL=0
    or if a first call fails."""
    # fp32 inputs: the kernel measured ~2x slower than the dense fp32 matmul here (it shines
    # with bf16/fp16 inputs), so fp32 dequantizes the layer instead
    if x.device.type != "cpu" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if os.environ.get("RWKVTOOLS_INT8_KERNEL", "1") == "0":
        return False
    ok = _KERNEL_STATE.get("int8")
    if ok is None:
        try:
            a = torch.ones(1, 32, dtype=torch.bfloat16)
            b = torch.ones(8, 32, dtype=torch.int8)
            r = torch.ops.aten._weight_int8pack_mm(a, b, torch.ones(8, dtype=torch.bfloat16))
            ok = bool(torch.allclose(r.float(), torch.full((1, 8), 32.0)))
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _KERNEL_STATE["int8"] = ok
    return ok


# ------------------------------------------------------------------------------------ builders
def _build_int8(ctx, prefix):
    q = ctx.tensors[f"{prefix}.weight_int8"]
    s = ctx.tensors[f"{prefix}.weight_scale"]
    if q.dtype != torch.int8 or q.dim() != 2 or tuple(s.shape) != (q.shape[0],):
        raise FormatError(f"'{prefix}.weight_int8' must be int8 (out, in) with '{prefix}.weight_scale' (out,); "
                          f"found {q.dtype} {tuple(q.shape)} and {tuple(s.shape)}")
    return Int8Linear(q.to(ctx.device), s.to(ctx.device), ctx.dtype)


def _build_int4(ctx, prefix):
    p = ctx.tensors[f"{prefix}.weight_int4"]
    s = ctx.tensors[f"{prefix}.weight_scale"]
    z = ctx.tensors[f"{prefix}.weight_zero"]
    if p.dtype != torch.uint8 or p.dim() != 2 or s.dim() != 2:
        raise FormatError(f"'{prefix}.weight_int4' must be uint8 (out, in/2) with 2-D scales; found {p.dtype} "
                          f"{tuple(p.shape)} and {tuple(s.shape)}")
    zf = z.float()
    if not bool(((zf >= 0) & (zf <= 15) & (zf == zf.round())).all()):
        raise FormatError(f"'{prefix}.weight_zero' must hold integer zero points 0..15: corrupt or not an rwkvtools "
                          "int4 checkpoint")
    return Int4Linear(p.to(ctx.device), s.to(ctx.device), z.to(ctx.device), ctx.dtype)


register_linear(lambda t, p: stored_kind(t, p) == "int8", _build_int8)
register_linear(lambda t, p: stored_kind(t, p) == "int4", _build_int4)
