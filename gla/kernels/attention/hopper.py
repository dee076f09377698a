"""The attention forward on Hopper (sm_90), in Gluon: FlashAttention-3's schedule.

Triton's compiler gives the flash forward (``flash._attn_fwd``) neither warp specialization that
pays nor two warpgroups that take turns at the tensor cores (sessions 3-10 of
``benchmarks/attention_notes.md``). Gluon states both:

* one program per 128 query rows of one (batch, head), in three partitions: a 1-warp loader
  (TMA: the two Q halves once, then K and V blocks into a 3-stage ring), and two 4-warp
  consumers of 64 rows each, which share every K/V stage (released by a count-2 barrier);
* the consumers take turns (``turn`` barriers): one issues its P·V and its next QKᵀ while the
  other runs its softmax;
* inside a consumer, softmax_j runs while P_{j-1}·V is still on the tensor cores (FA3's
  intra-warpgroup overlap: QKᵀ_j is issued first, ``wait(1)`` returns when it is done).

Same contract as ``flash.attention_forward`` (out in a ``[B, Tq, H, D]`` buffer, lse base 2), so
either backward runs after it: the Triton one or the Gluon one (``hopper_bwd.py``, which shares
this file's launcher, :class:`GluonLaunch`, and declines what :func:`_uncovered` names). What it
covers: bf16/fp16, head dim 64 or 128 (= value dim), causal (bottom-right aligned, Tq ≤ Tk: every row sees a key) or not, GQA, ragged
lengths (TMA reads zeros past the end and clips its stores), the sigmoid output gate. Everything
else (bias, key mask, window, chunk, other head dims) stays on the Triton kernel:
:func:`unsupported_reason` says why. No interpreter runs Gluon: its tests are GPU tests.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from .. import launch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.compiler.errors import CompilationError
except ImportError as e:  # an older Triton: the Triton kernel serves every call
    gluon = None
    _IMPORT_ERROR = f"triton.experimental.gluon is not importable ({e})"
else:
    _IMPORT_ERROR = None
    # Triton 3.9 renamed the TMA copies (the old names raise); 3.6, on the device, has only these
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

BLOCK_M = 128  # two consumer warpgroups of 64 rows
HALF = 64
# H200 (benchmarks/results/attention-gluon-fwd-nvidia-h200.txt): 128-key blocks in 3 stages were
# the fastest of the five (BLOCK_N, STAGES) pairs timed at head dims 64 and 128.
BLOCK_N = 128
STAGES = 3

if gluon is not None:
    @gluon.jit
    def _at(b, h, row, T_MAJOR: gl.constexpr):
        """TMA coordinates of a box starting at ``row`` of head ``h``, in the tensor's order."""
        if T_MAJOR:
            return (b, row, h, 0)
        else:
            return (b, h, row, 0)

    @gluon.jit
    def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready,
                kv_empty, b, h, hk, row0, n_blocks, Q_T_MAJOR: gl.constexpr,
                K_T_MAJOR: gl.constexpr, V_T_MAJOR: gl.constexpr, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr):
        for i in gl.static_range(2):
            mbarrier.expect(q_bar.index(i), q_desc.block_type.nbytes)
            _tma_load(q_desc, _at(b, h, row0 + i * 64, Q_T_MAJOR), q_bar.index(i),
                      q_smem.index(i))
        for j in range(n_blocks):
            s = j % STAGES
            mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)  # fresh: parity 1 passes
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            _tma_load(k_desc, _at(b, hk, j * BLOCK_N, K_T_MAJOR), k_ready.index(s),
                      k_smem.index(s))
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            _tma_load(v_desc, _at(b, hk, j * BLOCK_N, V_T_MAJOR), v_ready.index(s),
                      v_smem.index(s))

    @gluon.jit
    def _schedule(n_blocks, group_heads, HEAVY_LAST: gl.constexpr):
        """(block, head) of this program in a 1-d grid of ``n_blocks`` blocks per head. Heads
        are taken ``group_heads`` at a time; within a group the block index is the slow one,
        so the group's heaviest causal blocks start first, on every head at once, and its
        lightest run last: greedy dispatch then leaves a short tail. Per-head-major order (a
        2-d grid) started each head's heavy blocks late, and the last ones set the kernel's
        end (ncu, session 15: SMs idle 12% of the backward). ``group_heads`` bounds the heads
        in flight at once, whose K/V (or Q/dO) should stay in L2. ``HEAVY_LAST``: block
        ``n_blocks - 1`` is the heaviest (the forward's last query rows)."""
        pid = gl.program_id(0)
        heads = gl.num_programs(0) // n_blocks
        per_group = group_heads * n_blocks
        g = pid // per_group
        in_group = gl.minimum(group_heads, heads - g * group_heads)
        r = pid - g * per_group
        block = r // in_group
        if HEAVY_LAST:
            block = n_blocks - 1 - block
        return block, g * group_heads + r % in_group

    @gluon.jit
    def _key_blocks(first_row, TQ, TK, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """(key blocks every row of [first_row, first_row + 64) sees whole, blocks it needs)."""
        if CAUSAL:  # bottom-right aligned: row i sees keys <= i + TK - TQ
            off = TK - TQ
            last_row = gl.minimum(first_row + 63, TQ - 1)  # rows past TQ: as the last real one
            n_full = (gl.minimum(first_row, TQ - 1) + off + 1) // BLOCK_N
            n_mine = gl.cdiv(last_row + off + 1, BLOCK_N)
        else:
            n_full = TK // BLOCK_N
            n_mine = gl.cdiv(TK, BLOCK_N)
        return n_full, n_mine

    @gluon.jit
    def _sigmoid(x):  # as tl.sigmoid (Gluon has none)
        return 1.0 / (1.0 + gl.exp(-x))

    @gluon.jit
    def _masked(qk, j, rows, cols0, TQ, TK, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        cols = gl.expand_dims(j * BLOCK_N + cols0, 0)
        vis = cols < TK
        if CAUSAL:
            vis = vis & (cols <= gl.expand_dims(rows, 1) + (TK - TQ))
        return gl.where(vis, qk, float("-inf"))

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, o_desc,
                  LSE, GATE, stride_gb, stride_gh, stride_gm, stride_gd, qk_scale,
                  b, h, row0, lse_row0, TQ, TK,
                  WG: gl.constexpr, D: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL: gl.constexpr, O_T_MAJOR: gl.constexpr,
                  HAS_GATE: gl.constexpr, GATE_HEADWISE: gl.constexpr):
        dtype: gl.constexpr = o_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

        first_row = row0 + WG * 64
        n_full, n_mine = _key_blocks(first_row, TQ, TK, BLOCK_N, CAUSAL)
        _, n_other = _key_blocks(row0 + (1 - WG) * 64, TQ, TK, BLOCK_N, CAUSAL)
        rows = first_row + gl.arange(0, 64, layout=row_s)
        cols0 = gl.arange(0, BLOCK_N, layout=col_s)
        zero_s = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([64, D], gl.float32, o_layout)
        q_tile = q_smem.index(WG)
        q = q_tile.reshape([64, D])  # drop the unit dims of the 4-d TMA box
        mbarrier.wait(q_bar.index(WG), 0)

        # key block 0 alone: the loop below overlaps softmax_j with P_{j-1}·V
        mbarrier.wait(k_ready.index(0), 0)
        k0 = k_smem.index(0).reshape([BLOCK_N, D])
        qk = warpgroup_mma(q, k0.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(0, deps=(qk, ))
        if n_full == 0:
            qk = _masked(qk, 0, rows, cols0, TQ, TK, BLOCK_N, CAUSAL)
        m_i = gl.max(qk, 1) * qk_scale
        p = gl.exp2(qk * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, 1)
        p16 = gl.convert_layout(p.to(dtype), p_layout)

        for j in range(1, n_mine):
            s = j % STAGES
            sp = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(s), (j // STAGES) & 1)
            # my turn at the tensor cores: warpgroup 0 first, then alternating
            mbarrier.wait(turn.index(WG), ((j - 1) & 1) ^ (1 - WG))
            kj = k_smem.index(s).reshape([BLOCK_N, D])
            qk = warpgroup_mma(q, kj.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(sp), ((j - 1) // STAGES) & 1)
            vp = v_smem.index(sp).reshape([BLOCK_N, D])
            acc = warpgroup_mma(p16, vp, acc, is_async=True)
            mbarrier.arrive(turn.index(1 - WG), count=1)
            qk = warpgroup_mma_wait(1, deps=(qk, ))  # QKᵀ_j done; P_{j-1}·V may still run
            if j >= n_full:
                qk = _masked(qk, j, rows, cols0, TQ, TK, BLOCK_N, CAUSAL)
            m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
            p = gl.exp2(qk * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 1)
            acc, p16 = warpgroup_mma_wait(0, deps=(acc, p16))
            mbarrier.arrive(kv_empty.index(sp), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p16 = gl.convert_layout(p.to(dtype), p_layout)
            m_i = m_new
        # the other warpgroup may need more blocks: keep passing it turns (its waits must pair)
        for j in range(n_mine, n_other):
            mbarrier.wait(turn.index(WG), ((j - 1) & 1) ^ (1 - WG))
            mbarrier.arrive(turn.index(1 - WG), count=1)
        sl = (n_mine - 1) % STAGES
        mbarrier.wait(v_ready.index(sl), ((n_mine - 1) // STAGES) & 1)
        vl = v_smem.index(sl).reshape([BLOCK_N, D])
        acc = warpgroup_mma(p16, vl, acc, is_async=True)
        acc, p16 = warpgroup_mma_wait(0, deps=(acc, p16))
        mbarrier.arrive(kv_empty.index(sl), count=1)

        # epilogue: every row saw a key (causal needs Tq <= Tk), so l > 0
        gl.store(LSE + lse_row0 + rows, m_i + gl.log2(l_i), mask=rows < TQ)
        o = acc * gl.expand_dims(gl.convert_layout(1.0 / l_i, row_o), 1)
        if HAS_GATE:
            rows_o = first_row + gl.arange(0, 64, layout=row_o)
            g_base = GATE + b.to(gl.int64) * stride_gb + h.to(gl.int64) * stride_gh
            if GATE_HEADWISE:
                g = gl.load(g_base + rows_o.to(gl.int64) * stride_gm, mask=rows_o < TQ, other=0.0)
                o = o * gl.expand_dims(_sigmoid(g.to(gl.float32)), 1)
            else:
                cols_o = gl.arange(0, D, layout=col_o)
                g_off = gl.expand_dims(rows_o.to(gl.int64) * stride_gm, 1) \
                    + gl.expand_dims(cols_o.to(gl.int64) * stride_gd, 0)
                g = gl.load(g_base + g_off, mask=gl.expand_dims(rows_o < TQ, 1), other=0.0)
                o = o * _sigmoid(g.to(gl.float32))
        q.store(o.to(dtype))  # Q is read no more: its tile stages the output for the TMA store
        fence_async_shared()
        o_tile = q.reshape(o_desc.block_type.shape)  # the 4-d box of out (its own T/H order)
        _tma_store(o_desc, _at(b, h, first_row, O_T_MAJOR), o_tile)
        tma.store_wait(0)

    @gluon.jit
    def _attn_fwd_sm90(q_desc, k_desc, v_desc, o_desc, LSE, GATE,
                       stride_gb, stride_gh, stride_gm, stride_gd, qk_scale, TQ, TK, H, GROUP,
                       GROUP_HEADS,
                       D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       CAUSAL: gl.constexpr, Q_T_MAJOR: gl.constexpr, K_T_MAJOR: gl.constexpr,
                       V_T_MAJOR: gl.constexpr, O_T_MAJOR: gl.constexpr, HAS_GATE: gl.constexpr,
                       GATE_HEADWISE: gl.constexpr):
        pid_m, bh = _schedule(gl.cdiv(TQ, 128), GROUP_HEADS, True)  # longest causal rows first
        b = bh // H
        h = bh % H
        hk = h // GROUP
        row0 = pid_m * 128
        _, n_blocks = _key_blocks(row0 + 64, TQ, TK, BLOCK_N, CAUSAL)  # the later warpgroup's
        dtype: gl.constexpr = q_desc.dtype

        q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape,
                                           k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape,
                                           v_desc.layout)
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

        lse_row0 = bh.to(gl.int64) * TQ
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        # (the two consumers' argument tuples are spelled out: a tuple built by concatenation
        # inside a Gluon kernel turns its constexprs into tensors)
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, o_desc,
                         LSE, GATE, stride_gb, stride_gh, stride_gm, stride_gd, qk_scale,
                         b, h, row0, lse_row0, TQ, TK, WG0, D, BLOCK_N, STAGES, CAUSAL,
                         O_T_MAJOR, HAS_GATE, GATE_HEADWISE)),
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, o_desc,
                         LSE, GATE, stride_gb, stride_gh, stride_gm, stride_gd, qk_scale,
                         b, h, row0, lse_row0, TQ, TK, WG1, D, BLOCK_N, STAGES, CAUSAL,
                         O_T_MAJOR, HAS_GATE, GATE_HEADWISE)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready,
                       kv_empty, b, h, hk, row0, n_blocks, Q_T_MAJOR, K_T_MAJOR, V_T_MAJOR,
                       BLOCK_N, STAGES)),
        ], [4, 1], [232, 40])


def _t_major(x: torch.Tensor) -> bool:
    """Whether a [B, H, T, D] view is laid out as [B, T, H, D] (the projection's own layout)."""
    return x.stride(2) > x.stride(1)


@functools.lru_cache(maxsize=64)
def _smem_layout(box: tuple, dtype: torch.dtype):
    # a constexpr_function: its host call unwraps every argument (µs), so once per box
    gl_dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16,
                torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(box), gl_dtype)


def _box(x: torch.Tensor, rows: int):
    """``x`` [B, H, T, D] as the 4-d tensor in its memory order (shape, strides), and the TMA box
    of ``rows`` rows of one head in that order."""
    (b, h, t, d), (sb, sh, st, sd) = x.shape, x.stride()
    if st > sh:  # (as _t_major) a [B, T, H, D] buffer
        return [b, t, h, d], [sb, st, sh, sd], (1, rows, 1, d)
    return [b, h, t, d], [sb, sh, st, sd], (1, 1, rows, d)


def _descriptor(x: torch.Tensor, rows: int, checked: bool = True):
    """A TMA descriptor over ``x`` (see :func:`_box`). ``checked=False``: a :class:`_Descriptor`
    without ``TensorDescriptor``'s checks (nor a permuted view: the launcher reads only the
    base's address), for a call whose exact key was seen (same dtype, shapes and strides as one
    that passed them)."""
    shape, strides, box = _box(x, rows)
    layout = _smem_layout(box, x.dtype)
    if checked:
        base = x.transpose(1, 2) if _t_major(x) else x  # the tensor TMA reads, in its order
        return TensorDescriptor(base, shape, strides, list(box), layout)
    return _Descriptor(x, shape, strides, list(box), layout)


class _Descriptor:
    """What the launcher reads of a ``TensorDescriptor`` (base, shape, strides, padding)."""
    __slots__ = ("base", "shape", "strides", "block_shape", "layout", "padding")

    def __init__(self, base, shape, strides, block_shape, layout):
        self.base, self.shape, self.strides = base, shape, strides
        self.block_shape, self.layout, self.padding = block_shape, layout, "zero"


def _tma_ready(x: torch.Tensor) -> bool:
    """TMA's rules: unit stride along D, other strides and the base 16-byte aligned, and the
    three outer strides ordered (b outermost), so the box walks T within one head."""
    es = x.element_size()
    sb, sh, st, sd = x.stride()
    if sd != 1 or x.data_ptr() % 16:
        return False
    if any(s <= 0 or (s * es) % 16 for s in (sb, sh, st)):  # (broadcast views: stride 0)
        return False
    inner = sorted((sh, st), reverse=True)
    return x.shape[0] == 1 or sb >= inner[0]


@functools.lru_cache(maxsize=None)
def _capability(device: int) -> tuple:
    return torch.cuda.get_device_capability(device)


def unsupported_reason(q, k, v, gate, bias, key_mask, causal, window, chunk,
                       scale=1.0) -> str | None:
    """Why the Gluon forward does not take this call (None: it does)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if FORWARD.disabled:
        return FORWARD.disabled
    return _uncovered(q, k, v, bias, key_mask, causal, window, chunk, scale) or (
        f"gate dtype {gate.dtype}" if gate is not None and gate.dtype not in (q.dtype, torch.float32)
        else None)


def _uncovered(q, k, v, bias, key_mask, causal, window, chunk, scale) -> str | None:
    """What neither Gluon kernel covers (the forward's and the backward's common ground)."""
    if not q.is_cuda or _capability(q.device.index) != (9, 0):
        return "not an sm_90 (Hopper) GPU"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (bf16/fp16 only)"
    if q.shape[3] not in (64, 128) or v.shape[3] != q.shape[3]:
        return f"head dims {q.shape[3]}/{v.shape[3]} (64 or 128, equal)"
    if bias is not None or key_mask is not None or window > 0 or chunk > 0:
        return "bias, key mask, window or chunk (the Triton kernel has them)"
    if causal and q.shape[2] > k.shape[2]:
        return "causal with Tq > Tk (rows without keys)"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "empty"
    if q.shape[0] * q.shape[1] * q.shape[2] > 2**31 - 1:
        return "more than 2**31 - 1 query rows in all (the grid's size)"
    if not all(_tma_ready(x) for x in (q, k, v)):
        return "strides TMA cannot address"
    if not scale > 0:  # masks are -inf before the scale, and the row max assumes it positive
        return f"scale {scale} (positive only)"
    return None


def attention_forward(q, k, v, out, lse, gate, gate_strides, headwise, scale, causal) -> None:
    """Write ``out`` ([B, H, Tq, D] view of a [B, Tq, H, D] buffer) and ``lse`` ([B, H, Tq],
    base 2) for a call :func:`unsupported_reason` accepted."""
    forward_plan(q, k, v, out, gate, gate_strides, headwise, scale, causal)(q, k, v, out, lse,
                                                                            gate)


def forward_plan(q, k, v, out, gate, gate_strides, headwise, scale, causal):
    """:func:`attention_forward` for every call like this one (tensors of the same shapes,
    strides, dtypes, device and 16-byte alignment; ``lse`` fresh fp32 [B, H, Tq]): returns
    ``run(q, k, v, out, lse, gate)``, which holds no tensor."""
    B, H, TQ, D = q.shape
    HK, TK = k.shape[1], k.shape[2]
    tail = (*gate_strides, scale * 1.4426950408889634, TQ, TK, H, H // HK,
            group_heads(B * H, H // HK, 2 * TK * D * k.element_size(), causal))
    g_dtype = gate.dtype if gate is not None else torch.float32  # (lse stands in: fp32)
    exact = (bool(causal), headwise, gate is None, g_dtype, gate_strides)
    consts = dict(D=D, BLOCK_N=BLOCK_N, STAGES=STAGES, CAUSAL=bool(causal),
                  Q_T_MAJOR=_t_major(q), K_T_MAJOR=_t_major(k), V_T_MAJOR=_t_major(v),
                  O_T_MAJOR=_t_major(out), HAS_GATE=gate is not None, GATE_HEADWISE=headwise)
    bound = FORWARD.bind((launch.cdiv(TQ, BLOCK_M) * B * H, 1), q.device.index, exact,
                         lambda: consts)

    def run(q, k, v, out, lse, gate):
        bound(((q, HALF), (k, BLOCK_N), (v, BLOCK_N), (out, HALF)),
              (lse, gate if gate is not None else lse, *tail))
    return run


def plan_switches() -> tuple:
    """This module's settings a call plan's decisions read (``flash._switches``)."""
    return FORWARD, L2_BUDGET, BLOCK_M, BLOCK_N, STAGES


# L2 bytes the heads in flight may fill with what each program streams (K/V in the forward,
# Q/dO in the backward): about half of an H100's/H200's 50 MB, so some survives the others'
# traffic. None: every head in one group (the plain heaviest-first order).
L2_BUDGET: int | None = 24 << 20


def group_heads(heads: int, group: int, streamed_bytes: int, causal: bool = True) -> int:
    """How many heads :func:`_schedule` takes at a time: causal, as many whole GQA groups
    (``group`` query heads share one kv head's ``streamed_bytes``) as fit :data:`L2_BUDGET`,
    at least one group. Not causal, one group: every block of a head is equally heavy, and a
    head at a time keeps the most of its stream in L2 (grouping by L2 cost 4% forward and 3%
    backward at T=4096, ``results/attention-schedule-nvidia-h200.txt``)."""
    if not causal:
        return group
    if L2_BUDGET is None:
        return heads
    return max(1, min(heads // group, L2_BUDGET // max(streamed_bytes, 1))) * group


class GluonLaunch:
    """Launches of one Gluon kernel that skip Triton's JIT path (~0.25 ms of host time per call
    for these kernels), as ``launch.Launcher`` does for the Triton kernels, which it cannot
    serve here: descriptors are built per call and are no cache key. Two caches: an exact key
    (the descriptors' dtypes, shapes and strides, every tensor's 16-byte alignment, plus the
    caller's own key: one tuple hash, and no descriptor checks), then a fine key (what Triton
    specializes on), before compiling. An exact hit also reuses each descriptor's encoding
    where the address repeats (:class:`_EncodedLaunch`, on Triton 3.6's launcher).

    A compile failure (a Triton whose Gluon API moved) sets :attr:`disabled` (the reason, with
    a warning) and raises :class:`Declined`; the caller then runs the Triton kernels, for that
    call and every later one."""

    def __init__(self, kernel, name: str, num_warps: int):
        # ``kernel()`` returns the @gluon.jit function (looked up per compile: tests substitute it)
        self.kernel, self.name, self.num_warps = kernel, name, num_warps
        self.disabled: str | None = None
        self.exact: dict = {}
        self.kernels: dict = {}  # fine key -> (compiled kernel, its _EncodedLaunch or None)
        self._knobs = launch._triton_runtime_knobs()

    def __call__(self, grid, device, tensors, args, exact, consts):
        """``tensors``: (tensor, box rows) per descriptor parameter, in order; ``args``: the
        other runtime parameters; ``exact``: what else the constexprs depend on (a tuple);
        ``consts()``: the constexprs, by name. Returns the exact cache's entry for the call
        (None where caching is off)."""
        cached = launch.CACHED and not launch.hooks_installed(self._knobs)
        key = (device, exact, *((t.dtype, t.shape, t.stride(), t.data_ptr() & 15)
                                for t, _ in tensors),
               tuple(a.data_ptr() & 15 == 0 for a in args if isinstance(a, torch.Tensor)))
        hit = self.exact.get(key) if cached else None
        if hit is not None:
            _run_entry(hit, grid, device, tensors, args)
            return hit
        descs = [_descriptor(t, rows) for t, rows in tensors]
        cs = consts()
        values = tuple(cs.values())
        fine = (device, values, tuple(_desc_key(d) for d in descs),
                tuple(launch._arg_key(a) for a in args))
        found = self.kernels.get(fine) if cached else None
        if found is None:
            kernel = self._compile_and_run(grid, device, descs, args, cs)
            if not cached:
                return None
            found = self.kernels[fine] = (kernel, _EncodedLaunch.make(kernel, len(tensors)))
        else:
            _run(found[0], grid, device, descs, args, values)
        if len(self.exact) >= 4096:  # a model calls at a few shapes; a sweep starts over
            self.exact.clear()
        entry = self.exact[key] = (found[0], values, found[1])
        return entry

    def bind(self, grid, device, exact, consts) -> "BoundGluonLaunch":
        """This kernel's launches for a call plan, whose key holds all the exact key reads
        (see :class:`BoundGluonLaunch`)."""
        return BoundGluonLaunch(self, grid, device, exact, consts)

    def _compile_and_run(self, grid, device, descs, args, consts):
        """Triton's JIT launch, which compiles this specialization."""
        try:
            with _on(device):
                return self.kernel()[grid](*descs, *args, **consts, num_warps=self.num_warps)
        except (CompilationError, TypeError, AttributeError) as e:
            self.disabled = f"{self.name} failed to compile ({type(e).__name__}: {e})"
            warnings.warn(self.disabled + "; the Triton kernels take every call", stacklevel=4)
            raise Declined from e


FORWARD = GluonLaunch(lambda: _attn_fwd_sm90, "the Gluon forward", num_warps=4)
# False: exact hits encode their descriptors again through Triton's launcher (to compare)
ENCODE_ONCE = True


class _EncodedLaunch:
    """A compiled kernel's launch with each TMA descriptor encoded once per (parameter, address,
    shape, strides), not at every call.

    Triton's launcher (``CudaLauncher`` → ``wrap_handle_tensordesc``) encodes every descriptor
    of every call (``make_tensordesc_arg`` → ``cuTensorMapEncodeTiled``): µs each, seven per
    backward, while a training loop hands the kernel the same few addresses step after step
    (PyTorch's caching allocator). The encoding is kept per kernel parameter: the compiled
    kernel fixes each one's dtype and swizzle, and a map describes address, shape and strides
    only, not what the memory holds. Built only where the launcher is laid out as in Triton 3.6
    (the device's): a closure over the C ``launch`` and the descriptors' metadata, leading
    descriptor parameters, no global or profile scratch. Elsewhere :meth:`make` returns None
    and every launch takes :func:`_run`, Triton's own path."""

    __slots__ = ("c_launch", "base", "meta", "encode", "maps")
    _MAPS = 1024  # encodings kept per kernel; past that the cache starts over

    def __init__(self, c_launch, base, meta, encode):
        self.c_launch, self.base, self.meta, self.encode = c_launch, base, meta, encode
        self.maps: dict = {}

    @classmethod
    def make(cls, kernel, n_desc: int, driver=None) -> "_EncodedLaunch | None":
        try:
            if driver is None:
                from triton.backends.nvidia import driver
            base = launch.launch_leading_args(kernel, driver)
            inner = kernel.run.launch
            cells = dict(zip(inner.__code__.co_freevars,
                             (c.cell_contents for c in inner.__closure__)))
            c_launch, meta = cells["launcher"], list(cells["tensordesc_meta"])
            laid_out = (base is not None
                        and set(cells["tensordesc_indices"]) == set(range(n_desc))
                        and len(meta) == n_desc and all(isinstance(m, dict) for m in meta))
            encode = driver.make_tensordesc_arg
        except (AttributeError, KeyError, TypeError, ImportError):
            return None
        return cls(c_launch, base, meta, encode) if laid_out else None

    def __call__(self, grid, device, tensors, args, consts) -> None:
        maps, flat = self.maps, []
        for i, (t, rows) in enumerate(tensors):
            key = (i, t.data_ptr(), t.shape, t.stride(), rows)
            enc = maps.get(key)
            if enc is None:
                if len(maps) >= self._MAPS:
                    maps.clear()
                enc = maps[key] = tuple(self.encode(_descriptor(t, rows, checked=False),
                                                    self.meta[i]))
            flat += enc
        # the C launch's leading arguments: grid, stream, function, cooperative, pdl, global and
        # profile scratch, metadata, launch metadata and hooks (none: hooks take Triton's path)
        f, coop, pdl, gs, ps, packed, lm, enter, exit_ = self.base
        with _on(device):
            self.c_launch(grid[0], grid[1], 1, launch._current_stream(device), f, coop, pdl, gs,
                          ps, packed, lm, enter, exit_, *flat, *args, *consts)


class BoundGluonLaunch:
    """One Gluon kernel's launches for a call plan (as ``launch.BoundLaunch`` for the Triton
    kernels): after the first call, which goes through :class:`GluonLaunch` (and may raise
    :class:`Declined`), each call runs the exact entry it returned without building the key."""

    __slots__ = ("launcher", "grid", "device", "exact", "consts", "hit")

    def __init__(self, launcher: GluonLaunch, grid, device, exact, consts):
        self.launcher, self.grid, self.device = launcher, grid, device
        self.exact, self.consts, self.hit = exact, consts, None

    def __call__(self, tensors, args) -> None:
        hit = self.hit
        if hit is None or not launch.CACHED or launch.hooks_installed(self.launcher._knobs):
            self.hit = self.launcher(self.grid, self.device, tensors, args, self.exact,
                                     self.consts)
            return
        _run_entry(hit, self.grid, self.device, tensors, args)


def _run_entry(entry, grid, device, tensors, args) -> None:
    """Launch from an exact cache entry: encoded descriptors where the launch keeps them."""
    kernel, values, encoded = entry
    if encoded is not None and ENCODE_ONCE:
        return encoded(grid, device, tensors, args, values)
    descs = [_descriptor(t, rows, checked=False) for t, rows in tensors]
    return _run(kernel, grid, device, descs, args, values)


def _run(kernel, grid, device, descs, args, consts) -> None:
    """The compiled kernel's own launcher (every parameter in order, constexprs last)."""
    with _on(device):
        kernel.run(grid[0], grid[1], 1, launch._current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *descs, *args, *consts)


def _desc_key(d) -> tuple:
    """What a descriptor argument contributes to the specialization: dtype, box, and
    its shape and strides as Triton keys ints (value 1, divisibility by 16)."""
    return (d.base.dtype, tuple(d.block_shape),  # (the layout follows from these)
            tuple(launch._arg_key(int(n)) for n in d.shape),
            tuple(launch._arg_key(int(n)) for n in d.strides))


def _on(device: int):
    """The device's context (a kernel's handle belongs to the device it was loaded on)."""
    if device == launch._current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class Declined(Exception):
    """The Gluon launch failed before running: the caller runs the Triton kernel instead."""
