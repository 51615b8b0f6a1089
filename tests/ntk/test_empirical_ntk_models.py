"""empirical_ntk on models beyond nn.Linear: the LayerNorm and Conv2d fast paths, the torch.func fallback (tied
weights, unbatched calls), the Conv1D / Embedding fast paths, and mapping inputs (transformers BERT / GPT-2, random tiny configs),
against an independent oracle: a loop over samples and outputs of torch.autograd.grad, in float64."""
import itertools

import pytest
import torch
from torch import nn

from _compare import assert_close
from ntk_kernels.ntk import empirical_ntk, empirical_ntk_reference
from ntk_kernels.ntk.empirical import _split_params, select_params

F64 = torch.float64
MODES = ("full", "trace", "diagonal")


def _one(x, i):
    return x[i:i + 1] if isinstance(x, torch.Tensor) else {k: v[i:i + 1] for k, v in x.items()}


def jacobian_loop(model, x, params=None, output_fn=None):
    """J (N, C, P): per sample i and output c, torch.autograd.grad of f_c(x_i) (no vmap, no hooks)."""
    chosen = [p for _, p in select_params(model, params)]
    n = x.shape[0] if isinstance(x, torch.Tensor) else next(iter(x.values())).shape[0]
    saved = [p.requires_grad for p in chosen]
    for p in chosen:
        p.requires_grad_(True)
    rows = []
    try:
        for i in range(n):
            xi = _one(x, i)
            out = model(xi) if isinstance(xi, torch.Tensor) else model(**xi)
            f = output_fn(out) if output_fn else (out if isinstance(out, torch.Tensor) else out.logits)
            f = f[0]
            row = []
            for c in range(f.shape[0]):
                gs = torch.autograd.grad(f[c], chosen, retain_graph=True, allow_unused=True)
                row.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                      for g, p in zip(gs, chosen)]))
            rows.append(torch.stack(row))
    finally:
        for p, r in zip(chosen, saved):
            p.requires_grad_(r)
    return torch.stack(rows).detach()


def oracle(model, x1, x2=None, params=None, mode="full", output_fn=None):
    J1 = jacobian_loop(model, x1, params, output_fn)
    J2 = J1 if x2 is None else jacobian_loop(model, x2, params, output_fn)
    eq = {"full": "icp,jep->ijce", "diagonal": "icp,jcp->ijc", "trace": "icp,jcp->ij"}[mode]
    return torch.einsum(eq, J1, J2)


def data(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64)


# ---------------------------------------------------------------------------------------------- plain torch
def ln_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 8), nn.LayerNorm(8),
                      nn.GELU(), nn.Linear(8, 3))
    with torch.no_grad():  # LayerNorm affine away from (1, 0) so its gradients are generic
        for k in (1, 4):
            m[k].weight.uniform_(0.5, 1.5)
            m[k].bias.uniform_(-0.5, 0.5)
    return m.double().eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, stride=2)
        self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("mode,strategy", itertools.product(MODES, ("auto", "gram", "materialize")))
def test_layernorm_mlp_fast_path(mode, strategy):
    model = ln_mlp()
    layers, rest = _split_params(model, select_params(model, None))
    assert rest == [] and len(layers) == 5  # LayerNorm weights and biases take the norm fast path
    x1, x2 = data(7, (6,)), data(4, (6,), seed=1)
    for b, bs in ((None, 3), (x2, 2), (x2, None)):
        out = empirical_ntk(model, x1, b, mode=mode, strategy=strategy, block_size=bs, dtype=F64)
        assert_close(out, oracle(model, x1, b, mode=mode), F64, name=f"ln-mlp {mode} {strategy} bs={bs}")


@pytest.mark.parametrize("params", [r"^1\.", ["1.weight", "3.weight"], r"^6\.", lambda n, p: "bias" in n])
def test_layernorm_mlp_params_subsets(params):
    model = ln_mlp()
    x1, x2 = data(5, (6,)), data(3, (6,), seed=4)
    out = empirical_ntk(model, x1, x2, params=params, block_size=2, dtype=F64)
    assert_close(out, oracle(model, x1, x2, params=params), F64, name=f"params {params}")
    assert_close(empirical_ntk_reference(model, x1, x2, params=params, dtype=F64), out, F64)


@pytest.mark.parametrize("mode", MODES)
def test_cnn_conv2d_fast_path(mode):
    model = SmallCNN().double().eval()
    layers, rest = _split_params(model, select_params(model, None))
    assert rest == [] and {type(m) for m in layers} == {nn.Conv2d, nn.Linear}
    x1, x2 = data(5, (2, 5, 5)), data(3, (2, 5, 5), seed=5)
    for b in (None, x2):
        out = empirical_ntk(model, x1, b, mode=mode, block_size=2, dtype=F64)
        assert_close(out, oracle(model, x1, b, mode=mode), F64, name=f"cnn {mode}")
    out = empirical_ntk(model, x1, x2, params=r"^conv2\.", mode=mode, dtype=F64)
    assert_close(out, oracle(model, x1, x2, params=r"^conv2\.", mode=mode), F64, name=f"cnn conv2 {mode}")


class TiedLM(nn.Module):
    """Embedding tied to the output projection, a padding index, and a Linear called on an unbatched (1, d)
    tensor broadcast over the batch (its parameters must go through the fallback)."""

    def __init__(self, v=11, d=5):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(v, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, d))
        self.shift = nn.Linear(d, d)
        self.out = nn.Linear(d, v, bias=False)
        self.out.weight = self.emb.weight
        self.head = nn.Linear(d, 2)

    def forward(self, ids):
        h = torch.tanh(self.emb(ids) + self.shift(self.pos)[:, None])
        return torch.stack([self.out(h).mean((1, 2)), self.head(h).sum((1, 2))], 1)


class TokenModel(nn.Module):
    """Untied embeddings (one with padding_idx, one used twice) feeding Linear layers: the Embedding fast path."""

    def __init__(self, v=9, d=4):
        super().__init__()
        torch.manual_seed(4)
        self.emb = nn.Embedding(v, d, padding_idx=2)
        self.emb2 = nn.Embedding(v, d)
        self.lin = nn.Linear(d, 3)

    def forward(self, ids):
        h = torch.tanh(self.emb(ids) * self.emb2(ids) + self.emb2(ids.flip(1)))
        return self.lin(h).mean(1)


def test_tied_weights_and_unbatched_calls_through_fallback():
    model = TiedLM().double().eval()
    layers, rest = _split_params(model, select_params(model, None))
    assert {n for n, _ in rest} == {"emb.weight", "pos"}
    ids1 = torch.randint(0, 11, (6, 4), generator=torch.Generator().manual_seed(0))
    ids2 = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(1))
    ids1[0, 2:] = 0
    for mode, b in itertools.product(MODES, (None, ids2)):
        out = empirical_ntk(model, ids1, b, mode=mode, block_size=4, dtype=F64)
        assert_close(out, oracle(model, ids1, b, mode=mode), F64, name=f"tied {mode}")


@pytest.mark.parametrize("strategy", ("auto", "gram", "materialize"))
def test_embedding_fast_path(strategy):
    model = TokenModel().double().eval()
    layers, rest = _split_params(model, select_params(model, None))
    assert rest == [] and len(layers) == 3
    ids1 = torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(2))
    ids2 = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(3))
    ids1[:, 0] = 2  # the padding row gets no gradient
    for mode, b in itertools.product(MODES, (None, ids2)):
        out = empirical_ntk(model, ids1, b, mode=mode, strategy=strategy, block_size=2, dtype=F64)
        assert_close(out, oracle(model, ids1, b, mode=mode), F64, name=f"embedding {mode} {strategy}")
    out = empirical_ntk(model, ids1, ids2, params=r"^emb\.", strategy=strategy, dtype=F64)
    assert_close(out, oracle(model, ids1, ids2, params=r"^emb\."), F64, name="emb only")


# ---------------------------------------------------------------------------------------------- transformers
def tiny_bert(attn="eager"):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                  vocab_size=50, max_position_embeddings=16, num_labels=3,
                                  attn_implementation=attn)
    return transformers.BertForSequenceClassification(cfg).double().eval()


def text(n, t=6, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, v, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        mask[i, t - i % 3:] = 0  # padded tails of length 0, 1 or 2 (never the whole row)
    mask[:, 0] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


BERT_PARAMS = [None, r"^classifier\.", r"attention\.self\.(query|value)\.weight$", r"LayerNorm|pooler"]


@pytest.mark.parametrize("params,attn", [(p, "eager") for p in BERT_PARAMS] + [(None, "sdpa")])
def test_bert_mapping_inputs(params, attn):
    model = tiny_bert(attn)
    x1, x2 = text(5), text(3, seed=1)
    J1 = jacobian_loop(model, x1, params)
    J2 = jacobian_loop(model, x2, params)
    refs = {"full": torch.einsum("icp,jep->ijce", J1, J2), "diagonal": torch.einsum("icp,jcp->ijc", J1, J2),
            "trace": torch.einsum("icp,jcp->ij", J1, J2)}
    for mode in MODES:
        out = empirical_ntk(model, x1, x2, params=params, mode=mode, block_size=2, dtype=F64)
        assert_close(out, refs[mode], F64, name=f"bert {params} {mode}")
    out = empirical_ntk(model, x1, params=params, block_size=3, dtype=F64)
    assert_close(out, torch.einsum("icp,jep->ijce", J1, J1), F64, name=f"bert {params} symmetric")
    assert torch.equal(out, out.permute(1, 0, 3, 2))


def test_bert_reference_loops_where_vmap_fails():
    model = tiny_bert()
    x1, x2 = text(4), text(2, seed=2)
    ref = empirical_ntk_reference(model, x1, x2, params=r"LayerNorm", mode="trace", dtype=F64)
    assert_close(ref, oracle(model, x1, x2, params=r"LayerNorm", mode="trace"), F64)


@pytest.mark.parametrize("strategy", ("auto", "gram", "materialize"))
def test_gpt2_conv1d_and_embedding_fast_paths(strategy):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=8, num_labels=2,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=1, attn_implementation="eager")
    model = transformers.GPT2ForSequenceClassification(cfg).double().eval()
    layers, rest = _split_params(model, select_params(model, None))
    assert sum(type(m).__name__ == "Conv1D" for m in layers) == 4
    assert sum(isinstance(m, nn.LayerNorm) for m in layers) == 3 and rest == []
    x1, x2 = text(4, 5, 40), text(3, 5, 40, seed=3)
    for mode, b in itertools.product(MODES, (None, x2)):
        out = empirical_ntk(model, x1, b, mode=mode, strategy=strategy, block_size=3, dtype=F64)
        assert_close(out, oracle(model, x1, b, mode=mode), F64, name=f"gpt2 {mode} {strategy}")


# ---------------------------------------------------------------------------------------------- validation
def test_mapping_validation():
    model = tiny_bert()
    x = text(3)
    with pytest.raises(ValueError, match="inputs2"):
        empirical_ntk(model, x, {"input_ids": x["input_ids"]})
    with pytest.raises(ValueError, match="inputs2"):
        empirical_ntk(model, x, {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:2]})
    with pytest.raises(ValueError, match="inputs2"):
        empirical_ntk(model, x, {"input_ids": x["input_ids"][:, :4], "attention_mask": x["attention_mask"][:, :4]})
    with pytest.raises(ValueError, match="inputs2"):
        empirical_ntk(model, x, x["input_ids"])
    with pytest.raises(ValueError, match="inputs1"):
        empirical_ntk(model, {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:2]})
    with pytest.raises(TypeError, match="inputs1"):
        empirical_ntk(model, {"input_ids": [1, 2]})
    with pytest.raises(ValueError, match="inputs1"):
        empirical_ntk(model, {})
    with pytest.raises(TypeError, match="inputs1"):
        empirical_ntk(model, [x["input_ids"]])


class DirectUse(nn.Module):
    """Parameters of fast-path modules also used outside their calls (F.linear on the embedding matrix and on
    a Linear's weight): the first block's check moves them to the fallback instead of a silent wrong kernel."""

    def __init__(self, v=7, d=4):
        super().__init__()
        torch.manual_seed(5)
        self.emb, self.lin, self.head = nn.Embedding(v, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids)))
        h = h + 0.5 * torch.tanh(nn.functional.linear(h, self.lin.weight))
        logits_v = nn.functional.linear(h, self.emb.weight)  # (N, T, V)
        return self.head(h).mean(1) + logits_v[..., :3].mean(1)


@pytest.mark.parametrize("strategy", ("gram", "materialize"))
def test_params_used_outside_their_module(strategy):
    model = DirectUse().double().eval()
    ids1 = torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(6))
    ids2 = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(7))
    for mode, b in itertools.product(MODES, (None, ids2)):
        out = empirical_ntk(model, ids1, b, mode=mode, strategy=strategy, block_size=2, dtype=F64)
        assert_close(out, oracle(model, ids1, b, mode=mode), F64, name=f"direct use {mode} {strategy}")
    out = empirical_ntk(model, ids1, params=r"^lin\.bias$", strategy=strategy, dtype=F64)  # bias: hooks suffice
    assert_close(out, oracle(model, ids1, params=r"^lin\.bias$"), F64, name="lin.bias")


class Kwargs(nn.Module):
    """A plain model taking keyword arguments: mapping inputs with a LayerNorm (fallback) in between."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.a, self.norm, self.head = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)

    def forward(self, x, gate):
        return self.head(self.norm(torch.tanh(self.a(x))) * gate[:, None, :]).sum(1)


def test_mapping_inputs_plain_model_and_float32():
    model = Kwargs().double().eval()
    x1 = {"x": data(5, (3, 4)), "gate": data(5, (6,), seed=1)}
    x2 = {"gate": data(2, (6,), seed=2), "x": data(2, (3, 4), seed=3)}  # key order does not matter
    for mode, b in itertools.product(MODES, (None, x2)):
        out = empirical_ntk(model, x1, b, mode=mode, block_size=2, dtype=F64)
        assert_close(out, oracle(model, x1, b, mode=mode), F64, name=f"kwargs {mode}")
    ref = oracle(model, x1, x2)
    model32 = model.float()
    out = empirical_ntk(model32, {k: v.float() for k, v in x1.items()}, {k: v.float() for k, v in x2.items()},
                        block_size=3)
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float32, name="kwargs float32")
