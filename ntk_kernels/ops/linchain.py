"""LinChain / LoRA linear: y = x Wᵀ + b + s · dropout(x) Aᵀ C_1ᵀ ⋯ C_kᵀ Bᵀ.

Shapes: x (..., d_in), W (d_out, d_in), b (d_out) or None, A (r, d_in), C_i (r, r), B (d_out, r).
k = 0 is LoRA, k = 1 MoSLoRA's mixer, k >= 2 LinChain (Wang et al. 2024, arXiv 2411.00039).

The chain is folded into M = C_k ⋯ C_1 (r x r) by differentiable torch matmuls before the op, so autograd
gives every C_i its own gradient from the op's gradient gM.  The op ``ntk::linchain`` (x is (N, d_in)):

  forward   u = dropout(x) Aᵀ (N, r, kept in fp32),  v = u Mᵀ,  y = x Wᵀ + b + s · v Bᵀ
  backward  gv = s · gy B,  gu = gv M
            gx = gy W + mask ⊙ (gu A) / (1 - p)      gW = gyᵀ x      gb = Σ_n gy
            gA = guᵀ dropout(x)                      gM = gvᵀ u      gB = s · gyᵀ v

The dropout mask is regenerated from an integer seed in every pass (ops/_hash_dropout.py), never stored.
Backends: C++ CPU (csrc/cpu/linchain.cpp), CUDA (csrc/cuda/linchain*.cu), Triton (ops/_linchain_triton.py)
and the plain-PyTorch reference below; ``_backend.choose`` picks one per call.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _ext
from . import _hash_dropout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NEEDS = ("x", "weight", "bias", "lora_A", "chain", "lora_B")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels accumulate in fp32 (fp64 for fp64 inputs); u is stored in this dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# The reference: written the plain way (sequential chain, materialised dropout, autograd for grads).
# Tests compare every backend against it in float64.
# ----------------------------------------------------------------------------------------------
def dropout_ref(x2d: Tensor, p: float, seed: int) -> Tensor:
    """dropout(x) with the shared hash mask, x2d (N, d_in)."""
    if p == 0.0:
        return x2d
    keep = _hash_dropout.keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return torch.where(keep, x2d / (1.0 - p), torch.zeros((), dtype=x2d.dtype, device=x2d.device))


def linchain_ref(x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p=0.0, seed=0) -> Tensor:
    """Plain-PyTorch reference of ``linchain_linear`` (training-mode dropout when dropout_p > 0)."""
    x2 = x.reshape(-1, x.shape[-1])
    h = F.linear(dropout_ref(x2, dropout_p, seed), lora_A)
    for c in (() if chain is None else chain):  # C_1 first
        h = F.linear(h, c)
    y = F.linear(x2, weight, bias) + scaling * F.linear(h, lora_B)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _fwd_reference(x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p, seed):
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    u = dropout_ref(xc, dropout_p, seed) @ lora_A.to(ct).t()
    v = u if chain is None else u @ chain.to(ct).t()
    y = torch.addmm(bias.to(ct), xc, weight.to(ct).t()) if bias is not None else xc @ weight.to(ct).t()
    y = y + scaling * (v @ lora_B.to(ct).t())
    return y.to(x.dtype), u


def _bwd_reference(grad_y, x, weight, lora_A, chain, lora_B, u, scaling, dropout_p, seed, needs):
    ct = compute_dtype(x.dtype)
    gy, xc, W, A, B = (t.to(ct) for t in (grad_y, x, weight, lora_A, lora_B))
    M = None if chain is None else chain.to(ct)
    gv = scaling * (gy @ B)
    gu = gv if M is None else gv @ M
    empty = x.new_empty(0)
    out = [empty] * 6
    if needs[0]:
        gx = gy @ W
        t = gu @ A
        if dropout_p > 0.0:
            keep = _hash_dropout.keep_mask(seed, x.shape[0], x.shape[1], dropout_p, device=x.device)
            t = torch.where(keep, t / (1.0 - dropout_p), torch.zeros((), dtype=ct, device=x.device))
        out[0] = (gx + t).to(x.dtype)
    if needs[1]:
        out[1] = (gy.t() @ xc).to(weight.dtype)
    if needs[2]:
        out[2] = gy.sum(0).to(x.dtype)
    if needs[3]:
        out[3] = (gu.t() @ dropout_ref(xc, dropout_p, seed)).to(lora_A.dtype)
    if needs[4] and M is not None:
        out[4] = (gv.t() @ u.to(ct)).to(chain.dtype)
    if needs[5]:
        v = u.to(ct) if M is None else u.to(ct) @ M.t()
        out[5] = (scaling * (gy.t() @ v)).to(lora_B.dtype)
    return tuple(out)


class _ReferenceKernels:
    forward = staticmethod(_fwd_reference)
    backward = staticmethod(_bwd_reference)


class CompiledKernels:
    """The kernels of a compiled extension's namespace (ntk_cpu: csrc/cpu, ntk_cuda: csrc/cuda), with the
    contract of ``_ReferenceKernels``; the C++ side computes bf16/fp16 in fp32."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def forward(self, x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p, seed):
        ns = getattr(torch.ops, self.namespace)
        return ns.linchain_fwd(x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p, seed)

    def backward(self, grad_y, x, weight, lora_A, chain, lora_B, u, scaling, dropout_p, seed, needs):
        ns = getattr(torch.ops, self.namespace)
        return tuple(ns.linchain_bwd(grad_y, x, weight, lora_A, chain, lora_B, u, scaling, dropout_p, seed,
                                     list(needs)))


def _cpu_reasons(device, dtype):
    r = []
    if device.type != "cpu":
        r.append(f"C++ CPU kernels run on cpu tensors, not {device.type}")
    if not _ext.cpu_loaded():
        r.append(f"extension ntk_kernels._C not loaded ({_ext.status()['_C']['why']})")
    return r


_backend.register("linchain", "reference", _ReferenceKernels)
_backend.register("linchain", "cpu", CompiledKernels("ntk_cpu"), _cpu_reasons)


# ----------------------------------------------------------------------------------------------
# The registered ops: one dispatch point, fake kernels, autograd whose backward is itself an op.
# ----------------------------------------------------------------------------------------------
def _no_autocast(x: Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


@torch.library.custom_op("ntk::linchain", mutates_args=())
def _linchain_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, chain: Optional[Tensor],
                 lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor) -> Tuple[Tensor, Tensor]:
    kernel = _backend.choose("linchain", x.device, x.dtype)
    with _no_autocast(x):  # the kernels choose their own precision; autocast must not recast their matmuls
        y, u = kernel.fn.forward(x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p, int(seed))
    return y, u


@_linchain_op.register_fake
def _(x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p, seed):
    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(x.shape[0], lora_A.shape[0], dtype=compute_dtype(x.dtype)))


@torch.library.custom_op("ntk::linchain_backward", mutates_args=())
def _linchain_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, chain: Optional[Tensor],
                          lora_B: Tensor, u: Tensor, scaling: float, dropout_p: float, seed: Tensor,
                          needs: Sequence[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kernel = _backend.choose("linchain", x.device, x.dtype)
    with _no_autocast(x):
        grads = kernel.fn.backward(grad_y.contiguous(), x, weight, lora_A, chain, lora_B, u, scaling, dropout_p,
                                   int(seed), list(needs))
    # custom ops may not return an input (or a view of one) as an output
    return tuple(g.clone() if g.numel() == 0 else g for g in grads)


@_linchain_backward_op.register_fake
def _(grad_y, x, weight, lora_A, chain, lora_B, u, scaling, dropout_p, seed, needs):
    shapes = [x, weight, grad_y.new_empty(weight.shape[0]), lora_A, chain, lora_B]
    return tuple(t.new_empty(t.shape) if need and t is not None else x.new_empty(0)
                 for need, t in zip(needs, shapes))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p, seed = inputs
    _, u = output
    ctx.save_for_backward(x, weight, lora_A, chain, lora_B, u, seed)
    ctx.scalars = (scaling, dropout_p)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(u)


def _backward(ctx, grad_y, _grad_u):
    x, weight, lora_A, chain, lora_B, u, seed = ctx.saved_tensors
    scaling, dropout_p = ctx.scalars
    needs = list(ctx.needs_input_grad[:6])
    needs[2] = needs[2] and ctx.has_bias
    needs[4] = needs[4] and chain is not None
    grads = torch.ops.ntk.linchain_backward(grad_y, x, weight, lora_A, chain, lora_B, u, scaling, dropout_p,
                                            seed, needs)
    out = [g if need else None for g, need in zip(grads, needs)]
    return (*out, None, None, None)


_linchain_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The public function.
# ----------------------------------------------------------------------------------------------
def fold_chain(chain: Union[Tensor, Sequence[Tensor], None]) -> Optional[Tensor]:
    """M = C_k ⋯ C_1 for chain (k, r, r) or a sequence [C_1, ..., C_k]; None when k = 0."""
    if chain is None:
        return None
    k = chain.shape[0] if isinstance(chain, Tensor) else len(chain)
    if k == 0:
        return None
    m = chain[0]
    for i in range(1, k):
        m = chain[i] @ m
    return m


def _shape(t) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check_inputs(x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p):
    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    for name, t in named + [("bias", bias)]:
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"linchain_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x is None or weight is None or lora_A is None or lora_B is None:
        missing = [n for n, t in named if t is None]
        raise TypeError(f"linchain_linear: {', '.join(missing)} must be tensors, got None")
    if isinstance(chain, Tensor):
        chain_list = None
        if chain.dim() != 3:
            raise ValueError(f"linchain_linear: chain must have shape (k, r, r), got {_shape(chain)}")
        named.append(("chain", chain))
    elif chain is None:
        chain_list = []
    else:
        try:
            chain_list = list(chain)
        except TypeError:
            raise TypeError(f"linchain_linear: chain must be a (k, r, r) tensor or a sequence of (r, r) "
                            f"tensors, got {type(chain).__name__}") from None
        for i, c in enumerate(chain_list):
            if not isinstance(c, Tensor):
                raise TypeError(f"linchain_linear: chain[{i}] must be a torch.Tensor, got {type(c).__name__}")
            named.append((f"chain[{i}]", c))
    if x.dim() < 1:
        raise ValueError("linchain_linear: x must have at least one dimension (..., d_in), got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"linchain_linear: weight must be 2-D (d_out, d_in), got {_shape(weight)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"linchain_linear: x has last dimension {x.shape[-1]} (shape {_shape(x)}) but weight "
                         f"{_shape(weight)} expects d_in = {d_in}")
    if x.numel() == 0:
        raise ValueError(f"linchain_linear: x is an empty batch (shape {_shape(x)}); expected at least one row")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"linchain_linear: bias must have shape ({d_out},) to match weight {_shape(weight)}, "
                         f"got {_shape(bias)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != d_in:
        raise ValueError(f"linchain_linear: lora_A must have shape (r, {d_in}), got {_shape(lora_A)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"linchain_linear: lora_A must have rank r >= 1, got {_shape(lora_A)}")
    if tuple(lora_B.shape) != (d_out, r):
        raise ValueError(f"linchain_linear: lora_B must have shape ({d_out}, {r}) (d_out, r from lora_A), "
                         f"got {_shape(lora_B)}")
    chain_items = [("chain", chain)] if chain_list is None else [(f"chain[{i}]", c) for i, c in enumerate(chain_list)]
    for name, c in chain_items:
        if c.shape[-1] != c.shape[-2]:
            raise ValueError(f"linchain_linear: {name} must be square (r, r), got {_shape(c)}")
        if c.shape[-1] != r:
            raise ValueError(f"linchain_linear: {name} must be ({r}, {r}) to match the rank of lora_A "
                             f"{_shape(lora_A)}, got {_shape(c)}")
    if bias is not None:
        named.append(("bias", bias))
    dtype, device = x.dtype, x.device
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"linchain_linear: x must be float16, bfloat16, float32 or float64, got {dtype}")
    for name, t in named:
        if t.dtype != dtype:
            raise TypeError(f"linchain_linear: {name} has dtype {t.dtype} but x has {dtype}; all tensors must "
                            f"share one dtype")
        if t.device != device:
            raise ValueError(f"linchain_linear: {name} is on {t.device} but x is on {device}; all tensors must "
                             f"be on one device")
    if isinstance(scaling, Tensor) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling):
        raise TypeError(f"linchain_linear: scaling must be a finite float, got {scaling!r}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"linchain_linear: dropout_p must be a float in [0, 1), got {dropout_p!r}")


def linchain_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                    chain: Union[Tensor, Sequence[Tensor], None], lora_B: Tensor, scaling: float,
                    dropout_p: float = 0.0, training: bool = False, *, seed: Optional[int] = None) -> Tensor:
    """Fused LinChain / LoRA linear layer.

    y = x Wᵀ + b + s · dropout(x) Aᵀ C_1ᵀ C_2ᵀ ⋯ C_kᵀ Bᵀ, i.e. ΔW = s · B C_k ⋯ C_1 A.

    Args:
        x: (..., d_in) input (2-D, 3-D, any leading dims; non-contiguous is fine).
        weight: (d_out, d_in) base weight W₀; bias: (d_out,) or None.
        lora_A: (r, d_in).  chain: (k, r, r) tensor or a sequence [C_1, ..., C_k] of (r, r); k may be 0
            (LoRA) and None means k = 0.  lora_B: (d_out, r).  scaling: s.
        dropout_p: dropout probability on the adapter's input, applied only when ``training``.
        seed: dropout seed; None draws one from torch's default CPU generator (so ``torch.manual_seed``
            makes runs reproducible).  The mask is a hash of (seed, row, column), identical on every backend.
    Returns:
        (..., d_out), same dtype as x.  Gradients flow to every input that requires them.
    """
    if isinstance(x, Tensor) and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        # as F.linear under autocast: every floating input runs in the autocast dtype (differentiably cast)
        dt = torch.get_autocast_dtype(x.device.type)
        cast = lambda t: t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
        x, weight, bias, lora_A, lora_B = (cast(t) for t in (x, weight, bias, lora_A, lora_B))
        chain = cast(chain) if chain is None or isinstance(chain, Tensor) else [cast(c) for c in chain]
    _check_inputs(x, weight, bias, lora_A, chain, lora_B, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    if _traced_by_func(x, weight, bias, lora_A, chain, lora_B):
        # torch.func transforms (vmap, jacrev, jvp) and forward-mode dual tensors cannot run through a custom op's
        # autograd: the plain-torch reference runs instead, the same function with the same dropout bits.  Under a
        # torch.func transform the mask's rows would be counted per vmapped sample, not as in the plain call:
        # dropout is refused there (evaluate with training=False / model.eval())
        if p > 0.0 and torch._C._are_functorch_transforms_active():
            raise ValueError("linchain_linear: dropout (training=True, dropout_p > 0) cannot run under torch.func "
                             "transforms (vmap / jacrev / jvp): call model.eval() or pass training=False")
        if p > 0.0 and seed is None:
            raise ValueError("linchain_linear: dropout under forward-mode AD needs an explicit seed (the same mask "
                             "as the plain call)")
        return linchain_ref(x, weight, bias, lora_A, () if chain is None else chain, lora_B, float(scaling), p,
                            0 if p == 0.0 else int(seed) & 0x7FFFFFFF)
    if p == 0.0:
        seed_t = torch.zeros((), dtype=torch.int64)
    elif seed is None:  # a tensor, not an int: torch.compile(fullgraph=True) traces it without a graph break
        seed_t = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    else:
        seed_t = torch.tensor(int(seed) & 0x7FFFFFFF, dtype=torch.int64)
    x2 = x.reshape(-1, x.shape[-1])
    y, _ = torch.ops.ntk.linchain(x2, weight, bias, lora_A, fold_chain(chain), lora_B, float(scaling), p, seed_t)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _traced_by_func(*tensors) -> bool:
    """True under a torch.func transform or when an input is a forward-mode dual tensor (per_sample_jvp, linearize,
    the eNTK engine's torch.func fallback): where the custom op cannot go."""
    if torch._C._are_functorch_transforms_active():
        return True
    flat = [t for a in tensors for t in ((a,) if isinstance(a, Tensor) else (a or ())) if isinstance(t, Tensor)]
    return any(fwAD.unpack_dual(t).tangent is not None for t in flat)


def delta_weight(lora_A: Tensor, chain, lora_B: Tensor, scaling: float) -> Tensor:
    """ΔW = s · B C_k ⋯ C_1 A  (d_out, d_in), computed in the compute dtype and returned in lora_A's dtype."""
    ct = compute_dtype(lora_A.dtype)
    m = fold_chain(chain)
    inner = lora_A.to(ct) if m is None else m.to(ct) @ lora_A.to(ct)
    return (scaling * (lora_B.to(ct) @ inner)).to(lora_A.dtype)


try:  # the Triton backend registers itself; it imports (and says why it cannot run) without triton
    from . import _linchain_triton  # noqa: F401,E402
except Exception as e:  # an optional backend must never break the package
    _backend.warn_once("linchain-triton-import", f"ntk_kernels: the Triton backend of linchain did not load ({e!r})")

try:  # the CUDA backend registers itself; without the compiled _C_cuda it says why it cannot run
    from . import _linchain_cuda  # noqa: F401,E402  registers the cuda backend
except Exception as e:  # an optional backend must never break the package
    _backend.warn_once("linchain-cuda-import", f"ntk_kernels: the CUDA backend of linchain did not load ({e!r})")
