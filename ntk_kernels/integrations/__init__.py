"""Integrations of ntk_kernels with other libraries; each submodule imports its library lazily.

``ntk_kernels.integrations.peft``: ``fuse_lora`` / ``unfuse_lora`` run peft's LoRA layers through the fused
``linchain_linear`` op, and ``linchain_config`` builds LinChain adapters (W₀ + s·B·C_k⋯C_1·A) inside peft.
"""
