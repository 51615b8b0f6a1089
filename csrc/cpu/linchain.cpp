// LinChain / LoRA linear on the CPU (see ntk_kernels/ops/linchain.py for the math).
//   forward  u = dropout(x) Aᵀ, v = u Mᵀ, y = x Wᵀ + b + s · v Bᵀ
//   backward gv = s·gy B, gu = gv M, gx = gy W + mask ⊙ (gu A)/(1-p), gA = guᵀ dropout(x), gM = gvᵀ u, gB = s·gyᵀ v
// What is fused: dropout(x) is never materialised whole (row blocks of it are generated from the hash into a
// small buffer that feeds the GEMM); the adapter term is accumulated into the base GEMM's output in place
// (addmm_ with beta = 1: no (N, d_out) temporaries); one pass over the row blocks serves both gx and gA.
// bf16/fp16 are computed in fp32 (bf16 GEMMs on CPUs without AMX run >100x slower than fp32).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "hash_dropout.h"

namespace {
using at::Tensor;

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows per block: keeps a block of dropout(x) (rows x d_in, compute dtype) near 4 MiB.
int64_t block_rows(int64_t n, int64_t d_in) { return std::max<int64_t>(16, std::min<int64_t>(n, (1 << 20) / std::max<int64_t>(d_in, 1))); }

// For rows [row0, row0 + rows) of x (compute dtype, any strides): keep (rows, d_in) uint8 = the mask and
// xd (rows, d_in) = dropout(x), each written when given.  One hash per element serves both gA (through xd)
// and gx (through keep) in the backward pass.
template <typename T>
void mask_block(const Tensor& x, int64_t row0, int64_t rows, double p, uint32_t seed, Tensor* keep, Tensor* xd) {
  const T* xp = x.data_ptr<T>();
  uint8_t* kp = keep ? keep->data_ptr<uint8_t>() : nullptr;
  T* op = xd ? xd->data_ptr<T>() : nullptr;
  const int64_t d = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const uint32_t thr = ntk::dropout_threshold(p);
  const T scale = static_cast<T>(1.0 / (1.0 - p));
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint32_t rh = ntk::dropout_row_hash(seed, static_cast<uint32_t>(row0 + i));
      const T* xr = xp + (row0 + i) * s0;
      for (int64_t c = 0; c < d; ++c) {
        const bool k = ntk::dropout_hash(rh, static_cast<uint32_t>(c)) >= thr;
        if (kp) kp[i * d + c] = k;
        if (op) op[i * d + c] = k ? xr[c * s1] * scale : T(0);
      }
    }
  });
}

// gx[row0 : row0 + rows] += keep ⊙ t / (1 - p), t (rows, d_in) contiguous, gx contiguous.
template <typename T>
void masked_add_block(Tensor& gx, const Tensor& t, const Tensor& keep, int64_t row0, int64_t rows, double p) {
  T* gp = gx.data_ptr<T>() + row0 * gx.size(1);
  const T* tp = t.data_ptr<T>();
  const uint8_t* kp = keep.data_ptr<uint8_t>();
  const int64_t d = gx.size(1);
  const T scale = static_cast<T>(1.0 / (1.0 - p));
  at::parallel_for(0, rows * d, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) gp[j] += kp[j] ? tp[j] * scale : T(0);
  });
}

void check_common(const Tensor& x, const Tensor& weight, const Tensor& A, const c10::optional<Tensor>& chain,
                  const Tensor& B, double p) {
  TORCH_CHECK(x.dim() == 2, "ntk_cpu.linchain: x must be 2-D (N, d_in), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "ntk_cpu.linchain: weight must be (d_out, ",
              x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1), "ntk_cpu.linchain: lora_A must be (r, ", x.size(1),
              "), got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == A.size(0),
              "ntk_cpu.linchain: lora_B must be (", weight.size(0), ", ", A.size(0), "), got ", B.sizes());
  if (chain.has_value())
    TORCH_CHECK(chain->dim() == 2 && chain->size(0) == A.size(0) && chain->size(1) == A.size(0),
                "ntk_cpu.linchain: chain must be (", A.size(0), ", ", A.size(0), "), got ", chain->sizes());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "ntk_cpu.linchain: dropout_p must be in [0, 1), got ", p);
  for (const Tensor* t : {&x, &weight, &A, &B})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(),
                "ntk_cpu.linchain: every tensor must be a CPU tensor of x's dtype ", x.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "ntk_cpu.linchain: x must be floating point, got ",
              x.scalar_type());
}

// u = dropout(x) Aᵀ, x and A in compute dtype.
Tensor project(const Tensor& x, const Tensor& A, double p, uint32_t seed) {
  if (p == 0.0) return at::mm(x, A.t());
  const int64_t n = x.size(0), d = x.size(1), rb = block_rows(n, d);
  Tensor u = at::empty({n, A.size(0)}, x.options());
  Tensor buf = at::empty({rb, d}, x.options());
  for (int64_t r0 = 0; r0 < n; r0 += rb) {
    const int64_t rows = std::min(rb, n - r0);
    Tensor blk = buf.narrow(0, 0, rows);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linchain_project", [&] { mask_block<scalar_t>(x, r0, rows, p, seed, nullptr, &blk); });
    Tensor ub = u.narrow(0, r0, rows);
    at::mm_out(ub, blk, A.t());
  }
  return u;
}

std::tuple<Tensor, Tensor> linchain_fwd(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                        const Tensor& A, const c10::optional<Tensor>& chain, const Tensor& B,
                                        double scaling, double p, int64_t seed) {
  check_common(x, weight, A, chain, B, p);
  const auto ct = compute_type(x.scalar_type());
  const Tensor xc = x.to(ct), Wc = weight.to(ct), Ac = A.to(ct), Bc = B.to(ct);
  Tensor u = project(xc, Ac, p, static_cast<uint32_t>(seed));
  Tensor v = chain.has_value() ? at::mm(u, chain->to(ct).t()) : u;
  Tensor y = bias.has_value() ? at::addmm(bias->to(ct), xc, Wc.t()) : at::mm(xc, Wc.t());
  y.addmm_(v, Bc.t(), /*beta=*/1.0, /*alpha=*/scaling);
  return {y.to(x.scalar_type()), u};
}

std::vector<Tensor> linchain_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& A,
                                 const c10::optional<Tensor>& chain, const Tensor& B, const Tensor& u,
                                 double scaling, double p, int64_t seed, const c10::List<bool>& needs_list) {
  check_common(x, weight, A, chain, B, p);
  TORCH_CHECK(needs_list.size() == 6, "ntk_cpu.linchain_bwd: needs must have 6 entries, got ", needs_list.size());
  bool needs[6];
  for (int i = 0; i < 6; ++i) needs[i] = needs_list.get(i);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0),
              "ntk_cpu.linchain_bwd: grad_y must be (", x.size(0), ", ", weight.size(0), "), got ", grad_y.sizes());
  const auto ct = compute_type(x.scalar_type());
  const auto dt = x.scalar_type();
  const uint32_t sd = static_cast<uint32_t>(seed);
  const Tensor gy = grad_y.to(ct), xc = x.to(ct), Wc = weight.to(ct), Ac = A.to(ct), Bc = B.to(ct), uc = u.to(ct);
  const c10::optional<Tensor> Mc = chain.has_value() ? c10::optional<Tensor>(chain->to(ct)) : c10::nullopt;
  Tensor gv = at::mm(gy, Bc).mul_(scaling);
  Tensor gu = Mc.has_value() ? at::mm(gv, *Mc) : gv;
  const Tensor empty = at::empty({0}, x.options());
  std::vector<Tensor> out(6, empty);

  Tensor gx, gA;
  if (needs[0]) gx = at::mm(gy, Wc);
  if (p == 0.0) {
    if (needs[0]) gx.addmm_(gu, Ac);
    if (needs[3]) gA = at::mm(gu.t(), xc);
  } else if (needs[0] || needs[3]) {
    const int64_t n = x.size(0), d = x.size(1), rb = block_rows(n, d);
    Tensor buf = at::empty({rb, d}, xc.options());
    Tensor keep_buf = at::empty({rb, d}, xc.options().dtype(at::kByte));
    if (needs[3]) gA = at::zeros({A.size(0), d}, xc.options());
    for (int64_t r0 = 0; r0 < n; r0 += rb) {
      const int64_t rows = std::min(rb, n - r0);
      Tensor blk = buf.narrow(0, 0, rows), keep = keep_buf.narrow(0, 0, rows);
      const Tensor gub = gu.narrow(0, r0, rows);
      AT_DISPATCH_FLOATING_TYPES(ct, "linchain_bwd_mask", [&] {
        mask_block<scalar_t>(xc, r0, rows, p, sd, &keep, needs[3] ? &blk : nullptr);
      });
      if (needs[3]) gA.addmm_(gub.t(), blk);
      if (needs[0]) {
        at::mm_out(blk, gub, Ac);
        AT_DISPATCH_FLOATING_TYPES(ct, "linchain_bwd_dx", [&] { masked_add_block<scalar_t>(gx, blk, keep, r0, rows, p); });
      }
    }
  }
  if (needs[0]) out[0] = gx.to(dt);
  if (needs[3]) out[3] = gA.to(dt);
  if (needs[1]) out[1] = at::mm(gy.t(), xc).to(dt);
  if (needs[2]) out[2] = gy.sum(0).to(dt);
  if (needs[4] && Mc.has_value()) out[4] = at::mm(gv.t(), uc).to(dt);
  if (needs[5]) {
    Tensor v = Mc.has_value() ? at::mm(uc, Mc->t()) : uc;
    out[5] = at::mm(gy.t(), v).mul_(scaling).to(dt);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ntk_cpu, CPU, m) {
  m.impl("linchain_fwd", &linchain_fwd);
  m.impl("linchain_bwd", &linchain_bwd);
}
