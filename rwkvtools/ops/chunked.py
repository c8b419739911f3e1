"""Chunked-parallel WKV in PyTorch: matrix products inside a chunk, the state carried between
chunks by a short scan. Fast on CPU, differentiable, exact rewrites of ops/naive.py.

Numerics (docs/ARCHITECTURE.md, after the reference notes §9.4):
* log-decays are formed directly by the caller (never log(w));
* every exponent that is materialised is <= 0, or bounded by ``SAFE_EXP`` when a product is
  factorised around the chunk start (e^{G_{t-1}} * e^{-G_i}); the chunk length is chosen per call
  so that L * max|g| <= SAFE_EXP (both factors stay normal fp32 numbers);
* when even the shortest chunk cannot satisfy that (v6 with very strong decays), the intra-chunk
  weights are built pairwise from segment sums (no large numbers are subtracted);
* a short last chunk is padded with g = 0, k = v = r = 0 (and a = b = 0 for v7), which leaves
  outputs and final state unchanged.
"""
from __future__ import annotations

import torch

SAFE_EXP = 60.0
CHUNKS = (64, 32, 16)
# |log-decay| above this decays to exactly 0 in one step at any precision; capping there keeps the
# chunk sums finite (a decay of -inf, from v4/v5's time_decay >= 88.73, gave 0 * inf = NaN in the
# 0/1 selections and the zero distances) without changing any result
DECAY_CAP = 1e30


def _decay_cap(dtype) -> float:
    """DECAY_CAP, or less where the dtype cannot hold it (fp16: 511; 64 steps of it stay finite)."""
    return min(DECAY_CAP, torch.finfo(dtype).max / 128)


def _pick_chunk(max_abs_g: float, chunks=CHUNKS) -> tuple[int, bool]:
    for L in chunks:
        if L * max_abs_g <= SAFE_EXP:
            return L, True
    return chunks[-1], False


def _pack(xs, L):
    """Several (B, T, H, N) tensors -> one (B*H*nc, L, n*N) tensor, zero-padded to a whole number
    of chunks (each input copied once, straight into its place), and the views of each input."""
    B, T, H, N = xs[0].shape
    nc = (T + L - 1) // L
    n = len(xs)
    buf = xs[0].new_zeros(B, H, nc * L, n, N) if nc * L > T else xs[0].new_empty(B, H, T, n, N)
    for i, x in enumerate(xs):
        buf[:, :, :T, i].copy_(x.transpose(1, 2))
    return buf.view(B * H * nc, L, n * N).split(N, -1), nc


def _unpack(y, B, H, nc, T):
    Z, L, N = y.shape
    return y.view(B, H, nc, L, N).permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T]


def _suffix_excl(g):
    """sum_{s > i} g_s along dim -2 (all terms <= 0, no cancellation)."""
    rc = torch.flip(torch.cumsum(torch.flip(g, [-2]), -2), [-2])
    return torch.cat([rc[..., 1:, :], torch.zeros_like(rc[..., :1, :])], -2)


def _prefix_excl(G):
    return torch.cat([torch.zeros_like(G[..., :1, :]), G[..., :-1, :]], -2)


def _scan(M, C, X0, diag: bool):
    """X_{c+1} = M_c X_c + C_c over chunks c (dim 1); returns the state entering each chunk
    (as (BH*nc, K, V)) and the final state."""
    xs = []
    X = X0
    for c in range(C.shape[1]):
        xs.append(X)
        if diag:
            X = torch.addcmul(C[:, c], M[:, c].unsqueeze(-1), X)
        else:
            X = torch.baddbmm(C[:, c], M[:, c], X)
    return torch.stack(xs, 1).reshape(-1, *X0.shape[-2:]), X


# ------------------------------------------------------------------------------------- v5 / v6
def wkv_diag_chunked(r, k, v, g, u, S, chunk: int | None = None, pairwise: bool | None = None):
    """Same contract as ops.naive.wkv_diag_naive."""
    B, T, H, N = r.shape
    g = g.clamp(min=-_decay_cap(g.dtype))
    if g.dim() != 4:
        g = g.expand(B, T, H, N)
    max_g = float(g.detach().abs().max()) if g.numel() else 0.0
    if chunk is None:
        chunk, safe = _pick_chunk(max_g)
    else:
        safe = chunk * max_g <= SAFE_EXP
    if pairwise is None:
        pairwise = not safe
    L = chunk
    (rc, kc, vc, gc), nc = _pack([r, k, v, g], L)                   # (Z, L, N), Z = B*H*nc
    G = torch.cumsum(gc, 1)                                           # inclusive prefix
    Gex = _prefix_excl(G)                                             # G_{t-1}
    Gsuf = _suffix_excl(gc)                                           # G_last - G_i
    Glast = G[:, -1]                                                  # (Z, N)
    tri = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)   # i < t
    Rd = rc * torch.exp(Gex)
    if pairwise:
        # E[t, i] = sum_{s=i+1}^{t-1} g_s for every pair at once: a 0/1 selection matrix
        # (L*L, L) times g (one matmul; every term <= 0, so no cancellation, as a cumsum)
        ar = torch.arange(L, device=r.device)
        sel = ((ar.view(1, 1, L) > ar.view(1, L, 1)) & (ar.view(1, 1, L) < ar.view(L, 1, 1))).to(gc.dtype)
        E = torch.matmul(sel.view(L * L, L), gc).view(-1, L, L, N).masked_fill(~tri.unsqueeze(-1), float("-inf"))
        A = (rc.unsqueeze(2) * kc.unsqueeze(1) * torch.exp(E)).sum(-1)
    else:
        A = torch.bmm(Rd, (kc * torch.exp(-G)).transpose(1, 2)).masked_fill_(~tri, 0.0)
    uu = u.reshape(1, H, 1, 1, N).expand(B, H, nc, 1, N).reshape(-1, 1, N)
    y_loc = torch.baddbmm((rc * uu * kc).sum(-1, keepdim=True) * vc, A, vc)   # + bonus
    Cst = torch.bmm((kc * torch.exp(Gsuf)).transpose(1, 2), vc)               # (Z, K, V)
    BH = B * H
    Xs, S_out = _scan(torch.exp(Glast).view(BH, nc, N), Cst.view(BH, nc, N, N),
                      S.reshape(BH, N, N), diag=True)
    y = torch.baddbmm(y_loc, Rd, Xs)
    return _unpack(y, B, H, nc, T), S_out.view(B, H, N, N)


# ------------------------------------------------------------------------------------------ v7
def wkv7_chunked(r, g, k, v, a, b, S, chunk: int | None = None):
    """Same contract as ops.naive.wkv7_naive (S value-major (B,H,V,K)). Requires the v7 decay
    bound (|g| <= 0.61 per step), which keeps the factorised exponents small."""
    B, T, H, N = r.shape
    max_g = float(g.detach().abs().max()) if g.numel() else 0.0
    if chunk is None:
        chunk, safe = _pick_chunk(max_g, (32, 16))
        if not safe:
            # decays outside the v7 bound: shortest chunks that are still safe, else naive steps
            L = 1
            while L * 2 * max_g <= SAFE_EXP and L < 16:
                L *= 2
            if L < 4:
                from .naive import wkv7_naive
                return wkv7_naive(r, g, k, v, a, b, S)
            chunk = L
    L = chunk
    (rc, gc, kc, vc, ac, bc), nc = _pack([r, g, k, v, a, b], L)     # (Z, L, N)
    G = torch.cumsum(gc, 1)
    Glast = G[:, -1]
    Gex = G - gc                                              # G_{t-1}
    Gsuf = Glast.unsqueeze(1) - G                             # G_last - G_t (<= 0)
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl2 = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0).repeat(1, 2)
    eGneg = torch.exp(-G)
    Q = ac * torch.exp(Gex)                                   # alpha_j e^{G_{j-1}}
    KB = torch.cat([kc * eGneg, bc * eGneg], 1)               # [k_m e^{-G_m}; b_m e^{-G_m}] (Z,2L,N)
    QKB = torch.bmm(Q, KB.transpose(1, 2)).masked_fill_(~strict.repeat(1, 2), 0.0)
    A_ak, A_ab = QKB[:, :, :L], QKB[:, :, L:]
    Rd = rc * torch.exp(G)                                    # r_t e^{G_t}
    RKB = torch.bmm(Rd, KB.transpose(1, 2)).masked_fill_(~incl2, 0.0)   # [A_rk | A_rb]
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    rhs = torch.cat([torch.bmm(A_ak, vc), Q], -1)
    sol = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)
    U, W = sol[..., :N], sol[..., N:]                         # v~ = U + W X0
    VU = torch.cat([vc, U], 1)                                # (Z, 2L, N)
    y_loc = torch.bmm(RKB, VU)                                # A_rk V + A_rb U
    P = torch.baddbmm(Rd, RKB[:, :, L:], W)                   # y = y_loc + P X0
    esuf = torch.exp(Gsuf)
    Bl = bc * esuf
    KBl = torch.cat([kc * esuf, Bl], 1)
    Cst = torch.bmm(KBl.transpose(1, 2), VU)                  # Kl^T V + Bl^T U  (Z,K,V)
    M = torch.bmm(Bl.transpose(1, 2), W)
    M.diagonal(dim1=-2, dim2=-1).add_(torch.exp(Glast))       # diag(e^{G_last}) + Bl^T W
    BH = B * H
    Xs, X_out = _scan(M.view(BH, nc, N, N), Cst.view(BH, nc, N, N),
                      S.reshape(BH, N, N).transpose(1, 2), diag=False)
    y = torch.baddbmm(y_loc, P, Xs)
    return _unpack(y, B, H, nc, T), X_out.transpose(1, 2).reshape(B, H, N, N)


# ------------------------------------------------------------------------------------------ v4
def wkv4_chunked(w, u, k, v, state, chunk: int = 16):
    """Same contract as ops.naive.wkv4_naive. Per channel, stabilised by the running maximum of
    the exponents (the max-shift trick applied to a whole chunk)."""
    aa, bb, pp = state
    B, T, A = k.shape
    w = w.clamp(max=_decay_cap(w.dtype))   # w * (chunk distances) stays finite: no 0 * inf, no inf - inf
    L = min(chunk, T)
    nc = (T + L - 1) // L
    pad = nc * L - T
    neg_inf = float("-inf")
    kc = torch.nn.functional.pad(k, (0, 0, 0, pad), value=neg_inf) if pad else k
    vc = torch.nn.functional.pad(v, (0, 0, 0, pad)) if pad else v
    kc = kc.reshape(B, nc, L, A)
    vc = vc.reshape(B, nc, L, A)
    tt = torch.arange(L, dtype=k.dtype, device=k.device)
    # true chunk lengths (the last chunk may be short: padding must not decay the state)
    lens = torch.full((nc,), float(L), dtype=k.dtype, device=k.device)
    lens[-1] = T - (nc - 1) * L
    # chunk-local sums: exponent of token i at the end of the chunk: k_i - (len-1-i) w
    e_end = kc - (lens.view(1, nc, 1, 1) - 1 - tt.view(1, 1, L, 1)) * w
    p_loc = e_end.max(2).values                                        # (B,nc,A)
    p_loc_safe = torch.where(torch.isfinite(p_loc), p_loc, torch.zeros_like(p_loc))
    x = torch.exp(e_end - p_loc_safe.unsqueeze(2))
    a_loc = (x * vc).sum(2)
    b_loc = x.sum(2)
    # scan the (aa, bb, pp) state over chunks; decay over a chunk is e^{-L w}
    starts = []
    for c in range(nc):
        p0 = torch.where(bb > 0, pp, torch.full_like(pp, neg_inf))
        starts.append((aa, bb, p0))
        pd = p0 - lens[c] * w
        q = torch.maximum(pd, p_loc[:, c])
        q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
        e1 = torch.exp(pd - q)
        e2 = torch.exp(p_loc[:, c] - q)
        aa = e1 * aa + e2 * a_loc[:, c]
        bb = e1 * bb + e2 * b_loc[:, c]
        pp = q
    a0 = torch.stack([s[0] for s in starts], 1)                       # (B,nc,A)
    b0 = torch.stack([s[1] for s in starts], 1)
    p0 = torch.stack([s[2] for s in starts], 1)
    # outputs: exponents over [state, tokens i < t, token t (bonus)]
    ti = tt.view(L, 1)
    ii = tt.view(1, L)
    dist = (ti - 1 - ii).view(1, 1, L, L, 1)                           # t-1-i
    e_tok = kc.unsqueeze(2) - dist * w                                 # (B,nc,t,i,A)
    mask = (ii < ti).view(1, 1, L, L, 1)
    e_tok = e_tok.masked_fill(~mask, neg_inf)
    e_bonus = u + kc                                                   # (B,nc,t,A)
    e_state = p0.unsqueeze(2) - tt.view(1, 1, L, 1) * w                # (B,nc,t,A)
    m = torch.maximum(torch.maximum(e_tok.max(3).values, e_bonus), e_state)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    xt = torch.exp(e_tok - m.unsqueeze(3))
    xb = torch.exp(e_bonus - m)
    xs = torch.exp(e_state - m)
    num = (xt * vc.unsqueeze(2)).sum(3) + xb * vc + xs * a0.unsqueeze(2)
    den = xt.sum(3) + xb + xs * b0.unsqueeze(2)
    y = (num / den).reshape(B, nc * L, A)[:, :T]
    return y, (aa, bb, pp)
