"""CUDA backends of ``ntk::linear_jvp`` and ``ntk::layer_norm_jvp``: torch.ops.ntk_cuda.linear_jvp / layer_norm_jvp
from the compiled ntk_kernels._C_cuda.

csrc/cuda/jvp_kernels.cu: linear_jvp as one tiled kernel (64 x 64 tiles of y and ẏ, d_in in chunks of 16 staged in
shared memory: the x tile serves x Wᵀ and x Ẇᵀ, the W tile x Wᵀ and ẋ Wᵀ; CUDA-core FMAs in fp32 / fp64, no tensor
cores), layer_norm_jvp one warp per row (statistics, y and ẏ in one kernel).  csrc/cuda/jvp_binding.cpp checks the
inputs (weight and weight_dot keep their strides).  fp16 / bf16 / fp32 accumulate in fp32, fp64 in fp64.
"""
from __future__ import annotations

import torch

from .. import _backend, _ext
from .jvp import FLOAT_DTYPES

_OPS = ("linear_jvp", "layer_norm_jvp")


def _cuda_reasons(device, dtype):
    return _ext.cuda_reasons(device, dtype, dtypes=FLOAT_DTYPES, ops=_OPS, kernels="jvp_kernels.cu")


def _linear_jvp_cuda(x, weight, bias=None, x_dot=None, weight_dot=None, bias_dot=None):
    return torch.ops.ntk_cuda.linear_jvp(x, weight, bias, x_dot, weight_dot, bias_dot)


def _layer_norm_jvp_cuda(x, weight, bias, eps, x_dot=None, weight_dot=None, bias_dot=None, rms=False):
    return torch.ops.ntk_cuda.layer_norm_jvp(x, weight, bias, float(eps), x_dot, weight_dot, bias_dot, bool(rms))


_backend.register("linear_jvp", "cuda", _linear_jvp_cuda, _cuda_reasons)
_backend.register("layer_norm_jvp", "cuda", _layer_norm_jvp_cuda, _cuda_reasons)
