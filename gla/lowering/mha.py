"""``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.Transformer*Layer`` slow path)
→ the projections as they are, and the attention itself through ``gla::attention``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config
from ..rewrite import Match, leaf
from ..rewrite.graph import tensor_meta
from .attention import choose_impl, kernel_name
from .select import Decline, Selected


@leaf
def mha_call(query, key, value, *, num_heads, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
             key_padding_mask, attn_mask, impl):
    """Sequence-first [T, B, E] inputs, as ``F.multi_head_attention_forward`` takes them; returns (out, None)."""
    from ..kernels.attention import gated_attention

    t, b, e = query.shape
    s = key.shape[0]
    h, d = num_heads, e // num_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    heads = lambda x, n: x.reshape(n, b, h, d).permute(1, 2, 0, 3)  # [B, H, n, D]
    q = heads(F.linear(query, w_q, b_q), t)
    k = heads(F.linear(key, w_k, b_k), s)
    v = heads(F.linear(value, w_v, b_v), s)
    bias = None
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(b, h, t, s)
        bias = torch.where(m, float("-inf"), 0.0) if m.dtype == torch.bool else m.to(torch.float32)
    key_mask = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            key_mask = ~key_padding_mask  # MHA: True = ignore; the kernel: True = may attend
        else:
            pad = key_padding_mask.to(torch.float32).view(b, 1, 1, s)
            bias = pad if bias is None else bias + pad
    o = gated_attention(q, k, v, bias=bias, key_mask=key_mask, scale=d ** -0.5, impl=impl)
    o = o.permute(2, 0, 1, 3).reshape(t * b, e)
    return F.linear(o, out_proj_weight, out_proj_bias).view(t, b, e), None


class MHALowering:
    @staticmethod
    def signature(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                  add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask,
                  need_weights, attn_mask, average_attn_weights, is_causal):
        """The captures this lowering takes."""

    def select(self, match: Match, config: Config) -> Selected | Decline:
        c = match.captures
        if c["need_weights"] is not False:
            return Decline("need_weights=True: the attention probabilities are returned")
        if c["bias_k"] is not None or c["bias_v"] is not None or c["add_zero_attn"] is not False:
            return Decline("bias_k / bias_v / add_zero_attn are not supported")
        if c["dropout_p"] != 0 and c["training"] is not False:
            return Decline(f"dropout_p={c['dropout_p']} in training is not supported by the kernel")
        if c["in_proj_weight"] is None:
            return Decline("separate q/k/v projection weights are not supported yet")
        q, k = tensor_meta(c["query"]), tensor_meta(c["key"])
        if q is None or k is None or q.dim() != 3:
            return Decline("unbatched MultiheadAttention input")
        if not isinstance(c["num_heads"], int) or not isinstance(c["embed_dim"], int):
            return Decline("symbolic head count")
        d = c["embed_dim"] // c["num_heads"]
        heads = q.new_empty((q.shape[1], c["num_heads"], q.shape[0], d), device="meta")
        kv = k.new_empty((k.shape[1], c["num_heads"], k.shape[0], d), device="meta")
        on_device = (lambda t, like: t.to(like.device) if like.device.type != "meta" else t)
        impl = choose_impl(config, on_device(heads, q), on_device(kv, k), on_device(kv, k),
                           masked=c["attn_mask"] is not None or c["key_padding_mask"] is not None)
        if isinstance(impl, Decline):
            return impl
        kwargs = {name: c[name] for name in ("query", "key", "value", "num_heads", "in_proj_weight", "in_proj_bias",
                                             "out_proj_weight", "out_proj_bias", "key_padding_mask", "attn_mask")}
        kwargs["impl"] = impl
        form = "mask" if c["attn_mask"] is not None or c["key_padding_mask"] is not None else "no mask"
        return Selected(mha_call, kwargs, f"{kernel_name(impl)} (MultiheadAttention, {form})")
