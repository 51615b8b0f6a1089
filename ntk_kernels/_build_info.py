"""``ntk_kernels.build_info()``: what was compiled and which backend each op uses on each device."""
from __future__ import annotations

import os
import platform
from typing import Any, Dict

import torch

from . import _backend, _ext


def build_info() -> Dict[str, Any]:
    """A dict: versions, the compiled extensions (loaded or why not), and op -> device -> backend."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # triton is optional on CPU-only installs
        triton_version = f"not importable ({type(e).__name__})"
    return {
        "ntk_kernels": __import__("ntk_kernels").__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "extensions": _ext.status(),
        "backends": _backend.backend_table(),
        "not_supported_reasons": {op: {dev: _backend.not_supported_reasons(op, torch.device(dev), torch.float32)
                                       for dev in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])}
                                  for op in _backend.ops()},
    }
