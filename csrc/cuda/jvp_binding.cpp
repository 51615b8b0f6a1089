// Torch binding of the CUDA backends of ntk::linear_jvp and ntk::layer_norm_jvp: torch.ops.ntk_cuda.linear_jvp /
// layer_norm_jvp.  Same contract as linear_jvp_ref / layer_norm_jvp_ref in ntk_kernels/ops/jvp.py with x already
// flattened to (N, L, features): checks the inputs, allocates (y, ẏ) in x's dtype and runs the kernels of
// jvp_kernels.h on the current stream of x's device.  weight and weight_dot keep their strides (a transposed view
// is read in place); x, x_dot and the vectors are made contiguous (no copy when they already are).
// The library ntk_cuda itself is defined (TORCH_LIBRARY) in linchain_binding.cpp; this file adds a fragment.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "jvp_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace jc = ntk::jvp_cuda;

jc::DType launcher_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kHalf: return jc::DType::kFloat16;
    case at::kBFloat16: return jc::DType::kBFloat16;
    case at::kFloat: return jc::DType::kFloat32;
    case at::kDouble: return jc::DType::kFloat64;
    default: TORCH_CHECK(false, "ntk_cuda::", op, ": x must be float16, bfloat16, float32 or float64, got ", t);
  }
}

// Checks device, dtype and that the shape is one of `a` or `b` (b empty: only a).
void check_tensor(const Tensor& t, const char* name, const Tensor& x, const char* op, at::IntArrayRef a,
                  at::IntArrayRef b = {}) {
  TORCH_CHECK(t.is_cuda(), "ntk_cuda::", op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), "ntk_cuda::", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "ntk_cuda::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type(), "; all tensors must share one dtype");
  if (b.empty()) {
    TORCH_CHECK(t.sizes() == a, "ntk_cuda::", op, ": ", name, " must have shape ", a, ", got ", t.sizes());
  } else {
    TORCH_CHECK(t.sizes() == a || t.sizes() == b, "ntk_cuda::", op, ": ", name, " must have shape ", a, " or ", b,
                ", got ", t.sizes());
  }
}

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "ntk_cuda::", op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 3, "ntk_cuda::", op, ": x must be 3-D (N, L, features), got shape ", x.sizes());
  launcher_dtype(x.scalar_type(), op);
}

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

OptTensor contiguous(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "ntk_cuda::", op, ": the kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor> linear_jvp(const Tensor& x_, const Tensor& weight, const OptTensor& bias_,
                                      const OptTensor& x_dot_, const OptTensor& weight_dot,
                                      const OptTensor& bias_dot_) {
  constexpr const char* op = "linear_jvp";
  check_x(x_, op);
  TORCH_CHECK(weight.dim() == 2, "ntk_cuda::linear_jvp: weight must be 2-D (d_out, d_in), got shape ", weight.sizes());
  const int64_t N = x_.size(0), L = x_.size(1), K = x_.size(2), O = weight.size(0);
  check_tensor(weight, "weight", x_, op, {O, K});
  if (bias_) check_tensor(*bias_, "bias", x_, op, {O});
  if (x_dot_) check_tensor(*x_dot_, "x_dot", x_, op, x_.sizes());
  if (weight_dot) check_tensor(*weight_dot, "weight_dot", x_, op, {O, K}, {N, O, K});
  if (bias_dot_) check_tensor(*bias_dot_, "bias_dot", x_, op, {O}, {N, O});

  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const OptTensor x_dot = contiguous(x_dot_), bias = contiguous(bias_), bias_dot = contiguous(bias_dot_);
  Tensor y = at::empty({N, L, O}, x.options()), y_dot = at::empty({N, L, O}, x.options());
  if (y.numel() == 0) return {y, y_dot};
  const bool wd_ps = weight_dot.has_value() && weight_dot->dim() == 3;
  int64_t swd_n = 0, swd_o = 0, swd_k = 0;
  if (weight_dot) {
    swd_n = wd_ps ? weight_dot->stride(0) : 0;
    swd_o = weight_dot->stride(wd_ps ? 1 : 0);
    swd_k = weight_dot->stride(wd_ps ? 2 : 1);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(jc::linear_jvp(launcher_dtype(x.scalar_type(), op), x.data_ptr(), ptr_or_null(x_dot),
                              weight.data_ptr(), ptr_or_null(weight_dot), ptr_or_null(bias), ptr_or_null(bias_dot),
                              y.data_ptr(), y_dot.data_ptr(), N, L, K, O, weight.stride(0), weight.stride(1), swd_n,
                              swd_o, swd_k, wd_ps, bias_dot.has_value() && bias_dot->dim() == 2, stream),
               op);
  return {y, y_dot};
}

std::tuple<Tensor, Tensor> layer_norm_jvp(const Tensor& x_, const OptTensor& weight_, const OptTensor& bias_,
                                          double eps, const OptTensor& x_dot_, const OptTensor& weight_dot_,
                                          const OptTensor& bias_dot_, bool rms) {
  constexpr const char* op = "layer_norm_jvp";
  check_x(x_, op);
  const int64_t N = x_.size(0), L = x_.size(1), D = x_.size(2);
  TORCH_CHECK(eps >= 0, "ntk_cuda::layer_norm_jvp: eps must be >= 0, got ", eps);
  if (weight_) check_tensor(*weight_, "weight", x_, op, {D});
  if (bias_) check_tensor(*bias_, "bias", x_, op, {D});
  if (x_dot_) check_tensor(*x_dot_, "x_dot", x_, op, x_.sizes());
  if (weight_dot_) check_tensor(*weight_dot_, "weight_dot", x_, op, {D}, {N, D});
  if (bias_dot_) check_tensor(*bias_dot_, "bias_dot", x_, op, {D}, {N, D});
  TORCH_CHECK(!weight_dot_ || weight_, "ntk_cuda::layer_norm_jvp: weight_dot needs weight");
  TORCH_CHECK(!bias_dot_ || bias_, "ntk_cuda::layer_norm_jvp: bias_dot needs bias");
  TORCH_CHECK(!(rms && bias_), "ntk_cuda::layer_norm_jvp: rms=True takes no bias (RMSNorm has none)");

  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const OptTensor x_dot = contiguous(x_dot_), weight = contiguous(weight_), bias = contiguous(bias_),
                  weight_dot = contiguous(weight_dot_), bias_dot = contiguous(bias_dot_);
  Tensor y = at::empty_like(x), y_dot = at::empty_like(x);
  if (y.numel() == 0) return {y, y_dot};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(jc::layer_norm_jvp(launcher_dtype(x.scalar_type(), op), x.data_ptr(), ptr_or_null(x_dot),
                                  ptr_or_null(weight), ptr_or_null(bias), ptr_or_null(weight_dot),
                                  ptr_or_null(bias_dot), y.data_ptr(), y_dot.data_ptr(), N, L, D, eps, rms,
                                  weight_dot.has_value() && weight_dot->dim() == 2,
                                  bias_dot.has_value() && bias_dot->dim() == 2, stream),
               op);
  return {y, y_dot};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ntk_cuda, m) {
  m.def("linear_jvp(Tensor x, Tensor weight, Tensor? bias, Tensor? x_dot, Tensor? weight_dot, Tensor? bias_dot) "
        "-> (Tensor, Tensor)");
  m.def("layer_norm_jvp(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? x_dot, Tensor? weight_dot, "
        "Tensor? bias_dot, bool rms) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ntk_cuda, CUDA, m) {
  m.impl("linear_jvp", &linear_jvp);
  m.impl("layer_norm_jvp", &layer_norm_jvp);
}
