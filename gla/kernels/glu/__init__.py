"""Fused GLU: act(a) * b on separate or packed tensors, and the gate/up projection with a GLU
epilogue. See ``op.py`` for the ``gla::`` ops, ``elementwise.py`` / ``matmul.py`` for the
kernels, ``naive.py`` for the references."""
from .elementwise import triton_unsupported_reason
from .naive import (
    ACTIVATIONS,
    glu_backward_reference,
    glu_linear_reference,
    glu_packed_backward_reference,
    glu_packed_reference,
    glu_reference,
)
from .op import IMPLS, LINEAR_IMPLS, choose_glu_linear_impl, glu, glu_linear, glu_packed

__all__ = [
    "ACTIVATIONS",
    "IMPLS",
    "LINEAR_IMPLS",
    "choose_glu_linear_impl",
    "glu",
    "glu_backward_reference",
    "glu_linear",
    "glu_linear_reference",
    "glu_packed",
    "glu_packed_backward_reference",
    "glu_packed_reference",
    "glu_reference",
    "triton_unsupported_reason",
]
