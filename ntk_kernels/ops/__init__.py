"""Low-level ops, each registered in the ``ntk`` torch.library namespace, with their references."""
from .linchain import delta_weight, dropout_ref, fold_chain, linchain_linear, linchain_ref
from ._hash_dropout import keep_mask as dropout_keep_mask
from .ntk_gram import gram_contract, gram_contract_ref
from .jvp import layer_norm_jvp, layer_norm_jvp_ref, linear_jvp, linear_jvp_ref

__all__ = ["linchain_linear", "linchain_ref", "dropout_ref", "dropout_keep_mask", "fold_chain", "delta_weight",
           "gram_contract", "gram_contract_ref", "linear_jvp", "linear_jvp_ref", "layer_norm_jvp",
           "layer_norm_jvp_ref"]
