"""GPU session check of ntk::linchain's CUDA and Triton backends: correctness, then timings.  Builds nothing:
run it after ``pip install -e .`` (or ``python setup.py build_ext --inplace``) on a machine with a GPU.

1. Correctness: for each backend forced through NTK_KERNELS_BACKEND_LINCHAIN, y and the gradients of every
   input against linchain_ref in float64, on a few shapes / dtypes / dropout rates.  Prints the max error
   relative to max(1, max|ref|) and the budget of tests/_compare.py (2 x the error of the reference run in that
   dtype + a floor); a FAIL line names the worst tensor.
2. Timing (triton.testing.do_bench medians via benchmarks/_harness.py): forward (training mode) and
   forward+backward (gradients of x, A, C_i, B; W frozen) of
     linear    F.linear(x, W, b), the floor
     unfused   plain-torch LoRA / LinChain: F.linear(x, W, b) + s · B(C_k(⋯C_1(A(dropout(x))))), peft-style
     cuda      ntk_kernels.linchain_linear on the CUDA backend     triton   the same on the Triton backend
   with the ratio to linear and to unfused, and the peak memory of one forward+backward.
   --profile prints the CUDA kernel time table of one cuda forward+backward (torch.profiler).

    python benchmarks/gpu_check_linchain.py [--dtype bf16] [--skip-check] [--skip-bench] [--profile]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import ntk_kernels  # noqa: E402
from benchmarks import _harness  # noqa: E402
from ntk_kernels import _backend, _ext  # noqa: E402
from ntk_kernels.ops import linchain_ref  # noqa: E402
from _compare import FLOOR  # noqa: E402

BACKENDS = ("cuda", "triton")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (N, d_in, d_out, r, k): odd sizes, rank > 64, a typical LoRA layer
CHECK_SHAPES = [(37, 53, 29, 5, 2), (1000, 512, 768, 16, 0), (300, 1000, 200, 70, 1), (4096, 1024, 1024, 64, 3)]
# (N, d, r, k, p) with d_in = d_out = d
BENCH_CASES = [(4096, 4096, 16, 0, 0.0), (4096, 4096, 16, 0, 0.1), (8192, 4096, 16, 0, 0.1),
               (4096, 4096, 64, 0, 0.1), (4096, 4096, 16, 2, 0.1), (16384, 1024, 8, 1, 0.05)]


def inputs(N, d_in, d_out, r, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64) * scale).to(dtype)

    return [rnd(N, d_in), rnd(d_out, d_in, scale=d_in ** -0.5), rnd(d_out), rnd(r, d_in, scale=d_in ** -0.5),
            rnd(k, r, r, scale=r ** -0.5), rnd(d_out, r, scale=r ** -0.5)]


def value_and_grads(fn, ins, dtype, scaling, p, seed):
    leaves = [t.detach().to(dtype).requires_grad_() for t in ins]
    y = (fn(*leaves, scaling, p, training=True, seed=seed) if fn is ntk_kernels.linchain_linear
         else fn(*leaves, scaling, p, seed))
    gy = torch.randn(y.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda",
                     dtype=torch.float64).to(dtype)
    used = [t for t in leaves if t.numel() > 0]
    return [y, *torch.autograd.grad(y, used, gy)]


def forced(backend):
    os.environ["NTK_KERNELS_BACKEND_LINCHAIN"] = backend


def check():
    names = ["y", "gx", "gW", "gb", "gA", "gC", "gB"]
    ok = True
    for backend in BACKENDS:
        for dname, dtype in DTYPES.items():
            reasons = _backend.not_supported_reasons("linchain", torch.device("cuda"), dtype)[backend]
            if reasons:
                print(f"{backend:6s} {dname}: unavailable: {'; '.join(reasons)}")
                continue
            for (N, d_in, d_out, r, k) in CHECK_SHAPES:
                for p in (0.0, 0.1):
                    ins = inputs(N, d_in, d_out, r, k, torch.float64, seed=N + r)
                    forced(backend)
                    got = value_and_grads(ntk_kernels.linchain_linear, ins, dtype, 0.5, p, 7)
                    ref = value_and_grads(linchain_ref, ins, torch.float64, 0.5, p, 7)
                    low = (value_and_grads(linchain_ref, ins, dtype, 0.5, p, 7) if dtype in (torch.float16, torch.bfloat16)
                           else [None] * len(ref))
                    worst, worst_name, fails = 0.0, "", []
                    for n, g, rf, lo in zip(names if k else names[:5] + names[6:], got, ref, low):
                        scale = max(1.0, rf.abs().max().item())
                        err = (g.double() - rf).abs().max().item()
                        budget = FLOOR[dtype] * scale + (2 * (lo.double() - rf).abs().max().item() if lo is not None else 0)
                        if err / scale > worst:
                            worst, worst_name = err / scale, n
                        if err > budget:
                            fails.append(f"{n} {err:.2e} > {budget:.2e}")
                    ok &= not fails
                    print(f"{backend:6s} {dname} N={N:5d} d_in={d_in:5d} d_out={d_out:5d} r={r:3d} k={k} p={p:.1f}: "
                          f"max rel err {worst:.2e} ({worst_name}) {'FAIL ' + '; '.join(fails) if fails else 'ok'}")
    os.environ.pop("NTK_KERNELS_BACKEND_LINCHAIN", None)
    return ok


def unfused(x, W, b, A, C, B, s, p):
    """What a user writes without a fused kernel (peft's LoRA layer computes the same for k = 0)."""
    h = F.linear(F.dropout(x, p, training=True), A)
    for c in C:
        h = F.linear(h, c)
    return F.linear(x, W, b) + F.linear(h, B) * s


def fused(backend, x, W, b, A, C, B, s, p):
    def run():
        forced(backend)  # read by _backend.choose on every call
        return ntk_kernels.linchain_linear(x, W, b, A, C, B, s, p, training=True, seed=1)
    return run


def bench(dtype, profile):
    rows = []
    for (N, d, r, k, p) in BENCH_CASES:
        x, W, b, A, C, B = inputs(N, d, d, r, k, dtype)
        x.requires_grad_()
        params = [x, A.requires_grad_(), *[c.clone().requires_grad_() for c in C.unbind(0)], B.requires_grad_()]
        Cs = params[2:2 + k]
        gy = torch.randn(N, d, device="cuda", dtype=dtype)
        methods = {"linear": (lambda: F.linear(x, W, b), [x]),
                   "unfused": (lambda: unfused(x, W, b, A, Cs, B, 2.0, p), params)}
        for backend in BACKENDS:
            if not _backend.not_supported_reasons("linchain", torch.device("cuda"), dtype)[backend]:
                methods[backend] = (fused(backend, x, W, b, A, Cs, B, 2.0, p), params)
        case = dict(N=N, d=d, r=r, k=k, p=p)
        for name, (fwd, wrt) in methods.items():
            def fwd_bwd(fwd=fwd, wrt=wrt):
                torch.autograd.grad(fwd(), wrt, gy)

            t_f = _harness.median_seconds(fwd, "cuda")
            t_fb = _harness.median_seconds(fwd_bwd, "cuda")
            peak = _harness.peak_memory_bytes(fwd_bwd, "cuda")
            rows.append(dict(case, method=name, fwd_ms=t_f * 1e3, bwd_ms=(t_fb - t_f) * 1e3, fwd_bwd_ms=t_fb * 1e3,
                             peak_mib=peak / 2**20))
            if profile and name == "cuda" and (N, d, r, k, p) == BENCH_CASES[1]:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    fwd_bwd()
                    torch.cuda.synchronize()
                print(f"# cuda backend kernels, one fwd+bwd, {case}")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        base = {row["method"]: row for row in rows[-len(methods):]}
        for row in rows[-len(methods):]:
            row["x_linear"] = row["fwd_bwd_ms"] / base["linear"]["fwd_bwd_ms"]
            row["x_unfused"] = row["fwd_bwd_ms"] / base["unfused"]["fwd_bwd_ms"]
            row["fwd_x_unfused"] = row["fwd_ms"] / base["unfused"]["fwd_ms"]
        print(f"done {case}", file=sys.stderr, flush=True)
    os.environ.pop("NTK_KERNELS_BACKEND_LINCHAIN", None)
    m = _harness.machine()
    print(f"# linchain on {m.get('gpu')}, {dtype}, torch {m['torch']} (CUDA {m.get('cuda')}), commit {m.get('commit')}")
    print(_harness.table(rows, ["N", "d", "r", "k", "p", "method", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "x_linear",
                                "x_unfused", "fwd_x_unfused", "peak_mib"]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16", help="timing dtype")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check_linchain.py needs a CUDA device")
    print(f"# extensions: {_ext.status()}")
    ok = True if args.skip_check else check()
    if not args.skip_bench:
        bench(DTYPES[args.dtype], args.profile)
    if not ok:
        sys.exit("correctness check FAILED (see the FAIL lines above)")


if __name__ == "__main__":
    main()
