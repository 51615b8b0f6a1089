"""Triton backend of ``ntk::gram_contract`` (the math and the contract are in ops/ntk_gram.py).

    K[i, j, c, c'] = Σ_{t,s} (A_i A_jᵀ)_{ts} ⟨G1[i,c,t,:], G2[j,c',s,:]⟩

a1 (I, T, D) features or (I, T) token ids, g1 (I, C, T, E), a2 (J, S, D) or (J, S), g2 (J, C, S, E); fp16 / bf16 /
fp32 inputs, fp32 output and accumulation.  The T x S token Gram AA = A_i A_jᵀ and the T x S output-gradient Grams
P_{cc'} = G_{i,c} G_{j,c'}ᵀ exist only as register tiles: nothing of size T x S is ever written to memory.

Two kernels (every tl.dot has all dims >= 16: odd sizes are padded by masked loads, never by copies):

  _gram_block_kernel   short sequences (T, S <= 16 on a GPU; T = S = 1 is an MLP layer).  Rows are (i, t) pairs,
                       BLOCK_M // TP samples of TP = next_pow2(T) rows each (rows t >= T masked), columns (j, s)
                       likewise, so one (BLOCK_M, BLOCK_N) tile holds (BI, BJ) sample pairs:
                         AA = A_rows A_colsᵀ        D loop of tl.dot (or the id-equality mask)
                         P  = Σ_e G1_rows G2_colsᵀ  E loop of tl.dot (trace: one accumulator over c and E)
                         K  = Σ_{t,s} (AA ⊙ P)      reshape to (BI, TP, BJ, SP), sum axes 3 and 1 (exact fp32 sums)
                       grid (I/BI, J/BJ, c): full -> one c per program, a loop over c' reusing its AA tile;
                       diagonal -> one c per program; trace -> a group of c per program, fp32 partials (one per
                       group) that torch sums.  Each program computes its own AA (T·S·D against C·T·S·E for the
                       rest).  For T = S = 1 this is a GEMM over E per (c, c') with AA fused in.
  _gram_pair_kernel    long sequences: one program per sample pair (i, j) and split of the t-tiles, loops
                         for t-tile (BLOCK_T): for s-tile (BLOCK_S):
                           AA (BLOCK_T, BLOCK_S) = D loop of tl.dot (or the id mask)
                           trace     q += AA ⊙ Σ_c Σ_e G1_c G2_cᵀ   ((BT, BS) accumulator, summed at the end)
                           diagonal  k[c] += Σ (AA ⊙ Σ_e G1_c G2_cᵀ)
                           full, "p" k[c,c'] += Σ (AA ⊙ Σ_e G1_c G2_c'ᵀ)              C² T S E MACs
                           full, "h" for c', e-chunk: H = AA @ G2_c'[s, e-chunk] (BT, BE) on tensor cores,
                                     then k[c,c'] += Σ G1_c[t, e-chunk] ⊙ H for every c   C T S E MACs + C² T E S/BS
                                     elementwise (the default for C >= 3)
                       Registers stay bounded by a few (BT, BS) / (BT, BE) tiles whatever E, D, C: E and D are
                       looped in chunks.  Splits of the t-tiles (grid axis 1) write fp32 partials that torch sums
                       (deterministic, no atomics); used when I·J alone cannot fill the GPU.

In the "h" variant H's dot takes AA rounded to the input dtype for bf16 inputs (8-bit exponent: no overflow; its
rounding error is that of one more bf16 input rounding) and for token ids (0/1, exact), and fp32 operands (TF32 on
a GPU) for fp16 (AA could overflow fp16) and fp32 inputs (IEEE unless torch allows TF32 matmuls).

Block sizes on a GPU are first guesses (64-wide tiles, 8 warps, 3 stages; see _plan), not yet tuned on hardware:
benchmarks/gpu_check_gram.py checks and times them.  The op computes fp64 inputs in fp64; these kernels accumulate
in fp32, so fp64 is refused.  On the CPU the kernels run only under TRITON_INTERPRET=1 (set before import).
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
from torch import Tensor

from .. import _backend
from ._triton_common import (DTYPES as _DTYPES, device_context as _device, dot_precision as _prec, interpreted,
                             next_p2 as _p2, triton_reasons)
from .ntk_gram import ID_DTYPES, MODES, out_shape

from ._triton_common import IMPORT_ERROR as _IMPORT_ERROR, jit as _jit, tl, triton

if triton is not None:
    from ._triton_common import dot as _dot

_MODE_ID = {"full": 0, "diagonal": 1, "trace": 2}


# ----------------------------------------------------------------------------------------------
# Device functions.
# ----------------------------------------------------------------------------------------------
@_jit()
def _rows_cols_dot(x_ptr, y_ptr, x_rows, y_cols, x_ok, y_ok, K, sxk, syk, acc,
                   PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + X Yᵀ over k in [0, K): X rows at x_ptr + x_rows (+ k·sxk), Y rows at y_ptr + y_cols (+ k·syk).

    x_rows (BM,) and y_cols (BN,) are element offsets (int64), x_ok / y_ok their masks; Yᵀ is loaded as a
    (BLOCK_K, BN) tile, so tl.dot sees (BM, BLOCK_K) x (BLOCK_K, BN).  The k tail is masked to 0.
    """
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + x_rows[:, None] + rk[None, :] * sxk
    y_ptrs = y_ptr + y_cols[None, :] + rk[:, None] * syk
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs, mask=x_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=k_ok[:, None] & y_ok[None, :], other=0.0)
        acc = _dot(x, y, acc, PREC)
        x_ptrs += BLOCK_K * sxk
        y_ptrs += BLOCK_K * syk
    return acc


@_jit()
def _token_gram(a1_ptr, a2_ptr, a1_rows, a2_cols, r_ok, c_ok, D, sa1d, sa2d,
                IDS: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """(BLOCK_R, BLOCK_C) fp32 tile of A_rows A_colsᵀ, or of 1[id_row == id_col] for token ids; 0 off the masks."""
    if IDS:
        id1 = tl.load(a1_ptr + a1_rows, mask=r_ok, other=-1)
        id2 = tl.load(a2_ptr + a2_cols, mask=c_ok, other=-1)
        hit = (id1[:, None] == id2[None, :]) & r_ok[:, None] & c_ok[None, :]
        aa = tl.where(hit, 1.0, 0.0).to(tl.float32)
    else:  # (one return at the end: the code generator would compile the dot below an early return too)
        aa = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        aa = _rows_cols_dot(a1_ptr, a2_ptr, a1_rows, a2_cols, r_ok, c_ok, D, sa1d, sa2d, aa, PREC, BLOCK_D)
    return aa


@_jit()
def _segment_sum(q, BI: tl.constexpr, TP: tl.constexpr, BJ: tl.constexpr, SP: tl.constexpr):
    """(BI·TP, BJ·SP) -> (BI, BJ): sums each TP x SP block (one sample pair's t, s)."""
    if TP == 1 and SP == 1:
        k = q
    else:
        k = tl.sum(tl.sum(tl.reshape(q, (BI, TP, BJ, SP)), axis=3), axis=1)
    return k


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------
@_jit()
def _gram_block_kernel(a1_ptr, g1_ptr, a2_ptr, g2_ptr, out_ptr, I, J, C, T, S, D, E, C_PER,
                       sa1i, sa1t, sa1d, sg1i, sg1c, sg1t, sg1e,
                       sa2j, sa2s, sa2d, sg2j, sg2c, sg2s, sg2e,
                       sop, soi, soj, soc, soc2,
                       MODE: tl.constexpr, IDS: tl.constexpr, PREC: tl.constexpr,
                       TP: tl.constexpr, SP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """(BI, BJ) sample pairs per program, all their t (TP >= T rows each) and s (SP >= S columns each).

    MODE 0 full: program (., ., c) writes K[i, j, c, :];  1 diagonal: K[i, j, c];  2 trace: the partial
    Σ_{c in group} K[i, j, c, c] at out[group, i, j] (groups of C_PER channels).
    """
    BLOCK_M: tl.constexpr = BI * TP
    BLOCK_N: tl.constexpr = BJ * SP
    pid_i, pid_j, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    i = pid_i * BI + rm // TP
    t = rm % TP
    j = pid_j * BJ + rn // SP
    s = rn % SP
    m_ok = (i < I) & (t < T)
    n_ok = (j < J) & (s < S)
    i64, j64 = i.to(tl.int64), j.to(tl.int64)

    aa = _token_gram(a1_ptr, a2_ptr, i64 * sa1i + t * sa1t, j64 * sa2j + s * sa2s, m_ok, n_ok, D, sa1d, sa2d,
                     IDS, PREC, BLOCK_M, BLOCK_N, BLOCK_D)

    g1_rows = i64 * sg1i + t * sg1t
    g2_cols = j64 * sg2j + s * sg2s
    io = pid_i * BI + tl.arange(0, BI)
    jo = pid_j * BJ + tl.arange(0, BJ)
    o_ptrs = out_ptr + io.to(tl.int64)[:, None] * soi + jo.to(tl.int64)[None, :] * soj
    o_ok = (io < I)[:, None] & (jo < J)[None, :]
    if MODE == 2:
        p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        c_lo = pid_c * C_PER
        for c in range(c_lo, tl.minimum(C, c_lo + C_PER)):
            p = _rows_cols_dot(g1_ptr + c * sg1c, g2_ptr + c * sg2c, g1_rows, g2_cols, m_ok, n_ok, E, sg1e, sg2e,
                               p, PREC, BLOCK_E)
        k = _segment_sum(aa * p, BI, TP, BJ, SP)
        tl.store(o_ptrs + pid_c.to(tl.int64) * sop, k, mask=o_ok)
    else:
        c = pid_c
        c2_lo = 0 if MODE == 0 else c
        c2_hi = C if MODE == 0 else c + 1
        for c2 in range(c2_lo, c2_hi):
            p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            p = _rows_cols_dot(g1_ptr + c * sg1c, g2_ptr + c2 * sg2c, g1_rows, g2_cols, m_ok, n_ok, E, sg1e, sg2e,
                               p, PREC, BLOCK_E)
            k = _segment_sum(aa * p, BI, TP, BJ, SP)
            tl.store(o_ptrs + c * soc + c2 * soc2, k, mask=o_ok)


@_jit()
def _gram_pair_kernel(a1_ptr, g1_ptr, a2_ptr, g2_ptr, out_ptr, I, J, C, T, S, D, E, TILES_PER_SPLIT,
                      sa1i, sa1t, sa1d, sg1i, sg1c, sg1t, sg1e,
                      sa2j, sa2s, sa2d, sg2j, sg2c, sg2s, sg2e,
                      sop, soi, soj, soc, soc2,
                      MODE: tl.constexpr, IDS: tl.constexpr, PREC: tl.constexpr, FULL_H: tl.constexpr,
                      H_LOWP: tl.constexpr, PREC_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """One sample pair (i, j) = divmod(program_id(0), J) over the t-tiles of split program_id(1).

    Writes out[split, i, j, ...] (split stride sop): full (C, C), diagonal (C,), trace a scalar.
    """
    pid, split = tl.program_id(0), tl.program_id(1)
    i = (pid // J).to(tl.int64)
    j = (pid % J).to(tl.int64)
    rt = tl.arange(0, BLOCK_T)
    rs = tl.arange(0, BLOCK_S)
    re = tl.arange(0, BLOCK_E)
    rc = tl.arange(0, BLOCK_C)
    g1_i = g1_ptr + i * sg1i
    g2_j = g2_ptr + j * sg2j
    k_full = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    k_diag = tl.zeros((BLOCK_C,), dtype=tl.float32)
    q = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    t_lo = split * TILES_PER_SPLIT * BLOCK_T
    t_hi = tl.minimum(T, t_lo + TILES_PER_SPLIT * BLOCK_T)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t = t0 + rt
        t_ok = t < t_hi
        for s0 in range(0, S, BLOCK_S):
            s = s0 + rs
            s_ok = s < S
            aa = _token_gram(a1_ptr, a2_ptr, i * sa1i + t * sa1t, j * sa2j + s * sa2s, t_ok, s_ok, D, sa1d, sa2d,
                             IDS, PREC, BLOCK_T, BLOCK_S, BLOCK_D)
            if MODE == 2:
                p = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
                for c in range(0, C):
                    p = _rows_cols_dot(g1_i + c * sg1c, g2_j + c * sg2c, t * sg1t, s * sg2s, t_ok, s_ok, E,
                                       sg1e, sg2e, p, PREC, BLOCK_E)
                q += aa * p
            elif MODE == 1:
                for c in range(0, C):
                    p = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
                    p = _rows_cols_dot(g1_i + c * sg1c, g2_j + c * sg2c, t * sg1t, s * sg2s, t_ok, s_ok, E,
                                       sg1e, sg2e, p, PREC, BLOCK_E)
                    k_diag += tl.where(rc == c, tl.sum(tl.sum(aa * p, axis=1), axis=0), 0.0)
            elif FULL_H:
                if H_LOWP:
                    aa_h = aa.to(g2_ptr.dtype.element_ty)
                else:
                    aa_h = aa
                for c2 in range(0, C):
                    g2_ptrs = g2_j + c2 * sg2c + s[:, None] * sg2s + re[None, :] * sg2e  # (BS, BE)
                    g1_ptrs = g1_i + t[:, None] * sg1t + re[None, :] * sg1e  # (BT, BE), + c·sg1c
                    for e0 in range(0, E, BLOCK_E):
                        e_ok = re < E - e0
                        g2t = tl.load(g2_ptrs, mask=s_ok[:, None] & e_ok[None, :], other=0.0)
                        h = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
                        h = _dot(aa_h, g2t.to(aa_h.dtype), h, PREC_H)
                        g1_mask = t_ok[:, None] & e_ok[None, :]
                        for c in range(0, C):
                            g1t = tl.load(g1_ptrs + c * sg1c, mask=g1_mask, other=0.0).to(tl.float32)
                            v = tl.sum(tl.sum(g1t * h, axis=1), axis=0)
                            k_full += tl.where((rc[:, None] == c) & (rc[None, :] == c2), v, 0.0)
                        g2_ptrs += BLOCK_E * sg2e
                        g1_ptrs += BLOCK_E * sg1e
            else:
                for c in range(0, C):
                    for c2 in range(0, C):
                        p = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
                        p = _rows_cols_dot(g1_i + c * sg1c, g2_j + c2 * sg2c, t * sg1t, s * sg2s, t_ok, s_ok, E,
                                           sg1e, sg2e, p, PREC, BLOCK_E)
                        v = tl.sum(tl.sum(aa * p, axis=1), axis=0)
                        k_full += tl.where((rc[:, None] == c) & (rc[None, :] == c2), v, 0.0)
    o_ptr = out_ptr + split.to(tl.int64) * sop + i * soi + j * soj
    if MODE == 2:
        tl.store(o_ptr, tl.sum(tl.sum(q, axis=1), axis=0))
    elif MODE == 1:
        tl.store(o_ptr + rc * soc, k_diag, mask=rc < C)
    else:
        tl.store(o_ptr + rc[:, None] * soc + rc[None, :] * soc2, k_full, mask=(rc < C)[:, None] & (rc < C)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    return interpreted(_gram_pair_kernel)


def _on_gpu(t: Tensor) -> bool:
    return t.is_cuda and not _interpreted()


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(t: Tensor) -> int:
    """About how many programs keep the device busy (2 per SM); interpreted: small, so splits get exercised."""
    if _on_gpu(t):
        return 2 * _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 0


def _plan(T: int, S: int, C: int, dtype: torch.dtype, prec: str, gpu: bool, kernel: Optional[str] = None,
          full_via: Optional[str] = None) -> dict:
    """Kernel ("block" or "pair") and its tile sizes.

    GPU: 64-wide tiles, K-chunks (D, E) of 64 for 16-bit, 32 for TF32, 16 for IEEE fp32 (FMA), 8 warps, 3 stages.
    First guesses, untuned.  Compiled offline for sm_90a (triton 3.9, with the stride-1 / 16-divisible
    specialisation of a real launch), every mode x dtype (fp32 IEEE and TF32) x features / ids of both kernels
    takes at most 192 registers and no local memory, except 24 bytes of stack in the fp32-IEEE token-id trace
    block kernel; 16-bit and TF32 dots lower to wgmma, IEEE fp32 to FMA; 4 warps spilled (up to 512 bytes).
    Interpreted: 16-wide tiles, block kernel for T, S <= 8 (so small tests reach both kernels).
    """
    tp, sp = _p2(T), _p2(S)
    base = 64 if gpu else 16
    if not gpu:
        kchunk = 16
    else:
        kchunk = 64 if dtype != torch.float32 else (32 if prec == "tf32" else 16)
    if kernel is None:
        kernel = "block" if max(tp, sp) <= (16 if gpu else 8) else "pair"
    launch = dict(num_warps=8, num_stages=3) if gpu else {}
    if kernel == "block":
        bm, bn = max(base, tp), max(base, sp)
        return dict(kernel="block", TP=tp, SP=sp, BI=bm // tp, BJ=bn // sp, BLOCK_D=kchunk, BLOCK_E=kchunk, **launch)
    if kernel != "pair":
        raise ValueError(f"kernel must be 'block' or 'pair', got {kernel!r}")
    if full_via is None:
        full_via = "h" if C >= 3 else "p"
    if full_via not in ("h", "p"):
        raise ValueError(f"full_via must be 'h' or 'p', got {full_via!r}")
    return dict(kernel="pair", FULL_H=full_via == "h", BLOCK_T=min(base, max(16, tp)), BLOCK_S=min(base, max(16, sp)),
                BLOCK_D=kchunk, BLOCK_E=kchunk, BLOCK_C=_p2(C), **launch)


def _strides(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, ids: bool):
    """(sa1i, sa1t, sa1d, sg1i, sg1c, sg1t, sg1e, sa2j, sa2s, sa2d, sg2j, sg2c, sg2s, sg2e); ids have sa?d = 0."""
    sa1 = (*a1.stride(), 0) if ids else a1.stride()
    sa2 = (*a2.stride(), 0) if ids else a2.stride()
    return (*sa1, *g1.stride(), *sa2, *g2.stride())


def _out_strides(buf: Tensor, mode: str, partial: bool):
    """(sop, soi, soj, soc, soc2) of an output or a (splits, ...) partial buffer."""
    st = buf.stride()
    sop, st = (st[0], st[1:]) if partial else (0, st)
    if mode == "full":
        return sop, st[0], st[1], st[2], st[3]
    if mode == "diagonal":
        return sop, st[0], st[1], st[2], 0
    return sop, st[0], st[1], 0, 0


def gram_contract_triton(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, mode: str = "full", *,
                         kernel: Optional[str] = None, full_via: Optional[str] = None) -> Tensor:
    """The backend: K (see ntk_gram.gram_contract) in fp32 for fp16 / bf16 / fp32 g1, g2 (features of g's dtype or
    int32 / int64 token ids).  ``kernel`` ("block" / "pair") and ``full_via`` ("h" / "p", the pair kernel's full
    mode) override the automatic choice (tests, benchmarks)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if g1.dtype not in _DTYPES:
        raise TypeError(f"the Triton backend of gram_contract takes {_DTYPES}, not {g1.dtype}")
    ids = a1.dtype in ID_DTYPES
    a1, g1, a2, g2 = (x.contiguous() for x in (a1, g1, a2, g2))
    I, C, T, E = g1.shape
    J, S = g2.shape[0], g2.shape[2]
    D = 0 if ids else a1.shape[2]
    shape = out_shape(I, J, C, mode)
    if I == 0 or J == 0 or C == 0 or T == 0 or S == 0 or E == 0 or (D == 0 and not ids):
        return torch.zeros(shape, device=g1.device, dtype=torch.float32)
    gpu = _on_gpu(g1)
    prec = _prec(g1)
    cfg = _plan(T, S, C, g1.dtype, prec, gpu, kernel, full_via)
    kind = cfg.pop("kernel")
    md = _MODE_ID[mode]
    strides = _strides(a1, g1, a2, g2, ids)
    target = _target_programs(g1)
    with _device(g1):
        if kind == "block":
            grid_ij = triton.cdiv(I, cfg["BI"]) * triton.cdiv(J, cfg["BJ"])
            if mode == "trace":  # channel groups, each an fp32 partial: enough programs to fill the device
                groups = min(C, max(1, -(-target // grid_ij))) if gpu else min(C, 2)
                c_per = triton.cdiv(C, groups)
                groups = triton.cdiv(C, c_per)
            else:
                groups, c_per = C, 1
            partial = mode == "trace" and groups > 1
            buf = torch.empty((groups, *shape) if partial else shape, device=g1.device, dtype=torch.float32)
            grid = (triton.cdiv(I, cfg["BI"]), triton.cdiv(J, cfg["BJ"]), groups)
            _gram_block_kernel[grid](a1, g1, a2, g2, buf, I, J, C, T, S, D, E, c_per, *strides,
                                     *_out_strides(buf, mode, partial), MODE=md, IDS=ids, PREC=prec, **cfg)
        else:
            t_tiles = triton.cdiv(T, cfg["BLOCK_T"])
            splits = min(t_tiles, max(1, -(-target // (I * J)))) if gpu else min(t_tiles, 2)
            per = triton.cdiv(t_tiles, splits)
            splits = triton.cdiv(t_tiles, per)
            partial = splits > 1
            buf = torch.empty((splits, *shape) if partial else shape, device=g1.device, dtype=torch.float32)
            h_lowp = ids or g1.dtype == torch.bfloat16
            prec_h = prec if g1.dtype == torch.float32 else "tf32"  # fp16: fp32 operands, TF32 on a GPU
            _gram_pair_kernel[(I * J, splits)](a1, g1, a2, g2, buf, I, J, C, T, S, D, E, per, *strides,
                                               *_out_strides(buf, mode, partial), MODE=md, IDS=ids, PREC=prec,
                                               H_LOWP=h_lowp, PREC_H=prec_h, **cfg)
    return buf.sum(0) if partial else buf


def _triton_reasons(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Why the Triton backend cannot run on (device, dtype); empty when it can."""
    return triton_reasons(device, dtype, _IMPORT_ERROR if triton is None else None, _interpreted)


_backend.register("gram", "triton", gram_contract_triton, _triton_reasons)
