"""Per-sample Jacobian-vector products of a model with respect to its parameters, in one forward pass.

    per_sample_jvp(model, x, v) = (f(x), J(x)·v),     J(x) = ∂f(x; θ)/∂θ at the model's parameters θ

v is one tangent per selected parameter: shaped like the parameter (one direction v for every sample, ṫ_n =
J(x_n)·v) or with a leading N dim (a direction per sample, ṫ_n = J(x_n)·v_n).

How: forward-mode AD (``torch.autograd.forward_ad``) through ``torch.func.functional_call`` with the selected
parameters as dual tensors (primal θ, tangent v), so every use of a parameter, wherever it happens (tied weights,
F.linear(h, emb.weight), ...), contributes its term.  For the duration of the call, the forward of each module
below is replaced (an instance attribute, restored afterwards) by a function that unpacks its dual input and
parameters and calls one fused kernel that computes the primal and the tangent in one pass:

  nn.Linear, transformers' Conv1D   ``ntk_kernels.ops.linear_jvp``       y = x Wᵀ + b, ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ
  nn.LayerNorm, nn.RMSNorm, and     ``ntk_kernels.ops.layer_norm_jvp``   y = x̂ ⊙ w + b (rms: no mean, no b)
  classes named *LayerNorm/*RMSNorm
  nn.Embedding (per-sample Ẇ only)  a gather                             y = W[ids],   ẏ_n = Ẇ_n[ids_n]

(only modules whose class keeps the standard forward: a subclass that overrides it, or an instance whose forward
was already replaced, e.g. by accelerate's hooks, runs as it is).  A norm is fused only where the kernel
reproduces the module's own output (max |y_fused − y_module| <= 16 ε(dtype) max |y_module|, checked on its first
call in each ``per_sample_jvp`` call): transformers' LlamaRMSNorm computes in float32 and rounds back, which in a
float64 model the kernel does not reproduce; such a norm runs its own forward under forward AD (exact).  Every
other module (Conv2d, attention, activations, ...) runs its own forward under forward AD; a module that receives no
tangent (neither a dual input nor a selected parameter) runs unchanged.

Per-sample tangents (v_n, (N, *shape)) cannot be dual parameters (a parameter has one tangent of its own shape):
the fused modules apply them directly (per-sample Ẇ_n in the kernels, input batched on dim 0).  Where a parameter
with a per-sample tangent belongs to no fused module, where a fused module holding one is called on a tensor not
batched like the samples (e.g. BERT's position embeddings on (1, T) ids) or its norm arithmetic does not match, or
where the parameter is also used outside its module (detected exactly: its dual tangent in the functional call is
NaN, which shows up in the output's tangent), the whole call is instead ``torch.func.vmap`` over the samples of
``torch.func.jvp`` of the functional call, or, where vmap fails (data-dependent control flow such as
transformers' attention-mask handling), a loop over the samples of the fused engine with that sample's
tangents (exact, slower).

Assumptions: a fused module holding a per-sample tangent sees its input batched by sample on dim 0 (batch-first
models; a sequence-first model whose T equals N would be misread, as in empirical_ntk's hooks); the model is not
called from another thread during the call (its modules' forwards are replaced for that time).  Debug messages
(logger ``ntk_kernels.ntk.jvp``) say which modules run unfused and when the per-sample fallback is taken.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD

from ..ops import jvp as jvp_ops
from .empirical import (Inputs, ParamsSpec, _batch, _check_inputs, _is_conv1d, _is_norm, _nan_inf, _slice,
                        _unsqueeze, select_params)
from .linear import _SDPA_HINT, _extract, _fcall, _state

__all__ = ["per_sample_jvp", "linearized_forward"]

log = logging.getLogger(__name__)

NORM_TOL = 16  # in units of the dtype's eps, relative to max |module output|


class _NeedLoop(Exception):
    """The fused engine cannot apply a per-sample tangent here: the call goes to the per-sample fallback."""


def _forward_ad_error(e: Exception) -> Optional[RuntimeError]:
    msg = str(e)
    if "forward AD" in msg or "forward-mode" in msg or "forward mode" in msg or "jvp" in msg.lower():
        hint = _SDPA_HINT.replace("Linearized models and ntk_vp/ntk_eigs need", "per_sample_jvp (like linearize, "
                                  "ntk_vp and ntk_eigs) needs")
        return RuntimeError(hint.format(err=msg.splitlines()[0]))
    return None


# ----------------------------------------------------------------------------------------------
# Which modules are fused
# ----------------------------------------------------------------------------------------------
def _norm_spec(m: nn.Module) -> Optional[Tuple[Tuple[bool, ...], Optional[float]]]:
    """(candidate rms flags in the order tried, eps or None for nn.RMSNorm's default) of a fusable norm."""
    if not _is_norm(m):
        return None
    rms_cls = getattr(nn, "RMSNorm", None)
    if isinstance(m, nn.LayerNorm):
        return ((False,), float(m.eps)) if type(m).forward is nn.LayerNorm.forward else None
    if rms_cls is not None and isinstance(m, rms_cls):
        if type(m).forward is not rms_cls.forward or getattr(m, "bias", None) is not None:
            return None
        return (True,), (None if m.eps is None else float(m.eps))
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    has_bias = getattr(m, "bias", None) is not None
    if "RMS" in type(m).__name__:
        return (None if has_bias else ((True,), float(eps)))
    return ((False,) if has_bias else (False, True)), float(eps)  # T5LayerNorm is an RMSNorm


def _fused_kind(m: nn.Module) -> Optional[str]:
    if "forward" in m.__dict__:  # already replaced on the instance (hooks): leave it alone
        return None
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return "linear"
    if _is_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward and m.max_norm is None:
        return "embedding"
    if _norm_spec(m) is not None:
        return "norm"
    return None


def _per_sample_ok(model: nn.Module, ps_params: Set[int]) -> Optional[str]:
    """None if every parameter with a per-sample tangent is held (as weight / bias) only by fused modules, else why
    not."""
    holders: Dict[int, list] = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in ps_params:
                holders.setdefault(id(p), []).append((mname, m, pname))
    for pid, hs in holders.items():
        for mname, m, pname in hs:
            kind = _fused_kind(m)
            if kind is None or pname not in ("weight", "bias") or (kind == "embedding" and pname != "weight"):
                return f"{mname or 'model'}.{pname} ({type(m).__name__}) has no fused per-sample kernel"
    return None


class _Fused:
    """The replaced forwards, installed on enter and removed on exit.  ``ps``: id(original parameter) -> its
    per-sample tangent (n, *shape); ``n``: the samples."""

    def __init__(self, model: nn.Module, ps: Dict[int, Tensor], n: int):
        self.ps, self.n = ps, n
        self.mods = []
        self.norm_ok: Dict[nn.Module, Optional[bool]] = {}  # module -> rms flag that matches, or None
        self.norm_spec = {}  # taken before functional_call swaps the parameters for (dual) tensors
        for name, m in model.named_modules():
            kind = _fused_kind(m)
            if kind is None:
                continue
            if kind == "norm":
                self.norm_spec[m] = _norm_spec(m)
            w = m._parameters.get("weight")
            b = m._parameters.get("bias")
            self.mods.append((m, name, kind, id(w) if w is not None else None, id(b) if b is not None else None))

    def __enter__(self):
        done = []
        try:
            for m, name, kind, wid, bid in self.mods:
                orig = m.forward  # the bound class forward
                handler = {"linear": self._linear, "conv1d": self._linear, "embedding": self._embedding,
                           "norm": self._norm}[kind]
                m.forward = _bind(handler, m, name, kind, orig, wid, bid)
                done.append(m)
        except BaseException:
            for m in done:
                del m.__dict__["forward"]
            raise
        return self

    def __exit__(self, *exc):
        for m, *_ in self.mods:
            m.__dict__.pop("forward", None)

    # -- helpers
    def _tangents(self, m, wid, bid):
        """(W, Ẇ, b, ḃ, per-sample?) for the module's current (possibly dual) weight and bias."""
        W, Wd = fwAD.unpack_dual(m.weight)
        bias = getattr(m, "bias", None)
        b, bd = fwAD.unpack_dual(bias) if isinstance(bias, Tensor) else (None, None)
        per = False
        if wid in self.ps:
            Wd, per = self.ps[wid], True
        if bid in self.ps:
            bd, per = self.ps[bid], True
        return W, Wd, b, bd, per

    def _refuse(self, per: bool, m, name, why: str):
        """A call the kernel does not take: the module's own forward (shared tangents) or the per-sample fallback."""
        if per:
            raise _NeedLoop(f"{type(m).__name__} {name!r}: {why}")
        log.debug("per_sample_jvp: %s %r runs its own forward (%s)", type(m).__name__, name, why)

    def _batched(self, x: Tensor) -> bool:
        return x.ndim >= 2 and x.shape[0] == self.n

    # -- the replaced forwards
    def _prologue(self, m, wid, bid, args, kwargs):
        """(x, ẋ, W, Ẇ, b, ḃ, per-sample) of a call the fused op takes, or None: the module runs its own forward
        (a call other than module(x), or no tangent reaches it)."""
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            return None
        xp, xd = fwAD.unpack_dual(args[0])
        W, Wd, b, bd, per = self._tangents(m, wid, bid)
        if xd is None and Wd is None and bd is None:
            return None
        return xp, xd, W, Wd, b, bd, per

    def _linear(self, m, name, kind, orig, wid, bid, *args, **kwargs):
        pro = self._prologue(m, wid, bid, args, kwargs)
        if pro is None:
            return orig(*args, **kwargs)
        xp, xd, W, Wd, b, bd, per = pro
        dts = {t.dtype for t in (xp, W, b, xd, Wd, bd) if t is not None}
        if len(dts) != 1:
            self._refuse(per, m, name, f"mixed dtypes {sorted(map(str, dts))}")
            return orig(*args)
        if xp.ndim < 1 or (per and not self._batched(xp)):
            self._refuse(per, m, name, f"input of shape {tuple(xp.shape)} not batched on dim 0 like the {self.n} "
                                       f"samples")
            return orig(*args)
        if kind == "conv1d":  # transformers' Conv1D: y = x W + b with W (d_in, d_out)
            W = W.t()
            if Wd is not None:  # shared: a view (the op takes any 2-D strides); per sample: a compact copy
                Wd = Wd.t() if Wd.ndim == 2 else Wd.transpose(1, 2).contiguous()
        if xp.shape[-1] != W.shape[1]:  # the module's own error
            return orig(*args)
        one = xp.ndim == 1
        if one:
            xp, xd = xp[None], None if xd is None else xd[None]
        y, yd = jvp_ops.linear_jvp(xp, W, b, xd, Wd, bd)
        if one:
            y, yd = y[0], yd[0]
        return fwAD.make_dual(y, yd)

    def _embedding(self, m, name, kind, orig, wid, bid, *args, **kwargs):
        Wd = self.ps.get(wid)
        if Wd is None or len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            return orig(*args, **kwargs)  # shared tangent: forward AD's own rule is one gather already
        ids = args[0]
        if ids.ndim < 1 or ids.shape[0] != self.n:
            raise _NeedLoop(f"Embedding {name!r}: ids of shape {tuple(ids.shape)} not batched on dim 0 like the "
                            f"{self.n} samples")
        W = fwAD.unpack_dual(m.weight)[0]
        y = F.embedding(ids, W, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, m.sparse)
        rows = torch.arange(self.n, device=ids.device).view(self.n, *([1] * (ids.ndim - 1)))
        return fwAD.make_dual(y, Wd[rows, ids])

    def _norm(self, m, name, kind, orig, wid, bid, *args, **kwargs):
        pro = self._prologue(m, wid, bid, args, kwargs)
        if pro is None:
            return orig(*args, **kwargs)
        xp, xd, W, Wd, b, bd, per = pro
        if m in self.norm_ok and self.norm_ok[m] is None:
            self._refuse(per, m, name, "its arithmetic is not the kernel's")
            return orig(*args)
        dts = {t.dtype for t in (xp, W, b, xd, Wd, bd) if t is not None}
        if len(dts) != 1 or xp.ndim < 2 or (per and xp.shape[0] != self.n):
            self._refuse(per, m, name, f"dtypes {sorted(map(str, dts))} or input shape {tuple(xp.shape)}")
            return orig(*args)
        cands, eps = self.norm_spec[m]
        if eps is None:
            eps = torch.finfo(xp.dtype).eps
        if m in self.norm_ok:
            return fwAD.make_dual(*jvp_ops.layer_norm_jvp(xp, W, b, eps, xd, Wd, bd, self.norm_ok[m]))
        # first call: the kernel's primal must reproduce the module's own output
        cands = [rms for rms in cands if not (rms and b is not None)]
        own = _own_primal(m, orig, xp)
        if own.numel() == 0 or not cands:  # nothing to compare on (decided at a call with data)
            if cands and own.shape == xp.shape:
                return fwAD.make_dual(*jvp_ops.layer_norm_jvp(xp, W, b, eps, xd, Wd, bd, cands[0]))
            self._refuse(per, m, name, "no kernel form fits it")
            return orig(*args)

        def matches(y, own_out):
            tol = NORM_TOL * torch.finfo(own_out.dtype).eps * own_out.abs().max().item()
            return y.shape == own_out.shape and (y - own_out).abs().max().item() <= tol

        outs = {rms: jvp_ops.layer_norm_jvp(xp, W, b, eps, xd, Wd, bd, rms) for rms in cands}
        ok = [rms for rms in cands if matches(outs[rms][0], own)]
        if len(ok) > 1:  # rows of mean zero: LayerNorm and RMSNorm agree here; a shifted input tells them apart
            shifted = xp + 1
            own_s = _own_primal(m, orig, shifted)
            ok = [rms for rms in ok if matches(jvp_ops.layer_norm_jvp(shifted, W, b, eps, rms=rms)[0], own_s)]
        if len(ok) == 1:
            self.norm_ok[m] = ok[0]
            return fwAD.make_dual(*outs[ok[0]])
        self.norm_ok[m] = None
        self._refuse(per, m, name, "its arithmetic is not the kernel's (its output differs from the kernel's)")
        return orig(*args)


def _own_primal(m: nn.Module, orig, xp: Tensor) -> Tensor:
    """The module's own output on the primal input with the primal parameters: its (dual) parameters swapped for
    their primals in ``_parameters`` (as functional_call swaps them), so that forward AD does not run (a norm's
    forward-AD rule goes through Python decompositions: slow)."""
    saved = {k: t for k, t in m._parameters.items() if t is not None}
    try:
        for k, t in saved.items():
            m._parameters[k] = fwAD.unpack_dual(t)[0]
        return fwAD.unpack_dual(orig(xp))[0]
    finally:
        m._parameters.update(saved)


def _bind(handler, m, name, kind, orig, wid, bid):
    def forward(*args, **kwargs):
        return handler(m, name, kind, orig, wid, bid, *args, **kwargs)

    return forward


# ----------------------------------------------------------------------------------------------
# The engine: one forward under forward AD
# ----------------------------------------------------------------------------------------------
def _dual_forward(model: nn.Module, primals: Dict[str, Tensor], tangents: Dict[str, Tensor], per: Set[str],
                  ps: Dict[int, Tensor], n: int, run: Callable,
                  output_fn: Optional[Callable]) -> Tuple[Tensor, Tensor]:
    """One forward under forward AD: ``primals`` (selected name -> tensor) dual with ``tangents`` (the names in
    ``per`` with a NaN tangent instead, a sentinel for uses the fused modules do not cover; their per-sample
    tangents ``ps`` are applied by the fused modules), the fused modules' forwards replaced; ``run(state)`` calls
    the model through functional_call.  No autograd graph (see linearized_forward for one)."""
    with torch.no_grad(), fwAD.dual_level(), _Fused(model, ps, n):
        sel = {name: fwAD.make_dual(p0, torch.full_like(p0, math.nan) if name in per else tangents[name])
               for name, p0 in primals.items()}
        try:
            out = run(_state(model, sel))
        except (NotImplementedError, RuntimeError) as e:
            hint = _forward_ad_error(e)
            if hint is not None:
                raise hint from e
            raise
        y, yd = fwAD.unpack_dual(_extract(out, output_fn))
        yd = torch.zeros_like(y) if yd is None else yd
    return y, yd


def _fused_jvp(model: nn.Module, x: Inputs, chosen: Sequence[Tuple[str, nn.Parameter]], tangents: Dict[str, Tensor],
               per: Set[str], n: int, output_fn: Optional[Callable]) -> Tuple[Tensor, Tensor]:
    """(f, J·v) for inputs x, detached.  Raises _NeedLoop where a per-sample tangent cannot be applied."""
    ps = {id(p): tangents[name] for name, p in chosen if name in per}
    primals = {name: p.detach() for name, p in chosen}
    y, yd = _dual_forward(model, primals, tangents, per, ps, n, lambda state: _fcall(model, state, x), output_fn)
    if per and torch.isnan(yd).any():
        raise _NeedLoop("a parameter with a per-sample tangent is used outside the fused modules (or the "
                        "output's tangent is NaN)")
    return y.detach(), yd.detach()


def linearized_forward(model: nn.Module, theta0: Mapping[str, Tensor], delta: Mapping[str, Tensor], args: tuple = (),
                       kwargs: Optional[dict] = None, output_fn: Optional[Callable] = None) -> Tensor:
    """f(x; θ₀) + J(x)·δ through the fused engine, differentiable in δ (autograd records: reverse over forward),
    for ``linearize``: θ₀ and δ map the selected parameters' names to tensors of their shapes (δ = θ − θ₀, shared
    by all samples); args / kwargs the model's arguments; output_fn as in ``per_sample_jvp`` (any shape).  The
    same values as LinearizedModel.forward's torch.func.jvp, without argument checks (the caller's).  Training
    cost: the fused ops' backward re-runs their reference forward under autograd, so forward + backward is
    slower than torch.func's today (about 2x on the CPU); the forward alone is at parity."""
    kwargs = kwargs or {}

    def f(sel):
        return _extract(torch.func.functional_call(model, _state(model, sel), tuple(args), kwargs), output_fn)

    # torch.func.jvp's forward AD (not a bare dual_level: under autograd, the latter's softmax rule fails the
    # backward with an in-place error); the replaced forwards unpack its dual tensors the same way
    with _Fused(model, {}, 0):
        try:
            y, yd = torch.func.jvp(f, (dict(theta0),), (dict(delta),))
        except (NotImplementedError, RuntimeError) as e:
            hint = _forward_ad_error(e)
            if hint is not None:
                raise hint from e
            raise
    return y + yd


def _per_sample_fallback(model: nn.Module, x: Inputs, chosen, tangents: Dict[str, Tensor], per: Set[str], n: int,
                         output_fn: Optional[Callable]) -> Tuple[Tensor, Tensor]:
    """vmap over the samples of torch.func.jvp of the functional call; where vmap fails, a loop over the samples
    of the fused engine with that sample's tangents."""
    names = [name for name, _ in chosen]
    primals = {name: p.detach() for name, p in chosen}

    def one(xi, ti):
        def f(sel):
            out = _extract(_fcall(model, _state(model, sel), _unsqueeze(xi)), output_fn)
            if out.ndim < 1 or out.shape[0] != 1:
                raise ValueError(f"output_fn must give a tensor batched on dim 0 (N, ...), got shape "
                                 f"{tuple(out.shape)} for one sample")
            return out[0]

        return torch.func.jvp(f, (primals,), (ti,))

    in_dims = (0, {name: 0 if name in per else None for name in names})
    try:
        with torch.no_grad():
            y, yd = torch.func.vmap(one, in_dims=in_dims)(x, dict(tangents))
        log.debug("per_sample_jvp: per-sample tangents through vmap of torch.func.jvp")
        return y.detach(), yd.detach()
    except Exception as e:  # noqa: BLE001 - data-dependent control flow etc.: the loop below is exact
        log.debug("per_sample_jvp: vmap failed (%s); looping over the samples", str(e).splitlines()[0][:200])
    ys, yds = [], []
    for i in range(n):
        ti = {name: (t[i] if name in per else t) for name, t in tangents.items()}
        y, yd = _fused_jvp(model, _slice(x, i, i + 1), chosen, ti, set(), 1, output_fn)
        _check_batched(y, 1)
        ys.append(y)
        yds.append(yd)
    return torch.cat(ys), torch.cat(yds)


def _check_batched(y: Tensor, n: int) -> None:
    if y.ndim < 1 or y.shape[0] != n:
        raise ValueError(f"output_fn must give a tensor batched on dim 0 like the {n} samples (N, ...) for "
                         f"per-sample tangents, got shape {tuple(y.shape)}")


# ----------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------
def _check_tangents(tangents, chosen, n: int, all_names) -> Tuple[Dict[str, Tensor], Set[str]]:
    if not isinstance(tangents, Mapping):
        raise TypeError(f"tangents must be a mapping parameter name -> Tensor, got {type(tangents).__name__}")
    want = {name: p for name, p in chosen}
    missing = [name for name in want if name not in tangents]
    extra = [k for k in tangents if k not in want]
    if missing:
        shapes = ", ".join(f"{k!r}: {tuple(want[k].shape)}" for k in missing[:8])
        raise ValueError(f"tangents is missing {len(missing)} selected parameter(s): {shapes}"
                         f"{' ...' if len(missing) > 8 else ''} (each needs a tangent shaped like the parameter, or "
                         f"(N={n}, *shape) for a direction per sample)")
    if extra:
        unknown = [k for k in extra if k not in all_names]
        if unknown:
            raise ValueError(f"tangents has keys that are not parameters of the model: {unknown[:8]} (its "
                             f"parameters: {list(all_names)[:8]}{' ...' if len(all_names) > 8 else ''})")
        raise ValueError(f"tangents has keys of parameters that params does not select: {extra[:8]} (selected: "
                         f"{list(want)[:8]}{' ...' if len(want) > 8 else ''}; pass params covering them)")
    out, per = {}, set()
    for name, p in chosen:
        t = tangents[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"tangents[{name!r}] must be a Tensor, got {type(t).__name__}")
        shape, ts = tuple(p.shape), tuple(t.shape)
        if ts == (n, *shape):
            per.add(name)
        elif ts != shape:
            if t.ndim == p.ndim + 1 and ts[1:] == shape:
                raise ValueError(f"tangents[{name!r}] has a per-sample dim of {ts[0]} but the inputs have N={n} "
                                 f"samples: expected {(n, *shape)} (a direction per sample) or {shape}")
            raise ValueError(f"tangents[{name!r}] must have the parameter's shape {shape} (one direction for all "
                             f"samples) or (N={n}, *{shape}) (a direction per sample), got {ts}")
        if t.dtype != p.dtype:
            raise TypeError(f"tangents[{name!r}] must have the parameter's dtype {p.dtype}, got {t.dtype}")
        if t.device != p.device:
            raise ValueError(f"tangents[{name!r}] must be on the parameter's device {p.device}, got {t.device}")
        out[name] = t.detach()
    return out, per


def _finite_or_raise(result: Tuple[Tensor, Tensor], tans: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """A NaN or inf tangent is refused, by name, when the result shows it: the output tangent (small) is checked,
    the tangents (N·P numbers for per-sample directions: a pass over them costs 20-25 % of a small MLP's call) only
    when it is not finite.  Finite tangents with a non-finite result (the model overflows) return as they are."""
    yd = result[1]
    if (yd.is_floating_point() or yd.is_complex()) and any(_nan_inf(yd)):
        _refuse_nonfinite(tans)
    return result


def _refuse_nonfinite(tans: Dict[str, Tensor]) -> None:
    for name, t in tans.items():
        if (t.is_floating_point() or t.is_complex()) and any(_nan_inf(t)):
            raise ValueError(f"tangents[{name!r}] contains NaN or inf")


def per_sample_jvp(model: nn.Module, inputs: Inputs, tangents: Mapping[str, Tensor], *, params: ParamsSpec = None,
                   output_fn: Optional[Callable] = None) -> Tuple[Tensor, Tensor]:
    """(f(x), J(x)·v): the model's output and its Jacobian-vector product with respect to the parameters.

    model      an nn.Module (call ``model.eval()`` first if it has dropout).
    inputs     Tensor (N, ...) batched on dim 0, the model's one argument, or a mapping of such tensors (keyword
               arguments, e.g. input_ids and attention_mask).
    tangents   {name: v} for exactly the parameters selected by ``params``: v shaped like the parameter (one
               direction for every sample: ṫ_n = J(x_n)·v) or (N, *shape) (a direction per sample:
               ṫ_n = J(x_n)·v_n); the parameter's dtype and device.
    params     the parameters with a tangent (as in ``empirical_ntk``): None (every parameter with requires_grad),
               a list of names, a regex (re.search on the name) or a predicate (name, param) -> bool; the others
               have tangent 0.
    output_fn  model output -> tensor; default: the output itself or its ``.logits``.  With per-sample tangents
               it must be batched on dim 0 (N, ...).
    A NaN or inf tangent that reaches the output raises ValueError naming it.
    Returns (f, ṫ), both output_fn's shape, detached (no autograd graph):
        ṫ = Σ_p ∂f(x)/∂θ_p · v_p,  per sample n:  ṫ_n = Σ_p ∂f(x_n)/∂θ_p · v_{n,p}.

    One forward in forward-mode AD.  Fused (primal and tangent in one kernel): nn.Linear and transformers' Conv1D
    (``ntk_kernels.ops.linear_jvp``), nn.LayerNorm / nn.RMSNorm / classes named *LayerNorm, *RMSNorm whose
    arithmetic the kernel reproduces (``ntk_kernels.ops.layer_norm_jvp``; checked against the module's own output
    on its first call, e.g. LlamaRMSNorm in a float64 model computes in float32 and is not fused), nn.Embedding
    with per-sample tangents (a gather of Ẇ_n at sample n's ids).  Every other module runs its forward under
    torch's forward AD (exact); modules without a tangent run unchanged.  Per-sample tangents of parameters outside
    the fused modules (or used outside them, or on inputs not batched on dim 0) take torch.func.vmap over the
    samples of torch.func.jvp, or a loop over the samples where vmap fails (transformers' attention masks): exact,
    slower.  Forward-mode AD: models with SDPA attention on CPU raise an error asking for
    attn_implementation="eager".
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_inputs("inputs", inputs)
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be callable or None, got {type(output_fn).__name__}")
    chosen = select_params(model, params)
    n = _batch(inputs)
    tans, per = _check_tangents(tangents, chosen, n, dict(model.named_parameters()))
    if not per:
        return _finite_or_raise(_fused_jvp(model, inputs, chosen, tans, per, n, output_fn), tans)
    why = _per_sample_ok(model, {id(p) for name, p in chosen if name in per})
    if why is None:
        try:
            y, yd = _fused_jvp(model, inputs, chosen, tans, per, n, output_fn)
            _check_batched(y, n)
            return _finite_or_raise((y, yd), tans)
        except _NeedLoop as e:  # (a NaN in a tangent looks like the sentinel that raises this: refuse it first)
            _refuse_nonfinite(tans)
            why = str(e)
    log.debug("per_sample_jvp: per-sample fallback: %s", why)
    return _finite_or_raise(_per_sample_fallback(model, inputs, chosen, tans, per, n, output_fn), tans)
