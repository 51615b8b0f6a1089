// CUDA kernels of ntk::linear_jvp and ntk::layer_norm_jvp (see jvp_kernels.h for the contract).  Torch-free:
// nvcc alone builds it.
//
// linear_jvp (fp32 / fp64) linear_jvp_kernel<T, XD, WD>: one block of 256 threads per (BM = 64) x (BN = 64) tile
//   of y and of ẏ; the block walks d_in in BK = 16 chunks, staging per chunk the x tile, the Wᵀ tile and (XD) the
//   ẋ tile, (WD) the Ẇᵀ tile in shared memory (converted to the accumulate type), then every thread adds its
//   4 x 4 outputs:
//     y += x Wᵀ,   ẏ += ẋ Wᵀ + x Ẇᵀ         (the x tile feeds y and x Ẇᵀ, the W tile y and ẋ Wᵀ: read once)
//   and the epilogue adds b and ḃ (per sample: the row's n) and writes both outputs in T.  With a per-sample Ẇ
//   the row tiles lie in one sample (⌈L / BM⌉ tiles per sample), so a block reads one Ẇ_n.  W and Ẇ are read
//   through strides; the staging loop walks k fastest when the k stride is 1, else o fastest (coalesced for
//   both nn.Linear's W and Conv1D's Wᵀ view).  CUDA-core FMAs; about 2·M·O·K·(1 + XD + WD) FLOPs.
// linear_jvp (fp16 / bf16) linear_jvp_tc_kernel<T, XD, WD>: the same on tensor cores (nvcuda::wmma 16 x 16 x 16,
//   fp32 accumulators) in 64 x 128 tiles, see below.  Neither kernel pipelines its loads (no cp.async, no double
//   buffering): first versions, untuned (benchmarks/gpu_check_jvp.py times them).
// layer_norm_jvp_kernel<T>: one warp per row (8 rows per block), lanes strided over D, warp-shuffle sums:
//   pass 1  LayerNorm Σx, Σẋ;  RMSNorm Σx², Σẋx
//   pass 2  LayerNorm only: Σ(x − μ)², Σẋ(x − μ)   (centred: no cancellation)
//   pass 3  y = x̂ w + b,  ẏ = x̂̇ w + x̂ ẇ + ḃ
//   The second and third reads of a row mostly hit L1 / L2 (a row of 4096 fp32 is 16 KB).
// Deterministic: every output element has one writer and a fixed order of additions.
#include "jvp_kernels.h"

#include "dtype_utils.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>

#include <type_traits>

namespace ntk {
namespace jvp_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using namespace cuda_common;  // dtype_utils.cuh: acc_t, to_acc, from_acc, sqrt_acc, warp_sum, imin, by_dtype

// ---------------------------------------------------------------------------------------------------------
// linear_jvp
// ---------------------------------------------------------------------------------------------------------
constexpr int BM = 64, BN = 64, BK = 16;
constexpr int TM = 4, TN = 4;           // outputs per thread: rows 4·ty + i, columns 4·tx + j
constexpr int kLoads = BM * BK / kThreads;  // elements of one staged tile per thread (BM = BN)
static_assert(BM == BN && BM * BK == kLoads * kThreads && (BM / TM) * (BN / TN) == kThreads, "tile shape");

// The (bm x bn) output tile of block (blockIdx.x, blockIdx.y) = (row tile, column tile) of both linear_jvp kernels.
// sample_tiles: row tile t holds rows l = (t % tiles_per_sample)·bm + r of sample n = t / tiles_per_sample (a
// per-sample Ẇ); else rows t·bm + r (n = 0).  Row r of the tile is global row m0 + r, valid for r < rows; column c
// is o0 + c, valid for c < cols.
struct Tile {
  int64_t n, m0, rows, o0, cols;
};
__device__ __forceinline__ Tile block_tile(int bm, int bn, int64_t M, int64_t L, int64_t O, bool sample_tiles,
                                           int64_t tiles_per_sample) {
  const int64_t tile = blockIdx.x, o0 = int64_t(blockIdx.y) * bn, cols = imin(bn, O - o0);
  if (sample_tiles) {
    const int64_t n = tile / tiles_per_sample, l0 = (tile % tiles_per_sample) * bm;
    return {n, n * L + l0, imin(bm, L - l0), o0, cols};
  }
  return {0, tile * bm, imin(bm, M - tile * bm), o0, cols};
}

// One block per (BM x BN) output tile (block_tile).
template <typename T, bool XD, bool WD>
__global__ void __launch_bounds__(kThreads)
linear_jvp_kernel(const T* __restrict__ x, const T* __restrict__ xd, const T* __restrict__ w,
                  const T* __restrict__ wd, const T* __restrict__ b, const T* __restrict__ bd, T* __restrict__ y,
                  T* __restrict__ yd, int64_t M, int64_t L, int64_t K, int64_t O, int64_t sw_o, int64_t sw_k,
                  int64_t swd_n, int64_t swd_o, int64_t swd_k, bool sample_tiles, int64_t tiles_per_sample,
                  bool bd_per_sample) {
  using A = acc_t<T>;
  __shared__ __align__(16) A xs[BK][BM + 4];   // x tile, transposed: xs[k][r]
  __shared__ __align__(16) A xds[BK][BM + 4];  // ẋ tile (XD)
  __shared__ __align__(16) A ws[BK][BN + 4];   // Wᵀ tile: ws[k][c] = W[o0 + c, k0 + k]
  __shared__ __align__(16) A wds[BK][BN + 4];  // Ẇᵀ tile (WD)

  const int tid = threadIdx.x, ty = tid / (BN / TN), tx = tid % (BN / TN);
  const Tile tile = block_tile(BM, BN, M, L, O, sample_tiles, tiles_per_sample);
  const int64_t m0 = tile.m0, o0 = tile.o0, rows_in_tile = tile.rows, cols_in_tile = tile.cols;
  const T* wdn = WD ? wd + tile.n * swd_n : nullptr;
  const bool w_k_fast = sw_k == 1, wd_k_fast = swd_k == 1;

  A acc[TM][TN], accd[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = A(0), accd[i][j] = A(0);

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    const int64_t kl = imin(BK, K - k0);
    __syncthreads();  // the previous chunk's tiles are consumed
#pragma unroll
    for (int q = 0; q < kLoads; ++q) {
      const int e = tid + q * kThreads;
      {  // x, ẋ: k fastest (rows are contiguous)
        const int r = e / BK, k = e % BK;
        const bool ok = r < rows_in_tile && k < kl;
        const int64_t off = (m0 + r) * K + k0 + k;
        xs[k][r] = ok ? to_acc(x[off]) : A(0);
        if constexpr (XD) xds[k][r] = ok ? to_acc(xd[off]) : A(0);
      }
      {  // Wᵀ: k fastest for a row-major W, else o fastest
        const int c = w_k_fast ? e / BK : e % BN, k = w_k_fast ? e % BK : e / BN;
        ws[k][c] = (c < cols_in_tile && k < kl) ? to_acc(w[(o0 + c) * sw_o + (k0 + k) * sw_k]) : A(0);
      }
      if constexpr (WD) {
        const int c = wd_k_fast ? e / BK : e % BN, k = wd_k_fast ? e % BK : e / BN;
        wds[k][c] = (c < cols_in_tile && k < kl) ? to_acc(wdn[(o0 + c) * swd_o + (k0 + k) * swd_k]) : A(0);
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      A a[TM], bw[TN], ad[TM], bwd[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        a[i] = xs[k][TM * ty + i];
        if constexpr (XD) ad[i] = xds[k][TM * ty + i];
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        bw[j] = ws[k][TN * tx + j];
        if constexpr (WD) bwd[j] = wds[k][TN * tx + j];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          acc[i][j] += a[i] * bw[j];
          if constexpr (XD) accd[i][j] += ad[i] * bw[j];
          if constexpr (WD) accd[i][j] += a[i] * bwd[j];
        }
    }
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int r = TM * ty + i;
    if (r >= rows_in_tile) continue;
    const int64_t m = m0 + r, n = m / L;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int c = TN * tx + j;
      if (c >= cols_in_tile) continue;
      const int64_t o = o0 + c;
      A v = acc[i][j], vd = accd[i][j];
      if (b != nullptr) v += to_acc(b[o]);
      if (bd != nullptr) vd += to_acc(bd[bd_per_sample ? n * O + o : o]);
      y[m * O + o] = from_acc<T>(v);
      yd[m * O + o] = from_acc<T>(vd);
    }
  }
}

template <typename T, bool XD, bool WD>
void launch_linear(dim3 grid, cudaStream_t stream, const T* x, const T* xd, const T* w, const T* wd, const T* b,
                   const T* bd, T* y, T* yd, int64_t M, int64_t L, int64_t K, int64_t O, int64_t sw_o, int64_t sw_k,
                   int64_t swd_n, int64_t swd_o, int64_t swd_k, bool sample_tiles, int64_t tiles_per_sample,
                   bool bd_ps) {
  linear_jvp_kernel<T, XD, WD><<<grid, kThreads, 0, stream>>>(x, xd, w, wd, b, bd, y, yd, M, L, K, O, sw_o, sw_k, swd_n, swd_o, swd_k, sample_tiles, tiles_per_sample, bd_ps);
}

// ---- fp16 / bf16 on tensor cores (nvcuda::wmma, sm_80+ for bf16): the same algorithm in 64 x 128 tiles.
// 8 warps as 2 (rows) x 4 (columns), a warp owns 32 x 32 of y and of ẏ (2 x 2 fragments of 16 x 16 each, fp32).
// Per BK = 16 chunk the x, ẋ tiles (row-major matrix_a) and the W, Ẇ tiles (stored [o][k]: a col-major
// matrix_b = Wᵀ) are staged in shared memory in T; a warp loads each x fragment once for x Wᵀ and x Ẇᵀ and each W
// fragment once for x Wᵀ and ẋ Wᵀ.  The epilogue passes each accumulator fragment through a per-warp 16 x 16
// fp32 scratch tile to add b / ḃ and convert.  Built for an arch without bf16 wmma (< sm_80) the kernel falls
// back to a plain per-thread loop over k (correct, slow).
namespace tc {
constexpr int BM = 64, BN = 128, BK = 16;
constexpr int LDS = BK + 8;        // staged row length in elements: 48 bytes (a 16-byte multiple, as wmma needs)
constexpr int WM = 32, WN = 32;    // warp tile
constexpr int FM = WM / 16, FN = WN / 16;
constexpr int SCR = 16 + 4;        // scratch row length in floats (80 bytes)
constexpr int kLoadsX = BM * BK / kThreads, kLoadsW = BN * BK / kThreads;
static_assert((BM / WM) * (BN / WN) == kWarps && kLoadsX * kThreads == BM * BK && kLoadsW * kThreads == BN * BK,
              "tc tile shape");
}  // namespace tc

template <typename T, bool XD, bool WD>
__global__ void __launch_bounds__(kThreads)
linear_jvp_tc_kernel(const T* __restrict__ x, const T* __restrict__ xd, const T* __restrict__ w,
                     const T* __restrict__ wd, const T* __restrict__ b, const T* __restrict__ bd, T* __restrict__ y,
                     T* __restrict__ yd, int64_t M, int64_t L, int64_t K, int64_t O, int64_t sw_o, int64_t sw_k,
                     int64_t swd_n, int64_t swd_o, int64_t swd_k, bool sample_tiles, int64_t tiles_per_sample,
                     bool bd_per_sample) {
  constexpr int BM = tc::BM, BN = tc::BN, BK = tc::BK, LDS = tc::LDS, WM = tc::WM, WN = tc::WN, FM = tc::FM,
                FN = tc::FN, SCR = tc::SCR, kLoadsX = tc::kLoadsX, kLoadsW = tc::kLoadsW;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const Tile tile = block_tile(BM, BN, M, L, O, sample_tiles, tiles_per_sample);
  const int64_t m0 = tile.m0, o0 = tile.o0, rows_in_tile = tile.rows, cols_in_tile = tile.cols;
  const T* wdn = WD ? wd + tile.n * swd_n : nullptr;
  // writes v + (bias) to out[m0 + r, o0 + c]; vector: b, or ḃ (per sample: the row's n)
  auto put = [&](T* out, const T* vec, bool per_sample, int r, int c, float v) {
    if (r >= rows_in_tile || c >= cols_in_tile) return;
    const int64_t m = m0 + r, o = o0 + c;
    if (vec != nullptr) v += to_acc(vec[per_sample ? (m / L) * O + o : o]);
    out[m * O + o] = from_acc<T>(v);
  };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wm = nvcuda::wmma;
  __shared__ __align__(32) T xs[BM][LDS];   // x tile: xs[r][k]
  __shared__ __align__(32) T xds[BM][LDS];  // ẋ tile (XD)
  __shared__ __align__(32) T ws[BN][LDS];   // W tile: ws[c][k] = W[o0 + c, k0 + k] (Wᵀ col-major)
  __shared__ __align__(32) T wds[BN][LDS];  // Ẇ tile (WD)
  __shared__ __align__(32) float scratch[kWarps][16][SCR];
  const int wr = (warp / (BN / WN)) * WM, wc = (warp % (BN / WN)) * WN;  // this warp's corner in the tile
  const bool w_k_fast = sw_k == 1, wd_k_fast = swd_k == 1;
  const T zero = from_acc<T>(0.0f);

  wm::fragment<wm::accumulator, 16, 16, 16, float> cy[FM][FN], cyd[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wm::fill_fragment(cy[i][j], 0.0f);
      wm::fill_fragment(cyd[i][j], 0.0f);
    }

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    const int64_t kl = imin(BK, K - k0);
    __syncthreads();  // the previous chunk's tiles are consumed
#pragma unroll
    for (int q = 0; q < kLoadsX; ++q) {
      const int e = tid + q * kThreads, r = e / BK, k = e % BK;
      const bool ok = r < rows_in_tile && k < kl;
      const int64_t off = (m0 + r) * K + k0 + k;
      xs[r][k] = ok ? x[off] : zero;
      if constexpr (XD) xds[r][k] = ok ? xd[off] : zero;
    }
#pragma unroll
    for (int q = 0; q < kLoadsW; ++q) {
      const int e = tid + q * kThreads;
      {
        const int c = w_k_fast ? e / BK : e % BN, k = w_k_fast ? e % BK : e / BN;
        ws[c][k] = (c < cols_in_tile && k < kl) ? w[(o0 + c) * sw_o + (k0 + k) * sw_k] : zero;
      }
      if constexpr (WD) {
        const int c = wd_k_fast ? e / BK : e % BN, k = wd_k_fast ? e % BK : e / BN;
        wds[c][k] = (c < cols_in_tile && k < kl) ? wdn[(o0 + c) * swd_o + (k0 + k) * swd_k] : zero;
      }
    }
    __syncthreads();
    wm::fragment<wm::matrix_a, 16, 16, 16, T, wm::row_major> a[FM], ad[FM];
    wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::col_major> bw[FN], bwd[FN];
#pragma unroll
    for (int i = 0; i < FM; ++i) {
      wm::load_matrix_sync(a[i], &xs[wr + 16 * i][0], LDS);
      if constexpr (XD) wm::load_matrix_sync(ad[i], &xds[wr + 16 * i][0], LDS);
    }
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wm::load_matrix_sync(bw[j], &ws[wc + 16 * j][0], LDS);
      if constexpr (WD) wm::load_matrix_sync(bwd[j], &wds[wc + 16 * j][0], LDS);
    }
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wm::mma_sync(cy[i][j], a[i], bw[j], cy[i][j]);
        if constexpr (XD) wm::mma_sync(cyd[i][j], ad[i], bw[j], cyd[i][j]);
        if constexpr (WD) wm::mma_sync(cyd[i][j], a[i], bwd[j], cyd[i][j]);
      }
  }

  float* sc = &scratch[warp][0][0];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wm::store_matrix_sync(sc, cy[i][j], SCR, wm::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) put(y, b, false, wr + 16 * i + e / 16, wc + 16 * j + e % 16, sc[(e / 16) * SCR + e % 16]);
      __syncwarp();  // read before the next store
      wm::store_matrix_sync(sc, cyd[i][j], SCR, wm::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) put(yd, bd, bd_per_sample, wr + 16 * i + e / 16, wc + 16 * j + e % 16, sc[(e / 16) * SCR + e % 16]);
      __syncwarp();
    }
#else
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    if (r >= rows_in_tile || c >= cols_in_tile) continue;
    const int64_t m = m0 + r, o = o0 + c;
    float v = 0.0f, vd = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float xv = to_acc(x[m * K + k]), wv = to_acc(w[o * sw_o + k * sw_k]);
      v += xv * wv;
      if (XD) vd += to_acc(xd[m * K + k]) * wv;
      if (WD) vd += xv * to_acc(wdn[o * swd_o + k * swd_k]);
    }
    put(y, b, false, r, c, v);
    put(yd, bd, bd_per_sample, r, c, vd);
  }
#endif
}

template <typename T, bool XD, bool WD>
void launch_linear_tc(dim3 grid, cudaStream_t stream, const T* x, const T* xd, const T* w, const T* wd, const T* b,
                      const T* bd, T* y, T* yd, int64_t M, int64_t L, int64_t K, int64_t O, int64_t sw_o,
                      int64_t sw_k, int64_t swd_n, int64_t swd_o, int64_t swd_k, bool sample_tiles,
                      int64_t tiles_per_sample, bool bd_ps) {
  linear_jvp_tc_kernel<T, XD, WD><<<grid, kThreads, 0, stream>>>(x, xd, w, wd, b, bd, y, yd, M, L, K, O, sw_o, sw_k, swd_n, swd_o, swd_k, sample_tiles, tiles_per_sample, bd_ps);
}

// ---------------------------------------------------------------------------------------------------------
// layer_norm_jvp
// ---------------------------------------------------------------------------------------------------------
// Row m = blockIdx.x·kWarps + warp; a warp whose row is past M returns at once (no block barrier is used).
template <typename T>
__global__ void __launch_bounds__(kThreads)
layer_norm_jvp_kernel(const T* __restrict__ x, const T* __restrict__ xd, const T* __restrict__ w,
                      const T* __restrict__ b, const T* __restrict__ wd, const T* __restrict__ bd, T* __restrict__ y,
                      T* __restrict__ yd, int64_t M, int64_t L, int64_t D, acc_t<T> eps, bool rms, bool wd_ps,
                      bool bd_ps) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t m = int64_t(blockIdx.x) * kWarps + warp;
  if (m >= M) return;
  const int64_t n = m / L;
  const T* xr = x + m * D;
  const T* xdr = xd != nullptr ? xd + m * D : nullptr;
  const T* wdr = wd != nullptr ? wd + (wd_ps ? n * D : 0) : nullptr;
  const T* bdr = bd != nullptr ? bd + (bd_ps ? n * D : 0) : nullptr;
  const A inv_d = A(1) / A(D);

  A s1 = A(0), s2 = A(0);
  for (int64_t d = lane; d < D; d += 32) {
    const A v = to_acc(xr[d]), vd = xdr != nullptr ? to_acc(xdr[d]) : A(0);
    if (rms) {
      s1 += v * v;
      s2 += vd * v;
    } else {
      s1 += v;
      s2 += vd;
    }
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  A mean = A(0), mxd = A(0), rstd, proj;
  if (rms) {
    rstd = A(1) / sqrt_acc(s1 * inv_d + eps);
    proj = s2 * inv_d * rstd;  // mean(ẋ ⊙ x̂)
  } else {
    mean = s1 * inv_d;
    mxd = s2 * inv_d;
    A s3 = A(0), s4 = A(0);
    for (int64_t d = lane; d < D; d += 32) {
      const A c = to_acc(xr[d]) - mean;
      s3 += c * c;
      if (xdr != nullptr) s4 += to_acc(xdr[d]) * c;
    }
    s3 = warp_sum(s3);
    s4 = warp_sum(s4);
    rstd = A(1) / sqrt_acc(s3 * inv_d + eps);
    proj = s4 * inv_d * rstd;
  }
  T* yr = y + m * D;
  T* ydr = yd + m * D;
  for (int64_t d = lane; d < D; d += 32) {
    const A xh = (to_acc(xr[d]) - mean) * rstd;
    const A wv = w != nullptr ? to_acc(w[d]) : A(1);
    A v = xh * wv, vd = A(0);
    if (b != nullptr) v += to_acc(b[d]);
    if (xdr != nullptr) vd += (to_acc(xdr[d]) - mxd - xh * proj) * rstd * wv;
    if (wdr != nullptr) vd += xh * to_acc(wdr[d]);
    if (bdr != nullptr) vd += to_acc(bdr[d]);
    yr[d] = from_acc<T>(v);
    ydr[d] = from_acc<T>(vd);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: dtype dispatch, grids, argument checks.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kMaxGridX = 2147483647, kMaxGridY = 65535;

}  // namespace

cudaError_t linear_jvp(DType dtype, const void* x, const void* x_dot, const void* w, const void* w_dot,
                       const void* b, const void* b_dot, void* y, void* y_dot, int64_t N, int64_t L, int64_t K,
                       int64_t O, int64_t sw_o, int64_t sw_k, int64_t swd_n, int64_t swd_o, int64_t swd_k,
                       bool w_dot_per_sample, bool b_dot_per_sample, cudaStream_t stream) {
  if (N < 0 || L < 0 || K < 0 || O < 0) return cudaErrorInvalidValue;
  const int64_t M = N * L;
  if (M == 0 || O == 0) return cudaSuccess;  // an empty output
  if (y == nullptr || y_dot == nullptr || (K > 0 && (x == nullptr || w == nullptr))) return cudaErrorInvalidValue;
  const bool sample_tiles = w_dot != nullptr && w_dot_per_sample;
  if (w_dot == nullptr || !w_dot_per_sample) swd_n = 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr bool kTensorCores = sizeof(T) == 2;  // fp16, bf16
    const int64_t bm = kTensorCores ? tc::BM : BM, bn = kTensorCores ? tc::BN : BN;
    const int64_t tiles_per_sample = (L + bm - 1) / bm;
    const int64_t row_tiles = sample_tiles ? N * tiles_per_sample : (M + bm - 1) / bm;
    const int64_t col_tiles = (O + bn - 1) / bn;
    if (row_tiles > kMaxGridX || col_tiles > kMaxGridY) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
    const T *px = static_cast<const T*>(x), *pxd = static_cast<const T*>(x_dot), *pw = static_cast<const T*>(w),
            *pwd = static_cast<const T*>(w_dot), *pb = static_cast<const T*>(b), *pbd = static_cast<const T*>(b_dot);
    T *py = static_cast<T*>(y), *pyd = static_cast<T*>(y_dot);
    const bool xd = pxd != nullptr && K > 0, wd = pwd != nullptr && K > 0;
    auto go = [&](auto xd_tag, auto wd_tag) {
      constexpr bool XD = decltype(xd_tag)::value, WD = decltype(wd_tag)::value;
      if constexpr (kTensorCores) {
        launch_linear_tc<T, XD, WD>(grid, stream, px, pxd, pw, pwd, pb, pbd, py, pyd, M, L, K, O, sw_o, sw_k, swd_n,
                                    swd_o, swd_k, sample_tiles, tiles_per_sample, b_dot_per_sample);
      } else {
        launch_linear<T, XD, WD>(grid, stream, px, pxd, pw, pwd, pb, pbd, py, pyd, M, L, K, O, sw_o, sw_k, swd_n,
                                 swd_o, swd_k, sample_tiles, tiles_per_sample, b_dot_per_sample);
      }
    };
    if (xd && wd) go(std::true_type{}, std::true_type{});
    else if (xd) go(std::true_type{}, std::false_type{});
    else if (wd) go(std::false_type{}, std::true_type{});
    else go(std::false_type{}, std::false_type{});
    return cudaGetLastError();
  });
}

cudaError_t layer_norm_jvp(DType dtype, const void* x, const void* x_dot, const void* w, const void* b,
                           const void* w_dot, const void* b_dot, void* y, void* y_dot, int64_t N, int64_t L,
                           int64_t D, double eps, bool rms, bool w_dot_per_sample, bool b_dot_per_sample,
                           cudaStream_t stream) {
  if (N < 0 || L < 0 || D < 0 || !(eps >= 0)) return cudaErrorInvalidValue;
  const int64_t M = N * L;
  if (M == 0 || D == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr || y_dot == nullptr) return cudaErrorInvalidValue;
  const int64_t blocks = (M + kWarps - 1) / kWarps;
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    layer_norm_jvp_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(x_dot), static_cast<const T*>(w), static_cast<const T*>(b), static_cast<const T*>(w_dot), static_cast<const T*>(b_dot), static_cast<T*>(y), static_cast<T*>(y_dot), M, L, D, static_cast<A>(eps), rms, w_dot_per_sample, b_dot_per_sample);
    return cudaGetLastError();
  });
}

}  // namespace jvp_cuda
}  // namespace ntk
