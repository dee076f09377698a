"""Triton kernels for act(a) * b: forward and backward, on separate tensors or a packed [..., 2F].

Layout: every operand is seen as a 2-D [M, N] matrix with unit column stride and an arbitrary row
stride, so the two halves of a packed tensor are plain views (``x[..., :F]``, ``x[..., F:]``) and
nothing is copied. When every operand is contiguous the launch is a flat 1-D one (no row math).
A tensor whose last dimension is not unit-stride, or whose leading dimensions do not collapse to
one row stride, is made contiguous first (the only copy, and only when needed).

Arithmetic is float32 (loads are upcast, stores round once), which is also what keeps the
interpreter right for bfloat16. The backward recomputes act(a) from a: only a and b are saved.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..device import interpreting, triton_device_reason
from ..launch import cdiv, launcher, next_pow2
from .naive import ACTIVATIONS

ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}  # silu 0, gelu 1, gelu_tanh 2, sigmoid 3, relu 4
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Every output the kernels write is allocated here (tests swap in a NaN-filled allocator to check
# that each element is written).
_alloc = torch.empty


def triton_unsupported_reason(*tensors, act: str = "silu") -> str | None:
    """None when the Triton GLU kernels take these tensors, else a sentence saying why not.

    Looks at dtype and device only, so FakeTensors work. ``None`` entries (a missing bias) are
    skipped. CPU tensors are accepted only under ``TRITON_INTERPRET=1``.
    """
    if act not in ACTIVATIONS:
        return f"activation {act!r} unknown; expected one of {', '.join(ACTIVATIONS)}"
    present = [t for t in tensors if t is not None]
    for t in present:
        if t.dtype not in _TRITON_DTYPES:
            return f"{str(t.dtype).replace('torch.', '')} unsupported by the Triton GLU kernel"
    return triton_device_reason(*present, kernel="GLU")


# ---------------------------------------------------------------------------------------------
# Activation and its derivative (float32 in, float32 out)
# ---------------------------------------------------------------------------------------------


# Only builtins below (no tl.sigmoid / tl.cdiv / tl.zeros, which are themselves @triton.jit
# functions): those are decorated when triton is first imported, so if triton was imported before
# TRITON_INTERPRET was set they are compiled-mode functions that an interpreted kernel cannot call.


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0.0, r, e * r)


@triton.jit
def _tanh(x):
    # tl.math.tanh is missing from some Triton releases: (1 − e)/(1 + e) with e = exp(−2|x|).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0.0, t, -t)


@triton.jit
def act_fwd(a, ACT: tl.constexpr):
    if ACT == 0:  # silu
        out = a * _sigmoid(a)
    elif ACT == 1:  # gelu (erf)
        out = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 2:  # gelu (tanh approximation)
        out = 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))
    elif ACT == 3:  # sigmoid
        out = _sigmoid(a)
    else:  # relu
        out = tl.where(a > 0.0, a, 0.0)
    return out


@triton.jit
def act_fwd_bwd(a, ACT: tl.constexpr):
    """(act(a), act'(a))."""
    if ACT == 0:
        s = _sigmoid(a)
        out = a * s
        d = s * (1.0 + a * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        out = a * cdf
        d = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a))
        out = 0.5 * a * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.134145 * a * a))
    elif ACT == 3:
        out = _sigmoid(a)
        d = out * (1.0 - out)
    else:
        pos = a > 0.0
        out = tl.where(pos, a, 0.0)
        d = tl.where(pos, 1.0, 0.0)
    return out, d


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@launcher
@triton.jit
def _glu_fwd_flat(a_ptr, b_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr,
                  EVEN: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if EVEN:
        a = tl.load(a_ptr + offs)
        b = tl.load(b_ptr + offs)
    else:
        mask = offs < n
        a = tl.load(a_ptr + offs, mask=mask, other=0.0)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    y = act_fwd(a.to(tl.float32), ACT) * b.to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    if EVEN:
        tl.store(y_ptr + offs, y)
    else:
        tl.store(y_ptr + offs, y, mask=mask)


@launcher
@triton.jit
def _glu_fwd_2d(a_ptr, b_ptr, y_ptr, M, N, stride_a, stride_b, stride_y,
                ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN: tl.constexpr):
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_ptrs = a_ptr + rows[:, None] * stride_a + cols[None, :]
    b_ptrs = b_ptr + rows[:, None] * stride_b + cols[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_y + cols[None, :]
    if EVEN:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        a = tl.load(a_ptrs, mask=mask, other=0.0)
        b = tl.load(b_ptrs, mask=mask, other=0.0)
    y = act_fwd(a.to(tl.float32), ACT) * b.to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    if EVEN:
        tl.store(y_ptrs, y)
    else:
        tl.store(y_ptrs, y, mask=mask)


@launcher
@triton.jit
def _glu_bwd_flat(dy_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr,
                  EVEN: tl.constexpr, I64: tl.constexpr):
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if EVEN:
        dy = tl.load(dy_ptr + offs)
        a = tl.load(a_ptr + offs)
        b = tl.load(b_ptr + offs)
    else:
        mask = offs < n
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    s, ds = act_fwd_bwd(a.to(tl.float32), ACT)
    da = (dy * b.to(tl.float32) * ds).to(da_ptr.dtype.element_ty)
    db = (dy * s).to(db_ptr.dtype.element_ty)
    if EVEN:
        tl.store(da_ptr + offs, da)
        tl.store(db_ptr + offs, db)
    else:
        tl.store(da_ptr + offs, da, mask=mask)
        tl.store(db_ptr + offs, db, mask=mask)


@launcher
@triton.jit
def _glu_bwd_2d(dy_ptr, a_ptr, b_ptr, da_ptr, db_ptr, M, N,
                stride_dy, stride_a, stride_b, stride_da, stride_db,
                ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN: tl.constexpr):
    pid = tl.program_id(0)
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dy_ptrs = dy_ptr + rows[:, None] * stride_dy + cols[None, :]
    a_ptrs = a_ptr + rows[:, None] * stride_a + cols[None, :]
    b_ptrs = b_ptr + rows[:, None] * stride_b + cols[None, :]
    da_ptrs = da_ptr + rows[:, None] * stride_da + cols[None, :]
    db_ptrs = db_ptr + rows[:, None] * stride_db + cols[None, :]
    if EVEN:
        dy = tl.load(dy_ptrs)
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        dy = tl.load(dy_ptrs, mask=mask, other=0.0)
        a = tl.load(a_ptrs, mask=mask, other=0.0)
        b = tl.load(b_ptrs, mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    s, ds = act_fwd_bwd(a.to(tl.float32), ACT)
    da = (dy * b.to(tl.float32) * ds).to(da_ptr.dtype.element_ty)
    db = (dy * s).to(db_ptr.dtype.element_ty)
    if EVEN:
        tl.store(da_ptrs, da)
        tl.store(db_ptrs, db)
    else:
        tl.store(da_ptrs, da, mask=mask)
        tl.store(db_ptrs, db, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

_NUM_WARPS = 4
_VECTORS_PER_THREAD = 4  # 16-byte vectors per thread per operand


def _block_elems(*tensors: torch.Tensor) -> int:
    """Elements per program: num_warps·32 threads × 4 vectors × (16 bytes / element size)."""
    elsize = max(t.element_size() for t in tensors)
    return _NUM_WARPS * 32 * _VECTORS_PER_THREAD * max(1, 16 // elsize)


def _flat_config(n: int, block: int) -> tuple[int, bool]:
    block = min(block, next_pow2(max(n, 1)))
    return block, n % block == 0


def _tile_config(M: int, N: int, block: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, EVEN) for an [M, N] launch with about `block` elements per program.

    BLOCK_N divides N when a power of two ≥ 128 does (no column masks), else covers it."""
    if N >= block:
        bn = block
        while bn >= 128 and N % bn:
            bn //= 2
        if bn < 128:
            bn = block
    else:
        bn = next_pow2(N)
    bm = max(1, block // bn)
    bm = min(bm, next_pow2(max(M, 1)))
    return bm, bn, (M % bm == 0 and N % bn == 0)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [M, N] view with unit column stride; copies only when no such view exists."""
    n = t.shape[-1] if t.dim() else 1
    if t.dim() == 0:
        t = t.reshape(1)
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()
    m = math.prod(t.shape[:-1])
    try:
        v = t.view(m, n)
    except RuntimeError:
        v = t.contiguous().view(m, n)
    return v  # when n == 1 the column stride is never used


def _row_stride(v: torch.Tensor) -> int:
    return v.stride(0) if v.shape[0] > 1 else v.shape[1]


def _all_flat(*ts: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in ts)


# ---------------------------------------------------------------------------------------------
# Launchers: forward
# ---------------------------------------------------------------------------------------------


def _launch_fwd(a2: torch.Tensor, b2: torch.Tensor, y2: torch.Tensor, act: str) -> None:
    """y2 = act(a2) * b2 on [M, N] views with unit column stride."""
    M, N = a2.shape
    if M * N == 0:
        return
    code = ACT_CODES[act]
    block = _block_elems(a2, b2, y2)
    if _all_flat(a2, b2, y2):
        n = M * N
        blk, even = _flat_config(n, block)
        _glu_fwd_flat[(cdiv(n, blk),)](a2, b2, y2, n, ACT=code, BLOCK=blk, EVEN=even,
                                       I64=n + blk >= 2**31, num_warps=_NUM_WARPS)
        return
    bm, bn, even = _tile_config(M, N, block)
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    _glu_fwd_2d[grid](a2, b2, y2, M, N, _row_stride(a2), _row_stride(b2), _row_stride(y2),
                      ACT=code, BLOCK_M=bm, BLOCK_N=bn, EVEN=even, num_warps=_NUM_WARPS)


def glu_fwd(a: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
    """act(a) * b with the Triton kernel; output contiguous, dtype a.dtype."""
    y = _alloc(a.shape, dtype=a.dtype, device=a.device)
    _launch_fwd(as_rows(a), as_rows(b), as_rows(y), act)
    return y


def glu_packed_fwd(x: torch.Tensor, act: str, gate_first: bool = True) -> torch.Tensor:
    """glu over the two halves of x [..., 2F], read in place by offset."""
    F2 = x.shape[-1]
    F = F2 // 2
    y = _alloc((*x.shape[:-1], F), dtype=x.dtype, device=x.device)
    x2 = as_rows(x)
    first, second = x2[:, :F], x2[:, F:]
    gate, value = (first, second) if gate_first else (second, first)
    _launch_fwd(gate, value, as_rows(y), act)
    return y


# ---------------------------------------------------------------------------------------------
# Launchers: backward
# ---------------------------------------------------------------------------------------------


def _launch_bwd(dy2, a2, b2, da2, db2, act: str) -> None:
    M, N = a2.shape
    if M * N == 0:
        return
    code = ACT_CODES[act]
    block = _block_elems(dy2, a2, b2, da2, db2)
    if _all_flat(dy2, a2, b2, da2, db2):
        n = M * N
        blk, even = _flat_config(n, block)
        _glu_bwd_flat[(cdiv(n, blk),)](dy2, a2, b2, da2, db2, n, ACT=code, BLOCK=blk,
                                       EVEN=even, I64=n + blk >= 2**31, num_warps=_NUM_WARPS)
        return
    bm, bn, even = _tile_config(M, N, block)
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    _glu_bwd_2d[grid](dy2, a2, b2, da2, db2, M, N,
                      _row_stride(dy2), _row_stride(a2), _row_stride(b2),
                      _row_stride(da2), _row_stride(db2),
                      ACT=code, BLOCK_M=bm, BLOCK_N=bn, EVEN=even, num_warps=_NUM_WARPS)


def glu_bwd(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, act: str):
    """(da, db) of y = act(a) * b; outputs contiguous in a's and b's dtypes."""
    da = _alloc(a.shape, dtype=a.dtype, device=a.device)
    db = _alloc(b.shape, dtype=b.dtype, device=b.device)
    _launch_bwd(as_rows(dy), as_rows(a), as_rows(b), as_rows(da), as_rows(db), act)
    return da, db


def glu_packed_bwd(dy: torch.Tensor, x: torch.Tensor, act: str, gate_first: bool = True,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """d x of glu_packed(x) as one [..., 2F] tensor.

    ``out`` may be x itself (or any contiguous [..., 2F] buffer): each program reads its tile of
    a and b before writing the same positions, so the in-place form is safe.
    """
    F2 = x.shape[-1]
    F = F2 // 2
    if out is None:
        out = _alloc(x.shape, dtype=x.dtype, device=x.device)
    x2 = as_rows(x)
    o2 = as_rows(out)
    if out.data_ptr() == x.data_ptr() and x2.data_ptr() != x.data_ptr():
        raise ValueError("glu_packed_bwd: in-place output needs x with a unit-stride row view")
    first, second = x2[:, :F], x2[:, F:]
    d_first, d_second = o2[:, :F], o2[:, F:]
    if gate_first:
        _launch_bwd(as_rows(dy), first, second, d_first, d_second, act)
    else:
        _launch_bwd(as_rows(dy), second, first, d_second, d_first, act)
    return out
