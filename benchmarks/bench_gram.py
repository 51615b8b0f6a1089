"""ntk::gram_contract on the CPU: the C++ backend against the reference backend and the plain einsum.

Methods, timed interleaved call by call (cpu, reference, einsum, cpu, ...) so the drift of a shared machine hits
all alike; each row reports the median time, the median of the per-round ratios to "cpu" (x_cpu > 1: slower
than cpu) and the peak memory of one call beyond its inputs (_harness.peak_memory_bytes):
  cpu        the C++ backend (csrc/cpu/ntk_gram.cpp), through its registry entry (what the op dispatches to)
  reference  the plain-PyTorch reference backend: H = (A_i A_jᵀ) G_j, row blocks of 2^24 elements
  einsum     ``gram_contract_ref``: the T x S x C x C products a user would write (skipped when its largest
             intermediate would exceed --max-einsum-gb)
  cpu[path]  with --paths: the cpu backend forced onto one feature path (NTK_KERNELS_GRAM_CPU_PATH)
Cases (fp32): MLP-like T = S = 1; transformer-like T = S = 128; longer T = 512; token ids.

    python benchmarks/bench_gram.py                   # all cases (a few minutes on 2 CPU cores)
    python benchmarks/bench_gram.py --budget 3 --json out.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from ntk_kernels import _backend  # noqa: E402
from ntk_kernels.ops import gram_contract_ref  # noqa: E402

PATH_ENV = "NTK_KERNELS_GRAM_CPU_PATH"

CASES = [
    dict(name="mlp", I=128, J=128, T=1, S=1, D=512, E=512, C=10, mode="full"),
    dict(name="transformer", I=16, J=16, T=128, S=128, D=384, E=384, C=2, mode="full"),
    dict(name="transformer", I=16, J=16, T=128, S=128, D=384, E=384, C=2, mode="trace"),
    dict(name="long-T", I=8, J=8, T=512, S=512, D=768, E=768, C=1, mode="trace"),
    dict(name="tokens", I=32, J=32, T=64, S=64, D=None, E=128, C=2, mode="full", vocab=1000),
]


def einsum_bytes(case, elem=4):
    """Largest intermediate of gram_contract_ref: the (I, J, C, C', T, S) (full), (I, J, C, T, S) (diagonal) or
    (I, J, T, S) (trace) product of the output-gradient Grams."""
    I, J, T, S, C = case["I"], case["J"], case["T"], case["S"], case["C"]
    cc = {"full": C * C, "diagonal": C, "trace": 1}[case["mode"]]
    return I * J * T * S * cc * elem


def make_inputs(case, dtype):
    g = torch.Generator().manual_seed(0)
    I, J, T, S, E, C = case["I"], case["J"], case["T"], case["S"], case["E"], case["C"]
    if case["D"] is None:  # token ids
        a1 = torch.randint(0, case["vocab"], (I, T), generator=g)
        a2 = torch.randint(0, case["vocab"], (J, S), generator=g)
    else:
        a1 = torch.randn(I, T, case["D"], generator=g).to(dtype)
        a2 = torch.randn(J, S, case["D"], generator=g).to(dtype)
    return a1, torch.randn(I, C, T, E, generator=g).to(dtype), a2, torch.randn(J, C, S, E, generator=g).to(dtype)


def _cpu_path(path):
    """The cpu backend with NTK_KERNELS_GRAM_CPU_PATH set for the call (None: its own choice)."""
    kernel = _backend._REGISTRY["gram"]["cpu"]

    def fn(*args):
        old = os.environ.get(PATH_ENV)
        os.environ[PATH_ENV] = path or "auto"
        try:
            return kernel.fn(*args)
        finally:
            if old is None:
                os.environ.pop(PATH_ENV)
            else:
                os.environ[PATH_ENV] = old
    return fn


def run_case(case, dtype, rounds, budget_s, max_einsum_gb, paths, memory):
    a1, g1, a2, g2 = make_inputs(case, dtype)
    mode = case["mode"]
    args = (a1, g1, a2, g2, mode)
    ref_kernel = _backend._REGISTRY["gram"]["reference"].fn
    fns = {"cpu": lambda: _cpu_path(None)(*args), "reference": lambda: ref_kernel(*args)}
    if einsum_bytes(case) <= max_einsum_gb * 1e9:
        fns["einsum"] = lambda: gram_contract_ref(*args)
    if paths and case["D"] is not None:  # the cpu backend on each feature path it can take
        for p in ("pairwise", "materialize") if case["T"] * case["S"] > 1 else ("outer", "pairwise", "materialize"):
            fns[f"cpu[{p}]"] = lambda p=p: _cpu_path(p)(*args)
    out, ref = fns["cpu"](), fns["reference"]()
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1)).item()
    rows = []
    for name, t in _harness.time_against_first(fns, "cpu", rounds, budget_s, memory).items():
        rows.append(dict(case=case["name"], I=case["I"], J=case["J"], T=case["T"], S=case["S"],
                         D=case["D"] if case["D"] is not None else "ids", E=case["E"], C=case["C"], mode=mode,
                         method=name, ms=t["seconds"] * 1e3, x_cpu=t["ratio"], x_cpu_iqr=t["ratio_iqr"],
                         rounds=t["rounds"], peak_mib=t["peak_mib"],
                         rel_err_vs_reference=err if name == "cpu" else None))
    if "einsum" not in fns:
        rows.append(dict(rows[0], method="einsum", ms=None, x_cpu=None, x_cpu_iqr=None, rounds=0, peak_mib=None,
                         rel_err_vs_reference=None,
                         note=f"skipped: intermediate {einsum_bytes(case) / 1e9:.1f} GB > {max_einsum_gb} GB"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per case (default: as many as fit in --budget, 5 to 40)")
    ap.add_argument("--budget", type=float, default=8.0, help="seconds of timing per case")
    ap.add_argument("--max-einsum-gb", type=float, default=2.0, help="skip the einsum above this intermediate")
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--paths", action="store_true", help="also time the cpu backend on each forced feature path")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--json", default=None, help="write results with machine, versions and commit here")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    reasons = _backend.not_supported_reasons("gram", torch.device("cpu"), dtype)["cpu"]
    if reasons:
        raise SystemExit(f"the cpu backend of gram_contract cannot run: {reasons}")
    torch.manual_seed(0)
    wanted = None if args.cases is None else set(args.cases.split(","))
    rows = []
    for case in CASES:
        if wanted is not None and case["name"] not in wanted:
            continue
        rows += run_case(case, dtype, args.rounds, args.budget, args.max_einsum_gb, args.paths, not args.no_memory)
        print(f"done {case}", file=sys.stderr, flush=True)
    m = _harness.machine()
    print(f"# gram_contract, cpu {dtype}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
          f"commit {m.get('commit')}")
    print(_harness.table(rows, ["case", "I", "J", "T", "S", "D", "E", "C", "mode", "method", "ms", "x_cpu",
                                "x_cpu_iqr", "rounds", "peak_mib", "rel_err_vs_reference", "note"]))
    if args.json:
        _harness.write_json(args.json, rows, {"device": "cpu", "dtype": str(dtype)})
    return rows


if __name__ == "__main__":
    main()
