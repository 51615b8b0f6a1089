"""Empirical NTK of a PyTorch model, exact, blocked over samples, without the N x C x P Jacobian.

    K(x, x')_{cc'} = Σ_p ∂f_c(x)/∂θ_p · ∂f_{c'}(x')/∂θ_p        over the selected parameters θ.

For an nn.Linear z = A Wᵀ + b used at T positions (A_i (T, d_in), output gradients G_{i,c} = ∂f_c(x_i)/∂z_i
(T, d_out)), ∂f_{i,c}/∂W = G_{i,c}ᵀ A_i and ∂f_{i,c}/∂b = Σ_t G_{i,c,t}, so per layer either

  gram         ⟨∂f_{i,c}/∂W, ∂f_{j,c'}/∂W⟩ = Σ_{t,s} (A_i A_jᵀ)_{ts} (G_{i,c} G_{j,c'}ᵀ)_{ts}   T²(d_in+d_out) a pair
  materialize  the per-sample gradients G_{i,c}ᵀ A_i (d_out·d_in) and their dot products           d_in·d_out a pair

(the bias always as ⟨Σ_t G_{i,c,t}, Σ_s G_{j,c',s}⟩); strategy="auto" picks the cheaper per layer.

One forward per block of samples, with forward hooks keeping each selected Linear's input A and output z;
the gradients of all C outputs with respect to every z come from one ``torch.autograd.grad(...,
is_grads_batched=True)`` over the C one-hot cotangents.  A row block's features are computed once and
reused across its column blocks; inputs2=None computes the upper-triangle tiles only and mirrors them.

What this first foundation covers of issue 3, and what comes later:
  here   nn.Linear weights and biases (any leading dims, a module used several times sums its uses), Tensor
         inputs, modes full / trace / diagonal, kernel "sgd", strategies auto / gram / materialize /
         jacobian (the torch.func reference ``empirical_ntk_reference``), plain PyTorch only.
  later  other layers (Conv1D, Embedding, LayerNorm / RMSNorm, Conv2d) and the exact torch.func fallback for
         any other parameter (they raise NotImplementedError now), mapping inputs (input_ids,
         attention_mask), the sign kernels "signgd" / "asymmetric_signgd", ``per_sample_grads``,
         ``memory_budget`` and a default block size that fits free memory, ``progress``, the registered ops
         (``ntk_kernels.ops``) with C++ / Triton / CUDA kernels for the Gram contractions, benchmarks.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

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
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _check_args(inputs1, inputs2, mode, kernel, strategy, block_size, dtype):
    for name, x in (("inputs1", inputs1), ("inputs2", inputs2)):
        if x is None and name == "inputs2":
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor batched on dim 0 (mappings of tensors are not supported "
                            f"yet), got {type(x).__name__}")
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must be batched on dim 0 with at least one sample, got shape "
                             f"{tuple(x.shape)}")
    if inputs2 is not None and inputs2.shape[1:] != inputs1.shape[1:]:
        raise ValueError(f"inputs2 has per-sample shape {tuple(inputs2.shape[1:])}, expected that of inputs1 "
                         f"{tuple(inputs1.shape[1:])}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "sgd":
        raise NotImplementedError(f"kernel={kernel!r} is not implemented yet (only 'sgd', the eNTK); the sign "
                                  f"kernels need per-sample gradients tile by tile (issue 3)")
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
# The reference: torch.func jacrev + vmap, the whole (N, C, P) Jacobian.  For checks only.
# ----------------------------------------------------------------------------------------------
def empirical_ntk_reference(model: nn.Module, inputs1: Tensor, inputs2: Optional[Tensor] = None, *,
                            params: ParamsSpec = None, mode: str = "full", output_fn: Optional[Callable] = None,
                            dtype: torch.dtype = torch.float32) -> Tensor:
    """The eNTK the plain way: J = vmap(jacrev(f)) per sample, (N, C, P), then K = J₁ J₂ᵀ contracted per
    ``mode`` ("full" (N1, N2, C, C), "trace" (N1, N2), "diagonal" (N1, N2, C)).  Any parameter type works.
    Memory O(N·C·P): the test oracle and strategy="jacobian", not a fast path."""
    _check_args(inputs1, inputs2, mode, "sgd", "jacobian", None, dtype)
    chosen = select_params(model, params)
    names = [n for n, _ in chosen]
    base = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    ct = _compute_dtype(dtype)

    def f(sel: Dict[str, Tensor], x: Tensor) -> Tensor:
        out = torch.func.functional_call(model, ({**base, **sel}, buffers), (x.unsqueeze(0),))
        return _outputs(out, output_fn, 1)[0]

    def jacobian(x: Tensor) -> Tensor:
        sel = {n: p.detach() for n, p in chosen}
        J = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(sel, x)
        return torch.cat([J[n].reshape(x.shape[0], J[n].shape[1], -1) for n in names], dim=-1).to(ct)

    J1 = jacobian(inputs1)
    J2 = J1 if inputs2 is None else jacobian(inputs2)
    return _contract(J1, J2, mode).to(dtype)


# ----------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------
class _LinearSites:
    """Forward hooks on the selected nn.Linear modules keeping every call's input A and output z."""

    def __init__(self, layers: Dict[nn.Linear, Tuple[bool, bool]]):
        self.layers = layers  # module -> (weight selected, bias selected)
        self.calls: Dict[nn.Linear, List[Tuple[Tensor, Tensor]]] = {m: [] for m in layers}
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


def _linear_layers(model: nn.Module, chosen) -> Dict[nn.Linear, Tuple[bool, bool]]:
    owner = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            owner[id(m.weight)] = (m, 0)
            if m.bias is not None:
                owner[id(m.bias)] = (m, 1)
    layers: Dict[nn.Linear, List[bool]] = {}
    for name, p in chosen:
        if id(p) not in owner:
            raise NotImplementedError(f"params: parameter {name!r} does not belong to an nn.Linear; only nn.Linear "
                                      f"weights and biases are supported yet (the torch.func fallback for other "
                                      f"parameters comes later; strategy='jacobian' handles any parameter)")
        m, k = owner[id(p)]
        layers.setdefault(m, [False, False])[k] = True
    return {m: tuple(v) for m, v in layers.items()}


def _use_gram(T: int, d_in: int, d_out: int, strategy: str) -> bool:
    """Gram costs T²(d_in + d_out) per pair, materialised gradients d_in·d_out per pair."""
    if strategy == "gram":
        return True
    if strategy == "materialize":
        return False
    return T * T * (d_in + d_out) <= d_in * d_out


def _block_features(model, x, layers, output_fn, strategy, ct):
    """Per-layer features of one block x (n, ...): ("gram", A (n, T, d_in), G (n, C, T, d_out), Gsum (n, C, d_out)
    or None when the bias is not selected) or ("mat", J (n, C, P_layer)); and C."""
    n = x.shape[0]
    params = [p for m, (w, b) in layers.items() for p, sel in ((m.weight, w), (m.bias, b)) if sel]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:  # a selected frozen parameter still needs a graph through its layer
            p.requires_grad_(True)
        with torch.enable_grad(), _LinearSites(layers) as sites:
            f = _outputs(model(x), output_fn, n)
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    C = f.shape[1]
    used = [m for m in layers if sites.calls[m]]
    if not f.requires_grad or not used:
        raise ValueError("params: the model's output does not depend on the selected parameters")
    zs = []
    for m in used:
        for a, z in sites.calls[m]:
            if z.shape[0] != n:
                raise NotImplementedError(f"an nn.Linear was called on a tensor whose dim 0 ({z.shape[0]}) is not "
                                          f"the batch ({n}); such layers are not supported yet")
            zs.append(z)
    cot = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, n, C)
    grads = torch.autograd.grad(f, zs, cot, is_grads_batched=True, allow_unused=True)
    if all(g is None for g in grads):
        raise ValueError("params: the model's output does not depend on the selected parameters")
    feats, k = {}, 0
    for m in used:
        As, Gs = [], []
        for a, z in sites.calls[m]:
            g = grads[k] if grads[k] is not None else torch.zeros((C, *z.shape), dtype=z.dtype, device=z.device)
            k += 1
            As.append(a.reshape(n, -1, a.shape[-1]))
            Gs.append(g.reshape(C, n, -1, g.shape[-1]).transpose(0, 1))
        A = torch.cat(As, 1).to(ct)  # several calls of one module: their positions concatenated along T
        G = torch.cat(Gs, 2).to(ct)
        w_sel, b_sel = layers[m]
        Gsum = G.sum(2) if b_sel else None
        if w_sel and _use_gram(A.shape[1], A.shape[2], G.shape[3], strategy):
            feats[m] = ("gram", A, G, Gsum)
        else:
            parts = [torch.einsum("ictk,itd->ickd", G, A).reshape(n, C, -1)] if w_sel else []
            feats[m] = ("mat", torch.cat(parts + ([Gsum] if b_sel else []), -1))
    return feats, C


def _gram_tile(A1, G1, A2, G2, mode):
    """Σ_{t,s} (A_i A_jᵀ)_{ts} (G_{i,c} G_{j,c'}ᵀ)_{ts}: A (n, T, d_in), G (n, C, T, d_out)."""
    AA = torch.einsum("itd,jsd->ijts", A1, A2)
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
        else:
            _, A1, G1, S1 = a
            _, A2, G2, S2 = b
            tile = tile + _gram_tile(A1, G1, A2, G2, mode)
            if S1 is not None:
                tile = tile + _contract(S1, S2, mode)
    return tile


def empirical_ntk(model: nn.Module, inputs1: Tensor, inputs2: Optional[Tensor] = None, *,
                  params: ParamsSpec = None, mode: str = "full", kernel: str = "sgd",
                  output_fn: Optional[Callable] = None, block_size: Optional[int] = None,
                  strategy: str = "auto", dtype: torch.dtype = torch.float32) -> Tensor:
    """The empirical NTK K(x, x')_{cc'} = Σ_p ∂f_c(x)/∂θ_p ∂f_{c'}(x')/∂θ_p of ``model``, exactly.

    model      an nn.Module; call ``model.eval()`` first if it has dropout (one forward per block).
    inputs1    Tensor (N1, ...) batched on dim 0; inputs2 (N2, ...) with the same per-sample shape, or None
               for inputs1 (then only tiles j >= i are computed and the result is exactly symmetric).
    params     None (every parameter with requires_grad), a list of names, a regex (re.search on the name) or
               a predicate (name, param) -> bool.  All must be nn.Linear weights / biases for now.
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
    layers = _linear_layers(model, select_params(model, params))
    ct = _compute_dtype(dtype)
    bs = block_size or DEFAULT_BLOCK_SIZE
    symmetric = inputs2 is None
    x2 = inputs1 if symmetric else inputs2
    n1, n2 = inputs1.shape[0], x2.shape[0]
    rows = [(i, min(i + bs, n1)) for i in range(0, n1, bs)]
    cols = [(j, min(j + bs, n2)) for j in range(0, n2, bs)]
    K = None
    for bi, (i0, i1) in enumerate(rows):
        fi, C = _block_features(model, inputs1[i0:i1], layers, output_fn, strategy, ct)
        if K is None:
            K = _empty_kernel(n1, n2, C, mode, ct, inputs1.device)
        for bj, (j0, j1) in enumerate(cols):
            if symmetric and bj < bi:
                continue
            if symmetric and bj == bi:
                fj = fi
            else:
                fj, c2 = _block_features(model, x2[j0:j1], layers, output_fn, strategy, ct)
                if c2 != C:
                    raise ValueError(f"output_fn gives {C} outputs on inputs1 but {c2} on inputs2")
            tile = _tile(fi, fj, mode)
            if symmetric and bj == bi:  # exactly symmetric despite rounding (float addition commutes)
                tile = 0.5 * (tile + _mirror(tile, mode))
            K[i0:i1, j0:j1] = tile
            if symmetric and bj != bi:
                K[j0:j1, i0:i1] = _mirror(tile, mode)
    return K.to(dtype)
