"""Shared argument checks and the block layout of the three kernel modes (trace / diagonal / full).

Every kernel method here reduces to batched linear algebra on B symmetric blocks of size n_b with k right-hand
sides (all in float64):

    mode       K_train           blocks Kb (B, n_b, n_b)                targets y -> (B, n_b, k)
    trace      (N, N)            K itself, B = 1, n_b = N               (N,) -> k = 1;  (N, C) -> k = C  (K ⊗ I_C)
    diagonal   (N, N, C)         K[:, :, c] for each output, B = C      (N, C) -> (C, N, 1)
    full       (N, N, C, C)      (N·C, N·C) at index n*C + c, B = 1     (N, C) -> (1, N·C, 1), y[n, c] at n*C + c

A test kernel K_test_train (M, N[, C[, C]]) is laid out the same way, (B, m_b, n_b).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

F64 = torch.float64
KINDS = {2: "trace", 3: "diagonal", 4: "full"}


def check_scalar(name: str, value, *, positive: bool = False) -> float:
    """A finite real number, >= 0 (or > 0 when positive=True)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_tensor(name: str, x) -> Tensor:
    """A real tensor (floating, or integer targets) without NaN / inf."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point() or (not x.is_complex() and x.dtype != torch.bool)):
        raise TypeError(f"{name} must be a real (floating) tensor, got dtype {x.dtype}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains NaN or inf (first at index {tuple(bad)})")
    return x


def check_kernel(name: str, K, *, square: bool = True) -> Tuple[str, int]:
    """K (N, N) / (N, N, C) / (N, N, C, C) -> (mode, C) with C = 1 for trace kernels."""
    K = check_tensor(name, K)
    if not K.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {K.dtype}")
    if K.ndim not in KINDS:
        raise ValueError(f"{name} must be a kernel of shape (N1, N2) (trace), (N1, N2, C) (diagonal) or "
                         f"(N1, N2, C, C) (full), got shape {tuple(K.shape)}")
    if square and K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be square over the samples, (N, N[, C[, C]]), got shape {tuple(K.shape)}")
    if K.ndim == 4 and K.shape[2] != K.shape[3]:
        raise ValueError(f"{name} in full mode must be (N1, N2, C, C), got shape {tuple(K.shape)}")
    if K.shape[0] == 0 or K.shape[1] == 0 or (K.ndim > 2 and K.shape[2] == 0):
        raise ValueError(f"{name} must be non-empty, got shape {tuple(K.shape)}")
    return KINDS[K.ndim], (1 if K.ndim == 2 else K.shape[2])


def kernel_blocks(K: Tensor, mode: str) -> Tensor:
    """(N1, N2[, C[, C]]) -> (B, n1_b, n2_b) float64, as in the module docstring."""
    K = K.to(F64)
    if mode == "trace":
        return K.unsqueeze(0)
    if mode == "diagonal":
        return K.permute(2, 0, 1)
    n1, n2, c, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(1, n1 * c, n2 * c)


def symmetric_blocks(name: str, K: Tensor, mode: str) -> Tensor:
    """Blocks of a training kernel, checked symmetric (to sqrt(eps) of its dtype, relative to max |K|) and
    symmetrised."""
    Kb = kernel_blocks(K, mode)
    scale = Kb.abs().amax().item()
    asym = (Kb - Kb.mT).abs().amax().item()
    tol = math.sqrt(torch.finfo(K.dtype).eps) * max(scale, torch.finfo(F64).tiny)
    if asym > tol:
        raise ValueError(f"{name} must be symmetric (an eNTK of kernel 'sgd' or 'signgd'; the asymmetric_signgd "
                         f"kernel is not): max |K - Kᵀ| = {asym:.3e} > {tol:.3e} (sqrt(eps) x max |K|)")
    return 0.5 * (Kb + Kb.mT)


def out_dtype(*xs: Optional[Tensor]) -> torch.dtype:
    """float64 when any floating input is float64, else float32."""
    return F64 if any(x is not None and x.dtype == F64 for x in xs) else torch.float32


class Layout:
    """Maps targets (N,) / (N, C) to blocks (B, n_b, k) and block results (..., B, m_b, k) back to (..., M[, C])."""

    def __init__(self, mode: str, C: int, y: Tensor, n: int, name: str):
        y = check_tensor(name, y)
        self.mode, self.C = mode, C
        if y.ndim not in (1, 2) or y.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) or ({n}, C) (one row per training sample), got "
                             f"{tuple(y.shape)}")
        if mode != "trace":
            ok = (y.ndim == 2 and y.shape[1] == C) or (y.ndim == 1 and C == 1)
            if not ok:
                raise ValueError(f"{name} must have shape ({n}, {C}) to match the {mode} kernel's C = {C} outputs"
                                 + (f" (or ({n},) as C = 1)" if C == 1 else "") + f", got {tuple(y.shape)}")
        self.tail = tuple(y.shape[1:])
        self.n = n

    def blocks(self, y: Tensor, name: str) -> Tensor:
        """y of the training targets' shape -> (B, n_b, k) float64."""
        n = y.shape[0]
        if tuple(y.shape[1:]) != self.tail:
            raise ValueError(f"{name} must have shape {(n,) + self.tail}, like y_train, got {tuple(y.shape)}")
        y = y.to(F64)
        if self.mode == "trace":
            return y.reshape(1, n, -1)
        if self.mode == "diagonal":
            return y.reshape(n, self.C).T.unsqueeze(-1)
        return y.reshape(1, n * self.C, 1)

    def unblocks(self, Z: Tensor, m: int) -> Tensor:
        """(..., B, m_b, k) -> (..., m) + tail."""
        lead = Z.shape[:-3]
        if self.mode == "trace":
            out = Z[..., 0, :, :]
        elif self.mode == "diagonal":
            out = Z[..., 0].transpose(-1, -2)
        else:
            out = Z[..., 0, :, 0].reshape(*lead, m, self.C)
        return out.reshape(*lead, m, *self.tail)


class Problem:
    """A training kernel, targets, optional test kernel and initial outputs f0, checked and in block layout."""

    def __init__(self, K_train, y_train, K_test_train=None, f0_train=None, f0_test=None, *,
                 y_name: str = "y_train"):
        self.mode, self.C = check_kernel("K_train", K_train)
        self.N = K_train.shape[0]
        self.layout = Layout(self.mode, self.C, y_train, self.N, y_name)
        self.Kb = symmetric_blocks("K_train", K_train, self.mode)
        self.eps = torch.finfo(torch.promote_types(K_train.dtype, torch.float32)).eps  # for the default rcond
        self.device = K_train.device
        self.dtype = out_dtype(K_train, K_test_train, y_train if y_train.is_floating_point() else None)
        self.Ktb, self.M = None, 0
        if K_test_train is not None:
            mode, C = check_kernel("K_test_train", K_test_train, square=False)
            want = (self.N,) + tuple(K_train.shape[2:])
            if mode != self.mode or tuple(K_test_train.shape[1:]) != want:
                raise ValueError(f"K_test_train must have shape (M, {', '.join(map(str, want))}) to match K_train "
                                 f"{tuple(K_train.shape)}, got {tuple(K_test_train.shape)}")
            if K_test_train.device != K_train.device:
                raise ValueError(f"K_test_train is on {K_test_train.device}, K_train on {K_train.device}")
            self.M = K_test_train.shape[0]
            self.Ktb = kernel_blocks(K_test_train, self.mode)
        R = self.layout.blocks(y_train.to(self.device), y_name)
        self.f0b = None
        if f0_train is not None:
            check_tensor("f0_train", f0_train)
            if tuple(f0_train.shape) != tuple(y_train.shape):
                raise ValueError(f"f0_train must have the shape of {y_name} {tuple(y_train.shape)}, got "
                                 f"{tuple(f0_train.shape)}")
            self.f0b = self.layout.blocks(f0_train.to(self.device), "f0_train")
            R = R - self.f0b
        self.R = R  # residuals y - f0 in block layout (B, n_b, k)
        self.f0tb = None
        if f0_test is not None:
            if K_test_train is None:
                raise ValueError("f0_test was given without K_test_train")
            if f0_train is None:
                raise ValueError("f0_test was given but f0_train was not: the residuals are y − f0_train (pass zeros "
                                 "explicitly if the initial training outputs are zero)")
            check_tensor("f0_test", f0_test)
            if f0_test.shape[:1] != (self.M,):
                raise ValueError(f"f0_test must have {self.M} rows (K_test_train's M), got shape "
                                 f"{tuple(f0_test.shape)}")
            self.f0tb = self.layout.blocks(f0_test.to(self.device), "f0_test")
        elif f0_train is not None and K_test_train is not None:
            raise ValueError("f0_train was given but f0_test was not: the linearised model's test predictions start "
                             "at f0_test (pass zeros explicitly if the initial test outputs are zero)")

    def out(self, Z: Tensor, m: int) -> Tensor:
        return self.layout.unblocks(Z, m).to(self.dtype)


def resolve_ridge(ridge, relative_ridge: bool, Kb: Tensor) -> float:
    """ridge, or ridge · mean diagonal of the (N·C) x (N·C) operator (= trace(K)/N for a trace kernel)."""
    ridge = check_scalar("ridge", ridge)
    if not isinstance(relative_ridge, bool):
        raise TypeError(f"relative_ridge must be a bool, got {type(relative_ridge).__name__}")
    if relative_ridge:
        ridge = ridge * Kb.diagonal(dim1=-2, dim2=-1).mean().item()
    return ridge


def check_rcond(rcond, n: int, eps: float) -> float:
    if rcond is None:
        return n * eps
    return check_scalar("rcond", rcond)


def solve_psd(A: Tensor, R: Tensor, rcond: float) -> Tuple[Tensor, str]:
    """X = A⁻¹ R for symmetric PSD blocks A (B, n, n): Cholesky, or, where A is singular to working precision
    (Cholesky fails or a pivot is below 10·rcond·max diag A), the minimum-norm least-squares solution A⁺ R through
    the eigendecomposition, eigenvalues below rcond·λ_max taken as zero (torch's CUDA lstsq assumes full rank,
    hence eigh rather than torch.linalg.lstsq)."""
    L = cholesky_checked(A, rcond)
    if L is not None:
        return torch.cholesky_solve(R, L), "cholesky"
    return pinv_apply(A, R, rcond), "lstsq"


def cholesky_checked(A: Tensor, rcond: float) -> Optional[Tensor]:
    """The Cholesky factor of the blocks A, or None where A is singular to working precision: Cholesky fails, or
    its smallest pivot is below 10·rcond·max diag A (a numerically rank-deficient PSD matrix often factors with
    pivots of rounding size, which would turn its null space into noise of size 1/eps)."""
    L, info = torch.linalg.cholesky_ex(A)
    if not bool((info == 0).all()):
        return None
    piv = L.diagonal(dim1=-2, dim2=-1).square()
    scale = A.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    return L if bool((piv.amin(-1) > 10 * rcond * scale).all()) else None


def pinv_apply(A: Tensor, R: Tensor, rcond: float) -> Tensor:
    w, V = torch.linalg.eigh(A)
    cut = rcond * w.abs().amax(-1, keepdim=True)
    winv = torch.where(w > cut, 1.0 / torch.where(w > cut, w, torch.ones_like(w)), torch.zeros_like(w))
    return V @ (winv.unsqueeze(-1) * (V.mT @ R))
