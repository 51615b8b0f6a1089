"""per_sample_jvp on a model zoo against torch.func.jvp of torch.func.functional_call (float64; one call per sample
for per-sample tangents): MLPs, a CNN (Conv2d: forward AD / vmap fallback), a tiny BERT with padded masks, GPT-2
(Conv1D, tied LM head), a tiny Llama (RMSNorm computed in float32), the real all-MiniLM-L6-v2 on SST-2 sentences,
LoRA (peft) and head-only subsets, float32 / bfloat16 models; that the fused kernels are really called (spies on
ntk_kernels.ops.jvp) and the fallbacks taken where expected (the engine's debug log); the argument checks."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntk_kernels
import ntk_kernels.ops.jvp as jvp_ops
from _compare import assert_close
from _models import MiniLMClassifier, left_padded, minilm_batch, minilm_path, tiny_gpt2_tied, tiny_llama
from ntk_kernels import per_sample_jvp
from ntk_kernels.ntk.empirical import select_params
from tests.ntk.test_empirical_ntk import TokenMLP, data as mlp_data, mlp
from tests.ntk.test_empirical_ntk_models import SmallCNN, text, tiny_bert

F64 = torch.float64
LOGGER = "ntk_kernels.ntk.jvp"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waits on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- oracle and helpers
def _one(x, i):
    return x[i:i + 1] if isinstance(x, torch.Tensor) else {k: v[i:i + 1] for k, v in x.items()}


def _default_out(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def oracle(model, x, tangents, output_fn=None):
    """(f, J·v) from torch.func.jvp of functional_call; a tangent with one more dim than its parameter is per
    sample: then one jvp per sample with that sample's tangents.  Runs in the model's dtype."""
    output_fn = output_fn or _default_out
    params = {k: p.detach() for k, p in model.named_parameters()}
    sel = {k: params[k] for k in tangents}

    def f(s, xi):
        state = ({**params, **s}, dict(model.named_buffers()))
        if isinstance(xi, torch.Tensor):
            return output_fn(torch.func.functional_call(model, state, (xi,)))
        return output_fn(torch.func.functional_call(model, state, (), dict(xi)))

    per = any(t.ndim == params[k].ndim + 1 for k, t in tangents.items())
    with torch.no_grad():
        if not per:
            return torch.func.jvp(lambda s: f(s, x), (sel,), (dict(tangents),))
        n = x.shape[0] if isinstance(x, torch.Tensor) else next(iter(x.values())).shape[0]
        ys, ts = [], []
        for i in range(n):
            ti = {k: (t[i] if t.ndim == params[k].ndim + 1 else t) for k, t in tangents.items()}
            y, t = torch.func.jvp(lambda s: f(s, _one(x, i)), (sel,), (ti,))
            ys.append(y)
            ts.append(t)
        return torch.cat(ys), torch.cat(ts)


def make_tangents(model, params=None, n=None, per=None, seed=0):
    """Random tangents for the selected parameters: per-sample (n, *shape) for the names ``per`` selects
    (a predicate; default all when n is given), shared otherwise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in select_params(model, params):
        ps = n is not None and (per is None or per(name))
        shape = (n, *p.shape) if ps else tuple(p.shape)
        out[name] = torch.randn(shape, generator=g, dtype=F64).to(p.dtype)
    return out


def cast(x, dt):
    if isinstance(x, torch.Tensor):
        return x.to(dt)
    return {k: v.to(dt) if v.is_floating_point() else v for k, v in x.items()}


@pytest.fixture
def spy(monkeypatch):
    """Counts the fused ops' calls (those with a tangent) by the engine."""
    calls = {"linear_jvp": 0, "layer_norm_jvp": 0, "per_sample_w": 0}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            wd = args[4] if name == "linear_jvp" and len(args) > 4 else kwargs.get("weight_dot")
            if wd is not None and wd.ndim == 3:
                calls["per_sample_w"] += 1
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(jvp_ops, "linear_jvp", wrap("linear_jvp", jvp_ops.linear_jvp))
    monkeypatch.setattr(jvp_ops, "layer_norm_jvp", wrap("layer_norm_jvp", jvp_ops.layer_norm_jvp))
    return calls


@pytest.fixture
def engine_log(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def fallback_taken(caplog):
    return any("per-sample fallback" in r.getMessage() for r in caplog.records)


def check(model, x, tangents, dtype=F64, output_fn=None, name="", **kw):
    y, t = per_sample_jvp(model, x, tangents, output_fn=output_fn, **kw)
    y0, t0 = oracle(model, x, tangents, output_fn)
    assert not y.requires_grad and not t.requires_grad
    assert_close(y, y0, dtype, name=f"{name} primal")
    assert_close(t, t0, dtype, name=f"{name} tangent")
    assert t.abs().max() > 0, f"{name}: a zero tangent checks nothing"
    for m in model.modules():  # the replaced forwards are gone
        assert "forward" not in m.__dict__, f"{type(m).__name__}.forward left patched"
    return y, t


# ---------------------------------------------------------------------------------------------- plain torch
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_mlp(act, per_sample, spy, engine_log):
    model = mlp(act=act)  # 7-13-11-3, one layer without bias
    x = mlp_data(5)
    tangents = make_tangents(model, n=5 if per_sample else None)
    check(model, x, tangents, name=f"mlp {act}")
    assert spy["linear_jvp"] == 3
    assert spy["per_sample_w"] == (3 if per_sample else 0)
    assert not fallback_taken(engine_log)


def test_mlp_head_only_and_mixed_tangents(spy, engine_log):
    model = mlp()
    x = mlp_data(4)
    # last layer only, weight per sample, bias shared: the layers before it get no tangent and run unchanged
    tangents = make_tangents(model, params=r"^4\.", n=4, per=lambda n: n.endswith("weight"))
    assert tangents["4.weight"].shape == (4, 3, 11) and tangents["4.bias"].shape == (3,)
    check(model, x, tangents, params=r"^4\.", name="head only")
    assert spy["linear_jvp"] == 1 and spy["per_sample_w"] == 1
    assert not fallback_taken(engine_log)
    # a list of names; Tensor input of a single sample
    tangents = make_tangents(model, params=["0.weight", "2.weight"], n=1)
    check(model, x[:1], tangents, params=["0.weight", "2.weight"], name="names, N=1")


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_token_inputs_module_called_twice(per_sample, spy, engine_log):
    """(N, T, d) inputs; ``mid`` is called twice: both uses get its (per-sample) tangent."""
    model = TokenMLP().double().eval()
    x = mlp_data(3, (4, 5))
    check(model, x, make_tangents(model, n=3 if per_sample else None), name="token mlp")
    assert spy["linear_jvp"] == 4 and not fallback_taken(engine_log)


def test_unused_parameter_gives_zero_tangent():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.extra = mlp(), nn.Linear(2, 2).double()  # extra: never called

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    x = mlp_data(3)
    for n in (None, 3):
        t = make_tangents(model, r"^extra\.", n=n)
        y, yd = per_sample_jvp(model, x, t, params=r"^extra\.")
        assert torch.equal(yd, torch.zeros_like(y)) and torch.equal(y, model(x))


class LNModel(nn.Module):
    """Token features through LayerNorm, nn.RMSNorm, a norm class of another arithmetic ((1 + w) ⊙ x̂, as Gemma's),
    and an embedding reused as the output projection through F.linear (a use outside its module)."""

    def __init__(self, v=13, d=6):
        super().__init__()
        torch.manual_seed(5)
        self.emb = nn.Embedding(v, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d, eps=1e-5)
        self.gemma = OnePlusRMSNorm(d)
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            for m in (self.ln, self.rms, self.gemma):
                m.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, ids):
        h = self.ln(self.emb(ids))
        h = self.rms(torch.tanh(self.lin(h)) + h)
        h = self.gemma(h)
        return F.linear(h, self.emb.weight).mean(1)[:, :4]


class OnePlusRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        u = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight) * u


def ids_data(n, t=5, v=13, seed=0):
    ids = torch.randint(1, v, (n, t), generator=torch.Generator().manual_seed(seed))
    ids[0, -2:] = 0
    return ids


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_norms_embedding_and_use_outside_module(per_sample, spy, engine_log):
    model = LNModel().double().eval()
    x = ids_data(4)
    tangents = make_tangents(model, n=4 if per_sample else None)
    check(model, x, tangents, name="norms")
    msgs = " ".join(r.getMessage() for r in engine_log.records)
    assert "OnePlusRMSNorm" in msgs and "not the kernel's" in msgs  # its arithmetic: not fused
    assert spy["layer_norm_jvp"] >= 3  # LayerNorm, RMSNorm (+ the rejected check of the other one)
    # per sample: emb.weight is also used by F.linear outside its module: detected, the fallback takes over
    assert fallback_taken(engine_log) == per_sample
    if per_sample:  # without the embedding, everything per sample is fused
        engine_log.clear()
        params = lambda n, p: n != "emb.weight" and n != "gemma.weight"
        check(model, x, make_tangents(model, params, n=4), params=params, name="norms fused")
        assert not fallback_taken(engine_log)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_cnn_conv2d_fallback(per_sample, spy, engine_log):
    model = SmallCNN().double().eval()
    x = mlp_data(4, (2, 5, 5))
    tangents = make_tangents(model, n=4 if per_sample else None)
    check(model, x, tangents, name="cnn")
    # shared: the head fused, the convolutions under forward AD; a per-sample Conv2d tangent: vmap of
    # torch.func.jvp over the samples (no fused kernel)
    assert spy["linear_jvp"] == (0 if per_sample else 1)
    assert fallback_taken(engine_log) == per_sample
    if per_sample:
        assert any("through vmap" in r.getMessage() for r in engine_log.records)
        engine_log.clear()
        spy["per_sample_w"] = 0
        tangents = make_tangents(model, n=4, per=lambda n: n.startswith("head"))  # convs shared, head per sample
        check(model, x, tangents, name="cnn head per sample")
        assert not fallback_taken(engine_log) and spy["per_sample_w"] == 1


# ---------------------------------------------------------------------------------------------- transformers
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("case", ["shared", "per-sample-encoder", "per-sample-all"])
def test_tiny_bert_padded(case, spy, engine_log):
    model = tiny_bert()  # eager attention, classification head
    x = text(4)
    assert (x["attention_mask"] == 0).any()
    if case == "shared":
        tangents = make_tangents(model)
    elif case == "per-sample-encoder":  # word embeddings, encoder, pooler, head: all fused per sample
        tangents = make_tangents(model, n=4, per=lambda n: "position_embeddings" not in n)
    else:
        tangents = make_tangents(model, n=4)
    check(model, x, tangents, name=f"bert {case}")
    assert spy["layer_norm_jvp"] >= 3 and spy["linear_jvp"] >= 8
    # position embeddings are looked up on (1, T) ids: per sample, the loop over samples (vmap fails on masks)
    assert fallback_taken(engine_log) == (case == "per-sample-all")


GPT2_WORDS = [3, 5, 8]


def gpt2_label_logits(out):
    return out.logits[:, -1, GPT2_WORDS]


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_gpt2_conv1d_tied_head(per_sample, spy, engine_log):
    model = tiny_gpt2_tied()
    x = left_padded(3, v=40)
    params = None if not per_sample else (lambda n, p: "wpe" not in n)
    tangents = make_tangents(model, params, n=3 if per_sample else None)
    check(model, x, tangents, output_fn=gpt2_label_logits, params=params, name="gpt2")
    assert spy["linear_jvp"] == 2 * 4 + 1  # c_attn, c_proj, c_fc, mlp c_proj per layer; the tied lm_head
    if per_sample:  # the tied wte / lm_head weight per sample in both fused modules
        assert spy["per_sample_w"] == 9 and not fallback_taken(engine_log)
    out = per_sample_jvp(model, x, tangents, params=params)  # default output: the full logits (N, T, V)
    assert out[1].shape == (3, 6, 40)


def llama_logits(out):
    return out.logits[:, -1, [7, 11]]


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
def test_tiny_llama_rmsnorm(dtype, per_sample, spy, engine_log):
    """LlamaRMSNorm computes in float32: in a float64 model the kernel does not reproduce it (not fused, its own
    forward runs under forward AD; per-sample tangents of its layer: the fallback); in a float32 model it does
    (fused).  No padding: eager Llama gives NaN on left padding."""
    model = tiny_llama(dtype=dtype)
    x = {"input_ids": torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(0))}
    tangents = make_tangents(model, n=3 if per_sample else None, per=lambda n: "layers.1" in n)
    y, t = per_sample_jvp(model, x, tangents, output_fn=llama_logits)
    model64 = tiny_llama(dtype=F64)
    y0, t0 = oracle(model64, x, {k: v.double() for k, v in tangents.items()}, llama_logits)
    lowp = None if dtype == F64 else oracle(model, x, tangents, llama_logits)
    assert_close(y, y0, dtype, ref_lowp=None if lowp is None else lowp[0], name=f"llama {dtype} primal")
    assert_close(t, t0, dtype, ref_lowp=None if lowp is None else lowp[1], name=f"llama {dtype} tangent")
    unfused = [r.getMessage() for r in engine_log.records if "not the kernel's" in r.getMessage()]
    if dtype == F64 and not per_sample:
        assert len(unfused) == 5, unfused  # 2 norms a layer and the final one
    if dtype == torch.float32:
        assert unfused == [] and spy["layer_norm_jvp"] == 5
    assert fallback_taken(engine_log) == (dtype == F64 and per_sample)


@pytest.mark.parametrize("model_kind", ["bert", "llama"])
def test_lora_only_per_sample(model_kind, spy, engine_log):
    peft = pytest.importorskip("peft")
    base = tiny_bert() if model_kind == "bert" else tiny_llama(dtype=F64)
    target = ["query", "value"] if model_kind == "bert" else ["q_proj", "v_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, target_modules=target, init_lora_weights=False)).eval()
    x = text(3) if model_kind == "bert" else {"input_ids": torch.randint(1, 50, (3, 5))}
    out_fn = None if model_kind == "bert" else llama_logits
    chosen = select_params(model, None)  # peft freezes the rest: the LoRA factors (and bert's new head)
    assert all("lora_" in n or "classifier" in n for n, _ in chosen)
    tangents = make_tangents(model, n=3, per=lambda n: "lora_" in n)
    check(model, x, tangents, output_fn=out_fn, name=f"lora {model_kind}")
    assert spy["per_sample_w"] >= 4 and not fallback_taken(engine_log)


@pytest.mark.parametrize("case", ["mlp", "bert"])
def test_linearized_forward_matches_linearize(case, spy):
    """The engine's differentiable variant (for ``linearize``): f(x; θ₀) + J(x)(θ − θ₀) and its gradient in θ
    against LinearizedModel (torch.func.jvp), float64."""
    from ntk_kernels.ntk.jvp import linearized_forward

    model, x = (mlp(act="gelu"), mlp_data(4)) if case == "mlp" else (tiny_bert(), text(3))
    params = None if case == "mlp" else r"encoder|classifier"
    lin = ntk_kernels.linearize(model, params=params)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    args, kwargs = ((x,), {}) if case == "mlp" else ((), x)
    ref = lin(*args, **kwargs)
    w = torch.randn(ref.shape, generator=g, dtype=F64)
    thetas = list(lin.params().values())
    g_ref = torch.autograd.grad((ref * w).sum(), thetas)
    theta0 = lin.params0()
    out = linearized_forward(model, theta0, {n: p - theta0[n] for n, p in lin.params().items()}, args, kwargs)
    assert out.requires_grad
    got = torch.autograd.grad((out * w).sum(), thetas)
    assert_close(out, ref, F64, name=f"{case} f_lin")
    for (name, _), a, b in zip(lin.params().items(), got, g_ref):
        assert_close(a, b, F64, name=f"{case} grad {name}")
    assert spy["linear_jvp"] >= 3 and (case == "mlp" or spy["layer_norm_jvp"] >= 2)


# ---------------------------------------------------------------------------------------------- all-MiniLM-L6-v2
@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    model = MiniLMClassifier(path).eval()
    return model, minilm_batch(path, n=3, max_words=8)


def test_minilm_sst2(minilm, spy, engine_log):
    model32, x = minilm
    model = MiniLMClassifier.__new__(MiniLMClassifier)  # a float64 copy
    nn.Module.__init__(model)
    model.bert, model.head = _copy(model32.bert).double(), _copy(model32.head).double()
    tangents = make_tangents(model)  # every parameter (22.7M), one direction
    check(model, x, tangents, name="minilm shared")
    assert spy["layer_norm_jvp"] == 13 and spy["linear_jvp"] == 6 * 6 + 2  # + the pooler and the head
    params = r"encoder\.layer\.5\.|^head\."
    tangents = make_tangents(model, params, n=3)
    check(model, x, tangents, params=params, name="minilm per-sample layer 5 + head")
    assert not fallback_taken(engine_log)
    # the float32 model against the float64 oracle (budget: the float32 torch.func oracle's own error)
    t32 = {k: v.float() for k, v in tangents.items()}
    y, t = per_sample_jvp(model32, x, t32, params=params)
    y0, t0 = oracle(model, x, tangents)
    l0, lt = oracle(model32, x, t32)
    assert_close(y, y0, torch.float32, ref_lowp=l0, name="minilm fp32 primal")
    assert_close(t, t0, torch.float32, ref_lowp=lt, name="minilm fp32 tangent")


def _copy(m):
    import copy
    return copy.deepcopy(m)


# ---------------------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["mlp", "bert"])
def test_low_precision(case, dt, per_sample, spy):
    model64, x = (mlp(act="gelu"), mlp_data(4)) if case == "mlp" else (tiny_bert(), text(3))
    model = (mlp(act="gelu") if case == "mlp" else tiny_bert()).to(dt)  # the same weights, rounded
    n = 4 if case == "mlp" else 3
    per = (lambda name: "position_embeddings" not in name) if per_sample else None
    tangents = make_tangents(model, n=n if per_sample else None, per=per)
    xl = cast(x, dt)
    y, t = per_sample_jvp(model, xl, tangents)
    assert y.dtype == dt and t.dtype == dt
    ref = oracle(model64, x, {k: v.double() for k, v in tangents.items()})
    lowp = oracle(model, xl, tangents)
    assert_close(y, ref[0], dt, ref_lowp=lowp[0], name=f"{case} {dt} primal")
    assert_close(t, ref[1], dt, ref_lowp=lowp[1], name=f"{case} {dt} tangent")
    assert spy["linear_jvp"] >= 3


# ---------------------------------------------------------------------------------------------- errors
def test_bad_tangents():
    model = mlp()
    x = mlp_data(4)
    good = make_tangents(model)
    with pytest.raises(ValueError, match=r"missing.*'2\.weight': \(11, 13\)"):
        per_sample_jvp(model, x, {k: v for k, v in good.items() if k != "2.weight"})
    with pytest.raises(ValueError, match=r"not parameters of the model: \['nope'\]"):
        per_sample_jvp(model, x, {**good, "nope": torch.zeros(3, dtype=F64)})
    with pytest.raises(ValueError, match=r"params does not select: \['0\.weight', '0\.bias', '2\.weight'\]"):
        per_sample_jvp(model, x, good, params=r"^4\.")
    with pytest.raises(ValueError, match=r"tangents\['0\.bias'\] must have the parameter's shape \(13,\)"):
        per_sample_jvp(model, x, {**good, "0.bias": torch.zeros(12, dtype=F64)})
    with pytest.raises(ValueError, match=r"tangents\['0\.weight'\] has a per-sample dim of 3 .* N=4 .*\(4, 13, 7\)"):
        per_sample_jvp(model, x, {**good, "0.weight": torch.zeros(3, 13, 7, dtype=F64)})
    with pytest.raises(TypeError, match=r"tangents\['4\.bias'\] must have the parameter's dtype torch.float64"):
        per_sample_jvp(model, x, {**good, "4.bias": torch.zeros(3)})
    with pytest.raises(TypeError, match=r"tangents\['4\.bias'\] must be a Tensor"):
        per_sample_jvp(model, x, {**good, "4.bias": [0.0, 0.0, 0.0]})
    with pytest.raises(TypeError, match="tangents must be a mapping"):
        per_sample_jvp(model, x, list(good.values()))
    with pytest.raises(TypeError, match="model"):
        per_sample_jvp(lambda t: model(t), x, good)
    with pytest.raises(ValueError, match="inputs"):
        per_sample_jvp(model, x[:0], good)
    with pytest.raises(TypeError, match="output_fn"):
        per_sample_jvp(model, x, good, output_fn=3)
    per = make_tangents(model, n=4)
    with pytest.raises(ValueError, match="output_fn must give a tensor batched on dim 0"):
        per_sample_jvp(model, x, per, output_fn=lambda o: o.sum())
    # nothing left patched after an error inside the forward
    with pytest.raises(RuntimeError):
        per_sample_jvp(model, mlp_data(4, (6,)), good)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_sdpa_attention_error_names_eager():
    model = tiny_bert(attn="sdpa")
    x = text(2)
    try:
        # no tangent reaches attention: works
        per_sample_jvp(model, x, make_tangents(model, r"^classifier\."), params=r"^classifier\.")
        per_sample_jvp(model, x, make_tangents(model))
    except RuntimeError as e:
        assert "eager" in str(e)
    else:  # this torch has a forward-mode rule for SDPA: the values must then be right
        check(model, x, make_tangents(model), name="bert sdpa")


def test_public_api():
    assert ntk_kernels.per_sample_jvp is per_sample_jvp
    assert "per_sample_jvp" in ntk_kernels.__all__ and "per_sample_jvp" in ntk_kernels.ntk.__all__


class _T5Norm(nn.Module):
    """An RMS norm named like a LayerNorm (T5): the engine tries both kernel forms."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = 1e-6

    def forward(self, h):
        return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


_T5Norm.__name__ = "T5LayerNorm"


def test_norm_form_not_fooled_by_zero_mean_rows():
    """On rows of mean zero LayerNorm and RMSNorm give the same output: the form must still be the module's (its
    tangent and later calls differ), and an empty input is no error."""
    torch.manual_seed(0)
    dt = torch.float64

    class TZ(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = _T5Norm(5)
            self.l = nn.Linear(5, 5)

        def forward(self, x):
            h = self.n(x - x.mean(-1, keepdim=True))
            return self.n(self.l(h) + 1.0)

    m = TZ().double()
    x = torch.randn(4, 5, dtype=dt)
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    f, jv = per_sample_jvp(m, x, v)
    state = {n: p.detach() for n, p in m.named_parameters()}
    f0, jv0 = torch.func.jvp(lambda s: torch.func.functional_call(m, s, (x,)), (state,), (v,))
    torch.testing.assert_close(f, f0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jv, jv0, rtol=1e-10, atol=1e-12)

    class Empty(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 5)
            self.ln = nn.LayerNorm(5)

        def forward(self, x):
            return self.ln(self.l(x)).sum(1)

    e = Empty().double()
    ve = {n: torch.randn_like(p) for n, p in e.named_parameters()}
    f, jv = per_sample_jvp(e, torch.randn(3, 0, 4, dtype=dt), ve)
    assert f.shape == (3, 5) and jv.shape == (3, 5) and not jv.abs().any()
