"""ntk_kernels.analysis, each function against an independent computation in float64: kernel regression against
ℓ2-regularised least squares in parameter space (Jacobians from torch.func.jacrev), gd_dynamics against explicit
gradient-descent loops, spectrum against numpy, kernel_influence against refitting without the sample, the LP-FT
decomposition against features and Jacobians computed by hand, layer_selection against empirical_ntk_reference,
kernel_classifier against scikit-learn and numpy."""
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _compare import assert_close
from ntk_kernels.analysis import (gd_dynamics, kernel_classifier, kernel_influence, kernel_regression, layer_selection,
                                  lpft_decomposition, spectrum)
from ntk_kernels.ntk import empirical_ntk, empirical_ntk_reference

F64 = torch.float64


# ---------------------------------------------------------------------------------------------- helpers
def mlp(d=4, h=6, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double().eval()  # P = 51 for c = 3


def data(n, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)


def jacobian(model, x, names=None):
    """J (N·C, P) of model(x), row n*C + c, over the parameters ``names`` (default all), via torch.func.jacrev."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    theta = {n: named[n].detach() for n in names}
    rest = {n: p.detach() for n, p in named.items() if n not in theta}
    f = lambda th: torch.func.functional_call(model, {**rest, **th}, (x,))  # noqa: E731
    J = torch.func.jacrev(f)(theta)
    nc = f(theta).numel()
    return torch.cat([J[n].reshape(nc, -1) for n in names], 1)


def param_space_ridge(J, r, ridge):
    """argmin ‖J Δθ − r‖² + ridge ‖Δθ‖²: normal equations (JᵀJ + ridge·I) Δθ = Jᵀ r, or for ridge = 0 the
    minimum-norm least-squares solution (LAPACK gelsd)."""
    if ridge > 0:
        return torch.linalg.solve(J.T @ J + ridge * torch.eye(J.shape[1], dtype=F64), J.T @ r)
    return torch.linalg.lstsq(J, r.unsqueeze(-1), driver="gelsd").solution[:, 0]


def features(n, c, p, seed):
    return torch.randn(n, c, p, generator=torch.Generator().manual_seed(seed), dtype=F64)


def kernel_from(X, Y, mode):
    """A PSD kernel of per-sample 'Jacobians' X (N, C, P), Y (M, C, P) in the engine's layout."""
    return {"full": torch.einsum("icp,jdp->ijcd", X, Y), "diagonal": torch.einsum("icp,jcp->ijc", X, Y),
            "trace": torch.einsum("icp,jcp->ij", X, Y)}[mode]


def flatten_np(K):
    """numpy (N·C, N·C) matrix of a kernel, built entry by entry at index n*C + c (diagonal: no coupling)."""
    K = K.numpy()
    if K.ndim == 2:
        return K.copy()
    n1, n2, c = K.shape[:3]
    out = np.zeros((n1 * c, n2 * c))
    for i in range(n1):
        for j in range(n2):
            for a in range(c):
                for b in range(c):
                    if K.ndim == 4:
                        out[i * c + a, j * c + b] = K[i, j, a, b]
                    elif a == b:
                        out[i * c + a, j * c + b] = K[i, j, a]
    return out


# ---------------------------------------------------------------------------------------------- spectrum
def spectrum_numpy(M):
    w = np.sort(np.linalg.eigvalsh(M))[::-1]
    pos = np.clip(w, 0, None)
    p = pos / pos.sum()
    p = p[p > 0]
    return w, dict(lambda_max=w[0], lambda_min=w[-1], condition_number=w[0] / w[-1] if w[-1] > 0 else math.inf,
                   effective_rank=float(np.exp(-(p * np.log(p)).sum())), trace=np.trace(M))


@pytest.mark.parametrize("mode", ["trace", "diagonal", "full"])
def test_spectrum_against_numpy(mode):
    X = features(7, 3, 40, seed=1)
    K = kernel_from(X, X, mode)
    s = spectrum(K)
    w, stats = spectrum_numpy(flatten_np(K))
    assert s.eigenvalues.shape == ((7,) if mode == "trace" else (21,))
    assert_close(s.eigenvalues, torch.from_numpy(w.copy()), F64, name="eigenvalues")
    for k, v in stats.items():
        assert getattr(s, k) == pytest.approx(v, rel=1e-10), k
    d = s.as_dict()
    assert set(d) == {"lambda_max", "lambda_min", "condition_number", "effective_rank", "trace", "eigenvalues"}
    assert "eigenvalues" not in s.as_dict(eigenvalues=False)


def test_spectrum_rank_deficient_and_float32():
    X = features(9, 1, 4, seed=2)  # rank 4
    K = kernel_from(X, X, "trace")
    s = spectrum(K)
    assert 1 <= s.effective_rank <= 4 + 1e-9
    assert abs(s.lambda_min) < 1e-10 * s.lambda_max
    assert s.condition_number > 1e8  # λ_min is zero to rounding: inf, or a huge ratio
    s32 = spectrum(K.float())
    assert s32.eigenvalues.dtype == F64 and s32.trace == pytest.approx(s.trace, rel=1e-6)
    z = spectrum(torch.zeros(3, 3))
    assert z.effective_rank == 0.0 and z.condition_number == math.inf


def test_spectrum_bad_input():
    with pytest.raises(ValueError, match="K must be square"):
        spectrum(torch.eye(3)[:, :2])
    with pytest.raises(ValueError, match="K must be a kernel of shape"):
        spectrum(torch.ones(3))
    K = torch.eye(3)
    K[1, 2] = float("nan")
    with pytest.raises(ValueError, match="K contains NaN"):
        spectrum(K)
    with pytest.raises(ValueError, match="K must be symmetric"):
        spectrum(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="K must be a torch.Tensor"):
        spectrum(np.eye(2))


# ---------------------------------------------------------------------------------------------- kernel regression
@pytest.mark.parametrize("n,ridge", [(5, 0.0), (5, 0.3), (23, 0.0), (23, 1e-2)])
def test_kernel_regression_matches_parameter_space(n, ridge):
    """Full kernel (N, N, C, C): overparameterised (N·C = 15 < P = 51) and underparameterised (N·C = 69 > P, the
    kernel is singular: minimum-norm least squares)."""
    model = mlp()
    x, xt = data(n), data(4, seed=1)
    y = torch.randn(n, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    J, Jt = jacobian(model, x), jacobian(model, xt)
    dtheta = param_space_ridge(J, (y - f0).reshape(-1), ridge)
    K = empirical_ntk(model, x, dtype=F64)
    Kt = empirical_ntk(model, xt, x, dtype=F64)
    res = kernel_regression(K, y, Kt, ridge=ridge, f0_train=f0, f0_test=f0t)
    assert res.solver == ("lstsq" if (ridge == 0 and n * 3 > 51) else "cholesky")
    assert res.train.dtype == F64 and res.train.shape == (n, 3) and res.test.shape == (4, 3)
    tol = 1e-10 if res.solver == "cholesky" else 1e-7
    torch.testing.assert_close(res.train, f0 + (J @ dtheta).reshape(n, 3), rtol=0, atol=tol)
    torch.testing.assert_close(res.test, f0t + (Jt @ dtheta).reshape(4, 3), rtol=0, atol=tol)
    if ridge == 0 and n * 3 < 51:  # interpolation
        torch.testing.assert_close(res.train, y, rtol=0, atol=1e-9)


def test_kernel_regression_trace_single_output_and_relative_ridge():
    model = mlp(c=1)
    x, xt = data(6), data(3, seed=1)
    y = torch.randn(6, dtype=F64)
    with torch.no_grad():
        f0, f0t = model(x)[:, 0], model(xt)[:, 0]
    J, Jt = jacobian(model, x), jacobian(model, xt)
    K = empirical_ntk(model, x, mode="trace", dtype=F64)
    Kt = empirical_ntk(model, xt, x, mode="trace", dtype=F64)
    rel = 0.2
    lam = rel * torch.trace(K).item() / 6
    dtheta = param_space_ridge(J, y - f0, lam)
    res = kernel_regression(K, y, Kt, ridge=rel, relative_ridge=True, f0_train=f0, f0_test=f0t)
    assert res.ridge == pytest.approx(lam, rel=1e-12)
    assert res.train.shape == (6,) and res.test.shape == (3,) and res.alpha.shape == (6,)
    assert_close(res.train, f0 + J @ dtheta, F64, name="train")
    assert_close(res.test, f0t + Jt @ dtheta, F64, name="test")
    # the same problem as a full (N, N, 1, 1) kernel and as a diagonal (N, N, 1) one
    for K2, Kt2 in ((K[:, :, None, None], Kt[:, :, None, None]), (K[:, :, None], Kt[:, :, None])):
        r2 = kernel_regression(K2, y, Kt2, ridge=lam, f0_train=f0, f0_test=f0t)
        assert_close(r2.test, res.test, F64, name="as full / diagonal")


def test_kernel_regression_trace_kernel_kron_identity():
    """A linear head's eNTK is k(x, x')·I_C: the trace kernel / C with (N, C) targets is K ⊗ I_C, checked in
    parameter space over the head's parameters."""
    model = mlp()
    head = ["2.weight", "2.bias"]
    x, xt = data(8), data(5, seed=1)
    y = torch.randn(8, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    J, Jt = jacobian(model, x, head), jacobian(model, xt, head)
    K = empirical_ntk(model, x, params=head, mode="trace", dtype=F64) / 3
    Kt = empirical_ntk(model, xt, x, params=head, mode="trace", dtype=F64) / 3
    for ridge in (0.0, 0.5):  # ridge 0: 8 samples, the head has 21 parameters, k has rank <= 7: singular
        dtheta = param_space_ridge(J, (y - f0).reshape(-1), ridge)
        res = kernel_regression(K, y, Kt, ridge=ridge, f0_train=f0, f0_test=f0t)
        tol = 1e-10 if res.solver == "cholesky" else 1e-7
        torch.testing.assert_close(res.test, f0t + (Jt @ dtheta).reshape(5, 3), rtol=0, atol=tol)
        torch.testing.assert_close(res.train, f0 + (J @ dtheta).reshape(8, 3), rtol=0, atol=tol)
        # and against kron(K, I_C) flattened at n*C + c, solved with numpy
        Kk, Ktk = np.kron(K.numpy(), np.eye(3)), np.kron(Kt.numpy(), np.eye(3))
        if ridge > 0:
            a = np.linalg.solve(Kk + ridge * np.eye(24), (y - f0).numpy().reshape(-1))
            np.testing.assert_allclose(res.test.numpy(), f0t.numpy() + (Ktk @ a).reshape(5, 3), atol=1e-10)


def test_kernel_regression_diagonal_kernel_per_output():
    X, Xt = features(9, 2, 30, seed=4), features(4, 2, 30, seed=5)
    K, Kt = kernel_from(X, X, "diagonal"), kernel_from(Xt, X, "diagonal")
    y = torch.randn(9, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    res = kernel_regression(K.float(), y.float(), Kt.float(), ridge=0.1)
    assert res.test.dtype == torch.float32
    for c in range(2):
        a = np.linalg.solve(K[:, :, c].numpy() + 0.1 * np.eye(9), y[:, c].numpy())
        np.testing.assert_allclose(res.test[:, c].numpy(), Kt[:, :, c].numpy() @ a, rtol=2e-4, atol=2e-4)


def test_kernel_regression_bad_input():
    K, y = torch.eye(5, dtype=F64), torch.ones(5, dtype=F64)
    with pytest.raises(ValueError, match=r"y_train must have shape \(5,\)"):
        kernel_regression(K, torch.ones(4))
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        kernel_regression(K, y, ridge=-1.0)
    with pytest.raises(ValueError, match="K_train must be square"):
        kernel_regression(torch.ones(5, 4), y)
    Kn = K.clone()
    Kn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="K_train contains NaN"):
        kernel_regression(Kn, y)
    with pytest.raises(ValueError, match="y_train contains NaN"):
        kernel_regression(K, torch.full((5,), float("nan")))
    with pytest.raises(ValueError, match=r"K_test_train must have shape \(M, 5\)"):
        kernel_regression(K, y, torch.ones(3, 4))
    with pytest.raises(ValueError, match="f0_test"):
        kernel_regression(K, y, torch.ones(3, 5), f0_train=y)
    with pytest.raises(ValueError, match="f0_train was not"):
        kernel_regression(K, y, torch.ones(3, 5), f0_test=torch.ones(3))
    with pytest.raises(ValueError, match=r"f0_train must have the shape of y_train \(5,\)"):
        kernel_regression(K, y, f0_train=torch.ones(5, 1))
    with pytest.raises(ValueError, match=r"y_train must have shape \(5, 2\)"):
        kernel_regression(torch.eye(10).reshape(5, 2, 5, 2).permute(0, 2, 1, 3), torch.ones(5, 3))
    with pytest.raises(TypeError, match="K_train must be a floating tensor"):
        kernel_regression(torch.eye(5, dtype=torch.long), y)
    with pytest.raises(ValueError, match="K_train must be symmetric"):
        kernel_regression(torch.triu(torch.ones(5, 5)), y)


# ---------------------------------------------------------------------------------------------- gd dynamics
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_gd_dynamics_matches_parameter_space_loop(wd):
    model = mlp()
    n, m = 7, 4
    x, xt = data(n), data(m, seed=1)
    y = torch.randn(n, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    yt = torch.randn(m, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    with torch.no_grad():
        f0, f0t = model(x), model(xt)
    J, Jt = jacobian(model, x), jacobian(model, xt)
    K = empirical_ntk(model, x, dtype=F64)
    Kt = empirical_ntk(model, xt, x, dtype=F64)
    lr = 0.7 * n / torch.linalg.eigvalsh(J @ J.T).max().item()
    T = 25
    # explicit gradient descent on L = 1/(2N) ‖f0 + J Δθ − y‖² + wd/2 ‖Δθ‖²
    dtheta = torch.zeros(J.shape[1], dtype=F64)
    tr, te, ltr, lte = [], [], [], []
    for _ in range(T + 1):
        f = f0 + (J @ dtheta).reshape(n, 3)
        ft = f0t + (Jt @ dtheta).reshape(m, 3)
        tr.append(f), te.append(ft)
        ltr.append(((f - y) ** 2).sum() / (2 * n)), lte.append(((ft - yt) ** 2).sum() / (2 * m))
        dtheta = dtheta - lr * (J.T @ (f - y).reshape(-1) / n + wd * dtheta)
    res = gd_dynamics(K, y, lr, T, K_test_train=Kt, y_test=yt, f0_train=f0, f0_test=f0t, weight_decay=wd)
    assert res.steps.tolist() == list(range(T + 1))
    assert_close(res.train, torch.stack(tr), F64, name="train")
    assert_close(res.test, torch.stack(te), F64, name="test")
    assert_close(res.train_loss, torch.stack(ltr), F64, name="train loss")
    assert_close(res.test_loss, torch.stack(lte), F64, name="test loss")
    assert res.lr_max == pytest.approx(2 * n / (torch.linalg.eigvalsh(J @ J.T).max().item() + n * wd), rel=1e-10)
    # chosen steps in any order
    sub = gd_dynamics(K, y, lr, [T, 0, 3], K_test_train=Kt, f0_train=f0, f0_test=f0t, weight_decay=wd)
    assert_close(sub.test, torch.stack([te[T], te[0], te[3]]), F64, name="steps subset")
    assert sub.test_loss is None


def test_gd_dynamics_limit_is_kernel_regression():
    X, Xt = features(6, 2, 20, seed=9), features(3, 2, 20, seed=10)
    K, Kt = kernel_from(X, X, "full"), kernel_from(Xt, X, "full")
    y = torch.randn(6, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    lam_max = spectrum(K).lambda_max
    wd = 0.1
    res = gd_dynamics(K, y, 6 / lam_max, [10 ** 6], K_test_train=Kt, weight_decay=wd)
    ref = kernel_regression(K, y, Kt, ridge=6 * wd)
    assert_close(res.test[0], ref.test, F64, name="t -> inf")
    assert_close(res.train[0], ref.train, F64, name="t -> inf (train)")


@pytest.mark.parametrize("mode", ["trace", "diagonal"])
def test_gd_dynamics_function_space_loop(mode):
    """f ← f − (lr/N) K (f − y): a trace kernel acting as K ⊗ I_C, a diagonal kernel per output."""
    X, Xt = features(8, 3, 10, seed=12), features(5, 3, 10, seed=13)
    K, Kt = kernel_from(X, X, mode), kernel_from(Xt, X, mode)
    y = torch.randn(8, 3, generator=torch.Generator().manual_seed(14), dtype=F64)
    lr, T = 8 / spectrum(K).lambda_max, 15
    Ks = [K] * 3 if mode == "trace" else [K[:, :, c] for c in range(3)]
    Kts = [Kt] * 3 if mode == "trace" else [Kt[:, :, c] for c in range(3)]
    f, ft, beta = torch.zeros(8, 3, dtype=F64), torch.zeros(5, 3, dtype=F64), torch.zeros(8, 3, dtype=F64)
    tr, te = [], []
    for _ in range(T + 1):
        tr.append(f.clone()), te.append(ft.clone())
        for c in range(3):  # β accumulates the dual coefficients: f = K β, f_test = K_te β
            g = (f[:, c] - y[:, c]) * lr / 8
            beta[:, c] -= g
            f[:, c] = Ks[c] @ beta[:, c]
            ft[:, c] = Kts[c] @ beta[:, c]
    res = gd_dynamics(K, y, lr, T, K_test_train=Kt)
    assert_close(res.train, torch.stack(tr), F64, name=f"{mode} train")
    assert_close(res.test, torch.stack(te), F64, name=f"{mode} test")


def test_gd_dynamics_small_lr_no_cancellation_and_divergence_warning():
    X = features(5, 1, 8, seed=15)
    K = kernel_from(X, X, "trace")
    y = torch.randn(5, dtype=F64)
    lr = 1e-9
    res = gd_dynamics(K, y, lr, 1)
    torch.testing.assert_close(res.train[1], lr / 5 * K @ y, rtol=1e-12, atol=0)
    with pytest.warns(RuntimeWarning, match="diverges"):
        bad = gd_dynamics(K, y, 1.5 * gd_dynamics(K, y, 1.0, 0).lr_max, 50)
    assert bad.train_loss[-1] > bad.train_loss[0]
    with pytest.raises(ValueError, match="lr must be > 0"):
        gd_dynamics(K, y, 0.0, 3)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        gd_dynamics(K, y, 0.1, -1)
    with pytest.raises(ValueError, match="steps must be a non-empty sequence"):
        gd_dynamics(K, y, 0.1, [1.5])
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        gd_dynamics(K, y, 0.1, 2, weight_decay=-0.1)
    with pytest.raises(ValueError, match="y_test was given without K_test_train"):
        gd_dynamics(K, y, 0.1, 2, y_test=y)


# ---------------------------------------------------------------------------------------------- influence
@pytest.mark.parametrize("mode,multi,ridge", [("trace", False, 0.3), ("trace", True, 0.0), ("diagonal", True, 0.2),
                                              ("full", True, 0.1), ("full", True, 0.0)])
def test_kernel_influence_matches_refitting(mode, multi, ridge):
    c = 3 if (multi and mode != "trace") else 1
    X, Xt = features(7, c, 30, seed=16), features(4, c, 30, seed=17)
    K, Kt = kernel_from(X, X, mode), kernel_from(Xt, X, mode)
    shape = (7, 3) if multi else (7,)
    r = torch.randn(shape, generator=torch.Generator().manual_seed(18), dtype=F64)
    infl = kernel_influence(K, r, Kt, ridge)
    assert infl.shape == (4, 7) + shape[1:]
    base = kernel_regression(K, r, Kt, ridge=ridge).test
    for i in range(7):
        keep = torch.tensor([j for j in range(7) if j != i])
        refit = kernel_regression(K[keep][:, keep], r[keep], Kt[:, keep], ridge=ridge)
        assert refit.solver == "cholesky"
        assert_close(infl[:, i], refit.test - base, F64, name=f"remove {i}")


def test_kernel_influence_relative_ridge_and_errors():
    X, Xt = features(6, 1, 3, seed=19), features(2, 1, 3, seed=20)
    K, Kt = kernel_from(X, X, "trace"), kernel_from(Xt, X, "trace")  # rank 3: singular
    r = torch.randn(6, dtype=F64)
    with pytest.raises(ValueError, match="not positive definite"):
        kernel_influence(K, r, Kt, 0.0)
    lam = 0.5 * torch.trace(K).item() / 6
    torch.testing.assert_close(kernel_influence(K, r, Kt, 0.5, relative_ridge=True), kernel_influence(K, r, Kt, lam))
    with pytest.raises(ValueError, match=r"residuals must have shape \(6,\)"):
        kernel_influence(K, r[:5], Kt, 1.0)
    with pytest.raises(ValueError, match="K_test_train is required"):
        kernel_influence(K, r, None, 1.0)


def test_float32_inputs_give_float32_results():
    X, Xt = features(6, 2, 20, seed=29), features(3, 2, 20, seed=30)
    K, Kt = kernel_from(X, X, "full"), kernel_from(Xt, X, "full")
    y = torch.randn(6, 2, generator=torch.Generator().manual_seed(31), dtype=F64)
    lr = 3 / spectrum(K).lambda_max
    calls = [lambda K, Kt, y: kernel_regression(K, y, Kt, ridge=0.1).test,
             lambda K, Kt, y: gd_dynamics(K, y, lr, 5, K_test_train=Kt).test,
             lambda K, Kt, y: kernel_influence(K, y, Kt, 0.1)]
    for f in calls:
        ref, out = f(K, Kt, y), f(K.float(), Kt.float(), y.float())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------- classifier
def blobs(n_per, k, seed, d=3):
    g = torch.Generator().manual_seed(seed)
    centers = 6.0 * torch.eye(d, dtype=F64)[:k]
    X = torch.cat([centers[c] + torch.randn(n_per, d, generator=g, dtype=F64) * 0.5 for c in range(k)])
    return X, torch.arange(k).repeat_interleave(n_per)


@pytest.mark.parametrize("solver", ["regression", "logistic", "svm"])
@pytest.mark.parametrize("k", [2, 3])
def test_kernel_classifier_separable(solver, k):
    X, y = blobs(10, k, seed=21)
    Xt, yt = blobs(6, k, seed=22)
    K, Kt = X @ X.T + 1, Xt @ X.T + 1
    res = kernel_classifier(K, y, Kt, solver, test_labels=yt, **({"ridge": 1e-3} if solver == "regression" else {}))
    assert res.accuracy == 1.0 and torch.equal(res.labels, yt)


def test_kernel_classifier_against_sklearn_and_numpy():
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC
    X, Xt = features(24, 1, 5, seed=23)[:, 0], features(9, 1, 5, seed=24)[:, 0]
    y = torch.arange(24) % 3
    K, Kt = X @ X.T, Xt @ X.T
    svc = SVC(kernel="precomputed", C=2.0).fit(K.numpy(), y.numpy())
    res = kernel_classifier(K, y, Kt, "svm", sklearn_kwargs={"C": 2.0})
    assert res.labels.tolist() == svc.predict(Kt.numpy()).tolist()
    np.testing.assert_allclose(res.scores.numpy(), svc.decision_function(Kt.numpy()))
    lr = LogisticRegression(max_iter=10_000, C=3.0).fit(K.numpy(), y.numpy())
    res = kernel_classifier(K, y, Kt, "logistic", sklearn_kwargs={"C": 3.0})
    assert res.labels.tolist() == lr.predict(Kt.numpy()).tolist()
    np.testing.assert_allclose(res.scores.numpy(), lr.predict_log_proba(Kt.numpy()))
    est = SVC(kernel="precomputed", C=0.5)
    res = kernel_classifier(K, y, Kt, "svm", estimator=est)
    assert res.model is est and res.labels.tolist() == est.predict(Kt.numpy()).tolist()
    # regression: one-hot / ±1 targets solved with numpy
    for targets in ("onehot", "pm1"):
        Y = np.eye(3)[y.numpy()] * (2 if targets == "pm1" else 1) - (1 if targets == "pm1" else 0)
        scores = Kt.numpy() @ np.linalg.solve(K.numpy() + 0.5 * np.eye(24), Y)
        res = kernel_classifier(K, y, Kt, ridge=0.5, targets=targets)
        np.testing.assert_allclose(res.scores.numpy(), scores, atol=1e-10)
        assert res.labels.tolist() == scores.argmax(1).tolist()
    # a full (N, N, C, C) kernel: the scalar kernel for sklearn is Σ_c K_cc; regression on the (N·C) system
    F, Ft = features(24, 3, 7, seed=25), features(9, 3, 7, seed=26)
    Kf, Ktf = kernel_from(F, F, "full"), kernel_from(Ft, F, "full")
    res = kernel_classifier(Kf, y, Ktf, "svm")
    svc = SVC(kernel="precomputed").fit(kernel_from(F, F, "trace").numpy(), y.numpy())
    assert res.labels.tolist() == svc.predict(kernel_from(Ft, F, "trace").numpy()).tolist()
    a = np.linalg.solve(flatten_np(Kf) + 0.1 * np.eye(72), np.eye(3)[y.numpy()].reshape(-1))
    scores = (flatten_np(Ktf) @ a).reshape(9, 3)
    res = kernel_classifier(Kf, y, Ktf, ridge=0.1)
    np.testing.assert_allclose(res.scores.numpy(), scores, atol=1e-9)
    # a single-output kernel: ±1 targets, label = [f > 0]
    F1, Ft1 = features(24, 1, 30, seed=27), features(9, 1, 30, seed=28)
    yb = torch.arange(24) % 2
    a = np.linalg.solve(kernel_from(F1, F1, "trace").numpy() + 0.1 * np.eye(24), 2.0 * yb.numpy() - 1)
    scores = kernel_from(Ft1, F1, "trace").numpy() @ a
    res = kernel_classifier(kernel_from(F1, F1, "full"), yb, kernel_from(Ft1, F1, "full"), ridge=0.1)
    np.testing.assert_allclose(res.scores.numpy(), scores, atol=1e-10)
    assert res.labels.tolist() == (scores > 0).astype(int).tolist()


def test_kernel_classifier_errors(monkeypatch):
    K, y = torch.eye(4, dtype=F64), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="solver must be one of"):
        kernel_classifier(K, y, K, "knn")
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        kernel_classifier(K, y[:3], K)
    with pytest.raises(TypeError, match="labels must hold integer class indices"):
        kernel_classifier(K, y.double(), K)
    with pytest.raises(ValueError, match="C = 2 outputs cannot regress on 3 one-hot"):
        kernel_classifier(torch.ones(4, 4, 2, dtype=F64), torch.tensor([0, 1, 2, 1]), torch.ones(2, 4, 2, dtype=F64))
    with pytest.raises(ValueError, match="apply to solver='regression' only"):
        kernel_classifier(K, y, K, "svm", ridge=1.0)
    pytest.importorskip("sklearn")
    from sklearn.svm import SVC
    with pytest.raises(ValueError, match="kernel='precomputed'"):
        kernel_classifier(K, y, K, "svm", estimator=SVC())
    for mod in ("sklearn", "sklearn.svm", "sklearn.linear_model"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        kernel_classifier(K, y, K, "svm")
    assert kernel_classifier(K, y, K).labels.tolist() == y.tolist()  # regression needs no scikit-learn


# ---------------------------------------------------------------------------------------------- LP-FT
class HeadNet(nn.Module):
    def __init__(self, d=4, h=7, k=5, c=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k), nn.Tanh())
        self.head = nn.Linear(k, c)

    def forward(self, x):
        return self.head(self.body(x))


def test_lpft_decomposition_by_hand():
    torch.manual_seed(0)
    model = HeadNet().double().eval()
    x, x2 = data(6), data(4, seed=1)
    dec = lpft_decomposition(model, x, head=model.head, dtype=F64)
    assert dec.head_names == ["head.weight", "head.bias"]
    assert_close(dec.total, empirical_ntk_reference(model, x, dtype=F64), F64, name="K_head + K_features")
    with torch.no_grad():
        phi = model.body(x)
    V = model.head.weight.detach()
    assert_close(dec.K_head, (phi @ phi.T + 1)[:, :, None, None] * torch.eye(3, dtype=F64), F64, name="K_head")
    # V J_φ J_φ'ᵀ Vᵀ with J_φ = ∂φ/∂θ_body from jacrev
    Jphi = jacobian(model.body, x).reshape(6, 5, -1)
    assert_close(dec.K_features, torch.einsum("cd,idp,jep,fe->ijcf", V, Jphi, Jphi, V), F64, name="K_features")
    assert dec.head_norm == pytest.approx(V.norm().item(), rel=1e-12)
    assert 0 < dec.feature_fraction < 1
    # two input sets, trace mode: K_head = C (φᵀφ' + 1); the head's name as a string
    dec2 = lpft_decomposition(model, x, x2, head="head", mode="trace", dtype=F64)
    with torch.no_grad():
        phi2 = model.body(x2)
    assert_close(dec2.K_head, 3 * (phi @ phi2.T + 1), F64, name="K_head trace")
    assert_close(dec2.total, empirical_ntk_reference(model, x, x2, mode="trace", dtype=F64), F64, name="trace total")
    # params restricted to the head: no feature part
    dec3 = lpft_decomposition(model, x, head=model.head, params=r"^head\.", dtype=F64)
    assert dec3.feature_names == [] and not dec3.K_features.any() and dec3.feature_fraction == 0


def test_lpft_decomposition_bert_classifier():
    from ntk.test_empirical_ntk_models import text, tiny_bert
    model = tiny_bert()
    x = text(4)
    phis = []
    h = model.classifier.register_forward_hook(lambda m, inp, out: phis.append(inp[0].detach()))
    with torch.no_grad():
        model(**x)
    h.remove()
    phi = phis[0]
    dec = lpft_decomposition(model, x, head=model.classifier, dtype=F64)
    assert_close(dec.K_head, (phi @ phi.T + 1)[:, :, None, None] * torch.eye(3, dtype=F64), F64, name="bert K_head")
    assert_close(dec.total, empirical_ntk(model, x, dtype=F64, strategy="materialize"), F64, name="bert total")


def test_lpft_decomposition_errors():
    model = HeadNet().double()
    x = data(3)
    with pytest.raises(ValueError, match="not a submodule"):
        lpft_decomposition(model, x, head=nn.Linear(5, 3))
    with pytest.raises(ValueError, match="no submodule named 'neck'"):
        lpft_decomposition(model, x, head="neck")
    with pytest.raises(ValueError, match="params selects none of the head's parameters"):
        lpft_decomposition(model, x, head=model.head, params=r"^body\.")


# ---------------------------------------------------------------------------------------------- layer selection
def test_layer_selection_kernels_and_ranking():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double().eval()
    x = data(9)
    cands = {"first": r"^0\.", "last": ["4.weight", "4.bias"], "biases": lambda n, p: n.endswith("bias"),
             "all": None}
    out = layer_selection(model, x, cands, dtype=F64)
    assert sorted(c.name for c in out) == sorted(cands)
    ranks = [c.spectrum.effective_rank for c in out]
    assert ranks == sorted(ranks, reverse=True) and [c.score for c in out] == ranks
    named = dict(model.named_parameters())
    for c in out:
        spec = cands[c.name]
        assert_close(c.kernel, empirical_ntk_reference(model, x, params=spec, mode="trace", dtype=F64), F64,
                     name=c.name)
        w = np.sort(np.linalg.eigvalsh(c.kernel.numpy()))[::-1]
        np.testing.assert_allclose(c.spectrum.eigenvalues.numpy(), w, atol=1e-10 * w[0])
        assert c.n_params == sum(named[n].numel() for n in c.params)
        assert set(c.as_dict()) >= {"name", "n_params", "score", "effective_rank"}
    by_cond = layer_selection(model, x, cands, rank_by="condition_number", dtype=F64)
    conds = [c.score for c in by_cond]
    assert conds == sorted(conds)
    by_fn = layer_selection(model, x, cands, rank_by=lambda s: s.trace, descending=False, mode="full", dtype=F64)
    assert [c.score for c in by_fn] == sorted(c.spectrum.trace for c in by_fn)
    assert by_fn[0].kernel.shape == (9, 9, 2, 2)
    with pytest.raises(ValueError, match="rank_by must be one of"):
        layer_selection(model, x, cands, rank_by="size")
    with pytest.raises(ValueError, match="candidate 'none'"):
        layer_selection(model, x, {"none": r"^nothing"})
    with pytest.raises(ValueError, match="non-empty mapping"):
        layer_selection(model, x, {})


def test_layer_selection_lora_candidates():
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    model = model.double().eval()
    x = data(5)
    cands = {"lora": r"lora_", "lora_A": r"lora_A", "first_lora": r"\.0\.lora_"}
    out = layer_selection(model, x, cands, dtype=F64)
    for c in out:
        assert all("lora_" in n for n in c.params)
        assert_close(c.kernel, empirical_ntk_reference(model, x, params=cands[c.name], mode="trace", dtype=F64), F64,
                     name=c.name)
