// Torch-free launchers of the CUDA kernels behind ntk::linchain (the torch side is linchain_binding.cpp).
//
// The op (x (N, d_in), W (d_out, d_in), A (r, d_in), M (r, r) or identity, B (d_out, r), scaling s, dropout p):
//   forward   u = dropout(x) Aᵀ,  v = u Mᵀ,  y = x Wᵀ + b + s · v Bᵀ
//   backward  gv = s · gy B,  gu = gv M,  gx = gy W + keep ⊙ (gu A) / (1 - p),  gA = guᵀ dropout(x), ...
// cuBLAS (through ATen in the binding) does the big GEMMs; these kernels do what cuBLAS cannot fuse:
//   project    dropout + skinny projection + chain: out1 = α/(1-p) (keep ⊙ X) Pᵀ, out2 = out1 Qᵀ
//   grad_x     the gx epilogue: out = base + keep ⊙ (G A) / (1 - p), base = gy W from cuBLAS (in place)
//   grad_proj  the dropout-masked reduction over N: out = α/(1-p) Gᵀ (keep ⊙ X)
// The mask is regenerated in registers from hash_dropout.h (keep(i, c) for row i and column c of X), never stored.
//
// "dtype" is the storage dtype of X and of every weight (W, A, M, B share it); "acc" is the accumulate and
// u/gv/gu dtype: fp32, or fp64 for fp64.  Matrices are row-major with unit column stride unless strides are given.
// Every launcher is asynchronous on `stream` and returns cudaGetLastError() after its launches
// (cudaErrorInvalidValue for bad arguments).  p must lie in [0, 1); p == 0 computes no hash.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace ntk {
namespace linchain_cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Ranks up to this are one tile: project fuses the chain in its epilogue.  Above it the rank is split over
// blocks and out2 = out1 Qᵀ runs as a second small kernel.
constexpr int64_t kFusedRank = 64;

// out1 (N, r) acc, contiguous = alpha / (1 - p) · (keep ⊙ X) Pᵀ
// out2 (N, r) acc, contiguous = out1 Qᵀ                        (only when Q != nullptr; then out2 != nullptr)
//   X (N, K) dtype, row stride ldx;  P (r, K) dtype, P[j, c] at P[j * p_sj + c * p_sc];
//   Q (r, r) dtype, Q[k, j] at Q[k * q_sk + j * q_sj].
// forward:  X = x,  P = A  (p_sj = d_in, p_sc = 1), Q = M  (q_sk = r, q_sj = 1), alpha = 1      -> u, v
// backward: X = gy, P = Bᵀ (p_sj = 1, p_sc = r),    Q = Mᵀ (q_sk = 1, q_sj = r), alpha = s, p = 0 -> gv, gu
cudaError_t project(DType dtype, const void* X, int64_t ldx, const void* P, int64_t p_sj, int64_t p_sc,
                    const void* Q, int64_t q_sk, int64_t q_sj, void* out1, void* out2, int64_t N, int64_t K,
                    int64_t r, double alpha, double p, uint32_t seed, cudaStream_t stream);

// out[i, c] = base[i, c] + keep(i, c) / (1 - p) · Σ_j G[i, j] A[j, c]     (computed in acc, stored in dtype)
//   G (N, r) acc, contiguous;  A (r, K) dtype, row stride lda;  base, out (N, K) dtype with row strides
//   ld_base, ld_out; out may alias base (in place on the cuBLAS result gy W).
cudaError_t grad_x(DType dtype, const void* G, const void* A, int64_t lda, const void* base, int64_t ld_base,
                   void* out, int64_t ld_out, int64_t N, int64_t K, int64_t r, double p, uint32_t seed,
                   cudaStream_t stream);

// out[j, c] = alpha / (1 - p) · Σ_i G[i, j] keep(i, c) X[i, c]              (computed in acc, stored in dtype)
//   G (N, r) acc, contiguous;  X (N, K) dtype, row stride ldx;  out (r, K) dtype at out[j * o_sj + c * o_sc].
// Deterministic split over N: each split writes its partial sums to `workspace` (acc, at least
// grad_proj_workspace(N, K, r) elements), then a second kernel adds the splits in a fixed order.
// gA: G = gu, X = x (o_sj = d_in, o_sc = 1);  gB = (s · vᵀ gy)ᵀ: G = v, X = gy, o_sj = 1, o_sc = r, alpha = s, p = 0.
int64_t grad_proj_workspace(int64_t N, int64_t K, int64_t r);
cudaError_t grad_proj(DType dtype, const void* G, const void* X, int64_t ldx, void* out, int64_t o_sj,
                      int64_t o_sc, void* workspace, int64_t N, int64_t K, int64_t r, double alpha, double p,
                      uint32_t seed, cudaStream_t stream);

}  // namespace linchain_cuda
}  // namespace ntk
