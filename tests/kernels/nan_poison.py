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


def poison_torch_empty(monkeypatch) -> None:
    """For the rest of the test, ``torch.empty`` (contiguous floating tensors) returns
    :func:`nan_empty` buffers: what a kernel leaves unwritten, or reads past a buffer's end, is NaN."""
    if getattr(torch.empty, "nan_poisoned", False):   # already (a hypothesis example repeats)
        return
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        if not t.is_floating_point() or not t.is_contiguous():
            return t
        return nan_empty(t.shape, t.dtype, t.device)

    poisoned.nan_poisoned = True
    monkeypatch.setattr(torch, "empty", poisoned)
