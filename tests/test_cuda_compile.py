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
from ntk_kernels.ops import linchain_ref
from ntk_kernels.ops.linchain import _fwd_reference
from _compare import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# the flags torch's CUDAExtension adds (no implicit half/bfloat16 conversions): the sources must build under them
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--use_fast_math"]
LAUNCHERS = ["ntk::linchain_cuda::project(", "ntk::linchain_cuda::grad_x(", "ntk::linchain_cuda::grad_proj(",
             "ntk::linchain_cuda::grad_proj_workspace("]


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return shutil.which("nvcc") or (home and shutil.which(os.path.join(home, "bin", "nvcc")))


@pytest.mark.skipif(not _nvcc(), reason="nvcc not found (PATH, CUDA_HOME)")
def test_launchers_compile_for_sm90(tmp_path):
    """nvcc -std=c++17 -O3 -arch=sm_90 -c csrc/cuda/*.cu: about 40 s on 2 CPU cores."""
    assert CU_SOURCES, "no csrc/cuda/*.cu"
    for src in CU_SOURCES:
        obj = tmp_path / (os.path.basename(src) + ".o")
        cmd = [_nvcc(), "-std=c++17", "-O3", "-arch=sm_90", "-c", src, "-o", str(obj),
               "-I", os.path.join(ROOT, "csrc", "common"), "-I", os.path.join(ROOT, "csrc", "cuda"), *TORCH_NVCC_FLAGS]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
        assert "warning" not in res.stderr.lower(), res.stderr
    if shutil.which("nm"):
        obj = tmp_path / "linchain_kernels.cu.o"
        symbols = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
        missing = [s for s in LAUNCHERS if s not in symbols]
        assert not missing, f"launchers not exported by {obj.name}: {missing}"


# ---------------------------------------------------------------------------------------------- on a GPU
def _require_cuda_backend(monkeypatch):
    if not _ext.cuda_loaded():
        why = _ext.status()["_C_cuda"]["why"]
        if os.environ.get("NTK_KERNELS_SKIP_CUDA_BUILD") == "1":
            pytest.skip(f"CUDA extension not built (NTK_KERNELS_SKIP_CUDA_BUILD=1): {why}")
        pytest.fail(f"a GPU is present but ntk_kernels._C_cuda did not load: {why}")
    monkeypatch.setenv("NTK_KERNELS_BACKEND_LINCHAIN", "cuda")


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
