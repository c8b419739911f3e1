// Shared definitions for the rwkvtools WKV kernels.
//
// Every kernel's per-thread work lives in the headers wkv4.h, wkv_diag.h and wkv7.h as
// RWKV_HD (= __host__ __device__) functions.  The CUDA kernels in wkv_cuda.cu call them from
// one block per (batch, head) and one thread per value channel; the CPU harness
// (cpu_harness.cpp, built with the system C++ compiler, no CUDA needed) calls the very same
// functions over the same grid, phase by phase, so the kernels' arithmetic is tested on
// machines without a GPU.
//
// This header must compile both with nvcc and with a plain C++ compiler: nothing from the CUDA
// runtime is used here.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RWKV_HD __host__ __device__ __forceinline__
#else
#define RWKV_HD inline
#endif

// Unroll the loops over the head size in device code (N is a compile-time constant there).
#if defined(__CUDA_ARCH__)
#define RWKV_UNROLL _Pragma("unroll")
#else
#define RWKV_UNROLL
#endif

namespace rwkv {

// Steps between the v7 state checkpoints written by the training forward and read back by the
// backward (which recomputes the states inside a chunk from its checkpoint).
constexpr int V7_CHUNK = 16;

// Conversion between the storage type of activations (float, half, bfloat16) and the fp32 used
// for all arithmetic.  The default works for float and for types with float conversions (the
// CPU harness uses c10::Half / c10::BFloat16); wkv_cuda.cu specialises it for __half and
// __nv_bfloat16 with the CUDA intrinsics.
template <typename T>
struct Cvt {
    static RWKV_HD float load(T x) { return static_cast<float>(x); }
    static RWKV_HD T store(float x) { return static_cast<T>(x); }
};

// Head sizes with compiled instances (thread count of the diag and v7 blocks).  A call with
// another head size is refused by the binding and ops/cuda.py falls back to PyTorch.
#define RWKV_FOR_HEAD_SIZES(X) X(8) X(16) X(32) X(64) X(128)

// Storage types of activations, as numbered by the bindings.
enum DTypeCode { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Flat index of element (b, t, h, n) in a contiguous (B, T, H, N) tensor.
RWKV_HD int64_t idx_bthn(int64_t b, int64_t t, int64_t h, int64_t n, int64_t T, int64_t H, int64_t N) {
    return ((b * T + t) * H + h) * N + n;
}

}  // namespace rwkv
