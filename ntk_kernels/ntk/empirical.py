"""Empirical NTK of a PyTorch model, exact, blocked over samples, without the N x C x P Jacobian.

    K(x, x')_{cc'} = Σ_p ∂f_c(x)/∂θ_p · ∂f_{c'}(x')/∂θ_p        over the selected parameters θ.

For an nn.Linear z = A Wᵀ + b used at T positions (A_i (T, d_in), output gradients G_{i,c} = ∂f_c(x_i)/∂z_i
(T, d_out)), ∂f_{i,c}/∂W = G_{i,c}ᵀ A_i and ∂f_{i,c}/∂b = Σ_t G_{i,c,t}, so per layer either

  gram         ⟨∂f_{i,c}/∂W, ∂f_{j,c'}/∂W⟩ = Σ_{t,s} (A_i A_jᵀ)_{ts} (G_{i,c} G_{j,c'}ᵀ)_{ts}   T²(d_in+d_out) a pair
  materialize  the per-sample gradients G_{i,c}ᵀ A_i (d_out·d_in) and their dot products           d_in·d_out a pair

(the bias always as ⟨Σ_t G_{i,c,t}, Σ_s G_{j,c',s}⟩); strategy="auto" picks the cheaper per layer and mode, and
switches materialised layers to the Gram trick when their gradients would not fit the memory budget.  The Gram
contraction is the op ``ntk_kernels.ops.gram_contract`` (C++ CPU, Triton, CUDA kernels; never forms the T x S
products).  transformers' Conv1D (GPT-2, weight (d_in, d_out), y = x W + b) is the same map transposed.  An
nn.Conv2d (groups 1, zero padding) is a Linear on its unfolded patches (T = H_out·W_out, d_in = C_in·kh·kw).  An
nn.Embedding is a Linear on one-hot rows: A_i A_jᵀ becomes the token-equality mask 1[id_t = id'_s] (padding
positions masked out), or the per-sample gradient is a scatter-add of G over the ids.  A norm layer
y = w ⊙ u(x) + b (LayerNorm, RMSNorm) has per-sample gradients Σ_t G_t ⊙ u_t (and Σ_t G_t), u(x) taken as the
module's own output with w = 1, b = 0.

One forward per block of samples, with forward hooks keeping each fast-path module's input and output z; the
gradients of all C outputs with respect to every z come from one ``torch.autograd.grad(..., is_grads_batched=True)``
over the C one-hot cotangents (C plain backward passes when C <= 4: cheaper than the vmapped backward).  Then layer
by layer: each module's contribution over all sample pairs at once, a materialised layer's per-sample gradients
formed output-major, a chunk of input features at a time, into one buffer and contracted by GEMMs that add into
the kernel in place (never the N·P Jacobian); with inputs2=None only the blocks on and above the diagonal.  When
the raw features (A, G) of every sample do not fit the memory budget, over tiles of super-blocks that fit two at
a time; only when not even that fits, tile by tile with each block's per-sample gradients materialised.  Every
other selected parameter (a weight tied across modules, a grouped convolution, a fast-path module called on a
tensor not batched on dim 0, ...) gets the exact fallback: its per-sample Jacobian (n, C, P_rest) from torch.func
(vmap of jacrev over the block's samples, or a loop over them where vmap fails on data-dependent control flow),
contracted into the same kernel.  The parameters are split, never counted twice.  A probe block of two samples
checks the hooks' gradients against autograd's and sizes the plan.  The sign kernels ("signgd",
"asymmetric_signgd") take the signs of the materialised per-sample gradients (no Gram trick).
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("full", "trace", "diagonal")
KERNELS = ("sgd", "signgd", "asymmetric_signgd")
STRATEGIES = ("auto", "gram", "materialize", "jacobian")

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


def _nan_inf(t: Tensor) -> Tuple[bool, bool]:
    """(has NaN, has ±inf) of a floating tensor from its min and max: one fast pass and no temporary (torch's min
    and max propagate NaN; an elementwise isfinite over a large tangent cost 20x more)."""
    if t.numel() == 0:
        return False, False
    if t.is_complex():
        return bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isnan(lo) | torch.isnan(hi)), bool(torch.isinf(lo) | torch.isinf(hi))


def _check_no_nan(name: str, t: Tensor) -> None:
    """NaN in an input makes every kernel entry of its sample NaN: refused (±inf stays allowed: additive attention
    masks use it)."""
    if (t.is_floating_point() or t.is_complex()) and _nan_inf(t)[0]:
        idx = tuple(int(i) for i in torch.isnan(t).nonzero()[0])
        raise ValueError(f"{name} contains NaN (first at index {idx})")


def _check_inputs(name: str, x) -> None:
    if isinstance(x, Tensor):
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"{name} must be batched on dim 0 with at least one sample, got shape "
                             f"{tuple(x.shape)}")
        _check_no_nan(name, x)
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
        _check_no_nan(f"{name}[{k!r}]", v)
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
MAX_BLOCK = 128  # the largest default block (samples per forward)
SMALL_N = 16  # inputs1 of at most this many samples is probed whole (see _assemble)
MIN_BLOCK = 16  # below this block size, materialised layers switch to the Gram trick to fit the budget


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): weight (d_in, d_out), y = x W + b; found by name, no import needed."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor)


def _is_norm(m: nn.Module) -> bool:
    """A norm layer y = w ⊙ u(x) + b over the last dim: nn.LayerNorm / nn.RMSNorm with a 1-D normalized_shape,
    or a class named *LayerNorm / *RMSNorm (transformers' LlamaRMSNorm, T5LayerNorm, ...) with a 1-D weight.
    u(x) is taken as the module's own output with w = 1, b = 0, so it matches the module's arithmetic; a norm
    that is not of this form (e.g. y = (1 + w) ⊙ u) fails the first-block check and takes the fallback."""
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if not isinstance(w, nn.Parameter) or w.ndim != 1:
        return False
    if b is not None and not (isinstance(b, nn.Parameter) and b.shape == w.shape):
        return False
    rms = getattr(nn, "RMSNorm", None)
    if isinstance(m, nn.LayerNorm) or (rms is not None and isinstance(m, rms)):
        return len(m.normalized_shape) == 1
    return type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def _fast_kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Linear) or _is_conv1d(m):
        return "linear"
    if isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq:
        return "embedding"
    if (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple) and all(isinstance(v, int) for v in m.padding)):
        return "conv2d"
    if _is_norm(m):
        return "norm"
    return None


class _Sites:
    """Forward hooks on the fast-path modules keeping every call's arguments and output z."""

    def __init__(self, layers: Dict[nn.Module, Tuple[bool, bool]], n: int = 1, expand: bool = False):
        self.layers = layers  # module -> (weight selected, bias selected)
        self.calls: Dict[nn.Module, List[tuple]] = {m: [] for m in layers}
        self.handles = []
        self.n, self.expand, self.expanded = n, expand, set()

    def __enter__(self):
        for m in self.layers:
            self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def _hook(self, module, args, kwargs, output):
        if (self.expand and self.n > 1 and isinstance(module, nn.Embedding) and isinstance(output, Tensor)
                and args and isinstance(args[0], Tensor) and args[0].ndim >= 1 and args[0].shape[0] == 1):
            # an embedding on ids shared by the block (BERT's / GPT-2's position ids, (1, T)): its output is
            # broadcast over the samples downstream; expanded to (n, ...) here, the same values flow on and the
            # gradient with respect to it is per sample (checked on the probe block: outputs and gradients)
            output = output.expand(self.n, *output.shape[1:])
            args = (args[0].expand(self.n, *args[0].shape[1:]),) + tuple(args[1:])
            self.expanded.add(module)
            self.calls[module].append((args, kwargs, output))
            return output
        self.calls[module].append((args, kwargs, output))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class _NoFastPath(Exception):
    """A fast-path module was called on a tensor not batched like the samples (e.g. BERT's position
    embeddings on (1, T) ids), or its parameter is also used outside its module's calls (e.g. an embedding
    matrix reused through F.linear), or it is a norm not of the form w ⊙ u(x) + b, so the hooks do not give
    its gradient: its parameters move to the torch.func fallback."""

    def __init__(self, modules):
        super().__init__(", ".join(type(m).__name__ for m in modules))
        self.modules = list(modules)


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


# ---------------------------------------------------------------------------------------- per-layer features
class _Raw:
    """One fast-path module's inputs and output gradients over a block of n samples, its T positions (every
    call of the module, concatenated): A (n, T, K) float features or (n, T) token ids, G (n, C, T, d_out).
      linear    A = the layer's input (K = d_in)                 ∂f_c/∂W = G_cᵀ A
      conv2d    A = the unfolded input patches (T = H_out·W_out, K = C_in·kh·kw)
      embedding A = the token ids; ∂f_c/∂W = scatter-add of G_c rows at the ids
      norm      A = u(x), the module's output with w = 1, b = 0  ∂f_c/∂w = Σ_t G_{c,t} ⊙ u_t"""

    def __init__(self, module, kind, A, G, w_sel, b_sel):
        self.module, self.kind, self.A, self.G, self.w_sel, self.b_sel = module, kind, A, G, w_sel, b_sel

    def grads(self, A=None, G=None) -> List[Tensor]:
        """Per-sample gradients, in the parameters' own layout: [(n, C, *weight.shape)] if the weight is
        selected, then [(n, C, *bias.shape)] if the bias is."""
        A = self.A if A is None else A
        G = self.G if G is None else G
        m, n, C = self.module, G.shape[0], G.shape[1]
        out = []
        if self.w_sel:
            if self.kind == "embedding":
                V, d = m.num_embeddings, G.shape[3]
                W = torch.zeros(n * C * V, d, dtype=G.dtype, device=G.device)
                # row (i, c, id) of the flat (n·C·V, d) gradient; index_add_ (parallel) rather than an accumulating
                # index_put_ (15-25x slower on the CPU at these sizes)
                rows = A[:, None, :] + V * torch.arange(n * C, device=G.device).view(n, C, 1)
                W.index_add_(0, rows.reshape(-1), G.reshape(-1, d))
                W = W.view(n, C, V, d)
            elif self.kind == "norm":
                W = torch.einsum("ictk,itk->ick", G, A)
            else:
                W = torch.einsum("ictk,itd->ickd", G, A)
                if _is_conv1d(m):
                    W = W.transpose(-1, -2)
                W = W.reshape(n, C, *m.weight.shape)
            out.append(W)
        if self.b_sel:
            out.append(G.sum(2))
        return out

    def flat(self) -> List[Tuple[str, Tensor]]:
        """The per-sample gradients flattened, one feature per selected parameter, each in an order of its own
        (the same for every sample: all a Gram contraction or a sign needs): ("matc", (C, n, P_part)) for a linear
        map's weight (formed output-major by weight_grads, where it stays), ("mat", (n, C, P_part)) otherwise."""
        if self.kind in ("linear", "conv2d") and self.w_sel:
            return [("matc", self.weight_grads())] + ([("mat", self.G.sum(2))] if self.b_sel else [])
        n, C = self.G.shape[:2]
        return [("mat", g.reshape(n, C, -1)) for g in self.grads()]

    def weight_grads(self, out: Optional[Tensor] = None, k0: int = 0, k1: Optional[int] = None) -> Tensor:
        """A linear map's per-sample weight gradients output-major, (C, n, K·d): [c, n] = A_nᵀ G_{n,c}, (K, d)
        row-major (the order inside P is the same for every sample: all a contraction needs).  One bmm per output
        c, each writing a contiguous (n, K, d) block (1.1-1.5x faster on the CPU than one bmm of the transposed
        G into the sample-major layout).  k0:k1: only the rows of those input features (K = k1 - k0).  ``out``: a
        (C, n, K·d) tensor whose out[c] are contiguous (a slice of a larger buffer) to write into."""
        n, C, T, d = self.G.shape
        k1 = self.A.shape[2] if k1 is None else k1
        if out is None:
            out = torch.empty((C, n, (k1 - k0) * d), dtype=self.G.dtype, device=self.G.device)
        At = self.A[:, :, k0:k1].transpose(1, 2)
        for c in range(C):
            torch.bmm(At, self.G[:, c], out=out[c].view(n, k1 - k0, d))
        return out

    def gram_ok(self) -> bool:
        return self.kind != "norm" and self.w_sel

    def costs(self, mode: str, n_other: int) -> Tuple[float, float]:
        """(gram, materialise) multiply-adds per sample pair for ``mode`` (Cp output pairs per c: C in full mode,
        1 otherwise): the Gram trick T²·K + C·T²·d + Cp·C·T·d (an embedding's token mask: no T²·K) against
        the per-sample gradients' Cp·C·K·d plus forming them, C·T·K·d per sample over ``n_other`` partners."""
        n, C, T, d = self.G.shape
        Cp = C if mode == "full" else 1
        if self.kind == "norm":
            return float("inf"), Cp * C * d
        K = self.module.num_embeddings if self.kind == "embedding" else self.A.shape[2]
        gram = (0 if self.kind == "embedding" else T * T * K) + C * T * T * d + Cp * C * T * d
        return gram, Cp * C * K * d + C * T * K * d / max(1, n_other)

    def nbytes(self, choice: str) -> Tuple[int, int]:
        """(kept, transient) bytes per sample: the features a block keeps for ``choice``, and the raw A, G."""
        n, C, T, d = self.G.shape
        es = self.G.element_size()
        raw = self.A[0].numel() * self.A.element_size() + C * T * d * es
        if choice == "gram":
            return raw + (C * d * es if self.b_sel else 0), raw
        P = sum(p.numel() for p, s in ((self.module.weight, self.w_sel), (getattr(self.module, "bias", None),
                                                                         self.b_sel)) if s)
        return C * P * es, raw


class _NoExpand(Exception):
    """Expanding a shared-ids embedding's output over the block changed the model's outputs or broke its
    forward: the run starts again without expansion (those embeddings then take the fallback)."""


def _block_raw(model, x, layers, fallback, output_fn, ct, check=False, expand=True, stats=None):
    """One forward and one batched backward over block x: {module: _Raw} for the fast-path modules, the
    fallback's per-sample Jacobian (n, C, P_rest) under FALLBACK (torch.func), and C.

    check: also take autograd's gradients of Σ_i r_i·f(x_i) (r random) for the fast-path parameters and compare
    them with those the hooks' features give; a module where they differ raises _NoFastPath."""
    n = _batch(x)
    params = [p for m, (w, b) in layers.items()
              for p, sel in ((m.weight, w), (getattr(m, "bias", None), b)) if sel]
    params += [p for _, p in fallback]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:  # a selected frozen parameter still needs a graph through its layer
            p.requires_grad_(True)
        with torch.enable_grad():
            raws, C = _raw_features(model, x, n, layers, fallback, output_fn, ct, check, expand, stats)
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
    if fallback:
        raws[FALLBACK] = per_sample_jacobian(model, x, fallback, output_fn, ct)
    return raws, C


def _norm_u(m: nn.Module, args, kwargs) -> Tensor:
    """u(x): the norm's own output with weight 1 and bias 0 (the derivative of y = w ⊙ u + b in w)."""
    state = {"weight": torch.ones_like(m.weight)}
    if getattr(m, "bias", None) is not None:
        state["bias"] = torch.zeros_like(m.bias)
    with torch.no_grad():
        return torch.func.functional_call(m, state, args, kwargs)


def _storage_key(t: Tensor):
    """(storage address, device) of a strided tensor, None where there is no plain storage."""
    if t.layout != torch.strided:
        return None
    try:
        return t.untyped_storage().data_ptr(), t.device
    except (NotImplementedError, RuntimeError):
        return None


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for the backward during a forward (each storage once): the block's graph,
    attention probabilities and all, which the layers' own features do not show."""

    def __init__(self, model: nn.Module):
        # the parameters and buffers are saved too, but do not grow with the block
        self.seen = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
        self.nbytes = 0

        def pack(t):
            key = _storage_key(t)
            if key is None:  # sparse, nested, a wrapper subclass: no storage to share, count its elements
                self.nbytes += t.numel() * t.element_size()
            elif key not in self.seen:
                self.seen.add(key)
                self.nbytes += t.untyped_storage().nbytes()
            return t

        super().__init__(pack, lambda t: t)


def _raw_features(model, x, n, layers, fallback, output_fn, ct, check, expand=True, stats=None):
    counter = _SavedBytes(model) if stats is not None else contextlib.nullcontext()
    with _Sites(layers, n, expand) as sites, counter:
        try:
            f = _outputs(_call(model, x), output_fn, n)
        except Exception:
            if sites.expanded:
                raise _NoExpand()
            raise
    if check and sites.expanded:  # the expanded forward must give the model's own outputs
        with torch.no_grad():
            plain = _outputs(_call(model, x), output_fn, n)
        tol = 10 * max(torch.finfo(f.dtype).eps, torch.finfo(torch.float32).eps) ** 0.5
        if plain.shape != f.shape or ((plain - f).abs().max() > tol * max(1.0, plain.abs().max().item())):
            raise _NoExpand()
    if stats is not None:
        stats["graph_bytes"] = counter.nbytes
    C = f.shape[1]
    used = [m for m in layers if sites.calls[m]]
    if not f.requires_grad or not (used or fallback):
        # this block does not reach the selected parameters (a data-dependent branch?): zero gradients; the probe
        # of empirical_ntk says so in stats (the call fails only if no block reaches them)
        if stats is not None:
            stats["unreached"] = True
        if not check or stats is not None:
            return {}, C
        raise ValueError("params: the model's output does not depend on the selected parameters")
    unbatched = [m for m in used for args, _, z in sites.calls[m]
                 if not isinstance(z, Tensor) or z.shape[0] != n or not args or args[0].shape[0] != n]
    if unbatched:
        raise _NoFastPath(dict.fromkeys(unbatched))
    zs = [z for m in used for _, _, z in sites.calls[m]]
    raws: Dict = {}
    actual: Dict[nn.Module, List[Optional[Tensor]]] = {}
    if check:  # one random combination r of the outputs: ∂(Σ_i r_i·f(x_i))/∂θ, 1/C of the batched cost
        gen = torch.Generator(device=f.device).manual_seed(0)
        r = torch.randn(f.shape, generator=gen, dtype=f.dtype, device=f.device)
        owned = [(m, p) for m in used
                 for p, sel in zip((m.weight, getattr(m, "bias", None)), layers[m]) if sel]
        pg = torch.autograd.grad(f, [p for _, p in owned] + [p for _, p in fallback], r, retain_graph=True,
                                 allow_unused=True)
        if all(g is None for g in pg):  # no selected parameter is on the output's graph
            raise ValueError("params: the model's output does not depend on the selected parameters")
        for (m, p), g in zip(owned, pg):
            actual.setdefault(m, []).append(torch.zeros_like(p) if g is None else g)
        if sites.expanded:
            r_last, actual_last = _last_sample_grads(f, r, sites.expanded, layers)
    if not used:
        return raws, C
    grads = _output_grads(f, zs, C)
    if all(g is None for g in grads) and not fallback:
        if stats is not None:
            stats["unreached"] = True
        if not check or stats is not None:
            return {}, C
        raise ValueError("params: the model's output does not depend on the selected parameters")
    k = 0
    failed = []
    for m in used:
        kind = _fast_kind(m)
        As, Gs = [], []
        for args, kwargs, z in sites.calls[m]:
            g = grads[k] if grads[k] is not None else torch.zeros((C, *z.shape), dtype=z.dtype, device=z.device)
            k += 1
            a = args[0].detach()
            if kind == "conv2d":
                if a.ndim != 4:
                    raise _NoFastPath([m])
                As.append(F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2))
                Gs.append(g.reshape(C, n, g.shape[2], -1).permute(1, 0, 3, 2))
                continue
            if kind == "embedding":
                As.append(a.reshape(n, -1))
            else:
                if kind == "norm":
                    a = _norm_u(m, args, kwargs)
                As.append(a.reshape(n, -1, a.shape[-1]))
            Gs.append(g.reshape(C, n, -1, g.shape[-1]).transpose(0, 1))
        # several calls of one module: their positions concatenated along T
        G = (Gs[0] if len(Gs) == 1 else torch.cat(Gs, 2)).to(ct)
        A = As[0] if len(As) == 1 else torch.cat(As, 1)
        if kind == "embedding":
            if m.padding_idx is not None:  # the padding row gets no gradient
                G = G * (A != m.padding_idx)[:, None, :, None].to(ct)
        else:
            A = A.to(ct)
        raw = _Raw(m, kind, A, G, *layers[m])
        if check and not _check_hooks(raw, r, actual[m], f.dtype):
            failed.append(m)
        raws[m] = raw
    if failed:
        raise _NoFastPath(failed)
    if check and sites.expanded:
        for m in sites.expanded:
            raw = raws[m]
            last = _Raw(m, raw.kind, raw.A[-1:], raw.G[-1:], raw.w_sel, raw.b_sel)
            if not _check_hooks(last, r_last[-1:], actual_last[m], f.dtype):
                raise _NoExpand()
    return raws, C


LOOP_MAX_C = 4  # up to this many outputs, C plain backward passes beat one vmapped (is_grads_batched) pass


def _output_grads(f: Tensor, zs: List[Tensor], C: int) -> List[Optional[Tensor]]:
    """∂f_c/∂z for every output c and hooked output z, stacked on a leading C dim ((C, *z.shape), None where z
    does not reach f).  One backward per output for small C (the vmapped backward's batching rules cost more
    than they save: BERT-h128, C = 2: 0.22 s against 0.32 s for forward + backward on one core), else one
    ``is_grads_batched`` pass over the C one-hot cotangents."""
    if C > LOOP_MAX_C:
        cot = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, f.shape[0], C)
        return list(torch.autograd.grad(f, zs, cot, is_grads_batched=True, allow_unused=True))
    per_c = [torch.autograd.grad(f[:, c].sum(), zs, retain_graph=c < C - 1, allow_unused=True) for c in range(C)]
    out: List[Optional[Tensor]] = []
    for k, z in enumerate(zs):
        gs = [g[k] for g in per_c]
        if all(g is None for g in gs):
            out.append(None)
        else:  # stored sample-major, (n, C, ...), the layout the features take: (C, n, ...) is a view of it
            out.append(torch.stack([torch.zeros_like(z) if g is None else g for g in gs], 1).transpose(0, 1))
    return out


def _last_sample_grads(f, r, expanded, layers):
    """For the expanded embeddings: autograd's gradient of the last sample's r_n·f(x_n) alone.  An expanded
    embedding's gradient must be attributed to the right samples (code indexing its (1, T, d) output, e.g.
    ``pos(ids)[0]``, would send every sample's gradient to sample 0 and still pass the summed check)."""
    r_last = torch.zeros_like(r)
    r_last[-1] = r[-1]
    owned = [(m, p) for m in expanded for p, sel in zip((m.weight, getattr(m, "bias", None)), layers[m]) if sel]
    pg = torch.autograd.grad(f, [p for _, p in owned], r_last, retain_graph=True, allow_unused=True)
    actual: Dict[nn.Module, List[Tensor]] = {}
    for (m, p), g in zip(owned, pg):
        actual.setdefault(m, []).append(torch.zeros_like(p) if g is None else g)
    return r_last, actual


def _check_hooks(raw: _Raw, r: Tensor, actual: List[Tensor], dtype) -> bool:
    """Σ_i Σ_c r_{i,c} ∂f_c(x_i)/∂θ rebuilt from the hooked features (the block's samples merged into one
    sequence of n·T positions, one combined output) against autograd's ``actual``; False where they differ
    beyond rounding, i.e. by more than 10·sqrt(eps) times the largest of the same sums taken over |A|, |G|
    (eps of float32 at least: models often compute parts of a float64 graph in float32, e.g. transformers'
    RMSNorm and softmax)."""
    n, C, T, d = raw.G.shape
    Gr = torch.einsum("ictk,ic->itk", raw.G, r.to(raw.G.dtype)).reshape(1, 1, n * T, d)
    A1 = raw.A.reshape(1, n * T, *raw.A.shape[2:])
    tol = 10 * max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps) ** 0.5
    if raw.kind == "embedding":
        # on the rows the ids touch, rebuilt there within the bound (no dense (V, d) sums: a 30k-row vocabulary made
        # this the probe's largest cost); every other row of autograd's gradient must be exactly zero (the module's
        # own use gives them nothing: anything there is a use outside it, however small)
        ids, inv = torch.unique(A1.reshape(-1), return_inverse=True)
        rows = Gr.reshape(-1, d)
        got = torch.zeros(len(ids), d, dtype=rows.dtype, device=rows.device).index_add_(0, inv, rows)
        bound = torch.zeros_like(got).index_add_(0, inv, rows.abs()).amax() if len(ids) else rows.new_zeros(())
        g = actual[0]
        g = (g.to_dense() if g.layout != torch.strided else g).to(got.dtype)  # nn.Embedding(sparse=True)
        rest = torch.maximum(g.amax(1), -g.amin(1))  # max |g| per row (10x faster than an inf-norm here)
        if not len(ids):
            return not bool(rest.max() > 0)
        touched = (g[ids] - got).abs().amax()
        rest[ids] = 0
        # (NaN: passes, as for the other layers)
        return not (bool(rest.max() > 0) or bool(touched > tol * bound + torch.finfo(dtype).tiny))
    for got, bound, g in zip(raw.grads(A1, Gr), raw.grads(A1.abs(), Gr.abs()), actual):
        # against the largest bound of the whole parameter, not element by element: G itself carries the
        # batched and the plain backward's rounding, which on a small element of a cancelling sum (an embedding
        # row of a deep residual stream) is large relative to that element; a use outside the module is not
        if (got[0, 0] - g.to(got.dtype)).abs().max() > tol * bound[0, 0].max() + torch.finfo(dtype).tiny:
            return False
    return True


# ---------------------------------------------------------------------------------------- the plan
def _free_memory(device: torch.device) -> int:
    """Bytes the engine may use by default: 80 % of the free GPU memory, or half of MemAvailable on the CPU."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 << 30


class _Plan:
    """Per fast-path module "gram" or "mat" (decided once, from the probe block's shapes), the block size and
    whether every column block's features are kept (each block's forward then runs once)."""

    def __init__(self, raws, C, fallback, strategy, kernel, mode, budget, block_size, n1, n2, es, graph=0):
        self.strategy, self.kernel, self.mode, self.n_other = strategy, kernel, mode, min(n1, n2)
        self.choice = {}
        for m, raw in raws.items():
            if m != FALLBACK:
                self.decide(m, raw)
        p_rest = sum(p.numel() for _, p in fallback)
        rest = 2 * C * p_rest * es  # the fallback's Jacobian and torch.func's intermediate

        def per_sample():
            kept = sum(raws[m].nbytes(c)[0] for m, c in self.choice.items()) + rest
            transient = max([raws[m].nbytes(c)[1] for m, c in self.choice.items()] or [0])
            # the forward's graph: what autograd saved per sample on the probe block (``graph``; attention
            # probabilities included), at least the raw features of every layer
            return kept, transient + max(graph, sum(raws[m].nbytes("gram")[1] for m in self.choice))

        want = min(max(n1, n2), MIN_BLOCK)
        if strategy == "auto" and kernel == "sgd":  # too large to hold MIN_BLOCK samples: Gram trick instead
            while True:
                kept, extra = per_sample()
                if budget >= 3 * want * (kept + extra):
                    break
                mats = [m for m, c in self.choice.items() if c == "mat" and raws[m].gram_ok()]
                if not mats:
                    break
                worst = max(mats, key=lambda m: raws[m].nbytes("mat")[0] - raws[m].nbytes("gram")[0])
                self.choice[worst] = "gram"
        kept, extra = per_sample()
        self.bytes_per_sample, self.transient_per_sample = kept, extra
        if block_size is None:
            block_size = int(max(1, min(MAX_BLOCK, max(n1, n2), budget // (3 * (kept + extra)))))
        self.block_size = block_size
        # every column block's features kept when they fit beside two blocks in flight
        self.cache = n2 * kept + 2 * block_size * (kept + extra) <= budget


def _decide(plan: "_Plan", m, raw) -> str:
    """Gram trick or materialised gradients for module m (cheaper multiply-adds; sign kernels need the gradients)."""
    if plan.kernel != "sgd" or not raw.gram_ok():
        plan.choice[m] = "mat"
    elif plan.strategy in ("gram", "materialize"):
        plan.choice[m] = "gram" if plan.strategy == "gram" else "mat"
    else:
        g, mat = raw.costs(plan.mode, plan.n_other)
        plan.choice[m] = "gram" if g <= mat else "mat"
    return plan.choice[m]


_Plan.decide = _decide


def _finalize(raws, plan: _Plan, kernel: str, lazy: bool = False):
    """The features of a block: ("gram", A, G), ("mat", J (n, C, P)) or ("matc", J (C, n, P)) per module; with
    ``lazy`` (the layer-by-layer path) a linear map's weight part stays ("lazy", raw): its per-sample gradients are
    formed later, chunk by chunk of input features, and contracted at once (see _contract_layer)."""
    feats = {}
    for m, raw in raws.items():
        if m == FALLBACK:
            feats[m] = ("mat", raw)
        elif (plan.choice.get(m) or plan.decide(m, raw)) == "gram":  # a module the probe block did not reach
            if raw.b_sel and raw.kind != "embedding":
                # the bias rides along as a constant input feature: Σ_ts (A_i A_jᵀ + 1)_ts (G_i G_jᵀ)_ts is the
                # weight's term plus ⟨Σ_t G_it, Σ_s G_js⟩, the bias's (no separate contraction of Σ_t G)
                A = torch.cat([raw.A, raw.A.new_ones(*raw.A.shape[:2], 1)], 2)
                feats[m] = ("gram", A, raw.G)
            else:
                feats[m] = ("gram", raw.A, raw.G)
        elif lazy and raw.kind in ("linear", "conv2d") and raw.w_sel:
            feats[(m, 0)] = ("lazy", raw)
            if raw.b_sel:
                feats[(m, 1)] = ("mat", raw.G.sum(2))
        else:
            for k, f in enumerate(raw.flat()):
                feats[(m, k)] = f
    if kernel == "signgd":
        feats = {m: f if f[0] == "lazy" else (f[0], f[1].sign()) for m, f in feats.items()}
    return feats


class _Acc:
    """A tile's accumulator.  The per-sample gradients' GEMMs add in place (addmm_), with no temporary per layer,
    into an output-major buffer: full (C, I, C, J), diagonal (C, I, J), trace (I, J); ``sym`` (a diagonal tile: the
    same features on both sides): a large GEMM computes only the blocks on and above the diagonal (row block a
    against the columns from a on: 5/8 of the products for q = 4; 1.1-1.4x faster on the CPU than the whole square)
    and the lower triangle is mirrored once, in ``result``.  Contributions in the kernel's own layout (the Gram trick,
    sample-major gradients) add into a second buffer in that layout (no strided adds per layer)."""

    def __init__(self, I: int, J: int, C: int, mode: str, like: Tensor, sym: bool):
        self.I, self.J, self.C, self.mode, self.sym, self.like = I, J, C, mode, sym, like
        self.acc: Optional[Tensor] = None  # output-major
        self.nat: Optional[Tensor] = None  # the kernel's layout
        self.mirrors = set()  # off-diagonal regions of ``nat`` (sym): their mirror images are filled in ``result``
        self.diagonal = set()  # diagonal regions of ``nat`` (sym): computed whole, made exactly symmetric there

    def _squares(self):
        """The output-major accumulator as 2-D views: one (C·I, C·J) for full (rows (c, i)), C of (I, J) for
        diagonal, the (I, J) one for trace (fed once per c)."""
        if self.acc is None:
            shape = {"full": (self.C, self.I, self.C, self.J), "diagonal": (self.C, self.I, self.J),
                     "trace": (self.I, self.J)}[self.mode]
            self.acc = torch.zeros(shape, dtype=self.like.dtype, device=self.like.device)
        if self.mode == "full":
            return [self.acc.view(self.C * self.I, self.C * self.J)]
        if self.mode == "diagonal":
            return list(self.acc.unbind(0))
        return [self.acc]

    def _gemm(self, M: Tensor, X: Tensor, Y: Optional[Tensor]):
        """M += X Yᵀ (Y None: X Xᵀ into the upper blocks only)."""
        if Y is not None:
            M.addmm_(X, Y.T)
            return
        R, P = X.shape
        q = 4 if R >= 64 and P >= 2048 else 2 if R >= 32 and P >= 2048 else 1
        cuts = [R * k // q for k in range(q + 1)]
        for a in range(q):
            a0, a1 = cuts[a], cuts[a + 1]
            M[a0:a1, a0:].addmm_(X[a0:a1], X[a0:].T)

    def add_matc(self, X: Tensor, Y: Optional[Tensor] = None):
        """Per-sample gradients output-major, X (C, I, P) [, Y (C, J, P); None: X itself, a sym tile]."""
        C = self.C
        squares = self._squares()
        if self.mode == "full":
            self._gemm(squares[0], X.reshape(C * self.I, -1), None if Y is None else Y.reshape(C * self.J, -1))
            return
        for c in range(C):
            self._gemm(squares[c] if self.mode == "diagonal" else squares[0], X[c], None if Y is None else Y[c])

    def add_tile(self, t: Tensor, i0: int = 0, j0: int = 0):
        """A contribution in the kernel's own layout, (I', J'[, C[, C]]), at rows i0.. and columns j0..; in a sym
        accumulator only blocks on and above the diagonal come here, an off-diagonal one is mirrored in ``result``."""
        if self.nat is None:
            self.nat = _empty_kernel(self.I, self.J, self.C, self.mode, self.like.dtype, self.like.device)
        i1, j1 = i0 + t.shape[0], j0 + t.shape[1]
        self.nat[i0:i1, j0:j1] += t
        if self.sym:
            (self.mirrors if (i0, i1) != (j0, j1) else self.diagonal).add((i0, i1, j0, j1))

    def result(self) -> Tensor:
        """The tile in the kernel's layout (I, J[, C[, C]])."""
        out = None
        if self.acc is not None:
            if self.sym:
                for M in self._squares():
                    M.copy_(torch.triu(M) + torch.triu(M, 1).T)
            out = self.acc.permute(1, 3, 0, 2) if self.mode == "full" else \
                self.acc.permute(1, 2, 0) if self.mode == "diagonal" else self.acc
        if self.nat is not None:
            for i0, i1, j0, j1 in self.mirrors:
                self.nat[j0:j1, i0:i1] = _mirror(self.nat[i0:i1, j0:j1], self.mode)
            for i0, i1, _, _ in self.diagonal:  # symmetric up to rounding: exactly, now
                block = self.nat[i0:i1, i0:i1]
                block.copy_(0.5 * (block + _mirror(block, self.mode)))
            out = self.nat if out is None else self.nat.add_(out)
        if out is None:
            out = _empty_kernel(self.I, self.J, self.C, self.mode, self.like.dtype, self.like.device)
        return out


def _tile(f1, f2, mode, kernel, n1, n2, C, like):
    """The (n1, n2[, C[, C]]) tile between the features f1 and f2 (the same dict for a diagonal tile); None where
    no selected parameter is reached by both blocks."""
    sym = f1 is f2 and kernel != "asymmetric_signgd"  # a diagonal tile: K_ij = K_ji, half the products
    acc = None
    for m, a in f1.items():
        b = f2.get(m)
        if b is None:  # the layer was not reached by this block (cannot happen for same-shaped inputs)
            continue
        if acc is None:
            acc = _Acc(n1, n2, C, mode, like, sym)
        if a[0] == "matc":
            Y = b[1].sign() if kernel == "asymmetric_signgd" else None if sym else b[1]
            acc.add_matc(a[1], Y)
        else:
            acc.add_tile(_pair(a, b, mode, kernel))
    return None if acc is None else acc.result()


def _pair(a, b, mode: str, kernel: str) -> Tensor:
    """The tile of one module's "mat" (sample-major per-sample gradients) or "gram" features between two blocks."""
    from ..ops.ntk_gram import gram_contract

    if a[0] == "mat":
        return _contract(a[1], b[1].sign() if kernel == "asymmetric_signgd" else b[1], mode)
    return gram_contract(a[1], a[2], b[1], b[2], mode)


# ---------------------------------------------------------------------------------------- layer by layer
# the layer-by-layer path's scratch: one layer's gradients, every sample, some input features; under glibc's 32 MiB
# mmap ceiling, so that it comes from the heap (no fresh pages to fault in on every call)
CHUNK_BYTES = 24 << 20
CHUNK_BYTES_GPU = 512 << 20  # on a GPU: larger GEMMs, and the caching allocator keeps the block between calls


def _chunk_bytes(device: torch.device) -> int:
    return CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES_GPU


def _by_layer_bytes(raws, plan: _Plan) -> int:
    """Bytes per sample the layer-by-layer path keeps for every sample: the raw A, G of the materialised linear
    maps (their gradients are formed later, a few input features at a time), the Gram features, the other
    per-sample gradients and the fallback's Jacobian."""
    total = 0
    for m, raw in raws.items():
        if m == FALLBACK:
            total += raw[0].numel() * raw.element_size()
        elif (plan.choice.get(m) or plan.decide(m, raw)) == "gram" or (raw.kind in ("linear", "conv2d")
                                                                         and raw.w_sel):
            total += raw.nbytes("gram")[0]
        else:
            total += raw.nbytes("mat")[0]
    return total


def _form(raws, X: Tensor, k0: int, k1: int) -> None:
    """Every block's per-sample gradients of one linear map, input features k0:k1, into X (C, n, (k1-k0)·d)."""
    for i0, i1, raw in raws:
        if raw is None:  # the block did not reach the layer: zero gradients
            X[:, i0:i1].zero_()
        else:
            raw.weight_grads(X[:, i0:i1], k0, k1)


def _contract_layer(raws1, raws2, same: bool, kernel: str, acc: _Acc, chunk_bytes: int) -> None:
    """One materialised linear map over all samples: its per-sample gradients formed for every sample, a chunk of
    input features at a time (at most ``chunk_bytes``), each chunk contracted at once into the accumulator (one
    GEMM over all C·N rows: no gradient formed twice, no N·P array)."""
    r0 = next(r for _, _, r in raws1 if r is not None)
    K, d = r0.A.shape[2], r0.G.shape[3]
    C, n1, n2 = acc.C, acc.I, acc.J
    n_y = 0 if acc.sym else n2
    es = r0.G.element_size()
    kc = int(max(1, min(K, chunk_bytes // (C * (n1 + n_y) * d * es))))
    buf = torch.empty(C * (n1 + n_y) * kc * d, dtype=r0.G.dtype, device=r0.G.device)
    for k0 in range(0, K, kc):
        k1 = min(K, k0 + kc)
        w = (k1 - k0) * d
        X = buf[:C * n1 * w].view(C, n1, w)
        _form(raws1, X, k0, k1)
        if kernel == "signgd":
            X.sign_()
        if acc.sym:
            acc.add_matc(X)
            continue
        Y = buf[C * n1 * w:C * (n1 + n2) * w].view(C, n2, w)
        if same:  # the asymmetric sign kernel of inputs1 with itself
            torch.sign(X, out=Y)
        else:
            _form(raws2, Y, k0, k1)
            if kernel != "sgd":
                Y.sign_()
        acc.add_matc(X, Y)


def _by_layer(model, inputs1, inputs2, probe, whole: bool, layers, fallback, output_fn, ct, expand, bs: int, S: int,
              C: int, mode: str, kernel: str, chunk_bytes: int, show, reached: bool, plan: _Plan) -> Tensor:
    """The kernel layer by layer: one forward and backward per block of ``bs`` samples keeps the raw features of a
    super-block of ``S`` samples (A, G; the Gram and small per-sample features), then for each tile of super-blocks
    each module is contracted over all its sample pairs at once (the materialised linear maps chunk by chunk of
    input features, see _contract_layer; the others block pair by block pair).  Against tile by tile with
    materialised features it forms every per-sample gradient once per tile and runs a row super-block's forward
    once, with GEMMs over all S·C rows; when every sample fits one super-block (S >= N) there is one tile and every
    gradient is formed once.  probe: the probe block's raw features (``whole``: they are all of inputs1's and serve
    as its one block when inputs1 is one super-block)."""
    n1 = _batch(inputs1)
    x2 = inputs1 if inputs2 is None else inputs2
    n2 = _batch(x2)
    mirror = inputs2 is None and kernel != "asymmetric_signgd"  # K symmetric: tiles below the diagonal mirrored
    rows = [(i, min(i + S, n1)) for i in range(0, n1, S)]
    cols = [(j, min(j + S, n2)) for j in range(0, n2, S)]
    tiles = [(a, b) for a in range(len(rows)) for b in range(len(cols)) if not (mirror and b < a)]
    use_probe = whole and len(rows) == 1
    probe_feats = _finalize(probe, plan, kernel, lazy=True)
    n_keys = len(probe_feats)  # as on the probe (the count shown while collecting)
    total, prev = 0, None  # steps: the blocks collected and the features contracted, tile by tile
    for a, b in tiles:
        if a != prev:  # a row super-block is collected once, at its first tile
            total += 1 if (use_probe and a == 0) else -(-(rows[a][1] - rows[a][0]) // bs)
            prev = a
        if not (inputs2 is None and a == b):
            total += -(-(cols[b][1] - cols[b][0]) // bs)
        total += n_keys
    steps = [0, total]

    def tick():
        steps[0] += 1
        if show is not None:
            show(steps[0], max(steps))

    def collect(x, r, use_probe_feats):
        if use_probe_feats:
            tick()
            return [(0, r[1] - r[0], probe_feats)]
        out = []
        for i0 in range(r[0], r[1], bs):
            i1 = min(r[1], i0 + bs)
            raws, c = _block_raw(model, _slice(x, i0, i1), layers, fallback, output_fn, ct, expand=expand)
            if c != C:
                raise ValueError(f"output_fn gives {C} outputs on inputs1 but {c} on inputs2")
            reached_any[0] = reached_any[0] or bool(raws)
            out.append((i0 - r[0], i1 - r[0], _finalize(raws, plan, kernel, lazy=True)))
            tick()
        return out

    reached_any = [reached]
    like = torch.empty(0, dtype=ct, device=_device(inputs1))
    K = None if len(tiles) == 1 else _empty_kernel(n1, n2, C, mode, ct, like.device)
    B1, row = None, None
    for a, b in tiles:
        (i0, i1), (j0, j1) = rows[a], cols[b]
        if row != a:
            B1, row = None, a  # the previous row super-block's features go before the next are collected
            B1 = collect(inputs1, rows[a], use_probe and a == 0)
        same = inputs2 is None and a == b
        B2 = B1 if same else collect(x2, cols[b], False)
        tile = _contract_all(B1, B2, same, i1 - i0, j1 - j0, C, mode, kernel, chunk_bytes, like, tick)
        del B2
        if K is None:
            K = tile.contiguous()
            continue
        K[i0:i1, j0:j1] = tile
        if mirror and a != b:
            K[j0:j1, i0:i1] = _mirror(tile, mode)
    if not reached_any[0]:
        raise ValueError("params: the model's output does not depend on the selected parameters")
    steps[1] = steps[0]  # the last report says done (the probe's feature count may differ from a block's)
    if show is not None and steps[0] != total:
        show(steps[0], steps[1])
    return K


def _super_block(n1: int, n2: int, two: bool, per: int, cc: int, free: int) -> int:
    """Samples per super-block of the layer-by-layer path: max(n1, n2) when every sample's features (``per`` bytes
    each; ``two``: inputs2 given) and the whole kernel (``cc`` bytes per sample pair) fit in ``free`` bytes, else
    the largest S whose tile (two super-blocks' features and an S x S tile) fits; 0 when not even one does."""
    if (n1 + (n2 if two else 0)) * per + n1 * n2 * cc <= free:
        return max(n1, n2)
    S = 0
    for k in range(1, max(n1, n2) + 1):
        if 2 * k * per + k * k * cc > free:
            break
        S = k
    return S


def _contract_all(B1, B2, same: bool, n1: int, n2: int, C: int, mode: str, kernel: str, chunk_bytes: int, like,
                  tick) -> Tensor:
    """The (n1, n2[, C[, C]]) tile between two super-blocks' collected features (``same``: B2 is B1), module by
    module."""
    acc = _Acc(n1, n2, C, mode, like, same and kernel != "asymmetric_signgd")
    keys = [k for k in dict.fromkeys(k for _, _, f in B1 for k in f) if any(k in f for _, _, f in B2)]
    for key in keys:
        first = next(f[key] for _, _, f in B1 if key in f)
        if first[0] == "lazy":
            side = lambda B: [(i0, i1, f[key][1] if key in f else None) for i0, i1, f in B]  # noqa: E731
            _contract_layer(side(B1), None if same else side(B2), same, kernel, acc, chunk_bytes)
        else:
            for bi, (i0, _, f1) in enumerate(B1):
                for bj, (j0, _, f2) in enumerate(B2):
                    if (acc.sym and bj < bi) or key not in f1 or key not in f2:
                        continue
                    acc.add_tile(_pair(f1[key], f2[key], mode, kernel), i0, j0)
        tick()
    return acc.result()


def _check_budget(memory_budget, progress):
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be a bool or a callable (done, total) -> None, got {type(progress).__name__}")


def _with_fallback_retry(model, chosen, run):
    """run(layers, fallback, expand) with the fast-path split; a module found unsuited (_NoFastPath, on the probe
    block) moves to the torch.func fallback and the run starts again, as it does without expansion of
    shared-ids embeddings (_NoExpand)."""
    excluded = set()
    expand = True
    while True:
        layers, fallback = _split_params(model, chosen, excluded)
        try:
            return run(layers, fallback, expand)
        except _NoExpand:
            expand = False
        except _NoFastPath as e:
            excluded.update(e.modules)


def empirical_ntk(model: nn.Module, inputs1: Inputs, inputs2: Optional[Inputs] = None, *,
                  params: ParamsSpec = None, mode: str = "full", kernel: str = "sgd",
                  output_fn: Optional[Callable] = None, block_size: Optional[int] = None,
                  memory_budget: Optional[int] = None, strategy: str = "auto", dtype: torch.dtype = torch.float32,
                  progress: Union[bool, Callable[[int, int], None]] = False, distributed: bool = False) -> Tensor:
    """The empirical NTK K(x, x')_{cc'} = Σ_p ∂f_c(x)/∂θ_p ∂f_{c'}(x')/∂θ_p of ``model``, exactly.

    model      an nn.Module; call ``model.eval()`` first if it has dropout (one forward per block).
    inputs1    Tensor (N1, ...) batched on dim 0, the model's one argument; or a mapping of such tensors
               (e.g. input_ids, attention_mask), the model's keyword arguments.  inputs2: the same kind, the
               same keys and per-sample shapes, or None for inputs1 (then, except for "asymmetric_signgd",
               only tiles j >= i are computed and the result is exactly symmetric).
    params     None (every parameter with requires_grad), a list of names, a regex (re.search on the name) or
               a predicate (name, param) -> bool.  Any parameter: nn.Linear / transformers Conv1D / nn.Conv2d
               weights and biases and nn.Embedding weights take the fast path (Gram trick or materialised
               per-sample gradients), LayerNorm / RMSNorm weights and biases their per-sample gradients; every
               other parameter (tied weights, grouped convolutions, a fast-path module called on unbatched
               tensors, ...) the exact fallback: per-sample Jacobians from torch.func (vmap over the block's
               samples of jacrev, or a loop over the samples where vmap fails on data-dependent control flow, as
               with transformers' attention masks: correct, slower), memory O(block·C·P_rest).  On a probe block
               the hooks' gradients of Σ_i r_i·f(x_i) are checked against autograd's: a fast-path parameter also
               used outside its module's calls (e.g. F.linear(h, emb.weight)) moves to the fallback, as does a
               module called on a tensor not batched on dim 0.
    mode       "full" -> (N1, N2, C, C); "trace" -> (N1, N2) = Σ_c K_cc (neural-tangents' trace divides by C,
               this one does not); "diagonal" -> (N1, N2, C) = K_cc.
    kernel     "sgd" (the eNTK); "signgd" ⟨sign ∇f(x), sign ∇f(x')⟩; "asymmetric_signgd" ⟨∇f(x), sign ∇f(x')⟩
               (Adam's kernel, Malladi et al. 2023; the sign side is inputs2).  Sign kernels materialise the
               per-sample gradients, chunk by chunk (no Gram trick).
    output_fn  model output -> (N, C) tensor; default: the output itself or its ``.logits`` (2-D).
    block_size samples per forward; default: the most (up to 128) that fit ``memory_budget``.
    memory_budget  bytes the engine may hold; default 80 % of the free GPU memory, or half of the available RAM.
               Layer by layer: each block's forward and backward keeps its raw features (layer inputs and output
               gradients), then each layer is contracted over all pairs at once, its per-sample gradients formed a
               chunk of input features at a time into one scratch buffer (never the N·P Jacobian); when not every
               sample's raw features fit, over tiles of super-blocks whose features fit two at a time (a column
               super-block's forward then runs once per row super-block).
               Only when not even that fits, tile by tile with materialised features, where layers whose
               gradients would not let MIN_BLOCK samples fit switch to the Gram trick (strategy "auto").
    strategy   "auto" (per layer the cheaper of gram / materialize), "gram", "materialize", or "jacobian"
               (``empirical_ntk_reference``, torch.func jacrev + vmap).
    dtype      result dtype; accumulation in float64 for float64, float32 otherwise.
    progress   True prints the steps done to stderr; a callable gets (steps done, steps total).  Steps: each
               block's forward and backward and each layer's contraction (per tile of super-blocks); in the
               tile-by-tile fallback, the tiles of K.
    distributed  True: call this on every rank of an initialised torch.distributed world (torchrun); the tiles
               of K are shared among the ranks and K is gathered on rank 0 (None on the other ranks), as
               ``ntk_kernels.distributed.empirical_ntk`` does (which also takes tile_size, group, out=*.npy
               and a resumable workdir).
    """
    if distributed:
        from ..distributed import empirical_ntk as distributed_ntk
        return distributed_ntk(model, inputs1, inputs2, params=params, mode=mode, kernel=kernel, output_fn=output_fn,
                               block_size=block_size, memory_budget=memory_budget, strategy=strategy, dtype=dtype,
                               progress=progress)
    _check_args(inputs1, inputs2, mode, kernel, strategy, block_size, dtype)
    _check_budget(memory_budget, progress)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if strategy == "jacobian":
        return empirical_ntk_reference(model, inputs1, inputs2, params=params, mode=mode, kernel=kernel,
                                       output_fn=output_fn, dtype=dtype)
    chosen = select_params(model, params)
    return _with_fallback_retry(model, chosen, lambda layers, fallback, expand: _assemble(
        model, inputs1, inputs2, layers, fallback, mode, kernel, output_fn, block_size, memory_budget, strategy,
        dtype, progress, expand))


def _progress_fn(progress):
    if callable(progress) and not isinstance(progress, bool):
        return progress
    if not progress:
        return None
    import sys

    def show(done, total):
        sys.stderr.write(f"\rempirical_ntk: {done}/{total} steps" + ("\n" if done == total else ""))
        sys.stderr.flush()
    return show


def _assemble(model, inputs1, inputs2, layers, fallback, mode, kernel, output_fn, block_size, memory_budget,
              strategy, dtype, progress, expand=True):
    ct = _compute_dtype(dtype)
    symmetric = inputs2 is None and kernel != "asymmetric_signgd"
    x2 = inputs1 if inputs2 is None else inputs2
    n1, n2 = _batch(inputs1), _batch(x2)
    # a probe block (two samples) checks the hooks and gives the layers' shapes for the plan; a small inputs1 is
    # probed whole and its features are the first row block's (one forward and backward fewer: what decides the
    # time at small N)
    probe_x = inputs1 if n1 >= 2 or n2 < 2 else x2
    whole = probe_x is inputs1 and n1 <= SMALL_N
    n_probe = n1 if whole else min(_batch(probe_x), 2)
    stats: Dict[str, int] = {}
    raws, C = _block_raw(model, _slice(probe_x, 0, n_probe), layers, fallback, output_fn, ct, check=True,
                         expand=expand, stats=stats)
    budget = int(memory_budget) if memory_budget is not None else _free_memory(_device(inputs1))
    plan = _Plan(raws, C, fallback, strategy, kernel, mode, budget, block_size, n1, n2, torch.finfo(ct).bits // 8,
                 graph=stats.get("graph_bytes", 0) // n_probe)
    show = _progress_fn(progress)
    es = torch.finfo(ct).bits // 8
    cc = {"full": C * C, "diagonal": C, "trace": 1}[mode] * es
    if plan.block_size >= max(n1, n2):  # one block of inputs1 (and one of inputs2): one tile, layer by layer
        return _by_layer(model, inputs1, inputs2, raws, whole, layers, fallback, output_fn, ct, expand,
                         plan.block_size, max(n1, n2), C, mode, kernel, _chunk_bytes(_device(inputs1)), show,
                         not stats.get("unreached", False), plan).to(dtype)
    # several blocks: layer by layer, over tiles of super-blocks whose raw features fit two at a time (beside K, the
    # blocks in flight and some scratch); tile by tile with materialised features below only where not even two
    # samples' raw features fit
    per = _by_layer_bytes(raws, plan)
    flight = 2 * plan.transient_per_sample  # a block's raw features and graph, and its finalised copy
    # what the estimates do not see (allocator fragmentation, autograd's transients) gets a fifth of the budget;
    # blocks of at least 16 samples in flight and 64 MiB of scratch are reserved before super-blocks are sized
    usable = int(0.8 * budget)
    bs_min = block_size or min(16, max(n1, n2))
    scratch = 64 << 20
    free = usable - n1 * n2 * cc - flight * bs_min - scratch - (16 << 20)
    S = _super_block(n1, n2, inputs2 is not None, per, cc, free)
    if S >= 1:
        one = n1 + (n2 if inputs2 is not None else 0)  # samples whose features one tile holds
        held = (one if S >= max(n1, n2) else 2 * S) * per + (n1 * n2 + S * S) * cc + (16 << 20)
        bs = block_size or int(max(1, min(MAX_BLOCK, S, (usable - held - scratch) // max(1, flight))))
        chunk = int(min(_chunk_bytes(_device(inputs1)), max(1, usable - held - flight * bs)))
        return _by_layer(model, inputs1, inputs2, raws, whole, layers, fallback, output_fn, ct, expand, bs, S,
                         C, mode, kernel, chunk, show, not stats.get("unreached", False), plan).to(dtype)
    first = _finalize(raws, plan, kernel) if whole and plan.block_size >= n1 else None
    del raws
    bs = plan.block_size
    rows = [(i, min(i + bs, n1)) for i in range(0, n1, bs)]
    cols = [(j, min(j + bs, n2)) for j in range(0, n2, bs)]
    total = sum(1 for bi in range(len(rows)) for bj in range(len(cols)) if not (symmetric and bj < bi))
    cache: Dict[int, dict] = {}
    if first is not None and inputs2 is None:
        cache[0] = first

    reached = [not stats.get("unreached", False)]

    def features(x, i0, i1, key=None):
        if key is not None and key in cache:
            return cache[key]
        raws, c = _block_raw(model, _slice(x, i0, i1), layers, fallback, output_fn, ct, expand=expand)
        if c != C:
            raise ValueError(f"output_fn gives {C} outputs on inputs1 but {c} on inputs2")
        reached[0] = reached[0] or bool(raws)
        f = _finalize(raws, plan, kernel)
        if key is not None and plan.cache:
            cache[key] = f
        return f

    K = _empty_kernel(n1, n2, C, mode, ct, _device(inputs1))
    done = 0
    for bi, (i0, i1) in enumerate(rows):
        fi = first if (bi == 0 and first is not None) else features(inputs1, i0, i1,
                                                                     key=bi if inputs2 is None else None)
        for bj, (j0, j1) in enumerate(cols):
            if symmetric and bj < bi:
                continue
            fj = fi if (inputs2 is None and bj == bi) else features(x2, j0, j1, key=bj)
            tile = _tile(fi, fj, mode, kernel, i1 - i0, j1 - j0, C, K)
            if tile is None:  # no selected parameter reached by both blocks
                tile = torch.zeros_like(K[i0:i1, j0:j1])
            if symmetric and bj == bi:  # exactly symmetric despite rounding (float addition commutes)
                tile = 0.5 * (tile + _mirror(tile, mode))
            K[i0:i1, j0:j1] = tile
            if symmetric and bj != bi:
                K[j0:j1, i0:i1] = _mirror(tile, mode)
            done += 1
            if show is not None:
                show(done, total)
    if not reached[0]:
        raise ValueError("params: the model's output does not depend on the selected parameters")
    return K.to(dtype)


def per_sample_grads(model: nn.Module, inputs: Inputs, *, params: ParamsSpec = None,
                     output_fn: Optional[Callable] = None, block_size: Optional[int] = None,
                     dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
    """Per-sample, per-output gradients {name: (N, C, *param.shape)}: [n, c] = ∂f_c(x_n)/∂θ, exactly.

    The same machinery as ``empirical_ntk`` (hooks on nn.Linear / Conv1D / Conv2d / Embedding / LayerNorm /
    RMSNorm, one forward and one batched backward per block of ``block_size`` samples (default 64), the
    torch.func fallback for every other parameter); ``params``, ``output_fn``, ``inputs`` as there.  The result
    holds N·C·P numbers: for the kernel itself use ``empirical_ntk``, which never forms it."""
    _check_inputs("inputs", inputs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    chosen = select_params(model, params)
    names = {id(p): n for n, p in chosen}
    ct = _compute_dtype(dtype)
    n, bs = _batch(inputs), block_size or 64

    def run(layers, fallback, expand):
        out: Dict[str, List[Tensor]] = {name: [] for name, _ in chosen}
        for b, i0 in enumerate(range(0, n, bs)):
            i1 = min(n, i0 + bs)
            raws, C = _block_raw(model, _slice(inputs, i0, i1), layers, fallback, output_fn, ct, check=b == 0,
                                 expand=expand)
            for m, raw in raws.items():
                if m == FALLBACK:
                    k = 0
                    for name, p in fallback:
                        out[name].append(raw[..., k:k + p.numel()].reshape(*raw.shape[:2], *p.shape).to(dtype))
                        k += p.numel()
                    continue
                ps = [p for p, s in ((m.weight, raw.w_sel), (getattr(m, "bias", None), raw.b_sel)) if s]
                for p, g in zip(ps, raw.grads()):
                    out[names[id(p)]].append(g.to(dtype))
            for name, p in chosen:  # a fast-path module this block did not reach: its gradient is zero
                if len(out[name]) <= b:
                    out[name].append(torch.zeros(i1 - i0, C, *p.shape, dtype=dtype, device=p.device))
        return {name: torch.cat(v, 0) for name, v in out.items()}

    return _with_fallback_retry(model, chosen, run)
