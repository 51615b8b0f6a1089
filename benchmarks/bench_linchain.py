"""LinChain / LoRA layer: ntk_kernels' fused layer against peft's LoRA layer and a frozen nn.Linear.

For each case (tokens N, d_in = d_out = d, rank r, chain length k, dropout p) and each layer:
  fwd      y = layer(x) in training mode (x requires grad, as inside a network)
  fwd+bwd  y = layer(x); y.backward(gy)           bwd = median over rounds of (fwd+bwd) - fwd
  peak     memory of one fwd+bwd beyond its inputs (see _harness.peak_memory_bytes)
  TFLOP/s  of fwd+bwd from the explicit count 2·N·d·d (x Wᵀ) + 2·N·d·d (gx = gy W)
           + adapter 2·N·r·(2d + k·r) forward and 2·N·r·(3d + 2k·r) + 2·d·r·N·2 backward
Layers: "linear" frozen nn.Linear (the floor), "peft" peft.tuners.lora.Linear (k = 0; for k > 0 the plain-torch
unfused chain a user would write: dropout -> A -> C_1..C_k -> B), "fused" ntk_kernels.nn.LinChainLinear.
Ratios are taken in the same run: overhead = time / linear - 1, and fused overhead / peft overhead.

    python benchmarks/bench_linchain.py                 # quick default (about 1.5 minutes on 2 CPU cores)
    python benchmarks/bench_linchain.py --grid sweep    # the recorded sweep (benchmarks/RESULTS.md, ~9 min)
    python benchmarks/bench_linchain.py --json out.json --dtype bf16 --device cuda
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from ntk_kernels.nn import LinChainLinear  # noqa: E402

QUICK = [dict(N=2048, d=1024, r=16, k=k, p=p) for k, p in itertools.product((0, 2), (0.0, 0.05))]
# one axis at a time around a centre; sized so the sweep takes about 15 minutes on 2 CPU cores
# (N = 8192 and d = 8192 would take an hour there: run them with --grid large on a bigger machine or a GPU)
CENTER = dict(N=2048, d=4096, r=16, k=0, p=0.0)
SWEEP = ([CENTER, dict(CENTER, N=4096), dict(CENTER, d=1024)] + [dict(CENTER, r=r) for r in (8, 64)]
         + [dict(CENTER, k=k) for k in (1, 3)] + [dict(CENTER, p=0.05), dict(CENTER, k=3, p=0.05)])
LARGE = [dict(N=n, d=d, r=r, k=k, p=p) for n, d in ((2048, 1024), (4096, 4096), (8192, 4096), (8192, 8192))
         for r in (16, 64) for k in (0, 3) for p in (0.0, 0.05)]
GRIDS = {"quick": QUICK, "sweep": SWEEP, "large": LARGE}


class UnfusedChain(torch.nn.Module):
    """What a user writes without a fused kernel: base(x) + s · B(C_k(⋯C_1(A(dropout(x))))), peft-style."""

    def __init__(self, base: torch.nn.Linear, r: int, k: int, p: float):
        super().__init__()
        self.base = base
        self.drop = torch.nn.Dropout(p)
        self.A = torch.nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.C = torch.nn.ModuleList(torch.nn.Linear(r, r, bias=False, device=base.weight.device,
                                                     dtype=base.weight.dtype) for _ in range(k))
        self.B = torch.nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.scaling = 1.0

    def forward(self, x):
        h = self.A(self.drop(x))
        for c in self.C:
            h = c(h)
        return self.base(x) + self.B(h) * self.scaling


def make_layers(case, device, dtype):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    d, r, k, p = case["d"], case["r"], case["k"], case["p"]
    base = torch.nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    if k == 0:
        peft_layer = PeftLoraLinear(base, "default", LoraConfig(r=r, lora_alpha=r, lora_dropout=p), r=r,
                                    lora_alpha=r, lora_dropout=p)
        torch.nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)
    else:
        peft_layer = UnfusedChain(base, r, k, p)
        torch.nn.init.normal_(peft_layer.B.weight, std=0.02)
    fused = LinChainLinear.from_linear(base, rank=r, chain_length=k, dropout=p)
    torch.nn.init.normal_(fused.lora_B, std=0.02)
    return {"linear": base, "peft": peft_layer.to(device), "fused": fused.to(device)}


def flops(case, method):
    n, d, r, k = case["N"], case["d"], case["r"], case["k"]
    base = 4.0 * n * d * d
    if method == "linear":
        return base
    return base + 2.0 * n * r * (2 * d + k * r) + 2.0 * n * r * (3 * d + 2 * k * r) + 4.0 * d * r * n


def run_case(case, device, dtype, rounds, budget_s):
    """Times the three layers interleaved call by call (linear, peft, fused, linear, ...) for ``rounds`` rounds, so
    that the drift of a shared machine hits all three alike; reports each layer's median time and the median of
    the per-round ratios (with their interquartile range: the spread this machine gives)."""
    layers = make_layers(case, device, dtype)
    x = torch.randn(case["N"], case["d"], device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(case["N"], case["d"], device=device, dtype=dtype)
    fns = {}
    for name, layer in layers.items():
        layer.train()
        fns[name] = {"fwd": lambda layer=layer: layer(x), "fwd_bwd": lambda layer=layer: layer(x).backward(gy)}
    times = {key: _harness.interleaved_seconds([fns[n][key] for n in layers], device, rounds, budget_s)
             for key in ("fwd", "fwd_bwd")}
    names = list(layers)
    med = _harness.quantile
    rows = []
    for i, name in enumerate(names):
        t_f, t_fb = med(times["fwd"][i], 0.5), med(times["fwd_bwd"][i], 0.5)
        t_b = med([fb - f for fb, f in zip(times["fwd_bwd"][i], times["fwd"][i])], 0.5)
        r_fb = [a / b for a, b in zip(times["fwd_bwd"][i], times["fwd_bwd"][0])]
        r_f = [a / b for a, b in zip(times["fwd"][i], times["fwd"][0])]
        peak = _harness.peak_memory_bytes(fns[name]["fwd_bwd"], device)
        rows.append(dict(case, layer=name, fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, fwd_bwd_ms=t_fb * 1e3,
                         x_linear=med(r_fb, 0.5), x_linear_iqr=f"{med(r_fb, 0.25):.2f}-{med(r_fb, 0.75):.2f}",
                         fwd_x_linear=med(r_f, 0.5), tflops=flops(case, name) / t_fb / 1e12,
                         peak_mib=None if peak is None else peak / 2**20))
    over = {row["layer"]: row["x_linear"] - 1.0 for row in rows}
    rows[2]["overhead_vs_peft"] = over["fused"] / over["peft"] if over["peft"] > 0 else None
    rows[2]["speedup_vs_peft"] = med([a / b for a, b in zip(times["fwd_bwd"][1], times["fwd_bwd"][2])], 0.5)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="quick")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="default: fp32 on the CPU, bf16 on a GPU")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per case (default: as many as fit in --budget, 5 to 40)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timing per case and measurement (default 8 for quick, 20 otherwise)")
    ap.add_argument("--json", default=None, help="write results with machine, versions and commit here")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    torch.manual_seed(0)
    rows = []
    for case in GRIDS[args.grid]:
        budget = args.budget or (8.0 if args.grid == "quick" else 20.0)
        rows += run_case(case, args.device, dtype, args.rounds, budget)
        print(f"done {case}", file=sys.stderr, flush=True)
    m = _harness.machine()
    print(f"# linchain layer, {args.device} {dtype}, {m.get('gpu', m['cpu'])}, {m['threads']} threads, "
          f"torch {m['torch']}, commit {m.get('commit')}")
    print(_harness.table(rows, ["N", "d", "r", "k", "p", "layer", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "x_linear",
                                "x_linear_iqr", "fwd_x_linear", "tflops", "peak_mib", "overhead_vs_peft", "speedup_vs_peft"]))
    if args.json:
        _harness.write_json(args.json, rows, {"device": args.device, "dtype": str(dtype), "grid": args.grid})
    return rows


if __name__ == "__main__":
    main()
