// CUDA kernels of ntk::linchain (see linchain_kernels.h for the contract).  Torch-free: nvcc alone builds it.
//
// All three GEMM-like kernels are skinny (one dimension is the LoRA rank r, 1..64 per tile) and bound by
// reading X (N x K) once, so they run on CUDA cores with a layout where the small operand is warp-uniform:
// every lane owns one row (project) or column (grad_x, grad_proj) of the big operand, and the rank-indexed
// values are the same for the whole warp, i.e. shared-memory broadcasts read 4 at a time.  One x value then
// feeds RT FMAs for 1 + RT/4 shared loads.  The dropout mask is recomputed from the hash per element.
#include "linchain_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "dtype_utils.cuh"
#include "hash_dropout.h"

namespace ntk {
namespace linchain_cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps per block in every kernel
constexpr int kWarps = kThreads / 32;

using namespace cuda_common;  // dtype_utils.cuh: acc_t, to_acc, store, lds4, by_dtype

// keep(i, c) = H(seed, i, c) >= T(p) (hash_dropout.h); the row half of the hash is computed once per row.
struct Dropout {
  uint32_t seed, threshold;
  bool on;  // p > 0; otherwise every entry is kept and no hash is computed
  __device__ __forceinline__ uint32_t row(int64_t i) const {
    return on ? dropout_row_hash(seed, static_cast<uint32_t>(i)) : 0u;
  }
  __device__ __forceinline__ bool keep(uint32_t row_hash, int64_t c) const {
    return !on || dropout_hash(row_hash, static_cast<uint32_t>(c)) >= threshold;
  }
};

// Length of the reduction tile (columns of X in project, rows of X in grad_proj): 8 loads of X per thread in
// flight (4 for fp64, whose tiles must stay within 48 KB of static shared memory).
template <typename A>
__host__ __device__ constexpr int reduction_tile() { return sizeof(A) == 8 ? 32 : 64; }

// Two blocks per SM (<= 128 registers) where the accumulators allow it; 64 fp32 accumulators would spill.
#define NTK_MIN_BLOCKS(A, RT) ((RT) * sizeof(A) <= 128 ? 2 : 1)

// ---------------------------------------------------------------------------------------------------------
// project: out1[i, j] = scale · Σ_c keep(i, c) X[i, c] P[j, c],  out2[i, k] = Σ_j out1[i, j] Q[k, j]
// Block: 32 rows (lane = row) x RT ranks (grid.y tiles r).  Each BK-column tile of X goes through shared
// memory (coalesced loads, mask applied on the way in, next tile prefetched into registers during the FMAs);
// the 8 warps take BK/8 columns each and add their partial sums in a fixed order at the end.
// ---------------------------------------------------------------------------------------------------------
template <typename T, int RT>
__global__ void __launch_bounds__(kThreads, NTK_MIN_BLOCKS(acc_t<T>, RT))
project_kernel(const T* __restrict__ X, int64_t ldx, const T* __restrict__ P, int64_t p_sj, int64_t p_sc,
               const T* __restrict__ Q, int64_t q_sk, int64_t q_sj, acc_t<T>* __restrict__ out1,
               acc_t<T>* __restrict__ out2, int64_t N, int64_t K, int64_t r, acc_t<T> scale, Dropout drop) {
  using A = acc_t<T>;
  constexpr int BM = 32, BK = reduction_tile<A>(), RS = RT + 4;  // RS: 16-byte rows for lds4
  constexpr int LR = kThreads / BK;         // loader: thread -> column tid % BK, rows/ranks tid / BK + q LR
  constexpr int XQ = BM / LR, PQ = RT / LR, KW = BK / kWarps;
  __shared__ __align__(16) A xs[BK][BM + 1];  // keep ⊙ X tile, transposed: xs[column][row]
  __shared__ __align__(16) A ps[BK][RS];      // P tile: ps[column][rank]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, lc = tid % BK, lr = tid / BK;
  const int64_t i0 = int64_t(blockIdx.x) * BM, j0 = int64_t(blockIdx.y) * RT;
  uint32_t rh[XQ];  // this thread's loader rows are fixed: hash them once
#pragma unroll
  for (int q = 0; q < XQ; ++q) rh[q] = drop.row(i0 + lr + q * LR);

  // Raw (unconverted) registers: nothing depends on the loads until the next tile's shared-memory store, so
  // they stay in flight during the FMAs.  Dropped or out-of-range entries are not loaded (T() is zero).
  T xv[XQ], pv[PQ];
  auto load = [&](int64_t k0) {
    const int64_t c = k0 + lc;
#pragma unroll
    for (int q = 0; q < XQ; ++q) {
      const int64_t i = i0 + lr + q * LR;
      xv[q] = (i < N && c < K && drop.keep(rh[q], c)) ? X[i * ldx + c] : T();
    }
#pragma unroll
    for (int q = 0; q < PQ; ++q) {
      const int64_t j = j0 + lr + q * LR;
      pv[q] = (j < r && c < K) ? P[j * p_sj + c * p_sc] : T();
    }
  };

  A acc[RT];
#pragma unroll
  for (int j = 0; j < RT; ++j) acc[j] = A(0);
  load(0);
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();  // the previous tile is consumed
#pragma unroll
    for (int q = 0; q < XQ; ++q) xs[lc][lr + q * LR] = to_acc(xv[q]);
#pragma unroll
    for (int q = 0; q < PQ; ++q) ps[lc][lr + q * LR] = to_acc(pv[q]);
    __syncthreads();
    if (k0 + BK < K) load(k0 + BK);  // in flight while the FMAs below run
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      const int k = warp * KW + kk;
      const A x = xs[k][lane];
#pragma unroll
      for (int j = 0; j < RT; j += 4) {  // ps[k][j..j+3]: the same address in every lane (broadcast)
        A pj[4];
        lds4(&ps[k][j], pj);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j + e] += x * pj[e];
      }
    }
  }

  // Sum the 8 warps' partials in a fixed order (deterministic) into the u tile, reusing the P tile's memory.
  constexpr int US = RT + 1;
  static_assert(BM * US <= BK * RS, "the u tile must fit in the P tile");
  A* us = &ps[0][0];  // us[row * US + rank]
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int j = 0; j < RT; ++j) us[lane * US + j] = (w ? us[lane * US + j] : A(0)) + acc[j];
    }
    __syncthreads();
  }
  for (int e = tid; e < BM * RT; e += kThreads) {  // out1 = scale · Σ, written coalesced
    const int i = e / RT, j = e % RT;
    const A val = us[i * US + j] * scale;
    us[i * US + j] = val;
    if (i0 + i < N && j0 + j < r) out1[(i0 + i) * r + j0 + j] = val;
  }
  if (Q == nullptr || gridDim.y != 1) return;  // chain fused only when one tile holds every rank
  __syncthreads();
  // out2[i, k] = Σ_j u[i, j] Q[k, j]: lane = row, warp-uniform k, so each Q load is a broadcast (L1-cached).
  for (int k = warp; k < r; k += kWarps) {
    A v = 0;
    for (int j = 0; j < r; ++j) v += us[lane * US + j] * to_acc(Q[k * q_sk + j * q_sj]);
    if (i0 + lane < N) out2[(i0 + lane) * r + k] = v;
  }
}

// out2 = out1 Qᵀ for ranks above kFusedRank (rare: r x r work per row, no tiling needed).
template <typename T>
__global__ void __launch_bounds__(kThreads)
chain_kernel(const acc_t<T>* __restrict__ U, const T* __restrict__ Q, int64_t q_sk, int64_t q_sj,
             acc_t<T>* __restrict__ V, int64_t N, int64_t r) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < N * r; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / r, k = e % r;
    acc_t<T> v = 0;
    for (int64_t j = 0; j < r; ++j) v += U[i * r + j] * to_acc(Q[k * q_sk + j * q_sj]);
    V[e] = v;
  }
}

// ---------------------------------------------------------------------------------------------------------
// grad_x: out[i, c] = base[i, c] + keep(i, c) · scale · Σ_j G[i, j] A[j, c]
// Block: 64 rows x 64 columns; lane owns columns c0 + lane and c0 + lane + 32 (coalesced base/out), warp w
// owns rows 8w..8w+7, so the G values are warp-uniform broadcasts and each A value is reused over 8 rows.
// The rank is walked in chunks of 32 through shared memory.  Memory-bound on base/out for r <= 64.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
grad_x_kernel(const acc_t<T>* __restrict__ G, const T* __restrict__ Am, int64_t lda, const T* base, int64_t ld_base,
              T* out, int64_t ld_out, int64_t N, int64_t K, int64_t r, acc_t<T> scale, Dropout drop) {
  using A = acc_t<T>;
  constexpr int BM = 64, BN = 64, RJ = 32, TM = BM / kWarps, GS = RJ + 4;
  __shared__ __align__(16) A gs[BM][GS];  // G tile: gs[row][rank]
  __shared__ __align__(16) A as[RJ][BN];  // A tile: as[rank][column]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t i0 = int64_t(blockIdx.x) * BM, c0 = int64_t(blockIdx.y) * BN;
  A acc[TM][2];
#pragma unroll
  for (int m = 0; m < TM; ++m) acc[m][0] = acc[m][1] = A(0);

  for (int64_t j0 = 0; j0 < r; j0 += RJ) {
    __syncthreads();
#pragma unroll
    for (int q = 0; q < BM * RJ / kThreads; ++q) {  // G rows are r contiguous acc values
      const int e = tid + q * kThreads, i = e / RJ, j = e % RJ;
      gs[i][j] = (i0 + i < N && j0 + j < r) ? G[(i0 + i) * r + j0 + j] : A(0);
    }
#pragma unroll
    for (int q = 0; q < RJ * BN / kThreads; ++q) {
      const int e = tid + q * kThreads, j = e / BN, c = e % BN;
      as[j][c] = (j0 + j < r && c0 + c < K) ? to_acc(Am[(j0 + j) * lda + c0 + c]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < RJ; j += 4) {
      A a[4][2];
#pragma unroll
      for (int e = 0; e < 4; ++e) a[e][0] = as[j + e][lane], a[e][1] = as[j + e][lane + 32];
#pragma unroll
      for (int m = 0; m < TM; ++m) {
        A g[4];
        lds4(&gs[warp * TM + m][j], g);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][0] += g[e] * a[e][0], acc[m][1] += g[e] * a[e][1];
      }
    }
  }

#pragma unroll 4
  for (int m = 0; m < TM; ++m) {
    const int64_t i = i0 + warp * TM + m;
    if (i >= N) break;
    const uint32_t rh = drop.row(i);
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int64_t c = c0 + lane + 32 * n;
      if (c < K) {
        const A t = drop.keep(rh, c) ? acc[m][n] * scale : A(0);
        store(out + i * ld_out + c, to_acc(base[i * ld_base + c]) + t);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// grad_proj: ws[split, j, c] = Σ_{i in split} G[i, j] keep(i, c) X[i, c]
// Block: 32 columns (lane = column) x RT ranks (grid.z tiles r) x one split of the rows (grid.y).  Each
// BR-row tile of X goes through shared memory as in project (mask on the way in, prefetch); the 8 warps take
// BR/8 rows each and add their partials in a fixed order.  reduce_splits_kernel then sums the splits.
// ---------------------------------------------------------------------------------------------------------
template <typename T, int RT>
__global__ void __launch_bounds__(kThreads, NTK_MIN_BLOCKS(acc_t<T>, RT))
grad_proj_kernel(const acc_t<T>* __restrict__ G, const T* __restrict__ X, int64_t ldx, acc_t<T>* __restrict__ ws,
                 int64_t N, int64_t K, int64_t r, int64_t rows_per_split, Dropout drop) {
  using A = acc_t<T>;
  constexpr int BC = 32, BR = reduction_tile<A>(), RS = RT + 4;
  constexpr int XQ = BR / kWarps;            // X loader: lane = column, warp w loads rows w + 8q
  constexpr int GL = kThreads / RT, GQ = BR / GL;  // G loader: rank tid % RT, rows tid / RT + q GL
  __shared__ __align__(16) A xs[BR][BC];     // keep ⊙ X tile: xs[row][column]
  __shared__ __align__(16) A gs[BR][RS];     // G tile: gs[row][rank]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, gj = tid % RT, gr = tid / RT;
  const int64_t c = int64_t(blockIdx.x) * BC + lane, j0 = int64_t(blockIdx.z) * RT;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t row_end = N < row_begin + rows_per_split ? N : row_begin + rows_per_split;

  T xv[XQ];  // raw, converted at the shared-memory store (see project_kernel)
  A gv[GQ];
  auto load = [&](int64_t t0) {
    // All lanes of a warp load the same row: lane q hashes row t0 + warp + 8q and shares it.
    const uint32_t mine = lane < XQ ? drop.row(t0 + warp + kWarps * lane) : 0u;
#pragma unroll
    for (int q = 0; q < XQ; ++q) {
      const int64_t i = t0 + warp + kWarps * q;
      const uint32_t rh = drop.on ? __shfl_sync(0xffffffffu, mine, q) : 0u;
      xv[q] = (i < row_end && c < K && drop.keep(rh, c)) ? X[i * ldx + c] : T();
    }
#pragma unroll
    for (int q = 0; q < GQ; ++q) {
      const int64_t i = t0 + gr + GL * q;
      gv[q] = (i < row_end && j0 + gj < r) ? G[i * r + j0 + gj] : A(0);
    }
  };

  A acc[RT];
#pragma unroll
  for (int j = 0; j < RT; ++j) acc[j] = A(0);
  load(row_begin);
  for (int64_t t0 = row_begin; t0 < row_end; t0 += BR) {
    __syncthreads();
#pragma unroll
    for (int q = 0; q < XQ; ++q) xs[warp + kWarps * q][lane] = to_acc(xv[q]);
#pragma unroll
    for (int q = 0; q < GQ; ++q) gs[gr + GL * q][gj] = gv[q];
    __syncthreads();
    if (t0 + BR < row_end) load(t0 + BR);
#pragma unroll
    for (int kk = 0; kk < XQ; ++kk) {
      const int i = warp * XQ + kk;
      const A x = xs[i][lane];
#pragma unroll
      for (int j = 0; j < RT; j += 4) {  // gs[i][j..j+3]: broadcast
        A g[4];
        lds4(&gs[i][j], g);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j + e] += g[e] * x;
      }
    }
  }

  constexpr int CS = BC + 1;
  static_assert(RT * CS <= BR * RS, "the partial tile must fit in the G tile");
  A* cs = &gs[0][0];  // cs[rank * CS + column]
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int j = 0; j < RT; ++j) cs[j * CS + lane] = (w ? cs[j * CS + lane] : A(0)) + acc[j];
    }
    __syncthreads();
  }
  const int64_t c_base = int64_t(blockIdx.x) * BC;
  for (int e = tid; e < RT * BC; e += kThreads) {
    const int j = e / BC, cc = e % BC;
    if (j0 + j < r && c_base + cc < K) ws[(int64_t(blockIdx.y) * r + j0 + j) * K + c_base + cc] = cs[j * CS + cc];
  }
}

// out[j, c] = scale · Σ_split ws[split, j, c], in a fixed order, cast to the output dtype.
template <typename T>
__global__ void __launch_bounds__(kThreads)
reduce_splits_kernel(const acc_t<T>* __restrict__ ws, int64_t splits, T* __restrict__ out, int64_t o_sj,
                     int64_t o_sc, int64_t r, int64_t K, acc_t<T> scale) {
  const int64_t n = r * K;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    acc_t<T> s = 0;
    for (int64_t t = 0; t < splits; ++t) s += ws[t * n + e];
    store(out + (e / K) * o_sj + (e % K) * o_sc, s * scale);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: dtype and rank-tile dispatch, grids, argument checks.
// ---------------------------------------------------------------------------------------------------------
// The smallest rank tile that holds r (ranks above 64 use several 64-wide tiles).
template <typename F>
void by_rank_tile(int64_t r, F&& f) {
  if (r <= 16) f(std::integral_constant<int, 16>{});
  else if (r <= 32) f(std::integral_constant<int, 32>{});
  else f(std::integral_constant<int, 64>{});
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
unsigned grid_1d(int64_t n) {  // grid-stride kernels: enough blocks to fill the GPU, at least one
  const int64_t b = ceil_div(n, kThreads);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 8192 ? 8192 : b));
}
bool valid_p(double p) { return p >= 0.0 && p < 1.0; }
Dropout make_dropout(double p, uint32_t seed) { return Dropout{seed, dropout_threshold(p), p > 0.0}; }
constexpr int64_t kMaxGridX = 2147483647, kMaxGridYZ = 65535;

// Rows per split of grad_proj: aim at ~1024 blocks, at least 128 rows (one full tile) per split.
void splits_of(int64_t N, int64_t K, int64_t r, int64_t* splits, int64_t* rows_per_split) {
  const int64_t blocks_per_split = ceil_div(K, 32) * ceil_div(r, kFusedRank);
  int64_t s = ceil_div(1024, blocks_per_split > 0 ? blocks_per_split : 1);
  const int64_t max_s = ceil_div(N, 128);
  s = s < max_s ? s : max_s;
  s = s > 0 ? s : 1;
  *rows_per_split = ceil_div(ceil_div(N > 0 ? N : 1, s), 128) * 128;
  *splits = ceil_div(N > 0 ? N : 1, *rows_per_split);
}

}  // namespace

cudaError_t project(DType dtype, const void* X, int64_t ldx, const void* P, int64_t p_sj, int64_t p_sc,
                    const void* Q, int64_t q_sk, int64_t q_sj, void* out1, void* out2, int64_t N, int64_t K,
                    int64_t r, double alpha, double p, uint32_t seed, cudaStream_t stream) {
  if (N < 0 || K < 0 || r < 0 || !valid_p(p) || (Q != nullptr && out2 == nullptr)) return cudaErrorInvalidValue;
  if (N == 0 || r == 0) return cudaSuccess;
  if (ceil_div(N, 32) > kMaxGridX || ceil_div(r, kFusedRank) > kMaxGridYZ) return cudaErrorInvalidValue;
  const Dropout drop = make_dropout(p, seed);
  return by_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const T* q = static_cast<const T*>(Q);
    A* o1 = static_cast<A*>(out1);
    A* o2 = static_cast<A*>(out2);
    by_rank_tile(r, [&](auto rt) {
      constexpr int RT = decltype(rt)::value;
      const dim3 grid(static_cast<unsigned>(ceil_div(N, 32)), static_cast<unsigned>(ceil_div(r, RT)));
      project_kernel<T, RT><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(X), ldx, static_cast<const T*>(P), p_sj, p_sc, q, q_sk, q_sj, o1, o2, N, K, r, A(alpha / (1.0 - p)), drop);
    });
    if (q != nullptr && r > kFusedRank) {
      chain_kernel<T><<<grid_1d(N * r), kThreads, 0, stream>>>(o1, q, q_sk, q_sj, o2, N, r);
    }
    return cudaGetLastError();
  });
}

cudaError_t grad_x(DType dtype, const void* G, const void* A_, int64_t lda, const void* base, int64_t ld_base,
                   void* out, int64_t ld_out, int64_t N, int64_t K, int64_t r, double p, uint32_t seed,
                   cudaStream_t stream) {
  if (N < 0 || K < 0 || r < 0 || !valid_p(p)) return cudaErrorInvalidValue;
  if (N == 0 || K == 0) return cudaSuccess;
  if (ceil_div(N, 64) > kMaxGridX || ceil_div(K, 64) > kMaxGridYZ) return cudaErrorInvalidValue;
  const Dropout drop = make_dropout(p, seed);
  return by_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const dim3 grid(static_cast<unsigned>(ceil_div(N, 64)), static_cast<unsigned>(ceil_div(K, 64)));
    grad_x_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const A*>(G), static_cast<const T*>(A_), lda, static_cast<const T*>(base), ld_base, static_cast<T*>(out), ld_out, N, K, r, A(1.0 / (1.0 - p)), drop);
    return cudaGetLastError();
  });
}

int64_t grad_proj_workspace(int64_t N, int64_t K, int64_t r) {
  int64_t splits, rows;
  splits_of(N, K, r, &splits, &rows);
  return splits * r * K;
}

cudaError_t grad_proj(DType dtype, const void* G, const void* X, int64_t ldx, void* out, int64_t o_sj,
                      int64_t o_sc, void* workspace, int64_t N, int64_t K, int64_t r, double alpha, double p,
                      uint32_t seed, cudaStream_t stream) {
  if (N < 0 || K < 0 || r < 0 || !valid_p(p)) return cudaErrorInvalidValue;
  if (K == 0 || r == 0) return cudaSuccess;
  if (ceil_div(K, 32) > kMaxGridX || ceil_div(r, kFusedRank) > kMaxGridYZ) return cudaErrorInvalidValue;
  int64_t splits, rows_per_split;
  splits_of(N, K, r, &splits, &rows_per_split);
  const Dropout drop = make_dropout(p, seed);
  return by_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* ws = static_cast<A*>(workspace);
    by_rank_tile(r, [&](auto rt) {
      constexpr int RT = decltype(rt)::value;
      const dim3 grid(static_cast<unsigned>(ceil_div(K, 32)), static_cast<unsigned>(splits), static_cast<unsigned>(ceil_div(r, RT)));
      grad_proj_kernel<T, RT><<<grid, kThreads, 0, stream>>>(static_cast<const A*>(G), static_cast<const T*>(X), ldx, ws, N, K, r, rows_per_split, drop);
    });
    reduce_splits_kernel<T><<<grid_1d(r * K), kThreads, 0, stream>>>(ws, splits, static_cast<T*>(out), o_sj, o_sc, r, K, A(alpha / (1.0 - p)));
    return cudaGetLastError();
  });
}

}  // namespace linchain_cuda
}  // namespace ntk
