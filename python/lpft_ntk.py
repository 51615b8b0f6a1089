"""LP-FT through the eNTK (Tomihari & Sato 2024, "Understanding linear probing then fine-tuning language models
from NTK perspective") on all-MiniLM-L6-v2 with a linear head f(x) = V φ(x) + b, few-shot SST-2.

The eNTK splits into a head and a feature part (``lpft_decomposition``):

    Θ(x, x') = (φ(x)ᵀφ(x') + 1)·I_C  +  V J_φ(x) J_φ(x')ᵀ Vᵀ  =  K_head + K_features

Both are computed before linear probing (random head) and after it (the head alone trained on the frozen features
with logistic loss to convergence: L-BFGS on cross-entropy + (wd/2)‖V‖², strictly convex), with ‖V‖_F, traces,
the feature fraction trace(K_features)/trace(Θ) and spectrum statistics.  Then the whole model (every parameter but
the word embeddings) is fine-tuned from each head for the same few Adam steps, and the change of the features
‖φ_FT − φ₀‖/‖φ₀‖ on validation sentences is reported.  The paper's argument: after LP the head is near a minimum
(small residuals, hence small gradients), while the larger ‖V‖ scales K_features up by ‖V‖²; with Adam, whose
steps do not shrink with the gradient, the first effect is largely lost, which the table lets one see.

    python python/lpft_ntk.py            # the default run (results in python/results)
    python python/lpft_ntk.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as cm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=cm.DEFAULT_DATA, help="folder with train_phrases.tsv and validation.tsv")
    ap.add_argument("--out", default=cm.DEFAULT_OUT, help="folder for lpft_ntk.md / .png")
    ap.add_argument("--k", type=int, default=32, help="examples per class (N = 2k for the kernels)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--lp-wd", type=float, default=1e-3, help="weight decay of linear probing (strict convexity)")
    ap.add_argument("--lp-iters", type=int, default=500, help="L-BFGS iterations of linear probing (at most)")
    ap.add_argument("--ft-steps", type=int, default=16)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    args = ap.parse_args(argv)
    if args.quick:
        args.k, args.seeds, args.n_val, args.max_len, args.lp_iters, args.ft_steps, args.batch = 3, 1, 8, 16, 50, 2, 4
    return args


@torch.no_grad()
def features(model, x, batch=64):
    n = x["input_ids"].shape[0]
    return torch.cat([model.features(**{k: v[i:i + batch] for k, v in x.items()}) for i in range(0, n, batch)])


def linear_probe(head: nn.Linear, phi, y, wd, iters):
    """Train the head alone: L-BFGS on mean cross-entropy + (wd/2)‖V‖² over frozen features phi (N, d).
    Returns (final loss, gradient norm, ‖V‖ after each outer call)."""
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=20, history_size=50, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(phi), y) + 0.5 * wd * head.weight.square().sum()
        loss.backward()
        return loss

    norms = [head.weight.norm().item()]
    for _ in range(max(1, iters // 20)):
        loss = opt.step(closure)
        norms.append(head.weight.norm().item())
    closure()
    gnorm = torch.cat([p.grad.reshape(-1) for p in head.parameters()]).norm().item()
    return loss.item(), gnorm, norms


def decompose(model, x, lpft_decomposition, spectrum):
    dec = lpft_decomposition(model, x, head="head", params=cm.NOT_WORD_EMB, mode="full")
    tot = spectrum(dec.total)
    return {"‖V‖_F": dec.head_norm, "trace K_head": spectrum(dec.K_head).trace,
            "trace K_features": spectrum(dec.K_features).trace, "feature fraction": dec.feature_fraction,
            "λ_max Θ": tot.lambda_max, "eff. rank Θ": tot.effective_rank, "cond Θ": tot.condition_number}, dec


def main(argv=None):
    from ntk_kernels.analysis import lpft_decomposition, spectrum

    args = parse(argv)
    timer, tok, train_rows, val_rows, val = cm.start(args)
    table = {}  # (stage, column) -> [per seed]
    norms_all, checks = [], []
    for seed in range(args.seeds):
        tr = cm.few_shot(train_rows, args.k, seed)
        (x, y), (xv, yv) = cm.encode(tok, [tr, val], args.max_len)
        model = cm.load_model(seed=seed)
        phi, phiv = features(model, x), features(model, xv)
        cm.log(f"seed {seed}: eNTK decomposition before LP at {timer():.0f} s")
        before, dec = decompose(model, x, lpft_decomposition, spectrum)
        # K_head's closed form (φᵀφ' + 1)·I_C: a check of the decomposition on the real model
        closed = (phi.double() @ phi.double().T + 1)[:, :, None, None] * torch.eye(2, dtype=torch.float64)
        checks.append((dec.K_head.double() - closed).abs().max().item() / closed.abs().max().item())
        head0 = {k: v.clone() for k, v in model.head.state_dict().items()}
        loss, gnorm, norms = linear_probe(model.head, phi, y, args.lp_wd, args.lp_iters)
        norms_all.append(norms)
        cm.log(f"seed {seed}: LP loss {loss:.4f} |grad| {gnorm:.2e}; decomposition after LP at {timer():.0f} s")
        after, _ = decompose(model, x, lpft_decomposition, spectrum)
        with torch.no_grad():
            before["train acc"] = cm.accuracy(_apply(head0, phi), y)
            before["val acc"] = cm.accuracy(_apply(head0, phiv), yv)
            after["train acc"] = cm.accuracy(model.head(phi), y)
            after["val acc"] = cm.accuracy(model.head(phiv), yv)
        lp_head = {k: v.clone() for k, v in model.head.state_dict().items()}
        for stage, head_state in (("FT (random head)", head0), ("LP-FT", lp_head)):
            m = cm.load_model(seed=seed)
            m.head.load_state_dict(head_state)
            cm.log(f"seed {seed}: {stage} at {timer():.0f} s")
            cm.finetune(m, x, y, steps=args.ft_steps, lr=args.ft_lr, batch=args.batch, params=cm.NOT_WORD_EMB,
                        seed=seed)
            phi_ft = features(m, xv)
            row = {"‖V‖_F": m.head.weight.norm().item(),
                   "feature change": ((phi_ft - phiv).norm() / phiv.norm()).item(),
                   "val acc": cm.accuracy(cm.logits(m, xv), yv)}
            for c, v in row.items():
                table.setdefault((stage, c), []).append(v)
        for stage, row in (("before LP (random head)", before), ("after LP", after)):
            for c, v in row.items():
                table.setdefault((stage, c), []).append(v)
    write(args, table, norms_all, checks, timer(), len(val))
    return table, checks


def _apply(state, phi):
    return phi @ state["weight"].T + state["bias"]


def write(args, table, norms_all, checks, seconds, n_val):
    order = ["before LP (random head)", "after LP", "FT (random head)", "LP-FT"]
    stages = [s for s in order if any(k[0] == s for k in table)]
    cols = list(dict.fromkeys(c for _, c in table))

    def cell(s, c):
        v = table.get((s, c))
        if not v:
            return "–"
        m = statistics.mean(v)
        return f"{m:.4g}" + (f" ± {statistics.stdev(v):.2g}" if len(v) > 1 else "")

    rows = [[s] + [cell(s, c) for c in cols] for s in stages]
    sections = [f"all-MiniLM-L6-v2 + linear head (C = 2), SST-2 k = {args.k} per class (N = {2 * args.k}), "
                f"{args.seeds} seeds (mean ± sd), {n_val} validation sentences, max_len {args.max_len}.  Θ: full-mode "
                f"eNTK over every parameter but the word embeddings on the training sentences.  LP: L-BFGS on "
                f"cross-entropy + ({args.lp_wd}/2)‖V‖², at most {args.lp_iters} iterations.  FT: Adam lr {args.ft_lr}, "
                f"{args.ft_steps} steps of batch {args.batch}, every parameter but the word embeddings; feature change "
                f"= ‖φ_FT − φ₀‖/‖φ₀‖ on the validation sentences.", "",
                cm.md_table(["stage"] + cols, rows), "",
                f"Check: max |K_head − (φᵀφ' + 1)·I| / max |K_head| = {max(checks):.2e} (the closed form of "
                f"Tomihari & Sato on the real model)."]
    os.makedirs(args.out, exist_ok=True)
    cm.write_markdown(os.path.join(args.out, "lpft_ntk.md"), "LP-FT through the eNTK: head and feature kernels",
                      sections, cm.command_line(), seconds)

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        ax = axes[0]
        for i, n in enumerate(norms_all):
            ax.plot([20 * j for j in range(len(n))], n, "o-", label=f"seed {i}")
        ax.set_xlabel("L-BFGS iterations (at most)")
        ax.set_ylabel("‖V‖_F")
        ax.set_title("head norm during linear probing")
        ax.legend()
        ax = axes[1]
        st = ["before LP (random head)", "after LP"]
        kh = [statistics.mean(table[(s, "trace K_head")]) for s in st]
        kf = [statistics.mean(table[(s, "trace K_features")]) for s in st]
        ax.bar([-0.2, 0.8], kh, 0.4, label="trace K_head")
        ax.bar([0.2, 1.2], kf, 0.4, label="trace K_features")
        ax.set_xticks([0, 1])
        ax.set_xticklabels(st)
        ax.set_yscale("log")
        ax.set_title("eNTK trace: head + features")
        ax.legend()

    cm.save_plot(os.path.join(args.out, "lpft_ntk.png"), draw)


if __name__ == "__main__":
    main()
