"""ntk::linear_jvp and ntk::layer_norm_jvp (C++ CPU backend and the reference) against an independent oracle.

The oracle is torch.func.jvp of F.linear / F.layer_norm / F.rms_norm, one sample at a time, in float64 (absent
tangents as zeros): it shares no code with the kernels or with ``linear_jvp_ref`` / ``layer_norm_jvp_ref``.
For fp16 / bf16 the same oracle run in that dtype sets the error budget (tests/_compare.py).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ntk_kernels import _backend, _ext
from ntk_kernels.ops import jvp as jvp_mod
from ntk_kernels.ops import layer_norm_jvp, linear_jvp
from _compare import assert_close

LIN, LN = "linear_jvp", "layer_norm_jvp"
ROWS_ENV = "NTK_KERNELS_JVP_CPU_ROWS"
NO_AVX2_ENV = "NTK_KERNELS_JVP_CPU_NO_AVX2"
CPU = torch.device("cpu")


def _cpu_available(op):
    return not _backend.not_supported_reasons(op, CPU, torch.float32)["cpu"]


def _skip_unless_cpu(op):
    if not _cpu_available(op):
        pytest.skip(f"cpu backend: {_backend.not_supported_reasons(op, CPU, torch.float32)['cpu']}")


def _rnd(g, dtype, *shape, offset=0.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) + offset).to(dtype)


# ---------------------------------------------------------------------------------------------------- oracles
def linear_oracle(x, weight, bias, x_dot, weight_dot, bias_dot, dtype=torch.float64):
    """Per sample n: torch.func.jvp of F.linear at (x_n, W, b) along (ẋ_n, Ẇ or Ẇ_n, ḃ or ḃ_n), in ``dtype``."""
    c = lambda t: None if t is None else t.to(dtype)
    x, W, b, xd, Wd, bd = map(c, (x, weight, bias, x_dot, weight_dot, bias_dot))
    d_out = W.shape[0]
    ys, yds = [], []
    for n in range(x.shape[0]):
        b_n = torch.zeros(d_out, dtype=dtype) if b is None else b
        tx = torch.zeros_like(x[n]) if xd is None else xd[n]
        tw = torch.zeros_like(W) if Wd is None else (Wd if Wd.ndim == 2 else Wd[n])
        tb = torch.zeros(d_out, dtype=dtype) if bd is None else (bd if bd.ndim == 1 else bd[n])
        y, yd = torch.func.jvp(lambda x_, w_, b_: F.linear(x_, w_, b_), (x[n], W, b_n), (tx, tw, tb))
        ys.append(y)
        yds.append(yd)
    return torch.stack(ys), torch.stack(yds)


def norm_oracle(x, weight, bias, eps, x_dot, weight_dot, bias_dot, rms, dtype=torch.float64):
    """Per sample n: torch.func.jvp of F.layer_norm (or F.rms_norm) over the last dim, in ``dtype``."""
    c = lambda t: None if t is None else t.to(dtype)
    x, w, b, xd, wd, bd = map(c, (x, weight, bias, x_dot, weight_dot, bias_dot))
    D = x.shape[-1]
    ys, yds = [], []
    for n in range(x.shape[0]):
        prim, tang = [x[n]], [torch.zeros_like(x[n]) if xd is None else xd[n]]
        if w is not None:
            prim.append(w)
            tang.append(torch.zeros_like(w) if wd is None else (wd if wd.ndim == 1 else wd[n]))
        if b is not None:
            prim.append(b)
            tang.append(torch.zeros_like(b) if bd is None else (bd if bd.ndim == 1 else bd[n]))

        def f(x_, *p):
            w_ = p[0] if w is not None else None
            b_ = p[-1] if b is not None else None
            return F.rms_norm(x_, (D,), w_, eps) if rms else F.layer_norm(x_, (D,), w_, b_, eps)

        y, yd = torch.func.jvp(f, tuple(prim), tuple(tang))
        ys.append(y)
        yds.append(yd)
    return torch.stack(ys), torch.stack(yds)


# ---------------------------------------------------------------------------------------------------- inputs
def linear_inputs(N, L, d_in, d_out, dtype=torch.float64, xd=True, wd="shared", b=True, bd="shared", seed=0,
                  weight_t=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: _rnd(g, dtype, *s)
    W = r(d_in, d_out).t() if weight_t else r(d_out, d_in)
    per = {None: None, "shared": (), "sample": (N,)}
    return dict(x=r(N, L, d_in), weight=W, bias=r(d_out) if b else None, x_dot=r(N, L, d_in) if xd else None,
                weight_dot=None if wd is None else r(*per[wd], d_out, d_in),
                bias_dot=None if bd is None else r(*per[bd], d_out))


def norm_inputs(N, L, D, dtype=torch.float64, xd=True, w=True, b=True, wd="shared", bd="shared", rms=False,
                seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, offset=0.0: _rnd(g, dtype, *s, offset=offset)
    per = {None: None, "shared": (), "sample": (N,)}
    b = b and not rms
    return dict(x=r(N, L, D, offset=0.7), weight=r(D, offset=1.0) if w else None, bias=r(D) if b else None,
                eps=1e-5, x_dot=r(N, L, D) if xd else None,
                weight_dot=r(*per[wd], D) if (w and wd is not None) else None,
                bias_dot=r(*per[bd], D) if (b and bd is not None) else None, rms=rms)


# ---------------------------------------------------------------------------------------------------- callers
def _caller(op, name, monkeypatch):
    """'cpu' / 'reference': the backend function on (N, L, d) inputs; 'op': the public function, cpu forced."""
    if name in ("cpu", "op"):
        _skip_unless_cpu(op)
    if name == "op":
        monkeypatch.setenv(f"NTK_KERNELS_BACKEND_{op.upper()}", "cpu")
        return linear_jvp if op == LIN else layer_norm_jvp
    return _backend._REGISTRY[op][name].fn


def _call_linear(fn, kw):
    return fn(kw["x"], kw["weight"], kw["bias"], kw["x_dot"], kw["weight_dot"], kw["bias_dot"])


def _call_norm(fn, kw):
    return fn(kw["x"], kw["weight"], kw["bias"], kw["eps"], kw["x_dot"], kw["weight_dot"], kw["bias_dot"], kw["rms"])


def check_linear(fn, kw, dtype):
    y, yd = _call_linear(fn, kw)
    assert y.dtype == dtype and yd.dtype == dtype
    ry, ryd = linear_oracle(**kw)
    lowp = linear_oracle(**kw, dtype=dtype) if dtype in (torch.float16, torch.bfloat16) else (None, None)
    assert_close(y, ry, dtype, lowp[0], "linear_jvp y")
    assert_close(yd, ryd, dtype, lowp[1], "linear_jvp y_dot")


def check_norm(fn, kw, dtype):
    y, yd = _call_norm(fn, kw)
    assert y.dtype == dtype and yd.dtype == dtype
    ry, ryd = norm_oracle(**kw)
    lowp = norm_oracle(**kw, dtype=dtype) if dtype in (torch.float16, torch.bfloat16) else (None, None)
    assert_close(y, ry, dtype, lowp[0], "layer_norm_jvp y")
    assert_close(yd, ryd, dtype, lowp[1], "layer_norm_jvp y_dot")


BACKENDS = ["cpu", "reference", "op"]
TANGENT = [None, "shared", "sample"]
# (N, L, d_in, d_out): 1s, primes, L = 1 and L > 1, d_in < d_out and d_in > d_out
LIN_SHAPES = [(1, 1, 1, 1), (3, 1, 7, 5), (2, 5, 13, 11), (5, 3, 17, 29), (1, 7, 31, 2)]
NORM_SHAPES = [(1, 1, 1), (3, 1, 7), (2, 5, 13), (4, 3, 64), (1, 7, 129)]


# ---------------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xd,wd,b,bd", list(itertools.product([False, True], TANGENT, [False, True], TANGENT)))
def test_linear_every_tangent_combination(monkeypatch, backend, xd, wd, b, bd):
    fn = _caller(LIN, backend, monkeypatch)
    check_linear(fn, linear_inputs(3, 4, 6, 5, xd=xd, wd=wd, b=b, bd=bd, seed=7), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", LIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wd,bd", [("shared", "shared"), ("sample", "sample")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_shapes(monkeypatch, backend, shape, wd, bd, dtype):
    fn = _caller(LIN, backend, monkeypatch)
    check_linear(fn, linear_inputs(*shape, dtype=dtype, wd=wd, bd=bd, seed=sum(shape)), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wd,bd,xd", [("shared", "shared", True), ("sample", "sample", True), ("sample", None, False),
                                      (None, None, True)])
def test_linear_dtypes(monkeypatch, backend, dtype, wd, bd, xd):
    fn = _caller(LIN, backend, monkeypatch)
    check_linear(fn, linear_inputs(3, 5, 19, 12, dtype=dtype, xd=xd, wd=wd, bd=bd, seed=3), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_linear_weight_views(monkeypatch, backend, dtype):
    """GPT-2 Conv1D's weight.t(), transposed / sliced / expanded tangents, non-contiguous x."""
    fn = _caller(LIN, backend, monkeypatch)
    g = torch.Generator().manual_seed(11)
    r = lambda *s: _rnd(g, dtype, *s)
    N, L, d_in, d_out = 3, 4, 9, 7
    x = r(L, N, d_in).transpose(0, 1)
    xd = r(N, d_in, L).transpose(1, 2)
    cases = [
        (r(d_in, d_out).t(), r(d_in, d_out).t()),                                  # both transposed
        (r(d_in, d_out).t(), r(N, d_in, d_out).transpose(1, 2)),                   # per-sample transposed
        (r(d_out, 2 * d_in)[:, ::2], r(d_out, 3 * d_in)[:, 1::3]),                  # no unit stride
        (r(2 * d_out, d_in)[::2], r(d_out, d_in).expand(N, d_out, d_in)),          # stride 0 per sample
        (r(d_in, 2 * d_out).t()[::2], r(N, d_out, 2 * d_in)[:, :, ::2]),
    ]
    for W, Wd in cases:
        kw = dict(x=x if backend == "op" else x.contiguous(), weight=W, bias=r(d_out),
                  x_dot=xd if backend == "op" else xd.contiguous(), weight_dot=Wd, bias_dot=r(N, d_out))
        check_linear(fn, kw, dtype)


def test_linear_cpu_noncontiguous_direct():
    """The backend function itself accepts non-contiguous x / x_dot (the op passes contiguous ones)."""
    _skip_unless_cpu(LIN)
    kw = linear_inputs(3, 4, 9, 7, wd="sample", bd="sample", seed=5)
    kw["x"] = kw["x"].transpose(0, 1).contiguous().transpose(0, 1)
    kw["x_dot"] = kw["x_dot"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not kw["x"].is_contiguous()
    check_linear(_backend._REGISTRY[LIN]["cpu"].fn, kw, torch.float64)


@pytest.mark.parametrize("rows", ["1", "2", "4", "7", "1000"])
@pytest.mark.parametrize("L", [1, 3, 10])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_linear_cpu_forced_blocks(monkeypatch, rows, L, dtype):
    """Block boundaries inside and between samples (per-sample Ẇ, ḃ), low precision through the blocks."""
    _skip_unless_cpu(LIN)
    monkeypatch.setenv(ROWS_ENV, rows)
    fn = _backend._REGISTRY[LIN]["cpu"].fn
    for wd, bd in (("sample", "sample"), ("shared", "shared"), (None, "sample")):
        check_linear(fn, linear_inputs(5, L, 6, 5, dtype=dtype, wd=wd, bd=bd, seed=L), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_cpu_lowp_weight_dot_chunks(dtype):
    """Per-sample Ẇ of ~0.5M elements a sample: fp16 / bf16 Ẇ is converted one sample (chunk) at a time."""
    _skip_unless_cpu(LIN)
    check_linear(_backend._REGISTRY[LIN]["cpu"].fn,
                 linear_inputs(3, 2, 300, 1800, dtype=dtype, wd="sample", bd="sample", seed=8), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wd,bd", [("shared", "shared"), ("sample", "sample")])
def test_linear_cpu_parallel_blocks(monkeypatch, dtype, wd, bd):
    """Large enough for the automatic path to split rows across threads (samples split across blocks)."""
    _skip_unless_cpu(LIN)
    monkeypatch.delenv(ROWS_ENV, raising=False)
    check_linear(_backend._REGISTRY[LIN]["cpu"].fn, linear_inputs(4, 97, 67, 131, dtype=dtype, wd=wd, bd=bd), dtype)


def test_linear_cpu_bad_rows_env(monkeypatch):
    _skip_unless_cpu(LIN)
    monkeypatch.setenv(ROWS_ENV, "many")
    kw = linear_inputs(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="NTK_KERNELS_JVP_CPU_ROWS must be a positive integer"):
        _call_linear(_backend._REGISTRY[LIN]["cpu"].fn, kw)


@pytest.mark.parametrize("backend", ["reference", "op"])
def test_linear_public_shapes(monkeypatch, backend):
    """(N, d_in) and (N, A, B, d_in) inputs through the public function keep their leading dims."""
    if backend == "op":
        _skip_unless_cpu(LIN)
        monkeypatch.setenv("NTK_KERNELS_BACKEND_LINEAR_JVP", "cpu")
    else:
        monkeypatch.setenv("NTK_KERNELS_BACKEND_LINEAR_JVP", "reference")
    g = torch.Generator().manual_seed(2)
    r = lambda *s: _rnd(g, torch.float64, *s)
    for lead in [(4,), (2, 3, 5)]:
        x, xd, W, Wd, b = r(*lead, 6), r(*lead, 6), r(5, 6), r(lead[0], 5, 6), r(5)
        y, yd = linear_jvp(x, W, b, x_dot=xd, weight_dot=Wd)
        ry, ryd = linear_oracle(x.reshape(lead[0], -1, 6), W, b, xd.reshape(lead[0], -1, 6), Wd, None)
        assert y.shape == (*lead, 5) and yd.shape == (*lead, 5)
        assert_close(y.reshape(ry.shape), ry, torch.float64, name="y")
        assert_close(yd.reshape(ryd.shape), ryd, torch.float64, name="y_dot")


# ---------------------------------------------------------------------------------------------------- norms
def _norm_combos():
    out = []
    for rms, xd, w, b, wd, bd in itertools.product([False, True], [False, True], [False, True], [False, True],
                                                   TANGENT, TANGENT):
        if (rms and b) or (not w and wd is not None) or (not b and bd is not None):
            continue
        out.append((rms, xd, w, b, wd, bd))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms,xd,w,b,wd,bd", _norm_combos())
def test_norm_every_tangent_combination(monkeypatch, backend, rms, xd, w, b, wd, bd):
    fn = _caller(LN, backend, monkeypatch)
    check_norm(fn, norm_inputs(3, 4, 11, xd=xd, w=w, b=b, wd=wd, bd=bd, rms=rms, seed=5), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norm_shapes(monkeypatch, backend, shape, rms, dtype):
    fn = _caller(LN, backend, monkeypatch)
    for wd in ("shared", "sample"):
        check_norm(fn, norm_inputs(*shape, dtype=dtype, wd=wd, bd=wd, rms=rms, seed=sum(shape)), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [False, True])
def test_norm_dtypes(monkeypatch, backend, dtype, rms):
    fn = _caller(LN, backend, monkeypatch)
    for wd, xd in (("shared", True), ("sample", True), (None, True), ("sample", False)):
        check_norm(fn, norm_inputs(3, 5, 37, dtype=dtype, xd=xd, wd=wd, bd=wd, rms=rms, seed=9), dtype)


@pytest.fixture(params=["avx2", "portable"])
def isa(request, monkeypatch):
    """The AVX2 + FMA norm kernels (where the CPU has them) and the baseline x86-64 ones."""
    monkeypatch.setenv(NO_AVX2_ENV, "1" if request.param == "portable" else "0")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [False, True])
def test_norm_cpu_isa(isa, dtype, rms):
    _skip_unless_cpu(LN)
    fn = _backend._REGISTRY[LN]["cpu"].fn
    for D, (wd, xd) in zip((37, 8, 3), (("sample", True), ("shared", False), (None, True))):
        check_norm(fn, norm_inputs(3, 2, D, dtype=dtype, xd=xd, wd=wd, bd=wd, rms=rms, seed=D), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
def test_norm_cpu_parallel_rows(isa, dtype, rms):
    """Enough rows for the parallel loop (rows split across threads)."""
    _skip_unless_cpu(LN)
    kw = norm_inputs(4, 130, 129, dtype=dtype, wd="sample", bd="sample", rms=rms)
    check_norm(_backend._REGISTRY[LN]["cpu"].fn, kw, dtype)


def test_norm_public_shapes(monkeypatch):
    _skip_unless_cpu(LN)
    monkeypatch.setenv("NTK_KERNELS_BACKEND_LAYER_NORM_JVP", "cpu")
    g = torch.Generator().manual_seed(4)
    r = lambda *s: _rnd(g, torch.float64, *s)
    for lead in [(4,), (2, 3, 5)]:
        x, xd, w, b, wd = r(*lead, 6), r(*lead, 6), r(6), r(6), r(lead[0], 6)
        y, yd = layer_norm_jvp(x, w, b, 1e-5, x_dot=xd, weight_dot=wd)
        ry, ryd = norm_oracle(x.reshape(lead[0], -1, 6), w, b, 1e-5, xd.reshape(lead[0], -1, 6), wd, None, False)
        assert y.shape == x.shape and yd.shape == x.shape
        assert_close(y.reshape(ry.shape), ry, torch.float64, name="y")
        assert_close(yd.reshape(ryd.shape), ryd, torch.float64, name="y_dot")


# ---------------------------------------------------------------------------------------------------- autograd
@pytest.fixture(params=["cpu", "reference"])
def forced(request, monkeypatch):
    for op in (LIN, LN):
        if request.param == "cpu":
            _skip_unless_cpu(op)
        monkeypatch.setenv(f"NTK_KERNELS_BACKEND_{op.upper()}", request.param)
    return request.param


@pytest.mark.parametrize("per_sample", [False, True])
def test_linear_gradcheck(forced, per_sample):
    kw = linear_inputs(2, 3, 4, 3, wd="sample" if per_sample else "shared", bd="sample" if per_sample else "shared",
                       seed=1)
    args = [kw[k].clone().requires_grad_(True) for k in ("x", "weight", "bias", "x_dot", "weight_dot", "bias_dot")]
    assert torch.autograd.gradcheck(lambda *a: linear_jvp(*a), args)
    # with absent tangents and a Conv1D-style transposed weight
    W = torch.randn(4, 3, dtype=torch.float64).t().requires_grad_(True)
    x = args[0].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, w_: linear_jvp(x_, w_, None, None, None, None), [x, W])


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
def test_norm_gradcheck(forced, rms, per_sample):
    kw = norm_inputs(2, 3, 5, wd="sample" if per_sample else "shared", bd="sample" if per_sample else "shared",
                     rms=rms, seed=2)
    names = ["x", "weight", "bias", "x_dot", "weight_dot", "bias_dot"]
    present = [k for k in names if kw[k] is not None]
    leaves = {k: kw[k].clone().requires_grad_(True) for k in present}

    def f(*a):
        d = dict(zip(present, a))
        return layer_norm_jvp(d["x"], d.get("weight"), d.get("bias"), kw["eps"], d.get("x_dot"), d.get("weight_dot"),
                              d.get("bias_dot"), rms=rms)

    assert torch.autograd.gradcheck(f, [leaves[k] for k in present])


def test_opcheck(forced):
    lk = linear_inputs(2, 3, 5, 4, wd="sample", bd="shared", seed=3, weight_t=True)
    largs = tuple(None if lk[k] is None else lk[k].requires_grad_(True)
                  for k in ("x", "weight", "bias", "x_dot", "weight_dot", "bias_dot"))
    torch.library.opcheck(torch.ops.ntk.linear_jvp.default, largs)
    nk = norm_inputs(2, 3, 6, wd="sample", bd="shared", seed=4)
    nargs = tuple(nk[k].requires_grad_(True) if isinstance(nk[k], torch.Tensor) else nk[k]
                  for k in ("x", "weight", "bias", "eps", "x_dot", "weight_dot", "bias_dot", "rms"))
    torch.library.opcheck(torch.ops.ntk.layer_norm_jvp.default, nargs)
    rk = norm_inputs(2, 3, 6, wd="shared", rms=True, seed=5)
    names = ("x", "weight", "bias", "eps", "x_dot", "weight_dot", "bias_dot", "rms")
    torch.library.opcheck(torch.ops.ntk.layer_norm_jvp.default, tuple(rk[k] for k in names))


# ---------------------------------------------------------------------------------------------------- choice, errors
@pytest.mark.parametrize("op", [LIN, LN])
@pytest.mark.parametrize("dtype", jvp_mod.FLOAT_DTYPES)
def test_cpu_backend_chosen_when_built(monkeypatch, op, dtype):
    if not _ext.cpu_loaded():
        pytest.skip(f"extension not built: {_ext.status()['_C']['why']}")
    monkeypatch.delenv("NTK_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv(f"NTK_KERNELS_BACKEND_{op.upper()}", raising=False)
    # a loaded extension without these ops (a stale build) must fail here, not fall back silently
    assert _backend.not_supported_reasons(op, CPU, dtype)["cpu"] == []
    assert _backend.choose(op, CPU, dtype).backend == "cpu"


def test_cpu_refuses_other_dtypes():
    reasons = _backend.not_supported_reasons(LIN, CPU, torch.int64)["cpu"]
    assert any("takes" in r for r in reasons)


def _lin_bad():
    r = lambda *s, dt=torch.float32: torch.randn(*s, dtype=dt)
    N, L, di, do = 3, 2, 4, 5
    base = dict(x=r(N, L, di), weight=r(do, di), bias=r(do), x_dot=r(N, L, di), weight_dot=r(do, di), bias_dot=r(do))
    return base, [
        (dict(x=r(N, L, di + 1)), ValueError, "x's last dim must be weight's d_in=4"),
        (dict(weight=r(do)), ValueError, r"weight must be a \(d_out, d_in\) Tensor"),
        (dict(bias=r(do + 1)), ValueError, r"bias must be \(5,\)"),
        (dict(bias=r(N, do)), ValueError, r"bias must be \(5,\)"),
        (dict(x_dot=r(N, L + 1, di)), ValueError, "x_dot must have x's shape"),
        (dict(weight_dot=r(di, do)), ValueError, r"weight_dot must be \(5, 4\) or \(N=3, 5, 4\)"),
        (dict(weight_dot=r(N + 1, do, di)), ValueError, r"weight_dot must be \(5, 4\) or \(N=3, 5, 4\)"),
        (dict(bias_dot=r(N + 1, do)), ValueError, r"bias_dot must be \(5,\) or \(N=3, 5\)"),
        (dict(weight=r(do, di, dt=torch.float64)), TypeError, "weight must have x's dtype torch.float32"),
        (dict(x_dot=r(N, L, di, dt=torch.bfloat16)), TypeError, "x_dot must have x's dtype"),
        (dict(x=torch.ones(N, L, di, dtype=torch.int64), weight=torch.ones(do, di, dtype=torch.int64), bias=None,
              x_dot=None, weight_dot=None, bias_dot=None), TypeError, "x must have a floating dtype"),
        (dict(x=r(di)), ValueError, r"x must be \(N, \*, features\)"),
    ]


@pytest.mark.parametrize("case", range(len(_lin_bad()[1])))
def test_linear_bad_input(case):
    base, cases = _lin_bad()
    change, err, match = cases[case]
    kw = {**base, **change}
    with pytest.raises(err, match=match):
        linear_jvp(kw["x"], kw["weight"], kw["bias"], kw["x_dot"], kw["weight_dot"], kw["bias_dot"])


def _norm_bad():
    r = lambda *s, dt=torch.float32: torch.randn(*s, dtype=dt)
    N, L, D = 3, 2, 6
    base = dict(x=r(N, L, D), weight=r(D), bias=r(D), eps=1e-5, x_dot=r(N, L, D), weight_dot=r(D), bias_dot=r(D),
                rms=False)
    return base, [
        (dict(weight=r(D + 1)), ValueError, r"weight must be \(6,\)"),
        (dict(weight=r(N, D)), ValueError, r"weight must be \(6,\)"),
        (dict(bias_dot=r(N + 1, D)), ValueError, r"bias_dot must be \(6,\) or \(N=3, 6\)"),
        (dict(weight_dot=r(N, D + 1)), ValueError, r"weight_dot must be \(6,\) or \(N=3, 6\)"),
        (dict(x_dot=r(N, L, D + 1)), ValueError, "x_dot must have x's shape"),
        (dict(weight=None), ValueError, "weight_dot needs weight"),
        (dict(bias=None), ValueError, "bias_dot needs bias"),
        (dict(rms=True), ValueError, "rms=True takes no bias"),
        (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
        (dict(bias=r(D, dt=torch.float16)), TypeError, "bias must have x's dtype"),
    ]


@pytest.mark.parametrize("case", range(len(_norm_bad()[1])))
def test_norm_bad_input(case):
    base, cases = _norm_bad()
    change, err, match = cases[case]
    kw = {**base, **change}
    with pytest.raises(err, match=match):
        _call_norm(layer_norm_jvp, kw)


def test_cpu_direct_errors():
    """The C++ checks, reached by calling torch.ops.ntk_cpu directly (the public functions check first)."""
    _skip_unless_cpu(LIN)
    _skip_unless_cpu(LN)
    r = lambda *s, dt=torch.float32: torch.randn(*s, dtype=dt)
    lin = torch.ops.ntk_cpu.linear_jvp
    with pytest.raises(RuntimeError, match=r"ntk_cpu.linear_jvp: x must be \(N, L, d_in\)"):
        lin(r(3, 4), r(5, 4), None, None, None, None)
    with pytest.raises(RuntimeError, match=r"ntk_cpu.linear_jvp: weight must be \(d_out, d_in=4\)"):
        lin(r(2, 3, 4), r(5, 3), None, None, None, None)
    with pytest.raises(RuntimeError, match=r"ntk_cpu.linear_jvp: weight_dot must be \(d_out=5, d_in=4\) or \(N=2"):
        lin(r(2, 3, 4), r(5, 4), None, None, r(3, 5, 4), None)
    with pytest.raises(RuntimeError, match=r"ntk_cpu.linear_jvp: bias_dot must be"):
        lin(r(2, 3, 4), r(5, 4), None, None, None, r(3, 5))
    with pytest.raises(RuntimeError, match="ntk_cpu.linear_jvp: x_dot must have x's dtype"):
        lin(r(2, 3, 4), r(5, 4), None, r(2, 3, 4, dt=torch.float64), None, None)
    with pytest.raises(RuntimeError, match="ntk_cpu.linear_jvp: x must be float16, bfloat16, float32 or float64"):
        lin(torch.ones(2, 3, 4, dtype=torch.int32), torch.ones(5, 4, dtype=torch.int32), None, None, None, None)
    ln = torch.ops.ntk_cpu.layer_norm_jvp
    with pytest.raises(RuntimeError, match=r"ntk_cpu.layer_norm_jvp: weight must be \(D=4,\)"):
        ln(r(2, 3, 4), r(5), None, 1e-5, None, None, None, False)
    with pytest.raises(RuntimeError, match="ntk_cpu.layer_norm_jvp: rms=True takes no bias"):
        ln(r(2, 3, 4), r(4), r(4), 1e-5, None, None, None, True)
    with pytest.raises(RuntimeError, match="ntk_cpu.layer_norm_jvp: eps must be a finite number >= 0"):
        ln(r(2, 3, 4), None, None, -1.0, None, None, None, False)
    with pytest.raises(RuntimeError, match="ntk_cpu.layer_norm_jvp: weight_dot needs weight"):
        ln(r(2, 3, 4), None, None, 1e-5, None, r(4), None, False)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_sizes(monkeypatch, backend):
    fn_l = _caller(LIN, backend, monkeypatch)
    fn_n = _caller(LN, backend, monkeypatch)
    for N, L, di, do in [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)]:
        kw = linear_inputs(N, L, di, do, wd="sample", bd="sample")
        y, yd = _call_linear(fn_l, kw)
        ry, ryd = linear_oracle(**kw) if N else (torch.zeros(0, L, do),) * 2
        assert y.shape == (N, L, do) and yd.shape == (N, L, do)
        assert torch.allclose(y.double(), ry.double()) and torch.allclose(yd.double(), ryd.double())
    for N, L, D in [(0, 3, 4), (2, 0, 4)]:
        y, yd = _call_norm(fn_n, norm_inputs(N, L, D))
        assert y.shape == (N, L, D) and yd.shape == (N, L, D)


def test_empty_batch_public(monkeypatch):
    """N = 0 through the public functions (their (N, L, d) flattening cannot infer L from an empty batch)."""
    for backend in ("cpu", "reference"):
        if backend == "cpu" and not (_cpu_available(LIN) and _cpu_available(LN)):
            continue
        monkeypatch.setenv("NTK_KERNELS_BACKEND", backend)
        x, W = torch.randn(0, 3, 4), torch.randn(5, 4)
        y, yd = linear_jvp(x, W, x_dot=torch.randn(0, 3, 4), weight_dot=torch.randn(0, 5, 4))
        assert y.shape == (0, 3, 5) and yd.shape == (0, 3, 5)
        y, yd = layer_norm_jvp(x, torch.randn(4), None, 1e-5, x_dot=x)
        assert y.shape == (0, 3, 4) and yd.shape == (0, 3, 4)
