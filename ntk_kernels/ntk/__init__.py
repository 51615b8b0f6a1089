"""The empirical NTK engine: ``empirical_ntk``, ``per_sample_grads``, the torch.func reference, and the linearized
model with matrix-free NTK products (``linearize``, ``ntk_vp``, ``ntk_eigs``)."""
from .empirical import empirical_ntk, empirical_ntk_reference, per_sample_grads
from .linear import LinearizedModel, linearize, ntk_eigs, ntk_vp
from .jvp import per_sample_jvp

__all__ = ["empirical_ntk", "empirical_ntk_reference", "per_sample_grads", "LinearizedModel", "linearize", "ntk_vp",
           "ntk_eigs", "per_sample_jvp"]
