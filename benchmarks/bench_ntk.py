"""Empirical NTK: ntk_kernels.empirical_ntk against the torch.func tutorial recipe, same inputs, same run.

The recipe (PyTorch's "Neural Tangent Kernels" tutorial): J = vmap(jacrev(f)) per sample for every parameter,
then K = Σ_params einsum('Naf,Mbf->NMab', J1, J2): it materialises the N x C x P Jacobian.
ntk_kernels computes each layer's contribution from activations and output gradients (Gram trick or per-sample
gradients, whichever costs less), blocked over samples.

    python benchmarks/bench_ntk.py                       # MLP 784-512-512-10, N = 256, full mode
    python benchmarks/bench_ntk.py --N 64 --mode trace
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
import ntk_kernels  # noqa: E402


def mlp(widths=(784, 512, 512, 10)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def torch_func_recipe(model, x1, x2, mode):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    j1 = vmap(jacrev(f), (None, 0))(params, x1)
    j1 = [j.flatten(2) for j in j1.values()]
    j2 = vmap(jacrev(f), (None, 0))(params, x2)
    j2 = [j.flatten(2) for j in j2.values()]
    spec = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa"}[mode]
    return torch.stack([torch.einsum(spec, a, b) for a, b in zip(j1, j2)]).sum(0)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return _harness.quantile(times, 0.5), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--mode", choices=["full", "trace", "diagonal"], default="full")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of ntk_kernels (torch.func runs once)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(a.N, 784)
    rows = []
    t_ours, k_ours = timed(lambda: ntk_kernels.empirical_ntk(model, x, mode=a.mode), a.repeats)
    peak_ours = _harness.peak_memory_bytes(lambda: ntk_kernels.empirical_ntk(model, x, mode=a.mode), "cpu")
    t_ref, k_ref = timed(lambda: torch_func_recipe(model, x, x, a.mode), 1)
    peak_ref = _harness.peak_memory_bytes(lambda: torch_func_recipe(model, x, x, a.mode), "cpu")
    err = ((k_ours - k_ref).abs().max() / k_ref.abs().max()).item()
    for name, t, peak in (("torch.func recipe", t_ref, peak_ref), ("ntk_kernels", t_ours, peak_ours)):
        rows.append(dict(model="MLP 784-512-512-10", N=a.N, mode=a.mode, method=name, seconds=t,
                         speedup=t_ref / t, peak_mib=None if peak is None else peak / 2**20))
    m = _harness.machine()
    print(f"# eNTK, cpu fp32, {m['cpu']}, {m['threads']} threads, torch {m['torch']}, commit {m.get('commit')}; "
          f"max |K_ntk_kernels - K_torch.func| / max |K| = {err:.1e}")
    print(_harness.table(rows, ["model", "N", "mode", "method", "seconds", "speedup", "peak_mib"]))
    return rows, err


if __name__ == "__main__":
    main()
