"""Host-side launch plumbing shared by the kernels: integer helpers and the eager fast-path test.

Kept in plain Python because the host cost of a launch is what bounds short sequences:
``triton.cdiv`` / ``triton.next_power_of_2`` are ``constexpr_function`` objects in recent Triton
whose host-side call unwraps every argument (µs per call, several per launch), and a call through
a ``torch.library`` custom op costs tens of µs of dispatch in eager mode.
"""
from __future__ import annotations

import os

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_ok(*tensors) -> bool:
    """May this call skip its torch.library op and launch the kernels directly?

    Only for a plain eager call on real tensors: not traced or compiled, no dispatch mode (fake,
    proxy, functionalization, cross-ref ...), no functorch transform, no tensor subclass. The ops
    stay what torch.compile, AOT autograd and dispatch modes see. ``GLA_EAGER_OP=1`` always takes
    the op (to compare the two paths)."""
    if os.environ.get("GLA_EAGER_OP") == "1" or torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)
