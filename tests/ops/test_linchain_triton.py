"""The Triton backend of ntk::linchain (ops/_linchain_triton.py) against linchain_ref in float64.

Runs on the CPU under TRITON_INTERPRET=1 (slow: small shapes, few cases) or on a CUDA device; skips otherwise.
Shapes are odd so every tile is partial; the "blocks" case spans several tiles in every loop and grid axis
(interpreted tiles are 16 wide), and the split-N reduction of gA / gB.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import ntk_kernels  # noqa: E402
from ntk_kernels import _backend  # noqa: E402
from ntk_kernels.ops import _hash_dropout, linchain_ref  # noqa: E402
from ntk_kernels.ops import _linchain_triton as LT  # noqa: E402
from _compare import assert_close  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
_why = LT._triton_reasons(DEVICE, torch.float32)
if _why:
    pytest.skip(f"triton backend cannot run here: {_why}", allow_module_level=True)

NAMES = ("x", "weight", "bias", "lora_A", "chain", "lora_B")


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("NTK_KERNELS_BACKEND_LINCHAIN", "triton")


def make_inputs(n, d_in, d_out, r, k, dtype, bias=True, seed=0):
    """Random non-zero inputs, rounded to ``dtype`` (so the float64 reference sees the very same values)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)

    return dict(x=rnd(n, d_in), weight=rnd(d_out, d_in, scale=d_in ** -0.5), bias=rnd(d_out) if bias else None,
                lora_A=rnd(r, d_in, scale=d_in ** -0.5), chain=rnd(k, r, r, scale=r ** -0.5),
                lora_B=rnd(d_out, r, scale=r ** -0.5))


def run(fn, inputs, dtype, scaling, p, seed, gy):
    """y and the gradient of every input (a k = 0 chain has none) of fn computed in ``dtype``."""
    leaves = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    args = [leaves[k] for k in NAMES]
    if fn is ntk_kernels.linchain_linear:
        y = fn(*args, scaling, p, training=True, seed=seed)
    else:
        y = fn(*args, scaling, p, seed)
    names = [k for k in NAMES if leaves[k] is not None and leaves[k].numel()]
    return y, dict(zip(names, torch.autograd.grad(y, [leaves[k] for k in names], gy.to(dtype))))


def check(inputs, dtype, scaling=0.75, p=0.0, seed=3):
    assert _backend.choose("linchain", DEVICE, dtype).backend == "triton"
    y_shape = (*inputs["x"].shape[:-1], inputs["weight"].shape[0])
    gy = torch.randn(y_shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64).to(DEVICE, dtype)
    y, g = run(ntk_kernels.linchain_linear, inputs, dtype, scaling, p, seed, gy)
    y64, g64 = run(linchain_ref, inputs, torch.float64, scaling, p, seed, gy)
    low = dtype != torch.float32
    yl, gl = run(linchain_ref, inputs, dtype, scaling, p, seed, gy) if low else (None, {})
    assert y.dtype == dtype
    assert_close(y, y64, dtype, yl, "y")
    assert set(g) == set(g64)
    for k in g64:
        assert g[k].dtype == dtype, k
        assert_close(g[k], g64[k], dtype, gl.get(k), f"grad {k}")


# (dtype, r, k, bias, p): every r x k in fp32, each of bias / dropout on and off, a few in 16-bit
CASES = [(torch.float32, r, k, (r + k) % 2 == 0, 0.3 if (r + k) % 3 else 0.0) for r in (1, 5, 16) for k in (0, 1, 3)]
CASES += [(dt, r, k, b, p) for dt in (torch.bfloat16, torch.float16)
          for r, k, b, p in ((5, 1, True, 0.3), (16, 3, False, 0.0), (1, 0, True, 0.3))]


@pytest.mark.parametrize("dtype,r,k,bias,p", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_values_and_grads(dtype, r, k, bias, p):
    check(make_inputs(7, 13, 11, r, k, dtype, bias=bias, seed=10 * r + k), dtype, p=p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_blocks(dtype):
    """N = 37, d_in = 45, d_out = 35, r = 40: multi-tile loops over d_in, d_out and r, a 3 x 3 grid, 3 splits of N."""
    check(make_inputs(37, 45, 35, 40, 2, dtype, seed=5), dtype, p=0.3, seed=77)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous(dtype):
    """x a strided slice with leading dims, W a transposed view (GPT-2 Conv1D's weight.T), A and B transposed views."""
    inp = make_inputs(6, 13, 11, 5, 1, dtype, seed=8)
    x = torch.zeros(2, 3, 2 * 13, device=DEVICE, dtype=dtype)
    x[..., ::2] = inp["x"].reshape(2, 3, 13)
    inp["x"] = x[..., ::2]
    for name in ("weight", "lora_A", "lora_B"):
        inp[name] = inp[name].t().contiguous().t()
        assert not inp[name].is_contiguous()
    assert not inp["x"].is_contiguous() and inp["x"].reshape(-1, 13).stride() == (26, 2)  # reshape keeps the view
    check(inp, dtype, p=0.3, seed=2 ** 31 - 1)


@pytest.mark.parametrize("trainable", [("lora_A", "chain", "lora_B"), ("x",), ("weight", "bias")])
def test_some_inputs_require_grad(trainable):
    """Frozen base (LoRA fine-tuning), frozen everything but x, frozen adapter: only the needed grads run."""
    inp = make_inputs(7, 13, 11, 5, 2, torch.float32, seed=4)
    gy = torch.randn(7, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    grads = {}
    for fn, dt in ((ntk_kernels.linchain_linear, torch.float32), (linchain_ref, torch.float64)):
        leaves = {k: v.detach().to(dt).requires_grad_(k in trainable) for k, v in inp.items()}
        args = [leaves[k] for k in NAMES]
        y = fn(*args, 0.5, 0.3, training=True, seed=9) if dt == torch.float32 else fn(*args, 0.5, 0.3, 9)
        grads[dt] = torch.autograd.grad(y, [leaves[k] for k in trainable], gy.to(dt))
    for k, g, g64 in zip(trainable, grads[torch.float32], grads[torch.float64]):
        assert_close(g, g64, torch.float32, name=f"grad {k}")


@triton.jit(do_not_specialize=["seed", "threshold", "row0"])
def _hash_test_kernel(h_ptr, keep_ptr, seed, threshold, row0, R: tl.constexpr, C: tl.constexpr):
    rows = row0 + tl.arange(0, R)[:, None]
    cols = tl.arange(0, C)[None, :]
    offs = tl.arange(0, R)[:, None] * C + cols
    tl.store(h_ptr + offs, LT._hash_uint32(seed, rows, cols).to(tl.int64))
    tl.store(keep_ptr + offs, LT._keep(seed, threshold, rows, cols).to(tl.int8))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2 ** 31 - 1, 0xDEADBEEF])
@pytest.mark.parametrize("row0", [0, 2 ** 31 - 64])
def test_hash_bit_exact(seed, row0):
    """The Triton hash equals _hash_dropout.hash_uint32 bit for bit (uint32 wrap-around, logical shifts)."""
    rows, cols = 64, 32
    h = torch.empty(rows, cols, dtype=torch.int64, device=DEVICE)
    keep = torch.empty(rows, cols, dtype=torch.int8, device=DEVICE)
    p = 0.3
    _hash_test_kernel[(1,)](h, keep, LT._i32(seed), LT._i32(_hash_dropout.threshold(p)), row0, rows, cols)
    r = torch.arange(row0, row0 + rows, device=DEVICE)[:, None]
    c = torch.arange(cols, device=DEVICE)[None, :]
    ref = _hash_dropout.hash_uint32(seed, r, c)
    bad = (h != ref).nonzero()
    assert bad.numel() == 0, f"{len(bad)} hashes differ, first at {tuple(bad[0].tolist())}: " \
                             f"got {h[tuple(bad[0])].item()}, reference {ref[tuple(bad[0])].item()}"
    assert torch.equal(keep.bool(), ref >= _hash_dropout.threshold(p))


def test_opcheck():
    x, w, b, a, m, bb = (make_inputs(7, 9, 5, 3, 1, torch.float32, seed=1)[k] for k in NAMES)
    args = (x, w, b, a, m[0], bb, 0.5, 0.2, torch.tensor(7, dtype=torch.int64))
    torch.library.opcheck(torch.ops.ntk.linchain.default, args)
    y, u = torch.ops.ntk.linchain(*args)
    bwd = (torch.randn_like(y), x, w, a, m[0], bb, u, 0.5, 0.2, args[-1], [True] * 6)
    torch.library.opcheck(torch.ops.ntk.linchain_backward.default, bwd)


def test_reasons():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert any("float64" in s for s in LT._triton_reasons(cuda, torch.float64))
    assert any("mps" in s for s in LT._triton_reasons(torch.device("mps"), torch.float32))
    assert not LT._triton_reasons(cuda, torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        assert any("TRITON_INTERPRET" in s for s in LT._triton_reasons(cpu, torch.float32))
