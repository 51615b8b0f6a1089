"""The C++ CPU backend of ``ntk::gram_contract`` (csrc/cpu/ntk_gram.cpp, op ``torch.ops.ntk_cpu.gram_contract``).

Paths per call (see the .cpp): T = S = 1 as two GEMMs and a product; features by the cheaper of per-pair token
Grams (A_i A_jᵀ) G_j and materialised per-sample gradients G_{n,c}ᵀ A_n; token ids by summing G over equal ids
and matching ids between samples.  ``NTK_KERNELS_GRAM_CPU_PATH=outer|pairwise|materialize`` forces a feature path.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import _backend, _ext
from .ntk_gram import FLOAT_DTYPES, MODES


def _gram_cpu(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, mode: str) -> Tensor:
    _ext.cpu_loaded()  # registers torch.ops.ntk_cpu (once) when called without _backend.choose
    return torch.ops.ntk_cpu.gram_contract(a1, g1, a2, g2, MODES.index(mode))


def _has_op() -> bool:
    try:
        return hasattr(torch.ops.ntk_cpu, "gram_contract")
    except (AttributeError, RuntimeError):
        return False


def _cpu_reasons(device, dtype) -> List[str]:
    r = []
    if device.type != "cpu":
        r.append(f"C++ CPU kernels run on cpu tensors, not {device.type}")
    if dtype not in FLOAT_DTYPES:
        r.append(f"takes {FLOAT_DTYPES}, not {dtype}")
    if not _ext.cpu_loaded():
        r.append(f"extension ntk_kernels._C not loaded ({_ext.status()['_C']['why']})")
    elif not _has_op():
        r.append("extension ntk_kernels._C has no gram_contract (an old build: reinstall the package)")
    return r


_backend.register("gram", "cpu", _gram_cpu, _cpu_reasons)
