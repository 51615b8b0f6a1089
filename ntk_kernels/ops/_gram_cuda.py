"""CUDA backend of ``ntk::gram_contract``: torch.ops.ntk_cuda.gram_contract from the compiled ntk_kernels._C_cuda.

csrc/cuda/gram_kernels.cu contracts each pair (i, j) in one block, a (t, s) tile of A_i A_jᵀ at a time in
shared memory (H = (A_i A_jᵀ) G_{j,c'} then ⟨G_{i,c}, H⟩, fp32 / fp64 accumulation, no atomics: bitwise
reproducible); csrc/cuda/gram_binding.cpp checks the inputs and runs T = S = 1 (one position per sample) as
cuBLAS GEMMs instead, (a_i·a_j)(g_ic·g_jc').
"""
from __future__ import annotations

import torch

from .. import _backend, _ext
from .ntk_gram import FLOAT_DTYPES, MODES


def _has_op() -> bool:
    return hasattr(torch.ops, "ntk_cuda") and hasattr(torch.ops.ntk_cuda, "gram_contract")


def _cuda_reasons(device, dtype):
    r = []
    if device.type != "cuda":
        r.append(f"CUDA kernels run on cuda tensors, not {device.type}")
    if dtype not in FLOAT_DTYPES:
        r.append(f"CUDA kernels take float16, bfloat16, float32 or float64, not {dtype}")
    if not _ext.cuda_loaded():
        r.append(f"extension ntk_kernels._C_cuda not loaded ({_ext.status()['_C_cuda']['why']})")
    elif not _has_op():  # an extension built before the gram kernels existed
        r.append("torch.ops.ntk_cuda lacks gram_contract (ntk_kernels._C_cuda predates csrc/cuda/gram_kernels.cu; "
                 "rebuild it)")
    return r


def _gram_cuda(a1, g1, a2, g2, mode: str):
    return torch.ops.ntk_cuda.gram_contract(a1, g1, a2, g2, MODES.index(mode))


_backend.register("gram", "cuda", _gram_cuda, _cuda_reasons)
