"""Forward-mode kernels: a layer's output and its Jacobian-vector product in one pass.

The linearized model f_lin(x; θ) = f(x; θ₀) + J(x)(θ − θ₀) needs, layer by layer, the primal y and the
tangent ẏ for a tangent ẋ of the input and tangents of the layer's parameters.  These ops compute both
from one read of x and W (the unfused way, torch.func.jvp, runs the primal and two tangent products as
separate passes):

``linear_jvp(x, weight, bias=None, x_dot=None, weight_dot=None, bias_dot=None)`` -> (y, y_dot)
    x (N, *, d_in); weight (d_out, d_in), any 2-D strides (a transposed view is fine: GPT-2's Conv1D);
    bias (d_out,) or None; x_dot like x or None (zero);
    weight_dot (d_out, d_in) — one direction for every sample — or (N, d_out, d_in) — a direction per
    sample; bias_dot (d_out,) or (N, d_out) likewise; None means zero.
    y = x Wᵀ + b,   ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ    (per-sample: ẏ_n = ẋ_n Wᵀ + x_n Ẇ_nᵀ + ḃ_n)

``layer_norm_jvp(x, weight, bias, eps, x_dot=None, weight_dot=None, bias_dot=None, rms=False)`` -> (y, y_dot)
    normalises over the last dim; weight, bias (D,) or None (bias must be None when rms);
    weight_dot, bias_dot (D,) or (N, D).
    LayerNorm: x̂ = (x − μ)/σ, σ = sqrt(var + eps);  RMSNorm (rms=True): x̂ = x / sqrt(mean(x²) + eps)
    y = x̂ ⊙ w + b,   ẏ = x̂̇ ⊙ w + x̂ ⊙ ẇ + ḃ  with
      LayerNorm  x̂̇ = (ẋ − mean(ẋ) − x̂ · mean(ẋ ⊙ x̂)) / σ
      RMSNorm    x̂̇ = (ẋ − x̂ · mean(ẋ ⊙ x̂)) / r,  r = sqrt(mean(x²) + eps)

All tensors share one floating dtype (fp16, bf16, fp32, fp64); kernels accumulate in fp32 (fp64 for fp64)
and return x's dtype.  Both ops are differentiable (for training the linearized model): the backward
differentiates the reference formulas with autograd.

Backends (``ntk_kernels._backend``, op names "linear_jvp" and "layer_norm_jvp"): C++ CPU
(csrc/cpu/jvp.cpp), Triton (ops/_jvp_triton.py), CUDA (csrc/cuda/jvp_kernels.cu) and the plain-PyTorch
reference below.  A backend function takes the arguments of the op with x and x_dot flattened to
(N, L, d_in) / (N, L, D) and returns (y, y_dot) as (N, L, d_out) / (N, L, D) in x's dtype.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _c(t: Optional[Tensor], ct: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(ct)


# ----------------------------------------------------------------------------------------------
# References: the definitions, in the compute dtype.  x is (N, L, d_in).
# ----------------------------------------------------------------------------------------------
def linear_jvp_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, x_dot: Optional[Tensor] = None,
                   weight_dot: Optional[Tensor] = None, bias_dot: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Plain-PyTorch reference of ``linear_jvp`` (x (N, L, d_in)); returns (y, y_dot) in x's dtype."""
    ct = compute_dtype(x.dtype)
    xc, W, b, xd, Wd, bd = (_c(t, ct) for t in (x, weight, bias, x_dot, weight_dot, bias_dot))
    y = xc @ W.t()
    if b is not None:
        y = y + b
    yd = torch.zeros_like(y)
    if xd is not None:
        yd = yd + xd @ W.t()
    if Wd is not None:
        yd = yd + (xc @ Wd.t() if Wd.ndim == 2 else torch.bmm(xc, Wd.transpose(1, 2)))
    if bd is not None:
        yd = yd + (bd if bd.ndim == 1 else bd[:, None, :])
    return y.to(x.dtype), yd.to(x.dtype)


def layer_norm_jvp_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       x_dot: Optional[Tensor] = None, weight_dot: Optional[Tensor] = None,
                       bias_dot: Optional[Tensor] = None, rms: bool = False) -> Tuple[Tensor, Tensor]:
    """Plain-PyTorch reference of ``layer_norm_jvp`` (x (N, L, D)); returns (y, y_dot) in x's dtype."""
    ct = compute_dtype(x.dtype)
    xc, w, b, xd, wd, bd = (_c(t, ct) for t in (x, weight, bias, x_dot, weight_dot, bias_dot))
    if rms:
        r = torch.sqrt((xc * xc).mean(-1, keepdim=True) + eps)
        xh = xc / r
    else:
        mu = xc.mean(-1, keepdim=True)
        r = torch.sqrt(((xc - mu) ** 2).mean(-1, keepdim=True) + eps)
        xh = (xc - mu) / r
    y = xh if w is None else xh * w
    if b is not None:
        y = y + b
    yd = torch.zeros_like(y)
    if xd is not None:
        proj = (xd * xh).mean(-1, keepdim=True)
        xhd = (xd - xh * proj) / r if rms else (xd - xd.mean(-1, keepdim=True) - xh * proj) / r
        yd = yd + (xhd if w is None else xhd * w)
    if wd is not None:
        yd = yd + xh * (wd if wd.ndim == 1 else wd[:, None, :])
    if bd is not None:
        yd = yd + (bd if bd.ndim == 1 else bd[:, None, :])
    return y.to(x.dtype), yd.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Input checks (the public functions; errors name the argument)
# ----------------------------------------------------------------------------------------------
def _check_common(x: Tensor, named) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must have a floating dtype of {FLOAT_DTYPES}, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must be (N, *, features) with a batch dim, got shape {tuple(x.shape)}")
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _check_vec(name: str, t: Optional[Tensor], n: int, d: int, per_sample_ok: bool = True) -> None:
    if t is None:
        return
    ok = tuple(t.shape) == (d,) or (per_sample_ok and tuple(t.shape) == (n, d))
    if not ok:
        raise ValueError(f"{name} must be ({d},) or (N={n}, {d}), got shape {tuple(t.shape)}")


def check_linear_jvp_inputs(x, weight, bias, x_dot, weight_dot, bias_dot) -> None:
    _check_common(x, (("weight", weight), ("bias", bias), ("x_dot", x_dot), ("weight_dot", weight_dot),
                      ("bias_dot", bias_dot)))
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a (d_out, d_in) Tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    d_out, d_in = weight.shape
    n = x.shape[0]
    if x.shape[-1] != d_in:
        raise ValueError(f"x's last dim must be weight's d_in={d_in}, got shape {tuple(x.shape)}")
    if x_dot is not None and x_dot.shape != x.shape:
        raise ValueError(f"x_dot must have x's shape {tuple(x.shape)}, got {tuple(x_dot.shape)}")
    if weight_dot is not None and tuple(weight_dot.shape) not in ((d_out, d_in), (n, d_out, d_in)):
        raise ValueError(f"weight_dot must be ({d_out}, {d_in}) or (N={n}, {d_out}, {d_in}), got shape "
                         f"{tuple(weight_dot.shape)}")
    _check_vec("bias", bias, n, d_out, per_sample_ok=False)
    _check_vec("bias_dot", bias_dot, n, d_out)


def check_layer_norm_jvp_inputs(x, weight, bias, eps, x_dot, weight_dot, bias_dot, rms) -> None:
    _check_common(x, (("weight", weight), ("bias", bias), ("x_dot", x_dot), ("weight_dot", weight_dot),
                      ("bias_dot", bias_dot)))
    n, D = x.shape[0], x.shape[-1]
    if x_dot is not None and x_dot.shape != x.shape:
        raise ValueError(f"x_dot must have x's shape {tuple(x.shape)}, got {tuple(x_dot.shape)}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    _check_vec("weight", weight, n, D, per_sample_ok=False)
    _check_vec("bias", bias, n, D, per_sample_ok=False)
    _check_vec("weight_dot", weight_dot, n, D)
    _check_vec("bias_dot", bias_dot, n, D)
    if weight is None and weight_dot is not None:
        raise ValueError("weight_dot needs weight (a norm without weight has no weight tangent)")
    if bias is None and bias_dot is not None:
        raise ValueError("bias_dot needs bias (a norm without bias has no bias tangent)")
    if rms and bias is not None:
        raise ValueError("rms=True takes no bias (RMSNorm has none)")


# ----------------------------------------------------------------------------------------------
# The ops.  Backward: autograd through the reference (exact; the kernels are forward-only).
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("ntk::linear_jvp", mutates_args=())
def _linear_jvp_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], x_dot: Optional[Tensor],
                   weight_dot: Optional[Tensor], bias_dot: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    kernel = _backend.choose("linear_jvp", x.device, x.dtype)
    y, yd = kernel.fn(x.contiguous(), weight, bias, None if x_dot is None else x_dot.contiguous(), weight_dot,
                      bias_dot)
    return y, yd


@_linear_jvp_op.register_fake
def _(x, weight, bias, x_dot, weight_dot, bias_dot):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("ntk::layer_norm_jvp", mutates_args=())
def _layer_norm_jvp_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       x_dot: Optional[Tensor], weight_dot: Optional[Tensor], bias_dot: Optional[Tensor],
                       rms: bool) -> Tuple[Tensor, Tensor]:
    kernel = _backend.choose("layer_norm_jvp", x.device, x.dtype)
    return kernel.fn(x.contiguous(), weight, bias, eps, None if x_dot is None else x_dot.contiguous(),
                     weight_dot, bias_dot, rms)


@_layer_norm_jvp_op.register_fake
def _(x, weight, bias, eps, x_dot, weight_dot, bias_dot, rms):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _setup_saving_inputs(ctx, inputs, output):
    ctx.save_for_backward(*[t if isinstance(t, Tensor) else None for t in inputs])
    ctx.others = [None if isinstance(t, Tensor) else t for t in inputs]
    ctx.present = [isinstance(t, Tensor) for t in inputs]


def _backward_through(ref):
    def backward(ctx, gy, gyd):
        saved = list(ctx.saved_tensors)
        args = [s if p else o for s, p, o in zip(saved, ctx.present, ctx.others)]
        wanted = [i for i, (t, p) in enumerate(zip(args, ctx.present)) if p and ctx.needs_input_grad[i]]
        grads = [None] * len(args)
        if not wanted:
            return tuple(grads)
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_(True) if i in wanted else a for i, a in enumerate(args)]
            y, yd = ref(*leaves)
            outs, gouts = [], []
            for o, g in ((y, gy), (yd, gyd)):
                if g is not None and o.requires_grad:
                    outs.append(o)
                    gouts.append(g)
            got = torch.autograd.grad(outs, [leaves[i] for i in wanted], gouts, allow_unused=True)
        for i, g in zip(wanted, got):
            grads[i] = g
        return tuple(grads)

    return backward


_linear_jvp_op.register_autograd(_backward_through(lambda x, w, b, xd, wd, bd: linear_jvp_ref(x, w, b, xd, wd, bd)),
                                 setup_context=_setup_saving_inputs)
_layer_norm_jvp_op.register_autograd(
    _backward_through(lambda x, w, b, eps, xd, wd, bd, rms: layer_norm_jvp_ref(x, w, b, eps, xd, wd, bd, rms)),
    setup_context=_setup_saving_inputs)


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    # the middle size spelled out: reshape cannot infer -1 when N = 0
    return None if t is None else t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def linear_jvp(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, x_dot: Optional[Tensor] = None,
               weight_dot: Optional[Tensor] = None, bias_dot: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(y, ẏ) = (x Wᵀ + b, ẋ Wᵀ + x Ẇᵀ + ḃ) in one pass (see the module docstring for shapes)."""
    check_linear_jvp_inputs(x, weight, bias, x_dot, weight_dot, bias_dot)
    y, yd = _linear_jvp_op(_flat(x), weight, bias, _flat(x_dot), weight_dot, bias_dot)
    shape = (*x.shape[:-1], weight.shape[0])
    return y.reshape(shape), yd.reshape(shape)


def layer_norm_jvp(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   x_dot: Optional[Tensor] = None, weight_dot: Optional[Tensor] = None,
                   bias_dot: Optional[Tensor] = None, rms: bool = False) -> Tuple[Tensor, Tensor]:
    """(y, ẏ) of LayerNorm (or RMSNorm, rms=True) over the last dim in one pass (see the module docstring)."""
    check_layer_norm_jvp_inputs(x, weight, bias, eps, x_dot, weight_dot, bias_dot, rms)
    y, yd = _layer_norm_jvp_op(_flat(x), weight, bias, float(eps), _flat(x_dot), weight_dot, bias_dot, bool(rms))
    return y.reshape(x.shape), yd.reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Backend registration
# ----------------------------------------------------------------------------------------------
def _reference_reasons(device, dtype) -> List[str]:
    return [] if dtype in FLOAT_DTYPES else [f"takes {FLOAT_DTYPES}, not {dtype}"]


_backend.register("linear_jvp", "reference", linear_jvp_ref, _reference_reasons)
_backend.register("layer_norm_jvp", "reference", layer_norm_jvp_ref, _reference_reasons)

# Compiled backends register themselves in their own modules; a failed import leaves the others.
import importlib as _importlib  # noqa: E402

for _mod in ("_jvp_cpu", "_jvp_triton", "_jvp_cuda"):
    try:
        _importlib.import_module(f"{__package__}.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__package__}.{_mod}":
            _backend.warn_once(f"jvp-{_mod}-import", f"ntk_kernels: the {_mod[5:]} backend of the jvp ops did not "
                                                     f"load ({_e!r})")
    except Exception as _e:
        _backend.warn_once(f"jvp-{_mod}-import", f"ntk_kernels: the {_mod[5:]} backend of the jvp ops did not "
                                                 f"load ({_e!r})")
