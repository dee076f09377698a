"""Gated softmax attention: flash forward/backward in Triton, an SDPA path, and the reference.

``gated_attention(q, k, v, *, gate, bias, key_mask, scale, causal, window, impl)`` is the public
entry; it calls the ``torch.ops.gla.attention`` op (backward: ``torch.ops.gla.attention_backward``).
"""
from .naive import attention_reference
from .op import (attention_sdpa, gated_attention, resolve_impl, sdpa_backend,
                 triton_unsupported_reason)

__all__ = ["gated_attention", "attention_reference", "attention_sdpa", "resolve_impl",
           "sdpa_backend", "triton_unsupported_reason"]
