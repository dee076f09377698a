"""An output gate after attention, ``o ⊙ sigmoid(g)``, fused into the attention kernel's epilogue.

It composes with the attention rewrite: the attention pattern runs first and leaves one
``attention_call`` node; this lowering finds it behind the head-merge plumbing and re-emits it
with the gate, so the gated output is written once.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..config import Config
from ..rewrite import Match, leaf
from ..rewrite.graph import is_reshape, tensor_meta
from .attention import attention_call, kernel_name
from .select import Decline, Selected


@leaf
def gated_attention_call(gate, *, layout, **attention):
    """attention ⊙ sigmoid(gate), with the gate given in the model's layout:

    ``"bhtd"``: gate [B, H, T, D|1] against the attention output itself;
    ``"bthd"``: gate [B, T, H, D|1] against ``o.transpose(1, 2)``;
    ``"bt(hd)"``: gate [B, T, H·D] against ``o.transpose(1, 2).reshape(B, T, H·D)``.
    The result is returned in that same layout.
    """
    q, v = attention["q"], attention["v"]
    b, h, t, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    if layout == "bthd":
        gate = gate.transpose(1, 2)
    elif layout == "bt(hd)":
        gate = gate.reshape(b, t, h, dv).transpose(1, 2)
    out = attention_call(gate=gate, **attention)
    if layout == "bthd":
        return out.transpose(1, 2)
    if layout == "bt(hd)":
        return out.transpose(1, 2).reshape(b, t, h * dv)
    return out


def _is_transpose_12(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.transpose \
        and tuple(n.args[1:]) in ((-3, -2), (1, 2)) and tensor_meta(n) is not None and tensor_meta(n).dim() == 4


def _is_copy(n) -> bool:
    return (n.op == "call_method" and n.target in ("contiguous", "clone")) or \
        (n.op == "call_function" and n.target is torch.clone)


class GatedAttentionLowering:
    def select(self, match: Match, config: Config) -> Selected | Decline | None:
        o, g = match.captures["o"], match.captures["g"]
        chain, layout = [], "bhtd"
        node = o

        def skip_copies(n):
            while isinstance(n, fx.Node) and _is_copy(n) and len(n.users) == 1:
                chain.append(n)
                n = n.args[0]
            return n

        node = skip_copies(node)
        if is_reshape(node) and len(node.users) == 1:
            chain.append(node)
            node = skip_copies(node.args[0])
            layout = "bt(hd)"
        if _is_transpose_12(node) and len(node.users) == 1:
            chain.append(node)
            node = skip_copies(node.args[0])
            layout = "bthd" if layout == "bhtd" else layout
        elif layout == "bt(hd)":
            return None
        if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is attention_call):
            return None  # not an attention output: the plain gate pattern may take it
        if node.kwargs.get("gate") is not None or node.kwargs.get("flat_heads"):
            return Decline("the attention already has a gate, or works on [B·H, T, D]")
        if len(node.users) != 1:
            return Decline(f"the attention output has {len(node.users)} users; the gate cannot be fused")
        tg, to, ta = tensor_meta(g), tensor_meta(o), tensor_meta(node)
        if tg is None or to is None or ta is None:
            return Decline("unknown gate shape")
        if tg.dtype != ta.dtype:
            return Decline(f"gate dtype {tg.dtype} differs from the attention's {ta.dtype}")
        full = tuple(tg.shape) == tuple(to.shape)
        headwise = layout != "bt(hd)" and tg.dim() == 4 and tuple(tg.shape[:-1]) == tuple(to.shape[:-1]) and tg.shape[-1] == 1
        if not (full or headwise):
            return Decline(f"gate of shape {tuple(tg.shape)} against an attention output of {tuple(to.shape)}: "
                           "neither elementwise nor headwise")
        kwargs = dict(node.kwargs)
        kwargs.update(gate=g, layout=layout)
        impl = kwargs.get("impl")
        kind = "elementwise" if full else "headwise"
        return Selected(gated_attention_call, kwargs, f"{kernel_name(impl)} (+{kind} sigmoid gate)",
                        extra_nodes=chain + [node], absorbs=[node])
