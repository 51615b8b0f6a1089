"""Kernel analyses that take a model: the LP-FT decomposition of the eNTK into head and feature parts, and the
ranking of parameter subsets (layers, LoRA adapters, ...) by the spectrum of their eNTK."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..ntk.empirical import ParamsSpec, empirical_ntk, select_params
from ._spectrum import Spectrum, spectrum


def _kernel_trace(K: Tensor) -> float:
    """Σ_n Σ_c K[n, n, c, c] (full), Σ_n Σ_c K[n, n, c] (diagonal) or Σ_n K[n, n] (trace)."""
    d = K.diagonal(dim1=0, dim2=1)  # (..., N)
    if K.ndim == 4:
        d = d.diagonal(dim1=0, dim2=1)
    return d.sum().item()


@dataclass(frozen=True)
class LPFTDecomposition:
    """Θ = K_head + K_features (Tomihari & Sato 2024), in the mode asked for.

    K_head       eNTK over the head's parameters: (φ(x)ᵀφ(x') + 1)·I_C for a linear head with bias
    K_features   eNTK over every other selected parameter: V J_φ(x) J_φ(x')ᵀ Vᵀ (zeros when none is selected)
    head_norm    ‖V‖_F, the Frobenius norm of the head's weight
    head_names, feature_names  the parameters of each part
    """
    K_head: Tensor
    K_features: Tensor
    head_norm: float
    head_names: List[str] = field(repr=False)
    feature_names: List[str] = field(repr=False)

    @property
    def total(self) -> Tensor:
        """The eNTK over every selected parameter."""
        return self.K_head + self.K_features

    @property
    def feature_fraction(self) -> float:
        """trace(K_features) / trace(Θ) for a square kernel (inputs2=None): the share of the features in the
        eNTK, small while the head norm is small."""
        if self.K_head.shape[0] != self.K_head.shape[1]:
            raise ValueError("feature_fraction needs a square kernel (inputs2=None)")
        tot = _kernel_trace(self.total)
        return _kernel_trace(self.K_features) / tot if tot != 0 else math.nan


def _head_prefix(model: nn.Module, head: Union[nn.Module, str]) -> str:
    if isinstance(head, str):
        modules = dict(model.named_modules())
        if head not in modules or head == "":
            raise ValueError(f"head: no submodule named {head!r} in the model")
        return head
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be the head nn.Module (e.g. an nn.Linear) or its name, got {type(head).__name__}")
    for name, m in model.named_modules():
        if m is head and name:
            return name
    raise ValueError(f"head ({type(head).__name__}) is not a submodule of the model")


def lpft_decomposition(model: nn.Module, inputs1, inputs2=None, *, head: Union[nn.Module, str],
                       params: ParamsSpec = None, mode: str = "full", output_fn: Optional[Callable] = None,
                       **ntk_kwargs) -> LPFTDecomposition:
    """The eNTK of a model f(x) = V φ(x) + b with a linear head, split into its head and feature parts, after
    Tomihari & Sato (2024), "Understanding linear probing then fine-tuning language models from NTK perspective":

        Θ(x, x') = (φ(x)ᵀφ(x') + 1)·I_C  +  V J_φ(x) J_φ(x')ᵀ Vᵀ
                 =  K_head               +  K_features

    K_head is the eNTK restricted to the head's parameters (V and b), K_features the eNTK restricted to every
    other selected parameter (J_φ = ∂φ/∂θ_features).  K_features scales with the head: replacing V by sV scales it
    by s², so the head norm ‖V‖_F governs how much fine-tuning changes the features, which is why linear probing
    first (a trained head of moderate norm) then fine-tuning (LP-FT) changes features less than FT from a random
    head.  The closed form of K_head holds when the head's output is the model's output and the head is applied
    once per sample (sequence classification); the split itself (K_head + K_features = Θ) always holds.

    model, inputs1, inputs2, mode, output_fn, ``ntk_kwargs`` (block_size, dtype, strategy, ...): as for
                 ``empirical_ntk``.
    head         the head module (its weight V, bias b) or its qualified name, e.g. "classifier".
    params       the parameters of Θ (as in ``empirical_ntk``: None = every parameter with requires_grad); the
                 head's parameters among them form K_head, the rest K_features.
    Returns ``LPFTDecomposition`` (K_head, K_features, head_norm, and total / feature_fraction).
    """
    prefix = _head_prefix(model, head)
    head_mod = dict(model.named_modules())[prefix]
    head_all = {f"{prefix}.{n}" for n, _ in head_mod.named_parameters()}
    weight = getattr(head_mod, "weight", None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"head {prefix!r} has no weight tensor V")
    chosen = [n for n, _ in select_params(model, params)]
    head_names = [n for n in chosen if n in head_all]
    feature_names = [n for n in chosen if n not in head_all]
    if not head_names:
        raise ValueError(f"params selects none of the head's parameters {sorted(head_all)} (the head {prefix!r} is "
                         f"tied elsewhere, or params excludes it)")
    K_head = empirical_ntk(model, inputs1, inputs2, params=head_names, mode=mode, output_fn=output_fn, **ntk_kwargs)
    if feature_names:
        K_feat = empirical_ntk(model, inputs1, inputs2, params=feature_names, mode=mode, output_fn=output_fn,
                               **ntk_kwargs)
    else:
        K_feat = torch.zeros_like(K_head)
    return LPFTDecomposition(K_head, K_feat, weight.detach().double().norm().item(), head_names, feature_names)


# ----------------------------------------------------------------------------------------------
# layer selection
# ----------------------------------------------------------------------------------------------
CRITERIA = {"effective_rank": True, "condition_number": False, "lambda_max": True, "lambda_min": True,
            "trace": True}  # criterion -> larger is better (descending)


@dataclass(frozen=True)
class Candidate:
    """One candidate parameter set of ``layer_selection``: its name, the parameters it selects (and their count),
    its eNTK, that kernel's ``Spectrum`` and the score it was ranked by."""
    name: str
    params: List[str] = field(repr=False)
    n_params: int
    kernel: Tensor = field(repr=False)
    spectrum: Spectrum
    score: float

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "n_params": self.n_params, "score": self.score,
                **self.spectrum.as_dict(eigenvalues=False)}


def layer_selection(model: nn.Module, inputs, candidates: Mapping[str, ParamsSpec], *,
                    rank_by: Union[str, Callable[[Spectrum], float]] = "effective_rank",
                    descending: Optional[bool] = None, mode: str = "trace", output_fn: Optional[Callable] = None,
                    **ntk_kwargs) -> List[Candidate]:
    """Rank candidate parameter sets (which layers to fine-tune) by the spectrum of the eNTK restricted to each.

    For each candidate S, K_S(x, x') = Σ_{p ∈ S} ∂f(x)/∂θ_p ∂f(x')/∂θ_pᵀ = ``empirical_ntk(model, inputs,
    params=S, mode=mode)`` and its ``spectrum``.  A kernel of larger effective rank spreads the training signal over
    more directions (linearised fine-tuning fits more of the targets at a given ridge or step count); a smaller
    condition number means gradient descent converges in fewer steps on the linearised model (rate set by
    λ_min/λ_max).

    candidates   {name: params spec} (a list of names, a regex, or a predicate (name, param) -> bool, as in
                 ``empirical_ntk``), e.g. {"lora": r"lora_", "attention": r"attention", "head": ["classifier.weight"]}.
    rank_by      "effective_rank" (default, larger first), "condition_number" (smaller first), "lambda_max",
                 "lambda_min", "trace" (larger first), or a callable Spectrum -> float (larger first).
    descending   override the order (True: larger scores first).
    mode         the eNTK mode, "trace" by default ((N, N), a kernel of N eigenvalues); "full" gives the (N·C)
                 spectrum; ``ntk_kwargs`` (block_size, dtype, strategy, ...) go to ``empirical_ntk``.
    Returns the candidates as ``Candidate`` objects, best first (ties keep the dict's order).
    """
    if not isinstance(candidates, Mapping) or not candidates:
        raise ValueError("candidates must be a non-empty mapping {name: params spec}")
    if callable(rank_by):
        score_fn, desc = rank_by, True
    elif rank_by in CRITERIA:
        score_fn, desc = (lambda s: getattr(s, rank_by)), CRITERIA[rank_by]
    else:
        raise ValueError(f"rank_by must be one of {tuple(CRITERIA)} or a callable Spectrum -> float, got {rank_by!r}")
    if descending is not None:
        if not isinstance(descending, bool):
            raise TypeError(f"descending must be a bool or None, got {type(descending).__name__}")
        desc = descending
    results = []
    for name, spec in candidates.items():
        try:
            chosen = select_params(model, spec)
        except (ValueError, TypeError) as e:
            raise type(e)(f"candidate {name!r}: {e}") from None
        names = [n for n, _ in chosen]
        K = empirical_ntk(model, inputs, params=names, mode=mode, output_fn=output_fn, **ntk_kwargs)
        spec_ = spectrum(K)
        score = float(score_fn(spec_))
        results.append(Candidate(str(name), names, sum(p.numel() for _, p in chosen), K, spec_, score))
    # NaN scores last; stable sort keeps the mapping's order among ties
    key = (lambda c: (math.isnan(c.score), -c.score if desc else c.score))
    return sorted(results, key=key)
