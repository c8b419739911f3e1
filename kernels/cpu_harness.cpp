// CPU harness for the WKV kernels: runs the kernels' per-thread functions (wkv4.h, wkv_diag.h,
// wkv7.h) on the CPU over the same grid as wkv_cuda.cu, phase by phase: for each block
// (batch, head), every "thread" runs one phase before any thread starts the next, which is
// what the kernel's __syncthreads() barriers guarantee on the GPU.  Built with the system C++
// compiler by rwkvtools/ops/cpu_harness.py (torch's extension loader; no CUDA needed) and
// tested against ops/naive.py in tests/test_kernels.py.  Storage types float32, float16 and
// bfloat16 (c10::Half / c10::BFloat16 round to nearest even, like the CUDA intrinsics).
#include <vector>

#include "wkv_binding.h"

namespace {

using namespace rwkv;

template <typename T>
void cpu_wkv4(const Wkv4Args<T>& p) {
    for (int b = 0; b < p.B; ++b)
        for (int c = 0; c < p.C; ++c) wkv4_thread<T>(p, b, c);
}

// The forward scans follow the CUDA kernels' double-buffered schedule: load step 0; then per
// step t (after the barrier): load step t+1 into the other buffer, run step t.
template <typename T, int N>
void cpu_diag(const DiagArgs<T>& p) {
    std::vector<float> state((size_t)N * N);  // thread j's registers: state[j*N .. j*N+N)
    for (int bh = 0; bh < p.B * p.H; ++bh) {
        DiagShared<N> sh[2];
        float u[N];
        for (int j = 0; j < N; ++j) diag_init<T, N>(p, bh, j, &state[(size_t)j * N], u);
        if (p.Tlen > 0)
            for (int j = 0; j < N; ++j) diag_load<T, N>(p, bh, 0, j, sh[0]);
        for (int t = 0; t < p.Tlen; ++t) {
            if (t + 1 < p.Tlen)
                for (int j = 0; j < N; ++j) diag_load<T, N>(p, bh, t + 1, j, sh[(t + 1) & 1]);
            for (int j = 0; j < N; ++j) diag_step<T, N>(p, bh, t, j, sh[t & 1], u, &state[(size_t)j * N]);
        }
        for (int j = 0; j < N; ++j) diag_finish<T, N>(p, bh, j, &state[(size_t)j * N]);
    }
}

template <typename T, int N>
void cpu_v7_fwd(const V7FwdArgs<T>& p) {
    std::vector<float> state((size_t)N * N);
    for (int bh = 0; bh < p.B * p.H; ++bh) {
        V7Shared<N> sh[2];
        for (int i = 0; i < N; ++i) v7_init<T, N>(p, bh, i, &state[(size_t)i * N]);
        if (p.Tlen > 0)
            for (int i = 0; i < N; ++i) v7_load<T, N>(p, bh, 0, i, sh[0]);
        for (int t = 0; t < p.Tlen; ++t) {
            if (t + 1 < p.Tlen)
                for (int i = 0; i < N; ++i) v7_load<T, N>(p, bh, t + 1, i, sh[(t + 1) & 1]);
            for (int i = 0; i < N; ++i) v7_step<T, N>(p, bh, t, i, sh[t & 1], &state[(size_t)i * N]);
        }
        for (int i = 0; i < N; ++i) v7_finish<T, N>(p, bh, i, &state[(size_t)i * N]);
    }
}

template <typename T, int N>
void cpu_v7_bwd(const V7BwdArgs<T>& p) {
    const size_t HN = (size_t)(V7_CHUNK + 1) * N;
    std::vector<float> dsr((size_t)N * N), dsc((size_t)N * N), hist(HN * N);  // per-thread arrays
    for (int bh = 0; bh < p.B * p.H; ++bh) {
        V7BwdShared<N> sh;
        for (int i = 0; i < N; ++i) v7b_init<T, N>(p, bh, i, &dsr[(size_t)i * N], &dsc[(size_t)i * N]);
        for (int c = v7_num_chunks(p.Tlen) - 1; c >= 0; --c) {
            const int t0 = c * V7_CHUNK;
            const int L = p.Tlen - t0 < V7_CHUNK ? p.Tlen - t0 : V7_CHUNK;
            for (int i = 0; i < N; ++i) v7b_chunk_begin<T, N>(p, bh, c, i, &hist[i * HN]);
            for (int s = 0; s < L; ++s) {
                for (int i = 0; i < N; ++i) v7b_recompute_load<T, N>(p, bh, t0 + s, i, sh);
                for (int i = 0; i < N; ++i)
                    v7b_recompute_step<T, N>(p, bh, t0 + s, i, sh, &hist[i * HN + s * N], &hist[i * HN + (s + 1) * N]);
            }
            for (int s = L - 1; s >= 0; --s) {
                for (int i = 0; i < N; ++i) v7b_load<T, N>(p, bh, t0 + s, i, sh);
                for (int i = 0; i < N; ++i)
                    v7b_phase_a<T, N>(p, bh, t0 + s, i, sh, &hist[i * HN + s * N], &hist[i * HN + (s + 1) * N],
                                      &dsr[(size_t)i * N], &dsc[(size_t)i * N]);
                for (int i = 0; i < N; ++i)
                    v7b_phase_b<T, N>(p, bh, t0 + s, i, sh, &hist[i * HN + s * N], &dsr[(size_t)i * N],
                                      &dsc[(size_t)i * N]);
            }
        }
        for (int i = 0; i < N; ++i) v7b_finish<T, N>(p, bh, i, &dsr[(size_t)i * N]);
    }
}

// Storage type by code, then head size by value: the same dispatch as the CUDA launchers.
template <template <typename, int> class K, class Args>
const char* dispatch(int dt, int N, const Args& p) {
#define RWKV_CASE(NN)                                                              \
    if (N == NN) {                                                                 \
        if (dt == kF32) return K<float, NN>::run(retype<float>(p));                \
        if (dt == kF16) return K<c10::Half, NN>::run(retype<c10::Half>(p));        \
        if (dt == kBF16) return K<c10::BFloat16, NN>::run(retype<c10::BFloat16>(p)); \
        return "unsupported dtype";                                                \
    }
    RWKV_FOR_HEAD_SIZES(RWKV_CASE)
#undef RWKV_CASE
    return "unsupported head size";
}

template <typename T, int N> struct DiagK { static const char* run(const DiagArgs<T>& p) { cpu_diag<T, N>(p); return nullptr; } };
template <typename T, int N> struct V7FwdK { static const char* run(const V7FwdArgs<T>& p) { cpu_v7_fwd<T, N>(p); return nullptr; } };
template <typename T, int N> struct V7BwdK { static const char* run(const V7BwdArgs<T>& p) { cpu_v7_bwd<T, N>(p); return nullptr; } };

struct CpuRunner {
    static bool device_ok(const at::Tensor& x) { return x.is_cpu(); }
    static const char* name() { return "CPU harness"; }
    static const char* wkv4(int dt, const Wkv4Args<void>& p, int64_t) {
        if (dt == kF32) cpu_wkv4(retype<float>(p));
        else if (dt == kF16) cpu_wkv4(retype<c10::Half>(p));
        else if (dt == kBF16) cpu_wkv4(retype<c10::BFloat16>(p));
        else return "unsupported dtype";
        return nullptr;
    }
    static const char* wkv_diag(int dt, int N, const DiagArgs<void>& p, int64_t) { return dispatch<DiagK>(dt, N, p); }
    static const char* wkv7_fwd(int dt, int N, const V7FwdArgs<void>& p, int64_t) { return dispatch<V7FwdK>(dt, N, p); }
    static const char* wkv7_bwd(int dt, int N, const V7BwdArgs<void>& p, int64_t) { return dispatch<V7BwdK>(dt, N, p); }
};

}  // namespace

TORCH_LIBRARY(rwkvtools_cpu, m) { rwkv::define_wkv_ops<CpuRunner>(m); }
