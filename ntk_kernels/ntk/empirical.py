"""Empirical NTK of a PyTorch model, exact, blocked over samples, without the N x C x P Jacobian.

    K(x, x')_{cc'} = Σ_p ∂f_c(x)/∂θ_p · ∂f_{c'}(x')/∂θ_p        over the selected parameters θ.

For an nn.Linear z = A Wᵀ + b used at T positions (A_i (T, d_in), output gradients G_{i,c} = ∂f_c(x_i)/∂z_i
(T, d_out)), ∂f_{i,c}/∂W = G_{i,c}ᵀ A_i and ∂f_{i,c}/∂b = Σ_t G_{i,c,t}, so per layer either

  gram         ⟨∂f_{i,c}/∂W, ∂f_{j,c'}/∂W⟩ = Σ_{t,s} (A_i A_jᵀ)_{ts} (G_{i,c} G_{j,c'}ᵀ)_{ts}   T²(d_in+d_out) a pair
  materialize  the per-sample gradients G_{i,c}ᵀ A_i (d_out·d_in) and their dot products           d_in·d_out a pair

(the bias always as ⟨Σ_t G_{i,c,t}, Σ_s G_{j,c',s}⟩); strategy="auto" picks the cheaper per layer.  transformers'
Conv1D (GPT-2, weight (d_in, d_out), y = x W + b) is the same map transposed: the same features give the same
dot products.  An nn.Embedding is a Linear on one-hot rows: A_i A_jᵀ becomes the token-equality mask
1[id_t = id'_s] (padding positions masked out), or the per-sample gradient is a scatter-add of G over the ids.

One forward per block of samples, with forward hooks keeping each fast-path module's input A and output z;
the gradients of all C outputs with respect to every z come from one ``torch.autograd.grad(...,
is_grads_batched=True)`` over the C one-hot cotangents.  Every other selected parameter (LayerNorm, Conv2d,
a weight tied across modules, a fast-path module called on a tensor not batched on dim 0, ...) gets the exact
fallback: its per-sample Jacobian (n, C, P_rest) from torch.func (vmap of jacrev over the block's samples,
or a loop over them where vmap fails on data-dependent control flow), contracted into the same tile.  The
parameters are split, never counted twice.  A row block's features are computed once and reused across its
column blocks; inputs2=None computes the upper-triangle tiles only and mirrors them.  Inputs are a Tensor
(the model's argument) or a mapping of tensors (its keyword arguments, e.g. input_ids, attention_mask).

What this covers of issue 3, and what comes later:
  here   exact eNTK of any model: fast paths for nn.Linear / Conv1D weights and biases (any leading dims, a
         module used several times sums its uses) and nn.Embedding weights, the torch.func fallback for the
         rest; Tensor or mapping inputs; modes full / trace / diagonal; kernel "sgd"; strategies auto / gram /
         materialize / jacobian (the torch.func reference ``empirical_ntk_reference``); plain PyTorch only.
  later  fast paths for LayerNorm / RMSNorm and Conv2d (they take the fallback now), the sign kernels
         "signgd" / "asymmetric_signgd", ``per_sample_grads``, ``memory_budget`` and a default block size that
         fits free memory, ``progress``, the registered ops (``ntk_kernels.ops``) with C++ / Triton / CUDA
         kernels for the Gram contractions, benchmarks of the new paths.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

MODES = ("full", "trace", "diagonal")
KERNELS = ("sgd", "signgd", "asymmetric_signgd")
STRATEGIES = ("auto", "gram", "materialize", "jacobian")
DEFAULT_BLOCK_SIZE = 64

ParamsSpec = Union[None, str, Sequence[str], Callable[[str, nn.Parameter], bool]]


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the engine and the reference
# ----------------------------------------------------------------------------------------------
Inputs = Union[Tensor, Mapping[str, Tensor]]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batch(x: Inputs) -> int:
    return x.shape[0] if isinstance(x, Tensor) else next(iter(x.values())).shape[0]


def _slice(x: Inputs, i0: int, i1: int) -> Inputs:
    return x[i0:i1] if isinstance(x, Tensor) else {k: v[i0:i1] for k, v in x.items()}


def _unsqueeze(x: Inputs) -> Inputs:
    return x.unsqueeze(0) if isinstance(x, Tensor) else {k: v.unsqueeze(0) for k, v in x.items()}


def _call(model: Callable, x: Inputs):
    """A Tensor is the model's one positional argument, a mapping its keyword arguments."""
    return model(x) if isinstance(x, Tensor) else model(**x)


def _device(x: Inputs) -> torch.device:
    return x.device if isinstance(x, Tensor) else next(iter(x.values())).device


def select_params(model: nn.Module, params: ParamsSpec) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) pairs chosen by ``params``: None = every parameter with requires_grad, a list of
    names, a regex (``re.search`` on the name) or a predicate (name, param) -> bool."""
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif isinstance(params, str):
        rx = re.compile(params)
        chosen = [(n, p) for n, p in named if rx.search(n)]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    elif isinstance(params, (list, tuple, set)):
        wanted = list(params)
        known = dict(named)
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ValueError(f"params: no parameter named {missing} in the model (it has {list(known)})")
        chosen = [(n, p) for n, p in named if n in set(wanted)]
    else:
        raise TypeError(f"params must be None, a regex string, a list of names or a predicate "
                        f"(name, param) -> bool, got {type(params).__name__}")
    if not chosen:
        raise ValueError(f"params={params!r} matches no parameter of the model")
    return chosen


def _check_inputs(name: str, x) -> None:
    if isinstance(x, Tensor):
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must be batched on dim 0 with at least one sample, got shape "
                             f"{tuple(x.shape)}")
        return
    if not isinstance(x, Mapping):
        raise TypeError(f"{name} must be a Tensor or a mapping of tensors batched on dim 0, got "
                        f"{type(x).__name__}")
    if not x:
        raise ValueError(f"{name} is an empty mapping; expected tensors batched on dim 0")
    batches = {}
    for k, v in x.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(f"{name} must map str keys to Tensors, got {k!r}: {type(v).__name__}")
        if v.ndim < 1 or v.shape[0] == 0:
            raise ValueError(f"{name}[{k!r}] must be batched on dim 0 with at least one sample, got shape "
                             f"{tuple(v.shape)}")
        batches[k] = v.shape[0]
    if len(set(batches.values())) != 1:
        raise ValueError(f"{name}: every tensor must have the same batch size on dim 0, got {batches}")


def _check_args(inputs1, inputs2, mode, kernel, strategy, block_size, dtype):
    _check_inputs("inputs1", inputs1)
    if inputs2 is not None:
        _check_inputs("inputs2", inputs2)
        if isinstance(inputs1, Tensor) != isinstance(inputs2, Tensor):
            raise ValueError(f"inputs2 must be of the same kind as inputs1 (a Tensor or a mapping), got "
                             f"{type(inputs2).__name__} and {type(inputs1).__name__}")
        if isinstance(inputs1, Tensor):
            pairs = [("inputs2", inputs2, inputs1)]
        else:
            if set(inputs2) != set(inputs1):
                raise ValueError(f"inputs2 has keys {sorted(inputs2)}, expected those of inputs1 "
                                 f"{sorted(inputs1)}")
            pairs = [(f"inputs2[{k!r}]", inputs2[k], inputs1[k]) for k in inputs1]
        for name, b, a in pairs:
            if b.shape[1:] != a.shape[1:]:
                raise ValueError(f"{name} has per-sample shape {tuple(b.shape[1:])}, expected that of inputs1 "
                                 f"{tuple(a.shape[1:])}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def _outputs(out, output_fn: Optional[Callable], n: int) -> Tensor:
    """The (n, C) outputs f from the model's output: output_fn(out), or out / out.logits by default."""
    if output_fn is not None:
        f = output_fn(out)
    elif isinstance(out, Tensor):
        f = out
    elif isinstance(getattr(out, "logits", None), Tensor):
        f = out.logits
    else:
        raise ValueError(f"output_fn is None and the model returned {type(out).__name__}, neither a Tensor nor "
                         f"an object with .logits: pass output_fn mapping the output to an (N, C) tensor")
    if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] != n:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"output_fn must give an (N, C) = ({n}, C) tensor, got {shape}"
                         + ("" if output_fn is not None else " from the model's output (pass output_fn)"))
    return f


def _contract(X: Tensor, Y: Tensor, mode: str) -> Tensor:
    """Per-sample Jacobians X (I, C, P), Y (J, C, P) -> the (I, J[, C[, C]]) tile of the kernel."""
    if mode == "full":
        return torch.einsum("icp,jep->ijce", X, Y)
    if mode == "diagonal":
        return torch.einsum("icp,jcp->ijc", X, Y)
    return torch.einsum("icp,jcp->ij", X, Y)


def _mirror(tile: Tensor, mode: str) -> Tensor:
    """K(x_j, x_i) from K(x_i, x_j): swap the samples (and the outputs in full mode)."""
    return tile.permute(1, 0, 3, 2) if mode == "full" else tile.transpose(0, 1)


def _empty_kernel(n1, n2, c, mode, dtype, device):
    shape = {"full": (n1, n2, c, c), "diagonal": (n1, n2, c), "trace": (n1, n2)}[mode]
    return torch.zeros(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Exact per-sample Jacobians through torch.func: the reference, and the engine's fallback
# ----------------------------------------------------------------------------------------------
def per_sample_jacobian(model: nn.Module, x: Inputs, chosen: Sequence[Tuple[str, nn.Parameter]],
                        output_fn: Optional[Callable], ct: torch.dtype) -> Tensor:
    """J (n, C, P) with J[i, c] = ∂f_c(x_i)/∂θ flattened over the ``chosen`` parameters (in their order).

    torch.func.vmap over the samples of jacrev(f) on one sample (f: functional_call of ``model``, the other
    parameters held fixed).  vmap fails on models that branch on data (e.g. transformers' attention-mask
    handling): then the samples are looped over, jacrev on each one (the same values, slower)."""
    names = [n for n, _ in chosen]
    base = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    sel = {n: p.detach() for n, p in chosen}

    def f(sel: Dict[str, Tensor], xi: Inputs) -> Tensor:  # xi: a batch of one sample
        state = ({**base, **sel}, buffers)
        if isinstance(xi, Tensor):
            out = torch.func.functional_call(model, state, (xi,))
        else:
            out = torch.func.functional_call(model, state, (), dict(xi))
        return _outputs(out, output_fn, 1)[0]

    n = _batch(x)
    try:
        J = torch.func.vmap(torch.func.jacrev(lambda s, xi: f(s, _unsqueeze(xi))), in_dims=(None, 0))(sel, x)
        J = [J[k].reshape(n, J[k].shape[1], -1) for k in names]
    except Exception:  # data-dependent control flow under vmap: one sample at a time
        rows = []
        for i in range(n):
            Ji = torch.func.jacrev(f)(sel, _slice(x, i, i + 1))
            rows.append(torch.cat([Ji[k].reshape(Ji[k].shape[0], -1) for k in names], -1))
        return torch.stack(rows).to(ct)
    return torch.cat(J, dim=-1).to(ct)


def empirical_ntk_reference(model: nn.Module, inputs1: Inputs, inputs2: Optional[Inputs] = None, *,
                            params: ParamsSpec = None, mode: str = "full", kernel: str = "sgd",
                            output_fn: Optional[Callable] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The eNTK the plain way: J = vmap(jacrev(f)) per sample, (N, C, P), then K = J₁ J₂ᵀ contracted per
    ``mode`` ("full" (N1, N2, C, C), "trace" (N1, N2), "diagonal" (N1, N2, C)).  ``kernel``: "sgd" J₁ J₂ᵀ,
    "signgd" sign(J₁) sign(J₂)ᵀ, "asymmetric_signgd" J₁ sign(J₂)ᵀ (the sign side is inputs2).  Any parameter
    type works; inputs a Tensor or a mapping of tensors (keyword arguments).  Where vmap fails (data-dependent
    control flow) it loops over the samples.  Memory O(N·C·P): the test oracle and strategy="jacobian"."""
    _check_args(inputs1, inputs2, mode, kernel, "jacobian", None, dtype)
    chosen = select_params(model, params)
    ct = _compute_dtype(dtype)
    J1 = per_sample_jacobian(model, inputs1, chosen, output_fn, ct)
    J2 = J1 if inputs2 is None else per_sample_jacobian(model, inputs2, chosen, output_fn, ct)
    if kernel != "sgd":
        J2 = J2.sign()
        if kernel == "signgd":
            J1 = J1.sign()
    return _contract(J1, J2, mode).to(dtype)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
FALLBACK = "torch.func"  # the features' key of the parameters without a fast path


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): weight (d_in, d_out), y = x W + b; found by name, no import needed."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor)


def _fast_kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Linear) or _is_conv1d(m):
        return "linear"
    if isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq:
        return "embedding"
    return None


class _Sites:
    """Forward hooks on the fast-path modules keeping every call's input (A, or token ids) and output z."""

    def __init__(self, layers: Dict[nn.Module, Tuple[bool, bool]]):
        self.layers = layers  # module -> (weight selected, bias selected)
        self.calls: Dict[nn.Module, List[Tuple[Tensor, Tensor]]] = {m: [] for m in layers}
        self.handles = []

    def __enter__(self):
        for m in self.layers:
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def _hook(self, module, args, output):
        self.calls[module].append((args[0].detach(), output))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class _NoFastPath(Exception):
    """A fast-path module was called on a tensor not batched like the samples (e.g. BERT's position
    embeddings on (1, T) ids), or its parameter is also used outside its module's calls (e.g. an embedding
    matrix reused through F.linear), so the hooks do not see all of its gradient: its parameters move to the
    torch.func fallback."""

    def __init__(self, module):
        super().__init__(type(module).__name__)
        self.module = module


def _split_params(model: nn.Module, chosen, exclude=()) -> Tuple[Dict[nn.Module, Tuple[bool, bool]], list]:
    """Fast-path modules -> (weight selected, bias selected), and the (name, param) list of the rest.

    A parameter held by several modules (tied weights) goes to the fallback, which sums all its uses."""
    owners: Dict[int, List[Tuple[nn.Module, int]]] = {}
    for m in model.modules():
        for k, p in enumerate((getattr(m, "weight", None), getattr(m, "bias", None))):
            if isinstance(p, nn.Parameter):
                owners.setdefault(id(p), []).append((m, k))
    for m in model.modules():  # count holders of any kind, not only fast-path ones
        for _, p in m.named_parameters(recurse=False):
            holders = owners.setdefault(id(p), [])
            if not any(h is m for h, _ in holders):
                holders.append((m, -1))
    layers: Dict[nn.Module, List[bool]] = {}
    rest = []
    for name, p in chosen:
        held = owners.get(id(p), [])
        if len(held) == 1 and held[0][1] >= 0 and _fast_kind(held[0][0]) and held[0][0] not in exclude:
            m, k = held[0]
            layers.setdefault(m, [False, False])[k] = True
        else:
            rest.append((name, p))
    return {m: tuple(v) for m, v in layers.items()}, rest


def _use_gram(T: int, d_in: int, d_out: int, strategy: str) -> bool:
    """Gram costs T²(d_in + d_out) per pair, materialised gradients d_in·d_out per pair."""
    if strategy == "gram":
        return True
    if strategy == "materialize":
        return False
    return T * T * (d_in + d_out) <= d_in * d_out


def _block_features(model, x, layers, fallback, output_fn, strategy, ct, check=False):
    """Features of one block x (n samples), per fast-path module:
      ("gram", A (n, T, d_in), G (n, C, T, d_out), Gsum (n, C, d_out) or None when the bias is not selected),
      ("tok", ids (n, T), G (n, C, T, d), None) for an nn.Embedding (A_i A_jᵀ = 1[id_t = id'_s]),
      ("mat", J (n, C, P_layer));
    and under FALLBACK ("mat", J (n, C, P_rest)) from torch.func for the other parameters; and C.

    check: also take autograd's gradients of Σ_i f_c(x_i) for the fast-path parameters and compare them with
    those the hooks' features give; a module where they differ raises _NoFastPath (the first block only)."""
    n = _batch(x)
    params = [p for m, (w, b) in layers.items()
              for p, sel in ((m.weight, w), (getattr(m, "bias", None), b)) if sel]
    params += [p for _, p in fallback]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:  # a selected frozen parameter still needs a graph through its layer
            p.requires_grad_(True)
        with torch.enable_grad():
            return _features(model, x, n, layers, fallback, output_fn, strategy, ct, check)
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)


def _features(model, x, n, layers, fallback, output_fn, strategy, ct, check):
    with _Sites(layers) as sites:
        f = _outputs(_call(model, x), output_fn, n)
    C = f.shape[1]
    used = [m for m in layers if sites.calls[m]]
    if not f.requires_grad or not (used or fallback):
        raise ValueError("params: the model's output does not depend on the selected parameters")
    zs = []
    for m in used:
        for a, z in sites.calls[m]:
            if z.shape[0] != n or a.shape[0] != n:
                raise _NoFastPath(m)
            zs.append(z)
    feats = {}
    if used:
        cot = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, n, C)
        actual: Dict[nn.Module, Dict[str, Optional[Tensor]]] = {}
        if check:  # one random combination r of the outputs: ∂(Σ_i r_i·f(x_i))/∂θ, 1/C of the batched cost
            gen = torch.Generator(device=f.device).manual_seed(0)
            r = torch.randn(f.shape, generator=gen, dtype=f.dtype, device=f.device)
            owned = [(m, p) for m in used
                     for p, sel in zip((m.weight, getattr(m, "bias", None)), layers[m]) if sel]
            pg = torch.autograd.grad(f, [p for _, p in owned], r, retain_graph=True, allow_unused=True)
            for (m, p), g in zip(owned, pg):
                actual.setdefault(m, {})["w" if p is m.weight else "b"] = None if g is None else g[None]
        grads = torch.autograd.grad(f, zs, cot, is_grads_batched=True, allow_unused=True)
        if all(g is None for g in grads) and not fallback:
            raise ValueError("params: the model's output does not depend on the selected parameters")
        k = 0
        for m in used:
            As, Gs = [], []
            for a, z in sites.calls[m]:
                g = grads[k] if grads[k] is not None else torch.zeros((C, *z.shape), dtype=z.dtype,
                                                                      device=z.device)
                k += 1
                As.append(a.reshape(n, -1) if isinstance(m, nn.Embedding) else a.reshape(n, -1, a.shape[-1]))
                Gs.append(g.reshape(C, n, -1, g.shape[-1]).transpose(0, 1))
            G = torch.cat(Gs, 2).to(ct)  # several calls of one module: their positions concatenated along T
            w_sel, b_sel = layers[m]
            if isinstance(m, nn.Embedding):
                ids = torch.cat(As, 1)
                if m.padding_idx is not None:  # the padding row gets no gradient
                    G = G * (ids != m.padding_idx)[:, None, :, None].to(ct)
                if check and not _check_hooks(m, ids, _combine(G, r, ct), actual[m], f.dtype):
                    raise _NoFastPath(m)
                T, V, d = ids.shape[1], m.num_embeddings, G.shape[3]
                if strategy == "gram" or (strategy == "auto" and T * T * (d + 1) <= V * d):
                    feats[m] = ("tok", ids, G, None)
                else:  # the per-sample gradient: scatter-add G over the token ids, (n, C, V, d)
                    J = torch.zeros(n, C, V, d, dtype=ct, device=G.device)
                    J.index_put_((torch.arange(n, device=G.device)[:, None, None],
                                  torch.arange(C, device=G.device)[None, :, None], ids[:, None, :]),
                                 G, accumulate=True)
                    feats[m] = ("mat", J.reshape(n, C, V * d))
                continue
            A = torch.cat(As, 1).to(ct)
            if check and not _check_hooks(m, A, _combine(G, r, ct), actual[m], f.dtype):
                raise _NoFastPath(m)
            Gsum = G.sum(2) if b_sel else None
            if w_sel and _use_gram(A.shape[1], A.shape[2], G.shape[3], strategy):
                feats[m] = ("gram", A, G, Gsum)
            else:
                parts = [torch.einsum("ictk,itd->ickd", G, A).reshape(n, C, -1)] if w_sel else []
                feats[m] = ("mat", torch.cat(parts + ([Gsum] if b_sel else []), -1))
    if fallback:
        feats[FALLBACK] = ("mat", per_sample_jacobian(model, x, fallback, output_fn, ct))
    return feats, C


def _combine(G: Tensor, r: Tensor, ct: torch.dtype) -> Tensor:
    """Σ_c r_{i,c} G_{i,c}: G (n, C, T, d), r (n, C) -> (n, 1, T, d)."""
    return torch.einsum("ictk,ic->itk", G, r.to(ct)).unsqueeze(1)


def _check_hooks(m, A, G, actual, dtype):
    """Σ_i ∂f_c(x_i)/∂W (and /∂b) rebuilt from the hooked inputs A (or token ids) and output gradients G
    (n, C, T, d_out) against autograd's ``actual`` {"w": (C, *W.shape), "b": (C, d_out)} (called with C = 1, one
    random combination of the outputs); False where they differ
    beyond rounding, i.e. by more than 10·sqrt(eps) times the same sums taken over |A|, |G| (then the
    parameter is also used outside the module's calls)."""
    C = G.shape[1]

    def weight_grad(A, G):
        if isinstance(m, nn.Embedding):
            W = torch.zeros(C, m.num_embeddings, G.shape[3], dtype=G.dtype, device=G.device)
            return W.index_add_(1, A.reshape(-1), G.transpose(0, 1).reshape(C, -1, G.shape[3]))
        GA = torch.matmul(G.permute(1, 3, 0, 2).reshape(C, G.shape[3], -1), A.reshape(-1, A.shape[-1]))
        return GA if isinstance(m, nn.Linear) else GA.transpose(1, 2)  # Conv1D: weight (d_in, d_out)

    pairs = {}
    if "w" in actual:
        absA = A if isinstance(m, nn.Embedding) else A.abs()
        pairs["w"] = (weight_grad(A, G), weight_grad(absA, G.abs()))
    if "b" in actual:
        pairs["b"] = (G.sum((0, 2)), G.abs().sum((0, 2)))
    tol = 10 * torch.finfo(dtype).eps ** 0.5
    for k, (r, bound) in pairs.items():
        g = actual[k]
        g = torch.zeros_like(r) if g is None else g.to(r.dtype)
        if ((r - g).abs() > tol * bound + torch.finfo(dtype).tiny).any():
            return False
    return True


def _gram_tile(AA, G1, G2, mode):
    """Σ_{t,s} AA_{ijts} (G_{i,c} G_{j,c'}ᵀ)_{ts}: AA (I, J, T, S) = A_i A_jᵀ, G (n, C, T, d_out)."""
    if mode == "full":
        return torch.einsum("ijts,ijcets->ijce", AA, torch.einsum("ictk,jesk->ijcets", G1, G2))
    if mode == "diagonal":
        return torch.einsum("ijts,ijcts->ijc", AA, torch.einsum("ictk,jcsk->ijcts", G1, G2))
    return (AA * torch.einsum("ictk,jcsk->ijts", G1, G2)).sum((-2, -1))


def _tile(f1, f2, mode):
    tile = 0
    for m, a in f1.items():
        b = f2.get(m)
        if b is None:  # the layer was not reached by this block (cannot happen for same-shaped inputs)
            continue
        if a[0] == "mat":
            tile = tile + _contract(a[1], b[1], mode)
            continue
        _, A1, G1, S1 = a
        _, A2, G2, S2 = b
        if a[0] == "tok":
            AA = (A1[:, None, :, None] == A2[None, :, None, :]).to(G1.dtype)
        else:
            AA = torch.einsum("itd,jsd->ijts", A1, A2)
        tile = tile + _gram_tile(AA, G1, G2, mode)
        if S1 is not None:
            tile = tile + _contract(S1, S2, mode)
    return tile


def empirical_ntk(model: nn.Module, inputs1: Inputs, inputs2: Optional[Inputs] = None, *,
                  params: ParamsSpec = None, mode: str = "full", kernel: str = "sgd",
                  output_fn: Optional[Callable] = None, block_size: Optional[int] = None,
                  strategy: str = "auto", dtype: torch.dtype = torch.float32) -> Tensor:
    """The empirical NTK K(x, x')_{cc'} = Σ_p ∂f_c(x)/∂θ_p ∂f_{c'}(x')/∂θ_p of ``model``, exactly.

    model      an nn.Module; call ``model.eval()`` first if it has dropout (one forward per block).
    inputs1    Tensor (N1, ...) batched on dim 0, the model's one argument; or a mapping of such tensors
               (e.g. input_ids, attention_mask), the model's keyword arguments.  inputs2: the same kind, the
               same keys and per-sample shapes, or None for inputs1 (then only tiles j >= i are computed and
               the result is exactly symmetric).
    params     None (every parameter with requires_grad), a list of names, a regex (re.search on the name) or
               a predicate (name, param) -> bool.  Any parameter: nn.Linear / transformers Conv1D weights and
               biases and nn.Embedding weights take the fast path (Gram trick or materialised per-sample
               gradients); every other parameter (LayerNorm, Conv2d, tied weights, a fast-path module called
               on unbatched tensors, ...) the exact fallback: per-sample Jacobians from torch.func (vmap over
               the block's samples of jacrev, or a loop over the samples where vmap fails on data-dependent
               control flow, as with transformers' attention masks: correct, slower), memory O(block·C·P_rest).
               On the first block the hooks' gradients of Σ_i f_c(x_i) are checked against autograd's: a
               fast-path parameter also used outside its module's calls (e.g. F.linear(h, emb.weight)) moves to
               the fallback, as does a module called on a tensor not batched on dim 0.
    mode       "full" -> (N1, N2, C, C); "trace" -> (N1, N2) = Σ_c K_cc (neural-tangents' trace divides by C,
               this one does not); "diagonal" -> (N1, N2, C) = K_cc.
    kernel     "sgd" (the eNTK); "signgd" and "asymmetric_signgd" are not implemented yet.
    output_fn  model output -> (N, C) tensor; default: the output itself or its ``.logits`` (2-D).
    block_size samples per forward (default 64); peak memory is bounded by two blocks' features and one tile.
    strategy   "auto" (per layer the cheaper of gram / materialize), "gram", "materialize", or "jacobian"
               (``empirical_ntk_reference``, torch.func jacrev + vmap).
    dtype      result dtype; accumulation in float64 for float64, float32 otherwise.
    """
    _check_args(inputs1, inputs2, mode, kernel, strategy, block_size, dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if strategy == "jacobian":
        return empirical_ntk_reference(model, inputs1, inputs2, params=params, mode=mode, output_fn=output_fn,
                                       dtype=dtype)
    chosen = select_params(model, params)
    excluded = set()
    while True:
        layers, fallback = _split_params(model, chosen, excluded)
        try:
            return _assemble(model, inputs1, inputs2, layers, fallback, mode, output_fn, block_size, strategy,
                             dtype)
        except _NoFastPath as e:  # found on the first block; retried with that module through torch.func
            excluded.add(e.module)


def _assemble(model, inputs1, inputs2, layers, fallback, mode, output_fn, block_size, strategy, dtype):
    ct = _compute_dtype(dtype)
    bs = block_size or DEFAULT_BLOCK_SIZE
    symmetric = inputs2 is None
    x2 = inputs1 if symmetric else inputs2
    n1, n2 = _batch(inputs1), _batch(x2)
    rows = [(i, min(i + bs, n1)) for i in range(0, n1, bs)]
    cols = [(j, min(j + bs, n2)) for j in range(0, n2, bs)]
    K = None
    for bi, (i0, i1) in enumerate(rows):
        fi, C = _block_features(model, _slice(inputs1, i0, i1), layers, fallback, output_fn, strategy, ct,
                                check=bi == 0)
        if K is None:
            K = _empty_kernel(n1, n2, C, mode, ct, _device(inputs1))
        for bj, (j0, j1) in enumerate(cols):
            if symmetric and bj < bi:
                continue
            if symmetric and bj == bi:
                fj = fi
            else:
                fj, c2 = _block_features(model, _slice(x2, j0, j1), layers, fallback, output_fn, strategy, ct)
                if c2 != C:
                    raise ValueError(f"output_fn gives {C} outputs on inputs1 but {c2} on inputs2")
            tile = _tile(fi, fj, mode)
            if symmetric and bj == bi:  # exactly symmetric despite rounding (float addition commutes)
                tile = 0.5 * (tile + _mirror(tile, mode))
            K[i0:i1, j0:j1] = tile
            if symmetric and bj != bi:
                K[j0:j1, i0:i1] = _mirror(tile, mode)
    return K.to(dtype)
