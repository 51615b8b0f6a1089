"""Counter-based dropout mask shared bit-for-bit by every backend.

keep(seed, i, c) = H(seed, i, c) >= T(p) with T(p) = min(floor(p * 2^32), 2^32 - 1) and

    H = fmix32( fmix32( seed ^ (i * 0x9E3779B1) ) ^ (c * 0x85EBCA77) )     (all arithmetic mod 2^32)

where fmix32 is MurmurHash3's 32-bit finaliser, i the row of the flattened (N, d_in) input and c its column.
Kept entries are scaled by 1 / (1 - p).  Because the mask is a pure function of (seed, i, c), the backward
pass regenerates it instead of storing it, and the C++ (csrc/common/hash_dropout.h), CUDA and Triton
kernels and this plain-PyTorch version all draw the very same mask, so tests compare them exactly.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROW_MULT = 0x9E3779B1
COL_MULT = 0x85EBCA77
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def threshold(p: float) -> int:
    """The uint32 threshold below which an entry is dropped."""
    return min(int(p * 4294967296.0), MASK32)


def _mulmod32(h: torch.Tensor, k: int) -> torch.Tensor:
    # (h * k) mod 2^32 for 0 <= h < 2^32 in int64 without overflowing: split k into 16-bit halves.
    lo = h * (k & 0xFFFF)
    hi = (h * (k >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mulmod32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mulmod32(h, FMIX_C2)
    return h ^ (h >> 16)


def hash_uint32(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """H(seed, rows, cols) as int64 values in [0, 2^32); rows and cols broadcast."""
    rows = rows.to(torch.int64)
    cols = cols.to(torch.int64)
    h = _fmix32((_mulmod32(rows, ROW_MULT)) ^ (int(seed) & MASK32))
    return _fmix32(h ^ _mulmod32(cols, COL_MULT))


def keep_mask(seed: int, n_rows: int, n_cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean (n_rows, n_cols) mask of the entries dropout keeps."""
    rows = torch.arange(n_rows, device=device).unsqueeze(1)
    cols = torch.arange(n_cols, device=device).unsqueeze(0)
    return hash_uint32(seed, rows, cols) >= threshold(p)
