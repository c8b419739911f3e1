// CUDA WKV kernels for RWKV v4, v5 (all layouts), v6 and v7 (forward and backward).
//
// The per-thread work is in wkv4.h / wkv_diag.h / wkv7.h (shared with the CPU harness); this
// file only arranges it on the GPU: the grid, shared memory, the barriers between the phases,
// and the storage-type conversions for half and bfloat16.  Torch-free: compiled with
// `nvcc -c` in CI (.ci/check_kernels.sh) and by torch's extension loader on a GPU machine.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "wkv_launch.h"

namespace rwkv {

template <>
struct Cvt<__half> {
    static __host__ __device__ __forceinline__ float load(__half x) { return __half2float(x); }
    static __host__ __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Cvt<__nv_bfloat16> {
    static __host__ __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __host__ __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// ------------------------------------------------------------------------------------ kernels
template <typename T>
__global__ void k_wkv4(Wkv4Args<T> p) {
    const int64_t id = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (int64_t)p.B * p.C) return;
    wkv4_thread<T>(p, (int)(id / p.C), (int)(id % p.C));
}

// Forward scans: the shared vectors of step t+1 are loaded into the other half of a double
// buffer while step t runs, so one barrier per step suffices: at the barrier of step t, every
// thread has finished step t-1 (the last reader of buffer (t+1)%2) and loaded step t.
template <typename T, int N>
__global__ void __launch_bounds__(N) k_wkv_diag(DiagArgs<T> p) {
    __shared__ DiagShared<N> sh[2];
    __shared__ float u[N];
    float s[N];
    const int bh = blockIdx.x, j = threadIdx.x;
    diag_init<T, N>(p, bh, j, s, u);
    if (p.Tlen > 0) diag_load<T, N>(p, bh, 0, j, sh[0]);
    for (int t = 0; t < p.Tlen; ++t) {
        __syncthreads();
        if (t + 1 < p.Tlen) diag_load<T, N>(p, bh, t + 1, j, sh[(t + 1) & 1]);
        diag_step<T, N>(p, bh, t, j, sh[t & 1], u, s);
    }
    diag_finish<T, N>(p, bh, j, s);
}

template <typename T, int N>
__global__ void __launch_bounds__(N) k_wkv7_fwd(V7FwdArgs<T> p) {
    __shared__ V7Shared<N> sh[2];
    float s[N];
    const int bh = blockIdx.x, i = threadIdx.x;
    v7_init<T, N>(p, bh, i, s);
    if (p.Tlen > 0) v7_load<T, N>(p, bh, 0, i, sh[0]);
    for (int t = 0; t < p.Tlen; ++t) {
        __syncthreads();
        if (t + 1 < p.Tlen) v7_load<T, N>(p, bh, t + 1, i, sh[(t + 1) & 1]);
        v7_step<T, N>(p, bh, t, i, sh[t & 1], s);
    }
    v7_finish<T, N>(p, bh, i, s);
}

template <typename T, int N>
__global__ void __launch_bounds__(N) k_wkv7_bwd(V7BwdArgs<T> p) {
    __shared__ V7BwdShared<N> sh;
    float dsr[N], dsc[N];
    float hist[(V7_CHUNK + 1) * N];  // columns of S_{t0-1} .. S_{t0+L-1} (local memory)
    const int bh = blockIdx.x, i = threadIdx.x;
    v7b_init<T, N>(p, bh, i, dsr, dsc);
    for (int c = v7_num_chunks(p.Tlen) - 1; c >= 0; --c) {
        const int t0 = c * V7_CHUNK;
        const int L = min(V7_CHUNK, p.Tlen - t0);
        v7b_chunk_begin<T, N>(p, bh, c, i, hist);
        for (int s = 0; s < L; ++s) {
            __syncthreads();
            v7b_recompute_load<T, N>(p, bh, t0 + s, i, sh);
            __syncthreads();
            v7b_recompute_step<T, N>(p, bh, t0 + s, i, sh, hist + s * N, hist + (s + 1) * N);
        }
        for (int s = L - 1; s >= 0; --s) {
            __syncthreads();
            v7b_load<T, N>(p, bh, t0 + s, i, sh);
            __syncthreads();
            v7b_phase_a<T, N>(p, bh, t0 + s, i, sh, hist + s * N, hist + (s + 1) * N, dsr, dsc);
            __syncthreads();  // phase B reads every thread's dsa
            v7b_phase_b<T, N>(p, bh, t0 + s, i, sh, hist + s * N, dsr, dsc);
        }
    }
    v7b_finish<T, N>(p, bh, i, dsr);
}

// ---------------------------------------------------------------------------------- launchers
static const char* last_error() {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename T>
static const char* run_wkv4(const Wkv4Args<void>& p, cudaStream_t st) {
    const int64_t n = (int64_t)p.B * p.C;
    if (n == 0) return nullptr;
    const int threads = 128;
    k_wkv4<T><<<(unsigned)((n + threads - 1) / threads), threads, 0, st>>>(retype<T>(p));
    return last_error();
}

const char* launch_wkv4(int dtype, const Wkv4Args<void>& p, void* stream) {
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case kF32: return run_wkv4<float>(p, st);
        case kF16: return run_wkv4<__half>(p, st);
        case kBF16: return run_wkv4<__nv_bfloat16>(p, st);
    }
    return "wkv4: unsupported dtype";
}

#define RWKV_DTYPE_SWITCH(FN, ...)                                  \
    switch (dtype) {                                                \
        case kF32: return FN<float>(__VA_ARGS__);                   \
        case kF16: return FN<__half>(__VA_ARGS__);                  \
        case kBF16: return FN<__nv_bfloat16>(__VA_ARGS__);          \
    }                                                               \
    return "unsupported dtype";

template <typename T>
static const char* run_wkv_diag(int N, const DiagArgs<void>& p, cudaStream_t st) {
    const unsigned blocks = (unsigned)((int64_t)p.B * p.H);
    if (blocks == 0) return nullptr;
#define RWKV_CASE(NN) \
    if (N == NN) { k_wkv_diag<T, NN><<<blocks, NN, 0, st>>>(retype<T>(p)); return last_error(); }
    RWKV_FOR_HEAD_SIZES(RWKV_CASE)
#undef RWKV_CASE
    return "wkv_diag: unsupported head size";
}

template <typename T>
static const char* run_wkv7_fwd(int N, const V7FwdArgs<void>& p, cudaStream_t st) {
    const unsigned blocks = (unsigned)((int64_t)p.B * p.H);
    if (blocks == 0) return nullptr;
#define RWKV_CASE(NN) \
    if (N == NN) { k_wkv7_fwd<T, NN><<<blocks, NN, 0, st>>>(retype<T>(p)); return last_error(); }
    RWKV_FOR_HEAD_SIZES(RWKV_CASE)
#undef RWKV_CASE
    return "wkv7: unsupported head size";
}

template <typename T>
static const char* run_wkv7_bwd(int N, const V7BwdArgs<void>& p, cudaStream_t st) {
    const unsigned blocks = (unsigned)((int64_t)p.B * p.H);
    if (blocks == 0) return nullptr;
#define RWKV_CASE(NN) \
    if (N == NN) { k_wkv7_bwd<T, NN><<<blocks, NN, 0, st>>>(retype<T>(p)); return last_error(); }
    RWKV_FOR_HEAD_SIZES(RWKV_CASE)
#undef RWKV_CASE
    return "wkv7 backward: unsupported head size";
}

const char* launch_wkv_diag(int dtype, int N, const DiagArgs<void>& p, void* stream) {
    RWKV_DTYPE_SWITCH(run_wkv_diag, N, p, static_cast<cudaStream_t>(stream))
}

const char* launch_wkv7_fwd(int dtype, int N, const V7FwdArgs<void>& p, void* stream) {
    RWKV_DTYPE_SWITCH(run_wkv7_fwd, N, p, static_cast<cudaStream_t>(stream))
}

const char* launch_wkv7_bwd(int dtype, int N, const V7BwdArgs<void>& p, void* stream) {
    RWKV_DTYPE_SWITCH(run_wkv7_bwd, N, p, static_cast<cudaStream_t>(stream))
}

}  // namespace rwkv
