"""Loads the compiled extensions, if the build made them, and remembers why not when it did not.

``ntk_kernels._C``       C++ CPU kernels (csrc/cpu), registered as ``torch.ops.ntk_cpu.*``.
``ntk_kernels._C_cuda``  CUDA kernels (csrc/cuda), registered as ``torch.ops.ntk_cuda.*``; built only
                         where a CUDA build of torch and a CUDA toolkit exist.
A missing extension is not an error: ops fall back to the next backend and ``build_info()`` says so.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Optional

_STATUS: Dict[str, Dict[str, Optional[str]]] = {}


def _load(name: str) -> bool:
    if name in _STATUS:
        return _STATUS[name]["loaded"] == "yes"
    if os.environ.get("NTK_KERNELS_DISABLE_EXTENSIONS") == "1":
        _STATUS[name] = {"loaded": "no", "why": "disabled by NTK_KERNELS_DISABLE_EXTENSIONS=1", "path": None}
        return False
    try:
        mod = importlib.import_module(f"ntk_kernels.{name}")
    except Exception as e:  # ImportError, or an undefined symbol from a torch built differently
        _STATUS[name] = {"loaded": "no", "why": f"{type(e).__name__}: {e}", "path": None}
        return False
    _STATUS[name] = {"loaded": "yes", "why": None, "path": getattr(mod, "__file__", None)}
    return True


def cpu_loaded() -> bool:
    return _load("_C")


def cuda_loaded() -> bool:
    import torch

    if not torch.cuda.is_available():
        _STATUS.setdefault("_C_cuda", {"loaded": "no", "why": "torch sees no CUDA device", "path": None})
        return False
    return _load("_C_cuda")


def status() -> Dict[str, Dict[str, Optional[str]]]:
    cpu_loaded()
    cuda_loaded()
    return {k: dict(v) for k, v in _STATUS.items()}
