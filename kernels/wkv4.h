// RWKV-4 WKV, per-thread work.  One thread owns one (batch, channel) pair and scans T.
//
// Contract (ops/naive.py wkv4_naive): w = exp(time_decay) > 0 (per-step log-decay -w),
// u = time_first (log-space bonus of the current token), state (aa, bb, pp) with the true
// numerator aa*e^pp and denominator bb*e^pp; bb == 0 means the empty state whatever pp holds.
// Max-shift trick: no exponential of an unbounded quantity is ever formed.
#pragma once

#include "wkv_common.h"

namespace rwkv {

template <typename T>
struct Wkv4Args {
    int B, Tlen, C;
    const float* w;      // (C)
    const float* u;      // (C)
    const T* k;          // (B, T, C)
    const T* v;          // (B, T, C)
    const float* aa_in;  // (B, C)
    const float* bb_in;  // (B, C)
    const float* pp_in;  // (B, C)
    T* y;                // (B, T, C)
    float* aa_out;       // (B, C); may alias aa_in
    float* bb_out;
    float* pp_out;
};

// Thread (b, c): the whole scan over T for one channel.
template <typename T>
RWKV_HD void wkv4_thread(const Wkv4Args<T>& p, int b, int c) {
    const int64_t s = (int64_t)b * p.C + c;
    float aa = p.aa_in[s], bb = p.bb_in[s], pp = p.pp_in[s];
    const float w = p.w[c], u = p.u[c];
    for (int t = 0; t < p.Tlen; ++t) {
        const int64_t i = ((int64_t)b * p.Tlen + t) * p.C + c;
        const float kk = Cvt<T>::load(p.k[i]);
        const float vv = Cvt<T>::load(p.v[i]);
        const float pe = bb > 0.f ? pp : -INFINITY;  // empty state contributes nothing
        // output: (a + e^{u+k} v) / (b + e^{u+k}), both scaled by e^{-q}
        float q = fmaxf(pe, u + kk);
        float e1 = expf(pe - q);
        float e2 = expf(u + kk - q);
        p.y[i] = Cvt<T>::store((e1 * aa + e2 * vv) / (e1 * bb + e2));
        // update: a <- e^{-w} a + e^k v ; b <- e^{-w} b + e^k
        const float pd = pe - w;
        q = fmaxf(pd, kk);
        e1 = expf(pd - q);
        e2 = expf(kk - q);
        aa = e1 * aa + e2 * vv;
        bb = e1 * bb + e2;
        pp = q;
    }
    p.aa_out[s] = aa;
    p.bb_out[s] = bb;
    p.pp_out[s] = pp;
}

// The bindings fill a Wkv4Args<void> (untyped pointers); the launcher retypes it.
template <typename T>
inline Wkv4Args<T> retype(const Wkv4Args<void>& p) {
    Wkv4Args<T> q;
    q.B = p.B; q.Tlen = p.Tlen; q.C = p.C;
    q.w = p.w; q.u = p.u;
    q.k = static_cast<const T*>(p.k); q.v = static_cast<const T*>(p.v);
    q.aa_in = p.aa_in; q.bb_in = p.bb_in; q.pp_in = p.pp_in;
    q.y = static_cast<T*>(p.y);
    q.aa_out = p.aa_out; q.bb_out = p.bb_out; q.pp_out = p.pp_out;
    return q;
}

}  // namespace rwkv
