"""Chunked GLA in Triton: forward and backward.

Layout: tensors are made contiguous ``[B, T, H, D]`` and addressed as ``[B·T, H, D]`` rows, so a
sequence is the row range ``[bos, eos)`` (``bos = b·T`` or ``cu_seqlens[n]``). Every kernel is one
program per (column block, sequence·head) walking the sequence's chunks of ``BT = 64`` rows in
order (backward: dk/dv in reverse), with the ``K × BV`` state in fp32 registers.

Gates. ``_gate_cumsum_kernel`` writes ``b`` = the cumulative sum of ``g`` from the start of each
chunk (fp32, ``[B·T, H, K]``); ``b`` is ≤ 0 and non-increasing inside a chunk since ``g ≤ 0``. A
chunk is 4 sub-blocks of 16 rows. Every exponential the kernels take is of a difference that is ≤ 0
(so in ``(0, 1]``, no overflow; underflow only where the true factor is itself below 1e-38):

* inter-chunk: ``exp(b_i)`` (``b_i ≤ 0``) and ``exp(b_last − b_j)`` (``j ≤ last``);
* off-diagonal sub-blocks ``I > J`` (query rows ``i ∈ I``, key rows ``j ∈ J``): with ``r`` the
  last row of ``J``, ``j ≤ r < i``, so ``b_i − b_r ≤ 0`` and ``b_r − b_j ≤ 0`` and
  ``exp(b_i − b_j) = exp(b_i − b_r) · exp(b_r − b_j)`` splits into two ≤ 1 factors that go into a
  ``tl.dot``;
* diagonal sub-blocks: column by column, ``exp(b_i − b_j)`` for ``i ≥ j`` only (masked), ≤ 1.

Exponents are also clamped with ``min(·, 0)``: a no-op for valid rows, it keeps the padded rows
(loaded as 0) finite. Gates with ``g > 0`` are outside the contract.

Precision: fp16/bf16 inputs go to ``tl.dot`` in their own dtype (on CUDA) with fp32
accumulation; fp32 inputs use ``input_precision="ieee"``. On CPU (Triton's interpreter) all
arithmetic is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BT = 64      # chunk length
BS = 16      # sub-block length
NS = BT // BS


def _next_pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


def _dot_cfg(dtype: torch.dtype, device: torch.device):
    """(dot operand dtype, input_precision)."""
    if dtype == torch.float32:
        return tl.float32, "ieee"
    if device.type != "cuda":          # the interpreter's bf16 arithmetic is wrong: stay fp32
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"


@triton.jit
def _seq_bounds(cu_ptr, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_ptr + i_n).to(tl.int32)
        eos = tl.load(cu_ptr + i_n + 1).to(tl.int32)
    else:
        bos = i_n * T
        eos = bos + T
    return bos, eos


# ----------------------------------------------------------------------------------------------
# Chunk-local cumulative gate
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gate_cumsum_kernel(g_ptr, gc_ptr, cu_ptr, T, H, s_gt, s_gh, s_gk,
                        K: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                        IS_VARLEN: tl.constexpr):
    i_k = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos = _seq_bounds(cu_ptr, i_n, T, IS_VARLEN)
    L = eos - bos
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    mk = o_k < K
    for s in range(0, L, BT):
        rows = bos + s + o_t
        m = ((s + o_t) < L)[:, None] & mk[None, :]
        gg = tl.load(g_ptr + rows[:, None] * s_gt + i_h * s_gh + o_k[None, :] * s_gk, mask=m,
                     other=0.0).to(tl.float32)
        b = tl.cumsum(gg, axis=0)
        tl.store(gc_ptr + rows[:, None] * (H * K) + i_h * K + o_k[None, :], b, mask=m)


def gate_cumsum(g: torch.Tensor, k: torch.Tensor, cu_seqlens, N: int) -> torch.Tensor:
    """Chunk-local cumsum of g (``[B,T,H,K]`` or ``[B,T,H]``) as fp32 ``[B,T,H,K]``."""
    B, T, H, K = k.shape
    g = g.contiguous()
    if g.dim() == 3:
        s_gt, s_gh, s_gk = H, 1, 0
    else:
        s_gt, s_gh, s_gk = H * K, K, 1
    gc = torch.empty(B, T, H, K, dtype=torch.float32, device=k.device)
    BK = min(_next_pow2(K), 64)
    cu = cu_seqlens if cu_seqlens is not None else gc
    _gate_cumsum_kernel[(triton.cdiv(K, BK), N * H)](
        g, gc, cu, T, H, s_gt, s_gh, s_gk, K=K, BK=BK, BT=BT,
        IS_VARLEN=cu_seqlens is not None)
    return gc


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, gc_ptr, o_ptr, h0_ptr, ht_ptr, cu_ptr, scale, T, H, G,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                BT: tl.constexpr, BS: tl.constexpr, HAS_G: tl.constexpr,
                USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    HQ = H * G
    i_n = i_nh // HQ
    i_hq = i_nh % HQ
    i_h = i_hq // G
    bos, eos = _seq_bounds(cu_ptr, i_n, T, IS_VARLEN)
    L = eos - bos
    scale = tl.cast(scale, tl.float32)
    NSUB: tl.constexpr = BT // BS

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    mk = o_k < K
    mv = o_v < V
    # row strides of the [B·T, heads, D] views
    sq = HQ * K
    sk = H * K
    sv = H * V
    so = HQ * V

    S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        S += tl.load(h0_ptr + i_n * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                     mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)

    for cs in range(0, L, BT):
        last = tl.minimum(cs + BT, L) - 1
        if HAS_G:
            bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
        upd = tl.zeros([BK, BV], dtype=tl.float32)
        for I in tl.static_range(NSUB):
            rI = cs + I * BS + o_s
            mI = rI < L
            tI = bos + rI
            qI = tl.load(q_ptr + tI[:, None] * sq + i_hq * K + o_k[None, :],
                         mask=mI[:, None] & mk[None, :], other=0.0).to(tl.float32)
            kI = tl.load(k_ptr + tI[:, None] * sk + i_h * K + o_k[None, :],
                         mask=mI[:, None] & mk[None, :], other=0.0).to(tl.float32)
            vI = tl.load(v_ptr + tI[:, None] * sv + i_h * V + o_v[None, :],
                         mask=mI[:, None] & mv[None, :], other=0.0).to(tl.float32)
            if HAS_G:
                bI = tl.load(gc_ptr + tI[:, None] * sk + i_h * K + o_k[None, :],
                             mask=mI[:, None] & mk[None, :], other=0.0)
                qg = qI * tl.exp(tl.minimum(bI, 0.0))                       # exp(b_i) ≤ 1
            else:
                qg = qI
            # inter-chunk: (q_i ⊙ exp(b_i)) S
            acc = tl.dot(qg.to(DT), S.to(DT), input_precision=PREC)
            # off-diagonal sub-blocks J < I
            for J in tl.static_range(I):
                rJ = cs + J * BS + o_s
                mJ = rJ < L
                tJ = bos + rJ
                kJ = tl.load(k_ptr + tJ[:, None] * sk + i_h * K + o_k[None, :],
                             mask=mJ[:, None] & mk[None, :], other=0.0).to(tl.float32)
                vJ = tl.load(v_ptr + tJ[:, None] * sv + i_h * V + o_v[None, :],
                             mask=mJ[:, None] & mv[None, :], other=0.0).to(tl.float32)
                if HAS_G:
                    bJ = tl.load(gc_ptr + tJ[:, None] * sk + i_h * K + o_k[None, :],
                                 mask=mJ[:, None] & mk[None, :], other=0.0)
                    rr = cs + J * BS + BS - 1                                 # r = last row of J
                    br = tl.load(gc_ptr + (bos + rr) * sk + i_h * K + o_k,
                                 mask=mk & (rr < L), other=0.0)
                    qa = qI * tl.exp(tl.minimum(bI - br[None, :], 0.0))      # b_i − b_r ≤ 0
                    ka = kJ * tl.exp(tl.minimum(br[None, :] - bJ, 0.0))      # b_r − b_j ≤ 0
                else:
                    qa = qI
                    ka = kJ
                a = tl.dot(qa.to(DT), tl.trans(ka.to(DT)), input_precision=PREC)
                acc += tl.dot(a.to(DT), vJ.to(DT), input_precision=PREC)
            # diagonal sub-block, column by column: exp(b_i − b_j) for i ≥ j only
            for j in range(BS):
                rj = cs + I * BS + j
                tj = bos + rj
                kj = tl.load(k_ptr + tj * sk + i_h * K + o_k, mask=mk & (rj < L),
                             other=0.0).to(tl.float32)
                vj = tl.load(v_ptr + tj * sv + i_h * V + o_v, mask=mv & (rj < L),
                             other=0.0).to(tl.float32)
                if HAS_G:
                    bj = tl.load(gc_ptr + tj * sk + i_h * K + o_k, mask=mk & (rj < L),
                                 other=0.0)
                    sc = tl.sum(qI * kj[None, :] * tl.exp(tl.minimum(bI - bj[None, :], 0.0)),
                                axis=1)
                else:
                    sc = tl.sum(qI * kj[None, :], axis=1)
                sc = tl.where(o_s >= j, sc, 0.0)
                acc += sc[:, None] * vj[None, :]
            tl.store(o_ptr + tI[:, None] * so + i_hq * V + o_v[None, :],
                     (acc * scale).to(o_ptr.dtype.element_ty), mask=mI[:, None] & mv[None, :])
            # state update: Σ_j (k_j ⊙ exp(b_last − b_j))ᵀ v_j
            if HAS_G:
                kt = kI * tl.exp(tl.minimum(bl[None, :] - bI, 0.0))
            else:
                kt = kI
            upd += tl.dot(tl.trans(kt.to(DT)), vI.to(DT), input_precision=PREC)
        if HAS_G:
            S = S * tl.exp(tl.minimum(bl, 0.0))[:, None] + upd
        else:
            S = S + upd

    if STORE_HT:
        if i_hq % G == 0:
            tl.store(ht_ptr + i_n * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                     S.to(ht_ptr.dtype.element_ty), mask=mk[:, None] & mv[None, :])


def _blocks(K: int, V: int):
    BK = _next_pow2(K)
    BV = min(_next_pow2(V), 64 if BK <= 128 else 32)
    return BK, BV


def chunk_gla_fwd(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state,
                  gc=None):
    """Returns ``(o [B,T,Hq,V] v.dtype, final_state [N,H,K,V] fp32 or empty)``."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    G = HQ // H
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if g is not None and gc is None:
        gc = gate_cumsum(g, k, cu_seqlens, N)
    o = torch.empty(B, T, HQ, V, dtype=v.dtype, device=q.device)
    if output_final_state:
        ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    else:
        ht = torch.empty(0, dtype=torch.float32, device=q.device)
    h0 = initial_state.contiguous() if initial_state is not None else None
    BK, BV = _blocks(K, V)
    DT, PREC = _dot_cfg(q.dtype, q.device)
    _fwd_kernel[(triton.cdiv(V, BV), N * HQ)](
        q, k, v, gc if gc is not None else q, o, h0 if h0 is not None else q, ht,
        cu_seqlens if cu_seqlens is not None else q, scale, T, H, G,
        K=K, V=V, BK=BK, BV=BV, BT=BT, BS=BS, HAS_G=g is not None, USE_H0=h0 is not None,
        STORE_HT=output_final_state, IS_VARLEN=cu_seqlens is not None, DT=DT, PREC=PREC,
        num_warps=4)
    return o, ht
