"""The readable truth: token-by-token WKV recurrences, one Python step per token.

Every fast path (chunked PyTorch, CUDA, ONNX) is tested against these. All math in the dtype of
the inputs (the model passes fp32).

Conventions (see docs/ARCHITECTURE.md):
* v4: ``w`` > 0 is exp(time_decay) (per-step log-decay -w), ``u`` = time_first (log-space bonus);
  state (aa, bb, pp) with the true numerator a = aa*e^pp and denominator b = bb*e^pp. A state of
  zeros is the empty state (bb == 0 means "nothing seen", whatever pp holds).
* v5/v6 ("diag"): r, k, v, g (B, T, H, N); g = log-decay (<= 0), broadcastable; u (H, N) linear
  bonus; state S (B, H, N_k, N_v), key-major: y_t = r_t^T (S + u*k_t v_t^T); S <- e^g * S + k_t v_t^T.
* v7: state S (B, H, N_v, N_k), value-major as the official code:
  S <- S diag(e^g) + (S a) b^T + v k^T;  y = S r  (reads the new state).
"""
from __future__ import annotations

import torch


def wkv4_naive(w, u, k, v, state):
    aa, bb, pp = state
    T = k.shape[1]
    ys = []
    neg_inf = torch.tensor(float("-inf"), dtype=k.dtype, device=k.device)
    for t in range(T):
        kk, vv = k[:, t], v[:, t]
        p = torch.where(bb > 0, pp, neg_inf)
        ww = u + kk
        q = torch.maximum(p, ww)
        e1 = torch.exp(p - q)
        e2 = torch.exp(ww - q)
        ys.append((e1 * aa + e2 * vv) / (e1 * bb + e2))
        ww = p - w
        q = torch.maximum(ww, kk)
        e1 = torch.exp(ww - q)
        e2 = torch.exp(kk - q)
        aa = e1 * aa + e2 * vv
        bb = e1 * bb + e2
        pp = q
    return torch.stack(ys, 1), (aa, bb, pp)


def wkv_diag_naive(r, k, v, g, u, S):
    T = r.shape[1]
    ys = []
    for t in range(T):
        rt, kt, vt = r[:, t], k[:, t], v[:, t]
        gt = g[:, t] if g.dim() == 4 else g
        kv = kt.unsqueeze(-1) * vt.unsqueeze(-2)                       # (B,H,K,V)
        ys.append(torch.einsum("bhk,bhkv->bhv", rt, S + u.unsqueeze(-1) * kv))
        S = torch.exp(gt).unsqueeze(-1) * S + kv
    return torch.stack(ys, 1), S


def wkv7_naive(r, g, k, v, a, b, S):
    T = r.shape[1]
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * torch.exp(g[:, t]).unsqueeze(-2) + sa.unsqueeze(-1) * b[:, t].unsqueeze(-2)
             + v[:, t].unsqueeze(-1) * k[:, t].unsqueeze(-2))
        ys.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    return torch.stack(ys, 1), S
