"""The CUDA backend's kernels and binding, run on the CPU by host emulation (no GPU, no CUDA build of torch).

At test time the real csrc/cuda/{linchain,gram,jvp}_kernels.cu (with the csrc/cuda/*.cuh headers they include,
inlined) and csrc/cuda/{linchain,gram,jvp}_binding.cpp are rewritten mechanically into host C++ (launches -> emu::launch, __shared__ -> an emulated arena, CUDA stream /
guard -> stubs, the ops registered for CPU tensors under torch.ops.ntk_cuda_emu so that a real ntk_cuda can
coexist), built with torch.utils.cpp_extension.load into build/cuda_emu (ignored by git; rebuilt only when a
source changes) and compared with the float64 references of ntk::linchain, ntk::gram_contract, ntk::linear_jvp
and ntk::layer_norm_jvp.
tests/cuda_emu/emu.h says what the emulation checks (shared-memory races through a deterministic schedule,
uninitialised shared reads, divergent barriers, shared-array bounds, vector-load alignment) and what it cannot
(global-memory bounds, warp lockstep, device floating point, speed): tests/test_cuda_compile.py and a GPU run
cover the rest.  The gram and jvp tests place every input between NaN (or token-id) guards, so that reads past
an input's ends show up in the result.

Skips, with the reason, only where the toolchain is missing (CUDA toolkit headers, a C++20 host compiler that
takes the flags below, ninja, Python.h).  With the toolchain present, a failing build is a test failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

import ntk_kernels
from ntk_kernels import _backend
from ntk_kernels.ops import dropout_keep_mask, linchain_ref
from ntk_kernels.ops.linchain import NEEDS, CompiledKernels, _bwd_reference, _fwd_reference, compute_dtype
from ntk_kernels.ops import jvp as J
from ntk_kernels.ops.ntk_gram import MODES, gram_contract_ref
from _compare import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
COMMON_DIR = os.path.join(ROOT, "csrc", "common")
EMU_DIR = os.path.join(ROOT, "tests", "cuda_emu")
# (kernels, binding) of every CUDA op; linchain_binding.cpp defines the library (TORCH_LIBRARY), the others add
# fragments (TORCH_LIBRARY_FRAGMENT)
SOURCES = [(os.path.join(CUDA_DIR, "linchain_kernels.cu"), os.path.join(CUDA_DIR, "linchain_binding.cpp")),
           (os.path.join(CUDA_DIR, "gram_kernels.cu"), os.path.join(CUDA_DIR, "gram_binding.cpp")),
           (os.path.join(CUDA_DIR, "jvp_kernels.cu"), os.path.join(CUDA_DIR, "jvp_binding.cpp"))]
OPS = ("linchain_fwd", "linchain_bwd", "gram_contract", "linear_jvp", "layer_norm_jvp")  # what the emulated extension must register
BUILD_DIR = os.path.join(ROOT, "build", "cuda_emu")  # build/ is in .gitignore
EXT_NAME = "ntk_kernels_cuda_emulated"
NS = "ntk_cuda_emu"
CXXFLAGS = [
    "-O2", "-fno-strict-aliasing",
    "-fsanitize=alignment,bounds",  # handlers in emu.h: misaligned float4 / double2, shared-array bounds
    # as torch's CUDAExtension compiles .cu files: no implicit half / bfloat16 conversions
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


class RewriteError(AssertionError):
    """The real source has a construct the mechanical rewrite does not handle: update the rewrite or emu.h."""


# ------------------------------------------------------------------------------------------- the rewrite
def _split_top_level(text: str) -> list:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _rewrite_launches(src: str) -> tuple:
    """kernel<<<grid, block[, smem[, stream]]>>>(args) -> ::emu::launch("kernel", grid, block, smem, stream, kernel, args)."""
    out, pos, kernels = [], 0, []
    while (j := src.find("<<<", pos)) >= 0:
        k = j
        if src[k - 1] == ">":  # template arguments: walk back to the matching '<'
            depth = 0
            while True:
                k -= 1
                if k < pos:
                    raise RewriteError(f"unbalanced template arguments before <<< at offset {j}")
                depth += {">": 1, "<": -1}.get(src[k], 0)
                if depth == 0:
                    break
        m = re.search(r"[A-Za-z_][\w:]*\s*$", src[pos:k])
        if m is None:
            raise RewriteError(f"no kernel name before <<< at offset {j}")
        start = pos + m.start()
        kernel = " ".join(src[start:j].split())
        end = src.find(">>>", j)
        config = _split_top_level(src[j + 3:end])
        if not 2 <= len(config) <= 4:
            raise RewriteError(f"launch of {kernel}: expected <<<grid, block[, smem[, stream]]>>>, got {config}")
        grid, block = config[:2]
        smem = config[2] if len(config) > 2 else "0"
        stream = config[3] if len(config) > 3 else "nullptr"
        m = re.compile(r"\s*\(\s*(\))?").match(src, end + 3)
        if m is None:
            raise RewriteError(f"launch of {kernel}: no argument list after >>>")
        newlines = src[start:m.end()].count("\n")  # keep the line numbers of everything after it
        call = f'::emu::launch("{kernel}", {grid}, {block}, {smem}, {stream}, {kernel}'
        call += ")" if m.group(1) else ", "
        out += [src[pos:start], call, "\n" * newlines]
        pos = m.end()
        kernels.append(kernel)
    out.append(src[pos:])
    return "".join(out), kernels


_SHARED = re.compile(r"(\bextern\s+)?\b__shared__\b([^;]*);")


def _rewrite_shared(src: str) -> tuple:
    """__shared__ __align__(n) T name[d1][d2]; -> EMU_SHARED(name, n, [d1][d2], T);"""
    names = []

    def one(m):
        decl = " ".join(m.group(0).split())
        if m.group(1):
            raise RewriteError(f"dynamic shared memory is not emulated: {decl}")
        body = m.group(2)
        align = re.search(r"__align__\s*\(\s*(\d+)\s*\)", body)
        body = re.sub(r"__align__\s*\(\s*\d+\s*\)", " ", body).strip()
        d = re.fullmatch(r"(?P<type>[^=\[\]]+?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\[\]]+\]\s*)+)", body, re.S)
        if d is None or "," in d.group("dims") or re.search(r"\]\s*,", body):
            raise RewriteError(f"cannot rewrite this __shared__ declaration (one array per declaration, no "
                               f"initialiser): {decl}")
        names.append(d.group("name"))
        return (f"EMU_SHARED({d.group('name')}, {align.group(1) if align else 1}, "
                f"{' '.join(d.group('dims').split())}, {' '.join(d.group('type').split())});")

    return _SHARED.sub(one, src), names


_LOCAL_CUH = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+\.cuh)"[ \t]*$', re.M)


def _inline_cuda_headers(src: str, path: str, seen=()) -> str:
    """#include "x.cuh" (next to path) -> x.cuh's text, itself inlined, between #line directives, so that the rewrite
    below also reaches the device code in the headers the kernels share (csrc/cuda/dtype_utils.cuh) and the
    generated source changes (and ninja rebuilds it) when such a header does."""
    def one(m):
        header = os.path.join(os.path.dirname(path), m.group(1))
        if not os.path.exists(header):
            raise RewriteError(f"{path}: included header {m.group(1)} not found next to it")
        if header in seen:
            raise RewriteError(f"{path}: {m.group(1)} includes itself")
        with open(header) as f:
            text = _inline_cuda_headers(f.read(), header, (*seen, header))
        line = src.count("\n", 0, m.start()) + 2  # the line after the #include
        return f'#line 1 "{header}"\n{text}\n#line {line} "{path}"'

    return _LOCAL_CUH.sub(one, src)


def rewrite_kernels(src: str, path: str) -> str:
    src = _inline_cuda_headers(src, path)
    src, kernels = _rewrite_launches(src)
    src, shared = _rewrite_shared(src)
    if not kernels or "<<<" in src:
        raise RewriteError(f"{path}: found {len(kernels)} launches to rewrite, {src.count('<<<')} left")
    if not shared:
        raise RewriteError(f"{path}: no __shared__ declarations found (has the kernel source changed?)")
    # the #line directive: compile errors, __syncthreads lines and sanitizer reports name the real file
    return f'#include "emu.h"\n#line 1 "{path}"\n{src}'


def rewrite_binding(src: str, path: str) -> str:
    lines, included = [], False
    for line in src.split("\n"):
        if re.match(r'\s*#\s*include\s*[<"](c10/cuda|ATen/cuda)/', line):
            lines.append("" if included else '#include "emu_stream.h"')  # same line count
            included = True
        else:
            lines.append(line)
    out = "\n".join(lines)
    out = out.replace("c10::cuda::CUDAGuard", "emu::CUDAGuard")
    out = out.replace("c10::cuda::getCurrentCUDAStream", "emu::getCurrentCUDAStream")
    out = out.replace(".is_cuda()", ".is_cpu()")
    out, n_def = re.subn(r"\bTORCH_LIBRARY\(\s*ntk_cuda\s*,", f"TORCH_LIBRARY({NS},", out)
    out, n_frag = re.subn(r"\bTORCH_LIBRARY_FRAGMENT\(\s*ntk_cuda\s*,", f"TORCH_LIBRARY_FRAGMENT({NS},", out)
    out, n_impl = re.subn(r"\bTORCH_LIBRARY_IMPL\(\s*ntk_cuda\s*,\s*CUDA\s*,", f"TORCH_LIBRARY_IMPL({NS}, CPU,", out)
    left = sorted(set(re.findall(r"\b(?:c10|at)::cuda::\w+", out)))
    left += re.findall(r"\bTORCH_LIBRARY\w*\(\s*ntk_cuda\s*,[^)]*\)", out)  # e.g. an IMPL for another key
    if not included or n_def + n_frag != 1 or n_impl != 1 or left:
        raise RewriteError(f"{path}: the binding rewrite is out of date (CUDA includes replaced: {included}, "
                           f"TORCH_LIBRARY: {n_def}, TORCH_LIBRARY_FRAGMENT: {n_frag}, TORCH_LIBRARY_IMPL(ntk_cuda, "
                           f"CUDA): {n_impl}, CUDA names left: {left})")
    return f'#line 1 "{path}"\n{out}'


def _write_if_changed(path: str, text: str) -> None:
    """Unchanged generated sources keep their mtime, so ninja does not rebuild them."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------- the build
def _cuda_include():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        candidates.insert(2, CUDA_HOME)
    except Exception:  # noqa: BLE001  (torch's lookup itself may fail without a toolkit)
        pass
    for home in filter(None, candidates):
        inc = os.path.join(home, "include")
        if all(os.path.exists(os.path.join(inc, h)) for h in ("cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h")):
            return inc
    return None


_PROBE = r"""
#if __cplusplus < 202002L
#error "C++20 needed (torch's headers)"
#endif
#include <ucontext.h>
#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <map>
#include <mutex>
#include <tuple>
float probe(float v) {
  ucontext_t c;
  getcontext(&c);
  const __half h = __float2half_rn(v);
  const __nv_bfloat16 b = __float2bfloat16_rn(v);
  float a[4] = {v, v, v, v};
  const float4 q = *reinterpret_cast<const float4*>(a);
  return __half2float(h) + __bfloat162float(b) + q.x;
}
"""


def _toolchain_problem(tmp_dir: str):
    """Why the emulated build cannot be attempted here (None: everything it needs is present)."""
    from torch.utils import cpp_extension

    inc = _cuda_include()
    if inc is None:
        return ("CUDA toolkit headers not found (cuda_runtime_api.h, cuda_fp16.h, cuda_bf16.h under "
                "$CUDA_HOME/include, $CUDA_PATH/include or /usr/local/cuda/include)")
    if not cpp_extension.is_ninja_available():
        return "ninja not found (torch.utils.cpp_extension.load needs it)"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return f"Python.h not found in {sysconfig.get_paths()['include']} (Python development headers)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"host C++ compiler {cxx!r} not found"
    probe = os.path.join(tmp_dir, "probe.cpp")
    with open(probe, "w") as f:
        f.write(_PROBE)
    cmd = [cxx, "-std=c++20", *CXXFLAGS, "-I", inc, "-c", probe, "-o", os.path.join(tmp_dir, "probe.o")]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"host compiler probe could not run: {e}"
    if res.returncode != 0:
        return (f"host compiler cannot build the emulation (C++20, <ucontext.h>, -fsanitize=alignment,bounds, "
                f"the CUDA headers in {inc}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return None


def _build(tmp_dir: str) -> None:
    from torch.utils import cpp_extension

    build_dir = BUILD_DIR
    try:
        os.makedirs(os.path.join(build_dir, "src"), exist_ok=True)
    except OSError:  # a read-only checkout: build in pytest's temporary directory instead
        build_dir = tmp_dir
        os.makedirs(os.path.join(build_dir, "src"), exist_ok=True)
    sources = []
    for kernels_src, binding_src in SOURCES:
        for src, rewrite in ((binding_src, rewrite_binding), (kernels_src, rewrite_kernels)):
            with open(src) as f:
                text = rewrite(f.read(), src)
            path = os.path.join(build_dir, "src", os.path.splitext(os.path.basename(src))[0] + "_emu.cpp")
            _write_if_changed(path, text)
            sources.append(path)
    try:
        cpp_extension.load(name=EXT_NAME, sources=sources, extra_cflags=CXXFLAGS,
                           extra_include_paths=[EMU_DIR, CUDA_DIR, COMMON_DIR, _cuda_include()],
                           build_directory=build_dir, verbose=False)
    except Exception as e:  # noqa: BLE001  the toolchain is there, so this is the sources' fault
        pytest.fail(f"the emulated CUDA sources do not build (the toolchain passed its probe, so this is a "
                    f"real error in csrc/cuda, tests/cuda_emu or the rewrite):\n{str(e)[-20000:]}", pytrace=False)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    tmp_dir = str(tmp_path_factory.mktemp("cuda_emu"))
    problem = _toolchain_problem(tmp_dir)
    if problem is not None:
        pytest.skip(f"CUDA host emulation not built: {problem}")
    if not all(hasattr(getattr(torch.ops, NS), op) for op in OPS):
        _build(tmp_dir)
    return CompiledKernels(NS)


# ------------------------------------------------------------------------------------------- the checks
SCALING = 0.7


def _inputs(N, d_in, d_out, r, chain, bias, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    return dict(x=rnd(N, d_in), weight=rnd(d_out, d_in, scale=d_in ** -0.5), bias=rnd(d_out) if bias else None,
                lora_A=rnd(r, d_in, scale=d_in ** -0.5),
                chain=rnd(r, r, scale=r ** -0.5) + torch.eye(r, dtype=torch.float64) if chain else None,
                lora_B=rnd(d_out, r, scale=r ** -0.5), grad_y=rnd(N, d_out))


def _cast(inputs, dtype):
    return {k: None if v is None else v.to(dtype) for k, v in inputs.items()}


def check_against_reference(kernels, inputs, dtype, p, seed, needs=(True,) * 6):
    """Forward (y, u) and the backward's gradients of the emulated op against _fwd/_bwd_reference in float64
    (and, for fp16 / bf16, against the same reference in dtype, whose error sets the budget)."""
    t = _cast(inputs, dtype)
    t64 = _cast(t, torch.float64)  # the rounded inputs: input quantisation is not the kernels' error
    low = dtype in (torch.float16, torch.bfloat16)
    fwd_args = lambda d: (d["x"], d["weight"], d["bias"], d["lora_A"], d["chain"], d["lora_B"], SCALING, p, seed)  # noqa: E731

    y, u = kernels.forward(*fwd_args(t))
    y64, u64 = _fwd_reference(*fwd_args(t64))
    y_lp, u_lp = _fwd_reference(*fwd_args(t)) if low else (None, None)
    assert y.dtype == dtype and tuple(y.shape) == tuple(y64.shape)
    assert u.dtype == compute_dtype(dtype) and tuple(u.shape) == tuple(u64.shape)
    assert_close(y, y64, dtype, y_lp, "y")
    assert_close(u, u64, u.dtype, None, "u")

    needs = list(needs)
    needs[2] = needs[2] and t["bias"] is not None  # as the op's autograd asks
    needs[4] = needs[4] and t["chain"] is not None

    def bwd(d, u_):
        return (d["grad_y"], d["x"], d["weight"], d["lora_A"], d["chain"], d["lora_B"], u_, SCALING, p, seed, needs)

    grads = kernels.backward(*bwd(t, u))
    g64 = _bwd_reference(*bwd(t64, u64))
    g_lp = _bwd_reference(*bwd(t, u_lp)) if low else [None] * 6
    assert len(grads) == 6
    for name, need, g, r, lp in zip(NEEDS, needs, grads, g64, g_lp):
        if not need:
            assert g.numel() == 0, f"grad {name} was not asked for but has shape {tuple(g.shape)}"
            continue
        assert g.dtype == dtype, name
        assert_close(g, r, dtype, lp, f"grad {name}")


# (N, d_in, d_out, r): one row; odd sizes; exact tiles (32-row project tiles, 64 x 64 grad_x tiles);
# r across the rank tiles 16 / 32 / 64 and above 64 (several rank tiles, separate chain kernel); N = 130 runs
# grad_proj in two splits, N = 257 in three (the last of one row).  Small: every emulated block is 256 fibers.
SHAPES = [(1, 1, 1, 1), (37, 53, 29, 5), (64, 64, 32, 16), (33, 70, 9, 33), (130, 67, 96, 64), (5, 40, 7, 70),
          (257, 33, 20, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-din{}-dout{}-r{}".format(*s))
@pytest.mark.parametrize("chain,bias,p", [(False, True, 0.0), (True, False, 0.0), (False, False, 0.3),
                                          (True, True, 0.3)], ids=["lora-bias", "chain", "lora-dropout",
                                                                   "chain-bias-dropout"])
def test_float64_matches_reference(emu, shape, chain, bias, p):
    N, d_in, d_out, r = shape
    check_against_reference(emu, _inputs(N, d_in, d_out, r, chain, bias, seed=N * 1000 + r), torch.float64, p,
                            seed=1234)


@pytest.mark.parametrize("needs", [(False, False, False, True, False, True), (True, False, False, False, True, False),
                                   (True, True, True, False, False, False), (False, False, False, False, True, True),
                                   (False,) * 6], ids=["adapter-only", "gx-gM", "base-only", "gM-gB", "none"])
def test_partial_needs(emu, needs):
    check_against_reference(emu, _inputs(37, 53, 29, 5, True, True, seed=5), torch.float64, 0.3, seed=77,
                            needs=needs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,chain,p", [((37, 53, 29, 5), True, 0.25), ((70, 130, 65, 40), False, 0.0),
                                           ((33, 70, 9, 70), True, 0.1)], ids=["r5", "r40", "r70"])
def test_low_precision(emu, dtype, shape, chain, p):
    N, d_in, d_out, r = shape
    check_against_reference(emu, _inputs(N, d_in, d_out, r, chain, True, seed=r), dtype, p, seed=4321)


@pytest.mark.parametrize("dtype,n", [(torch.float64, 130), (torch.float32, 70), (torch.bfloat16, 40)], ids=str)
@pytest.mark.parametrize("seed", [5, 0xDEADBEEF])
def test_dropout_mask_is_the_hash_bit_for_bit(emu, dtype, n, seed):
    """x = 1 and identity adapters make every kernel print its mask: u = keep / (1 - p) (project), gx = keep /
    (1 - p) (grad_x), gA = keep / (1 - p) (grad_proj, whose row hashes go through __shfl_sync)."""
    p = 0.3
    keep = dropout_keep_mask(seed, n, n, p)
    assert 0 < keep.sum() < n * n
    ones, eye, zeros = (f(n, n, dtype=dtype) for f in (torch.ones, torch.eye, torch.zeros))
    scale = torch.tensor(1.0 / (1.0 - p), dtype=compute_dtype(dtype))

    def expect(d):
        return torch.where(keep, scale.to(d), torch.zeros((), dtype=d))

    _, u = emu.forward(ones, zeros, None, eye, None, eye, 1.0, p, seed)
    assert torch.equal(u != 0, keep), "project: dropout mask differs from dropout_keep_mask"
    assert torch.equal(u, expect(u.dtype))
    # gx = gy W + keep * (gu A) / (1 - p) with W = 0, gu = gy B = 1, A = I
    gx = emu.backward(ones, ones, zeros, eye, None, eye, u, 1.0, p, seed, [True] + [False] * 5)[0]
    assert torch.equal(gx != 0, keep), "grad_x: dropout mask differs from dropout_keep_mask"
    assert torch.equal(gx, expect(dtype))
    # gA = gu^T dropout(x) with gu = gy B = I, x = 1
    gA = emu.backward(eye, ones, zeros, eye, None, eye, u, 1.0, p, seed, [False] * 3 + [True, False, False])[3]
    assert torch.equal(gA != 0, keep), "grad_proj: dropout mask differs from dropout_keep_mask"
    assert torch.equal(gA, expect(dtype))


def test_linchain_linear_runs_the_emulated_backend(emu, monkeypatch):
    """The whole op path (custom op, autograd, chain folding, 3-D non-contiguous x) with the CUDA backend's
    binding and kernels forced in, against linchain_ref under autograd."""
    monkeypatch.setitem(_backend._REGISTRY["linchain"], "cuda", _backend.Kernel("cuda", emu, lambda device, dtype: []))
    monkeypatch.setenv("NTK_KERNELS_BACKEND_LINCHAIN", "cuda")
    assert _backend.choose("linchain", torch.device("cpu"), torch.float64).fn is emu
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    for p, k in [(0.0, 0), (0.2, 2)]:
        x = rnd(13, 3, 24).transpose(0, 1).requires_grad_()
        W, b, A, B = (rnd(*s).requires_grad_() for s in [(17, 24), (17,), (6, 24), (17, 6)])
        C = [(rnd(6, 6) * 0.4 + torch.eye(6, dtype=torch.float64)).requires_grad_() for _ in range(k)]
        inputs = [x, W, b, A, *C, B]
        y = ntk_kernels.linchain_linear(x, W, b, A, C, B, 0.5, p, training=True, seed=99)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
        grads = torch.autograd.grad(y, inputs, gy)
        y_ref = linchain_ref(x, W, b, A, C, B, 0.5, p, 99)
        grads_ref = torch.autograd.grad(y_ref, inputs, gy)
        assert_close(y, y_ref, torch.float64, name="y")
        for i, (a, e) in enumerate(zip(grads, grads_ref)):
            assert_close(a, e, torch.float64, name=f"grad of input {i}")


def test_binding_checks_inputs(emu):
    x, W, A, B = torch.randn(4, 8), torch.randn(3, 8), torch.randn(2, 8), torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        emu.forward(x, W, None, A, None, B, 1.0, 1.0, 0)
    with pytest.raises(RuntimeError, match="lora_B must have shape"):
        emu.forward(x, W, None, A, None, B.t().contiguous(), 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="must be float16, bfloat16, float32 or float64"):
        emu.forward(x.int(), W.int(), None, A.int(), None, B.int(), 1.0, 0.0, 0)


# ------------------------------------------------------------------------------------ ntk::gram_contract
def _gram_inputs(I, J, C, T, S, D, E, ids, seed, vocab=4):
    """float64 inputs; token ids from a small vocabulary (many repeats, within and across samples)."""
    g = torch.Generator().manual_seed(seed)
    if ids:
        a1, a2 = torch.randint(0, vocab, (I, T), generator=g), torch.randint(0, vocab, (J, S), generator=g)
    else:
        a1 = torch.randn(I, T, D, generator=g, dtype=torch.float64) * max(D, 1) ** -0.5
        a2 = torch.randn(J, S, D, generator=g, dtype=torch.float64) * max(D, 1) ** -0.5
    g1 = torch.randn(I, C, T, E, generator=g, dtype=torch.float64) * max(E, 1) ** -0.5
    g2 = torch.randn(J, C, S, E, generator=g, dtype=torch.float64) * max(E, 1) ** -0.5
    return a1, g1, a2, g2


def _guarded(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous view into a larger buffer filled with NaN (floats) or 0 (a frequent token id) on both
    sides: the emulation cannot bounds-check global memory, but a read past either end of an input shows up as
    a non-finite or wrong result."""
    n = t.numel()
    pad = n + 512
    fill = float("nan") if t.is_floating_point() else 0
    buf = torch.full((n + 2 * pad,), fill, dtype=t.dtype)
    buf[pad:pad + n] = t.reshape(-1)
    view = buf[pad:pad + n].view(t.shape)
    assert view.is_contiguous() and (n == 0 or view.data_ptr() == buf.data_ptr() + pad * t.element_size())
    return view


def _emu_gram(a1, g1, a2, g2, mode: str):
    return getattr(torch.ops, NS).gram_contract(a1, g1, a2, g2, MODES.index(mode))


def check_gram(inputs, dtype, mode):
    """The emulated kernel (or, for T = S = 1, the binding's GEMM path) on dtype inputs against
    gram_contract_ref: in float64 on the same (rounded) inputs, to the accumulate dtype's floor (the kernels'
    own error), and for fp16 / bf16 also against the unrounded inputs under assert_close's low-precision rule."""
    a1, g1, a2, g2 = inputs
    ids = not a1.is_floating_point()
    cast = (lambda t: t) if ids else (lambda t: t.to(dtype))  # noqa: E731
    x1, y1, x2, y2 = cast(a1), g1.to(dtype), cast(a2), g2.to(dtype)
    out = _emu_gram(*(_guarded(t) for t in (x1, y1, x2, y2)), mode)
    acc = compute_dtype(dtype)
    assert out.dtype == acc
    up = (lambda t: t) if ids else (lambda t: t.double())  # noqa: E731
    ref = gram_contract_ref(up(x1), y1.double(), up(x2), y2.double(), mode)
    assert_close(out, ref, acc, None, f"{mode}, {dtype} inputs rounded")
    if dtype in (torch.float16, torch.bfloat16):
        ref_lp = gram_contract_ref(x1, y1, x2, y2, mode)
        assert_close(out, gram_contract_ref(a1, g1, a2, g2, mode), dtype, ref_lp, mode)


# (I, J, C, T, S, D, E).  Tiles (fp32 / fp64): TT = 32 t rows, SS = 64 s columns, BE = 64 / 32 e columns,
# BS = 16 s rows per G2 stage, BD = 32 / 16 d columns per A stage; C picks the reduction layout (1: 8 warps
# per output, 2: 4, 3-4: 2, >= 5: one warp owns c, c + 8, ...).  T = S = 1 is the binding's GEMM path.
GRAM_SHAPES = [
    (2, 3, 3, 5, 7, 9, 11),      # odd, T != S, I != J, C = 3
    (1, 2, 1, 1, 4, 3, 5),       # T = 1, C = 1
    (2, 1, 2, 6, 1, 40, 33),     # S = 1, D over two A stages, E over two fp64 chunks, C = 2
    (2, 1, 6, 37, 70, 20, 70),   # two t tiles (the second of 5 rows), two s tiles (of 64 and 6), E over chunks
    (1, 2, 9, 3, 17, 1, 2),      # C = 9 (warp 0 owns c = 0 and 8), D = 1, an s stage of one row
    (1, 1, 4, 32, 64, 32, 64),   # exact tiles
    (1, 1, 1, 1, 1, 3, 7),       # T = S = 1 (GEMMs)
    (3, 2, 3, 1, 1, 5, 4),       # T = S = 1, C = 3
]


def _shape_id(s):
    return "I{}-J{}-C{}-T{}-S{}-D{}-E{}".format(*s)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ids", [False, True], ids=["features", "ids"])
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=_shape_id)
def test_gram_float64_matches_reference(emu, shape, ids, mode):
    check_gram(_gram_inputs(*shape, ids=ids, seed=sum(shape)), torch.float64, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ids", [False, True], ids=["features", "ids"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 5, 7, 9, 11), (1, 1, 6, 37, 70, 20, 70), (3, 2, 3, 1, 1, 5, 4)],
                         ids=_shape_id)
def test_gram_low_precision(emu, shape, ids, mode, dtype):
    check_gram(_gram_inputs(*shape, ids=ids, seed=7), dtype, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gram_one_token_id(emu, mode):
    """Every id equal (A_i A_jᵀ all ones) and every id distinct across samples (all zeros)."""
    a1, g1, a2, g2 = _gram_inputs(2, 2, 2, 9, 5, 0, 6, ids=True, seed=3)
    check_gram((torch.zeros_like(a1), g1, torch.zeros_like(a2), g2), torch.float64, mode)
    out = _emu_gram(torch.zeros_like(a1), g1, torch.ones_like(a2), g2, mode)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("shape", [(0, 2, 2, 3, 4, 5, 6), (2, 2, 0, 3, 4, 5, 6), (2, 2, 2, 0, 4, 5, 6),
                                   (2, 2, 2, 3, 4, 5, 0), (2, 2, 2, 3, 4, 0, 6)], ids=_shape_id)
@pytest.mark.parametrize("mode", MODES)
def test_gram_empty_dims(emu, shape, mode):
    """Empty outputs, and zero-length sums (T, E, D = 0: the output is zeros, written by the kernel)."""
    check_gram(_gram_inputs(*shape, ids=False, seed=1), torch.float64, mode)


def test_gram_contract_runs_the_emulated_backend(emu, monkeypatch):
    """The whole op path (checks, int32 ids, non-contiguous inputs, custom op) with the CUDA backend's binding
    and kernel forced in, against gram_contract_ref."""
    monkeypatch.setitem(_backend._REGISTRY["gram"], "cuda", _backend.Kernel("cuda", _emu_gram, lambda d, t: []))
    monkeypatch.setenv("NTK_KERNELS_BACKEND_GRAM", "cuda")
    assert _backend.choose("gram", torch.device("cpu"), torch.float64).fn is _emu_gram
    a1, g1, a2, g2 = _gram_inputs(3, 2, 2, 6, 4, 5, 7, ids=False, seed=11)
    nc = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731  same values, not contiguous
    for mode in MODES:
        assert_close(ntk_kernels.ops.gram_contract(nc(a1), nc(g1), nc(a2), nc(g2), mode),
                     gram_contract_ref(a1, g1, a2, g2, mode), torch.float64, name=mode)
        ids1, ids2 = torch.randint(0, 3, (3, 6), dtype=torch.int32), torch.randint(0, 3, (2, 4), dtype=torch.int32)
        assert_close(ntk_kernels.ops.gram_contract(ids1, g1, ids2, g2, mode),
                     gram_contract_ref(ids1.long(), g1, ids2.long(), g2, mode), torch.float64, name=f"{mode} ids")


def test_gram_binding_checks_inputs(emu):
    a1, g1, a2, g2 = _gram_inputs(2, 3, 2, 4, 5, 6, 7, ids=False, seed=0)
    op = getattr(torch.ops, NS).gram_contract
    with pytest.raises(RuntimeError, match="mode must be 0"):
        op(a1, g1, a2, g2, 3)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        op(a1, g1, a2, g2.float(), 0)
    with pytest.raises(RuntimeError, match="must be float16, bfloat16, float32 or float64"):
        op(a1.int(), g1.int(), a2.int(), g2.int(), 0)
    with pytest.raises(RuntimeError, match="with g1's C"):
        op(a1, g1, a2, g2[:, :1].contiguous(), 0)
    with pytest.raises(RuntimeError, match="leading dims"):
        op(a1[:, :3].contiguous(), g1, a2, g2, 0)
    with pytest.raises(RuntimeError, match="one D"):
        op(a1, g1, a2[..., :2].contiguous(), g2, 0)
    with pytest.raises(RuntimeError, match="both be token ids"):
        op(torch.zeros(2, 4, dtype=torch.long), g1, a2, g2, 0)


# ------------------------------------------------------------------------------ ntk::linear_jvp, layer_norm_jvp
def _g(t):
    return None if t is None else _guarded(t)


def _linear_jvp_inputs(N, L, K, O, xd, wd, bias, bd, transposed, seed):
    """float64 x, W, b, ẋ, Ẇ, ḃ (wd / bd: None, "shared" or "sample"); transposed: W and a shared Ẇ as the
    transposed views of (d_in, d_out) tensors, a per-sample Ẇ as a (N, d_in, d_out) tensor's transposed view."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * max(K, 1) ** -0.5  # noqa: E731
    W = rnd(K, O).t() if transposed else rnd(O, K)
    wdot = {None: None, "shared": rnd(K, O).t() if transposed else rnd(O, K),
            "sample": rnd(N, K, O).transpose(1, 2) if transposed else rnd(N, O, K)}[wd]
    bdot = {None: None, "shared": rnd(O), "sample": rnd(N, O)}[bd]
    x = torch.randn(N, L, K, generator=g, dtype=torch.float64)
    xdot = torch.randn(N, L, K, generator=g, dtype=torch.float64) if xd else None
    return [x, W, rnd(O) if bias else None, xdot, wdot, bdot]


def _guarded_keep_strides(t):
    """A guarded copy with t's strides pattern for the transposed views (the kernels read W, Ẇ through strides)."""
    if t is None or t.is_contiguous():
        return _g(t)
    perm = sorted(range(t.ndim), key=lambda d: -t.stride(d))  # the order of the underlying contiguous tensor
    base = _guarded(t.permute(*perm).contiguous())
    return base.permute(*[perm.index(d) for d in range(t.ndim)])


def check_linear_jvp(inputs, dtype):
    t = [None if a is None else a.to(dtype) for a in inputs]
    g = [_guarded_keep_strides(a) for a in t]
    for a, b in zip(g, t):
        assert a is None or (torch.equal(a, b) and (a.numel() == 0 or a.stride() == b.stride()))
    y, yd = getattr(torch.ops, NS).linear_jvp(*g)
    ref = J.linear_jvp_ref(*[None if a is None else a.double() for a in t])
    low = J.linear_jvp_ref(*t) if dtype in (torch.float16, torch.bfloat16) else (None, None)
    for o, r, lo, name in zip((y, yd), ref, low, ("y", "y_dot")):
        assert o.dtype == dtype and o.shape == r.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        assert_close(o, r, dtype, lo, f"linear_jvp {name} ({dtype})")


# (N, L, d_in, d_out): odd, one tile; one element; two column tiles and three k chunks; L over two row tiles of
# one sample (per-sample Ẇ) and M over three shared row tiles; d_in = 0 (y = b, ẏ = ḃ)
LINEAR_JVP_SHAPES = [(2, 5, 37, 21), (1, 1, 1, 1), (3, 2, 40, 70), (2, 70, 5, 9), (2, 3, 0, 4)]
# (xd, wd, bias, bd, transposed)
LINEAR_JVP_COMBOS = [(True, "shared", True, "shared", False), (True, "sample", True, "sample", True),
                     (False, "sample", False, None, False), (True, None, False, "sample", True),
                     (False, None, True, None, False), (False, "shared", True, "sample", True)]


@pytest.mark.parametrize("combo", LINEAR_JVP_COMBOS,
                         ids=lambda c: f"xd{int(c[0])}-wd_{c[1]}-b{int(c[2])}-bd_{c[3]}" + ("-WT" if c[4] else ""))
@pytest.mark.parametrize("shape", LINEAR_JVP_SHAPES, ids=lambda s: "N{}-L{}-din{}-dout{}".format(*s))
def test_linear_jvp_float64_matches_reference(emu, shape, combo):
    check_linear_jvp(_linear_jvp_inputs(*shape, *combo, seed=sum(shape)), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("combo", [LINEAR_JVP_COMBOS[0], LINEAR_JVP_COMBOS[1]], ids=["shared", "sample-WT"])
def test_linear_jvp_low_precision(emu, dtype, combo):
    check_linear_jvp(_linear_jvp_inputs(2, 9, 40, 19, *combo, seed=3), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,combo", [((2, 70, 20, 130), LINEAR_JVP_COMBOS[1]), ((3, 50, 37, 21), LINEAR_JVP_COMBOS[0]),
                                         ((2, 3, 33, 129), LINEAR_JVP_COMBOS[5]), ((1, 1, 1, 1), LINEAR_JVP_COMBOS[3])],
                         ids=["sample-2x2-tiles", "shared-3-row-tiles", "WT-2-col-tiles", "one"])
def test_linear_jvp_tensor_cores(emu, dtype, shape, combo):
    """fp16 / bf16 run the wmma kernel (64 x 128 tiles, k chunks of 16): several row tiles of one sample (per-sample
    Ẇ), several shared row tiles, a column tile of one column, partial k chunks."""
    check_linear_jvp(_linear_jvp_inputs(*shape, *combo, seed=sum(shape)), dtype)


def _norm_inputs(N, L, D, rms, w, b, xd, wd, bd, seed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b = b and not rms
    vec = lambda kind: {None: None, "shared": rnd(D), "sample": rnd(N, D)}[kind]  # noqa: E731
    return [rnd(N, L, D) * 2.0 + 0.7, rnd(D) if w else None, rnd(D) if b else None, 1e-5,
            rnd(N, L, D) if xd else None, vec(wd) if w else None, vec(bd) if b else None, rms]


def check_layer_norm_jvp(inputs, dtype):
    t = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in inputs]
    y, yd = getattr(torch.ops, NS).layer_norm_jvp(*[_g(a) if isinstance(a, torch.Tensor) else a for a in t])
    ref = J.layer_norm_jvp_ref(*[a.double() if isinstance(a, torch.Tensor) else a for a in t])
    low = J.layer_norm_jvp_ref(*t) if dtype in (torch.float16, torch.bfloat16) else (None, None)
    for o, r, lo, name in zip((y, yd), ref, low, ("y", "y_dot")):
        assert o.dtype == dtype and o.shape == r.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        assert_close(o, r, dtype, lo, f"layer_norm_jvp {name} ({dtype})")


# (N, L, D): rows of one element, of 33 (a lane with two elements) and 70; M = 15 over two blocks of 8 warps
NORM_JVP_SHAPES = [(3, 5, 70), (2, 1, 1), (1, 9, 33)]
# (rms, w, b, xd, wd, bd)
NORM_JVP_COMBOS = [(False, True, True, True, "shared", "shared"), (False, True, True, True, "sample", "sample"),
                   (True, True, False, True, "sample", None), (True, False, False, True, None, None),
                   (False, False, False, True, None, None), (False, True, True, False, "shared", "sample"),
                   (True, True, False, False, "shared", None)]


@pytest.mark.parametrize("combo", NORM_JVP_COMBOS, ids=lambda c: ("rms" if c[0] else "ln") +
                         f"-w{int(c[1])}-b{int(c[2])}-xd{int(c[3])}-wd_{c[4]}-bd_{c[5]}")
@pytest.mark.parametrize("shape", NORM_JVP_SHAPES, ids=lambda s: "N{}-L{}-D{}".format(*s))
def test_layer_norm_jvp_float64_matches_reference(emu, shape, combo):
    check_layer_norm_jvp(_norm_inputs(*shape, *combo, seed=sum(shape)), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_layer_norm_jvp_low_precision(emu, dtype, rms):
    check_layer_norm_jvp(_norm_inputs(2, 5, 70, rms, True, True, True, "sample", "shared", seed=4), dtype)


def test_jvp_ops_run_the_emulated_backend(emu, monkeypatch):
    """The public ops (flattening (N, *, d) inputs, non-contiguous tangents, the custom ops) with the CUDA
    backend's binding and kernels forced in, against the references and torch.func.jvp."""
    ns = getattr(torch.ops, NS)
    for op, fn in (("linear_jvp", ns.linear_jvp), ("layer_norm_jvp", ns.layer_norm_jvp)):
        monkeypatch.setitem(_backend._REGISTRY[op], "cuda", _backend.Kernel("cuda", fn, lambda d, t: []))
        monkeypatch.setenv(f"NTK_KERNELS_BACKEND_{op.upper()}", "cuda")
        assert _backend.choose(op, torch.device("cpu"), torch.float64).fn is fn
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    x, xd = rnd(3, 2, 4, 13), rnd(3, 4, 2, 13).transpose(1, 2)
    W, b, wd, bd = rnd(13, 10).t(), rnd(10), rnd(3, 10, 13), rnd(3, 20)[:, ::2]
    y, yd = J.linear_jvp(x, W, b, xd, wd, bd)
    one = lambda xn, xdn, wdn, bdn: torch.func.jvp(torch.nn.functional.linear, (xn, W, b), (xdn, wdn, bdn))  # noqa
    ry, ryd = torch.func.vmap(one)(x, xd, wd, bd)
    assert_close(y, ry, torch.float64, name="linear_jvp y")
    assert_close(yd, ryd, torch.float64, name="linear_jvp y_dot")
    w, bb, wdd, bdd = rnd(13), rnd(13), rnd(13), rnd(13)
    y, yd = J.layer_norm_jvp(x, w, bb, 1e-5, xd, wdd, bdd)
    ry, ryd = torch.func.jvp(lambda a, p, q: torch.nn.functional.layer_norm(a, (13,), p, q, 1e-5), (x, w, bb),
                             (xd, wdd, bdd))
    assert_close(y, ry, torch.float64, name="layer_norm_jvp y")
    assert_close(yd, ryd, torch.float64, name="layer_norm_jvp y_dot")
    y, yd = J.layer_norm_jvp(x, w, None, 1e-6, xd, wdd, None, rms=True)
    ry, ryd = torch.func.jvp(lambda a, p: torch.nn.functional.rms_norm(a, (13,), p, 1e-6), (x, w), (xd, wdd))
    assert_close(y, ry, torch.float64, name="rms_norm_jvp y")
    assert_close(yd, ryd, torch.float64, name="rms_norm_jvp y_dot")


def test_jvp_binding_checks_inputs(emu):
    ns = getattr(torch.ops, NS)
    x, W = torch.randn(2, 3, 5), torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="x must be 3-D"):
        ns.linear_jvp(x[0], W, None, None, None, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[4, 5\]"):
        ns.linear_jvp(x, W[:, :4], None, None, None, None)
    with pytest.raises(RuntimeError, match="weight_dot must have shape"):
        ns.linear_jvp(x, W, None, None, torch.randn(3, 4, 5), None)
    with pytest.raises(RuntimeError, match="all tensors must share one dtype"):
        ns.linear_jvp(x, W.double(), None, None, None, None)
    with pytest.raises(RuntimeError, match="must be float16, bfloat16, float32 or float64"):
        ns.linear_jvp(x.int(), W.int(), None, None, None, None)
    with pytest.raises(RuntimeError, match="bias_dot must have shape"):
        ns.layer_norm_jvp(x, torch.ones(5), torch.zeros(5), 1e-5, None, None, torch.zeros(3, 5), False)
    with pytest.raises(RuntimeError, match="takes no bias"):
        ns.layer_norm_jvp(x, torch.ones(5), torch.zeros(5), 1e-5, None, None, None, True)
    with pytest.raises(RuntimeError, match="weight_dot needs weight"):
        ns.layer_norm_jvp(x, None, None, 1e-5, None, torch.ones(5), None, False)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        ns.layer_norm_jvp(x, None, None, -1.0, None, None, None, False)
