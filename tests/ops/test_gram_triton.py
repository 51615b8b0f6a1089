"""The Triton backend of ntk::gram_contract (ops/_gram_triton.py) against the definition in float64.

Runs on the CPU under TRITON_INTERPRET=1 (slow: tiny shapes, few cases; the file takes well under a minute) or on
a CUDA device; skips otherwise.  Interpreted tiles are 16 wide and the block kernel takes T, S <= 8, so:
  "mlp"   T = S = 1           block kernel, one row per sample (the MLP regime), trace split in 2 channel groups
  "short" T = 3, S = 5        block kernel, 4 x 8 padded (t, s) blocks per sample pair, segment sums
  "long"  T = 35, S = 18      pair kernel, 3 t-tiles in 2 splits (one split loops over 2 tiles), 2 s-tiles,
                              2 chunks of D = 17 and of E = 20
The oracle is gram_contract_ref on float64 copies of the very inputs (rounded to the tested dtype first); the low
precision budget follows tests/_compare.py (the reference run in that dtype sets it).
"""
import pytest
import torch

from _triton_setup import triton_backend

GT, DEVICE = triton_backend("_gram_triton")

from ntk_kernels import _backend  # noqa: E402
from ntk_kernels.ops import gram_contract, gram_contract_ref  # noqa: E402
from _compare import assert_close  # noqa: E402

MODES = ("full", "diagonal", "trace")
LOW = (torch.float16, torch.bfloat16)
# name -> (I, J, C, T, S, D, E)
SHAPES = {"mlp": (5, 3, 3, 1, 1, 20, 19), "short": (3, 4, 1, 3, 5, 7, 9), "long": (1, 2, 2, 35, 18, 17, 20)}


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("NTK_KERNELS_BACKEND_GRAM", "triton")


def make_inputs(I, J, C, T, S, D, E, dtype, ids=False, vocab=4, seed=0):
    """a1, g1, a2, g2 rounded to ``dtype`` (ids: int64 in [0, vocab), so ids repeat within and across samples)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    if ids:
        a1 = torch.randint(0, vocab, (I, T), generator=g).to(DEVICE)
        a2 = torch.randint(0, vocab, (J, S), generator=g).to(DEVICE)
    else:
        a1, a2 = rnd(I, T, D), rnd(J, S, D)
    return a1, rnd(I, C, T, E), a2, rnd(J, C, S, E)


def oracle(a1, g1, a2, g2, mode):
    """(float64 reference, the reference computed from the low-precision inputs or None for fp32)."""
    f64 = [x if x.dtype in (torch.int32, torch.int64) else x.double() for x in (a1, g1, a2, g2)]
    ref = gram_contract_ref(*f64, mode)
    low = gram_contract_ref(a1, g1, a2, g2, mode) if g1.dtype in LOW else None
    return ref, low


def check(out, inputs, mode, name="K"):
    ref, low = oracle(*inputs, mode)
    assert out.dtype == torch.float32, f"{name}: dtype {out.dtype}"
    assert out.device == inputs[1].device
    assert_close(out, ref, inputs[1].dtype, low, name)


# ----------------------------------------------------------------------------------------------
# The public op, forced onto the Triton backend.
# ----------------------------------------------------------------------------------------------
# the block-kernel shapes: every mode x {features, ids} in fp32, and a few in fp16 / bf16;
# the slow pair-kernel shape: every mode x {features, ids} once, dtypes spread over them
CASES = [(s, m, ids, torch.float32) for s in ("mlp", "short") for m in MODES for ids in (False, True)]
CASES += [("mlp", "full", False, torch.bfloat16), ("short", "diagonal", False, torch.float16),
          ("short", "trace", True, torch.bfloat16), ("mlp", "diagonal", True, torch.float16)]
CASES += [("long", "full", False, torch.float32), ("long", "full", True, torch.float16),
          ("long", "diagonal", False, torch.bfloat16), ("long", "diagonal", True, torch.float32),
          ("long", "trace", False, torch.float32), ("long", "trace", True, torch.bfloat16)]


@pytest.mark.parametrize("shape,mode,ids,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_op(shape, mode, ids, dtype):
    assert _backend.choose("gram", DEVICE, dtype).backend == "triton"
    inputs = make_inputs(*SHAPES[shape], dtype, ids=ids, seed=len(shape) + 3 * MODES.index(mode) + ids)
    check(gram_contract(*inputs, mode), inputs, mode, f"{shape} {mode}")


def test_op_int32_ids_and_single_everything():
    """int32 ids (the op widens them), I = J = C = 1, T = 1 against S = 9 (S pads to 16 > 8: the pair kernel,
    T in one padded tile)."""
    a1, g1, a2, g2 = make_inputs(1, 1, 1, 1, 9, 0, 5, torch.float32, ids=True, vocab=2, seed=4)
    inputs = (a1.int(), g1, a2.int(), g2)
    for mode in MODES:
        check(gram_contract(*inputs, mode), (a1, g1, a2, g2), mode, mode)


# ----------------------------------------------------------------------------------------------
# The backend function: both kernels and both full-mode variants on one input.
# ----------------------------------------------------------------------------------------------
VARIANTS = [("block", None), ("pair", "p"), ("pair", "h")]


# (dtype, ids, variants): all three on fp32 features, the "h" variant (the one whose H dot depends on the dtype:
# AA rounded to bf16, fp32 operands for fp16 / fp32, exact 0/1 for ids) on the others
FULL_CASES = [(torch.float32, False, VARIANTS), (torch.bfloat16, False, VARIANTS[2:]),
              (torch.float16, False, VARIANTS[2:]), (torch.bfloat16, True, VARIANTS[2:]),
              (torch.float16, True, VARIANTS[1:])]


@pytest.mark.parametrize("dtype,ids,variants", FULL_CASES,
                         ids=["fp32-features-all", "bf16-features-h", "fp16-features-h", "bf16-ids-h", "fp16-ids-p,h"])
def test_kernels_full(dtype, ids, variants):
    """I != J, C = 3, T = 5 != S = 3, D = 13 and E = 9: each kernel / variant in full mode."""
    inputs = make_inputs(3, 2, 3, 5, 3, 13, 9, dtype, ids=ids, seed=7)
    fn = _backend._REGISTRY["gram"]["triton"].fn
    for kernel, via in variants:
        check(fn(*inputs, "full", kernel=kernel, full_via=via), inputs, "full", f"{kernel} {via}")


@pytest.mark.parametrize("mode", ["diagonal", "trace"])
def test_kernels_agree(mode):
    """The block kernel forced on T = 9 (one 16-row padded sample per tile) and the pair kernel forced on T = S = 2."""
    fn = _backend._REGISTRY["gram"]["triton"].fn
    for shape, kernel in (((2, 3, 3, 9, 4, 5, 6), "block"), ((3, 2, 3, 2, 2, 6, 5), "pair")):
        inputs = make_inputs(*shape, torch.float32, seed=9)
        check(fn(*inputs, mode, kernel=kernel), inputs, mode, f"{kernel} {shape}")


def test_empty_and_degenerate():
    fn = _backend._REGISTRY["gram"]["triton"].fn
    for shape in ((0, 2, 3, 4, 4, 5, 5), (2, 2, 3, 0, 4, 5, 5), (2, 2, 3, 4, 4, 5, 0), (2, 2, 3, 4, 4, 0, 5)):
        I, J, C = shape[:3]
        inputs = make_inputs(*shape, torch.float32)
        for mode in MODES:
            out = fn(*inputs, mode)
            assert out.dtype == torch.float32 and not out.any()
            assert out.shape == {"full": (I, J, C, C), "diagonal": (I, J, C), "trace": (I, J)}[mode]
    with pytest.raises(ValueError, match="mode"):
        fn(*make_inputs(1, 1, 1, 1, 1, 2, 2, torch.float32), "both")
    with pytest.raises(TypeError, match="float64"):
        fn(*make_inputs(1, 1, 1, 1, 1, 2, 2, torch.float64), "full")


# ----------------------------------------------------------------------------------------------
# Reasons and the chooser.
# ----------------------------------------------------------------------------------------------
def test_reasons():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert any("float64" in s for s in GT._triton_reasons(cuda, torch.float64))
    assert any("float64" in s for s in GT._triton_reasons(cpu, torch.float64))
    assert any("mps" in s for s in GT._triton_reasons(torch.device("mps"), torch.float32))
    assert any("int64" in s for s in GT._triton_reasons(cuda, torch.int64))
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert not GT._triton_reasons(cuda, dt)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        assert any("TRITON_INTERPRET" in s for s in GT._triton_reasons(cpu, torch.float32))
    assert _backend._REGISTRY["gram"]["triton"].reasons is GT._triton_reasons


def test_chooser_falls_back_and_forced_fp64_raises(monkeypatch):
    """fp64 is refused: forced, the op raises naming the reason; unforced, the chooser takes another backend (and the
    cpu preference never includes triton)."""
    inputs = make_inputs(2, 2, 1, 2, 2, 3, 3, torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        gram_contract(*inputs, "trace")
    monkeypatch.delenv("NTK_KERNELS_BACKEND_GRAM")
    monkeypatch.delenv("NTK_KERNELS_BACKEND", raising=False)
    assert _backend.choose("gram", DEVICE, torch.float64).backend != "triton"
    if DEVICE.type == "cpu":
        assert _backend.choose("gram", DEVICE, torch.float32).backend != "triton"
    ref, _ = oracle(*inputs, "trace")
    assert torch.allclose(gram_contract(*inputs, "trace"), ref, rtol=1e-12, atol=1e-12)
