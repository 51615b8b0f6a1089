"""Kernel analysis on top of the eNTK engine (``ntk_kernels.empirical_ntk``).

The linearised model f_lin(x; θ) = f(x; θ₀) + J(x)(θ − θ₀) trained with squared loss depends on the data only
through its eNTK K = J Jᵀ; this module turns a kernel (or a model) into the quantities used to study fine-tuning:

  spectrum             eigenvalues and statistics (λ_max, λ_min, condition number, effective rank, trace)
  kernel_regression    f0_te + K_te,tr (K_tr,tr + ridge·I)⁻¹ (y − f0_tr): ℓ2-regularised linearised fine-tuning
  gd_dynamics          gradient descent on the linearised model, closed form at every step
  kernel_influence     leave-one-out change of each test prediction, exactly, without refitting
  kernel_classifier    the few-shot kernel protocol of Malladi et al. (2023), "A kernel-based view of language model
                       fine-tuning" (regression / logistic / SVM)
  lpft_decomposition   Θ = (φᵀφ' + 1)·I_C + V J_φ J_φ'ᵀ Vᵀ, Tomihari & Sato (2024), "Understanding linear probing
                       then fine-tuning language models from NTK perspective"
  layer_selection      rank parameter subsets (layers, LoRA, attention, ...) by the spectrum of their eNTK

Kernel layouts: (N, N) a trace kernel (with targets (N, C): K ⊗ I_C), (N, N, C) a diagonal kernel (one kernel per
output), (N, N, C, C) a full kernel, flattened to (N·C) x (N·C) at index n*C + c.  All solves run in float64.
"""
from ._classifier import KernelClassifier, kernel_classifier
from ._model import Candidate, LPFTDecomposition, layer_selection, lpft_decomposition
from ._regression import GDDynamics, KernelRegression, gd_dynamics, kernel_influence, kernel_regression
from ._spectrum import Spectrum, spectrum

__all__ = ["spectrum", "kernel_regression", "gd_dynamics", "kernel_influence", "kernel_classifier",
           "lpft_decomposition", "layer_selection", "Spectrum", "KernelRegression", "GDDynamics",
           "KernelClassifier", "LPFTDecomposition", "Candidate"]
