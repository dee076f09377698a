"""The attention backward on Hopper (sm_90), in Gluon: FlashAttention-3's dQ through TMA adds.

The Triton backward (``flash._attn_bwd_dkdv`` + ``flash._attn_bwd_dq``) runs 7 matmuls per
(key block, query block): the dQ kernel recomputes QKᵀ and dO·Vᵀ. FA2/FA3 run 5 by adding each
dQ tile from the dK/dV kernel, which in Triton lost 10-42% (sessions 4 and 10 of
``benchmarks/attention_notes.md``: its atomics and a third fp32 tile on one warpgroup). Here:

* one program per 128 keys of one (batch, kv head), looping over the query blocks (64 rows) of
  every query head of its GQA group, in two partitions: a 1-warp loader (TMA: K and V once, Q
  and dO blocks into a ring) and 8 compute warps (two warpgroups of 64 keys each);
* per query block: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ on the tensor cores while the previous results
  are used, Pᵀ = exp2(Sᵀ·scale − lse), dSᵀ = Pᵀ ⊙ (dPᵀ − delta), dV += Pᵀ·dO and dK += dSᵀ·Q
  from registers, dSᵀ to shared memory, dQ = dS·K split over the two warpgroups by columns,
  and dQ added into an fp32 buffer by one TMA reduce-add (``cp.reduce.async.bulk.tensor``);
* at head dim 64 (``PER_WARPGROUP_HEAD_DIMS``) each warpgroup is a partition of its own (4 + 4
  + 1 warps): its own dS tile and its own dQ partial over its 64 keys, a Q/dO stage released by
  both, nothing else joining them, so one's softmax runs under the other's matmuls (1.04-1.10x
  the one-partition kernel, session 14 of ``benchmarks/attention_notes.md``);
* the loader warp also stages each query block's lse and delta rows in shared memory (the
  ``q_ready`` barrier counts its arrive too): loaded by the compute warps, those global loads
  were sunk to their uses by the compiler and stalled the softmax (~11% of ncu's samples at
  D=128, T=4k); staged, the kernel spills 56 B instead of 108 (session 15);
* programs run heaviest first (``hopper._schedule``: a 1-D grid, causal key blocks in
  decreasing work) with the heads taken in whole GQA groups whose Q/dO streams fit
  ``hopper.L2_BUDGET``, so the tail of the grid is short and the streams stay in L2
  (0.794 -> 0.659 ms at D=128, T=4k, with the staging; session 15);
* dK and dV leave through the K/V tiles' shared memory and TMA stores, which clip keys past Tk;
  with few programs a GQA group is split over programs that write fp32 partials instead
  (``flash.dkdv_split``; the caller sums them).

Inputs: the forward's lse (base 2) and the Triton preprocess's delta and gated dO
(``flash._attn_bwd_preprocess``), so gates are handled before this kernel. The preprocess also
zeroes the fp32 dQ buffer ``[B, Tq, H, D]``; the caller casts it after. Covers what the Gluon
forward covers (``hopper._uncovered``; :func:`unsupported_reason`). No interpreter runs Gluon:
its tests are GPU tests, and the CPU suite compiles it for sm_90
(``benchmarks/kernel_resources.py --gluon``).
"""
from __future__ import annotations

from .. import launch
from . import hopper
from .hopper import gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from .hopper import _at, _schedule, _tma_load, _tma_store

    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed after Triton 3.6

    _tma_add = getattr(tma, "async_atomic_add", None)  # newer Triton (3.9 on the CPU box)
    if _tma_add is None:  # 3.6 (the device) builds the same op, without a Python wrapper
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_add(tensor_desc, coord, src, _semantic=None):
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD,
                                                      tensor_desc.handle, coord, src.handle)

BLOCK_N = 128  # keys per program: two warpgroups of 64
BLOCK_M = 64  # query rows per step (128 at head dim 64 spills 400 B: kernel-resources-sm90.md)
STAGES = 2
# the loader stages each query block's lse and delta rows in shared memory with its Q. Loaded by
# the compute warps instead, they arrived late: at head dim 128 the stalls on them were 11% of
# the kernel's warp samples (ncu, session 15), the compiler having sunk the loads to their uses.
LSE_IN_SMEM = True

if gluon is not None:
    @gluon.jit
    def _query_blocks(n0, TQ, TK, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      CAUSAL: gl.constexpr):
        """(first query block that sees keys [n0, n0 + BLOCK_N), first that sees them all)."""
        if CAUSAL:  # bottom-right aligned: row i sees keys <= i + TK - TQ
            off = TK - TQ
            lo = gl.maximum(n0 - off, 0) // BLOCK_M
            full = gl.cdiv(gl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M)
        else:
            lo = n0 * 0
            full = n0 * 0
        return lo, full

    @gluon.jit
    def _bwd_loader(k_desc, v_desc, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem, kv_bar,
                    q_ready, do_ready, qdo_empty, lse_smem, delta_smem, LSE, DELTA, TQ, H,
                    b, hk, n0, h0, m_lo, n_m, n_iter,
                    K_T_MAJOR: gl.constexpr, V_T_MAJOR: gl.constexpr, Q_T_MAJOR: gl.constexpr,
                    DO_T_MAJOR: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    KV_TILES: gl.constexpr, STAGES: gl.constexpr, LSE_SMEM: gl.constexpr):
        # K and V once, as KV_TILES tiles of BLOCK_N / KV_TILES keys (one per compute partition)
        mbarrier.expect(kv_bar, KV_TILES * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
        for w in gl.static_range(KV_TILES):
            key = n0 + w * (BLOCK_N // KV_TILES)
            _tma_load(k_desc, _at(b, hk, key, K_T_MAJOR), kv_bar, k_smem.index(w))
            _tma_load(v_desc, _at(b, hk, key, V_T_MAJOR), kv_bar, v_smem.index(w))
        for it in range(n_iter):
            s = it % STAGES
            mbarrier.wait(qdo_empty.index(s), ((it // STAGES) & 1) ^ 1)  # fresh: parity 1 passes
            h = h0 + it // n_m
            row = (m_lo + it % n_m) * BLOCK_M
            mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes)
            _tma_load(q_desc, _at(b, h, row, Q_T_MAJOR), q_ready.index(s), q_smem.index(s))
            mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes)
            _tma_load(do_desc, _at(b, h, row, DO_T_MAJOR), do_ready.index(s), do_smem.index(s))
            if LSE_SMEM:  # the block's lse and delta rows beside its Q (q_ready's 2nd arrival)
                vec: gl.constexpr = gl.BlockedLayout([BLOCK_M // 32], [32], [1], [0])
                rows = row + gl.arange(0, BLOCK_M, layout=vec)
                at = (b * H + h).to(gl.int64) * TQ + rows
                lse_smem.index(s).store(gl.load(LSE + at, mask=rows < TQ, other=0.0))
                delta_smem.index(s).store(gl.load(DELTA + at, mask=rows < TQ, other=0.0))
                _barrier()  # every lane's stores before the one arrive (release) below
                mbarrier.arrive(q_ready.index(s), count=1)

    @gluon.jit
    def _bwd_step(k, v, q, do, ds, dq_box, q_ready, do_ready, qdo_empty, s, phase, dq_desc, dk, dv,
                  zero_s, zero_dq, keys, rows, LSE, DELTA, lse_base, lse_smem, delta_smem,
                  qk_scale, sm_scale, TQ, TK, ragged, m_full, b, h, m, a_layout: gl.constexpr,
                  BLOCK_M: gl.constexpr, D: gl.constexpr, CAUSAL: gl.constexpr,
                  DQ_T_MAJOR: gl.constexpr, LSE_SMEM: gl.constexpr):
        """One query block against this partition's keys: dK and dV accumulated (returned), dQ
        added by a TMA reduce-add, the Q/dO stage released."""
        dtype: gl.constexpr = ds.dtype
        mbarrier.wait(q_ready.index(s), phase)
        st = warpgroup_mma(k, q.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(s), phase)
        dpt = warpgroup_mma(v, do.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        # rows past TQ: zeros (Q and dO are zero-filled there, so dS is 0 and nothing adds)
        if LSE_SMEM:
            lse = lse_smem.index(s).load(rows.type.layout)
        else:
            lse = gl.load(LSE + lse_base + rows, mask=rows < TQ, other=0.0)
        st = warpgroup_mma_wait(1, deps=(st, ))  # Sᵀ done; dPᵀ may still run
        st = st * qk_scale
        if ragged or m < m_full:  # keys past TK, or (causal) past some row's diagonal
            vis = keys < TK
            if CAUSAL:
                vis = vis & (keys <= gl.expand_dims(rows, 0) + (TK - TQ))
            st = gl.where(vis, st, float("-inf"))
        pt = gl.exp2(st - gl.expand_dims(lse, 0))
        dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do, dv, is_async=True)
        if LSE_SMEM:
            delta = delta_smem.index(s).load(rows.type.layout)
        else:
            delta = gl.load(DELTA + lse_base + rows, mask=rows < TQ, other=0.0)
        dpt = warpgroup_mma_wait(1, deps=(dpt, ))  # dPᵀ done; dV may still run
        dst = (pt * (dpt - gl.expand_dims(delta, 0))).to(dtype)
        dk = warpgroup_mma(gl.convert_layout(dst, a_layout), q, dk, is_async=True)
        ds.store(dst)
        fence_async_shared()
        dq = warpgroup_mma(ds.permute((1, 0)), k, zero_dq, use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
        tma.store_wait(0)  # (its issuing thread) the previous dQ add has read the staging tile
        _barrier()  # and this partition's warps are done with the Q/dO stage
        mbarrier.arrive(qdo_empty.index(s), count=1)
        dq_box.reshape([BLOCK_M, D]).store(dq * sm_scale)
        fence_async_shared()
        _tma_add(dq_desc, _at(b, h, m * BLOCK_M, DQ_T_MAJOR), dq_box)
        return dk, dv

    @gluon.jit
    def _bwd_compute(k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, kv_bar, q_ready,
                     do_ready, qdo_empty, lse_smem, delta_smem, dq_desc, dk_desc, dv_desc, LSE,
                     DELTA, qk_scale, sm_scale, b, hk, n0, h0, TQ, TK, H, m_lo, n_m, n_iter,
                     PART_K, PART_V, part_row0,
                     WG: gl.constexpr, KEYS: gl.constexpr, WARPS: gl.constexpr,
                     D: gl.constexpr, BLOCK_M: gl.constexpr,
                     STAGES: gl.constexpr, CAUSAL: gl.constexpr, DQ_T_MAJOR: gl.constexpr,
                     DK_T_MAJOR: gl.constexpr, DV_T_MAJOR: gl.constexpr,
                     PARTIALS: gl.constexpr, LSE_SMEM: gl.constexpr):
        """A compute partition of ``WARPS`` warps owning ``KEYS`` keys from ``n0 + KEYS·WG``,
        with its own K/V tiles, dS tile and dQ staging tile (index ``WG``). Sᵀ, dPᵀ [keys,
        queries] and dK, dV [keys, D]: each warpgroup owns 64 keys; dQ [queries, D]: with two
        warpgroups (8 warps) each owns half the columns of every row, with one, all."""
        dtype: gl.constexpr = dk_desc.dtype
        GROUPS: gl.constexpr = WARPS // 4
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_M, 16])
        kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, D, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, GROUPS], instr_shape=[16, D // GROUPS, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
        key_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_s: gl.constexpr = gl.SliceLayout(0, s_layout)

        key0 = n0 + WG * KEYS
        m_mine, m_full = _query_blocks(key0, TQ, TK, BLOCK_M, KEYS, CAUSAL)
        keys = gl.expand_dims(key0 + gl.arange(0, KEYS, layout=key_s), 1)
        rows0 = gl.arange(0, BLOCK_M, layout=row_s)
        zero_s = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
        zero_dq = gl.zeros([BLOCK_M, D], gl.float32, dq_layout)
        dk = gl.zeros([KEYS, D], gl.float32, kv_layout)
        dv = gl.zeros([KEYS, D], gl.float32, kv_layout)
        k = k_smem.index(WG).reshape([KEYS, D])  # drop the unit dims of the 4-d TMA box
        v = v_smem.index(WG).reshape([KEYS, D])
        ds = ds_smem.index(WG)
        dq_box = dq_smem.index(WG)
        ragged = key0 + KEYS > TK  # keys past TK: their scores must not reach exp2
        mbarrier.wait(kv_bar, 0)
        for it in range(n_iter):
            s = it % STAGES
            phase = (it // STAGES) & 1
            h = h0 + it // n_m
            m = m_lo + it % n_m
            rows = m * BLOCK_M + rows0
            lse_base = (b * H + h).to(gl.int64) * TQ
            q = q_smem.index(s).reshape([BLOCK_M, D])
            do = do_smem.index(s).reshape([BLOCK_M, D])
            if WG == 0:  # the program's first keys: every query block it loads sees them
                dk, dv = _bwd_step(k, v, q, do, ds, dq_box, q_ready, do_ready, qdo_empty, s,
                                   phase, dq_desc, dk, dv, zero_s, zero_dq,
                                   keys, rows, LSE, DELTA, lse_base, lse_smem, delta_smem,
                                   qk_scale, sm_scale, TQ, TK, ragged, m_full, b, h, m, a_layout,
                                   BLOCK_M, D, CAUSAL, DQ_T_MAJOR, LSE_SMEM)
            else:
                if m < m_mine:  # causal: these rows see none of my keys (nothing to add)
                    mbarrier.arrive(qdo_empty.index(s), count=1)
                else:
                    dk, dv = _bwd_step(k, v, q, do, ds, dq_box, q_ready, do_ready, qdo_empty,
                                       s, phase, dq_desc,
                                       dk, dv, zero_s, zero_dq, keys, rows, LSE, DELTA,
                                       lse_base, lse_smem, delta_smem, qk_scale, sm_scale, TQ,
                                       TK, ragged, m_full, b, h, m, a_layout, BLOCK_M, D,
                                       CAUSAL, DQ_T_MAJOR, LSE_SMEM)
        tma.store_wait(0)

        dk = dk * sm_scale
        if PARTIALS:  # one slice of a GQA group: fp32 partial sums, added by the caller
            key_o: gl.constexpr = gl.SliceLayout(1, kv_layout)
            col_o: gl.constexpr = gl.SliceLayout(0, kv_layout)
            keys_o = gl.expand_dims(key0 + gl.arange(0, KEYS, layout=key_o), 1)
            off = (part_row0 + keys_o.to(gl.int64)) * D \
                + gl.expand_dims(gl.arange(0, D, layout=col_o), 0)
            gl.store(PART_K + off, dk, mask=keys_o < TK)
            gl.store(PART_V + off, dv, mask=keys_o < TK)
        else:  # dK and dV through my K and V tiles (read no more); TMA clips keys past TK
            _barrier()
            k.store(dk.to(dtype))
            v.store(dv.to(dtype))
            fence_async_shared()
            _tma_store(dk_desc, _at(b, hk, key0, DK_T_MAJOR), k.reshape(dk_desc.block_type.shape))
            _tma_store(dv_desc, _at(b, hk, key0, DV_T_MAJOR), v.reshape(dv_desc.block_type.shape))
            tma.store_wait(0)

    @gluon.jit
    def _attn_bwd_sm90(k_desc, v_desc, q_desc, do_desc, dq_desc, dk_desc, dv_desc, LSE, DELTA,
                       PART_K, PART_V, qk_scale, sm_scale, TQ, TK, H, HK, GROUP, SPLIT,
                       GROUP_HEADS,
                       D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr,
                       CAUSAL: gl.constexpr, K_T_MAJOR: gl.constexpr, V_T_MAJOR: gl.constexpr,
                       Q_T_MAJOR: gl.constexpr, DO_T_MAJOR: gl.constexpr,
                       DQ_T_MAJOR: gl.constexpr, DK_T_MAJOR: gl.constexpr,
                       DV_T_MAJOR: gl.constexpr, PARTIALS: gl.constexpr,
                       PER_WARPGROUP: gl.constexpr, LSE_SMEM: gl.constexpr):
        """``PER_WARPGROUP``: the two warpgroups as partitions of their own
        (:func:`_bwd_compute` twice, 4 + 4 + 1 warps; K/V/dK/dV boxes of 64 keys); otherwise one
        8-warp compute partition (8 + 1 warps; boxes of 128 keys)."""
        n_blocks = gl.cdiv(TK, BLOCK_N)
        nb, bhs = _schedule(n_blocks, GROUP_HEADS, False)  # causal: most queries first
        n0 = nb * BLOCK_N
        bh = bhs // SPLIT
        split = bhs % SPLIT  # which slice of the GQA group this program sums
        b = bh // HK
        hk = bh % HK
        heads = GROUP // SPLIT
        h0 = hk * GROUP + split * heads
        part_row0 = (split * (gl.num_programs(0) // (n_blocks * SPLIT)) + bh).to(gl.int64) * TK
        m_lo, _ = _query_blocks(n0, TQ, TK, BLOCK_M, BLOCK_N, CAUSAL)
        n_m = gl.cdiv(TQ, BLOCK_M) - m_lo
        n_iter = heads * n_m
        dtype: gl.constexpr = q_desc.dtype
        TILES: gl.constexpr = 2 if PER_WARPGROUP else 1  # K/V tiles, dS tiles, dQ staging tiles

        k_smem = gl.allocate_shared_memory(dtype, [TILES] + k_desc.block_type.shape,
                                           k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [TILES] + v_desc.block_type.shape,
                                           v_desc.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape,
                                           q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape,
                                            do_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                       rank=2)
        dq_smem = gl.allocate_shared_memory(gl.float32, [TILES] + dq_desc.block_type.shape,
                                            dq_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], vec_smem)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], vec_smem)
        for i in gl.static_range(STAGES):
            # LSE_SMEM: Q's bytes and the loader's arrival once lse and delta are stored
            mbarrier.init(q_ready.index(i), count=2 if LSE_SMEM else 1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(qdo_empty.index(i), count=TILES)  # each compute partition releases
        fence_async_shared()

        ds_smem = gl.allocate_shared_memory(dtype, [TILES, BLOCK_N // TILES, BLOCK_M],
                                            ds_layout)
        KEYS: gl.constexpr = BLOCK_N // TILES
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        HALF: gl.constexpr = 4  # warps of a partition per warpgroup
        ALL: gl.constexpr = 8  # warps of the one compute partition
        # (argument tuples spelled out: a tuple built by concatenation inside a Gluon kernel
        # turns its constexprs into tensors)
        if PER_WARPGROUP:
            gl.warp_specialize([
                (_bwd_compute, (k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, kv_bar,
                                q_ready, do_ready, qdo_empty, lse_smem, delta_smem, dq_desc,
                                dk_desc, dv_desc, LSE, DELTA, qk_scale, sm_scale, b, hk, n0, h0, TQ, TK, H, m_lo, n_m,
                                n_iter, PART_K, PART_V, part_row0, WG0, KEYS, HALF, D, BLOCK_M,
                                STAGES, CAUSAL, DQ_T_MAJOR, DK_T_MAJOR, DV_T_MAJOR, PARTIALS,
                                LSE_SMEM)),
                (_bwd_compute, (k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, kv_bar,
                                q_ready, do_ready, qdo_empty, lse_smem, delta_smem, dq_desc,
                                dk_desc, dv_desc, LSE, DELTA, qk_scale, sm_scale, b, hk, n0, h0, TQ, TK, H, m_lo, n_m,
                                n_iter, PART_K, PART_V, part_row0, WG1, KEYS, HALF, D, BLOCK_M,
                                STAGES, CAUSAL, DQ_T_MAJOR, DK_T_MAJOR, DV_T_MAJOR, PARTIALS,
                                LSE_SMEM)),
                (_bwd_loader, (k_desc, v_desc, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem,
                               kv_bar, q_ready, do_ready, qdo_empty, lse_smem, delta_smem, LSE,
                               DELTA, TQ, H, b, hk, n0, h0, m_lo, n_m, n_iter, K_T_MAJOR,
                               V_T_MAJOR, Q_T_MAJOR, DO_T_MAJOR, BLOCK_M, BLOCK_N, TILES, STAGES,
                               LSE_SMEM)),
            ], [4, 1], [232, 24])
        else:
            gl.warp_specialize([
                (_bwd_compute, (k_smem, v_smem, q_smem, do_smem, ds_smem, dq_smem, kv_bar,
                                q_ready, do_ready, qdo_empty, lse_smem, delta_smem, dq_desc,
                                dk_desc, dv_desc, LSE, DELTA, qk_scale, sm_scale, b, hk, n0, h0, TQ, TK, H, m_lo, n_m,
                                n_iter, PART_K, PART_V, part_row0, WG0, KEYS, ALL, D, BLOCK_M,
                                STAGES, CAUSAL, DQ_T_MAJOR, DK_T_MAJOR, DV_T_MAJOR, PARTIALS,
                                LSE_SMEM)),
                (_bwd_loader, (k_desc, v_desc, q_desc, do_desc, k_smem, v_smem, q_smem, do_smem,
                               kv_bar, q_ready, do_ready, qdo_empty, lse_smem, delta_smem, LSE,
                               DELTA, TQ, H, b, hk, n0, h0, m_lo, n_m, n_iter, K_T_MAJOR,
                               V_T_MAJOR, Q_T_MAJOR, DO_T_MAJOR, BLOCK_M, BLOCK_N, TILES, STAGES,
                               LSE_SMEM)),
            ], [1], [24])


def plan_switches() -> tuple:
    """This module's settings a call plan's decisions read (``flash._switches``), with the
    forward module's."""
    return (BACKWARD, BACKWARD_PER_WARPGROUP, PER_WARPGROUP_HEAD_DIMS, LSE_IN_SMEM, STAGES,
            BLOCK_M, BLOCK_N, hopper.L2_BUDGET)


def _launcher(d: int) -> "hopper.GluonLaunch":
    return BACKWARD_PER_WARPGROUP if d in PER_WARPGROUP_HEAD_DIMS else BACKWARD


def unsupported_reason(q, k, v, dout, bias, key_mask, causal, window, chunk,
                       scale=1.0) -> str | None:
    """Why the Gluon backward does not take this call (None: it does). ``dout`` is the
    attention's (gated) output gradient; strides TMA cannot read are copied, not declined."""
    if hopper._IMPORT_ERROR is not None:
        return hopper._IMPORT_ERROR
    disabled = _launcher(q.shape[3]).disabled
    if disabled:
        return disabled
    if dout.dtype != q.dtype:
        return f"output gradient dtype {dout.dtype}"
    return hopper._uncovered(q, k, v, bias, key_mask, causal, window, chunk, scale)


def attention_backward(q, k, v, dout, lse, delta, dq_acc, dk, dv, scale, causal,
                       split=1, part_k=None, part_v=None) -> None:
    """Add ``dq_acc`` (zeroed fp32, a [B, H, Tq, D] view of a [B, Tq, H, D] buffer) and write
    ``dk``, ``dv`` for a call :func:`unsupported_reason` accepted. ``dout``: TMA-readable;
    ``lse``, ``delta``: fp32 [B, H, Tq] (the forward's, base 2, and the preprocess's).
    ``split`` > 1 (a divisor of the GQA group): that many programs share each kv head's group,
    and write fp32 partials ``part_k``/``part_v`` (contiguous [split, B, Hk, Tk, D]) instead of
    ``dk``/``dv``, for the caller to sum."""
    backward_plan(q, k, v, dout, dq_acc, dk, dv, scale, causal, split)(
        q, k, v, dout, lse, delta, dq_acc, dk, dv, part_k, part_v)


def backward_plan(q, k, v, dout, dq_acc, dk, dv, scale, causal, split=1):
    """:func:`attention_backward` for every call like this one (tensors of the same shapes,
    strides, dtypes, device and 16-byte alignment): returns ``run(q, k, v, dout, lse, delta,
    dq_acc, dk, dv, part_k, part_v)``, which holds no tensor."""
    B, H, TQ, D = q.shape
    HK, TK = k.shape[1], k.shape[2]
    partials = split > 1
    group = H // HK
    tail = (scale * 1.4426950408889634, scale, TQ, TK, H, HK, group, split,
            hopper.group_heads(B * HK * split, split, 2 * TQ * D * q.element_size() * group,
                               causal))
    exact = (bool(causal), STAGES, partials, LSE_IN_SMEM)
    launcher = _launcher(D)
    per_warpgroup = launcher is BACKWARD_PER_WARPGROUP
    kv_rows = BLOCK_N // 2 if per_warpgroup else BLOCK_N  # each partition's keys, or all
    consts = dict(D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, CAUSAL=bool(causal),
                  K_T_MAJOR=hopper._t_major(k), V_T_MAJOR=hopper._t_major(v),
                  Q_T_MAJOR=hopper._t_major(q), DO_T_MAJOR=hopper._t_major(dout),
                  DQ_T_MAJOR=hopper._t_major(dq_acc), DK_T_MAJOR=hopper._t_major(dk),
                  DV_T_MAJOR=hopper._t_major(dv), PARTIALS=partials,
                  PER_WARPGROUP=per_warpgroup, LSE_SMEM=LSE_IN_SMEM)
    bound = launcher.bind((launch.cdiv(TK, BLOCK_N) * B * HK * split, 1), q.device.index,
                          exact, lambda: consts)

    def run(q, k, v, dout, lse, delta, dq_acc, dk, dv, part_k, part_v):
        pk = part_k if partials else lse
        pv = part_v if partials else lse
        bound(((k, kv_rows), (v, kv_rows), (q, BLOCK_M), (dout, BLOCK_M), (dq_acc, BLOCK_M),
               (dk, kv_rows), (dv, kv_rows)), (lse, delta, pk, pv, *tail))
    return run


BACKWARD = hopper.GluonLaunch(lambda: _attn_bwd_sm90, "the Gluon backward", num_warps=8)
BACKWARD_PER_WARPGROUP = hopper.GluonLaunch(
    lambda: _attn_bwd_sm90, "the Gluon backward (a partition per warpgroup)", num_warps=4)
# head dims whose backward runs each warpgroup as its own partition: its dQ partial, 64 x D fp32,
# takes D/2 registers a thread (too many at 128, where the warpgroups split dQ by columns)
PER_WARPGROUP_HEAD_DIMS = frozenset({64})
