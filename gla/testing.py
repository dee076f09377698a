"""What users import in their tests: error figures, rewrite assertions, pattern isolation."""
from __future__ import annotations

import torch


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂, computed in float64. NaN or Inf anywhere gives inf."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")
    denom = e.norm()
    num = (a - e).norm()
    if denom == 0:
        return float(num)
    return float(num / denom)
