"""Chunked GLA in Triton: forward and backward.

``chunk_gla_fwd`` / ``chunk_gla_bwd`` (bottom of this file) dispatch on ``GLA_LINEAR_KERNEL``
(read at each call): ``parallel`` (default) runs ``chunk_parallel.py`` (sequential only over the
``K×V`` state, one program per chunk for the rest: the fla structure); ``sequential`` runs the
kernels below (``sequential_fwd`` / ``sequential_bwd``), kept for comparison. The gate cumsum,
the helpers and ``DIAG_3D_OVERRIDE`` here are shared by both.

The sequential kernels:

Layout: tensors are made contiguous ``[B, T, H, D]`` and addressed as ``[B·T, H, D]`` rows, so a
sequence is the row range ``[bos, eos)`` (``bos = b·T`` or ``cu_seqlens[n]``). Every kernel is one
program per (column block, sequence·head) walking the sequence's chunks of ``BT = 64`` rows in
order (backward: dk/dv in reverse), with the ``K × BV`` state in fp32 registers.

Gates. ``gate_cumsum`` writes ``b`` = the cumulative sum of ``g`` from the start of each
chunk (fp32, ``[B·T, H, K]``); ``b`` is ≤ 0 and non-increasing inside a chunk since ``g ≤ 0``. A
chunk is 4 sub-blocks of 16 rows. Every exponential the kernels take is of a difference that is ≤ 0
(so in ``(0, 1]``, no overflow; underflow only where the true factor is itself below 1e-38):

* inter-chunk: ``exp(b_i)`` (``b_i ≤ 0``) and ``exp(b_last − b_j)`` (``j ≤ last``);
* off-diagonal sub-blocks ``I > J`` (query rows ``i ∈ I``, key rows ``j ∈ J``): with ``r`` the
  last row of ``J``, ``j ≤ r < i``, so ``b_i − b_r ≤ 0`` and ``b_r − b_j ≤ 0`` and
  ``exp(b_i − b_j) = exp(b_i − b_r) · exp(b_r − b_j)`` splits into two ≤ 1 factors that go into a
  ``tl.dot``;
* diagonal sub-blocks: ``exp(b_i − b_j)`` for ``i ≥ j`` only (masked), ≤ 1; on CUDA column by
  column (``[16, K]`` registers), on CPU as one ``[16, 16, K]`` broadcast (few big ops: the
  interpreter's fast path; ``DIAG_3D_OVERRIDE`` forces either, the tests run both).

The sub-block loops are dynamic (``range``, not ``tl.static_range``): unrolled, the compiler
keeps every sub-block's loads live at once and spills heavily (seen with ``ptxas -v``, sm_90).

Exponents are also clamped with ``min(·, 0)``: a no-op for valid rows, it keeps the padded rows
(loaded as 0) finite. Gates with ``g > 0`` are outside the contract.

Precision: loads are upcast to fp32 at once and stores downcast; all arithmetic is fp32. Dots
take fp32 operands: ``input_precision="ieee"`` for fp32 inputs (and on CPU); for fp16/bf16
inputs on CUDA ``"tf32"`` in the forward and ``"tf32x3"`` in the backward (see ``_dot_cfg``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.standard import _sum_combine

from ..launch import cdiv, launcher, next_pow2

BT = 64      # chunk length
BS = 16      # sub-block length
NS = BT // BS


def _next_pow2(x: int) -> int:
    return max(16, next_pow2(x))


# None: the [BS, BS, K] broadcast on CPU (interpreter), column loops on CUDA. Tests set it.
DIAG_3D_OVERRIDE = None


def _diag_3d(device: torch.device) -> bool:
    if DIAG_3D_OVERRIDE is not None:
        return bool(DIAG_3D_OVERRIDE)
    return device.type != "cuda"


def _dot_cfg(dtype: torch.dtype, device: torch.device, backward: bool = False):
    """(dot operand dtype, input_precision).

    fp32 inputs: exact ``ieee`` dots. fp16/bf16 inputs on CUDA: fp32 operands (the operands of
    most dots are products of inputs with decay factors, or the fp32 state, which a cast back to
    bf16 would round a second time) with ``tf32`` in the forward and ``tf32x3`` (≈ fp32) in the
    backward: dg comes from a reverse cumsum over the whole sequence of q⊙dq − k⊙dk, whose terms
    cancel, so it amplifies the relative error of dq/dk by ~√T (measured in fp64: 5e-4 noise on
    dq, dk gives 2.4e-2 on dg at T=1000). On CPU (the interpreter, whose bf16 arithmetic is
    wrong) everything stays ``ieee`` fp32."""
    if dtype == torch.float32 or device.type != "cuda":
        return tl.float32, "ieee"
    return tl.float32, ("tf32x3" if backward else "tf32")


# triton.language's own @jit helpers (tl.sum, tl.cumsum, tl.cdiv, tl.zeros) are fixed as compiled or
# interpreted when triton is first imported; torch._dynamo imports triton, possibly before
# gla.kernels sets TRITON_INTERPRET. So the kernels use tl.full, tl.reduce and
# tl.associative_scan (builtins) with triton's own ``_sum_combine``: the interpreter recognises it
# and runs numpy's sum / cumsum without calling it (any other combine function runs element by
# element in Python: ~20x slower tests), and compiled kernels call it as a normal helper.
@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _sum_combine)


@triton.jit
def _exp_le0(x):
    """exp(min(x, 0)): every exponent the kernels take is ≤ 0 by construction, up to rounding. NaN
    (how ``gate_cumsum`` marks a positive log gate) propagates instead of being dropped by min."""
    return tl.exp(tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL))


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
def gate_cumsum(g: torch.Tensor, k: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """Chunk-local cumsum of g (``[B,T,H,K]`` or ``[B,T,H]``) as fp32 ``[B,T,H,K]``: the
    chunk-parallel kernel of ``chunk_parallel.py`` (one scan per chunk, as both kernels need)."""
    from . import chunk_parallel
    return chunk_parallel.gate_cumsum(g, k, cu_seqlens)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@launcher
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, gc_ptr, o_ptr, h0_ptr, ht_ptr, cu_ptr, scale, T, H, G,
                K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                BT: tl.constexpr, BS: tl.constexpr, HAS_G: tl.constexpr,
                USE_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr,
                DT: tl.constexpr, PREC: tl.constexpr, DIAG_3D: tl.constexpr):
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

    S = tl.full([BK, BV], 0.0, tl.float32)
    if USE_H0:
        S += tl.load(h0_ptr + i_n * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                     mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)

    for cs in range(0, L, BT):
        last = tl.minimum(cs + BT, L) - 1
        if HAS_G:
            bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
        upd = tl.full([BK, BV], 0.0, tl.float32)
        for I in range(NSUB):
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
                qg = qI * _exp_le0(bI)                       # exp(b_i) ≤ 1
            else:
                qg = qI
            # inter-chunk: (q_i ⊙ exp(b_i)) S
            acc = tl.dot(qg.to(DT), S.to(DT), input_precision=PREC)
            # off-diagonal sub-blocks J < I
            for J in range(0, I):
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
                                 mask=mk & ((o_k * 0 + rr) < L), other=0.0)
                    qa = qI * _exp_le0(bI - br[None, :])      # b_i − b_r ≤ 0
                    ka = kJ * _exp_le0(br[None, :] - bJ)      # b_r − b_j ≤ 0
                else:
                    qa = qI
                    ka = kJ
                a = tl.dot(qa.to(DT), tl.trans(ka.to(DT)), input_precision=PREC)
                acc += tl.dot(a.to(DT), vJ.to(DT), input_precision=PREC)
            # diagonal sub-block: exp(b_i − b_j) for i ≥ j only (masked), ≤ 1
            if DIAG_3D or (not HAS_G):   # [BS, BS, BK] broadcast: few big ops (the interpreter's fast path)
                if HAS_G:
                    e3 = _exp_le0(bI[:, None, :] - bI[None, :, :])
                    ad = _sum(qI[:, None, :] * kI[None, :, :] * e3, 2)
                else:
                    ad = tl.dot(qI.to(DT), tl.trans(kI.to(DT)), input_precision=PREC)
                ad = tl.where(o_s[:, None] >= o_s[None, :], ad, 0.0)
                acc += tl.dot(ad.to(DT), vI.to(DT), input_precision=PREC)
            else:         # column by column (registers stay [BS, BK] on the GPU)
                for j in range(BS):
                    rj = cs + I * BS + j
                    tj = bos + rj
                    mj = (o_k * 0 + rj) < L
                    kj = tl.load(k_ptr + tj * sk + i_h * K + o_k, mask=mk & mj,
                                 other=0.0).to(tl.float32)
                    vj = tl.load(v_ptr + tj * sv + i_h * V + o_v, mask=mv & ((o_v * 0 + rj) < L),
                                 other=0.0).to(tl.float32)
                    bj = tl.load(gc_ptr + tj * sk + i_h * K + o_k, mask=mk & mj, other=0.0)
                    sc = _sum(qI * kj[None, :] * _exp_le0(bI - bj[None, :]), 1)
                    sc = tl.where(o_s >= j, sc, 0.0)
                    acc += sc[:, None] * vj[None, :]
            tl.store(o_ptr + tI[:, None] * so + i_hq * V + o_v[None, :],
                     (acc * scale).to(o_ptr.dtype.element_ty), mask=mI[:, None] & mv[None, :])
            # state update: Σ_j (k_j ⊙ exp(b_last − b_j))ᵀ v_j
            if HAS_G:
                kt = kI * _exp_le0(bl[None, :] - bI)
            else:
                kt = kI
            upd += tl.dot(tl.trans(kt.to(DT)), vI.to(DT), input_precision=PREC)
        if HAS_G:
            S = S * _exp_le0(bl)[:, None] + upd
        else:
            S = S + upd

    if STORE_HT:
        if i_hq % G == 0:
            tl.store(ht_ptr + i_n * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                     S.to(ht_ptr.dtype.element_ty), mask=mk[:, None] & mv[None, :])


def _blocks(K: int, V: int):
    """(BK, BV, num_warps). Small BV: more programs (B·H·V/BV sequential walks) to fill the GPU
    and fewer registers (checked with ``ptxas -v`` for sm_90: no or few spills at these
    settings)."""
    BK = _next_pow2(K)
    if BK <= 32:
        return BK, min(_next_pow2(V), 64), 4
    if BK <= 64:
        return BK, min(_next_pow2(V), 32), 4
    if BK <= 128:
        return BK, min(_next_pow2(V), 32), 8
    return BK, 16, 8


def sequential_fwd(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state,
                   gc=None):
    """Returns ``(o [B,T,Hq,V] v.dtype, final_state [N,H,K,V] fp32 or empty)``."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    G = HQ // H
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if g is not None and gc is None:
        gc = gate_cumsum(g, k, cu_seqlens)
    o = torch.empty(B, T, HQ, V, dtype=v.dtype, device=q.device)
    if output_final_state:
        ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device)
    else:
        ht = torch.empty(0, dtype=torch.float32, device=q.device)
    h0 = initial_state.contiguous() if initial_state is not None else None
    BK, BV, NW = _blocks(K, V)
    DT, PREC = _dot_cfg(q.dtype, q.device)
    _fwd_kernel[(cdiv(V, BV), N * HQ)](
        q, k, v, gc if gc is not None else q, o, h0 if h0 is not None else q, ht,
        cu_seqlens if cu_seqlens is not None else q, scale, T, H, G,
        K=K, V=V, BK=BK, BV=BV, BT=BT, BS=BS, HAS_G=g is not None, USE_H0=h0 is not None,
        STORE_HT=output_final_state, IS_VARLEN=cu_seqlens is not None, DT=DT, PREC=PREC,
        DIAG_3D=_diag_3d(q.device), num_warps=NW)
    return o, ht


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@launcher
@triton.jit
def _bwd_dq_kernel(k_ptr, v_ptr, gc_ptr, do_ptr, dq_ptr, h0_ptr, cu_ptr, scale, T, H, G, NTOK,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   BT: tl.constexpr, BS: tl.constexpr, HAS_G: tl.constexpr,
                   USE_H0: tl.constexpr, IS_VARLEN: tl.constexpr, DT: tl.constexpr,
                   PREC: tl.constexpr, DIAG_3D: tl.constexpr):
    """dq (this V-block's share, fp32 ``[NV, B·T, Hq, K]``), walking the chunks forward and
    recomputing the state S (same exponent bounds as the forward)::

        dq_i = scale · [ (do_i Sᵀ) ⊙ exp(b_i) + Σ_{j ≤ i, same chunk} (do_i · v_j) k_j ⊙ exp(b_i − b_j) ]
    """
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
    sk = H * K
    sv = H * V
    sdo = HQ * V
    sdq = HQ * K
    dq_ptr = dq_ptr + i_v * NTOK * sdq
    S = tl.full([BK, BV], 0.0, tl.float32)
    if USE_H0:
        S += tl.load(h0_ptr + i_n * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                     mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    for cs in range(0, L, BT):
        last = tl.minimum(cs + BT, L) - 1
        if HAS_G:
            bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
        upd = tl.full([BK, BV], 0.0, tl.float32)
        for I in range(NSUB):
            rI = cs + I * BS + o_s
            mI = rI < L
            tI = bos + rI
            mIk = mI[:, None] & mk[None, :]
            mIv = mI[:, None] & mv[None, :]
            doI = tl.load(do_ptr + tI[:, None] * sdo + i_hq * V + o_v[None, :], mask=mIv,
                          other=0.0).to(tl.float32)
            kI = tl.load(k_ptr + tI[:, None] * sk + i_h * K + o_k[None, :], mask=mIk,
                         other=0.0).to(tl.float32)
            vI = tl.load(v_ptr + tI[:, None] * sv + i_h * V + o_v[None, :], mask=mIv,
                         other=0.0).to(tl.float32)
            if HAS_G:
                bI = tl.load(gc_ptr + tI[:, None] * sk + i_h * K + o_k[None, :], mask=mIk,
                             other=0.0)
            # inter: (do_i Sᵀ) ⊙ exp(b_i)
            acc = tl.dot(doI.to(DT), tl.trans(S.to(DT)), input_precision=PREC)
            if HAS_G:
                acc = acc * _exp_le0(bI)
            for J in range(0, I):
                rJ = cs + J * BS + o_s
                mJ = rJ < L
                tJ = bos + rJ
                kJ = tl.load(k_ptr + tJ[:, None] * sk + i_h * K + o_k[None, :],
                             mask=mJ[:, None] & mk[None, :], other=0.0).to(tl.float32)
                vJ = tl.load(v_ptr + tJ[:, None] * sv + i_h * V + o_v[None, :],
                             mask=mJ[:, None] & mv[None, :], other=0.0).to(tl.float32)
                da = tl.dot(doI.to(DT), tl.trans(vJ.to(DT)), input_precision=PREC)
                if HAS_G:
                    bJ = tl.load(gc_ptr + tJ[:, None] * sk + i_h * K + o_k[None, :],
                                 mask=mJ[:, None] & mk[None, :], other=0.0)
                    rr = cs + J * BS + BS - 1
                    br = tl.load(gc_ptr + (bos + rr) * sk + i_h * K + o_k,
                                 mask=mk & ((o_k * 0 + rr) < L), other=0.0)
                    ka = kJ * _exp_le0(br[None, :] - bJ)      # b_r − b_j ≤ 0
                    acc += tl.dot(da.to(DT), ka.to(DT), input_precision=PREC) * \
                        _exp_le0(bI - br[None, :])              # b_i − b_r ≤ 0
                else:
                    acc += tl.dot(da.to(DT), kJ.to(DT), input_precision=PREC)
            # diagonal sub-block
            if DIAG_3D or (not HAS_G):
                dad = tl.dot(doI.to(DT), tl.trans(vI.to(DT)), input_precision=PREC)
                dad = tl.where(o_s[:, None] >= o_s[None, :], dad, 0.0)
                if HAS_G:
                    e3 = _exp_le0(bI[:, None, :] - bI[None, :, :])
                    acc += _sum(dad[:, :, None] * kI[None, :, :] * e3, 1)
                else:
                    acc += tl.dot(dad.to(DT), kI.to(DT), input_precision=PREC)
            else:
                for j in range(BS):
                    rj = cs + I * BS + j
                    tj = bos + rj
                    mj = (o_k * 0 + rj) < L
                    kj = tl.load(k_ptr + tj * sk + i_h * K + o_k, mask=mk & mj,
                                 other=0.0).to(tl.float32)
                    vj = tl.load(v_ptr + tj * sv + i_h * V + o_v, mask=mv & ((o_v * 0 + rj) < L),
                                 other=0.0).to(tl.float32)
                    bj = tl.load(gc_ptr + tj * sk + i_h * K + o_k, mask=mk & mj, other=0.0)
                    dac = _sum(doI * vj[None, :], 1)
                    dac = tl.where(o_s >= j, dac, 0.0)
                    acc += dac[:, None] * kj[None, :] * _exp_le0(bI - bj[None, :])
            tl.store(dq_ptr + tI[:, None] * sdq + i_hq * K + o_k[None, :],
                     acc * scale, mask=mIk)
            if HAS_G:
                kt = kI * _exp_le0(bl[None, :] - bI)
            else:
                kt = kI
            upd += tl.dot(tl.trans(kt.to(DT)), vI.to(DT), input_precision=PREC)
        if HAS_G:
            S = S * _exp_le0(bl)[:, None] + upd
        else:
            S = S + upd


@launcher
@triton.jit
def _bwd_dkv_kernel(q_ptr, k_ptr, v_ptr, gc_ptr, do_ptr, dk_ptr, dv_ptr, dht_ptr, dh0_ptr,
                    cu_ptr, scale, T, H, G, NTOK,
                    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    BT: tl.constexpr, BS: tl.constexpr, HAS_G: tl.constexpr,
                    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
                    DT: tl.constexpr, PREC: tl.constexpr, DIAG_3D: tl.constexpr):
    """dk (this V-block's share, fp32), dv and d initial_state for one kv head, walking the
    chunks in reverse with dS = ∂L/∂S_end-of-chunk (summed over the G query heads)::

        dv_j = (k_j ⊙ exp(b_last − b_j)) dS + Σ_{i ≥ j} A_ij do_i
        dk_j = (v_j dSᵀ) ⊙ exp(b_last − b_j) + Σ_{i ≥ j} dA_ij q_i ⊙ exp(b_i − b_j)
        dS  ← exp(b_last) ⊙ dS + scale Σ_i (q_i ⊙ exp(b_i))ᵀ do_i

    with A_ij = scale Σ_c q_ic k_jc exp(b_ic − b_jc), dA_ij = scale do_i · v_j (i ≥ j).
    """
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    HQ = H * G
    i_n = i_nh // H
    i_h = i_nh % H
    bos, eos = _seq_bounds(cu_ptr, i_n, T, IS_VARLEN)
    L = eos - bos
    scale = tl.cast(scale, tl.float32)
    NSUB: tl.constexpr = BT // BS
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_s = tl.arange(0, BS)
    mk = o_k < K
    mv = o_v < V
    sq = HQ * K
    sk = H * K
    sv = H * V
    sdo = HQ * V
    dk_ptr = dk_ptr + i_v * NTOK * sk
    dS = tl.full([BK, BV], 0.0, tl.float32)
    if USE_DHT:
        dS += tl.load(dht_ptr + i_n * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    NC = (L + BT - 1) // BT
    for ii in range(0, NC):
        cs = (NC - 1 - ii) * BT
        last = tl.minimum(cs + BT, L) - 1
        if HAS_G:
            bl = tl.load(gc_ptr + (bos + last) * sk + i_h * K + o_k, mask=mk, other=0.0)
        dS_new = tl.full([BK, BV], 0.0, tl.float32)
        for J in range(NSUB):
            rJ = cs + J * BS + o_s
            mJ = rJ < L
            tJ = bos + rJ
            mJk = mJ[:, None] & mk[None, :]
            mJv = mJ[:, None] & mv[None, :]
            kJ = tl.load(k_ptr + tJ[:, None] * sk + i_h * K + o_k[None, :], mask=mJk,
                         other=0.0).to(tl.float32)
            vJ = tl.load(v_ptr + tJ[:, None] * sv + i_h * V + o_v[None, :], mask=mJv,
                         other=0.0).to(tl.float32)
            if HAS_G:
                bJ = tl.load(gc_ptr + tJ[:, None] * sk + i_h * K + o_k[None, :], mask=mJk,
                             other=0.0)
                eJ = _exp_le0(bl[None, :] - bJ)           # b_last − b_j ≤ 0
                kt = kJ * eJ
            else:
                kt = kJ
            # inter-chunk terms through dS
            dvJ = tl.dot(kt.to(DT), dS.to(DT), input_precision=PREC)
            dkJ = tl.dot(vJ.to(DT), tl.trans(dS.to(DT)), input_precision=PREC)
            if HAS_G:
                dkJ = dkJ * eJ
                rr = cs + J * BS + BS - 1
                br = tl.load(gc_ptr + (bos + rr) * sk + i_h * K + o_k,
                             mask=mk & ((o_k * 0 + rr) < L), other=0.0)
                ka = kJ * _exp_le0(br[None, :] - bJ)          # b_r − b_j ≤ 0
            else:
                ka = kJ
            dka = tl.full([BS, BK], 0.0, tl.float32)   # Σ dA_ij q_i exp(b_i − b_r), i ∈ I > J
            for gq in range(G):
                i_hq = i_h * G + gq
                # off-diagonal sub-blocks I > J
                for I in range(J + 1, NSUB):
                    rI = cs + I * BS + o_s
                    mI = rI < L
                    tI = bos + rI
                    qI = tl.load(q_ptr + tI[:, None] * sq + i_hq * K + o_k[None, :],
                                 mask=mI[:, None] & mk[None, :], other=0.0).to(tl.float32)
                    doI = tl.load(do_ptr + tI[:, None] * sdo + i_hq * V + o_v[None, :],
                                  mask=mI[:, None] & mv[None, :], other=0.0).to(tl.float32)
                    if HAS_G:
                        bI = tl.load(gc_ptr + tI[:, None] * sk + i_h * K + o_k[None, :],
                                     mask=mI[:, None] & mk[None, :], other=0.0)
                        qa = qI * _exp_le0(bI - br[None, :])  # b_i − b_r ≤ 0
                    else:
                        qa = qI
                    a = tl.dot(qa.to(DT), tl.trans(ka.to(DT)), input_precision=PREC)  # [I, J]
                    dvJ += tl.dot(tl.trans(a.to(DT)), doI.to(DT), input_precision=PREC) * scale
                    da = tl.dot(doI.to(DT), tl.trans(vJ.to(DT)), input_precision=PREC)
                    dka += tl.dot(tl.trans(da.to(DT)), qa.to(DT), input_precision=PREC)
                # diagonal sub-block (I = J)
                qJ = tl.load(q_ptr + tJ[:, None] * sq + i_hq * K + o_k[None, :], mask=mJk,
                             other=0.0).to(tl.float32)
                doJ = tl.load(do_ptr + tJ[:, None] * sdo + i_hq * V + o_v[None, :], mask=mJv,
                              other=0.0).to(tl.float32)
                if DIAG_3D or (not HAS_G):
                    tri = o_s[:, None] >= o_s[None, :]
                    dad = tl.dot(doJ.to(DT), tl.trans(vJ.to(DT)), input_precision=PREC)
                    dad = tl.where(tri, dad, 0.0)                                # [i, j]
                    if HAS_G:
                        e3 = _exp_le0(bJ[:, None, :] - bJ[None, :, :])
                        ad = _sum(qJ[:, None, :] * kJ[None, :, :] * e3, 2)
                        dkJ += _sum(dad[:, :, None] * qJ[:, None, :] * e3, 0) * scale
                    else:
                        ad = tl.dot(qJ.to(DT), tl.trans(kJ.to(DT)), input_precision=PREC)
                        dkJ += tl.dot(tl.trans(dad.to(DT)), qJ.to(DT),
                                      input_precision=PREC) * scale
                    ad = tl.where(tri, ad, 0.0)
                    dvJ += tl.dot(tl.trans(ad.to(DT)), doJ.to(DT), input_precision=PREC) * scale
                else:
                    for i in range(BS):
                        ri = cs + J * BS + i
                        ti = bos + ri
                        mi = (o_k * 0 + ri) < L
                        qi = tl.load(q_ptr + ti * sq + i_hq * K + o_k, mask=mk & mi,
                                     other=0.0).to(tl.float32)
                        doi = tl.load(do_ptr + ti * sdo + i_hq * V + o_v,
                                      mask=mv & ((o_v * 0 + ri) < L), other=0.0).to(tl.float32)
                        bi = tl.load(gc_ptr + ti * sk + i_h * K + o_k, mask=mk & mi, other=0.0)
                        e = _exp_le0(bi[None, :] - bJ)             # [j, K]
                        qe = qi[None, :] * e
                        ac = tl.where(o_s <= i, _sum(kJ * qe, 1), 0.0)
                        dac = tl.where(o_s <= i, _sum(vJ * doi[None, :], 1), 0.0)
                        dvJ += (ac * scale)[:, None] * doi[None, :]
                        dkJ += (dac * scale)[:, None] * qe
                # dS contribution of this query head's sub-block J
                if HAS_G:
                    qg = qJ * _exp_le0(bJ)
                else:
                    qg = qJ
                dS_new += tl.dot(tl.trans(qg.to(DT)), doJ.to(DT), input_precision=PREC) * scale
            if HAS_G:
                dkJ += dka * _exp_le0(br[None, :] - bJ) * scale
            else:
                dkJ += dka * scale
            tl.store(dk_ptr + tJ[:, None] * sk + i_h * K + o_k[None, :], dkJ, mask=mJk)
            tl.store(dv_ptr + tJ[:, None] * sv + i_h * V + o_v[None, :],
                     dvJ.to(dv_ptr.dtype.element_ty), mask=mJv)
        if HAS_G:
            dS = dS * _exp_le0(bl)[:, None] + dS_new
        else:
            dS = dS + dS_new
    if STORE_DH0:
        tl.store(dh0_ptr + i_n * H * K * V + i_h * K * V + o_k[:, None] * V + o_v[None, :],
                 dS, mask=mk[:, None] & mv[None, :])


def sequential_bwd(do, dht, q, k, v, g, initial_state, cu_seqlens, final_state, scale):
    """Returns ``(dq, dk, dv, dg or None, dh0 or None)`` in the dtypes of their inputs.

    dg from the identity (B = sequence-wide cumsum of g, q' = q ⊙ exp(B), k' = k ⊙ exp(−B)):
    ∂L/∂B_t = q_t ⊙ dq_t − k_t ⊙ dk_t (+ Σ_v dht ⊙ ht at the sequence's last step), and
    dg_t = Σ_{u ≥ t, same sequence} ∂L/∂B_u.
    """
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[3]
    G = HQ // H
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    dev = q.device
    gc = gate_cumsum(g, k, cu_seqlens) if g is not None else None
    BK, BV, NW = _blocks(K, V)
    NV = cdiv(V, BV)
    DT, PREC = _dot_cfg(q.dtype, dev, backward=True)
    d3 = _diag_3d(dev)
    NTOK = B * T
    cu = cu_seqlens if cu_seqlens is not None else q
    h0 = initial_state.contiguous() if initial_state is not None else None
    dq_part = torch.empty(NV, B, T, HQ, K, dtype=torch.float32, device=dev)
    _bwd_dq_kernel[(NV, N * HQ)](
        k, v, gc if gc is not None else q, do, dq_part, h0 if h0 is not None else q, cu, scale,
        T, H, G, NTOK, K=K, V=V, BK=BK, BV=BV, BT=BT, BS=BS, HAS_G=g is not None,
        USE_H0=h0 is not None, IS_VARLEN=cu_seqlens is not None, DT=DT, PREC=PREC,
        DIAG_3D=d3, num_warps=NW)
    dk_part = torch.empty(NV, B, T, H, K, dtype=torch.float32, device=dev)
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    dh0 = (torch.empty(N, H, K, V, dtype=torch.float32, device=dev) if h0 is not None
           else dq_part)
    dht_c = dht.contiguous() if dht is not None else None
    _bwd_dkv_kernel[(NV, N * H)](
        q, k, v, gc if gc is not None else q, do, dk_part, dv,
        dht_c if dht_c is not None else q, dh0, cu, scale, T, H, G, NTOK,
        K=K, V=V, BK=BK, BV=BV, BT=BT, BS=BS, HAS_G=g is not None, USE_DHT=dht_c is not None,
        STORE_DH0=h0 is not None, IS_VARLEN=cu_seqlens is not None, DT=DT, PREC=PREC,
        DIAG_3D=d3, num_warps=NW)
    dq32 = dq_part.sum(0) if NV > 1 else dq_part[0]
    dk32 = dk_part.sum(0) if NV > 1 else dk_part[0]
    dg = None
    if g is not None:
        dB = (q.float() * dq32).view(B, T, H, G, K).sum(3) - k.float() * dk32      # [B,T,H,K]
        if dht is not None and final_state is not None:
            last = (dht.float() * final_state.float()).sum(-1)                     # [N,H,K]
            if cu_seqlens is None:
                dB[:, T - 1] += last
            else:
                nonempty = (cu_seqlens[1:] > cu_seqlens[:-1]).to(last.dtype)[:, None, None]
                dB[0].index_add_(0, (cu_seqlens[1:] - 1).long().clamp_min(0), last * nonempty)
        if cu_seqlens is None:
            dgf = dB.flip(1).cumsum(1).flip(1)
        else:
            R = dB[0].double().flip(0).cumsum(0).flip(0)                           # [T,H,K]
            R = torch.cat([R, R.new_zeros(1, H, K)], 0)
            pos = torch.arange(T, device=dev)
            seq = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)
            seq = seq.clamp_max(N - 1)
            eos = cu_seqlens[1:].long()[seq]
            dgf = (R[:T] - R[eos]).float()[None]
        if g.dim() == 3:
            dgf = dgf.sum(-1)
        dg = dgf.to(g.dtype)
    dh = dh0.to(initial_state.dtype) if h0 is not None else None
    return dq32.to(q.dtype), dk32.to(k.dtype), dv, dg, dh


# ----------------------------------------------------------------------------------------------
# Entry points: GLA_LINEAR_KERNEL=parallel (default, chunk_parallel.py) or sequential (above)
# ----------------------------------------------------------------------------------------------
KERNELS = ("parallel", "sequential")


def kernel_choice() -> str:
    name = os.environ.get("GLA_LINEAR_KERNEL", "parallel").strip() or "parallel"
    if name not in KERNELS:
        raise ValueError(f"GLA_LINEAR_KERNEL={name!r}: must be one of {KERNELS}")
    return name


def chunk_gla_fwd(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state):
    """Returns ``(o [B,T,Hq,V] v.dtype, final_state [N,H,K,V] fp32 or empty)``."""
    if kernel_choice() == "sequential":
        return sequential_fwd(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state)
    from . import chunk_parallel
    return chunk_parallel.chunk_gla_fwd(q, k, v, g, initial_state, cu_seqlens, scale,
                                        output_final_state)


def chunk_gla_bwd(do, dht, q, k, v, g, initial_state, cu_seqlens, final_state, scale):
    """Returns ``(dq, dk, dv, dg or None, dh0 or None)`` in the dtypes of their inputs."""
    if kernel_choice() == "sequential":
        return sequential_bwd(do, dht, q, k, v, g, initial_state, cu_seqlens, final_state,
                              scale)
    from . import chunk_parallel
    return chunk_parallel.chunk_gla_bwd(do, dht, q, k, v, g, initial_state, cu_seqlens,
                                        final_state, scale)
