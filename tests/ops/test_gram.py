"""ntk::gram_contract against an independent float64 oracle on the CPU backends (Triton: test_gram_triton.py).

The oracle forms each per-sample gradient W_{i,c} = G_{i,c}ᵀ A_i (E x D; token ids as one-hot rows over the
ids present) one sample at a time and takes their dot products: no token Gram, nothing shared with the kernels.
"""
import pytest
import torch

from ntk_kernels import _backend
from ntk_kernels.ops import gram_contract, gram_contract_ref
from ntk_kernels.ops.ntk_gram import MODES
from _compare import assert_close

LOW = (torch.float16, torch.bfloat16)
PATH_ENV = "NTK_KERNELS_GRAM_CPU_PATH"
NO_AVX2_ENV = "NTK_KERNELS_GRAM_CPU_NO_AVX2"


def _available(backend):
    return not _backend.not_supported_reasons("gram", torch.device("cpu"), torch.float32)[backend]


def oracle(a1, g1, a2, g2, mode):
    """K from explicit per-sample gradients in float64."""
    g1, g2 = g1.double(), g2.double()
    if a1.dtype in (torch.int32, torch.int64):
        vocab = torch.unique(torch.cat([a1.reshape(-1), a2.reshape(-1)]).long())
        a1 = (a1.long()[..., None] == vocab).double()  # (N, T, V) one-hot rows
        a2 = (a2.long()[..., None] == vocab).double()
    a1, a2 = a1.double(), a2.double()
    W1 = torch.stack([g1[i].transpose(1, 2) @ a1[i] for i in range(g1.shape[0])]) if g1.shape[0] else \
        g1.new_zeros(0, g1.shape[1], g1.shape[3], a1.shape[2])
    W2 = torch.stack([g2[j].transpose(1, 2) @ a2[j] for j in range(g2.shape[0])]) if g2.shape[0] else \
        g2.new_zeros(0, g2.shape[1], g2.shape[3], a2.shape[2])
    I, C, J, ED = W1.shape[0], W1.shape[1], W2.shape[0], W1.shape[2] * W1.shape[3]
    K = (W1.reshape(I * C, ED) @ W2.reshape(J * C, ED).T).reshape(I, C, J, C).permute(0, 2, 1, 3)
    if mode == "full":
        return K
    diag = K.diagonal(dim1=2, dim2=3)
    return diag if mode == "diagonal" else diag.sum(-1)


def make(I, J, T, S, D, E, C, dtype=torch.float64, ids=None, vocab=5, seed=0):
    """Random inputs (float64 values rounded through ``dtype``); ids: None (features), torch.int64 or torch.int32."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    if ids is None:
        a1, a2 = rnd(I, T, D), rnd(J, S, D)
    else:  # small vocabulary: repeated ids inside and across samples; negative and large values too
        table = torch.tensor([-3, 0, 7, 2**40, 11, 5, 1, 9][:vocab]) if ids == torch.int64 else \
            torch.tensor([-3, 0, 7, 2**30, 11, 5, 1, 9][:vocab])
        a1 = table[torch.randint(0, vocab, (I, T), generator=g)].to(ids)
        a2 = table[torch.randint(0, vocab, (J, S), generator=g)].to(ids)
    return a1, rnd(I, C, T, E), a2, rnd(J, C, S, E)


def backend_fn(name):
    if name == "op":
        return gram_contract
    return _backend._REGISTRY["gram"][name].fn


def check(fn, inputs, mode, dtype):
    a1, g1, a2, g2 = inputs
    out = fn(a1, g1, a2, g2, mode)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = oracle(a1, g1, a2, g2, mode)
    # the reference in the low dtype (computed in fp32) sets the budget for rounding of long sums
    lowp = gram_contract_ref(a1, g1, a2, g2, mode) if dtype != torch.float64 else None
    assert_close(out, ref, dtype, lowp, f"gram {mode}")


BACKENDS = ["cpu", "reference", "op"]
# (I, J, T, S, D, E, C): T != S both ways, T = S = 1, T = 1 < S, E = 1, C = 1, I != J, D odd / 1, I or J = 1
SHAPES = [(3, 4, 5, 7, 6, 3, 2), (2, 3, 1, 1, 5, 4, 3), (1, 5, 1, 6, 3, 2, 2), (4, 1, 6, 2, 7, 1, 1),
          (3, 3, 4, 4, 9, 5, 1), (5, 2, 3, 8, 1, 6, 4), (1, 1, 9, 3, 4, 2, 3), (2, 10, 3, 5, 3, 2, 2)]


@pytest.fixture(params=BACKENDS)
def fn(request):
    if request.param in ("cpu",) and not _available("cpu"):
        pytest.skip(f"cpu: {_backend.not_supported_reasons('gram', torch.device('cpu'), torch.float32)['cpu']}")
    return backend_fn(request.param)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_features(fn, shape, mode):
    check(fn, make(*shape, seed=sum(shape)), mode, torch.float64)
    check(fn, make(*shape, dtype=torch.float32, seed=sum(shape) + 1), mode, torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ids", [torch.int64, torch.int32])
@pytest.mark.parametrize("shape,vocab", [((3, 4, 5, 7, 1, 37, 2), 3), ((2, 3, 1, 1, 1, 4, 3), 2),
                                         ((4, 1, 6, 2, 1, 1, 1), 8), ((1, 3, 9, 4, 1, 2, 3), 1)])
def test_token_ids(fn, shape, vocab, ids, mode):
    for dtype in (torch.float64, torch.float32):
        check(fn, make(*shape, dtype=dtype, ids=ids, vocab=vocab, seed=vocab), mode, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("ids", [None, torch.int64])
def test_low_precision(fn, dtype, ids, mode):
    for shape in [(3, 4, 5, 7, 6, 8, 2), (4, 3, 1, 1, 9, 5, 3)]:
        check(fn, make(*shape, dtype=dtype, ids=ids), mode, dtype)


# ---------------------------------------------------------------------------------------------- cpu paths
def _cpu():
    if not _available("cpu"):
        pytest.skip("cpu backend not available")
    return backend_fn("cpu")


@pytest.fixture(params=["avx2", "portable"])
def isa(request, monkeypatch):
    """The AVX2 kernels (where the CPU has them) and the portable ones."""
    monkeypatch.setenv(NO_AVX2_ENV, "1" if request.param == "portable" else "0")
    return request.param


@pytest.mark.parametrize("path", ["pairwise", "materialize", "outer"])
@pytest.mark.parametrize("mode", MODES)
def test_cpu_forced_paths(monkeypatch, isa, path, mode):
    """Every feature path of the C++ kernel, whatever its cost model would pick."""
    fn = _cpu()
    monkeypatch.setenv(PATH_ENV, path)
    shapes = [(2, 3, 1, 1, 5, 4, 3), (4, 4, 1, 1, 8, 16, 2)] if path == "outer" else SHAPES
    for k, shape in enumerate(shapes):
        for dtype in (torch.float64, torch.float32):
            check(fn, make(*shape, dtype=dtype, seed=k), mode, dtype)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_token_ids_portable(monkeypatch, mode):
    fn = _cpu()
    monkeypatch.setenv(NO_AVX2_ENV, "1")
    for dtype in (torch.float64, torch.float32):
        check(fn, make(3, 4, 5, 7, 1, 37, 3, dtype=dtype, ids=torch.int64, vocab=4), mode, dtype)


@pytest.mark.parametrize("path", ["auto", "pairwise", "materialize"])
@pytest.mark.parametrize("mode", MODES)
def test_cpu_same_inputs_both_sides(monkeypatch, path, mode):
    """a2 is a1 and g2 is g1 (the kernel then reuses one side's work)."""
    fn = _cpu()
    monkeypatch.setenv(PATH_ENV, path)
    for ids in (None, torch.int64):
        a, g, _, _ = make(4, 4, 6, 6, 5, 3, 2, dtype=torch.float32, ids=ids)
        check(fn, (a, g, a, g), mode, torch.float32)
    a, g, _, _ = make(3, 3, 2, 2, 1000, 400, 2, dtype=torch.float32)  # several chunks (materialize)
    check(fn, (a, g, a, g), mode, torch.float32)


@pytest.mark.parametrize("path,shape", [
    ("pairwise", (5, 7, 24, 3, 6, 21, 2)),     # partial blocks of rows (and of columns, on 2+ threads)
    ("pairwise", (5, 7, 24, 3, 6, 21, 3)),
    ("pairwise", (3, 2, 3, 700, 4, 500, 2)),   # one column block beyond the scratch budget
    ("materialize", (3, 4, 2, 3, 200, 800, 2)),  # several chunks of per-sample gradients, the last partial
])
def test_cpu_blocked(monkeypatch, isa, path, shape):
    fn = _cpu()
    monkeypatch.setenv(PATH_ENV, path)
    for dtype in (torch.float32, torch.float64):
        inputs = make(*shape, dtype=dtype, seed=3)
        for mode in MODES:
            check(fn, inputs, mode, dtype)


def test_cpu_is_default_and_picks_paths():
    _cpu()
    assert _backend.choose("gram", torch.device("cpu"), torch.float32).backend == "cpu"
    # every regime of the benchmark, shrunk along I, J: auto path against the oracle
    for shape in [(6, 5, 1, 1, 64, 48, 10), (3, 2, 32, 32, 48, 40, 2), (2, 3, 40, 40, 96, 96, 1)]:
        for mode in MODES:
            check(gram_contract, make(*shape, dtype=torch.float32), mode, torch.float32)


def test_cpu_bad_path_env(monkeypatch):
    fn = _cpu()
    a1, g1, a2, g2 = make(2, 2, 3, 3, 2, 2, 1)
    monkeypatch.setenv(PATH_ENV, "nope")
    with pytest.raises(RuntimeError, match=PATH_ENV):
        fn(a1, g1, a2, g2, "full")
    monkeypatch.setenv(PATH_ENV, "outer")
    with pytest.raises(RuntimeError, match="T = S = 1"):
        fn(a1, g1, a2, g2, "full")


def test_cpu_direct_errors():
    _cpu()
    a1, g1, a2, g2 = make(2, 2, 3, 3, 2, 2, 1)
    op = torch.ops.ntk_cpu.gram_contract
    with pytest.raises(RuntimeError, match="mode"):
        op(a1, g1, a2, g2, 3)
    with pytest.raises(RuntimeError, match="g2"):
        op(a1, g1, a2, g2[:, :, :, :1], 0)
    with pytest.raises(RuntimeError, match="a1"):
        op(a1[:, :2], g1, a2, g2, 0)
    with pytest.raises(RuntimeError, match="a1 and a2"):
        op(a1[..., 0].long(), g1, a2, g2, 0)
    with pytest.raises(RuntimeError, match="a1, a2"):
        op(a1.float(), g1, a2, g2, 0)


# ---------------------------------------------------------------------------------------------- the public op
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ids", [None, torch.int64])
def test_noncontiguous_inputs(mode, ids):
    a1, g1, a2, g2 = make(3, 4, 5, 6, 7, 4, 2, ids=ids, seed=9)
    ref = oracle(a1, g1, a2, g2, mode)
    # the same values in transposed storage, and strided slices of larger tensors
    nc = lambda t: t.transpose(0, -1).contiguous().transpose(0, -1)
    g1n = torch.stack([g1, g1], -1)[..., 0]
    assert not g1n.is_contiguous() and torch.equal(g1n, g1)
    args = (nc(a1), g1n, nc(a2), nc(g2))
    assert not any(t.is_contiguous() for t in args)
    assert_close(gram_contract(*args, mode), ref, torch.float64, name="noncontig")


def test_empty_sizes():
    for shape in [(0, 3, 2, 2, 3, 2, 2), (2, 0, 2, 2, 3, 2, 2), (2, 3, 2, 2, 3, 0, 2), (2, 3, 2, 2, 3, 2, 0)]:
        for mode in MODES:
            a1, g1, a2, g2 = make(*shape)
            out = gram_contract(a1, g1, a2, g2, mode)
            assert_close(out, oracle(a1, g1, a2, g2, mode), torch.float64)


def _bad(**kw):
    a1, g1, a2, g2 = make(2, 3, 4, 5, 6, 3, 2, dtype=torch.float32)
    args = dict(a1=a1, g1=g1, a2=a2, g2=g2, mode="full")
    args.update(kw)
    return args


@pytest.mark.parametrize("kw,err,match", [
    (dict(mode="sum"), ValueError, "mode"),
    (dict(g1=torch.randn(2, 2, 4)), ValueError, "g1"),
    (dict(a1=torch.randn(2, 4)), ValueError, "a1"),
    (dict(a2=torch.randn(3, 5, 6, 1)), ValueError, "a2"),
    (dict(g2=torch.randn(3, 3, 5, 3)), ValueError, "g2"),   # C mismatch
    (dict(g2=torch.randn(3, 2, 5, 4)), ValueError, "g2"),   # E mismatch
    (dict(a2=torch.randn(3, 5, 7)), ValueError, "a1, a2"),  # D mismatch
    (dict(a1=torch.randn(3, 4, 6)), ValueError, "a1"),      # I mismatch
    (dict(a2=torch.randn(3, 4, 6)), ValueError, "a2"),      # S mismatch
    (dict(g2=torch.randn(3, 2, 5, 3, dtype=torch.float64)), TypeError, "g2"),
    (dict(a1=torch.randn(2, 4, 6, dtype=torch.float64)), TypeError, "a1"),
    (dict(a1=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "a1 and a2"),
    (dict(a1=torch.zeros(2, 4, 1, dtype=torch.int64), a2=torch.zeros(3, 5, 1, dtype=torch.int64)), ValueError, "a1"),
    (dict(g1=torch.zeros(2, 2, 4, 3, dtype=torch.int64)), TypeError, "g1"),
    (dict(a1=[[1.0]]), TypeError, "a1"),
])
def test_bad_input(kw, err, match):
    with pytest.raises(err, match=match):
        gram_contract(**_bad(**kw))


# ---------------------------------------------------------------------------------------------- properties
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(I=st.integers(1, 4), J=st.integers(1, 4), T=st.integers(1, 6), S=st.integers(1, 6), D=st.integers(1, 7),
       E=st.integers(1, 5), C=st.integers(1, 3), mode=st.sampled_from(MODES), ids=st.booleans(),
       path=st.sampled_from(["auto", "pairwise", "materialize"]), seed=st.integers(0, 2**31 - 1))
def test_property_any_shape(I, J, T, S, D, E, C, mode, ids, path, seed):
    """The public op (fp32) and the cpu backend on a forced feature path, on shapes hypothesis picks."""
    inputs = make(I, J, T, S, D, E, C, dtype=torch.float32, ids=torch.int64 if ids else None, seed=seed % 1000)
    check(gram_contract, inputs, mode, torch.float32)
    if _available("cpu"):
        mp = pytest.MonkeyPatch()
        try:
            mp.setenv(PATH_ENV, path)
            check(backend_fn("cpu"), inputs, mode, torch.float32)
        finally:
            mp.undo()
