"""The Triton backends of ntk::linear_jvp and ntk::layer_norm_jvp (ops/_jvp_triton.py) against the definitions.

Runs on the CPU under TRITON_INTERPRET=1 (slow: tiny shapes) or on a CUDA device; skips otherwise.  Two oracles:
the references of ops/jvp.py in float64 on the very inputs (rounded to the tested dtype first), and torch.func.jvp
of F.linear / F.layer_norm / F.rms_norm in float64 (vmapped over samples for per-sample tangents), which shares no
code with the references.  Interpreted linear tiles are 16 x 16 x 16, so d_in = 37 spans 3 k-chunks, L = 17 two
row tiles of a sample (per-sample Ẇ); interpreted norms hold rows up to 64 whole and loop chunks of 32 beyond.
"""
import pytest
import torch
import torch.nn.functional as F

from _triton_setup import triton_backend

JT, DEVICE = triton_backend("_jvp_triton")

from ntk_kernels import _backend  # noqa: E402
from ntk_kernels.ops import jvp as J  # noqa: E402
from _compare import assert_close  # noqa: E402

LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("NTK_KERNELS_BACKEND_LINEAR_JVP", "triton")
    monkeypatch.setenv("NTK_KERNELS_BACKEND_LAYER_NORM_JVP", "triton")


def rnd(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def to(ts, dtype):
    return [t.to(DEVICE, dtype) if isinstance(t, torch.Tensor) else t for t in ts]


def f64(ts):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in ts]


def check_pair(out, inputs, ref_fn, name):
    """(y, ẏ) against ref_fn on float64 copies; fp16 / bf16 under the low-precision rule of tests/_compare.py."""
    dtype = inputs[0].dtype
    ref = ref_fn(*f64(inputs))
    low = ref_fn(*inputs) if dtype in LOW else (None, None)
    for o, r, lo, what in zip(out, ref, low, ("y", "y_dot")):
        assert o.dtype == dtype and o.device == inputs[0].device, f"{name} {what}: {o.dtype} on {o.device}"
        assert_close(o, r, dtype, lo, f"{name} {what}")


def check_float32(op, t, oracle):
    """ntk_kernels.ops.<op> on float32 inputs t runs the Triton backend and matches both oracles: the reference
    (<op>_ref) and ``oracle`` (torch.func.jvp), each in float64."""
    out = getattr(J, op)(*t)
    assert _backend.choose(op, DEVICE, torch.float32).backend == "triton"
    check_pair(out, t, getattr(J, f"{op}_ref"), op)
    for o, r, what in zip(out, oracle(*f64(t)), ("y", "y_dot")):
        assert_close(o, r, torch.float32, None, f"{op} {what} vs torch.func.jvp")


# ----------------------------------------------------------------------------------------------
# linear_jvp
# ----------------------------------------------------------------------------------------------
def linear_inputs(N, L, K, O, *, xd=True, wd="shared", bias=True, bd="shared", transposed=False, seed=0):
    """float64 x, W, b, ẋ, Ẇ, ḃ; wd / bd in (None, "shared", "sample"); transposed: W (and a shared Ẇ) as the
    transposed view of a (d_in, d_out) tensor (GPT-2's Conv1D)."""
    g = torch.Generator().manual_seed(seed)
    s = max(K, 1) ** -0.5
    W = rnd(g, K, O, scale=s).t() if transposed else rnd(g, O, K, scale=s)
    wdot = {None: None, "shared": rnd(g, K, O, scale=s).t() if transposed else rnd(g, O, K, scale=s),
            "sample": rnd(g, N, O, K, scale=s)}[wd]
    bdot = {None: None, "shared": rnd(g, O), "sample": rnd(g, N, O)}[bd]
    return [rnd(g, N, L, K), W, rnd(g, O) if bias else None, rnd(g, N, L, K) if xd else None, wdot, bdot]


def linear_oracle(x, W, b, xd, wd, bd):
    """torch.func.jvp of F.linear (vmapped over samples when a tangent is per sample); None tangents are zeros."""
    b0 = torch.zeros(W.shape[0], dtype=x.dtype, device=x.device) if b is None else b
    xd = torch.zeros_like(x) if xd is None else xd
    wd = torch.zeros_like(W) if wd is None else wd
    bd = torch.zeros_like(b0) if bd is None else bd
    if wd.ndim == 2 and bd.ndim == 1:
        return torch.func.jvp(F.linear, (x, W, b0), (xd, wd, bd))
    wd = wd.expand(x.shape[0], *W.shape) if wd.ndim == 2 else wd
    bd = bd.expand(x.shape[0], W.shape[0]) if bd.ndim == 1 else bd
    one = lambda xn, xdn, wdn, bdn: torch.func.jvp(F.linear, (xn, W, b0), (xdn, wdn, bdn))  # noqa: E731
    return torch.func.vmap(one)(x, xd, wd, bd)


# (N, L, d_in, d_out): odd; one element; L over two per-sample row tiles; L = 1 (an MLP layer); a multiple of 16
LINEAR_SHAPES = [(3, 5, 37, 21), (1, 1, 1, 1), (2, 17, 16, 33), (4, 1, 20, 18)]
# (xd, wd, bias, bd, transposed)
LINEAR_COMBOS = [(True, "shared", True, "shared", False), (True, "sample", True, "sample", True),
                 (False, "sample", False, None, False), (True, None, True, "sample", True),
                 (False, None, False, None, False), (False, "shared", True, None, True)]


def _combo_id(c):
    xd, wd, b, bd, t = c
    return f"xd{int(xd)}-wd_{wd}-b{int(b)}-bd_{bd}" + ("-WT" if t else "")


@pytest.mark.parametrize("combo", LINEAR_COMBOS, ids=_combo_id)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "N{}-L{}-din{}-dout{}".format(*s))
def test_linear_float32(shape, combo):
    xd, wd, bias, bd, transposed = combo
    inputs = linear_inputs(*shape, xd=xd, wd=wd, bias=bias, bd=bd, transposed=transposed, seed=sum(shape))
    check_float32("linear_jvp", to(inputs, torch.float32), linear_oracle)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("combo", [LINEAR_COMBOS[0], LINEAR_COMBOS[1]], ids=_combo_id)
def test_linear_low_precision(dtype, combo):
    xd, wd, bias, bd, transposed = combo
    t = to(linear_inputs(2, 9, 40, 19, xd=xd, wd=wd, bias=bias, bd=bd, transposed=transposed, seed=3), dtype)
    check_pair(J.linear_jvp(*t), t, J.linear_jvp_ref, f"linear_jvp {dtype}")


def test_linear_leading_dims_and_strides():
    """x (N, 2, 3, d_in) through the public op, a non-contiguous ẋ, Ẇ and a strided ḃ, and 2-D x (N, d_in)."""
    g = torch.Generator().manual_seed(1)
    x, xd = rnd(g, 4, 2, 3, 19), rnd(g, 4, 3, 2, 19).transpose(1, 2)
    W, b = rnd(g, 11, 19), rnd(g, 11)
    wd, bd = rnd(g, 4, 19, 11).transpose(1, 2), rnd(g, 4, 22)[:, ::2]
    t = to([x, W, b, xd, wd, bd], torch.float32)
    y, yd = J.linear_jvp(*t)
    assert y.shape == yd.shape == (4, 2, 3, 11)
    flat = lambda a: a.reshape(4, 6, a.shape[-1])  # noqa: E731
    ry, ryd = J.linear_jvp_ref(flat(x), W, b, flat(xd.contiguous()), wd, bd)
    assert_close(y, ry.view(4, 2, 3, 11), torch.float32, name="y")
    assert_close(yd, ryd.view(4, 2, 3, 11), torch.float32, name="y_dot")
    t2 = to([x[:, 0, 0], W, None, xd[:, 0, 0], wd, None], torch.float32)
    y2, yd2 = J.linear_jvp(*t2)
    ry2, ryd2 = linear_oracle(*f64(t2))
    assert_close(y2, ry2, torch.float32, name="y (2-D x)")
    assert_close(yd2, ryd2, torch.float32, name="y_dot (2-D x)")


@pytest.mark.parametrize("shape", [(0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 5, 0), (2, 3, 0, 4)],
                         ids=lambda s: "N{}-L{}-din{}-dout{}".format(*s))
def test_linear_empty(shape):
    """Empty outputs, and d_in = 0 (y = b, ẏ = ḃ: the zero-length sum, written by the kernel); the backend function
    and the public op."""
    t = to(linear_inputs(*shape, wd="sample", bd="sample", seed=2), torch.float32)
    check_pair(JT.linear_jvp_triton(*t), t, J.linear_jvp_ref, "linear_jvp (empty)")
    check_pair(J.linear_jvp(*t), t, J.linear_jvp_ref, "linear_jvp (empty, public op)")


def test_linear_gradients_through_triton_forward():
    """The op's backward (autograd through the reference) with the Triton forward."""
    t = [None if a is None else a.requires_grad_() for a in to(linear_inputs(2, 3, 7, 5, wd="sample", seed=4),
                                                              torch.float32)]
    y, yd = J.linear_jvp(*t)
    g = torch.Generator().manual_seed(9)
    gy, gyd = rnd(g, *y.shape).to(DEVICE, torch.float32), rnd(g, *yd.shape).to(DEVICE, torch.float32)
    got = torch.autograd.grad((y, yd), t, (gy, gyd))
    ry, ryd = J.linear_jvp_ref(*t)
    want = torch.autograd.grad((ry, ryd), t, (gy, gyd))
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, torch.float32, name=f"grad of input {i}")


# ----------------------------------------------------------------------------------------------
# layer_norm_jvp
# ----------------------------------------------------------------------------------------------
def norm_inputs(N, L, D, *, rms=False, w=True, b=True, xd=True, wd="shared", bd="shared", seed=0):
    """float64 x, weight, bias, eps, ẋ, ẇ, ḃ, rms (the argument order of the op); x has an offset and a scale so
    that the mean and variance matter."""
    g = torch.Generator().manual_seed(seed)
    b = b and not rms
    x = rnd(g, N, L, D) * 2.0 + 0.7
    vec = lambda kind: {None: None, "shared": rnd(g, D), "sample": rnd(g, N, D)}[kind]  # noqa: E731
    return [x, rnd(g, D) if w else None, rnd(g, D) if b else None, 1e-5, rnd(g, N, L, D) if xd else None,
            vec(wd) if w else None, vec(bd) if b else None, rms]


def norm_oracle(x, w, b, eps, xd, wd, bd, rms):
    """torch.func.jvp of F.layer_norm / F.rms_norm, vmapped over samples for per-sample tangents."""
    D = x.shape[-1]
    xd = torch.zeros_like(x) if xd is None else xd
    primals, tangents = [x], [xd]
    if w is not None:
        primals.append(w)
        tangents.append(torch.zeros_like(w) if wd is None else wd)
    if b is not None:
        primals.append(b)
        tangents.append(torch.zeros_like(b) if bd is None else bd)

    def f(xx, *p):
        ww = p[0] if w is not None else None
        bb = p[1 if w is not None else 0] if b is not None else None
        return F.rms_norm(xx, (D,), ww, eps) if rms else F.layer_norm(xx, (D,), ww, bb, eps)

    if all(t.ndim == 1 for t in tangents[1:]):
        return torch.func.jvp(f, tuple(primals), tuple(tangents))
    tangents = [tangents[0]] + [t.expand(x.shape[0], D) if t.ndim == 1 else t for t in tangents[1:]]
    one = lambda xn, xdn, *pt: torch.func.jvp(f, (xn, *primals[1:]), (xdn, *pt))  # noqa: E731
    return torch.func.vmap(one)(x, *tangents)


# (N, L, D): whole rows of 5 and 64 (4 rows per program), chunked rows (D = 65: 3 chunks, the last of one element;
# D = 100); L = 1; ROWS not dividing M
NORM_SHAPES = [(3, 5, 5), (2, 3, 64), (2, 3, 65), (3, 1, 100), (1, 7, 33)]
# (rms, w, b, xd, wd, bd)
NORM_COMBOS = [(False, True, True, True, "shared", "shared"), (False, True, True, True, "sample", "sample"),
               (True, True, False, True, "sample", None), (True, False, False, True, None, None),
               (False, False, False, True, None, None), (False, True, True, False, "shared", "sample"),
               (True, True, False, False, None, None)]


def _norm_id(c):
    rms, w, b, xd, wd, bd = c
    return ("rms" if rms else "ln") + f"-w{int(w)}-b{int(b)}-xd{int(xd)}-wd_{wd}-bd_{bd}"


@pytest.mark.parametrize("combo", NORM_COMBOS, ids=_norm_id)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "N{}-L{}-D{}".format(*s))
def test_layer_norm_float32(shape, combo):
    rms, w, b, xd, wd, bd = combo
    check_float32("layer_norm_jvp", to(norm_inputs(*shape, rms=rms, w=w, b=b, xd=xd, wd=wd, bd=bd, seed=sum(shape)),
                                       torch.float32), norm_oracle)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("rms,D", [(False, 24), (True, 70), (False, 70)])
def test_layer_norm_low_precision(dtype, rms, D):
    t = to(norm_inputs(2, 5, D, rms=rms, wd="sample", bd="shared", seed=D), dtype)
    check_pair(J.layer_norm_jvp(*t), t, J.layer_norm_jvp_ref, f"layer_norm_jvp {dtype}")


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_layer_norm_whole_row_and_chunks_agree(rms):
    """The same rows through the whole-row kernel and the chunked one (chunks of 16: a partial last chunk)."""
    t = to(norm_inputs(2, 3, 40, rms=rms, wd="sample", bd="sample", seed=6), torch.float32)
    whole = JT.layer_norm_jvp_triton(*t, config=dict(SINGLE=True, BLOCK_D=64, ROWS=2))
    chunks = JT.layer_norm_jvp_triton(*t, config=dict(SINGLE=False, BLOCK_D=16, ROWS=1))
    ref = J.layer_norm_jvp_ref(*f64(t))
    for a, c, r, what in zip(whole, chunks, ref, ("y", "y_dot")):
        assert_close(a, r, torch.float32, name=f"{what} whole rows")
        assert_close(c, r, torch.float32, name=f"{what} chunks")
    with pytest.raises(ValueError, match="BLOCK_D >= D"):
        JT.layer_norm_jvp_triton(*t, config=dict(SINGLE=True, BLOCK_D=32, ROWS=1))


def test_layer_norm_eps_and_constant_rows():
    """A constant row: LayerNorm's x̂ = 0 and ẏ = (ẋ − mean ẋ)/sqrt(eps) ⊙ w (+ ḃ): eps is used, not dropped."""
    t = to(norm_inputs(2, 2, 9, seed=8), torch.float32)
    t[0][0, 1] = 3.0
    t[3] = 0.1
    check_pair(J.layer_norm_jvp(*t), t, J.layer_norm_jvp_ref, "layer_norm_jvp (eps 0.1, a constant row)")


def test_layer_norm_empty():
    for shape in [(0, 3, 5), (2, 0, 5)]:
        t = to(norm_inputs(*shape, seed=1), torch.float32)
        for fn in (JT.layer_norm_jvp_triton, J.layer_norm_jvp):
            y, yd = fn(*t)
            assert y.shape == yd.shape == shape


# ----------------------------------------------------------------------------------------------
# The backend's reasons
# ----------------------------------------------------------------------------------------------
def test_float64_is_refused_with_a_reason():
    for op in ("linear_jvp", "layer_norm_jvp"):
        reasons = _backend.not_supported_reasons(op, DEVICE, torch.float64)["triton"]
        assert any("float64" in r for r in reasons), reasons
        assert not _backend.not_supported_reasons(op, DEVICE, torch.bfloat16)["triton"]
    t = to(linear_inputs(2, 2, 3, 4, seed=0), torch.float64)
    with pytest.raises(RuntimeError, match="forced backend 'triton'"):
        J.linear_jvp(*t)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        JT.linear_jvp_triton(*t)
