"""The empirical NTK engine (issue 3): ``empirical_ntk``, ``per_sample_grads`` and the torch.func reference."""
from .empirical import empirical_ntk, empirical_ntk_reference, per_sample_grads

__all__ = ["empirical_ntk", "empirical_ntk_reference", "per_sample_grads"]
