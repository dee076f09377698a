"""In-place writes in the user's graph: gla keeps every one, and rewrites nothing they make unsafe.

torch.fx counts ``call_method`` nodes as pure, so a plain dead-code pass drops ``x.copy_(y)`` whose
result is unused (DeepSeek-V3's key assembly, a static KV cache's ``index_copy_``). Each case runs
the same function under gla and eagerly, on fresh inputs, and compares outputs and the mutated
buffers.
"""
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import gla
from gla.rewrite.mutation import GraphWrites, is_impure, written_args
from gla.testing import rel_rms_error
from helpers import FAST, run_gla


def _writes_everywhere(x, buf, cache, idx):
    buf.add_(x)                      # call_method, result unused
    buf[0].mul_(3)                   # through a view
    y = torch.empty_like(x)
    y[:, :2].copy_(x[:, :2])         # new_empty + copy_ into slices (DeepSeek-V3's keys)
    y[:, 2:] = x[:, 2:] * 2          # operator.setitem
    y += 1                           # operator.iadd
    torch.relu_(y)                   # an in-place torch function
    z = x.clone()
    F.silu(z, inplace=True)          # inplace=True keyword: never respelled as a functional silu
    cache.index_copy_(0, idx, x)     # a static KV cache's update
    return buf * 2 + y + z + cache.sum(0)


@pytest.mark.parametrize("patterns", ["all", []])
def test_every_in_place_write_survives(patterns):
    torch.manual_seed(0)
    x, idx = torch.randn(4, 3), torch.tensor([2, 0, 1, 3])
    state = [torch.randn(4, 3), torch.randn(6, 3)]
    eager_state = [t.clone() for t in state]
    torch._dynamo.reset()
    out = torch.compile(_writes_everywhere, backend="gla", options=dict(FAST, patterns=patterns),
                        fullgraph=True)(x, *state, idx)
    ref = _writes_everywhere(x, *eager_state, idx)
    assert torch.equal(out, ref)
    for got, want in zip(state, eager_state):
        assert torch.equal(got, want)


def test_what_counts_as_a_write():
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    writes = [g.call_method("copy_", (a, b)), g.call_method("__iadd__", (a, b)),
              g.call_function(torch.relu_, (a,)), g.call_function(F.relu, (a,), {"inplace": True}),
              g.call_function(torch.add, (a, b), {"out": b}), g.call_function(torch.ops.aten.add_.Tensor, (a, b)),
              g.call_function(__import__("operator").setitem, (a, 0, b))]
    pure = [g.call_method("add", (a, b)), g.call_function(__import__("operator").and_, (a, b)),
            g.call_method("__and__", (a, b)), g.call_function(torch.ops.aten.add.Tensor, (a, b)),
            g.call_function(F.relu, (a,), {"inplace": False})]
    assert [written_args(n) for n in writes] == [(a,)] * 4 + [(b,), (a,), (a,)]
    assert all(is_impure(n) for n in writes)
    assert [written_args(n) for n in pure] == [()] * len(pure)


def _attention(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(s, dim=-1), v)


def test_a_write_between_the_patterns_reads_is_declined():
    """k is read by the scores, then written, then the attention ends: one call at the end would
    read the written k. Declined with the reason; the compiled function still computes eager's."""
    def fn(q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) / 8.0
        k.mul_(2.0)
        return torch.matmul(torch.softmax(s, dim=-1), v) + k.sum()

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 64) for _ in range(3))
    report = gla.explain(fn, q, k.clone(), v, options=FAST)
    assert report.counts["attention"] == 0, str(report)
    assert any("writes in place" in m.reason for m in report.near_misses), str(report)
    torch._dynamo.reset()
    k1, k2 = k.clone(), k.clone()
    out = torch.compile(fn, backend="gla", options=FAST)(q, k1, v)
    assert rel_rms_error(out, fn(q, k2, v)) <= 1e-6 and torch.equal(k1, k2)


@pytest.mark.parametrize("where", ["before", "after"])
def test_writes_before_or_after_the_pattern_leave_it_rewritten(where):
    """A write before the pattern's first read (keys assembled in place) or after its root
    changes nothing the fused call reads: the attention is still rewritten, and correct."""
    def fn(q, kv, v):
        k = kv.new_empty(kv.shape)
        if where == "before":
            k[..., :32].copy_(kv[..., :32])
            k[..., 32:].copy_(kv[..., 32:] * 2)
        else:
            k.copy_(kv)
        o = _attention(q, k, v)
        if where == "after":
            v.add_(1.0)
        return o

    torch.manual_seed(0)
    q, kv, v = (torch.randn(1, 2, 9, 64) for _ in range(3))
    report = gla.explain(fn, q, kv, v.clone(), options=FAST)
    assert report.counts["attention"] == 1, str(report)
    v1, v2 = v.clone(), v.clone()
    torch._dynamo.reset()
    out = torch.compile(fn, backend="gla", options=FAST)(q, kv, v1)
    assert rel_rms_error(out, fn(q, kv, v2)) <= 1e-6 and torch.equal(v1, v2)


def test_a_mask_written_in_place_is_runtime_data():
    """A causal mask from triu, then ``mask[5:, :3] = -inf``: no longer causal. The prover must not
    read it from its producer; it stays a bias, and the answer is eager's."""
    def fn(q, k, v):
        t = q.shape[-2]
        mask = torch.full((t, t), float("-inf")).triu(1)
        mask[5:, :3] = float("-inf")
        s = torch.matmul(q, k.transpose(-2, -1)) / 8.0 + mask
        return torch.matmul(torch.softmax(s, dim=-1), v)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 64) for _ in range(3))
    report, out, ref = run_gla(fn, q, k, v)
    assert report.counts["attention"] == 1, str(report)
    assert "causal" not in report.rewrites[0].kernel, str(report)
    assert rel_rms_error(out, ref) <= 1e-6


def test_graph_writes_are_told_apart_by_storage():
    gm = fx.symbolic_trace(lambda a, b: a)
    assert GraphWrites.of(gm.graph).writes == []

    seen = {}

    def backend(gm, example_inputs):
        w = GraphWrites.of(gm.graph, fresh=True)
        seen.update({n.name: w.written(n) for n in gm.graph.nodes if n.op != "output"})
        return gm.forward

    def fn(a, b):
        c = a.view(-1)
        c.add_(1)          # writes a's storage through a view
        return a * 2, b + 1

    torch.compile(fn, backend=backend, fullgraph=True)(torch.randn(2, 3), torch.randn(3))
    assert seen["l_a_"] and seen["c"] and not seen["l_b_"], seen


def test_linear_attention_proofs_read_no_written_tensor():
    """The linear-attention lowering proves a tril-of-ones mask causal and an initial state zero
    from their producers; written in place, neither holds, so neither is claimed."""
    from test_linear_attention_patterns import OPTS, inputs, run

    def par(q, k, v, g):  # [B, H, T, D]; the mask then loses key 0 for queries >= 3
        G = g.cumsum(2)
        mask = torch.tril(torch.ones(q.shape[2], q.shape[2]))
        mask[3:, 0] = 0.0
        return (((q * torch.exp(G)) @ (k * torch.exp(-G)).transpose(-1, -2)) * mask) @ v

    run(par, *inputs(8, "channel", "bhtd"), n=0)

    def loop(q, k, v, g):  # [B, T, H, D]; the "zero" state is overwritten with ones
        S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        S.fill_(1.0)
        outs = []
        for t in range(q.shape[1]):
            S = S * torch.exp(g[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        return torch.stack(outs, dim=1)

    report = run(loop, *inputs(5), n=1, options=OPTS)  # rewritten, reading S as the initial state
    assert "initial state" in report.rewrites[0].kernel, str(report)


# --- in-place arithmetic on a private tensor becomes the out-of-place op -------------------------------
@pytest.mark.parametrize("spelling", ["+= bias", "masked_fill_", "mul_", "/= sqrt(d)"])
def test_in_place_score_arithmetic_is_matched(spelling):
    """``scores += bias`` (MPNet, T5-style relative biases), ``scores.masked_fill_(...)``,
    ``scores *= c``: the scores are private to the attention, so the write is the out-of-place op
    and the attention rewrites; outputs and gradients are eager's."""
    def fn(q, k, v, bias, keep):
        s = torch.matmul(q, k.transpose(-2, -1))
        if spelling == "+= bias":
            s *= 0.125
            s += bias
        elif spelling == "masked_fill_":
            s.masked_fill_(~keep, float("-inf"))
        elif spelling == "mul_":
            s.mul_(0.5)
        else:
            s /= 4.0
        return torch.matmul(torch.softmax(s, dim=-1), v)

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 9, 9)
    keep = torch.rand(2, 1, 9, 9) > 0.3
    keep[..., 0] = True
    report = gla.explain(fn, q, k, v, bias, keep, options=FAST)
    assert report.counts["attention"] == 1, str(report)
    assert report.canonicalized.get("in-place ops on private tensors"), report.canonicalized
    gla.testing.assert_rewrites(fn, q, k, v, bias, keep, expect={"attention": 1}, grad=True)


def test_reads_before_a_private_write_keep_the_old_value():
    def fn(x, b):
        s = x * 2
        t = s.sum()          # before the write: the old value
        s += b               # fp16 += fp32: computed in fp32, stored in fp16
        s.mul_(3)
        return s, t

    x, b = torch.randn(5, 7).half(), torch.randn(5, 7)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="gla", options=FAST, fullgraph=True)(x, b)
    ref = fn(x, b)
    assert out[0].dtype == torch.float16 and torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_a_view_taken_after_a_private_write_sees_later_writes():
    """``s += 1; view = s.view(-1); s *= 2``: the first write may become out-of-place (the view is
    of its result), the second may not (the view would miss it); eager's answer either way."""
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1)
        s += 1.0
        view = s.view(-1)
        s *= 2.0
        return torch.softmax(s, -1) @ v, view.sum()

    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    torch._dynamo.reset()
    out = torch.compile(fn, backend="gla", options=FAST, fullgraph=True)(q, k, v)
    ref = fn(q, k, v)
    assert all(rel_rms_error(a, b) <= 1e-6 for a, b in zip(out, ref))


def test_writes_others_can_see_stay_writes():
    """A view of the scores is returned too, or the scores are an input: the write stays in
    place (the pattern then sees no add), and the answer is eager's."""
    def viewed(q, k, v, bias):
        s = torch.matmul(q, k.transpose(-2, -1))
        first = s[:, :1]
        s += bias
        return torch.matmul(torch.softmax(s, dim=-1), v), first

    def an_input(s, v, bias):
        s += bias
        return torch.matmul(torch.softmax(s, dim=-1), v)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    bias = torch.randn(1, 1, 9, 9)
    report = gla.explain(viewed, q, k, v, bias, options=FAST)
    assert report.counts["attention"] == 0 and not report.canonicalized.get("in-place ops on private tensors")
    torch._dynamo.reset()
    out = torch.compile(viewed, backend="gla", options=FAST)(q, k, v, bias)
    ref = viewed(q, k, v, bias)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, ref))
    s = torch.randn(1, 2, 9, 9)
    s1, s2 = s.clone(), s.clone()
    torch._dynamo.reset()
    out = torch.compile(an_input, backend="gla", options=FAST)(s1, v, bias)
    assert torch.allclose(out, an_input(s2, v, bias), atol=1e-6) and torch.equal(s1, s2)
