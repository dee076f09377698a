"""The canonical vocabulary: a few plain functions that canonicalization rewrites many spellings into.

Each is an ordinary, executable PyTorch function, so a canonical graph still runs (and is checked
by running it); Inductor traces straight through them.
"""
from __future__ import annotations

import torch


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``; every dtype-changing spelling (``.float()``, ``.type_as``, ``softmax(dtype=)``…)."""
    return x.to(dtype)


def repeat_heads(x: torch.Tensor, n_rep: int, dim: int) -> torch.Tensor:
    """Repeat each head ``n_rep`` times, consecutively, along ``dim`` (``repeat_kv`` / ``repeat_interleave``)."""
    return torch.repeat_interleave(x, n_rep, dim=dim)
