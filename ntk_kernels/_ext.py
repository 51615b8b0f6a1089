"""Loads the compiled extensions, if the build made them, and remembers why not when it did not.

``ntk_kernels._C``       C++ CPU kernels (csrc/cpu), registered as ``torch.ops.ntk_cpu.*``.
``ntk_kernels._C_cuda``  CUDA kernels (csrc/cuda), registered as ``torch.ops.ntk_cuda.*``; built only
                         where a CUDA build of torch and a CUDA toolkit exist.
A missing extension is not an error: ops fall back to the next backend and ``build_info()`` says so.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, Optional, Sequence

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


def _dtype_list(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _has_ops(namespace: str, ops: Sequence[str]) -> bool:
    import torch

    try:
        ns = getattr(torch.ops, namespace)
        return all(hasattr(ns, op) for op in ops)
    except (AttributeError, RuntimeError):
        return False


def cuda_reasons(device, dtype, *, dtypes, ops: Sequence[str] = (), kernels: str = "") -> List[str]:
    """Why a CUDA backend (torch.ops.ntk_cuda.<ops> from ntk_kernels._C_cuda) cannot run on (device, dtype); empty
    when it can.  ``dtypes``: the dtypes its kernels take; ``ops``: the ops it calls, which an extension built
    before csrc/cuda/``kernels`` existed lacks."""
    r = []
    if device.type != "cuda":
        r.append(f"CUDA kernels run on cuda tensors, not {device.type}")
    if dtype not in dtypes:
        r.append(f"CUDA kernels take {_dtype_list(dtypes)}, not {dtype}")
    if not cuda_loaded():
        r.append(f"extension ntk_kernels._C_cuda not loaded ({status()['_C_cuda']['why']})")
    elif ops and not _has_ops("ntk_cuda", ops):
        r.append(f"torch.ops.ntk_cuda lacks {' / '.join(ops)} (ntk_kernels._C_cuda predates csrc/cuda/{kernels}; "
                 "rebuild it)")
    return r


def cpu_reasons(device, dtype, *, dtypes=None, ops: Sequence[str] = ()) -> List[str]:
    """Why a C++ CPU backend (torch.ops.ntk_cpu.<ops> from ntk_kernels._C) cannot run on (device, dtype); empty
    when it can.  ``dtypes``: the dtypes its kernels take (None: any the op accepts); ``ops``: the ops it calls,
    which an older build lacks."""
    r = []
    if device.type != "cpu":
        r.append(f"C++ CPU kernels run on cpu tensors, not {device.type}")
    if dtypes is not None and dtype not in dtypes:
        r.append(f"takes {tuple(dtypes)}, not {dtype}")
    if not cpu_loaded():
        r.append(f"extension ntk_kernels._C not loaded ({status()['_C']['why']})")
    elif ops and not _has_ops("ntk_cpu", ops):
        r.append(f"extension ntk_kernels._C has no {' / '.join(ops)} (an old build: reinstall the package)")
    return r
