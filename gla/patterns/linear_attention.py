"""Gated linear attention (GLA) written in plain PyTorch → one ``chunk_gla`` call.

* The recurrence as a Python loop over time (Dynamo unrolls it into T steps)::

      S = torch.zeros(B, H, K, V)                      # or an initial state
      for t in range(T):
          S = S * torch.exp(g[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
          outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
      o = torch.stack(outs, dim=1)

  A fixed template cannot match every T, so the pattern is the ``torch.stack`` / ``torch.cat`` of
  the per-step outputs and the lowering (``gla.lowering.linear_attention.RecurrenceLowering``)
  walks the chain of steps back to the initial state; any other stack is "not mine".
* The parallel form: ``((q·exp(G)) @ (k·exp(-G))ᵀ ⊙ causal) @ v`` with ``G = cumsum(g)``, its
  one-gate-per-head variant ``((q @ kᵀ) ⊙ exp(G_i − G_j) ⊙ causal) @ v``, and ungated causal linear
  attention. The pattern is the final ``A @ v``; ``ParallelLowering`` reads A.

Gates: ``exp(x)`` (x is the log gate) and ``sigmoid(x)`` (log gate ``logsigmoid(x)``, exact since
sigmoid > 0); any other multiplier of S (``S * a_t``) is declined as a non-exponential gate.
"""
import torch

from ..lowering.linear_attention import ParallelLowering, RecurrenceLowering
from .registry import register_pattern


def stacked_outputs(outs, dim):
    return torch.stack(outs, dim)


def stacked_outputs_kw(outs, dim):
    return torch.stack(outs, dim=dim)


def stacked_outputs_time_major(outs):
    return torch.stack(outs)


def concatenated_outputs(outs, dim):
    return torch.cat(outs, dim)


def concatenated_outputs_kw(outs, dim):
    return torch.cat(outs, dim=dim)


register_pattern(
    "gla_recurrence",
    search=[stacked_outputs, stacked_outputs_kw, stacked_outputs_time_major, concatenated_outputs,
            concatenated_outputs_kw],
    replacement=RecurrenceLowering(),
    kind="linear_attention",
    priority=25,
    description="unrolled S_t = S_{t-1}·exp(g_t) + k_t⊗v_t, o_t = q_t S_t loop, outputs stacked over t",
)


def causal_product(scores, v):
    return torch.matmul(scores, v)


def causal_product_einsum(eq, scores, v):
    return torch.einsum(eq, scores, v)


register_pattern(
    "gla_parallel",
    search=[causal_product, causal_product_einsum],
    replacement=ParallelLowering(),
    kind="linear_attention",
    priority=25,
    description="(causal(q·exp(G) (k·exp(-G))ᵀ) or causal(q kᵀ ⊙ exp(G_i − G_j))) @ v, G = cumsum(g)",
)
