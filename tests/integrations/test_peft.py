"""ntk_kernels.integrations.peft on tiny random Llama (nn.Linear) and GPT-2 (Conv1D, fan_in_fan_out) models.

fp32 throughout except one bf16 test; lora_dropout = 0 wherever fused and unfused must agree exactly.
peft initialises B = 0, which hides the adapter: every test sets all lora_* weights to random values first.
"""
import copy
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import ntk_kernels.integrations.peft as ntk_peft  # noqa: E402
from ntk_kernels.integrations.peft import (FusedLoraLinear, PeftLinChainLinear, fuse_lora, linchain_config,  # noqa: E402
                                           unfuse_lora)
from ntk_kernels.ops import linchain_ref  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

VOCAB, SEQ = 64, 8
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}


def make_base(arch, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                          attn_implementation="eager")
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                         attn_implementation="eager")
        model = GPT2LMHeadModel(cfg)
    return model.to(dtype)


def lora_cfg(arch, **kw):
    kw = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS[arch], **kw}
    return LoraConfig(fan_in_fan_out=(arch == "gpt2"), **kw)


@torch.no_grad()
def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32))
    return model


def make_peft(arch, cfg=None, seed=0, **kw):
    model = get_peft_model(make_base(arch, seed), cfg if cfg is not None else lora_cfg(arch, **kw))
    return randomize_lora(model)


def ids(seed=2, batch=2):
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@pytest.fixture
def op_calls(monkeypatch):
    """Counts linchain_linear calls made by the integration (proves the fused path ran)."""
    calls = []
    real = ntk_peft.linchain_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ntk_peft, "linchain_linear", counting)
    return calls


def assert_close(actual, expected, what, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# fuse_lora
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_matches_peft_forward_backward_and_adamw_step(arch, op_calls):
    ref = make_peft(arch).train()
    fused = copy.deepcopy(ref)
    params_before = dict(fused.named_parameters())
    state_before = {k: v.clone() for k, v in fused.state_dict().items()}
    make_opt = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)  # noqa: E731
    opt_ref, opt_fused = make_opt(ref), make_opt(fused)  # the fused model's optimizer is built before fusing

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every layer fuses: no warning
        assert fuse_lora(fused) is fused
    layers = lora_layers(fused)
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    if arch == "gpt2":
        assert all(isinstance(m.get_base_layer(), Conv1D) and m.fan_in_fan_out for m in layers)

    # the very same Parameter objects and an unchanged state_dict
    params_after = dict(fused.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is p for n, p in params_before.items())
    state_after = fused.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())

    x = ids()
    out_ref, out_fused = ref(x, labels=x), fused(x, labels=x)
    assert len(op_calls) == len(layers)
    assert_close(out_fused.logits, out_ref.logits, "logits")
    out_ref.loss.backward()
    out_fused.loss.backward()
    trainable = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    fused_params = dict(fused.named_parameters())
    for n, p in trainable:
        assert fused_params[n].grad is not None, n
        assert_close(fused_params[n].grad, p.grad, f"grad of {n}", rtol=1e-4, atol=1e-6)

    opt_ref.step()
    opt_fused.step()
    for n, p in trainable:
        assert_close(fused_params[n], p, f"{n} after AdamW", rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert_close(fused(x).logits, ref(x).logits, "logits after AdamW")


def test_dropout_runs_fused_and_is_reproducible(op_calls):
    model = fuse_lora(make_peft("llama", lora_dropout=0.3)).train()
    x = ids()

    def run(seed):
        torch.manual_seed(seed)
        return model(x).logits

    y1, y2, y3 = run(7), run(7), run(8)
    assert len(op_calls) == 3 * len(lora_layers(model))
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    y1.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    # eval mode: no dropout, equal to peft's own forward
    model.eval()
    with torch.no_grad():
        y_eval = model(x).logits
        assert not torch.allclose(y_eval, y1)
        assert_close(y_eval, unfuse_lora(copy.deepcopy(model))(x).logits, "eval logits")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_reload_merge_unfuse(arch, tmp_path):
    plain = make_peft(arch).eval()
    fused = fuse_lora(copy.deepcopy(plain))
    x = ids()
    with torch.no_grad():
        out = fused(x).logits

    # save_pretrained writes exactly what peft writes for the unfused model
    fused.save_pretrained(tmp_path / "fused")
    plain.save_pretrained(tmp_path / "plain")
    sd_fused = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    sd_plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert sd_fused.keys() == sd_plain.keys() and all(torch.equal(sd_fused[k], sd_plain[k]) for k in sd_plain)
    assert json.loads((tmp_path / "fused" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    reloaded = PeftModel.from_pretrained(make_base(arch), tmp_path / "fused").eval()
    assert all(type(m) is LoraLinear for m in lora_layers(reloaded))
    with torch.no_grad():
        assert_close(reloaded(x).logits, out, "reloaded logits")
        assert_close(fuse_lora(reloaded)(x).logits, out, "reloaded + fused logits")

    merged = copy.deepcopy(fused).merge_and_unload()
    assert not lora_layers(merged)
    with torch.no_grad():
        assert_close(merged(x).logits, out, "merge_and_unload logits", atol=2e-5)

    assert unfuse_lora(fused) is fused
    assert all(type(m) is LoraLinear for m in lora_layers(fused))
    with torch.no_grad():
        assert_close(fused(x).logits, out, "unfused logits")


def test_fallbacks_merged_disabled_and_two_active_adapters(op_calls):
    model = fuse_lora(make_peft("llama")).eval()
    base = make_base("llama").eval()
    x = ids()
    with torch.no_grad():
        out = model(x).logits
        with model.disable_adapter():
            assert_close(model(x).logits, base(x).logits, "adapters disabled")
        n_calls = len(op_calls)
        model.merge_adapter()
        assert_close(model(x).logits, out, "merged", atol=2e-5)
        assert len(op_calls) == n_calls  # merged: the base layer alone, no fused call
        model.unmerge_adapter()

        model.add_adapter("second", lora_cfg("llama"))
        randomize_lora(model, seed=3)
        model.base_model.set_adapter(["default", "second"])
        reference = unfuse_lora(copy.deepcopy(model))
        n_calls = len(op_calls)
        assert_close(model(x).logits, reference(x).logits, "two active adapters")
        assert len(op_calls) == n_calls  # several active adapters: peft's forward


def test_unfusable_layers_warn_or_raise():
    # LoRA on v_proj and the embedding, DoRA on q_proj, both adapters active
    model = get_peft_model(make_base("llama"), lora_cfg("llama", target_modules=["v_proj", "embed_tokens"]))
    model.add_adapter("dora", lora_cfg("llama", target_modules=["q_proj"], use_dora=True))
    model.base_model.set_adapter(["default", "dora"])
    randomize_lora(model)
    reference = copy.deepcopy(model)

    with pytest.raises(ValueError, match=r"strict=True.*q_proj \(LoRA variant DoraLinearVariant") as err:
        fuse_lora(model, strict=True)
    assert "embed_tokens" in str(err.value) and "v_proj" not in str(err.value)
    assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())  # strict changes nothing

    with pytest.warns(UserWarning, match=r"fuse_lora: 3 LoRA layer\(s\) cannot run fused") as rec:
        fuse_lora(model)
    msg = str(rec[0].message)
    assert "embed_tokens (peft Embedding layer" in msg and msg.count("DoraLinearVariant") == 2
    fused_names = [n for n, m in model.named_modules() if type(m) is FusedLoraLinear]
    assert len(fused_names) == 2 and all(n.endswith("v_proj") for n in fused_names)
    x = ids()
    with torch.no_grad():
        assert_close(model.eval()(x).logits, reference.eval()(x).logits, "partly fused logits")

    with pytest.raises(ValueError, match="no peft LoRA layers"):
        fuse_lora(make_base("llama"))


def test_bf16_base_with_fp32_adapters(op_calls):
    plain = get_peft_model(make_base("llama", dtype=torch.bfloat16), lora_cfg("llama"))  # peft upcasts adapters
    randomize_lora(plain)
    assert all(p.dtype == torch.float32 for n, p in plain.named_parameters() if "lora_" in n)
    fused = fuse_lora(copy.deepcopy(plain))
    # the same adapters rounded to bf16, run by peft: the error budget of computing the adapter in bf16
    low = randomize_lora(get_peft_model(make_base("llama", dtype=torch.bfloat16), lora_cfg("llama"),
                                        autocast_adapter_dtype=False))
    x = ids()
    with torch.no_grad():
        y_plain, y_fused, y_low = plain(x).logits.float(), fused(x).logits, low(x).logits.float()
    assert y_fused.dtype == torch.bfloat16 and len(op_calls) == len(lora_layers(fused))
    err, budget = (y_fused.float() - y_plain).abs().max(), (y_low - y_plain).abs().max()
    assert err <= 2 * budget + 1e-3, f"fused bf16 error {err:.3g} > 2 x peft's bf16-adapter error {budget:.3g}"
    fused(x).logits.float().square().mean().backward()
    grads = [p.grad for n, p in fused.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_autocast_forward(op_calls):
    plain = make_peft("llama").train()
    fused = fuse_lora(copy.deepcopy(plain))
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, y_fused = plain(x, labels=x), fused(x, labels=x)
    assert len(op_calls) == len(lora_layers(fused))
    assert_close(y_fused.logits.float(), y_plain.logits.float(), "autocast logits", rtol=5e-2, atol=5e-2)
    y_fused.loss.backward()  # outside the autocast region, as torch recommends
    assert all(p.grad is not None for p in fused.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# LinChain adapters
# ----------------------------------------------------------------------------------------------
def linchain_peft(arch, k=2, init="kaiming", **kw):
    return make_peft(arch, cfg=linchain_config(lora_cfg(arch, **kw), chain_length=k, chain_init=init))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_linchain_layers_match_reference_and_train(arch, op_calls):
    model = linchain_peft(arch).train()
    layers = lora_layers(model)
    assert layers and all(type(m) is PeftLinChainLinear for m in layers)
    layer = layers[0]
    chain = layer.lora_chain["default"]
    assert chain.shape == (2, 4, 4) and chain.requires_grad

    base = layer.get_base_layer()
    weight = base.weight.T if arch == "gpt2" else base.weight
    x = torch.randn(2, 5, layer.in_features)
    expected = linchain_ref(x, weight, base.bias, layer.lora_A["default"].weight, chain,
                            layer.lora_B["default"].weight, layer.scaling["default"])
    assert_close(layer(x), expected, "LinChain layer vs linchain_ref")

    op_calls.clear()
    x = ids()
    model(x, labels=x).loss.backward()
    assert len(op_calls) == len(layers)
    for m in layers:
        g = m.lora_chain["default"].grad
        assert g is not None and g.abs().sum() > 0


def test_linchain_chain_inits():
    r = 4
    for init in ("identity", "kaiming", "orthogonal"):
        layer = lora_layers(get_peft_model(make_base("llama"),
                                           linchain_config(lora_cfg("llama"), 3, chain_init=init)))[0]
        c = layer.lora_chain["default"].detach()
        eye = torch.eye(r).expand(3, r, r)
        if init == "identity":
            assert torch.equal(c, eye)
        elif init == "orthogonal":
            assert_close(c @ c.transpose(1, 2), eye, "C Cᵀ")
        else:  # kaiming_uniform(a=√5): |c| <= 1/√r
            assert c.abs().max() <= 1 / r**0.5 and not torch.allclose(c, eye)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_linchain_save_reload_and_merge(arch, tmp_path, monkeypatch):
    model = linchain_peft(arch).eval()
    x = ids()
    with torch.no_grad():
        out = model(x).logits
    model.save_pretrained(tmp_path)

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LINCHAIN" and cfg["chain_length"] == 2 and cfg["chain_init"] == "kaiming"
    saved = load_file(tmp_path / "adapter_model.safetensors")
    chains = [k for k in saved if k.endswith("lora_chain")]
    assert len(chains) == len(lora_layers(model)) and all(saved[k].shape == (2, 4, 4) for k in chains)

    reloaded = PeftModel.from_pretrained(make_base(arch), tmp_path, is_trainable=True).eval()
    layers = lora_layers(reloaded)
    assert all(type(m) is PeftLinChainLinear for m in layers)
    assert all(m.lora_chain["default"].requires_grad for m in layers)
    with torch.no_grad():
        assert_close(reloaded(x).logits, out, "reloaded LinChain logits", rtol=0, atol=0)

    # merge folds the chain: ΔW = s · B C_k ⋯ C_1 A
    merged = copy.deepcopy(model).merge_and_unload()
    assert not lora_layers(merged)
    with torch.no_grad():
        assert_close(merged(x).logits, out, "merged LinChain logits", atol=2e-5)

    # without this module's registration peft refuses the adapter instead of loading plain LoRA
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, "LINCHAIN")
    with pytest.raises(KeyError, match="LINCHAIN"):
        PeftModel.from_pretrained(make_base(arch), tmp_path)


def test_linchain_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="chain_length"):
        linchain_config(lora_cfg("llama"), chain_length=0)
    with pytest.raises(ValueError, match="chain_init"):
        linchain_config(lora_cfg("llama"), chain_length=1, chain_init="xavier")
    with pytest.raises(TypeError, match="lora_config"):
        linchain_config({"r": 4}, chain_length=1)
    with pytest.raises(ValueError, match="use_dora"):
        linchain_config(lora_cfg("llama", use_dora=True), chain_length=1)
    with pytest.raises(ValueError, match="'model.embed_tokens'.*Embedding"):
        get_peft_model(make_base("llama"), linchain_config(lora_cfg("llama", target_modules=["embed_tokens"]), 1))
    # a LinChain adapter cannot be added to plain lora.Linear layers (it would silently lose its chain)
    plain = get_peft_model(make_base("llama"), lora_cfg("llama"))
    with pytest.raises(ValueError, match="chain_length"):
        plain.add_adapter("chain", linchain_config(lora_cfg("llama"), chain_length=1))


def test_plain_lora_adapter_on_linchain_layers():
    model = linchain_peft("llama")
    model.add_adapter("plain", lora_cfg("llama"))
    randomize_lora(model, seed=4)
    layer = lora_layers(model)[0]
    assert "plain" in layer.lora_A and "plain" not in layer.lora_chain
    base, x = layer.get_base_layer(), torch.randn(3, layer.in_features)
    A, B = {}, {}
    for a in ("default", "plain"):
        A[a], B[a] = layer.lora_A[a].weight, layer.lora_B[a].weight
    with torch.no_grad():
        layer.set_adapter(["default", "plain"])
        expected = (linchain_ref(x, base.weight, base.bias, A["default"], layer.lora_chain["default"], B["default"],
                                 layer.scaling["default"])
                    + linchain_ref(x, torch.zeros_like(base.weight), None, A["plain"], [], B["plain"],
                                   layer.scaling["plain"]))
        assert_close(layer(x), expected, "LinChain + plain LoRA adapter")
        merged = base.weight + layer.get_delta_weight("default") + layer.get_delta_weight("plain")
        assert_close(torch.nn.functional.linear(x, merged, base.bias), expected, "merged two adapters")
        # peft's mixed batch: row i runs adapter adapter_names[i]
        mixed = layer(x, adapter_names=["default", "__base__", "plain"])
        rows = [linchain_ref(x[0], base.weight, base.bias, A["default"], layer.lora_chain["default"], B["default"],
                             layer.scaling["default"]),
                torch.nn.functional.linear(x[1], base.weight, base.bias),
                linchain_ref(x[2], base.weight, base.bias, A["plain"], [], B["plain"], layer.scaling["plain"])]
        assert_close(mixed, torch.stack(rows), "mixed batch")


def test_fuse_lora_leaves_linchain_layers_alone():
    model = linchain_peft("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fuse_lora(model)
    assert all(type(m) is PeftLinChainLinear for m in lora_layers(model))


def test_entk_and_jvp_of_a_fused_peft_model_match_the_unfused_one():
    """empirical_ntk / per_sample_jvp over a fuse_lora model, base weights selected too (their layers then go
    through the engine's torch.func fallback, where the fused op runs its plain-torch reference), equal the same
    quantities of the unfused peft model (peft's own layers: the engine's hooks)."""
    import ntk_kernels

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32, num_labels=2,
                                  attn_implementation="eager")
    base = transformers.BertForSequenceClassification(cfg).eval().double()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    ids = torch.randint(0, 100, (3, 8))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    spec = r"lora_|query\.base_layer\.weight|classifier"
    K0 = ntk_kernels.empirical_ntk(model, x, params=spec, dtype=torch.float64)
    names = [n for n, _ in ntk_kernels.ntk.empirical.select_params(model, spec)]
    v = {n: torch.randn_like(p) for n, p in model.named_parameters() if n in names}
    f0, jv0 = ntk_kernels.per_sample_jvp(model, x, v, params=spec)
    fuse_lora(model)
    assert any(isinstance(m, FusedLoraLinear) for m in model.modules())
    K = ntk_kernels.empirical_ntk(model, x, params=spec, dtype=torch.float64)
    f, jv = ntk_kernels.per_sample_jvp(model, x, v, params=spec)
    torch.testing.assert_close(K, K0, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(f, f0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv, jv0, rtol=1e-9, atol=1e-12)
    assert K0.abs().max() > 0 and jv0.abs().max() > 0
