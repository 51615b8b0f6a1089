"""ntk::linear_jvp and ntk::layer_norm_jvp on the CPU: the C++ backend against the reference backend and
torch.func.jvp.

Methods, timed interleaved call by call (cpu, reference, func.jvp, cpu, ...) so the drift of a shared machine hits
all alike; each row reports the median time, the median of the per-round ratios to "cpu" (x_cpu > 1: slower than
cpu), a rate from an explicit formula and the peak memory of one call beyond its inputs:
  cpu        the C++ backend (csrc/cpu/jvp.cpp) through its registry entry (what the op dispatches to)
  reference  the plain-PyTorch reference backend (linear_jvp_ref / layer_norm_jvp_ref): separate matmuls /
             elementwise passes, then sums
  func.jvp   torch.func.jvp of F.linear / F.layer_norm / F.rms_norm over the batch (per-sample tangents:
             torch.func.vmap of it over the samples): what a user would otherwise write
Rates: linear GFLOP/s = 2·N·L·d_in·d_out·(1 + [ẋ] + [Ẇ]) / t; norms GB/s = (x, ẋ read + y, ẏ written) bytes / t.

    python benchmarks/bench_jvp_ops.py                    # all cases (about a minute on 2 CPU cores)
    python benchmarks/bench_jvp_ops.py --budget 2 --threads 1,2 --json out.json

On a shared machine, tiny multi-threaded BLAS calls can stall on a descheduled thread (milliseconds); --threads 1
shows the kernels without that effect.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from ntk_kernels import _backend  # noqa: E402

LINEAR_CASES = [
    dict(name="mlp-up", N=16, L=128, d_in=384, d_out=1536, wd="shared"),
    dict(name="mnist-mlp", N=512, L=1, d_in=784, d_out=512, wd="shared"),
    dict(name="conv1d-wT", N=8, L=64, d_in=384, d_out=1152, wd="shared", weight_t=True),
    dict(name="per-sample", N=64, L=16, d_in=384, d_out=384, wd="sample"),
    dict(name="per-sample-L1", N=64, L=1, d_in=784, d_out=512, wd="sample"),
]
NORM_CASES = [
    dict(name="layernorm", N=16, L=128, D=384, rms=False, wd="shared"),
    dict(name="layernorm", N=16, L=128, D=768, rms=False, wd="shared"),
    dict(name="rmsnorm", N=16, L=128, D=768, rms=True, wd="shared"),
    dict(name="layernorm-per-sample", N=64, L=32, D=384, rms=False, wd="sample"),
]


def linear_inputs(c, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    N, L, di, do = c["N"], c["L"], c["d_in"], c["d_out"]
    W = r(di, do).t() if c.get("weight_t") else r(do, di)
    lead = (N,) if c["wd"] == "sample" else ()
    return r(N, L, di), W, r(do), r(N, L, di), r(*lead, do, di), r(*lead, do)


def norm_inputs(c, dtype):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    N, L, D = c["N"], c["L"], c["D"]
    lead = (N,) if c["wd"] == "sample" else ()
    b, bd = (None, None) if c["rms"] else (r(D), r(*lead, D))
    return r(N, L, D), r(D) + 1, b, 1e-5, r(N, L, D), r(*lead, D), bd, c["rms"]


def linear_funcjvp(x, W, b, xd, Wd, bd):
    f = lambda x_, w_, b_: F.linear(x_, w_, b_)
    if Wd.ndim == 2:
        return torch.func.jvp(f, (x, W, b), (xd, Wd, bd))
    per = lambda x_, xd_, wd_, bd_: torch.func.jvp(f, (x_, W, b), (xd_, wd_, bd_))
    return torch.func.vmap(per)(x, xd, Wd, bd)


def norm_funcjvp(x, w, b, eps, xd, wd, bd, rms):
    D = x.shape[-1]
    if rms:
        f = lambda x_, w_: F.rms_norm(x_, (D,), w_, eps)
        prim, tang = (x, w), (xd, wd)
    else:
        f = lambda x_, w_, b_: F.layer_norm(x_, (D,), w_, b_, eps)
        prim, tang = (x, w, b), (xd, wd, bd)
    if wd.ndim == 1:
        return torch.func.jvp(f, prim, tang)
    per = lambda x_, *t: torch.func.jvp(f, (x_, *prim[1:]), t)
    return torch.func.vmap(per)(x, *tang)


def run_case(op, case, dtype, rounds, budget_s, memory):
    if op == "linear_jvp":
        args = linear_inputs(case, dtype)
        user = linear_funcjvp
        n_gemm = 3
        work = 2.0 * case["N"] * case["L"] * case["d_in"] * case["d_out"] * n_gemm
        unit = "GFLOP/s"
    else:
        args = norm_inputs(case, dtype)
        user = norm_funcjvp
        work = 4.0 * args[0].numel() * args[0].element_size()
        unit = "GB/s"
    kernels = _backend._REGISTRY[op]
    fns = {"cpu": lambda: kernels["cpu"].fn(*args), "reference": lambda: kernels["reference"].fn(*args),
           "func.jvp": lambda: user(*args)}
    out = fns["cpu"]()
    errs = {}
    for name in ("reference", "func.jvp"):
        ref = fns[name]()
        errs[name] = max(((o.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1)).item()
                         for o, r in zip(out, ref))
    timed = _harness.time_against_first(fns, "cpu", rounds, budget_s, memory)
    shape = (f"{case['N']}x{case['L']}x{case['d_in']}->{case['d_out']}" if op == "linear_jvp"
             else f"{case['N']}x{case['L']}x{case['D']}")
    rows = []
    for name, r in timed.items():
        t = r["seconds"]
        rows.append(dict(op=op, case=case["name"], shape=shape, tangent=case["wd"], method=name, ms=t * 1e3,
                         x_cpu=r["ratio"], x_cpu_iqr=r["ratio_iqr"], rate=work / t / 1e9, unit=unit,
                         rounds=r["rounds"], peak_mib=r["peak_mib"],
                         max_rel_diff_vs_cpu=None if name == "cpu" else errs[name]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp32", "fp64", "bf16"], default="fp32",
                    help="bf16 matmuls are >100x slower than fp32 on CPUs without AMX: shrink the cases first")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per case (default: as many as fit in --budget, 5 to 40)")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case")
    ap.add_argument("--ops", default="linear_jvp,layer_norm_jvp")
    ap.add_argument("--threads", default=None,
                    help="comma-separated intra-op thread counts to run every case with (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--json", default=None, help="write results with machine, versions and commit here")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[args.dtype]
    ops = args.ops.split(",")
    for op in ops:
        reasons = _backend.not_supported_reasons(op, torch.device("cpu"), dtype)["cpu"]
        if reasons:
            raise SystemExit(f"the cpu backend of {op} cannot run: {reasons}")
    rows = []
    threads = [torch.get_num_threads()] if args.threads is None else [int(t) for t in args.threads.split(",")]
    for nt in threads:
        torch.set_num_threads(nt)
        for op in ops:
            for case in LINEAR_CASES if op == "linear_jvp" else NORM_CASES:
                rows += [dict(r, threads=nt) for r in run_case(op, case, dtype, args.rounds, args.budget,
                                                               not args.no_memory)]
                print(f"done {op} {case} threads={nt}", file=sys.stderr, flush=True)
    m = _harness.machine()
    print(f"# jvp ops, cpu {dtype}, {m['cpu']}, torch {m['torch']}, commit {m.get('commit')}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(_harness.table(rows, ["op", "case", "shape", "tangent", "threads", "method", "ms", "x_cpu", "x_cpu_iqr",
                                "rate", "unit", "rounds", "peak_mib", "max_rel_diff_vs_cpu"]))
    if args.json:
        _harness.write_json(args.json, rows, {"device": "cpu", "dtype": str(dtype)})
    return rows


if __name__ == "__main__":
    main()
