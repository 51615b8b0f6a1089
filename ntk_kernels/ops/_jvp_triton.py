"""Triton backends of ``ntk::linear_jvp`` and ``ntk::layer_norm_jvp`` (the math and the contract are in ops/jvp.py).

Rows m = n·L + l of x (N, L, ·) flattened to (M = N·L, ·); a row's sample is n = m // L.  Every kernel reads
its inputs through strides (a transposed-view weight, e.g. GPT-2's Conv1D ``weight.t()``, is not copied),
accumulates in fp32 and writes y and ẏ in x's dtype.

  _linear_jvp_kernel      y = x Wᵀ + b,  ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ                    grid (M/BM · d_out/BN)
                          one (BM, BN) tile of y and of ẏ per program; per BK-chunk of d_in the x tile is
                          loaded once for x Wᵀ and x Ẇᵀ, the W tile once for x Wᵀ and ẋ Wᵀ (three tl.dot
                          into two fp32 accumulators), b and ḃ in the epilogue.  A per-sample Ẇ (N, d_out,
                          d_in) is read by tiles that each lie in one sample (L/BM row tiles per sample), so
                          the program's Ẇ_n is one (BK, BN) tile per chunk; otherwise row tiles span samples
                          (grouped along M for L2 reuse of W, as Triton's matmul tutorial).
  _layer_norm_jvp_kernel  ROWS rows per program; with the whole row in registers (SINGLE: d ≤ BLOCK_D) one
                          read of x, ẋ:  μ, σ (or r), x̂, y, mean(ẋ), mean(ẋ ⊙ x̂), ẏ;  longer rows in
                          BLOCK_D chunks, 3 passes (Σx [,Σẋ]; Σ(x−μ)² [,Σẋ(x−μ)]; outputs; RMSNorm: 2).

GPU tiles are first guesses, untuned (benchmarks/gpu_check_jvp.py checks and times them; _linear_plan says which
compile without spills): linear 128x128x64 (16-bit; 128x128x32 TF32, 64x128x16 IEEE fp32), 8 warps, stages by
shared memory; a per-sample Ẇ with short L takes BM = next_pow2(L) (>= 16).  These kernels accumulate in fp32, so fp64 is refused (the op computes fp64 in fp64: reference, cpu or
cuda).  On the CPU the kernels run only under TRITON_INTERPRET=1 (set before import).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import _backend
from ._triton_common import (device_context as _device, dot_precision as _prec, interpreted, next_p2 as _p2,
                             triton_reasons)

from ._triton_common import IMPORT_ERROR as _IMPORT_ERROR, jit as _jit, tl, triton

if triton is not None:
    from ._triton_common import dot as _dot


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------
@_jit()
def _linear_jvp_kernel(x_ptr, xd_ptr, w_ptr, wd_ptr, b_ptr, bd_ptr, y_ptr, yd_ptr,
                       M, L, K, NOUT, M_TILES, TILES_PER_SAMPLE,
                       sxm, sxk, sxdm, sxdk, swn, swk, swds, swdn, swdk, sb, sbds, sbdn, sym, syn, sydm, sydn,
                       HAS_B: tl.constexpr, HAS_XD: tl.constexpr, HAS_WD: tl.constexpr, WD_PS: tl.constexpr,
                       HAS_BD: tl.constexpr, BD_PS: tl.constexpr, SAMPLE_TILES: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """(BLOCK_M, BLOCK_N) tiles of y and ẏ.  SAMPLE_TILES: row tile t covers rows l of sample t // TILES_PER_SAMPLE
    (needed for a per-sample Ẇ, WD_PS); else rows t·BM + [0, BM) of the M rows."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(NOUT, BLOCK_N)
    group = GROUP_M * n_tiles
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(M_TILES - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = tl.arange(0, BLOCK_M)
    if SAMPLE_TILES:
        n_tile = pid_m // TILES_PER_SAMPLE
        l = (pid_m % TILES_PER_SAMPLE) * BLOCK_M + rm
        row_ok = l < L
        rows = n_tile.to(tl.int64) * L + l
        n_row = n_tile + rm * 0
        wd_off = n_tile.to(tl.int64) * swds
    else:
        wd_off = 0
        rows = pid_m.to(tl.int64) * BLOCK_M + rm
        row_ok = rows < M
        n_row = rows // L
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    rk = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + rows[:, None] * sxm + rk[None, :] * sxk             # (BM, BK)
    xd_ptrs = xd_ptr + rows[:, None] * sxdm + rk[None, :] * sxdk
    w_ptrs = w_ptr + cols[None, :] * swn + rk[:, None] * swk             # Wᵀ tile (BK, BN)
    wd_ptrs = wd_ptr + wd_off + cols[None, :] * swdn + rk[:, None] * swdk
    acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_yd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_y = _dot(x, w, acc_y, PREC)
        if HAS_XD:
            xd = tl.load(xd_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc_yd = _dot(xd, w, acc_yd, PREC)
            xd_ptrs += BLOCK_K * sxdk
        if HAS_WD:
            wd = tl.load(wd_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_yd = _dot(x, wd, acc_yd, PREC)
            wd_ptrs += BLOCK_K * swdk
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    if HAS_B:
        acc_y += tl.load(b_ptr + cols * sb, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BD:
        if BD_PS:
            bd = tl.load(bd_ptr + n_row.to(tl.int64)[:, None] * sbds + cols[None, :] * sbdn,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc_yd += bd.to(tl.float32)
        else:
            acc_yd += tl.load(bd_ptr + cols * sbdn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + rows[:, None] * sym + cols[None, :] * syn, acc_y.to(y_ptr.dtype.element_ty), mask=out_ok)
    tl.store(yd_ptr + rows[:, None] * sydm + cols[None, :] * sydn, acc_yd.to(yd_ptr.dtype.element_ty), mask=out_ok)


@_jit()
def _row_vec(ptr, n_row, cols, mask, sds, sd, PER_SAMPLE: tl.constexpr):
    """(ROWS, BLOCK_D) fp32 tile of a (D,) vector (broadcast over rows) or of a per-sample (N, D) one."""
    if PER_SAMPLE:
        v = tl.load(ptr + n_row.to(tl.int64)[:, None] * sds + cols[None, :] * sd, mask=mask, other=0.0)
    else:
        v = tl.load(ptr + cols[None, :] * sd + n_row[:, None] * 0, mask=mask, other=0.0)
    return v.to(tl.float32)


@_jit()
def _ln_outputs(x_ptr, xd_ptr, w_ptr, b_ptr, wd_ptr, bd_ptr, y_ptr, yd_ptr, rows, n_row, cols, mask,
                sxm, sxdm, sym, sydm, sw, sb, swds, swd, sbds, sbd, mean, rstd, mxd, proj,
                x, xd, RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_XD: tl.constexpr,
                HAS_WD: tl.constexpr, WD_PS: tl.constexpr, HAS_BD: tl.constexpr, BD_PS: tl.constexpr):
    """Writes y, ẏ of one (ROWS, BLOCK_D) tile from x, ẋ (fp32, 0 off the mask) and the row statistics:
    mean (0 for RMSNorm), rstd = 1/σ (1/r), mxd = mean(ẋ) (LayerNorm), proj = mean(ẋ ⊙ x̂)."""
    xh = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    y = xh
    if HAS_W:
        w = _row_vec(w_ptr, n_row, cols, mask, 0, sw, False)
        y = y * w
    if HAS_B:
        y += _row_vec(b_ptr, n_row, cols, mask, 0, sb, False)
    yd = tl.zeros_like(y)
    if HAS_XD:
        if RMS:
            xhd = (xd - xh * proj[:, None]) * rstd[:, None]
        else:
            xhd = (xd - mxd[:, None] - xh * proj[:, None]) * rstd[:, None]
        if HAS_W:
            xhd = xhd * w
        yd += xhd
    if HAS_WD:
        yd += xh * _row_vec(wd_ptr, n_row, cols, mask, swds, swd, WD_PS)
    if HAS_BD:
        yd += _row_vec(bd_ptr, n_row, cols, mask, sbds, sbd, BD_PS)
    r64 = rows.to(tl.int64)[:, None]
    tl.store(y_ptr + r64 * sym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(yd_ptr + r64 * sydm + cols[None, :], yd.to(yd_ptr.dtype.element_ty), mask=mask)


@_jit()
def _ln_chunk(x_ptr, xd_ptr, r64, row_ok, rd, d0, D, sxm, sxdm, HAS_XD: tl.constexpr):
    """Columns cols = d0 + rd of the rows: (cols, mask, x, ẋ), x and ẋ as fp32 (ROWS, BLOCK_D) tiles, 0 off the
    mask; ẋ = x when there is no ẋ (the callers then ignore it)."""
    cols = d0 + rd
    mask = row_ok[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + r64 * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_XD:
        xd = tl.load(xd_ptr + r64 * sxdm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        xd = x
    return cols, mask, x, xd


@_jit()
def _layer_norm_jvp_kernel(x_ptr, xd_ptr, w_ptr, b_ptr, wd_ptr, bd_ptr, y_ptr, yd_ptr, M, L, D, eps,
                           sxm, sxdm, sym, sydm, sw, sb, swds, swd, sbds, sbd,
                           RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_XD: tl.constexpr,
                           HAS_WD: tl.constexpr, WD_PS: tl.constexpr, HAS_BD: tl.constexpr, BD_PS: tl.constexpr,
                           SINGLE: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows pid·ROWS + [0, ROWS) of x (M, D) (unit stride along D).  SINGLE: D <= BLOCK_D, one tile per row."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M
    n_row = rows // L
    r64 = rows.to(tl.int64)[:, None]
    rd = tl.arange(0, BLOCK_D)
    if SINGLE:
        cols, mask, x, xd = _ln_chunk(x_ptr, xd_ptr, r64, row_ok, rd, 0, D, sxm, sxdm, HAS_XD)
        if RMS:
            mean = tl.zeros((ROWS,), dtype=tl.float32)
            xc = x
        else:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        if HAS_XD:
            mxd = tl.sum(xd, axis=1) / D
            proj = tl.sum(xd * xc, axis=1) / D * rstd
        else:
            mxd = mean
            proj = mean
        _ln_outputs(x_ptr, xd_ptr, w_ptr, b_ptr, wd_ptr, bd_ptr, y_ptr, yd_ptr, rows, n_row, cols, mask,
                    sxm, sxdm, sym, sydm, sw, sb, swds, swd, sbds, sbd, mean, rstd, mxd, proj, x, xd,
                    RMS, HAS_W, HAS_B, HAS_XD, HAS_WD, WD_PS, HAS_BD, BD_PS)
    else:
        # pass 1: LayerNorm Σx, Σẋ;  RMSNorm Σx², Σẋx (no centring: r is the only statistic besides proj)
        s1 = tl.zeros((ROWS,), dtype=tl.float32)
        s2 = tl.zeros((ROWS,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols, mask, x, xd = _ln_chunk(x_ptr, xd_ptr, r64, row_ok, rd, d0, D, sxm, sxdm, HAS_XD)
            if RMS:
                s1 += tl.sum(x * x, axis=1)
                if HAS_XD:
                    s2 += tl.sum(xd * x, axis=1)
            else:
                s1 += tl.sum(x, axis=1)
                if HAS_XD:
                    s2 += tl.sum(xd, axis=1)
        if RMS:
            mean = tl.zeros((ROWS,), dtype=tl.float32)
            mxd = mean
            rstd = 1.0 / tl.sqrt(s1 / D + eps)
            proj = s2 / D * rstd
        else:
            # pass 2 (LayerNorm): Σ(x − μ)², Σẋ(x − μ), centred for accuracy
            mean = s1 / D
            mxd = s2 / D
            s3 = tl.zeros((ROWS,), dtype=tl.float32)
            s4 = tl.zeros((ROWS,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols, mask, x, xd = _ln_chunk(x_ptr, xd_ptr, r64, row_ok, rd, d0, D, sxm, sxdm, HAS_XD)
                xc = tl.where(mask, x - mean[:, None], 0.0)
                s3 += tl.sum(xc * xc, axis=1)
                if HAS_XD:
                    s4 += tl.sum(xd * xc, axis=1)
            rstd = 1.0 / tl.sqrt(s3 / D + eps)
            proj = s4 / D * rstd
        # last pass: the outputs
        for d0 in range(0, D, BLOCK_D):
            cols, mask, x, xd = _ln_chunk(x_ptr, xd_ptr, r64, row_ok, rd, d0, D, sxm, sxdm, HAS_XD)
            _ln_outputs(x_ptr, xd_ptr, w_ptr, b_ptr, wd_ptr, bd_ptr, y_ptr, yd_ptr, rows, n_row, cols,
                        mask, sxm, sxdm, sym, sydm, sw, sb, swds, swd, sbds, sbd, mean, rstd, mxd, proj, x, xd,
                        RMS, HAS_W, HAS_B, HAS_XD, HAS_WD, WD_PS, HAS_BD, BD_PS)


# ----------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    return interpreted(_linear_jvp_kernel)


def _on_gpu(t: Tensor) -> bool:
    return t.is_cuda and not _interpreted()


def _check_dtype(op: str, x: Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton backend of {op} takes float16, bfloat16 or float32, not {x.dtype} "
                        f"(these kernels accumulate in fp32)")


def _linear_plan(L: int, dtype: torch.dtype, prec: str, sample_tiles: bool, has_xd: bool, has_wd: bool,
                 gpu: bool) -> dict:
    """Tiles of _linear_jvp_kernel.  GPU, untuned first guesses that compile for sm_90a (triton 3.9, offline, with
    a real launch's stride-1 / 16-divisible specialisation) to at most 255 registers and no spills:
      16-bit and TF32: 128 x 128 x 64 (16-bit) / 32 (TF32), 8 warps (wgmma; 208-243 registers with ẋ and Ẇ)
      IEEE fp32 (FMA): 64 x 128 x 16, 8 warps (254 registers; 128 x 128 spills)
    pipeline stages 2-4 as the operand tiles fit in ~200 KB of shared memory.  A tile per sample (per-sample Ẇ)
    takes BM = next_pow2(L) in [16, BM], with 4 warps (and BN = 64 for IEEE fp32) below 64 rows.
    Interpreted: 16-wide tiles (tl.dot needs every dim >= 16), so small tests cross tile edges."""
    if not gpu:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    ieee = dtype == torch.float32 and prec == "ieee"
    bm, bn, bk = (64, 128, 16) if ieee else (128, 128, 32 if dtype == torch.float32 else 64)
    warps = 8
    if sample_tiles:
        bm = min(bm, max(16, _p2(L)))
        if bm < 64:
            warps = 4
            bn = 64 if ieee else bn
    esize = 4 if dtype == torch.float32 else 2
    per_stage = (bm * bk * (1 + has_xd) + bk * bn * (1 + has_wd)) * esize
    stages = max(2, min(4, (200 * 1024) // per_stage))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


def linear_jvp_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, x_dot: Optional[Tensor] = None,
                      weight_dot: Optional[Tensor] = None, bias_dot: Optional[Tensor] = None, *,
                      config: Optional[dict] = None) -> tuple:
    """The backend of ``linear_jvp``: x, x_dot (N, L, d_in); weight (d_out, d_in) and weight_dot (d_out, d_in) or
    (N, d_out, d_in) with any strides; bias (d_out,), bias_dot (d_out,) or (N, d_out); returns (y, ẏ) as
    (N, L, d_out) in x's dtype.  ``config`` overrides tile sizes / launch options (tests, benchmarks)."""
    _check_dtype("linear_jvp", x)
    N, L, K = x.shape
    NOUT = weight.shape[0]
    x = x.contiguous()
    y = torch.empty((N, L, NOUT), device=x.device, dtype=x.dtype)
    yd = torch.empty_like(y)
    M = N * L
    if M == 0 or NOUT == 0:
        return y, yd
    has_xd, has_wd, has_b, has_bd = x_dot is not None, weight_dot is not None, bias is not None, bias_dot is not None
    wd_ps = has_wd and weight_dot.ndim == 3
    bd_ps = has_bd and bias_dot.ndim == 2
    sample_tiles = wd_ps
    if has_xd:
        x_dot = x_dot.contiguous()
    prec = _prec(x)
    cfg = _linear_plan(L, x.dtype, prec, sample_tiles, has_xd, has_wd, _on_gpu(x))
    cfg.update(config or {})
    bm = cfg["BLOCK_M"]
    tiles_per_sample = triton.cdiv(L, bm)
    m_tiles = N * tiles_per_sample if sample_tiles else triton.cdiv(M, bm)
    grid = (m_tiles * triton.cdiv(NOUT, cfg["BLOCK_N"]),)
    x2, y2, yd2 = x.view(M, K), y.view(M, NOUT), yd.view(M, NOUT)
    xd2 = x_dot.view(M, K) if has_xd else x2
    wd = weight_dot if has_wd else weight
    wd_s = wd.stride() if wd_ps else (0, *wd.stride())
    b = bias if has_b else x2
    bd = bias_dot if has_bd else x2
    sb = bias.stride(0) if has_b else 0
    sbd = bias_dot.stride() if bd_ps else (0, bias_dot.stride(0) if has_bd else 0)
    with _device(x):
        _linear_jvp_kernel[grid](x2, xd2, weight, wd, b, bd, y2, yd2, M, L, K, NOUT, m_tiles, tiles_per_sample,
                                 *x2.stride(), *xd2.stride(), *weight.stride(), *wd_s, sb, *sbd, *y2.stride(),
                                 *yd2.stride(), HAS_B=has_b, HAS_XD=has_xd, HAS_WD=has_wd, WD_PS=wd_ps,
                                 HAS_BD=has_bd, BD_PS=bd_ps, SAMPLE_TILES=sample_tiles, PREC=prec, **cfg)
    return y, yd


def _layer_norm_plan(D: int, gpu: bool) -> dict:
    """Tiles of _layer_norm_jvp_kernel.  GPU: the whole row in registers up to D = 8192 (BLOCK_D = next_pow2(D)),
    rows per program so that a program holds ~2048 elements, warps ~ BLOCK_D / 256 (1 to 16); longer rows in
    chunks of 4096.  Interpreted: whole rows up to 64, chunks of 32 beyond (so small tests reach both)."""
    cap, chunk = (8192, 4096) if gpu else (64, 32)
    single = _p2(D) <= cap
    bd = _p2(D) if single else chunk
    rows = max(1, min(16 if gpu else 4, (2048 if gpu else 64) // bd))
    cfg = dict(SINGLE=single, ROWS=rows, BLOCK_D=bd)
    if gpu:
        cfg["num_warps"] = max(1, min(16, bd * rows // 256))
    return cfg


def layer_norm_jvp_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                          x_dot: Optional[Tensor] = None, weight_dot: Optional[Tensor] = None,
                          bias_dot: Optional[Tensor] = None, rms: bool = False, *,
                          config: Optional[dict] = None) -> tuple:
    """The backend of ``layer_norm_jvp``: x, x_dot (N, L, D); weight, bias (D,) or None; weight_dot, bias_dot (D,)
    or (N, D) or None; returns (y, ẏ) as (N, L, D) in x's dtype.  ``config`` overrides SINGLE / ROWS / BLOCK_D."""
    _check_dtype("layer_norm_jvp", x)
    N, L, D = x.shape
    M = N * L
    x = x.contiguous()
    y = torch.empty_like(x)
    yd = torch.empty_like(x)
    if M == 0 or D == 0:
        return y, yd
    has_xd, has_w, has_b = x_dot is not None, weight is not None, bias is not None
    has_wd, has_bd = weight_dot is not None, bias_dot is not None
    wd_ps = has_wd and weight_dot.ndim == 2
    bd_ps = has_bd and bias_dot.ndim == 2
    x2 = x.view(M, D)
    xd2 = x_dot.contiguous().view(M, D) if has_xd else x2
    y2, yd2 = y.view(M, D), yd.view(M, D)

    def vec(t, ps):  # (pointer, sample stride, element stride)
        if t is None:
            return x2, 0, 0
        return (t, *t.stride()) if ps else (t, 0, t.stride(0))

    w, _, sw = vec(weight, False)
    b, _, sb = vec(bias, False)
    wd, swds, swd = vec(weight_dot, wd_ps)
    bd, sbds, sbd = vec(bias_dot, bd_ps)
    cfg = _layer_norm_plan(D, _on_gpu(x))
    cfg.update(config or {})
    if cfg["SINGLE"] and cfg["BLOCK_D"] < D:
        raise ValueError(f"config SINGLE=True needs BLOCK_D >= D={D}, got {cfg['BLOCK_D']}")
    grid = (triton.cdiv(M, cfg["ROWS"]),)
    with _device(x):
        _layer_norm_jvp_kernel[grid](x2, xd2, w, b, wd, bd, y2, yd2, M, L, D, float(eps),
                                     x2.stride(0), xd2.stride(0), y2.stride(0), yd2.stride(0), sw, sb, swds, swd,
                                     sbds, sbd, RMS=bool(rms), HAS_W=has_w, HAS_B=has_b, HAS_XD=has_xd,
                                     HAS_WD=has_wd, WD_PS=wd_ps, HAS_BD=has_bd, BD_PS=bd_ps, **cfg)
    return y, yd


def _triton_reasons(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Why the Triton backend cannot run on (device, dtype); empty when it can."""
    return triton_reasons(device, dtype, _IMPORT_ERROR if triton is None else None, _interpreted)


_backend.register("linear_jvp", "triton", linear_jvp_triton, _triton_reasons)
_backend.register("layer_norm_jvp", "triton", layer_norm_jvp_triton, _triton_reasons)
