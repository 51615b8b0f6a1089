"""GPU session check of ntk::gram_contract's backends: correctness, then timings.  Builds nothing: run it after
``pip install -e .`` (or ``python setup.py build_ext --inplace``) on a machine with a GPU (written for an H100).

1. Correctness: every registered backend of op "gram" that can run on cuda with the dtype (cuda if its extension
   loaded, triton, reference; the reasons of the others are printed), forced through NTK_KERNELS_BACKEND_GRAM, on a
   few odd shapes x modes x {features, token ids} x {fp64, fp32, bf16, fp16}, against gram_contract_ref in float64.
   The Triton backend is also run with each kernel / full-mode variant forced (block while a padded sample fits a
   64-row tile; pair, in full mode as its two variants pair "p" and pair "h").
   Prints the max error relative to max(1, max|ref|) and the budget of tests/_compare.py (2 x the error of the
   reference run in that dtype + a floor); a FAIL line names the case.
2. Timing (torch.cuda.Event around each call, warm-up, median of the repetitions) on
     I = J = 256, T = S = 1,   D = E = 1024, C = 10, full      (an MLP layer, 10 outputs)
     I = J = 64,  T = S = 128, D = E = 768,  C = 2,  full / trace
     I = J = 16,  T = S = 512, D = E = 1024, C = 1,  trace
   (plus the T = S = 128 trace with token ids: an embedding layer).  Each backend through the public op, and the
   Triton kernel / variant choices through the backend function.  Reported: ms, achieved TFLOP/s of the useful
   flops (below), that as a fraction of the dense matmul rate measured in the same run (torch.matmul 8192 x 8192
   in fp32 for fp32 inputs, bf16 for bf16 / fp16 inputs; fp32 follows torch.backends.cuda.matmul.allow_tf32),
   and the speed-up over the reference backend (reference ms / ms).
   Useful flops per sample pair: 2·T·S·D for the token Gram (0 for ids) plus
     full      2·min(C·T·S·E + C²·T·E, C²·T·S·E)   (the cheaper of H = (A_i A_jᵀ) G_j then ⟨G_i, H⟩,
                                                    and C² output-gradient Grams)
     diagonal, trace  2·C·T·S·E
3. The registers / spills of every Triton kernel compiled during the run (triton's CompiledKernel.n_regs, n_spills).

    python benchmarks/gpu_check_gram.py [--dtypes bf16,fp32] [--skip-check] [--skip-bench] [--reps 20]
    TRITON_INTERPRET=1 python benchmarks/gpu_check_gram.py --smoke --device cpu   # the script's logic, tiny shapes
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from benchmarks import _harness  # noqa: E402
from ntk_kernels import _backend, _ext  # noqa: E402
from ntk_kernels.ops import gram_contract, gram_contract_ref  # noqa: E402
from ntk_kernels.ops import _gram_triton as GT  # noqa: E402
from _compare import FLOOR  # noqa: E402

OP = "gram"
BACKENDS = ("cuda", "triton", "reference")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("full", "diagonal", "trace")
# (kernel, full_via): the pair kernel's default in modes other than full, its two variants in full mode
TRITON_VARIANTS = (("block", None), ("pair", None), ("pair", "p"), ("pair", "h"))
# (I, J, C, T, S, D, E): odd sizes; MLP rows, short and long sequences, C = 10 (pair "h" by default), E = 1024
CHECK_SHAPES = [(37, 29, 3, 1, 1, 300, 130), (11, 7, 2, 5, 13, 33, 70), (5, 7, 2, 45, 77, 33, 70),
                (3, 4, 10, 128, 96, 64, 200), (4, 3, 1, 513, 300, 17, 1024)]
# (I, J, C, T, S, D, E, mode, ids)
BENCH_CASES = [(256, 256, 10, 1, 1, 1024, 1024, "full", False),
               (64, 64, 2, 128, 128, 768, 768, "full", False),
               (64, 64, 2, 128, 128, 768, 768, "trace", False),
               (64, 64, 2, 128, 128, 768, 768, "trace", True),
               (16, 16, 1, 512, 512, 1024, 1024, "trace", False)]
SMOKE_CHECK_SHAPES = [(3, 2, 3, 1, 1, 5, 7), (2, 3, 2, 20, 9, 5, 18)]
SMOKE_BENCH_CASES = [(4, 3, 3, 1, 1, 20, 20, "full", False), (2, 2, 2, 20, 17, 18, 18, "trace", True)]


def inputs(I, J, C, T, S, D, E, dtype, ids, device, seed=0):
    """a1, g1, a2, g2 in ``dtype`` (ids: int64 from a small vocabulary, so they repeat)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    if ids:
        vocab = max(2, (T + S) // 4)
        a1 = torch.randint(0, vocab, (I, T), generator=g, device=device)
        a2 = torch.randint(0, vocab, (J, S), generator=g, device=device)
    else:
        a1, a2 = rnd(I, T, D, scale=D ** -0.5), rnd(J, S, D, scale=D ** -0.5)
    return [a1, rnd(I, C, T, E, scale=E ** -0.5), a2, rnd(J, C, S, E, scale=E ** -0.5)]


def cast(ins, dtype):
    return [x if x.dtype in (torch.int32, torch.int64) else x.to(dtype) for x in ins]


def useful_flops(I, J, C, T, S, D, E, mode, ids):
    aa = 0 if ids else T * S * D
    if mode == "full":
        rest = min(C * T * S * E + C * C * T * E, C * C * T * S * E)
    else:
        rest = C * T * S * E
    return 2 * I * J * (aa + rest)


def forced(backend):
    _harness.force_backend(OP, backend)


def available(device, dtype):
    """{backend: reasons} of the backends of BACKENDS, empty reasons = it runs."""
    return {b: r for b, r in _backend.not_supported_reasons(OP, torch.device(device), dtype).items() if b in BACKENDS}


def runners(device, dtype, T, S, mode):
    """(name, fn(a1, g1, a2, g2, mode)) of every backend that can run, and of the Triton variants that apply: the
    full-mode variants in full mode only, the block kernel only while a padded sample fits a 64-row tile."""
    out = []
    for b, reasons in available(device, dtype).items():
        if reasons:
            continue

        def op(a1, g1, a2, g2, mode, b=b):
            forced(b)  # read by _backend.choose on every call
            return gram_contract(a1, g1, a2, g2, mode)
        out.append((b, op))
        if b == "triton":
            fn = _backend._REGISTRY[OP]["triton"].fn
            for kernel, via in TRITON_VARIANTS:
                if (via is not None) != (mode == "full" and kernel == "pair"):
                    continue
                if kernel == "block" and max(GT._p2(T), GT._p2(S)) > 64:
                    continue
                def variant(a1, g1, a2, g2, mode, k=kernel, v=via):
                    return fn(a1, g1, a2, g2, mode, kernel=k, full_via=v)
                out.append((f"triton:{kernel}{':' + via if via else ''}", variant))
    return out


def check(device, shapes, dtypes):
    ok = True
    for dname in dtypes:
        dtype = DTYPES[dname]
        for b, reasons in available(device, dtype).items():
            if reasons:
                print(f"{b:9s} {dname}: unavailable: {'; '.join(reasons)}")
        for shape in shapes:
            for ids in (False, True):
                ins64 = inputs(*shape, torch.float64, ids, device, seed=sum(shape))
                ins = cast(ins64, dtype)
                exact = cast(ins, torch.float64)  # the tested values, in float64
                for mode in MODES:
                    ref = gram_contract_ref(*exact, mode)
                    low = gram_contract_ref(*ins, mode) if dtype in (torch.float16, torch.bfloat16) else None
                    scale = max(1.0, ref.abs().max().item())
                    low_err = (low.double() - ref).abs().max().item() if low is not None else 0.0
                    budget = FLOOR[dtype] * scale + 2 * low_err
                    for name, fn in runners(device, dtype, shape[3], shape[4], mode):
                        try:
                            out = fn(*ins, mode)
                            err = (out.double() - ref).abs().max().item()
                            bad = (out.shape != ref.shape or not torch.isfinite(out).all() or err > budget
                                   or out.dtype != (torch.float64 if dtype == torch.float64 else torch.float32))
                            msg = (f"FAIL ({tuple(out.shape)} {out.dtype}, err {err:.2e} > {budget:.2e}?)" if bad
                                   else "ok")
                        except Exception as e:  # report and go on: the other backends still get checked
                            bad, err, msg = True, float("nan"), f"FAIL raised {type(e).__name__}: {e}"
                        ok &= not bad
                        print(f"{name:16s} {dname} {'ids ' if ids else 'feat'} {mode:8s} IJCTSDE={shape}: "
                              f"max rel err {err / scale:.2e} (budget {budget / scale:.2e}) {msg}", flush=True)
    forced(None)
    return ok


def matmul_tflops(device, dtype, n, reps):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = _harness.median_ms(lambda: torch.matmul(a, b), device, reps)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def bench(device, cases, dtypes, reps, matmul_n):
    peak = {"fp32": matmul_tflops(device, torch.float32, matmul_n, reps),
            "bf16": matmul_tflops(device, torch.bfloat16, matmul_n, reps)}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    print(f"# dense matmul {matmul_n}^2: fp32 {peak['fp32']:.1f} TFLOP/s (allow_tf32={tf32}), "
          f"bf16 {peak['bf16']:.1f} TFLOP/s")
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for (I, J, C, T, S, D, E, mode, ids) in cases:
            ins = inputs(I, J, C, T, S, D, E, dtype, ids, device)
            flops = useful_flops(I, J, C, T, S, D, E, mode, ids)
            case = dict(dtype=dname, I=I, J=J, C=C, T=T, S=S, D=D, E=E, mode=mode, a="ids" if ids else "feat")
            case_rows = []
            for name, fn in runners(device, dtype, T, S, mode):
                try:
                    ms = _harness.median_ms(lambda: fn(*ins, mode), device, reps)
                except Exception as e:  # e.g. out of memory in the reference: report, keep the other rows
                    print(f"{name} {case}: raised {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                tflops = flops / (ms * 1e-3) / 1e12
                ref_peak = peak["fp32"] if dtype == torch.float32 else peak["bf16"]
                case_rows.append(dict(case, backend=name, ms=ms, tflops=tflops, frac_peak=tflops / ref_peak))
            ref_ms = next((r["ms"] for r in case_rows if r["backend"] == "reference"), None)
            for r in case_rows:
                r["x_reference"] = ref_ms / r["ms"] if ref_ms else float("nan")
            rows += case_rows
            forced(None)
            print(f"done {case}", file=sys.stderr, flush=True)
    m = _harness.machine()
    print(f"# gram_contract on {m.get('gpu', m.get('cpu'))}, torch {m['torch']} (CUDA {m.get('cuda')}), "
          f"commit {m.get('commit')}; frac_peak: of the matmul rate above in the same dtype (fp32 / bf16)")
    print(_harness.table(rows, ["dtype", "I", "J", "C", "T", "S", "D", "E", "mode", "a", "backend", "ms", "tflops",
                                "frac_peak", "x_reference"]))
    return rows


def compiled_kernels():
    """Registers / spills of every Triton gram kernel the run compiled."""
    return _harness.triton_compile_info((GT._gram_block_kernel, GT._gram_pair_kernel))


def main(argv=None):
    args, dtypes, check_dtypes = _harness.gpu_check_args(_harness.gpu_check_parser(__doc__), argv, "gpu_check_gram.py",
                                                          DTYPES, smoke_help="tiny shapes, 3 repetitions, 256^2 matmul")
    print(f"# extensions: {_ext.status()}")
    print(f"# backends on {args.device}: " + _harness.format_reasons(available(args.device, torch.float32)))
    ok = True
    if not args.skip_check:
        ok = check(args.device, SMOKE_CHECK_SHAPES if args.smoke else CHECK_SHAPES, check_dtypes)
    if not args.skip_bench:
        bench(args.device, SMOKE_BENCH_CASES if args.smoke else BENCH_CASES, [d for d in dtypes if d != "fp64"],
              3 if args.smoke else args.reps, 256 if args.smoke else 8192)
    print("\n".join(compiled_kernels()))
    if not ok:
        sys.exit("correctness check FAILED (see the FAIL lines above)")


if __name__ == "__main__":
    main()
