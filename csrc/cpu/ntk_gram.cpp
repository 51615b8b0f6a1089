// ntk_cpu::gram_contract: the eNTK's token-Gram contraction on the CPU (contract: ntk_kernels/ops/ntk_gram.py).
//   K[i, j, c, c'] = Σ_{t,s} (A_i A_jᵀ)_{ts} ⟨G1[i,c,t,:], G2[j,c',s,:]⟩;  mode 0 full (I,J,C,C), 1 diagonal
//   (I,J,C), 2 trace (I,J).  float64 in float64, otherwise float32 (fp16 / bf16 are converted to fp32 first).
// Paths (no T x S x C x C product is formed by any of them):
//   outer        features, T = S = 1: K = (A1 A2ᵀ)_{ij} · (G1 G2ᵀ)_{(ic),(jc')}: two GEMMs and a product.
//   pairwise     features, per block of rows i and columns j: AA = A1_blk A2_blkᵀ (one GEMM); full: per
//                column j, H_j = AA_{:,j} G2_j (one GEMM) and K_ij = ⟨G1_i, H_ij⟩ per (c, c') by blocked dots
//                (C <= 2 with AVX2: one fused kernel per pair, H never stored); trace / diagonal: the (T, S)
//                Grams of G over C·E (per c for diagonal) in one GEMM per block, K_ij = Σ_ts AA ⊙ GG;
//                parallel over blocks, a few MiB of scratch per thread.
//   materialize  features: the per-sample gradients P_{n,c} = G_{n,c}ᵀ A_n (E x D), formed a chunk of rows e
//                at a time (a few MiB), their Gram accumulated chunk by chunk (one GEMM); P is never whole.
//   tokens       integer ids: per sample, G summed over equal ids (sorted unique ids, rows P (U, C, E));
//                K_ij = Σ over ids common to i and j of ⟨P_i[u], P_j[u']⟩, found through postings (side 2's
//                rows sorted by id): O(#ids · log + #matches · C²·E), never the T x S mask.
// Features take the cheaper of pairwise and materialize by a count of multiply-adds (outer when T = S = 1);
// NTK_KERNELS_GRAM_CPU_PATH=outer|pairwise|materialize forces one, NTK_KERNELS_GRAM_CPU_NO_AVX2=1 the
// portable kernels (tests).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

namespace {
using at::Tensor;

enum Mode : int64_t { kFull = 0, kDiagonal = 1, kTrace = 2 };
enum class Path { kAuto, kOuter, kPairwise, kMaterialize };

constexpr int64_t kScratchBytes = 4 << 20;  // pairwise: scratch per thread
constexpr int64_t kChunkBytes = 8 << 20;    // materialize: chunk of per-sample gradients
constexpr int64_t kRBytes = 64 << 20;       // materialize: the threads' partial results together
constexpr double kMinParallelWork = 1 << 21;  // parallel loops: at least ~2M multiply-adds

Path forced_path() {
  const char* s = std::getenv("NTK_KERNELS_GRAM_CPU_PATH");
  if (s == nullptr || *s == '\0' || !std::strcmp(s, "auto")) return Path::kAuto;
  if (!std::strcmp(s, "outer")) return Path::kOuter;
  if (!std::strcmp(s, "pairwise")) return Path::kPairwise;
  if (!std::strcmp(s, "materialize")) return Path::kMaterialize;
  TORCH_CHECK(false, "NTK_KERNELS_GRAM_CPU_PATH must be auto, outer, pairwise or materialize, got '", s, "'");
}

// f(t0, t1) over [0, ntasks) split across the intra-op threads, one contiguous range a thread.  Tasks run
// their ATen GEMMs single-threaded (MKL inside an OpenMP region).  at::parallel_for is compiled into the
// caller and, with torch's OpenMP backend, runs serially unless the caller is built with -fopenmp; without
// it, ATen's own compiled parallel_for is borrowed through TensorIterator::for_each over the task ids.
// work: multiply-adds (or similar) in all the tasks; below kMinParallelWork they run on the caller, as the
// wake-up of a thread team costs more than they do.
template <typename F>
void parallel_tasks(int64_t ntasks, int64_t grain, double work, const F& f) {
  if (ntasks <= grain || work < kMinParallelWork || at::get_num_threads() == 1 || at::in_parallel_region()) {
    if (ntasks > 0) f(0, ntasks);
    return;
  }
#ifdef INTRA_OP_PARALLEL
  at::parallel_for(0, ntasks, grain, f);
#else
  Tensor ids = at::arange(ntasks, at::TensorOptions().dtype(at::kLong));
  auto iter = at::TensorIteratorConfig().add_output(ids).add_const_input(ids).resize_outputs(false).build();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t n) {
        const int64_t* id = reinterpret_cast<const int64_t*>(data[0]);
        if (strides[0] == static_cast<int64_t>(sizeof(int64_t))) {
          f(id[0], id[0] + n);
        } else {
          for (int64_t k = 0; k < n; ++k) {
            const int64_t t = *reinterpret_cast<const int64_t*>(data[0] + k * strides[0]);
            f(t, t + 1);
          }
        }
      },
      grain);
#endif
}

std::vector<int64_t> out_shape(int64_t I, int64_t J, int64_t C, int64_t mode) {
  if (mode == kFull) return {I, J, C, C};
  if (mode == kDiagonal) return {I, J, C};
  return {I, J};
}

// ---------------------------------------------------------------------------------------------------------
// Dot products.  dot_block<RX, RY>: acc[a·RY + b] += Σ_k x[a][k] y[b][k] for a < RX, b < RY (RX, RY <= 2),
// so each load feeds two products.  The extension is built for baseline x86-64: an AVX2 + FMA version is
// chosen at run time where the CPU has it.
// ---------------------------------------------------------------------------------------------------------
template <int RX, int RY, typename T>
void dot_block_base(const T* const* x, const T* const* y, int64_t n, T* acc) {
  T s[RX][RY][4] = {};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int a = 0; a < RX; ++a)
      for (int b = 0; b < RY; ++b)
        for (int u = 0; u < 4; ++u) s[a][b][u] += x[a][k + u] * y[b][k + u];
  for (int a = 0; a < RX; ++a)
    for (int b = 0; b < RY; ++b) {
      T r = (s[a][b][0] + s[a][b][1]) + (s[a][b][2] + s[a][b][3]);
      for (int64_t q = k; q < n; ++q) r += x[a][q] * y[b][q];
      acc[a * RY + b] += r;
    }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NTK_GRAM_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
struct VecF {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
};
struct VecD {
  using V = __m256d;
  static constexpr int W = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static double sum(V v) {
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
};
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = VecF;
};
template <>
struct VecOf<double> {
  using type = VecD;
};

template <int RX, int RY, typename T>
void dot_block_avx2(const T* const* x, const T* const* y, int64_t n, T* acc) {
  using Vo = typename VecOf<T>::type;
  using V = typename Vo::V;
  constexpr int W = Vo::W;
  constexpr int U = (RX * RY == 1) ? 4 : 2;  // vectors per operand a step: 4 or 8 accumulators
  V s[RX][RY][U];
  for (int a = 0; a < RX; ++a)
    for (int b = 0; b < RY; ++b)
      for (int u = 0; u < U; ++u) s[a][b][u] = Vo::zero();
  int64_t k = 0;
  for (; k + U * W <= n; k += U * W) {
    V xv[RX][U], yv[RY][U];
    for (int u = 0; u < U; ++u) {
      for (int a = 0; a < RX; ++a) xv[a][u] = Vo::load(x[a] + k + u * W);
      for (int b = 0; b < RY; ++b) yv[b][u] = Vo::load(y[b] + k + u * W);
    }
    for (int a = 0; a < RX; ++a)
      for (int b = 0; b < RY; ++b)
        for (int u = 0; u < U; ++u) s[a][b][u] = Vo::fma(xv[a][u], yv[b][u], s[a][b][u]);
  }
  for (; k + W <= n; k += W)
    for (int a = 0; a < RX; ++a)
      for (int b = 0; b < RY; ++b) s[a][b][0] = Vo::fma(Vo::load(x[a] + k), Vo::load(y[b] + k), s[a][b][0]);
  for (int a = 0; a < RX; ++a)
    for (int b = 0; b < RY; ++b) {
      V v = s[a][b][0];
      for (int u = 1; u < U; ++u) v = Vo::add(v, s[a][b][u]);
      T r = Vo::sum(v);
      for (int64_t q = k; q < n; ++q) r += x[a][q] * y[b][q];
      acc[a * RY + b] += r;
    }
}

// One pair of the full mode, H never stored:  K[c, c'] = Σ_t Σ_e G1[c, t, e] H[t, c', e] with
// H[t, c', e] = Σ_s aa[t·ld + s] G2[s, c', e].  g1 (C, T, E), g2 (S, C, E); R rows t at a time share the
// loads of G2, 2 vectors of e at a time; acc: scratch of C·C·2W, out: C·C.
template <int R, typename T>
void fused_rows_avx2(const T* aa, int64_t ld, const T* g1, const T* g2, int64_t t0, int64_t Tn, int64_t S,
                     int64_t C, int64_t E, T* acc, T* out) {
  using Vo = typename VecOf<T>::type;
  using V = typename Vo::V;
  constexpr int W = Vo::W;
  const int64_t Ev = E - E % (2 * W);
  for (int64_t e0 = 0; e0 < Ev; e0 += 2 * W)
    for (int64_t d = 0; d < C; ++d) {
      V h[R][2];
      for (int r = 0; r < R; ++r) h[r][0] = h[r][1] = Vo::zero();
      for (int64_t s = 0; s < S; ++s) {
        const T* gp = g2 + (s * C + d) * E + e0;
        const V ga = Vo::load(gp), gb = Vo::load(gp + W);
        for (int r = 0; r < R; ++r) {
          const V a = Vo::bcast(aa + (t0 + r) * ld + s);
          h[r][0] = Vo::fma(a, ga, h[r][0]);
          h[r][1] = Vo::fma(a, gb, h[r][1]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        T* ap = acc + (c * C + d) * 2 * W;
        V sa = Vo::load(ap), sb = Vo::load(ap + W);
        for (int r = 0; r < R; ++r) {
          const T* xp = g1 + (c * Tn + t0 + r) * E + e0;
          sa = Vo::fma(Vo::load(xp), h[r][0], sa);
          sb = Vo::fma(Vo::load(xp + W), h[r][1], sb);
        }
        Vo::store(ap, sa);
        Vo::store(ap + W, sb);
      }
    }
  for (int64_t e = Ev; e < E; ++e)
    for (int64_t d = 0; d < C; ++d)
      for (int r = 0; r < R; ++r) {
        T hs = 0;
        for (int64_t s = 0; s < S; ++s) hs += aa[(t0 + r) * ld + s] * g2[(s * C + d) * E + e];
        for (int64_t c = 0; c < C; ++c) out[c * C + d] += g1[(c * Tn + t0 + r) * E + e] * hs;
      }
}

template <typename T>
void fused_pair_avx2(const T* aa, int64_t ld, const T* g1, const T* g2, int64_t Tn, int64_t S, int64_t C,
                     int64_t E, T* acc, T* out) {
  using Vo = typename VecOf<T>::type;
  constexpr int W = Vo::W;
  std::fill(acc, acc + C * C * 2 * W, T(0));
  std::fill(out, out + C * C, T(0));
  int64_t t = 0;
  for (; t + 4 <= Tn; t += 4) fused_rows_avx2<4>(aa, ld, g1, g2, t, Tn, S, C, E, acc, out);
  for (; t < Tn; ++t) fused_rows_avx2<1>(aa, ld, g1, g2, t, Tn, S, C, E, acc, out);
  for (int64_t k = 0; k < C * C; ++k)
    out[k] += Vo::sum(Vo::add(Vo::load(acc + k * 2 * W), Vo::load(acc + k * 2 * W + W)));
}
#pragma GCC pop_options

const bool kHasAvx2 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}();
#endif

// Per call: the AVX2 kernels unless NTK_KERNELS_GRAM_CPU_NO_AVX2=1 (tests of the portable code).
std::atomic<bool> g_use_avx2{false};

template <int RX, int RY, typename T>
inline void dot_block(const T* const* x, const T* const* y, int64_t n, T* acc) {
#ifdef NTK_GRAM_AVX2
  if (g_use_avx2.load(std::memory_order_relaxed)) return dot_block_avx2<RX, RY, T>(x, y, n, acc);
#endif
  dot_block_base<RX, RY, T>(x, y, n, acc);
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
  dot_block<1, 1, T>(&a, &b, n, &acc);
  return acc;
}

bool same_tensor(const Tensor& x, const Tensor& y) {
  return x.data_ptr() == y.data_ptr() && x.sizes() == y.sizes() && x.strides() == y.strides() &&
         x.scalar_type() == y.scalar_type();
}

// ---------------------------------------------------------------------------------------------------------
// outer: T = S = 1.  A (N, 1, D), G (N, C, 1, E), compute dtype, contiguous.
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t>
void outer_path(const Tensor& A1, const Tensor& G1, const Tensor& A2, const Tensor& G2, int64_t mode, Tensor& out) {
  const int64_t I = G1.size(0), C = G1.size(1), E = G1.size(3), J = G2.size(0), D = A1.size(2);
  const Tensor AA = at::mm(A1.view({I, D}), A2.view({J, D}).t());  // (I, J)
  const scalar_t* ap = AA.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  if (mode == kTrace) {
    at::mul_out(out, AA, at::mm(G1.view({I, C * E}), G2.view({J, C * E}).t()));
    return;
  }
  // GG: (I·C, J·C) for full, (C, I, J) for diagonal; then out = AA ⊙ GG in one pass over the output
  Tensor GG;
  if (mode == kDiagonal) {
    GG = at::empty({C, I, J}, G1.options());
    const Tensor g1 = G1.view({I, C, E}), g2 = G2.view({J, C, E});
    for (int64_t c = 0; c < C; ++c) {
      Tensor r = GG[c];
      at::mm_out(r, g1.select(1, c), g2.select(1, c).t());
    }
  } else {
    GG = at::mm(G1.view({I * C, E}), G2.view({J * C, E}).t());
  }
  const scalar_t* gp = GG.data_ptr<scalar_t>();
  parallel_tasks(I, 1, static_cast<double>(I) * J * C * C, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < J; ++j) {
        const scalar_t a = ap[i * J + j];
        if (mode == kDiagonal) {
          for (int64_t c = 0; c < C; ++c) op[(i * J + j) * C + c] = a * gp[(c * I + i) * J + j];
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* g = gp + (i * C + c) * J * C + j * C;
            scalar_t* o = op + ((i * J + j) * C + c) * C;
            for (int64_t d = 0; d < C; ++d) o[d] = a * g[d];
          }
        }
      }
  });
}

// ---------------------------------------------------------------------------------------------------------
// pairwise, tasks of n rows x m columns (parallel over tasks; scratch per thread within kScratchBytes):
//   AA = A1_blk A2_blkᵀ (n·T, m·S), one GEMM, then
//   full:      per column j, H_j = AA[:, j] G2p_j (n·T, C·E) (G2p = (J, S, C, E)), one GEMM, and
//              K_ij[c, c'] = Σ_t ⟨G1[i, c, t], H_j[(i, t), c']⟩ by blocked dots; n keeps H_j in L2.
//   trace:     GG = G1q_blk G2q_blkᵀ (n·T, m·S) over C·E (Gq = (N, T, C, E)), K_ij = Σ_ts AA ⊙ GG.
//   diagonal:  the same per c, G in (C, N·T, E).
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kCacheElems = 1 << 18;  // H_j of the full mode (portable kernel): 1 MiB in fp32

struct PairPlan {
  int64_t n, m;
};

// n rows (n·T about `rows`, or fewer where row_elems·n must stay under row_cap) and m columns such that
// n·m·col_elems <= budget; then enough tasks for the threads.
PairPlan plan_blocks(int64_t I, int64_t J, int64_t T, int64_t rows, int64_t row_elems, int64_t row_cap,
                     int64_t col_elems, int64_t budget) {
  int64_t n = std::min<int64_t>(I, std::max<int64_t>(1, rows / std::max<int64_t>(T, 1)));
  n = std::min<int64_t>(n, std::max<int64_t>(1, row_cap / std::max<int64_t>(row_elems, 1)));
  int64_t m = std::min<int64_t>(J, std::max<int64_t>(1, budget / std::max<int64_t>(1, n * col_elems)));
  const int64_t nthreads = at::get_num_threads();
  auto tasks = [&] { return ((I + n - 1) / n) * ((J + m - 1) / m); };
  const int64_t want = nthreads > 1 ? 4 * nthreads : 1;
  while (tasks() < want && m > 1) m = (m + 1) / 2;
  while (tasks() < want && n > 1) n = (n + 1) / 2;
  return {n, m};
}

template <typename F>
void run_tasks(int64_t ntasks, double work, const F& f) {
  parallel_tasks(ntasks, 1, work, f);  // run on the caller, GEMMs may use every thread
}

// full: A1 (I, T, D), G1 (I, C, T, E), A2 (J, S, D), G2p (J, S, C, E).
template <typename scalar_t>
void pairwise_full(const Tensor& A1, const Tensor& G1, const Tensor& A2, const Tensor& G2p, Tensor& out) {
  const int64_t I = A1.size(0), T = A1.size(1), D = A1.size(2), J = A2.size(0), S = A2.size(1);
  const int64_t C = G1.size(1), E = G1.size(3), TCE = T * C * E;
  const int64_t budget = kScratchBytes / static_cast<int64_t>(sizeof(scalar_t));
  const PairPlan p = plan_blocks(I, J, T, 512, TCE, kCacheElems, T * S, budget - kCacheElems);
  const double work = static_cast<double>(I) * J * T * (S * D + C * S * E + C * C * E);
  const int64_t nJ = (J + p.m - 1) / p.m, ntasks = ((I + p.n - 1) / p.n) * nJ;
  const Tensor A1f = A1.view({I * T, D}), A2f = A2.view({J * S, D});
  const scalar_t* g1p = G1.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
#ifdef NTK_GRAM_AVX2
  if (g_use_avx2.load(std::memory_order_relaxed) && C <= 2) {
    // fused kernel, H never stored (faster for C <= 2; for more outputs the K updates dominate it): blocks
    // sized by AA alone
    const PairPlan q = plan_blocks(I, J, T, 256, 1, budget, T * S, budget);
    const int64_t qJ = (J + q.m - 1) / q.m, qtasks = ((I + q.n - 1) / q.n) * qJ;
    const scalar_t* g2p = G2p.data_ptr<scalar_t>();
    run_tasks(qtasks, work, [&](int64_t t0, int64_t t1) {
      Tensor AA_buf = at::empty({q.n * T * q.m * S}, A1.options());
      std::vector<scalar_t> acc(C * C * 64 / sizeof(scalar_t));
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t i0 = (task / qJ) * q.n, j0 = (task % qJ) * q.m;
        const int64_t n = std::min(q.n, I - i0), m = std::min(q.m, J - j0);
        Tensor AA = AA_buf.narrow(0, 0, n * T * m * S).view({n * T, m * S});
        at::mm_out(AA, A1f.narrow(0, i0 * T, n * T), A2f.narrow(0, j0 * S, m * S).t());
        const scalar_t* ap = AA.data_ptr<scalar_t>();
        for (int64_t jj = 0; jj < m; ++jj)
          for (int64_t ii = 0; ii < n; ++ii)
            fused_pair_avx2(ap + ii * T * m * S + jj * S, m * S, g1p + (i0 + ii) * TCE, g2p + (j0 + jj) * S * C * E,
                            T, S, C, E, acc.data(), op + ((i0 + ii) * J + j0 + jj) * C * C);
      }
    });
    return;
  }
#endif
  run_tasks(ntasks, work, [&](int64_t t0, int64_t t1) {
    Tensor AA_buf = at::empty({p.n * T * p.m * S}, A1.options());
    Tensor H_buf = at::empty({p.n * TCE}, A1.options());
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t i0 = (task / nJ) * p.n, j0 = (task % nJ) * p.m;
      const int64_t n = std::min(p.n, I - i0), m = std::min(p.m, J - j0);
      Tensor AA = AA_buf.narrow(0, 0, n * T * m * S).view({n * T, m * S});
      at::mm_out(AA, A1f.narrow(0, i0 * T, n * T), A2f.narrow(0, j0 * S, m * S).t());
      Tensor H = H_buf.narrow(0, 0, n * TCE).view({n * T, C * E});  // rows (i, t), columns (c', e)
      const scalar_t* hp = H.data_ptr<scalar_t>();
      for (int64_t jj = 0; jj < m; ++jj) {
        const int64_t j = j0 + jj;
        at::mm_out(H, AA.narrow(1, jj * S, S), G2p[j].view({S, C * E}));
        for (int64_t ii = 0; ii < n; ++ii) {
          // K[c, c'] = Σ_t ⟨G1[i, c, t, :], H[(ii, t), c', :]⟩, in 2 x 2 blocks of (c, c')
          scalar_t* o = op + ((i0 + ii) * J + j) * C * C;
          const scalar_t* gi = g1p + (i0 + ii) * TCE;
          const scalar_t* hi = hp + ii * TCE;
          for (int64_t c = 0; c < C; c += 2)
            for (int64_t d = 0; d < C; d += 2) {
              const int rx = C - c >= 2 ? 2 : 1, ry = C - d >= 2 ? 2 : 1;
              scalar_t acc[4] = {0, 0, 0, 0};
              for (int64_t t = 0; t < T; ++t) {
                const scalar_t* x[2] = {gi + (c * T + t) * E, gi + ((c + rx - 1) * T + t) * E};
                const scalar_t* y[2] = {hi + (t * C + d) * E, hi + (t * C + d + ry - 1) * E};
                if (rx == 2 && ry == 2)
                  dot_block<2, 2>(x, y, E, acc);
                else if (rx == 2)
                  dot_block<2, 1>(x, y, E, acc);
                else if (ry == 2)
                  dot_block<1, 2>(x, y, E, acc);
                else
                  dot_block<1, 1>(x, y, E, acc);
              }
              for (int a = 0; a < rx; ++a)
                for (int b = 0; b < ry; ++b) o[(c + a) * C + d + b] = acc[a * ry + b];
            }
        }
      }
    }
  });
}

// diagonal / trace: A1 (I, T, D), A2 (J, S, D); G1c (C', I·T, K), G2c (C', J·S, K) with C' = C, K = E
// (diagonal) or C' = 1, K = C·E (trace).  out (I, J, C') viewed flat.
template <typename scalar_t>
void pairwise_dots(const Tensor& A1, const Tensor& G1c, const Tensor& A2, const Tensor& G2c, Tensor& out) {
  const int64_t I = A1.size(0), T = A1.size(1), D = A1.size(2), J = A2.size(0), S = A2.size(1);
  const int64_t Cp = G1c.size(0), K = G1c.size(2);
  const int64_t budget = kScratchBytes / static_cast<int64_t>(sizeof(scalar_t));
  const double work = static_cast<double>(I) * J * T * S * (D + Cp * K);
  const PairPlan p = plan_blocks(I, J, T, 256, T, budget, 2 * T * S, budget);
  const int64_t nJ = (J + p.m - 1) / p.m, ntasks = ((I + p.n - 1) / p.n) * nJ;
  const Tensor A1f = A1.view({I * T, D}), A2f = A2.view({J * S, D});
  scalar_t* op = out.data_ptr<scalar_t>();
  run_tasks(ntasks, work, [&](int64_t t0, int64_t t1) {
    Tensor AA_buf = at::empty({p.n * T * p.m * S}, A1.options());
    Tensor GG_buf = at::empty({p.n * T * p.m * S}, A1.options());
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t i0 = (task / nJ) * p.n, j0 = (task % nJ) * p.m;
      const int64_t n = std::min(p.n, I - i0), m = std::min(p.m, J - j0), ld = m * S;
      Tensor AA = AA_buf.narrow(0, 0, n * T * ld).view({n * T, ld});
      at::mm_out(AA, A1f.narrow(0, i0 * T, n * T), A2f.narrow(0, j0 * S, m * S).t());
      Tensor GG = GG_buf.narrow(0, 0, n * T * ld).view({n * T, ld});
      const scalar_t* ap = AA.data_ptr<scalar_t>();
      const scalar_t* gp = GG.data_ptr<scalar_t>();
      for (int64_t c = 0; c < Cp; ++c) {
        at::mm_out(GG, G1c[c].narrow(0, i0 * T, n * T), G2c[c].narrow(0, j0 * S, m * S).t());
        for (int64_t ii = 0; ii < n; ++ii)
          for (int64_t jj = 0; jj < m; ++jj) {
            scalar_t v = 0;
            for (int64_t t = 0; t < T; ++t) {
              const int64_t o = (ii * T + t) * ld + jj * S;
              v += dot(ap + o, gp + o, S);
            }
            op[((i0 + ii) * J + j0 + jj) * Cp + c] = v;
          }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// materialize: A (N, T, D), G (N, C, T, E) compute dtype, contiguous.  The per-sample gradients
// P_{n,c} = G_{n,c}ᵀ A_n (E x D) are formed a chunk of ec rows e at a time, P[n, c, e0:e1, :] =
// G[n, c, :, e0:e1]ᵀ A_n, and their Gram accumulated, R += P1 P2ᵀ over the chunk (one GEMM): the chunks stay
// near kChunkBytes and P is never held whole.  Chunks are split over threads, each with its own R, summed
// at the end.  R: full (I·C, J·C), diagonal (C, I, J), trace (I, J).
// ---------------------------------------------------------------------------------------------------------
struct MatPlan {
  int64_t ec, nthr;
  double cost;
};

MatPlan plan_materialize(int64_t I, int64_t J, int64_t C, int64_t T, int64_t S, int64_t D, int64_t E,
                         int64_t mode, bool sym, int64_t elem) {
  MatPlan p{};
  const int64_t nsamp = I + (sym ? 0 : J);
  const int64_t per_e = std::max<int64_t>(1, nsamp * C * D);  // chunk elements per row e
  const int64_t r_elems = mode == kFull ? I * C * J * C : mode == kDiagonal ? C * I * J : I * J;
  p.ec = std::min<int64_t>(E, std::max<int64_t>(1, kChunkBytes / elem / per_e));
  int64_t nchunks = (E + p.ec - 1) / p.ec;
  const int64_t nthreads = at::get_num_threads();
  p.nthr = std::max<int64_t>(1, std::min({nthreads, nchunks, kRBytes / elem / std::max<int64_t>(1, r_elems)}));
  if (p.nthr > 1) {  // chunks a multiple of the threads
    nchunks = (nchunks + p.nthr - 1) / p.nthr * p.nthr;
    p.ec = (E + nchunks - 1) / nchunks;
  }
  const double ck = mode == kFull ? static_cast<double>(C) * C : C;
  const double per = static_cast<double>(C) * E * D;
  // forming: T multiply-adds an element in GEMMs with a short inner dimension, plus writing P (measured
  // ~1.25 T + 24 against the pairwise GEMMs), more for narrow chunks (GEMV-like)
  const double form_rate = 1.25 * static_cast<double>(std::max(T, S)) + 24.0 + 64.0 / p.ec;
  p.cost = per * nsamp * form_rate + static_cast<double>(I) * J * ck * E * D;
  return p;
}

// P[n, c] = G[n, c, :, e0 : e0 + w]ᵀ A_n for every n, c, into P (N, C, w, D); one GEMM each, spread over the
// threads when `parallel` (not already inside a thread's task).
void form_chunk(const Tensor& A, const Tensor& G, int64_t e0, int64_t w, Tensor& P, bool parallel) {
  const int64_t N = G.size(0), C = G.size(1);
  auto run = [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      Tensor dst = P[k / C][k % C];
      at::mm_out(dst, G[k / C][k % C].narrow(1, e0, w).t(), A[k / C]);
    }
  };
  if (parallel && N * C >= 2 * at::get_num_threads())
    parallel_tasks(N * C, 1, static_cast<double>(N) * C * w * G.size(2) * A.size(2), run);
  else
    run(0, N * C);
}

void materialize_path(const Tensor& A1, const Tensor& G1, const Tensor& A2, const Tensor& G2, int64_t mode,
                      bool sym, const MatPlan& plan, Tensor& out) {
  const int64_t I = G1.size(0), C = G1.size(1), E = G1.size(3), J = G2.size(0), D = A1.size(2);
  const int64_t ec = plan.ec, nchunks = (E + ec - 1) / ec, nthr = plan.nthr;
  const std::vector<int64_t> rshape = mode == kFull ? std::vector<int64_t>{I * C, J * C}
                                      : mode == kDiagonal ? std::vector<int64_t>{C, I, J}
                                                          : std::vector<int64_t>{I, J};
  std::vector<Tensor> Rs(nthr);
  auto body = [&](int64_t tid) {
    const int64_t k0 = nchunks * tid / nthr, k1 = nchunks * (tid + 1) / nthr;
    Tensor R = at::zeros(rshape, G1.options());
    Tensor P1buf = at::empty({I * C * ec * D}, G1.options());
    Tensor P2buf = sym ? P1buf : at::empty({J * C * ec * D}, G1.options());
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t e0 = k * ec, w = std::min(ec, E - e0);
      Tensor P1 = P1buf.narrow(0, 0, I * C * w * D).view({I, C, w, D});
      Tensor P2 = P2buf.narrow(0, 0, J * C * w * D).view({J, C, w, D});
      form_chunk(A1, G1, e0, w, P1, nthr == 1);
      if (!sym) form_chunk(A2, G2, e0, w, P2, nthr == 1);
      if (mode == kTrace) {
        R.addmm_(P1.view({I, C * w * D}), P2.view({J, C * w * D}).t());
      } else if (mode == kDiagonal) {
        const Tensor q1 = P1.view({I, C, w * D}), q2 = P2.view({J, C, w * D});
        for (int64_t c = 0; c < C; ++c) {
          Tensor r = R[c];
          r.addmm_(q1.select(1, c), q2.select(1, c).t());
        }
      } else {
        R.addmm_(P1.view({I * C, w * D}), P2.view({J * C, w * D}).t());
      }
    }
    Rs[tid] = R;
  };
  if (nthr == 1) {
    body(0);  // GEMMs and forming threaded inside
  } else {
    parallel_tasks(nthr, 1, plan.cost, [&](int64_t b, int64_t e) {
      for (int64_t tid = b; tid < e; ++tid) body(tid);
    });
  }
  Tensor R = Rs[0];
  for (int64_t t = 1; t < nthr; ++t) R.add_(Rs[t]);
  if (mode == kFull)
    out.copy_(R.view({I, C, J, C}).permute({0, 2, 1, 3}));
  else if (mode == kDiagonal)
    out.copy_(R.permute({1, 2, 0}));
  else
    out.copy_(R);
}

// ---------------------------------------------------------------------------------------------------------
// tokens: ids (N, T) int64, G (N, C, T, E) compute dtype, contiguous.
// ---------------------------------------------------------------------------------------------------------
struct Buckets {
  std::vector<int64_t> off;  // (N + 1): sample n's unique ids are ids[off[n] : off[n+1]], sorted
  std::vector<int64_t> ids;
  Tensor P;                  // (off[N], C, E): G summed over the positions of each unique id
};

template <typename scalar_t>
Buckets bucket(const Tensor& ids, const Tensor& G) {
  const int64_t N = G.size(0), C = G.size(1), T = G.size(2), E = G.size(3);
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<int64_t> order(N * T), count(N);
  parallel_tasks(N, 16, static_cast<double>(N) * T * C * E, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      int64_t* o = order.data() + n * T;
      const int64_t* x = ip + n * T;
      std::iota(o, o + T, 0);
      std::stable_sort(o, o + T, [x](int64_t p, int64_t q) { return x[p] < x[q]; });
      int64_t u = 0;
      for (int64_t k = 0; k < T; ++k) u += (k == 0 || x[o[k]] != x[o[k - 1]]);
      count[n] = u;
    }
  });
  Buckets bk;
  bk.off.assign(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) bk.off[n + 1] = bk.off[n] + count[n];
  bk.ids.resize(bk.off[N]);
  bk.P = at::zeros({bk.off[N], C, E}, G.options());
  scalar_t* pp = bk.P.data_ptr<scalar_t>();
  const scalar_t* gp = G.data_ptr<scalar_t>();
  parallel_tasks(N, 16, static_cast<double>(N) * T * C * E, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const int64_t* o = order.data() + n * T;
      const int64_t* x = ip + n * T;
      int64_t u = bk.off[n] - 1;
      for (int64_t k = 0; k < T; ++k) {
        const int64_t t = o[k];
        if (k == 0 || x[t] != x[o[k - 1]]) bk.ids[++u] = x[t];
        for (int64_t c = 0; c < C; ++c) {
          scalar_t* dst = pp + (u * C + c) * E;
          const scalar_t* src = gp + ((n * C + c) * T + t) * E;
          for (int64_t q = 0; q < E; ++q) dst[q] += src[q];
        }
      }
    }
  });
  return bk;
}

template <typename scalar_t>
void tokens_path(const Tensor& ids1, const Tensor& G1, const Tensor& ids2, const Tensor& G2, int64_t mode,
                 bool sym, Tensor& out) {
  const int64_t I = G1.size(0), C = G1.size(1), E = G1.size(3), J = G2.size(0);
  const Buckets b1 = bucket<scalar_t>(ids1, G1);
  Buckets b2_own;
  if (!sym) b2_own = bucket<scalar_t>(ids2, G2);
  const Buckets& b2 = sym ? b1 : b2_own;
  // postings of side 2: its (sample, unique id) rows ordered by id (then sample); keys = the distinct ids
  const int64_t n2 = b2.off[J];
  std::vector<int64_t> sample2(n2), order(n2), keys, start;
  for (int64_t j = 0; j < J; ++j) std::fill(sample2.begin() + b2.off[j], sample2.begin() + b2.off[j + 1], j);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return b2.ids[p] < b2.ids[q]; });
  for (int64_t k = 0; k < n2; ++k) {
    if (k == 0 || b2.ids[order[k]] != b2.ids[order[k - 1]]) {
      keys.push_back(b2.ids[order[k]]);
      start.push_back(k);
    }
  }
  start.push_back(n2);
  const scalar_t* p1 = b1.P.data_ptr<scalar_t>();
  const scalar_t* p2 = b2.P.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t CE = C * E;
  // each unique id of side 1 looked up in the postings (key index or -1); the matches set the work
  const int64_t n1 = b1.off[I];
  std::vector<int64_t> key1(n1);
  double matches = 0;
  for (int64_t r1 = 0; r1 < n1; ++r1) {
    const auto it = std::lower_bound(keys.begin(), keys.end(), b1.ids[r1]);
    key1[r1] = (it == keys.end() || *it != b1.ids[r1]) ? -1 : it - keys.begin();
    if (key1[r1] >= 0) matches += static_cast<double>(start[key1[r1] + 1] - start[key1[r1]]);
  }
  const double work = matches * (mode == kFull ? C * CE : CE);
  // row i: each of its unique ids meets every (j, row) of side 2 that holds it
  parallel_tasks(I, 1, work, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      for (int64_t r1 = b1.off[i]; r1 < b1.off[i + 1]; ++r1) {
        const int64_t k = key1[r1];
        if (k < 0) continue;
        const scalar_t* x = p1 + r1 * CE;
        for (int64_t q = start[k]; q < start[k + 1]; ++q) {
          const int64_t r2 = order[q], pr = i * J + sample2[r2];
          const scalar_t* y = p2 + r2 * CE;
          if (mode == kTrace) {
            op[pr] += dot(x, y, CE);
          } else if (mode == kDiagonal) {
            for (int64_t c = 0; c < C; ++c) op[pr * C + c] += dot(x + c * E, y + c * E, E);
          } else {
            scalar_t* o = op + pr * C * C;
            for (int64_t c = 0; c < C; ++c)
              for (int64_t d = 0; d < C; ++d) o[c * C + d] += dot(x + c * E, y + d * E, E);
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
Tensor transpose_result(const Tensor& k, int64_t mode) {
  if (mode == kFull) return k.permute({1, 0, 3, 2}).contiguous();
  if (mode == kDiagonal) return k.permute({1, 0, 2}).contiguous();
  return k.t().contiguous();
}

bool is_id(at::ScalarType t) { return t == at::kLong || t == at::kInt; }

Tensor gram_contract(const Tensor& a1, const Tensor& g1, const Tensor& a2, const Tensor& g2, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "ntk_cpu.gram_contract: mode must be 0 (full), 1 (diagonal) or 2 (trace), got ",
              mode);
  for (const Tensor* t : {&a1, &g1, &a2, &g2})
    TORCH_CHECK(t->device().is_cpu(), "ntk_cpu.gram_contract: a1, g1, a2, g2 must be CPU tensors");
  TORCH_CHECK(at::isFloatingType(g1.scalar_type()) && g2.scalar_type() == g1.scalar_type(),
              "ntk_cpu.gram_contract: g1 and g2 must share one floating dtype, got ", g1.scalar_type(), " and ",
              g2.scalar_type());
  TORCH_CHECK(g1.dim() == 4 && g2.dim() == 4, "ntk_cpu.gram_contract: g1 and g2 must be (N, C, T, E), got ",
              g1.sizes(), " and ", g2.sizes());
  const int64_t I = g1.size(0), C = g1.size(1), T = g1.size(2), E = g1.size(3);
  const int64_t J = g2.size(0), S = g2.size(2);
  TORCH_CHECK(g2.size(1) == C && g2.size(3) == E, "ntk_cpu.gram_contract: g2 ", g2.sizes(),
              " must be (J, C, S, E) with g1's C=", C, " and E=", E);
  const bool ids = is_id(a1.scalar_type());
  TORCH_CHECK(ids == is_id(a2.scalar_type()),
              "ntk_cpu.gram_contract: a1 and a2 must both be token ids or both features, got ", a1.scalar_type(),
              " and ", a2.scalar_type());
  if (ids) {
    TORCH_CHECK(a1.dim() == 2 && a2.dim() == 2, "ntk_cpu.gram_contract: token ids a1, a2 must be (N, T), got ",
                a1.sizes(), " and ", a2.sizes());
  } else {
    TORCH_CHECK(a1.scalar_type() == g1.scalar_type() && a2.scalar_type() == g1.scalar_type(),
                "ntk_cpu.gram_contract: features a1, a2 must have g1's dtype ", g1.scalar_type(), ", got ",
                a1.scalar_type(), " and ", a2.scalar_type());
    TORCH_CHECK(a1.dim() == 3 && a2.dim() == 3 && a1.size(2) == a2.size(2),
                "ntk_cpu.gram_contract: features a1, a2 must be (N, T, D) with one D, got ", a1.sizes(), " and ",
                a2.sizes());
  }
  TORCH_CHECK(a1.size(0) == I && a1.size(1) == T, "ntk_cpu.gram_contract: a1 ", a1.sizes(),
              " must have g1's (N, T) = (", I, ", ", T, ") leading dims");
  TORCH_CHECK(a2.size(0) == J && a2.size(1) == S, "ntk_cpu.gram_contract: a2 ", a2.sizes(),
              " must have g2's (N, S) = (", J, ", ", S, ") leading dims");

  const auto ct = g1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
#ifdef NTK_GRAM_AVX2
  const char* no_avx2 = std::getenv("NTK_KERNELS_GRAM_CPU_NO_AVX2");
  g_use_avx2.store(kHasAvx2 && !(no_avx2 && !std::strcmp(no_avx2, "1")), std::memory_order_relaxed);
#endif
  Tensor out = at::zeros(out_shape(I, J, C, mode), g1.options().dtype(ct));
  if (out.numel() == 0 || T == 0 || S == 0 || E == 0 || C == 0) return out;
  const bool sym = same_tensor(a1, a2) && same_tensor(g1, g2);
  const Tensor G1 = g1.to(ct).contiguous();
  const Tensor G2 = sym ? G1 : g2.to(ct).contiguous();

  if (ids) {
    const Tensor i1 = a1.to(at::kLong).contiguous(), i2 = sym ? i1 : a2.to(at::kLong).contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "gram_contract_tokens", [&] { tokens_path<scalar_t>(i1, G1, i2, G2, mode, sym, out); });
    return out;
  }
  const int64_t D = a1.size(2);
  if (D == 0) return out;
  const Tensor A1 = a1.to(ct).contiguous();
  const Tensor A2 = sym ? A1 : a2.to(ct).contiguous();

  Path path = forced_path();
  TORCH_CHECK(path != Path::kOuter || (T == 1 && S == 1),
              "ntk_cpu.gram_contract: NTK_KERNELS_GRAM_CPU_PATH=outer needs T = S = 1, got T=", T, ", S=", S);
  const int64_t elem = ct == at::kDouble ? 8 : 4;
  const MatPlan plan = plan_materialize(I, J, C, T, S, D, E, mode, sym, elem);
  if (path == Path::kAuto) {
    const double ck = mode == kFull ? static_cast<double>(C) * C : C;
    const double pw = static_cast<double>(I) * J *
                      (static_cast<double>(T) * S * D + static_cast<double>(C) * T * S * E +
                       ck * std::min(T, S) * E);
    if (T == 1 && S == 1)
      path = Path::kOuter;
    else
      path = plan.cost < pw ? Path::kMaterialize : Path::kPairwise;
  }
  if (path == Path::kOuter) {
    AT_DISPATCH_FLOATING_TYPES(ct, "gram_contract_outer", [&] { outer_path<scalar_t>(A1, G1, A2, G2, mode, out); });
  } else if (path == Path::kMaterialize) {
    materialize_path(A1, G1, A2, G2, mode, sym, plan, out);
  } else {
    // rows on the shorter side: the full mode's K costs C²·min(T, S)·E a pair
    const bool swap = mode == kFull && T > S;
    const Tensor& Ar = swap ? A2 : A1;
    const Tensor& Ac = swap ? A1 : A2;
    const Tensor& Gr = swap ? G2 : G1;
    const Tensor& Gc = swap ? G1 : G2;
    Tensor res = swap ? at::empty(out_shape(J, I, C, mode), out.options()) : out;
    if (mode == kFull) {
      const Tensor Gcp = Gc.transpose(1, 2).contiguous();  // (N, S, C, E)
      AT_DISPATCH_FLOATING_TYPES(ct, "gram_contract_pairwise", [&] { pairwise_full<scalar_t>(Ar, Gr, Ac, Gcp, res); });
    } else {
      // diagonal: (C, N·T, E); trace: (1, N·T, C·E)
      auto lay = [&](const Tensor& g) {
        const int64_t N = g.size(0), TT = g.size(2);
        return mode == kDiagonal ? g.permute({1, 0, 2, 3}).reshape({C, N * TT, E}).contiguous()
                                 : g.permute({0, 2, 1, 3}).reshape({1, N * TT, C * E}).contiguous();
      };
      const Tensor G1c = lay(Gr);
      const Tensor G2c = sym ? G1c : lay(Gc);
      AT_DISPATCH_FLOATING_TYPES(ct, "gram_contract_pairwise", [&] { pairwise_dots<scalar_t>(Ar, G1c, Ac, G2c, res); });
    }
    if (swap) out.copy_(transpose_result(res, mode));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_cpu, CPU, m) { m.impl("gram_contract", &gram_contract); }
