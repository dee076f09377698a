"""Pure-PyTorch references for the GLU ops: any dtype (float64 included), differentiable.

``glu_reference(a, b, act) = act(a) * b``; the packed and linear forms are built on it. The
``*_backward_reference`` functions are the closed-form gradients the ``"reference"`` backward op
runs (the Triton backward computes the same formulas); the tests check them against autograd.

Half-precision inputs are computed in float32 and rounded once at the end (what the Triton
kernels do), so the references are a fair yardstick for the kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "sigmoid", "relu")

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_K = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def check_activation(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} unknown; expected one of {', '.join(ACTIVATIONS)}")


def _opmath(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def activation(a: torch.Tensor, act: str) -> torch.Tensor:
    """act(a), differentiable, in a's dtype."""
    if act == "silu":
        return F.silu(a)
    if act == "gelu":
        return F.gelu(a)
    if act == "gelu_tanh":
        return F.gelu(a, approximate="tanh")
    if act == "sigmoid":
        return torch.sigmoid(a)
    if act == "relu":
        return torch.relu(a)
    check_activation(act)
    raise AssertionError("unreachable")


def activation_and_grad(a: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(a), act'(a)) in closed form: the formulas the Triton backward uses."""
    if act == "silu":
        s = torch.sigmoid(a)
        return a * s, s * (1.0 + a * (1.0 - s))
    if act == "sigmoid":
        s = torch.sigmoid(a)
        return s, s * (1.0 - s)
    if act == "relu":
        pos = a > 0
        return torch.where(pos, a, torch.zeros_like(a)), pos.to(a.dtype)
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a * _SQRT1_2))
        pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
        return a * cdf, cdf + a * pdf
    if act == "gelu_tanh":
        inner = _GELU_TANH_K * (a + _GELU_TANH_C * a * a * a)
        t = torch.tanh(inner)
        d_inner = _GELU_TANH_K * (1.0 + 3.0 * _GELU_TANH_C * a * a)
        return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * d_inner
    check_activation(act)
    raise AssertionError("unreachable")


def split_packed(x: torch.Tensor, gate_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (gate, value) of a packed [..., 2F] tensor (no copies)."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"packed GLU input needs an even last dimension, got shape {tuple(x.shape)}")
    first, second = x.chunk(2, dim=-1)
    return (first, second) if gate_first else (second, first)


# ---------------------------------------------------------------------------------------------
# Forward references
# ---------------------------------------------------------------------------------------------


def glu_reference(a: torch.Tensor, b: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(a) * b in a's dtype (computed in float32 for half inputs)."""
    check_activation(act)
    if a.shape != b.shape:
        raise ValueError(f"glu: a and b need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (activation(_opmath(a), act) * _opmath(b)).to(a.dtype)


def glu_packed_reference(x: torch.Tensor, act: str = "silu", gate_first: bool = True) -> torch.Tensor:
    """gate_first: act(x[..., :F]) * x[..., F:]; else x[..., :F] * act(x[..., F:]) (F.glu order)."""
    gate, value = split_packed(x, gate_first)
    return glu_reference(gate, value, act)


def glu_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str = "silu"
) -> torch.Tensor:
    """act(x W_gᵀ + b_g) * (x W_uᵀ + b_u) with packed weight [2F, d] (gate rows first)."""
    check_linear_shapes(x, weight, bias)
    return glu_packed_reference(F.linear(x, weight, bias), act, gate_first=True)


def check_linear_shapes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise ValueError(f"glu_linear: weight must be [2F, d], got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"glu_linear: x's last dimension must equal weight.shape[1]={weight.shape[1]}, "
            f"got x of shape {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"glu_linear: bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    dtypes = {t.dtype for t in (x, weight, bias) if t is not None}
    if len(dtypes) > 1:
        raise ValueError(f"glu_linear: x, weight and bias need one dtype, got {sorted(map(str, dtypes))}")


# ---------------------------------------------------------------------------------------------
# Closed-form backward references
# ---------------------------------------------------------------------------------------------


def glu_backward_reference(
    dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, act: str = "silu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d a, d b) of y = act(a) * b."""
    check_activation(act)
    s, ds = activation_and_grad(_opmath(a), act)
    g = _opmath(dy)
    return (g * _opmath(b) * ds).to(a.dtype), (g * s).to(b.dtype)


def glu_packed_backward_reference(
    dy: torch.Tensor, x: torch.Tensor, act: str = "silu", gate_first: bool = True
) -> torch.Tensor:
    """d x of y = glu_packed(x): the two halves' gradients concatenated in x's order."""
    gate, value = split_packed(x, gate_first)
    d_gate, d_value = glu_backward_reference(dy, gate, value, act)
    parts = (d_gate, d_value) if gate_first else (d_value, d_gate)
    return torch.cat(parts, dim=-1)
