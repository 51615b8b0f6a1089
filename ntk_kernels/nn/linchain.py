"""``LinChainLinear``: a linear layer with a LinChain adapter, run through the fused ``ntk::linchain`` op.

W = W₀ + s · B C_k ⋯ C_1 A with A (r, d_in), C_i (r, r), B (d_out, r), s = alpha / r.

Initialisation (the LinChain paper, arXiv 2411.00039, does not publish its own, so these are our choices):
  A: kaiming-uniform (a = √5), as peft's LoRA;  B: zeros, as peft, so the layer starts equal to W₀;
  C_i: "identity" (the chain starts as plain LoRA), "kaiming" (kaiming-uniform a = √5, MoSLoRA's mixer
  init) or "orthogonal" (torch.nn.init.orthogonal_).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.linchain import delta_weight, linchain_linear

CHAIN_INITS = ("identity", "kaiming", "orthogonal")


def init_chain_(chain: Tensor, how: str) -> Tensor:
    """Initialise a (k, r, r) chain in place with one of CHAIN_INITS."""
    if how not in CHAIN_INITS:
        raise ValueError(f"chain_init must be one of {CHAIN_INITS}, got {how!r}")
    with torch.no_grad():
        for c in chain:
            if how == "identity":
                c.copy_(torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
            elif how == "kaiming":
                nn.init.kaiming_uniform_(c, a=math.sqrt(5))
            else:
                nn.init.orthogonal_(c)
    return chain


class LinChainLinear(nn.Module):
    """y = x W₀ᵀ + b + s · dropout(x) Aᵀ C_1ᵀ ⋯ C_kᵀ Bᵀ, fused; ``merge()`` folds ΔW into W₀ for inference.

    Args:
        in_features, out_features: d_in, d_out.  rank: r >= 1.  chain_length: k >= 0 (0 is LoRA).
        alpha: s = alpha / r; None means alpha = r (s = 1).  bias: whether W₀ has a bias.
        dropout: dropout probability on the adapter input (training only).  chain_init: see module doc.
    Parameters: weight (d_out, d_in), bias (d_out), lora_A (r, d_in), lora_chain (k, r, r) (None when k = 0),
    lora_B (d_out, r).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, chain_length: int = 2,
                 alpha: Optional[float] = None, bias: bool = True, dropout: float = 0.0,
                 chain_init: str = "identity", device=None, dtype=None):
        super().__init__()
        for name, v, lo in (("in_features", in_features, 1), ("out_features", out_features, 1), ("rank", rank, 1),
                            ("chain_length", chain_length, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"LinChainLinear: {name} must be an int >= {lo}, got {v!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"LinChainLinear: dropout must be in [0, 1), got {dropout!r}")
        if chain_init not in CHAIN_INITS:
            raise ValueError(f"LinChainLinear: chain_init must be one of {CHAIN_INITS}, got {chain_init!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank, self.chain_length = in_features, out_features, rank, chain_length
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.dropout = float(dropout)
        self.chain_init = chain_init
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        # k = 0 (plain LoRA) has no chain parameter at all, rather than an empty one that never gets a gradient
        self.lora_chain = nn.Parameter(torch.empty(chain_length, rank, rank, **kw)) if chain_length else None
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self._merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)  # W₀ and b as nn.Linear
        self.reset_adapter()

    def reset_adapter(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.lora_chain is not None:
            init_chain_(self.lora_chain, self.chain_init)
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, chain_length: int = 2, alpha: Optional[float] = None,
                    dropout: float = 0.0, chain_init: str = "identity") -> "LinChainLinear":
        """Wrap an nn.Linear: its weight and bias become the frozen W₀ (the same Parameter objects)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinChainLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, chain_length, alpha, bias=linear.bias is not None,
                    dropout=dropout, chain_init=chain_init, device=w.device, dtype=w.dtype)
        layer.weight = w
        layer.bias = linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        return layer

    @property
    def merged(self) -> bool:
        return self._merged

    def delta_weight(self) -> Tensor:
        """ΔW = s · B C_k ⋯ C_1 A, (d_out, d_in)."""
        return delta_weight(self.lora_A, self.lora_chain, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """W₀ ← W₀ + ΔW; the forward pass is then a plain linear.  Merging twice raises."""
        if self._merged:
            raise RuntimeError("LinChainLinear.merge: already merged")
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W₀ ← W₀ − ΔW (exact up to the rounding of W₀'s dtype)."""
        if not self._merged:
            raise RuntimeError("LinChainLinear.unmerge: not merged")
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self._merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self._merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return linchain_linear(x, self.weight, self.bias, self.lora_A, self.lora_chain, self.lora_B, self.scaling,
                               self.dropout, self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"chain_length={self.chain_length}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"bias={self.bias is not None}, merged={self._merged}")
