"""GPU session check of the forward-mode ops ntk::linear_jvp and ntk::layer_norm_jvp: correctness, then timings.
Builds nothing: run it after ``pip install -e .`` on a machine with a GPU (written for an H100 / H200).

1. Correctness: every backend of each op that can run on cuda with the dtype (cuda if ntk_kernels._C_cuda loaded
   and has the ops, triton, reference; the reasons of the others are printed), forced through
   NTK_KERNELS_BACKEND_<OP>, on odd shapes x tangent combinations (shared / per-sample Ẇ and ḃ, None tangents,
   a transposed-view weight as GPT-2's Conv1D passes) x {fp64, fp32, bf16, fp16}, against linear_jvp_ref /
   layer_norm_jvp_ref in float64 on the very (rounded) inputs.  Prints the max error relative to max(1, max|ref|)
   and the budget of tests/_compare.py (2 x the error of the reference run in that dtype + a floor); a FAIL line
   names the case and the script exits non-zero at the end.
2. Timing (CUDA events, warm-up, median of the repetitions), bf16 and fp32 by default:
     linear_jvp (N, L, d_in, d_out) = (8, 512, 4096, 4096), (8, 512, 4096, 11008), (4, 1024, 768, 3072) with the
       Conv1D transposed weight, (64, 1, 4096, 4096); tangents ẋ + shared Ẇ + ḃ ("full") and ẋ only ("x");
       per-sample Ẇ on (16, 128, 1024, 1024).
     layer_norm_jvp (N, L, D) = (8, 512, 4096), (32, 512, 768): LayerNorm and RMSNorm, ẋ + ẇ (+ ḃ).
   Against what a user would otherwise run: torch.func.jvp of F.linear / F.layer_norm / F.rms_norm (vmapped over
   samples for a per-sample Ẇ), and the plain forward F.linear / F.layer_norm (y only: the floor).  Reported: ms,
   TFLOP/s (linear: 2·M·d_out·d_in per product, 1 + [ẋ] + [Ẇ] products) or GB/s (norm: x, ẋ read, y, ẏ written, in
   the input dtype), and speed-ups x_func_jvp = torch.func.jvp ms / ms, x_forward = ms / forward ms (the cost of
   the tangent relative to the forward alone).
3. Registers / spills of the Triton kernels compiled during the run.

    python benchmarks/gpu_check_jvp.py [--dtypes bf16,fp32] [--skip-check] [--skip-bench] [--reps 20] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/gpu_check_jvp.py --smoke --device cpu   # the script's logic, tiny shapes
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from benchmarks import _harness  # noqa: E402
from ntk_kernels import _backend, _ext  # noqa: E402
from ntk_kernels.ops import jvp as J  # noqa: E402
from _compare import FLOOR  # noqa: E402

BACKENDS = ("cuda", "triton", "reference")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOW = (torch.float16, torch.bfloat16)

# linear: (N, L, d_in, d_out), (xd, wd, bias, bd, transposed)
LIN_CHECK_SHAPES = [(3, 37, 130, 67), (2, 200, 64, 257), (5, 1, 300, 100), (1, 3, 1, 5)]
LIN_COMBOS = [(True, "shared", True, "shared", False), (True, "sample", True, "sample", True),
              (False, "sample", False, None, False), (True, None, True, None, True), (False, None, False, None, False)]
NORM_CHECK_SHAPES = [(3, 37, 130), (2, 5, 4096), (1, 3, 10000), (4, 1, 1)]
# (rms, w, b, xd, wd, bd)
NORM_COMBOS = [(False, True, True, True, "shared", "shared"), (False, True, True, True, "sample", "sample"),
               (True, True, False, True, "sample", None), (False, False, False, True, None, None),
               (True, True, False, False, "shared", None)]
# (name, (N, L, d_in, d_out), combo)
LIN_BENCH = [("llama-qkv full", (8, 512, 4096, 4096), LIN_COMBOS[0][:4] + (False,)),
             ("llama-qkv x", (8, 512, 4096, 4096), (True, None, True, None, False)),
             ("llama-mlp full", (8, 512, 4096, 11008), (True, "shared", False, "shared", False)),
             ("gpt2-conv1d full", (4, 1024, 768, 3072), (True, "shared", True, "shared", True)),
             ("decode full", (64, 1, 4096, 4096), (True, "shared", True, "shared", False)),
             ("per-sample W", (16, 128, 1024, 1024), (True, "sample", True, "sample", False))]
NORM_BENCH = [("llama rms", (8, 512, 4096), (True, True, False, True, "shared", None)),
              ("llama ln", (8, 512, 4096), (False, True, True, True, "shared", "shared")),
              ("bert ln", (32, 512, 768), (False, True, True, True, "shared", "shared"))]
SMOKE_LIN_CHECK = [(2, 5, 19, 21), (3, 1, 7, 9)]
SMOKE_NORM_CHECK = [(2, 5, 19), (3, 1, 70)]
SMOKE_LIN_BENCH = [("smoke full", (2, 8, 32, 32), LIN_COMBOS[0]), ("smoke sample", (2, 8, 32, 32), LIN_COMBOS[1])]
SMOKE_NORM_BENCH = [("smoke ln", (2, 8, 32), NORM_COMBOS[0]), ("smoke rms", (2, 8, 80), NORM_BENCH[0][2])]


def linear_inputs(N, L, K, O, combo, dtype, device, seed=0):
    xd, wd, bias, bd, transposed = combo
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    s = max(K, 1) ** -0.5
    W = rnd(K, O, scale=s).t() if transposed else rnd(O, K, scale=s)
    wdot = {None: None, "shared": rnd(K, O, scale=s).t() if transposed else rnd(O, K, scale=s),
            "sample": rnd(N, O, K, scale=s)}[wd]
    bdot = {None: None, "shared": rnd(O), "sample": rnd(N, O)}[bd]
    return [rnd(N, L, K), W, rnd(O) if bias else None, rnd(N, L, K) if xd else None, wdot, bdot]


def norm_inputs(N, L, D, combo, dtype, device, seed=0):
    rms, w, b, xd, wd, bd = combo
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    b = b and not rms
    vec = lambda kind: {None: None, "shared": rnd(D), "sample": rnd(N, D)}[kind]  # noqa: E731
    return [(rnd(N, L, D) * 2 + 0.5).to(dtype), rnd(D) if w else None, rnd(D) if b else None, 1e-5,
            rnd(N, L, D) if xd else None, vec(wd) if w else None, vec(bd) if b else None, rms]


def f64(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


def available(op, device, dtype):
    return {b: r for b, r in _backend.not_supported_reasons(op, torch.device(device), dtype).items() if b in BACKENDS}


def runners(op, device, dtype):
    """(backend, fn(*inputs)) of every backend that can run op on (device, dtype), through the public op."""
    public = J.linear_jvp if op == "linear_jvp" else J.layer_norm_jvp
    out = []
    for b, reasons in available(op, device, dtype).items():
        if not reasons:
            def fn(*ins, b=b):
                _harness.force_backend(op, b)  # read by _backend.choose on every call
                return public(*ins)
            out.append((b, fn))
    return out


def check(device, lin_shapes, norm_shapes, dtypes):
    ok = True
    cases = [("linear_jvp", s, c, linear_inputs, J.linear_jvp_ref) for s in lin_shapes for c in LIN_COMBOS]
    cases += [("layer_norm_jvp", s, c, norm_inputs, J.layer_norm_jvp_ref) for s in norm_shapes for c in NORM_COMBOS]
    for dname in dtypes:
        dtype = DTYPES[dname]
        for op in ("linear_jvp", "layer_norm_jvp"):
            for b, reasons in available(op, device, dtype).items():
                if reasons:
                    print(f"{op} {b:9s} {dname}: unavailable: {'; '.join(reasons)}")
        for op, shape, combo, make, ref_fn in cases:
            ins = make(*shape, combo, dtype, device, seed=sum(shape))
            ref = ref_fn(*f64(ins))
            low = ref_fn(*ins) if dtype in LOW else (None, None)
            for name, fn in runners(op, device, dtype):
                for what, r, lo, i in (("y", ref[0], low[0], 0), ("y_dot", ref[1], low[1], 1)):
                    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
                    budget = FLOOR[dtype] * scale + (2 * (lo.double() - r).abs().max().item() if lo is not None
                                                     and r.numel() else 0.0)
                    try:
                        out = fn(*ins)[i]
                        err = (out.double() - r).abs().max().item() if r.numel() else 0.0
                        bad = (out.shape != r.shape or out.dtype != dtype or not torch.isfinite(out).all()
                               or err > budget)
                        msg = f"FAIL ({tuple(out.shape)} {out.dtype}, err {err:.2e} > {budget:.2e}?)" if bad else "ok"
                    except Exception as e:  # report and go on: the other backends still get checked
                        bad, err, msg = True, float("nan"), f"FAIL raised {type(e).__name__}: {e}"
                    ok &= not bad
                    print(f"{op:14s} {name:9s} {dname} {shape} {combo} {what:5s}: max rel err {err / scale:.2e} "
                          f"(budget {budget / scale:.2e}) {msg}", flush=True)
    _harness.force_backend("linear_jvp", None)
    _harness.force_backend("layer_norm_jvp", None)
    return ok


def linear_baselines(ins):
    """(torch.func.jvp of F.linear, plain F.linear) on the same inputs; None tangents are zeros (what a user
    of torch.func.jvp has to pass)."""
    x, W, b, xd, wd, bd = ins
    b0 = torch.zeros(W.shape[0], device=x.device, dtype=x.dtype) if b is None else b
    xd = torch.zeros_like(x) if xd is None else xd
    wd = torch.zeros_like(W) if wd is None else wd
    bd = torch.zeros_like(b0) if bd is None else bd
    if wd.ndim == 3 or bd.ndim == 2:
        wd = wd.expand(x.shape[0], *W.shape) if wd.ndim == 2 else wd
        bd = bd.expand(x.shape[0], W.shape[0]) if bd.ndim == 1 else bd
        one = lambda xn, xdn, wdn, bdn: torch.func.jvp(F.linear, (xn, W, b0), (xdn, wdn, bdn))  # noqa: E731
        jvp = lambda: torch.func.vmap(one)(x, xd, wd, bd)  # noqa: E731
    else:
        jvp = lambda: torch.func.jvp(F.linear, (x, W, b0), (xd, wd, bd))  # noqa: E731
    return jvp, (lambda: F.linear(x, W, b))


def norm_baselines(ins):
    """(torch.func.jvp of F.layer_norm / F.rms_norm, the plain forward); shared ẇ, ḃ only (None: zeros)."""
    x, w, b, eps, xd, wd, bd, rms = ins
    D = x.shape[-1]
    primals, tangents = [x], [torch.zeros_like(x) if xd is None else xd]
    for p, t in ((w, wd), (b, bd)):
        if p is not None:
            if t is not None and t.ndim != 1:
                raise ValueError("benchmark norm cases use shared weight_dot, bias_dot")
            primals.append(p)
            tangents.append(torch.zeros_like(p) if t is None else t)

    def f(xx, *p):
        ww = p[0] if w is not None else None
        bb = p[-1] if b is not None else None
        return F.rms_norm(xx, (D,), ww, eps) if rms else F.layer_norm(xx, (D,), ww, bb, eps)

    return (lambda: torch.func.jvp(f, tuple(primals), tuple(tangents))), (lambda: f(*primals))


def bench(device, lin_cases, norm_cases, dtypes, reps):
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for op, cases in (("linear_jvp", lin_cases), ("layer_norm_jvp", norm_cases)):
            for name, shape, combo in cases:
                if op == "linear_jvp":
                    ins = linear_inputs(*shape, combo, dtype, device)
                    N, L, K, O = shape
                    products = 1 + (combo[0] is True) + (combo[1] is not None)
                    work = 2 * N * L * K * O * products / 1e12  # TFLOP
                    unit = "TFLOP/s"
                    jvp, fwd = linear_baselines(ins)
                else:
                    ins = norm_inputs(*shape, combo, dtype, device)
                    N, L, D = shape
                    work = (2 + 2 * (combo[3] is True)) * N * L * D * ins[0].element_size() / 1e9  # GB moved
                    unit = "GB/s"
                    jvp, fwd = norm_baselines(ins)
                case = dict(op=op, case=name, dtype=dname, shape="x".join(map(str, shape)))
                case_rows = []
                for label, fn in [(b, (lambda fn=fn: fn(*ins))) for b, fn in runners(op, device, dtype)] + \
                        [("torch.func.jvp", jvp), ("forward only", fwd)]:
                    try:
                        ms = _harness.median_ms(fn, device, reps)
                    except Exception as e:  # e.g. out of memory: report, keep the other rows
                        print(f"{label} {case}: raised {type(e).__name__}: {e}", file=sys.stderr)
                        continue
                    case_rows.append(dict(case, impl=label, ms=ms, rate=work / (ms * 1e-3), unit=unit))
                _harness.force_backend(op, None)
                jvp_ms = next((r["ms"] for r in case_rows if r["impl"] == "torch.func.jvp"), None)
                fwd_ms = next((r["ms"] for r in case_rows if r["impl"] == "forward only"), None)
                for r in case_rows:
                    r["x_func_jvp"] = jvp_ms / r["ms"] if jvp_ms else float("nan")
                    r["x_forward"] = r["ms"] / fwd_ms if fwd_ms else float("nan")
                rows += case_rows
                print(f"done {case}", file=sys.stderr, flush=True)
    m = _harness.machine()
    print(f"# jvp ops on {m.get('gpu', m.get('cpu'))}, torch {m['torch']} (CUDA {m.get('cuda')}), triton "
          f"{m.get('triton')}, commit {m.get('commit')}; fp32 matmuls allow_tf32="
          f"{torch.backends.cuda.matmul.allow_tf32}.  rate: TFLOP/s (linear, the useful products) or GB/s (norm); "
          f"x_func_jvp = torch.func.jvp ms / ms; x_forward = ms / forward-only ms")
    print(_harness.table(rows, ["op", "case", "dtype", "shape", "impl", "ms", "rate", "unit", "x_func_jvp",
                                "x_forward"]))
    return rows


def compiled_kernels():
    """Registers / spills of every Triton jvp kernel the run compiled."""
    try:
        from ntk_kernels.ops import _jvp_triton as JT
        kernels = (JT._linear_jvp_kernel, JT._layer_norm_jvp_kernel)
    except Exception as e:  # noqa: BLE001
        return [f"no Triton jvp kernels ({type(e).__name__}: {e})"]
    return _harness.triton_compile_info(kernels)


def main(argv=None):
    ap = _harness.gpu_check_parser(__doc__)
    ap.add_argument("--json", default=None, help="write the timing rows (with machine, commit) to this file")
    args, dtypes, check_dtypes = _harness.gpu_check_args(ap, argv, "gpu_check_jvp.py", DTYPES)
    print(f"# extensions: {_ext.status()}")
    for op in ("linear_jvp", "layer_norm_jvp"):
        reasons = available(op, args.device, torch.float32)
        print(f"# {op} backends on {args.device}: " + _harness.format_reasons(reasons))
    ok = True
    if not args.skip_check:
        ok = check(args.device, SMOKE_LIN_CHECK if args.smoke else LIN_CHECK_SHAPES,
                   SMOKE_NORM_CHECK if args.smoke else NORM_CHECK_SHAPES, check_dtypes)
    if not args.skip_bench:
        rows = bench(args.device, SMOKE_LIN_BENCH if args.smoke else LIN_BENCH,
                     SMOKE_NORM_BENCH if args.smoke else NORM_BENCH, [d for d in dtypes if d != "fp64"],
                     3 if args.smoke else args.reps)
        if args.json:
            _harness.write_json(args.json, rows, {"script": "benchmarks/gpu_check_jvp.py", "check_ok": ok})
            print(f"# wrote {args.json}")
    print("\n".join(compiled_kernels()))
    if not ok:
        sys.exit("correctness check FAILED (see the FAIL lines above)")


if __name__ == "__main__":
    main()
