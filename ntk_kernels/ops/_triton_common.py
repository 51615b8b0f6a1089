"""What every Triton backend of this package shares: the guarded import (the modules import without triton), the
interpreter's bf16-dot workaround flag, the launchers' small helpers (interpreted?, dot precision, powers of two,
the device guard) and why a backend cannot run on a (device, dtype)."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, List, Optional

import torch

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR = None
except Exception as e:  # ImportError, or a broken install (no driver, wrong torch)
    triton = tl = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"


def jit(**kwargs):
    """triton.jit when triton imports, else a no-op, so this module imports without triton."""
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


if triton is not None:
    # The interpreter's tl.dot multiplies bf16 bit patterns (stored as uint16; triton-lang/triton#11584),
    # so interpreted bf16 dots run on exact fp32 copies.  Read at import, as triton.jit reads it.
    UPCAST_BF16_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

if triton is not None:
    @jit()
    def dot(a, b, acc, PREC: tl.constexpr):
        """acc + a b with fp32 accumulation; a, b share a dtype (PREC picks tf32 / ieee for fp32 inputs)."""
        if UPCAST_BF16_DOT and a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PREC)


def interpreted(kernel) -> bool:
    """Whether triton.jit built ``kernel`` for the interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def dot_precision(t: torch.Tensor) -> str:
    """fp32 dots follow torch's matmul setting (TF32 only when torch would use it); 16-bit ignore it."""
    if t.dtype == torch.float32 and not (t.is_cuda and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


def next_p2(n: int) -> int:
    """The smallest power of two >= max(1, n) (block sizes)."""
    return triton.next_power_of_2(max(1, n))


def device_context(t: torch.Tensor):
    """Launches on t's device: torch.cuda.device(t.device) for a cuda tensor, else a no-op context."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_reasons(device: torch.device, dtype: torch.dtype, import_error: Optional[str],
                   interpreted: Callable[[], bool]) -> List[str]:
    """Why a Triton backend cannot run on (device, dtype); empty when it can.  ``import_error``: None when triton
    imported; ``interpreted()``: whether the module's kernels were built by the interpreter (TRITON_INTERPRET=1
    at import: triton.jit reads it then).  The kernels accumulate in fp32, so fp64 goes to another backend."""
    r = []
    if import_error is not None:
        r.append(f"triton is not importable ({import_error})")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            r.append("Triton runs on cpu tensors only under TRITON_INTERPRET=1")
        elif import_error is None and not interpreted():
            r.append("TRITON_INTERPRET=1 was set after ntk_kernels was imported (triton.jit reads it at import)")
    elif device.type != "cuda":
        r.append(f"Triton kernels run on cuda (or cpu under TRITON_INTERPRET=1), not {device.type}")
    if dtype == torch.float64:
        r.append("float64: the op computes fp64 inputs in fp64, these kernels accumulate in fp32 "
                 "(use the reference, cpu or cuda backend)")
    elif dtype not in DTYPES:
        r.append(f"dtype {dtype} is not one of float16, bfloat16, float32")
    return r
