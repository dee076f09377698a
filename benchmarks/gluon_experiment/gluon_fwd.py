"""Experiment: a Hopper attention forward in Gluon, FA3-style (session 11).

One program = 128 query rows of one (batch, head), split over two 4-warp consumer partitions
(64 rows each) and a 1-warp TMA loader. The consumers share each K/V stage (released by both
through a count-2 mbarrier); with PINGPONG they take turns at the tensor cores: one issues its
P·V and next QKᵀ while the other runs its softmax.

q, k, v, out: contiguous [B, H, T, D]; T a multiple of 128 (experiment only).
lse: fp32 [B, H, T], base 2 (as gla's flash forward).
"""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

HALF = 64  # rows per consumer warpgroup (one wgmma M)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
            q_row0, kv_row0, n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for i in gl.static_range(2):
        mbarrier.expect(q_bar.index(i), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row0 + i * 64, 0], q_bar.index(i),
                                        q_smem.index(i))
    for j in range(n_blocks):
        s = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(kv_empty.index(s), ph ^ 1)  # fresh barrier: parity 1 passes at once
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + j * BLOCK_N, 0], k_ready.index(s),
                                        k_smem.index(s))
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row0 + j * BLOCK_N, 0], v_ready.index(s),
                                        v_smem.index(s))


@gluon.jit
def _blocks(first_row, BLOCK_N: gl.constexpr, T, CAUSAL: gl.constexpr):
    """(blocks with every key visible to rows [first_row, first_row + 64), blocks needed)."""
    if CAUSAL:
        n_full = (first_row + 1) // BLOCK_N
        n_mine = gl.cdiv(first_row + 64, BLOCK_N)
    else:
        n_full = T // BLOCK_N
        n_mine = n_full
    return n_full, n_mine


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, o_desc, LSE,
              qk_scale, q_row0, row0, T, WG: gl.constexpr, D: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              PINGPONG: gl.constexpr):
    dtype: gl.constexpr = o_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)

    first_row = row0 + WG * 64
    n_full, n_mine = _blocks(first_row, BLOCK_N, T, CAUSAL)
    # the other warpgroup's block count (ping-pong arrives must match its waits)
    other_full, n_other = _blocks(row0 + (1 - WG) * 64, BLOCK_N, T, CAUSAL)

    rows = first_row + gl.arange(0, 64, layout=row_s)
    cols0 = gl.arange(0, BLOCK_N, layout=col_s)
    l_i = gl.zeros([64], gl.float32, row_s)
    acc = gl.zeros([64, D], gl.float32, o_layout)
    zero_s = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
    q = q_smem.index(WG)
    mbarrier.wait(q_bar.index(WG), 0)

    # block 0 (the loop below runs softmax_j under P_{j-1}·V, FA3's intra-warpgroup overlap)
    mbarrier.wait(k_ready.index(0), 0)
    qk = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False,
                       is_async=True)
    qk = warpgroup_mma_wait(0, deps=(qk, ))
    if CAUSAL:
        if n_full == 0:
            qk = gl.where(gl.expand_dims(cols0, 0) <= gl.expand_dims(rows, 1), qk, float("-inf"))
    m_i = gl.max(qk, 1) * qk_scale
    p = gl.exp2(qk * qk_scale - gl.expand_dims(m_i, 1))
    l_i = gl.sum(p, 1)
    p16 = gl.convert_layout(p.to(dtype), p_layout)

    for j in range(1, n_mine):
        s = j % STAGES
        ph = (j // STAGES) & 1
        sp = (j - 1) % STAGES
        php = ((j - 1) // STAGES) & 1
        mbarrier.wait(k_ready.index(s), ph)
        if PINGPONG:  # my turn at the tensor cores (WG 0 goes first)
            mbarrier.wait(turn.index(WG), ((j - 1) & 1) ^ (1 - WG))
        qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False,
                           is_async=True)
        mbarrier.wait(v_ready.index(sp), php)
        acc = warpgroup_mma(p16, v_smem.index(sp), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG), count=1)
        qk = warpgroup_mma_wait(1, deps=(qk, ))  # QK_j done, P_{j-1}·V still running
        if CAUSAL:
            if j >= n_full:
                cols = j * BLOCK_N + cols0
                qk = gl.where(gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1), qk,
                              float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc, p16 = warpgroup_mma_wait(0, deps=(acc, p16))
        mbarrier.arrive(kv_empty.index(sp), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p16 = gl.convert_layout(p.to(dtype), p_layout)
        m_i = m_new
    if PINGPONG:  # the other warpgroup may run longer: keep taking turns until it is done
        for j in range(n_mine, n_other):
            mbarrier.wait(turn.index(WG), ((j - 1) & 1) ^ (1 - WG))
            mbarrier.arrive(turn.index(1 - WG), count=1)
    sl = (n_mine - 1) % STAGES
    mbarrier.wait(v_ready.index(sl), ((n_mine - 1) // STAGES) & 1)
    acc = warpgroup_mma(p16, v_smem.index(sl), acc, is_async=True)
    acc, p16 = warpgroup_mma_wait(0, deps=(acc, p16))
    mbarrier.arrive(kv_empty.index(sl), count=1)

    lse = m_i + gl.log2(l_i)
    inv = gl.convert_layout(1.0 / l_i, row_o)
    o = acc * gl.expand_dims(inv, 1)
    gl.store(LSE + q_row0 + WG * 64 + gl.arange(0, 64, layout=row_s), lse)
    q.store(o.to(dtype))  # Q is no longer read: its tile stages the output
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row0 + WG * 64, 0], q)
    tma.store_wait(0)


@gluon.jit
def gluon_attn_fwd(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, T, H, GROUP,
                   D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                   LOADER_REGS: gl.constexpr):
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)  # longest rows first
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    row0 = pid_m * 128
    q_row0 = bh * T + row0
    kv_row0 = (b * (H // GROUP) + h // GROUP) * T
    if CAUSAL:
        n_blocks = gl.cdiv(row0 + 128, BLOCK_N)
    else:
        n_blocks = T // BLOCK_N
    dtype: gl.constexpr = q_desc.dtype

    q_smem = gl.allocate_shared_memory(dtype, [2, 64, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a stage
    fence_async_shared()

    WG0: gl.constexpr = 0
    WG1: gl.constexpr = 1
    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, o_desc, LSE,
                     qk_scale, q_row0, row0, T, WG0, D, BLOCK_N, STAGES, CAUSAL, PINGPONG)),
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, o_desc, LSE,
                     qk_scale, q_row0, row0, T, WG1, D, BLOCK_N, STAGES, CAUSAL, PINGPONG)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready,
                   kv_empty, q_row0, kv_row0, n_blocks, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, LOADER_REGS])


def layouts(D, BLOCK_N, gdtype):
    return (gl.NVMMASharedLayout.get_default_for([64, D], gdtype),
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gdtype))


def attention_fwd(q, k, v, causal=True, scale=None, BLOCK_N=128, STAGES=2, PINGPONG=True,
                  CONSUMER_REGS=232, LOADER_REGS=40):
    import math
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    B, H, T, D = q.shape
    HK = k.shape[1]
    assert T % 128 == 0 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    gdtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[q.dtype]
    lq, lk = layouts(D, BLOCK_N, gdtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    q2, k2, v2, o2 = (x.view(-1, D) for x in (q, k, v, out))
    qd = TensorDescriptor.from_tensor(q2, [64, D], lq)
    od = TensorDescriptor.from_tensor(o2, [64, D], lq)
    kd = TensorDescriptor.from_tensor(k2, [BLOCK_N, D], lk)
    vd = TensorDescriptor.from_tensor(v2, [BLOCK_N, D], lk)
    scale = scale or 1.0 / math.sqrt(D)
    grid = (T // 128, B * H)
    gluon_attn_fwd[grid](qd, kd, vd, od, lse, scale * 1.4426950408889634, T, H, H // HK,
                         D=D, BLOCK_N=BLOCK_N, STAGES=STAGES, CAUSAL=causal, PINGPONG=PINGPONG,
                         CONSUMER_REGS=CONSUMER_REGS, LOADER_REGS=LOADER_REGS, num_warps=4)
    return out, lse
