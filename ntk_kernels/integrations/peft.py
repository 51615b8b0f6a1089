"""peft integration: fused LoRA layers and LinChain adapters.

A peft ``lora.Linear`` computes y = base(x) + s · B A dropout(x) in three matmuls plus an add.
``linchain_linear`` computes the same, and LinChain's y = x W₀ᵀ + b + s · dropout(x) Aᵀ C_1ᵀ ⋯ C_kᵀ Bᵀ, in one op.

``fuse_lora(model)``: every peft ``lora.Linear`` that can run fused has its class swapped (``__class__``) for
``FusedLoraLinear``, a subclass that adds no state and only overrides ``forward``.  The module object, its
Parameters, hooks, ``state_dict`` keys, ``save_pretrained``, ``merge_and_unload`` and optimizers already built are
therefore unchanged; ``unfuse_lora(model)`` swaps the class back.  The fused forward falls back to peft's own
whenever the layer's state asks for it (merged, adapters disabled, ``adapter_names=...`` or other extra arguments,
several active adapters, a LoRA variant such as DoRA, ``lora_bias``, hooks on the base layer, an empty batch).

``linchain_config(lora_config, chain_length, chain_init)``: a ``LinChainConfig`` (a ``LoraConfig`` subclass) whose
layers are ``PeftLinChainLinear``: LoRA plus a chain ``lora_chain[adapter]`` of shape (k, r, r), stored as
[C_1, ..., C_k], so ΔW = s · B C_k ⋯ C_1 A.  peft's ``save_pretrained`` keeps the chain (its key contains
``lora_``); the config is written with ``"peft_type": "LINCHAIN"``, a type this module registers with peft on
import, so ``PeftModel.from_pretrained`` rebuilds LinChain layers when this module is imported and fails with
``KeyError: 'LINCHAIN'`` when it is not, instead of silently loading plain LoRA.

dtypes: the op takes one dtype.  A fused layer computes in the base weight's dtype (the autocast dtype under
``torch.autocast``); adapter weights of another dtype (peft keeps fp32 adapters on a bf16 base) are cast, a
differentiable copy of r·(d_in + d_out) + k·r² elements per call, while the fp32 Parameters stay the optimizer's
copy.  The op accumulates in fp32 and keeps u = dropout(x) Aᵀ in fp32; peft instead runs the adapter path in
fp32, so the two agree to the base dtype's rounding, not bitwise.

GPT-2's ``Conv1D`` (``fan_in_fan_out=True``) stores W₀ as (d_in, d_out) and computes x W₀ + b: the op gets
``W₀.T``, a strided view, never copied here (the CPU kernel's ATen matmuls and the Triton kernels use its strides);
a gradient for a trainable W₀ comes back (d_out, d_in) and autograd transposes it into the Conv1D layout.  lora_A
and lora_B are (r, d_in) and (d_out, r) as for nn.Linear; only merging transposes ΔW.

Dropout: the fused op draws its mask from a hash of (seed, row, column), the seed from torch's default CPU
generator, so ``torch.manual_seed`` makes runs reproducible; the mask differs from ``nn.Dropout``'s (same law).

Versions (tested with peft 0.21.2): ``fuse_lora`` reads only long-standing ``lora.Linear`` attributes; LinChain
layers need peft >= 0.19 (custom layers receive ``config=``); the guard that makes a plain ``lora.Linear`` refuse a
LinChain adapter (instead of dropping its chain) relies on peft >= 0.21's ``is_lora_variant`` field metadata.
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import transpose
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..nn.linchain import CHAIN_INITS, init_chain_
from ..ops.linchain import FLOAT_DTYPES, delta_weight, linchain_linear

__all__ = ["fuse_lora", "unfuse_lora", "FusedLoraLinear", "linchain_config", "LinChainConfig", "PeftLinChainLinear",
           "LINCHAIN_PEFT_TYPE", "CHAIN_INITS"]

LINCHAIN_PEFT_TYPE = "LINCHAIN"


# ----------------------------------------------------------------------------------------------
# When a layer can run as one linchain_linear call.
# ----------------------------------------------------------------------------------------------
def _has_hooks(m: nn.Module) -> bool:
    # accelerate's offloading hooks replace ``forward`` on the instance instead of registering hooks
    return bool(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") or "forward" in m.__dict__)


def _base_reason(base: nn.Module, at_call: bool = True) -> Optional[str]:
    """Why the base layer cannot be read as y = x Wᵀ + b by the op (None: it can); ``at_call=False`` checks only
    what cannot change later (type, weight type and dtype), not offloading or hooks."""
    if not isinstance(base, (nn.Linear, Conv1D)):
        return f"base layer {type(base).__name__} is not nn.Linear or transformers Conv1D"
    w = getattr(base, "weight", None)
    if type(w) not in (nn.Parameter, Tensor) or w.dtype not in FLOAT_DTYPES:
        what = "None" if w is None else f"{type(w).__name__} {w.dtype}"
        return f"base weight is {what} (quantised or sharded weights are not fused)"
    if at_call and w.device.type == "meta":
        return "base weight is on the meta device (offloaded)"
    if at_call and _has_hooks(base):
        return "base layer has forward hooks (e.g. accelerate offloading), which a fused call would skip"
    return None


def _adapter_reason(layer: LoraLayer, adapter: str) -> Optional[str]:
    """Why adapter ``adapter`` of ``layer`` cannot go through the op (None: it can)."""
    if adapter in layer.lora_variant:
        return f"LoRA variant {type(layer.lora_variant[adapter]).__name__} (adapter '{adapter}')"
    if layer.lora_bias.get(adapter, False):
        return f"lora_bias=True (adapter '{adapter}')"
    if type(layer.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout is {type(layer.lora_dropout[adapter]).__name__} (adapter '{adapter}')"
    if not isinstance(layer.scaling[adapter], numbers.Real):
        return f"scaling is {type(layer.scaling[adapter]).__name__}, not a float (adapter '{adapter}')"
    if _has_hooks(layer.lora_A[adapter]) or _has_hooks(layer.lora_B[adapter]):
        return f"lora_A / lora_B have forward hooks (e.g. tensor parallelism) (adapter '{adapter}')"
    device = layer.get_base_layer().weight.device
    chain = getattr(layer, "lora_chain", {})
    for t in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, chain.get(adapter)):
        if t is not None and (type(t) not in (nn.Parameter, Tensor) or t.dtype not in FLOAT_DTYPES):
            return f"adapter weight is {type(t).__name__} {t.dtype} (adapter '{adapter}')"
        if t is not None and t.device != device:
            return f"adapter weights on {t.device}, base weight on {device} (adapter '{adapter}')"
    return None


def _active(layer: LoraLayer):
    return [a for a in layer.active_adapters if a in layer.lora_A]


def _fused_adapter(layer: LoraLayer) -> Tuple[Optional[str], Optional[str]]:
    """(adapter, None) when the layer's forward is one linchain_linear call for ``adapter``, else (None, reason)."""
    reason = _base_reason(layer.get_base_layer())
    active = _active(layer)
    if reason is None and len(active) != 1:
        reason = f"{len(active)} active adapters {active}" if active else "no active adapter"
    if reason is None:
        reason = _adapter_reason(layer, active[0])
    return (None, reason) if reason else (active[0], None)


def _fused_linear(layer: LoraLayer, adapter: str, x: Tensor, chain: Optional[Tensor]) -> Tensor:
    """base(x) + s · B C_k ⋯ C_1 A dropout(x) for one adapter, as one ``linchain_linear`` call.

    Conv1D (GPT-2, ``fan_in_fan_out``) stores W as (d_in, d_out) and computes x W + b: the op gets ``W.T``, a
    strided view, no copy here.  Outside autocast everything is cast to the base weight's dtype (peft may keep
    fp32 adapters on a bf16 base); under ``torch.autocast`` the op itself casts to the autocast dtype.
    """
    base = layer.get_base_layer()
    weight = base.weight.T if isinstance(base, Conv1D) else base.weight
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    cast = (lambda t: t) if autocast else (lambda t: None if t is None else t.to(weight.dtype))  # noqa: E731
    drop = layer.lora_dropout[adapter]
    p = drop.p if isinstance(drop, nn.Dropout) else 0.0
    return linchain_linear(cast(x), weight, cast(base.bias), cast(layer.lora_A[adapter].weight), cast(chain),
                           cast(layer.lora_B[adapter].weight), float(layer.scaling[adapter]), p,
                           training=drop.training)


# ----------------------------------------------------------------------------------------------
# fuse_lora / unfuse_lora
# ----------------------------------------------------------------------------------------------
class FusedLoraLinear(LoraLinear):
    """peft ``lora.Linear`` whose forward is one ``linchain_linear`` call (k = 0):

        y = x W₀ᵀ + b + s · dropout(x) Aᵀ Bᵀ      (W₀ of a Conv1D base is its stored weight transposed)

    Made only by ``fuse_lora``, which swaps the class of an existing layer; holds exactly the state of the
    ``lora.Linear`` it was.  Falls back to peft's forward when the layer cannot run fused at call time.
    """

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter = None
        if not (args or kwargs or self.disable_adapters or self.merged or x.numel() == 0):
            adapter, _ = _fused_adapter(self)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        return _fused_linear(self, adapter, x, None)


def fuse_lora(model: nn.Module, strict: bool = False) -> nn.Module:
    """Run every peft ``lora.Linear`` of ``model`` that can be fused through ``linchain_linear``, in place.

    Each fusable layer keeps its identity and its Parameters (its class becomes ``FusedLoraLinear``), so
    ``state_dict``, ``save_pretrained``, ``merge_and_unload``, existing optimizers and ``unfuse_lora`` keep working.
    A layer is fusable when it is a plain ``lora.Linear`` over an ``nn.Linear`` or transformers ``Conv1D`` with a
    floating-point weight, with exactly one active adapter that is plain LoRA (no DoRA or other variant, no
    ``lora_bias``, dropout ``nn.Dropout`` or none).  Other LoRA layers keep peft's forward and are listed in one
    warning, or, with ``strict=True``, in a ``ValueError`` raised before any layer is changed.
    ``PeftLinChainLinear`` layers already run fused and are left as they are.

    Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_lora: model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("fuse_lora: model has no peft LoRA layers; pass the model returned by get_peft_model or "
                         "PeftModel.from_pretrained")
    todo, skipped = [], {}
    for name, m in layers:
        if isinstance(m, (FusedLoraLinear, PeftLinChainLinear)):
            continue
        reason = (f"peft {type(m).__name__} layer, only lora.Linear is fused" if type(m) is not LoraLinear
                  else _fused_adapter(m)[1])
        if reason:
            skipped[name or "<model>"] = reason
        else:
            todo.append(m)
    if skipped:
        msg = (f"{len(skipped)} LoRA layer(s) cannot run fused and keep peft's forward: "
               + "; ".join(f"{n} ({r})" for n, r in skipped.items()))
        if strict:
            raise ValueError(f"fuse_lora(strict=True): {msg}")
        warnings.warn(f"fuse_lora: {msg}", stacklevel=2)
    for m in todo:
        m.__class__ = FusedLoraLinear
    return model


def unfuse_lora(model: nn.Module) -> nn.Module:
    """Undo ``fuse_lora``: every ``FusedLoraLinear`` of ``model`` is a peft ``lora.Linear`` again. Returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse_lora: model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if type(m) is FusedLoraLinear:
            m.__class__ = LoraLinear
    return model


# ----------------------------------------------------------------------------------------------
# LinChain adapters
# ----------------------------------------------------------------------------------------------
def _init_chain(k: int, r: int, how: str, device=None, dtype=None) -> Tensor:
    """(k, r, r) chain [C_1, ..., C_k]: identity (ΔW starts as LoRA's B A), kaiming uniform with a = √5 on each
    C_i (MoSLoRA's mixer init, |c| ≤ 1/√r), or orthogonal C_i.  Drawn in fp32, returned in ``dtype``."""
    if how not in CHAIN_INITS:
        raise ValueError(f"chain_init must be one of {CHAIN_INITS}, got {how!r}")
    c = torch.empty(k, r, r, device=device, dtype=torch.float32)
    if c.device.type != "meta":  # peft's low_cpu_mem_usage builds layers on meta; the checkpoint fills them
        init_chain_(c, how)
    return c.to(dtype or torch.float32)


class PeftLinChainLinear(LoraLinear):
    """LoRA layer with a chain of k (r × r) matrices between A and B (LinChain; k = 1 is MoSLoRA's mixer):

        y = x W₀ᵀ + b + s · dropout(x) Aᵀ C_1ᵀ ⋯ C_kᵀ Bᵀ,      ΔW = s · B C_k ⋯ C_1 A

    A (r, d_in) = ``lora_A[adapter].weight``, B (d_out, r) = ``lora_B[adapter].weight``, the chain (k, r, r) =
    ``lora_chain[adapter]``.  Built by peft from a ``LinChainConfig``; forward is one ``linchain_linear`` call for
    the first active adapter, the others (and anything that cannot be fused) are added unfused.  ``merge`` folds
    the chain into W₀ through ``get_delta_weight``.  An adapter added from a plain ``LoraConfig`` has no chain.
    """

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_chain",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        where = kwargs.get("target_name") or type(base).__name__
        if kwargs.get("parameter_name") is not None:
            raise ValueError(f"LinChain adapters target modules, not parameters (target_parameters), got {where}")
        reason = _base_reason(base, at_call=False)  # offloaded or hooked base layers run unfused at call time
        if reason:
            raise ValueError(f"LinChain adapters need nn.Linear or transformers Conv1D target modules with "
                             f"floating-point weights; target {where!r}: {reason}")
        is_conv1d = isinstance(base, Conv1D)
        if config.fan_in_fan_out != is_conv1d:  # as peft's own dispatch does for lora.Linear
            warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} but target {where!r} is {type(base).__name__}; "
                          f"setting fan_in_fan_out={is_conv1d}")
            config.fan_in_fan_out = is_conv1d
        super().__init__(base_layer, adapter_name, config=config, is_target_conv_1d_layer=is_conv1d, **kwargs)

    @property
    def lora_variants(self):
        # "chain_length" is tagged as a LoRA variant in LinChainConfig: plain lora.Linear layers refuse it
        # (peft raises "unsupported variant combination"), this class accepts it as a plain adapter
        return {(): None, ("chain_length",): None}

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        # a plain LoraConfig adapter (no chain) may join a LinChain layer; resolve it as a LinChain config, so
        # variants (DoRA, ...) are refused here too
        if not isinstance(config, LinChainConfig):
            config = linchain_config(config, chain_length=1)
        return super().resolve_lora_variant(config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, *args, config: Optional[LoraConfig] = None, **kwargs) -> None:
        if "lora_chain" not in self._modules:  # set_adapter in super().update_layer visits it
            self.lora_chain = nn.ParameterDict()
        if config is None:
            raise TypeError("PeftLinChainLinear needs a peft version whose LoraLayer.update_layer receives config=")
        super().update_layer(adapter_name, r, *args, config=config, **kwargs)
        if adapter_name in self.lora_chain:
            del self.lora_chain[adapter_name]
        k = getattr(config, "chain_length", 0)
        if k:
            a = self.lora_A[adapter_name].weight
            chain = _init_chain(k, r, config.chain_init, a.device, a.dtype)
            trainable = adapter_name in self.active_adapters and not config.inference_mode
            self.lora_chain[adapter_name] = nn.Parameter(chain, requires_grad=trainable)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """ΔW = s · B C_k ⋯ C_1 A, transposed for a Conv1D base (computed in fp32, returned in the adapter dtype)."""
        w = delta_weight(self.lora_A[adapter].weight, self.lora_chain.get(adapter), self.lora_B[adapter].weight,
                         self.scaling[adapter])
        return transpose(w, self.fan_in_fan_out)

    def _delta(self, adapter: str, x: Tensor) -> Tensor:
        """s · B C_k ⋯ C_1 A dropout(x), unfused (in the adapter dtype, as peft computes LoRA)."""
        h = self.lora_A[adapter](self.lora_dropout[adapter](x.to(self.lora_A[adapter].weight.dtype)))
        chain = self.lora_chain.get(adapter)
        for c in (() if chain is None else chain):
            h = F.linear(h, c)
        return self.lora_B[adapter](h) * self.scaling[adapter]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        extra = [k for k, v in kwargs.items() if v is not None]  # peft passes variant kwargs (alora_offsets=None)
        if args or extra:
            raise TypeError(f"PeftLinChainLinear.forward takes x (and adapter_names), got extra arguments "
                            f"{len(args)} positional, {extra}")
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged:
            return self.base_layer(x)
        if adapter_names is not None:  # mixed batch: row i uses adapter adapter_names[i]
            y = self.base_layer(x)
            for a in set(adapter_names) & set(self.lora_A):
                rows = [i for i, n in enumerate(adapter_names) if n == a]
                y[rows] += self._delta(a, x[rows]).to(y.dtype)
            return y
        active = _active(self)
        if active and x.numel() > 0 and _base_reason(self.get_base_layer()) is None \
                and _adapter_reason(self, active[0]) is None:
            y = _fused_linear(self, active[0], x, self.lora_chain.get(active[0]))
            active = active[1:]
        else:
            y = self.base_layer(x)
        for a in active:
            y = y + self._delta(a, x).to(y.dtype)
        return y


@dataclasses.dataclass
class LinChainConfig(LoraConfig):
    """``LoraConfig`` whose target layers become ``PeftLinChainLinear``: ΔW = s · B C_k ⋯ C_1 A, k = ``chain_length``.

    Build it with ``linchain_config(lora_config, chain_length, chain_init)`` or directly with LoraConfig's
    arguments.  Saved with ``"peft_type": "LINCHAIN"`` (see the module docstring).
    """

    chain_length: int = dataclasses.field(
        default=1, metadata={"help": "k, the number of (r x r) matrices between A and B", "is_lora_variant": True})
    chain_init: str = dataclasses.field(
        default="identity", metadata={"help": f"initialisation of the chain, one of {CHAIN_INITS}"})

    def __post_init__(self):
        super().__post_init__()
        k = self.chain_length
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"chain_length must be an int >= 1 (use a plain LoraConfig for k = 0), got {k!r}")
        if self.chain_init not in CHAIN_INITS:
            raise ValueError(f"chain_init must be one of {CHAIN_INITS}, got {self.chain_init!r}")
        for name in ("use_dora", "lora_bias", "target_parameters"):
            if getattr(self, name, None):
                raise ValueError(f"LinChain adapters do not support {name}={getattr(self, name)!r}")
        if self.init_lora_weights not in (True, False, "gaussian") and self.chain_init != "identity":
            # PiSSA, OLoRA, LoftQ, ... subtract s·B A from W₀, which equals ΔW only for an identity chain
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} needs chain_init='identity', got "
                             f"{self.chain_init!r}")
        self._register_custom_module({nn.Module: PeftLinChainLinear})  # every target; unsupported ones raise

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["peft_type"] = LINCHAIN_PEFT_TYPE  # on disk: not loadable as plain LoRA
        return d

    @classmethod
    def check_kwargs(cls, **kwargs):
        kwargs = super().check_kwargs(**kwargs)
        if kwargs.get("peft_type") == LINCHAIN_PEFT_TYPE:
            del kwargs["peft_type"]  # from_peft_type then builds cls; __post_init__ sets PeftType.LORA
        return kwargs


def linchain_config(lora_config: LoraConfig, chain_length: int, chain_init: str = "identity") -> LinChainConfig:
    """A ``LinChainConfig`` with every field of ``lora_config`` plus the chain.

    ``get_peft_model(model, linchain_config(LoraConfig(r=8, target_modules=[...]), chain_length=2))`` gives layers
    y = x W₀ᵀ + b + s · dropout(x) Aᵀ C_1ᵀ ⋯ C_kᵀ Bᵀ with A (r, d_in), C_i (r, r), B (d_out, r), s = α/r (α/√r for
    rsLoRA).  ``chain_init``: "identity" (C_i = I, so the adapter starts as LoRA), "kaiming" (kaiming_uniform with
    a = √5, MoSLoRA's mixer init) or "orthogonal".  peft still initialises B = 0, so ΔW = 0 at the start.
    """
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"linchain_config: lora_config must be a peft LoraConfig, got {type(lora_config).__name__}")
    fields = {f.name: getattr(lora_config, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
    fields.update(chain_length=chain_length, chain_init=chain_init)
    return LinChainConfig(**fields)


# PeftModel.from_pretrained / load_adapter / AutoPeftModel look the saved peft_type up in this mapping
PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(LINCHAIN_PEFT_TYPE, LinChainConfig)
