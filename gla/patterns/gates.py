"""Gates: ``sigmoid(g) ⊙ y`` (gated residuals, squeeze-excitation, shared-expert gates) and
``silu(g) ⊙ y`` (gated RMSNorm output gates), where y is another branch."""
import torch
import torch.nn.functional as F

from ..lowering.glu import GateLowering
from .registry import register_pattern


def sigmoid_gate(g, y):
    return torch.sigmoid(g) * y


def silu_gate(g, y):
    return F.silu(g) * y


def _is_linear(n):
    return getattr(n, "op", None) == "call_function" and n.target is F.linear


def not_a_glu(match):
    """silu(x W₁) ⊙ (x W₃) is a GLU; when the GLU pattern declined it, the gate must not take it."""
    g, y = match.captures["g"], match.captures["y"]
    if _is_linear(g) and _is_linear(y) and g.args[0] is y.args[0]:
        return "silu(x W1) * (x W3) is a GLU (see the glu near miss), not an output gate"
    return None


register_pattern("sigmoid_gate", search=sigmoid_gate, replacement=GateLowering("sigmoid"), kind="gate",
                 guards=[not_a_glu], description="sigmoid(g) * y")
register_pattern("silu_gate", search=silu_gate, replacement=GateLowering("silu"), kind="gate",
                 guards=[not_a_glu], description="silu(g) * y (gated RMSNorm)")
