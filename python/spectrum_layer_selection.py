"""Which layers to fine-tune: the spectrum of the eNTK restricted to a parameter set against the accuracy of
fine-tuning only that set (all-MiniLM-L6-v2 + linear head, few-shot SST-2).

For each candidate set S (every one includes the randomly initialised head), ``layer_selection`` computes the
trace-mode eNTK K_S = Σ_c J_S,c J_S,cᵀ on the k-shot training sentences and its spectrum (λ_max, λ_min, condition
number, effective rank, trace); S alone is then fine-tuned (Adam, cross-entropy + l2·‖θ − θ₀‖²) and evaluated on a
fixed subset of validation sentences.  The last rows give the Spearman rank correlation, across candidates, between
each spectrum statistic and the accuracy.

    python python/spectrum_layer_selection.py            # the default run (results in python/results)
    python python/spectrum_layer_selection.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as cm  # noqa: E402
import torch  # noqa: E402

HEAD = r"head\.modules_to_save"
# regexes on the names of the LoRA model (base weights under ``base_layer``; the head's trainable copy)
CANDIDATES = {
    "head": HEAD,
    "last layer + head": r"(encoder\.layer\.5\.(?!.*lora_))|" + HEAD,
    "attention + head": r"(attention\.(?!.*lora_))|" + HEAD,
    "FFN + head": r"(layer\.\d+\.(intermediate|output)\.dense\.base_layer)|" + HEAD,
    "LoRA + head": r"lora_|" + HEAD,
    "all (no word emb.)": r"^(?!.*(word_embeddings|pooler|lora_|original_module))",
}
STATS = ("lambda_max", "lambda_min", "condition_number", "effective_rank", "trace")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=cm.DEFAULT_DATA, help="folder with train_phrases.tsv and validation.tsv")
    ap.add_argument("--out", default=cm.DEFAULT_OUT, help="folder for spectrum_layer_selection.md / .png")
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32], help="examples per class")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam lr of base weights")
    ap.add_argument("--lr-adapter", type=float, default=1e-3, help="Adam lr of LoRA weights")
    ap.add_argument("--lr-head", type=float, default=1e-3)
    ap.add_argument("--l2", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    args = ap.parse_args(argv)
    if args.quick:
        args.k, args.seeds, args.n_val, args.max_len, args.steps, args.batch = [2, 4], 1, 8, 16, 2, 4
    return args


def spearman(a, b):
    """Spearman rank correlation (ties averaged, scipy), nan with fewer than 3 finite pairs or a constant side."""
    from scipy.stats import spearmanr

    ok = [i for i in range(len(a)) if math.isfinite(a[i]) and math.isfinite(b[i])]
    if len(ok) < 3 or len({a[i] for i in ok}) < 2 or len({b[i] for i in ok}) < 2:
        return math.nan
    return float(spearmanr([a[i] for i in ok], [b[i] for i in ok]).statistic)


def main(argv=None):
    from ntk_kernels.analysis import layer_selection, spectrum

    args = parse(argv)
    timer, tok, train_rows, val_rows, val = cm.start(args)
    kmax = max(args.k)
    stats = {}  # (k, cand) -> {stat: [per seed]}
    accs = {}  # (k, cand) -> [per seed]
    n_params = {}
    for seed in range(args.seeds):
        pool = cm.few_shot(train_rows, kmax, seed)
        (xp, yp), (xv, yv) = cm.encode(tok, [pool, val], args.max_len)
        base = cm.add_adapters(cm.load_model(seed=0), "lora", rank=args.rank, seed=seed, fused=False)
        cm.log(f"seed {seed}: layer_selection over {len(CANDIDATES)} candidates at {timer():.0f} s")
        ranked = {c.name: c for c in layer_selection(base, xp, CANDIDATES, mode="trace")}
        pos = {id(r): i for i, r in enumerate(pool)}
        for k in args.k:
            idx = torch.tensor([pos[id(r)] for r in cm.few_shot(train_rows, k, seed)])
            xk, y = {key: v[idx] for key, v in xp.items()}, yp[idx]
            for name, regex in CANDIDATES.items():
                cand = ranked[name]
                n_params[name] = cand.n_params
                sp = spectrum(cand.kernel[idx][:, idx]).as_dict(eigenvalues=False)
                for s in STATS:
                    stats.setdefault((k, name), {}).setdefault(s, []).append(sp[s])
                model = cm.clone(base)
                lr = args.lr_adapter if name.startswith("LoRA") else args.lr
                cm.log(f"seed {seed} k {k}: fine-tune {name} at {timer():.0f} s")
                cm.finetune(model, xk, y, steps=args.steps, lr=lr, head_lr=args.lr_head, l2=args.l2,
                            batch=args.batch, params=regex, seed=seed)
                accs.setdefault((k, name), []).append(cm.accuracy(cm.logits(model, xv), yv))
    write(args, stats, accs, n_params, timer(), len(val))
    return stats, accs


def gmean(v):
    v = [x for x in v if x > 0 and math.isfinite(x)]
    return math.exp(statistics.mean(math.log(x) for x in v)) if v else math.nan


def write(args, stats, accs, n_params, seconds, n_val):
    sections = [f"All-MiniLM-L6-v2 + linear head (C = 2), SST-2 few-shot, {args.seeds} seeds, {n_val} validation "
                f"sentences, max_len {args.max_len}.  Trace-mode eNTK (Σ_c K_cc) on the 2k training sentences of "
                f"each candidate at θ₀ (geometric mean over seeds); fine-tuning: Adam, {args.steps} steps of batch "
                f"{args.batch}, cross-entropy + {args.l2}·‖θ − θ₀‖², lr {args.lr} (base weights) / {args.lr_adapter} "
                f"(LoRA r = {args.rank}) / {args.lr_head} (head); dropout off.", ""]
    header = ["candidate", "params", "λ_max", "λ_min", "cond", "eff. rank", "trace", "accuracy (mean ± sd)"]
    corr_rows = []
    for k in args.k:
        rows = []
        for name in CANDIDATES:
            st, a = stats[(k, name)], accs[(k, name)]
            sd = statistics.stdev(a) if len(a) > 1 else 0.0
            rows.append([name, f"{n_params[name] / 1e6:.3f}M", f"{gmean(st['lambda_max']):.3g}",
                         f"{gmean(st['lambda_min']):.3g}", f"{gmean(st['condition_number']):.3g}",
                         f"{statistics.mean(st['effective_rank']):.2f}", f"{gmean(st['trace']):.3g}",
                         f"{statistics.mean(a):.3f} ± {sd:.3f}"])
        sections += [f"## k = {k} per class (N = {2 * k})", "", cm.md_table(header, rows), ""]
        acc_m = [statistics.mean(accs[(k, n)]) for n in CANDIDATES]
        corr_rows.append([f"k={k}"] + [spearman([statistics.mean(stats[(k, n)][s]) for n in CANDIDATES], acc_m)
                                       for s in STATS])
    sections += ["## Spearman correlation across candidates: spectrum statistic vs accuracy", "",
                 cm.md_table(["k"] + list(STATS), corr_rows)]
    os.makedirs(args.out, exist_ok=True)
    cm.write_markdown(os.path.join(args.out, "spectrum_layer_selection.md"),
                      "eNTK spectrum of parameter subsets vs fine-tuning accuracy", sections, cm.command_line(),
                      seconds)

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, s, label in ((axes[0], "effective_rank", "effective rank"),
                             (axes[1], "condition_number", "condition number")):
            for k, mk in zip(args.k, "os^D"):
                xs = [statistics.mean(stats[(k, n)][s]) if s == "effective_rank" else gmean(stats[(k, n)][s])
                      for n in CANDIDATES]
                ys = [statistics.mean(accs[(k, n)]) for n in CANDIDATES]
                ax.scatter(xs, ys, marker=mk, label=f"k={k}")
                for x, y_, n in zip(xs, ys, CANDIDATES):
                    ax.annotate(n, (x, y_), fontsize=7)
            if s == "condition_number":
                ax.set_xscale("log")
            ax.set_xlabel(f"{label} of the eNTK (trace mode)")
            ax.set_ylabel("validation accuracy after fine-tuning")
            ax.legend()

    cm.save_plot(os.path.join(args.out, "spectrum_layer_selection.png"), draw)


if __name__ == "__main__":
    main()
