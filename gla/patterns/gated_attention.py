"""Gated softmax attention: ``attention(x) ⊙ sigmoid(g)`` (G1 gate, Qwen3-Next style).

Elementwise ([B,T,H,D] or flattened [B,T,H·D]) and headwise ([B,T,H,1]) gates, including gates
split from extra ``q_proj`` columns. The lowering fuses the gate into the attention kernel.
"""
import torch

from ..lowering.gated_attention import GatedAttentionLowering
from .registry import register_pattern


def gated_output(o, g):
    return o * torch.sigmoid(g)


register_pattern("gated_attention", search=gated_output, replacement=GatedAttentionLowering(),
                 kind="gated_attention", priority=20,
                 description="attention output * sigmoid(gate), gate fused into the kernel epilogue")
