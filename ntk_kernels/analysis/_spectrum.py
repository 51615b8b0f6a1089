"""spectrum: eigenvalues of a kernel matrix and the statistics used to compare kernels."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import Tensor

from ._checks import check_kernel, symmetric_blocks


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues (descending, float64, on the kernel's device) and their statistics.

    lambda_max, lambda_min   the largest and smallest eigenvalue
    condition_number         λ_max / λ_min when λ_min > 0, else inf
    effective_rank           exp(H(p)), p_i = λ_i⁺ / Σ_j λ_j⁺ (λ⁺ = max(λ, 0), 0·log 0 = 0): the effective rank of
                             Roy & Vetterli (2007), between 1 and the rank; 0 for the zero kernel
    trace                    Σ_i λ_i = trace of the matrix
    """
    eigenvalues: Tensor = field(repr=False)
    lambda_max: float
    lambda_min: float
    condition_number: float
    effective_rank: float
    trace: float

    def as_dict(self, eigenvalues: bool = True) -> Dict[str, object]:
        """The statistics as floats (and the eigenvalues as a list when ``eigenvalues``)."""
        d = {k: getattr(self, k) for k in ("lambda_max", "lambda_min", "condition_number", "effective_rank",
                                           "trace")}
        if eigenvalues:
            d["eigenvalues"] = self.eigenvalues.tolist()
        return d


def eigen_statistics(w: Tensor) -> Spectrum:
    """Spectrum from eigenvalues w (any order)."""
    w = torch.sort(w.to(torch.float64).reshape(-1), descending=True).values
    lmax, lmin = w[0].item(), w[-1].item()
    pos = w.clamp_min(0)
    total = pos.sum()
    if total.item() > 0:
        p = pos / total
        entropy = -torch.xlogy(p, p).sum().item()  # xlogy(0, 0) = 0
        erank = math.exp(entropy)
    else:
        erank = 0.0
    cond = lmax / lmin if lmin > 0 else math.inf
    return Spectrum(w, lmax, lmin, cond, erank, w.sum().item())


def spectrum(K: Tensor) -> Spectrum:
    """Eigenvalues and statistics of a symmetric kernel, as the matrix that kernel regression inverts.

    K          (N, N) a trace (or single-output) kernel: its own N eigenvalues.
               (N, N, C, C) a full kernel: the (N·C) x (N·C) matrix with row / column index n*C + c,
               [n*C + c, m*C + d] = K[n, m, c, d]: N·C eigenvalues.
               (N, N, C) a diagonal kernel: the block-diagonal (N·C) x (N·C) matrix, K[:, :, c] for output c (no
               coupling between outputs): the union of the C blocks' eigenvalues, N·C in all.
    Returns ``Spectrum``: eigenvalues (descending, float64) λ_max, λ_min, condition number λ_max/λ_min (inf when
    λ_min <= 0), effective rank exp(−Σ p_i log p_i), p_i = λ_i⁺/Σλ⁺ (Roy & Vetterli 2007), trace Σλ_i.
    The eigenvalues come from torch.linalg.eigvalsh in float64 of (K + Kᵀ)/2; K must be symmetric to sqrt(eps)
    of its dtype (a ValueError otherwise).
    """
    mode, _ = check_kernel("K", K)
    Kb = symmetric_blocks("K", K, mode)
    return eigen_statistics(torch.linalg.eigvalsh(Kb))
