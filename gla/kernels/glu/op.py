"""``torch.library`` ops for the GLU kernels (namespace ``gla``) and the public functions.

Ops (every forward has a fake impl and an autograd formula whose backward calls the matching
``*_backward`` op, so compiled graphs keep both opaque):

    gla::glu(Tensor a, Tensor b, str act, str impl) -> Tensor
    gla::glu_backward(Tensor dy, Tensor a, Tensor b, str act, str impl) -> (Tensor da, Tensor db)
    gla::glu_packed(Tensor x, str act, bool gate_first, str impl) -> Tensor
    gla::glu_packed_backward(Tensor dy, Tensor x, str act, bool gate_first, str impl) -> Tensor dx
    gla::glu_linear(Tensor x, Tensor weight, Tensor? bias, str act, str impl, bool recompute)
        -> (Tensor y, Tensor h)          # h = x Wᵀ + b [..., 2F] saved for backward, or empty [0]
    gla::glu_linear_backward(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor h, str act,
        str impl, bool need_dx, bool need_dweight, bool need_dbias)
        -> (Tensor dx, Tensor dweight, Tensor dbias)   # empty [0] where not needed

``impl`` is resolved inside the op, on real tensors: "triton", "reference", or "auto" (Triton when
every tensor is on CUDA and ``triton_unsupported_reason`` is None, else the reference). glu_linear
also takes "cublas": the projection by torch (cuBLAS) and the GLU by the Triton elementwise kernel;
its "auto" is whatever ``choose_glu_linear_impl`` says. Outputs are always contiguous.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import naive
from .elementwise import glu_bwd, glu_fwd, glu_packed_bwd, glu_packed_fwd, triton_unsupported_reason
from .matmul import glu_linear_fwd

IMPLS = ("auto", "triton", "reference")
LINEAR_IMPLS = ("auto", "triton", "cublas", "reference")


def _check_impl(impl: str, allowed=IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"impl {impl!r} unknown; expected one of {', '.join(allowed)}")


def _use_triton(impl: str, *tensors, act: str) -> bool:
    """Resolve an elementwise impl to Triton (True) or the reference (False)."""
    naive.check_activation(act)
    if impl == "reference":
        return False
    reason = triton_unsupported_reason(*tensors, act=act)
    if impl in ("triton", "cublas"):
        if reason is not None:
            raise ValueError(f"impl={impl!r} cannot run: {reason}")
        return True
    if impl == "auto":
        return reason is None and all(t.is_cuda for t in tensors if t is not None)
    _check_impl(impl, LINEAR_IMPLS)
    raise AssertionError("unreachable")


def choose_glu_linear_impl(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> str:
    """What impl="auto" runs for glu_linear: "cublas" (torch matmul + Triton GLU) on CUDA when
    Triton takes the tensors, else "reference".

    The fused Triton matmul ("triton") stays opt-in until benchmarks/glu.py shows it beating
    cuBLAS + the elementwise kernel; flip it here (e.g. by shape) when it does.
    """
    if triton_unsupported_reason(x, weight, bias, act=act) is None and x.is_cuda:
        return "cublas"
    return "reference"


def _resolve_linear(impl: str, x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> str:
    naive.check_activation(act)
    _check_impl(impl, LINEAR_IMPLS)
    if impl == "auto":
        return choose_glu_linear_impl(x, weight, bias, act)
    if impl != "reference":
        reason = triton_unsupported_reason(x, weight, bias, act=act)
        if reason is not None:
            raise ValueError(f"impl={impl!r} cannot run: {reason}")
    return impl


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# gla::glu
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("gla::glu", mutates_args=())
def glu_op(a: Tensor, b: Tensor, act: str, impl: str) -> Tensor:
    if _use_triton(impl, a, b, act=act):
        return glu_fwd(a, b, act)
    return naive.glu_reference(a, b, act).contiguous()


@glu_op.register_fake
def _(a, b, act, impl):
    return a.new_empty(a.shape)


@torch.library.custom_op("gla::glu_backward", mutates_args=())
def glu_backward_op(dy: Tensor, a: Tensor, b: Tensor, act: str, impl: str) -> tuple[Tensor, Tensor]:
    if _use_triton(impl, dy, a, b, act=act):
        return glu_bwd(dy, a, b, act)
    da, db = naive.glu_backward_reference(dy, a, b, act)
    return da.contiguous(), db.contiguous()


@glu_backward_op.register_fake
def _(dy, a, b, act, impl):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _glu_setup(ctx, inputs, output):
    a, b, act, impl = inputs
    ctx.save_for_backward(a, b)
    ctx.act, ctx.impl = act, impl


def _glu_bwd(ctx, dy):
    a, b = ctx.saved_tensors
    da, db = torch.ops.gla.glu_backward(dy, a, b, ctx.act, ctx.impl)
    return da, db, None, None


glu_op.register_autograd(_glu_bwd, setup_context=_glu_setup)


# ---------------------------------------------------------------------------------------------
# gla::glu_packed
# ---------------------------------------------------------------------------------------------


def _packed_out_shape(x: Tensor) -> tuple[int, ...]:
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"packed GLU input needs an even last dimension, got shape {tuple(x.shape)}")
    return (*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("gla::glu_packed", mutates_args=())
def glu_packed_op(x: Tensor, act: str, gate_first: bool, impl: str) -> Tensor:
    _packed_out_shape(x)
    if _use_triton(impl, x, act=act):
        return glu_packed_fwd(x, act, gate_first)
    return naive.glu_packed_reference(x, act, gate_first).contiguous()


@glu_packed_op.register_fake
def _(x, act, gate_first, impl):
    return x.new_empty(_packed_out_shape(x))


@torch.library.custom_op("gla::glu_packed_backward", mutates_args=())
def glu_packed_backward_op(dy: Tensor, x: Tensor, act: str, gate_first: bool, impl: str) -> Tensor:
    if _use_triton(impl, dy, x, act=act):
        return glu_packed_bwd(dy, x, act, gate_first)
    return naive.glu_packed_backward_reference(dy, x, act, gate_first)


@glu_packed_backward_op.register_fake
def _(dy, x, act, gate_first, impl):
    return x.new_empty(x.shape)


def _glu_packed_setup(ctx, inputs, output):
    x, act, gate_first, impl = inputs
    ctx.save_for_backward(x)
    ctx.act, ctx.gate_first, ctx.impl = act, gate_first, impl


def _glu_packed_bwd(ctx, dy):
    (x,) = ctx.saved_tensors
    dx = torch.ops.gla.glu_packed_backward(dy, x, ctx.act, ctx.gate_first, ctx.impl)
    return dx, None, None, None


glu_packed_op.register_autograd(_glu_packed_bwd, setup_context=_glu_packed_setup)


# ---------------------------------------------------------------------------------------------
# gla::glu_linear
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("gla::glu_linear", mutates_args=())
def glu_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, impl: str,
                  recompute: bool) -> tuple[Tensor, Tensor]:
    naive.check_linear_shapes(x, weight, bias)
    which = _resolve_linear(impl, x, weight, bias, act)
    if which == "triton":
        y, h = glu_linear_fwd(x, weight, bias, act, store_h=not recompute)
        return y, (h if h is not None else _empty(x))
    h = F.linear(x, weight, bias)
    if which == "cublas":
        y = glu_packed_fwd(h, act, True)
    else:
        y = naive.glu_packed_reference(h, act, True).contiguous()
    return y, (_empty(x) if recompute else h.contiguous())


@glu_linear_op.register_fake
def _(x, weight, bias, act, impl, recompute):
    naive.check_linear_shapes(x, weight, bias)
    F2 = weight.shape[0]
    y = x.new_empty((*x.shape[:-1], F2 // 2))
    h = _empty(x) if recompute else x.new_empty((*x.shape[:-1], F2))
    return y, h


@torch.library.custom_op("gla::glu_linear_backward", mutates_args=())
def glu_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], h: Tensor,
                           act: str, impl: str, need_dx: bool, need_dweight: bool,
                           need_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
    d = x.shape[-1]
    F2 = weight.shape[0]
    M = math.prod(x.shape[:-1])
    x2 = x.reshape(M, d)
    dy2 = dy.reshape(M, F2 // 2)
    triton_glu = _resolve_linear(impl, x, weight, bias, act) != "reference"
    if tuple(h.shape) == (*x.shape[:-1], F2):  # saved by the forward
        h2 = h.reshape(M, F2)
        dh = (glu_packed_bwd(dy2, h2, act) if triton_glu
              else naive.glu_packed_backward_reference(dy2, h2, act))
    else:  # recompute the pre-activation; its buffer then takes the gradient in place
        h2 = F.linear(x2, weight, bias)
        dh = (glu_packed_bwd(dy2, h2, act, out=h2) if triton_glu
              else naive.glu_packed_backward_reference(dy2, h2, act))
    dx = (dh @ weight).view(x.shape) if need_dx else _empty(x)
    dw = (dh.t() @ x2).to(weight.dtype) if need_dweight else _empty(x)
    db = dh.sum(0).to(bias.dtype) if (need_dbias and bias is not None) else _empty(x)
    return dx, dw, db


@glu_linear_backward_op.register_fake
def _(dy, x, weight, bias, h, act, impl, need_dx, need_dweight, need_dbias):
    dx = x.new_empty(x.shape) if need_dx else _empty(x)
    dw = weight.new_empty(weight.shape) if need_dweight else _empty(x)
    db = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else _empty(x)
    return dx, dw, db


def _glu_linear_setup(ctx, inputs, output):
    x, weight, bias, act, impl, recompute = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, h)
    ctx.act, ctx.impl = act, impl


def _glu_linear_bwd(ctx, dy, _dh):
    x, weight, bias, h = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None, None
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = bool(need_db and bias is not None)
    dx, dw, db = torch.ops.gla.glu_linear_backward(dy, x, weight, bias, h, ctx.act, ctx.impl,
                                                   need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None,
            None, None, None)


glu_linear_op.register_autograd(_glu_linear_bwd, setup_context=_glu_linear_setup)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def glu(a: Tensor, b: Tensor, act: str = "silu", *, impl: str = "auto") -> Tensor:
    """act(a) * b (same shapes; output in a's dtype)."""
    naive.check_activation(act)
    _check_impl(impl)
    if a.shape != b.shape:
        raise ValueError(f"glu: a and b need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.ops.gla.glu(a, b, act, impl)


def glu_packed(x: Tensor, act: str = "silu", *, gate_first: bool = True, impl: str = "auto") -> Tensor:
    """x [..., 2F] -> [..., F]. gate_first: act(x[..., :F]) * x[..., F:] (chunk(2) order: gate, up);
    else x[..., :F] * act(x[..., F:]) (F.glu order: value, gate)."""
    naive.check_activation(act)
    _check_impl(impl)
    _packed_out_shape(x)
    return torch.ops.gla.glu_packed(x, act, gate_first, impl)


def glu_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "silu", *,
               impl: str = "auto", recompute: bool = False) -> Tensor:
    """act(x W_gᵀ + b_g) * (x W_uᵀ + b_u); weight [2F, d] packed gate-rows-first, bias [2F] or None.

    impl: "auto" (see choose_glu_linear_impl), "triton" (fused Triton matmul + GLU epilogue),
    "cublas" (torch matmul, then the Triton GLU kernel), "reference" (eager PyTorch).
    recompute: save only x (recompute x Wᵀ + b in backward: one more matmul, less memory) instead
    of the [..., 2F] pre-activation. Nothing is saved when no input needs a gradient.
    """
    naive.check_activation(act)
    _check_impl(impl, LINEAR_IMPLS)
    naive.check_linear_shapes(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    y, _ = torch.ops.gla.glu_linear(x, weight, bias, act, impl, bool(recompute or not needs_grad))
    return y
