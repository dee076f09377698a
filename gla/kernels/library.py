"""The ``gla`` operator namespace: every op of gla's kernels is defined here, on one Library.

``torch.library.custom_op`` would define them in fewer lines, but every call of such an op runs
its Python wrappers on top of the kernel: an output-aliasing check and a ``torch._dynamo``-disabled
frame. Compiled graphs call the ops the same way, so each call pays them. On the H200 machine's
host (torch 2.11) a ``gla::attention`` forward cost 66–68 µs through ``custom_op`` and 45–49 µs
defined directly, against 36–37 µs for the launcher alone; the backward cost 148–172, 101–143
and 80–104 µs (``benchmarks/results/op-overhead-nvidia-h200.txt``).

Ops are functional (no mutated arguments, fresh outputs: ``torch.library.opcheck`` tests it)
and run ``fn`` on every backend; ``register_fake`` / ``register_autograd`` come from
``torch.library`` as usual, with ``lib=LIB``.
"""
from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("gla", "DEF")


def define(name: str, fn: Callable) -> torch._ops.OpOverload:
    """Define ``gla::<name>`` with the schema of ``fn``'s annotations and ``fn`` as its kernel on
    every device. Returns the op (``torch.ops.gla.<name>.default``)."""
    LIB.define(name + torch.library.infer_schema(fn, mutates_args=()),
               tags=(torch.Tag.pt2_compliant_tag,))
    LIB.impl(name, fn, "CompositeExplicitAutograd")
    return getattr(torch.ops.gla, name).default


def define_backward(name: str, fn: Callable) -> torch._ops.OpOverload:
    """:func:`define` for an op that computes gradients. Differentiating through it raises:
    without an autograd formula PyTorch's fallback would only warn and drop the gradient."""
    op = define(name, fn)

    def no_second_derivative(ctx, *grads):
        raise RuntimeError(f"gla::{name} has no autograd formula: second derivatives through "
                           "gla's kernels are not supported")

    torch.library.register_autograd(f"gla::{name}", no_second_derivative, lib=LIB)
    return op
