// Torch binding of the CUDA backend of ntk::gram_contract: torch.ops.ntk_cuda.gram_contract.
// Same contract as gram_contract_ref in ntk_kernels/ops/ntk_gram.py, with mode 0 "full", 1 "diagonal",
// 2 "trace".  Checks the inputs, allocates the fp32 (fp64) output and runs the tiled kernel of
// gram_kernels.h on the current stream of g1's device.  For T = S = 1 (one position per sample: A_i A_jᵀ is
// a scalar per pair) the contraction is two plain Grams, (a_i·a_j)(g_ic·g_jc'), and runs on cuBLAS through
// ATen instead: one (I·C x E) x (E x J·C) GEMM (full), a batch of C GEMMs (diagonal) or one (I x C·E) x
// (C·E x J) GEMM (trace), scaled by the (I x J) Gram of a; the tiled kernel would spend a whole 32 x 64 tile
// per pair on it.  That path computes in fp32 (fp64) from inputs cast up front and follows torch's float32
// matmul precision setting (torch.backends.cuda.matmul.allow_tf32) like any other ATen GEMM.
// The library ntk_cuda itself is defined (TORCH_LIBRARY) in linchain_binding.cpp; this file adds a fragment.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <vector>

#include "gram_kernels.h"

namespace {

using at::Tensor;
namespace gc = ntk::gram_cuda;

gc::DType launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return gc::DType::kFloat16;
    case at::kBFloat16: return gc::DType::kBFloat16;
    case at::kFloat: return gc::DType::kFloat32;
    case at::kDouble: return gc::DType::kFloat64;
    default:
      TORCH_CHECK(false, "ntk_cuda::gram_contract: g1 and g2 must be float16, bfloat16, float32 or float64, got ", t);
  }
}

// fp16 / bf16 / fp32 accumulate (and return) fp32, fp64 fp64.
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_ids(at::ScalarType t) { return t == at::kLong || t == at::kInt; }

void check_device(const Tensor& t, const char* name, const Tensor& g1) {
  TORCH_CHECK(t.is_cuda(), "ntk_cuda::gram_contract: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == g1.device(), "ntk_cuda::gram_contract: ", name, " is on ", t.device(), " but g1 is on ",
              g1.device());
}

// K = (a_i·a_j)(g_ic·g_jc') for T = S = 1, on cuBLAS: a1 (I, 1[, D]), g1 (I, C, 1, E), likewise a2, g2.
Tensor gram_single_position(const Tensor& a1, const Tensor& g1, const Tensor& a2, const Tensor& g2, int64_t mode,
                            at::ScalarType acc) {
  const int64_t I = g1.size(0), J = g2.size(0), C = g1.size(1), E = g1.size(3);
  const Tensor G1 = g1.reshape({I, C, E}).to(acc), G2 = g2.reshape({J, C, E}).to(acc);
  const Tensor AA = is_ids(a1.scalar_type())
                        ? a1.reshape({I, 1}).eq(a2.reshape({1, J})).to(acc)
                        : at::mm(a1.reshape({I, a1.size(2)}).to(acc), a2.reshape({J, a2.size(2)}).to(acc).t());
  if (mode == gc::kFull) {  // (I·C, J·C) -> (I, J, C, C)
    const Tensor GG = at::mm(G1.reshape({I * C, E}), G2.reshape({J * C, E}).t()).view({I, C, J, C});
    return (GG.permute({0, 2, 1, 3}) * AA.view({I, J, 1, 1})).contiguous();
  }
  if (mode == gc::kDiagonal) {  // (C, I, E) x (C, E, J) -> (C, I, J) -> (I, J, C)
    const Tensor GG = at::bmm(G1.transpose(0, 1), G2.permute({1, 2, 0}));
    return (GG.permute({1, 2, 0}) * AA.view({I, J, 1})).contiguous();
  }
  return at::mm(G1.reshape({I, C * E}), G2.reshape({J, C * E}).t()).mul_(AA);  // Σ_c g_ic·g_jc = ⟨vec g_i, vec g_j⟩
}

Tensor gram_contract(const Tensor& a1_, const Tensor& g1_, const Tensor& a2_, const Tensor& g2_, int64_t mode) {
  TORCH_CHECK(mode >= gc::kFull && mode <= gc::kTrace,
              "ntk_cuda::gram_contract: mode must be 0 (full), 1 (diagonal) or 2 (trace), got ", mode);
  check_device(g1_, "g1", g1_);
  check_device(g2_, "g2", g1_);
  check_device(a1_, "a1", g1_);
  check_device(a2_, "a2", g1_);
  const auto dtype = g1_.scalar_type();
  const gc::DType dt = launcher_dtype(dtype);
  TORCH_CHECK(g2_.scalar_type() == dtype, "ntk_cuda::gram_contract: g2 has dtype ", g2_.scalar_type(),
              " but g1 has ", dtype, "; they must share one dtype");
  TORCH_CHECK(g1_.dim() == 4 && g2_.dim() == 4, "ntk_cuda::gram_contract: g1 and g2 must be 4-D (N, C, T, E), got "
              "shapes ", g1_.sizes(), " and ", g2_.sizes());
  const int64_t I = g1_.size(0), C = g1_.size(1), T = g1_.size(2), E = g1_.size(3);
  const int64_t J = g2_.size(0), S = g2_.size(2);
  TORCH_CHECK(g2_.size(1) == C && g2_.size(3) == E, "ntk_cuda::gram_contract: g2 ", g2_.sizes(),
              " must be (J, C, S, E) with g1's C = ", C, " and E = ", E);
  const bool ids = is_ids(a1_.scalar_type());
  TORCH_CHECK(ids == is_ids(a2_.scalar_type()), "ntk_cuda::gram_contract: a1 and a2 must both be token ids (int32 / "
              "int64) or both features, got ", a1_.scalar_type(), " and ", a2_.scalar_type());
  int64_t D = 0;
  if (ids) {
    TORCH_CHECK(a1_.dim() == 2 && a2_.dim() == 2, "ntk_cuda::gram_contract: token ids a1, a2 must be 2-D (N, T), got "
                "shapes ", a1_.sizes(), " and ", a2_.sizes());
  } else {
    TORCH_CHECK(a1_.scalar_type() == dtype && a2_.scalar_type() == dtype, "ntk_cuda::gram_contract: features a1, a2 "
                "must have g1's dtype ", dtype, " (or be integer token ids), got ", a1_.scalar_type(), " and ",
                a2_.scalar_type());
    TORCH_CHECK(a1_.dim() == 3 && a2_.dim() == 3 && a1_.size(2) == a2_.size(2), "ntk_cuda::gram_contract: features "
                "a1, a2 must be 3-D (N, T, D) with one D, got shapes ", a1_.sizes(), " and ", a2_.sizes());
    D = a1_.size(2);
  }
  TORCH_CHECK(a1_.size(0) == I && a1_.size(1) == T, "ntk_cuda::gram_contract: a1 ", a1_.sizes(),
              " must have g1's (N, T) = (", I, ", ", T, ") leading dims");
  TORCH_CHECK(a2_.size(0) == J && a2_.size(1) == S, "ntk_cuda::gram_contract: a2 ", a2_.sizes(),
              " must have g2's (N, S) = (", J, ", ", S, ") leading dims");

  const c10::cuda::CUDAGuard guard(g1_.device());
  const auto acc = acc_dtype(dtype);
  const Tensor a1 = ids ? a1_.to(at::kLong).contiguous() : a1_.contiguous();
  const Tensor a2 = ids ? a2_.to(at::kLong).contiguous() : a2_.contiguous();
  const Tensor g1 = g1_.contiguous(), g2 = g2_.contiguous();
  if (T == 1 && S == 1) return gram_single_position(a1, g1, a2, g2, mode, acc);

  std::vector<int64_t> shape{I, J};
  if (mode == gc::kFull) shape.insert(shape.end(), {C, C});
  if (mode == gc::kDiagonal) shape.push_back(C);
  Tensor out = at::empty(shape, g1.options().dtype(acc));
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g1.get_device()).stream();
  const cudaError_t err = gc::gram_contract(dt, a1.data_ptr(), g1.data_ptr(), a2.data_ptr(), g2.data_ptr(),
                                            out.data_ptr(), ids, I, J, C, T, S, D, E, static_cast<int>(mode), stream);
  TORCH_CHECK(err == cudaSuccess, "ntk_cuda::gram_contract: the kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ntk_cuda, m) {
  m.def("gram_contract(Tensor a1, Tensor g1, Tensor a2, Tensor g2, int mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(ntk_cuda, CUDA, m) {
  m.impl("gram_contract", &gram_contract);
}
