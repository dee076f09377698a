"""GLU MLPs: ``act(x W₁ + b₁) ⊙ (x W₃ + b₃)`` — SwiGLU, GeGLU (exact and tanh), GLU, ReGLU.

Written as two projections of the same x, as one packed gate_up projection split by
``chunk``/``split``, or as ``F.glu``. ``x * sigmoid(x)`` is silu after canonicalization.
"""
import torch
import torch.nn.functional as F

from ..lowering.glu import GLULowering
from .registry import register_pattern

ACTS = {
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
}


def _linears(act):
    def glu_linears(x, w_gate, b_gate, w_up, b_up):
        return act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)
    return glu_linears


def _packed(act):
    def glu_packed(gate_up):
        parts = torch.chunk(gate_up, 2, -1)
        return act(parts[0]) * parts[1]
    return glu_packed


for name, act in ACTS.items():
    register_pattern(f"glu_{name}", search=_linears(act), replacement=GLULowering(name), kind="glu", priority=10,
                     description=f"{name}(x W_gate) * (x W_up), separate projections")
    register_pattern(f"glu_{name}_packed", search=_packed(act), replacement=GLULowering(name, packed=True),
                     kind="glu", priority=10, description=f"{name}(gate) * up from one packed gate_up tensor")


def functional_glu(gate_up):
    return F.glu(gate_up, -1)


register_pattern("glu_functional", search=functional_glu, kind="glu", priority=10,
                 replacement=GLULowering("sigmoid", packed=True, gate_first=False),
                 description="F.glu(x, -1): x[..., :F] * sigmoid(x[..., F:])")
