"""Kernel regression, gradient-descent dynamics and leave-one-out influence of the linearised model.

The linearised model f_lin(x; θ) = f0(x) + J(x) Δθ (J the Jacobian at θ₀, Δθ = θ − θ₀) trained with squared loss
only ever sees the data through the eNTK K = J Jᵀ, so its training has closed forms in the dual (function) space:

  ridge regression   min_Δθ ‖J Δθ − (y − f0)‖² + ridge·‖Δθ‖²   ⇒   Δθ = Jᵀ α,  α = (K + ridge·I)⁻¹ (y − f0),
                     f(x) = f0(x) + K(x, X) α                    (the infinite-time limit of gradient descent
                                                                  with weight decay ridge/N; ridge = 0: the
                                                                  minimum-norm interpolant)
  gradient descent   f_t = f0 + K g_t(K) (y − f0),  g_t(λ) = (1 − (1 − lr·(λ + N·wd)/N)^t) / (λ + N·wd)
  leave-one-out      f^(−i)(x) − f(x) = −K(x, X) G[:, I] (G_II)⁻¹ α_I,  G = (K + ridge·I)⁻¹

Kernel layouts (see ``_checks``): a trace kernel (N, N) with targets (N,) or (N, C) acts as K ⊗ I_C; a diagonal
kernel (N, N, C) as C independent per-output kernels; a full kernel (N, N, C, C) as the (N·C) x (N·C) matrix
with index n*C + c.  Note ``empirical_ntk(mode="trace")`` returns Σ_c K_cc (not divided by C): divide it by C
for the per-output average kernel (neural-tangents' trace convention).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import (Problem, check_rcond, check_scalar, check_tensor, cholesky_checked, resolve_ridge,
                      solve_psd)


@dataclass(frozen=True)
class KernelRegression:
    """Result of ``kernel_regression``.

    train   (N[, C]) f0 + K_tr,tr α, the training predictions
    test    (M[, C]) f0_test + K_te,tr α, or None without K_test_train
    alpha   (N[, C]) dual coefficients α = (K + ridge·I)⁻¹ (y − f0), in the targets' layout
    ridge   the absolute ridge used (after relative_ridge)
    solver  "cholesky", or "lstsq" (minimum-norm, where K + ridge·I is singular to working precision)
    """
    train: Tensor
    test: Optional[Tensor]
    alpha: Tensor
    ridge: float
    solver: str


def kernel_regression(K_train: Tensor, y_train: Tensor, K_test_train: Optional[Tensor] = None, *,
                      ridge: float = 0.0, f0_train: Optional[Tensor] = None, f0_test: Optional[Tensor] = None,
                      relative_ridge: bool = False, rcond: Optional[float] = None) -> KernelRegression:
    """The infinite-time solution of ℓ2-regularised linearised fine-tuning with squared loss (kernel ridge
    regression with the eNTK; the solver of Malladi et al. 2023, "A kernel-based view of language model
    fine-tuning"):

        f(X_test) = f0_test + K_te,tr (K_tr,tr + ridge·I)⁻¹ (y − f0_train)

    equal to min_Δθ ‖J Δθ − (y − f0)‖² + ridge·‖Δθ‖² solved in parameter space (Δθ = Jᵀα), and for ridge = 0 to
    the minimum-norm interpolant (the limit of gradient descent from θ₀).

    K_train        (N, N) trace kernel with y_train (N,) or (N, C) (used as K ⊗ I_C); (N, N, C) diagonal kernel
                   (one kernel per output) or (N, N, C, C) full kernel (index n*C + c), with y_train (N, C)
                   ((N,) when C = 1).  Symmetric.
    y_train        targets, one row per training sample.
    K_test_train   (M, N[, C[, C]]) kernel between test and training samples, or None.
    ridge          >= 0; with relative_ridge=True, multiplied by the mean diagonal of the (N·C) operator
                   (trace(K)/N for a trace kernel), making it scale-free.
    f0_train, f0_test  the model's outputs at θ₀ (shape of y_train, and (M, ...)); default zero.  With
                   K_test_train, f0_test is required whenever f0_train is given.
    rcond          singularity threshold relative to the largest eigenvalue; default N·C·eps of K_train's dtype
                   (float32's for half types), torch.linalg.lstsq's default: K + ridge·I is solved by Cholesky,
                   or, when a pivot falls below 10·rcond·max diag or Cholesky fails, as minimum-norm least
                   squares (eigenvalues below rcond·λ_max dropped).
    Computed in float64; results in float64 when an input is float64, else float32.
    """
    P = Problem(K_train, y_train, K_test_train, f0_train, f0_test)
    lam = resolve_ridge(ridge, relative_ridge, P.Kb)
    n_b = P.Kb.shape[-1]
    A = P.Kb + lam * torch.eye(n_b, dtype=P.Kb.dtype, device=P.Kb.device)
    alpha, solver = solve_psd(A, P.R, check_rcond(rcond, n_b, P.eps))
    train = P.Kb @ alpha
    if P.f0b is not None:
        train = train + P.f0b
    test = None
    if P.Ktb is not None:
        test = P.Ktb @ alpha
        if P.f0tb is not None:
            test = test + P.f0tb
        test = P.out(test, P.M)
    return KernelRegression(P.out(train, P.N), test, P.out(alpha, P.N), lam, solver)


@dataclass(frozen=True)
class GDDynamics:
    """Result of ``gd_dynamics`` at the recorded steps t (T of them).

    steps       (T,) the step counts t
    train       (T, N[, C]) f_t on the training samples
    test        (T, M[, C]) f_t on the test samples, or None
    train_loss  (T,) (1/2N) Σ_i ‖f_t(x_i) − y_i‖²  (the data term, without weight decay)
    test_loss   (T,) (1/2M) Σ_j ‖f_t(x'_j) − y'_j‖², or None without y_test
    lr_max      2N / (λ_max + N·weight_decay): gradient descent converges iff lr < lr_max
    """
    steps: Tensor
    train: Tensor
    test: Optional[Tensor]
    train_loss: Tensor
    test_loss: Optional[Tensor]
    lr_max: float


def _steps(steps) -> Tensor:
    if isinstance(steps, bool):
        raise TypeError("steps must be an int or a sequence of ints, got bool")
    if isinstance(steps, int):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        return torch.arange(steps + 1)
    if isinstance(steps, Tensor):
        steps = steps.reshape(-1).tolist()
    try:
        ts = [int(s) for s in steps]
    except (TypeError, ValueError):
        raise TypeError(f"steps must be an int T (t = 0..T) or a sequence of ints, got {steps!r}") from None
    if not ts or any(t < 0 or t != s for t, s in zip(ts, steps)):
        raise ValueError(f"steps must be a non-empty sequence of integers >= 0, got {steps!r}")
    return torch.tensor(ts)


def gd_dynamics(K_train: Tensor, y_train: Tensor, lr: float, steps: Union[int, Sequence[int]], *,
                K_test_train: Optional[Tensor] = None, y_test: Optional[Tensor] = None,
                f0_train: Optional[Tensor] = None, f0_test: Optional[Tensor] = None,
                weight_decay: float = 0.0) -> GDDynamics:
    """Full-batch gradient descent on the linearised model, in closed form at any step.

    Loss (normalised by the number of training samples N, whatever the number of outputs C):

        L(θ) = 1/(2N) Σ_i ‖f_lin(x_i; θ) − y_i‖²  +  (weight_decay/2) ‖θ − θ₀‖²,    θ_{t+1} = θ_t − lr ∇L(θ_t)

    from θ₀.  Then Δθ_t = Jᵀ β_t and, with K = V diag(λ) Vᵀ, s = λ + N·weight_decay,

        f_t = f0 + V diag(λ g_t) Vᵀ (y − f0),    f_t(X_test) = f0_test + K_te,tr V diag(g_t) Vᵀ (y − f0),
        g_t(λ) = (1 − (1 − lr·s/N)^t) / s            (lr·t/N where s = 0)

    (evaluated with expm1/log1p, no cancellation at small lr·s/N).  As t → ∞ (lr < lr_max) this is
    ``kernel_regression`` with ridge = N·weight_decay.  Without weight decay, f_t = f0 + (I − (I − lr·K/N)^t)(y − f0).

    K_train, y_train, K_test_train, f0_train, f0_test  as in ``kernel_regression`` (a trace kernel with (N, C)
                 targets is K ⊗ I_C).
    lr           learning rate > 0; weight_decay >= 0 (towards θ₀, as above).
    steps        int T: every t = 0, 1, ..., T; or a sequence of step counts (any order, e.g. [0, 10, 1000]).
    y_test       (M[, C]) test targets for test_loss.
    Returns ``GDDynamics`` (predictions and losses at each recorded t, and lr_max).  Warns when lr >= lr_max.
    """
    P = Problem(K_train, y_train, K_test_train, f0_train, f0_test)
    lr = check_scalar("lr", lr, positive=True)
    wd = check_scalar("weight_decay", weight_decay)
    ts = _steps(steps)
    N = P.N
    w, V = torch.linalg.eigh(P.Kb)  # (B, n), (B, n, n)
    rhat = V.mT @ P.R  # (B, n, k)
    s = w + N * wd
    smax = s.amax().item()
    lr_max = 2 * N / smax if smax > 0 else math.inf
    if lr >= lr_max:
        warnings.warn(f"gd_dynamics: lr = {lr} >= lr_max = 2N/(λ_max + N·weight_decay) = {lr_max:.6g}: gradient "
                      f"descent diverges", RuntimeWarning, stacklevel=2)
    t = ts.to(dtype=s.dtype, device=s.device).reshape(-1, 1, 1)  # (T, 1, 1)
    a = lr * s / N  # (B, n)
    stable = a < 1
    a_lt1 = torch.where(stable, a, torch.zeros_like(a))
    one_minus_pow = torch.where(stable, -torch.expm1(t * torch.log1p(-a_lt1)), 1 - (1 - a) ** t)
    s_safe = torch.where(s == 0, torch.ones_like(s), s)
    g = torch.where(s == 0, lr * t / N, one_minus_pow / s_safe)  # (T, B, n)
    coef = g.unsqueeze(-1) * rhat  # (T, B, n, k): β_t in the eigenbasis
    train = V @ (w.unsqueeze(-1) * coef)
    resid = rhat * (1 - w * g).unsqueeze(-1)  # Vᵀ(y − f_t)
    train_loss = resid.square().sum((1, 2, 3)) / (2 * N)
    if P.f0b is not None:
        train = train + P.f0b
    test = test_loss = None
    if P.Ktb is not None:
        test = (P.Ktb @ V) @ coef
        if P.f0tb is not None:
            test = test + P.f0tb
        if y_test is not None:
            check_tensor("y_test", y_test)
            if y_test.shape[:1] != (P.M,):
                raise ValueError(f"y_test must have {P.M} rows (K_test_train's M), got shape {tuple(y_test.shape)}")
            yt = P.layout.blocks(y_test.to(P.device), "y_test")
            test_loss = (test - yt).square().sum((1, 2, 3)) / (2 * P.M)
        test = P.out(test, P.M)
    elif y_test is not None:
        raise ValueError("y_test was given without K_test_train")
    return GDDynamics(ts.to(P.device), P.out(train, N), test, train_loss.to(P.dtype),
                      None if test_loss is None else test_loss.to(P.dtype), lr_max)


def kernel_influence(K_train: Tensor, residuals: Tensor, K_test_train: Tensor, ridge: float = 0.0, *,
                     relative_ridge: bool = False, rcond: Optional[float] = None) -> Tensor:
    """The change of every test prediction of the ridge-regularised linearised model when one training sample is
    removed and the model refitted, exactly, in dual form (no refit):

        Δ[j, i] = f^(−i)(x'_j) − f(x'_j) = −K(x'_j, X) G[:, I_i] (G_{I_i I_i})⁻¹ α_{I_i},
        G = (K + ridge·I)⁻¹,  α = G (y − f0)

    where I_i are the rows of sample i (its C outputs for a full kernel; one row per output kernel otherwise).
    Removing row i from a linear system: the refitted α^(−i) equals α − G[:, I] (G_II)⁻¹ α_I on the other rows
    (the block leave-one-out identity of ridge regression).  The ridge stays fixed when refitting.

    K_train      (N, N) / (N, N, C) / (N, N, C, C), as in ``kernel_regression``; K + ridge·I must be positive
                 definite to working precision (Cholesky pivots above 10·rcond·max diag, rcond as in
                 ``kernel_regression``; a ValueError otherwise: use ridge > 0 for a singular kernel).
    residuals    y − f0 at θ₀, (N,) or (N, C) (the layout of ``kernel_regression``'s y_train).
    K_test_train (M, N[, C[, C]]).
    ridge, relative_ridge  as in ``kernel_regression``.
    Returns (M, N) for residuals (N,), else (M, N, C): Δ[j, i, c] for test output c.
    """
    if K_test_train is None:
        raise ValueError("K_test_train is required (the test points whose predictions change)")
    P = Problem(K_train, residuals, K_test_train, y_name="residuals")
    lam = resolve_ridge(ridge, relative_ridge, P.Kb)
    n_b = P.Kb.shape[-1]
    A = P.Kb + lam * torch.eye(n_b, dtype=P.Kb.dtype, device=P.Kb.device)
    L = cholesky_checked(A, check_rcond(rcond, n_b, P.eps))
    if L is None:
        raise ValueError(f"K_train + ridge·I is not positive definite to working precision (ridge = {lam:g}): "
                         f"removing a training sample from a singular system is not defined; use ridge > 0")
    G = torch.cholesky_inverse(L)  # (B, n_b, n_b)
    alpha = G @ P.R  # (B, n_b, k)
    H = P.Ktb @ G  # (B, m_b, n_b)
    N, M, C = P.N, P.M, P.C
    if P.mode == "full":
        Gr = G[0].reshape(N, C, N, C)
        idx = torch.arange(N, device=G.device)
        G_II = Gr[idx, :, idx, :]  # (N, C, C)
        w = torch.linalg.solve(G_II, alpha[0, :, 0].reshape(N, C, 1))[..., 0]  # (N, C)
        out = -torch.einsum("pqic,ic->piq", H[0].reshape(M, C, N, C), w)  # (M, N, C_test)
        if not P.layout.tail:  # C = 1 with residuals (N,)
            out = out[..., 0]
    else:
        gdiag = G.diagonal(dim1=-2, dim2=-1)  # (B, N)
        scaled = alpha / gdiag.unsqueeze(-1)  # (B, N, k)
        out = -H.unsqueeze(-1) * scaled.unsqueeze(1)  # (B, M, N, k)
        if P.mode == "diagonal":
            out = out[..., 0].permute(1, 2, 0)  # (M, N, C)
            if not P.layout.tail:
                out = out[..., 0]
        else:
            out = out[0] if P.layout.tail else out[0, ..., 0]
    return out.to(P.dtype)
