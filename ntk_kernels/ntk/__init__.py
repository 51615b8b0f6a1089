"""The empirical NTK engine (issue 3): ``empirical_ntk`` and its torch.func reference."""
from .empirical import empirical_ntk, empirical_ntk_reference

__all__ = ["empirical_ntk", "empirical_ntk_reference"]
