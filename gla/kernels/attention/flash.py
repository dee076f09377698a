"""Gated-softmax flash attention in Triton: forward and backward kernels, then their launchers.

FlashAttention-2 structure, read top to bottom like Triton's ``06-fused-attention`` tutorial:

* forward: one program per (query block, batch·query head). Online softmax in base 2 (``log2(e)``
  is folded into the scale), fp32 accumulation, key blocks outside the causal/window/chunk band are
  skipped and blocks entirely inside it run without masks. The sigmoid gate is applied in the
  epilogue, so the output is written once. Saves the log-sum-exp (base 2) per row.
* backward: a preprocess kernel (``delta = rowsum(dO·O)``, the gated ``dO``, and ``dgate``, all
  from the gated output: no ungated copy is saved), a
  dK/dV kernel (one program per key block and kv head; it loops over the query heads of its GQA
  group, so no atomics and no repeated K/V; on a small grid the group is split over programs
  whose fp32 partials one more kernel sums), and a dQ kernel (one program per query block).

Semantics (see ``naive.attention_reference``): GQA head ``h`` reads kv head ``h // group``;
bottom-right aligned causal / left window / chunk (causal within aligned blocks of ``chunk``
keys); additive ``bias`` broadcast with zero strides; bool
``key_mask [B, Tk]``; a query row with no visible key outputs 0 and gets zero gradients (its lse
is stored as +inf so that every recomputed probability is exactly 0).

Every tensor is addressed through its strides; nothing is made contiguous.

On Hopper (sm_90) :func:`attention_forward` and :func:`attention_backward` hand the calls where
it pays (``gluon_pays``, ``gluon_backward_pays``) to the Gluon kernels of ``hopper.py`` and
``hopper_bwd.py`` (FlashAttention-3's warp-specialized schedules, which Triton's compiler does
not produce from this file's kernels); same inputs and outputs, so either backward follows
either forward.
"""
from __future__ import annotations

import functools
import math
import os
import sys

import torch
import triton
import triton.language as tl

from ..launch import cdiv as _cdiv, launcher, next_pow2 as _next_pow2

LOG2E = 1.4426950408889634  # written out as a literal inside the kernels
# Finite biases below this are clamped before scaling by log2(e), so finfo(float32).min stays
# finite (a row masked only by finfo.min is a softmax, not an empty row); -inf stays -inf.
_BIAS_FLOOR = tl.constexpr(-1.0e38)

# Tests set this to True: every buffer the launchers allocate is filled with NaN first, so an
# element the kernels forget to write shows up as a non-finite error.
POISON = os.environ.get("GLA_POISON", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _key_range(start_m, TQ, TK, WINDOW, CHUNK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Key blocks seen by query rows [start_m, start_m + BLOCK_M): lo ≤ lo_full ≤ hi_full ≤ hi.

    [lo, lo_full) and [hi_full, hi) need the position mask; [lo_full, hi_full) is entirely
    visible to every row of the block and inside [0, TK) (multiples of BLOCK_N)."""
    off = TK - TQ
    last_m = tl.minimum(start_m + BLOCK_M, TQ) - 1
    hi = start_m * 0 + TK
    hi_full = (hi // BLOCK_N) * BLOCK_N
    lo = start_m * 0
    lo_full = lo
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.maximum(last_m + off + 1, 0))
        hi_full = tl.minimum(hi_full, (tl.maximum(start_m + off + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        lo = (tl.maximum(start_m + off - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        lo_full = ((tl.maximum(last_m + off - WINDOW + 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_CHUNK:  # (causal) a row sees its own chunk's keys: from the chunk's first one
        lo = tl.maximum(lo, ((tl.maximum(start_m + off, 0) // CHUNK) * CHUNK // BLOCK_N) * BLOCK_N)
        first = (tl.maximum(last_m + off, 0) // CHUNK) * CHUNK
        lo_full = tl.maximum(lo_full, ((first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    lo = tl.minimum(lo, hi)
    lo_full = tl.minimum(tl.maximum(lo_full, lo), hi)
    hi_full = tl.maximum(tl.minimum(hi_full, hi), lo_full)
    return lo, lo_full, hi_full, hi


@triton.jit
def _query_range(start_n, TQ, TK, WINDOW, CHUNK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """Query blocks that see keys [start_n, start_n + BLOCK_N): lo ≤ lo_full ≤ hi_full ≤ hi.

    [lo_full, hi_full) holds whole query blocks inside [0, TQ) that see every key of the block
    by position; the masked bands also handle the ragged end (rows ≥ TQ load lse = +inf)."""
    off = TK - TQ
    last_n = tl.minimum(start_n + BLOCK_N, TK) - 1
    lo = start_n * 0
    lo_full = lo
    hi = lo + TQ
    hi_full = (hi // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        lo = (tl.maximum(start_n - off, 0) // BLOCK_M) * BLOCK_M
        lo_full = ((tl.maximum(last_n - off, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, tl.maximum(last_n + WINDOW - off, 0))
        hi_full = tl.minimum(hi_full,
                             (tl.maximum(start_n + WINDOW - off, 0) // BLOCK_M) * BLOCK_M)
    if HAS_CHUNK:  # (causal) a key is seen by the rows of its own chunk only: up to its end
        hi = tl.minimum(hi, tl.maximum((last_n // CHUNK + 1) * CHUNK - off, 0))
        hi_full = tl.minimum(hi_full, (tl.maximum((start_n // CHUNK + 1) * CHUNK - off, 0)
                                       // BLOCK_M) * BLOCK_M)
    lo = tl.minimum(lo, hi)
    lo_full = tl.minimum(tl.maximum(lo_full, lo), hi)
    hi_full = tl.maximum(tl.minimum(hi_full, hi), lo_full)
    return lo, lo_full, hi_full, hi


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [R, C] tile, zero where ``rows >= n_rows`` (only if CHECK_ROWS) or ``cols >= N_COLS``
    (only if the head dim was padded): bands proven in-bounds load without predicates."""
    if CHECK_ROWS:
        if N_COLS == cols.shape[0]:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    else:
        if N_COLS == cols.shape[0]:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return x


@triton.jit
def _scores(qk, offs_m, offs_n, qk_scale, TQ, TK, WINDOW, CHUNK, bias_base, stride_bm,
            stride_bn, km_base, stride_kmn, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
            HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_KMASK: tl.constexpr):
    """Base-2 logits of a [M, N] tile: qk·scale·log2e (+ bias·log2e), -inf where not visible.

    offs_m / offs_n may be given as [M, 1] / [1, N] or transposed ([1, M] / [N, 1]); every
    expression below broadcasts, so the same code serves the transposed dK/dV tile."""
    s = qk * qk_scale
    if HAS_BIAS:
        b = tl.load(bias_base + offs_m * stride_bm + offs_n * stride_bn,
                    mask=(offs_m < TQ) & (offs_n < TK), other=0.0).to(tl.float32)
        b = tl.where(b == float("-inf"), b, tl.maximum(b, _BIAS_FLOOR))
        s = s + b * 1.4426950408889634
    if HAS_KMASK:
        km = tl.load(km_base + offs_n * stride_kmn, mask=offs_n < TK, other=0)
        s = tl.where(km != 0, s, float("-inf"))
    if MASKED:
        vis = offs_n < TK
        if IS_CAUSAL:
            vis = vis & (offs_n <= offs_m + (TK - TQ))
        if HAS_WINDOW:
            vis = vis & ((offs_m + (TK - TQ)) - offs_n < WINDOW)
        if HAS_CHUNK:  # (causal: rows before key 0 see nothing, whatever their chunk reads)
            vis = vis & ((offs_m + (TK - TQ)) // CHUNK == offs_n // CHUNK)
        s = tl.where(vis, s, float("-inf"))
    return s


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    bias_base, stride_bm, stride_bn, km_base, stride_kmn,
                    offs_m, offs_d, offs_dv, lo, hi, qk_scale, TQ, TK, WINDOW, CHUNK,
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_CHUNK: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_KMASK: tl.constexpr, PRECISION: tl.constexpr,
                    INT64: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if INT64:  # offsets past 2**31 elements
            offs_n = offs_n.to(tl.int64)
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, TK, offs_d, D, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED or HAS_BIAS or HAS_KMASK:
            s = _scores(qk, offs_m[:, None], offs_n[None, :], qk_scale, TQ, TK, WINDOW, CHUNK,
                        bias_base, stride_bm, stride_bn, km_base, stride_kmn,
                        MASKED, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK)
            m_ij = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf; subtract 0 instead (no NaN).
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            s = s - m_safe[:, None]
        else:  # every key visible: the tutorial's fused scale-and-subtract
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            s = qk * qk_scale - m_ij[:, None]
            m_safe = m_ij
        p = tl.math.exp2(s)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                       offs_n, TK, offs_dv, DV, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@launcher
@triton.jit
def _attn_fwd(Q, K, V, GATE, BIAS, KMASK, OUT, LSE, sm_scale,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_gb, stride_gh, stride_gm, stride_gd,
              stride_bb, stride_bh, stride_bm, stride_bn,
              stride_kmb, stride_kmn,
              stride_ob, stride_oh, stride_om, stride_od,
              H, GROUP, TQ, TK, WINDOW, CHUNK,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_CHUNK: tl.constexpr, HAS_GATE: tl.constexpr,
              GATE_HEADWISE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KMASK: tl.constexpr,
              PRECISION: tl.constexpr, INT64: tl.constexpr):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:  # the longest rows first: better tail balance
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if INT64:  # offsets past 2**31 elements
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = tl.cast(sm_scale, tl.float32) * 1.4426950408889634

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    bias_base = BIAS + off_b * stride_bb + off_h * stride_bh
    km_base = KMASK + off_b * stride_kmb

    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, TQ, offs_d, D, True)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, lo_full, hi_full, hi = _key_range(start_m, TQ, TK, WINDOW, CHUNK, BLOCK_M, BLOCK_N,
                                          IS_CAUSAL, HAS_WINDOW, HAS_CHUNK)
    # left edge of the window / chunk band (masked), the fully visible middle, the diagonal.
    if HAS_WINDOW or HAS_CHUNK:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            bias_base, stride_bm, stride_bn, km_base, stride_kmn, offs_m, offs_d, offs_dv,
            lo, lo_full, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV, BLOCK_N,
            True, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION, INT64)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        bias_base, stride_bm, stride_bn, km_base, stride_kmn, offs_m, offs_d, offs_dv,
        lo_full, hi_full, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV, BLOCK_N,
        False, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION, INT64)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        bias_base, stride_bm, stride_bn, km_base, stride_kmn, offs_m, offs_d, offs_dv,
        hi_full, hi, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV, BLOCK_N,
        True, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION, INT64)

    # epilogue: normalise, empty rows -> 0 with lse = +inf, gate, write once.
    empty = l_i == 0.0
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    # one reciprocal per row, then a multiply per element (0.2-2% of the forward on the H200)
    o = acc * (1.0 / tl.where(empty, 1.0, l_i))[:, None]
    row_ok = offs_m < TQ
    tl.store(LSE + pid_bh.to(tl.int64) * TQ + offs_m, lse, mask=row_ok)
    o_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    o_off = off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om \
        + offs_dv[None, :] * stride_od
    if HAS_GATE:
        g_base = GATE + off_b * stride_gb + off_h * stride_gh
        if GATE_HEADWISE:
            g = tl.load(g_base + offs_m * stride_gm, mask=row_ok, other=0.0).to(tl.float32)
            og = o * tl.sigmoid(g)[:, None]
        else:
            g = tl.load(g_base + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                        mask=o_mask, other=0.0).to(tl.float32)
            og = o * tl.sigmoid(g)
        tl.store(OUT + o_off, og.to(OUT.dtype.element_ty), mask=o_mask)
    else:
        tl.store(OUT + o_off, o.to(OUT.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@launcher
@triton.jit
def _attn_bwd_preprocess(O, DOUT, GATE, DO_EFF, DGATE, DELTA, DQ_ACC,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         stride_gb, stride_gh, stride_gm, stride_gd,
                         stride_eb, stride_eh, stride_em, stride_ed,
                         stride_dgb, stride_dgh, stride_dgm, stride_dgd,
                         stride_ab, stride_ah, stride_am, stride_ad,
                         H, TQ, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_GATE: tl.constexpr, GATE_HEADWISE: tl.constexpr,
                         ZERO_DQ: tl.constexpr, INT64: tl.constexpr):
    """Per query row: ``delta = rowsum(dO_att · O)``, the attention's ``dO_att = dout·σ(g)`` and
    ``dgate``. O is the forward's gated output ``out = O_att·σ(g)``; no ungated copy is needed:
    ``dO_att · O_att = dout · out`` and ``dgate = dout·O_att·σ(1−σ) = dout·out·σ(−g)`` (summed
    over Dv for a headwise gate). ``ZERO_DQ``: also zero the rows of the Gluon backward's fp32 dQ
    accumulator (D == Dv there), as FlashAttention-3's preprocess does: one launch, not two."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64:  # offsets past 2**31 elements
        offs_m = offs_m.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < TQ
    msk = row_ok[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_dv[None, :] * stride_od, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DOUT + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(do * o, 1)
    if HAS_GATE:
        g_base = GATE + off_b * stride_gb + off_h * stride_gh
        dg_base = DGATE + off_b * stride_dgb + off_h * stride_dgh
        if GATE_HEADWISE:
            g = tl.load(g_base + offs_m * stride_gm, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(dg_base + offs_m * stride_dgm,
                     (delta * tl.sigmoid(-g)).to(DGATE.dtype.element_ty), mask=row_ok)
            do = do * tl.sigmoid(g)[:, None]
        else:
            g = tl.load(g_base + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                        mask=msk, other=0.0).to(tl.float32)
            tl.store(dg_base + offs_m[:, None] * stride_dgm + offs_dv[None, :] * stride_dgd,
                     (do * o * tl.sigmoid(-g)).to(DGATE.dtype.element_ty), mask=msk)
            do = do * tl.sigmoid(g)
        tl.store(DO_EFF + off_b * stride_eb + off_h * stride_eh + offs_m[:, None] * stride_em
                 + offs_dv[None, :] * stride_ed, do.to(DO_EFF.dtype.element_ty), mask=msk)
    tl.store(DELTA + pid_bh.to(tl.int64) * TQ + offs_m, delta, mask=row_ok)
    if ZERO_DQ:
        tl.store(DQ_ACC + off_b * stride_ab + off_h * stride_ah + offs_m[:, None] * stride_am
                 + offs_dv[None, :] * stride_ad, tl.zeros([BLOCK_M, BLOCK_DV], tl.float32),
                 mask=msk)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                         stride_qm, stride_qd, stride_dom, stride_dod,
                         bias_base, stride_bm, stride_bn, km_base, stride_kmn,
                         offs_n, offs_d, offs_dv, lo, hi, qk_scale, TQ, TK, WINDOW, CHUNK,
                         D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         HAS_CHUNK: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_KMASK: tl.constexpr,
                         PRECISION: tl.constexpr, INT64: tl.constexpr):
    # Transposed tiles: rows are keys (offs_n), columns are queries (offs_m).
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if INT64:  # offsets past 2**31 elements
            offs_m = offs_m.to(tl.int64)
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       offs_m, TQ, offs_d, D, MASKED)
        if MASKED:  # rows past TQ: lse = +inf makes their probabilities 0
            lse = tl.load(lse_base + offs_m, mask=offs_m < TQ, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < TQ, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if MASKED or HAS_BIAS or HAS_KMASK:
            sT = _scores(qkT, offs_m[None, :], offs_n[:, None], qk_scale, TQ, TK, WINDOW, CHUNK,
                         bias_base, stride_bm, stride_bn, km_base, stride_kmn,
                         MASKED, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK)
            pT = tl.math.exp2(sT - lse[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                        offs_m, TQ, offs_dv, DV, MASKED)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@launcher
@triton.jit
def _attn_bwd_dkdv(Q, K, V, BIAS, KMASK, DO, LSE, DELTA, DKEY, DVAL, sm_scale,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_bb, stride_bh, stride_bm, stride_bn,
                   stride_kmb, stride_kmn,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd, stride_dks, stride_dvs,
                   H, HK, GROUP, SPLIT, TQ, TK, WINDOW, CHUNK,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_KMASK: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
                   EVEN_M: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1) // SPLIT
    pid_s = tl.program_id(1) % SPLIT  # which slice of the GQA group this program sums
    off_b = (pid_bh // HK).to(tl.int64)
    off_hk = (pid_bh % HK).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if INT64:  # offsets past 2**31 elements
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    col_ok = offs_n < TK

    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=col_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn
                + offs_dv[None, :] * stride_vd, mask=col_ok[:, None] & (offs_dv[None, :] < DV),
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    km_base = KMASK + off_b * stride_kmb

    lo, lo_full, hi_full, hi = _query_range(start_n, TQ, TK, WINDOW, CHUNK, BLOCK_M, BLOCK_N,
                                            IS_CAUSAL, HAS_WINDOW, HAS_CHUNK)
    # the query heads of this kv head (all of them, or one slice when SPLIT > 1: then DKEY/DVAL
    # are fp32 partial sums, one per slice, added by _attn_bwd_dkdv_sum): no atomics either way.
    heads = GROUP // SPLIT
    for g in range(pid_s * heads, (pid_s + 1) * heads):
        off_h = off_hk * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        bias_base = BIAS + off_b * stride_bb + off_h * stride_bh
        row_base = (off_b * H + off_h) * TQ
        lse_base = LSE + row_base
        delta_base = DELTA + row_base
        # causal diagonal (masked), the fully visible middle, the window's / chunk's far edge and
        # the ragged last query block (masked).
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
            stride_dom, stride_dod, bias_base, stride_bm, stride_bn, km_base, stride_kmn,
            offs_n, offs_d, offs_dv, lo, lo_full, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV,
            BLOCK_M, True, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION, INT64)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
            stride_dom, stride_dod, bias_base, stride_bm, stride_bn, km_base, stride_kmn,
            offs_n, offs_d, offs_dv, lo_full, hi_full, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV,
            BLOCK_M, False, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION, INT64)
        if HAS_WINDOW or HAS_CHUNK or not EVEN_M:  # (else [hi_full, hi) is empty)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_qd,
                stride_dom, stride_dod, bias_base, stride_bm, stride_bn, km_base, stride_kmn,
                offs_n, offs_d, offs_dv, hi_full, hi, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV,
                BLOCK_M, True, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION,
                INT64)

    dk = dk * sm_scale
    DKEY += pid_s.to(tl.int64) * stride_dks
    DVAL += pid_s.to(tl.int64) * stride_dvs
    tl.store(DKEY + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DKEY.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DVAL + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(DVAL.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _sum_partials(P, stride_ps, OUT, stride_on, stride_od, row0, offs_n, TK,
                  SPLIT: tl.constexpr, N_COLS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  BLOCK_COLS: tl.constexpr):
    """OUT[offs_n, :] = sum over s of P[s, row0 + offs_n, :] (P contiguous, N_COLS wide)."""
    offs_d = tl.arange(0, BLOCK_COLS)
    msk = (offs_n[:, None] < TK) & (offs_d[None, :] < N_COLS)
    src = P + row0 * N_COLS + offs_n[:, None] * N_COLS + offs_d[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(src + tl.cast(stride_ps, tl.int64) * s, mask=msk, other=0.0)
    tl.store(OUT + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(OUT.dtype.element_ty), mask=msk)


@launcher
@triton.jit
def _attn_bwd_dkdv_sum(PK, PV, DKEY, DVAL, stride_pks, stride_pvs, HK, TK,
                       stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                       stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                       SPLIT: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                       INT64: tl.constexpr):
    """dK and dV of a split GQA backward: the sum of the SPLIT fp32 partials, in a fixed order
    (deterministic), written in the gradients' dtype through their strides. PK / PV are
    contiguous [SPLIT, B, HK, TK, D|DV]; axis 2 of the grid picks dK (0) or dV (1)."""
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // HK).to(tl.int64)
    off_hk = (pid_bh % HK).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:  # offsets past 2**31 elements
        offs_n = offs_n.to(tl.int64)
    row0 = pid_bh.to(tl.int64) * TK  # this (batch, kv head)'s first row in a partial
    if tl.program_id(2) == 0:
        _sum_partials(PK, stride_pks, DKEY + off_b * stride_dkb + off_hk * stride_dkh,
                      stride_dkn, stride_dkd, row0, offs_n, TK, SPLIT, D, BLOCK_N, BLOCK_D)
    else:
        _sum_partials(PV, stride_pvs, DVAL + off_b * stride_dvb + off_hk * stride_dvh,
                      stride_dvn, stride_dvd, row0, offs_n, TK, SPLIT, DV, BLOCK_N, BLOCK_DV)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd,
                       stride_vn, stride_vd, bias_base, stride_bm, stride_bn, km_base, stride_kmn,
                       offs_m, offs_d, offs_dv, lo, hi, qk_scale, TQ, TK, WINDOW, CHUNK,
                       D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_CHUNK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_KMASK: tl.constexpr, PRECISION: tl.constexpr,
                       INT64: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if INT64:  # offsets past 2**31 elements
            offs_n = offs_n.to(tl.int64)
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       offs_n, TK, offs_d, D, MASKED)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                       offs_n, TK, offs_dv, DV, MASKED)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED or HAS_BIAS or HAS_KMASK:
            s = _scores(qk, offs_m[:, None], offs_n[None, :], qk_scale, TQ, TK, WINDOW, CHUNK,
                        bias_base, stride_bm, stride_bn, km_base, stride_kmn,
                        MASKED, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK)
            p = tl.math.exp2(s - lse[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@launcher
@triton.jit
def _attn_bwd_dq(Q, K, V, BIAS, KMASK, DO, LSE, DELTA, DQ, sm_scale,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_bb, stride_bh, stride_bm, stride_bn,
                 stride_kmb, stride_kmn,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 H, GROUP, TQ, TK, WINDOW, CHUNK,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_KMASK: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if INT64:  # offsets past 2**31 elements
        offs_m = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    row_ok = offs_m < TQ

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    row_base = pid_bh.to(tl.int64) * TQ
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    bias_base = BIAS + off_b * stride_bb + off_h * stride_bh
    km_base = KMASK + off_b * stride_kmb
    lo, lo_full, hi_full, hi = _key_range(start_m, TQ, TK, WINDOW, CHUNK, BLOCK_M, BLOCK_N,
                                          IS_CAUSAL, HAS_WINDOW, HAS_CHUNK)
    if HAS_WINDOW or HAS_CHUNK:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            bias_base, stride_bm, stride_bn, km_base, stride_kmn, offs_m, offs_d, offs_dv,
            lo, lo_full, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV, BLOCK_N,
            True, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION, INT64)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        bias_base, stride_bm, stride_bn, km_base, stride_kmn, offs_m, offs_d, offs_dv,
        lo_full, hi_full, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV, BLOCK_N,
        False, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION, INT64)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        bias_base, stride_bm, stride_bn, km_base, stride_kmn, offs_m, offs_d, offs_dv,
        hi_full, hi, qk_scale, TQ, TK, WINDOW, CHUNK, D, DV, BLOCK_N,
        True, IS_CAUSAL, HAS_WINDOW, HAS_CHUNK, HAS_BIAS, HAS_KMASK, PRECISION, INT64)

    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
INTERPRETED = _attn_fwd.interpreted


def _pow2(n: int) -> int:
    return max(16, _next_pow2(n))


def _parse_config_override(text: str | None) -> dict:
    """``GLA_ATTN_CONFIG``: ``"fwd=128,128,8,2;dq@64=128,64,8,3"`` -> {(kernel, bd | None): cfg}.

    Each entry is ``kernel[@head_dim_bucket]=BLOCK_M,BLOCK_N,num_warps,num_stages`` with kernel
    one of fwd / dq / dkdv / pre and the bucket the padded head dim (16, 32, 64, 128, 256);
    without ``@`` it applies to every head dim. Only compiled (GPU) configs are overridden."""
    out = {}
    for item in (text or "").replace(" ", "").split(";"):
        if not item:
            continue
        try:
            name, vals = item.split("=")
            kern, _, bd = name.partition("@")
            bm, bn, w, st = (int(x) for x in vals.split(","))
        except ValueError:
            raise ValueError(f"GLA_ATTN_CONFIG entry {item!r}: expected "
                             "kernel[@D]=BLOCK_M,BLOCK_N,num_warps,num_stages") from None
        if kern not in ("fwd", "dq", "dkdv", "pre"):
            raise ValueError(f"GLA_ATTN_CONFIG entry {item!r}: kernel must be fwd, dq, dkdv or pre")
        out[(kern, int(bd) if bd else None)] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                                                    num_stages=st)
    return out


# Read once at import (benchmarks set it per process); tests may assign flash.CONFIG_OVERRIDE
# and call _configs.cache_clear().
CONFIG_OVERRIDE = _parse_config_override(os.environ.get("GLA_ATTN_CONFIG"))


def attention_configs(d: int, dv: int, dtype: torch.dtype, causal: bool, tq: int,
                      extras: bool = False, interpret: bool = INTERPRETED,
                      batch_heads: int | None = None, device=None
                      ) -> dict[str, dict[str, int]]:
    """Block sizes / warps / stages of the four kernels: the one heuristic table, no autotune.

    Keys: ``fwd`` and ``dq`` (BLOCK_M query rows per program, BLOCK_N keys per step), ``dkdv``
    (BLOCK_N keys per program, BLOCK_M query rows per step), ``pre`` (BLOCK_M rows).
    ``extras``: a bias or key_mask is present, or (head dim 256) a window or chunk: more
    registers per score tile (see :func:`_extra_tiles`).
    ``batch_heads`` (B·Hq) and ``device`` size the forward's grid: a causal forward with few
    128-row tiles per multiprocessor takes 64-row tiles (None: assume a large grid).
    ``GLA_ATTN_CONFIG`` (see :func:`_parse_config_override`) overrides entries on the GPU.
    Returns fresh dicts (the launchers use the cached, shared :func:`_configs`).
    """
    return {k: dict(c) for k, c in _configs(d, dv, dtype, causal, tq, extras, interpret,
                                            batch_heads, device).items()}


# A causal forward with fewer 128-row query tiles than this per multiprocessor runs faster with
# 64-row tiles (H200, bf16, B·H = 32: 64x64 wins by 11% at T = 2k and 6% at 4k, i.e. 2–8 tiles
# per SM; 128-row tiles win by 1–4% at 8k and 16k, 16–31 per SM).
_FEW_TILES_PER_SM = 12
_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    """Multiprocessors of a CUDA device (cached: the property query costs µs per launch)."""
    n_sm = _SM_COUNT.get(device.index)
    if n_sm is None:
        n_sm = _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n_sm


def _few_tiles(tq: int, batch_heads: int | None, device) -> bool:
    if batch_heads is None or getattr(device, "type", None) != "cuda":
        return False
    return _cdiv(tq, 128) * batch_heads < _FEW_TILES_PER_SM * _sm_count(device)


# The dK/dV kernel runs one program per (key block, kv head) and loops over the kv head's GQA
# group. With few such programs per multiprocessor (short sequences, few kv heads) the GPU idles
# and the causal tail (the first key blocks see every query) is GROUP times longer; then each
# group is split over programs that write fp32 partials, summed by one more small kernel.
_DKDV_PROGRAMS_PER_SM = 8
# GLA_ATTN_DKDV_SPLIT=N forces N slices per group (capped at the group size; benchmarks, tests).
DKDV_SPLIT = int(os.environ["GLA_ATTN_DKDV_SPLIT"]) if os.environ.get("GLA_ATTN_DKDV_SPLIT") \
    else None


def dkdv_split(group: int, programs: int, device) -> int:
    """How many programs share one GQA group in the dK/dV kernel (a divisor of ``group``).

    ``programs``: the unsplit grid (key blocks × B × kv heads)."""
    if DKDV_SPLIT is not None:
        split = max(1, min(DKDV_SPLIT, group))
        while group % split:
            split -= 1
        return split
    if group == 1 or getattr(device, "type", None) != "cuda":
        return 1
    n_sm = _sm_count(device)
    split = 1
    while split < group and group % (2 * split) == 0 and \
            programs * split < _DKDV_PROGRAMS_PER_SM * n_sm:
        split *= 2
    return split


def _configs(d, dv, dtype, causal, tq, extras=False, interpret=INTERPRETED, batch_heads=None,
             device=None):
    """Cached :func:`attention_configs` (shared dicts: do not mutate). Only ``tq <= 64`` and, for
    a causal forward, whether the grid is small matter."""
    few = bool(causal) and not interpret and _few_tiles(tq, batch_heads, device)
    return _configs_cached(d, dv, dtype, bool(causal), min(int(tq), 65), bool(extras),
                           bool(interpret), few)


@functools.lru_cache(maxsize=512)
def _configs_cached(d, dv, dtype, causal, tq, extras, interpret, few_tiles=False):
    bd = max(_pow2(d), _pow2(dv))
    if interpret:  # small tiles: the interpreter's cost is per op, and tests hit every edge
        c = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        return {"fwd": dict(c), "dq": dict(c), "dkdv": dict(c), "pre": dict(c, BLOCK_M=16)}
    # From the backward/forward sweeps on an H200 (benchmarks/results/attention-sweep-*-h200*.txt,
    # causal bf16, T = 4k/8k; retune with `python benchmarks/attention.py --sweep`): 64-key dK/dV
    # tiles on one warpgroup beat 128-key tiles on two by 17-19% of the whole backward.
    if bd <= 64:
        fwd = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        dkdv = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
        dq = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    elif bd <= 128:
        fwd = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
        dkdv = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
        dq = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)
    elif extras or dtype == torch.float32:  # head dim 256, conservative tiles (not re-swept)
        fwd = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2)
        dkdv = dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2)
        dq = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    else:  # head dim 256, bf16/fp16 (H200 sweep: fwd 1.49x, whole backward 3.3x the old tiles)
        fwd = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
        dkdv = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)
        dq = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if few_tiles and bd <= 128:  # causal forward, small grid: more, smaller programs
        fwd = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if extras:  # bias / key-mask tiles: smaller key tiles keep registers in check
        if bd <= 64:
            fwd = dict(fwd, BLOCK_N=32)
            dkdv = dict(dkdv, BLOCK_M=16, BLOCK_N=64, num_stages=2)
            dq = dict(dq, BLOCK_N=32)
        elif bd <= 128:
            fwd, dkdv, dq = (dict(fwd, BLOCK_N=32), dict(dkdv, BLOCK_M=16, BLOCK_N=64),
                             dict(dq, BLOCK_N=32))
        else:
            fwd = dict(fwd, BLOCK_M=64)
    if dtype == torch.float32:  # twice the bytes per element: halve the key tiles
        fwd = dict(fwd, BLOCK_N=max(16, fwd["BLOCK_N"] // 2), num_stages=2)
        dkdv = dict(dkdv, BLOCK_M=16, BLOCK_N=max(16, dkdv["BLOCK_N"] // 2), num_stages=2)
        dq = dict(dq, BLOCK_N=max(16, dq["BLOCK_N"] // 2), num_stages=2)
    if tq <= 64:  # decode / short queries: do not pay for 128 empty rows
        bm = _pow2(tq)
        fwd = dict(fwd, BLOCK_M=min(fwd["BLOCK_M"], bm), num_warps=4)
        dq = dict(dq, BLOCK_M=min(dq["BLOCK_M"], bm), num_warps=4)
    pre = dict(BLOCK_M=max(16, min(128, 4096 // _next_pow2(dv))), num_warps=4,
               num_stages=1)
    cfg = {"fwd": fwd, "dq": dq, "dkdv": dkdv, "pre": pre}
    for (kern, obd), c in CONFIG_OVERRIDE.items():
        if obd is None or obd == bd:
            cfg[kern] = dict(c)
    return cfg


def _precision(dtype: torch.dtype) -> str | None:
    """tl.dot input precision: fp32 inputs use tf32 unless torch asks for "highest" matmuls."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _empty(*shape, dtype, device):
    if POISON:  # tests: NaN in the buffer and past its end (unwritten or out-of-range reads show)
        n = math.prod(shape)
        big = torch.full((n + 4096,), float("nan"), dtype=dtype, device=device)
        return big[:n].view(shape)
    return torch.empty(*shape, dtype=dtype, device=device)


def _empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    t = torch.empty_like(x, dtype=dtype)
    if POISON:
        t.fill_(float("nan"))
    return t


def _empty_bthd(b, h, t, d, dtype, device) -> torch.Tensor:
    """[B, H, T, D] view of a [B, T, H, D] buffer: the layout every ``gla::attention`` output has
    (``out.transpose(1, 2).reshape(B, T, H * D)`` is then free)."""
    return _empty(b, t, h, d, dtype=dtype, device=device).transpose(1, 2)


def _check_chunk(chunk, causal) -> None:
    """The chunk's block ranges assume causal attention (a row sees its chunk up to itself)."""
    if chunk > 0 and not causal:
        raise ValueError("chunk > 0 needs causal=True (chunked attention is causal within chunks)")


def _extra_tiles(d, dv, bias, key_mask, window, chunk) -> bool:
    """Whether the call takes the "extras" tiles: a bias or key-mask tile loaded per score tile.
    A window or chunk only compares indices; at head dims ≤ 128 it keeps the plain tiles, which
    ran it 1.15–1.40× faster backward and 0.96–1.28× forward on an H200
    (``benchmarks/results/attention-position-mask-tiles-nvidia-h200.txt``); head dim 256 was
    not measured and keeps the extras tiles."""
    if bias is not None or key_mask is not None:
        return True
    return (window > 0 or chunk > 0) and max(_pow2(d), _pow2(dv)) > 128


def _extras(q, gate, bias, key_mask, tq, tk):
    """Expanded views (zero strides for broadcast dims) and their strides, or dummies."""
    B, H = q.shape[0], q.shape[1]
    if gate is not None:
        headwise = gate.shape[-1] == 1
        g = gate.expand(B, H, tq, gate.shape[-1])
        g_strides = g.stride()
    else:
        headwise, g, g_strides = False, q, (0, 0, 0, 0)
    if bias is not None:
        b = bias.expand(B, H, tq, tk)
        b_strides = b.stride()
    else:
        b, b_strides = q, (0, 0, 0, 0)
    if key_mask is not None:
        km = key_mask.expand(B, tk)
        if km.dtype == torch.bool:
            km = km.view(torch.uint8)
        km_strides = km.stride()
    else:
        km, km_strides = q, (0, 0)
    return g, g_strides, headwise, b, b_strides, km, km_strides


def _needs_int64(*ts) -> bool:
    """Whether an element offset inside one tensor can reach 2**31 (int32 index math would wrap)."""
    for t in ts:
        if t is None:
            continue
        # every element lies inside the storage: a small storage settles it without the sum
        if t.untyped_storage().nbytes() < (2**31 - 1) * t.element_size():
            continue
        if t.numel() > 0:
            if sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31 - 1:
                return True
    return False


def _interp_upcast(*ts):
    """The interpreter's bf16 arithmetic is wrong: run bf16 in fp32 there (inputs are exact)."""
    return [None if t is None else (t.float() if t.dtype == torch.bfloat16 else t) for t in ts]


# Set to "0" to keep every forward on the Triton kernel (A/B runs; an escape hatch).
GLUON = os.environ.get("GLA_ATTN_GLUON", "1") != "0"


def gluon_pays(d: int, tq: int, batch_heads: int, n_sm: int) -> bool:
    """Where the Hopper Gluon forward beat this file's forward on an H200 (bf16, CUDA-graph
    replays, same process; ``benchmarks/results/attention-gluon-fwd-nvidia-h200.txt``):

    * head dim 128: 1.11-1.32x from 128 query rows on, causal or not, gated or not, GQA; but
      0.86x with 32 or 64 programs of 128 rows on 132 SMs (1.13-1.32x with 128 programs), and
      0.77-0.85x for 1-16 query rows (decode: this file's forward takes 16-row tiles there);
    * head dim 64: 1.02-1.06x from T = 4096 on, 0.96-1.00x at T = 512-2048 (0.86x gated at
      1024).
    """
    from . import hopper
    if tq < 128 or 4 * _cdiv(tq, hopper.BLOCK_M) * batch_heads < 3 * n_sm:
        return False
    return d == 128 or tq >= 4096


# Set to False (or GLA_ATTN_GLUON_BWD=0) to keep the backward on the Triton kernels.
GLUON_BACKWARD = GLUON and os.environ.get("GLA_ATTN_GLUON_BWD", "1") != "0"


def gluon_backward_pays(d: int, tq: int, group: int, work: int, capturing: bool) -> bool:
    """Where the Hopper Gluon backward beat this file's on an H200 (bf16, same process):

    * GPU time (whole backward, CUDA-graph replays,
      ``benchmarks/results/attention-gluon-bwd-nvidia-h200.txt``): head dim 128 1.08-1.22x at
      T = 1k-16k (causal), 1.10x non-causal, 1.17x with GQA 16/4 (session 12; the kernel has
      been 4-14% faster since session 15); head dim 64 (session 15: lse/delta staged in
      shared memory, heads scheduled by L2) 1.28x at T = 2k, 1.21x at 4k, 1.17x at 8k, 1.16x
      at 16k (causal), 1.24x / 1.20x with GQA 16/4 at 4k / 8k, 1.05x non-causal at 4k; not
      timed below 2k;
    * host time: more per call than the Triton path's three launches (the cast, the split's
      sum, seven TMA descriptors). Back-to-back eager calls at D=128, B·H=32 were faster with
      it at T = 2048 and slower at 1024: 291 vs 320 and 210 vs 150 µs per call in session 12
      (``attention-bwd-host-nvidia-h200.md``); 285 vs 318 and 187 vs 121 in session 13, with
      the zeroing in the preprocess and descriptors encoded once
      (``attention-host-encoded-nvidia-h200.md``). So outside a CUDA-graph capture it takes
      calls from ``work`` (B·H·Tq·Tk) = 32·2048² on.
    """
    if not capturing and work < 32 * 2048 * 2048:
        return False
    return d == 128 or tq >= 2048



# ----------------------------------------------------------------------------------------------
# Call plans
# ----------------------------------------------------------------------------------------------
# A training loop calls the attention with the same shapes step after step, and at short
# sequences the host bounds the step. The launchers' decisions (Gluon or Triton, tiles, grids,
# strides, int64 indexing, the launch keys) took ~150-300 µs of the H200 host's time per
# training step at T <= 2048, more than the GPU's (``results/attention-step-host-*.md``). A plan
# makes them once per call signature, keyed on everything they read: the tensors' shapes,
# strides, dtypes, devices and 16-byte alignment, the scalars, and the switches below (tests
# and benchmarks flip them between calls). It holds no tensor.

# GLA_ATTN_PLANS=0: every call decides afresh (to compare, or to rule plans out).
PLANS = os.environ.get("GLA_ATTN_PLANS", "1") != "0"
_PLANS_MAX = 1024  # plans kept per direction; past that the cache starts over
_FORWARD_PLANS: dict = {}
_BACKWARD_PLANS: dict = {}
_GLUON_MODULES = tuple(__name__.rsplit(".", 1)[0] + m for m in (".hopper", ".hopper_bwd"))


def _meta(t) -> tuple | None:
    """What the launchers read of a tensor."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15)


def _switches() -> tuple:
    """The module-level switches a plan's decisions read (the Gluon modules' once imported)."""
    mods = sys.modules
    gluon = tuple(m.plan_switches() if m is not None else None
                  for m in (mods.get(_GLUON_MODULES[0]), mods.get(_GLUON_MODULES[1])))
    return (GLUON, GLUON_BACKWARD, POISON, DKDV_SPLIT, id(CONFIG_OVERRIDE), gluon_pays,
            gluon_backward_pays, gluon)


def clear_plans() -> None:
    """Drop every call plan (each next call decides afresh)."""
    _FORWARD_PLANS.clear()
    _BACKWARD_PLANS.clear()


def _planned(plans: dict, key, build, bound: int | None = None):
    """The plan under ``key()``, built on a miss and kept under the key as it reads after the
    build (which may import the Gluon modules, whose switches then join the key). Past ``bound``
    plans (default ``_PLANS_MAX``) the dict starts over."""
    plan = plans.get(key())
    if plan is None:
        plan = build()
        if len(plans) >= (_PLANS_MAX if bound is None else bound):
            plans.clear()
        plans[key()] = plan
    return plan


def forward_plan(q, k, v, gate=None, bias=None, key_mask=None, scale=None, causal=False,
                 window=0, chunk=0, config=None) -> "_ForwardPlan":
    """The plan :func:`attention_forward` runs for this call's signature (kept while
    :data:`PLANS` is on and no ``config`` is forced, else made afresh):
    ``plan(q, k, v, gate, bias, key_mask)`` returns ``(out, lse)``, and ``plan.backward(...)``
    the gradients of a call it ran."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    args = (q, k, v, gate, bias, key_mask, float(scale), bool(causal), int(window), int(chunk))
    if config is not None or not PLANS:
        return _ForwardPlan(*args, config=config)
    return _planned(_FORWARD_PLANS, lambda: (_switches(), _precision(q.dtype),
                                             *map(_meta, args[:6]), *args[6:]),
                    lambda: _ForwardPlan(*args))


def attention_forward(q, k, v, gate=None, bias=None, key_mask=None, scale=None, causal=False,
                      window=0, chunk=0, config=None):
    """Launch the forward kernel. Returns ``(out, lse)``.

    ``out`` is a ``[B, Hq, Tq, Dv]`` view of a ``[B, Tq, Hq, Dv]`` buffer in ``q.dtype`` (gated
    if there is a gate: the backward needs nothing else); ``lse`` is fp32 ``[B, Hq, Tq]`` (base
    2, +inf for rows with no visible key).
    """
    return forward_plan(q, k, v, gate, bias, key_mask, scale, causal, window, chunk,
                        config)(q, k, v, gate, bias, key_mask)


class _ForwardPlan:
    """:func:`attention_forward` for one call signature: calling it allocates ``(out, lse)`` and
    launches the Gluon forward where it applies and pays, else this file's."""

    def __init__(self, q, k, v, gate, bias, key_mask, scale, causal, window, chunk, config=None):
        B, H, TQ, D = q.shape
        HK, TK, DV = k.shape[1], k.shape[2], v.shape[3]
        _check_chunk(chunk, causal)
        self.outputs = (B, H, TQ, DV, q.dtype, q.device)
        self.scalars, self.config = (scale, causal, window, chunk), config
        self.backward_plans: dict = {}
        self.empty = B * H * TQ * DV == 0
        self.gluon = None
        if self.empty:
            return
        if config is None:
            self.gluon, self.declined = _gluon_forward_plan(q, k, v, gate, bias, key_mask, scale, causal, window,
                                             chunk)
        self.upcast = INTERPRETED and q.dtype == torch.bfloat16
        if self.upcast:
            q, k, v, gate, bias = _interp_upcast(q, k, v, gate, bias)
        c = (config or _configs(D, DV, q.dtype, causal, TQ,
                                _extra_tiles(D, DV, bias, key_mask, window, chunk),
                                batch_heads=B * H, device=q.device))["fwd"]
        g, gs, headwise, b, bs, km, kms = _extras(q, gate, bias, key_mask, TQ, TK)
        out = _empty_bthd(B, H, TQ, DV, q.dtype, q.device)  # (this call's layout, for strides)
        int64 = _needs_int64(q, k, v, out, g if gate is not None else None,
                             b if bias is not None else None)
        self.tail = (scale, *q.stride(), *k.stride(), *v.stride(), *gs, *bs, *kms,
                     *out.stride(), H, H // HK, TQ, TK, window, chunk)
        self.launch = _attn_fwd.bind((_cdiv(TQ, c["BLOCK_M"]), B * H), dict(
            D=D, DV=DV, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
            IS_CAUSAL=causal, HAS_WINDOW=window > 0, HAS_CHUNK=chunk > 0,
            HAS_GATE=gate is not None,
            GATE_HEADWISE=headwise, HAS_BIAS=bias is not None, HAS_KMASK=key_mask is not None,
            PRECISION=_precision(q.dtype), INT64=int64,
            num_warps=c["num_warps"], num_stages=c["num_stages"]))

    def __call__(self, q, k, v, gate, bias, key_mask):
        B, H, TQ, DV, dtype, device = self.outputs
        out = _empty_bthd(B, H, TQ, DV, dtype, device)
        lse = _empty(B, H, TQ, dtype=torch.float32, device=device)
        if self.empty:
            lse.fill_(float("inf"))
            return out, lse
        if self.gluon is not None:
            try:
                self.gluon(q, k, v, out, lse, gate)
                return out, lse
            except self.declined:  # failed to compile: this file's kernel from now on
                self.gluon = None
        if self.upcast:
            q, k, v, gate, bias = _interp_upcast(q, k, v, gate, bias)
        # kernels write through strides; in the interpreter-bf16 case write fp32 then cast.
        out_k = out if not self.upcast else torch.empty_like(out, dtype=q.dtype)
        self.launch(q, k, v, _or(gate, q), _or(bias, q), _or(_mask_bytes(key_mask), q), out_k,
                    lse, *self.tail)
        if out_k is not out:
            out.copy_(out_k)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, gate, bias, key_mask):
        """:func:`attention_backward` of a call this plan ran (``q`` ... ``key_mask`` that call's,
        ``out``, ``lse`` its outputs). Those are what this plan's key describes, so the backward's
        plan is looked up by what only the backward knows: ``dout``, the switches, the matmul
        precision and graph capture: a key of one tensor, not nine."""
        tensors = (dout, q, k, v, out, lse, gate, bias, key_mask)
        if self.config is not None or not PLANS:
            return _BackwardPlan(*tensors, *self.scalars, config=self.config)(*tensors)
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        plan = _planned(self.backward_plans,
                        lambda: (_switches(), _precision(q.dtype), capturing, _meta(dout)),
                        lambda: _BackwardPlan(*tensors, *self.scalars), bound=16)
        return plan(*tensors)


def _or(t, dummy):
    """A pointer argument: the tensor, or a dummy where the kernel reads none."""
    return dummy if t is None else t


def _mask_bytes(key_mask):
    """A bool key mask as the bytes the kernels read (Triton has no bool pointers)."""
    if key_mask is not None and key_mask.dtype == torch.bool:
        return key_mask.view(torch.uint8)
    return key_mask


def _gluon_modules():
    """``hopper`` and ``hopper_bwd``, imported here, not with this module (Gluon's modules take
    ~60 ms to import), and together: both join a plan's key at once (``_switches``), so the
    first backward does not change the key the first forward's plan was stored under."""
    from . import hopper, hopper_bwd
    return hopper, hopper_bwd


def _gluon_forward_plan(q, k, v, gate, bias, key_mask, scale, causal, window, chunk):
    """The Hopper forward's plan (``hopper.forward_plan``) and the exception it declines with,
    where it applies and pays; else (None, None)."""
    if not GLUON or INTERPRETED or not q.is_cuda:
        return None, None
    hopper, _ = _gluon_modules()
    if hopper.unsupported_reason(q, k, v, gate, bias, key_mask, causal, window, chunk, scale) \
            or not gluon_pays(q.shape[3], q.shape[2], q.shape[0] * q.shape[1],
                              _sm_count(q.device)):
        return None, None
    B, H, TQ, _ = q.shape
    _, gs, headwise = _extras(q, gate, None, None, TQ, k.shape[2])[:3]
    out = _empty_bthd(B, H, TQ, v.shape[3], q.dtype, q.device)  # (the outputs' layout)
    return hopper.forward_plan(q, k, v, out, gate, gs, headwise, scale, causal), hopper.Declined


def attention_backward(dout, q, k, v, out, lse, gate=None, bias=None, key_mask=None,
                       scale=None, causal=False, window=0, chunk=0, config=None):
    """Launch preprocess, dK/dV and dQ kernels. Returns ``(dq, dk, dv, dgate)`` (dgate None
    without a gate). ``out`` and ``lse`` are what :func:`attention_forward` returned."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    tensors = (dout, q, k, v, out, lse, gate, bias, key_mask)
    scalars = (float(scale), bool(causal), int(window), int(chunk))
    if config is not None or not PLANS:
        return _BackwardPlan(*tensors, *scalars, config=config)(*tensors)
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    plan = _planned(_BACKWARD_PLANS, lambda: (_switches(), _precision(q.dtype), capturing,
                                              *map(_meta, tensors), *scalars),
                    lambda: _BackwardPlan(*tensors, *scalars))
    return plan(*tensors)


class _BackwardPlan:
    """:func:`attention_backward` for one call signature: calling it allocates the gradients
    and launches the preprocess, then the Gluon backward where it applies and pays, else this
    file's dK/dV and dQ kernels."""

    def __init__(self, dout, q, k, v, out, lse, gate, bias, key_mask, scale, causal, window,
                 chunk, config=None):
        B, H, TQ, D = q.shape
        HK, TK, DV = k.shape[1], k.shape[2], v.shape[3]
        _check_chunk(chunk, causal)
        self.shape = (B, H, TQ, DV, q.dtype, q.device)
        self.empty = q.numel() == 0 and k.numel() == 0 and v.numel() == 0
        self.gluon = self.pre = self.dkdv = self.dq = self.sum = None
        self.gated = gate is not None
        if self.empty:
            return
        self.upcast = INTERPRETED and q.dtype == torch.bfloat16
        if self.upcast:
            dout, q, k, v, out, gate, bias = _interp_upcast(dout, q, k, v, out, gate, bias)
        cfg = config or _configs(D, DV, q.dtype, causal, TQ,
                                 _extra_tiles(D, DV, bias, key_mask, window, chunk))
        g, gs, headwise, b, bs, km, kms = _extras(q, gate, bias, key_mask, TQ, TK)
        # this call's buffers, for their strides (each call allocates its own)
        dq, dk, dv, dgate, delta, do_eff = self._buffers(dout, q, k, v, gate)
        dgs = dgate.expand(B, H, TQ, gate.shape[-1]).stride() if gate is not None else (0,) * 4
        gluon = config is None and TQ > 0 and TK > 0 and _gluon_backward_applies(
            q, k, v, do_eff, bias, key_mask, scale, causal, window, chunk)
        # the Gluon kernel's fp32 dQ accumulator, zeroed by the preprocess
        dq_acc = _empty_bthd(B, H, TQ, D, torch.float32, q.device) if gluon else None
        int64 = _needs_int64(q, k, v, out, dout, dq, dk, dv, g if gate is not None else None,
                             b if bias is not None else None, dq_acc)
        if TQ > 0:
            c = cfg["pre"]
            self.pre_tail = (*out.stride(), *dout.stride(), *gs, *do_eff.stride(), *dgs,
                             *(dq_acc.stride() if gluon else (0, 0, 0, 0)), H, TQ)
            self.pre = _attn_bwd_preprocess.bind((_cdiv(TQ, c["BLOCK_M"]), B * H), dict(
                DV=DV, BLOCK_DV=_pow2(DV), BLOCK_M=c["BLOCK_M"], HAS_GATE=gate is not None,
                GATE_HEADWISE=headwise, ZERO_DQ=gluon, INT64=int64,
                num_warps=c["num_warps"], num_stages=c["num_stages"]))
        if gluon:
            self.gluon = _GluonBackward(q, k, v, do_eff, dq_acc, dk, dv, scale, causal)
        common = dict(D=D, DV=DV, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), IS_CAUSAL=causal,
                      HAS_WINDOW=window > 0, HAS_CHUNK=chunk > 0, HAS_BIAS=bias is not None,
                      HAS_KMASK=key_mask is not None, PRECISION=_precision(q.dtype),
                      INT64=int64)
        self.split = 1
        if TK > 0:
            c = cfg["dkdv"]
            n_blocks = _cdiv(TK, c["BLOCK_N"])
            split = self.split = dkdv_split(H // HK, n_blocks * B * HK, q.device)
            if split > 1:  # fp32 partials, one per slice of each GQA group, summed below
                part_k, part_v = _partials(split, k, v)
                out_k, out_v = part_k[0], part_v[0]
                split_strides = (part_k.stride(0), part_v.stride(0))
                self.sum = _DkdvSum(part_k, part_v, dk, dv, split, int64)
            else:
                out_k, out_v, split_strides = dk, dv, (0, 0)
            self.dkdv_tail = (scale, *q.stride(), *k.stride(), *v.stride(), *bs, *kms,
                              *do_eff.stride(), *out_k.stride(), *out_v.stride(),
                              *split_strides, H, HK, H // HK, split, TQ, TK, window, chunk)
            self.dkdv = _attn_bwd_dkdv.bind((n_blocks, B * HK * split), dict(
                BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], EVEN_M=TQ % c["BLOCK_M"] == 0,
                num_warps=c["num_warps"], num_stages=c["num_stages"], **common))
        if TQ > 0:
            c = cfg["dq"]
            self.dq_tail = (scale, *q.stride(), *k.stride(), *v.stride(), *bs, *kms,
                            *do_eff.stride(), *dq.stride(), H, H // HK, TQ, TK, window, chunk)
            self.dq = _attn_bwd_dq.bind((_cdiv(TQ, c["BLOCK_M"]), B * H), dict(
                BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"],
                num_stages=c["num_stages"], **common))

    @staticmethod
    def _buffers(dout, q, k, v, gate):
        """dq, dk, dv (in q's, k's, v's layouts), dgate, delta, and the attention's own output
        gradient (written by the preprocess when gated)."""
        B, H, TQ, _ = q.shape
        dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
        delta = _empty(B, H, TQ, dtype=torch.float32, device=q.device)
        if gate is None:
            return dq, dk, dv, None, delta, dout
        return (dq, dk, dv, _empty_like(gate), delta,
                _empty_bthd(B, H, TQ, v.shape[3], q.dtype, q.device))

    def __call__(self, dout, q, k, v, out, lse, gate, bias, key_mask):
        if self.empty:
            dgate = _empty_like(gate) if gate is not None else None
            if dgate is not None:
                dgate.zero_()
            return _empty_like(q), _empty_like(k), _empty_like(v), dgate
        final = None
        if self.upcast:  # interpreter bf16: computed in fp32, cast at the end
            final = (_empty_like(q), _empty_like(k), _empty_like(v),
                     _empty_like(gate) if gate is not None else None)
            dout, q, k, v, out, gate, bias = _interp_upcast(dout, q, k, v, out, gate, bias)
        dq, dk, dv, dgate, delta, do_eff = self._buffers(dout, q, k, v, gate)
        gluon = self.gluon
        dq_acc = gluon.accumulator(q) if gluon is not None else None
        if self.pre is not None:
            self.pre(out, dout, _or(gate, q), do_eff, _or(dgate, delta), delta,
                     _or(dq_acc, delta), *self.pre_tail)
        if gluon is not None:
            if gluon(q, k, v, do_eff, lse, delta, dq_acc, dq, dk, dv):
                return self._cast(final, (dq, dk, dv, dgate))
            self.gluon = None  # failed to compile: this file's kernels from now on
        b, km = _or(bias, q), _or(_mask_bytes(key_mask), q)
        if self.dkdv is not None:
            if self.split > 1:
                part_k, part_v = _partials(self.split, k, v)
                self.dkdv(q, k, v, b, km, do_eff, lse, delta, part_k[0], part_v[0],
                          *self.dkdv_tail)
                self.sum(part_k, part_v, dk, dv)
            else:
                self.dkdv(q, k, v, b, km, do_eff, lse, delta, dk, dv, *self.dkdv_tail)
        if self.dq is not None:
            self.dq(q, k, v, b, km, do_eff, lse, delta, dq, *self.dq_tail)
        return self._cast(final, (dq, dk, dv, dgate))

    @staticmethod
    def _cast(final, grads):
        if final is None:
            return grads
        for dst, src in zip(final, grads):
            if dst is not None:
                dst.copy_(src)
        return final


def _partials(split, k, v):
    """The fp32 dK/dV partials of a split GQA group, [split, B, Hk, Tk, D] each."""
    B, HK, TK = k.shape[:3]
    return (_empty(split, B, HK, TK, k.shape[3], dtype=torch.float32, device=k.device),
            _empty(split, B, HK, TK, v.shape[3], dtype=torch.float32, device=k.device))


class _DkdvSum:
    """dK and dV from the fp32 partials of a split GQA group (``_attn_bwd_dkdv_sum``)."""

    def __init__(self, part_k, part_v, dk, dv, split, int64):
        HK, TK, D, DV = dk.shape[1], dk.shape[2], dk.shape[3], dv.shape[3]
        self.tail = (part_k.stride(0), part_v.stride(0), HK, TK, *dk.stride(), *dv.stride())
        self.launch = _attn_bwd_dkdv_sum.bind((_cdiv(TK, 64), dk.shape[0] * HK, 2), dict(
            SPLIT=split, D=D, DV=DV, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), BLOCK_N=64,
            INT64=int64, num_warps=4))

    def __call__(self, part_k, part_v, dk, dv):
        self.launch(part_k, part_v, dk, dv, *self.tail)


def _gluon_backward_applies(q, k, v, do, bias, key_mask, scale, causal, window, chunk) -> bool:
    """Whether the Hopper backward (``hopper_bwd.py``) takes this call, whose attention output
    gradient is ``do``: asked before the preprocess, which then zeroes its dQ accumulator."""
    if not GLUON_BACKWARD or INTERPRETED or not q.is_cuda:
        return False
    _, hopper_bwd = _gluon_modules()
    return not hopper_bwd.unsupported_reason(q, k, v, do, bias, key_mask, causal, window, chunk,
                                             scale) \
        and gluon_backward_pays(q.shape[3], q.shape[2], q.shape[1] // k.shape[1],
                                q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2],
                                torch.cuda.is_current_stream_capturing())


class _GluonBackward:
    """The Hopper backward's part of a :class:`_BackwardPlan`, run on the preprocess's outputs
    (``dq_acc`` zeroed): the kernel, the split GQA groups' sum, and dQ's cast."""

    def __init__(self, q, k, v, do, dq_acc, dk, dv, scale, causal):
        from . import hopper, hopper_bwd
        self.copy_do = not hopper._tma_ready(do)  # e.g. the broadcast gradient of a sum
        if self.copy_do:
            do = do.clone(memory_format=torch.contiguous_format)
        # dk, dv are fresh, in k's and v's layout where those are dense (TMA-ready: checked before)
        B, H, TQ, D = q.shape
        HK, TK = k.shape[1], k.shape[2]
        self.split = dkdv_split(H // HK, _cdiv(TK, hopper_bwd.BLOCK_N) * B * HK, q.device)
        self.sum = None
        if self.split > 1:
            part_k, part_v = _partials(self.split, k, v)
            self.sum = _DkdvSum(part_k, part_v, dk, dv, self.split, _needs_int64(dk, dv))
        self.accumulator_shape = (B, H, TQ, D)
        self.run = hopper_bwd.backward_plan(q, k, v, do, dq_acc, dk, dv, scale, causal,
                                            self.split)
        self.declined = hopper.Declined

    def accumulator(self, q):
        B, H, TQ, D = self.accumulator_shape
        return _empty_bthd(B, H, TQ, D, torch.float32, q.device)

    def __call__(self, q, k, v, do, lse, delta, dq_acc, dq, dk, dv) -> bool:
        """False: the kernel declined at launch (a compile failure); the caller runs the Triton
        kernels."""
        if self.copy_do:  # (fresh: aligned, unlike a view)
            do = do.clone(memory_format=torch.contiguous_format)
        parts = _partials(self.split, k, v) if self.split > 1 else (None, None)
        try:
            self.run(q, k, v, do, lse, delta, dq_acc, dk, dv, *parts)
        except self.declined:
            return False
        if self.sum is not None:
            self.sum(*parts, dk, dv)
        dq.copy_(dq_acc)
        return True
