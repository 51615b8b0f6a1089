"""The C++ CPU backend of ``ntk::linear_jvp`` and ``ntk::layer_norm_jvp`` (csrc/cpu/jvp.cpp, ops
``torch.ops.ntk_cpu.linear_jvp`` / ``torch.ops.ntk_cpu.layer_norm_jvp``).

linear_jvp: parallel over blocks of the N·L rows; per block one read (and fp32 conversion for fp16 / bf16) of x's
rows serves y = x Wᵀ + b and x Ẇᵀ, and ẏ is accumulated in place while in cache.  layer_norm_jvp: one fused loop
over rows (statistics, y, ẏ).  ``NTK_KERNELS_JVP_CPU_ROWS=<k>`` forces k rows a block of linear_jvp.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, _ext
from .jvp import FLOAT_DTYPES



def _linear_jvp_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor], x_dot: Optional[Tensor],
                    weight_dot: Optional[Tensor], bias_dot: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    _ext.cpu_loaded()  # registers torch.ops.ntk_cpu (once) when called without _backend.choose
    y, yd = torch.ops.ntk_cpu.linear_jvp(x, weight, bias, x_dot, weight_dot, bias_dot)
    return y, yd


def _layer_norm_jvp_cpu(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                        x_dot: Optional[Tensor], weight_dot: Optional[Tensor], bias_dot: Optional[Tensor],
                        rms: bool) -> Tuple[Tensor, Tensor]:
    _ext.cpu_loaded()
    y, yd = torch.ops.ntk_cpu.layer_norm_jvp(x, weight, bias, float(eps), x_dot, weight_dot, bias_dot, bool(rms))
    return y, yd


def _reasons(name: str):
    return lambda device, dtype: _ext.cpu_reasons(device, dtype, dtypes=FLOAT_DTYPES, ops=(name,))


_backend.register("linear_jvp", "cpu", _linear_jvp_cpu, _reasons("linear_jvp"))
_backend.register("layer_norm_jvp", "cpu", _layer_norm_jvp_cpu, _reasons("layer_norm_jvp"))
