"""Where the fused layer's time goes on the CPU: its pieces against F.linear, interleaved call by call.

    python benchmarks/bench_linchain_overhead.py [--N 2048 --d 1024 --r 16 --rounds 30]

Rows: F.linear (the floor); the C++ forward kernel called directly (torch.ops.ntk_cpu.linchain_fwd);
u = x Aᵀ alone (the adapter's pass over x); LinChainLinear's forward (adds the custom-op dispatch, the
input checks and autograd bookkeeping); and, at tiny sizes (N=4, d=8), the per-call cost of
linchain_linear against F.linear, which is the dispatch overhead itself.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
import ntk_kernels  # noqa: E402
from ntk_kernels.nn import LinChainLinear  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args(argv)
    if not ntk_kernels._ext.cpu_loaded():
        sys.exit(f"the C++ extension is not loaded: {ntk_kernels._ext.status()['_C']['why']}")
    torch.manual_seed(0)
    rows = []
    for n, d, r, rounds in ((a.N, a.d, a.r, a.rounds), (4, 8, 2, 2000)):
        x = torch.randn(n, d)
        lin = torch.nn.Linear(d, d).requires_grad_(False)
        layer = LinChainLinear.from_linear(lin, r, chain_length=0)
        w, b, A, B = lin.weight, lin.bias, layer.lora_A.detach(), torch.randn(d, r)
        fns = {"F.linear": lambda: torch.nn.functional.linear(x, w, b),
               "C++ kernel": lambda: torch.ops.ntk_cpu.linchain_fwd(x, w, b, A, None, B, 1.0, 0.0, 0),
               "u = x A^T": lambda: x @ A.t(),
               "linchain_linear": lambda: ntk_kernels.linchain_linear(x, w, b, A, None, B, 1.0),
               "LinChainLinear": lambda: layer(x)}
        times = _harness.interleaved_seconds(list(fns.values()), "cpu", rounds)
        for name, t in zip(fns, times):
            rows.append(dict(N=n, d=d, r=r, piece=name, median_us=_harness.quantile(t, 0.5) * 1e6,
                             x_linear=_harness.quantile([p / q for p, q in zip(t, times[0])], 0.5)))
    m = _harness.machine()
    print(f"# linchain forward pieces, cpu fp32, {m['cpu']}, {m['threads']} threads, commit {m.get('commit')}")
    print(_harness.table(rows, ["N", "d", "r", "piece", "median_us", "x_linear"]))


if __name__ == "__main__":
    main()
