"""The kernel view of fine-tuning (Malladi et al. 2023, "A kernel-based view of language model fine-tuning") on
all-MiniLM-L6-v2 with a linear head (C = 2) and few-shot SST-2.

Part 1, accuracy.  For k examples per class (several seeds) and a fixed subset of validation sentences:
  * eNTK kernel regression: f0_val + K_val,tr (K_tr,tr + ridge·I)⁻¹ (onehot(y) − f0_tr) (``kernel_classifier``,
    solver "regression"), and kernel logistic regression on the kernel rows (solver "logistic");
  * the same with the asymmetric sign kernel K(x, x') = ⟨∇f(x), sign ∇f(x')⟩ (Adam's kernel, kernel
    "asymmetric_signgd"; its K_tr,tr is not symmetric, so the regression is solved with torch.linalg.solve);
  * actual fine-tuning with Adam of cross-entropy + l2 · ‖θ − θ₀‖²: full (every parameter but the word embeddings),
    LoRA and LinChain adapters (peft, fused ntk_kernels layers) with the head.
  The kernels are the eNTK of the LoRA model at θ₀ over its trainable parameters (LoRA A, B and the head; B = 0 at
  θ₀, so this is the head kernel plus the kernel of the B's: a random projection of the full-weight eNTK of the
  adapted layers, Malladi et al. §7).  ``--kernel-params all`` uses every parameter but the word embeddings
  (the kernel of full fine-tuning; exact but slow on a CPU).
Part 2, how closely f_lin tracks fine-tuning as the ℓ2 pull grows.  The LoRA model is trained by full-batch gradient
descent on ½·mean‖f − onehot(y)‖² + λ‖θ − θ₀‖² (``finetune(loss="mse", optimizer="sgd")``), and its validation
logits are compared with the linearised model after the same number of steps at the same learning rate
(``gd_dynamics`` with weight_decay = 2λ: the closed form of the same gradient descent on f_lin) and with its
t → ∞ limit (``kernel_regression`` with ridge = 2λN).  λ is given relative to the kernel: λ = r·mean diag(K)/(2N).

    python python/kernel_view_sst2.py             # the default run (results in python/results)
    python python/kernel_view_sst2.py --quick     # a smoke run
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as cm  # noqa: E402
import torch  # noqa: E402

FT_METHODS = ("full", "lora", "linchain")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=cm.DEFAULT_DATA, help="folder with train_phrases.tsv and validation.tsv")
    ap.add_argument("--out", default=cm.DEFAULT_OUT, help="folder for kernel_view_sst2.md / .png")
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64], help="examples per class")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-val", type=int, default=64, help="validation sentences (a fixed random subset)")
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--kernel-params", choices=("lora", "all"), default="lora")
    ap.add_argument("--ridge", type=float, default=1e-3, help="relative ridge of the kernel regressions")
    ap.add_argument("--steps", type=int, default=16, help="fine-tuning steps (Adam)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr-full", type=float, default=1e-4)
    ap.add_argument("--lr-adapter", type=float, default=1e-3)
    ap.add_argument("--l2", type=float, default=1e-3, help="ℓ2 pull toward θ₀ of the accuracy runs")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--chain-length", type=int, default=2)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 1.0],
                    help="relative ℓ2 strengths r of part 2 (λ = r·mean diag K/(2N))")
    ap.add_argument("--gd-steps", type=int, default=24, help="full-batch gradient-descent steps of part 2")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared CPU)")
    ap.add_argument("--quick", action="store_true", help="smoke sizes: k=4, 1 seed, 8 val, 2 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.k, args.seeds, args.n_val, args.max_len = [2, 4], 1, 8, 16
        args.steps, args.batch, args.gd_steps, args.lambdas = 2, 4, 2, [0.0, 1.0]
    if min(args.k) < 1 or args.seeds < 1 or args.n_val < 2:
        ap.error("--k, --seeds must be >= 1 and --n-val >= 2")
    return args


def asym_regression(Ktr, y, Kte, f0_tr, f0_te, ridge_rel):
    """Kernel regression with a non-symmetric (sign) kernel, full layout (N, N, C, C): α = (K + ridge·I)⁻¹ (Y − f0)."""
    N, _, C, _ = Ktr.shape
    A = Ktr.double().permute(0, 2, 1, 3).reshape(N * C, N * C)
    At = Kte.double().permute(0, 2, 1, 3).reshape(Kte.shape[0] * C, N * C)
    ridge = ridge_rel * A.diagonal().mean()
    R = (torch.nn.functional.one_hot(y, C).double() - f0_tr.double()).reshape(-1)
    alpha = torch.linalg.solve(A + ridge * torch.eye(N * C, dtype=A.dtype), R)
    return f0_te.double() + (At @ alpha).reshape(-1, C)


def kernel_params(model, which):
    if which == "lora":
        return None  # the trainable parameters of the peft model: LoRA A, B and the head
    return lambda n, p: "word_embeddings" not in n and "lora_" not in n  # base weights (+ head copy)


def main(argv=None):
    from ntk_kernels import empirical_ntk
    from ntk_kernels.analysis import gd_dynamics, kernel_classifier, kernel_regression, spectrum

    args = parse(argv)
    timer, tok, train_rows, val_rows, val = cm.start(args)
    kmax = max(args.k)
    acc = {}  # (k, method) -> [acc per seed]
    sweep = []
    for seed in range(args.seeds):
        pool = cm.few_shot(train_rows, kmax, seed)
        (xp, yp), (xv, yv) = cm.encode(tok, [pool, val], args.max_len)
        base = cm.load_model(seed=0)
        lora = cm.add_adapters(cm.clone(base), "lora", rank=args.rank, seed=seed, fused=False)  # engine fast path
        f0_p, f0_v = cm.logits(base, xp), cm.logits(base, xv)
        x_all = {key: torch.cat([xp[key], xv[key]]) for key in xp}
        Np = len(pool)
        K = {}
        for kern in ("sgd", "asymmetric_signgd"):
            cm.log(f"seed {seed}: eNTK {kern} ({Np + len(val)} x {Np}) at {timer():.0f} s")
            Kfull = empirical_ntk(lora, x_all, xp, params=kernel_params(lora, args.kernel_params), mode="full",
                                  kernel=kern)
            K[kern] = (Kfull[:Np], Kfull[Np:])
        pos = {id(r): i for i, r in enumerate(pool)}
        for k in args.k:
            idx = torch.tensor([pos[id(r)] for r in cm.few_shot(train_rows, k, seed)])
            y = yp[idx]
            Ktr, Kte = K["sgd"][0][idx][:, idx], K["sgd"][1][:, idx]
            f0t = f0_p[idx]
            res = {"θ₀ (no training)": cm.accuracy(f0_v, yv)}
            res["eNTK regression"] = kernel_classifier(Ktr, y, Kte, "regression", ridge=args.ridge, relative_ridge=True,
                                                       f0_train=f0t, f0_test=f0_v, test_labels=yv).accuracy
            res["eNTK logistic"] = kernel_classifier(Ktr, y, Kte, "logistic", test_labels=yv).accuracy
            Str, Ste = K["asymmetric_signgd"][0][idx][:, idx], K["asymmetric_signgd"][1][:, idx]
            res["sign-kernel regression"] = cm.accuracy(asym_regression(Str, y, Ste, f0t, f0_v, args.ridge), yv)
            res["sign-kernel logistic"] = kernel_classifier(Str, y, Ste, "logistic", test_labels=yv).accuracy
            xk = {key: v[idx] for key, v in xp.items()}
            for method in FT_METHODS:
                if method == "full":
                    model, params, lr = cm.clone(base), cm.NOT_WORD_EMB, args.lr_full
                else:
                    model = cm.add_adapters(cm.clone(base), method, rank=args.rank, chain_length=args.chain_length,
                                            seed=seed)
                    params, lr = None, args.lr_adapter
                cm.log(f"seed {seed} k {k}: fine-tune {method} at {timer():.0f} s")
                cm.finetune(model, xk, y, steps=args.steps, lr=lr, l2=args.l2, batch=args.batch, params=params,
                            seed=seed)
                res[f"fine-tune {method} (Adam)"] = cm.accuracy(cm.logits(model, xv), yv)
            for name, a in res.items():
                acc.setdefault((k, name), []).append(a)
            if seed == 0 and k == min(args.k):
                sweep = lambda_sweep(args, base, xk, y, xv, f0t, f0_v, Ktr, Kte, gd_dynamics, kernel_regression,
                                     spectrum, timer)
    seconds = timer()
    write(args, acc, sweep, seconds, len(val))
    return acc, sweep


def lambda_sweep(args, base, xk, y, xv, f0t, f0_v, Ktr, Kte, gd_dynamics, kernel_regression, spectrum, timer):
    """Part 2: full-batch GD of the LoRA model (MSE + λ‖θ − θ₀‖²) against the linearised model's closed form."""
    N, C = Ktr.shape[0], Ktr.shape[2]
    Y = torch.nn.functional.one_hot(y, C).float()
    spec = spectrum(Ktr)
    mean_diag = spec.trace / (N * C)
    rows = []
    for r in args.lambdas:
        wd = r * mean_diag / N  # gd_dynamics' weight decay: (wd/2)‖Δθ‖², ridge N·wd = r·mean diag
        lam = wd / 2  # finetune's l2 · ‖Δθ‖²
        lr = 0.5 * 2 * N / (spec.lambda_max + N * wd)
        model = cm.add_adapters(cm.clone(base), "lora", rank=args.rank, seed=0)
        cm.log(f"λ sweep r={r}: GD {args.gd_steps} steps, lr {lr:.3g} at {timer():.0f} s")
        cm.finetune(model, xk, y, steps=args.gd_steps, lr=lr, l2=lam, loss="mse", optimizer="sgd", batch=None)
        f_ft = cm.logits(model, xv).double()
        gd = gd_dynamics(Ktr.double(), Y.double(), lr, [args.gd_steps], K_test_train=Kte.double(),
                         f0_train=f0t.double(), f0_test=f0_v.double(), weight_decay=wd)
        f_lin = gd.test[0]
        lim = kernel_regression(Ktr.double(), Y.double(), Kte.double(), ridge=N * wd, f0_train=f0t.double(),
                                f0_test=f0_v.double()).test
        d_ft, d_lin, d_lim = f_ft - f0_v.double(), f_lin - f0_v.double(), lim - f0_v.double()
        rows.append({"r": r, "lambda": lam, "lr": lr, "steps": args.gd_steps,
                     "move": d_ft.norm().item() / max(f0_v.double().norm().item(), 1e-30),
                     "rel_dist_gd": (d_ft - d_lin).norm().item() / max(d_ft.norm().item(), 1e-30),
                     "corr_gd": corr(d_ft, d_lin),
                     "agree_gd": (f_ft.argmax(-1) == f_lin.argmax(-1)).float().mean().item(),
                     "rel_dist_limit": (d_ft - d_lim).norm().item() / max(d_ft.norm().item(), 1e-30),
                     "corr_limit": corr(d_ft, d_lim)})
    return rows


def corr(a, b):
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    den = (a.norm() * b.norm()).item()
    return (a @ b).item() / den if den > 0 else math.nan


def write(args, acc, sweep, seconds, n_val):
    import statistics

    methods = list(dict.fromkeys(m for _, m in acc))
    header = ["method"] + [f"k={k} (mean ± sd)" for k in args.k]
    rows = []
    for m in methods:
        cells = [m]
        for k in args.k:
            v = acc[(k, m)]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} ± {sd:.3f}")
        rows.append(cells)
    kp = "LoRA A, B + head of the LoRA model" if args.kernel_params == "lora" else "every parameter but word embeddings"
    sec1 = [f"## Accuracy on {n_val} validation sentences (SST-2), all-MiniLM-L6-v2 + linear head (C = 2)", "",
            f"{args.seeds} seeds (few-shot draws), max_len {args.max_len}; kernels: full C = 2 eNTK over {kp} at θ₀; "
            f"kernel regression ridge {args.ridge} × mean diag.  Fine-tuning: Adam, {args.steps} steps of batch "
            f"{args.batch}, cross-entropy + {args.l2}·‖θ − θ₀‖², lr {args.lr_full} (full: every parameter but the word "
            f"embeddings) / {args.lr_adapter} (LoRA / LinChain r = {args.rank}, chain {args.chain_length}, + head); "
            f"dropout off.", "", cm.md_table(header, rows)]
    sh = ["r", "λ", "lr", "GD steps", "‖f−f0‖/‖f0‖", "rel. dist f_lin(t)", "corr f_lin(t)", "argmax agree",
          "rel. dist ridge limit", "corr ridge limit"]
    srows = [[s["r"], f"{s['lambda']:.3g}", f"{s['lr']:.3g}", s["steps"], s["move"], s["rel_dist_gd"], s["corr_gd"],
              s["agree_gd"], s["rel_dist_limit"], s["corr_limit"]] for s in sweep]
    sec2 = ["", f"## f_lin against fine-tuning as the ℓ2 pull grows (LoRA, k = {min(args.k)}, seed 0)", "",
            "Full-batch GD on ½·mean‖f − onehot(y)‖² + λ‖θ − θ₀‖², λ = r·mean diag(K)/(2N), lr = half the linear "
            "model's stability limit.  Compared on the validation logits' change f − f0: relative distance "
            "‖Δf_FT − Δf_lin‖/‖Δf_FT‖ and Pearson correlation, with f_lin after the same GD steps (gd_dynamics) and "
            "with its t → ∞ ridge limit (kernel_regression, ridge 2λN).", "", cm.md_table(sh, srows)]
    os.makedirs(args.out, exist_ok=True)
    cm.write_markdown(os.path.join(args.out, "kernel_view_sst2.md"), "Kernel view of fine-tuning, SST-2 few-shot",
                      sec1 + sec2, cm.command_line(), seconds)

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        ax = axes[0]
        w = 0.8 / len(args.k)
        for j, k in enumerate(args.k):
            means = [statistics.mean(acc[(k, m)]) for m in methods]
            sds = [statistics.stdev(acc[(k, m)]) if len(acc[(k, m)]) > 1 else 0 for m in methods]
            ax.bar([i + j * w for i in range(len(methods))], means, w, yerr=sds, label=f"k={k}")
        ax.set_xticks([i + w * (len(args.k) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0.3, 1.0)
        ax.axhline(0.5, color="gray", lw=0.5)
        ax.set_ylabel("validation accuracy")
        ax.legend()
        ax = axes[1]
        rs = [max(s["r"], 1e-3) for s in sweep]
        ax.plot(rs, [s["rel_dist_gd"] for s in sweep], "o-", label="rel. dist to f_lin(t)")
        ax.plot(rs, [s["rel_dist_limit"] for s in sweep], "s--", label="rel. dist to ridge limit")
        ax.plot(rs, [s["corr_gd"] for s in sweep], "^-", label="corr with f_lin(t)")
        ax.set_xscale("log")
        ax.set_xlabel("relative ℓ2 strength r (0 drawn at 1e-3)")
        ax.legend(fontsize=8)
        ax.set_title("LoRA fine-tuning vs linearised model")

    cm.save_plot(os.path.join(args.out, "kernel_view_sst2.png"), draw)


if __name__ == "__main__":
    main()
