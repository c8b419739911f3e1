// Torch side of the WKV kernels, shared by the CUDA extension (wkv_cuda_binding.cpp) and the
// CPU harness (cpu_harness.cpp): argument checks, output allocation, and the untyped argument
// structs handed to a Runner, which either launches the CUDA kernels or runs the same
// per-thread functions on the CPU.  Both libraries register the same operators (torch.ops,
// namespace rwkvtools_cuda or rwkvtools_cpu; TORCH_LIBRARY rather than a pybind11 module keeps
// the build light: no torch/extension.h):
//
//   head_sizes()                                               -> head sizes with kernels
//   wkv4(w, u, k, v, aa, bb, pp, stream)                       -> [y, aa, bb, pp]
//   wkv_diag(r, k, v, g, u, s, stream)                         -> [y, s]
//   wkv7_fwd(r, g, k, v, a, b, s, save, stream)                -> [y, s, sa, ckpt]
//   wkv7_bwd(r, g, k, v, a, b, sa, ckpt, dy, ds, stream)       -> [dr, dg, dk, dv, da, db, ds0]
//
// Layouts: activations (B, T, H, N) (v4: (B, T, C)) contiguous, all in one storage dtype
// (float32, float16 or bfloat16); log-decays g, bonus/state/decay tensors float32.  stream is a
// cudaStream_t as an integer (ignored by the CPU harness).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "wkv4.h"
#include "wkv7.h"
#include "wkv_diag.h"

namespace rwkv {

inline int dtype_code(const at::Tensor& x) {
    switch (x.scalar_type()) {
        case at::kFloat: return kF32;
        case at::kHalf: return kF16;
        case at::kBFloat16: return kBF16;
        default: TORCH_CHECK(false, "WKV kernels take float32, float16 or bfloat16 activations, got ", x.scalar_type());
    }
    return -1;
}

inline void check_like(const at::Tensor& x, const at::Tensor& ref, const char* name) {
    TORCH_CHECK(x.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", x.device());
    TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

inline void check_act(const at::Tensor& x, const at::Tensor& ref, const char* name) {
    check_like(x, ref, name);
    TORCH_CHECK(x.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), ", got ",
                x.scalar_type());
    TORCH_CHECK(x.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), ", got ", x.sizes());
}

inline void check_f32(const at::Tensor& x, const at::Tensor& ref, const char* name, at::IntArrayRef shape) {
    check_like(x, ref, name);
    TORCH_CHECK(x.scalar_type() == at::kFloat, name, " must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.sizes() == shape, name, ": expected shape ", shape, ", got ", x.sizes());
}

inline at::Tensor f32_empty(const at::Tensor& ref, at::IntArrayRef shape) {
    return at::empty(shape, ref.options().dtype(at::kFloat));
}

template <class Runner>
inline void check_device(const at::Tensor& x) {
    TORCH_CHECK(Runner::device_ok(x), Runner::name(), " WKV operators got a tensor on ", x.device());
}

inline void check_runner(const char* err) { TORCH_CHECK(err == nullptr, err == nullptr ? "" : err); }

// ---------------------------------------------------------------------------------------- v4
template <class Runner>
std::vector<at::Tensor> bind_wkv4(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v, at::Tensor aa,
                                  at::Tensor bb, at::Tensor pp, int64_t stream) {
    check_device<Runner>(k);
    TORCH_CHECK(k.dim() == 3, "k must be (B, T, C)");
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    check_act(k, k, "k");
    check_act(v, k, "v");
    check_f32(w, k, "w", {C});
    check_f32(u, k, "u", {C});
    check_f32(aa, k, "aa", {B, C});
    check_f32(bb, k, "bb", {B, C});
    check_f32(pp, k, "pp", {B, C});
    at::Tensor y = at::empty_like(k);
    at::Tensor aa2 = f32_empty(k, {B, C}), bb2 = f32_empty(k, {B, C}), pp2 = f32_empty(k, {B, C});
    Wkv4Args<void> p;
    p.B = (int)B; p.Tlen = (int)T; p.C = (int)C;
    p.w = w.data_ptr<float>(); p.u = u.data_ptr<float>();
    p.k = k.data_ptr(); p.v = v.data_ptr();
    p.aa_in = aa.data_ptr<float>(); p.bb_in = bb.data_ptr<float>(); p.pp_in = pp.data_ptr<float>();
    p.y = y.data_ptr();
    p.aa_out = aa2.data_ptr<float>(); p.bb_out = bb2.data_ptr<float>(); p.pp_out = pp2.data_ptr<float>();
    check_runner(Runner::wkv4(dtype_code(k), p, stream));
    return {y, aa2, bb2, pp2};
}

// ---------------------------------------------------------------------------------- v5 / v6
template <class Runner>
std::vector<at::Tensor> bind_wkv_diag(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor g, at::Tensor u,
                                      at::Tensor s, int64_t stream) {
    check_device<Runner>(r);
    TORCH_CHECK(r.dim() == 4, "r must be (B, T, H, N)");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_act(r, r, "r");
    check_act(k, r, "k");
    check_act(v, r, "v");
    const bool per_token = g.dim() == 4;
    if (per_token) check_f32(g, r, "g", {B, T, H, N});
    else check_f32(g, r, "g", {H, N});
    check_f32(u, r, "u", {H, N});
    check_f32(s, r, "s", {B, H, N, N});
    at::Tensor y = at::empty_like(r);
    at::Tensor s2 = f32_empty(r, {B, H, N, N});
    DiagArgs<void> p;
    p.B = (int)B; p.Tlen = (int)T; p.H = (int)H;
    p.r = r.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
    p.g = g.data_ptr<float>(); p.g_per_token = per_token ? 1 : 0; p.u = u.data_ptr<float>();
    p.s_in = s.data_ptr<float>(); p.y = y.data_ptr(); p.s_out = s2.data_ptr<float>();
    check_runner(Runner::wkv_diag(dtype_code(r), (int)N, p, stream));
    return {y, s2};
}

// ---------------------------------------------------------------------------------------- v7
template <class Runner>
std::vector<at::Tensor> bind_wkv7_fwd(at::Tensor r, at::Tensor g, at::Tensor k, at::Tensor v, at::Tensor a,
                                      at::Tensor b, at::Tensor s, bool save, int64_t stream) {
    check_device<Runner>(r);
    TORCH_CHECK(r.dim() == 4, "r must be (B, T, H, N)");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_act(r, r, "r");
    check_act(k, r, "k");
    check_act(v, r, "v");
    check_act(a, r, "a");
    check_act(b, r, "b");
    check_f32(g, r, "g", {B, T, H, N});
    check_f32(s, r, "s", {B, H, N, N});
    at::Tensor y = at::empty_like(r);
    at::Tensor s2 = f32_empty(r, {B, H, N, N});
    const int64_t nc = v7_num_chunks((int)T);
    at::Tensor sa = save ? f32_empty(r, {B, T, H, N}) : f32_empty(r, {0});
    at::Tensor ck = save ? f32_empty(r, {B, H, nc, N, N}) : f32_empty(r, {0});
    V7FwdArgs<void> p;
    p.B = (int)B; p.Tlen = (int)T; p.H = (int)H;
    p.r = r.data_ptr(); p.g = g.data_ptr<float>(); p.k = k.data_ptr(); p.v = v.data_ptr();
    p.a = a.data_ptr(); p.b = b.data_ptr(); p.s_in = s.data_ptr<float>();
    p.y = y.data_ptr(); p.s_out = s2.data_ptr<float>();
    p.sa = save ? sa.data_ptr<float>() : nullptr;
    p.ckpt = save ? ck.data_ptr<float>() : nullptr;
    check_runner(Runner::wkv7_fwd(dtype_code(r), (int)N, p, stream));
    return {y, s2, sa, ck};
}

template <class Runner>
std::vector<at::Tensor> bind_wkv7_bwd(at::Tensor r, at::Tensor g, at::Tensor k, at::Tensor v, at::Tensor a,
                                      at::Tensor b, at::Tensor sa, at::Tensor ckpt, at::Tensor dy, at::Tensor ds,
                                      int64_t stream) {
    check_device<Runner>(r);
    TORCH_CHECK(r.dim() == 4, "r must be (B, T, H, N)");
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_act(r, r, "r");
    check_act(k, r, "k");
    check_act(v, r, "v");
    check_act(a, r, "a");
    check_act(b, r, "b");
    check_act(dy, r, "dy");
    check_f32(g, r, "g", {B, T, H, N});
    check_f32(sa, r, "sa", {B, T, H, N});
    check_f32(ckpt, r, "ckpt", {B, H, (int64_t)v7_num_chunks((int)T), N, N});
    check_f32(ds, r, "ds", {B, H, N, N});
    at::Tensor dr = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r);
    at::Tensor da = at::empty_like(r), db = at::empty_like(r);
    at::Tensor dg = f32_empty(r, {B, T, H, N});
    at::Tensor ds0 = f32_empty(r, {B, H, N, N});
    V7BwdArgs<void> p;
    p.B = (int)B; p.Tlen = (int)T; p.H = (int)H;
    p.r = r.data_ptr(); p.g = g.data_ptr<float>(); p.k = k.data_ptr(); p.v = v.data_ptr();
    p.a = a.data_ptr(); p.b = b.data_ptr(); p.sa = sa.data_ptr<float>(); p.ckpt = ckpt.data_ptr<float>();
    p.dy = dy.data_ptr(); p.ds_out = ds.data_ptr<float>();
    p.dr = dr.data_ptr(); p.dg = dg.data_ptr<float>(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
    p.da = da.data_ptr(); p.db = db.data_ptr(); p.ds_in = ds0.data_ptr<float>();
    check_runner(Runner::wkv7_bwd(dtype_code(r), (int)N, p, stream));
    return {dr, dg, dk, dv, da, db, ds0};
}

inline std::vector<int64_t> head_sizes() {
    std::vector<int64_t> hs;
#define RWKV_PUSH(NN) hs.push_back(NN);
    RWKV_FOR_HEAD_SIZES(RWKV_PUSH)
#undef RWKV_PUSH
    return hs;
}

// Called from TORCH_LIBRARY(<namespace>, m) in each library.
template <class Runner>
void define_wkv_ops(torch::Library& m) {
    m.def("head_sizes", &head_sizes);
    m.def("wkv4", &bind_wkv4<Runner>);
    m.def("wkv_diag", &bind_wkv_diag<Runner>);
    m.def("wkv7_fwd", &bind_wkv7_fwd<Runner>);
    m.def("wkv7_bwd", &bind_wkv7_bwd<Runner>);
}

}  // namespace rwkv
