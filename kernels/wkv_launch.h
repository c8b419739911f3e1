// Host entry points of the CUDA kernels (defined in wkv_cuda.cu).  Nothing here needs torch or
// the CUDA headers, so the torch binding compiles with the host compiler alone.
#pragma once

#include "wkv4.h"
#include "wkv7.h"
#include "wkv_diag.h"

namespace rwkv {

// dtype: a DTypeCode (storage type of the activations); N: head size; stream: a cudaStream_t.
// Each returns nullptr on success, else a message (unsupported head size, CUDA launch error).
const char* launch_wkv4(int dtype, const Wkv4Args<void>& p, void* stream);
const char* launch_wkv_diag(int dtype, int N, const DiagArgs<void>& p, void* stream);
const char* launch_wkv7_fwd(int dtype, int N, const V7FwdArgs<void>& p, void* stream);
const char* launch_wkv7_bwd(int dtype, int N, const V7BwdArgs<void>& p, void* stream);

}  // namespace rwkv
