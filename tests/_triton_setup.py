"""The preamble every Triton backend test module shares: where the kernels run, and a module-level skip (with the
reason) where they cannot."""
import importlib
import os

import pytest
import torch


def triton_backend(module: str):
    """(ntk_kernels.ops.<module>, device) for a test module of that Triton backend: the device is the CPU under
    TRITON_INTERPRET=1 (set before ntk_kernels is imported), else CUDA.  Skips the calling test module where there
    is neither, where triton does not import, or where the backend itself says it cannot run (its
    _triton_reasons for float32)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (interpret or torch.cuda.is_available()):
        pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
    pytest.importorskip("triton")
    backend = importlib.import_module(f"ntk_kernels.ops.{module}")
    device = torch.device("cpu" if interpret else "cuda")
    why = backend._triton_reasons(device, torch.float32)
    if why:
        pytest.skip(f"triton backend cannot run here: {why}", allow_module_level=True)
    return backend, device
