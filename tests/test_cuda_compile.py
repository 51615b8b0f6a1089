"""The CUDA backend: its torch-free launchers compile with nvcc for sm_90 anywhere nvcc exists (no GPU, no CUDA
build of torch needed), and on a machine with a GPU the backend matches the float64 reference."""
import glob
import os
import shutil
import subprocess

import pytest
import torch

import ntk_kernels
from ntk_kernels import _backend, _ext
from ntk_kernels.ops import gram_contract_ref, linchain_ref
from ntk_kernels.ops.linchain import _fwd_reference
from _compare import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# the flags torch's CUDAExtension adds (no implicit half/bfloat16 conversions): the sources must build under them
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--use_fast_math"]
LAUNCHERS = {"linchain_kernels.cu.o": ["ntk::linchain_cuda::project(", "ntk::linchain_cuda::grad_x(",
                                        "ntk::linchain_cuda::grad_proj(", "ntk::linchain_cuda::grad_proj_workspace("],
             "gram_kernels.cu.o": ["ntk::gram_cuda::gram_contract("],
             "jvp_kernels.cu.o": ["ntk::jvp_cuda::linear_jvp(", "ntk::jvp_cuda::layer_norm_jvp("]}


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") or (home and shutil.which(os.path.join(home, "bin", "nvcc")))


@pytest.mark.skipif(not _nvcc(), reason="nvcc not found (PATH, CUDA_HOME)")
def test_launchers_compile_for_sm90(tmp_path):
    """nvcc -std=c++17 -O3 -arch=sm_90 -c csrc/cuda/*.cu: about 60 s on 2 CPU cores."""
    assert CU_SOURCES, "no csrc/cuda/*.cu"
    for src in CU_SOURCES:
        obj = tmp_path / (os.path.basename(src) + ".o")
        cmd = [_nvcc(), "-std=c++17", "-O3", "-arch=sm_90", "-c", src, "-o", str(obj),
               "-I", os.path.join(ROOT, "csrc", "common"), "-I", os.path.join(ROOT, "csrc", "cuda"), *TORCH_NVCC_FLAGS]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
        assert "warning" not in res.stderr.lower(), res.stderr
    if shutil.which("nm"):
        for name, launchers in LAUNCHERS.items():
            obj = tmp_path / name
            assert obj.exists(), f"{name}: no such csrc/cuda source was compiled"
            symbols = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
            missing = [s for s in launchers if s not in symbols]
            assert not missing, f"launchers not exported by {obj.name}: {missing}"


# ---------------------------------------------------------------------------------------------- on a GPU
def _require_cuda_backend(monkeypatch, op="linchain"):
    if not _ext.cuda_loaded():
        why = _ext.status()["_C_cuda"]["why"]
        if os.environ.get("NTK_KERNELS_SKIP_CUDA_BUILD") == "1":
            pytest.skip(f"CUDA extension not built (NTK_KERNELS_SKIP_CUDA_BUILD=1): {why}")
        pytest.fail(f"a GPU is present but ntk_kernels._C_cuda did not load: {why}")
    monkeypatch.setenv(f"NTK_KERNELS_BACKEND_{op.upper()}", "cuda")


def _inputs(lead, d_in, d_out, r, k, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).cuda()

    return [rnd(*lead, d_in), rnd(d_out, d_in, scale=d_in ** -0.5), rnd(d_out) if bias else None,
            rnd(r, d_in, scale=d_in ** -0.5), rnd(k, r, r, scale=r ** -0.5), rnd(d_out, r, scale=r ** -0.5)]


def _value_and_grads(fn, inputs, dtype, scaling, p, seed):
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in inputs]
    if fn is ntk_kernels.linchain_linear:
        y = fn(*leaves, scaling, p, training=True, seed=seed)
    else:
        y = fn(*leaves, scaling, p, seed)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.device, dtype)
    used = [t for t in leaves if t is not None and t.numel() > 0]
    return y, torch.autograd.grad(y, used, gy)


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (lead, d_in, d_out, r, k): odd sizes, one row, rank 1, rank > 64 (rank tiles + separate chain kernel),
# N over several grad_proj splits
GPU_SHAPES = [((7,), 19, 29, 4, 2), ((1,), 1, 1, 1, 0), ((3, 37), 53, 31, 5, 1), ((300,), 130, 65, 20, 3),
              ((33,), 70, 9, 33, 1), ((5,), 40, 7, 70, 2), ((1000,), 260, 200, 64, 0), ((129,), 67, 257, 16, 4)]


@requires_gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s[0])) + f"-{s[1]}-{s[2]}-r{s[3]}-k{s[4]}")
@pytest.mark.parametrize("bias,p", [(True, 0.0), (False, 0.3), (True, 0.1)])
def test_cuda_matches_reference_float64(monkeypatch, shape, bias, p):
    _require_cuda_backend(monkeypatch)
    lead, d_in, d_out, r, k = shape
    inputs = _inputs(lead, d_in, d_out, r, k, bias=bias, seed=d_in * 7 + r)
    y, grads = _value_and_grads(ntk_kernels.linchain_linear, inputs, torch.float64, 0.75, p, 5)
    y_ref, grads_ref = _value_and_grads(linchain_ref, inputs, torch.float64, 0.75, p, 5)
    assert_close(y, y_ref, torch.float64, name="y")
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_close(g, g_ref, torch.float64, name=f"grad {i}")
    # u, the saved (N, r) projection, is fp64 here and equals the reference's
    x2 = inputs[0].reshape(-1, d_in)
    m = ntk_kernels.ops.fold_chain(inputs[4])
    _, u = torch.ops.ntk.linchain(x2, inputs[1], inputs[2], inputs[3], m, inputs[5], 0.75, p,
                                  torch.tensor(5, dtype=torch.int64))
    _, u_ref = _fwd_reference(x2, inputs[1], inputs[2], inputs[3], m, inputs[5], 0.75, p, 5)
    assert_close(u, u_ref, torch.float64, name="u")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cuda_low_precision(monkeypatch, dtype, p):
    _require_cuda_backend(monkeypatch)
    inputs = _inputs((6, 50), 96, 80, 16, 2, seed=3)
    y, grads = _value_and_grads(ntk_kernels.linchain_linear, inputs, dtype, 0.5, p, 9)
    y64, grads64 = _value_and_grads(linchain_ref, inputs, torch.float64, 0.5, p, 9)
    low = dtype != torch.float32
    yl, gl = _value_and_grads(linchain_ref, inputs, dtype, 0.5, p, 9) if low else (None, [None] * len(grads))
    assert y.dtype == dtype
    assert_close(y, y64, dtype, yl, "y")
    for i, (g, g64, g_low) in enumerate(zip(grads, grads64, gl)):
        assert g.dtype == dtype
        assert_close(g, g64, dtype, g_low, f"grad {i}")


@requires_gpu
def test_cuda_backward_is_deterministic(monkeypatch):
    """The split-N reductions (gA, gB) add their partial sums in a fixed order: no atomics."""
    _require_cuda_backend(monkeypatch)
    inputs = _inputs((4096,), 256, 192, 16, 1, seed=2)
    _, g1 = _value_and_grads(ntk_kernels.linchain_linear, inputs, torch.float32, 1.0, 0.1, 4)
    _, g2 = _value_and_grads(ntk_kernels.linchain_linear, inputs, torch.float32, 1.0, 0.1, 4)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@requires_gpu
def test_cuda_backend_supported_on_gpu():
    if not _ext.cuda_loaded():
        pytest.skip(f"ntk_kernels._C_cuda not loaded: {_ext.status()['_C_cuda']['why']}")
    assert not _backend.not_supported_reasons("linchain", torch.device("cuda"), torch.bfloat16)["cuda"]


# ------------------------------------------------------------------------------- gram_contract on a GPU
def _gram_inputs(I, J, C, T, S, D, E, ids, seed, vocab=5):
    g = torch.Generator().manual_seed(seed)
    if ids:
        a1, a2 = torch.randint(0, vocab, (I, T), generator=g), torch.randint(0, vocab, (J, S), generator=g)
    else:
        a1 = torch.randn(I, T, D, generator=g, dtype=torch.float64) * D ** -0.5
        a2 = torch.randn(J, S, D, generator=g, dtype=torch.float64) * D ** -0.5
    g1 = torch.randn(I, C, T, E, generator=g, dtype=torch.float64) * E ** -0.5
    g2 = torch.randn(J, C, S, E, generator=g, dtype=torch.float64) * E ** -0.5
    return [t.cuda() for t in (a1, g1, a2, g2)]


def _cast_gram(inputs, dtype):
    return [t.to(dtype) if t.is_floating_point() else t for t in inputs]


# (I, J, C, T, S, D, E): odd sizes, T != S, T = 1, S = 1, T = S = 1 (cuBLAS path), several t / s tiles and e
# chunks, C across the reduction layouts (1, 2, 3, 8, 9), exact tiles, many pairs
GPU_GRAM_SHAPES = [(2, 3, 3, 5, 7, 9, 11), (3, 2, 1, 1, 9, 17, 40), (2, 4, 2, 13, 1, 64, 70),
                   (5, 3, 3, 1, 1, 33, 65), (3, 2, 9, 37, 70, 100, 130), (2, 2, 8, 32, 64, 32, 64),
                   (40, 33, 2, 16, 20, 48, 96), (1, 1, 1, 200, 150, 300, 257)]


@requires_gpu
@pytest.mark.parametrize("shape", GPU_GRAM_SHAPES, ids=lambda s: "I{}-J{}-C{}-T{}-S{}-D{}-E{}".format(*s))
@pytest.mark.parametrize("ids", [False, True], ids=["features", "ids"])
@pytest.mark.parametrize("mode", ["full", "diagonal", "trace"])
def test_cuda_gram_matches_reference_float64(monkeypatch, shape, ids, mode):
    _require_cuda_backend(monkeypatch, "gram")
    inputs = _gram_inputs(*shape, ids=ids, seed=sum(shape))
    out = ntk_kernels.ops.gram_contract(*inputs, mode)
    assert out.dtype == torch.float64 and out.is_cuda
    assert_close(out, gram_contract_ref(*inputs, mode), torch.float64, name=mode)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ids", [False, True], ids=["features", "ids"])
@pytest.mark.parametrize("mode", ["full", "diagonal", "trace"])
def test_cuda_gram_low_precision(monkeypatch, dtype, ids, mode):
    _require_cuda_backend(monkeypatch, "gram")
    inputs = _gram_inputs(6, 5, 3, 24, 40, 96, 80, ids=ids, seed=3)
    low = _cast_gram(inputs, dtype)
    out = ntk_kernels.ops.gram_contract(*low, mode)
    assert out.dtype == torch.float32
    # the kernel's own error: fp32 accumulation of the rounded inputs
    assert_close(out, gram_contract_ref(*_cast_gram(low, torch.float64), mode), torch.float32, name=mode)
    if dtype != torch.float32:
        assert_close(out, gram_contract_ref(*inputs, mode), dtype, gram_contract_ref(*low, mode), mode)


@requires_gpu
def test_cuda_gram_is_deterministic(monkeypatch):
    """Every output element has one writer and a fixed order of additions: no atomics."""
    _require_cuda_backend(monkeypatch, "gram")
    inputs = _cast_gram(_gram_inputs(16, 16, 4, 40, 70, 128, 200, ids=False, seed=2), torch.float32)
    for mode in ("full", "diagonal", "trace"):
        assert torch.equal(ntk_kernels.ops.gram_contract(*inputs, mode), ntk_kernels.ops.gram_contract(*inputs, mode))


@requires_gpu
def test_cuda_gram_backend_supported_on_gpu():
    if not _ext.cuda_loaded():
        pytest.skip(f"ntk_kernels._C_cuda not loaded: {_ext.status()['_C_cuda']['why']}")
    assert not _backend.not_supported_reasons("gram", torch.device("cuda"), torch.bfloat16)["cuda"]
    assert _backend.choose("gram", torch.device("cuda"), torch.float32).backend == "cuda"


# ------------------------------------------------------------------------- linear_jvp, layer_norm_jvp on a GPU
def _jvp_linear_inputs(N, L, K, O, wd, bd, transposed, seed):
    """float64 x, W, b, ẋ, Ẇ, ḃ on the GPU; wd / bd None, "shared" or "sample"; transposed: Conv1D's Wᵀ view."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * max(K, 1) ** -0.5  # noqa: E731
    W = rnd(K, O).t() if transposed else rnd(O, K)
    wdot = {None: None, "shared": rnd(O, K), "sample": rnd(N, O, K)}[wd]
    bdot = {None: None, "shared": rnd(O), "sample": rnd(N, O)}[bd]
    x, xd = torch.randn(N, L, K, generator=g, dtype=torch.float64), torch.randn(N, L, K, generator=g, dtype=torch.float64)
    return [None if t is None else t.cuda() for t in (x, W, rnd(O), xd, wdot, bdot)]


def _jvp_norm_inputs(N, L, D, rms, wd, bd, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    vec = lambda kind: {None: None, "shared": rnd(D), "sample": rnd(N, D)}[kind]  # noqa: E731
    t = [rnd(N, L, D) * 2 + 0.5, rnd(D), None if rms else rnd(D), 1e-5, rnd(N, L, D), vec(wd), None if rms else vec(bd),
         rms]
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in t]


def _jvp_check(fn, ref_fn, inputs, dtype, name):
    from ntk_kernels.ops import jvp as J  # noqa: F401  (registers the ops)
    t = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in inputs]
    out = fn(*t)
    ref = ref_fn(*[a.double() if isinstance(a, torch.Tensor) else a for a in t])
    low = ref_fn(*t) if dtype in (torch.float16, torch.bfloat16) else (None, None)
    for o, r, lo, what in zip(out, ref, low, ("y", "y_dot")):
        assert o.dtype == dtype and o.is_cuda
        assert_close(o, r, dtype, lo, f"{name} {what} ({dtype})")


# (N, L, d_in, d_out): odd, several tiles of both kernels (64 x 64 SIMT, 64 x 128 wmma), L = 1, many samples
GPU_LINEAR_JVP_SHAPES = [(3, 37, 130, 67), (2, 200, 64, 257), (70, 1, 300, 100), (1, 3, 1, 5)]


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", GPU_LINEAR_JVP_SHAPES, ids=lambda s: "N{}-L{}-din{}-dout{}".format(*s))
@pytest.mark.parametrize("wd,bd,transposed", [("shared", "shared", False), ("sample", "sample", True),
                                              (None, None, True)])
def test_cuda_linear_jvp_matches_reference(monkeypatch, dtype, shape, wd, bd, transposed):
    from ntk_kernels.ops import jvp as J
    _require_cuda_backend(monkeypatch, "linear_jvp")
    _jvp_check(J.linear_jvp, J.linear_jvp_ref, _jvp_linear_inputs(*shape, wd, bd, transposed, sum(shape)), dtype,
               "linear_jvp")


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(3, 37, 130), (2, 5, 4096), (1, 3, 10000), (4, 1, 1)],
                         ids=lambda s: "N{}-L{}-D{}".format(*s))
@pytest.mark.parametrize("rms,wd,bd", [(False, "shared", "shared"), (False, "sample", "sample"), (True, "sample", None)])
def test_cuda_layer_norm_jvp_matches_reference(monkeypatch, dtype, shape, rms, wd, bd):
    from ntk_kernels.ops import jvp as J
    _require_cuda_backend(monkeypatch, "layer_norm_jvp")
    _jvp_check(J.layer_norm_jvp, J.layer_norm_jvp_ref, _jvp_norm_inputs(*shape, rms, wd, bd, sum(shape)), dtype,
               "layer_norm_jvp")


@requires_gpu
def test_cuda_jvp_backends_supported_on_gpu():
    if not _ext.cuda_loaded():
        pytest.skip(f"ntk_kernels._C_cuda not loaded: {_ext.status()['_C_cuda']['why']}")
    for op in ("linear_jvp", "layer_norm_jvp"):
        assert not _backend.not_supported_reasons(op, torch.device("cuda"), torch.bfloat16)["cuda"]
