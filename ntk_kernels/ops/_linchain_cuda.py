"""CUDA backend of ``ntk::linchain``: torch.ops.ntk_cuda.* from the compiled ntk_kernels._C_cuda.

csrc/cuda/linchain_binding.cpp runs the large GEMMs on cuBLAS (y = x Wᵀ + b + s · v Bᵀ, gx = gy W, gW = gyᵀ x,
gM = gvᵀ u) and csrc/cuda/linchain_kernels.cu the fused rest: u = dropout(x) Aᵀ with v = u Mᵀ (and likewise
gv = s · gy B with gu = gv M) in one kernel, the gx epilogue gx += mask ⊙ (gu A) / (1 - p), and the masked
reductions gA = guᵀ dropout(x), gB = s · gyᵀ v.  The dropout mask is regenerated from the hash, never stored.
"""
from __future__ import annotations

from .. import _backend, _ext
from .linchain import FLOAT_DTYPES, CompiledKernels


def _cuda_reasons(device, dtype):
    return _ext.cuda_reasons(device, dtype, dtypes=FLOAT_DTYPES)


_backend.register("linchain", "cuda", CompiledKernels("ntk_cuda"), _cuda_reasons)
