// Forward-mode kernels on the CPU: a layer's output and its Jacobian-vector product in one pass
// (contract and math: ntk_kernels/ops/jvp.py).
//
// ntk_cpu::linear_jvp   y = x Wᵀ + b,  ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ   (Ẇ, ḃ shared or one per sample)
//   Parallel over blocks of the N·L rows, one block a thread (at::parallel_for; each block's GEMMs run
//   single-threaded inside the OpenMP region: one thread team a call, where the unfused way wakes BLAS's
//   team for every GEMM).  Per block the x rows are read (and, for fp16 / bf16, converted to fp32) once and
//   feed both y and x Ẇᵀ; ẏ is accumulated in place (addmm with beta = 1): no (N·L, d_out) temporaries
//   and no zero-filled buffer, unlike the unfused reference.  A per-sample Ẇ_n meets only its sample's
//   rows: one batched GEMM (bmm) over the block's whole samples (blocks hold whole samples when L fits a
//   block), one GEMM per sample cut by a block edge.  Shared parameters are converted to the compute dtype
//   once; x, ẋ and a per-sample Ẇ a block (or a few MiB) at a time.
//   NTK_KERNELS_JVP_CPU_ROWS=<k> forces k rows a block (k >= N·L: one block on the caller, the GEMMs then
//   multi-threaded by BLAS): for tests and benchmarks.
//
// ntk_cpu::layer_norm_jvp   LayerNorm / RMSNorm over the last dim and its tangent:
//   one fused loop over rows (parallel), per row: the statistics, then Σẋ and Σẋ(x − μ) in one pass, then
//   y and ẏ in one pass; fp32 accumulation (fp64 for fp64), SIMD loops (omp simd), compiled for AVX2 + FMA
//   as well and chosen at run time (NTK_KERNELS_JVP_CPU_NO_AVX2=1: the baseline ones).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {
using at::Tensor;
using c10::optional;

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool float_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// A 2-D matrix BLAS reads as is (one unit stride, the other a valid leading dimension); else a compact copy.
Tensor gemm_ready(const Tensor& t) {
  const int64_t r = t.size(0), c = t.size(1);
  const bool row = t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(c, 1);
  const bool col = t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(r, 1);
  return (row || col) ? t : t.contiguous();
}

void check_tensor(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
}

int64_t forced_rows() {
  const char* s = std::getenv("NTK_KERNELS_JVP_CPU_ROWS");
  if (s == nullptr || *s == '\0' || !std::strcmp(s, "auto")) return 0;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && v > 0, "NTK_KERNELS_JVP_CPU_ROWS must be a positive integer or auto, got '",
              s, "'");
  return static_cast<int64_t>(v);
}

// ---------------------------------------------------------------------------------------------------------
// linear_jvp
// ---------------------------------------------------------------------------------------------------------
constexpr double kMinParallelMacs = 1 << 22;  // below ~4M multiply-adds a call runs on the caller

// Rows a block.  BLAS repacks W for every GEMM call, so blocks are large: one a thread (32 to 1024 rows) when
// several threads share the work, the whole matrix for one thread; fp16 / bf16 inputs are converted a block
// at a time, so their blocks stop at 512 rows (a few MiB of fp32 scratch a thread).
int64_t block_rows(int64_t R, bool lowp, int threads) {
  const int64_t cap = lowp ? 512 : 1024;
  if (threads <= 1) return lowp ? std::min<int64_t>(R, cap) : R;
  return std::max<int64_t>(32, std::min<int64_t>((R + threads - 1) / threads, cap));
}

struct LinearArgs {
  Tensor X, XD;     // (R, d_in) in x's dtype, XD undefined when ẋ = 0
  Tensor Wt, WDt;   // (d_in, d_out) compute dtype; WDt undefined unless Ẇ is shared
  Tensor WD;        // (N, d_out, d_in) in x's dtype: per-sample Ẇ (else undefined)
  Tensor b, bd;     // (d_out,) or (N, d_out) (bd) in compute dtype, or undefined
  Tensor Y, YD;     // (R, d_out) outputs in x's dtype
  int64_t L = 1;
  bool lowp = false;
};

// One block of rows [r0, r0 + rows).
void linear_block(const LinearArgs& a, int64_t r0, int64_t rows, at::ScalarType ct) {
  const int64_t d_out = a.Y.size(1);
  const bool has_xd = a.XD.defined(), shared_wd = a.WDt.defined(), sample_wd = a.WD.defined();
  const bool sample_bd = a.bd.defined() && a.bd.dim() == 2;
  Tensor xb = a.X.narrow(0, r0, rows), xdb, yb, ydb;
  if (a.lowp) {  // this block in fp32: the one conversion of x's rows, shared by y and x Ẇᵀ
    xb = xb.to(ct);
    if (has_xd) xdb = a.XD.narrow(0, r0, rows).to(ct);
    yb = at::empty({rows, d_out}, xb.options());
    ydb = at::empty({rows, d_out}, xb.options());
  } else {
    if (has_xd) xdb = a.XD.narrow(0, r0, rows);
    yb = a.Y.narrow(0, r0, rows);
    ydb = a.YD.narrow(0, r0, rows);
  }
  // samples [n0, n1) meet this block, [f0, f1) of them whole; seg(n) = a sample's rows within the block.
  // Per-sample terms take the whole samples in one batched call (one bmm, one copy), the cut ones one by one.
  const int64_t L = a.L, n0 = r0 / L, n1 = (r0 + rows + L - 1) / L;
  const int64_t f0 = (r0 + L - 1) / L, f1 = std::max(f0, (r0 + rows) / L);
  auto seg = [&](int64_t n) {
    const int64_t s0 = std::max(r0, n * L), s1 = std::min(r0 + rows, (n + 1) * L);
    return std::make_pair(s0 - r0, s1 - s0);
  };
  auto whole = [&](const Tensor& t, int64_t m0, int64_t m1) {  // rows of samples [m0, m1) as (m, L, cols)
    return t.narrow(0, m0 * L - r0, (m1 - m0) * L).view({m1 - m0, L, t.size(1)});
  };

  if (a.b.defined())
    at::addmm_out(yb, a.b, xb, a.Wt);
  else
    at::mm_out(yb, xb, a.Wt);

  bool init = false;  // ydb holds a value
  if (sample_bd) {
    if (f1 > f0) whole(ydb, f0, f1).copy_(a.bd.narrow(0, f0, f1 - f0).unsqueeze(1).expand({f1 - f0, L, d_out}));
    for (int64_t n = n0; n < n1; ++n) {
      if (n >= f0 && n < f1) continue;
      auto [o, len] = seg(n);
      ydb.narrow(0, o, len).copy_(a.bd[n].expand({len, d_out}));
    }
    init = true;
  } else if (a.bd.defined() && !has_xd) {
    ydb.copy_(a.bd.expand({rows, d_out}));
    init = true;
  }
  if (has_xd) {
    if (init)
      ydb.addmm_(xdb, a.Wt);
    else if (a.bd.defined())
      at::addmm_out(ydb, a.bd, xdb, a.Wt);
    else
      at::mm_out(ydb, xdb, a.Wt);
    init = true;
  }
  if (shared_wd) {
    if (init)
      ydb.addmm_(xb, a.WDt);
    else
      at::mm_out(ydb, xb, a.WDt);
    init = true;
  } else if (sample_wd) {
    // whole samples: batched, Ẇ converted (fp16 / bf16) in chunks of ~4 MiB of fp32
    const int64_t per = std::max<int64_t>(1, a.WD.size(1) * a.WD.size(2));
    const int64_t chunk = a.lowp ? std::max<int64_t>(1, (int64_t{1} << 20) / per) : std::max<int64_t>(1, f1 - f0);
    for (int64_t m0 = f0; m0 < f1; m0 += chunk) {
      const int64_t m1 = std::min(f1, m0 + chunk);
      const Tensor wdt = a.WD.narrow(0, m0, m1 - m0).to(ct).transpose(1, 2);
      Tensor out = whole(ydb, m0, m1);
      if (init)
        out.baddbmm_(whole(xb, m0, m1), wdt);
      else
        at::bmm_out(out, whole(xb, m0, m1), wdt);
    }
    for (int64_t n = n0; n < n1; ++n) {
      if (n >= f0 && n < f1) continue;
      auto [o, len] = seg(n);
      const Tensor wdt = gemm_ready(a.WD[n].to(ct)).t();
      Tensor out = ydb.narrow(0, o, len);
      if (init)
        out.addmm_(xb.narrow(0, o, len), wdt);
      else
        at::mm_out(out, xb.narrow(0, o, len), wdt);
    }
    init = true;
  }
  if (!init) ydb.zero_();
  if (a.lowp) {
    a.Y.narrow(0, r0, rows).copy_(yb);
    a.YD.narrow(0, r0, rows).copy_(ydb);
  }
}

std::tuple<Tensor, Tensor> linear_jvp(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                                      const optional<Tensor>& x_dot, const optional<Tensor>& weight_dot,
                                      const optional<Tensor>& bias_dot) {
  constexpr const char* op = "ntk_cpu.linear_jvp";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(float_type(x.scalar_type()), op, ": x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": x must be (N, L, d_in), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be (d_out, d_in), got shape ", weight.sizes());
  check_tensor(op, "weight", weight, x);
  const int64_t N = x.size(0), L = x.size(1), d_in = x.size(2), d_out = weight.size(0);
  TORCH_CHECK(weight.size(1) == d_in, op, ": weight must be (d_out, d_in=", d_in, ") to match x ", x.sizes(),
              ", got shape ", weight.sizes());
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d_out, op, ": bias must be (d_out=", d_out,
                ",), got shape ", bias->sizes());
  }
  if (x_dot.has_value()) {
    check_tensor(op, "x_dot", *x_dot, x);
    TORCH_CHECK(x_dot->sizes() == x.sizes(), op, ": x_dot must have x's shape ", x.sizes(), ", got ",
                x_dot->sizes());
  }
  if (weight_dot.has_value()) {
    check_tensor(op, "weight_dot", *weight_dot, x);
    const auto& s = weight_dot->sizes();
    const bool ok = (s.size() == 2 && s[0] == d_out && s[1] == d_in) ||
                    (s.size() == 3 && s[0] == N && s[1] == d_out && s[2] == d_in);
    TORCH_CHECK(ok, op, ": weight_dot must be (d_out=", d_out, ", d_in=", d_in, ") or (N=", N, ", ", d_out, ", ",
                d_in, "), got shape ", s);
  }
  if (bias_dot.has_value()) {
    check_tensor(op, "bias_dot", *bias_dot, x);
    const auto& s = bias_dot->sizes();
    const bool ok = (s.size() == 1 && s[0] == d_out) || (s.size() == 2 && s[0] == N && s[1] == d_out);
    TORCH_CHECK(ok, op, ": bias_dot must be (d_out=", d_out, ",) or (N=", N, ", ", d_out, "), got shape ", s);
  }

  const auto dt = x.scalar_type(), ct = compute_type(dt);
  Tensor y = at::empty({N, L, d_out}, x.options()), yd = at::empty({N, L, d_out}, x.options());
  const int64_t R = N * L;
  if (R == 0 || d_out == 0) return {y, yd};
  if (d_in == 0) {  // empty contraction: y = b, ẏ = ḃ
    if (bias.has_value())
      y.copy_(bias->expand({N, L, d_out}));
    else
      y.zero_();
    if (!bias_dot.has_value())
      yd.zero_();
    else if (bias_dot->dim() == 1)
      yd.copy_(bias_dot->expand({N, L, d_out}));
    else
      yd.copy_((*bias_dot).unsqueeze(1).expand({N, L, d_out}));
    return {y, yd};
  }

  LinearArgs a;
  a.X = x.contiguous().view({R, d_in});
  if (x_dot.has_value()) a.XD = x_dot->contiguous().view({R, d_in});
  a.Wt = gemm_ready(weight.to(ct)).t();
  if (weight_dot.has_value()) {
    if (weight_dot->dim() == 2)
      a.WDt = gemm_ready(weight_dot->to(ct)).t();
    else
      a.WD = *weight_dot;  // per block; fp16 / bf16 converted ~4 MiB of samples at a time
  }
  if (bias.has_value()) a.b = bias->to(ct);
  if (bias_dot.has_value()) a.bd = bias_dot->to(ct);
  a.Y = y.view({R, d_out});
  a.YD = yd.view({R, d_out});
  a.L = L;
  a.lowp = dt != ct;

  const int threads = at::get_num_threads();
  const double macs = static_cast<double>(R) * d_in * d_out *
                      (1 + (x_dot.has_value() ? 1 : 0) + (weight_dot.has_value() ? 1 : 0));
  int64_t rb = forced_rows();
  if (rb == 0) rb = macs < kMinParallelMacs ? block_rows(R, a.lowp, 1) : block_rows(R, a.lowp, threads);
  if (a.WD.defined() && L <= rb) rb = std::max<int64_t>(1, rb / L) * L;  // whole samples a block
  rb = std::min(rb, R);
  const int64_t nblocks = (R + rb - 1) / rb;
  auto run = [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) {
      const int64_t r0 = k * rb;
      linear_block(a, r0, std::min(rb, R - r0), ct);
    }
  };
  if (nblocks == 1 || threads == 1 || macs < kMinParallelMacs || at::in_parallel_region())
    run(0, nblocks);  // on the caller; a single block's GEMMs use BLAS's own threads
  else
    at::parallel_for(0, nblocks, 1, run);
  return {y, yd};
}

// ---------------------------------------------------------------------------------------------------------
// layer_norm_jvp
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct NormArgs {
  const scalar_t* x;
  const scalar_t* xd;  // null: ẋ = 0
  // parameters in acc_t; absent ones point at ones (w) or zeros (b, ẇ, ḃ) so one loop serves every case
  const acc_t* w;
  const acc_t* b;
  const acc_t* wd;
  int64_t wd_stride;  // 0: shared, D: per sample
  const acc_t* bd;
  int64_t bd_stride;
  scalar_t* y;
  scalar_t* yd;
  int64_t L, D;
  acc_t eps;
  bool rms;
};

// Rows [r0, r1).  buf: 4·D acc_t of scratch.  Always inlined into the ISA-specific callers below, whose target
// (baseline x86-64 or AVX2 + FMA) the omp simd loops are then vectorised for.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void norm_rows(const NormArgs<scalar_t, acc_t>& a, int64_t r0, int64_t r1,
                                                     acc_t* buf) {
  constexpr bool same = std::is_same<scalar_t, acc_t>::value;
  const int64_t D = a.D;
  const acc_t inv_d = acc_t(1) / static_cast<acc_t>(D);
  acc_t* xb = buf;           // x row in acc_t (low precision)
  acc_t* xdb = buf + D;      // ẋ row in acc_t, or zeros when ẋ = 0
  acc_t* yb = buf + 2 * D;   // y, ẏ rows in acc_t before rounding (low precision)
  acc_t* ydb = buf + 3 * D;
  const bool has_xd = a.xd != nullptr;
  if (!has_xd) std::fill(xdb, xdb + D, acc_t(0));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / a.L;
    const acc_t* xr;
    const acc_t* xdr = xdb;
    if constexpr (same) {
      xr = a.x + r * D;
      if (has_xd) xdr = a.xd + r * D;
    } else {
      const scalar_t* xs = a.x + r * D;
      for (int64_t k = 0; k < D; ++k) xb[k] = static_cast<acc_t>(xs[k]);
      if (has_xd) {
        const scalar_t* xds = a.xd + r * D;
        for (int64_t k = 0; k < D; ++k) xdb[k] = static_cast<acc_t>(xds[k]);
      }
      xr = xb;
    }
    acc_t mu = 0;
    if (!a.rms) {
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < D; ++k) s += xr[k];
      mu = s * inv_d;
    }
    acc_t ss = 0;  // Σ (x − μ)² (μ = 0 for RMSNorm): two passes over a row in L1, no cancellation
#pragma omp simd reduction(+ : ss)
    for (int64_t k = 0; k < D; ++k) ss += (xr[k] - mu) * (xr[k] - mu);
    const acc_t rinv = acc_t(1) / std::sqrt(ss * inv_d + a.eps);
    acc_t mxd = 0, proj = 0;  // mean(ẋ) (LayerNorm), mean(ẋ ⊙ x̂)
    if (has_xd) {
      acc_t s = 0, t = 0;
#pragma omp simd reduction(+ : s, t)
      for (int64_t k = 0; k < D; ++k) {
        s += xdr[k];
        t += xdr[k] * (xr[k] - mu);
      }
      mxd = a.rms ? acc_t(0) : s * inv_d;
      proj = t * inv_d * rinv;
    }
    const acc_t* w = a.w;
    const acc_t* b = a.b;
    const acc_t* wd = a.wd + n * a.wd_stride;
    const acc_t* bd = a.bd + n * a.bd_stride;
    acc_t* yo = yb;
    acc_t* ydo = ydb;
    if constexpr (same) {
      yo = a.y + r * D;
      ydo = a.yd + r * D;
    }
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) {
      const acc_t xh = (xr[k] - mu) * rinv;
      const acc_t xhd = (xdr[k] - mxd - xh * proj) * rinv;
      yo[k] = xh * w[k] + b[k];
      ydo[k] = xhd * w[k] + xh * wd[k] + bd[k];
    }
    if constexpr (!same) {
      scalar_t* ys = a.y + r * D;
      scalar_t* yds = a.yd + r * D;
      for (int64_t k = 0; k < D; ++k) ys[k] = static_cast<scalar_t>(yb[k]);
      for (int64_t k = 0; k < D; ++k) yds[k] = static_cast<scalar_t>(ydb[k]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void norm_rows_base(const NormArgs<scalar_t, acc_t>& a, int64_t r0, int64_t r1, acc_t* buf) {
  norm_rows(a, r0, r1, buf);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define NTK_JVP_AVX2 1
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void norm_rows_avx2(const NormArgs<scalar_t, acc_t>& a, int64_t r0, int64_t r1,
                                                        acc_t* buf) {
  norm_rows(a, r0, r1, buf);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// NTK_KERNELS_JVP_CPU_NO_AVX2=1: the baseline kernels where the CPU has AVX2 (tests)
bool use_avx2() {
#ifdef NTK_JVP_AVX2
  const char* s = std::getenv("NTK_KERNELS_JVP_CPU_NO_AVX2");
  return cpu_has_avx2() && !(s && !std::strcmp(s, "1"));
#else
  return false;
#endif
}

template <typename scalar_t, typename acc_t>
void layer_norm_rows(const NormArgs<scalar_t, acc_t>& a, int64_t R) {
  const int64_t D = a.D;
  const bool avx2 = use_avx2();
  auto body = [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(4 * D);
#ifdef NTK_JVP_AVX2
    if (avx2) return norm_rows_avx2(a, r0, r1, buf.data());
#endif
    norm_rows_base(a, r0, r1, buf.data());
  };
  if (static_cast<double>(R) * D < 65536 || at::get_num_threads() == 1 || at::in_parallel_region())
    body(0, R);
  else
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), body);
}

std::tuple<Tensor, Tensor> layer_norm_jvp(const Tensor& x, const optional<Tensor>& weight,
                                          const optional<Tensor>& bias, double eps, const optional<Tensor>& x_dot,
                                          const optional<Tensor>& weight_dot, const optional<Tensor>& bias_dot,
                                          bool rms) {
  constexpr const char* op = "ntk_cpu.layer_norm_jvp";
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(float_type(x.scalar_type()), op, ": x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 3, op, ": x must be (N, L, D), got shape ", x.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a finite number >= 0, got ", eps);
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2);
  auto check_vec = [&](const char* name, const optional<Tensor>& t, bool per_sample_ok) {
    if (!t.has_value()) return;
    check_tensor(op, name, *t, x);
    const auto& s = t->sizes();
    const bool ok = (s.size() == 1 && s[0] == D) || (per_sample_ok && s.size() == 2 && s[0] == N && s[1] == D);
    TORCH_CHECK(ok, op, ": ", name, " must be (D=", D, ",)", per_sample_ok ? " or (N, D)" : "", " for x ",
                x.sizes(), ", got shape ", s);
  };
  check_vec("weight", weight, false);
  check_vec("bias", bias, false);
  check_vec("weight_dot", weight_dot, true);
  check_vec("bias_dot", bias_dot, true);
  if (x_dot.has_value()) {
    check_tensor(op, "x_dot", *x_dot, x);
    TORCH_CHECK(x_dot->sizes() == x.sizes(), op, ": x_dot must have x's shape ", x.sizes(), ", got ",
                x_dot->sizes());
  }
  TORCH_CHECK(weight.has_value() || !weight_dot.has_value(), op, ": weight_dot needs weight");
  TORCH_CHECK(bias.has_value() || !bias_dot.has_value(), op, ": bias_dot needs bias");
  TORCH_CHECK(!(rms && bias.has_value()), op, ": rms=True takes no bias (RMSNorm has none)");

  const auto dt = x.scalar_type(), ct = compute_type(dt);
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous), yd = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t R = N * L;
  if (R == 0 || D == 0) return {y, yd};
  const Tensor X = x.contiguous();
  const Tensor XD = x_dot.has_value() ? x_dot->contiguous() : Tensor();
  const auto opts = x.options().dtype(ct);
  const Tensor ones = at::ones({D}, opts), zeros = at::zeros({D}, opts);
  auto param = [&](const optional<Tensor>& t, const Tensor& fill) {
    return t.has_value() ? t->to(ct).contiguous() : fill;
  };
  const Tensor w = param(weight, ones), b = param(bias, zeros), wd = param(weight_dot, zeros),
               bd = param(bias_dot, zeros);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "layer_norm_jvp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    NormArgs<scalar_t, acc_t> a{X.data_ptr<scalar_t>(), XD.defined() ? XD.data_ptr<scalar_t>() : nullptr,
                                w.data_ptr<acc_t>(), b.data_ptr<acc_t>(), wd.data_ptr<acc_t>(), wd.dim() == 2 ? D : 0,
                                bd.data_ptr<acc_t>(), bd.dim() == 2 ? D : 0, y.data_ptr<scalar_t>(),
                                yd.data_ptr<scalar_t>(), L, D, static_cast<acc_t>(eps), rms};
    layer_norm_rows<scalar_t, acc_t>(a, R);
  });
  return {y, yd};
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_cpu, CPU, m) {
  m.impl("linear_jvp", &linear_jvp);
  m.impl("layer_norm_jvp", &layer_norm_jvp);
}
