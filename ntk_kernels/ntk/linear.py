"""Linearized models and the matrix-free empirical NTK (issue 4, the plain-PyTorch part).

    f_lin(x; θ) = f(x; θ₀) + J(x)(θ − θ₀),         J(x) = ∂f(x; θ)/∂θ at θ₀, θ the selected parameters
    K(x, x') v  = J(x) (J(x')ᵀ v)                   (never forming K or J)

``linearize`` wraps a model as an nn.Module whose trainable parameters θ start at θ₀ (copies) and whose forward is
f_lin, computed by one ``torch.func.jvp`` of ``torch.func.functional_call`` at θ₀ with tangent θ − θ₀ (forward
mode: one pass gives f(x; θ₀) and J(x)(θ − θ₀)).  The tangent stays in torch's autograd graph, so the gradient of
any loss of f_lin reaches θ (reverse-over-forward: ∂/∂θ = J(x)ᵀ ∂loss/∂f_lin), and any torch optimizer trains it.

``ntk_vp`` computes K v as one reverse pass over inputs2's blocks (u = J₂ᵀ v accumulated with
``torch.autograd.grad``, works with any attention) then one forward-mode pass over inputs1's blocks (J₁ u with
``torch.func.jvp``).  Forward mode is chosen for J₁ u because one jvp gives the (n, C) product for a block in a
single forward; the reverse-mode alternatives need C backward passes a block (per-output gradients) or the
double-backward trick (J u = ∂/∂w [ (J ᵀ w) · u ]), which costs a forward, a backward with create_graph and a
second backward, and needs the same missing rule: on CPU, PyTorch's SDPA kernel
(``_scaled_dot_product_flash_attention_for_cpu``) has neither a forward-mode derivative nor a double-backward, so
both fail on SDPA attention.  Such models must be loaded with ``attn_implementation="eager"``; the error says so.

``ntk_eigs`` finds the top (or bottom) k eigenpairs of the (N·C) x (N·C) kernel through ntk_vp:
scipy.sparse.linalg.eigsh on a LinearOperator when scipy is importable (implicitly restarted Lanczos), otherwise
(or with solver="lanczos") Lanczos with full reorthogonalisation written in torch.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .empirical import (Inputs, ParamsSpec, _batch, _check_args, _check_inputs, _outputs, _slice,
                        select_params)

__all__ = ["LinearizedModel", "linearize", "ntk_vp", "ntk_eigs"]

_SDPA_HINT = ("forward-mode AD (torch.func.jvp) is not implemented for an op of this model: {err}\n"
              "Linearized models and ntk_vp/ntk_eigs need J(x)·v.  PyTorch's CPU SDPA attention kernel has no "
              "forward-mode (nor double-backward) rule: load a transformers model with "
              "attn_implementation=\"eager\" (e.g. AutoModel.from_pretrained(..., attn_implementation=\"eager\")).")


def _jvp(f: Callable, primals: Dict[str, Tensor], tangents: Dict[str, Tensor]):
    """torch.func.jvp(f, (primals,), (tangents,)) with a clear error where an op lacks a forward-mode rule."""
    try:
        return torch.func.jvp(f, (primals,), (tangents,))
    except (NotImplementedError, RuntimeError) as e:
        msg = str(e)
        if "forward AD" in msg or "forward-mode" in msg or "forward mode" in msg or "jvp" in msg.lower():
            raise RuntimeError(_SDPA_HINT.format(err=msg.splitlines()[0])) from e
        raise


def _state(model: nn.Module, sel: Mapping[str, Tensor]):
    """functional_call state: every parameter detached (the model is frozen), ``sel`` in place of the selected
    ones, the buffers as they are."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update(sel)
    return params, dict(model.named_buffers())


def _fcall(model: nn.Module, state, x: Inputs):
    if isinstance(x, Tensor):
        return torch.func.functional_call(model, state, (x,))
    return torch.func.functional_call(model, state, (), dict(x))


def _extract(out, output_fn: Optional[Callable]) -> Tensor:
    """output_fn(out), or the output itself / its ``.logits`` (any shape)."""
    if output_fn is not None:
        f = output_fn(out)
        if not isinstance(f, Tensor):
            raise ValueError(f"output_fn must return a Tensor, got {type(f).__name__}")
        return f
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    raise ValueError(f"output_fn is None and the model returned {type(out).__name__}, neither a Tensor nor an "
                     f"object with .logits: pass output_fn mapping the output to a tensor")


def _key(name: str) -> str:  # nn.Module attribute names cannot hold "."
    return name.replace(".", "__")


# ----------------------------------------------------------------------------------------------
# linearize
# ----------------------------------------------------------------------------------------------
class LinearizedModel(nn.Module):
    """f_lin(x; θ) = f(x; θ₀) + J(x)(θ − θ₀) of a frozen model; θ (``self.theta``) are the trainable parameters.

    Made by ``linearize``.  The wrapped model is held by reference, not registered as a submodule: its
    parameters are never trained (nor given .grad) and are not in this module's parameters() / state_dict(),
    which hold θ (``theta``) and θ₀ (``theta0``, buffers).  Move or cast the model itself together with this
    module (``.to`` here moves θ and θ₀ only).  f_lin uses the model in its current train/eval mode: call
    ``model.eval()`` first if it has dropout.
    """

    def __init__(self, model: nn.Module, params: ParamsSpec = None, output_fn: Optional[Callable] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable or None, got {type(output_fn).__name__}")
        chosen = select_params(model, params)
        self.names: List[str] = [n for n, _ in chosen]
        keys = [_key(n) for n in self.names]
        if len(set(keys)) != len(keys):
            raise ValueError(f"params: parameter names collide once '.' is replaced by '__': {self.names}")
        object.__setattr__(self, "model", model)  # not a submodule: frozen, outside parameters()/state_dict()
        self.output_fn = output_fn
        self.theta = nn.ParameterDict({k: nn.Parameter(p.detach().clone()) for k, (_, p) in zip(keys, chosen)})
        self.theta0 = nn.Module()
        for k, (_, p) in zip(keys, chosen):
            self.theta0.register_buffer(k, p.detach().clone())

    # θ and θ₀ keyed by the model's parameter names
    def params(self) -> Dict[str, nn.Parameter]:
        return {n: self.theta[_key(n)] for n in self.names}

    def params0(self) -> Dict[str, Tensor]:
        return {n: getattr(self.theta0, _key(n)) for n in self.names}

    def forward(self, *args, **kwargs):
        model, output_fn = self.model, self.output_fn
        theta0 = self.params0()
        tangent = {n: p - theta0[n] for n, p in self.params().items()}  # differentiable in θ

        def f(sel):
            return _extract(torch.func.functional_call(model, _state(model, sel), args, kwargs), output_fn)

        f0, jv = _jvp(f, theta0, tangent)
        return f0 + jv

    def l2_to_init(self) -> Tensor:
        """‖θ − θ₀‖² summed over the selected parameters (differentiable in θ)."""
        theta0 = self.params0()
        return sum(((p - theta0[n]) ** 2).sum() for n, p in self.params().items())

    def delta(self) -> Dict[str, Tensor]:
        """{name: θ − θ₀} (detached)."""
        theta0 = self.params0()
        return {n: (p - theta0[n]).detach() for n, p in self.params().items()}

    def merged_state_dict(self) -> Dict[str, Tensor]:
        """The wrapped model's state_dict with the selected parameters (and every name tied to them) replaced by
        the current θ: load it into the model to get f(x; θ) (the nonlinear model, not f_lin)."""
        sd = self.model.state_dict()
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        theta = self.params()
        for alias, p in self.model.named_parameters(remove_duplicate=False):
            name = by_id[id(p)]
            if name in theta and alias in sd:
                sd[alias] = theta[name].detach().clone().to(sd[alias].dtype)
        return sd

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.theta.values())
        return f"model={type(self.model).__name__}, params={len(self.names)} tensors ({n} numbers)"


def linearize(model: nn.Module, params: ParamsSpec = None, output_fn: Optional[Callable] = None) -> LinearizedModel:
    """The linearized model f_lin(x; θ) = f(x; θ₀) + J(x)(θ − θ₀) around the model's current parameters θ₀.

    params     which parameters are θ: None (every parameter with requires_grad), a list of names, a regex
               (re.search on the name) or a predicate (name, param) -> bool; the others stay at their values.
    output_fn  model output -> tensor; default the output itself or its ``.logits``.
    The result is an nn.Module: forward(*args, **kwargs) takes the model's arguments and returns f_lin (the
    shape of output_fn(model output)); its parameters() are θ (copies of θ₀, the model is not modified);
    ``.l2_to_init()`` ‖θ − θ₀‖², ``.delta()`` {name: θ − θ₀}, ``.merged_state_dict()`` θ exported into the
    model's state_dict.  Forward mode AD: models with SDPA attention on CPU raise an error asking for
    attn_implementation="eager"."""
    return LinearizedModel(model, params, output_fn)


# ----------------------------------------------------------------------------------------------
# ntk_vp
# ----------------------------------------------------------------------------------------------
class _VP:
    """K v for fixed (model, inputs1, inputs2, params, output_fn): the operator ntk_eigs iterates."""

    def __init__(self, model, inputs1, inputs2, params, output_fn, block_size):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_args(inputs1, inputs2, "full", "sgd", "auto", block_size, torch.float64)
        self.model, self.x1, self.output_fn = model, inputs1, output_fn
        self.x2 = inputs1 if inputs2 is None else inputs2
        self.n1, self.n2 = _batch(inputs1), _batch(self.x2)
        self.bs = block_size or max(self.n1, self.n2)
        chosen = select_params(model, params)
        self.theta = {n: p.detach() for n, p in chosen}
        self.C: Optional[int] = None

    def _f(self, sel, x, n):
        f = _outputs(_fcall(self.model, _state(self.model, sel), x), self.output_fn, n)
        if self.C is not None and f.shape[1] != self.C:
            raise ValueError(f"output_fn gives {self.C} outputs on one block but {f.shape[1]} on another")
        self.C = f.shape[1]
        return f

    def n_outputs(self) -> int:
        if self.C is None:
            with torch.no_grad():
                self._f(self.theta, _slice(self.x1, 0, 1), 1)
        return self.C

    def __call__(self, v: Tensor, name: str = "v") -> Tensor:
        C = self.n_outputs()
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a Tensor of shape (N2, C) = ({self.n2}, {C}), got {type(v).__name__}")
        if tuple(v.shape) != (self.n2, C):
            raise ValueError(f"{name} must have shape (N2, C) = ({self.n2}, {C}) (N2 samples of inputs2, or of "
                             f"inputs1 when inputs2 is None; C outputs), got {tuple(v.shape)}")
        # u = J₂ᵀ v, one backward per block of inputs2
        u = {n: torch.zeros_like(p) for n, p in self.theta.items()}
        names = list(self.theta)
        with torch.enable_grad():
            for j0 in range(0, self.n2, self.bs):
                j1 = min(self.n2, j0 + self.bs)
                sel = {n: p.detach().requires_grad_(True) for n, p in self.theta.items()}
                f = self._f(sel, _slice(self.x2, j0, j1), j1 - j0)
                gs = torch.autograd.grad(f, [sel[n] for n in names], v[j0:j1].to(f.dtype), allow_unused=True)
                for n, g in zip(names, gs):
                    if g is not None:
                        u[n] += g
        # K v = J₁ u, one forward-mode pass per block of inputs1
        out = []
        with torch.no_grad():
            for i0 in range(0, self.n1, self.bs):
                i1 = min(self.n1, i0 + self.bs)
                xb = _slice(self.x1, i0, i1)
                _, jv = _jvp(lambda sel: self._f(sel, xb, i1 - i0), self.theta, u)
                out.append(jv)
        return torch.cat(out, 0)


def ntk_vp(model: nn.Module, inputs1: Inputs, v: Tensor, inputs2: Optional[Inputs] = None, *,
           params: ParamsSpec = None, output_fn: Optional[Callable] = None, block_size: Optional[int] = 64) -> Tensor:
    """K v without forming K: (K v)[i, c] = Σ_j Σ_c' K(x_i, x'_j)_{cc'} v[j, c'], shape (N1, C).

    v          (N2, C): N2 samples of inputs2 (inputs1 when inputs2 is None), C outputs.
    inputs1/2, params, output_fn as in ``empirical_ntk`` (inputs a Tensor or a mapping of tensors batched on
    dim 0; output_fn -> (N, C)).  block_size: samples per forward (None: all at once).
    Cost: one forward + backward over inputs2 (u = J₂ᵀ v via torch.autograd.grad) and one forward-mode pass
    over inputs1 (J₁ u via torch.func.jvp); memory O(block · activations + P).  SDPA attention on CPU has no
    forward-mode rule: load such models with attn_implementation="eager"."""
    return _VP(model, inputs1, inputs2, params, output_fn, block_size)(v)


# ----------------------------------------------------------------------------------------------
# ntk_eigs
# ----------------------------------------------------------------------------------------------
def _lanczos(matvec: Callable[[Tensor], Tensor], n: int, k: int, which: str, tol: float, max_iter: int,
             dtype: torch.dtype, device, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Lanczos with full reorthogonalisation (Gram–Schmidt twice) on the symmetric n x n operator, grown until
    the k wanted Ritz pairs have residual |β_m s_m| <= tol · max|θ| or the Krylov space is all of R^n (then exact).
    A breakdown (invariant subspace) continues from a fresh random vector orthogonal to the basis."""
    Q = torch.empty(n, min(n, max_iter), dtype=dtype, device=device)
    alphas, betas = [], []

    def fresh(m):
        q = torch.randn(n, dtype=dtype, generator=generator).to(device)
        for _ in range(2):
            if m:
                q = q - Q[:, :m] @ (Q[:, :m].T @ q)
        return q / q.norm()

    Q[:, 0] = fresh(0)
    m, beta = 0, 0.0
    while True:
        w = matvec(Q[:, m])
        alphas.append(float(Q[:, m] @ w))
        for _ in range(2):
            w = w - Q[:, :m + 1] @ (Q[:, :m + 1].T @ w)
        beta = float(w.norm())
        m += 1
        done = m >= Q.shape[1]
        if m >= k and (done or m % 4 == 0 or m == k):
            T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if m > 1:
                off = torch.tensor(betas, dtype=torch.float64)
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
            theta, S = torch.linalg.eigh(T)
            idx = torch.arange(m - 1, m - 1 - k, -1) if which == "LA" else torch.arange(k)
            res = (beta * S[-1, idx]).abs()
            scale = max(theta.abs().max().item(), torch.finfo(dtype).tiny)
            if done or bool((res <= tol * scale).all()):
                vecs = Q[:, :m] @ S[:, idx].to(dtype)
                return theta[idx].to(dtype), vecs
        if beta <= 1e3 * torch.finfo(dtype).eps * max(abs(a) for a in alphas):  # invariant subspace
            betas.append(0.0)
            Q[:, m] = fresh(m)
        else:
            betas.append(beta)
            Q[:, m] = w / beta


def ntk_eigs(model: nn.Module, inputs: Inputs, k: int = 6, *, which: str = "LA", params: ParamsSpec = None,
             output_fn: Optional[Callable] = None, block_size: Optional[int] = 64, tol: float = 1e-8,
             max_iter: Optional[int] = None, solver: str = "auto", ncv: Optional[int] = None,
             seed: int = 0) -> Tuple[Tensor, Tensor]:
    """The k largest ("LA") or smallest ("SA") eigenpairs of the (N·C) x (N·C) empirical NTK of ``inputs``,
    matrix-free (each iteration is one ``ntk_vp``: a backward and a forward-mode pass over the inputs).

    Returns (eigenvalues (k,), eigenvectors (N, C, k)), the kernel flattened sample-major (index i·C + c, as
    empirical_ntk(mode="full").permute(0, 2, 1, 3).reshape(N·C, N·C)); "LA" in descending order, "SA" in
    ascending order; eigenvectors of unit norm, the sign fixed so that the largest |component| is positive.
    tol        relative accuracy (scipy's eigsh tol; for the torch Lanczos, Ritz residual <= tol · |λ|max).
    max_iter   scipy: restarts (default its own, n·10); torch Lanczos: the largest Krylov dimension (default N·C).
    solver     "auto": for "LA" scipy.sparse.linalg.eigsh (implicitly restarted Lanczos, memory N·C·ncv) when
               scipy imports and k < N·C, else the torch Lanczos; for "SA" the torch Lanczos.  "scipy" or
               "lanczos" force one.  The small end of an NTK spectrum is dense and clustered (condition numbers
               of 10⁵ and more even at N·C = 60), where a restarted Lanczos with scipy's default ncv = 2k+1 may
               not converge: the torch Lanczos never restarts (its basis grows up to max_iter vectors of N·C,
               exact at N·C), or pass a larger ``ncv`` to eigsh.
    ncv        eigsh's number of Lanczos vectors (default scipy's, max(2k+1, 20)); ignored by the torch Lanczos.
    params, output_fn, block_size as in ``ntk_vp``; ``seed`` the starting vector's."""
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' (largest) or 'SA' (smallest), got {which!r}")
    if solver not in ("auto", "scipy", "lanczos"):
        raise ValueError(f"solver must be 'auto', 'scipy' or 'lanczos', got {solver!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be a positive int or None, got {max_iter!r}")
    _check_inputs("inputs", inputs)
    op = _VP(model, inputs, None, params, output_fn, block_size)
    N, C = op.n1, op.n_outputs()
    n = N * C
    if k > n:
        raise ValueError(f"k={k} is larger than the kernel's size N·C = {N}·{C} = {n}")
    pdtype = next(iter(op.theta.values())).dtype
    dtype = torch.float64 if pdtype == torch.float64 else torch.float32
    device = next(iter(op.theta.values())).device

    def matvec_t(x: Tensor) -> Tensor:
        return op(x.reshape(N, C).to(pdtype)).reshape(-1).to(x.dtype)

    if ncv is not None and (isinstance(ncv, bool) or not isinstance(ncv, int) or not k < ncv <= n):
        raise ValueError(f"ncv must be an int with k < ncv <= N·C = {n}, got {ncv!r}")
    use_scipy = solver == "scipy"
    if solver == "auto" and which == "LA" and k < n:
        try:
            import scipy.sparse.linalg  # noqa: F401
            use_scipy = True
        except ImportError:
            use_scipy = False
    if use_scipy:
        if k >= n:
            raise ValueError(f"k={k} must be smaller than N·C = {n} for solver='scipy' (eigsh); use "
                             f"solver='lanczos'")
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, eigsh

        def mv(x):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)).to(device)
            return matvec_t(x).double().cpu().numpy()

        A = LinearOperator((n, n), matvec=mv, dtype=np.float64)
        v0 = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).numpy()
        vals, vecs = eigsh(A, k=k, which=which, tol=tol, maxiter=max_iter, v0=v0, ncv=ncv)
        vals, vecs = torch.from_numpy(vals), torch.from_numpy(vecs)
    else:
        g = torch.Generator().manual_seed(seed)
        vals, vecs = _lanczos(matvec_t, n, k, which, tol, max_iter or n, torch.float64, device, g)
    order = torch.argsort(vals, descending=(which == "LA"))
    vals, vecs = vals[order], vecs[:, order]
    vecs = vecs / vecs.norm(dim=0, keepdim=True)
    pick = vecs.abs().argmax(0)
    vecs = vecs * torch.sign(vecs[pick, torch.arange(vecs.shape[1])])
    return vals.to(dtype=dtype, device=device), vecs.reshape(N, C, k).to(dtype=dtype, device=device)
