"""ggml's K-quant super-block formats Q4_K, Q5_K and Q6_K, quantized in numpy.

The maintained ``gguf`` package can dequantize these types but not produce them. This module
produces them from ggml's block layout (ggml-common.h) with the same round-to-nearest search as
ggml's reference quantizers (``quantize_row_q{4,5,6}_K_ref``, used by llama.cpp's quantizer when
no importance matrix is given), so the bytes match llama.cpp's own output. Reading is left to
``gguf.quants.dequantize``, against which every quantizer here is tested.

Layouts (QK_K = 256 values per super-block, ``half`` = IEEE fp16, little-endian):

* Q4_K (144 bytes): ``d:half, dmin:half, scales[12], qs[128]``. Eight sub-blocks of 32 values;
  sub-block j has a 6-bit scale ``sc_j`` and 6-bit min ``m_j`` packed into ``scales`` (j < 4:
  ``scales[j]`` low 6 bits = sc, ``scales[j+4]`` low 6 bits = m; j >= 4: ``scales[j+4]`` holds the
  low nibbles of sc and m, their top two bits sit in bits 6-7 of ``scales[j-4]`` and ``scales[j]``).
  Value = ``d*sc_j*q - dmin*m_j`` with q in 0..15; the 64 values of chunk c are stored as
  ``qs[32c + l] = q[64c + l] | q[64c + 32 + l] << 4``.
* Q5_K (176 bytes): ``d, dmin, scales[12], qh[32], qs[128]``: as Q4_K with q in 0..31; the fifth
  bit of value 64c + l is bit 2c of ``qh[l]`` and of value 64c + 32 + l bit 2c + 1.
* Q6_K (210 bytes): ``ql[128], qh[64], scales:int8[16], d:half``. Sixteen sub-blocks of 16 with
  an 8-bit signed scale each; value = ``d*scale_j*(q - 32)``, q in 0..63; in each half of 128
  values, ``ql[l]`` = low nibbles of q[l] | q[l+64] << 4, ``ql[l+32]`` = q[l+32] | q[l+96] << 4,
  ``qh[l]`` = the top two bits of q[l], q[l+32], q[l+64], q[l+96] at bits 0, 2, 4, 6.

For calibrated quantizers (GPTQ), the work is split in three steps that can be used separately:
``kquant_grid`` (choose the scales, as ggml does), ``kquant_levels`` (round values onto a grid)
and ``kquant_pack`` (levels + grid -> block bytes). ``quantize`` chains the three.

All arithmetic is float32 in the order ggml's C code uses (sequential sums), which is what makes
the searches pick the same scales bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256
TYPE_SIZE = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
KQUANT_TYPES = tuple(TYPE_SIZE)
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS
f32 = np.float32


def _rint(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: float32 round half to even, as int32."""
    return np.rint(v.astype(np.float32, copy=False)).astype(np.int32)


def _half_roundtrip(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bit pattern as uint16, the fp16 value back in float32)."""
    h = v.astype(np.float32).astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum along the last axis (C's ``for (...) s += t``); numpy's
    accumulate is strictly sequential, unlike sum (pairwise)."""
    return np.add.accumulate(np.asarray(terms, dtype=np.float32), axis=-1)[..., -1]


# ------------------------------------------------------------------------------------------
# ggml's two searches, vectorised over rows of sub-blocks (each row one sub-block)
def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Asymmetric (scale, min) search of ggml's make_qkx2_quants (use_mad = false).
    x, w: (M, n) float32. Returns scale (M,), the_min (M,) (the positive offset), L (M, n)."""
    xmin = np.minimum(x.min(axis=1), f32(0))
    xmax = x.max(axis=1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = xmax == xmin
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rng = (xmax - xmin).astype(np.float32)
        iscale = (f32(nmax) / rng).astype(np.float32)
        scale = (f32(1) / iscale).astype(np.float32)
        L = np.clip(_rint(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
        best = _seqsum(w * (((scale[:, None] * L.astype(np.float32)) + xmin[:, None]) - x) ** 2)
        mn = xmin.copy()
        for step in range(nstep + 1):
            # ggml reads the current best min here (it moves as better fits are found)
            num = ((f32(rmin) + f32(rdelta) * f32(step)) + f32(nmax)).astype(np.float32)
            isc = (num / (xmax - mn).astype(np.float32)).astype(np.float32)
            La = np.clip(_rint(isc[:, None] * (x - mn[:, None])), 0, nmax)
            Laf = La.astype(np.float32)
            wl = w * Laf
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(wl * Laf)
            sum_xl = _seqsum(wl * x)
            D = (sum_w * sum_l2 - sum_l * sum_l).astype(np.float32)
            ok = D > 0
            this_scale = ((sum_w * sum_xl - sum_x * sum_l) / D).astype(np.float32)
            this_min = ((sum_l2 * sum_x - sum_l * sum_xl) / D).astype(np.float32)
            pos = this_min > 0
            this_min = np.where(pos, f32(0), this_min).astype(np.float32)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(np.float32)
            cur = _seqsum(w * (((this_scale[:, None] * Laf) + this_min[:, None]) - x) ** 2)
            better = ok & (cur < best)
            if better.any():
                L = np.where(better[:, None], La, L)
                best = np.where(better, cur, best)
                scale = np.where(better, this_scale, scale)
                mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f32(0), scale).astype(np.float32)
    mn = np.where(flat, xmin, mn)
    return scale, (-mn).astype(np.float32), L


def _make_qx(x: np.ndarray, nmax: int):
    """Symmetric scale search of ggml's make_qx_quants with rmse_type 1 (weights x^2), no
    importance weights. x: (M, n). Returns scale (M,), L (M, n) in 0..2*nmax-1."""
    M, n = x.shape
    idx = np.argmax(np.abs(x), axis=1)
    mx = x[np.arange(M), idx]
    zero = np.abs(mx) < _EPS
    wx = (x * x) * x
    ww = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        def attempt(iscale):
            l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
            lf = l.astype(np.float32)
            return l, _seqsum(wx * lf), _seqsum((ww * lf) * lf)

        iscale = (f32(-nmax) / mx).astype(np.float32)
        l, sumlx, suml2 = attempt(iscale)
        L = l + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0)).astype(np.float32)
        best = (scale * sumlx).astype(np.float32)
        for step in range(-9, 10):
            if step == 0:
                continue
            isc = (-(f32(nmax) + f32(0.1) * f32(step)) / mx).astype(np.float32)
            l, sumlx, suml2 = attempt(isc)
            better = (suml2 > 0) & ((sumlx * sumlx) > (best * suml2))
            if better.any():
                L = np.where(better[:, None], l + nmax, L)
                scale = np.where(better, sumlx / suml2, scale).astype(np.float32)
                best = np.where(better, scale * sumlx, best).astype(np.float32)
    L = np.where(zero[:, None], 0, L)
    scale = np.where(zero, f32(0), scale).astype(np.float32)
    return scale, L


# ------------------------------------------------------------------------------------------
@dataclass
class KGrid:
    """The scales of a K-quant tensor, one row per super-block.

    Q4_K/Q5_K: ``d``/``dmin`` (nb,) fp16 bit patterns, ``sc``/``m`` (nb, 8) 6-bit integers;
    Q6_K: ``d`` (nb,) fp16 bits, ``sc`` (nb, 16) int8. ``L0`` keeps the levels of the scale search
    for sub-blocks whose scale rounds to zero (ggml leaves them as they are; they dequantize to
    the sub-block's offset whatever they hold). ``step``/``offset`` (nb, 256) float32: the
    effective per-value scale and offset, value = step*q - offset (Q6_K: q - 32)."""
    qtype: str
    d: np.ndarray
    dmin: np.ndarray | None
    sc: np.ndarray
    m: np.ndarray | None
    L0: np.ndarray

    @property
    def sub(self) -> int:
        return 16 if self.qtype == "Q6_K" else 32

    @property
    def step(self) -> np.ndarray:
        d = self.d.view(np.float16).astype(np.float32)
        s = (d[:, None] * self.sc.astype(np.float32)).astype(np.float32)
        return np.repeat(s, self.sub, axis=1)

    @property
    def offset(self) -> np.ndarray:
        if self.qtype == "Q6_K":
            return np.zeros((self.d.shape[0], QK_K), np.float32)
        dm = self.dmin.view(np.float16).astype(np.float32)
        o = (dm[:, None] * self.m.astype(np.float32)).astype(np.float32)
        return np.repeat(o, self.sub, axis=1)

    @property
    def qmax(self) -> int:
        return {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[self.qtype]


def _check(qtype: str, x: np.ndarray) -> np.ndarray:
    if qtype not in TYPE_SIZE:
        raise ValueError(f"unknown K-quant type {qtype}; known: {', '.join(KQUANT_TYPES)}")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.size % QK_K:
        raise ValueError(f"{qtype}: {x.size} values is not a multiple of the super-block size {QK_K}")
    if not np.isfinite(x).all():
        raise ValueError(f"{qtype}: cannot quantize non-finite values")
    return x.reshape(-1, QK_K)


def kquant_grid(qtype: str, x: np.ndarray) -> KGrid:
    """Choose the super-block and sub-block scales for ``x`` (flattened; rows of 256) exactly as
    ggml's reference quantizer does."""
    xb = _check(qtype, x)
    nb = xb.shape[0]
    if qtype in ("Q4_K", "Q5_K"):
        nmax, rmin, nstep = (15, -1.0, 20) if qtype == "Q4_K" else (31, -0.5, 15)
        xs = xb.reshape(nb * 8, 32)
        sum_x2 = _seqsum(xs * xs)
        av_x = np.sqrt((sum_x2 / f32(32)).astype(np.float32)).astype(np.float32)
        w = (av_x[:, None] + np.abs(xs)).astype(np.float32)
        scales, mins, L = _make_qkx2(xs, w, nmax, rmin, 0.1, nstep)
        scales = scales.reshape(nb, 8)
        mins = mins.reshape(nb, 8)
        max_scale = np.maximum(scales.max(axis=1), f32(0))
        max_min = np.maximum(mins.max(axis=1), f32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(np.float32)
            inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(np.float32)
        ls = np.minimum(_rint(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(_rint(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
        d, _ = _half_roundtrip((max_scale / f32(63)).astype(np.float32))
        dmin, _ = _half_roundtrip((max_min / f32(63)).astype(np.float32))
        return KGrid(qtype, d, dmin, ls, lm, L.reshape(nb, QK_K).astype(np.uint8))
    # Q6_K
    xs = xb.reshape(nb * 16, 16)
    scales, L = _make_qx(xs, 32)
    scales = scales.reshape(nb, 16)
    idx = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(nb), idx]
    zero = np.abs(max_scale) < _EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, f32(0), f32(-128) / max_scale).astype(np.float32)
        dval = np.where(zero, f32(0), f32(1) / iscale).astype(np.float32)
    d, _ = _half_roundtrip(dval)
    sc = np.minimum(_rint(iscale[:, None] * scales), 127).astype(np.int8)
    sc[zero] = 0
    L = L.reshape(nb, QK_K).astype(np.uint8)
    L[zero] = 0
    return KGrid(qtype, d, None, sc, None, L)


def kquant_levels(grid: KGrid, x: np.ndarray) -> np.ndarray:
    """Round ``x`` onto the grid (ggml's final pass): levels (nb, 256) uint8, 0..qmax."""
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK_K)
    step = grid.step
    with np.errstate(divide="ignore", invalid="ignore"):
        if grid.qtype == "Q6_K":
            l = np.clip(_rint(xb / step), -32, 31) + 32
        else:
            l = np.clip(_rint((xb + grid.offset) / step), 0, grid.qmax)
    return np.where(step == 0, grid.L0, l).astype(np.uint8)


def kquant_pack(grid: KGrid, L: np.ndarray) -> np.ndarray:
    """Levels (nb, 256) in 0..qmax + grid -> block bytes (uint8, nb * type size)."""
    L = np.asarray(L).reshape(-1, QK_K).astype(np.uint8)
    nb = L.shape[0]
    if L.max(initial=0) > grid.qmax:
        raise ValueError(f"{grid.qtype}: levels above {grid.qmax}")
    if grid.qtype == "Q6_K":
        Lh = L.reshape(nb, 2, 4, 32)  # halves of 128, quarters of 32
        lo = Lh & 0x0F
        hi = Lh >> 4
        ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)  # (nb,2,64)
        qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (nb,2,32)
        return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64).astype(np.uint8),
                               grid.sc.astype(np.int8).view(np.uint8), grid.d.reshape(nb, 1).view(np.uint8)],
                              axis=1).reshape(-1)
    sc, m = grid.sc.astype(np.uint8), grid.m.astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = sc[:, 0:4]
    packed[:, 4:8] = m[:, 0:4]
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    packed[:, 0:4] |= (sc[:, 4:8] >> 4) << 6
    packed[:, 4:8] |= (m[:, 4:8] >> 4) << 6
    head = np.concatenate([grid.d.reshape(nb, 1).view(np.uint8), grid.dmin.reshape(nb, 1).view(np.uint8), packed], axis=1)
    Lc = L.reshape(nb, 4, 2, 32)  # chunks of 64: first and second 32
    qs = ((Lc[:, :, 0] & 0x0F) | ((Lc[:, :, 1] & 0x0F) << 4)).reshape(nb, 128)
    if grid.qtype == "Q4_K":
        return np.concatenate([head, qs], axis=1).reshape(-1)
    bits = (Lc >> 4) & 1  # (nb, 4, 2, 32)
    shifts = (2 * np.arange(4).reshape(1, 4, 1, 1) + np.arange(2).reshape(1, 1, 2, 1)).astype(np.uint8)
    qh = (bits << shifts).sum(axis=(1, 2)).astype(np.uint8)  # distinct bits: sum == or
    return np.concatenate([head, qh, qs], axis=1).reshape(-1)


def quantize(qtype: str, x: np.ndarray) -> np.ndarray:
    """float32 values (size a multiple of 256) -> K-quant block bytes, as ggml's reference."""
    grid = kquant_grid(qtype, x)
    return kquant_pack(grid, kquant_levels(grid, x))


def dequantize(qtype: str, raw: np.ndarray) -> np.ndarray:
    """Block bytes -> float32 values, through the ``gguf`` package's dequantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gdq
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, TYPE_SIZE[qtype])
    return gdq(raw, GGMLQuantizationType[qtype]).reshape(-1)
