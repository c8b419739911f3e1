"""ggml's 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), vectorised in numpy.

Block layouts (ggml-common.h): ``half`` is IEEE fp16; within a block element j (0..15) is the
low nibble of ``qs[j]`` and element j+16 its high nibble; for Q5 the fifth bit of element e is
bit e of the little-endian uint32 ``qh``. Quantizers follow ggml's ``quantize_row_*_ref``
bit for bit (fp32 arithmetic, fp16 scales)."""
from __future__ import annotations

import numpy as np

QK = 32
# name -> (rwkv.cpp type id, bytes per block)
BLOCK_TYPES = {"Q4_0": (2, 18), "Q4_1": (3, 20), "Q5_0": (7, 22), "Q5_1": (8, 24), "Q8_0": (9, 34)}
BITS_PER_WEIGHT = {k: v[1] * 8 / QK for k, v in BLOCK_TYPES.items()}


def block_bytes(qtype: str) -> int:
    return BLOCK_TYPES[qtype][1]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # qs: (nb, 16) uint8 -> (nb, 32) values 0..15
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    # qh: (nb, 4) uint8 -> (nb, 32) bits 0/1, element e = bit e of the LE uint32
    bits = np.unpackbits(qh, axis=1, bitorder="little")
    return bits


def dequantize(qtype: str, raw: np.ndarray, n: int) -> np.ndarray:
    """raw: uint8 bytes of n/32 blocks -> float32 array of n values."""
    if n % QK:
        raise ValueError(f"{qtype}: {n} values is not a multiple of the block size {QK}")
    bb = block_bytes(qtype)
    nb = n // QK
    if raw.size != nb * bb:
        raise ValueError(f"{qtype}: expected {nb * bb} bytes for {n} values, got {raw.size}")
    b = raw.reshape(nb, bb)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    if qtype == "Q8_0":
        q = b[:, 2:].copy().view(np.int8).astype(np.float32)
        out = q * d
    elif qtype == "Q4_0":
        q = _nibbles(b[:, 2:18]).astype(np.float32) - 8.0
        out = q * d
    elif qtype == "Q4_1":
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        q = _nibbles(b[:, 4:20]).astype(np.float32)
        out = q * d + m
    elif qtype == "Q5_0":
        hb = _high_bits(b[:, 2:6])
        q = (_nibbles(b[:, 6:22]) | (hb << 4)).astype(np.float32) - 16.0
        out = q * d
    elif qtype == "Q5_1":
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        hb = _high_bits(b[:, 4:8])
        q = (_nibbles(b[:, 8:24]) | (hb << 4)).astype(np.float32)
        out = q * d + m
    else:
        raise ValueError(f"unknown block type {qtype}")
    return out.reshape(n).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_high(q: np.ndarray) -> np.ndarray:
    return np.packbits(((q >> 4) & 1).astype(np.uint8), axis=1, bitorder="little")


def quantize(qtype: str, x: np.ndarray) -> np.ndarray:
    """float32 values (length a multiple of 32) -> uint8 block bytes, as ggml's reference."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.size % QK:
        raise ValueError(f"{qtype}: {x.size} values is not a multiple of the block size {QK}")
    xb = x.reshape(-1, QK)
    nb = xb.shape[0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if qtype in ("Q4_0", "Q5_0"):
            nmax = 8.0 if qtype == "Q4_0" else 16.0
            qmax = 15 if qtype == "Q4_0" else 31
            # value with the largest magnitude (first one on ties, as the C loop with '>')
            idx = np.argmax(np.abs(xb), axis=1)
            mx = xb[np.arange(nb), idx]
            d = (mx / np.float32(-nmax)).astype(np.float32)
            idd = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
            v = (xb * idd[:, None]).astype(np.float32) + np.float32(nmax + 0.5)
            q = np.minimum(np.trunc(v).astype(np.int32), qmax)
            dh = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
            if qtype == "Q4_0":
                return np.concatenate([dh, _pack_nibbles(q)], axis=1).reshape(-1)
            return np.concatenate([dh, _pack_high(q), _pack_nibbles(q)], axis=1).reshape(-1)
        if qtype in ("Q4_1", "Q5_1"):
            qmax = 15 if qtype == "Q4_1" else 31
            mn = xb.min(axis=1)
            mxv = xb.max(axis=1)
            d = ((mxv - mn) / np.float32(qmax)).astype(np.float32)
            idd = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
            v = ((xb - mn[:, None]) * idd[:, None]).astype(np.float32) + np.float32(0.5)
            q = np.trunc(v).astype(np.int32)
            if qtype == "Q4_1":
                q = np.minimum(q, 15)
            dh = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
            mh = mn.astype(np.float16).view(np.uint8).reshape(nb, 2)
            if qtype == "Q4_1":
                return np.concatenate([dh, mh, _pack_nibbles(q)], axis=1).reshape(-1)
            return np.concatenate([dh, mh, _pack_high(q), _pack_nibbles(q)], axis=1).reshape(-1)
        if qtype == "Q8_0":
            amax = np.abs(xb).max(axis=1)
            d = (amax / np.float32(127.0)).astype(np.float32)
            idd = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
            q = _roundf(xb * idd[:, None]).astype(np.int8)
            dh = d.astype(np.float16).view(np.uint8).reshape(nb, 2)
            return np.concatenate([dh, q.view(np.uint8)], axis=1).reshape(-1)
    raise ValueError(f"unknown block type {qtype}")


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero (numpy's round is half to even)."""
    v = v.astype(np.float32)
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
