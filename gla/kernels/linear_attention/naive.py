"""Gated linear attention (GLA, Yang et al. 2023): pure-PyTorch references.

Semantics (per sequence, per kv head; query head ``h`` reads kv head ``h // (Hq // H)``)::

    S_t = Diag(exp(g_t)) S_{t-1} + k_tᵀ v_t          S ∈ R^{K×V}, S_{-1} = initial_state or 0
    o_t = (scale · q_t) S_t

``g_t ≤ 0`` is a log gate per key channel (``[B, T, H, K]``), one scalar per head
(``[B, T, H]``, broadcast over K) or absent (plain causal linear attention).

* :func:`gla_recurrent_reference`: the Python-loop recurrence, the definition.
* :func:`gla_chunk_reference`: the chunked form (chunk 64, gates relative to the chunk start,
  every exponent ≤ 0), stable at any T and differentiable by autograd.

Both compute in float32 (float64 if q is float64); ``o`` is returned in ``v.dtype`` and the final
state ``[N, H, K, V]`` in the compute dtype.

A closed gate (``g = −inf``: decay 0, the state is reset) is taken as ``g = LOG_GATE_MIN`` by the
chunked forms, here and in the Triton kernels: their cumulative sums cannot hold −inf
(``−inf − (−inf)`` is NaN), and a decay of ``e^−60 ≈ 1e−26`` per step is zero at any float
precision. Gradients at such positions are the clamped function's (≈ 0, up to rounding noise).
"""
from __future__ import annotations

import torch

LOG_GATE_MIN = -60.0

CHUNK = 64


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _expand_gate(g, k):
    """g None / [B,T,H] / [B,T,H,K] -> [B,T,H,K] (compute dtype) or None."""
    if g is None:
        return None
    if g.dim() == 3:
        g = g.unsqueeze(-1)
    return g.expand(k.shape)


def _segments(B, T, cu_seqlens):
    """[(batch, start, end)] of each sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1; got {B}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def gla_recurrent_reference(q, k, v, g=None, scale=None, initial_state=None,
                            output_final_state=False, cu_seqlens=None):
    """Step-by-step recurrence. q [B,T,Hq,K], k [B,T,H,K], v [B,T,H,V], g [B,T,H,K]/[B,T,H]/None.

    Returns ``(o [B,T,Hq,V] in v.dtype, final_state [N,H,K,V] or None)``.
    """
    ct = _compute_dtype(q)
    B, T, Hq, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = Hq // H
    scale = K ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    gf = _expand_gate(g, k)
    gf = gf.to(ct) if gf is not None else None
    segs = _segments(B, T, cu_seqlens)
    outs = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, s, e) in enumerate(segs):
        if initial_state is not None:
            S = initial_state[n].to(ct)
        else:
            S = q.new_zeros(H, K, V, dtype=ct)
        for t in range(s, e):
            if gf is not None:
                S = torch.exp(gf[b, t])[:, :, None] * S
            S = S + kf[b, t][:, :, None] * vf[b, t][:, None, :]
            qt = qf[b, t].view(H, G, K) * scale
            outs[b][t] = torch.einsum("hgk,hkv->hgv", qt, S).reshape(Hq, V)
        finals.append(S)
    rows = []
    for b in range(B):
        row = [x if x is not None else q.new_zeros(Hq, V, dtype=ct) for x in outs[b]]
        rows.append(torch.stack(row, 0) if T > 0 else q.new_zeros(0, Hq, V, dtype=ct))
    o = torch.stack(rows, 0).to(v.dtype)
    final = torch.stack(finals, 0) if output_final_state else None
    return o, final


def _chunk_sequence(q, k, v, g, scale, S, chunk):
    """One sequence. q [H,G,L,K], k [H,L,K], v [H,L,V], g [H,L,K] or None, S [H,K,V].

    Returns (o [H,G,L,V], S_final)."""
    H, G, L, K = q.shape
    outs = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        C = e - s
        qc, kc, vc = q[:, :, s:e], k[:, s:e], v[:, s:e]
        if g is not None:
            b = torch.cumsum(g[:, s:e].clamp_min(LOG_GATE_MIN), dim=1)  # [H,C,K], ≤ 0, decreasing
            blast = b[:, -1:]                                         # [H,1,K]
            qt = qc * torch.exp(b)[:, None]                           # exp(b_i) ≤ 1
            kt = kc * torch.exp(blast - b)                            # exp(b_last − b_j) ≤ 1
            diff = b[:, :, None, :] - b[:, None, :, :]                # [H,C,C,K]: b_i − b_j
            mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
            diff = torch.where(mask[None, :, :, None], diff, torch.full_like(diff, -float("inf")))
            E = torch.exp(diff)                                       # ≤ 1 where j ≤ i, else 0
            A = torch.einsum("hgik,hjk,hijk->hgij", qc, kc, E)
            decay = torch.exp(blast[:, 0])[:, :, None]                # [H,K,1]
        else:
            qt, kt = qc, kc
            mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
            A = torch.einsum("hgik,hjk->hgij", qc, kc) * mask
            decay = None
        o = torch.einsum("hgik,hkv->hgiv", qt, S) + torch.einsum("hgij,hjv->hgiv", A, vc)
        outs.append(o * scale)
        upd = torch.einsum("hjk,hjv->hkv", kt, vc)
        S = (decay * S if decay is not None else S) + upd
    o = torch.cat(outs, 2) if outs else q.new_zeros(H, G, 0, v.shape[-1])
    return o, S


def gla_chunk_reference(q, k, v, g=None, scale=None, initial_state=None,
                        output_final_state=False, cu_seqlens=None, chunk=CHUNK):
    """Chunked GLA in PyTorch (float32 / float64), differentiable by autograd. Same contract as
    :func:`gla_recurrent_reference`."""
    ct = _compute_dtype(q)
    B, T, Hq, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    G = Hq // H
    scale = K ** -0.5 if scale is None else scale
    gf = _expand_gate(g, k)
    segs = _segments(B, T, cu_seqlens)
    o_parts = {b: [] for b in range(B)}
    finals = []
    for n, (b, s, e) in enumerate(segs):
        qs = q[b, s:e].to(ct).reshape(e - s, H, G, K).permute(1, 2, 0, 3)   # [H,G,L,K]
        ks = k[b, s:e].to(ct).transpose(0, 1)                               # [H,L,K]
        vs = v[b, s:e].to(ct).transpose(0, 1)                               # [H,L,V]
        gs = gf[b, s:e].to(ct).transpose(0, 1) if gf is not None else None
        if initial_state is not None:
            S = initial_state[n].to(ct)
        else:
            S = q.new_zeros(H, K, V, dtype=ct)
        o, S = _chunk_sequence(qs, ks, vs, gs, scale, S, chunk)
        o_parts[b].append(o.permute(2, 0, 1, 3).reshape(e - s, Hq, V))
        finals.append(S)
    rows = []
    for b in range(B):
        parts = o_parts[b]
        rows.append(torch.cat(parts, 0) if parts else q.new_zeros(0, Hq, V, dtype=ct))
    o = torch.stack(rows, 0).to(v.dtype)
    final = torch.stack(finals, 0) if output_final_state else None
    return o, final
