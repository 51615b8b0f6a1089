"""linearize, ntk_vp and ntk_eigs (ntk_kernels.ntk.linear) in float64 against explicit Jacobians
(torch.func.jacrev), the explicit eNTK (empirical_ntk, mode="full") and torch.linalg.eigh."""
import copy

import pytest
import torch
from torch import nn

from _compare import assert_close
from ntk_kernels.ntk import empirical_ntk
from ntk_kernels.ntk.linear import LinearizedModel, linearize, ntk_eigs, ntk_vp
from ntk.test_empirical_ntk_models import SmallCNN, data, text, tiny_bert

F64 = torch.float64


def tanh_mlp(d=5, h=12, c=2, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c)).double().eval()


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def call(model, x):
    return model(x) if isinstance(x, torch.Tensor) else model(**x)


def jacobian(model, x, names, output_fn=logits):
    """J (N·C, P) of output_fn(model(x)) over the parameters ``names`` (in that order), at the model's values."""
    theta = {n: p.detach() for n, p in model.named_parameters() if n in names}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in names}

    def f(th):
        st = {**rest, **th}
        out = torch.func.functional_call(model, st, (x,)) if isinstance(x, torch.Tensor) else \
            torch.func.functional_call(model, st, (), dict(x))
        return output_fn(out)

    J = torch.func.jacrev(f)(theta)
    nc = f(theta).numel()
    return torch.cat([J[n].reshape(nc, -1) for n in names], 1)


def flat_kernel(K):
    """(N1, N2, C, C) -> (N1·C, N2·C), sample-major."""
    n1, n2, c, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(n1 * c, n2 * c)


def perturb(lin, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ---------------------------------------------------------------------------------------------- linearize
@pytest.mark.parametrize("which", ["mlp", "cnn", "bert"])
def test_linearize_matches_first_order_taylor(which):
    if which == "mlp":
        model, x, params = tanh_mlp(), data(6, (5,)), None
    elif which == "cnn":
        model, x, params = SmallCNN().double().eval(), data(4, (2, 5, 5)), r"conv2|head\.weight"
    else:
        model, x, params = tiny_bert(), text(4), r"classifier|attention\.self\.(query|value)"
    lin = linearize(model, params=params)
    assert isinstance(lin, LinearizedModel) and isinstance(lin, nn.Module)
    f0 = logits(call(model, x)).detach()
    assert_close(call(lin, x), f0, F64, name=f"{which} f_lin(θ₀)")
    perturb(lin)
    names = lin.names
    J = jacobian(model, x, names)
    dtheta = torch.cat([lin.delta()[n].reshape(-1) for n in names])
    ref = f0 + (J @ dtheta).reshape(f0.shape)
    out = call(lin, x)
    assert_close(out, ref, F64, name=f"{which} f_lin(θ)")
    # the model itself is untouched and frozen
    assert_close(logits(call(model, x)), f0, F64)
    # the gradient of a loss of f_lin is J(x)ᵀ ∂loss/∂f (J at θ₀, whatever θ)
    w = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    (out * w).sum().backward()
    grad = torch.cat([lin.params()[n].grad.reshape(-1) for n in names])
    assert_close(grad, J.T @ w.reshape(-1), F64, name=f"{which} grad")
    assert all(p.grad is None for p in model.parameters())


def test_linearize_output_fn_and_params_and_l2():
    model = tanh_mlp(c=3)
    x = data(5, (5,))
    lin = linearize(model, params=["4.weight", "2.bias"], output_fn=lambda out: out[:, :2])
    assert lin.names == ["2.bias", "4.weight"]  # the model's order
    assert [n for n, _ in lin.named_parameters()] == ["theta.2__bias", "theta.4__weight"]
    assert_close(lin(x), model(x)[:, :2].detach(), F64)
    assert lin.l2_to_init().item() == 0.0
    perturb(lin, scale=0.1)
    l2 = lin.l2_to_init()
    ref = sum((d ** 2).sum() for d in lin.delta().values())
    assert_close(l2, ref, F64)
    l2.backward()
    for n, p in lin.params().items():  # ∇ ‖θ − θ₀‖² = 2 (θ − θ₀)
        assert_close(p.grad, 2 * lin.delta()[n], F64)
    # state_dict round trip holds θ and θ₀
    lin2 = linearize(model, params=["4.weight", "2.bias"], output_fn=lambda out: out[:, :2])
    lin2.load_state_dict(lin.state_dict())
    assert_close(lin2(x), lin(x), F64)


def test_merged_state_dict_gives_nonlinear_model():
    model = tanh_mlp()
    x = data(6, (5,))
    lin = linearize(model, params=r"^(0|2)\.")
    perturb(lin, scale=0.5)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(lin.merged_state_dict())
    theta = {n: p.detach() for n, p in lin.params().items()}
    state = {**{n: p.detach() for n, p in model.named_parameters()}, **theta}
    ref = torch.func.functional_call(model, state, (x,))
    assert_close(fresh(x), ref, F64, name="merged f(θ)")
    assert (fresh(x) - lin(x)).abs().max() > 1e-3  # f(θ) is not f_lin(θ) after a large step
    for n, p in model.named_parameters():  # the original model is unchanged
        if n.startswith("4."):
            assert torch.equal(fresh.state_dict()[n], p.detach())


def test_merged_state_dict_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(torch.tanh(self.emb(ids).mean(1)))

    torch.manual_seed(0)
    model = Tied().double()
    lin = linearize(model)
    assert lin.names == ["emb.weight"]
    perturb(lin)
    sd = lin.merged_state_dict()
    assert torch.equal(sd["emb.weight"], sd["out.weight"])
    assert torch.equal(sd["emb.weight"], lin.params()["emb.weight"].detach())


def test_gradient_descent_converges_to_kernel_regression():
    """Full-batch gradient descent on  L(θ) = ½ Σ_i ‖f_lin(x_i; θ) − y_i‖² + λ/2 ‖θ − θ₀‖²  (a sum, not a mean,
    over the N training points) converges to  Δ = Jᵀ (K + λ I)⁻¹ (y − f₀(X)),  so on held-out points
        f_lin(x*) = f₀(x*) + K(x*, X) (K(X, X) + λ I)⁻¹ (y − f₀(X))
    (with a mean loss, λ would be replaced by N·λ).  λ = λ_max(K)/10 and step 1/(λ_max + λ) contract the error by
    (1 − 1/11) a step at worst: 400 steps leave ~1e-17 of it; asserted to 1e-8 relative."""
    model = tanh_mlp()
    X, Xs = data(8, (5,)), data(5, (5,), seed=7)
    y = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
    K = flat_kernel(empirical_ntk(model, X, mode="full", dtype=F64))
    Ks = flat_kernel(empirical_ntk(model, Xs, X, mode="full", dtype=F64))
    lmax = torch.linalg.eigvalsh(K)[-1].item()
    lam = lmax / 10
    f0, f0s = model(X).detach(), model(Xs).detach()
    ref = f0s + (Ks @ torch.linalg.solve(K + lam * torch.eye(16, dtype=F64), (y - f0).reshape(-1))).reshape(5, 2)

    lin = linearize(model)
    opt = torch.optim.SGD(lin.parameters(), lr=1.0 / (lmax + lam))
    for _ in range(400):
        opt.zero_grad()
        loss = 0.5 * ((lin(X) - y) ** 2).sum() + 0.5 * lam * lin.l2_to_init()
        loss.backward()
        opt.step()
    pred = lin(Xs).detach()
    assert (pred - f0s).abs().max() > 1e-2  # it moved
    err = (pred - ref).abs().max().item() / ref.abs().max().item()
    assert err < 1e-8, err


def test_linearize_sdpa_error_names_eager():
    model = tiny_bert("sdpa")
    assert_close(linearize(model, params=r"classifier")(**text(2)), model(**text(2)).logits, F64)  # no tangent
    lin = linearize(model)  # reaches SDPA with a tangent: no forward-mode rule on CPU
    with pytest.raises(RuntimeError, match="attn_implementation=\"eager\""):
        lin(**text(2))


# ---------------------------------------------------------------------------------------------- ntk_vp
@pytest.mark.parametrize("params", [None, r"^2\.", ["0.weight", "4.bias"]])
def test_ntk_vp_mlp(params):
    model = tanh_mlp()
    x1, x2 = data(7, (5,)), data(5, (5,), seed=2)
    g = torch.Generator().manual_seed(4)
    for b, bs in ((None, 3), (x2, 2), (x2, None)):
        n2 = 7 if b is None else 5
        v = torch.randn(n2, 2, dtype=F64, generator=g)
        K = flat_kernel(empirical_ntk(model, x1, b, params=params, mode="full", dtype=F64))
        out = ntk_vp(model, x1, v, b, params=params, block_size=bs)
        assert out.shape == (7, 2)
        assert_close(out, (K @ v.reshape(-1)).reshape(7, 2), F64, name=f"Kv {params} bs={bs}")


def test_ntk_vp_cnn_and_output_fn():
    model = SmallCNN().double().eval()
    x1, x2 = data(5, (2, 5, 5)), data(4, (2, 5, 5), seed=5)
    fn = lambda out: out[:, 1:]  # noqa: E731
    v = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    K = flat_kernel(empirical_ntk(model, x1, x2, output_fn=fn, mode="full", dtype=F64))
    assert_close(ntk_vp(model, x1, v, x2, output_fn=fn, block_size=2), (K @ v.reshape(-1)).reshape(5, 2), F64)


@pytest.mark.parametrize("params", [None, r"attention\.self\.(query|value)\.weight$|classifier"])
def test_ntk_vp_bert_mapping_inputs(params):
    model = tiny_bert()
    x1, x2 = text(5), text(3, seed=1)
    g = torch.Generator().manual_seed(2)
    for b in (None, x2):
        n2 = 5 if b is None else 3
        v = torch.randn(n2, 3, dtype=F64, generator=g)
        K = flat_kernel(empirical_ntk(model, x1, b, params=params, mode="full", block_size=2, dtype=F64))
        out = ntk_vp(model, x1, v, b, params=params, block_size=2)
        assert_close(out, (K @ v.reshape(-1)).reshape(5, 3), F64, name=f"bert Kv {params}")


def test_ntk_vp_sdpa_error_names_eager():
    model = tiny_bert("sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation"):
        ntk_vp(model, text(2), torch.ones(2, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------- ntk_eigs
def eig_problem():
    model = tanh_mlp(d=4, h=10, c=3, seed=3)  # P = 203 > N·C = 60: K has full rank
    x = data(20, (4,), seed=9)
    K = flat_kernel(empirical_ntk(model, x, mode="full", dtype=F64))
    return model, x, K


@pytest.mark.parametrize("solver", ["auto", "lanczos", "scipy"])
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_ntk_eigs_matches_eigvalsh(which, solver):
    """The small end of this kernel is clustered (eigenvalues 1.4e-4, 3.1e-4, 3.7e-4, ... against 40): scipy's
    eigsh for "SA" is given ncv = N·C - 1 (with its default 20 it does not converge); "auto" takes the torch
    Lanczos for "SA"."""
    pytest.importorskip("scipy") if solver == "scipy" else None
    model, x, K = eig_problem()
    k = 5
    ncv = 59 if (which, solver) == ("SA", "scipy") else None
    vals, vecs = ntk_eigs(model, x, k=k, which=which, tol=1e-12, block_size=8, solver=solver, ncv=ncv)
    assert vals.shape == (k,) and vecs.shape == (20, 3, k)
    ref = torch.linalg.eigvalsh(K)
    ref = ref.flip(0)[:k] if which == "LA" else ref[:k]
    scale = ref.abs().max().item()
    assert (vals - ref).abs().max().item() <= 1e-8 * max(scale, K.abs().max().item()), (vals, ref)
    V = vecs.reshape(60, k)
    assert_close(V.T @ V, torch.eye(k, dtype=F64), F64, name="orthonormal")
    resid = (K @ V - V * vals).abs().max().item()
    assert resid <= 1e-6 * torch.linalg.eigvalsh(K)[-1].item(), resid
    assert (V.abs().argmax(0) == V.argmax(0)).all()  # sign convention: largest component positive


def test_ntk_eigs_lanczos_full_spectrum_and_params():
    model, x, _ = eig_problem()
    x = x[:6]
    K = flat_kernel(empirical_ntk(model, x, params=r"^4\.", mode="full", dtype=F64))  # P = 33 > 18
    vals, vecs = ntk_eigs(model, x, k=18, params=r"^4\.", solver="lanczos", tol=1e-12)
    assert_close(vals, torch.linalg.eigvalsh(K).flip(0), F64)
    V = vecs.reshape(18, 18)
    assert_close(K @ V, V * vals, F64)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs():
    model = tanh_mlp()
    x = data(4, (5,))
    with pytest.raises(ValueError, match=r"v must have shape \(N2, C\) = \(4, 2\)"):
        ntk_vp(model, x, torch.zeros(4, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"v must have shape \(N2, C\) = \(3, 2\)"):
        ntk_vp(model, x, torch.zeros(4, 2, dtype=F64), data(3, (5,)))
    with pytest.raises(TypeError, match="v must be a Tensor"):
        ntk_vp(model, x, [[0.0, 0.0]] * 4)
    with pytest.raises(ValueError, match="inputs2"):
        ntk_vp(model, x, torch.zeros(3, 2, dtype=F64), data(3, (6,)))
    with pytest.raises(ValueError, match="block_size"):
        ntk_vp(model, x, torch.zeros(4, 2, dtype=F64), block_size=0)
    with pytest.raises(ValueError, match="which must be"):
        ntk_eigs(model, x, k=2, which="LM")
    with pytest.raises(ValueError, match=r"k=9 is larger than the kernel's size N·C = 4·2 = 8"):
        ntk_eigs(model, x, k=9)
    with pytest.raises(ValueError, match="k must be a positive int"):
        ntk_eigs(model, x, k=0)
    with pytest.raises(ValueError, match="solver"):
        ntk_eigs(model, x, k=2, solver="arpack")
    with pytest.raises(ValueError, match="ncv must be"):
        ntk_eigs(model, x, k=2, ncv=9)
    with pytest.raises(ValueError, match="params=.*matches no parameter"):
        ntk_vp(model, x, torch.zeros(4, 2, dtype=F64), params=r"^nothing")
    with pytest.raises(ValueError, match="params=.*matches no parameter"):
        linearize(model, params=r"^nothing")
    with pytest.raises(ValueError, match="params=.*matches no parameter"):
        ntk_eigs(model, x, k=2, params=lambda n, p: False)
    with pytest.raises(ValueError, match="params: no parameter named"):
        linearize(model, params=["0.weight", "9.weight"])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        linearize(lambda z: z)
    with pytest.raises(ValueError, match="inputs must be batched"):
        ntk_eigs(model, torch.zeros(0, 5, dtype=F64), k=1)
