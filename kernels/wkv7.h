// RWKV-7 WKV (diagonal + rank-1 transition), per-thread work: forward and backward.
//
// Contract (ops/naive.py wkv7_naive), per (batch, head), state S value-major (N_v, N_k) as the
// official code:
//     sa_t = S_{t-1} a_t
//     S_t  = S_{t-1} diag(e^{g_t}) + sa_t b_t^T + v_t k_t^T
//     y_t  = S_t r_t                      (reads the new state)
// g is the log-decay (B, T, H, N); the model passes a = -kappa_hat, b = kappa_hat * iclr.
//
// Forward grid: one block per (batch, head), N threads; thread i owns value channel i and keeps
// the state row S[i, :] in registers.  Per step: "load" (thread i puts r, e^g, k, a, b of key
// channel i into shared memory), then "step" (thread i updates its row and writes y_t[i]); the
// CUDA kernel double-buffers the shared vectors (one barrier per step).
// The training forward also writes sa_t (fp32) and the state before every V7_CHUNK-th step.
//
// Backward grid: the same blocks; thread i now owns COLUMN i of S (needed for dr, dg, da) and
// both row i and column i of dS, so every gradient is a per-thread dot product with vectors in
// shared memory (no cross-thread reductions).  Chunks are processed last to first: the columns
// S_{t0-1} .. S_{t0+L-1} of a chunk are recomputed forward from its checkpoint (the same
// expression as the forward, with the saved sa; no division by the decay), then the steps of
// the chunk run backwards:
//     dS_t += dy_t r_t^T
//     dr_t = S_t^T dy_t ; dv_t = dS_t k_t ; dk_t = dS_t^T v_t
//     dsa_t = dS_t b_t ; db_t = dS_t^T sa_t ; dg_t = e^{g_t} (diag of S_{t-1}^T dS_t)
//     da_t = S_{t-1}^T dsa_t ; dS_{t-1} = dS_t diag(e^{g_t}) + dsa_t a_t^T
// All arithmetic, states and their gradients are fp32.
#pragma once

#include "wkv_common.h"

namespace rwkv {

RWKV_HD int v7_num_chunks(int T) { return (T + V7_CHUNK - 1) / V7_CHUNK; }

template <typename T>
struct V7FwdArgs {
    int B, Tlen, H;
    const T* r;          // (B, T, H, N)
    const float* g;      // (B, T, H, N) log-decay
    const T* k;
    const T* v;
    const T* a;
    const T* b;
    const float* s_in;   // (B, H, N, N) value-major
    T* y;                // (B, T, H, N)
    float* s_out;        // (B, H, N, N); may alias s_in
    float* sa;           // (B, T, H, N) or nullptr: S_{t-1} a_t for the backward
    float* ckpt;         // (B, H, num_chunks, N, N) or nullptr: state before step c*V7_CHUNK
};

template <int N>
struct V7Shared {
    float r[N], w[N], k[N], a[N], b[N];
};

template <typename T, int N>
RWKV_HD void v7_init(const V7FwdArgs<T>& p, int bh, int i, float* s) {
    const float* S = p.s_in + ((int64_t)bh * N + i) * N;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) s[j] = S[j];
}

template <typename T, int N>
RWKV_HD void v7_load(const V7FwdArgs<T>& p, int bh, int t, int i, V7Shared<N>& sh) {
    const int64_t o = idx_bthn(bh / p.H, t, bh % p.H, i, p.Tlen, p.H, N);
    sh.r[i] = Cvt<T>::load(p.r[o]);
    sh.w[i] = expf(p.g[o]);
    sh.k[i] = Cvt<T>::load(p.k[o]);
    sh.a[i] = Cvt<T>::load(p.a[o]);
    sh.b[i] = Cvt<T>::load(p.b[o]);
}

template <typename T, int N>
RWKV_HD void v7_step(const V7FwdArgs<T>& p, int bh, int t, int i, const V7Shared<N>& sh, float* s) {
    const int64_t o = idx_bthn(bh / p.H, t, bh % p.H, i, p.Tlen, p.H, N);
    if (p.ckpt != nullptr && t % V7_CHUNK == 0) {
        float* C = p.ckpt + (((int64_t)bh * v7_num_chunks(p.Tlen) + t / V7_CHUNK) * N + i) * N;
        RWKV_UNROLL
        for (int j = 0; j < N; ++j) C[j] = s[j];
    }
    const float vi = Cvt<T>::load(p.v[o]);
    float sa = 0.f;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) sa += s[j] * sh.a[j];
    if (p.sa != nullptr) p.sa[o] = sa;
    float y = 0.f;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) {
        s[j] = s[j] * sh.w[j] + sa * sh.b[j] + vi * sh.k[j];
        y += s[j] * sh.r[j];
    }
    p.y[o] = Cvt<T>::store(y);
}

template <typename T, int N>
RWKV_HD void v7_finish(const V7FwdArgs<T>& p, int bh, int i, const float* s) {
    float* S = p.s_out + ((int64_t)bh * N + i) * N;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) S[j] = s[j];
}

// ------------------------------------------------------------------------------- backward
template <typename T>
struct V7BwdArgs {
    int B, Tlen, H;
    const T* r;            // (B, T, H, N), as given to the forward
    const float* g;
    const T* k;
    const T* v;
    const T* a;
    const T* b;
    const float* sa;       // (B, T, H, N) from the training forward
    const float* ckpt;     // (B, H, num_chunks, N, N) from the training forward
    const T* dy;           // (B, T, H, N)
    const float* ds_out;   // (B, H, N, N) gradient of the final state (value-major)
    T* dr;                 // (B, T, H, N)
    float* dg;             // (B, T, H, N)
    T* dk;
    T* dv;
    T* da;
    T* db;
    float* ds_in;          // (B, H, N, N) gradient of the initial state
};

template <int N>
struct V7BwdShared {
    float r[N], w[N], k[N], v[N], a[N], b[N], sa[N], dy[N], dsa[N];
};

// Thread i: dS row i (dsr) and column i (dsc) from the gradient of the final state.
template <typename T, int N>
RWKV_HD void v7b_init(const V7BwdArgs<T>& p, int bh, int i, float* dsr, float* dsc) {
    const float* D = p.ds_out + (int64_t)bh * N * N;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) {
        dsr[j] = D[i * N + j];
        dsc[j] = D[j * N + i];
    }
}

// Start of chunk c: hist[0..N) = column i of the state entering the chunk.
template <typename T, int N>
RWKV_HD void v7b_chunk_begin(const V7BwdArgs<T>& p, int bh, int c, int i, float* hist) {
    const float* C = p.ckpt + ((int64_t)bh * v7_num_chunks(p.Tlen) + c) * N * N;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) hist[j] = C[j * N + i];
}

// Recompute phase "load" of step t: sa_t[i] and v_t[i] into shared memory.
template <typename T, int N>
RWKV_HD void v7b_recompute_load(const V7BwdArgs<T>& p, int bh, int t, int i, V7BwdShared<N>& sh) {
    const int64_t o = idx_bthn(bh / p.H, t, bh % p.H, i, p.Tlen, p.H, N);
    sh.sa[i] = p.sa[o];
    sh.v[i] = Cvt<T>::load(p.v[o]);
}

// Recompute phase "step": column i of S_t from column i of S_{t-1} (prev -> cur).
template <typename T, int N>
RWKV_HD void v7b_recompute_step(const V7BwdArgs<T>& p, int bh, int t, int i, const V7BwdShared<N>& sh,
                                const float* prev, float* cur) {
    const int64_t o = idx_bthn(bh / p.H, t, bh % p.H, i, p.Tlen, p.H, N);
    const float wi = expf(p.g[o]);
    const float bi = Cvt<T>::load(p.b[o]);
    const float ki = Cvt<T>::load(p.k[o]);
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) cur[j] = prev[j] * wi + sh.sa[j] * bi + sh.v[j] * ki;
}

// Backward phase "load" of step t.
template <typename T, int N>
RWKV_HD void v7b_load(const V7BwdArgs<T>& p, int bh, int t, int i, V7BwdShared<N>& sh) {
    const int64_t o = idx_bthn(bh / p.H, t, bh % p.H, i, p.Tlen, p.H, N);
    sh.r[i] = Cvt<T>::load(p.r[o]);
    sh.w[i] = expf(p.g[o]);
    sh.k[i] = Cvt<T>::load(p.k[o]);
    sh.v[i] = Cvt<T>::load(p.v[o]);
    sh.a[i] = Cvt<T>::load(p.a[o]);
    sh.b[i] = Cvt<T>::load(p.b[o]);
    sh.sa[i] = p.sa[o];
    sh.dy[i] = Cvt<T>::load(p.dy[o]);
}

// Backward phase A of step t: add dy_t r_t^T to dS_t, then dr, dv, dk, db, dg of channel i and
// dsa_t[i] (into shared memory for phase B).  prev / cur = column i of S_{t-1} / S_t.
template <typename T, int N>
RWKV_HD void v7b_phase_a(const V7BwdArgs<T>& p, int bh, int t, int i, V7BwdShared<N>& sh,
                         const float* prev, const float* cur, float* dsr, float* dsc) {
    const int64_t o = idx_bthn(bh / p.H, t, bh % p.H, i, p.Tlen, p.H, N);
    const float dyi = sh.dy[i], ri = sh.r[i];
    float dr = 0.f, dv = 0.f, dk = 0.f, dsa = 0.f, db = 0.f, dw = 0.f;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) {
        dsr[j] += dyi * sh.r[j];
        dsc[j] += sh.dy[j] * ri;
        dr += cur[j] * sh.dy[j];
        dv += dsr[j] * sh.k[j];
        dsa += dsr[j] * sh.b[j];
        dk += dsc[j] * sh.v[j];
        db += dsc[j] * sh.sa[j];
        dw += dsc[j] * prev[j];
    }
    sh.dsa[i] = dsa;
    p.dr[o] = Cvt<T>::store(dr);
    p.dv[o] = Cvt<T>::store(dv);
    p.dk[o] = Cvt<T>::store(dk);
    p.db[o] = Cvt<T>::store(db);
    p.dg[o] = dw * sh.w[i];
}

// Backward phase B of step t (after every thread's phase A): da_t[i] and dS_{t-1}.
template <typename T, int N>
RWKV_HD void v7b_phase_b(const V7BwdArgs<T>& p, int bh, int t, int i, const V7BwdShared<N>& sh,
                         const float* prev, float* dsr, float* dsc) {
    const int64_t o = idx_bthn(bh / p.H, t, bh % p.H, i, p.Tlen, p.H, N);
    const float wi = sh.w[i], ai = sh.a[i], dsai = sh.dsa[i];
    float da = 0.f;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) {
        da += prev[j] * sh.dsa[j];
        dsr[j] = dsr[j] * sh.w[j] + dsai * sh.a[j];
        dsc[j] = dsc[j] * wi + sh.dsa[j] * ai;
    }
    p.da[o] = Cvt<T>::store(da);
}

template <typename T, int N>
RWKV_HD void v7b_finish(const V7BwdArgs<T>& p, int bh, int i, const float* dsr) {
    float* D = p.ds_in + ((int64_t)bh * N + i) * N;
    RWKV_UNROLL
    for (int j = 0; j < N; ++j) D[j] = dsr[j];
}

template <typename T>
inline V7FwdArgs<T> retype(const V7FwdArgs<void>& p) {
    V7FwdArgs<T> q;
    q.B = p.B; q.Tlen = p.Tlen; q.H = p.H;
    q.r = static_cast<const T*>(p.r); q.g = p.g; q.k = static_cast<const T*>(p.k);
    q.v = static_cast<const T*>(p.v); q.a = static_cast<const T*>(p.a); q.b = static_cast<const T*>(p.b);
    q.s_in = p.s_in; q.y = static_cast<T*>(p.y); q.s_out = p.s_out; q.sa = p.sa; q.ckpt = p.ckpt;
    return q;
}

template <typename T>
inline V7BwdArgs<T> retype(const V7BwdArgs<void>& p) {
    V7BwdArgs<T> q;
    q.B = p.B; q.Tlen = p.Tlen; q.H = p.H;
    q.r = static_cast<const T*>(p.r); q.g = p.g; q.k = static_cast<const T*>(p.k);
    q.v = static_cast<const T*>(p.v); q.a = static_cast<const T*>(p.a); q.b = static_cast<const T*>(p.b);
    q.sa = p.sa; q.ckpt = p.ckpt; q.dy = static_cast<const T*>(p.dy); q.ds_out = p.ds_out;
    q.dr = static_cast<T*>(p.dr); q.dg = p.dg; q.dk = static_cast<T*>(p.dk); q.dv = static_cast<T*>(p.dv);
    q.da = static_cast<T*>(p.da); q.db = static_cast<T*>(p.db); q.ds_in = p.ds_in;
    return q;
}

}  // namespace rwkv
