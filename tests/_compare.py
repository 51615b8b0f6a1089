"""One tolerance table and one comparison for every test (flash-attention's rule for low precision)."""
from __future__ import annotations

import torch

# floor on the max error, relative to max |reference| (at least 1)
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, ref_lowp: torch.Tensor | None = None,
                 name: str = "output") -> None:
    """max|out - ref| <= 2 * max|ref_lowp - ref| + FLOOR[dtype] * max(1, max|ref|).

    ``ref`` is the float64 reference; ``ref_lowp`` the same reference computed in ``dtype`` (its error sets
    the budget for low precision).  A failure names the worst element, its index and both values.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    o, r = out.detach().double(), ref.detach().double()
    err = (o - r).abs()
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    budget = FLOOR[dtype] * scale
    if ref_lowp is not None:
        budget += 2.0 * (ref_lowp.detach().double() - r).abs().max().item()
    worst = err.max().item() if err.numel() else 0.0
    if worst > budget:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(f"{name} ({dtype}): max error {worst:.3e} > budget {budget:.3e} at index {idx}: "
                             f"got {o[idx].item():.8g}, reference {r[idx].item():.8g}")
