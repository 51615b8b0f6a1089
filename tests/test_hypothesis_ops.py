"""Property tests of the public ops against their references over drawn shapes, dtypes and strides (hypothesis).

Each test draws small shapes, a dtype (fp32 / fp64; bf16 in separate tests with tiny shapes) and memory layouts
(contiguous, transposed, strided slices, storage offsets), then compares the public function, on whatever backend
it dispatches to here, against an independent float64 reference, values and gradients:
  linchain_linear   linchain_ref (plain F.linear chain, materialised dropout, autograd for the gradients)
  gram_contract     gram_contract_ref (the T x S Grams by einsum), features and token ids, every mode
  linear_jvp        an einsum written here (y = x Wᵀ + b, ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ), autograd for the gradients
  layer_norm_jvp    torch.func.jvp of F.layer_norm / F.rms_norm (values); gradients: autograd through the
                    closed-form tangent written here, itself checked against torch.func.jvp
  empirical_ntk     empirical_ntk_reference (torch.func jacrev + vmap) on a tiny random MLP, every mode / strategy
  per_sample_jvp    torch.func.jvp per sample
Tolerances: tests/_compare.py (for fp32 / bf16 the error may be twice that of the reference run in that dtype plus
a floor).  Tensor values come from a torch generator seeded by a drawn integer: hypothesis explores shapes,
layouts and options, and ``derandomize=True`` makes every run draw the same examples.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ntk_kernels
from ntk_kernels import ops
from ntk_kernels.ntk import empirical_ntk, empirical_ntk_reference
from _compare import assert_close

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TINY = settings(SETTINGS, max_examples=6)  # bf16: matmuls in bf16 are slow on this CPU

DTYPES = st.sampled_from([torch.float32, torch.float64])
LAYOUTS = ("contiguous", "transposed", "sliced", "offset")
seeds = st.integers(0, 2 ** 31 - 1)


def make(shape, dtype, layout: str, gen: torch.Generator, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """A tensor of ``shape`` (values from ``gen``) laid out as ``layout``: contiguous; transposed (last two dims
    swapped in memory); sliced (every other element of a twice-as-long last dim); offset (a view at storage
    offset 1)."""
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64)
        base = (base * scale + offset).to(dtype)
        return base.transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        return (base * scale + offset).to(dtype)[..., ::2]
    n = 1
    for s in shape:
        n *= s
    if layout == "offset":
        base = torch.randn(n + 1, generator=gen, dtype=torch.float64)
        return (base * scale + offset).to(dtype)[1:].view(shape)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def ids_tensor(shape, vocab: int, layout: str, gen: torch.Generator, dtype) -> torch.Tensor:
    """Integer token ids in [0, vocab) (small vocab: repeats, so the equality mask has off-diagonal ones)."""
    if layout == "sliced":
        return torch.randint(0, vocab, (*shape[:-1], 2 * shape[-1]), generator=gen).to(dtype)[..., ::2]
    if layout == "transposed" and len(shape) == 2:
        return torch.randint(0, vocab, shape[::-1], generator=gen).to(dtype).t()
    return torch.randint(0, vocab, shape, generator=gen).to(dtype)


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def as64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in ts]


def grads(out, inputs, cotangent):
    """Gradients of Σ ⟨out_k, cotangent_k⟩ for each input (None for absent inputs); outputs that do not depend on
    any input (a zero tangent) contribute nothing."""
    if isinstance(out, (list, tuple)):
        pairs = [(o, c) for o, c in zip(out, cotangent) if o.requires_grad]
        out, cotangent = [o for o, _ in pairs], [c for _, c in pairs]
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, present, cotangent, allow_unused=True)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def check_grads(got, want, dtype, names, want_lowp=None):
    for i, (g, w, name) in enumerate(zip(got, want, names)):
        if w is None:
            continue
        assert g is not None, f"no gradient for {name}"
        assert_close(g, w, dtype, None if want_lowp is None else want_lowp[i], name=f"grad {name}")


# ====================================================================================================== linchain
@st.composite
def linchain_case(draw, dtype_st=DTYPES, max_dim=9, max_rows=4):
    return dict(
        dtype=draw(dtype_st), seed=draw(seeds),
        lead=draw(st.lists(st.integers(1, max_rows), min_size=1, max_size=3)),
        d_in=draw(st.integers(1, max_dim)), d_out=draw(st.integers(1, max_dim)), r=draw(st.integers(1, 4)),
        k=draw(st.integers(0, 3)), chain_as=draw(st.sampled_from(["tensor", "list"])), bias=draw(st.booleans()),
        scaling=draw(st.floats(-2.0, 2.0, allow_nan=False, allow_subnormal=False)),
        p=draw(st.sampled_from([0.0, 0.3])), training=draw(st.booleans()), drop_seed=draw(seeds),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4)))


def _linchain_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, lx, lw, la, lb = c["dtype"], *c["layouts"]
    x = make((*c["lead"], c["d_in"]), dt, lx, g)
    w = make((c["d_out"], c["d_in"]), dt, lw, g, scale=c["d_in"] ** -0.5)
    b = make((c["d_out"],), dt, "contiguous", g) if c["bias"] else None
    A = make((c["r"], c["d_in"]), dt, la, g, scale=c["d_in"] ** -0.5)
    B = make((c["d_out"], c["r"]), dt, lb, g, scale=c["r"] ** -0.5)
    chain = make((c["k"], c["r"], c["r"]), dt, "contiguous", g, scale=c["r"] ** -0.5)
    gy = make((*c["lead"], c["d_out"]), dt, "contiguous", g)
    return x, w, b, A, chain, B, gy


def _run_linchain(c, x, w, b, A, chain, B, gy, fn):
    """y and the gradients of every input for ⟨y, gy⟩; ``fn`` the public op or the reference."""
    x, w, b, A, chain, B = leaves(x, w, b, A, chain, B)
    chain_arg = chain if c["chain_as"] == "tensor" else list(chain.unbind(0))
    if c["chain_as"] == "list":
        for t in chain_arg:
            t.retain_grad()
    p = c["p"] if c["training"] else 0.0
    if fn is ops.linchain_ref:
        y = ops.linchain_ref(x, w, b, A, chain_arg, B, c["scaling"], p, c["drop_seed"])
    else:
        y = ntk_kernels.linchain_linear(x, w, b, A, chain_arg, B, c["scaling"], c["p"], c["training"],
                                        seed=c["drop_seed"])
    gs = grads(y, [x, w, b, A, chain, B], gy.to(y.dtype))
    return y.detach(), gs


NAMES = ["x", "weight", "bias", "lora_A", "chain", "lora_B"]


@SETTINGS
@given(linchain_case())
def test_linchain_linear_matches_reference(c):
    x, w, b, A, chain, B, gy = _linchain_inputs(c)
    y, g = _run_linchain(c, x, w, b, A, chain, B, gy, ntk_kernels.linchain_linear)
    y64, g64 = _run_linchain(c, *[None if t is None else t.double() for t in (x, w, b, A, chain, B, gy)],
                             fn=ops.linchain_ref)
    y_lo, g_lo = _run_linchain(c, x, w, b, A, chain, B, gy, ops.linchain_ref)
    assert y.dtype == c["dtype"] and y.shape == (*c["lead"], c["d_out"])
    assert_close(y, y64, c["dtype"], y_lo, name="y")
    check_grads(g, g64, c["dtype"], NAMES, g_lo)


@TINY
@given(linchain_case(dtype_st=st.just(torch.bfloat16), max_dim=4, max_rows=3))
def test_linchain_linear_bf16_matches_reference(c):
    x, w, b, A, chain, B, gy = _linchain_inputs(c)
    y, g = _run_linchain(c, x, w, b, A, chain, B, gy, ntk_kernels.linchain_linear)
    y64, g64 = _run_linchain(c, *[None if t is None else t.double() for t in (x, w, b, A, chain, B, gy)],
                             fn=ops.linchain_ref)
    y_lo, g_lo = _run_linchain(c, x, w, b, A, chain, B, gy, ops.linchain_ref)  # the reference in bf16
    assert y.dtype == torch.bfloat16
    assert_close(y, y64, torch.bfloat16, y_lo, name="y")
    check_grads(g, g64, torch.bfloat16, NAMES, g_lo)


# ====================================================================================================== gram
@st.composite
def gram_case(draw, dtype_st=DTYPES, max_n=4, max_t=6, max_d=6):
    return dict(
        dtype=draw(dtype_st), seed=draw(seeds), I=draw(st.integers(1, max_n)), J=draw(st.integers(1, max_n)),
        C=draw(st.integers(1, 3)), T=draw(st.integers(1, max_t)), S=draw(st.integers(1, max_t)),
        D=draw(st.integers(1, max_d)), E=draw(st.integers(1, max_d)), mode=draw(st.sampled_from(ops.ntk_gram.MODES)),
        ids=draw(st.sampled_from([None, torch.int32, torch.int64])), vocab=draw(st.integers(1, 5)),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4)))


def _gram_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, l1, l2, l3, l4 = c["dtype"], *c["layouts"]
    if c["ids"] is None:
        a1 = make((c["I"], c["T"], c["D"]), dt, l1, g)
        a2 = make((c["J"], c["S"], c["D"]), dt, l2, g)
    else:
        a1 = ids_tensor((c["I"], c["T"]), c["vocab"], l1, g, c["ids"])
        a2 = ids_tensor((c["J"], c["S"]), c["vocab"], l2, g, c["ids"])
    g1 = make((c["I"], c["C"], c["T"], c["E"]), dt, l3, g)
    g2 = make((c["J"], c["C"], c["S"], c["E"]), dt, l4, g)
    return a1, g1, a2, g2


def _f64(t):
    return t if not t.is_floating_point() else t.double()


@SETTINGS
@given(gram_case())
def test_gram_contract_matches_reference(c):
    a1, g1, a2, g2 = _gram_inputs(c)
    out = ops.gram_contract(a1, g1, a2, g2, c["mode"])
    ref = ops.gram_contract_ref(*map(_f64, (a1, g1, a2, g2)), c["mode"])
    assert out.dtype == (torch.float64 if c["dtype"] == torch.float64 else torch.float32)
    assert out.shape == ops.ntk_gram.out_shape(c["I"], c["J"], c["C"], c["mode"])
    assert_close(out, ref, c["dtype"], ops.gram_contract_ref(a1, g1, a2, g2, c["mode"]), name="K")


@TINY
@given(gram_case(dtype_st=st.just(torch.bfloat16), max_n=3, max_t=4, max_d=4))
def test_gram_contract_bf16_matches_reference(c):
    a1, g1, a2, g2 = _gram_inputs(c)
    out = ops.gram_contract(a1, g1, a2, g2, c["mode"])
    ref = ops.gram_contract_ref(*map(_f64, (a1, g1, a2, g2)), c["mode"])
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.bfloat16, ops.gram_contract_ref(a1, g1, a2, g2, c["mode"]), name="K")


# ====================================================================================================== linear_jvp
TANGENT = st.sampled_from(["none", "shared", "per_sample"])


@st.composite
def linear_jvp_case(draw, dtype_st=DTYPES, max_dim=8):
    return dict(
        dtype=draw(dtype_st), seed=draw(seeds), N=draw(st.integers(1, 4)),
        mid=draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)),
        d_in=draw(st.integers(1, max_dim)), d_out=draw(st.integers(1, max_dim)), bias=draw(st.booleans()),
        x_dot=draw(st.booleans()), weight_dot=draw(TANGENT), bias_dot=draw(TANGENT),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=4, max_size=4)))


def _linear_jvp_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, lx, lw, lxd, lwd = c["dtype"], *c["layouts"]
    N, di, do = c["N"], c["d_in"], c["d_out"]
    xs = (N, *c["mid"], di)
    x = make(xs, dt, lx, g)
    w = make((do, di), dt, lw, g, scale=di ** -0.5)
    b = make((do,), dt, "contiguous", g) if c["bias"] else None
    xd = make(xs, dt, lxd, g) if c["x_dot"] else None
    wd = {"none": None, "shared": lambda: make((do, di), dt, lwd, g),
          "per_sample": lambda: make((N, do, di), dt, lwd, g)}[c["weight_dot"]]
    wd = wd() if callable(wd) else wd
    bd = {"none": None, "shared": lambda: make((do,), dt, "contiguous", g),
          "per_sample": lambda: make((N, do), dt, "sliced", g)}[c["bias_dot"]]
    bd = bd() if callable(bd) else bd
    gy, gyd = make((N, *c["mid"], do), dt, "contiguous", g), make((N, *c["mid"], do), dt, "contiguous", g)
    return [x, w, b, xd, wd, bd], gy, gyd


def linear_jvp_formula(x, w, b, xd, wd, bd):
    """y = x Wᵀ + b,  ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ  (Ẇ, ḃ shared or per sample n), by einsum."""
    y = torch.einsum("n...i,oi->n...o", x, w)
    if b is not None:
        y = y + b
    yd = torch.zeros_like(y)
    if xd is not None:
        yd = yd + torch.einsum("n...i,oi->n...o", xd, w)
    if wd is not None:
        per_sample = wd.ndim == 3
        yd = yd + torch.einsum("n...i,noi->n...o" if per_sample else "n...i,oi->n...o", x, wd)
    if bd is not None:
        yd = yd + (bd if bd.ndim == 1 else bd.reshape(bd.shape[0], *[1] * (x.ndim - 2), bd.shape[1]))
    return y, yd


def _linear_run(fn, args, gy, gyd):
    args = leaves(*args)
    y, yd = fn(*args)
    return y.detach(), yd.detach(), grads([y, yd], args, [gy.to(y.dtype), gyd.to(y.dtype)])


LIN_NAMES = ["x", "weight", "bias", "x_dot", "weight_dot", "bias_dot"]


@SETTINGS
@given(linear_jvp_case())
def test_linear_jvp_matches_reference(c):
    args, gy, gyd = _linear_jvp_inputs(c)
    y, yd, g = _linear_run(ops.linear_jvp, args, gy, gyd)
    y64, yd64, g64 = _linear_run(linear_jvp_formula, [None if t is None else t.double() for t in args], gy, gyd)
    y_lo, yd_lo, g_lo = _linear_run(linear_jvp_formula, args, gy, gyd)
    assert y.dtype == yd.dtype == c["dtype"] and y.shape == yd.shape == (c["N"], *c["mid"], c["d_out"])
    assert_close(y, y64, c["dtype"], y_lo, name="y")
    assert_close(yd, yd64, c["dtype"], yd_lo, name="y_dot")
    check_grads(g, g64, c["dtype"], LIN_NAMES, g_lo)


@TINY
@given(linear_jvp_case(dtype_st=st.just(torch.bfloat16), max_dim=4))
def test_linear_jvp_bf16_matches_reference(c):
    args, gy, gyd = _linear_jvp_inputs(c)
    y, yd, _ = _linear_run(ops.linear_jvp, args, gy, gyd)
    y64, yd64, _ = _linear_run(linear_jvp_formula, [None if t is None else t.double() for t in args], gy, gyd)
    y_lo, yd_lo, _ = _linear_run(linear_jvp_formula, args, gy, gyd)
    assert_close(y, y64, torch.bfloat16, y_lo, name="y")
    assert_close(yd, yd64, torch.bfloat16, yd_lo, name="y_dot")


# ====================================================================================================== layer_norm_jvp
@st.composite
def layer_norm_jvp_case(draw, dtype_st=DTYPES, max_d=9):
    rms = draw(st.booleans())
    weight = draw(st.booleans())
    bias = (not rms) and draw(st.booleans())
    return dict(
        dtype=draw(dtype_st), seed=draw(seeds), N=draw(st.integers(1, 4)),
        mid=draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)), D=draw(st.integers(1, max_d)), rms=rms,
        eps=draw(st.sampled_from([1e-5, 1e-2, 0.5])), weight=weight, bias=bias, x_dot=draw(st.booleans()),
        weight_dot=draw(TANGENT) if weight else "none", bias_dot=draw(TANGENT) if bias else "none",
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=2, max_size=2)))


def _ln_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, lx, lxd = c["dtype"], *c["layouts"]
    N, D = c["N"], c["D"]
    xs = (N, *c["mid"], D)
    x = make(xs, dt, lx, g, scale=2.0, offset=0.5)
    w = make((D,), dt, "contiguous", g, scale=0.5, offset=1.0) if c["weight"] else None
    b = make((D,), dt, "sliced", g) if c["bias"] else None
    xd = make(xs, dt, lxd, g) if c["x_dot"] else None
    vec = {"none": lambda: None, "shared": lambda: make((D,), dt, "contiguous", g),
           "per_sample": lambda: make((N, D), dt, "sliced", g)}
    wd, bd = vec[c["weight_dot"]](), vec[c["bias_dot"]]()
    gy, gyd = make(xs, dt, "contiguous", g), make(xs, dt, "contiguous", g)
    return [x, w, b, xd, wd, bd], gy, gyd


def _per_sample(v, x):
    """(D,) stays; (N, D) -> (N, 1, ..., D) to broadcast against x (N, ..., D)."""
    return v if v is None or v.ndim == 1 else v.reshape(v.shape[0], *[1] * (x.ndim - 2), v.shape[1])


def layer_norm_jvp_oracle(c, x, w, b, xd, wd, bd):
    """Values: torch.func.jvp of F.layer_norm / F.rms_norm (no affine) times w plus b, where w and b are
    primals broadcast to the per-sample shape when their tangents are per sample."""
    D, eps = x.shape[-1], c["eps"]
    norm = (lambda t: F.rms_norm(t, (D,), None, eps)) if c["rms"] else (lambda t: F.layer_norm(t, (D,), None, None,
                                                                                              eps))
    ones = torch.ones(D, dtype=x.dtype)
    w_p = ones if w is None else w
    b_p = torch.zeros(D, dtype=x.dtype) if b is None else b
    wd_t = torch.zeros_like(w_p) if wd is None else _per_sample(wd, x)
    bd_t = torch.zeros_like(b_p) if bd is None else _per_sample(bd, x)
    w_p = w_p.expand_as(wd_t).clone() if wd_t.ndim > 1 else w_p
    b_p = b_p.expand_as(bd_t).clone() if bd_t.ndim > 1 else b_p
    xd_t = torch.zeros_like(x) if xd is None else xd
    with torch.no_grad():
        return torch.func.jvp(lambda x_, w_, b_: norm(x_) * w_ + b_, (x, w_p, b_p), (xd_t, wd_t, bd_t))


def layer_norm_jvp_formula(c, x, w, b, xd, wd, bd):
    """The closed form, for the gradients (autograd through it):  LayerNorm x̂ = (x − μ)/σ,
    x̂̇ = (ẋ − mean ẋ − x̂ · mean(ẋ ⊙ x̂))/σ;  RMSNorm x̂ = x/r, x̂̇ = (ẋ − x̂ · mean(ẋ ⊙ x̂))/r;
    y = x̂ ⊙ w + b,  ẏ = x̂̇ ⊙ w + x̂ ⊙ ẇ + ḃ."""
    eps = c["eps"]
    if c["rms"]:
        s = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xh = x / s
    else:
        mu = x.mean(-1, keepdim=True)
        s = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        xh = (x - mu) / s
    y = xh if w is None else xh * w
    y = y if b is None else y + b
    yd = torch.zeros_like(y)
    if xd is not None:
        proj = (xd * xh).mean(-1, keepdim=True)
        xhd = (xd - xh * proj) / s if c["rms"] else (xd - xd.mean(-1, keepdim=True) - xh * proj) / s
        yd = yd + (xhd if w is None else xhd * w)
    if wd is not None:
        yd = yd + xh * _per_sample(wd, x)
    if bd is not None:
        yd = yd + _per_sample(bd, x)
    return y, yd


def _ln_run(c, fn, args, gy, gyd):
    args = leaves(*args)
    if fn is ops.layer_norm_jvp:
        x, w, b, xd, wd, bd = args
        y, yd = ops.layer_norm_jvp(x, w, b, c["eps"], xd, wd, bd, c["rms"])
    else:
        y, yd = fn(c, *args)
    return y.detach(), yd.detach(), grads([y, yd], args, [gy.to(y.dtype), gyd.to(y.dtype)])


@SETTINGS
@given(layer_norm_jvp_case())
def test_layer_norm_jvp_matches_reference(c):
    args, gy, gyd = _ln_inputs(c)
    args64 = [None if t is None else t.double() for t in args]
    y, yd, g = _ln_run(c, ops.layer_norm_jvp, args, gy, gyd)
    y64, yd64 = layer_norm_jvp_oracle(c, *args64)
    y_lo, yd_lo = layer_norm_jvp_oracle(c, *args)
    assert y.dtype == yd.dtype == c["dtype"] and y.shape == yd.shape == args[0].shape
    assert_close(y, y64, c["dtype"], y_lo, name="y")
    assert_close(yd, yd64, c["dtype"], yd_lo, name="y_dot")
    fy64, fyd64, g64 = _ln_run(c, layer_norm_jvp_formula, args64, gy, gyd)
    assert_close(fy64, y64, torch.float64, name="closed-form y vs torch.func.jvp")  # the gradient oracle's values
    assert_close(fyd64, yd64, torch.float64, name="closed-form y_dot vs torch.func.jvp")
    _, _, g_lo = _ln_run(c, layer_norm_jvp_formula, args, gy, gyd)
    check_grads(g, g64, c["dtype"], LIN_NAMES, g_lo)


@TINY
@given(layer_norm_jvp_case(dtype_st=st.just(torch.bfloat16), max_d=6))
def test_layer_norm_jvp_bf16_matches_reference(c):
    args, gy, gyd = _ln_inputs(c)
    y, yd, _ = _ln_run(c, ops.layer_norm_jvp, args, gy, gyd)
    y64, yd64 = layer_norm_jvp_oracle(c, *[None if t is None else t.double() for t in args])
    y_lo, yd_lo = layer_norm_jvp_oracle(c, *args)
    assert_close(y, y64, torch.bfloat16, y_lo, name="y")
    assert_close(yd, yd64, torch.bfloat16, yd_lo, name="y_dot")


# ====================================================================================================== eNTK
@st.composite
def mlp_case(draw):
    dtype = draw(DTYPES)
    return dict(
        dtype=dtype, seed=draw(seeds), d_in=draw(st.integers(1, 5)), hidden=draw(st.integers(1, 6)),
        C=draw(st.integers(1, 3)), depth=draw(st.integers(1, 2)), bias=draw(st.booleans()),
        N1=draw(st.integers(1, 4)), N2=draw(st.one_of(st.none(), st.integers(1, 3))),
        mode=draw(st.sampled_from(["full", "trace", "diagonal"])),
        strategy=draw(st.sampled_from(["auto", "gram", "materialize"])),
        kernel=draw(st.sampled_from(["sgd", "signgd", "asymmetric_signgd"])) if dtype == torch.float64 else "sgd",
        params=draw(st.sampled_from([None, r"^0\.", "weight"])), layout=draw(st.sampled_from(LAYOUTS)))


def tiny_mlp(c) -> torch.nn.Module:
    torch.manual_seed(c["seed"])
    layers, d = [], c["d_in"]
    for _ in range(c["depth"]):
        layers += [torch.nn.Linear(d, c["hidden"], bias=c["bias"]), torch.nn.Tanh()]
        d = c["hidden"]
    layers.append(torch.nn.Linear(d, c["C"], bias=c["bias"]))
    return torch.nn.Sequential(*layers).to(c["dtype"]).eval()


@SETTINGS
@given(mlp_case())
def test_empirical_ntk_matches_reference(c):
    model = tiny_mlp(c)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    x1 = make((c["N1"], c["d_in"]), c["dtype"], c["layout"], g)
    x2 = None if c["N2"] is None else make((c["N2"], c["d_in"]), c["dtype"], "contiguous", g)
    kw = dict(params=c["params"], mode=c["mode"], kernel=c["kernel"])
    K = empirical_ntk(model, x1, x2, strategy=c["strategy"], dtype=c["dtype"], **kw)
    model64 = tiny_mlp(dict(c, dtype=torch.float64))
    K64 = empirical_ntk_reference(model64, x1.double(), None if x2 is None else x2.double(), dtype=torch.float64,
                                  **kw)
    K_lo = empirical_ntk_reference(model, x1, x2, dtype=c["dtype"], **kw)
    n2 = c["N1"] if x2 is None else c["N2"]
    shape = {"full": (c["N1"], n2, c["C"], c["C"]), "trace": (c["N1"], n2), "diagonal": (c["N1"], n2, c["C"])}
    assert K.dtype == c["dtype"] and K.shape == shape[c["mode"]]
    assert_close(K, K64, c["dtype"], K_lo, name="K")


# ====================================================================================================== per_sample_jvp
@SETTINGS
@given(mlp_case(), st.booleans())
def test_per_sample_jvp_matches_torch_func(c, per_sample):
    fn = ntk_kernels.per_sample_jvp
    model = tiny_mlp(c)
    g = torch.Generator().manual_seed(c["seed"] + 2)
    N = c["N1"]
    x = make((N, c["d_in"]), c["dtype"], c["layout"], g)
    chosen = [(n, p) for n, p in model.named_parameters() if c["params"] is None or re.search(c["params"], n)]
    lead = (N,) if per_sample else ()
    tangents = {n: make((*lead, *p.shape), c["dtype"], "contiguous", g) for n, p in chosen}
    f, t = fn(model, x, tangents, params=c["params"])

    def oracle(dtype):
        m = tiny_mlp(dict(c, dtype=dtype))
        params = {n: p.detach() for n, p in m.named_parameters()}
        outs, tans = [], []
        for i in range(N):
            tan = {n: torch.zeros_like(p) for n, p in params.items()}
            tan.update({n: (v[i] if per_sample else v).to(dtype) for n, v in tangents.items()})
            o, td = torch.func.jvp(lambda ps: torch.func.functional_call(m, ps, (x[i:i + 1].to(dtype),)), (params,),
                                   (tan,))
            outs.append(o[0])
            tans.append(td[0])
        return torch.stack(outs), torch.stack(tans)

    f64, t64 = oracle(torch.float64)
    f_lo, t_lo = oracle(c["dtype"])
    assert f.shape == t.shape == (N, c["C"])
    assert_close(f, f64, c["dtype"], f_lo, name="f")
    assert_close(t, t64, c["dtype"], t_lo, name="J v")
