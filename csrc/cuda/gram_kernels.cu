// CUDA kernel of ntk::gram_contract (see gram_kernels.h for the contract).  Torch-free: nvcc alone builds it.
//
// One block of 256 threads (8 warps) per pair (i, j); the block walks the pair's (t, s) plane in tiles of
// TT x SS and, per tile:
//   1. AA = A_i[t-tile] A_j[s-tile]ᵀ (TT x SS) into shared memory (aa, stored transposed: aa[s][t]), D
//      staged BD columns at a time through shared memory (ai, aj); for token ids AA = 1[id_t == id'_s].
//      The tile is computed once and reused for every c' and every e-chunk below.
//   2. for every c' and every BE-wide chunk of E: H = AA · G2[j, c', s-tile, e-chunk] (TT x BE, in
//      registers: a warp owns 4 rows t, a lane 1-2 columns e), G2 staged BS rows at a time through shared
//      memory (gs), the next stage prefetched into registers during the FMAs.  H goes to shared memory (hs).
//   3. K[c, c'] += ⟨G1[i, c, t-tile, e-chunk], H⟩ for every c (full) or c = c' (diagonal, trace): a warp
//      reduces its slice of the TT·BE products with a butterfly of __shfl_sync, and one fixed thread adds
//      the warp sums, in warp order, into the output element (global memory: out[i, j] belongs to this block
//      alone; the trace stays in thread 0's register until the end).
// No float atomics and no cross-block reduction: every output element has one writer thread, and the order of
// every addition is fixed by the tile loops, so results are bitwise reproducible.
//
// Costs per pair: T·S·D (AA) + C·T·S·E (H) + C²·T·E·⌈S/SS⌉ (full; C·T·E·⌈S/SS⌉ diagonal / trace) FMAs;
// the inner loops are CUDA-core FMAs fed by warp-uniform float4 (double2) broadcasts of AA rows and
// conflict-free loads of G2 rows: 1 vector + EPT scalar shared loads per 4·EPT FMAs.
// T = S = 1 is better served by two cuBLAS GEMMs ((a_i·a_j)(g_ic·g_jc')); gram_binding.cpp does that.
#include "gram_kernels.h"

#include "dtype_utils.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace ntk {
namespace gram_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using namespace cuda_common;  // dtype_utils.cuh: acc_t, to_acc, lds4, warp_sum, imin, by_dtype

// Tile sizes.  Static shared memory (48 KB at most): fp32 34 KB, fp64 43 KB.
template <typename A>
struct Tiles {
  static constexpr int TT = 32;                        // t rows of a tile: 4 per warp
  static constexpr int SS = 64;                        // s columns of a cached AA tile: 2 per lane
  static constexpr int BE = sizeof(A) == 8 ? 32 : 64;  // e columns of an H chunk: BE / 32 per lane
  static constexpr int BS = 16;                        // s rows of a staged G2 tile
  static constexpr int BD = sizeof(A) == 8 ? 16 : 32;  // d columns of a staged A tile
};

// How many warps share the reduction of one output element K[c, c'] (full mode): all 8 for C = 1, so that
// every warp has work, down to 1 for C >= 5 (warp w then owns c = w, w + 8, ...).
__host__ __device__ constexpr int warps_per_output(int64_t C) {
  return C <= 1 ? 8 : (C == 2 ? 4 : (C <= 4 ? 2 : 1));
}

// a1, a2: T features (AT = T) or int64 token ids (AT = int64_t).  Block b is pair p = pair0 + b, (i, j) =
// (p / J, p % J).  See the top of the file for the algorithm.
template <typename T, typename AT>
__global__ void __launch_bounds__(kThreads)
gram_kernel(const AT* __restrict__ a1, const T* __restrict__ g1, const AT* __restrict__ a2,
            const T* __restrict__ g2, acc_t<T>* __restrict__ out, int64_t pair0, int64_t J, int64_t C,
            int64_t Tn, int64_t Sn, int64_t D, int64_t E, int mode) {
  using A = acc_t<T>;
  using Tl = Tiles<A>;
  constexpr bool kIds = std::is_same<AT, int64_t>::value;
  constexpr int TT = Tl::TT, SS = Tl::SS, BE = Tl::BE, BS = Tl::BS, BD = Tl::BD;
  constexpr int TP = TT + 4;                    // row length of t-indexed tiles: 16-byte rows for lds4
  constexpr int SPT = SS / 32, EPT = BE / 32;   // s (AA) and e (H) columns per lane
  constexpr int AIQ = TT * BD / kThreads, AJQ = SS * BD / kThreads, GQ = BS * BE / kThreads;  // loads per thread
  constexpr int DR = kThreads / BD, ER = kThreads / BE;  // rows per loader pass
  static_assert(TT == 4 * kWarps && SS % 32 == 0 && BE % 32 == 0 && SS % BS == 0, "tile shape");
  static_assert(AIQ * kThreads == TT * BD && AJQ * kThreads == SS * BD && GQ * kThreads == BS * BE, "loaders");
  __shared__ __align__(16) A aa[SS][TP];   // AA tile, transposed: aa[s][t] = (A_i A_jᵀ)[t0 + t, s0 + s]
  __shared__ __align__(16) A ai[BD][TP];   // A_i tile, transposed: ai[d][t]
  __shared__ __align__(16) A aj[BD][SS];   // A_j tile, transposed: aj[d][s]
  __shared__ __align__(16) A gs[BS][BE];   // G2[j, c'] tile: gs[s][e]
  __shared__ __align__(16) A hs[TT * BE];  // H chunk: hs[t * BE + e]
  __shared__ A red[kWarps];                // warp sums of one output element

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t pair = pair0 + blockIdx.x, i = pair / J, j = pair % J;
  const int64_t a_row = kIds ? 1 : D;  // elements per row t of a1 / s of a2
  const AT* a1i = a1 + i * Tn * a_row;
  const AT* a2j = a2 + j * Sn * a_row;
  const T* g1i = g1 + i * C * Tn * E;
  const T* g2j = g2 + j * C * Sn * E;
  const int64_t per_pair = mode == kFull ? C * C : (mode == kDiagonal ? C : 1);
  A* const o = out + pair * per_pair;
  const int nwc = mode == kFull ? warps_per_output(C) : kWarps;

  if (mode != kTrace) {
    for (int64_t e = tid; e < per_pair; e += kThreads) o[e] = A(0);
  }
  __syncthreads();  // the zeros are visible to the threads that add to them
  A trace_sum = A(0);  // thread 0

  for (int64_t t0 = 0; t0 < Tn; t0 += TT) {
    const int tl = static_cast<int>(imin(TT, Tn - t0));
    const bool rows = 4 * warp < tl;  // this warp's rows t = 4·warp + q hold data (else its FMAs are skipped)
    for (int64_t s0 = 0; s0 < Sn; s0 += SS) {
      const int sl = static_cast<int>(imin(SS, Sn - s0));

      // ---- 1. aa[s][t] = (A_i A_jᵀ)[t0 + t, s0 + s] for t < TT, s < SS; zero outside tl x sl.
      // This thread: t = 4·warp + q, s = lane + 32·v.
      A acc[4][SPT];
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int v = 0; v < SPT; ++v) acc[q][v] = A(0);
      if constexpr (kIds) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int t = 4 * warp + q;
#pragma unroll
          for (int v = 0; v < SPT; ++v) {
            const int s = lane + 32 * v;
            acc[q][v] = (t < tl && s < sl && a1i[t0 + t] == a2j[s0 + s]) ? A(1) : A(0);
          }
        }
      } else {
        // Loader: column d0 + tid % BD, rows tid / BD + q·DR; out-of-range entries are zero.
        T xi[AIQ], xj[AJQ];
        auto load = [&](int64_t d0) {
          const int64_t d = d0 + tid % BD;
#pragma unroll
          for (int q = 0; q < AIQ; ++q) {
            const int r = tid / BD + q * DR;
            xi[q] = (r < tl && d < D) ? a1i[(t0 + r) * D + d] : T();
          }
#pragma unroll
          for (int q = 0; q < AJQ; ++q) {
            const int r = tid / BD + q * DR;
            xj[q] = (r < sl && d < D) ? a2j[(s0 + r) * D + d] : T();
          }
        };
        if (D > 0) load(0);
        for (int64_t d0 = 0; d0 < D; d0 += BD) {
          __syncthreads();  // the previous A tiles are consumed
#pragma unroll
          for (int q = 0; q < AIQ; ++q) ai[tid % BD][tid / BD + q * DR] = to_acc(xi[q]);
#pragma unroll
          for (int q = 0; q < AJQ; ++q) aj[tid % BD][tid / BD + q * DR] = to_acc(xj[q]);
          __syncthreads();
          if (d0 + BD < D) load(d0 + BD);  // in flight during the FMAs
          if (rows) {
#pragma unroll 4
            for (int d = 0; d < BD; ++d) {
              A x[4];
              lds4(&ai[d][4 * warp], x);  // warp-uniform: a broadcast
#pragma unroll
              for (int v = 0; v < SPT; ++v) {
                const A y = aj[d][lane + 32 * v];
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[q][v] += x[q] * y;
              }
            }
          }
        }
      }
      // Every thread has passed a barrier since its last read of aa (the one after the H chunk is stored).
#pragma unroll
      for (int v = 0; v < SPT; ++v)
#pragma unroll
        for (int q = 0; q < 4; ++q) aa[lane + 32 * v][4 * warp + q] = acc[q][v];
      __syncthreads();

      for (int64_t cp = 0; cp < C; ++cp) {
        const T* g2c = g2j + (cp * Sn + s0) * E;  // G2[j, c', s0 + s, e] at g2c[s * E + e]
        for (int64_t e0 = 0; e0 < E; e0 += BE) {
          const int el = static_cast<int>(imin(BE, E - e0));

          // ---- 2. H[t][e] = Σ_{s < sl} aa[s][t] · G2[j, c', s0 + s, e0 + e]; this thread: t = 4·warp + q,
          // e = lane + 32·u.  Loader: column e0 + tid % BE, rows sb + tid / BE + q·ER.
          T gv[GQ];
          auto load_g = [&](int sb) {
            const int e = tid % BE;
#pragma unroll
            for (int q = 0; q < GQ; ++q) {
              const int r = sb + tid / BE + q * ER;
              gv[q] = (r < sl && e < el) ? g2c[r * E + e0 + e] : T();
            }
          };
          A h[4][EPT];
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int u = 0; u < EPT; ++u) h[q][u] = A(0);
          load_g(0);
          for (int sb = 0; sb < sl; sb += BS) {
            __syncthreads();  // gs (previous stage) and hs (previous chunk's contraction) are consumed
#pragma unroll
            for (int q = 0; q < GQ; ++q) gs[tid / BE + q * ER][tid % BE] = to_acc(gv[q]);
            __syncthreads();
            if (sb + BS < sl) load_g(sb + BS);  // in flight during the FMAs
            if (rows) {
#pragma unroll 4
              for (int s = 0; s < BS; ++s) {
                A x[4];
                lds4(&aa[sb + s][4 * warp], x);  // warp-uniform: a broadcast
#pragma unroll
                for (int u = 0; u < EPT; ++u) {
                  const A y = gs[s][lane + 32 * u];
#pragma unroll
                  for (int q = 0; q < 4; ++q) h[q][u] += x[q] * y;
                }
              }
            }
          }
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int u = 0; u < EPT; ++u) hs[(4 * warp + q) * BE + lane + 32 * u] = h[q][u];
          __syncthreads();

          // ---- 3. K[c, c'] += Σ_{t < tl, e < el} G1[i, c, t0 + t, e0 + e] · hs[t][e].  A warp takes the
          // products k = part·32 + lane + n·32·parts of one c (the same trip count in every lane).
          auto dot = [&](int64_t c, int part, int parts) {
            const T* g = g1i + (c * Tn + t0) * E + e0;
            A p = A(0);
            for (int k = part * 32 + lane; k < tl * BE; k += 32 * parts) {
              const int t = k / BE, e = k % BE;
              if (e < el) p += to_acc(g[t * E + e]) * hs[k];
            }
            return warp_sum(p);
          };
          if (mode == kFull && nwc == 1) {  // C >= 5: warp w owns c = w, w + 8, ..., lane 0 adds
            for (int64_t c = warp; c < C; c += kWarps) {
              const A p = dot(c, 0, 1);
              if (lane == 0) o[c * C + cp] += p;
            }
          } else {  // nwc warps per output element; thread c adds their sums in warp order
            const int64_t c = mode == kFull ? warp / nwc : cp;
            const A p = c < C ? dot(c, warp % nwc, nwc) : A(0);
            if (lane == 0) red[warp] = p;
            __syncthreads();
            if (mode == kFull ? tid < C : tid == 0) {
              A sum = A(0);
              for (int w = 0; w < nwc; ++w) sum += red[tid * nwc + w];
              if (mode == kFull) o[tid * C + cp] += sum;
              else if (mode == kDiagonal) o[cp] += sum;
              else trace_sum += sum;
            }
          }
        }
      }
    }
  }
  if (mode == kTrace && tid == 0) o[0] = trace_sum;
}

// ---------------------------------------------------------------------------------------------------------
// Host side: dtype dispatch, grid, argument checks.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace

cudaError_t gram_contract(DType dtype, const void* a1, const void* g1, const void* a2, const void* g2, void* out,
                          bool ids, int64_t I, int64_t J, int64_t C, int64_t T, int64_t S, int64_t D, int64_t E,
                          int mode, cudaStream_t stream) {
  if (ids) D = 1;
  if (I < 0 || J < 0 || C < 0 || T < 0 || S < 0 || D < 0 || E < 0 || mode < kFull || mode > kTrace)
    return cudaErrorInvalidValue;
  const int64_t pairs = I * J;
  if (pairs == 0 || (mode != kTrace && C == 0)) return cudaSuccess;  // an empty output
  // every pointer read (numel > 0) or written must be valid
  if (out == nullptr || (a1 == nullptr && I * T * D > 0) || (a2 == nullptr && J * S * D > 0) ||
      (g1 == nullptr && I * C * T * E > 0) || (g2 == nullptr && J * C * S * E > 0))
    return cudaErrorInvalidValue;
  return by_dtype(dtype, [&](auto tag) {
    using T_ = typename decltype(tag)::type;
    using A = acc_t<T_>;
    const T_* x1 = static_cast<const T_*>(g1);
    const T_* x2 = static_cast<const T_*>(g2);
    A* o = static_cast<A*>(out);
    for (int64_t p0 = 0; p0 < pairs; p0 += kMaxGridX) {  // grid.x holds at most 2^31 - 1 blocks
      const unsigned n = static_cast<unsigned>(imin(kMaxGridX, pairs - p0));
      if (ids) {
        gram_kernel<T_, int64_t><<<n, kThreads, 0, stream>>>(static_cast<const int64_t*>(a1), x1, static_cast<const int64_t*>(a2), x2, o, p0, J, C, T, S, D, E, mode);
      } else {
        gram_kernel<T_, T_><<<n, kThreads, 0, stream>>>(static_cast<const T_*>(a1), x1, static_cast<const T_*>(a2), x2, o, p0, J, C, T, S, D, E, mode);
      }
    }
    return cudaGetLastError();
  });
}

}  // namespace gram_cuda
}  // namespace ntk
