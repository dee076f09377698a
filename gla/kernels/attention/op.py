"""``gla::attention`` and ``gla::attention_backward``: the torch.library ops and the public API.

``gated_attention`` validates its arguments, resolves ``impl`` and calls ``gla::attention``,
which returns ``(out, lse)``; autograd (registered with ``register_autograd``) saves
what the backward needs and calls ``gla::attention_backward``, so a compiled graph keeps both
ops opaque. ``impl`` picks the body of both ops:

* ``"triton"``: the flash kernels of ``flash.py`` (on CPU tensors: Triton's interpreter);
* ``"sdpa"``: ``F.scaled_dot_product_attention`` with the masks folded into ``attn_mask``,
  the gate multiplied afterwards; inside the op its backward recomputes under torch autograd,
  so ``gated_attention(impl="sdpa")`` skips the op and runs :func:`attention_sdpa` as plain
  PyTorch (SDPA's own backward; compiled graphs see aten's SDPA);
* ``"reference"``: ``naive.attention_reference``; backward by recompute as well.

Both ops allocate fresh outputs, never sync with the host, and so are CUDA-graph friendly.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..device import interpreting, triton_device_reason
from ..launch import eager_ok
from ..recompute import autograd_reenabled, owned_grads
from . import flash
from .naive import attention_reference, visible_positions

IMPLS = ("auto", "triton", "sdpa", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Argument checks (shapes / dtypes / devices only: they run on FakeTensors too)
# ----------------------------------------------------------------------------------------------
def _check_args(q, k, v, gate, bias, key_mask, window, causal=False, chunk=0) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D]; got {q.dim()}-D, {k.dim()}-D, "
                         f"{v.dim()}-D")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {v.shape[0]}")
    if v.shape[1] != Hkv or v.shape[2] != Tk:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads/length")
    if Dk != D:
        raise ValueError(f"q head dim {D} != k head dim {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 = no window); got {window}")
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0 (0 = no chunks); got {chunk}")
    flash._check_chunk(chunk, causal)
    Dv = v.shape[3]
    if gate is not None:
        if not gate.is_floating_point():
            raise ValueError(f"gate must be a floating tensor; got {gate.dtype}")
    if gate is not None and gate.shape != (B, Hq, Tq, Dv):  # (broadcast_shapes costs ~10 µs)
        try:
            shape = torch.broadcast_shapes(gate.shape, (B, Hq, Tq, Dv))
        except RuntimeError:
            shape = None
        if shape != (B, Hq, Tq, Dv):
            raise ValueError(f"gate {tuple(gate.shape)} does not broadcast to the output "
                             f"{(B, Hq, Tq, Dv)}")
    if bias is not None:
        if not bias.is_floating_point():
            raise ValueError(f"bias must be a floating (additive) tensor; got {bias.dtype}. "
                             "Pass boolean padding masks as key_mask.")
        try:
            shape = torch.broadcast_shapes(bias.shape, (B, Hq, Tq, Tk))
        except RuntimeError:
            shape = None
        if shape != (B, Hq, Tq, Tk):
            raise ValueError(f"bias {tuple(bias.shape)} does not broadcast to {(B, Hq, Tq, Tk)}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be bool (True = attend); got {key_mask.dtype}")
        if key_mask.dim() != 2 or key_mask.shape[1] != Tk or key_mask.shape[0] not in (1, B):
            raise ValueError(f"key_mask must be [B, Tk] = {(B, Tk)}; got {tuple(key_mask.shape)}")


def triton_unsupported_reason(q, k, v, gate=None, bias=None, key_mask=None, causal=False,
                              window=0, chunk=0) -> str | None:
    """None if the Triton kernels handle this call, else a sentence saying why not.

    (``causal``, ``window`` and ``chunk`` are taken for the signature's sake: the kernels run
    every position mask.)

    Looks only at shapes, dtypes, devices and ``requires_grad`` (works on Fake/meta tensors).
    Assumes the arguments are otherwise valid (``gated_attention`` checks that first).
    """
    reason = triton_device_reason(q, k, v, gate, bias, key_mask, kernel="attention")
    if reason:
        return reason
    if q.dtype not in _TRITON_DTYPES:
        return f"{str(q.dtype).replace('torch.', '')} unsupported by the Triton attention kernel"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return (f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); the Triton attention "
                "kernel needs one dtype")
    D, Dv = q.shape[-1], v.shape[-1]
    if D > _MAX_HEAD_DIM:
        return f"head dim {D} > {_MAX_HEAD_DIM} unsupported by the Triton attention kernel"
    if Dv > _MAX_HEAD_DIM:
        return f"value head dim {Dv} > {_MAX_HEAD_DIM} unsupported by the Triton attention kernel"
    if gate is not None:
        B, Hq, Tq = q.shape[:3]
        if tuple(gate.shape) not in ((B, Hq, Tq, Dv), (B, Hq, Tq, 1)):
            return (f"gate shape {tuple(gate.shape)}: the Triton attention kernel takes an "
                    f"elementwise [B, Hq, Tq, Dv] or headwise [B, Hq, Tq, 1] gate")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        return "bias requires grad; the Triton kernel has no dbias"
    return None


# ----------------------------------------------------------------------------------------------
# The SDPA path
# ----------------------------------------------------------------------------------------------
def attention_sdpa(q, k, v, gate=None, bias=None, key_mask=None, scale=None, causal=False,
                   window=0, chunk=0) -> torch.Tensor:
    """The same semantics through ``F.scaled_dot_product_attention`` (differentiable).

    Causal (Tq == Tk) alone uses ``is_causal``; otherwise positions, key_mask and bias are
    folded into one bool or float ``attn_mask``. Rows with no visible key are given an
    all-visible mask (no NaN anywhere, forward or backward) and then zeroed.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    gqa = bool(Hq != Hkv)  # (a SymBool when traced with dynamic shapes: SDPA takes a bool)
    if bias is None and key_mask is None and window <= 0 and chunk <= 0 and \
            (not causal or Tq == Tk):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                             enable_gqa=gqa)
    else:
        vis = visible_positions(Tq, Tk, causal, window, q.device, chunk)
        if key_mask is not None:
            km = key_mask[:, None, None, :]
            vis = km if vis is None else vis & km
        if bias is None:
            row_ok = vis.any(dim=-1, keepdim=True)
            mask = vis | ~row_ok
        else:
            # keep finite biases finite in q.dtype (finfo(fp32).min would round to -inf)
            fb = torch.where(torch.isneginf(bias), bias,
                             bias.clamp_min(torch.finfo(q.dtype).min)).to(q.dtype)
            if vis is not None:
                fb = torch.where(vis, fb, float("-inf"))
            row_ok = (fb > float("-inf")).any(dim=-1, keepdim=True)
            mask = torch.where(row_ok, fb, 0.0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=gqa)
        out = torch.where(row_ok, out, 0.0)
    if gate is not None:
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = (out.to(ct) * torch.sigmoid(gate.to(ct))).to(q.dtype)
    return out


# torch.nn.attention.SDPBackend's values, as ``torch._fused_sdp_choice`` returns them
_SDPA_BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def sdpa_backend(q, k, v, *, causal=False, enable_gqa=False) -> str | None:
    """The kernel ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=...)``
    would run for these CUDA tensors, without an ``attn_mask``: "cudnn", "flash", "efficient" or
    "math"; None for other devices, on a machine without CUDA, or if PyTorch cannot say.

    Real tensors ask PyTorch's dispatcher itself (``torch._fused_sdp_choice``). FakeTensors (what
    a lowering sees) cannot: the dispatcher runs its meta kernel, where every device reads as
    "meta" and the answer is always "math". For them the answer is rebuilt from the public
    per-backend checks (``torch.backends.cuda.can_use_*_attention``, which read shapes, strides,
    dtypes, ``requires_grad``, the GPU and the backend switches) in the order the dispatcher
    prefers the backends on this GPU (:func:`_sdpa_preference`).
    """
    from torch._subclasses.fake_tensor import FakeTensor

    if q.device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        if not isinstance(q, FakeTensor):
            choice = torch._fused_sdp_choice(q, k, v, None, 0.0, bool(causal),
                                             enable_gqa=bool(enable_gqa))
            return _SDPA_BACKENDS.get(int(choice))
        from torch.backends import cuda as tbc
        params = tbc.SDPAParams(q, k, v, None, 0.0, bool(causal), bool(enable_gqa))
        usable = {"cudnn": tbc.can_use_cudnn_attention(params),
                  "flash": tbc.can_use_flash_attention(params),
                  "efficient": tbc.can_use_efficient_attention(params)}
        return next((b for b in _sdpa_preference(q.device, q.dtype) if usable.get(b)), "math")
    except Exception:  # noqa: BLE001 - an unanswerable question, not the caller's error
        return None


@functools.lru_cache(maxsize=None)
def _sdpa_preference(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The fused backends in the order SDPA's dispatcher tries them on this GPU and dtype, read
    off a small case every backend takes: ask, switch the answer off, ask again."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.nn.attention import SDPBackend, sdpa_kernel

    left = {SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash",
            SDPBackend.EFFICIENT_ATTENTION: "efficient"}
    order = []
    with unset_fake_temporarily():  # a lowering runs under Dynamo's fake mode: ask real tensors
        x = torch.empty(1, 2, 128, 64, device=device, dtype=dtype)
        while left:
            with sdpa_kernel(list(left) + [SDPBackend.MATH]):
                name = _SDPA_BACKENDS.get(int(torch._fused_sdp_choice(x, x, x, None, 0.0, True)))
            chosen = [b for b, n in left.items() if n == name]
            if not chosen:  # math: none of the rest runs this case
                break
            order.append(name)
            del left[chosen[0]]
    return tuple(order)


def _forward_fn(impl: str):
    if impl not in ("sdpa", "reference"):
        raise ValueError(f"gla::attention needs impl 'triton', 'sdpa' or 'reference' (resolve "
                         f"'auto' with resolve_impl first); got {impl!r}")
    return {"sdpa": attention_sdpa, "reference": attention_reference}[impl]


# ----------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------
def _bthd_like(q: torch.Tensor, dv: int) -> torch.Tensor:
    B, H, T, _ = q.shape
    return q.new_empty(B, T, H, dv).transpose(1, 2)


@torch.library.custom_op("gla::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], key_mask: Optional[torch.Tensor], scale: float,
                 causal: bool, window: int, chunk: int, impl: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``. ``out`` is ``[B, Hq, Tq, Dv]`` with ``[B, Tq, Hq, Dv]`` memory.
    For ``impl="triton"`` ``lse`` is fp32 ``[B, Hq, Tq]``; other impls return it empty (their
    backward recomputes)."""
    if impl == "triton":
        return flash.attention_forward(q, k, v, gate, bias, key_mask, scale, causal, window,
                                       chunk)
    res = _forward_fn(impl)(q, k, v, gate=gate, bias=bias, key_mask=key_mask, scale=scale,
                            causal=causal, window=window, chunk=chunk)
    out = _bthd_like(q, v.shape[-1])
    out.copy_(res)
    return out, q.new_empty(0, dtype=torch.float32)


@attention_op.register_fake
def _attention_fake(q, k, v, gate, bias, key_mask, scale, causal, window, chunk, impl):
    B, H, T, _ = q.shape
    out = _bthd_like(q, v.shape[-1])
    if impl == "triton":
        return out, q.new_empty(B, H, T, dtype=torch.float32)
    return out, q.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("gla::attention_backward", mutates_args=())
def attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          o: torch.Tensor, lse: torch.Tensor, gate: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
                          scale: float, causal: bool, window: int, chunk: int, impl: str,
                          bias_requires_grad: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    """Returns ``(dq, dk, dv, dgate, dbias)``; ``dgate`` is empty without a gate, ``dbias``
    empty unless ``bias_requires_grad``. ``o`` is the forward's (gated) ``out`` for
    ``impl="triton"``; the recomputing impls ignore ``o`` and ``lse``."""
    if impl == "triton":
        if bias_requires_grad:
            raise RuntimeError("bias requires grad; the Triton kernel has no dbias")
        dq, dk, dv, dgate = flash.attention_backward(
            dout, q, k, v, o, lse, gate, bias, key_mask, scale, causal, window, chunk)
        return dq, dk, dv, dgate if dgate is not None else q.new_empty(0), q.new_empty(0)
    with autograd_reenabled():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        g = gate.detach().requires_grad_() if gate is not None else None
        b = bias.detach().requires_grad_(bias_requires_grad) if bias is not None else None
        res = _forward_fn(impl)(*leaves, gate=g, bias=b, key_mask=key_mask, scale=scale,
                                causal=causal, window=window, chunk=chunk)
        wrt = leaves + ([g] if g is not None else []) + ([b] if bias_requires_grad else [])
        grads = torch.autograd.grad(res, wrt, dout, allow_unused=True)
    outs = owned_grads(wrt, grads)
    dq, dk, dv = outs[:3]
    dgate = outs[3] if gate is not None else q.new_empty(0)  # distinct empties: no aliasing
    dbias = outs[-1] if bias_requires_grad else q.new_empty(0)
    return dq, dk, dv, dgate, dbias


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, o, lse, gate, bias, key_mask, scale, causal, window,
                             chunk, impl, bias_requires_grad):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(gate) if gate is not None else q.new_empty(0),
            torch.empty_like(bias) if bias_requires_grad else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, gate, bias, key_mask, scale, causal, window, chunk, impl = inputs
    out, lse = output
    o = out if impl == "triton" else lse  # (the recomputing impls need neither: save the empty)
    ctx.save_for_backward(q, k, v, o, lse, gate, bias, key_mask)
    ctx.args = (scale, causal, window, chunk, impl)
    ctx.bias_requires_grad = bias is not None and ctx.needs_input_grad[4]
    ctx.mark_non_differentiable(lse)
    # lse never gets a gradient: without this, autograd materializes zeros for it before every
    # backward (a memset of [B, H, T] fp32).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dlse):
    q, k, v, o, lse, gate, bias, key_mask = ctx.saved_tensors
    scale, causal, window, chunk, impl = ctx.args
    if dout is None:  # (grads are not materialized)
        dout = _bthd_like(q, v.shape[-1]).zero_()
    dq, dk, dv, dgate, dbias = torch.ops.gla.attention_backward(
        dout, q, k, v, o, lse, gate, bias, key_mask, scale, causal, window, chunk, impl,
        ctx.bias_requires_grad)
    return (dq, dk, dv, dgate if gate is not None else None,
            dbias if ctx.bias_requires_grad else None, None, None, None, None, None, None)


torch.library.register_autograd("gla::attention", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Eager fast path for impl="triton"
# ----------------------------------------------------------------------------------------------
class _TritonAttention(torch.autograd.Function):
    """``gla::attention`` + ``gla::attention_backward`` for impl="triton", minus the custom-op
    dispatch (two Python→dispatcher→Python round trips and the ``register_autograd`` wrapper,
    tens of µs per training step). Used only in plain eager calls (see
    :func:`gla.kernels.launch.eager_ok`); the ops remain what torch.compile / AOT autograd /
    dispatch modes see. ``plan`` is the call's ``flash.forward_plan``: the backward asks it for
    its own plan, keyed on the output gradient alone."""

    @staticmethod
    def forward(ctx, q, k, v, gate, bias, key_mask, plan):
        out, lse = plan(q, k, v, gate, bias, key_mask)
        ctx.save_for_backward(q, k, v, out, lse, gate, bias, key_mask)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable   # a second derivative raises, never silent
    def backward(ctx, dout):
        q, k, v, o, lse, gate, bias, key_mask = ctx.saved_tensors
        if dout is None:
            dout = _bthd_like(q, v.shape[-1]).zero_()
        dq, dk, dv, dgate = ctx.plan.backward(dout, q, k, v, o, lse, gate, bias, key_mask)
        return dq, dk, dv, dgate, None, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def resolve_impl(q, k, v, gate=None, bias=None, key_mask=None, causal=False, window=0,
                 impl="auto") -> str:
    """The concrete impl ``gla::attention`` should run: "auto" becomes "triton" for CUDA tensors
    the kernels support, else "sdpa"; a forced "triton" the kernels cannot run raises
    ValueError with the reason. Works on FakeTensors (for lowerings that emit the op directly)."""
    if impl == "auto":
        ok = q.is_cuda and triton_unsupported_reason(q, k, v, gate, bias, key_mask, causal,
                                                     window) is None
        return "triton" if ok else "sdpa"
    if impl == "triton":
        reason = triton_unsupported_reason(q, k, v, gate, bias, key_mask, causal, window)
        if reason is not None:
            raise ValueError(reason)
        return impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    return impl


_VALIDATED: dict = {}  # eager calls' argument signatures that passed the checks -> their impl
_VALIDATED_MAX = 1024


def _validated(q, k, v, gate, bias, key_mask, causal, window, chunk, impl, eager) -> str:
    """``_check_args`` then ``resolve_impl``; in plain eager (``eager``), a signature that
    passed them before (every shape, dtype and device they read, ``bias.requires_grad``, the
    grad mode, whether Triton interprets) returns its impl without them: tens of µs of a training step's host time."""
    if not eager:
        _check_args(q, k, v, gate, bias, key_mask, window, causal, chunk)
        return resolve_impl(q, k, v, gate, bias, key_mask, causal, window, impl)
    key = (*((None if t is None else (t.shape, t.dtype, t.device))
             for t in (q, k, v, gate, bias, key_mask)),
           bias is not None and bias.requires_grad, torch.is_grad_enabled(), bool(causal),
           window, chunk, impl, interpreting())
    resolved = _VALIDATED.get(key)
    if resolved is None:
        _check_args(q, k, v, gate, bias, key_mask, window, causal, chunk)
        resolved = resolve_impl(q, k, v, gate, bias, key_mask, causal, window, impl)
        if len(_VALIDATED) >= _VALIDATED_MAX:
            _VALIDATED.clear()
        _VALIDATED[key] = resolved
    return resolved


def gated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    gate: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    key_mask: torch.Tensor | None = None, scale: float | None = None,
                    causal: bool = False, window: int = 0, chunk: int = 0,
                    impl: str = "auto") -> torch.Tensor:
    """Gated softmax attention: ``softmax(scale·q kᵀ + bias, masked) v ⊙ sigmoid(gate)``.

    Args:
        q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]``; v: ``[B, Hkv, Tk, Dv]``, ``Hq % Hkv == 0``
            (GQA / MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``). Any strides, e.g.
            ``x.transpose(1, 2)`` views of ``[B, T, H, D]`` tensors.
        gate: pre-sigmoid gate logits, ``[B, Hq, Tq, Dv]`` (elementwise) or ``[B, Hq, Tq, 1]``
            (headwise), applied to the attention output.
        bias: additive float tensor broadcastable to ``[B, Hq, Tq, Tk]`` (may hold -inf).
        key_mask: bool ``[B, Tk]``, True where the key may be attended (padding mask).
        scale: softmax scale, default ``1 / sqrt(D)``.
        causal: bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``.
        window: if > 0, query ``i`` sees key ``j`` only if ``(i + Tk - Tq) - j < window``.
        chunk: if > 0 (needs ``causal``), query ``i`` sees key ``j`` only if
            ``(i + Tk - Tq) // chunk == j // chunk``: Llama 4's chunked attention.
        impl: ``"triton"``, ``"sdpa"``, ``"reference"`` or ``"auto"`` (Triton on CUDA when
            :func:`triton_unsupported_reason` is None, else SDPA).

    Returns ``[B, Hq, Tq, Dv]`` in ``q.dtype`` (memory laid out as ``[B, Tq, Hq, Dv]`` by the
    Triton and reference ops; ``impl="sdpa"`` returns what SDPA returns). Differentiable in q, k,
    v, gate, and in bias on the sdpa/reference paths.

    A query row with no visible key (all masked by causal/window/key_mask/-inf bias) outputs 0
    and gets zero gradients (flash-attention convention).
    """
    eager = eager_ok(q, k, v, gate, bias, key_mask)
    impl = _validated(q, k, v, gate, bias, key_mask, causal, window, chunk, impl, eager)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "sdpa":
        # Plain PyTorch: autograd uses SDPA's own backward (no recompute of the forward, as the
        # op's backward would do), and a compiled graph holds aten's SDPA, which Inductor knows.
        return attention_sdpa(q, k, v, gate=gate, bias=bias, key_mask=key_mask, scale=scale,
                              causal=causal, window=window, chunk=chunk)
    if impl == "triton" and eager:
        plan = flash.forward_plan(q, k, v, gate, bias, key_mask, scale, causal, window, chunk)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (gate is not None and gate.requires_grad)):
            return _TritonAttention.apply(q, k, v, gate, bias, key_mask, plan)
        return plan(q, k, v, gate, bias, key_mask)[0]
    out, _ = torch.ops.gla.attention(q, k, v, gate, bias, key_mask, float(scale),
                                     bool(causal), int(window), int(chunk), impl)
    return out
