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


def _cpu_reasons(device, dtype) -> List[str]:
    return _ext.cpu_reasons(device, dtype, dtypes=FLOAT_DTYPES, ops=("gram_contract",))


_backend.register("gram", "cpu", _gram_cpu, _cpu_reasons)
