"""empirical_ntk against the torch.func jacrev + vmap reference in float64, and its argument checks."""
import itertools

import pytest
import torch
from torch import nn

from _compare import assert_close
from ntk_kernels.ntk import empirical_ntk, empirical_ntk_reference

F64 = torch.float64
ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def mlp(sizes=(7, 13, 11, 3), act="tanh", seed=0):
    torch.manual_seed(seed)
    layers = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=(k != 1)))  # one layer without bias
        if k < len(sizes) - 2:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers).double().eval()


class TokenMLP(nn.Module):
    """Linear layers acting on (N, T, d); pooled over T into (N, C)."""

    def __init__(self, d=5, h=6, c=3):
        super().__init__()
        torch.manual_seed(1)
        self.inp, self.mid, self.head = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, c)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.nn.functional.gelu(self.mid(h)) + h
        h = torch.tanh(self.mid(h))  # mid used twice: its two uses sum
        return self.head(h).mean(1)


class WithLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return type("Out", (), {"logits": self.net(x)})()


def data(n, shape=(7,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64)


@pytest.mark.parametrize("act,mode,strategy", itertools.product(ACTS, ("full", "trace", "diagonal"),
                                                                ("auto", "gram", "materialize")))
def test_mlp_matches_jacrev(act, mode, strategy):
    model = mlp(act=act)
    x1, x2 = data(10), data(6, seed=1)
    for a, b, bs in ((x1, None, 4), (x1, x2, 3), (x1, x2, None)):
        out = empirical_ntk(model, a, b, mode=mode, strategy=strategy, block_size=bs, dtype=F64)
        ref = empirical_ntk_reference(model, a, b, mode=mode, dtype=F64)
        assert out.dtype == F64
        assert_close(out, ref, F64, name=f"{act} {mode} {strategy} bs={bs} inputs2={b is not None}")


@pytest.mark.parametrize("mode,strategy", itertools.product(("full", "trace", "diagonal"),
                                                            ("auto", "gram", "materialize")))
def test_token_mlp_matches_jacrev(mode, strategy):
    model = TokenMLP().double().eval()
    x1, x2 = data(7, (4, 5)), data(5, (4, 5), seed=2)
    for b, bs in ((None, 3), (x2, 2)):
        out = empirical_ntk(model, x1, b, mode=mode, strategy=strategy, block_size=bs, dtype=F64)
        ref = empirical_ntk_reference(model, x1, b, mode=mode, dtype=F64)
        assert_close(out, ref, F64, name=f"token {mode} {strategy}")


@pytest.mark.parametrize("params", [["0.weight"], ["4.weight", "4.bias"], r"^4\.", r"\.bias$",
                                    lambda n, p: n.startswith("2"), ["0.bias"]])
def test_params_subsets(params):
    model = mlp(act="relu")
    x1, x2 = data(9), data(4, seed=3)
    for strategy in ("gram", "materialize"):
        out = empirical_ntk(model, x1, x2, params=params, strategy=strategy, block_size=4, dtype=F64)
        ref = empirical_ntk_reference(model, x1, x2, params=params, dtype=F64)
        assert_close(out, ref, F64, name=f"params {params} {strategy}")


def test_frozen_params_selected_by_name():
    model = mlp()
    model[0].requires_grad_(False)
    x = data(5)
    out = empirical_ntk(model, x, params=["0.weight"], dtype=F64)
    ref = empirical_ntk_reference(model, x, params=["0.weight"], dtype=F64)
    assert_close(out, ref, F64)
    assert not model[0].weight.requires_grad  # restored
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(model, x, params=lambda n, p: False)


def test_symmetric_when_inputs2_is_none():
    model = mlp(act="gelu")
    x = data(11)
    K = empirical_ntk(model, x, block_size=4, dtype=F64)
    assert torch.equal(K, K.permute(1, 0, 3, 2))
    T = empirical_ntk(model, x, mode="trace", block_size=5)
    assert T.dtype == torch.float32 and torch.equal(T, T.t())
    assert_close(T, empirical_ntk_reference(model, x, mode="trace", dtype=F64), torch.float32)


def test_logits_output_and_output_fn_and_jacobian_strategy():
    model = WithLogits()
    x = data(6)
    out = empirical_ntk(model, x, block_size=4, dtype=F64)
    assert_close(out, empirical_ntk_reference(model.net, x, dtype=F64), F64)
    pick = lambda o: o.logits[:, :2]
    out = empirical_ntk(model, x, output_fn=pick, mode="diagonal", dtype=F64)
    ref = empirical_ntk(model, x, output_fn=pick, mode="diagonal", strategy="jacobian", dtype=F64)
    assert out.shape == (6, 6, 2)
    assert_close(out, ref, F64)


def test_bad_inputs():
    model = mlp()
    x = data(4)
    with pytest.raises(ValueError, match="inputs2"):
        empirical_ntk(model, x, data(4, (8,)))
    with pytest.raises(TypeError, match="inputs1"):
        empirical_ntk(model, [x])
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(model, x, output_fn=lambda o: o.sum(1))
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(TokenMLP().double(), data(3, (4, 5)), output_fn=lambda o: o[:, None])
    with pytest.raises(ValueError, match="output_fn"):
        empirical_ntk(nn.Sequential(nn.Linear(5, 3)).double(), data(3, (4, 5)))  # (N, T, C) output
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(model, x, params="nothing_matches")
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(model, x, params=["not.a.param"])
    with pytest.raises(ValueError, match="mode"):
        empirical_ntk(model, x, mode="nope")
    with pytest.raises(ValueError, match="strategy"):
        empirical_ntk(model, x, strategy="nope")
    with pytest.raises(ValueError, match="block_size"):
        empirical_ntk(model, x, block_size=0)
    with pytest.raises(ValueError, match="kernel"):
        empirical_ntk(model, x, kernel="adam")
    with pytest.raises(ValueError, match="memory_budget"):
        empirical_ntk(model, x, memory_budget=0)
    with pytest.raises(TypeError, match="progress"):
        empirical_ntk(model, x, progress="yes")


def test_output_independent_of_params():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.unused = nn.Linear(7, 3), nn.Linear(7, 3)

        def forward(self, x):
            return self.lin(x).detach() + x[:, :3]

    model = Detached().double()
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(model, data(4), params=["lin.weight"])
    with pytest.raises(ValueError, match="params"):
        empirical_ntk(model, data(4), params=r"^unused\.")


def test_non_linear_params_through_fallback():
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    x = data(4)  # LayerNorm through the torch.func fallback, the Linear layers through the fast path
    for params in (None, lambda n, p: not n.startswith("1."), r"^1\."):
        out = empirical_ntk(model, x, params=params, block_size=3, dtype=F64)
        ref = empirical_ntk_reference(model, x, params=params, dtype=F64)
        assert ref.shape == (4, 4, 2, 2)
        assert_close(out, ref, F64, name=f"params {params}")
