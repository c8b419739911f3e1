"""Quantization grids (int8, int4, ggml blocks) and GPTQ.

A *grid* maps a row-major weight matrix (out, in) to integers and parameters, group by group
along the input dimension: ``fit`` derives one group's parameters from its values, ``quant``
rounds values onto the grid, ``dequant`` maps integers back. Round-to-nearest (RTN) fits every
group on the original weights; GPTQ walks the columns in order, quantizes each one and spreads
its error over the columns not yet quantized, weighted by the inverse Hessian ``H = X^T X`` of
the layer's inputs (Frantar et al., 2022), fitting each group's parameters on the weights as
updated when the walk reaches the group.

ggml grids reproduce ggml's reference quantizers (``quantize_row_*_ref``) in float32, so that
GPTQ with a diagonal Hessian (no compensation) yields exactly the bytes RTN writes.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .errors import RwkvToolsError
from .io import ggml_quants

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal)


class QuantizeError(RwkvToolsError):
    """Bad quantize options, or a matrix/checkpoint/plan that cannot be quantized as asked."""


class Grid:
    name = "?"
    group: int = 0            # columns per group (0: the whole row)
    bits: float = 0.0         # stored bits per weight for a row of length n: see bits_per_weight

    def group_for(self, n_in: int) -> int:
        return self.group or n_in

    def check(self, name: str, shape: tuple) -> None:
        """Raise a clear error if a (out, in) matrix cannot use this grid."""
        if len(shape) != 2:
            raise QuantizeError(f"{self.name}: '{name}' has shape {tuple(shape)}; only 2-D matrices can be quantized")
        g = self.group_for(shape[1])
        if shape[1] % g:
            raise QuantizeError(self._bad_row(name, shape, g))

    def _bad_row(self, name, shape, g):
        return (f"{self.name}: '{name}' has rows of {shape[1]} values, not a multiple of the group size {g}; "
                f"choose another --group-size or leave it out with --skip '{name}'")

    def fit(self, w: torch.Tensor, alpha: float = 1.0) -> tuple:
        """Parameters of each row of ``w`` (R, g); ``alpha`` < 1 shrinks the range (clipping)."""
        raise NotImplementedError

    def quant(self, x: torch.Tensor, p: tuple, j: int = 0) -> torch.Tensor:
        """Levels of the values ``x`` (R, k), columns j..j+k of the group ``p`` was fitted on (the
        per-row grids ignore j; the K-quants' step changes every 16/32 columns)."""
        raise NotImplementedError

    def dequant(self, q: torch.Tensor, p: tuple, j: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def bits_per_weight(self, n_in: int) -> float:
        raise NotImplementedError


def _col(p, x):
    """Broadcast per-row parameters (R,) against values (R, k)."""
    return p.unsqueeze(-1) if p.dim() == x.dim() - 1 else p


class Int8Grid(Grid):
    """Symmetric, one float32 scale per output row: q = round(w / s) in [-127, 127], s = max|w| / 127."""

    name = "int8"
    group = 0

    def fit(self, w, alpha=1.0):
        amax = w.abs().amax(dim=-1).float() * alpha
        s = amax / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        if not torch.isfinite(s).all():
            raise QuantizeError("int8: weights are not finite")
        return (s,)

    def quant(self, x, p, j=0):
        return torch.clamp(torch.round(x.float() / _col(p[0], x)), -127, 127)

    def dequant(self, q, p, j=0):
        return q.float() * _col(p[0], q)

    def bits_per_weight(self, n_in):
        return 8 + 32 / n_in


class Int4Grid(Grid):
    """Asymmetric per group of G input columns: s = (max - min) / 15 over the group's range
    extended to include 0 (stored fp16), integer zero point z = round(-min / s) in [0, 15];
    q = clamp(round(w / s) + z, 0, 15); w ~ (q - z) s. Zero is always exactly representable."""

    name = "int4"

    def __init__(self, group: int):
        self.group = group

    def check(self, name, shape):
        super().check(name, shape)
        if shape[1] % 2:
            raise QuantizeError(f"int4: '{name}' has an odd row length {shape[1]}; two values are packed per byte")

    def fit(self, w, alpha=1.0):
        w = w.float()
        lo = torch.clamp(w.amin(dim=-1), max=0.0) * alpha
        hi = torch.clamp(w.amax(dim=-1), min=0.0) * alpha
        both0 = (lo == 0) & (hi == 0)
        lo = torch.where(both0, -torch.ones_like(lo), lo)
        hi = torch.where(both0, torch.ones_like(hi), hi)
        s = ((hi - lo) / 15.0).half()
        if not torch.isfinite(s).all():
            raise QuantizeError("int4: a group's range exceeds what a float16 scale can hold (|w| > ~9.8e5)")
        s = torch.where(s > 0, s, torch.full_like(s, FP16_TINY)).float()
        z = torch.clamp(torch.round(-lo / s), 0, 15)
        return (s, z)

    def quant(self, x, p, j=0):
        s, z = p
        return torch.clamp(torch.round(x.float() / _col(s, x)) + _col(z, x), 0, 15)

    def dequant(self, q, p, j=0):
        s, z = p
        return (q.float() - _col(z, q)) * _col(s, q)

    def bits_per_weight(self, n_in):
        return 4 + 32 / self.group


class GGMLGrid(Grid):
    """ggml's 32-value block formats, fitted and rounded as ggml's reference quantizer does
    (float32 arithmetic; the stored fp16 scale/min are used to dequantize)."""

    group = ggml_quants.QK

    def __init__(self, qtype: str):
        if qtype not in ggml_quants.BLOCK_TYPES:
            raise QuantizeError(f"unknown ggml block type '{qtype}'; known: {', '.join(ggml_quants.BLOCK_TYPES)}")
        self.name = qtype
        self.qtype = qtype

    def _bad_row(self, name, shape, g):
        return (f"{self.name}: '{name}' has rows of {shape[1]} values, not a multiple of ggml's block size 32 "
                f"(rwkv.cpp requires it); leave it out with --skip '{name}'")

    def fit(self, w, alpha=1.0):
        w = w.float()
        t = self.qtype
        if t in ("Q4_0", "Q5_0"):
            idx = torch.argmax(w.abs(), dim=-1, keepdim=True)  # first maximum, as the C loop
            mx = torch.gather(w, -1, idx).squeeze(-1)
            if alpha != 1.0:
                mx = mx * alpha
            d = mx / (-8.0 if t == "Q4_0" else -16.0)
            inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            return (d, inv, d.half().float())
        if t in ("Q4_1", "Q5_1"):
            mn = w.amin(dim=-1)
            mx = w.amax(dim=-1)
            if alpha != 1.0:
                mn, mx = mn * alpha, mx * alpha
            d = (mx - mn) / (15.0 if t == "Q4_1" else 31.0)
            inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            return (d, inv, d.half().float(), mn, mn.half().float())
        amax = w.abs().amax(dim=-1)  # Q8_0
        if alpha != 1.0:
            amax = amax * alpha
        d = amax / 127.0
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        return (d, inv, d.half().float())

    def quant(self, x, p, j=0):
        x = x.float()
        t = self.qtype
        inv = _col(p[1], x)
        if t == "Q4_0":
            return torch.clamp(torch.trunc(x * inv + 8.5), 0, 15)
        if t == "Q5_0":
            return torch.clamp(torch.trunc(x * inv + 16.5), 0, 31)
        if t in ("Q4_1", "Q5_1"):
            v = (x - _col(p[3], x)) * inv + 0.5
            return torch.clamp(torch.trunc(v), 0, 15 if t == "Q4_1" else 31)
        v = x * inv  # Q8_0: roundf (half away from zero)
        return torch.clamp(torch.sign(v) * torch.floor(v.abs() + 0.5), -127, 127)

    def dequant(self, q, p, j=0):
        t = self.qtype
        q = q.float()
        if t == "Q4_0":
            return (q - 8) * _col(p[2], q)
        if t == "Q5_0":
            return (q - 16) * _col(p[2], q)
        if t in ("Q4_1", "Q5_1"):
            return q * _col(p[2], q) + _col(p[4], q)
        return q * _col(p[2], q)

    def bits_per_weight(self, n_in):
        return ggml_quants.BITS_PER_WEIGHT[self.qtype]

    def pack(self, q: torch.Tensor, params: list[tuple]) -> np.ndarray:
        """q (out, in) integers and per-group params [(...)] * (in/32) -> ggml block bytes, rows in
        order, blocks along each row."""
        out, n_in = q.shape
        nb = n_in // 32
        qq = q.to(torch.int64).numpy().reshape(out * nb, 32)
        # params per group g are (out,) tensors; blocks are ordered row-major: row o, group g
        def stack(i):
            return torch.stack([p[i] for p in params], dim=1).reshape(-1).numpy().astype(np.float32)
        dh = stack(0).astype(np.float16).view(np.uint8).reshape(-1, 2)
        t = self.qtype
        if t == "Q8_0":
            return np.concatenate([dh, qq.astype(np.int8).view(np.uint8)], axis=1).reshape(-1)
        qs = (qq[:, :16] & 0x0F) | ((qq[:, 16:] & 0x0F) << 4)
        qs = qs.astype(np.uint8)
        parts = [dh]
        if t in ("Q4_1", "Q5_1"):
            parts.append(stack(3).astype(np.float16).view(np.uint8).reshape(-1, 2))
        if t in ("Q5_0", "Q5_1"):
            parts.append(np.packbits(((qq >> 4) & 1).astype(np.uint8), axis=1, bitorder="little"))
        parts.append(qs)
        return np.concatenate(parts, axis=1).reshape(-1)


class KQuantGrid(Grid):
    """ggml's K-quants (Q4_K, Q5_K, Q6_K): super-blocks of 256 values with 6-bit (Q4_K/Q5_K,
    with mins) or 8-bit (Q6_K) sub-block scales. A group is one super-block per row; its scales
    are chosen by ggml's reference search (``io.kquants.kquant_grid``) on the values as they are
    when the GPTQ walk reaches the group, then every column is rounded onto that grid (the
    step and offset change every 32 (16 for Q6_K) columns)."""

    group = 256

    def __init__(self, qtype: str):
        from .io import kquants
        if qtype not in kquants.TYPE_SIZE:
            raise QuantizeError(f"unknown K-quant type '{qtype}'")
        self.name = self.qtype = qtype
        self._bytes = kquants.TYPE_SIZE[qtype]

    def _bad_row(self, name, shape, g):
        return (f"{self.name}: '{name}' has rows of {shape[1]} values, not a multiple of the K-quant super-block "
                f"size 256; leave it out with --skip '{name}'")

    def fit(self, w, alpha=1.0):
        from .io import kquants
        if alpha != 1.0:
            raise QuantizeError(f"{self.name}: --clip is not available for K-quants (ggml's scale search is used)")
        g = kquants.kquant_grid(self.qtype, w.detach().float().contiguous().numpy())
        step = torch.from_numpy(g.step)
        off = torch.from_numpy(g.offset)
        l0 = torch.from_numpy(g.L0.astype(np.float32))
        return (step, off, l0, g)

    def quant(self, x, p, j=0):
        step, off, l0 = (t[:, j:j + x.shape[1]] for t in p[:3])
        x = x.float()
        if self.qtype == "Q6_K":
            q = torch.clamp(torch.round(x / step), -32, 31) + 32
        else:
            q = torch.clamp(torch.round((x + off) / step), 0, self.qmax)
        return torch.where(step == 0, l0, q)  # a zero step: ggml keeps the search's levels

    @property
    def qmax(self) -> int:
        return {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[self.qtype]

    def dequant(self, q, p, j=0):
        step, off = (t[:, j:j + q.shape[1]] for t in p[:2])
        if self.qtype == "Q6_K":
            return step * (q.float() - 32)
        return step * q.float() - off

    def bits_per_weight(self, n_in):
        return self._bytes * 8 / 256

    def pack(self, q: torch.Tensor, params: list[tuple]) -> np.ndarray:
        """Levels (out, in) and one fitted grid per group of 256 columns -> K-quant block bytes,
        rows in order, super-blocks along each row."""
        from .io import kquants
        out, n_in = q.shape
        grids = [p[3] for p in params]

        def inter(attr):
            a = [getattr(g, attr) for g in grids]
            if a[0] is None:
                return None
            st = np.stack(a, axis=1)               # (out, groups, ...)
            return st.reshape(out * len(grids), *st.shape[2:])
        grid = kquants.KGrid(self.qtype, inter("d"), inter("dmin"), inter("sc"), inter("m"), inter("L0"))
        levels = q.to(torch.int64).numpy().reshape(out * len(grids), 256).astype(np.uint8)
        return kquants.kquant_pack(grid, levels)


def make_grid(scheme: str, group_size: int | None = None) -> Grid:
    if scheme == "int8":
        return Int8Grid()
    if scheme == "int4":
        return Int4Grid(group_size or 64)
    if scheme in ("Q4_K", "Q5_K", "Q6_K"):
        return KQuantGrid(scheme)
    return GGMLGrid(scheme)


# ------------------------------------------------------------------------------- fitting groups
CLIP_ALPHAS = tuple(1.0 - 0.02 * i for i in range(16))  # 1.00 .. 0.70


def fit_group(grid: Grid, w: torch.Tensor, clip: bool = False, weight: torch.Tensor | None = None) -> tuple:
    """Parameters of each row of the group ``w`` (R, g). With ``clip``, the range is shrunk by the
    factor in CLIP_ALPHAS that gives each row the least squared error after rounding (weighted per
    column by ``weight``, e.g. the Hessian diagonal): large outliers then cost a little more and
    every other value a lot less."""
    if not clip:
        return grid.fit(w)
    best_p, best_e = None, None
    for a in CLIP_ALPHAS:
        p = grid.fit(w, a)
        err = (grid.dequant(grid.quant(w, p), p) - w.float()).square()
        if weight is not None:
            err = err * weight
        e = err.sum(-1)
        if best_p is None:
            best_p, best_e = list(p), e
            continue
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_p = [torch.where(better, pn, po) for pn, po in zip(p, best_p)]
    return tuple(best_p)


# ----------------------------------------------------------------------------------------- RTN
def rtn(w: torch.Tensor, grid: Grid, clip: bool = False) -> tuple[torch.Tensor, list[tuple], torch.Tensor]:
    """Round to nearest: (q (out, in), [params per group], dequantized (out, in) float32)."""
    w = w.float()
    out, n_in = w.shape
    g = grid.group_for(n_in)
    qs, ps, ds = [], [], []
    for c in range(0, n_in, g):
        blk = w[:, c:c + g]
        p = fit_group(grid, blk, clip)
        q = grid.quant(blk, p)
        qs.append(q)
        ps.append(p)
        ds.append(grid.dequant(q, p))
    return torch.cat(qs, 1), ps, torch.cat(ds, 1)


# ---------------------------------------------------------------------------------------- GPTQ
def gptq(w: torch.Tensor, xtx: torch.Tensor, grid: Grid, damp: float = 0.01, block: int = 128,
         act_order: bool = False, clip: bool = False) -> tuple[torch.Tensor, list[tuple], torch.Tensor]:
    """GPTQ on one matrix ``w`` (out, in) with the Gram ``xtx`` (in, in) of its inputs (float64).

    Columns are quantized one at a time; after column j, its rounding error e_j (scaled by the
    j-th diagonal entry of the upper Cholesky factor U of H^-1) is subtracted from the columns
    still to come through U's j-th row, which minimises ||(W - Q) X^T|| column by column. The
    Hessian is dampened by ``damp`` x mean(diag H) (raised tenfold up to three times if the
    factorisation fails).

    * default order: left to right; each group's parameters are fitted on its columns as updated
      when the walk reaches the group.
    * ``act_order``: columns in order of decreasing diag(H) (inputs with the most energy first,
      while the most columns remain to absorb their error); groups stay the storage groups of
      contiguous columns, their parameters fitted beforehand on the original weights.
    * ``clip``: parameters by the clipping search of :func:`fit_group`, weighted by diag(H).
    Returns (q, [params per group], dequantized weight), both in the original column order."""
    W = w.detach().float().clone()
    out, n = W.shape
    if xtx.shape != (n, n):
        raise QuantizeError(f"GPTQ: Hessian {tuple(xtx.shape)} does not match a matrix with {n} input columns")
    H = xtx.detach().double().clone()
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    hdiag = torch.diagonal(H).clone()
    mean_diag = float(hdiag.mean())
    if not math.isfinite(mean_diag):
        raise QuantizeError("GPTQ: the calibration statistics are not finite (overflow in the activations)")
    g = grid.group_for(n)
    n_groups = n // g + (1 if n % g else 0)
    params: list[tuple] = [None] * n_groups
    wdiag = hdiag.float()
    perm = None
    if act_order:  # static groups: fitted on the original weights, in storage order
        for k in range(n_groups):
            params[k] = fit_group(grid, W[:, k * g:(k + 1) * g], clip, wdiag[k * g:(k + 1) * g] if clip else None)
        perm = torch.argsort(hdiag, descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    U = None
    d = damp
    for _ in range(4):
        Hd = H + torch.eye(n, dtype=H.dtype) * (d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                break
            U = None
        d *= 10
    if U is None:
        raise QuantizeError("GPTQ: the Hessian is not positive definite even with strong dampening; use --method rtn")
    U = U.float()
    with _one_thread():
        Q, D = _walk(W, U, grid, params, perm, g, n, block, clip, wdiag)
    if perm is not None:
        inv = torch.argsort(perm)
        Q, D = Q[:, inv], D[:, inv]
    return Q, params, D


@contextlib.contextmanager
def _one_thread():
    """The column walk is thousands of small ops: intra-op threads only add synchronisation
    (10x slower with 2 threads on a busy machine), so it runs on one."""
    old = torch.get_num_threads()
    if old != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if old != 1:
            torch.set_num_threads(old)


def _walk(W, U, grid, params, perm, g, n, block, clip, wdiag):
    block = max(block, 1)
    Q = torch.zeros_like(W)
    D = torch.zeros_like(W)
    col_group = (perm if perm is not None else torch.arange(n)) // g
    cg = col_group.tolist()
    p = None
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            if perm is None:
                if c % g == 0:
                    cur = torch.cat([W1[:, j:], W[:, i2:]], 1)[:, :g]
                    params[c // g] = fit_group(grid, cur, clip, wdiag[c:c + g] if clip else None)
                p = params[c // g]
            else:
                p = params[cg[c]]
            col = W1[:, j:j + 1]
            jj = (c if perm is None else int(perm[c])) % g
            q = grid.quant(col, p, jj)
            dq = grid.dequant(q, p, jj)
            Q[:, c:c + 1] = q
            D[:, c:c + 1] = dq
            err = (col - dq) / U1[j, j]
            W1[:, j:] -= err * U1[j:j + 1, j:]
            E1[:, j:j + 1] = err
        if i2 < n:
            W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, D


def output_rel_error(w: torch.Tensor, dq: torch.Tensor, xtx: torch.Tensor) -> float:
    """sqrt(tr(E H E^T) / tr(W H W^T)), E = W - Q: the relative RMS error of the layer's outputs
    on the calibration inputs."""
    w64, e = w.double(), (w.double() - dq.double())
    num = float(((e @ xtx) * e).sum())
    den = float(((w64 @ xtx) * w64).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
