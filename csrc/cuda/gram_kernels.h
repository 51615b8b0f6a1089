// Torch-free launcher of the CUDA kernel behind ntk::gram_contract (the torch side is gram_binding.cpp).
//
// The op, for every pair (i, j) of I x J samples and outputs c, c' < C:
//   K[i, j, c, c'] = Σ_{t < T, s < S} (A_i A_jᵀ)_{ts} ⟨G1[i, c, t, :], G2[j, c', s, :]⟩
//   A_i = a1[i] (T, D) features, or token ids a1[i] (T,): then (A_i A_jᵀ)_{ts} = 1[a1[i, t] == a2[j, s]]
// computed per pair through H_{c'} = (A_i A_jᵀ) G2[j, c'] (T x E) and K[c, c'] = ⟨G1[i, c], H_{c'}⟩, one
// (t, s) tile of A_i A_jᵀ at a time in shared memory: no T x S product ever reaches global memory.
//
// Layouts (all contiguous, row-major):
//   a1 (I, T, D) dtype or (I, T) int64;  g1 (I, C, T, E) dtype;  a2 (J, S, D) dtype or (J, S) int64;
//   g2 (J, C, S, E) dtype;  out acc (fp32, fp64 for fp64): mode 0 "full" (I, J, C, C), 1 "diagonal"
//   (I, J, C) (c = c'), 2 "trace" (I, J) (Σ_c of the diagonal).
// fp16 / bf16 / fp32 inputs accumulate in fp32, fp64 in fp64.  Deterministic: no atomics; every output
// element has one writer and its partial sums are added in a fixed order (bitwise reproducible).
// Asynchronous on `stream`; returns cudaGetLastError() after the launches, cudaErrorInvalidValue for bad
// arguments (negative sizes, a mode outside 0..2, a null pointer where data is read or written).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace ntk {
namespace gram_cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

enum Mode : int { kFull = 0, kDiagonal = 1, kTrace = 2 };

// ids: a1 / a2 are int64 token ids (D is ignored) instead of dtype features.
cudaError_t gram_contract(DType dtype, const void* a1, const void* g1, const void* a2, const void* g2, void* out,
                          bool ids, int64_t I, int64_t J, int64_t C, int64_t T, int64_t S, int64_t D, int64_t E,
                          int mode, cudaStream_t stream);

}  // namespace gram_cuda
}  // namespace ntk
