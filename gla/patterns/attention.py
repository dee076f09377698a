"""Softmax attention: ``softmax(q kᵀ · scale + mask) v`` in the spellings real models use.

After canonicalization (matmul/bmm/einsum, div-by-√d, upcast softmax, dropout in eval, masked_fill
all reduce to one spelling) twelve alternatives remain: scaled or not × no mask, an additive bias,
``where(mask, fill, scores)`` or ``where(keep, scores, fill)``, and a bias with either where (a
relative-position bias and a padding mask, as DeBERTa writes them). ``kt`` is whatever multiplies q —
the lowering takes its real layout from the graph, so a permuted K can never pass for a transpose.
Scale folded into q (or √scale on q and k) matches the unscaled forms with scale 1: exact.
"""
import torch
import torch.nn.functional as F

from .registry import register_pattern
from ..lowering.attention import AttentionLowering, SDPALowering
from ..lowering.mha import MHALowering


def scaled(q, kt, v, scale):
    return torch.matmul(torch.softmax(torch.matmul(q, kt) * scale, -1), v)


def scaled_bias(q, kt, v, scale, bias):
    return torch.matmul(torch.softmax(torch.matmul(q, kt) * scale + bias, -1), v)


def scaled_fill(q, kt, v, scale, mask, fill):
    return torch.matmul(torch.softmax(torch.where(mask, fill, torch.matmul(q, kt) * scale), -1), v)


def scaled_keep(q, kt, v, scale, keep, fill):
    return torch.matmul(torch.softmax(torch.where(keep, torch.matmul(q, kt) * scale, fill), -1), v)


def scaled_bias_fill(q, kt, v, scale, bias, mask, fill):
    return torch.matmul(torch.softmax(torch.where(mask, fill, torch.matmul(q, kt) * scale + bias), -1), v)


def scaled_bias_keep(q, kt, v, scale, bias, keep, fill):
    return torch.matmul(torch.softmax(torch.where(keep, torch.matmul(q, kt) * scale + bias, fill), -1), v)


def unscaled(q, kt, v):
    return torch.matmul(torch.softmax(torch.matmul(q, kt), -1), v)


def unscaled_bias(q, kt, v, bias):
    return torch.matmul(torch.softmax(torch.matmul(q, kt) + bias, -1), v)


def unscaled_fill(q, kt, v, mask, fill):
    return torch.matmul(torch.softmax(torch.where(mask, fill, torch.matmul(q, kt)), -1), v)


def unscaled_keep(q, kt, v, keep, fill):
    return torch.matmul(torch.softmax(torch.where(keep, torch.matmul(q, kt), fill), -1), v)


def unscaled_bias_fill(q, kt, v, bias, mask, fill):
    return torch.matmul(torch.softmax(torch.where(mask, fill, torch.matmul(q, kt) + bias), -1), v)


def unscaled_bias_keep(q, kt, v, bias, keep, fill):
    return torch.matmul(torch.softmax(torch.where(keep, torch.matmul(q, kt) + bias, fill), -1), v)


register_pattern(
    "softmax_attention",
    search=[scaled, scaled_bias, scaled_fill, scaled_keep, scaled_bias_fill, scaled_bias_keep,
            unscaled, unscaled_bias, unscaled_fill, unscaled_keep, unscaled_bias_fill, unscaled_bias_keep],
    replacement=AttentionLowering(),
    kind="attention",
    priority=30,
    description="softmax(q·kᵀ·scale [+ bias] [masked]) · v, any matmul spelling, GQA via repeat_kv",
)


def sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


register_pattern("sdpa", search=sdpa, replacement=SDPALowering(), kind="attention", priority=30,
                 description="F.scaled_dot_product_attention (mask, causal, scale, enable_gqa; no dropout)")


def multi_head_attention(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                         add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask,
                         need_weights, attn_mask, average_attn_weights, is_causal):
    return F.multi_head_attention_forward(
        query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn,
        dropout_p, out_proj_weight, out_proj_bias, training=training, key_padding_mask=key_padding_mask,
        need_weights=need_weights, attn_mask=attn_mask, use_separate_proj_weight=False, q_proj_weight=None,
        k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
        average_attn_weights=average_attn_weights, is_causal=is_causal)


register_pattern("multi_head_attention", search=multi_head_attention, replacement=MHALowering(), kind="attention",
                 priority=30, description="nn.MultiheadAttention / nn.Transformer*Layer (F.multi_head_attention_forward)")


# Look-alikes: they begin like attention but are other functions. They never rewrite; they say why.
def soft_capped(scores, v, cap):
    return torch.matmul(torch.softmax(torch.tanh(scores) * cap, -1), v)


def soft_capped_masked(scores, v, cap, bias):  # Gemma 2: the mask is added after the cap
    return torch.matmul(torch.softmax(torch.tanh(scores) * cap + bias, -1), v)


register_pattern("soft_capped_attention", search=[soft_capped_masked, soft_capped], kind="attention", priority=31,
                 decline="logit soft-capping (tanh on the scores) is not plain softmax attention; left as is")


def sigmoid_attention(q, kt, v):
    return torch.matmul(torch.sigmoid(torch.matmul(q, kt)), v)


def sigmoid_attention_scaled(q, kt, v, scale):
    return torch.matmul(torch.sigmoid(torch.matmul(q, kt) * scale), v)


register_pattern("sigmoid_attention", search=[sigmoid_attention_scaled, sigmoid_attention], kind="attention",
                 priority=31, decline="sigmoid attention is not softmax attention; left as is")
