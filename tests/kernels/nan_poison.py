"""NaN poisoning for kernel tests: a kernel that leaves an output element unwritten, or reads past
the end of a tensor, produces NaN and fails its test."""
import torch

TAIL = 4096  # elements of NaN after each tensor


def nan_tailed(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` at the front of a buffer whose tail is NaN (contiguous, same shape)."""
    flat = torch.full((t.numel() + TAIL,), float("nan"), dtype=t.dtype, device=t.device)
    flat[:t.numel()] = t.reshape(-1)
    return flat[:t.numel()].view(t.shape)


def nan_empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty(shape)`` filled with NaN, and NaN past its end."""
    n = 1
    for s in shape:
        n *= int(s)
    return torch.full((n + TAIL,), float("nan"), dtype=dtype, device=device)[:n].view(tuple(shape))
