"""``gla::chunk_gla`` / ``gla::fused_recurrent_gla`` / ``gla::chunk_gla_backward``: the
torch.library ops and the public API.

``chunk_gla`` and ``fused_recurrent_gla`` validate their arguments, resolve ``impl`` and call the
op, which returns ``(o, final_state)`` (``final_state`` is an empty tensor unless requested).
Autograd (``register_autograd``) calls ``gla::chunk_gla_backward`` so compiled graphs keep
both directions opaque. ``impl`` picks the body:

* ``"triton"``: the kernels of ``chunk.py`` / ``fused_recurrent.py`` (CPU tensors: interpreter);
* ``"reference"``: :func:`naive.gla_chunk_reference`, backward by recompute under autograd.

The ops allocate fresh outputs and never sync with the host (the reference path does, through
``cu_seqlens.tolist()``; it is not meant for CUDA graphs).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..device import triton_device_reason
from ..launch import eager_ok
from ..recompute import autograd_reenabled, owned_grads

from .naive import gla_chunk_reference

IMPLS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Argument checks (shapes / dtypes / devices only: they run on FakeTensors too)
# ----------------------------------------------------------------------------------------------
def _check_args(q, k, v, g, initial_state, cu_seqlens) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, T, H, D]; got {q.dim()}-D, {k.dim()}-D, "
                         f"{v.dim()}-D")
    B, T, Hq, K = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree "
                         "on batch / length")
    H = k.shape[2]
    if v.shape[2] != H:
        raise ValueError(f"k has {H} heads but v has {v.shape[2]}")
    if k.shape[3] != K:
        raise ValueError(f"q head dim {K} != k head dim {k.shape[3]}")
    if H == 0 or Hq % H != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {H}")
    if g is not None:
        if tuple(g.shape) not in ((B, T, H, K), (B, T, H)):
            raise ValueError(f"g must be [B, T, H, K] = {(B, T, H, K)} or [B, T, H]; got "
                             f"{tuple(g.shape)}")
        if not g.is_floating_point():
            raise ValueError(f"g must be floating; got {g.dtype}")
    N = B
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError("cu_seqlens must be a 1-D int tensor [N + 1]")
        if cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be integer; got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1; got {B}")
        N = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        V = v.shape[3]
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(f"initial_state must be [N, H, K, V] = {(N, H, K, V)}; got "
                             f"{tuple(initial_state.shape)}")


def triton_unsupported_reason(q, k, v, g=None, initial_state=None, cu_seqlens=None) -> str | None:
    """None if the Triton GLA kernels handle this call, else a sentence saying why not.

    Looks only at shapes, dtypes and devices (works on Fake/meta tensors).
    """
    reason = triton_device_reason(q, k, v, g, initial_state, cu_seqlens, kernel="GLA")
    if reason:
        return reason
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if t is not None and t.dtype not in _TRITON_DTYPES:
            return (f"{str(t.dtype).replace('torch.', '')} unsupported by the Triton GLA kernel "
                    f"({name})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return (f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); the Triton GLA kernel "
                "needs one dtype")
    if initial_state is not None and initial_state.dtype not in _TRITON_DTYPES:
        return (f"{str(initial_state.dtype).replace('torch.', '')} initial_state unsupported by "
                "the Triton GLA kernel")
    K, V = q.shape[-1], v.shape[-1]
    B, T, Hq = q.shape[:3]
    H = k.shape[2]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    # row offsets are int32 in the kernels: q/o, k/g, v rows, and the [Hq, 64] rows of the
    # intra-chunk scores A/dA (64 = the chunk length); the per-chunk states use int64
    widest = max(Hq * K, H * K, H * V, Hq * V, Hq * 64)
    if B * T * widest >= 2**31 or N * H * K * V >= 2**31:
        return (f"{B * T} rows of up to {widest} elements (or {N} states of {H}×{K}×{V}) reach "
                "2^31 elements: the Triton GLA kernels index with int32 offsets")
    if K > _MAX_HEAD_DIM:
        return f"head dim {K} > {_MAX_HEAD_DIM} unsupported by the Triton GLA kernel"
    if V > _MAX_HEAD_DIM:
        return f"value head dim {V} > {_MAX_HEAD_DIM} unsupported by the Triton GLA kernel"
    return None


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _final_state_like(q, k, v, cu_seqlens, output_final_state):
    if not output_final_state:
        return q.new_empty(0, dtype=_state_dtype(q))
    N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.new_empty(N, k.shape[2], k.shape[3], v.shape[3], dtype=_state_dtype(q))


def _reference_forward(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state):
    o, ht = gla_chunk_reference(q, k, v, g, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    out = torch.empty_like(o)
    out.copy_(o)
    fs = _final_state_like(q, k, v, cu_seqlens, output_final_state)
    if output_final_state:
        fs.copy_(ht)
    return out, fs


def _o_like(q, v):
    B, T, Hq, _ = q.shape
    return q.new_empty(B, T, Hq, v.shape[-1], dtype=v.dtype)


# ----------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("gla::chunk_gla", mutates_args=())
def chunk_gla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                 initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                 scale: float, output_final_state: bool, impl: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(o [B,T,Hq,V] in v.dtype, final_state [N,H,K,V] fp32 or empty)``."""
    if impl == "triton":
        from . import chunk
        return chunk.chunk_gla_fwd(q, k, v, g, initial_state, cu_seqlens, scale,
                                   output_final_state)
    return _reference_forward(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state)


@chunk_gla_op.register_fake
def _chunk_gla_fake(q, k, v, g, initial_state, cu_seqlens, scale, output_final_state, impl):
    return _o_like(q, v), _final_state_like(q, k, v, cu_seqlens, output_final_state)


@torch.library.custom_op("gla::fused_recurrent_gla", mutates_args=())
def fused_recurrent_gla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           g: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                           scale: float, output_final_state: bool, impl: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token GLA (decode). Same outputs as ``gla::chunk_gla``."""
    if impl == "triton":
        from . import fused_recurrent
        return fused_recurrent.fused_recurrent_gla_fwd(q, k, v, g, initial_state, scale,
                                                       output_final_state)
    return _reference_forward(q, k, v, g, initial_state, None, scale, output_final_state)


@fused_recurrent_gla_op.register_fake
def _fused_recurrent_gla_fake(q, k, v, g, initial_state, scale, output_final_state, impl):
    return _o_like(q, v), _final_state_like(q, k, v, None, output_final_state)


@torch.library.custom_op("gla::chunk_gla_backward", mutates_args=())
def chunk_gla_backward_op(do: torch.Tensor, dht: Optional[torch.Tensor], q: torch.Tensor,
                          k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor],
                          initial_state: Optional[torch.Tensor],
                          cu_seqlens: Optional[torch.Tensor], final_state: Optional[torch.Tensor],
                          scale: float, impl: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """Returns ``(dq, dk, dv, dg, dh0)``; ``dg`` is empty without g, ``dh0`` empty without an
    initial state. ``dht`` (grad of the final state) may be None; ``final_state`` is the forward's
    final state (needed by the Triton path when ``dht`` is given)."""
    empty = q.new_empty(0)
    if impl == "triton":
        from . import chunk
        if hasattr(chunk, "chunk_gla_bwd"):
            dq, dk, dv, dg, dh0 = chunk.chunk_gla_bwd(do, dht, q, k, v, g, initial_state,
                                                      cu_seqlens, final_state, scale)
            return (dq, dk, dv, dg if dg is not None else q.new_empty(0),
                    dh0 if dh0 is not None else q.new_empty(0))
    with autograd_reenabled():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        gl = g.detach().requires_grad_() if g is not None else None
        h0 = initial_state.detach().requires_grad_() if initial_state is not None else None
        o, ht = gla_chunk_reference(*leaves, gl, scale=scale, initial_state=h0,
                                    output_final_state=dht is not None, cu_seqlens=cu_seqlens)
        wrt = leaves + ([gl] if gl is not None else []) + ([h0] if h0 is not None else [])
        outs, gouts = [o], [do]
        if dht is not None:
            outs.append(ht)
            gouts.append(dht.to(ht.dtype))
        grads = torch.autograd.grad(outs, wrt, gouts, allow_unused=True)
    res = owned_grads(wrt, grads)
    dq, dk, dv = res[:3]
    i = 3
    dg = empty
    if g is not None:
        dg, i = res[i], i + 1
    dh0 = res[i] if initial_state is not None else q.new_empty(0)
    return dq, dk, dv, dg, dh0


@chunk_gla_backward_op.register_fake
def _chunk_gla_backward_fake(do, dht, q, k, v, g, initial_state, cu_seqlens, final_state, scale,
                             impl):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(g) if g is not None else q.new_empty(0),
            torch.empty_like(initial_state) if initial_state is not None else q.new_empty(0))


def _grads_out(ctx, do, dht):
    q, k, v, g, h0, cu, ht = ctx.saved_tensors
    scale, impl = ctx.args
    if do is None:
        do = torch.zeros_like(_o_like(q, v))
    if dht is not None and dht.numel() == 0:
        dht = None
    dq, dk, dv, dg, dh0 = torch.ops.gla.chunk_gla_backward(
        do, dht, q, k, v, g, h0, cu, ht if ht.numel() else None, scale, impl)
    return dq, dk, dv, (dg if g is not None else None), (dh0 if h0 is not None else None)


def _setup_chunk(ctx, inputs, output):
    q, k, v, g, h0, cu, scale, output_final_state, impl = inputs
    ctx.save_for_backward(q, k, v, g, h0, cu, output[1])
    ctx.args = (scale, impl)
    ctx.set_materialize_grads(False)   # an unused output costs no zero-filled gradient


def _backward_chunk(ctx, do, dht):
    dq, dk, dv, dg, dh0 = _grads_out(ctx, do, dht)
    return dq, dk, dv, dg, dh0, None, None, None, None


def _setup_recurrent(ctx, inputs, output):
    q, k, v, g, h0, scale, output_final_state, impl = inputs
    ctx.save_for_backward(q, k, v, g, h0, None, output[1])
    ctx.args = (scale, impl)
    ctx.set_materialize_grads(False)


def _backward_recurrent(ctx, do, dht):
    dq, dk, dv, dg, dh0 = _grads_out(ctx, do, dht)
    return dq, dk, dv, dg, dh0, None, None, None


torch.library.register_autograd("gla::chunk_gla", _backward_chunk, setup_context=_setup_chunk)
torch.library.register_autograd("gla::fused_recurrent_gla", _backward_recurrent,
                                setup_context=_setup_recurrent)


# ----------------------------------------------------------------------------------------------
# Eager fast path for impl="triton"
# ----------------------------------------------------------------------------------------------
class _TritonChunkGLA(torch.autograd.Function):
    """``gla::chunk_gla`` + ``gla::chunk_gla_backward`` for impl="triton" without the custom-op
    dispatch (tens of µs of host time per step, which bounds short sequences). Plain eager calls
    only (:func:`gla.kernels.launch.eager_ok`); compiled graphs and dispatch modes see the ops."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, cu, scale, output_final_state):
        from . import chunk
        o, ht = chunk.chunk_gla_fwd(q, k, v, g, h0, cu, scale, output_final_state)
        ctx.save_for_backward(q, k, v, g, h0, cu, ht)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    @torch.autograd.function.once_differentiable   # a second derivative raises, never silent
    def backward(ctx, do, dht):
        from . import chunk
        q, k, v, g, h0, cu, ht = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(_o_like(q, v))
        if dht is not None and dht.numel() == 0:
            dht = None
        dq, dk, dv, dg, dh0 = chunk.chunk_gla_bwd(do, dht, q, k, v, g, h0, cu,
                                                  ht if ht.numel() else None, ctx.scale)
        return dq, dk, dv, dg, dh0, None, None, None


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def _resolve(impl, q, k, v, g, initial_state, cu_seqlens):
    if impl == "auto":
        ok = q.is_cuda and triton_unsupported_reason(q, k, v, g, initial_state, cu_seqlens) is None
        return "triton" if ok else "reference"
    if impl == "triton":
        reason = triton_unsupported_reason(q, k, v, g, initial_state, cu_seqlens)
        if reason is not None:
            raise ValueError(reason)
        return impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    return impl


def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
              *, scale: float | None = None, initial_state: torch.Tensor | None = None,
              output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
              impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated linear attention (fla layout).

    Args:
        q: ``[B, T, Hq, K]``; k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; ``Hq % H == 0`` (GQA:
            query head ``h`` reads the state of kv head ``h // (Hq // H)``).
        g: log gate (≤ 0): ``[B, T, H, K]`` per key channel, ``[B, T, H]`` per head, or None.
            ``−inf`` (a closed gate) resets the state. The Triton kernels take decays only: a
            positive value gives NaN in the outputs it reaches (checked on the device, no host
            sync); ``impl="reference"`` computes any g.
        scale: default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences with cu_seqlens).
        output_final_state: also return the final state ``[N, H, K, V]`` float32.
        cu_seqlens: int ``[N + 1]`` sequence offsets (B must be 1); the state resets at each
            boundary.
        impl: ``"triton"``, ``"reference"`` or ``"auto"``.

    Returns ``(o [B, T, Hq, V] in v.dtype, final_state or None)``; differentiable in q, k, v,
    g and initial_state.
    """
    _check_args(q, k, v, g, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = _resolve(impl, q, k, v, g, initial_state, cu_seqlens)
    if impl == "triton" and eager_ok(q, k, v, g, initial_state, cu_seqlens):
        if _needs_grad(q, k, v, g, initial_state):
            o, ht = _TritonChunkGLA.apply(q, k, v, g, initial_state, cu_seqlens, scale,
                                          bool(output_final_state))
        else:
            from . import chunk
            o, ht = chunk.chunk_gla_fwd(q, k, v, g, initial_state, cu_seqlens, scale,
                                        bool(output_final_state))
        return o, (ht if output_final_state else None)
    o, ht = torch.ops.gla.chunk_gla(q, k, v, g, initial_state, cu_seqlens, scale,
                                    bool(output_final_state), impl)
    return o, (ht if output_final_state else None)


def fused_recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        g: torch.Tensor | None = None, *, scale: float | None = None,
                        initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False, impl: str = "auto"
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token GLA for decoding (short T, typically 1); same contract as
    :func:`chunk_gla` without ``cu_seqlens``."""
    _check_args(q, k, v, g, initial_state, None)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = _resolve(impl, q, k, v, g, initial_state, None)
    if (impl == "triton" and eager_ok(q, k, v, g, initial_state)
            and not _needs_grad(q, k, v, g, initial_state)):   # decode: no dispatch cost
        from . import fused_recurrent
        o, ht = fused_recurrent.fused_recurrent_gla_fwd(q, k, v, g, initial_state, scale,
                                                        bool(output_final_state))
        return o, (ht if output_final_state else None)
    o, ht = torch.ops.gla.fused_recurrent_gla(q, k, v, g, initial_state, scale,
                                              bool(output_final_state), impl)
    return o, (ht if output_final_state else None)
