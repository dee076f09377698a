"""Triton kernels, each beside its pure-PyTorch reference. A kernel knows nothing of patterns.

One folder per op (``attention/``, ``linear_attention/``, ``glu/``), each with ``naive.py`` (the
reference), the Triton kernels and launchers, and ``op.py`` (the ``torch.library`` op: fake impl +
autograd). Every op takes an ``impl`` argument: ``"triton"``, ``"reference"`` (or an op-specific
fused PyTorch path) so the lowering, not the kernel, decides what runs.
"""
import os

import torch

# Triton decides at decoration time whether a kernel is compiled or interpreted. On a machine with
# no CUDA device the only way to run our kernels is the interpreter, so select it before any
# kernel module is imported (the user's own setting always wins).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
