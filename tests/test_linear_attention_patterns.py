"""Gated linear attention in plain PyTorch (unrolled loops, parallel forms) → one chunk_gla call."""
import pytest
import torch
import torch.nn.functional as F

import gla
from gla.testing import rel_rms_error

OPTS = {"inner": "aot_eager", "kernels": "reference"}
B, H, K, V = 2, 2, 8, 12


def run(fn, *args, n=1, options=OPTS, miss=None, grads=True):
    """Compile ``fn``; check the count, outputs and gradients against eager; return the report."""
    torch._dynamo.reset()
    report = gla.explain(fn, *args, options=options)
    assert report.counts["linear_attention"] == n, str(report)
    if miss is not None:
        assert any(miss in m.reason for m in report.near_misses), str(report)
    torch._dynamo.reset()
    mine = [a.detach().clone().requires_grad_(grads and a.is_floating_point()) for a in args]
    theirs = [a.detach().clone().requires_grad_(grads and a.is_floating_point()) for a in args]
    out = torch.compile(fn, backend="gla", options=options, fullgraph=True)(*mine)
    ref = fn(*theirs)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert rel_rms_error(o, r) <= 1e-5
    if grads:
        cots = [torch.randn_like(r) for r in refs]
        torch.autograd.backward(outs, cots)
        torch.autograd.backward(refs, cots)
        for a, b in zip(mine, theirs):
            assert rel_rms_error(a.grad, b.grad) <= 1e-5
    return report


def inputs(T, gate="channel", layout="bthd"):
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    g = {"channel": -torch.rand(B, T, H, K), "head": -torch.rand(B, T, H), "none": None}[gate]
    if layout == "bhtd":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        g = g.transpose(1, 2).contiguous() if g is not None else None
    return q, k, v, g


# --- the recurrence, unrolled by Dynamo --------------------------------------------------------------
def loop_bthd(q, k, v, g, scale=K ** -0.5):
    T = q.shape[1]
    S = torch.zeros(B, H, K, V)
    outs = []
    for t in range(T):
        S = S * torch.exp(g[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("T", [1, 7, 16])
def test_loop_per_channel_gate(T):
    r = run(loop_bthd, *inputs(T))
    assert f"T={T}" in r.rewrites[0].kernel and "per-channel" in r.rewrites[0].kernel
    assert not r.near_misses, str(r)


def test_loop_scalar_gate_bhtd_matmul_readout_cat():
    def loop(q, k, v, g):  # [B, H, T, D], one gate per head, q_t @ S readout, outputs concatenated
        S = q.new_zeros(B, H, K, V)
        outs = []
        for t in range(q.shape[2]):
            S = torch.exp(g[:, :, t])[..., None, None] * S + torch.einsum("bhk,bhv->bhkv", k[:, :, t], v[:, :, t])
            outs.append(q[:, :, t].unsqueeze(-2) @ S)
        return torch.cat(outs, dim=2)

    r = run(loop, *inputs(7, "head", "bhtd"))
    assert "per-head" in r.rewrites[0].kernel


def test_loop_no_gate_sum_readout():
    def loop(q, k, v):
        S = torch.zeros(B, H, K, V)
        outs = []
        for t in range(q.shape[1]):
            S = S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
            outs.append((q[:, t][..., None] * S).sum(-2) * 0.25)
        return torch.stack(outs, 1)

    q, k, v, _ = inputs(7, "none")
    r = run(loop, q, k, v)
    assert "no gate" in r.rewrites[0].kernel


def test_loop_initial_state_and_sigmoid_gate():
    def loop(q, k, v, a, S):
        outs = []
        for t in range(q.shape[1]):
            S = S * torch.sigmoid(a[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, dim=1)

    q, k, v, _ = inputs(7)
    r = run(loop, q, k, v, torch.randn(B, 7, H, K), torch.randn(B, H, K, V))
    assert "initial state" in r.rewrites[0].kernel and "sigmoid" in r.rewrites[0].kernel


def test_loop_triton_kernel():
    """The Triton kernel (interpreter on a CPU) takes decays: exp(logsigmoid(x)) is one for every x."""
    def loop(q, k, v, a):
        S = torch.zeros(B, H, K, V)
        outs = []
        log_a = F.logsigmoid(a)
        for t in range(q.shape[1]):
            S = S * torch.exp(log_a[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, dim=1)

    q, k, v, _ = inputs(7)
    r = run(loop, q, k, v, torch.randn(B, 7, H, K), options={"inner": "aot_eager", "kernels": "triton"}, grads=False)
    assert "[triton]" in r.rewrites[0].kernel
    # an arbitrary log gate may be positive: the Triton kernel cannot take it, the rewrite says why
    run(loop_bthd, *inputs(5), n=0, options={"inner": "aot_eager", "kernels": "triton"}, miss="not provably", grads=False)


# --- look-alikes that must stay as written ------------------------------------------------------------
def test_intermediate_states_used_elsewhere():
    def loop(q, k, v, g):
        S = torch.zeros(B, H, K, V)
        outs, states = [], []
        for t in range(q.shape[1]):
            S = S * torch.exp(g[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
            states.append(S)
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, 1), torch.stack(states[:-1], 1)  # intermediate states only

    run(loop, *inputs(5), n=0, miss="intermediate state", grads=False)


def test_non_exponential_gate():
    def loop(q, k, v, a):
        S = torch.zeros(B, H, K, V)
        outs = []
        for t in range(q.shape[1]):
            S = S * a[:, t][..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, 1)

    q, k, v, _ = inputs(5)
    run(loop, q, k, v, torch.rand(B, 5, H, K), n=0, miss="non-exponential gate", grads=False)


def test_delta_rule():
    def loop(q, k, v):
        S = torch.zeros(B, H, K, V)
        outs = []
        for t in range(q.shape[1]):
            kt = F.normalize(k[:, t], dim=-1)
            S = S + kt[..., None] * (v[:, t] - (kt[..., None] * S).sum(-2))[..., None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, 1)

    q, k, v, _ = inputs(5, "none")
    run(loop, q, k, v, n=0, miss="delta rule", grads=False)


def test_nonlinear_state():
    def loop(q, k, v, g):
        S = torch.zeros(B, H, K, V)
        outs = []
        for t in range(q.shape[1]):
            S = torch.tanh(S * torch.exp(g[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :])
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, 1)

    run(loop, *inputs(5), n=0, miss="nonlinearity", grads=False)


def test_final_state_returned_is_declined():
    def loop(q, k, v, g):
        S = torch.zeros(B, H, K, V)
        outs = []
        for t in range(q.shape[1]):
            S = S * torch.exp(g[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, 1), S

    run(loop, *inputs(5), n=0, miss="final state", grads=False)


# --- the parallel (cumulative log-gate) form ----------------------------------------------------------
def test_parallel_per_channel():
    def par(q, k, v, g):  # [B, H, T, D]
        G = g.cumsum(2)
        A = (q * torch.exp(G)) @ (k * torch.exp(-G)).transpose(-1, -2)
        A = A.masked_fill(~torch.tril(torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)), 0)
        return (A * K ** -0.5) @ v

    r = run(par, *inputs(16, "channel", "bhtd"))
    assert "parallel form, per-channel" in r.rewrites[0].kernel


def test_parallel_per_channel_bthd_einsum():
    def par(q, k, v, g):  # [B, T, H, D]
        G = g.cumsum(1)
        A = torch.einsum("bthk,bshk->bhts", q * G.exp(), k / G.exp()).tril()
        return torch.einsum("bhts,bshv->bthv", A, v)

    run(par, *inputs(9, "channel"))


def test_parallel_scalar_gate():
    def par(q, k, v, g):  # g [B, H, T]
        T = q.shape[2]
        G = torch.cumsum(g, -1)
        D = torch.exp(G[..., :, None] - G[..., None, :]) * torch.tril(torch.ones(T, T))
        return ((q @ k.transpose(-1, -2)) * D) @ v

    r = run(par, *inputs(12, "head", "bhtd"))
    assert "per-head" in r.rewrites[0].kernel


def test_parallel_look_alikes():
    q, k, v, g = inputs(8, "channel", "bhtd")
    # not causal: plain (non-causal) linear attention
    run(lambda q, k, v: (q @ k.transpose(-1, -2)) @ v, q, k, v, n=0, grads=False)
    # a mask from outside the graph is runtime data: it cannot be proved causal
    mask = torch.tril(torch.ones(8, 8))
    run(lambda q, k, v, m: ((q @ k.transpose(-1, -2)) * m) @ v, q, k, v, mask, n=0, grads=False)


def test_consumed_nodes_are_not_matched_again():
    """sigmoid(a_t) * S is also a `gate` look-alike: once the recurrence is rewritten it must be gone."""
    def loop(q, k, v, a):
        S = torch.zeros(B, H, K, V)
        outs = []
        for t in range(q.shape[1]):
            S = torch.sigmoid(a[:, t, :, :, None]) * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, dim=1)

    q, k, v, _ = inputs(4)
    r = run(loop, q, k, v, torch.randn(B, 4, H, K))
    assert r.counts["gate"] == 0, str(r)
