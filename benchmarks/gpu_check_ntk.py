"""GPU session check of ntk_kernels.empirical_ntk end to end: correctness, then timings against the torch.func
tutorial recipe.  Builds nothing: run it after ``pip install -e .`` on a machine with a GPU (written for an H100 /
H200); needs transformers (random weights, nothing downloaded) and tests/_models.py (no pytest needed).

1. Correctness: empirical_ntk on the device against ntk_kernels.ntk.empirical_ntk_reference (torch.func jacrev +
   vmap, or its per-sample loop where vmap fails) computed on the CPU in float64 from the very (rounded) weights,
   on three small seeded models:
     mlp   MLP 13-17-11-3 (tanh), inputs1 (7, 13), inputs2 (5, 13)
     bert  BertForSequenceClassification (hidden 32, 2 layers, 2 heads, intermediate 37, vocab 50, 3 labels), eager
           attention, 6 tokens with left padding and its attention_mask (tests/_models.left_padded), 7 and 5 samples
     gpt2  GPT2ForSequenceClassification (n_embd 16, 2 layers, 2 heads, vocab 50, 2 labels, pad token 0), eager,
           the same kind of padded inputs
   x mode (full, trace, diagonal) x kernel (sgd, signgd) x inputs2 (None, given) x model dtype (fp64, fp32;
   --check-dtypes) x block_size (3: blocks of 3, 3, 1 samples; None: the engine's choice).  The sign kernel leaves
   out the parameters whose gradient is 0 in exact arithmetic and rounding noise in floating point (softmax is
   shift-invariant in the key bias: BERT's *key.bias, GPT-2's c_attn.bias, whose key third is such): their sign is
   undefined.  Prints max |K - K_ref| / max |K_ref| and PASS / FAIL against the budget (fp64 1e-9, fp32 1e-4; a
   wrong shape, dtype, device or a non-finite entry FAILs too).
2. Timing (fp32 by default, --dtypes; CUDA events, torch.cuda.synchronize after the calls): a warm-up call at the
   same N, which also gives the peak memory (torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
   what was allocated before: beyond the model and inputs), then the median of --reps calls (3 once a call takes
   over a second).  The models and seeded inputs of benchmarks/bench_ntk.py's build():
     mlp   MLP 784-512-512-10 (tanh), N = 256, full
     bert  BertForSequenceClassification h128 L2 (2 heads, intermediate 512), vocab --bert-vocab (30522), seq 32,
           N = 64, full (all-ones attention_mask, dropped in both methods where vmap fails on it)
     gpt2  GPT2ForSequenceClassification, GPT-2-small config (124M parameters), seq 32, N = 256, trace
   ntk_kernels.empirical_ntk (engine defaults) against bench_ntk.torch_func_recipe (the tutorial's
   empirical_ntk_jacobian_contraction: vmap(jacrev) Jacobians of x1 and x2, --recipe-jacobians) on the same GPU at
   the same N.  Where the recipe runs out of GPU memory (torch.cuda.OutOfMemoryError; GPT-2's J alone is N·C·P·4 B
   = 254 GB at N = 256) its row says OOM and it runs again at N/2, N/4, ... on the first samples until it fits;
   the speed-up is then per kernel entry: (recipe ms / its entries) / (ntk_kernels ms / its entries).  mem_x: the
   recipe's peak over ntk_kernels' (same N only); max_rel_diff: max |K - K_recipe| / max |K_recipe| on the
   recipe's samples, above bench_ntk.AGREE_TOL (1e-3) flagged DISAGREE.
The exit status is 1 when any check FAILs or any timing case DISAGREEs.

    python benchmarks/gpu_check_ntk.py [--skip-check] [--skip-bench] [--reps 20] [--case mlp bert gpt2] [--json o.json]
    python benchmarks/gpu_check_ntk.py --skip-check --case gpt2 --recipe-max-n 32   # the recipe tried from N = 32
    python benchmarks/gpu_check_ntk.py --smoke --device cpu   # the script's logic on the CPU: the same checks, then
        timings on N = 4 (mlp, bert with vocab 64) and a tiny GPT-2 at N = 8 whose recipe is made to OOM above N = 2
"""
from __future__ import annotations

import copy
import gc
import itertools
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
from benchmarks import _harness  # noqa: E402
from benchmarks import bench_ntk as B  # noqa: E402
from ntk_kernels import _backend, _ext, empirical_ntk  # noqa: E402
from ntk_kernels.bench import max_rel_err  # noqa: E402
from ntk_kernels.ntk import empirical_ntk_reference  # noqa: E402
from ntk_kernels.ops import _gram_triton as GT  # noqa: E402
from _models import left_padded  # noqa: E402

DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
BUDGET = {torch.float64: 1e-9, torch.float32: 1e-4}  # max |K - K_ref| / max |K_ref|
MODES = ("full", "trace", "diagonal")
KERNELS = ("sgd", "signgd")
CHECK_MODELS = ("mlp", "bert", "gpt2")
CHECK_N = (7, 5)  # samples of inputs1, inputs2
CHECK_BLOCKS = (3, None)
# parameters left out of the sign kernel: gradient 0 in exact arithmetic (softmax shift invariance), noise in floats
SIGN_EXCLUDE = {"bert": "key.bias", "gpt2": "c_attn.bias"}
CASES = ("mlp", "bert", "gpt2")
LABELS = {"mlp": "MLP 784-512-512-10", "bert": "BERT h128 L2 seq 32 vocab {vocab}", "gpt2": "GPT-2 small seq 32"}
BENCH = {"mlp": dict(N=256, mode="full"), "bert": dict(N=64, mode="full"), "gpt2": dict(N=256, mode="trace")}
# --smoke: tiny N; bert with vocab 64; a tiny GPT-2 whose recipe raises OutOfMemoryError above N = 2 (the halving)
SMOKE_BENCH = {"mlp": dict(N=4, mode="full"), "bert": dict(N=4, mode="full"),
               "gpt2": dict(N=8, mode="trace", oom_above=2)}
SMOKE_BERT_VOCAB = 64


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------
def tiny_model(name: str) -> torch.nn.Module:
    """A small seeded float64 model (the check models; --smoke's GPT-2 timing model too)."""
    torch.manual_seed(0)
    if name == "mlp":
        return B.mlp((13, 17, 11, 3)).double().eval()
    import transformers

    transformers.logging.set_verbosity_error()
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=37, vocab_size=50, max_position_embeddings=16, num_labels=3,
                                      attn_implementation="eager")
        return transformers.BertForSequenceClassification(cfg).double().eval()
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16, num_labels=2,
                                  pad_token_id=0, attn_implementation="eager")
    return transformers.GPT2ForSequenceClassification(cfg).double().eval()


def tiny_inputs(name: str, n: int, seed: int):
    if name == "mlp":
        return torch.randn(n, 13, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return left_padded(n, t=6, v=50, seed=seed)


def to(x, device, dtype):
    """Inputs on ``device``; floating tensors in ``dtype``, token ids and masks as they are."""
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)
    return {k: to(v, device, dtype) for k, v in x.items()}


def check(device: str, dtypes) -> tuple:
    """(all passed, one row per case)."""
    ok, rows, dev_type = True, [], torch.device(device).type
    for name in CHECK_MODELS:
        base = tiny_model(name)
        x1, x2 = tiny_inputs(name, CHECK_N[0], 1), tiny_inputs(name, CHECK_N[1], 2)
        for dname in dtypes:
            dtype = DTYPES[dname]
            model = copy.deepcopy(base).to(device, dtype)
            exact = copy.deepcopy(model).to("cpu", torch.float64)  # the rounded weights, in float64
            d1, d2 = to(x1, device, dtype), to(x2, device, dtype)
            r1, r2 = to(d1, "cpu", torch.float64), to(d2, "cpu", torch.float64)
            for kernel, given, mode in itertools.product(KERNELS, (False, True), MODES):
                params = None
                if kernel != "sgd" and name in SIGN_EXCLUDE:
                    params = lambda n, p, s=SIGN_EXCLUDE[name]: not n.endswith(s)  # noqa: E731
                ref = empirical_ntk_reference(exact, r1, r2 if given else None, params=params, mode=mode,
                                              kernel=kernel, dtype=torch.float64)
                for bs in CHECK_BLOCKS:
                    try:
                        out = empirical_ntk(model, d1, d2 if given else None, params=params, mode=mode,
                                            kernel=kernel, block_size=bs, dtype=dtype)
                        err = max_rel_err(out, ref)
                        bad = (out.shape != ref.shape or out.dtype != dtype or out.device.type != dev_type
                               or not torch.isfinite(out).all() or not err <= BUDGET[dtype])
                        msg = (f"FAIL ({tuple(out.shape)} {out.dtype} on {out.device})" if bad else "PASS")
                    except Exception as e:  # report and go on: the other cases still get checked
                        bad, err, msg = True, float("nan"), f"FAIL raised {type(e).__name__}: {e}"
                    ok &= not bad
                    rows.append(dict(model=name, dtype=dname, kernel=kernel, mode=mode, inputs2=given,
                                     block_size=bs, max_rel_err=err, passed=not bad))
                    print(f"{name:4s} {dname} {kernel:6s} {mode:8s} inputs2={'given' if given else 'None '} "
                          f"block_size={str(bs):4s}: max rel err {err:.2e} (budget {BUDGET[dtype]:.0e}) {msg}",
                          flush=True)
    return ok, rows


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def bench_model(case: str, N: int, smoke: bool, bert_vocab: int):
    """(model, inputs, notes) on the CPU in float32: bench_ntk.build(), or --smoke's tiny GPT-2."""
    if smoke and case == "gpt2":
        model = tiny_model("gpt2").float()
        # transformers' padding-warning check reads the ids in Python (breaks vmap), as in bench_ntk.build
        model.transformer.warn_if_padding_and_no_attention_mask = lambda *a, **k: None
        ids = torch.randint(1, 50, (N, 6), generator=torch.Generator().manual_seed(3))  # no pad token
        return model, {"input_ids": ids}, ["smoke gpt2: tiny GPT-2 (n_embd 16, 2 layers), 6 tokens"]
    return B.build(dict(model=case, N=N, bert_vocab=bert_vocab))


def first(x, n):
    return x[:n] if isinstance(x, torch.Tensor) else {k: v[:n] for k, v in x.items()}


def measure(fn, device: str, reps: int):
    """(median ms, peak bytes, result): a warm-up call that measures the peak, then ``reps`` timed calls."""
    box = []
    peak = _harness.peak_memory_bytes(lambda: box.append(fn()), device)
    ms = _harness.median_ms(fn, device, reps, warmup=0)
    return ms, peak, box[0]


def release(device: str) -> None:
    """Returns the caching allocator's free blocks (after an out-of-memory call, between cases)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_recipe(model, x, N: int, mode: str, device: str, reps: int, two: bool, max_n, oom_above):
    """Rows of the recipe at N, N/2, ... (from the largest N <= max_n) until one fits, and (N, ms, K) of that one."""
    rows, n = [], N
    while max_n and n > max_n:
        n //= 2
    while n >= 1:
        xs = first(x, n)

        def fn(xs=xs, n=n):
            if oom_above is not None and n > oom_above:
                raise torch.cuda.OutOfMemoryError(f"simulated (--smoke): the recipe above N = {oom_above}")
            return B.torch_func_recipe(model, xs, xs if two else None, mode)

        row = dict(N=n, method="torch.func recipe")
        try:
            ms, peak, K = measure(fn, device, reps)
        except torch.cuda.OutOfMemoryError as e:
            rows.append(dict(row, status="OOM", note=str(e).splitlines()[0][:120]))
        except Exception as e:  # noqa: BLE001 - not memory: report, no smaller N
            rows.append(dict(row, status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            return rows, None
        else:
            variant = B._recipe_jacobians.variant + (", J for x1 and x2" if two else ", J once")
            rows.append(dict(row, status="ok", ms=ms, entries=K.numel(), peak=peak, note=variant))
            return rows, K
        release(device)  # after the except clause: the traceback's frames (and their tensors) are gone
        n //= 2
    return rows, None


def bench(args, cases, dtypes):
    rows, bad = [], []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for case in cases:
            cfg = (SMOKE_BENCH if args.smoke else BENCH)[case]
            N, mode = cfg["N"], cfg["mode"]
            vocab = SMOKE_BERT_VOCAB if args.smoke else args.bert_vocab
            model, x, notes = bench_model(case, N, args.smoke, vocab)
            model = model.to(args.device, dtype)
            x = to(x, args.device, dtype)
            label = LABELS[case].format(vocab=vocab) if not (args.smoke and case == "gpt2") else "tiny GPT-2"
            base = dict(case=case, model=label, dtype=dname, mode=mode)
            for note in notes:
                print(f"# {note}")
            _harness.log(f"[{case} {dname}] ntk_kernels N={N} {mode} ...")
            try:
                ms, peak, K = measure(lambda: empirical_ntk(model, x, mode=mode, dtype=dtype), args.device,
                                      args.reps)
                ours = dict(base, N=N, method="ntk_kernels", status="ok", ms=ms, entries=K.numel(), peak=peak,
                            note="empirical_ntk(engine defaults)")
            except Exception as e:  # noqa: BLE001 - out of memory or else: report, keep the other cases
                status = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else "error"
                ours, K = dict(base, N=N, method="ntk_kernels", status=status,
                               note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"), None
                bad.append(f"FAILED: {case} {dname}: ntk_kernels at N={N}: {ours['note']}")
            release(args.device)
            _harness.log(f"[{case} {dname}] torch.func recipe from N={N} ...")
            rec_rows, K_rec = run_recipe(model, x, N, mode, args.device, args.reps, args.recipe_jacobians == "two",
                                         args.recipe_max_n, cfg.get("oom_above"))
            release(args.device)
            rec_rows = [dict(base, **r) for r in rec_rows]
            ref = rec_rows[-1] if rec_rows and rec_rows[-1]["status"] == "ok" else None
            if K is not None and ref is not None:
                n = ref["N"]
                ours["max_rel_diff"] = max_rel_err(K[:n, :n], K_rec)
                ours["speedup"] = (ref["ms"] / ref["entries"]) / (ours["ms"] / ours["entries"])
                ours["compared"] = "same N" if n == N else f"per entry, recipe at N={n}"
                if n == N and ref["peak"] is not None and ours["peak"]:
                    ours["mem_x"] = ref["peak"] / ours["peak"]
                if not ours["max_rel_diff"] <= B.AGREE_TOL:
                    bad.append(f"DISAGREE: {case} {dname}: max rel diff {ours['max_rel_diff']:.1e} > "
                               f"{B.AGREE_TOL:g}")
            for r in [ours] + rec_rows:
                if r.get("ms") is not None:
                    r["us_per_entry"] = r["ms"] * 1e3 / r["entries"]
                r["peak_mib"] = None if r.get("peak") is None else r["peak"] / 2**20
                r.pop("peak", None)
            rows += [ours] + rec_rows
            del model, x, K, K_rec
            release(args.device)
    return rows, bad


def header(device: str) -> str:
    m = _harness.machine()
    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = None
    try:
        gram = _backend.choose("gram", torch.device(device), torch.float32).backend
    except RuntimeError as e:
        gram = f"none ({e})"
    return (f"# eNTK on {m.get('gpu', m.get('cpu'))}, torch {m['torch']} (CUDA {m.get('cuda')}), triton "
            f"{m.get('triton')}, transformers {tv}, commit {m.get('commit')}; fp32 matmuls allow_tf32="
            f"{torch.backends.cuda.matmul.allow_tf32}; gram_contract backend for fp32 on {device}: {gram}")


def main(argv=None):
    ap = _harness.gpu_check_parser(__doc__)
    ap.set_defaults(dtypes="fp32", check_dtypes="fp64,fp32")
    ap.add_argument("--case", nargs="+", choices=CASES, default=list(CASES), help="timing cases (default: all)")
    ap.add_argument("--bert-vocab", type=int, default=30522, help="the bert timing case's vocabulary (default 30522)")
    ap.add_argument("--recipe-jacobians", choices=["two", "one"], default="two",
                    help="two: J for x1 and for x2 as the tutorial's function (default); one: J once for K(X, X)")
    ap.add_argument("--recipe-max-n", type=int, default=None,
                    help="the recipe's first try: the case's N halved until <= this (default: the case's N)")
    ap.add_argument("--json", default=None, help="write the check and timing rows (with machine, commit) here")
    args, dtypes, check_dtypes = _harness.gpu_check_args(ap, argv, "gpu_check_ntk.py", DTYPES,
                                                          smoke_help="tiny models and N, 3 repetitions")
    if args.smoke:
        args.reps = 3
        if args.device == "cpu":
            torch.set_num_threads(1)  # tiny models: one thread avoids OpenMP spin-waits on a shared machine
    print(f"# extensions: {_ext.status()}")
    print(f"# gram backends on {args.device}: " + _harness.format_reasons(
        _backend.not_supported_reasons("gram", torch.device(args.device), torch.float32)))
    print(header(args.device), flush=True)
    ok, check_rows = True, []
    if not args.skip_check:
        ok, check_rows = check(args.device, check_dtypes)
        print(f"# correctness: {sum(r['passed'] for r in check_rows)} of {len(check_rows)} PASS")
    rows, bad = [], []
    if not args.skip_bench:
        rows, bad = bench(args, [c for c in CASES if c in args.case], dtypes)
        print(header(args.device))
        print(_harness.table(rows, ["case", "model", "dtype", "N", "mode", "method", "status", "ms", "us_per_entry",
                                   "peak_mib", "speedup", "mem_x", "max_rel_diff", "compared", "note"]))
        print("\nms: median of the timed calls after a warm-up; us_per_entry: per kernel entry (N·N·C·C full, N·N "
              "trace); peak_mib: peak allocated during the warm-up call beyond what was allocated before;\nspeedup: "
              "the recipe's time per entry over ntk_kernels' (at the same N: the time ratio); mem_x: the recipe's "
              "peak over ntk_kernels' (same N); max_rel_diff: max |K - K_recipe| / max |K_recipe|")
    for line in bad:
        print(line)
    if args.json:
        _harness.write_json(args.json, rows, {"script": "benchmarks/gpu_check_ntk.py", "check_ok": ok,
                                              "check": check_rows, "args": vars(args)})
        print(f"# wrote {args.json}")
    print("\n".join(_harness.triton_compile_info((GT._gram_block_kernel, GT._gram_pair_kernel))))
    if not ok or bad:
        sys.exit("FAILED: " + ("correctness (see the FAIL lines above)" if not ok else "") +
                 ("; " if not ok and bad else "") + ("; ".join(bad) if bad else ""))


if __name__ == "__main__":
    main()
