// RWKV-5 (5.0 / 5.1 / 5.2) and RWKV-6 WKV ("diag": diagonal decay), per-thread work.
//
// Contract (ops/naive.py wkv_diag_naive), per (batch, head), state S key-major (N_k, N_v):
//     y_t[j] = sum_i r_t[i] * (S[i, j] + u[i] k_t[i] v_t[j])
//     S[i, j] <- e^{g_t[i]} S[i, j] + k_t[i] v_t[j]
// g is the log-decay (<= 0): per token (B, T, H, N) for v6, constant (H, N) for v5 (5.0/5.1's
// per-head decay is broadcast over N by the caller, 5.2's is per channel).  u is the linear
// bonus (H, N).
//
// Grid: one block per (batch, head), N threads; thread j owns value channel j and keeps the
// state column S[:, j] (N floats) in registers.  Per step: every thread loads its element of
// r, k and the decay into shared memory (phase "load"), then every thread runs the step over
// the shared vectors (phase "step"); the CUDA kernel double-buffers the shared vectors so that
// the load of step t+1 and the step t share one barrier.  All arithmetic and the state are fp32.
#pragma once

#include "wkv_common.h"

namespace rwkv {

template <typename T>
struct DiagArgs {
    int B, Tlen, H;
    const T* r;            // (B, T, H, N)
    const T* k;
    const T* v;
    const float* g;        // (B, T, H, N) if g_per_token else (H, N)
    int g_per_token;
    const float* u;        // (H, N)
    const float* s_in;     // (B, H, N, N) key-major
    T* y;                  // (B, T, H, N)
    float* s_out;          // (B, H, N, N); may alias s_in
};

template <int N>
struct DiagShared {
    float r[N], k[N], w[N];
};

// Thread j of block bh: read its state column, and put its element of the bonus into the
// shared vector u (constant over the sequence).
template <typename T, int N>
RWKV_HD void diag_init(const DiagArgs<T>& p, int bh, int j, float* s, float* u) {
    const float* S = p.s_in + (int64_t)bh * N * N;
    RWKV_UNROLL
    for (int i = 0; i < N; ++i) s[i] = S[i * N + j];
    u[j] = p.u[(bh % p.H) * N + j];
}

// Phase "load" of step t: thread j puts r_t[j], k_t[j], e^{g_t[j]} into shared memory.
template <typename T, int N>
RWKV_HD void diag_load(const DiagArgs<T>& p, int bh, int t, int j, DiagShared<N>& sh) {
    const int b = bh / p.H, h = bh % p.H;
    const int64_t i = idx_bthn(b, t, h, j, p.Tlen, p.H, N);
    sh.r[j] = Cvt<T>::load(p.r[i]);
    sh.k[j] = Cvt<T>::load(p.k[i]);
    sh.w[j] = expf(p.g_per_token ? p.g[i] : p.g[h * N + j]);
}

// Phase "step" of step t for thread j: output y_t[j] from the old state, then the update.
template <typename T, int N>
RWKV_HD void diag_step(const DiagArgs<T>& p, int bh, int t, int j, const DiagShared<N>& sh, const float* u,
                       float* s) {
    const int b = bh / p.H, h = bh % p.H;
    const int64_t o = idx_bthn(b, t, h, j, p.Tlen, p.H, N);
    const float vj = Cvt<T>::load(p.v[o]);
    float y = 0.f;
    RWKV_UNROLL
    for (int i = 0; i < N; ++i) {
        const float kv = sh.k[i] * vj;
        y += sh.r[i] * (s[i] + u[i] * kv);
        s[i] = s[i] * sh.w[i] + kv;
    }
    p.y[o] = Cvt<T>::store(y);
}

template <typename T, int N>
RWKV_HD void diag_finish(const DiagArgs<T>& p, int bh, int j, const float* s) {
    float* S = p.s_out + (int64_t)bh * N * N;
    RWKV_UNROLL
    for (int i = 0; i < N; ++i) S[i * N + j] = s[i];
}

template <typename T>
inline DiagArgs<T> retype(const DiagArgs<void>& p) {
    DiagArgs<T> q;
    q.B = p.B; q.Tlen = p.Tlen; q.H = p.H;
    q.r = static_cast<const T*>(p.r); q.k = static_cast<const T*>(p.k); q.v = static_cast<const T*>(p.v);
    q.g = p.g; q.g_per_token = p.g_per_token; q.u = p.u; q.s_in = p.s_in;
    q.y = static_cast<T*>(p.y); q.s_out = p.s_out;
    return q;
}

}  // namespace rwkv
