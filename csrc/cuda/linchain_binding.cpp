// Torch binding of the CUDA backend of ntk::linchain: torch.ops.ntk_cuda.linchain_fwd / linchain_bwd.
// Same contract as _fwd_reference / _bwd_reference in ntk_kernels/ops/linchain.py.  Checks the inputs,
// allocates, runs the large GEMMs on cuBLAS through ATen and the fused parts through the torch-free
// launchers of linchain_kernels.h, all on the current stream of x's device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "linchain_kernels.h"

namespace {

using at::Tensor;
namespace lc = ntk::linchain_cuda;

lc::DType launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return lc::DType::kFloat16;
    case at::kBFloat16: return lc::DType::kBFloat16;
    case at::kFloat: return lc::DType::kFloat32;
    case at::kDouble: return lc::DType::kFloat64;
    default: TORCH_CHECK(false, "ntk_cuda::linchain: x must be float16, bfloat16, float32 or float64, got ", t);
  }
}

// u, gv, gu are kept in fp32 (fp64 for fp64 inputs).
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ntk_cuda::linchain: ", what, " failed: ", cudaGetErrorString(err));
}

uint32_t seed32(int64_t seed) { return static_cast<uint32_t>(seed & 0xFFFFFFFF); }

void check_tensor(const Tensor& t, const char* name, const Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda(), "ntk_cuda::linchain: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), "ntk_cuda::linchain: ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "ntk_cuda::linchain: ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.sizes() == shape, "ntk_cuda::linchain: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Validates x (N, d_in), W (d_out, d_in), A (r, d_in), M (r, r), B (d_out, r), p; returns (N, d_in, d_out, r).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_inputs(const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                                                            const std::optional<Tensor>& chain, const Tensor& lora_B,
                                                            double dropout_p) {
  TORCH_CHECK(x.is_cuda(), "ntk_cuda::linchain: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "ntk_cuda::linchain: x must be 2-D (N, d_in), got shape ", x.sizes());
  launcher_dtype(x.scalar_type());
  TORCH_CHECK(weight.dim() == 2, "ntk_cuda::linchain: weight must be 2-D (d_out, d_in), got shape ", weight.sizes());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(0) >= 1,
              "ntk_cuda::linchain: lora_A must be 2-D (r, d_in) with r >= 1, got shape ", lora_A.sizes());
  const int64_t N = x.size(0), d_in = x.size(1), d_out = weight.size(0), r = lora_A.size(0);
  check_tensor(weight, "weight", x, {d_out, d_in});
  check_tensor(lora_A, "lora_A", x, {r, d_in});
  check_tensor(lora_B, "lora_B", x, {d_out, r});
  if (chain.has_value()) check_tensor(*chain, "chain", x, {r, r});
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "ntk_cuda::linchain: dropout_p must be in [0, 1), got ", dropout_p);
  return {N, d_in, d_out, r};
}

// y = x Wᵀ + b + s · v Bᵀ with u = dropout(x) Aᵀ (returned, acc dtype) and v = u Mᵀ.
std::tuple<Tensor, Tensor> linchain_fwd(const Tensor& x_, const Tensor& weight, const std::optional<Tensor>& bias,
                                        const Tensor& lora_A, const std::optional<Tensor>& chain, const Tensor& lora_B,
                                        double scaling, double dropout_p, int64_t seed) {
  const auto [N, d_in, d_out, r] = check_inputs(x_, weight, lora_A, chain, lora_B, dropout_p);
  if (bias.has_value()) check_tensor(*bias, "bias", x_, {d_out});
  const c10::cuda::CUDAGuard guard(x_.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_.get_device()).stream();
  const Tensor x = x_.contiguous(), A = lora_A.contiguous();
  const Tensor M = chain.has_value() ? chain->contiguous() : Tensor();

  // u = dropout(x) Aᵀ and v = u Mᵀ (N, r) in one kernel; the mask lives only in registers.
  const Tensor u = at::empty({N, r}, x.options().dtype(acc_dtype(x.scalar_type())));
  const Tensor v = M.defined() ? at::empty_like(u) : u;
  check_launch(lc::project(launcher_dtype(x.scalar_type()), x.data_ptr(), d_in, A.data_ptr(), /*p_sj=*/d_in,
                           /*p_sc=*/1, M.defined() ? M.data_ptr() : nullptr, /*q_sk=*/r, /*q_sj=*/1, u.data_ptr(),
                           M.defined() ? v.data_ptr() : nullptr, N, d_in, r, /*alpha=*/1.0, dropout_p, seed32(seed),
                           stream),
               "project (u = dropout(x) A^T, v = u M^T)");

  // cuBLAS: y = x Wᵀ + b, then y += s · v Bᵀ into the same output (v cast to x's dtype: N x r, cheap).
  // For fp16/bf16 this rounds x Wᵀ + b once before the adapter term is added (the reference rounds once at
  // the end); the extra rounding is within the low-precision test budget and saves an fp32 (N, d_out) pass.
  Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(v.scalar_type() == x.scalar_type() ? v : v.to(x.scalar_type()), lora_B.t(), /*beta=*/1, /*alpha=*/scaling);
  return {y, u};
}

// Gradients [gx, gW, gb, gA, gM, gB]; an empty tensor where needs[i] is false (gM also when chain is None).
std::vector<Tensor> linchain_bwd(const Tensor& grad_y, const Tensor& x_, const Tensor& weight, const Tensor& lora_A,
                                 const std::optional<Tensor>& chain, const Tensor& lora_B, const Tensor& u_,
                                 double scaling, double dropout_p, int64_t seed, c10::List<bool> needs) {
  const auto [N, d_in, d_out, r] = check_inputs(x_, weight, lora_A, chain, lora_B, dropout_p);
  check_tensor(grad_y, "grad_y", x_, {N, d_out});
  TORCH_CHECK(needs.size() == 6, "ntk_cuda::linchain: needs must have 6 entries (x, weight, bias, lora_A, chain, "
              "lora_B), got ", needs.size());
  const auto acc = acc_dtype(x_.scalar_type());
  TORCH_CHECK(u_.is_cuda() && u_.device() == x_.device() && u_.scalar_type() == acc && u_.sizes() == at::IntArrayRef({N, r}),
              "ntk_cuda::linchain: u must be the forward's (", N, ", ", r, ") ", acc, " tensor on ", x_.device(),
              ", got ", u_.sizes(), " ", u_.scalar_type(), " on ", u_.device());
  const c10::cuda::CUDAGuard guard(x_.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_.get_device()).stream();
  const lc::DType dt = launcher_dtype(x_.scalar_type());
  const uint32_t s32 = seed32(seed);
  const Tensor gy = grad_y.contiguous(), x = x_.contiguous(), A = lora_A.contiguous(), B = lora_B.contiguous();
  const Tensor u = u_.contiguous();
  const Tensor M = chain.has_value() ? chain->contiguous() : Tensor();
  const bool need_gM = needs.get(4) && M.defined();

  std::vector<Tensor> out;
  for (int i = 0; i < 6; ++i) out.push_back(x.new_empty({0}));

  // gv = s · gy B and gu = gv M (N, r) in one kernel: project with X = gy, P = Bᵀ, Q = Mᵀ, no dropout.
  Tensor gv, gu;
  if (needs.get(0) || needs.get(3) || need_gM) {
    gv = at::empty({N, r}, x.options().dtype(acc));
    gu = M.defined() ? at::empty_like(gv) : gv;
    check_launch(lc::project(dt, gy.data_ptr(), d_out, B.data_ptr(), /*p_sj=*/1, /*p_sc=*/r,
                             M.defined() ? M.data_ptr() : nullptr, /*q_sk=*/1, /*q_sj=*/r, gv.data_ptr(),
                             M.defined() ? gu.data_ptr() : nullptr, N, d_out, r, /*alpha=*/scaling, /*p=*/0.0, 0,
                             stream),
                 "project (gv = s gy B, gu = gv M)");
  }
  if (needs.get(0)) {  // gx = gy W (cuBLAS, x's dtype), then += keep ⊙ (gu A) / (1 - p) in place (acc inside)
    Tensor gx = at::mm(gy, weight);
    check_launch(lc::grad_x(dt, gu.data_ptr(), A.data_ptr(), d_in, gx.data_ptr(), d_in, gx.data_ptr(), d_in, N, d_in, r,
                            dropout_p, s32, stream),
                 "grad_x (gx += keep * (gu A) / (1 - p))");
    out[0] = gx;
  }
  if (needs.get(1)) out[1] = at::mm(gy.t(), x);
  if (needs.get(2)) out[2] = gy.sum(0);  // ATen accumulates fp16/bf16 sums in fp32
  if (needs.get(3)) {  // gA = guᵀ dropout(x) (r, d_in), masked reduction over N
    Tensor gA = at::empty({r, d_in}, x.options());
    Tensor ws = at::empty({lc::grad_proj_workspace(N, d_in, r)}, x.options().dtype(acc));
    check_launch(lc::grad_proj(dt, gu.data_ptr(), x.data_ptr(), d_in, gA.data_ptr(), /*o_sj=*/d_in, /*o_sc=*/1,
                               ws.data_ptr(), N, d_in, r, /*alpha=*/1.0, dropout_p, s32, stream),
                 "grad_proj (gA = gu^T dropout(x))");
    out[3] = gA;
  }
  if (need_gM) out[4] = at::mm(gv.t(), u).to(x.scalar_type());  // gM = gvᵀ u (r, r), fp32 cuBLAS
  if (needs.get(5)) {  // gB = s · gyᵀ v (d_out, r): grad_proj with X = gy, G = v, written transposed
    const Tensor v = M.defined() ? at::mm(u, M.to(acc).t()) : u;
    Tensor gB = at::empty({d_out, r}, x.options());
    Tensor ws = at::empty({lc::grad_proj_workspace(N, d_out, r)}, x.options().dtype(acc));
    check_launch(lc::grad_proj(dt, v.data_ptr(), gy.data_ptr(), d_out, gB.data_ptr(), /*o_sj=*/1, /*o_sc=*/r,
                               ws.data_ptr(), N, d_out, r, /*alpha=*/scaling, /*p=*/0.0, 0, stream),
                 "grad_proj (gB = s gy^T v)");
    out[5] = gB;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(ntk_cuda, m) {
  m.def("linchain_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor? chain, Tensor lora_B, "
        "float scaling, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("linchain_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor? chain, Tensor lora_B, "
        "Tensor u, float scaling, float dropout_p, int seed, bool[] needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ntk_cuda, CUDA, m) {
  m.impl("linchain_fwd", &linchain_fwd);
  m.impl("linchain_bwd", &linchain_bwd);
}

// The ops register on import (TORCH_LIBRARY above); the Python module itself exposes nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
