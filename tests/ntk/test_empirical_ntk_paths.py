"""The engine's newer paths against the independent float64 oracle (a loop of torch.autograd.grad): norm layers
(nn.RMSNorm, transformers-style RMSNorm, a norm of another form that must fall back), Conv2d variants (stride,
dilation, rectangular kernels, grouped -> fallback), per_sample_grads, the sign kernels, memory_budget (small
blocks, the Gram switch, column caching) and progress."""
import itertools

import ntk_kernels

import pytest
import torch
from torch import nn

from _compare import assert_close
from ntk_kernels import per_sample_grads
from ntk_kernels.ntk import empirical_ntk, empirical_ntk_reference
from ntk_kernels.ntk.empirical import _split_params, select_params
from tests.ntk.test_empirical_ntk_models import data, jacobian_loop, ln_mlp, oracle

F64 = torch.float64
MODES = ("full", "trace", "diagonal")


class ScaledRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm arithmetic: fp32 statistics, weight ⊙ u(x)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = eps

    def forward(self, h):
        var = h.pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))


class OffsetRMSNorm(ScaledRMSNorm):
    """Gemma's form y = (1 + w) ⊙ u(x): not w ⊙ u + b, so the first-block check must send it to the fallback."""

    def forward(self, h):
        var = h.pow(2).mean(-1, keepdim=True)
        return (1.0 + self.weight) * (h * torch.rsqrt(var + self.variance_epsilon))


def norm_model(norm_cls):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), norm_cls(7), nn.Tanh(), nn.Linear(7, 2)).double().eval()


@pytest.mark.parametrize("norm", ["torch_rms", "scaled", "offset"])
def test_rmsnorm_variants(norm):
    cls = {"torch_rms": lambda d: nn.RMSNorm(d, eps=1e-5), "scaled": ScaledRMSNorm, "offset": OffsetRMSNorm}[norm]
    model = norm_model(cls)
    if norm == "torch_rms":
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)
    x1, x2 = data(5, (4, 5)), data(3, (4, 5), seed=1)  # (N, T, d): norms over the last dim at 4 positions
    out_fn = lambda o: o.mean(1)  # noqa: E731
    for mode, b in itertools.product(MODES, (None, x2)):
        out = empirical_ntk(model, x1, b, mode=mode, output_fn=out_fn, block_size=2, dtype=F64)
        assert_close(out, oracle(model, x1, b, mode=mode, output_fn=out_fn), F64, name=f"{norm} {mode}")
    only = empirical_ntk(model, x1, x2, params=r"^1\.", output_fn=out_fn, dtype=F64)
    assert_close(only, oracle(model, x1, x2, params=r"^1\.", output_fn=out_fn), F64, name=f"{norm} weight only")


class ConvNet(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        torch.manual_seed(4)
        self.c1 = nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=groups)
        self.c2 = nn.Conv2d(6, 4, 1, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.relu(self.c1(x))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("strategy", ["auto", "gram", "materialize"])
def test_conv2d_stride_dilation_and_groups(strategy):
    model = ConvNet().double().eval()
    x1, x2 = data(4, (3, 7, 6)), data(3, (3, 7, 6), seed=2)
    for mode, b in itertools.product(MODES, (None, x2)):
        out = empirical_ntk(model, x1, b, mode=mode, strategy=strategy, block_size=3, dtype=F64)
        assert_close(out, oracle(model, x1, b, mode=mode), F64, name=f"conv {mode} {strategy}")
    grouped = ConvNet(groups=3).double().eval()
    layers, rest = _split_params(grouped, select_params(grouped, None))
    assert {n for n, _ in rest} == {"c1.weight", "c1.bias"}  # grouped convolutions take the fallback
    assert_close(empirical_ntk(grouped, x1, x2, dtype=F64), oracle(grouped, x1, x2), F64, name="grouped conv")


def _psg_oracle(model, x, params=None, output_fn=None):
    J = jacobian_loop(model, x, params, output_fn)
    out, k = {}, 0
    for name, p in select_params(model, params):
        out[name] = J[..., k:k + p.numel()].reshape(*J.shape[:2], *p.shape)
        k += p.numel()
    return out


def test_per_sample_grads_every_path():
    """Linear, LayerNorm, Conv2d, Embedding (with padding_idx) and a tied parameter (fallback), in their own
    layouts, against the oracle; blocks of 2 over 5 samples."""
    from tests.ntk.test_empirical_ntk_models import TiedLM, TokenModel

    cases = [(ln_mlp(), data(5, (6,)), None), (ConvNet().double().eval(), data(5, (3, 7, 6)), None),
             (TokenModel().double().eval(), torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(0)),
              None),
             (TiedLM().double().eval(), torch.randint(0, 11, (5, 4), generator=torch.Generator().manual_seed(1)),
              None)]
    for model, x, params in cases:
        got = per_sample_grads(model, x, params=params, block_size=2, dtype=F64)
        ref = _psg_oracle(model, x, params)
        assert list(got) == list(ref)
        for name in ref:
            assert got[name].shape == ref[name].shape, name
            assert_close(got[name], ref[name], F64, name=f"{type(model).__name__} {name}")
    model = ln_mlp()
    got = per_sample_grads(model, data(3, (6,)), params=r"^(1|6)\.", dtype=torch.float32)
    assert set(got) == {"1.weight", "1.bias", "6.weight", "6.bias"} and got["6.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="params"):
        per_sample_grads(model, data(3, (6,)), params="nothing")
    with pytest.raises(ValueError, match="block_size"):
        per_sample_grads(model, data(3, (6,)), block_size=0)


@pytest.mark.parametrize("kernel", ["signgd", "asymmetric_signgd"])
def test_sign_kernels(kernel):
    model = ln_mlp()
    x1, x2 = data(5, (6,)), data(3, (6,), seed=3)
    J1, J2 = jacobian_loop(model, x1), jacobian_loop(model, x2)
    for mode, (b, Jb) in itertools.product(MODES, ((None, J1), (x2, J2))):
        eq = {"full": "icp,jep->ijce", "diagonal": "icp,jcp->ijc", "trace": "icp,jcp->ij"}[mode]
        left = J1.sign() if kernel == "signgd" else J1
        want = torch.einsum(eq, left, Jb.sign())
        out = empirical_ntk(model, x1, b, mode=mode, kernel=kernel, block_size=2, dtype=F64)
        assert_close(out, want, F64, name=f"{kernel} {mode} inputs2={'x2' if b is not None else None}")
        assert_close(empirical_ntk_reference(model, x1, b, mode=mode, kernel=kernel, dtype=F64), want, F64)
    sym = empirical_ntk(model, x1, kernel=kernel, mode="trace", dtype=F64)
    if kernel == "signgd":
        assert torch.equal(sym, sym.T)
    else:  # ⟨∇f(x_i), sign ∇f(x_j)⟩ is not symmetric
        assert (sym - sym.T).abs().max() > 1e-3


def test_memory_budget_blocks_gram_switch_and_progress():
    """A tiny budget: blocks of one sample, materialised layers switched to the Gram trick, no column cache;
    a large one: one block.  The kernel is the same; progress sees every tile."""
    from ntk_kernels.ntk import empirical as E

    model = ln_mlp()
    x1, x2 = data(7, (6,)), data(5, (6,), seed=1)
    ref = oracle(model, x1, x2)
    seen = []
    for budget in (1, 10**4, 10**9):
        seen.clear()
        out = empirical_ntk(model, x1, x2, memory_budget=budget, dtype=F64,
                            progress=lambda d, t: seen.append((d, t)))
        assert_close(out, ref, F64, name=f"budget {budget}")
        assert seen and seen[-1][0] == seen[-1][1] == len(seen)
    plans = []
    orig = E._Plan.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        plans.append(self)
    E._Plan.__init__ = spy
    try:
        empirical_ntk(model, x1, x2, memory_budget=1, strategy="auto", dtype=F64)
        empirical_ntk(model, x1, x2, memory_budget=10**9, dtype=F64)
    finally:
        E._Plan.__init__ = orig
    small, big = plans
    assert small.block_size == 1 and not small.cache
    assert all(c == "gram" for m, c in small.choice.items() if isinstance(m, nn.Linear))
    assert big.block_size == 7 and big.cache


def test_progress_true_writes_to_stderr(capsys, monkeypatch):
    model = ln_mlp()
    empirical_ntk(model, data(4, (6,)), block_size=2, progress=True, dtype=F64)
    # layer by layer: the probe's features (all 4 samples), then one contraction per feature: the 3 linear layers
    # (Gram trick, bias included) and the 2 norms' weights and biases
    assert "8/8 steps" in capsys.readouterr().err
    seen = []
    empirical_ntk(ln_mlp(), data(4, (6,)), block_size=2, memory_budget=1, progress=lambda d, t: seen.append((d, t)),
                  dtype=F64)
    assert seen == [(1, 3), (2, 3), (3, 3)]  # tile by tile (nothing fits): the upper triangle of 2 x 2 blocks
    from ntk_kernels.ntk import empirical as E

    monkeypatch.setattr(E, "_super_block", lambda *a: 3)
    seen.clear()
    empirical_ntk(ln_mlp(), data(20, (6,)), block_size=2, progress=lambda d, t: seen.append((d, t)), dtype=F64)
    # 7 super-blocks of 3 (the last of 2), 28 tiles on and above the diagonal: 7 row collections (2 blocks each, 1
    # for the last), 21 column collections, 7 features per tile
    total = 6 * 2 + 1 + sum(2 if b < 6 else 1 for a in range(7) for b in range(a + 1, 7)) + 28 * 7
    assert seen == [(k, total) for k in range(1, total + 1)]


class SharedIds(nn.Module):
    """Position embeddings on ids shared by the batch, (1, T), used two ways: broadcast (the expansion keeps them
    on the fast path) or indexed ``[0]`` (expansion would send every sample's gradient to sample 0: the probe's
    per-sample check must refuse it and the torch.func fallback must take them)."""

    def __init__(self, indexed):
        super().__init__()
        torch.manual_seed(6)
        self.tok, self.pos, self.head = nn.Embedding(9, 4), nn.Embedding(6, 4), nn.Linear(4, 2)
        self.indexed = indexed

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1])[None])
        h = self.tok(ids) + (p[0] if self.indexed else p)
        return self.head(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("indexed", [False, True])
def test_shared_ids_embedding_expansion(indexed):
    from ntk_kernels.ntk import empirical as E

    model = SharedIds(indexed).double().eval()
    ids1 = torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(0))
    ids2 = torch.randint(0, 9, (3, 6), generator=torch.Generator().manual_seed(1))
    refused = []
    orig = E._Plan.__init__

    def spy(self, raws, *a, **k):
        refused.append(model.pos not in raws)
        orig(self, raws, *a, **k)
    E._Plan.__init__ = spy
    try:
        for mode, b in itertools.product(MODES, (None, ids2)):
            out = empirical_ntk(model, ids1, b, mode=mode, block_size=2, dtype=F64)
            assert_close(out, oracle(model, ids1, b, mode=mode), F64, name=f"shared ids indexed={indexed} {mode}")
    finally:
        E._Plan.__init__ = orig
    assert all(r == indexed for r in refused)  # fast path when broadcast, fallback when indexed
    got = per_sample_grads(model, ids1, block_size=2, dtype=F64)
    for name, ref in _psg_oracle(model, ids1).items():
        assert_close(got[name], ref, F64, name=f"per_sample_grads {name}")


def test_nan_inputs_and_tangents_are_refused():
    """NaN in the inputs (tensor or mapping) or a NaN / inf tangent: a clear error naming it, not a NaN kernel."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"inputs1 contains NaN \(first at index \(2, 1\)\)"):
        ntk_kernels.empirical_ntk(m, x)
    with pytest.raises(ValueError, match=r"inputs2 contains NaN"):
        ntk_kernels.empirical_ntk(m, torch.randn(2, 3), x)
    with pytest.raises(ValueError, match=r"inputs contains NaN"):
        ntk_kernels.per_sample_grads(m, x)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, a, b):
            return self.lin(a + b)

    with pytest.raises(ValueError, match=r"inputs1\['b'\] contains NaN"):
        ntk_kernels.empirical_ntk(Two(), {"a": torch.randn(4, 3), "b": x})
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    v["2.bias"] = torch.tensor([0.0, float("inf")])
    with pytest.raises(ValueError, match=r"tangents\['2.bias'\] contains NaN or inf"):
        ntk_kernels.per_sample_jvp(m, torch.randn(4, 3), v)
    from ntk_kernels.ntk import jvp as J

    def no_fallback(*a, **k):
        raise AssertionError("a NaN tangent must be refused before the per-sample fallback runs")

    for bad in (float("nan"), -float("inf")):  # per-sample tangents (the min/max check), NaN or -inf anywhere
        v = {n: torch.randn(4, *p.shape) for n, p in m.named_parameters()}
        v["0.weight"][3, 2, 1] = bad
        with pytest.raises(ValueError, match=r"tangents\['0.weight'\] contains NaN or inf"):
            ntk_kernels.per_sample_jvp(m, torch.randn(4, 3), v)
        orig = J._per_sample_fallback
        J._per_sample_fallback = no_fallback
        try:
            with pytest.raises(ValueError, match=r"tangents\['0.weight'\] contains NaN or inf"):
                ntk_kernels.per_sample_jvp(m, torch.randn(4, 3), v)
        finally:
            J._per_sample_fallback = orig


def test_nan_inf_check():
    """The one-pass min/max check against the elementwise one: NaN, ±inf, both, none, empty, low precision."""
    from ntk_kernels.ntk.empirical import _nan_inf

    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for vals in ([], [float("nan")], [float("inf")], [-float("inf")], [float("nan"), float("inf")],
                     [float("inf"), -float("inf")]):
            t = torch.randn(5, 7, dtype=dt)
            for k, v in enumerate(vals):
                t.view(-1)[3 + 11 * k] = v
            nan, inf = _nan_inf(t)
            assert nan == bool(torch.isnan(t).any()), (dt, vals)
            assert (nan or inf) == (not bool(torch.isfinite(t).all())), (dt, vals)
            if not nan:
                assert inf == bool(torch.isinf(t).any()), (dt, vals)
    assert _nan_inf(torch.empty(0, 3)) == (False, False)
    z = torch.zeros(3, dtype=torch.complex64)
    z[1] = complex(float("nan"), 0.0)
    assert _nan_inf(z) == (True, False)


class _InfMasked(nn.Module):
    """Reads -inf as "masked" (as additive attention masks do): an input with -inf is valid."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(torch.where(torch.isinf(x), torch.zeros_like(x), x))


def test_inf_inputs_stay_allowed():
    m = _InfMasked().double()
    x = data(4, (3,))
    x[1, 2] = -float("inf")
    K = empirical_ntk(m, x, dtype=F64)
    x0 = x.clone()
    x0[1, 2] = 0.0
    assert torch.isfinite(K).all()
    torch.testing.assert_close(K, empirical_ntk_reference(m, x0, dtype=F64))


class _Branchy(nn.Module):
    """A layer used only for samples with x[:, 0] > 5, and called only when the block holds one (a data-dependent
    branch; each sample's output depends on that sample alone)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.extra = nn.Linear(3, 2)

    def forward(self, x):
        y = self.a(x)
        mask = (x[:, :1] > 5).to(x.dtype)
        if bool(mask.any()):
            y = y + mask * self.extra(x)
        return y


@pytest.mark.parametrize("strategy", ["auto", "gram", "materialize"])
def test_layers_reached_by_later_blocks_only(strategy):
    """A fast-path layer the probe block never reaches, and blocks that reach no selected layer at all: exact."""
    torch.manual_seed(0)
    m = _Branchy().double()
    dt = torch.float64
    x1, x2 = torch.randn(4, 3, dtype=dt), torch.randn(4, 3, dtype=dt)
    x2[2, 0] = 9.0
    K = empirical_ntk(m, x1, x2, strategy=strategy, dtype=dt)
    torch.testing.assert_close(K, empirical_ntk_reference(m, x1, x2, dtype=dt), rtol=1e-10, atol=1e-12)
    x = torch.randn(20, 3, dtype=dt)
    x[19, 0] = 9.0
    K = empirical_ntk(m, x, strategy=strategy, block_size=4, dtype=dt)
    torch.testing.assert_close(K, empirical_ntk_reference(m, x, dtype=dt), rtol=1e-10, atol=1e-12)
    # only "extra" selected: the first blocks reach nothing, the last one does
    K = empirical_ntk(m, x, params=r"^extra\.", strategy=strategy, block_size=4, dtype=dt)
    K0 = empirical_ntk_reference(m, x, params=r"^extra\.", dtype=dt)
    torch.testing.assert_close(K, K0, rtol=1e-10, atol=1e-12)
    assert K0.abs().max() > 0


def test_sparse_tensors_in_the_graph():
    """The probe's saved-tensor count copes with sparse tensors saved by autograd."""
    torch.manual_seed(0)
    dt = torch.float64

    class S(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)
            self.register_buffer("A", torch.eye(4, dtype=dt).to_sparse())

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(torch.sparse.mm(self.A, h.t()).t())

    m, x = S().double(), torch.randn(5, 3, dtype=dt)
    torch.testing.assert_close(empirical_ntk(m, x, dtype=dt), oracle(m, x), rtol=1e-10, atol=1e-12)


def _sign_oracle(J1, J2, kernel, mode):
    eq = {"full": "icp,jep->ijce", "diagonal": "icp,jcp->ijc", "trace": "icp,jcp->ij"}[mode]
    if kernel == "sgd":
        return torch.einsum(eq, J1, J2)
    return torch.einsum(eq, J1.sign() if kernel == "signgd" else J1, J2.sign())


def _schedule_cases():
    from tests.ntk.test_empirical_ntk_models import TiedLM, TokenModel, text, tiny_bert

    g = torch.Generator().manual_seed(5)
    cases = {
        "ln_mlp": (ln_mlp, lambda: (data(7, (6,)), data(5, (6,), seed=1))),
        "conv": (lambda: ConvNet().double().eval(), lambda: (data(5, (3, 7, 6)), data(3, (3, 7, 6), seed=2))),
        "tokens": (lambda: TokenModel().double().eval(),
                   lambda: (torch.randint(0, 9, (5, 6), generator=g), torch.randint(0, 9, (4, 6), generator=g))),
        "tied": (lambda: TiedLM().double().eval(),
                 lambda: (torch.randint(0, 11, (5, 4), generator=g), torch.randint(0, 11, (3, 4), generator=g))),
        "bert": (tiny_bert, lambda: (text(5), text(3, seed=1))),
    }
    return cases


# BERT's attention key bias has a gradient that is 0 in exact arithmetic and rounding noise in floating point: its
# sign is undefined (see test_empirical_ntk_hf.test_sign_kernels), so it is left out
_PARAMS = {"bert": lambda n, p: not n.endswith("key.bias")}


@pytest.mark.parametrize("case", ["ln_mlp", "conv", "tokens", "tied", "bert"])
def test_layer_by_layer_and_tile_by_tile_schedules(case, monkeypatch):
    """The schedules of several blocks (layer by layer over all samples when every sample's raw features fit; layer
    by layer over tiles of super-blocks when two super-blocks' fit; tile by tile with materialised features
    otherwise), the layer-by-layer ones with their per-sample gradients formed one input feature at a time (the
    smallest scratch), against the float64 oracle: every mode, inputs2 None and given, the three kernels,
    materialised and Gram layers, embeddings, the torch.func fallback (tied weights)."""
    from ntk_kernels.ntk import empirical as E

    make, inputs = _schedule_cases()[case]
    model = make()
    x1, x2 = inputs()
    params = _PARAMS.get(case)
    J1, J2 = jacobian_loop(model, x1, params), jacobian_loop(model, x2, params)
    for J in (J1, J2):  # the sign kernels are well posed: no entry at rounding level
        assert not ((J != 0) & (J.abs() < 1e-12 * J.abs().amax())).any()
    calls = {"by_layer": 0}
    real = E._by_layer

    def counting(*a, **k):
        calls["by_layer"] += 1
        return real(*a, **k)

    monkeypatch.setattr(E, "_by_layer", counting)
    huge = lambda raws, plan: 1 << 60  # noqa: E731  (nothing fits: tile by tile)
    for schedule, kernel, strategy in itertools.product(("layer", "super", "tile"),
                                                        ("sgd", "signgd", "asymmetric_signgd"), ("auto", "materialize")):
        if kernel != "sgd" and strategy == "auto":
            continue  # sign kernels always materialise
        with monkeypatch.context() as mp:
            if schedule == "tile":
                mp.setattr(E, "_by_layer_bytes", huge)
            else:
                mp.setattr(E, "CHUNK_BYTES", 1)
            if schedule == "super":  # super-blocks of 3 samples (blocks of 2 inside): tiles of super-blocks
                mp.setattr(E, "_super_block", lambda *a: 3)
            before = calls["by_layer"]
            for mode, (b, Jb) in itertools.product(MODES, ((None, J1), (x2, J2))):
                out = empirical_ntk(model, x1, b, params=params, mode=mode, kernel=kernel, strategy=strategy,
                                    block_size=2, dtype=F64)
                want = _sign_oracle(J1, Jb, kernel, mode)
                assert_close(out, want, F64, name=f"{case} {schedule} {kernel} {strategy} {mode} {b is None}")
                if b is None and kernel != "asymmetric_signgd":
                    assert torch.equal(out, _mirror_k(out, mode))
            assert (calls["by_layer"] > before) == (schedule != "tile")


def _mirror_k(K, mode):
    return K.permute(1, 0, 3, 2) if mode == "full" else K.transpose(0, 1)


def test_super_block_sizes():
    """Everything held when it fits; else the largest S with two super-blocks' features and an S x S tile inside
    the free bytes; 0 when not even one sample fits (the tile-by-tile schedule then)."""
    from ntk_kernels.ntk.empirical import _super_block

    assert _super_block(10, 10, False, per=100, cc=4, free=10 * 100 + 100 * 4) == 10
    assert _super_block(10, 6, True, per=100, cc=4, free=16 * 100 + 60 * 4) == 10
    S = _super_block(10, 10, False, per=100, cc=4, free=900)
    assert S == 4 and 2 * S * 100 + S * S * 4 <= 900 < 2 * (S + 1) * 100 + (S + 1) ** 2 * 4
    assert _super_block(10, 10, False, per=100, cc=4, free=150) == 0


# ---------------------------------------------------------------------------------------------- review regressions
class _LogitBias(nn.Module):
    """A frozen backbone and a plain output-bias parameter: no fast-path layer, autograd saves nothing for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().requires_grad_(False)
        self.logit_bias = nn.Parameter(torch.randn(3, dtype=F64))

    def forward(self, x):
        return self.net(x) + self.logit_bias


class _EmptyIds(nn.Module):
    """An embedding called on (n, 0) ids (an empty segment) beside a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(6, 3)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x[:, :3] + self.emb(x[:, :0].long()).sum(1))


class _SmallOutsideUse(nn.Module):
    """An embedding's row that no id touches also used outside the module, scaled small."""

    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 2)
        self.scale = scale

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1) + self.scale * self.emb.weight[10])


def test_review_regressions():
    """Found by the session-4 review: N > MAX_BLOCK with no fast-path layer (nothing in flight per sample), sparse
    embedding gradients and empty id tensors in the probe's embedding check, a small use of an embedding row
    outside the module (must move it to the fallback: exact)."""
    m = _LogitBias()
    x = data(130, (4,))
    assert_close(empirical_ntk(m, x, mode="trace", dtype=F64), empirical_ntk_reference(m, x, mode="trace", dtype=F64),
                 F64, name="no fast path, N > MAX_BLOCK")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).double()
    sparse = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2)).double()
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 10, (5, 3), generator=torch.Generator().manual_seed(1))
    assert_close(empirical_ntk(sparse, ids, dtype=F64), empirical_ntk_reference(dense, ids, dtype=F64), F64,
                 name="sparse embedding")
    m = _EmptyIds().double()
    x = data(4, (3,))
    for params in (None, ["emb.weight", "lin.weight"]):
        assert_close(empirical_ntk(m, x, params=params, dtype=F64),
                     empirical_ntk_reference(m, x, params=params, dtype=F64), F64, name=f"empty ids {params}")
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 1, 2]])  # row 10 untouched
    for scale in (1e-2, 1e-4):
        m = _SmallOutsideUse(scale).double()
        ref = empirical_ntk_reference(m, ids, params=["emb.weight"], dtype=F64)
        out = empirical_ntk(m, ids, params=["emb.weight"], dtype=F64)
        assert (out - ref).abs().max() <= 1e-12 * ref.abs().max(), scale
