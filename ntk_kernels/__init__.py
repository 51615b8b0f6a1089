"""ntk_kernels: compiled kernels for the empirical NTK and LinChain / LoRA adapters in PyTorch."""
from . import ops
from ._build_info import build_info
from .ops.linchain import linchain_linear
from .ntk import empirical_ntk, linearize, ntk_eigs, ntk_vp, per_sample_grads, per_sample_jvp

__version__ = "0.1.0"
__all__ = ["linchain_linear", "empirical_ntk", "per_sample_grads", "linearize", "ntk_vp", "ntk_eigs", "per_sample_jvp", "build_info", "ops", "nn", "integrations", "analysis", "__version__"]


def __getattr__(name):  # nn, integrations and analysis import lazily (integrations.peft needs peft)
    import importlib

    if name in ("nn", "integrations", "analysis"):
        return importlib.import_module(f"ntk_kernels.{name}")
    raise AttributeError(f"module 'ntk_kernels' has no attribute {name!r}")
