"""CUDA backend of ``ntk::linchain``: torch.ops.ntk_cuda.* from the compiled ntk_kernels._C_cuda.

csrc/cuda/linchain_binding.cpp runs the large GEMMs on cuBLAS (y = x Wᵀ + b + s · v Bᵀ, gx = gy W, gW = gyᵀ x,
gM = gvᵀ u) and csrc/cuda/linchain_kernels.cu the fused rest: u = dropout(x) Aᵀ with v = u Mᵀ (and likewise
gv = s · gy B with gu = gv M) in one kernel, the gx epilogue gx += mask ⊙ (gu A) / (1 - p), and the masked
reductions gA = guᵀ dropout(x), gB = s · gyᵀ v.  The dropout mask is regenerated from the hash, never stored.
"""
from __future__ import annotations

import torch

from .. import _backend, _ext
from .linchain import CompiledKernels

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cuda_reasons(device, dtype):
    r = []
    if device.type != "cuda":
        r.append(f"CUDA kernels run on cuda tensors, not {device.type}")
    if dtype not in _DTYPES:
        r.append(f"CUDA kernels take float16, bfloat16, float32 or float64, not {dtype}")
    if not _ext.cuda_loaded():
        r.append(f"extension ntk_kernels._C_cuda not loaded ({_ext.status()['_C_cuda']['why']})")
    return r


_backend.register("linchain", "cuda", CompiledKernels("ntk_cuda"), _cuda_reasons)
