"""The eNTK's token-Gram contraction: one linear map's share of the kernel, without the T x S products.

For a linear map used at T positions of sample i (inputs A_i (T, D), output gradients G_{i,c} (T, E) of output
c), the gradient of f_c(x_i) with respect to its weight is G_{i,c}ᵀ A_i, and

    K[i, j, c, c'] = ⟨G_{i,c}ᵀ A_i, G_{j,c'}ᵀ A_j⟩ = Σ_{t,s} (A_i A_jᵀ)_{ts} (G_{i,c} G_{j,c'}ᵀ)_{ts}.

``gram_contract(a1, g1, a2, g2, mode)``:
  a1   (I, T, D) float features, or (I, T) integer token ids: then (A_i A_jᵀ)_{ts} is 1[a1[i,t] == a2[j,s]]
       (an nn.Embedding is a linear map on one-hot rows)
  g1   (I, C, T, E) output gradients;  a2 (J, S, D) or (J, S), g2 (J, C, S, E) likewise
  mode "full" -> (I, J, C, C);  "diagonal" -> (I, J, C) (c = c');  "trace" -> (I, J) (Σ_c over c = c')
The result is float64 for float64 inputs and float32 otherwise (fp16 / bf16 inputs accumulate in fp32).

Cost per pair (i, j): T·S·D for the token Gram, then C·T·S·E + C²·T·E (full) through H = (A_i A_jᵀ) G_{j,c'}
(no T x S x C x C product is ever formed by the compiled kernels).

Backends (ntk_kernels._backend): C++ CPU (csrc/cpu/ntk_gram.cpp), Triton (ops/_gram_triton.py), CUDA
(csrc/cuda/gram_kernels.cu) and the plain-PyTorch reference below, registered as op "gram".
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import _backend

MODES = ("full", "diagonal", "trace")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def out_shape(I: int, J: int, C: int, mode: str):
    return {"full": (I, J, C, C), "diagonal": (I, J, C), "trace": (I, J)}[mode]


# ----------------------------------------------------------------------------------------------
# The reference: the definition, term by term (the T x S token Gram and the T x S output-gradient Grams).
# ----------------------------------------------------------------------------------------------
def token_gram_ref(a1: Tensor, a2: Tensor, dtype: torch.dtype) -> Tensor:
    """(I, J, T, S): A_i A_jᵀ for features, 1[id_t = id'_s] for token ids."""
    if a1.dtype in ID_DTYPES:
        return (a1[:, None, :, None] == a2[None, :, None, :]).to(dtype)
    return torch.einsum("itd,jsd->ijts", a1.to(dtype), a2.to(dtype))


def gram_contract_ref(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, mode: str = "full") -> Tensor:
    """Plain-PyTorch reference of ``gram_contract``: forms (A_i A_jᵀ) and (G_{i,c} G_{j,c'}ᵀ), T x S each."""
    ct = compute_dtype(g1.dtype)
    AA = token_gram_ref(a1, a2, ct)
    G1, G2 = g1.to(ct), g2.to(ct)
    if mode == "full":
        return torch.einsum("ijts,ijcets->ijce", AA, torch.einsum("ictk,jesk->ijcets", G1, G2))
    if mode == "diagonal":
        return torch.einsum("ijts,ijcts->ijc", AA, torch.einsum("ictk,jcsk->ijcts", G1, G2))
    return (AA * torch.einsum("ictk,jcsk->ijts", G1, G2)).sum((-2, -1))


def _reference_kernel(a1, g1, a2, g2, mode: str) -> Tensor:
    """The reference backend, plain torch GEMMs, one row block of I at a time (intermediates near 64 MiB):
      gg form  (G_{i,c} G_{j,c'}ᵀ) for all pairs in one GEMM, times A_i A_jᵀ, summed   C²·T·S·E a pair
      h form   H_{j,c'} = (A_i A_jᵀ) G_{j,c'} (batched matmul), then ⟨G_{i,c}, H_{j,c'}⟩  C·T·S·E + C²·T·E
    whichever costs less (the gg form counted at a quarter: one large GEMM against batched small ones);
    T = S = 1 (MLP layers) is the gg form: (a_i·a_j)(g_{i,c}·g_{j,c'})."""
    ct = compute_dtype(g1.dtype)
    I, C, T, E = g1.shape
    J, S = g2.shape[0], g2.shape[2]
    out = torch.empty(out_shape(I, J, C, mode), dtype=ct, device=g1.device)
    G1, G2 = g1.to(ct), g2.to(ct)
    Cp = C if mode == "full" else 1  # output pairs (c, c') per c
    gg = Cp * C * T * S * E
    h = C * T * S * E + Cp * C * T * E
    use_gg = gg <= 4 * h
    per_row = J * T * S * (1 + (Cp * C if use_gg else 0)) + (0 if use_gg else J * C * T * E)
    step = max(1, (1 << 24) // max(1, per_row))
    for i0 in range(0, I, step):
        i1 = min(I, i0 + step)
        n = i1 - i0
        AA = token_gram_ref(a1[i0:i1], a2, ct)  # (n, J, T, S)
        if use_gg:
            if mode == "full":  # (n, C, T) x (J, C, S) pairs in one GEMM
                GG = (G1[i0:i1].reshape(-1, E) @ G2.reshape(-1, E).t()).view(n, C, T, J, C, S)
                out[i0:i1] = torch.einsum("ijts,ictjes->ijce", AA, GG)
            else:
                GG = torch.stack([G1[i0:i1, c].reshape(-1, E) @ G2[:, c].reshape(-1, E).t() for c in range(C)])
                GG = GG.view(C, n, T, J, S)
                K = torch.einsum("ijts,citjs->ijc", AA, GG)
                out[i0:i1] = K if mode == "diagonal" else K.sum(-1)
        else:
            H = torch.matmul(AA.unsqueeze(2), G2.unsqueeze(0))  # (n, J, C, T, E)
            Hf = H.reshape(n, J * C, T * E)
            if mode == "full":
                K = torch.bmm(G1[i0:i1].reshape(n, C, T * E), Hf.transpose(1, 2))  # (n, C, J*C)
                out[i0:i1] = K.view(n, C, J, C).permute(0, 2, 1, 3)
            else:
                K = torch.einsum("ick,ijck->ijc", G1[i0:i1].reshape(n, C, T * E), Hf.view(n, J, C, T * E))
                out[i0:i1] = K if mode == "diagonal" else K.sum(-1)
    return out


def check_gram_inputs(a1, g1, a2, g2, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, t in (("a1", a1), ("g1", g1), ("a2", a2), ("g2", g2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if g1.dtype not in FLOAT_DTYPES or g2.dtype != g1.dtype:
        raise TypeError(f"g1 and g2 must share one floating dtype of {FLOAT_DTYPES}, got {g1.dtype} and {g2.dtype}")
    if g1.ndim != 4 or g2.ndim != 4:
        raise ValueError(f"g1 and g2 must be (N, C, T, E), got shapes {tuple(g1.shape)} and {tuple(g2.shape)}")
    ids = a1.dtype in ID_DTYPES
    if ids != (a2.dtype in ID_DTYPES):
        raise TypeError(f"a1 and a2 must both be token ids or both features, got {a1.dtype} and {a2.dtype}")
    if ids:
        if a1.ndim != 2 or a2.ndim != 2:
            raise ValueError(f"token ids a1, a2 must be (N, T), got shapes {tuple(a1.shape)} and {tuple(a2.shape)}")
    else:
        if a1.dtype != g1.dtype or a2.dtype != g1.dtype:
            raise TypeError(f"features a1, a2 must have g1's dtype {g1.dtype} (or be integer token ids), got "
                            f"{a1.dtype} and {a2.dtype}")
        if a1.ndim != 3 or a2.ndim != 3 or a1.shape[2] != a2.shape[2]:
            raise ValueError(f"features a1, a2 must be (N, T, D) with one D, got shapes {tuple(a1.shape)} and "
                             f"{tuple(a2.shape)}")
    I, C, T, E = g1.shape
    J, C2, S, E2 = g2.shape
    if C2 != C or E2 != E:
        raise ValueError(f"g2 {tuple(g2.shape)} must be (J, C, S, E) with g1's C={C} and E={E}")
    if a1.shape[:2] != (I, T):
        raise ValueError(f"a1 {tuple(a1.shape)} must have g1's (N, T) = ({I}, {T}) leading dims")
    if a2.shape[:2] != (J, S):
        raise ValueError(f"a2 {tuple(a2.shape)} must have g2's (N, S) = ({J}, {S}) leading dims")
    devices = {t.device for t in (a1, g1, a2, g2)}
    if len(devices) != 1:
        raise ValueError(f"a1, g1, a2, g2 must be on one device, got {sorted(map(str, devices))}")


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("ntk::gram_contract", mutates_args=())
def _gram_contract_op(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, mode: str) -> Tensor:
    kernel = _backend.choose("gram", g1.device, g1.dtype)
    return kernel.fn(a1.contiguous(), g1.contiguous(), a2.contiguous(), g2.contiguous(), mode)


@_gram_contract_op.register_fake
def _(a1, g1, a2, g2, mode):
    return g1.new_empty(out_shape(g1.shape[0], g2.shape[0], g1.shape[1], mode), dtype=compute_dtype(g1.dtype))


def gram_contract(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, mode: str = "full") -> Tensor:
    """K[i, j, c, c'] = Σ_{t,s} (A_i A_jᵀ)_{ts} ⟨G_{i,c,t}, G_{j,c',s}⟩ (see the module docstring for shapes);
    on the fastest backend for the device (``ntk_kernels._backend``). Not differentiable."""
    check_gram_inputs(a1, g1, a2, g2, mode)
    if a1.dtype == torch.int32 or a2.dtype == torch.int32:
        a1, a2 = a1.long(), a2.long()
    return _gram_contract_op(a1, g1, a2, g2, mode)


def _reference_reasons(device, dtype) -> List[str]:
    return [] if dtype in FLOAT_DTYPES else [f"takes {FLOAT_DTYPES}, not {dtype}"]


_backend.register("gram", "reference", _reference_kernel, _reference_reasons)

# Compiled backends register themselves in their own modules: _gram_cpu (csrc/cpu), _gram_triton, _gram_cuda
# (csrc/cuda).  An optional backend must never break the package: a failed import leaves the others.
import importlib as _importlib  # noqa: E402

for _mod in ("_gram_cpu", "_gram_triton", "_gram_cuda"):
    try:
        _importlib.import_module(f"{__package__}.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__package__}.{_mod}":  # the module exists but a dependency is missing
            _backend.warn_once(f"gram-{_mod}-import", f"ntk_kernels: the {_mod[6:]} backend of gram_contract "
                                                      f"did not load ({_e!r})")
    except Exception as _e:
        _backend.warn_once(f"gram-{_mod}-import", f"ntk_kernels: the {_mod[6:]} backend of gram_contract did "
                                                  f"not load ({_e!r})")
