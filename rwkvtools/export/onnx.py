"""Export any RWKV checkpoint (v4, v5.0/5.1/5.2, v6, v7; dense, low-rank or other registered
linear kinds) to ONNX, and check the result in onnxruntime against the reference model.

The graph is written node by node with ``onnx.helper`` from the reference model's modules (the
single source of parameters), mirroring ``rwkvtools/model/*`` operation for operation:

* **step** mode: ``tokens`` [batch, 1]; the WKV recurrence is one direct step.
* **sequence** mode: ``tokens`` [batch, seq], seq dynamic; the WKV is the chunked form of
  ``ops/chunked.py`` (matrix products inside chunks of ``chunk_len`` tokens, a ``Scan`` over
  chunks carries the state), with only non-positive exponents materialised (v5/v6: pairwise
  segment sums; v7: factorised around the chunk start, safe by the v7 decay bound; v4: the
  max-shift trick per chunk).

Interface, identical for every version and dtype (docs/ONNX.md): input ``tokens`` int64 and
one ``state_in_<name>.<layer>`` float32 [batch, ...] per state tensor of every layer; outputs
``logits`` float32 [batch, seq, vocab] and the matching ``state_out_<name>.<layer>``. A state of
all zeros is the empty state.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from onnx import helper

from ..errors import FormatError, RwkvToolsError
from ..ops.chunked import DECAY_CAP
from .graph import FLOAT, FLOAT16, INT64, ExternalData, GraphBuilder, value_info

INTERFACE_VERSION = 2                # 2: one state tensor per layer (1: stacked [n_layer, batch, ...])
DEFAULT_OPSET = 17
MIN_OPSET = 17                       # LayerNormalization
EXTERNAL_DATA_THRESHOLD = 2_000_000_000   # bytes of weights; protobuf cannot hold a message over 2 GiB
CHUNK_LENS = (8, 16, 32, 64)
DEFAULT_CHUNK = 16
LN_EPS = 1e-5
GN_EPS = 64e-5
FP32_TOL = 1e-4                      # max |logit difference| against the fp32 torch model
FP16_TOL = 5e-2                      # fp16: max |diff| / max(1, max |logit|) against the fp32 torch model
V6_LOGDECAY_MIN = -60.0              # as model/v6.py
V7_DECAY_SCALE = math.exp(-0.5)      # as model/v7.py


CONV_GEMV_MIN = 256 * 1024    # linear_op 'conv': matrices of at least this many weights (not the LoRAs)
LINEAR_OPS = ("matmul", "conv")
SHIFT_STATES = ("att_x", "ffn_x")     # token-shift states: [batch, C] per layer
INT64_MAX = np.iinfo(np.int64).max

class ExportError(RwkvToolsError):
    """The model cannot be exported as asked (unknown linear kind, bad option)."""


# ------------------------------------------------------------------------------ linear kinds
_ONNX_LINEARS: dict[type, Callable] = {}


def register_onnx_linear(module_class: type, emitter: Callable) -> None:
    """Teach the exporter a linear kind: ``emitter(em, module, x) -> y`` appends the nodes that
    compute ``y = module(x)`` (x: name of a [batch, seq, in] tensor in ``em.act`` dtype; y: the
    [batch, seq, out] result in the same dtype) with ``em.g`` (the GraphBuilder) and adds its
    weights with ``em.weight`` / ``em.g.tensor``. See docs/ONNX.md."""
    _ONNX_LINEARS[module_class] = emitter


def _emit_dense(em: "Emitter", mod, x: str) -> str:
    if em.gemv_as_conv(mod.weight):
        return em.conv_gemv(x, mod.weight, f"{mod.prefix}.weight")
    return em.g.op("MatMul", x, em.weight(mod.weight, f"{mod.prefix}.weight", transpose=True))


def _emit_lowrank(em: "Emitter", mod, x: str) -> str:
    v = em.weight(mod.weight_v, f"{mod.prefix}.weight_v", transpose=True)    # (in, r)
    u = em.weight(mod.weight_u, f"{mod.prefix}.weight_u", transpose=True)    # (r, out)
    return em.g.op("MatMul", em.g.op("MatMul", x, v), u)


def _register_builtin():
    from ..model.linear import DenseLinear, LowRankLinear
    register_onnx_linear(DenseLinear, _emit_dense)
    register_onnx_linear(LowRankLinear, _emit_lowrank)
    from ..model.shared import SharedLoRALinear, emit_onnx  # recursive: shared matrix + per-layer LoRA
    register_onnx_linear(SharedLoRALinear, emit_onnx)
    from .quantized_onnx import register as register_quantized  # int8/int4: MatMulNBits, weights packed
    register_quantized(register_onnx_linear)


_register_builtin()


def _linear_emitter(mod) -> Callable:
    """The registered emitter of the module's class (or a base class); else the module's own
    ``emit_onnx(em, x)`` method; else a clear error naming the known kinds."""
    for cls in type(mod).__mro__:
        if cls in _ONNX_LINEARS:
            return _ONNX_LINEARS[cls]
    if callable(getattr(mod, "emit_onnx", None)):
        return lambda em, m, x: m.emit_onnx(em, x)
    known = ", ".join(sorted(c.__name__ for c in _ONNX_LINEARS))
    raise ExportError(f"linear '{getattr(mod, 'prefix', '?')}' is a {type(mod).__name__}, which the ONNX exporter "
                      f"does not know (known kinds: {known}); a transform adding a linear kind registers its "
                      "emitter with rwkvtools.export.register_onnx_linear (or gives the module an emit_onnx method)")


# ---------------------------------------------------------------------------------- emitter
class Emitter:
    """What the per-version emitters and the linear emitters share: the builder, the activation
    dtype (``act``: np.float32 or np.float16), the mode and the dynamic sizes."""

    def __init__(self, g: GraphBuilder, model, mode: str, chunk: int, linear_op: str = "matmul"):
        self.g = g
        self.linear_op = linear_op
        self.model = model
        self.spec = model.spec
        self.mode = mode
        self.chunk = chunk
        self.act = np.float16 if model.dtype == torch.float16 else np.float32
        self.act_type = FLOAT16 if self.act == np.float16 else FLOAT
        self._cache: dict = {}
        self._keep: list = []
        self._dims: dict = {}
        self.tokens = "tokens"
        self.T = 1 if mode == "step" else 0     # the time axis in reshapes: literal in step graphs

    # ------------------------------------------------------------------------- tensors
    def weight(self, t: torch.Tensor, name: str, transpose: bool = False, dtype=None) -> str:
        """An initializer from a torch tensor (in ``dtype``, default the activation dtype),
        transposed if asked; the same tensor used twice is stored once."""
        dtype = dtype or self.act
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype), transpose, np.dtype(dtype).str)
        if key not in self._cache:
            self._keep.append(t)   # keeps the address of a temporary from being reused by another
            a = t.detach().to(torch.float32 if dtype == np.float32 else torch.float16)
            a = a.t() if transpose else a
            self._cache[key] = self.g.tensor(a.contiguous().cpu().numpy().astype(dtype, copy=False),
                                             name=name + (".T" if transpose else ""))
        return self._cache[key]

    def derived(self, sources, name: str, make, dtype=None) -> str:
        """An initializer computed from the tensors ``sources`` (``make()`` returns it): stored once
        for the same sources, as ``weight`` stores a tensor once (a recursive model's layers that
        share their LoRA matrices share the stacked/concatenated forms too)."""
        key = ("derived", name.rsplit(".", 1)[-1], np.dtype(dtype or self.act).str,
               tuple((s.data_ptr(), tuple(s.shape), tuple(s.stride()), str(s.dtype)) for s in sources))
        if key not in self._cache:
            self._keep.extend(sources)
            self._cache[key] = self.weight(make(), name, dtype=dtype)
        return self._cache[key]

    def p(self, t: torch.Tensor, name: str, shape=None, fp32: bool = False) -> str:
        """A parameter in its own dtype (fp32 when asked, e.g. decays), optionally reshaped."""
        dtype = np.float32 if (fp32 or t.dtype == torch.float32) else np.float16
        if shape is not None:
            t = t.reshape(shape)
        return self.weight(t, name, dtype=dtype)

    def f32(self, x: str) -> str:
        return x if self.act == np.float32 else self.g.cast(x, FLOAT)

    def to_act(self, x: str) -> str:
        return x if self.act == np.float32 else self.g.cast(x, FLOAT16)

    def linear(self, mod, x: str) -> str:
        return _linear_emitter(mod)(self, mod, x)

    def gemv_as_conv(self, w: torch.Tensor) -> bool:
        """linear_op 'conv': the step graph's large fp32 matrix-vector products as 1x1 Conv."""
        return self.linear_op == "conv" and w.numel() >= CONV_GEMV_MIN

    def conv_gemv(self, x: str, w: torch.Tensor, name: str) -> str:
        """y = x W^T for x [batch, 1, in] as a 1x1 Conv over [batch, in, 1, 1]: onnxruntime's x86 CPU
        provider runs it with its NCHWc kernels (weights reordered once at session start), which
        read a large matrix ~10% faster than its MatMul does for one row (bench_onnx.py)."""
        g = self.g
        out, n_in = w.shape
        return g.reshape(self.conv(g.reshape(x, (0, n_in, 1, 1)), w, name), (0, 1, out))

    def conv(self, x4: str, w: torch.Tensor, name: str) -> str:
        """x4 [batch, in, 1, 1] -> [batch, out, 1, 1] by the (out, in) matrix w as a 1x1 Conv."""
        return self.g.op("Conv", x4, self.weight(w.reshape(*w.shape, 1, 1), name + ".conv"))

    # ---------------------------------------------------------------------- small ops
    def mul(self, a, b):
        return self.g.op("Mul", a, b)

    def add(self, a, b):
        return self.g.op("Add", a, b)

    def sub(self, a, b):
        return self.g.op("Sub", a, b)

    def sigmoid(self, x, fp32: bool = False):
        """1 / (1 + exp(-x)) for fp32 tensors: onnxruntime's Sigmoid kernel is an approximation
        (measured: abs error 1.5e-7, relative 3e-4 for |x| < 8, against 9e-8 / 1.3e-7 for this
        form, torch's level). ``fp32``: x is fp32 in an fp16 graph; fp16 tensors use the Sigmoid
        op (its error is far below fp16 resolution)."""
        g = self.g
        if self.act == np.float16 and not fp32:
            return g.op("Sigmoid", x)
        return g.op("Reciprocal", g.op("Add", g.op("Exp", g.op("Neg", x)), g.const(1.0)))

    def silu(self, x):
        """x * sigmoid(x) of an fp32 tensor."""
        return self.mul(x, self.sigmoid(x, fp32=True))

    def normalize(self, x: str, eps: float, w: str | None = None, b: str | None = None, size: int = 0) -> str:
        """LayerNorm over the last axis (affine w, b if given), fp32. The input is centred first:
        onnxruntime's fused LayerNormalization kernel loses precision in fp32 when the mean is
        not small against the spread (one-pass variance); after centring it is exact to fp32
        rounding (measured on a recursive checkpoint against fp64: 1.8e-4 max logit error with
        the plain op, 1.6e-5 centred; torch's fp32 model 3e-5)."""
        g = self.g
        if w is None:   # no affine: unit scale, zero bias of the last axis' ``size``
            w, b = g.const(np.ones(size, np.float32)), g.const(np.zeros(size, np.float32))
        d = g.op("Sub", x, g.reduce("ReduceMean", x, [-1]))
        return g.op("LayerNormalization", d, w, b, axis=-1, epsilon=eps)

    def layer_norm(self, x, ln) -> str:
        """LayerNorm (eps 1e-5), computed in fp32 whatever the activation dtype (no fp16
        overflow in the squares), returned in the activation dtype."""
        w = self.p(ln.weight, self._pname(ln.weight), fp32=True)
        b = self.p(ln.bias, self._pname(ln.bias), fp32=True)
        return self.to_act(self.normalize(self.f32(x), LN_EPS, w, b))

    def _pname(self, t) -> str:
        names = getattr(self, "_param_names", None)
        if names is None:
            names = self._param_names = {p.data_ptr(): n for n, p in self.model.named_parameters()}
        return names.get(t.data_ptr(), "param")

    def group_norm(self, y: str, H: int, N: int, w, b) -> str:
        """Per-head normalisation of y (B, T, H, N) fp32, then the per-channel affine; (B, T, H*N)."""
        g = self.g
        n = g.reshape(self.normalize(y, GN_EPS, size=N), (0, self.T, H * N))
        return self.add(self.mul(n, self.p(w, self._pname(w), fp32=True)), self.p(b, self._pname(b), fp32=True))

    def heads(self, x: str, H: int, N: int) -> str:
        return self.g.reshape(x, (0, self.T, H, N))

    def shift(self, xx: str, prev_state: str) -> tuple[str, str]:
        """Token shift: x~' for every position (the carried state, (B, 1, C), at position 0) and
        the new state (the last position's x~, (B, 1, C))."""
        g = self.g
        if self.mode == "step":
            return prev_state, xx
        rest = g.slice(xx, [0], [-1], [1])
        C = self.spec.n_embd
        prev = g.hint(g.concat([prev_state, rest], 1), ["batch", "seq", C], self.act_type)
        return prev, g.slice(xx, [-1], [INT64_MAX], [1])

    # -------------------------------------------------------------------- dynamic sizes
    def dims(self):
        """(T as a 1-d int64, number of chunks, padding) for the sequence graph, made once."""
        if "T" not in self._dims:
            g = self.g
            L = self.chunk
            shp = g.op("Shape", self.tokens)
            T = g.slice(shp, [1], [2], [0])
            nc = g.op("Div", g.op("Add", T, g.i64(L - 1)), g.i64(L))
            pad = g.op("Sub", g.op("Mul", nc, g.i64(L)), T)
            self._dims.update({"T": T, "nc": nc, "pad": pad})
        return self._dims["T"], self._dims["nc"], self._dims["pad"]

    def pads(self, rank: int) -> str:
        key = f"pads{rank}"
        if key not in self._dims:
            _, _, pad = self.dims()
            g = self.g
            self._dims[key] = g.concat([g.i64(*([0] * (rank + 1))), pad, g.i64(*([0] * (rank - 2)))], 0)
        return self._dims[key]

    # ------------------------------------------------------------------- chunk layout
    def pack(self, xs: list[str], H: int, N: int) -> list[str]:
        """(B, T, H, N) tensors -> (Z, L, N) each, Z = chunks * B * H (chunk-major), zero padded."""
        g, L = self.g, self.chunk
        n = N * len(xs)
        x = g.concat(xs, -1)
        x = g.hint(g.op("Pad", x, self.pads(4)), ["batch", "rwkv_tpad", H, n])
        x = g.hint(g.reshape(x, (0, -1, L, H, n)), ["batch", "rwkv_nc", L, H, n])
        x = g.op("Transpose", x, perm=[1, 0, 3, 2, 4])
        x = g.hint(g.reshape(x, (-1, L, n)), ["rwkv_z", L, n])
        return g.split(x, [N] * len(xs), -1) if len(xs) > 1 else [x]

    def unpack(self, y: str, H: int, N: int) -> str:
        g, L = self.g, self.chunk
        T, nc, _ = self.dims()
        y = g.hint(g.reshape(y, g.concat([nc, g.i64(-1, H, L, N)], 0)), ["rwkv_nc", "batch", H, L, N])
        y = g.op("Transpose", y, perm=[1, 0, 3, 2, 4])
        y = g.hint(g.reshape(y, (0, -1, H, N)), ["batch", "rwkv_tpad", H, N])
        return g.hint(g.slice(y, g.i64(0), T, g.i64(1)), ["batch", "seq", H, N])

    def scan_states(self, M: str, C: str, X0: str, N: int, diag: bool) -> tuple[str, str]:
        """X_{c+1} = M_c X_c + C_c over chunks (diag: M_c is a (BH, N) row scaling); returns the
        state entering every chunk (Z, N, N) and the final state (BH, N, N)."""
        g = self.g
        _, nc, _ = self.dims()
        Mr = g.hint(g.reshape(M, g.concat([nc, g.i64(-1, N)] if diag else [nc, g.i64(-1, N, N)], 0)),
                    ["rwkv_nc", "rwkv_bh", N] if diag else ["rwkv_nc", "rwkv_bh", N, N])
        Cr = g.hint(g.reshape(C, g.concat([nc, g.i64(-1, N, N)], 0)), ["rwkv_nc", "rwkv_bh", N, N])
        X0 = g.hint(X0, ["rwkv_bh", N, N])
        b = g.sub()
        xi, mi, ci = b.fresh("x"), b.fresh("m"), b.fresh("c")
        if diag:
            xn = b.op("Add", b.op("Mul", b.unsqueeze(mi, -1), xi), ci)
        else:
            xn = b.op("Add", b.op("MatMul", mi, xi), ci)
        xo = b.op("Identity", xi)
        body = b.graph(g.fresh("scan_body"),
                       [value_info(xi, FLOAT, [None, N, N]), value_info(mi, FLOAT, [None, N] if diag else [None, N, N]),
                        value_info(ci, FLOAT, [None, N, N])],
                       [value_info(xn, FLOAT, [None, N, N]), value_info(xo, FLOAT, [None, N, N])])
        fin, stacked = g.op("Scan", X0, Mr, Cr, n_out=2, body=body, num_scan_inputs=2)
        g.hint(fin, ["rwkv_bh", N, N])
        g.hint(stacked, ["rwkv_nc", "rwkv_bh", N, N])
        return g.hint(g.reshape(stacked, (-1, N, N)), ["rwkv_z", N, N]), fin

    # --------------------------------------------------------------------------- WKV
    def wkv4(self, w: str, u: str, k: str, v: str, aa: str, bb: str, pp: str):
        return (self._wkv4_step if self.mode == "step" else self._wkv4_seq)(w, u, k, v, aa, bb, pp)

    def _wkv4_step(self, w, u, k, v, aa, bb, pp):
        """ops/naive.py wkv4 for one token; k, v (B, 1, A), state (B, A)."""
        g = self.g
        aa, bb, pp = (g.unsqueeze(s, 1) for s in (aa, bb, pp))
        ninf = g.const(-np.inf)
        p = g.op("Where", g.op("Greater", bb, g.const(0.0)), pp, ninf)
        ww = self.add(u, k)
        q = g.op("Max", p, ww)
        e1 = g.op("Exp", self.sub(p, q))
        e2 = g.op("Exp", self.sub(ww, q))
        y = g.op("Div", self.add(self.mul(e1, aa), self.mul(e2, v)), self.add(self.mul(e1, bb), e2))
        ww = self.sub(p, w)
        q = g.op("Max", ww, k)
        e1 = g.op("Exp", self.sub(ww, q))
        e2 = g.op("Exp", self.sub(k, q))
        aa = self.add(self.mul(e1, aa), self.mul(e2, v))
        bb = self.add(self.mul(e1, bb), e2)
        return y, (g.squeeze(aa, 1), g.squeeze(bb, 1), g.squeeze(q, 1))

    def _wkv4_seq(self, w, u, k, v, aa, bb, pp):
        """ops/chunked.py wkv4_chunked: per chunk sums stabilised by their maximum exponent, a
        Scan over chunks for (aa, bb, pp), outputs from the chunk-start states."""
        g, L = self.g, self.chunk
        A = self.spec.dim_att
        T, nc, _ = self.dims()
        ninf = g.const(-np.inf)
        zero = g.const(0.0)
        kc = g.reshape(g.op("Pad", k, self.pads(3), g.const(-np.inf)), (0, -1, L, A))     # (B,nc,L,A)
        vc = g.reshape(g.op("Pad", v, self.pads(3)), (0, -1, L, A))
        g.hint(kc, ["batch", "rwkv_nc", L, A])
        g.hint(vc, ["batch", "rwkv_nc", L, A])
        tt = np.arange(L, dtype=np.float32)
        # true chunk lengths (the last one may be short)
        starts = g.op("Mul", g.op("Range", g.const(0, np.int64), g.squeeze(nc, 0), g.const(1, np.int64)), g.i64(L))
        lens = g.hint(g.cast(g.op("Min", g.op("Sub", T, starts), g.i64(L)), FLOAT), ["rwkv_nc"])
        lens4 = g.reshape(lens, (1, -1, 1, 1))
        e_end = self.sub(kc, self.mul(self.sub(self.sub(lens4, g.const(1.0)), g.const(tt.reshape(L, 1))), w))
        p_loc = g.reduce("ReduceMax", e_end, [2], keepdims=False)                          # (B,nc,A)
        p_safe = g.op("Where", g.op("IsInf", p_loc), zero, p_loc)
        x = g.op("Exp", self.sub(e_end, g.unsqueeze(p_safe, 2)))
        a_loc = g.reduce("ReduceSum", self.mul(x, vc), [2], keepdims=False)
        b_loc = g.reduce("ReduceSum", x, [2], keepdims=False)
        dec = self.mul(g.unsqueeze(lens, 1), w)                                            # (nc, A)
        # scan over chunks
        b = g.sub()
        s_aa, s_bb, s_pp, i_pl, i_al, i_bl, i_dec = (b.fresh(n) for n in ("aa", "bb", "pp", "pl", "al", "bl", "dec"))
        p0 = b.op("Where", b.op("Greater", s_bb, b.const(0.0)), s_pp, b.const(-np.inf))
        pd = b.op("Sub", p0, i_dec)
        q = b.op("Max", pd, i_pl)
        q = b.op("Where", b.op("IsInf", q), b.const(0.0), q)
        e1 = b.op("Exp", b.op("Sub", pd, q))
        e2 = b.op("Exp", b.op("Sub", i_pl, q))
        n_aa = b.op("Add", b.op("Mul", e1, s_aa), b.op("Mul", e2, i_al))
        n_bb = b.op("Add", b.op("Mul", e1, s_bb), b.op("Mul", e2, i_bl))
        n_pp = b.op("Identity", q)
        o_aa, o_bb, o_p0 = b.op("Identity", s_aa), b.op("Identity", s_bb), b.op("Identity", p0)
        vi = [value_info(n, FLOAT, [None, A]) for n in (s_aa, s_bb, s_pp, i_pl, i_al, i_bl)] + [value_info(i_dec, FLOAT, [A])]
        vo = [value_info(n, FLOAT, [None, A]) for n in (n_aa, n_bb, n_pp, o_aa, o_bb, o_p0)]
        body = b.graph(g.fresh("wkv4_scan"), vi, vo)
        tr = [1, 0, 2]
        f_aa, f_bb, f_pp, a0, b0, p0s = g.op(
            "Scan", aa, bb, pp, g.op("Transpose", p_loc, perm=tr), g.op("Transpose", a_loc, perm=tr),
            g.op("Transpose", b_loc, perm=tr), dec, n_out=6, body=body, num_scan_inputs=4)
        for fin in (f_aa, f_bb, f_pp):
            g.hint(fin, ["batch", A])
        for st in (a0, b0, p0s):
            g.hint(st, ["rwkv_nc", "batch", A])
        a0, b0, p0s = (g.unsqueeze(g.op("Transpose", s, perm=tr), 2) for s in (a0, b0, p0s))   # (B,nc,1,A)
        # outputs: exponents over [state, tokens i < t, token t (bonus)]
        dist = (tt.reshape(L, 1) - 1 - tt.reshape(1, L)).reshape(L, L, 1)
        mask = (tt.reshape(L, 1) > tt.reshape(1, L)).reshape(L, L, 1)
        e_tok = self.sub(g.unsqueeze(kc, 2), self.mul(g.const(dist), w))                  # (B,nc,t,i,A)
        e_tok = g.op("Where", g.const(mask, np.bool_), e_tok, ninf)
        e_bonus = self.add(u, kc)                                                          # (B,nc,L,A)
        e_state = self.sub(p0s, self.mul(g.const(tt.reshape(L, 1)), w))
        m = g.op("Max", g.reduce("ReduceMax", e_tok, [3], keepdims=False), e_bonus, e_state)
        m = g.op("Where", g.op("IsInf", m), zero, m)
        xt = g.op("Exp", self.sub(e_tok, g.unsqueeze(m, 3)))
        xb = g.op("Exp", self.sub(e_bonus, m))
        xs = g.op("Exp", self.sub(e_state, m))
        num = self.add(self.add(g.reduce("ReduceSum", self.mul(xt, g.unsqueeze(vc, 2)), [3], keepdims=False),
                                self.mul(xb, vc)), self.mul(xs, a0))
        den = self.add(self.add(g.reduce("ReduceSum", xt, [3], keepdims=False), xb), self.mul(xs, b0))
        y = g.hint(g.reshape(g.op("Div", num, den), (0, -1, A)), ["batch", "rwkv_tpad", A])
        y = g.hint(g.slice(y, g.i64(0), T, g.i64(1)), ["batch", "seq", A])
        return y, (f_aa, f_bb, f_pp)

    def wkv_diag(self, r, k, v, logw, u, S, H, N, const_decay: bool):
        """v5/v6: r, k, v (B, T, H, N) fp32; logw (H, N) constant (v5) or (B, T, H, N); u (H, N);
        S (B, H, N_k, N_v). Returns y (B, T, H, N), S'."""
        if self.mode == "step":
            return self._wkv_diag_step(r, k, v, logw, u, S, H, N, const_decay)
        return self._wkv_diag_seq(r, k, v, logw, u, S, H, N, const_decay)

    def _wkv_diag_step(self, r, k, v, logw, u, S, H, N, const_decay):
        g = self.g
        rr = g.reshape(r, (0, H, 1, N))
        kr = g.reshape(k, (0, H, 1, N))
        kc = g.reshape(k, (0, H, N, 1))
        vr = g.reshape(v, (0, H, 1, N))
        kv = self.mul(kc, vr)                                                    # (B,H,K,V)
        ruk = g.reduce("ReduceSum", self.mul(self.mul(rr, g.reshape(u, (H, 1, N))), kr), [-1], keepdims=True)
        y = self.add(g.op("MatMul", rr, S), self.mul(ruk, vr))                  # (B,H,1,N)
        w = g.op("Exp", g.reshape(logw, (H, N, 1) if const_decay else (0, H, N, 1)))
        S2 = self.add(self.mul(w, S), kv)
        return g.reshape(y, (0, 1, H, N)), S2

    def _wkv_diag_seq(self, r, k, v, logw, u, S, H, N, const_decay):
        g, L = self.g, self.chunk
        if const_decay:
            logw = g.hint(g.op("Expand", logw, g.op("Shape", r)), ["batch", "seq", H, N])
        rc, kc, vc, gc = self.pack([r, k, v, logw], H, N)                       # (Z, L, N)
        Gex = g.op("CumSum", gc, g.i64(1), exclusive=1)
        Gsuf = g.op("CumSum", gc, g.i64(1), exclusive=1, reverse=1)
        Glast = g.reduce("ReduceSum", gc, [1], keepdims=False)                   # (Z, N)
        Rd = self.mul(rc, g.op("Exp", Gex))
        # pairwise intra-chunk weights: E[t, i] = sum_{i<s<t} g_s, masked to i < t
        tt = np.arange(L)
        maskS = (tt.reshape(L, 1) > tt.reshape(1, L)).astype(np.float32).reshape(L, L, 1)
        gm = self.mul(g.unsqueeze(gc, 1), g.const(maskS))                       # (Z, t, s, N)
        E = g.op("CumSum", gm, g.i64(2), exclusive=1, reverse=1)
        Wt = self.mul(g.op("Exp", E), g.const(maskS))
        A = g.op("MatMul", self.mul(Wt, g.unsqueeze(kc, 1)), g.unsqueeze(rc, -1))   # (Z, t, i, 1)
        A = g.squeeze(A, -1)
        y_loc = g.op("MatMul", A, vc)
        Cst = g.op("MatMul", g.op("Transpose", self.mul(kc, g.op("Exp", Gsuf)), perm=[0, 2, 1]), vc)
        Xs, Xf = self.scan_states(g.op("Exp", Glast), Cst, g.reshape(S, (-1, N, N)), N, diag=True)
        y = self.unpack(self.add(y_loc, g.op("MatMul", Rd, Xs)), H, N)
        bonus = self.mul(g.reduce("ReduceSum", self.mul(self.mul(r, u), k), [-1], keepdims=True), v)
        return self.add(y, bonus), g.hint(g.reshape(Xf, (-1, H, N, N)), ["batch", H, N, N])

    def wkv7(self, r, lw, k, v, a, b, S, H, N):
        """v7: (B, T, H, N) fp32 inputs, S (B, H, N_v, N_k) value-major. Returns y, S'."""
        if self.mode == "step":
            return self._wkv7_step(r, lw, k, v, a, b, S, H, N)
        return self._wkv7_seq(r, lw, k, v, a, b, S, H, N)

    def _wkv7_step(self, r, lw, k, v, a, b, S, H, N):
        g = self.g

        def row(x):
            return g.reshape(x, (0, H, 1, N))

        def col(x):
            return g.reshape(x, (0, H, N, 1))
        sa = g.op("MatMul", S, col(a))                                            # (B,H,N,1)
        # the two rank-1 updates (S a) b^T + v k^T as one (N,2)x(2,N) product per head: a broadcast
        # Mul of a column by a row runs ~3x slower in onnxruntime than this MatMul
        upd = g.op("MatMul", g.concat([sa, col(v)], -1), g.concat([row(b), row(k)], -2))
        S2 = self.add(self.mul(S, g.op("Exp", row(lw))), upd)
        y = g.op("MatMul", S2, col(r))
        return g.reshape(y, (0, 1, H, N)), S2

    def _forward_subst(self, A: str, rhs: str, L: int) -> str:
        """Solve (I - A) X = rhs for strictly lower-triangular A (Z, L, L), row by row (exact
        forward substitution), as one Scan over the rows: X starts at 0 and row j becomes
        rhs_j + A_j X (rows >= j of X are still 0 and A_j is 0 there)."""
        g = self.g
        b = g.sub()
        X, a_j, r_j, e_j = b.fresh("x"), b.fresh("a"), b.fresh("r"), b.fresh("e")
        row = b.op("Add", b.unsqueeze(r_j, 1), b.op("MatMul", b.unsqueeze(a_j, 1), X))     # (Z, 1, W)
        Xn = b.op("Add", X, b.op("Mul", b.unsqueeze(e_j, -1), row))                        # row j set
        body = b.graph(g.fresh("subst_body"),
                       [value_info(X, FLOAT, [None, L, None]), value_info(a_j, FLOAT, [None, L]),
                        value_info(r_j, FLOAT, [None, None]), value_info(e_j, FLOAT, [L])],
                       [value_info(Xn, FLOAT, [None, L, None])])
        X0 = g.op("Mul", rhs, g.const(0.0))
        sol = g.op("Scan", X0, g.op("Transpose", A, perm=[1, 0, 2]), g.op("Transpose", rhs, perm=[1, 0, 2]),
                   g.const(np.eye(L, dtype=np.float32)), body=body, num_scan_inputs=3)
        return g.hint(sol, ["rwkv_z", L, 2 * self.spec.head_size])

    def _wkv7_seq(self, r, lw, k, v, a, b, S, H, N):
        g, L = self.g, self.chunk
        rc, gc, kc, vc, ac, bc = self.pack([r, lw, k, v, a, b], H, N)
        G = g.op("CumSum", gc, g.i64(1))
        Gex = g.op("CumSum", gc, g.i64(1), exclusive=1)
        Gsuf = g.op("CumSum", gc, g.i64(1), exclusive=1, reverse=1)
        Glast = g.reduce("ReduceSum", gc, [1], keepdims=False)
        eGneg = g.op("Exp", g.op("Neg", G))
        Q = self.mul(ac, g.op("Exp", Gex))
        KBt = g.op("Transpose", g.concat([self.mul(kc, eGneg), self.mul(bc, eGneg)], 1), perm=[0, 2, 1])   # (Z,N,2L)
        tt = np.arange(L)
        strict = (tt.reshape(L, 1) > tt.reshape(1, L)).astype(np.float32)
        incl = (tt.reshape(L, 1) >= tt.reshape(1, L)).astype(np.float32)
        QKB = self.mul(g.op("MatMul", Q, KBt), g.const(np.concatenate([strict, strict], 1)))
        A_ak, A_ab = g.split(QKB, [L, L], 2)
        Rd = self.mul(rc, g.op("Exp", G))
        RKB = self.mul(g.op("MatMul", Rd, KBt), g.const(np.concatenate([incl, incl], 1)))
        rhs = g.concat([g.op("MatMul", A_ak, vc), Q], -1)                         # (Z, L, 2N)
        sol = self._forward_subst(A_ab, rhs, L)
        U, W = g.split(sol, [N, N], -1)
        VU = g.concat([vc, U], 1)                                                 # (Z, 2L, N)
        y_loc = g.op("MatMul", RKB, VU)
        _, A_rb = g.split(RKB, [L, L], 2)
        P = self.add(Rd, g.op("MatMul", A_rb, W))
        esuf = g.op("Exp", Gsuf)
        Bl = self.mul(bc, esuf)
        KBl = g.concat([self.mul(kc, esuf), Bl], 1)
        Cst = g.op("MatMul", g.op("Transpose", KBl, perm=[0, 2, 1]), VU)          # (Z, K, V)
        M = self.add(g.op("MatMul", g.op("Transpose", Bl, perm=[0, 2, 1]), W),
                     self.mul(g.unsqueeze(g.op("Exp", Glast), -1), g.const(np.eye(N, dtype=np.float32))))
        X0 = g.reshape(g.op("Transpose", S, perm=[0, 1, 3, 2]), (-1, N, N))
        Xs, Xf = self.scan_states(M, Cst, X0, N, diag=False)
        y = self.unpack(self.add(y_loc, g.op("MatMul", P, Xs)), H, N)
        return y, g.op("Transpose", g.hint(g.reshape(Xf, (-1, H, N, N)), ["batch", H, N, N]), perm=[0, 1, 3, 2])


# ------------------------------------------------------------------------ per-version blocks
def _mix(em: Emitter, xx, prev, mu, name):
    """v4/v5 token shift: xx * mu + prev * (1 - mu)."""
    return em.add(em.mul(xx, em.p(mu, name)), em.mul(prev, em.p(1 - mu, name + ".one_minus")))


def _lerp(em: Emitter, xx, d, m, name):
    """v6/v7 token shift: xx + (prev - xx) * m."""
    return em.add(xx, em.mul(d, em.p(m, name)))


def _tmix_v4(em: Emitter, att, xx, st, v_first, i):
    n = f"blocks.{i}.att."
    prev, new_x = em.shift(xx, st["att_x"])
    r = em.sigmoid(em.linear(att.receptance, _mix(em, xx, prev, att.mix_r, n + "time_mix_r")))
    k = em.f32(em.linear(att.key, _mix(em, xx, prev, att.mix_k, n + "time_mix_k")))
    v = em.f32(em.linear(att.value, _mix(em, xx, prev, att.mix_v, n + "time_mix_v")))
    # capped like ops/chunked.py (DECAY_CAP): an infinite w turned 0 * inf into NaN in the chunk sums
    w = em.p(torch.exp(att.time_decay).clamp(max=DECAY_CAP), n + "exp_time_decay", fp32=True)
    u = em.p(att.time_first, n + "time_first", fp32=True)
    y, (aa, bb, pp) = em.wkv4(w, u, k, v, st["aa"], st["bb"], st["pp"])
    out = em.linear(att.output, em.to_act(em.mul(em.f32(r), y)))
    return out, {"att_x": new_x, "aa": aa, "bb": bb, "pp": pp}, v_first


def _relu2_ffn(em: Emitter, ffn, xk):
    """value(relu(key(xk))^2), the channel-mix core of every version. With linear_op 'conv' and
    both matrices dense and large, the chain stays in Conv layout: one reshape in, one out."""
    from ..model.linear import DenseLinear
    g = em.g
    if all(type(m) is DenseLinear and em.gemv_as_conv(m.weight) for m in (ffn.key, ffn.value)):
        c = ffn.key.weight.shape[1]
        k = g.op("Relu", em.conv(g.reshape(xk, (0, c, 1, 1)), ffn.key.weight, f"{ffn.key.prefix}.weight"))
        y = em.conv(em.mul(k, k), ffn.value.weight, f"{ffn.value.prefix}.weight")
        return g.reshape(y, (0, 1, c))
    k = g.op("Relu", em.linear(ffn.key, xk))
    return em.linear(ffn.value, em.mul(k, k))


def _cmix_v4(em: Emitter, ffn, xx, prev_state, i):
    n = f"blocks.{i}.ffn."
    prev, new_x = em.shift(xx, prev_state)
    kv = _relu2_ffn(em, ffn, _mix(em, xx, prev, ffn.mix_k, n + "time_mix_k"))
    r = em.sigmoid(em.linear(ffn.receptance, _mix(em, xx, prev, ffn.mix_r, n + "time_mix_r")))
    return em.mul(r, kv), new_x


def _tmix_v5(em: Emitter, att, xx, st, v_first, i):
    n = f"blocks.{i}.att."
    H, N = att.H, att.N
    prev, new_x = em.shift(xx, st["att_x"])
    r = em.heads(em.f32(em.linear(att.receptance, _mix(em, xx, prev, att.mix_r, n + "time_mix_r"))), H, N)
    k = em.heads(em.f32(em.linear(att.key, _mix(em, xx, prev, att.mix_k, n + "time_mix_k"))), H, N)
    v = em.heads(em.f32(em.linear(att.value, _mix(em, xx, prev, att.mix_v, n + "time_mix_v"))), H, N)
    logw = em.p((-torch.exp(att.time_decay)).clamp(min=-DECAY_CAP).expand(H, N).contiguous(), n + "log_decay",
                fp32=True)   # capped like ops/chunked.py: a log-decay of -inf gave NaN in the chunk sums
    u = em.p((torch.exp(att.bonus) if att.bonus_log else att.bonus).expand(H, N).contiguous(), n + "bonus", fp32=True)
    y, S = em.wkv_diag(r, k, v, logw, u, st["wkv"], H, N, const_decay=True)
    y = em.group_norm(y, H, N, att.ln_x_w, att.ln_x_b)
    if att.has_gate:
        y = em.mul(y, em.silu(em.f32(em.linear(att.gate, _mix(em, xx, prev, att.mix_g, n + "time_mix_g")))))
    return em.linear(att.output, em.to_act(y)), {"att_x": new_x, "wkv": S}, v_first


def _tmix_v6(em: Emitter, att, xx, st, v_first, i):
    g = em.g
    n = f"blocks.{i}.att."
    H, N = att.H, att.N
    C = em.spec.n_embd
    prev, new_x = em.shift(xx, st["att_x"])
    d = em.sub(prev, xx)
    z = g.op("Tanh", g.op("MatMul", _lerp(em, xx, d, att.maa_x, n + "time_maa_x"), em.p(att.maa_w1, n + "time_maa_w1")))
    z = g.unsqueeze(g.reshape(z, (0, 0, 5, -1)), 3)                                  # (B,T,5,1,D)
    m = g.op("MatMul", z, em.p(att.maa_w2, n + "time_maa_w2"))                        # (B,T,5,1,C)
    ms = [g.reshape(x, (0, 0, C)) for x in g.split(m, [1] * 5, 2)]                   # w, k, v, r, g

    def lerp(base, mm, c):
        return em.add(xx, em.mul(d, em.add(em.p(base, n + f"time_maa_{c}"), mm)))
    xw, xk, xv, xr, xg = (lerp(getattr(att, f"maa_{c}"), mm, c) for c, mm in zip("wkvrg", ms))
    r = em.heads(em.f32(em.linear(att.receptance, xr)), H, N)
    k = em.heads(em.f32(em.linear(att.key, xk)), H, N)
    v = em.heads(em.f32(em.linear(att.value, xv)), H, N)
    gate = em.silu(em.f32(em.linear(att.gate, xg)))
    lora = g.op("MatMul", g.op("Tanh", g.op("MatMul", xw, em.p(att.decay_w1, n + "time_decay_w1"))),
                em.p(att.decay_w2, n + "time_decay_w2"))
    ww = em.add(em.p(att.time_decay, n + "time_decay", fp32=True), em.f32(lora))
    logw = g.op("Max", g.op("Neg", g.op("Exp", ww)), g.const(V6_LOGDECAY_MIN))
    y, S = em.wkv_diag(r, k, v, em.heads(logw, H, N), em.p(att.bonus, n + "time_faaaa", fp32=True),
                       st["wkv"], H, N, const_decay=False)
    y = em.mul(em.group_norm(y, H, N, att.ln_x_w, att.ln_x_b), gate)
    return em.linear(att.output, em.to_act(y)), {"att_x": new_x, "wkv": S}, v_first


def _cmix_v6(em: Emitter, ffn, xx, prev_state, i):
    n = f"blocks.{i}.ffn."
    prev, new_x = em.shift(xx, prev_state)
    d = em.sub(prev, xx)
    kv = _relu2_ffn(em, ffn, _lerp(em, xx, d, ffn.maa_k, n + "time_maa_k"))
    r = em.sigmoid(em.linear(ffn.receptance, _lerp(em, xx, d, ffn.maa_r, n + "time_maa_r")))
    return em.mul(r, kv), new_x


def _v7_branches_step(em: Emitter, att, xx, d, n: str, i: int):
    """fp32 step graphs: the six v7 token-shift mixes as one [batch, 6, C] lerp, and the LoRA
    branches (value mix v on layers > 0, decay w, in-context rate a, gate g) as two products
    over the stacked mixes instead of eight, with one sigmoid for v, w and a.

    Row j of the stack multiplies every branch's first matrix (the columns of the others are
    masked off after the activation), so the second product reads [v2; w2; a2; g2] once. tanh
    (w) and the gate's sigmoid share one Tanh: sigmoid(h) = (1 + tanh(h / 2)) / 2, the halves
    folded into g1, g2 and a constant bias; v2, w2, a2 and their biases are negated so that
    1 / (1 + exp(z)) is their sigmoid. Returns r/k/v inputs, log decay, a, gate, v mix (or None)."""
    g = em.g
    C = em.spec.n_embd
    mix = [getattr(att, f"x_{c}") for c in "rkvwag"]
    mu = em.derived(mix, n + "x_rkvwag", lambda: torch.stack([m.reshape(C) for m in mix]).float())
    X = em.add(xx, em.mul(d, mu))                                             # (B, 6, C)
    xr, xk, xv, *_ = g.split(X, [1] * 6, 1)
    names = (["v"] if i > 0 else []) + ["w", "a", "g"]
    first = {c: getattr(att, f"{c}1").float() for c in names}
    second = {c: getattr(att, f"{c}2").float() for c in names}
    bias = {c: getattr(att, f"{c}0") for c in names if c != "g"}
    dims = [first[c].shape[1] for c in names]
    R, D = len(names), sum(dims)
    tanh_mask, lin_mask = np.zeros((R, D), np.float32), np.zeros((R, D), np.float32)
    w1, w2, b2, o = [], [], [], 0
    for j, c in enumerate(names):
        (tanh_mask if c in "wg" else lin_mask)[j, o:o + dims[j]] = 1.0
        o += dims[j]
        if c == "g":
            w1.append(first[c] * 0.5)
            w2.append(second[c] * 0.5)
            b2.append(second[c].double().sum(0).mul(0.5).float())
        else:
            w1.append(first[c])
            w2.append(-second[c])
            b2.append(-bias[c].float().reshape(C))
    Xl = g.slice(X, [6 - R], [6], [1])                                        # (B, R, C): rows v?, w, a, g
    src1 = [getattr(att, f"{c}1") for c in names]  # the stored tensors these are made of: shared ones
    src2 = [getattr(att, f"{c}2") for c in names]   # give one initializer
    src_b = [second["g"]] + [bias[c] for c in names if c != "g"]
    h = g.op("MatMul", Xl, em.derived(src1, n + "lora1", lambda: torch.cat(w1, 1)))  # (B, R, D)
    h = em.add(em.mul(g.op("Tanh", h), g.const(tanh_mask)), em.mul(h, g.const(lin_mask)))
    z = em.add(g.op("MatMul", h, em.derived(src2, n + "lora2", lambda: torch.cat(w2, 0))),
               em.derived(src_b, n + "lora_bias", lambda: torch.stack(b2)))
    sig = g.split(g.op("Reciprocal", em.add(g.op("Exp", z), g.const(1.0))), [1] * R, 1)
    gate = g.slice(z, [R - 1], [R], [1])
    mixv = sig[0] if i > 0 else None
    logw = em.mul(sig[-3], g.const(-V7_DECAY_SCALE))
    return xr, xk, xv, logw, sig[-2], gate, mixv


def _tmix_v7(em: Emitter, att, xx, st, v_first, i):
    g = em.g
    n = f"blocks.{i}.att."
    H, N = att.H, att.N
    prev, new_x = em.shift(xx, st["att_x"])
    d = em.sub(prev, xx)
    fast = em.mode == "step" and em.act == np.float32
    if fast:
        xr, xk, xv, logw, a, gate, mixv = _v7_branches_step(em, att, xx, d, n, i)
    else:
        xr, xw, xk, xv, xa, xg = (_lerp(em, xx, d, getattr(att, f"x_{c}"), n + f"x_{c}") for c in "rwkvag")
    r = em.f32(em.linear(att.receptance, xr))
    k = em.f32(em.linear(att.key, xk))
    v = em.f32(em.linear(att.value, xv))

    def lora(x, a1, a2, name, act=None):
        h = g.op("MatMul", x, em.p(a1, n + name + "1"))
        if act == "Sigmoid":
            h = em.sigmoid(h)
        elif act:
            h = g.op(act, h)
        return g.op("MatMul", h, em.p(a2, n + name + "2"))
    if not fast:
        z = em.add(em.p(att.w0, n + "w0", fp32=True), em.f32(lora(xw, att.w1, att.w2, "w", "Tanh")))
        logw = em.mul(em.sigmoid(z, fp32=True), g.const(-V7_DECAY_SCALE))
        a = em.sigmoid(em.f32(em.add(em.p(att.a0, n + "a0"), lora(xa, att.a1, att.a2, "a"))), fp32=True)
        gate = em.f32(lora(xg, att.g1, att.g2, "g", "Sigmoid"))
    kk = em.heads(em.mul(k, em.p(att.k_k, n + "k_k", fp32=True)), H, N)
    norm = g.op("Max", g.reduce("ReduceL2", kk, [-1], keepdims=True), g.const(1e-12))
    kk = g.op("Div", kk, norm)
    k = em.mul(k, em.add(g.const(1.0), em.mul(em.sub(a, g.const(1.0)), em.p(att.k_a, n + "k_a", fp32=True))))
    if i == 0:
        v_first = v
    else:
        if not fast:
            mixv = em.sigmoid(em.f32(em.add(em.p(att.v0, n + "v0"), lora(xv, att.v1, att.v2, "v"))), fp32=True)
        v = em.add(v, em.mul(em.sub(v_first, v), mixv))
    kh, vh, rh = em.heads(k, H, N), em.heads(v, H, N), em.heads(r, H, N)
    y, S = em.wkv7(rh, em.heads(logw, H, N), kh, vh, g.op("Neg", kk), em.mul(kk, em.heads(a, H, N)), st["wkv"], H, N)
    y = em.group_norm(y, H, N, att.ln_x_w, att.ln_x_b)
    rk = g.reduce("ReduceSum", em.mul(em.mul(rh, kh), em.p(att.r_k, n + "r_k", fp32=True)), [-1], keepdims=True)
    y = em.add(y, g.reshape(em.mul(rk, vh), (0, em.T, H * N)))
    return em.linear(att.output, em.to_act(em.mul(y, gate))), {"att_x": new_x, "wkv": S}, v_first


def _cmix_v7(em: Emitter, ffn, xx, prev_state, i):
    prev, new_x = em.shift(xx, prev_state)
    d = em.sub(prev, xx)
    return _relu2_ffn(em, ffn, _lerp(em, xx, d, ffn.x_k, f"blocks.{i}.ffn.x_k")), new_x


_BLOCKS = {4: (_tmix_v4, _cmix_v4), 5: (_tmix_v5, _cmix_v4), 6: (_tmix_v6, _cmix_v6), 7: (_tmix_v7, _cmix_v7)}


# ------------------------------------------------------------------------------ interface
def state_specs(spec) -> list[tuple[str, list]]:
    """(name, shape) of every state tensor; 'batch' is the dynamic batch dimension."""
    L, C = spec.n_layer, spec.n_embd
    if spec.major == 4:
        A = spec.dim_att
        return [("att_x", [L, "batch", C]), ("ffn_x", [L, "batch", C]), ("aa", [L, "batch", A]),
                ("bb", [L, "batch", A]), ("pp", [L, "batch", A])]
    H, N = spec.n_head, spec.head_size
    return [("att_x", [L, "batch", C]), ("ffn_x", [L, "batch", C]), ("wkv", [L, "batch", H, N, N])]


def onnx_state_specs(spec) -> list[tuple[str, str, int, list]]:
    """The file's state tensors: (name, group, layer, shape) with name '<group>.<layer>' and the
    group's shape less its layer axis, e.g. ('wkv.3', 'wkv', 3, ['batch', H, N, N]). One tensor
    per layer, so that a step never copies the state in or out (a stacked [L, batch, ...] input
    costs one Split and one Concat of the whole state per call)."""
    return [(f"{name}.{i}", name, i, shape[1:]) for name, shape in state_specs(spec) for i in range(spec.n_layer)]


def build_onnx_model(model, mode: str = "step", opset: int = DEFAULT_OPSET, chunk_len: int = DEFAULT_CHUNK,
                     logits: str = "all", external: ExternalData | None = None, progress: bool = False,
                     metadata: dict | None = None, linear_op: str = "matmul"):
    """The ModelProto for a reference model (built in fp32 or fp16 by model.build_model).
    ``linear_op`` 'conv' (fp32 step graphs): large dense products as 1x1 Conv (see Emitter.conv_gemv)."""
    from tqdm import tqdm
    from onnx import ModelProto
    spec = model.spec
    mp = ModelProto()
    g = GraphBuilder(opset, external=external, proto=mp.graph)
    _check_linear_op(linear_op, mode, model.dtype)
    em = Emitter(g, model, mode, chunk_len, linear_op)
    seq = "1" if mode == "step" else "seq"
    L = spec.n_layer
    inputs = [value_info("tokens", INT64, ["batch", 1 if mode == "step" else "seq"])]
    outputs = [value_info("logits", FLOAT, ["batch", 1 if (mode == "step" or logits == "last") else "seq", spec.vocab])]
    states = onnx_state_specs(spec)
    per_layer: list[dict] = [dict() for _ in range(L)]
    for name, group, i, shape in states:
        inputs.append(value_info(f"state_in_{name}", FLOAT, shape))
        outputs.append(value_info(f"state_out_{name}", FLOAT, shape))
        # token-shift states enter as (batch, 1, C) in the activation dtype
        per_layer[i][group] = em.to_act(g.unsqueeze(f"state_in_{name}", 1)) if group in SHIFT_STATES \
            else f"state_in_{name}"
    # embedding with LN0 folded in (the same per-row LayerNorm, done once at export)
    with torch.no_grad():
        emb = torch.nn.functional.layer_norm(model.emb.float(), (spec.n_embd,), model.ln0.weight.float(),
                                             model.ln0.bias.float(), LN_EPS)
    x = g.op("Gather", em.weight(emb, "emb.weight.ln0"), "tokens", axis=0)
    tmix, cmix = _BLOCKS[spec.major]
    new_states: list[dict] = []
    v_first = None
    bar = tqdm(total=L, desc="building graph", unit="layer", file=sys.stderr, disable=not progress, leave=False)
    for i, blk in enumerate(model.blocks):
        st = per_layer[i]
        dx, st_att, v_first = tmix(em, blk.att, em.layer_norm(x, blk.ln1), st, v_first, i)
        x = em.add(x, dx)
        dx, ffn_x = cmix(em, blk.ffn, em.layer_norm(x, blk.ln2), st["ffn_x"], i)
        x = em.add(x, dx)
        st_att["ffn_x"] = ffn_x
        new_states.append(st_att)
        if model.rescale_every and (i + 1) % model.rescale_every == 0:
            x = em.mul(x, g.const(0.5, em.act))
        bar.update(1)
    bar.close()
    x = em.layer_norm(x, model.ln_out)
    if mode == "sequence" and logits == "last":
        x = g.unsqueeze(g.op("Gather", x, g.const(-1, np.int64), axis=1), 1)
    head = em.linear(model.head, x)
    if em.act == np.float32:
        g.name_output(head, "logits")
    else:
        g.op("Cast", head, to=FLOAT, out="logits")
    for name, group, i, _ in states:
        new = new_states[i][group]
        g.name_output(g.squeeze(em.f32(new), 1) if group in SHIFT_STATES else new, f"state_out_{name}")
    meta = interface_metadata(spec, mode, "fp16" if em.act == np.float16 else "fp32", opset, chunk_len, logits)
    meta["linear_op"] = linear_op
    meta.update(metadata or {})
    doc = (f"RWKV v{spec.version} exported by rwkvtools ({mode} mode). Inputs: tokens int64 [batch, {seq}], "
           + ", ".join(f"state_in_{n}.<layer> float32 {s[1:]}" for n, s in state_specs(spec))
           + f" (layer 0..{L - 1}). Outputs: logits float32 [batch, seq, vocab] and the matching state_out_*. "
           "A state of all zeros "
           "is the empty state. See docs/ONNX.md.")
    g.graph(f"rwkv{spec.version.replace('.', '_')}_{mode}", inputs, outputs, doc)   # fills mp.graph
    mp.ir_version = _ir_version(opset)
    mp.opset_import.extend([helper.make_opsetid(d, v) for d, v in g.domains.items()])
    mp.producer_name = "rwkvtools"
    mp.producer_version = meta["rwkvtools"]
    mp.doc_string = doc
    helper.set_model_props(mp, {"rwkvtools": json.dumps(meta)})
    return mp


def _check_linear_op(linear_op: str, mode: str, dtype) -> None:
    if linear_op not in LINEAR_OPS:
        raise ExportError(f"linear_op must be one of {', '.join(LINEAR_OPS)}, not '{linear_op}'")
    if linear_op == "conv" and (mode != "step" or dtype != torch.float32):
        raise ExportError("linear op 'conv' is for fp32 step graphs (one token's matrix-vector products); "
                          "sequence and fp16 graphs use MatMul")


def interface_metadata(spec, mode, dtype, opset, chunk_len, logits) -> dict:
    from .. import __version__
    return {"format": "rwkvtools-onnx", "interface_version": INTERFACE_VERSION, "rwkvtools": __version__,
            "rwkv_version": spec.version, "mode": mode, "dtype": dtype, "opset": opset,
            "chunk_len": chunk_len if mode == "sequence" else None, "logits": "all" if mode == "step" else logits,
            "n_layer": spec.n_layer, "n_embd": spec.n_embd, "n_head": spec.n_head, "head_size": spec.head_size,
            "vocab": spec.vocab, "inputs": ["tokens"] + [f"state_in_{n}" for n, *_ in onnx_state_specs(spec)],
            "outputs": ["logits"] + [f"state_out_{n}" for n, *_ in onnx_state_specs(spec)],
            "states": [{"name": n, "group": grp, "layer": i, "shape": s, "dtype": "float32"}
                       for n, grp, i, s in onnx_state_specs(spec)],
            "empty_state": "zeros"}


# ---------------------------------------------------------------------------- validation
def _state_view(major: int, st: dict) -> dict:
    """v4's (aa, bb, pp) is defined up to a common scale: compare a/b and log b instead."""
    if major == 4:
        return {"att_x": st["att_x"], "ffn_x": st["ffn_x"], "aa/bb": st["aa"] / st["bb"],
                "log_b": torch.log(st["bb"]) + st["pp"]}
    return st


class _few_threads:
    """Small models run faster in one torch thread (and do not stall on a busy machine)."""

    def __init__(self, model, max_params: int = 20_000_000):
        self.small = sum(p.numel() for p in model.parameters()) <= max_params

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.small:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def compare_with_reference(onnx_model, ref_model, batch: int = 2, prompt: int = 40, steps: int = 6,
                           seed: int = 0, progress: bool = False) -> dict:
    """Random prompts through both models: the prompt in two calls (sequence mode; step mode
    steps through it), then ``steps`` single tokens through the state. The reference is the torch
    model's plain recurrence, one token per call (a step graph's own computation, and the truth a
    sequence graph's chunked form stands for); the torch model's chunked calls are run too, to
    report how far its own two fp32 forms are apart. Returns max |logit difference|, the largest
    logit, and the relative state difference."""
    from tqdm import tqdm
    V = ref_model.spec.vocab
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, V, (batch, prompt + steps), generator=gen)
    cut = max(1, (prompt * 4) // 7)
    bounds = [(0, cut), (cut, prompt)] + [(prompt + j, prompt + j + 1) for j in range(steps)]
    bounds = [(a, b) for a, b in bounds if b > a]
    s_calls = s_onnx = s_ref = None
    call_out, onnx_out, picked = [], [], []
    bar = tqdm(total=len(bounds) + toks.shape[1], desc="validating", unit="call", file=sys.stderr,
               disable=not progress, leave=False)
    with torch.inference_mode(), _few_threads(ref_model):
        for a, b in bounds:
            lc, s_calls = ref_model(toks[:, a:b], s_calls)
            lo, s_onnx = onnx_model(toks[:, a:b], s_onnx)
            last = lo.shape[1] != b - a                # exported with logits='last'
            picked.extend([b - 1] if last else range(a, b))
            call_out.append(lc[:, -1:].float() if last else lc.float())
            onnx_out.append(lo.float())
            bar.update(1)
        step_out = []
        for t in range(toks.shape[1]):
            o, s_ref = ref_model(toks[:, t:t + 1], s_ref)
            step_out.append(o.float())
            bar.update(1)
    bar.close()
    ref = torch.cat(step_out, 1)[:, picked]
    self_diff = float((torch.cat(call_out, 1) - ref).abs().max())
    got = torch.cat(onnx_out, 1)
    diff = (got - ref).abs()
    a, b = _state_view(ref_model.spec.major, s_onnx), _state_view(ref_model.spec.major, {k: v.float() for k, v in s_ref.items()})
    state_rel = {k: float((a[k] - b[k]).abs().max() / max(1.0, float(b[k].abs().max()))) for k in b}
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit": float(ref.abs().max()), "state_max_rel_diff": state_rel,
            "finite": bool(torch.isfinite(got).all()), "tokens": int(toks.numel()), "batch": batch,
            "prompt": prompt, "steps": steps, "reference": "torch, one token per call",
            "reference_parallel_vs_step": self_diff}


def validate_onnx(path: str, ref_model, dtype: str = "fp32", tol: float | None = None, providers=None,
                  prompt: int = 40, steps: int = 6, batch: int = 2, progress: bool = False) -> dict:
    """Run the exported file in onnxruntime (CPU; CUDA too when a GPU is usable) against the
    fp32 reference model. fp32: max |logit diff| <= tol (default 1e-4); fp16: max |logit diff|
    <= tol * max(1, max |logit|) (default tol 5e-2)."""
    from .onnx_eval import OnnxModel, cuda_usable
    if providers is None:
        providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if cuda_usable() else [])
    tol = tol if tol is not None else (FP32_TOL if dtype == "fp32" else FP16_TOL)
    runs = {}
    for prov in providers:
        om = OnnxModel(path, providers=[prov])
        r = compare_with_reference(om, ref_model, batch=batch, prompt=prompt, steps=steps, progress=progress)
        limit = tol if dtype == "fp32" else tol * max(1.0, r["max_abs_logit"])
        r["limit"] = limit
        r["passed"] = bool(r["finite"] and r["max_abs_logit_diff"] <= limit)
        runs[prov] = r
    return {"dtype": dtype, "tolerance": tol,
            "rule": "max |logit diff| <= tol" if dtype == "fp32" else "max |logit diff| <= tol * max(1, max |logit|)",
            "providers": runs, "passed": all(r["passed"] for r in runs.values())}


# --------------------------------------------------------------------------------- export
def _estimate_bytes(model) -> int:
    """The weights' bytes: parameters, and buffers (a quantized model's packed int8/int4 weights
    and scales are buffers; the per-module buffers are distinct tensors, shared ones counted once)."""
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """The newest opset the installed onnx package writes and the installed onnxruntime loads (a
    one-node probe model per opset, newest first, with the IR version the graph builder sets: onnx
    can know opsets that its onnxruntime does not run yet, e.g. onnx 1.23's 27 and 28 in
    onnxruntime 1.31)."""
    import onnx
    from onnx import TensorProto, helper
    newest = onnx.defs.onnx_opset_version()
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - a dependency; without it nothing is validated anyway
        return newest
    so = ort.SessionOptions()
    so.log_severity_level = 4
    for opset in range(newest, MIN_OPSET - 1, -1):
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        mp.ir_version = _ir_version(opset)
        try:
            ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return MIN_OPSET


def _ir_version(opset: int) -> int:
    from onnx import helper
    return max(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]), 8)


def check_opset(opset: int) -> None:
    """The opsets the graph builder writes, the installed onnx package knows and the installed
    onnxruntime runs (the export is validated in it, and `eval` runs it there)."""
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset} is not supported: use {MIN_OPSET}..{top} (default {DEFAULT_OPSET}; "
                          "the newest the installed onnx and onnxruntime both support)")


def export_onnx(src, out: str, mode: str = "step", dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                validate: bool = True, chunk_len: int | None = None, logits: str = "all",
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, tol: float | None = None,
                validate_prompt: int = 40, validate_steps: int = 6, progress: bool | None = None,
                raise_on_fail: bool = True, linear_op: str = "matmul") -> dict:
    """Export ``src`` (a path or a Checkpoint) to ``out`` (.onnx); weights go to ``out + '.data'``
    when they exceed ``external_data_threshold`` bytes. With ``validate`` the file is checked
    in onnxruntime first and only published when it passes (GateError otherwise, or a report
    with passed=False when raise_on_fail is False)."""
    import onnx

    from ..checkpoint import Checkpoint
    from ..errors import GateError
    from ..model import build_model
    t0 = time.perf_counter()
    if mode not in ("step", "sequence"):
        raise ExportError(f"mode must be 'step' or 'sequence', not '{mode}'")
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype must be fp32 or fp16, not '{dtype}'")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0
                            or tol == float("inf")):
        raise ExportError(f"tol must be a positive finite number (the largest logit difference accepted), got {tol!r}")
    check_opset(opset)
    chunk_len = chunk_len or DEFAULT_CHUNK
    if chunk_len not in CHUNK_LENS:
        raise ExportError(f"chunk length {chunk_len} is not supported; choose one of {', '.join(map(str, CHUNK_LENS))}")
    if logits not in ("all", "last"):
        raise ExportError("logits must be 'all' or 'last'")
    _check_linear_op(linear_op, mode, torch.float16 if dtype == "fp16" else torch.float32)
    if not str(out).endswith(".onnx"):
        raise ExportError(f"{out}: the output file name must end in .onnx")
    if progress is None:
        progress = sys.stderr.isatty()
    if isinstance(src, Checkpoint):
        ckpt, src_name = src, src.source or "<checkpoint>"
    else:
        from ..io import read_checkpoint
        ckpt, src_name = read_checkpoint(str(src)), str(src)
    tdt = torch.float16 if dtype == "fp16" else torch.float32
    model = build_model(ckpt, dtype=tdt)
    spec = model.spec
    est = _estimate_bytes(model)
    external = est > external_data_threshold
    out = os.path.abspath(out)
    base = os.path.basename(out)
    data_name = base + ".data"
    outdir = os.path.dirname(out)
    os.makedirs(outdir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".rwkvtools-onnx-", dir=outdir)
    report = {"source": src_name, "output": out, "rwkv_version": spec.version, "mode": mode, "dtype": dtype,
              "opset": opset, "chunk_len": chunk_len if mode == "sequence" else None, "logits": logits,
              "linear_op": linear_op,
              "n_layer": spec.n_layer, "n_embd": spec.n_embd, "vocab": spec.vocab,
              "linear_kinds": sorted({type(m).__name__ for m in model.modules() if hasattr(m, "prefix")}),
              "external_data": external}
    try:
        tmp_model = os.path.join(tmp, base)
        ext = ExternalData(os.path.join(tmp, data_name), data_name) if external else None
        try:
            mp = build_onnx_model(model, mode, opset, chunk_len, logits, ext, progress,
                                  metadata={"source": os.path.basename(src_name),
                                            "history": [{"transform": h.get("transform"), "options": h.get("options") or {}}
                                                        for h in ckpt.history]},
                                  linear_op=linear_op)
        finally:
            if ext is not None:
                ext.close()
        with open(tmp_model, "wb") as f:     # initializers are inline or already in the data file
            f.write(mp.SerializeToString())
        onnx.checker.check_model(tmp_model)
        report["nodes"] = len(mp.graph.node)
        report["bytes"] = os.path.getsize(tmp_model) + (os.path.getsize(ext.path) if ext else 0)
        report["data_file"] = data_name if external else None
        del mp
        if validate:
            if dtype == "fp32":
                ref = model
            else:
                del model
                ref = build_model(ckpt, dtype=torch.float32)
            try:
                report["validation"] = validate_onnx(tmp_model, ref, dtype, tol, prompt=validate_prompt,
                                                     steps=validate_steps, progress=progress)
            except FormatError as e:   # the graph does not load (e.g. an opset newer than onnxruntime's)
                raise ExportError(str(e).replace(tmp_model, out) + (
                    f"; opset {opset} may be newer than this onnxruntime runs: try a lower --opset "
                    f"(default {DEFAULT_OPSET})" if opset > DEFAULT_OPSET else "")) from None
            passed = report["validation"]["passed"]
        else:
            report["validation"] = None
            passed = True
        report["published"] = passed
        if passed:
            if external:
                os.replace(os.path.join(tmp, data_name), os.path.join(outdir, data_name))
            os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = time.perf_counter() - t0
    if not report["published"] and raise_on_fail:
        raise GateError(validation_failure_message(report))
    return report


def validation_failure_message(report: dict) -> str:
    v = report["validation"]
    lines = [f"ONNX validation failed ({v['rule']}, tol {v['tolerance']:g}); {report['output']} was not written "
             "(--no-validate writes it unchecked):"]
    for prov, r in v["providers"].items():
        lines.append(f"  {'PASS' if r['passed'] else 'FAIL'}  {prov}: max |logit diff| {r['max_abs_logit_diff']:.3g} "
                     f"(limit {r['limit']:.3g}){'' if r['finite'] else ', non-finite logits'}")
        sd = r.get("reference_parallel_vs_step")
        if r["finite"] and sd is not None and sd > r["limit"] / 4:
            lines.append(f"  note: the torch model's own fp32 forms (parallel vs step) differ by {sd:.3g} on these tokens; "
                         f"this model is sensitive to fp32 rounding, and a difference of a few times that is rounding "
                         f"too (--tol {max(4 * sd, r['limit']):.1g} accepts it)")
    return "\n".join(lines)


__all__ = ["export_onnx", "build_onnx_model", "register_onnx_linear", "validate_onnx", "compare_with_reference",
           "state_specs", "onnx_state_specs", "ExportError", "Emitter"]
