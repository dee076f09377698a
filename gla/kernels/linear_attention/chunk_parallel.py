"""Chunk-parallel GLA in Triton (the GLA paper's / fla's structure): forward and backward.

Only the state recurrences walk the chunks in order (one ``K×V`` update per chunk); everything
that is O(T·BT·D) runs with one program per chunk. Layout and gate conventions are those of
``chunk.py`` (rows of ``[B·T, heads, D]``, chunks of ``BT = 64`` rows, sub-blocks of ``BS = 16``,
``b`` = chunk-local cumsum of ``max(g, LOG_GATE_MIN)``, non-increasing inside a chunk since
``g ≤ 0``; a positive ``g`` is outside the contract and made NaN, which ``_exp_le0`` propagates).

Chunks are numbered globally: ``i_c = n·NT + c`` (``NT = cdiv(T, BT)``), or with ``cu_seqlens``
``i_c = coff[n] + c`` where ``coff`` = exclusive cumsum of ``cdiv(L_n, BT)``; the per-chunk grids
have ``NTG = cdiv(T_total, BT) + N`` programs (an upper bound known from shapes) and a small
device map ``cmap[i_c] = (n, c)`` (built with torch ops, no host sync); the spare programs exit.

Forward (``chunk_gla_fwd``)::

    b      : _gate_cumsum_kernel grid (NTG·K/BK, H) one scan per chunk
    h      : _h_kernel   grid (N·H, K/BK, V/BV)   sequential over chunks: stores the state at each
             chunk start, h[c] (and after the last chunk), S ← exp(b_l) ⊙ S + (k ⊙ exp(b_l − b))ᵀ v
    A      : _A_kernel   grid (NTG, Hq)           A_ij = Σ_c q_ic k_jc exp(b_ic − b_jc), j ≤ i
    o      : _o_kernel   grid (NTG·V/BV, Hq)      o = scale · ((q ⊙ exp(b)) h[c] + A v)

``h`` holds ``NC + 1`` states per sequence (index ``i_c + n``); its dtype is the operand dtype of
the dots that read it (bf16 when those dots are ``native`` — the dot would round it anyway — else
fp32). ``A`` (unscaled, fp32 ``[B·T, Hq, BT]``) and the backward's intra-chunk dq/dk take one of
two exact forms per chunk, chosen on the device from the chunk's gate span
``max_c (b_first − b_last)``:

* span ≤ ``SPAN_MAX`` (the common case: GLA's ``logsigmoid/16`` gates span ~3 nats per chunk):
  one ``[BT, BT]`` dot with the chunk's first row as the reference,
  ``exp(b_i − b_j) = exp(b_i − b_0)·exp(b_0 − b_j)``, factors within ``exp(±SPAN_MAX)``;
* otherwise sub-blocks: row sub-block ``I`` takes the keys of the earlier sub-blocks in one dot
  with the reference row ``r`` = last row of sub-block ``I − 1`` (both factors ≤ 1 for
  ``j ≤ r < i``) and its diagonal ``BS × BS`` block elementwise (column loop on CUDA,
  ``[BS, BS, BK]`` broadcast on CPU).

Backward (``chunk_gla_bwd``) recomputes ``b``, ``h`` and ``A``, then::

    dh  : _dh_kernel   grid (N·H, K/BK, V/BV)  reverse pass, dh[c] = ∂L/∂(state at the END of chunk
          c), dS ← exp(b_l) ⊙ dS + scale · Σ_group (q ⊙ exp(b))ᵀ do; d initial_state = final dS
    dA  : _dA_kernel   grid (NTG, Hq)          dA_ij = scale · do_i · v_j (j ≤ i)
    dv  : _dv_kernel   grid (NTG·V/BV, H)      dv = (k ⊙ exp(b_l − b)) dh[c] + scale Σ_group Aᵀ do
    dq, dk, dg : _dqkg_kernel grid (NTG·K/BK, H), one-dot or sub-block form as A:
          dq = scale (do h[c]ᵀ) ⊙ exp(b) + Σ_j dA_ij k_j ⊙ exp(b_i − b_j)
          dk = (v dh[c]ᵀ) ⊙ exp(b_l − b) + Σ_group Σ_i dA_ij q_i ⊙ exp(b_i − b_j)
          dg_t = Σ_{u ≥ t, same chunk} (Σ_group q_u ⊙ dq_u − k_u ⊙ dk_u) + Σ_v dh[c] ⊙ h[c+1]

dg: the identity of ``chunk.py`` (∂L/∂B_u = q ⊙ dq − k ⊙ dk for the sequence-wide cumsum B, plus
the final-state term) applied to one chunk's local cumsum ``b``: the last row's ``b_l`` also
scales the whole end-of-chunk state, which adds ``Σ_v dS_end ⊙ S_end = Σ_v dh[c] ⊙ h[c+1]``
(for the last chunk ``dht ⊙ ht``: the old final-state term). Summed over chunks it is the same
sequence-wide reverse cumsum, but the reverse cumsum runs over ≤ 64 rows, so the rounding error
of dq/dk is no longer amplified by ~√T (the reason the sequential kernel needs tf32x3).

Dot operand precision (``GLA_LINEAR_DOT``, read at each call): per kernel, ``name=mode`` pairs
separated by commas, or one mode for all, e.g. ``GLA_LINEAR_DOT=native`` or
``GLA_LINEAR_DOT=h=native,o=native,A=tf32,dqk=tf32x3``. Kernels: ``h``, ``A``, ``o`` (forward),
``bh`` (the backward's recompute of h), ``dh``, ``dA``, ``dv``, ``dqk`` (the backward's recompute
of A uses ``A``). Modes:
``native`` (operands in the input dtype bf16/fp16, fp32 accumulation), ``tf32``, ``tf32x3``,
``ieee`` (fp32 operands). Only bf16/fp16 inputs on CUDA use it: fp32 inputs and the CPU
interpreter always use ``ieee``. Defaults: see ``_DEFAULT_DOT``.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.standard import _elementwise_max, _sum_combine

from ..launch import cdiv, launcher
from .chunk import BS, BT, _diag_3d, _exp_le0, _next_pow2, _seq_bounds, _sum
from .naive import LOG_GATE_MIN

# bf16/fp16 inputs on CUDA. The forward follows fla (bf16 h and o dots, fp32-operand A): a torch
# emulation of its roundings gives o rel RMS 2.4e-3 vs fp64 at T=1000, D=64/128 (1.7e-3 of which
# is the bf16 output itself). The backward keeps fp32 operands (tf32) wherever the result feeds
# dg (recomputed h: "bh", dh, dq/dk); dA's operands (do, v) are exact in bf16; dv as o.
_DEFAULT_DOT = {"h": "native", "A": "tf32", "o": "native", "bh": "tf32",
                "dh": "tf32", "dA": "native", "dv": "native", "dqk": "tf32"}
_MODES = ("native", "tf32", "tf32x3", "ieee")
_KERNELS = ("h", "dh", "A", "o", "dA", "dv", "dqk")

# None: the heuristic block sizes; tests set (BK, BV) to exercise several blocks on CPU.
BLOCK_OVERRIDE = None

# A chunk whose gate span max_c (b_first − b_last) is at most SPAN_MAX (nats) takes the one-dot
# intra-chunk form with the chunk's first row as reference: its factors lie in
# [exp(−SPAN_MAX), exp(SPAN_MAX)] = [4e-18, 2e17], normal numbers in fp32/tf32/bf16, so each
# product keeps its relative precision and nothing overflows. Wider spans (decays faster than
# ~0.6 nats per step on average) take the sub-block form, where every factor is ≤ 1.
SPAN_MAX = 40.0


def _dot_modes() -> dict:
    return dict(_dot_modes_cached(os.environ.get("GLA_LINEAR_DOT", "")))


@functools.lru_cache(maxsize=16)
def _dot_modes_cached(spec: str) -> dict:
    modes = dict(_DEFAULT_DOT)
    spec = spec.strip()
    if not spec:
        return modes
    if "=" not in spec:
        if spec not in _MODES:
            raise ValueError(f"GLA_LINEAR_DOT={spec!r}: mode must be one of {_MODES}")
        return {k: spec for k in modes}
    for item in spec.split(","):
        name, _, mode = item.partition("=")
        name, mode = name.strip(), mode.strip()
        if name not in modes or mode not in _MODES:
            raise ValueError(f"GLA_LINEAR_DOT item {item!r}: need name=mode with name in "
                             f"{tuple(modes)} and mode in {_MODES}")
        modes[name] = mode
    return modes


def _dot_cfg(kernel: str, dtype: torch.dtype, device: torch.device, modes=None):
    """(operand dtype, input_precision) of the dots of ``kernel`` (see the module docstring)."""
    if dtype == torch.float32 or device.type != "cuda":
        return tl.float32, "ieee"
    mode = (modes or _dot_modes())[kernel]
    if mode == "native":
        return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "ieee"
    return tl.float32, mode


def _state_dtype(dt, dtype: torch.dtype):
    """Storage dtype of h / dh: the operand dtype of the dots reading it."""
    return dtype if dt in (tl.bfloat16, tl.float16) else torch.float32


def _parse_blocks_override(text: str | None) -> dict:
    """``GLA_LINEAR_BLOCKS``: ``"dqk=64,64,8,1;h=32,32,4,2"`` -> {kernel: (BK, BV, warps, stages)}
    (CUDA only; for block-size experiments, ``benchmarks/linear_attention_profile.py``)."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(";"))):
        name, _, vals = item.partition("=")
        try:
            bk, bv, w, st = (int(x) for x in vals.split(","))
        except ValueError:
            raise ValueError(f"GLA_LINEAR_BLOCKS entry {item!r}: expected "
                             "kernel=BK,BV,num_warps,num_stages") from None
        if name.strip() not in _KERNELS:
            raise ValueError(f"GLA_LINEAR_BLOCKS entry {item!r}: kernel must be one of {_KERNELS}")
        out[name.strip()] = (bk, bv, w, st)
    return out


def _blocks(K: int, V: int, device: torch.device, NH: int) -> dict:
    """kernel -> (BK, BV, num_warps, num_stages); no autotuning (first call = compile only)."""
    return _blocks_cached(K, V, device.type, NH, os.environ.get("GLA_LINEAR_BLOCKS"),
                          BLOCK_OVERRIDE)


@functools.lru_cache(maxsize=64)
def _blocks_cached(K: int, V: int, device_type: str, NH: int, override: str | None,
                   block_override) -> dict:
    """CUDA: the per-chunk kernels take BK = 32 (A, o, dA) or 64 (dv, dqk) and BV = 64 (dA: 128);
    the reverse state pass takes 64 × 64 tiles (8 warps), or 32 × 32 (4 warps) when there are few
    sequences·heads (the tiles are independent, so more programs shorten the sequential critical
    path); the forward state pass 64 × 64 (4 warps) from 32 sequences·heads. Measured at B·H = 32,
    T = 16k (benchmarks/results/linear_attention-profile-*.md; ``--sweep``). The interpreter
    takes whole dimensions (few, big programs)."""
    if block_override is not None:
        bk, bv = block_override
        return {n: (bk, bv, 4, 1) for n in _KERNELS}
    if device_type != "cuda":
        bk, bv = _next_pow2(K), _next_pow2(V)
        return {n: (bk, bv, 4, 1) for n in _KERNELS}
    bk, bv = min(_next_pow2(K), 32), min(_next_pow2(V), 64)
    bks, bvs = min(_next_pow2(K), 64), min(_next_pow2(V), 64)
    if NH * cdiv(K, bks) * cdiv(V, bvs) < 264:
        bks, bvs = min(bks, 32), min(bvs, 32)
    nws = 8 if bks * bvs > 32 * 32 else 4
    h = (min(_next_pow2(K), 64), min(_next_pow2(V), 64), 4, 2) if NH >= 32 else (bks, bvs, nws, 2)
    bk64 = min(_next_pow2(K), 64)
    blocks = {"h": h, "dh": (bks, bvs, nws, 2), "A": (bk, bv, 4, 3), "o": (bk, bv, 4, 2),
              "dA": (bk, min(_next_pow2(V), 128), 8, 2), "dv": (bk64, bv, 4, 2),
              "dqk": (bk64, bv, 4, 1)}
    blocks.update(_parse_blocks_override(override))
    return blocks


def _chunk_index(cu_seqlens, T_total: int, N: int, device):
    """(NTG, NT, cmap [NTG, 2] int32 or None, coff [N + 1] int32 or None)."""
    if cu_seqlens is None:
        NT = cdiv(T_total, BT)
        return N * NT, NT, None, None
    cu = cu_seqlens.to(torch.int64)
    cnt = (cu[1:] - cu[:-1] + BT - 1) // BT
    coff = torch.zeros(N + 1, dtype=torch.int64, device=device)
    coff[1:] = torch.cumsum(cnt, 0)
    NTG = cdiv(T_total, BT) + N
    j = torch.arange(NTG, device=device, dtype=torch.int64)
    n = torch.searchsorted(coff[1:].contiguous(), j, right=True).clamp_max(N - 1)
    c = j - coff[n]
    cmap = torch.stack([n, c], 1).to(torch.int32).contiguous()
    return NTG, 0, cmap, coff.to(torch.int32)


@triton.jit
def _chunk_pos(i_c, cu_ptr, cmap_ptr, T, NT, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Global chunk index -> (sequence n, first row offset cs in it, bos, L)."""
    if IS_VARLEN:
        i_n = tl.load(cmap_ptr + i_c * 2).to(tl.int32)
        c = tl.load(cmap_ptr + i_c * 2 + 1).to(tl.int32)
    else:
        i_n = i_c // NT
        c = i_c % NT
    bos, eos = _seq_bounds(cu_ptr, i_n, T, IS_VARLEN)
    return i_n, c * BT, bos, eos - bos


# ----------------------------------------------------------------------------------------------
# Chunk-local cumulative gate, one program per (chunk, K-block, head)
# ----------------------------------------------------------------------------------------------
@launcher
@triton.jit
def _gate_cumsum_kernel(g_ptr, gc_ptr, cu_ptr, cmap_ptr, T, NT, H, s_gt, s_gh, s_gk,
                        K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                        IS_VARLEN: tl.constexpr, G_MIN: tl.constexpr):
    NK: tl.constexpr = (K + BK - 1) // BK
    i_c = tl.program_id(0) // NK
    i_k = tl.program_id(0) % NK
    i_h = tl.program_id(1)
    i_n, cs, bos, L = _chunk_pos(i_c, cu_ptr, cmap_ptr, T, NT, BT, IS_VARLEN)
    if cs >= L:
        return
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    rows = bos + cs + o_t
    m = ((cs + o_t) < L)[:, None] & (o_k < K)[None, :]
    gg = tl.load(g_ptr + rows[:, None] * s_gt + i_h * s_gh + o_k[None, :] * s_gk, mask=m,
                 other=0.0).to(tl.float32)
    # a closed gate (−inf) becomes G_MIN (naive.LOG_GATE_MIN); a positive one (not a decay, outside
    # the kernels' contract) becomes NaN, so that it shows in the outputs instead of being clamped
    gg = tl.where(gg > 0, float("nan"), tl.maximum(gg, G_MIN))
    b = tl.associative_scan(gg, 0, _sum_combine)
    tl.store(gc_ptr + rows[:, None] * (H * K) + i_h * K + o_k[None, :], b, mask=m)


def _gate_cumsum(s, g):
    """b = chunk-local cumsum of g (``[B,T,H,K]`` or ``[B,T,H]``) as fp32 ``[B,T,H,K]``."""
    g = g.contiguous()
    H, K = s.H, s.K
    s_gt, s_gh, s_gk = (H, 1, 0) if g.dim() == 3 else (H * K, K, 1)
    gc = torch.empty(s.B, s.T, H, K, dtype=torch.float32, device=s.dev)
    BK = min(_next_pow2(K), 64)
    _gate_cumsum_kernel[(s.NTG * cdiv(K, BK), H)](
        g, gc, s.cu, s.cmap, s.T, s.NT, H, s_gt, s_gh, s_gk, K=K, BK=BK, BT=BT,
        IS_VARLEN=s.varlen, G_MIN=LOG_GATE_MIN, num_warps=4)
    return gc


def gate_cumsum(g: torch.Tensor, k: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """:func:`_gate_cumsum` for callers without a :class:`_Setup` (the sequential kernels)."""
    return _gate_cumsum(_Setup(k, k, k, cu_seqlens), g)


# ----------------------------------------------------------------------------------------------
# Sequential state passes
# ----------------------------------------------------------------------------------------------
@launcher
@triton.jit
def _h_kernel(k_ptr, v_ptr, gc_ptr, h_ptr, h0_ptr, ht_ptr, cu_ptr, coff_ptr, T, NT, H,
              K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              BT: tl.constexpr, HAS_G: tl.constexpr, USE_H0: tl.constexpr,
              STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr,
              PREC: tl.constexpr):
    """h[i_c + n] = state at the start of chunk c (c = 0..NC; c = NC: after the last chunk)."""
    i_nh = tl.program_id(0)
    i_k = tl.program_id(1)
    i_v = tl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos = _seq_bounds(cu_ptr, i_n, T, IS_VARLEN)
    L = eos - bos
    if IS_VARLEN:
        base = tl.load(coff_ptr + i_n).to(tl.int32) + i_n
    else:
        base = i_n * (NT + 1)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk = o_k < K
    mv = o_v < V
    mkv = mk[:, None] & mv[None, :]
    sk = H * K
    sv = H * V
    hoff = i_h * K * V + o_k[:, None] * V + o_v[None, :]
    S = tl.full([BK, BV], 0.0, tl.float32)
    if USE_H0:
        S += tl.load(h0_ptr + i_n * H * K * V + hoff, mask=mkv, other=0.0).to(tl.float32)
    NC = (L + BT - 1) // BT
    for c in range(0, NC):
        tl.store(h_ptr + (base + c).to(tl.int64) * (H * K * V) + hoff,
                 S.to(h_ptr.dtype.element_ty), mask=mkv)
        cs = c * BT
        r = cs + o_t
        m = r < L
        t = bos + r
        kT = tl.load(k_ptr + t[None, :] * sk + i_h * K + o_k[:, None],
                     mask=mk[:, None] & m[None, :], other=0.0).to(tl.float32)    # [BK, BT]
        vv = tl.load(v_ptr + t[:, None] * sv + i_h * V + o_v[None, :],
                     mask=m[:, None] & mv[None, :], other=0.0)
        if HAS_G:
            last = tl.minimum(cs + BT, L) - 1
            bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
            bT = tl.load(gc_ptr + t[None, :] * sk + i_h * K + o_k[:, None],
                         mask=mk[:, None] & m[None, :], other=0.0)
            kT = kT * _exp_le0(bl[:, None] - bT)
            S = S * _exp_le0(bl)[:, None]
        S += tl.dot(kT.to(DT), vv.to(DT), input_precision=PREC)
    tl.store(h_ptr + (base + NC).to(tl.int64) * (H * K * V) + hoff,
             S.to(h_ptr.dtype.element_ty), mask=mkv)
    if STORE_HT:
        tl.store(ht_ptr + i_n * H * K * V + hoff, S.to(ht_ptr.dtype.element_ty), mask=mkv)


@launcher
@triton.jit
def _dh_kernel(q_ptr, do_ptr, gc_ptr, dh_ptr, dht_ptr, dh0_ptr, cu_ptr, coff_ptr, scale, T, NT,
               H, G, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BT: tl.constexpr, HAS_G: tl.constexpr, USE_DHT: tl.constexpr,
               STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr,
               PREC: tl.constexpr):
    """dh[i_c] = ∂L/∂(state at the end of chunk c), summed over the G query heads."""
    i_nh = tl.program_id(0)
    i_k = tl.program_id(1)
    i_v = tl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    HQ = H * G
    bos, eos = _seq_bounds(cu_ptr, i_n, T, IS_VARLEN)
    L = eos - bos
    if IS_VARLEN:
        base = tl.load(coff_ptr + i_n).to(tl.int32)
    else:
        base = i_n * NT
    scale = tl.cast(scale, tl.float32)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mk = o_k < K
    mv = o_v < V
    mkv = mk[:, None] & mv[None, :]
    sq = HQ * K
    sk = H * K
    sdo = HQ * V
    hoff = i_h * K * V + o_k[:, None] * V + o_v[None, :]
    dS = tl.full([BK, BV], 0.0, tl.float32)
    if USE_DHT:
        dS += tl.load(dht_ptr + i_n * H * K * V + hoff, mask=mkv, other=0.0).to(tl.float32)
    NC = (L + BT - 1) // BT
    for ii in range(0, NC):
        c = NC - 1 - ii
        tl.store(dh_ptr + (base + c).to(tl.int64) * (H * K * V) + hoff,
                 dS.to(dh_ptr.dtype.element_ty), mask=mkv)
        cs = c * BT
        r = cs + o_t
        m = r < L
        t = bos + r
        if HAS_G:
            last = tl.minimum(cs + BT, L) - 1
            bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
            bT = tl.load(gc_ptr + t[None, :] * sk + i_h * K + o_k[:, None],
                         mask=mk[:, None] & m[None, :], other=0.0)
            eT = _exp_le0(bT)
        upd = tl.full([BK, BV], 0.0, tl.float32)
        for gq in range(G):
            i_hq = i_h * G + gq
            qT = tl.load(q_ptr + t[None, :] * sq + i_hq * K + o_k[:, None],
                         mask=mk[:, None] & m[None, :], other=0.0).to(tl.float32)
            if HAS_G:
                qT = qT * eT
            dd = tl.load(do_ptr + t[:, None] * sdo + i_hq * V + o_v[None, :],
                         mask=m[:, None] & mv[None, :], other=0.0)
            upd += tl.dot(qT.to(DT), dd.to(DT), input_precision=PREC)
        if HAS_G:
            dS = dS * _exp_le0(bl)[:, None]
        dS += upd * scale
    if STORE_DH0:
        tl.store(dh0_ptr + i_n * H * K * V + hoff, dS.to(dh0_ptr.dtype.element_ty), mask=mkv)


# ----------------------------------------------------------------------------------------------
# Per-chunk forward kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _chunk_span(gc_ptr, t0, tl_, i_h, sk, K: tl.constexpr, BK: tl.constexpr):
    """max over the key channels of b(first row) − b(last row) of one chunk: ≥ 0 since g ≤ 0."""
    span = tl.full([], 0.0, tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        mk = o_k < K
        b0 = tl.load(gc_ptr + t0 * sk + i_h * K + o_k, mask=mk, other=0.0)
        bl = tl.load(gc_ptr + tl_ * sk + i_h * K + o_k, mask=mk, other=0.0)
        span = tl.maximum(span, tl.reduce(b0 - bl, 0, _elementwise_max))
    return span


@launcher
@triton.jit
def _A_kernel(q_ptr, k_ptr, gc_ptr, A_ptr, cu_ptr, cmap_ptr, span_max, T, NT, H, G,
              K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
              HAS_G: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr,
              PREC: tl.constexpr, DIAG_3D: tl.constexpr):
    """A of one chunk and query head (unscaled, causal, fp32 [B·T, Hq, BT]).

    Gate span ≤ ``span_max``: one ``[BT, BT]`` dot of ``q ⊙ exp(b − b_0)`` (≤ 1) and
    ``k ⊙ exp(b_0 − b)`` (≤ exp(span)) with ``b_0`` the chunk's first row. Otherwise the exact
    sub-block form (:func:`_A_sub_block`), whose every factor is ≤ 1."""
    NSUB: tl.constexpr = BT // BS
    i_c = tl.program_id(0)
    i_hq = tl.program_id(1)
    i_h = i_hq // G
    HQ = H * G
    i_n, cs, bos, L = _chunk_pos(i_c, cu_ptr, cmap_ptr, T, NT, BT, IS_VARLEN)
    if cs >= L:
        return
    o_t = tl.arange(0, BT)
    rA = cs + o_t
    mA = rA < L
    tA = bos + rA
    sq = HQ * K
    sk = H * K
    if HAS_G:
        span = _chunk_span(gc_ptr, bos + cs, bos + tl.minimum(cs + BT, L) - 1, i_h, sk, K, BK)
        if span <= span_max:
            _A_one_dot(q_ptr, k_ptr, gc_ptr, A_ptr, i_hq, i_h, cs, bos, mA, tA, HQ, sq, sk, K, BK,
                       BT, HAS_G, DT, PREC)
        else:
            for i_i in range(NSUB):
                if cs + i_i * BS < L:
                    _A_sub_block(q_ptr, k_ptr, gc_ptr, A_ptr, i_i, i_hq, i_h, cs, bos, L, HQ, sq, sk,
                                 K, BK, BT, BS, HAS_G, DT, PREC, DIAG_3D)
    else:   # no gate: nothing to bound
        _A_one_dot(q_ptr, k_ptr, gc_ptr, A_ptr, i_hq, i_h, cs, bos, mA, tA, HQ, sq, sk, K, BK, BT,
                   HAS_G, DT, PREC)


@triton.jit
def _A_one_dot(q_ptr, k_ptr, gc_ptr, A_ptr, i_hq, i_h, cs, bos, mA, tA, HQ, sq, sk,
               K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, HAS_G: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr):
    """A of one chunk as one [BT, BT] dot (reference row: the chunk's first)."""
    o_t = tl.arange(0, BT)
    acc = tl.full([BT, BT], 0.0, tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        mk = o_k < K
        m2 = mA[:, None] & mk[None, :]
        qq = tl.load(q_ptr + tA[:, None] * sq + i_hq * K + o_k[None, :], mask=m2, other=0.0)
        kk = tl.load(k_ptr + tA[:, None] * sk + i_h * K + o_k[None, :], mask=m2, other=0.0)
        if HAS_G:
            bb = tl.load(gc_ptr + tA[:, None] * sk + i_h * K + o_k[None, :], mask=m2,
                         other=0.0)
            b0 = tl.load(gc_ptr + (bos + cs) * sk + i_h * K + o_k, mask=mk, other=0.0)
            qg = qq.to(tl.float32) * _exp_le0(bb - b0[None, :])
            kg = kk.to(tl.float32) * tl.exp(b0[None, :] - bb)
            acc += tl.dot(qg.to(DT), tl.trans(kg.to(DT)), input_precision=PREC)
        else:
            # operands as loaded: products of bf16/fp16 values are exact in the fp32 accumulator
            acc += tl.dot(qq, tl.trans(kk), input_precision=PREC)
    acc = tl.where(o_t[:, None] >= o_t[None, :], acc, 0.0)
    tl.store(A_ptr + tA[:, None] * (HQ * BT) + i_hq * BT + o_t[None, :], acc,
             mask=mA[:, None])


@triton.jit
def _A_sub_block(q_ptr, k_ptr, gc_ptr, A_ptr, i_i, i_hq, i_h, cs, bos, L, HQ, sq, sk,
                 K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                 HAS_G: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                 DIAG_3D: tl.constexpr):
    """Rows of sub-block I of A, any gates: the keys of earlier sub-blocks in one dot with the
    reference row r = last row of sub-block I − 1, the diagonal block elementwise."""
    o_t = tl.arange(0, BT)
    o_s = tl.arange(0, BS)
    rI = cs + i_i * BS + o_s
    mI = rI < L
    tI = bos + rI
    rA = cs + o_t
    mA = rA < L
    tA = bos + rA
    i0 = i_i * BS
    # reference row: last row of sub-block I - 1 (clamped for I = 0, where nothing is kept)
    rr = cs + tl.maximum(i0 - 1, 0)
    Aoff = tl.full([BS, BT], 0.0, tl.float32)
    Ad = tl.full([BS, BS], 0.0, tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        mk = o_k < K
        qI = tl.load(q_ptr + tI[:, None] * sq + i_hq * K + o_k[None, :],
                     mask=mI[:, None] & mk[None, :], other=0.0).to(tl.float32)
        kA = tl.load(k_ptr + tA[:, None] * sk + i_h * K + o_k[None, :],
                     mask=mA[:, None] & mk[None, :], other=0.0).to(tl.float32)
        if HAS_G:
            bI = tl.load(gc_ptr + tI[:, None] * sk + i_h * K + o_k[None, :],
                         mask=mI[:, None] & mk[None, :], other=0.0)
            bA = tl.load(gc_ptr + tA[:, None] * sk + i_h * K + o_k[None, :],
                         mask=mA[:, None] & mk[None, :], other=0.0)
            br = tl.load(gc_ptr + (bos + rr) * sk + i_h * K + o_k,
                         mask=mk & ((o_k * 0 + rr) < L), other=0.0)
            qa = qI * _exp_le0(bI - br[None, :])          # b_i − b_r ≤ 0
            ka = kA * _exp_le0(br[None, :] - bA)          # b_r − b_j ≤ 0 (j ≤ r)
            Aoff += tl.dot(qa.to(DT), tl.trans(ka.to(DT)), input_precision=PREC)
            kI = tl.load(k_ptr + tI[:, None] * sk + i_h * K + o_k[None, :],
                         mask=mI[:, None] & mk[None, :], other=0.0).to(tl.float32)
            if DIAG_3D:
                e3 = _exp_le0(bI[:, None, :] - bI[None, :, :])
                Ad += _sum(qI[:, None, :] * kI[None, :, :] * e3, 2)
            else:
                for j in range(BS):
                    rj = cs + i0 + j
                    tj = bos + rj
                    mj = mk & ((o_k * 0 + rj) < L)
                    kj = tl.load(k_ptr + tj * sk + i_h * K + o_k, mask=mj,
                                 other=0.0).to(tl.float32)
                    bj = tl.load(gc_ptr + tj * sk + i_h * K + o_k, mask=mj, other=0.0)
                    sc = _sum(qI * kj[None, :] * _exp_le0(bI - bj[None, :]), 1)
                    Ad += tl.where(o_s[None, :] == j, sc[:, None], 0.0)
        else:
            Aoff += tl.dot(qI.to(DT), tl.trans(kA.to(DT)), input_precision=PREC)
    row = i0 + o_s
    if HAS_G:
        Aoff = tl.where(o_t[None, :] < i0, Aoff, 0.0)
        Ad = tl.where(o_s[:, None] >= o_s[None, :], Ad, 0.0)
        outside = (o_t < i0) | (o_t >= i0 + BS)
        tl.store(A_ptr + tI[:, None] * (HQ * BT) + i_hq * BT + o_t[None, :], Aoff,
                 mask=mI[:, None] & outside[None, :])
        tl.store(A_ptr + tI[:, None] * (HQ * BT) + i_hq * BT + i0 + o_s[None, :], Ad,
                 mask=mI[:, None])
    else:
        Aoff = tl.where(o_t[None, :] <= row[:, None], Aoff, 0.0)
        tl.store(A_ptr + tI[:, None] * (HQ * BT) + i_hq * BT + o_t[None, :], Aoff,
                 mask=mI[:, None])


@launcher
@triton.jit
def _o_kernel(q_ptr, v_ptr, gc_ptr, h_ptr, A_ptr, o_ptr, cu_ptr, cmap_ptr, scale, T, NT, H, G,
              K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              BT: tl.constexpr, HAS_G: tl.constexpr, IS_VARLEN: tl.constexpr,
              DT: tl.constexpr, PREC: tl.constexpr):
    NV: tl.constexpr = (V + BV - 1) // BV
    i_c = tl.program_id(0) // NV           # V-blocks of one chunk are neighbours (L2 reuse)
    i_v = tl.program_id(0) % NV
    i_hq = tl.program_id(1)
    i_h = i_hq // G
    HQ = H * G
    i_n, cs, bos, L = _chunk_pos(i_c, cu_ptr, cmap_ptr, T, NT, BT, IS_VARLEN)
    if cs >= L:
        return
    scale = tl.cast(scale, tl.float32)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    mv = o_v < V
    r = cs + o_t
    m = r < L
    t = bos + r
    sq = HQ * K
    sk = H * K
    hbase = h_ptr + (i_c + i_n).to(tl.int64) * (H * K * V) + i_h * K * V
    acc = tl.full([BT, BV], 0.0, tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        mk = o_k < K
        qq = tl.load(q_ptr + t[:, None] * sq + i_hq * K + o_k[None, :],
                     mask=m[:, None] & mk[None, :], other=0.0).to(tl.float32)
        if HAS_G:
            bb = tl.load(gc_ptr + t[:, None] * sk + i_h * K + o_k[None, :],
                         mask=m[:, None] & mk[None, :], other=0.0)
            qq = qq * _exp_le0(bb)
        hh = tl.load(hbase + o_k[:, None] * V + o_v[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0)
        acc += tl.dot(qq.to(DT), hh.to(DT), input_precision=PREC)
    aa = tl.load(A_ptr + t[:, None] * (HQ * BT) + i_hq * BT + o_t[None, :], mask=m[:, None],
                 other=0.0)
    vv = tl.load(v_ptr + t[:, None] * (H * V) + i_h * V + o_v[None, :],
                 mask=m[:, None] & mv[None, :], other=0.0)
    acc += tl.dot(aa.to(DT), vv.to(DT), input_precision=PREC)
    tl.store(o_ptr + t[:, None] * (HQ * V) + i_hq * V + o_v[None, :],
             (acc * scale).to(o_ptr.dtype.element_ty), mask=m[:, None] & mv[None, :])


# ----------------------------------------------------------------------------------------------
# Per-chunk backward kernels
# ----------------------------------------------------------------------------------------------
@launcher
@triton.jit
def _dA_kernel(do_ptr, v_ptr, dA_ptr, cu_ptr, cmap_ptr, scale, T, NT, H, G,
               V: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr):
    """dA_ij = scale · do_i · v_j for j ≤ i (fp32 [B·T, Hq, BT], 0 above the diagonal)."""
    i_c = tl.program_id(0)
    i_hq = tl.program_id(1)
    i_h = i_hq // G
    HQ = H * G
    i_n, cs, bos, L = _chunk_pos(i_c, cu_ptr, cmap_ptr, T, NT, BT, IS_VARLEN)
    if cs >= L:
        return
    scale = tl.cast(scale, tl.float32)
    o_t = tl.arange(0, BT)
    r = cs + o_t
    m = r < L
    t = bos + r
    acc = tl.full([BT, BT], 0.0, tl.float32)
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        mv = o_v < V
        dd = tl.load(do_ptr + t[:, None] * (HQ * V) + i_hq * V + o_v[None, :],
                     mask=m[:, None] & mv[None, :], other=0.0)
        vv = tl.load(v_ptr + t[:, None] * (H * V) + i_h * V + o_v[None, :],
                     mask=m[:, None] & mv[None, :], other=0.0)
        acc += tl.dot(dd.to(DT), tl.trans(vv.to(DT)), input_precision=PREC)
    acc = tl.where(o_t[:, None] >= o_t[None, :], acc * scale, 0.0)
    tl.store(dA_ptr + t[:, None] * (HQ * BT) + i_hq * BT + o_t[None, :], acc, mask=m[:, None])


@launcher
@triton.jit
def _dv_kernel(k_ptr, gc_ptr, do_ptr, dh_ptr, A_ptr, dv_ptr, cu_ptr, cmap_ptr, scale, T, NT, H,
               G, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               BT: tl.constexpr, HAS_G: tl.constexpr, IS_VARLEN: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr):
    """dv = (k ⊙ exp(b_l − b)) dh[c] + scale · Σ_group Aᵀ do."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_c = tl.program_id(0) // NV
    i_v = tl.program_id(0) % NV
    i_h = tl.program_id(1)
    HQ = H * G
    i_n, cs, bos, L = _chunk_pos(i_c, cu_ptr, cmap_ptr, T, NT, BT, IS_VARLEN)
    if cs >= L:
        return
    scale = tl.cast(scale, tl.float32)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    mv = o_v < V
    r = cs + o_t
    m = r < L
    t = bos + r
    sk = H * K
    last = tl.minimum(cs + BT, L) - 1
    dhbase = dh_ptr + i_c.to(tl.int64) * (H * K * V) + i_h * K * V
    acc = tl.full([BT, BV], 0.0, tl.float32)
    for i_k in range(0, K, BK):
        o_k = i_k + tl.arange(0, BK)
        mk = o_k < K
        kk = tl.load(k_ptr + t[:, None] * sk + i_h * K + o_k[None, :],
                     mask=m[:, None] & mk[None, :], other=0.0).to(tl.float32)
        if HAS_G:
            bb = tl.load(gc_ptr + t[:, None] * sk + i_h * K + o_k[None, :],
                         mask=m[:, None] & mk[None, :], other=0.0)
            bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
            kk = kk * _exp_le0(bl[None, :] - bb)
        dh = tl.load(dhbase + o_k[:, None] * V + o_v[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0)
        acc += tl.dot(kk.to(DT), dh.to(DT), input_precision=PREC)
    intra = tl.full([BT, BV], 0.0, tl.float32)
    for gq in range(G):
        i_hq = i_h * G + gq
        aa = tl.load(A_ptr + t[:, None] * (HQ * BT) + i_hq * BT + o_t[None, :],
                     mask=m[:, None], other=0.0)
        dd = tl.load(do_ptr + t[:, None] * (HQ * V) + i_hq * V + o_v[None, :],
                     mask=m[:, None] & mv[None, :], other=0.0)
        intra += tl.dot(tl.trans(aa.to(DT)), dd.to(DT), input_precision=PREC)
    acc += intra * scale
    tl.store(dv_ptr + t[:, None] * (H * V) + i_h * V + o_v[None, :],
             acc.to(dv_ptr.dtype.element_ty), mask=m[:, None] & mv[None, :])


@triton.jit
def _rows_times_state_t(x_ptr, t, m, sx, x_off, s_base, o_k, mk, NR: tl.constexpr,
                        BK: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr,
                        PREC: tl.constexpr):
    """``x[t, x_off:x_off + V] · S[o_k, :]ᵀ`` → fp32 ``[NR, BK]``: rows ``t`` (mask ``m``, row
    stride ``sx``) of ``v`` or ``do`` against a ``K × V`` state block (``dh[c]`` or ``h[c]``)."""
    acc = tl.full([NR, BK], 0.0, tl.float32)
    for i_v in range(0, V, BV):
        o_v = i_v + tl.arange(0, BV)
        mv = o_v < V
        xx = tl.load(x_ptr + t[:, None] * sx + x_off + o_v[None, :],
                     mask=m[:, None] & mv[None, :], other=0.0)
        ss = tl.load(s_base + o_k[:, None] * V + o_v[None, :], mask=mk[:, None] & mv[None, :],
                     other=0.0)
        acc += tl.dot(xx.to(DT), tl.trans(ss.to(DT)), input_precision=PREC)
    return acc


@launcher
@triton.jit
def _dqkg_kernel(q_ptr, k_ptr, v_ptr, gc_ptr, do_ptr, h_ptr, dh_ptr, dA_ptr, dq_ptr, dk_ptr,
                 dg_ptr, cu_ptr, cmap_ptr, scale, span_max, T, NT, H, G,
                 K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 BT: tl.constexpr, BS: tl.constexpr, HAS_G: tl.constexpr,
                 IS_VARLEN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                 DIAG_3D: tl.constexpr):
    """dq (each query head of the group), dk and dg of one chunk, K-block and kv head.

    Gate span ≤ ``span_max`` (see ``_A_kernel``): whole-chunk dots with the first row as the
    reference, ``dq += exp(b − b_0) ⊙ (dA (k ⊙ exp(b_0 − b)))`` and
    ``dk += exp(b_0 − b) ⊙ (dAᵀ (q ⊙ exp(b − b_0)))``. Otherwise :func:`_dqkg_sub_blocks`."""
    NK: tl.constexpr = (K + BK - 1) // BK
    i_c = tl.program_id(0) // NK
    i_k = tl.program_id(0) % NK
    i_h = tl.program_id(1)
    HQ = H * G
    i_n, cs, bos, L = _chunk_pos(i_c, cu_ptr, cmap_ptr, T, NT, BT, IS_VARLEN)
    if cs >= L:
        return
    scale = tl.cast(scale, tl.float32)
    o_k = i_k * BK + tl.arange(0, BK)
    mk = o_k < K
    sq = HQ * K
    sk = H * K
    sv = H * V
    sdo = HQ * V
    sA = HQ * BT
    last = tl.minimum(cs + BT, L) - 1
    hbase = h_ptr + (i_c + i_n).to(tl.int64) * (H * K * V) + i_h * K * V
    dhbase = dh_ptr + i_c.to(tl.int64) * (H * K * V) + i_h * K * V
    suffix = tl.full([BK], 0.0, tl.float32)
    if HAS_G:
        # Σ_v dh[c] ⊙ h[c + 1]: ∂L/∂b_last through the whole end-of-chunk state
        for i_v in range(0, V, BV):
            o_v = i_v + tl.arange(0, BV)
            mkv = mk[:, None] & (o_v < V)[None, :]
            hn = tl.load(hbase + H * K * V + o_k[:, None] * V + o_v[None, :], mask=mkv,
                         other=0.0).to(tl.float32)
            dh = tl.load(dhbase + o_k[:, None] * V + o_v[None, :], mask=mkv,
                         other=0.0).to(tl.float32)
            suffix += _sum(hn * dh, 1)
        span = _chunk_span(gc_ptr, bos + cs, bos + last, i_h, sk, K, BK)
        if span <= span_max:
            _dqkg_one_dot(q_ptr, k_ptr, v_ptr, gc_ptr, do_ptr, dA_ptr, dq_ptr, dk_ptr, dg_ptr,
                          hbase, dhbase, suffix, scale, i_h, cs, bos, L, G, HQ, K, V, BK, BV, BT,
                          HAS_G, DT, PREC, o_k, mk, sq, sk, sv, sdo, sA)
        else:
            _dqkg_sub_blocks(q_ptr, k_ptr, v_ptr, gc_ptr, do_ptr, dA_ptr, dq_ptr, dk_ptr, dg_ptr,
                             hbase, dhbase, suffix, scale, i_h, cs, bos, L, G, HQ, K, V, BK, BV, BT,
                             BS, HAS_G, DT, PREC, DIAG_3D, o_k, mk, sq, sk, sv, sdo, sA)
    else:   # no gate: nothing to bound
        _dqkg_one_dot(q_ptr, k_ptr, v_ptr, gc_ptr, do_ptr, dA_ptr, dq_ptr, dk_ptr, dg_ptr, hbase,
                      dhbase, suffix, scale, i_h, cs, bos, L, G, HQ, K, V, BK, BV, BT, HAS_G, DT,
                      PREC, o_k, mk, sq, sk, sv, sdo, sA)


@triton.jit
def _dqkg_one_dot(q_ptr, k_ptr, v_ptr, gc_ptr, do_ptr, dA_ptr, dq_ptr, dk_ptr, dg_ptr, hbase,
                  dhbase, suffix, scale, i_h, cs, bos, L, G, HQ, K: tl.constexpr,
                  V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                  HAS_G: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, o_k, mk, sq, sk,
                  sv, sdo, sA):
    """dq, dk, dg of one chunk with whole-chunk dots (reference row: the chunk's first)."""
    o_t = tl.arange(0, BT)
    rA = cs + o_t
    mA = rA < L
    tA = bos + rA
    if HAS_G:
        last = tl.minimum(cs + BT, L) - 1
        bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
    mAk = mA[:, None] & mk[None, :]
    kk = tl.load(k_ptr + tA[:, None] * sk + i_h * K + o_k[None, :], mask=mAk,
                 other=0.0).to(tl.float32)
    # ---- dk: inter part (v dh[c]ᵀ) ⊙ exp(b_l − b)
    dk = _rows_times_state_t(v_ptr, tA, mA, sv, i_h * V, dhbase, o_k, mk, BT, BK, V, BV, DT,
                             PREC)
    if HAS_G:
        bb = tl.load(gc_ptr + tA[:, None] * sk + i_h * K + o_k[None, :], mask=mAk,
                     other=0.0)
        b0 = tl.load(gc_ptr + (bos + cs) * sk + i_h * K + o_k, mask=mk, other=0.0)
        dk = dk * _exp_le0(bl[None, :] - bb)
        kt = kk * tl.exp(b0[None, :] - bb)                       # ≤ |k| exp(span)
    else:
        kt = kk
    dkt = tl.full([BT, BK], 0.0, tl.float32)
    dBq = tl.full([BT, BK], 0.0, tl.float32)
    for gq in range(G):
        i_hq = i_h * G + gq
        qq = tl.load(q_ptr + tA[:, None] * sq + i_hq * K + o_k[None, :], mask=mAk,
                     other=0.0).to(tl.float32)
        # ---- dq: inter part scale (do h[c]ᵀ) ⊙ exp(b)
        dq = _rows_times_state_t(do_ptr, tA, mA, sdo, i_hq * V, hbase, o_k, mk, BT, BK, V, BV,
                                 DT, PREC) * scale
        # ---- intra: dA is causal (0 above the diagonal and past the end)
        dA = tl.load(dA_ptr + tA[:, None] * sA + i_hq * BT + o_t[None, :],
                     mask=mA[:, None], other=0.0)
        if HAS_G:
            dq = dq * _exp_le0(bb)
            eq = _exp_le0(bb - b0[None, :])          # ≤ 1
            dq += tl.dot(dA.to(DT), kt.to(DT), input_precision=PREC) * eq
            dkt += tl.dot(tl.trans(dA.to(DT)), (qq * eq).to(DT), input_precision=PREC)
        else:
            dq += tl.dot(dA.to(DT), kk.to(DT), input_precision=PREC)
            dkt += tl.dot(tl.trans(dA.to(DT)), qq.to(DT), input_precision=PREC)
        tl.store(dq_ptr + tA[:, None] * sq + i_hq * K + o_k[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=mAk)
        dBq += qq * dq
    if HAS_G:
        dk += dkt * tl.exp(b0[None, :] - bb)
    else:
        dk += dkt
    tl.store(dk_ptr + tA[:, None] * sk + i_h * K + o_k[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=mAk)
    if HAS_G:
        # dg_t = Σ_{u ≥ t in this chunk} dB_u + Σ_v dh[c] ⊙ h[c+1] (rows past L are 0)
        dB = dBq - kk * dk
        dg = _sum(dB, 0)[None, :] - tl.associative_scan(dB, 0, _sum_combine) + dB
        tl.store(dg_ptr + tA[:, None] * sk + i_h * K + o_k[None, :],
                 (dg + suffix[None, :]).to(dg_ptr.dtype.element_ty), mask=mAk)


@triton.jit
def _dqkg_sub_blocks(q_ptr, k_ptr, v_ptr, gc_ptr, do_ptr, dA_ptr, dq_ptr, dk_ptr, dg_ptr,
                     hbase, dhbase, suffix, scale, i_h, cs, bos, L, G, HQ,
                     K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     BT: tl.constexpr, BS: tl.constexpr, HAS_G: tl.constexpr, DT: tl.constexpr,
                     PREC: tl.constexpr, DIAG_3D: tl.constexpr, o_k, mk, sq, sk, sv, sdo, sA):
    """dq, dk, dg of one chunk for any gates: sub-blocks last to first (dg's in-chunk reverse
    cumsum is a running sum), every exponential ≤ 1: earlier/later sub-blocks in dots with a
    reference row between them, the diagonal block elementwise."""
    o_t = tl.arange(0, BT)
    o_s = tl.arange(0, BS)
    rA = cs + o_t
    mA = rA < L
    tA = bos + rA
    last = tl.minimum(cs + BT, L) - 1
    if HAS_G:
        bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
    for ii in range(BT // BS):
        I = (BT // BS) - 1 - ii
        # (re)loaded per sub-block: kept live across the loop they spill (ptxas -v, sm_90)
        kA = tl.load(k_ptr + tA[:, None] * sk + i_h * K + o_k[None, :],
                     mask=mA[:, None] & mk[None, :], other=0.0).to(tl.float32)
        if HAS_G:
            bA = tl.load(gc_ptr + tA[:, None] * sk + i_h * K + o_k[None, :],
                         mask=mA[:, None] & mk[None, :], other=0.0)
        i0 = I * BS
        rI = cs + i0 + o_s
        mI = rI < L
        tI = bos + rI
        mIk = mI[:, None] & mk[None, :]
        kI = tl.load(k_ptr + tI[:, None] * sk + i_h * K + o_k[None, :], mask=mIk,
                     other=0.0).to(tl.float32)
        if HAS_G:
            bI = tl.load(gc_ptr + tI[:, None] * sk + i_h * K + o_k[None, :], mask=mIk,
                         other=0.0)
            rr = cs + tl.maximum(i0 - 1, 0)          # last row of sub-block I − 1
            # (a sub-block past the sequence end has no rows: its r may lie past the end too)
            br = tl.load(gc_ptr + (bos + rr) * sk + i_h * K + o_k,
                         mask=mk & ((o_k * 0 + rr) < L), other=0.0)
            rn = cs + i0 + BS                        # first row of sub-block I + 1
            bn = tl.load(gc_ptr + (bos + rn) * sk + i_h * K + o_k, mask=mk & ((o_k * 0 + rn) < L),
                         other=0.0)
            # k side of dq's off-diagonal part, q side of dk's: ≤ 1 where kept
            ka = kA * _exp_le0(br[None, :] - bA)        # rows j < i0
            eI_n = _exp_le0(bn[None, :] - bI)           # b_n − b_j, j ∈ I
        # ---- dk: inter part (v dh[c]ᵀ) ⊙ exp(b_l − b)
        dkI = _rows_times_state_t(v_ptr, tI, mI, sv, i_h * V, dhbase, o_k, mk, BS, BK, V, BV, DT,
                                  PREC)
        if HAS_G:
            dkI = dkI * _exp_le0(bl[None, :] - bI)
        dBq = tl.full([BS, BK], 0.0, tl.float32)
        dk_off = tl.full([BS, BK], 0.0, tl.float32)
        for gq in range(G):
            i_hq = i_h * G + gq
            qI = tl.load(q_ptr + tI[:, None] * sq + i_hq * K + o_k[None, :], mask=mIk,
                         other=0.0).to(tl.float32)
            # ---- dq: inter part scale (do h[c]ᵀ) ⊙ exp(b)
            dqI = _rows_times_state_t(do_ptr, tI, mI, sdo, i_hq * V, hbase, o_k, mk, BS, BK, V, BV,
                                      DT, PREC) * scale
            if HAS_G:
                dqI = dqI * _exp_le0(bI)
            # ---- dq off-diagonal: (dA[I, j < i0] (k ⊙ exp(b_r − b))) ⊙ exp(b_I − b_r)
            dAr = tl.load(dA_ptr + tI[:, None] * sA + i_hq * BT + o_t[None, :],
                          mask=mI[:, None] & (o_t < i0)[None, :], other=0.0)
            if HAS_G:
                dqI += tl.dot(dAr.to(DT), ka.to(DT), input_precision=PREC) * \
                    _exp_le0(bI - br[None, :])
            else:
                dqI += tl.dot(dAr.to(DT), kA.to(DT), input_precision=PREC)
            # ---- dk off-diagonal: (dA[i ≥ i0 + BS, I]ᵀ (q ⊙ exp(b − b_n))) ⊙ exp(b_n − b_I)
            qA = tl.load(q_ptr + tA[:, None] * sq + i_hq * K + o_k[None, :],
                         mask=mA[:, None] & mk[None, :], other=0.0).to(tl.float32)
            dAc = tl.load(dA_ptr + tA[:, None] * sA + i_hq * BT + i0 + o_s[None, :],
                          mask=(mA & (o_t >= i0 + BS))[:, None], other=0.0)      # [BT, BS]
            if HAS_G:
                qn = qA * _exp_le0(bA - bn[None, :])
                dk_off += tl.dot(tl.trans(dAc.to(DT)), qn.to(DT), input_precision=PREC)
            else:
                dk_off += tl.dot(tl.trans(dAc.to(DT)), qA.to(DT), input_precision=PREC)
            # ---- diagonal sub-block
            if DIAG_3D or (not HAS_G):
                dAd = tl.load(dA_ptr + tI[:, None] * sA + i_hq * BT + i0 + o_s[None, :],
                              mask=mI[:, None], other=0.0)                        # [i, j]
                if HAS_G:
                    e3 = _exp_le0(bI[:, None, :] - bI[None, :, :])
                    dqI += _sum(dAd[:, :, None] * kI[None, :, :] * e3, 1)
                    dkI += _sum(dAd[:, :, None] * qI[:, None, :] * e3, 0)
                else:
                    dqI += tl.dot(dAd.to(DT), kI.to(DT), input_precision=PREC)
                    dkI += tl.dot(tl.trans(dAd.to(DT)), qI.to(DT), input_precision=PREC)
            else:
                for j in range(BS):
                    rj = cs + i0 + j
                    tj = bos + rj
                    mj = mk & ((o_k * 0 + rj) < L)
                    kj = tl.load(k_ptr + tj * sk + i_h * K + o_k, mask=mj,
                                 other=0.0).to(tl.float32)
                    bj = tl.load(gc_ptr + tj * sk + i_h * K + o_k, mask=mj, other=0.0)
                    dAj = tl.load(dA_ptr + tI * sA + i_hq * BT + i0 + j, mask=mI,
                                  other=0.0)                                     # dA[i, j]
                    e = _exp_le0(bI - bj[None, :])                # [i, K]
                    dqI += dAj[:, None] * kj[None, :] * e
                    dkj = _sum(dAj[:, None] * qI * e, 0)                         # [K]
                    dkI += tl.where(o_s[:, None] == j, dkj[None, :], 0.0)
            tl.store(dq_ptr + tI[:, None] * sq + i_hq * K + o_k[None, :],
                     dqI.to(dq_ptr.dtype.element_ty), mask=mIk)
            dBq += qI * dqI
        if HAS_G:
            dkI += dk_off * eI_n
        else:
            dkI += dk_off
        tl.store(dk_ptr + tI[:, None] * sk + i_h * K + o_k[None, :],
                 dkI.to(dk_ptr.dtype.element_ty), mask=mIk)
        if HAS_G:
            # dg_t = Σ_{u ≥ t in this chunk} dB_u + Σ_v dh[c] ⊙ h[c+1]
            dB = dBq - kI * dkI
            tot = _sum(dB, 0)
            dgI = tot[None, :] - tl.associative_scan(dB, 0, _sum_combine) + dB + suffix[None, :]
            suffix += tot
            tl.store(dg_ptr + tI[:, None] * sk + i_h * K + o_k[None, :],
                     dgI.to(dg_ptr.dtype.element_ty), mask=mIk)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
class _Setup:
    """Shapes, chunk index, block sizes and dot configs shared by the forward and backward."""

    def __init__(self, q, k, v, cu_seqlens):
        B, T, HQ, K = q.shape
        self.B, self.T, self.HQ, self.K = B, T, HQ, K
        self.H, self.V = k.shape[2], v.shape[3]
        self.G = HQ // self.H
        self.N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        self.dev = q.device
        self.varlen = cu_seqlens is not None
        self.NTG, self.NT, self.cmap, self.coff = _chunk_index(cu_seqlens, B * T, self.N,
                                                               self.dev)
        self.cu = cu_seqlens if cu_seqlens is not None else q
        if self.cmap is None:
            self.cmap = self.coff = q
        self.blocks = _blocks(K, self.V, self.dev, self.N * self.H)
        self.modes = _dot_modes()
        self.d3 = _diag_3d(self.dev)

    def cfg(self, kernel, dtype):
        return _dot_cfg(kernel, dtype, self.dev, self.modes)

    @staticmethod
    def span_max(dot_dtype) -> float:
        """Largest chunk gate span taking the one-dot form: fp16 operands (max 65504) never do."""
        return -1.0 if dot_dtype == tl.float16 else SPAN_MAX


def _states(s, k, v, gc, h0, output_final_state, hdtype, DT, PREC):
    """h [NTG + N, H, K, V] (state at each chunk start, plus after the last) and ht."""
    K, V, H, N = s.K, s.V, s.H, s.N
    h = torch.empty(s.NTG + N, H, K, V, dtype=hdtype, device=s.dev)
    ht = (torch.empty(N, H, K, V, dtype=torch.float32, device=s.dev) if output_final_state
          else torch.empty(0, dtype=torch.float32, device=s.dev))
    BK, BV, nw, ns = s.blocks["h"]
    grid = (N * H, cdiv(K, BK), cdiv(V, BV))
    _h_kernel[grid](k, v, gc if gc is not None else k, h, h0 if h0 is not None else k, ht,
                    s.cu, s.coff, s.T, s.NT, H, K=K, V=V, BK=BK, BV=BV, BT=BT,
                    HAS_G=gc is not None, USE_H0=h0 is not None, STORE_HT=output_final_state,
                    IS_VARLEN=s.varlen, DT=DT, PREC=PREC, num_warps=nw, num_stages=ns)
    return h, ht


def _intra_A(s, q, k, gc):
    A = torch.empty(s.B, s.T, s.HQ, BT, dtype=torch.float32, device=s.dev)
    DT, PREC = s.cfg("A", q.dtype)
    BK, _, nw, ns = s.blocks["A"]
    if gc is None and BK < 64:
        # Measured on the H100 (triton 3.6, K = 128, bf16, no gate): BK = 32 with num_stages ≥ 2
        # returned wrong A rows (o rel err 0.24); num_stages = 1, or BK ≥ 64, was exact.
        ns = 1
    _A_kernel[(s.NTG, s.HQ)](
        q, k, gc if gc is not None else q, A, s.cu, s.cmap, s.span_max(DT), s.T, s.NT, s.H, s.G,
        K=s.K, BK=BK, BT=BT, BS=BS, HAS_G=gc is not None, IS_VARLEN=s.varlen, DT=DT,
        PREC=PREC, DIAG_3D=s.d3, num_warps=nw, num_stages=ns)
    return A


def chunk_gla_fwd(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state, gc=None):
    """Returns ``(o [B,T,Hq,V] v.dtype, final_state [N,H,K,V] fp32 or empty)``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    s = _Setup(q, k, v, cu_seqlens)
    if g is not None and gc is None:
        gc = _gate_cumsum(s, g)
    h0 = initial_state.contiguous() if initial_state is not None else None
    DTo, PRECo = s.cfg("o", q.dtype)
    DTh, PRECh = s.cfg("h", q.dtype)
    h, ht = _states(s, k, v, gc, h0, output_final_state, _state_dtype(DTo, q.dtype), DTh, PRECh)
    A = _intra_A(s, q, k, gc)
    o = torch.empty(s.B, s.T, s.HQ, s.V, dtype=v.dtype, device=s.dev)
    BK, BV, nw, ns = s.blocks["o"]
    _o_kernel[(s.NTG * cdiv(s.V, BV), s.HQ)](
        q, v, gc if gc is not None else q, h, A, o, s.cu, s.cmap, scale, s.T, s.NT, s.H, s.G,
        K=s.K, V=s.V, BK=BK, BV=BV, BT=BT, HAS_G=gc is not None, IS_VARLEN=s.varlen,
        DT=DTo, PREC=PRECo, num_warps=nw, num_stages=ns)
    return o, ht


def chunk_gla_bwd(do, dht, q, k, v, g, initial_state, cu_seqlens, final_state, scale):
    """Returns ``(dq, dk, dv, dg or None, dh0 or None)`` in the dtypes of their inputs
    (``final_state`` is not needed: h is recomputed)."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    s = _Setup(q, k, v, cu_seqlens)
    dev = s.dev
    gc = _gate_cumsum(s, g) if g is not None else None
    gcx = gc if gc is not None else q
    h0 = initial_state.contiguous() if initial_state is not None else None
    DTq, PRECq = s.cfg("dqk", q.dtype)
    DTh, PRECh = s.cfg("bh", q.dtype)
    DTv, PRECv = s.cfg("dv", q.dtype)
    # h is read by the dqk kernel only; dh by dv and dqk: stored in the finer of their dtypes
    h, _ = _states(s, k, v, gc, h0, False, _state_dtype(DTq, q.dtype), DTh, PRECh)
    A = _intra_A(s, q, k, gc)
    K, V, H, N = s.K, s.V, s.H, s.N
    dhdt = (q.dtype if _state_dtype(DTq, q.dtype) != torch.float32
            and _state_dtype(DTv, q.dtype) != torch.float32 else torch.float32)
    dh = torch.empty(s.NTG, H, K, V, dtype=dhdt, device=dev)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=dev) if h0 is not None else dh
    dht_c = dht.contiguous() if dht is not None else None
    DT, PREC = s.cfg("dh", q.dtype)
    BK, BV, nw, ns = s.blocks["dh"]
    _dh_kernel[(N * H, cdiv(K, BK), cdiv(V, BV))](
        q, do, gcx, dh, dht_c if dht_c is not None else q, dh0, s.cu, s.coff, scale, s.T,
        s.NT, H, s.G, K=K, V=V, BK=BK, BV=BV, BT=BT, HAS_G=gc is not None,
        USE_DHT=dht_c is not None, STORE_DH0=h0 is not None, IS_VARLEN=s.varlen, DT=DT,
        PREC=PREC, num_warps=nw, num_stages=ns)
    dA = torch.empty(s.B, s.T, s.HQ, BT, dtype=torch.float32, device=dev)
    DT, PREC = s.cfg("dA", q.dtype)
    _, BV, nw, ns = s.blocks["dA"]
    _dA_kernel[(s.NTG, s.HQ)](
        do, v, dA, s.cu, s.cmap, scale, s.T, s.NT, H, s.G, V=V, BV=BV, BT=BT,
        IS_VARLEN=s.varlen, DT=DT, PREC=PREC, num_warps=nw, num_stages=ns)
    dv = torch.empty_like(v)
    BK, BV, nw, ns = s.blocks["dv"]
    _dv_kernel[(s.NTG * cdiv(V, BV), H)](
        k, gcx, do, dh, A, dv, s.cu, s.cmap, scale, s.T, s.NT, H, s.G, K=K, V=V, BK=BK,
        BV=BV, BT=BT, HAS_G=gc is not None, IS_VARLEN=s.varlen, DT=DTv, PREC=PRECv,
        num_warps=nw, num_stages=ns)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    if g is not None:
        dgdt = g.dtype if g.dim() == 4 else torch.float32
        dg = torch.empty(s.B, s.T, H, K, dtype=dgdt, device=dev)
    else:
        dg = q
    BK, BV, nw, ns = s.blocks["dqk"]
    _dqkg_kernel[(s.NTG * cdiv(K, BK), H)](
        q, k, v, gcx, do, h, dh, dA, dq, dk, dg, s.cu, s.cmap, scale, s.span_max(DTq), s.T,
        s.NT, H, s.G,
        K=K, V=V, BK=BK, BV=BV, BT=BT, BS=BS, HAS_G=gc is not None, IS_VARLEN=s.varlen,
        DT=DTq, PREC=PRECq, DIAG_3D=s.d3, num_warps=nw, num_stages=ns)
    if g is not None and g.dim() == 3:
        dg = dg.sum(-1).to(g.dtype)
    dh0_out = dh0.to(initial_state.dtype) if h0 is not None else None
    return dq, dk, dv, (dg if g is not None else None), dh0_out
