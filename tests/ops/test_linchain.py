"""ntk::linchain against its float64 reference on every CPU backend (Triton: test_linchain_triton.py)."""
import itertools

import pytest
import torch

import ntk_kernels
from ntk_kernels import _backend
from ntk_kernels.ops import _hash_dropout, dropout_keep_mask, linchain_ref
from _compare import assert_close

CPU_BACKENDS = ["cpu", "reference"]
if torch.cuda.is_available():
    CPU_BACKENDS += ["cuda", "triton"]


def _available(backend, device="cpu", dtype=torch.float32):
    return not _backend.not_supported_reasons("linchain", torch.device(device), dtype)[backend]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    device = "cuda" if request.param in ("cuda", "triton") else "cpu"
    if not _available(request.param, device):
        pytest.skip(f"{request.param}: {_backend.not_supported_reasons('linchain', torch.device(device), torch.float32)[request.param]}")
    monkeypatch.setenv("NTK_KERNELS_BACKEND_LINCHAIN", request.param)
    return request.param, device


def make_inputs(lead, d_in, d_out, r, k, dtype, device="cpu", bias=True, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    x = rnd(*lead, d_in)
    if noncontig:  # same values, transposed storage
        x = x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() > 1 else x
    return dict(x=x, weight=rnd(d_out, d_in, scale=d_in ** -0.5), bias=rnd(d_out) if bias else None,
                lora_A=rnd(r, d_in, scale=d_in ** -0.5), chain=rnd(k, r, r, scale=r ** -0.5) + torch.eye(r, device=device, dtype=torch.float64),
                lora_B=rnd(d_out, r, scale=r ** -0.5))


def run(inputs, dtype, scaling, p, seed, fn):
    """Value and gradients of every input of fn (linchain_linear or linchain_ref) in ``dtype``."""
    # .to keeps strides (preserve_format), so a non-contiguous x stays non-contiguous
    leaves = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    if fn is ntk_kernels.linchain_linear:
        y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["chain"], leaves["lora_B"],
               scaling, p, training=True, seed=seed)
    else:
        y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["chain"], leaves["lora_B"],
               scaling, p, seed)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64).to(y.device, dtype)
    names = [k for k, v in leaves.items() if v is not None and not (k == "chain" and v.shape[0] == 0)]
    grads = torch.autograd.grad(y, [leaves[k] for k in names], gy)
    return y, dict(zip(names, grads))


def check(inputs, dtype, scaling=0.75, p=0.0, seed=3):
    y, g = run(inputs, dtype, scaling, p, seed, ntk_kernels.linchain_linear)
    y64, g64 = run(inputs, torch.float64, scaling, p, seed, linchain_ref)
    low = dtype in (torch.float16, torch.bfloat16)
    yl, gl = run(inputs, dtype, scaling, p, seed, linchain_ref) if low else (None, {})
    assert y.dtype == dtype
    assert_close(y, y64, dtype, yl, "y")
    for k in g64:
        assert g[k].dtype == dtype, k
        assert_close(g[k], g64[k], dtype, gl.get(k), f"grad {k}")


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("r", [1, 5, 16, 64])
def test_chain_lengths_and_ranks(backend, k, r):
    check(make_inputs((9,), 37, 23, r, k, torch.float64, device=backend[1], seed=k * 100 + r), torch.float32)


@pytest.mark.parametrize("lead,bias,noncontig,p", [
    ((7,), True, False, 0.0), ((3, 5), False, False, 0.0), ((3, 5), True, True, 0.0), ((1,), True, False, 0.0),
    ((4, 1, 3), True, False, 0.25), ((11,), False, True, 0.5), ((2, 13), True, False, 0.1)])
def test_shapes_bias_dropout(backend, lead, bias, noncontig, p):
    inputs = make_inputs(lead, 19, 29, 4, 2, torch.float64, device=backend[1], bias=bias, noncontig=noncontig)
    assert inputs["x"].is_contiguous() != noncontig
    check(inputs, torch.float32, p=p)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dtypes(backend, dtype, p):
    if dtype == torch.float64 and backend[0] == "triton":
        pytest.skip("triton does not take float64")
    check(make_inputs((6, 5), 31, 17, 8, 2, torch.float64, device=backend[1], seed=7), dtype, p=p)


def test_only_some_inputs_require_grad(backend):
    inp = make_inputs((10,), 12, 9, 3, 2, torch.float32, device=backend[1])
    x = inp["x"].float()
    w, b = inp["weight"].float(), inp["bias"].float()  # frozen base, as in fine-tuning
    a, c, bb = (inp[k].float().requires_grad_() for k in ("lora_A", "chain", "lora_B"))
    y = ntk_kernels.linchain_linear(x, w, b, a, c, bb, 2.0)
    ga, gc, gb = torch.autograd.grad(y.square().sum(), [a, c, bb])
    a2, c2, b2 = (t.detach().double().requires_grad_() for t in (a, c, bb))
    y2 = linchain_ref(x.double(), w.double(), b.double(), a2, c2, b2, 2.0)
    ra, rc, rb = torch.autograd.grad(y2.square().sum(), [a2, c2, b2])
    for got, ref, n in ((ga, ra, "lora_A"), (gc, rc, "chain"), (gb, rb, "lora_B")):
        assert_close(got, ref, torch.float32, name=n)


def test_chain_as_sequence_equals_tensor(backend):
    inp = make_inputs((5,), 8, 6, 3, 3, torch.float32, device=backend[1])
    args = [inp[k].float() for k in ("x", "weight", "bias", "lora_A")]
    y_t = ntk_kernels.linchain_linear(*args, inp["chain"].float(), inp["lora_B"].float(), 0.5)
    y_s = ntk_kernels.linchain_linear(*args, list(inp["chain"].float().unbind(0)), inp["lora_B"].float(), 0.5)
    torch.testing.assert_close(y_t, y_s, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- dropout
def test_hash_matches_known_values():
    # values of fmix32-based H(seed=12345, row, col) computed independently by the C++ header (csrc/common)
    h = _hash_dropout.hash_uint32(12345, torch.tensor([0, 1, 7, 100000]), torch.tensor([0, 3, 5, 9999]))
    assert h.tolist() == [1667532479, 320148209, 4038499764, 152797951]


def test_dropout_mask_rate_and_seed():
    m1 = dropout_keep_mask(5, 200, 300, 0.3)
    assert abs(m1.float().mean().item() - 0.7) < 0.01  # 60k Bernoulli(0.7): std 0.0019
    assert torch.equal(m1, dropout_keep_mask(5, 200, 300, 0.3))
    assert (m1 != dropout_keep_mask(6, 200, 300, 0.3)).float().mean() > 0.3
    assert dropout_keep_mask(5, 4, 4, 0.0).all()


def test_dropout_same_mask_forward_and_backward(backend):
    """With x = 1 and a rank-1 adapter of ones, gx's adapter part and u both read the mask."""
    n, d = 6, 10
    x = torch.ones(n, d, requires_grad=True)
    w = torch.zeros(3, d)
    a = torch.ones(1, d, requires_grad=True)
    bb = torch.ones(3, 1)
    y = ntk_kernels.linchain_linear(x, w, None, a, None, bb, 1.0, 0.5, training=True, seed=11)
    keep = dropout_keep_mask(11, n, d, 0.5).float()
    torch.testing.assert_close(y[:, 0], keep.sum(1) * 2.0)        # forward used this mask
    gx, ga = torch.autograd.grad(y.sum(), [x, a])
    torch.testing.assert_close(gx, keep * 2.0 * 3.0)               # backward regenerated the same one
    torch.testing.assert_close(ga[0], keep.sum(0) * 2.0 * 3.0)


def test_dropout_reproducible_with_manual_seed(backend):
    inp = make_inputs((8,), 16, 12, 4, 1, torch.float32, device=backend[1])
    args = [inp[k].float() for k in ("x", "weight", "bias", "lora_A", "chain", "lora_B")]
    torch.manual_seed(0)
    y1 = ntk_kernels.linchain_linear(*args, 1.0, 0.4, training=True)
    torch.manual_seed(0)
    y2 = ntk_kernels.linchain_linear(*args, 1.0, 0.4, training=True)
    y3 = ntk_kernels.linchain_linear(*args, 1.0, 0.4, training=True)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.equal(y1, y3)
    # eval mode: no dropout whatever p is
    torch.testing.assert_close(ntk_kernels.linchain_linear(*args, 1.0, 0.4, training=False),
                               ntk_kernels.linchain_linear(*args, 1.0, 0.0), rtol=0, atol=0)


def test_backends_agree_exactly_on_mask():
    """C++ and the reference draw the same mask: their outputs agree to fp64 rounding under dropout."""
    if not _available("cpu"):
        pytest.skip("C++ extension not built")
    inp = make_inputs((17,), 33, 21, 5, 2, torch.float64, seed=4)
    args = [inp[k] for k in ("x", "weight", "bias", "lora_A", "chain", "lora_B")]
    ys = {}
    for b in ("cpu", "reference"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NTK_KERNELS_BACKEND_LINCHAIN", b)
            ys[b] = ntk_kernels.linchain_linear(*args, 1.3, 0.35, training=True, seed=99)
    torch.testing.assert_close(ys["cpu"], ys["reference"], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- registration
def _op_args(dtype=torch.float32, chain=True, bias=True, p=0.0, requires_grad=True):
    inp = make_inputs((7,), 9, 5, 3, 2, dtype)
    t = {k: (v.to(dtype).requires_grad_(requires_grad) if v is not None else None) for k, v in inp.items()}
    m = ntk_kernels.ops.fold_chain(t["chain"]).detach().requires_grad_(requires_grad) if chain else None
    return (t["x"], t["weight"], t["bias"] if bias else None, t["lora_A"], m, t["lora_B"], 0.5, p,
            torch.tensor(7, dtype=torch.int64))


@pytest.mark.parametrize("chain,bias,p", [(True, True, 0.0), (False, False, 0.3), (True, False, 0.2)])
def test_opcheck(backend, chain, bias, p):
    if backend[1] != "cpu":
        pytest.skip("opcheck on cpu inputs")
    torch.library.opcheck(torch.ops.ntk.linchain.default, _op_args(chain=chain, bias=bias, p=p))
    args = _op_args(chain=chain, bias=bias, p=p, requires_grad=False)
    x, w, b, a, m, bb, s, pp, seed = args
    y, u = torch.ops.ntk.linchain(*args)
    gy = torch.randn_like(y)
    bwd_args = (gy, x, w, a, m, bb, u, s, pp, seed, [True, True, bias, True, chain, True])
    torch.library.opcheck(torch.ops.ntk.linchain_backward.default, bwd_args)


def test_compile_fullgraph_matches_eager():
    from ntk_kernels.nn import LinChainLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(LinChainLinear(16, 24, 4, chain_length=2, chain_init="kaiming"), torch.nn.GELU(),
                                LinChainLinear(24, 8, 2, chain_length=0, alpha=4.0))
    for layer in (model[0], model[2]):
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(model, fullgraph=True)
    y_e, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    g_e = torch.autograd.grad(y_e.square().sum(), [p for p in model.parameters() if p.requires_grad])
    g_c = torch.autograd.grad(compiled(x).square().sum(), [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_with_dropout_in_training():
    from ntk_kernels.nn import LinChainLinear

    layer = LinChainLinear(12, 10, 3, chain_length=1, dropout=0.3).train()
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(torch.randn(4, 12))
    y.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_chain.grad is not None


def test_build_info_reports_backend():
    info = ntk_kernels.build_info()
    assert info["backends"]["linchain"]["cpu"] in ("cpu", "reference")
    assert set(info["extensions"]) >= {"_C", "_C_cuda"}
    if info["extensions"]["_C"]["loaded"] == "yes":
        assert info["backends"]["linchain"]["cpu"] == "cpu"


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    monkeypatch.setenv("NTK_KERNELS_BACKEND_LINCHAIN", "cuda")
    inp = make_inputs((3,), 4, 5, 2, 0, torch.float32)
    with pytest.raises(RuntimeError, match="cuda:.*reference: ok"):
        ntk_kernels.linchain_linear(*[inp[k].float() for k in ("x", "weight", "bias", "lora_A", "chain", "lora_B")], 1.0)


# ---------------------------------------------------------------------------------------------- bad input
def _good():
    inp = make_inputs((4,), 6, 5, 3, 2, torch.float32)
    return {k: v.float() for k, v in inp.items()}


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(4, 7)), ValueError, "x has last dimension 7"),
    (dict(x=torch.randn(0, 6)), ValueError, "empty batch"),
    (dict(weight=torch.randn(5, 6, 1)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(4)), ValueError, "bias must have shape"),
    (dict(lora_A=torch.randn(3, 5)), ValueError, "lora_A must have shape"),
    (dict(lora_B=torch.randn(5, 4)), ValueError, "lora_B must have shape"),
    (dict(chain=torch.randn(2, 3, 4)), ValueError, "chain must be square"),
    (dict(chain=torch.randn(2, 4, 4)), ValueError, "to match the rank"),
    (dict(chain=[torch.randn(3, 3), torch.randn(2, 3)]), ValueError, r"chain\[1\] must be square"),
    (dict(chain=torch.randn(3, 3)), ValueError, "chain must have shape"),
    (dict(chain=5), TypeError, "chain must be"),
    (dict(lora_B=torch.randn(5, 3, dtype=torch.float64)), TypeError, "lora_B has dtype"),
    (dict(x=torch.randint(0, 3, (4, 6))), TypeError, "lora|x"),
    (dict(x=torch.randn(4, 6).numpy()), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(4, 6, device="meta")), ValueError, "is on"),
])
def test_bad_input(change, exc, match):
    kw = _good()
    kw.update(change)
    with pytest.raises(exc, match=match):
        ntk_kernels.linchain_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_A"], kw["chain"], kw["lora_B"], 1.0)


@pytest.mark.parametrize("scaling,p", [(float("nan"), 0.0), ("1", 0.0), (1.0, 1.0), (1.0, -0.1)])
def test_bad_scalars(scaling, p):
    kw = _good()
    with pytest.raises((TypeError, ValueError), match="scaling|dropout_p"):
        ntk_kernels.linchain_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_A"], kw["chain"], kw["lora_B"],
                                    scaling, p, training=True)


def test_cpp_kernel_checks_shapes():
    if not _available("cpu"):
        pytest.skip("C++ extension not built")
    x, w, a, bb = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="lora_B must be"):
        torch.ops.ntk_cpu.linchain_fwd(x, w, None, a, None, bb, 1.0, 0.0, 0)


def test_autocast_cpu_forward_and_backward():
    """Under autocast the op runs in the autocast dtype (as F.linear) and its backward works inside the region."""
    inp = make_inputs((6,), 16, 12, 4, 2, torch.float32, seed=2)
    t = {k: v.float().requires_grad_() for k, v in inp.items()}
    args = [t[k] for k in ("x", "weight", "bias", "lora_A", "chain", "lora_B")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ntk_kernels.linchain_linear(*args, 0.5)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == torch.float32 for a in args)
    ref = linchain_ref(*[a.detach().double() for a in args], 0.5)
    yl = linchain_ref(*[a.detach().bfloat16() for a in args], 0.5)
    assert_close(y, ref, torch.bfloat16, yl)


def test_reference_accepts_no_chain():
    inp = make_inputs((3,), 5, 4, 2, 0, torch.float64)
    a = [inp[k] for k in ("x", "weight", "bias", "lora_A")]
    torch.testing.assert_close(linchain_ref(*a, None, inp["lora_B"], 1.0), linchain_ref(*a, [], inp["lora_B"], 1.0))


# ---------------------------------------------------------------------------------------------- properties
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), d_in=st.integers(1, 17), d_out=st.integers(1, 13),
       r=st.integers(1, 9), k=st.integers(0, 3), bias=st.booleans(), p=st.sampled_from([0.0, 0.3]),
       noncontig=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_any_shape_matches_reference(lead, d_in, d_out, r, k, bias, p, noncontig, seed):
    """The default backend against the float64 reference on shapes hypothesis picks (fp32 values and grads)."""
    inputs = make_inputs(tuple(lead), d_in, d_out, r, k, torch.float64, bias=bias, seed=seed % 1000,
                         noncontig=noncontig and len(lead) > 1)
    check(inputs, torch.float32, p=p, seed=seed)
