"""User-facing layers built on the ntk ops."""
from .linchain import CHAIN_INITS, LinChainLinear, init_chain_

__all__ = ["LinChainLinear", "CHAIN_INITS", "init_chain_"]
