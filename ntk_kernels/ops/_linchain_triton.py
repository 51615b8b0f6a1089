"""Triton backend of ``ntk::linchain`` (the math and the contract are in ops/linchain.py).

x (N, d_in), W (d_out, d_in), b (d_out), A (r, d_in), M (r, r), B (d_out, r); u, v, gv, gu (N, r) in fp32.
Every kernel takes strides (non-contiguous inputs, e.g. a transposed-view W, are not copied) and
accumulates in fp32:

  _linchain_project_kernel  u  = (keep ⊙ x) Aᵀ / (1-p)                        grid (N/BM, r/BR)
                            (also gv = s · gy B: x := gy, A := Bᵀ, no dropout)
  _linchain_fwd_kernel      y  = x Wᵀ + (s·v) Bᵀ + b, the adapter a K-extension   grid (N/BM · d_out/BN)
                            of the base GEMM's accumulator, the bias in the epilogue
  _linchain_bwd_dx_kernel   gx = gy W + keep ⊙ (gu A) / (1-p), the masked term   grid (N/BM · d_in/BN)
                            first, then the d_out loop into the same accumulator
  _linchain_bwd_dA_kernel   gA = guᵀ (keep ⊙ x) / (1-p), split over N into      grid (d_in/BC, r/BR, S)
                            fp32 partials that torch sums (deterministic, no atomics)
                            (also gBᵀ = s · vᵀ gy: G := v, X := gy, no dropout)

keep = H(seed, row, col) >= T(p) is ops/_hash_dropout.py's hash, recomputed in registers from uint32
arithmetic wherever it is needed; dropout(x) is never materialised.  The tiny r-sized products
(v = u Mᵀ, gu = gv M, gM = gvᵀ u) and gW = gyᵀ x, gb = Σ_n gy are torch ops (cuBLAS does those well).

The op computes fp64 inputs in fp64 (u is fp64 then); these kernels accumulate in fp32, so fp64 is refused.
On the CPU the kernels run only under TRITON_INTERPRET=1 (set before import: ``triton.jit`` decides then).
"""
from __future__ import annotations

import contextlib
import functools
from typing import List

import torch
from torch import Tensor

from .. import _backend
from ._triton_common import triton_reasons
from . import _hash_dropout

from ._triton_common import IMPORT_ERROR as _IMPORT_ERROR, jit as _jit, tl, triton

if triton is not None:
    from ._triton_common import dot as _dot


# ----------------------------------------------------------------------------------------------
# Device functions.
# ----------------------------------------------------------------------------------------------
@_jit()
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 (products wrap mod 2^32, shifts are logical)."""
    h ^= h >> 16
    h *= 0x85EBCA6B  # literals >= 2^31 are uint32, so the product stays uint32
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@_jit()
def _hash_uint32(seed, rows, cols):
    """H = fmix32(fmix32(seed ^ rows·0x9E3779B1) ^ cols·0x85EBCA77) in uint32; rows, cols int (broadcast).

    seed is the int32 bit pattern of the uint32 seed.  Equals _hash_dropout.hash_uint32 bit for bit.
    """
    s = tl.cast(seed, tl.uint32, bitcast=True)
    h = _fmix32((rows.to(tl.uint32) * 0x9E3779B1) ^ s)
    return _fmix32(h ^ (cols.to(tl.uint32) * 0x85EBCA77))


@_jit()
def _keep(seed, threshold, rows, cols):
    """Dropout keep mask: H(seed, rows, cols) >= T, T the int32 bit pattern of the uint32 threshold."""
    return _hash_uint32(seed, rows, cols) >= tl.cast(threshold, tl.uint32, bitcast=True)


@_jit()
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D grid over (M/BLOCK_M) x (N/BLOCK_N) tiles, GROUP_M row tiles per group
    so that consecutive programs share column tiles in L2 (Triton's matmul tutorial)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------
@_jit(do_not_specialize=["seed", "threshold"])
def _linchain_project_kernel(x_ptr, a_ptr, u_ptr, N, K, R, scale, seed, threshold,
                             sxn, sxk, sar, sak, sun, sur,
                             HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """u = scale · (keep ⊙ x) Aᵀ, one (BLOCK_M, BLOCK_R) tile of u per program.

    x (N, K) in the input dtype, A (R, K) likewise, u (N, R) fp32; BLOCK_R >= 16 pads small r with masks.
    keep(n, k) = H(seed, n, k) >= threshold is applied to the x tile in registers.
    """
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    m_ok, r_ok = rm < N, rr < R
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * sxn + rk[None, :] * sxk
    a_ptrs = a_ptr + rk[:, None] * sak + rr[None, :] * sar  # Aᵀ tile (BLOCK_K, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep(seed, threshold, rm[:, None], (k0 + rk)[None, :]), xt, tl.zeros_like(xt))
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _dot(xt, at, acc, PREC)
        x_ptrs += BLOCK_K * sxk
        a_ptrs += BLOCK_K * sak
    u_ptrs = u_ptr + rm.to(tl.int64)[:, None] * sun + rr[None, :] * sur
    tl.store(u_ptrs, acc * scale, mask=m_ok[:, None] & r_ok[None, :])


@_jit()
def _linchain_fwd_kernel(x_ptr, w_ptr, b_ptr, v_ptr, lb_ptr, y_ptr, N, D_OUT, D_IN, R, scaling,
                         sxn, sxk, swo, swi, sb, svn, svr, sbo, sbr, syn, syo,
                         HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """y = x Wᵀ + (s·v) Bᵀ + b, one (BLOCK_M, BLOCK_N) tile of y (N, D_OUT) per program.

    x (N, D_IN), W (D_OUT, D_IN), v = u Mᵀ (N, R) fp32, B (D_OUT, R), b (D_OUT,).  The adapter extends
    the base GEMM's reduction by R columns: after the D_IN loop the same fp32 accumulator takes
    (s·v) Bᵀ, s·v rounded to the input dtype so that both dots run on the same tensor-core path.
    """
    pid_m, pid_n = _tile_ids(N, D_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok, n_ok = rm < N, rn < D_OUT
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_ptrs = x_ptr + rm64[:, None] * sxn + rk[None, :] * sxk
    w_ptrs = w_ptr + rk[:, None] * swi + rn[None, :] * swo  # Wᵀ tile (BLOCK_K, BLOCK_N)
    for k0 in range(0, D_IN, BLOCK_K):
        k_ok = rk < D_IN - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(xt, wt, acc, PREC)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swi
    v_ptrs = v_ptr + rm64[:, None] * svn + rr[None, :] * svr
    b_ptrs = lb_ptr + rr[:, None] * sbr + rn[None, :] * sbo  # Bᵀ tile (BLOCK_R, BLOCK_N)
    for r0 in range(0, R, BLOCK_R):
        r_ok = rr < R - r0
        vt = tl.load(v_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0) * scaling
        bt = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(vt.to(bt.dtype), bt, acc, PREC)
        v_ptrs += BLOCK_R * svr
        b_ptrs += BLOCK_R * sbr
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn * sb, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm64[:, None] * syn + rn[None, :] * syo
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@_jit(do_not_specialize=["seed", "threshold"])
def _linchain_bwd_dx_kernel(gy_ptr, w_ptr, gu_ptr, a_ptr, gx_ptr, N, D_IN, D_OUT, R, scale, seed, threshold,
                            sgn, sgo, swo, swi, sun, sur, sar, sai, sxn, sxi,
                            HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                            GROUP_M: tl.constexpr):
    """gx = gy W + keep ⊙ scale · (gu A), one (BLOCK_M, BLOCK_N) tile of gx (N, D_IN) per program.

    gy (N, D_OUT), W (D_OUT, D_IN), gu (N, R) fp32, A (R, D_IN), scale = 1/(1-p).  One fp32 accumulator:
    the R loop runs first, keep(n, i) (regenerated in registers) and scale are applied to it, then the
    D_OUT loop adds gy W (half the registers of two accumulators: no spills at 128x128 on sm_90).
    """
    pid_m, pid_n = _tile_ids(N, D_IN, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok, n_ok = rm < N, rn < D_IN
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u_ptrs = gu_ptr + rm64[:, None] * sun + rr[None, :] * sur
    a_ptrs = a_ptr + rr[:, None] * sar + rn[None, :] * sai  # A tile (BLOCK_R, BLOCK_N)
    for r0 in range(0, R, BLOCK_R):
        r_ok = rr < R - r0
        ut = tl.load(u_ptrs, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(ut.to(at.dtype), at, acc, PREC)
        u_ptrs += BLOCK_R * sur
        a_ptrs += BLOCK_R * sar
    acc = acc * scale
    if HAS_DROPOUT:
        acc = tl.where(_keep(seed, threshold, rm[:, None], rn[None, :]), acc, 0.0)
    g_ptrs = gy_ptr + rm64[:, None] * sgn + rk[None, :] * sgo
    w_ptrs = w_ptr + rk[:, None] * swo + rn[None, :] * swi  # W tile (BLOCK_K, BLOCK_N)
    for k0 in range(0, D_OUT, BLOCK_K):
        k_ok = rk < D_OUT - k0
        gt = tl.load(g_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(gt, wt, acc, PREC)
        g_ptrs += BLOCK_K * sgo
        w_ptrs += BLOCK_K * swo
    gx_ptrs = gx_ptr + rm64[:, None] * sxn + rn[None, :] * sxi
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@_jit(do_not_specialize=["seed", "threshold"])
def _linchain_bwd_dA_kernel(g_ptr, x_ptr, out_ptr, N, R, C, rows_per_split, scale, seed, threshold,
                            sgn, sgr, sxn, sxc, sos, sor, soc,
                            HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[s] = scale · G[rows]ᵀ (keep ⊙ X[rows]) over rows [s·rows_per_split, (s+1)·rows_per_split) ∩ [0, N).

    G (N, R) fp32, X (N, C) in the input dtype, out (S, R, C) fp32 partials that the caller sums over s.
    One (BLOCK_R, BLOCK_C) tile of split s per program; rows_per_split is a multiple of BLOCK_K.
    """
    pid_c, pid_r, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rk = tl.arange(0, BLOCK_K)
    r_ok, c_ok = rr < R, rc < C
    n_start = pid_s * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_K):
        rn = n0 + rk
        n_ok = rn < n_end
        rn64 = rn.to(tl.int64)
        gt = tl.load(g_ptr + rn64[None, :] * sgn + rr[:, None] * sgr,  # Gᵀ tile (BLOCK_R, BLOCK_K)
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + rn64[:, None] * sxn + rc[None, :] * sxc, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            xt = tl.where(_keep(seed, threshold, rn[:, None], rc[None, :]), xt, tl.zeros_like(xt))
        acc = _dot(gt.to(xt.dtype), xt, acc, PREC)
    o_ptrs = out_ptr + pid_s * sos + rr[:, None] * sor + rc[None, :] * soc
    tl.store(o_ptrs, acc * scale, mask=r_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers: block sizes, dtypes, the mask's integer arguments.
# ----------------------------------------------------------------------------------------------
def _i32(v: int) -> int:
    """The int32 bit pattern of a uint32 (kernels bitcast it back)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def _mask_args(dropout_p: float, seed: int):
    """(HAS_DROPOUT, 1/(1-p), seed bits, threshold bits) for the kernels."""
    if dropout_p == 0.0:
        return False, 1.0, 0, 0
    return True, 1.0 / (1.0 - dropout_p), _i32(seed), _i32(_hash_dropout.threshold(dropout_p))


def _interpreted() -> bool:
    return type(_linchain_fwd_kernel).__name__ == "InterpretedFunction"


def _prec(t: Tensor) -> str:
    """fp32 dots follow torch's matmul setting (TF32 only when torch would use it); 16-bit ignore it."""
    if t.dtype == torch.float32 and not (t.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def _block_r(r: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(r)), cap)  # tl.dot needs every dim >= 16


def _on_gpu(t: Tensor) -> bool:
    return t.is_cuda and not _interpreted()


def _cfg(kernel: str, dtype: torch.dtype, r: int, gpu: bool) -> dict:
    """Tiles and launch options of ``kernel``: "gemm" (fwd and dx), "project" or "reduce" (dA).

    GPU: 128x128x64 GEMM tiles, 8 warps, 3 stages for 16-bit (BLOCK_K 32 for fp32), r stepped by up to
    BLOCK_K.  With triton 3.9 these compile for sm_90 with at most a few bytes of register spills (ptxas -v;
    sm_80 spills up to ~800 B in the dx kernel); not yet tuned on hardware.  Interpreted: 16-wide tiles.
    """
    if not gpu:
        return dict(gemm=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_R=16, GROUP_M=4),
                    project=dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=16),
                    reduce=dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16))[kernel]
    f32 = dtype == torch.float32
    if kernel == "gemm":
        bk = 32 if f32 else 64
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=bk, BLOCK_R=_block_r(r, bk), GROUP_M=8, num_warps=8,
                    num_stages=3)
    if kernel == "project":
        return dict(BLOCK_M=64, BLOCK_R=_block_r(r, 64), BLOCK_K=32 if f32 else 64, num_warps=4, num_stages=3)
    return dict(BLOCK_R=_block_r(r, 64), BLOCK_C=128, BLOCK_K=16 if f32 else 32, num_warps=8 if f32 else 4,
                num_stages=3)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _project(x: Tensor, a_t: Tensor, scale: float, dropout_p: float, seed: int) -> Tensor:
    """scale · (keep ⊙ x) a_tᵀ as (N, R) fp32; x (N, K), a_t (R, K) (any strides)."""
    (n, k), r = x.shape, a_t.shape[0]
    out = torch.empty(n, r, device=x.device, dtype=torch.float32)
    has_drop, _, seed_bits, thr_bits = _mask_args(dropout_p, seed)
    cfg = _cfg("project", x.dtype, r, _on_gpu(x))
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(r, cfg["BLOCK_R"]))
    _linchain_project_kernel[grid](x, a_t, out, n, k, r, scale, seed_bits, thr_bits, *x.stride(), *a_t.stride(),
                                   *out.stride(), HAS_DROPOUT=has_drop, PREC=_prec(x), **cfg)
    return out


def _reduce_rows(g: Tensor, x: Tensor, scale: float, dropout_p: float, seed: int) -> Tensor:
    """scale · gᵀ (keep ⊙ x) as (R, C) fp32, reduced over the N rows of g (N, R) fp32 and x (N, C)."""
    (n, c), r = x.shape, g.shape[1]
    has_drop, _, seed_bits, thr_bits = _mask_args(dropout_p, seed)
    cfg = _cfg("reduce", x.dtype, r, _on_gpu(x))
    if _on_gpu(x):  # about two programs per SM
        tiles = 2 * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        tiles = 1 << 30  # one split per row block: the tests exercise the split path
    grid_rc = triton.cdiv(c, cfg["BLOCK_C"]) * triton.cdiv(r, cfg["BLOCK_R"])
    row_blocks = triton.cdiv(n, cfg["BLOCK_K"])
    splits = max(1, min(row_blocks, tiles // grid_rc))
    rows_per_split = triton.cdiv(row_blocks, splits) * cfg["BLOCK_K"]
    splits = triton.cdiv(n, rows_per_split)
    part = torch.empty(splits, r, c, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(c, cfg["BLOCK_C"]), triton.cdiv(r, cfg["BLOCK_R"]), splits)
    _linchain_bwd_dA_kernel[grid](g, x, part, n, r, c, rows_per_split, scale, seed_bits, thr_bits, *g.stride(),
                                  *x.stride(), *part.stride(), HAS_DROPOUT=has_drop, PREC=_prec(x), **cfg)
    return part[0] if splits == 1 else part.sum(0)


def _fwd_triton(x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p, seed):
    """(y, u): u = dropout(x) Aᵀ (N, r) fp32, y = x Wᵀ + b + s · (u Mᵀ) Bᵀ (N, d_out) in x's dtype."""
    with _device(x):
        (n, d_in), d_out, r = x.shape, weight.shape[0], lora_A.shape[0]
        u = _project(x, lora_A, _mask_args(dropout_p, seed)[1], dropout_p, seed)
        v = u if chain is None else u @ chain.to(torch.float32).t()
        y = torch.empty(n, d_out, device=x.device, dtype=x.dtype)
        cfg = _cfg("gemm", x.dtype, r, _on_gpu(x))
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(d_out, cfg["BLOCK_N"]),)
        b = bias if bias is not None else y
        _linchain_fwd_kernel[grid](x, weight, b, v, lora_B, y, n, d_out, d_in, r, float(scaling), *x.stride(),
                                   *weight.stride(), b.stride(0) if bias is not None else 0, *v.stride(),
                                   *lora_B.stride(), *y.stride(), HAS_BIAS=bias is not None, PREC=_prec(x), **cfg)
    return y, u


def _bwd_triton(grad_y, x, weight, lora_A, chain, lora_B, u, scaling, dropout_p, seed, needs):
    """(gx, gW, gb, gA, gM, gB) as _ReferenceKernels.backward; entries not needed are x.new_empty(0)."""
    empty = x.new_empty(0)
    out = [empty] * 6
    gy, s = grad_y, float(scaling)
    m = None if chain is None else chain.to(torch.float32)
    with _device(x):
        (n, d_in), d_out, r = x.shape, weight.shape[0], lora_A.shape[0]
        if needs[0] or needs[3] or (needs[4] and m is not None):
            gv = _project(gy, lora_B.t(), s, 0.0, 0)  # s · gy B, (N, r) fp32
            gu = gv if m is None else gv @ m
        if needs[0]:
            gx = torch.empty(n, d_in, device=x.device, dtype=x.dtype)
            has_drop, inv_keep, seed_bits, thr_bits = _mask_args(dropout_p, seed)
            cfg = _cfg("gemm", x.dtype, r, _on_gpu(x))
            grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(d_in, cfg["BLOCK_N"]),)
            _linchain_bwd_dx_kernel[grid](gy, weight, gu, lora_A, gx, n, d_in, d_out, r, inv_keep, seed_bits,
                                          thr_bits, *gy.stride(), *weight.stride(), *gu.stride(), *lora_A.stride(),
                                          *gx.stride(), HAS_DROPOUT=has_drop, PREC=_prec(x), **cfg)
            out[0] = gx
        if needs[1]:  # contiguous, as the fake kernel says (AccumulateGrad re-lays it out for a W view)
            out[1] = gy.t() @ x
        if needs[2]:
            out[2] = gy.sum(0, dtype=torch.float32).to(x.dtype)
        if needs[3]:
            out[3] = _reduce_rows(gu, x, _mask_args(dropout_p, seed)[1], dropout_p, seed).to(lora_A.dtype)
        if needs[4] and m is not None:
            out[4] = (gv.t() @ u.to(torch.float32)).to(chain.dtype)
        if needs[5]:
            v = u.to(torch.float32) if m is None else u.to(torch.float32) @ m.t()
            out[5] = _reduce_rows(v, gy, s, 0.0, 0).t().to(lora_B.dtype).contiguous()  # (s · vᵀ gy)ᵀ
    return tuple(out)


class _TritonKernels:
    """Triton kernels with the contract of linchain._ReferenceKernels (fp16 / bf16 / fp32)."""
    forward = staticmethod(_fwd_triton)
    backward = staticmethod(_bwd_triton)


def _triton_reasons(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Why the Triton backend cannot run on (device, dtype); empty when it can."""
    return triton_reasons(device, dtype, _IMPORT_ERROR if triton is None else None, _interpreted)


_backend.register("linchain", "triton", _TritonKernels, _triton_reasons)
