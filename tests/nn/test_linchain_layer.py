"""LinChainLinear: forward equals the reference, init choices, merge / unmerge, from_linear."""
import pytest
import torch

from ntk_kernels.nn import LinChainLinear
from ntk_kernels.ops import linchain_ref


def _randomise_adapter(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B) + ((layer.lora_chain,) if layer.lora_chain is not None else ()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("init", ["identity", "kaiming", "orthogonal"])
def test_forward_matches_reference(k, init):
    torch.manual_seed(k)
    layer = LinChainLinear(13, 7, 4, chain_length=k, alpha=8.0, chain_init=init).double()
    assert layer.scaling == 2.0
    x = torch.randn(2, 5, 13, dtype=torch.float64)
    # B starts at zero: the layer starts as W₀
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    _randomise_adapter(layer)
    chain = layer.lora_chain if k else []
    torch.testing.assert_close(layer(x), linchain_ref(x, layer.weight, layer.bias, layer.lora_A, chain, layer.lora_B, 2.0))


def test_chain_inits():
    eye = torch.eye(5)
    lc = LinChainLinear(6, 6, 5, chain_length=2, chain_init="identity").lora_chain
    assert torch.equal(lc[0], eye) and torch.equal(lc[1], eye)
    orth = LinChainLinear(6, 6, 5, chain_length=2, chain_init="orthogonal").lora_chain
    torch.testing.assert_close(orth[1] @ orth[1].T, eye, atol=1e-5, rtol=0)
    kai = LinChainLinear(6, 6, 5, chain_length=1, chain_init="kaiming").lora_chain
    assert kai.abs().max() <= 1 / 5 ** 0.5 + 1e-6 and not torch.allclose(kai[0], eye)  # bound of a=√5 uniform: 1/√fan_in


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_unmerge_round_trip(dtype):
    torch.manual_seed(1)
    layer = LinChainLinear(11, 9, 3, chain_length=2, chain_init="kaiming", dtype=dtype)
    _randomise_adapter(layer, 2)
    x = torch.randn(4, 11, dtype=dtype)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(layer(x), y, **tol)
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.delta_weight().detach(), **tol)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0, **tol)
    torch.testing.assert_close(layer(x), y, **tol)


def test_delta_weight_is_the_chain_product():
    layer = LinChainLinear(5, 4, 2, chain_length=3, alpha=1.0, chain_init="orthogonal").double()
    _randomise_adapter(layer, 3)
    c = layer.lora_chain
    expected = 0.5 * layer.lora_B @ c[2] @ c[1] @ c[0] @ layer.lora_A
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_from_linear_freezes_and_shares():
    lin = torch.nn.Linear(8, 6)
    layer = LinChainLinear.from_linear(lin, rank=2, chain_length=1)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_chain", "lora_B"]
    torch.testing.assert_close(layer(torch.ones(2, 8)), lin(torch.ones(2, 8)))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        LinChainLinear.from_linear(torch.nn.Conv1d(2, 2, 1), rank=2)


def test_training_with_dropout_moves_adapter_only():
    torch.manual_seed(0)
    layer = LinChainLinear.from_linear(torch.nn.Linear(10, 3), rank=4, chain_length=2, dropout=0.1).train()
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    w0 = layer.weight.detach().clone()
    x, t = torch.randn(32, 10), torch.randn(32, 3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(layer(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert torch.equal(layer.weight, w0)
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"), (dict(chain_length=-1), "chain_length"), (dict(dropout=1.0), "dropout"),
    (dict(chain_init="zeros"), "chain_init"), (dict(rank=2.5), "rank")])
def test_bad_arguments(kwargs, match):
    args = dict(in_features=4, out_features=3, rank=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LinChainLinear(**args)


# ---------------------------------------------------------------------------------------- under torch.func / forward AD
class _PlainChain(torch.nn.Module):
    """The same layer written with plain torch ops (no ntk_kernels code): the oracle for the transforms below."""

    def __init__(self, layer):
        super().__init__()
        for name, p in layer.named_parameters():
            self.register_parameter(name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        self.scaling = layer.scaling

    def forward(self, x):
        h = x @ self.lora_A.t()
        for c in getattr(self, "lora_chain", ()):
            h = h @ c.t()
        return x @ self.weight.t() + self.bias + self.scaling * (h @ self.lora_B.t())


def _chain_pair(k):
    torch.manual_seed(k)
    layer = LinChainLinear.from_linear(torch.nn.Linear(7, 5), rank=3, chain_length=k, alpha=6).double()
    for p in layer.parameters():
        p.data.normal_()
    return layer, _PlainChain(layer)


@pytest.mark.parametrize("k", [0, 2])
def test_entk_and_jvp_through_the_fused_layer(k):
    """torch.func transforms and forward-mode dual tensors cannot run through the custom op's autograd; the layer
    then runs its plain-torch reference: empirical_ntk (every parameter, the fallback path included),
    per_sample_jvp and linearize agree with the same layer written in plain torch."""
    import ntk_kernels
    from ntk_kernels.ntk import empirical_ntk_reference

    layer, plain = _chain_pair(k)
    for m in (layer, plain):
        m.weight.requires_grad_(True)
    x = torch.randn(4, 7, dtype=torch.float64)
    K = ntk_kernels.empirical_ntk(layer, x, dtype=torch.float64)
    K0 = empirical_ntk_reference(plain, x, dtype=torch.float64)
    torch.testing.assert_close(K, K0, rtol=1e-10, atol=1e-10)
    assert K.abs().max() > 1
    v = {n: torch.randn_like(p) for n, p in layer.named_parameters() if p.requires_grad}
    f, jv = ntk_kernels.per_sample_jvp(layer, x, v)
    state = {n: p.detach() for n, p in plain.named_parameters()}
    f0, jv0 = torch.func.jvp(lambda s: torch.func.functional_call(plain, {**state, **s}, (x,)),
                             ({n: state[n] for n in v},), (v,))
    torch.testing.assert_close(f, f0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv, jv0, rtol=1e-10, atol=1e-10)
    lin = ntk_kernels.linearize(layer)
    torch.testing.assert_close(lin(x), plain(x), rtol=1e-12, atol=1e-12)


def test_dropout_under_transforms():
    """Under torch.func transforms dropout is refused (a vmapped call would number the mask's rows per sample);
    under forward-mode dual tensors it needs a seed and then uses the plain call's mask."""
    import torch.autograd.forward_ad as fwAD

    from ntk_kernels import linchain_linear

    layer, _ = _chain_pair(1)
    x = torch.randn(3, 7, dtype=torch.float64)
    args = (layer.weight, layer.bias, layer.lora_A, layer.lora_chain, layer.lora_B, layer.scaling)
    with pytest.raises(ValueError, match="cannot run under torch.func"):
        torch.func.vmap(lambda xi: linchain_linear(xi[None], *args, dropout_p=0.5, training=True, seed=3))(x)
    plain = linchain_linear(x, *args, dropout_p=0.5, training=True, seed=3)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(ValueError, match="needs an explicit seed"):
            linchain_linear(xd, *args, dropout_p=0.5, training=True)
        y = fwAD.unpack_dual(linchain_linear(xd, *args, dropout_p=0.5, training=True, seed=3))[0]
    torch.testing.assert_close(y, plain.detach(), rtol=1e-12, atol=1e-12)
