"""Gated linear attention (GLA): chunked Triton kernels, a decode kernel and the references.

``chunk_gla(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens, impl)`` and
``fused_recurrent_gla(...)`` are the public entries (fla-compatible ``[B, T, H, D]`` layout);
they call the ``torch.ops.gla.chunk_gla`` / ``torch.ops.gla.fused_recurrent_gla`` ops
(backward: ``torch.ops.gla.chunk_gla_backward``).
"""
from .naive import gla_chunk_reference, gla_recurrent_reference
from .op import chunk_gla, fused_recurrent_gla, triton_unsupported_reason

__all__ = ["chunk_gla", "fused_recurrent_gla", "triton_unsupported_reason",
           "gla_chunk_reference", "gla_recurrent_reference"]
