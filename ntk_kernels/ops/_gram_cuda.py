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


def _cuda_reasons(device, dtype):
    return _ext.cuda_reasons(device, dtype, dtypes=FLOAT_DTYPES, ops=("gram_contract",), kernels="gram_kernels.cu")


def _gram_cuda(a1, g1, a2, g2, mode: str):
    return torch.ops.ntk_cuda.gram_contract(a1, g1, a2, g2, MODES.index(mode))


_backend.register("gram", "cuda", _gram_cuda, _cuda_reasons)
