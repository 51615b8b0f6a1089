"""The one place that picks a backend for an op.

Every op family registers its kernels here, one per backend, each with a function that says why it
cannot run a given call (xformers' ``not_supported_reasons``).  ``choose`` walks the backends in order of
preference for the device and returns the first that has no reason against it.

Order of preference (fastest first, see benchmarks/RESULTS.md):
  cuda device: "cuda" (csrc/cuda + cuBLAS), "triton", "reference"
  cpu device:  "cpu" (csrc/cpu, C++/ATen), "reference"; "triton" runs on the CPU only under
               TRITON_INTERPRET=1 and only when forced (it is a correctness tool there, not a fast path).

``NTK_KERNELS_BACKEND=<name>`` forces one backend for every op, ``NTK_KERNELS_BACKEND_<OP>=<name>`` for one op
(``<OP>`` upper-case).  A forced backend that cannot run raises, listing every backend's reasons.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


@dataclass
class Kernel:
    backend: str
    fn: Callable
    # (device, dtype) -> list of reasons this backend cannot run; empty list = supported
    reasons: Callable[[torch.device, torch.dtype], List[str]]


_REGISTRY: Dict[str, Dict[str, Kernel]] = {}


_CHOICES: Dict[tuple, Kernel] = {}  # (op, device, dtype, forced) -> kernel: choose runs on every call of an op


def register(op: str, backend: str, fn: Callable, reasons: Optional[Callable] = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Kernel(backend, fn, reasons or (lambda device, dtype: []))
    _CHOICES.clear()


def ops() -> List[str]:
    return sorted(_REGISTRY)


def not_supported_reasons(op: str, device: torch.device, dtype: torch.dtype) -> Dict[str, List[str]]:
    """For every backend, the reasons it cannot run ``op`` on ``device`` / ``dtype`` (empty: it can)."""
    kernels = _REGISTRY.get(op, {})
    out = {}
    for name in BACKENDS:
        if name not in kernels:
            out[name] = ["no kernel of this backend is registered for this op"]
        else:
            out[name] = list(kernels[name].reasons(device, dtype))
    return out


def forced_backend(op: str) -> Optional[str]:
    name = os.environ.get(f"NTK_KERNELS_BACKEND_{op.upper()}") or os.environ.get("NTK_KERNELS_BACKEND")
    if name is None or name == "" or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(f"NTK_KERNELS_BACKEND must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def choose(op: str, device: torch.device, dtype: torch.dtype) -> Kernel:
    """The kernel that runs ``op`` for tensors on ``device`` with ``dtype``."""
    forced = forced_backend(op)
    key = (op, device, dtype, forced)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    device = torch.device(device)
    reasons = not_supported_reasons(op, device, dtype)
    candidates = (forced,) if forced else _PREFERENCE.get(device.type, ("reference",))
    for name in candidates:
        if not reasons[name]:
            _CHOICES[key] = _REGISTRY[op][name]
            return _CHOICES[key]
    detail = "; ".join(f"{k}: {', '.join(v) or 'ok'}" for k, v in reasons.items())
    what = f"forced backend {forced!r}" if forced else "no backend"
    raise RuntimeError(f"ntk_kernels: {what} can run {op} on {device} with {dtype} ({detail})")


def backend_table() -> Dict[str, Dict[str, str]]:
    """op -> device type -> the backend ``choose`` picks for float32 there (or why none)."""
    table = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in ops():
        table[op] = {}
        for dev in devices:
            try:
                table[op][dev] = choose(op, torch.device(dev), torch.float32).backend
            except RuntimeError as e:
                table[op][dev] = f"unavailable ({e})"
    return table


_warned = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
