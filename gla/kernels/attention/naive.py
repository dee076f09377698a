"""Pure-PyTorch gated-softmax attention: THE definition of the semantics of ``gla::attention``.

Every other implementation (the Triton kernels in ``flash.py``, the SDPA path in ``op.py``) is
tested against :func:`attention_reference` evaluated on float64 copies of its inputs.
"""
from __future__ import annotations

import math

import torch


def visible_positions(
    tq: int, tk: int, causal: bool, window: int, device: torch.device | str | None = None,
    chunk: int = 0,
) -> torch.Tensor | None:
    """Bool ``[tq, tk]``: may query ``i`` see key ``j`` by position alone (None: all visible).

    Positions are bottom-right aligned: query ``i`` sits at key position ``i + (tk - tq)``.
    ``causal``: ``j <= i + tk - tq``. ``window > 0``: ``(i + tk - tq) - j < window``.
    ``chunk > 0``: ``(i + tk - tq) // chunk == j // chunk`` (Llama 4's chunked attention).
    """
    if not causal and window <= 0 and chunk <= 0:
        return None
    i = torch.arange(tq, device=device).unsqueeze(1) + (tk - tq)
    j = torch.arange(tk, device=device).unsqueeze(0)
    vis = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= i)
    if window > 0:
        vis = vis & (i - j < window)
    if chunk > 0:
        vis = vis & (i // chunk == j // chunk)  # (floor division: rows before key 0 too)
    return vis


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window: int = 0,
    chunk: int = 0,
) -> torch.Tensor:
    """Gated softmax attention, written out. Differentiable in every tensor argument.

    Shapes: ``q [B, Hq, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]`` with
    ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA / MQA).

    ``out = softmax(scale · q kᵀ + bias, masked) v ⊙ sigmoid(gate)``, where

    * ``scale`` defaults to ``1 / sqrt(D)``;
    * ``bias`` is an additive float tensor broadcastable to ``[B, Hq, Tq, Tk]`` (may hold -inf);
    * ``key_mask`` is a bool ``[B, Tk]``, True where the key may be attended;
    * ``causal`` is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``;
    * ``window > 0`` additionally requires ``(i + Tk - Tq) - j < window``;
    * ``chunk > 0`` additionally requires ``(i + Tk - Tq) // chunk == j // chunk``: attention
      within aligned blocks of ``chunk`` positions (only with ``causal``);
    * ``gate`` holds pre-sigmoid logits, ``[B, Hq, Tq, Dv]`` (elementwise) or ``[B, Hq, Tq, 1]``
      (headwise), or anything else broadcastable to the output.

    A query row with no visible key (every score ``-inf`` after masking) outputs 0 and passes
    zero gradient (the flash-attention convention; plain ``softmax`` would give NaN). A finite
    bias such as ``finfo.min`` does not make a row "fully masked": such a row is an ordinary
    softmax whose value then depends on the working precision.

    Computes in float32 (float64 if ``q`` is float64) and returns ``q.dtype``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, H, T, D]")
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    group = Hq // Hkv
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(ct)
    vis = visible_positions(Tq, Tk, causal, window, q.device, chunk)
    if key_mask is not None:
        km = key_mask.to(torch.bool)[:, None, None, :]
        vis = km if vis is None else vis & km
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    if Tk == 0:   # no key at all: every row is fully masked
        m = s.new_zeros(s.shape[:-1] + (1,))
    else:
        m = s.detach().amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.matmul(p, vf) / denom
    if gate is not None:
        out = out * torch.sigmoid(gate.to(ct))
    return out.to(q.dtype)
