// Torch-free launchers of the CUDA kernels behind ntk::linear_jvp and ntk::layer_norm_jvp (the torch side is
// jvp_binding.cpp; the math is in ntk_kernels/ops/jvp.py).  Rows m = n·L + l of x (N, L, ·); a row's sample is
// n = m / L.
//
// linear_jvp:  y = x Wᵀ + b,   ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ      (Ẇ, ḃ shared or one per sample n)
//   x, x_dot (N·L, K) contiguous;  w (O, K) at w[o·sw_o + k·sw_k] (any strides: a transposed view is fine);
//   w_dot (O, K) at w_dot[o·swd_o + k·swd_k] (swd_n = 0) or per sample (N, O, K) at + n·swd_n;
//   b (O,), b_dot (O,) or per sample (N, O), contiguous;  y, y_dot (N·L, O) contiguous.
//   Null x_dot, w_dot, b, b_dot mean zero.
// layer_norm_jvp:  LayerNorm (rms = false) or RMSNorm over the last dim D (formulas in ops/jvp.py)
//   x, x_dot (N·L, D);  w, b (D,);  w_dot, b_dot (D,) or per sample (N, D);  y, y_dot (N·L, D); all contiguous.
//   Null x_dot, w, b, w_dot, b_dot mean: zero tangent, no weight (1), no bias (0).
// fp16 / bf16 / fp32 inputs accumulate in fp32, fp64 in fp64; outputs in the input dtype.  Deterministic (no
// atomics).  Asynchronous on `stream`; returns cudaGetLastError() after the launches, cudaErrorInvalidValue for
// bad arguments (negative sizes, a null pointer where data must be read or written, a grid too large).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace ntk {
namespace jvp_cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

cudaError_t linear_jvp(DType dtype, const void* x, const void* x_dot, const void* w, const void* w_dot,
                       const void* b, const void* b_dot, void* y, void* y_dot, int64_t N, int64_t L, int64_t K,
                       int64_t O, int64_t sw_o, int64_t sw_k, int64_t swd_n, int64_t swd_o, int64_t swd_k,
                       bool w_dot_per_sample, bool b_dot_per_sample, cudaStream_t stream);

cudaError_t layer_norm_jvp(DType dtype, const void* x, const void* x_dot, const void* w, const void* b,
                           const void* w_dot, const void* b_dot, void* y, void* y_dot, int64_t N, int64_t L,
                           int64_t D, double eps, bool rms, bool w_dot_per_sample, bool b_dot_per_sample,
                           cudaStream_t stream);

}  // namespace jvp_cuda
}  // namespace ntk
