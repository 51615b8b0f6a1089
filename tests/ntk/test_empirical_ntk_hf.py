"""empirical_ntk exactness on transformers models and the parts of issue 3 the other files leave out: a tiny Llama
(RMSNorm, rotary embeddings, grouped KV heads) with label-word logits, full and LoRA-only (peft); a GPT-2 LM with
tied embedding / LM-head weights; the real all-MiniLM-L6-v2 weights on SST-2 sentences; the sign kernels; params
subsets on a 2-layer BERT with N1 != N2; float32 / bfloat16 models; the argument checks not yet covered.

The oracle is ``jacobian_loop`` of test_empirical_ntk_models (a loop of torch.autograd.grad over samples and
outputs, float64, no vmap, no hooks); tolerances follow tests/_compare.py."""
import itertools

import pytest
import torch
from torch import nn

from _compare import assert_close
from _models import (MiniLMClassifier, left_padded, minilm_batch as _minilm_batch, minilm_path, tiny_gpt2_tied,
                     tiny_llama)
from ntk_kernels.ntk import empirical_ntk, empirical_ntk_reference
from ntk_kernels.ntk.empirical import select_params
from tests.ntk.test_empirical_ntk import data as mlp_data, mlp
from tests.ntk.test_empirical_ntk_models import jacobian_loop, text, tiny_bert

transformers = pytest.importorskip("transformers")

F64 = torch.float64
MODES = ("full", "trace", "diagonal")
EQ = {"full": "icp,jep->ijce", "diagonal": "icp,jcp->ijc", "trace": "icp,jcp->ij"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one intra-op thread avoids OpenMP spin-waits on a shared 2-core machine (10x
    faster there); restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def contract(J1, J2, mode):
    """The kernel from per-sample Jacobians J (N, C, P), contracted as ``mode`` says."""
    return torch.einsum(EQ[mode], J1, J2)


# ---------------------------------------------------------------------------------------------- Llama + LoRA
LABEL_WORDS = [7, 11]


def label_logits(out):
    return out.logits[:, -1, LABEL_WORDS]  # (N, 2): the label words' logits at the last position


# Llama computes its RMSNorm (and, eager, its softmax) in float32 even in a float64 model.  Eager: the mask's
# finfo(float64).min becomes -inf in that float32 softmax, and the fully masked query rows of a left-padded sample
# give NaN logits (transformers, not the engine); so eager runs without padding, sdpa with left padding.  The
# float32 steps round the same way in the engine's per-output backward and in the oracle's: float64 tolerances hold.
LLAMA_CASES = [("sdpa", True), ("eager", False)]


@pytest.mark.parametrize("lora", [False, True], ids=["full-model", "lora-only"])
@pytest.mark.parametrize("attn,padded", LLAMA_CASES, ids=[a for a, _ in LLAMA_CASES])
def test_llama_label_word_logits(attn, padded, lora):
    peft = pytest.importorskip("peft") if lora else None
    model = tiny_llama(attn)
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.endswith("norm.weight") for n in names) == 5  # 2 RMSNorms a layer and the final one
    assert not any("rotary" in n for n in names) and any("inv_freq" in n for n, _ in model.named_buffers())
    params = None
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False)).eval()
        params = r"lora_"
        chosen = select_params(model, params)
        assert len(chosen) == 8 and all(p.requires_grad for _, p in chosen)
        assert all(p.abs().max() > 0 for n, p in chosen if "lora_B" in n)  # B != 0: a non-degenerate kernel
        # peft freezes the base model: params=None selects the same LoRA factors
        assert [n for n, _ in select_params(model, None)] == [n for n, _ in chosen]
    x1, x2 = left_padded(3, pad=padded), left_padded(2, seed=1, pad=padded)
    J1 = jacobian_loop(model, x1, params, label_logits)
    J2 = jacobian_loop(model, x2, params, label_logits)
    assert J1.shape[1] == 2 and torch.isfinite(J1).all()
    for mode, b, Jb, bs in (("full", x2, J2, 2), ("trace", None, J1, None), ("diagonal", x2, J2, None)):
        out = empirical_ntk(model, x1, b, params=params, mode=mode, output_fn=label_logits, block_size=bs,
                            dtype=F64)
        assert_close(out, contract(J1, Jb, mode), F64, name=f"llama {attn} lora={lora} {mode} "
                                                              f"inputs2={b is not None}")


# ---------------------------------------------------------------------------------------------- GPT-2, tied weights
GPT2_WORDS = [3, 5, 8]


def gpt2_label_logits(out):
    return out.logits[:, -1, GPT2_WORDS]


@pytest.mark.parametrize("params", [None, ["transformer.wte.weight"]], ids=["all", "wte-only"])
def test_gpt2_lm_tied_embedding_head(params):
    model = tiny_gpt2_tied()
    x1, x2 = left_padded(4, 6, 40), left_padded(3, 6, 40, seed=2)
    J1 = jacobian_loop(model, x1, params, gpt2_label_logits)
    J2 = jacobian_loop(model, x2, params, gpt2_label_logits)
    for mode, b, Jb, bs in (("full", x2, J2, 2), ("full", None, J1, 3), ("trace", x2, J2, None),
                            ("diagonal", None, J1, None)):
        out = empirical_ntk(model, x1, b, params=params, mode=mode, output_fn=gpt2_label_logits, block_size=bs,
                            dtype=F64)
        assert_close(out, contract(J1, Jb, mode), F64, name=f"gpt2 tied {params} {mode} inputs2={b is not None}")


# ---------------------------------------------------------------------------------------------- all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm_batch():
    path = minilm_path()
    x = _minilm_batch(path, n=4, max_words=7)
    return path, {k: v[:3] for k, v in x.items()}, {k: v[2:] for k, v in x.items()}  # N1 = 3, N2 = 2


MINILM_PARAMS = {"head": r"^head\.", "layer5": r"encoder\.layer\.5\.", "everything": None}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_minilm_sst2(minilm_batch, attn):
    path, x1, x2 = minilm_batch
    model = MiniLMClassifier(path, attn).double().eval()
    for key, params in MINILM_PARAMS.items():
        if key == "everything":  # 22.7M parameters: N = 2, inputs2 = None (a J of 2 x 2 x 22.7M in the oracle)
            a, b = {k: v[:2] for k, v in x1.items()}, None
        else:
            a, b = x1, x2
        J1 = jacobian_loop(model, a, params)
        J2 = J1 if b is None else jacobian_loop(model, b, params)
        out = empirical_ntk(model, a, b, params=params, block_size=2, dtype=F64)
        assert_close(out, contract(J1, J2, "full"), F64, name=f"minilm {attn} {key}")
        if key == "head":
            out = empirical_ntk(model, a, b, params=params, mode="trace", dtype=F64)
            assert_close(out, contract(J1, J2, "trace"), F64, name=f"minilm {attn} {key} trace")
        del J1, J2


# ---------------------------------------------------------------------------------------------- sign kernels
def sign_oracle(J1, J2, kernel, mode):
    """signgd: ⟨sign J1, sign J2⟩; asymmetric_signgd: ⟨J1, sign J2⟩ (the sign side is inputs2); sign(0) = 0."""
    for J in (J1, J2):  # well posed: no entry so small that its sign is rounding noise
        tiny = (J != 0) & (J.abs() < 1e-12 * J.abs().amax())
        assert not tiny.any(), "the oracle's Jacobian has entries at rounding level: their sign is noise"
    A = J1.sign() if kernel == "signgd" else J1
    return contract(A, J2.sign(), mode)


def _sign_case(name):
    if name == "mlp":  # ReLU: dead units give exact zeros, sign(0) = 0
        return mlp(act="relu"), mlp_data(7), mlp_data(4, seed=1), None
    # BERT's attention key bias has a gradient that is 0 in exact arithmetic (softmax is shift invariant) and
    # rounding noise in floating point: its sign is undefined, so it is left out
    return tiny_bert(), text(4), text(2, seed=1), (lambda n, p: not n.endswith("key.bias"))


@pytest.mark.parametrize("kernel", ["signgd", "asymmetric_signgd"])
@pytest.mark.parametrize("case", ["mlp", "bert"])
def test_sign_kernels(case, kernel):
    model, x1, x2, params = _sign_case(case)
    J1 = jacobian_loop(model, x1, params)
    J2 = jacobian_loop(model, x2, params)
    assert (J1 == 0).any()  # exact zeros: ReLU units / unused embedding rows and padded positions
    K = None  # the full symmetric-input kernel, checked below
    for mode, (b, Jb) in itertools.product(MODES, ((x2, J2), (None, J1))):
        out = empirical_ntk(model, x1, b, params=params, mode=mode, kernel=kernel, block_size=2, dtype=F64)
        assert_close(out, sign_oracle(J1, Jb, kernel, mode), F64, name=f"{case} {kernel} {mode} "
                                                                        f"inputs2={b is not None}")
        if mode == "full" and b is None:
            K = out
    for b, Jb in ((x2, J2), (None, J1)):  # the torch.func reference, directly and as strategy="jacobian"
        ref = sign_oracle(J1, Jb, kernel, "full")
        out = empirical_ntk_reference(model, x1, b, params=params, kernel=kernel, dtype=F64)
        assert_close(out, ref, F64, name=f"reference {case} {kernel} inputs2={b is not None}")
        out = empirical_ntk(model, x1, b, params=params, kernel=kernel, strategy="jacobian", dtype=F64)
        assert_close(out, ref, F64, name=f"strategy=jacobian {case} {kernel} inputs2={b is not None}")
    n = J1.shape[0]
    diag = K[range(n), range(n)].diagonal(dim1=-2, dim2=-1)  # K[i, i, c, c]
    if kernel == "signgd":  # symmetric, integer valued, the diagonal counts the nonzero gradient entries
        assert torch.equal(K, K.permute(1, 0, 3, 2))
        assert torch.equal(K, K.round())
        assert torch.equal(diag, (J1 != 0).sum(-1).to(F64))
    else:  # K[i, j] = ⟨J_i, sign J_j⟩ is not symmetric; its diagonal is the L1 norm of each J_ic
        assert not torch.allclose(K, K.permute(1, 0, 3, 2))
        assert_close(diag, J1.abs().sum(-1), F64)


# ---------------------------------------------------------------------------------------------- BERT params subsets
def bert2():
    """A 2-layer tiny BERT (tiny_bert has one), so that "one layer" is a strict subset of the encoder."""
    torch.manual_seed(7)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                  vocab_size=50, max_position_embeddings=16, num_labels=3,
                                  attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg).double().eval()


BERT_SUBSETS = {
    "head-predicate": lambda n, p: n.startswith("classifier."),
    "layer1": r"^bert\.encoder\.layer\.1\.",
    "names": ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.encoder.layer.0.attention.self.value.weight", "bert.encoder.layer.1.output.dense.bias",
              "bert.encoder.layer.1.output.LayerNorm.weight", "classifier.weight"],
    "vectors-predicate": lambda n, p: p.ndim == 1 and not n.endswith("key.bias"),  # biases and LayerNorm
}


@pytest.mark.parametrize("key", list(BERT_SUBSETS))
def test_bert_params_subsets_n1_ne_n2(key):
    params = BERT_SUBSETS[key]
    model = bert2()
    x1, x2 = text(3, seed=4), text(2, seed=5)
    J1 = jacobian_loop(model, x1, params)
    J2 = jacobian_loop(model, x2, params)
    assert J1.shape[-1] == sum(p.numel() for _, p in select_params(model, params))
    for mode in MODES:
        out = empirical_ntk(model, x1, x2, params=params, mode=mode, block_size=2, dtype=F64)
        assert out.shape[:2] == (3, 2)
        assert_close(out, contract(J1, J2, mode), F64, name=f"bert2 {key} {mode}")
    out = empirical_ntk(model, x1, params=params, block_size=2, dtype=F64)
    assert_close(out, contract(J1, J1, "full"), F64, name=f"bert2 {key} symmetric")


# ---------------------------------------------------------------------------------------------- low precision
def _cast(x, dt):
    if isinstance(x, torch.Tensor):
        return x.to(dt)
    return {k: v.to(dt) if v.is_floating_point() else v for k, v in x.items()}


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["mlp", "bert"])
def test_low_precision_models(case, dt):
    if case == "mlp":
        model64, x1, x2 = mlp(act="gelu"), mlp_data(6), mlp_data(4, seed=1)
    else:
        model64, x1, x2 = tiny_bert(), text(4), text(3, seed=2)
    J1, J2 = jacobian_loop(model64, x1), jacobian_loop(model64, x2)
    model = mlp(act="gelu").to(dt) if case == "mlp" else tiny_bert().to(dt)  # the same weights, rounded to dt
    a, b = _cast(x1, dt), _cast(x2, dt)
    for mode in ("full", "trace"):
        ref = contract(J1, J2, mode)
        ref_lowp = empirical_ntk_reference(model, a, b, mode=mode, dtype=dt)
        out = empirical_ntk(model, a, b, mode=mode, block_size=3, dtype=torch.float32)
        assert out.dtype == torch.float32
        assert_close(out, ref, dt, ref_lowp=ref_lowp, name=f"{case} {dt} {mode}")
    out = empirical_ntk(model, a, block_size=3, dtype=torch.float32)
    assert torch.equal(out, out.permute(1, 0, 3, 2))
    assert_close(out, contract(J1, J1, "full"), dt, ref_lowp=empirical_ntk_reference(model, a, dtype=dt),
                 name=f"{case} {dt} symmetric")


# ---------------------------------------------------------------------------------------------- argument checks
class UnusedParts(nn.Module):
    """A Linear the output uses, and parameters it does not: an unused LayerNorm, an unused Linear (fast-path
    kinds) and a bare parameter (the torch.func fallback's kind)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.lin, self.unused_lin, self.unused_norm = nn.Linear(7, 3), nn.Linear(7, 3), nn.LayerNorm(7)
        self.unused_scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x)


def test_bad_arguments_not_covered_elsewhere():
    model = mlp()
    x = mlp_data(4)
    with pytest.raises(ValueError, match="kernel"):
        empirical_ntk(model, x, kernel="ntk")
    with pytest.raises(ValueError, match="kernel"):
        empirical_ntk_reference(model, x, kernel="sign")
    with pytest.raises(TypeError, match="dtype"):
        empirical_ntk(model, x, dtype=torch.int64)
    for bs in (True, 2.5, -1):
        with pytest.raises(ValueError, match="block_size"):
            empirical_ntk(model, x, block_size=bs)
    with pytest.raises(TypeError, match="model"):
        empirical_ntk(lambda t: model(t), x)
    with pytest.raises(TypeError, match="params"):
        empirical_ntk(model, x, params=3)
    # output_fn: wrong batch size, not a tensor; a model output with no .logits and no output_fn
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(model, x, output_fn=lambda o: o[:2])
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(model, x, output_fn=lambda o: (o,))
    bert = tiny_bert()
    t = text(3)
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(bert.bert, t)  # BertModel returns last_hidden_state / pooler_output, no logits
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(bert, t, output_fn=lambda o: o.logits[:, :, None])  # 3-D from a mapping-input model
    # inputs2 with the same number of keys, one of them renamed; inputs2 an empty mapping
    with pytest.raises(ValueError, match="inputs2"):
        empirical_ntk(bert, t, {"input_ids": t["input_ids"], "token_type_ids": t["attention_mask"]})
    with pytest.raises(ValueError, match="inputs2"):
        empirical_ntk(bert, t, {})


@pytest.mark.parametrize("params", [r"^unused_norm\.", ["unused_scale"], r"^unused_"],
                         ids=["layernorm", "bare", "all-unused"])
def test_params_the_output_does_not_depend_on(params):
    """Only parameters the output does not use, of a fast-path kind or of the fallback's: a clear error naming
    params, not a kernel of zeros (test_empirical_ntk covers an unused or detached nn.Linear)."""
    model = UnusedParts().double()
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(model, mlp_data(4), params=params)
