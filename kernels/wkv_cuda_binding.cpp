// Operators torch.ops.rwkvtools_cuda.* of the CUDA WKV kernels (built by rwkvtools/ops/cuda.py with torch's extension
// loader, together with wkv_cuda.cu).  The torch side is shared with the CPU harness.
#include "wkv_binding.h"
#include "wkv_launch.h"

namespace {

struct CudaRunner {
    static bool device_ok(const at::Tensor& x) { return x.is_cuda(); }
    static const char* name() { return "CUDA"; }
    static const char* wkv4(int dt, const rwkv::Wkv4Args<void>& p, int64_t stream) {
        return rwkv::launch_wkv4(dt, p, reinterpret_cast<void*>(stream));
    }
    static const char* wkv_diag(int dt, int N, const rwkv::DiagArgs<void>& p, int64_t stream) {
        return rwkv::launch_wkv_diag(dt, N, p, reinterpret_cast<void*>(stream));
    }
    static const char* wkv7_fwd(int dt, int N, const rwkv::V7FwdArgs<void>& p, int64_t stream) {
        return rwkv::launch_wkv7_fwd(dt, N, p, reinterpret_cast<void*>(stream));
    }
    static const char* wkv7_bwd(int dt, int N, const rwkv::V7BwdArgs<void>& p, int64_t stream) {
        return rwkv::launch_wkv7_bwd(dt, N, p, reinterpret_cast<void*>(stream));
    }
};

}  // namespace

TORCH_LIBRARY(rwkvtools_cuda, m) { rwkv::define_wkv_ops<CudaRunner>(m); }
