"""Fused gate/up projection with a GLU epilogue: y = act(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u).

W is packed [2F, d] (rows [0, F) gate, rows [F, 2F) up). Each program owns one [BLOCK_M, BLOCK_N]
tile of y and accumulates the matching gate tile and up tile in two float32 accumulators over the
same x tiles (x is read once for both), applies the GLU in the epilogue, and writes y once;
optionally it also writes the pre-activation h = [g u] ([M, 2F]) for a backward that does not
recompute it. Tile order is grouped (GROUP_M swizzle) for L2 reuse of W; a persistent variant
loops over tiles with one program per SM.

The backward is not here: it is two cuBLAS matmuls around the elementwise backward (see op.py).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import elementwise
from ..device import interpreting
from ..launch import cdiv, launcher, next_pow2
from .elementwise import ACT_CODES, act_fwd


def _alloc(*args, **kwargs):
    return elementwise._alloc(*args, **kwargs)


@triton.jit
def _glu_linear_tile(tile, x_ptr, w_ptr, bias_ptr, y_ptr, h_ptr, M, F, K,
                     stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_hm,
                     num_pid_m, num_pid_n,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    # Grouped ordering: GROUP_M row-blocks sweep the columns together, so a W tile is reused
    # from L2 by GROUP_M programs.
    group_size = GROUP_M * num_pid_n
    group_id = tile // group_size
    first_m = group_id * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((tile % group_size) % group_m)
    pid_n = (tile % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap around (valid addresses, results masked at the store).
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % F).to(tl.int64)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wg_ptrs = w_ptr + rn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    wu_ptrs = w_ptr + (rn + F)[None, :] * stride_wn + offs_k[:, None] * stride_wk

    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs)
            wu = tl.load(wu_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
            wu = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter's half-precision arithmetic is not trustworthy
            xt = xt.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(xt, wu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc_g += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        acc_u += tl.load(bias_ptr + rn + F).to(tl.float32)[None, :]
    om = offs_m.to(tl.int64)
    mask = (offs_m < M)[:, None] & (offs_n < F)[None, :]
    if STORE_H:
        h_ptrs = h_ptr + om[:, None] * stride_hm + offs_n[None, :]
        tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptrs + F, acc_u.to(h_ptr.dtype.element_ty), mask=mask)
    y = act_fwd(acc_g, ACT) * acc_u
    y_ptrs = y_ptr + om[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@launcher
@triton.jit
def _glu_linear_fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, h_ptr, M, F, K,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_hm,
                           ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_H: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, PERSISTENT: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (F + BLOCK_N - 1) // BLOCK_N
    if PERSISTENT:
        num_tiles = num_pid_m * num_pid_n
        for tile in range(pid, num_tiles, tl.num_programs(0)):
            _glu_linear_tile(tile, x_ptr, w_ptr, bias_ptr, y_ptr, h_ptr, M, F, K,
                             stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_hm,
                             num_pid_m, num_pid_n, ACT, HAS_BIAS, STORE_H,
                             BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, UPCAST, DOT_PRECISION)
    else:
        _glu_linear_tile(pid, x_ptr, w_ptr, bias_ptr, y_ptr, h_ptr, M, F, K,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_hm,
                         num_pid_m, num_pid_n, ACT, HAS_BIAS, STORE_H,
                         BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, UPCAST, DOT_PRECISION)


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    persistent: bool = False


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(M: int, F: int, K: int, dtype: torch.dtype, interpret: bool) -> MatmulConfig:
    """A short heuristic (no autotuning): big tiles on a GPU, small ones in the interpreter."""
    if interpret:
        bm = min(32, max(16, next_pow2(max(M, 1))))
        bn = min(32, max(16, next_pow2(max(F, 1))))
        bk = min(32, max(16, next_pow2(max(K, 1))))
        return MatmulConfig(bm, bn, bk, group_m=4, num_warps=4, num_stages=1)
    bk = 32 if dtype == torch.float32 else 64
    if M <= 64:  # decode-sized batches: thin row tiles, more column tiles in flight
        return MatmulConfig(max(16, next_pow2(M)), 64, bk, group_m=1, num_warps=4,
                            num_stages=4)
    if M <= 256 or F <= 256:
        return MatmulConfig(64, 128, bk, group_m=8, num_warps=4, num_stages=4)
    # Two 128x128 fp32 accumulators = a 128x256 output tile; 48 KB of operands per stage in 16-bit.
    # (the shape of Triton's tutorial H100 config 128x256x64, 3 stages, 8 warps)
    return MatmulConfig(128, 128, bk, group_m=8, num_warps=8, num_stages=3)


# Configs that compiled too large for the device are remembered shrunk (fewer stages).
_SHRUNK: dict[tuple, MatmulConfig] = {}


def glu_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str,
                   store_h: bool = False, config: MatmulConfig | None = None):
    """(y, h): y [..., F] = fused projection + GLU; h [..., 2F] pre-activation when store_h else None."""
    d = x.shape[-1]
    F2 = weight.shape[0]
    F = F2 // 2
    lead = x.shape[:-1]
    y = _alloc((*lead, F), dtype=x.dtype, device=x.device)
    h = _alloc((*lead, F2), dtype=x.dtype, device=x.device) if store_h else None
    M = math.prod(lead)
    if M == 0 or F == 0:
        return y, h
    if d == 0:  # empty contraction: the projection is the bias alone
        hz = torch.zeros((*lead, F2), dtype=torch.float32, device=x.device)
        if bias is not None:
            hz += bias.float()
        from .naive import glu_packed_reference
        y.copy_(glu_packed_reference(hz, act))
        if h is not None:
            h.copy_(hz)
        return y, h
    x2 = x.reshape(M, d)
    interpret = interpreting() or not x.is_cuda
    if config is None:
        config = default_config(M, F, d, x.dtype, interpret)
    if x.dtype == torch.float32:  # match torch's fp32 matmul setting; half inputs ignore this
        precision = "tf32" if (torch.backends.cuda.matmul.allow_tf32 and not interpret) else "ieee"
    else:
        precision = "tf32"  # Triton's default; only fp32 operands are affected
    y2 = y.view(-1, F)
    h2 = h.view(-1, F2) if store_h else y2  # dummy pointer when not stored
    bias_arg = bias if bias is not None else weight  # dummy pointer when no bias

    key = (config, x.dtype, x.device.index, store_h, bias is not None, act)
    config = _SHRUNK.get(key, config)
    while True:
        num_tiles = cdiv(M, config.block_m) * cdiv(F, config.block_n)
        if config.persistent and not interpret:
            nprog = min(num_tiles, _num_sms(x.device.index or 0))
        else:
            nprog = num_tiles
        try:
            _glu_linear_fwd_kernel[(nprog,)](
                x2, weight, bias_arg, y2, h2, M, F, d,
                x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
                y2.stride(0), h2.stride(0),
                ACT=ACT_CODES[act], HAS_BIAS=bias is not None, STORE_H=store_h,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                GROUP_M=config.group_m, EVEN_K=d % config.block_k == 0, UPCAST=interpret,
                DOT_PRECISION=precision, PERSISTENT=config.persistent and not interpret,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )
            break
        except OutOfResources:
            if config.num_stages <= 2:
                raise
            config = replace(config, num_stages=config.num_stages - 1)
            _SHRUNK[key] = config
    return y, h
