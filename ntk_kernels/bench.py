"""The microbenchmark suite behind ``ntk-kernels bench``: every public op against what a user would otherwise run.

Benches (``--only NAME``), each timed against its baselines in the same run, on the same inputs:
  linchain        LinChainLinear (the fused ``ntk::linchain`` op), forward + backward, against peft's LoRA layer
                  (k = 0) or the plain-torch chain dropout -> A -> C_1..C_k -> B a user writes (k > 0), and a
                  frozen nn.Linear (no adapter: the floor, so its ratio is below 1 and says what the adapter costs)
  gram            ops.gram_contract against the einsum a user writes (ops.gram_contract_ref: forms the T x S
                  token Gram and output-gradient Grams), features and token ids
  ntk_mlp         empirical_ntk against the torch.func recipe (jacrev + vmap + einsum, ntk.empirical_ntk_reference)
  ntk_bert        the same on a tiny BertForSequenceClassification (random weights, eager attention, input_ids only)
  linear_jvp      ops.linear_jvp against torch.func.jvp(F.linear)
  layer_norm_jvp  ops.layer_norm_jvp against torch.func.jvp(F.layer_norm)
  per_sample_jvp  ntk_kernels.per_sample_jvp against torch.func.jvp (one direction v for all samples) and
                  vmap over samples of torch.func.jvp (a direction v_n per sample), on the MLP (where present)
The models are built in code from a fixed seed; nothing is downloaded.

Timing.  CUDA with Triton: ``triton.testing.do_bench`` (CUDA events, L2 flushed, median).  Otherwise: the
implementations run in turn, one call each per round (ours, baseline 1, baseline 2, ours, ...) after a warm-up
round, for as many rounds as fit in the size's budget (3 to 50): the time is the median over rounds, and the ratio
baseline/ours is the median of the per-round ratios, so the slow drift of a shared machine cancels.  The
interquartile range of the times is kept in the JSON.

Peak memory.  CUDA: ``torch.cuda.max_memory_allocated`` during one call minus the memory allocated before it.
CPU (Linux): the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) during
one call over its resident set before it.  glibc keeps freed heap memory resident, so for that call it is told
(mallopt) to serve blocks of 64 KiB or more by mmap, and free heap pages are returned first (malloc_trim): the
resident set then follows the live tensors.  It counts everything the call touches, allocator slack included,
not only tensors; elsewhere it is reported as unknown (None).

FLOP/s are given where an explicit count exists (the formulas are in each bench's ``flops``); the eNTK benches
have none (the two methods do different work) and report the agreement of the two kernels instead.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

SIZES = ("tiny", "quick", "full")
# seconds of timing per comparison, and the bounds on the interleaved rounds
BUDGET = {"tiny": 0.2, "quick": 2.0, "full": 10.0}
ROUNDS = {"tiny": (2, 5), "quick": (3, 50), "full": (5, 100)}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """A bench (or one baseline) that cannot run here; the message says why."""


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    size: str
    log: Callable[[str], None] = lambda msg: None

    @property
    def budget_s(self) -> float:
        return BUDGET[self.size]


@dataclass
class Bench:
    name: str
    summary: str
    cases: Dict[str, List[dict]]  # size -> cases
    run: Callable[[dict, Context], List[dict]]  # one case -> result rows
    needs: List[str] = field(default_factory=list)  # importable modules it needs


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: List[float], q: float) -> float:
    """The q-quantile, linearly interpolated between order statistics (numpy's default, as triton's do_bench):
    the median of an even count is the mean of the two middle values."""
    import numpy as np

    if not len(values):
        raise ValueError("_quantile: values must be non-empty")
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def time_calls(fns: Dict[str, Callable[[], object]], ours: str, ctx: Context) -> Dict[str, dict]:
    """name -> {median_s, q25_s, q75_s, ratio (median over rounds of t_name / t_ours), rounds}."""
    device = ctx.device
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        import triton.testing

        out = {}
        for name, fn in fns.items():
            q = triton.testing.do_bench(fn, warmup=25, rep=max(50, int(ctx.budget_s * 1000 / len(fns))),
                                        quantiles=[0.5, 0.25, 0.75], return_mode="median")
            med, q25, q75 = (v / 1e3 for v in q)
            out[name] = {"median_s": med, "q25_s": q25, "q75_s": q75, "rounds": None}
        for name in fns:
            out[name]["ratio"] = out[name]["median_s"] / out[ours]["median_s"]
        return out
    t0 = time.perf_counter()
    for fn in fns.values():  # warm-up: first-call allocations, lazy init, autotuning
        fn()
    _sync(device)
    per_round = max(time.perf_counter() - t0, 1e-6)
    lo, hi = ROUNDS[ctx.size]
    rounds = int(min(hi, max(lo, ctx.budget_s / per_round)))
    times: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            s = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - s)
    out = {}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, times[ours])]
        out[name] = {"median_s": _quantile(t, 0.5), "q25_s": _quantile(t, 0.25), "q75_s": _quantile(t, 0.75),
                     "ratio": _quantile(ratios, 0.5), "rounds": rounds}
    return out


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory one call of ``fn`` uses beyond what was live before it (see the module docstring); None where
    it cannot be measured."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    try:
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _rss_kib("VmRSS")
        fn()
        return max(0, (_rss_kib("VmHWM") - base) * 1024)
    except OSError:
        return None
    finally:
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's ceiling for its dynamic threshold


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (float64)."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((o - r).abs().max() / r.abs().max().clamp_min(1e-300))


def compare(bench: str, case: dict, label: str, fns: Dict[str, Callable[[], object]], ours: str, ctx: Context,
            flops: Optional[Dict[str, float]] = None, extra: Optional[Dict[str, dict]] = None) -> List[dict]:
    """Times ``fns`` (ours first in the result), measures each one's peak memory, and returns one row each."""
    timed = time_calls(fns, ours, ctx)
    rows = []
    for name in [ours] + [n for n in fns if n != ours]:
        t = timed[name]
        peak = peak_memory_bytes(fns[name], ctx.device)
        f = (flops or {}).get(name)
        row = {"bench": bench, "case": label, "shapes": dict(case), "impl": name,
               "role": "ours" if name == ours else "baseline", "dtype": str(ctx.dtype).replace("torch.", ""),
               "device": str(ctx.device), "median_ms": t["median_s"] * 1e3, "q25_ms": t["q25_s"] * 1e3,
               "q75_ms": t["q75_s"] * 1e3, "rounds": t["rounds"],
               # baseline / ours: > 1 means ntk_kernels is that many times faster than this baseline
               "speedup": None if name == ours else t["ratio"],
               "gflops": None if f is None else f / t["median_s"] / 1e9,
               "peak_mib": None if peak is None else peak / 2 ** 20}
        row.update((extra or {}).get(name, {}))
        rows.append(row)
    return rows


def skipped(bench: str, label: str, case: dict, reason: str) -> dict:
    return {"bench": bench, "case": label, "shapes": dict(case), "impl": None, "role": "skipped", "note": reason}


def _backend_of(op: str, ctx: Context, dtype: Optional[torch.dtype] = None) -> str:
    from . import _backend

    try:
        return _backend.choose(op, ctx.device, dtype or ctx.dtype).backend
    except RuntimeError as e:
        return f"none ({e})"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, ctx: Context, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(ctx.device, ctx.dtype)


# ----------------------------------------------------------------------------------------------
# linchain: LinChainLinear vs peft LoRA / the unfused chain / nn.Linear, forward + backward
# ----------------------------------------------------------------------------------------------
class UnfusedChain(nn.Module):
    """base(x) + s · B(C_k(⋯C_1(A(dropout(x))))): the chain as a user writes it in plain torch."""

    def __init__(self, base: nn.Linear, r: int, k: int, p: float):
        super().__init__()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base, self.drop = base, nn.Dropout(p)
        self.A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.C = nn.ModuleList(nn.Linear(r, r, bias=False, **kw) for _ in range(k))
        self.B = nn.Linear(r, base.out_features, bias=False, **kw)

    def forward(self, x):
        h = self.A(self.drop(x))
        for c in self.C:
            h = c(h)
        return self.base(x) + self.B(h)


def _linchain_flops(case: dict, with_adapter: bool) -> float:
    """fwd+bwd: 2·N·d·d (x Wᵀ) + 2·N·d·d (gx = gy W); adapter 2·N·r·(2d + k·r) forward and
    2·N·r·(3d + 2k·r) + 4·N·d·r backward."""
    n, d, r, k = case["N"], case["d"], case["r"], case["k"]
    base = 4.0 * n * d * d
    return base + (2.0 * n * r * (2 * d + k * r) + 2.0 * n * r * (3 * d + 2 * k * r) + 4.0 * d * r * n
                   if with_adapter else 0.0)


def run_linchain(case: dict, ctx: Context) -> List[dict]:
    from .nn import LinChainLinear

    torch.manual_seed(0)
    d, r, k, p = case["d"], case["r"], case["k"], case["p"]
    label = f"N={case['N']} d={d} r={r} k={k} p={p}"
    kw = {"device": ctx.device, "dtype": ctx.dtype}
    base = nn.Linear(d, d, **kw).requires_grad_(False)
    ours = LinChainLinear.from_linear(base, rank=r, chain_length=k, dropout=p)
    nn.init.normal_(ours.lora_B, std=0.02)
    layers = {"ntk_kernels.LinChainLinear": ours}
    if k == 0:
        try:
            from peft import LoraConfig
            from peft.tuners.lora import Linear as PeftLoraLinear

            peft_layer = PeftLoraLinear(base, "default", LoraConfig(r=r, lora_alpha=r, lora_dropout=p), r=r,
                                        lora_alpha=r, lora_dropout=p)
            nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)
            layers["peft.lora.Linear"] = peft_layer.to(**kw)
        except ImportError as e:
            ctx.log(f"linchain: peft not importable ({e}); comparing against the plain-torch chain")
            layers["torch unfused chain"] = UnfusedChain(base, r, k, p)
    else:
        unfused = UnfusedChain(base, r, k, p)
        nn.init.normal_(unfused.B.weight, std=0.02)
        layers["torch unfused chain"] = unfused
    layers["nn.Linear (no adapter)"] = base
    x = _randn(case["N"], d, ctx=ctx, seed=1).requires_grad_(True)
    gy = _randn(case["N"], d, ctx=ctx, seed=2)
    fns = {}
    for name, layer in layers.items():
        layer.train()
        fns[name] = lambda layer=layer: layer(x).backward(gy)
    flops = {n: _linchain_flops(case, not n.startswith("nn.Linear")) for n in layers}
    extra = {"ntk_kernels.LinChainLinear": {"backend": _backend_of("linchain", ctx)}}
    return compare("linchain", case, label, fns, "ntk_kernels.LinChainLinear", ctx, flops, extra)


# ----------------------------------------------------------------------------------------------
# gram: ops.gram_contract vs the einsum reference
# ----------------------------------------------------------------------------------------------
def _gram_flops(case: dict) -> Optional[float]:
    """Per pair (i, j): 2·T·S·D (token Gram, features only) + 2·C·T·S·E (H = (A_i A_jᵀ) G_j) + 2·Cp·C·T·E
    (⟨G_i, H⟩; Cp = C for "full", 1 otherwise)."""
    I, J, C, T, S, D, E = (case[k] for k in ("I", "J", "C", "T", "S", "D", "E"))
    cp = C if case["mode"] == "full" else 1
    tok = 2.0 * T * S * D if not case["ids"] else 0.0
    return I * J * (tok + 2.0 * C * T * S * E + 2.0 * cp * C * T * E)


def run_gram(case: dict, ctx: Context) -> List[dict]:
    from .ops import gram_contract, gram_contract_ref

    I, J, C, T, S, D, E, mode = (case[k] for k in ("I", "J", "C", "T", "S", "D", "E", "mode"))
    label = f"{'ids' if case['ids'] else 'features'} {mode} I=J={I} C={C} T=S={T} D={D} E={E}"
    if case["ids"]:
        g = _gen(3)
        a1 = torch.randint(0, D, (I, T), generator=g).to(ctx.device)
        a2 = torch.randint(0, D, (J, S), generator=g).to(ctx.device)
    else:
        a1, a2 = _randn(I, T, D, ctx=ctx, seed=3), _randn(J, S, D, ctx=ctx, seed=4)
    g1, g2 = _randn(I, C, T, E, ctx=ctx, seed=5), _randn(J, C, S, E, ctx=ctx, seed=6)
    ours, ref = gram_contract(a1, g1, a2, g2, mode), gram_contract_ref(a1, g1, a2, g2, mode)
    fns = {"ntk_kernels.ops.gram_contract": lambda: gram_contract(a1, g1, a2, g2, mode),
           "einsum (gram_contract_ref)": lambda: gram_contract_ref(a1, g1, a2, g2, mode)}
    f = _gram_flops(case)
    extra = {"ntk_kernels.ops.gram_contract": {"backend": _backend_of("gram", ctx),
                                               "max_rel_err_vs_baseline": max_rel_err(ours, ref)}}
    return compare("gram", case, label, fns, "ntk_kernels.ops.gram_contract", ctx, {n: f for n in fns}, extra)


# ----------------------------------------------------------------------------------------------
# eNTK: empirical_ntk vs the torch.func recipe, on an MLP and a tiny BERT
# ----------------------------------------------------------------------------------------------
def make_mlp(d_in: int, hidden: int, classes: int, seed: int = 0) -> nn.Module:
    """d_in -> hidden -> hidden -> classes, tanh, fixed seed."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes)).eval()


def make_tiny_bert(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, seq: int, seed: int = 0):
    """A BertForSequenceClassification with random weights (fixed seed), eager attention, 2 labels."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=seq,
                                  num_labels=2, attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg).eval()


def _run_ntk(bench: str, case: dict, label: str, model: nn.Module, x, ctx: Context) -> List[dict]:
    from .ntk import empirical_ntk, empirical_ntk_reference

    model = model.to(ctx.device)
    mode = case["mode"]
    ours = empirical_ntk(model, x, mode=mode)
    ref = empirical_ntk_reference(model, x, mode=mode)
    fns = {"ntk_kernels.empirical_ntk": lambda: empirical_ntk(model, x, mode=mode),
           "torch.func jacrev+vmap+einsum": lambda: empirical_ntk_reference(model, x, mode=mode)}
    n_params = sum(p.numel() for p in model.parameters())
    extra = {"ntk_kernels.empirical_ntk": {"max_rel_err_vs_baseline": max_rel_err(ours, ref), "params": n_params,
                                           "backend": "gram: " + _backend_of("gram", ctx, torch.float32),
                                           "dtype": "float32"},
             "torch.func jacrev+vmap+einsum": {"params": n_params, "dtype": "float32"}}
    return compare(bench, case, label, fns, "ntk_kernels.empirical_ntk", ctx, None, extra)


def run_ntk_mlp(case: dict, ctx: Context) -> List[dict]:
    model = make_mlp(case["d_in"], case["hidden"], case["classes"])
    x = torch.randn(case["N"], case["d_in"], generator=_gen(7)).to(ctx.device)
    label = f"MLP {case['d_in']}-{case['hidden']}-{case['hidden']}-{case['classes']} N={case['N']} {case['mode']}"
    return _run_ntk("ntk_mlp", case, label, model, x, ctx)


def run_ntk_bert(case: dict, ctx: Context) -> List[dict]:
    try:
        model = make_tiny_bert(case["hidden"], case["layers"], case["heads"], case["intermediate"], case["vocab"],
                               case["seq"])
    except ImportError as e:
        raise Skip(f"transformers is not importable ({e})") from e
    ids = torch.randint(0, case["vocab"], (case["N"], case["seq"]), generator=_gen(8)).to(ctx.device)
    label = (f"BERT h={case['hidden']} L={case['layers']} seq={case['seq']} vocab={case['vocab']} "
             f"N={case['N']} {case['mode']}")
    return _run_ntk("ntk_bert", case, label, model, {"input_ids": ids}, ctx)


# ----------------------------------------------------------------------------------------------
# Forward-mode ops: linear_jvp, layer_norm_jvp vs torch.func.jvp; per_sample_jvp (when present)
# ----------------------------------------------------------------------------------------------
def run_linear_jvp(case: dict, ctx: Context) -> List[dict]:
    from .ops import linear_jvp

    N, L, di, do = case["N"], case["L"], case["d_in"], case["d_out"]
    label = f"N={N} L={L} d_in={di} d_out={do}"
    x, xd = _randn(N, L, di, ctx=ctx, seed=9), _randn(N, L, di, ctx=ctx, seed=10)
    w, wd = _randn(do, di, ctx=ctx, seed=11, scale=di ** -0.5), _randn(do, di, ctx=ctx, seed=12, scale=di ** -0.5)
    b, bd = _randn(do, ctx=ctx, seed=13), _randn(do, ctx=ctx, seed=14)

    def baseline():
        return torch.func.jvp(F.linear, (x, w, b), (xd, wd, bd))

    _, yd = linear_jvp(x, w, b, xd, wd, bd)
    fns = {"ntk_kernels.ops.linear_jvp": lambda: linear_jvp(x, w, b, xd, wd, bd), "torch.func.jvp(F.linear)": baseline}
    f = 3 * 2.0 * N * L * di * do  # y = x Wᵀ, ẏ = ẋ Wᵀ + x Ẇᵀ
    extra = {"ntk_kernels.ops.linear_jvp": {"backend": _backend_of("linear_jvp", ctx),
                                           "max_rel_err_vs_baseline": max_rel_err(yd, baseline()[1])}}
    return compare("linear_jvp", case, label, fns, "ntk_kernels.ops.linear_jvp", ctx, {n: f for n in fns}, extra)


def run_layer_norm_jvp(case: dict, ctx: Context) -> List[dict]:
    from .ops import layer_norm_jvp

    N, L, D = case["N"], case["L"], case["D"]
    label = f"N={N} L={L} D={D}"
    x, xd = _randn(N, L, D, ctx=ctx, seed=15), _randn(N, L, D, ctx=ctx, seed=16)
    w, wd = 1 + _randn(D, ctx=ctx, seed=17, scale=0.1), _randn(D, ctx=ctx, seed=18)
    b, bd = _randn(D, ctx=ctx, seed=19), _randn(D, ctx=ctx, seed=20)
    eps = 1e-5

    def baseline():
        return torch.func.jvp(lambda x_, w_, b_: F.layer_norm(x_, (D,), w_, b_, eps), (x, w, b), (xd, wd, bd))

    _, yd = layer_norm_jvp(x, w, b, eps, xd, wd, bd)
    fns = {"ntk_kernels.ops.layer_norm_jvp": lambda: layer_norm_jvp(x, w, b, eps, xd, wd, bd),
           "torch.func.jvp(F.layer_norm)": baseline}
    extra = {"ntk_kernels.ops.layer_norm_jvp": {"backend": _backend_of("layer_norm_jvp", ctx),
                                               "max_rel_err_vs_baseline": max_rel_err(yd, baseline()[1])}}
    # memory-bound: report bytes moved instead of FLOP/s (x, ẋ read, y, ẏ written)
    for name in fns:
        extra.setdefault(name, {})["gbytes_per_s_formula"] = "4·N·L·D·itemsize / time"
    rows = compare("layer_norm_jvp", case, label, fns, "ntk_kernels.ops.layer_norm_jvp", ctx, None, extra)
    nbytes = 4.0 * N * L * D * torch.empty((), dtype=ctx.dtype).element_size()
    for row in rows:
        row["gbytes_per_s"] = nbytes / (row["median_ms"] / 1e3) / 1e9
    return rows


def run_per_sample_jvp(case: dict, ctx: Context) -> List[dict]:
    """(f(x), J(x)·v) for every sample: one shared direction v, or (per_sample=True) a direction v_n per sample."""
    import ntk_kernels

    fn = getattr(ntk_kernels, "per_sample_jvp", None)
    if fn is None:
        raise Skip("ntk_kernels.per_sample_jvp is not in this build of the package")
    model = make_mlp(case["d_in"], case["hidden"], case["classes"]).to(ctx.device)
    N = case["N"]
    x = torch.randn(N, case["d_in"], generator=_gen(21)).to(ctx.device)
    params = {n: p.detach() for n, p in model.named_parameters()}
    lead = (N,) if case["per_sample"] else ()
    tangents = {n: torch.randn(*lead, *p.shape, generator=_gen(22 + i)).to(ctx.device)
                for i, (n, p) in enumerate(model.named_parameters())}

    def f(ps, xs):
        return torch.func.functional_call(model, ps, (xs,))

    if case["per_sample"]:  # what a user writes: vmap over the samples of a jvp of the one-sample model
        def baseline():
            return torch.func.vmap(lambda xi, vi: torch.func.jvp(lambda ps: f(ps, xi[None])[0], (params,), (vi,)))(
                x, tangents)
        base_name = "torch.func.vmap(jvp) per sample"
    else:
        def baseline():
            return torch.func.jvp(lambda ps: f(ps, x), (params,), (tangents,))
        base_name = "torch.func.jvp(functional_call)"

    try:
        _, ours_t = fn(model, x, tangents)
    except Exception as e:  # a signature this bench does not know
        raise Skip(f"per_sample_jvp(model, x, tangents) failed: {type(e).__name__}: {e}") from e
    label = (f"MLP {case['d_in']}-{case['hidden']}-{case['hidden']}-{case['classes']} N={N} "
             f"{'per-sample v_n' if case['per_sample'] else 'shared v'}")
    fns = {"ntk_kernels.per_sample_jvp": lambda: fn(model, x, tangents), base_name: baseline}
    extra = {"ntk_kernels.per_sample_jvp": {"max_rel_err_vs_baseline": max_rel_err(ours_t, baseline()[1]),
                                           "backend": "linear_jvp: " + _backend_of("linear_jvp", ctx, torch.float32),
                                           "dtype": "float32"},
             base_name: {"dtype": "float32"}}
    return compare("per_sample_jvp", case, label, fns, "ntk_kernels.per_sample_jvp", ctx, None, extra)


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------
def _lc(N, d, r, k, p=0.0):
    return dict(N=N, d=d, r=r, k=k, p=p)


def _gr(I, C, T, D, E, mode, ids=False):
    return dict(I=I, J=I, C=C, T=T, S=T, D=D, E=E, mode=mode, ids=ids)


BENCHES: Dict[str, Bench] = {b.name: b for b in [
    Bench("linchain", "LinChainLinear fwd+bwd vs peft LoRA / unfused torch chain / nn.Linear",
          {"tiny": [_lc(32, 32, 4, 0)],
           "quick": [_lc(1024, 512, 16, 0), _lc(1024, 512, 16, 2)],
           "full": [_lc(N, d, r, k, p) for N, d in ((2048, 1024), (4096, 4096)) for r in (16, 64)
                    for k in (0, 2) for p in (0.0, 0.05)]},
          run_linchain),
    Bench("gram", "ops.gram_contract vs the einsum reference (features and token ids)",
          {"tiny": [_gr(3, 2, 5, 8, 8, "full")],
           "quick": [_gr(16, 2, 32, 64, 64, "full"), _gr(16, 4, 32, 64, 64, "trace"),
                     _gr(16, 2, 32, 1000, 64, "full", ids=True)],
           "full": [_gr(32, 4, 64, 256, 256, m) for m in ("full", "diagonal", "trace")]
                   + [_gr(32, 4, 64, 30000, 256, "full", ids=True)]},
          run_gram),
    Bench("ntk_mlp", "empirical_ntk vs torch.func jacrev+vmap+einsum, MLP",
          {"tiny": [dict(d_in=8, hidden=16, classes=3, N=4, mode="full")],
           "quick": [dict(d_in=64, hidden=128, classes=10, N=32, mode="full"),
                     dict(d_in=64, hidden=128, classes=10, N=64, mode="trace")],
           "full": [dict(d_in=784, hidden=512, classes=10, N=128, mode=m) for m in ("full", "trace")]},
          run_ntk_mlp),
    Bench("ntk_bert", "empirical_ntk vs torch.func jacrev+vmap+einsum, tiny BERT",
          {"tiny": [dict(hidden=16, layers=1, heads=2, intermediate=32, vocab=50, seq=8, N=2, mode="full")],
           "quick": [dict(hidden=64, layers=2, heads=2, intermediate=128, vocab=256, seq=16, N=16, mode="full"),
                     dict(hidden=128, layers=2, heads=2, intermediate=512, vocab=1024, seq=32, N=32, mode="full")],
           "full": [dict(hidden=128, layers=2, heads=2, intermediate=512, vocab=1024, seq=32, N=64, mode="full")]},
          run_ntk_bert, needs=["transformers"]),
    Bench("linear_jvp", "ops.linear_jvp vs torch.func.jvp(F.linear)",
          {"tiny": [dict(N=2, L=3, d_in=8, d_out=8)],
           "quick": [dict(N=8, L=128, d_in=512, d_out=512)],
           "full": [dict(N=16, L=512, d_in=1024, d_out=1024), dict(N=64, L=128, d_in=768, d_out=3072)]},
          run_linear_jvp),
    Bench("layer_norm_jvp", "ops.layer_norm_jvp vs torch.func.jvp(F.layer_norm)",
          {"tiny": [dict(N=2, L=3, D=16)],
           "quick": [dict(N=16, L=128, D=768)],
           "full": [dict(N=64, L=512, D=1024)]},
          run_layer_norm_jvp),
    Bench("per_sample_jvp", "per_sample_jvp vs torch.func.jvp (shared v) / vmap(jvp) (per-sample v_n) on the MLP",
          {"tiny": [dict(d_in=8, hidden=16, classes=3, N=4, per_sample=True)],
           "quick": [dict(d_in=64, hidden=256, classes=10, N=256, per_sample=ps) for ps in (False, True)],
           "full": [dict(d_in=784, hidden=512, classes=10, N=1024, per_sample=ps) for ps in (False, True)]},
          run_per_sample_jvp),
]}


def run_suite(names: List[str], ctx: Context) -> List[dict]:
    rows: List[dict] = []
    for name in names:
        bench = BENCHES[name]
        for case in bench.cases[ctx.size]:
            missing = [m for m in bench.needs if importlib.util.find_spec(m) is None]
            if missing:
                rows.append(skipped(name, "", case, f"needs {', '.join(missing)}"))
                ctx.log(f"{name}: skipped (needs {', '.join(missing)})")
                continue
            t0 = time.perf_counter()
            try:
                got = bench.run(case, ctx)
            except Skip as e:
                rows.append(skipped(name, "", case, str(e)))
                ctx.log(f"{name}: skipped ({e})")
                continue
            except Exception as e:  # one failing bench must not lose the others' results
                rows.append(dict(skipped(name, "", case, f"{type(e).__name__}: {e}"), role="error"))
                ctx.log(f"{name}: FAILED ({type(e).__name__}: {e})")
                continue
            rows += got
            ctx.log(f"{name}: {got[0]['case']} done in {time.perf_counter() - t0:.1f} s")
    return rows


# ----------------------------------------------------------------------------------------------
# Provenance and output
# ----------------------------------------------------------------------------------------------
def git_commit() -> Dict[str, object]:
    """The commit of the checkout the package runs from: {"commit": sha or "unknown", "dirty": bool or None}.
    "unknown" when git is missing or the package is not a tracked file of a git work tree (an installed copy)."""
    pkg = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", pkg, *args], capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return {"commit": "unknown", "dirty": None}
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": sha.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def machine_info(device: torch.device) -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "hostname": platform.node()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> Dict[str, Optional[str]]:
    import ntk_kernels

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "ntk_kernels": ntk_kernels.__version__}
    for mod in ("triton", "peft", "transformers"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:
            out[mod] = None
    return out


def report(rows: List[dict], ctx: Context) -> Dict[str, object]:
    return {"schema": "ntk_kernels.bench/1", "size": ctx.size, "device": str(ctx.device),
            "dtype": str(ctx.dtype).replace("torch.", ""), "machine": machine_info(ctx.device),
            "versions": versions(), **git_commit(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timing": "triton.testing.do_bench median" if ctx.device.type == "cuda"
            and importlib.util.find_spec("triton") else "interleaved rounds after warm-up, median",
            "peak_memory": "torch.cuda.max_memory_allocated - allocated before" if ctx.device.type == "cuda"
            else "peak RSS growth during one call (VmHWM after clear_refs, glibc mmap threshold 64 KiB)",
            "speedup": "baseline median time / ntk_kernels median time (median of per-round ratios on the CPU)",
            "results": rows}


def _fmt(v, digits=3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def format_table(rows: List[dict]) -> str:
    cols = [("bench", "bench"), ("case", "case"), ("impl", "impl"), ("backend", "backend"), ("median_ms", "median ms"),
            ("speedup", "baseline/ours"), ("gflops", "GFLOP/s"), ("peak_mib", "peak MiB"),
            ("max_rel_err_vs_baseline", "rel err")]
    cells = []
    for r in rows:
        if r["role"] in ("skipped", "error"):
            cells.append([r["bench"], "", f"{r['role']}: {r['note']}", "", "", "", "", "", ""])
        else:
            cells.append([_fmt(r.get(k)) if k != "max_rel_err_vs_baseline" or r.get(k) is None
                          else f"{r[k]:.1e}" for k, _ in cols])
    heads = [h for _, h in cols]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(heads), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in cells])


def plot(rows: List[dict], path: str, title: str) -> None:
    """A horizontal bar chart of baseline/ours per (bench, case, baseline), log scale, 1 marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{r['bench']}: {r['case']}\nvs {r['impl']}", r["speedup"]) for r in rows
            if r["role"] == "baseline" and r.get("speedup")]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(bars) + 1.5))
    if bars:
        labels, vals = zip(*bars)
        # bars grow from 1 (parity) to the ratio, rightwards where ntk_kernels is faster
        ax.barh(range(len(vals)), [v - 1.0 for v in vals], left=1.0,
                color=["tab:green" if v >= 1 else "tab:red" for v in vals])
        for i, v in enumerate(vals):
            ax.annotate(f"{v:.2g}x", (v, i), xytext=(3 if v >= 1 else -3, 0), textcoords="offset points",
                        ha="left" if v >= 1 else "right", va="center", fontsize=7)
        lo, hi = min(vals + (1.0,)), max(vals + (1.0,))
        ax.set_xlim(lo / 1.6, hi * 1.6)
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("baseline time / ntk_kernels time (> 1: ntk_kernels faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: str, data: Dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
