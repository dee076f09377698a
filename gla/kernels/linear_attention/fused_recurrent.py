"""Token-by-token GLA in Triton (decode: T = 1 or a few tokens), forward only.

One program per (V-block, batch·query head); the ``K × BV`` state lives in fp32 registers::

    S ← exp(g_t) ⊙ S + k_tᵀ v_t ;  o_t = scale · q_t S

No host syncs and fresh outputs only, so a decode step can be captured in a CUDA graph. Query
head ``h`` recomputes the state of kv head ``h // G``; only the first query head of a group
stores the final state. Gradients (rarely needed at decode) come from the op's registered
backward (``gla::chunk_gla_backward``), which shares the semantics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..launch import cdiv, launcher, next_pow2
from .chunk import _sum


@launcher
@triton.jit
def _fused_recurrent_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr, scale, T, H,
                                G, s_gt, s_gh, s_gk,
                                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                BV: tl.constexpr, HAS_G: tl.constexpr, USE_H0: tl.constexpr,
                                STORE_HT: tl.constexpr):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    HQ = H * G
    i_b = i_nh // HQ
    i_hq = i_nh % HQ
    i_h = i_hq // G
    scale = tl.cast(scale, tl.float32)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk = o_k < K
    mv = o_v < V
    mkv = mk[:, None] & mv[None, :]
    S = tl.full([BK, BV], 0.0, tl.float32)
    if USE_H0:
        S += tl.load(h0_ptr + i_b * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                     mask=mkv, other=0.0).to(tl.float32)
    for t in range(0, T):
        row = i_b * T + t
        q = tl.load(q_ptr + row * HQ * K + i_hq * K + o_k, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row * H * K + i_h * K + o_k, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row * H * V + i_h * V + o_v, mask=mv, other=0.0).to(tl.float32)
        if HAS_G:
            gg = tl.load(g_ptr + row * s_gt + i_h * s_gh + o_k * s_gk, mask=mk,
                         other=0.0).to(tl.float32)
            # a positive log gate (not a decay) gives NaN rather than a silently clamped decay
            S = S * tl.exp(tl.where(gg > 0, float("nan"), gg))[:, None]
        S += k[:, None] * v[None, :]
        o = _sum(q[:, None] * S, 0) * scale
        tl.store(o_ptr + row * HQ * V + i_hq * V + o_v, o.to(o_ptr.dtype.element_ty), mask=mv)
    if STORE_HT:
        if i_hq % G == 0:
            tl.store(ht_ptr + i_b * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                     S, mask=mkv)


def fused_recurrent_gla_fwd(q, k, v, g, initial_state, scale, output_final_state):
    """Returns ``(o [B,T,Hq,V] v.dtype, final_state [B,H,K,V] fp32 or empty)``."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    G = HQ // H
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dev = q.device
    if g is not None:
        g = g.contiguous()
        s_gt, s_gh, s_gk = (H, 1, 0) if g.dim() == 3 else (H * K, K, 1)
    else:
        s_gt = s_gh = s_gk = 0
    o = torch.empty(B, T, HQ, V, dtype=v.dtype, device=dev)
    if output_final_state:
        ht = torch.empty(B, H, K, V, dtype=torch.float32, device=dev)
    else:
        ht = torch.empty(0, dtype=torch.float32, device=dev)
    h0 = initial_state.contiguous() if initial_state is not None else None
    BK = max(16, next_pow2(K))
    BV, warps = decode_config(K, V)
    _fused_recurrent_fwd_kernel[(cdiv(V, BV), B * HQ)](
        q, k, v, g if g is not None else q, o, h0 if h0 is not None else q, ht, scale, T, H, G,
        s_gt, s_gh, s_gk, K=K, V=V, BK=BK, BV=BV, HAS_G=g is not None, USE_H0=h0 is not None,
        STORE_HT=output_final_state, num_warps=warps)
    return o, ht


def decode_config(K: int, V: int) -> tuple[int, int]:
    """(BV, num_warps): a ``K × BV`` fp32 state tile per program. ``GLA_DECODE_CONFIG="BV,warps"``
    overrides it (for the decode sweep in ``benchmarks/linear_attention.py``)."""
    spec = os.environ.get("GLA_DECODE_CONFIG")
    if spec:
        try:
            bv, warps = (int(x) for x in spec.split(","))
        except ValueError:
            raise ValueError(f"GLA_DECODE_CONFIG={spec!r}: expected BV,num_warps") from None
        if bv < 16 or bv & (bv - 1) or warps not in (1, 2, 4, 8):
            raise ValueError(f"GLA_DECODE_CONFIG={spec!r}: BV a power of 2 ≥ 16, warps 1/2/4/8")
        return bv, warps
    BK = max(16, next_pow2(K))
    return min(max(16, next_pow2(V)), 32 if BK > 64 else 64), 4
