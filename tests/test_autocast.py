"""Mixed precision: attention and GLUs under ``torch.autocast`` (bf16 on the CPU here).

Under autocast a model's q and k are often fp32 (RoPE promotes them) while v is bf16, and its
matmuls run in bf16 anyway. gla casts q, k, v to the autocast dtype, as the original's matmuls do,
and verifies under the same autocast. Accuracy is judged against float64 (``assert_rewrites``:
no worse than twice eager's own error), since gla's kernel keeps the scores in fp32 where eager
rounds them to bf16.
"""
import math

import pytest
import torch

import gla
from gla.testing import assert_rewrites, rel_rms_error
from helpers import FAST

transformers = pytest.importorskip("transformers")
AMP = dict(device_type="cpu", dtype=torch.bfloat16)


class AutocastLoss(torch.nn.Module):
    """A transformers Llama's training loss, its forward under autocast (in the compiled graph)."""

    def __init__(self, device_type="cpu"):
        super().__init__()
        self.amp = dict(AMP, device_type=device_type)
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        self.m = transformers.LlamaForCausalLM(cfg)
        self.m.set_attn_implementation("eager")

    def forward(self, ids):
        with torch.autocast(**self.amp):
            return self.m(ids, labels=ids, use_cache=False).loss


def test_llama_training_under_autocast():
    """RoPE leaves q, k in fp32 and v in bf16: before, 'mixed dtypes' declined every attention and
    'changes dtype' every GLU. Now both rewrite, and loss and gradients are as accurate as eager's."""
    model = AutocastLoss().train()
    ids = torch.randint(1, 128, (2, 19))
    # bf16's tolerance: the matmuls run in bf16 (beyond it, float64 arbitrates, see assert_rewrites)
    report = assert_rewrites(model, ids, expect={"attention": 2, "glu": 2}, grad=True, rtol=1e-2)
    # the case itself: fp32 q and k, bf16 v (a match with one dtype would need no cast)
    assert all(r.dtypes["q"] == "float32" and r.dtypes["v"] == "bfloat16"
               for r in report.rewrites if r.kind == "attention"), str(report)


def test_checkpointed_layers_inherit_the_autocast_state():
    """A checkpointed layer's body is its own graph, with no autocast node in it: it runs under
    the state at its call (here the graph's autocast region)."""
    model = AutocastLoss().train()
    model.m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(1, 128, (2, 19))
    assert_rewrites(model, ids, expect={"attention": 2, "glu": 2}, grad=True, rtol=1e-2)


@pytest.mark.gpu
def test_llama_training_under_cuda_autocast_runs_glas_kernel():
    """The same on a GPU: the attention is gla's Triton kernel on the bf16-cast q, k, v."""
    model = AutocastLoss("cuda").train().cuda()
    ids = torch.randint(1, 128, (2, 19), device="cuda")
    report = assert_rewrites(model, ids, expect={"attention": 2, "glu": 2}, grad=True, rtol=1e-2,
                             options={"inner": "aot_eager", "kernels": "triton"})
    assert all("gla::attention[triton]" in r.kernel for r in report.rewrites if r.kind == "attention"), str(report)


def _attention(x, wq, wk, wv):
    q, k, v = ((x @ w).unflatten(-1, (2, 16)).transpose(1, 2) for w in (wq, wk, wv))
    up = torch.promote_types(q.dtype, torch.float32)  # q, k upcast (float64 stays), v not
    s = torch.matmul(q.to(up), k.to(up).transpose(-2, -1)) / math.sqrt(16)
    return torch.matmul(torch.softmax(s, -1), v)


def test_ambient_autocast_around_the_compiled_call():
    """Autocast entered around the compiled call (HF Trainer, accelerate): no autocast node in the
    graph, the state is read when the graph is compiled."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    ws = [torch.randn(32, 32, dtype=torch.float64) / 6 for _ in range(3)]
    truth = _attention(x, *ws)
    x32, ws32 = x.float(), [w.float() for w in ws]
    with torch.autocast(**AMP):
        report = gla.explain(_attention, x32, *ws32, options=FAST)
        torch._dynamo.reset()
        out = torch.compile(_attention, backend="gla", options=FAST)(x32, *ws32)
        ref = _attention(x32, *ws32)
    assert report.counts["attention"] == 1, str(report)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_rms_error(out, truth) <= 2 * rel_rms_error(ref, truth) + 1e-3


def test_a_pattern_crossing_an_autocast_boundary_is_declined():
    def fn(q, k, v):
        with torch.autocast(**AMP):
            s = q @ k.transpose(-2, -1)          # bf16
        return torch.softmax(s.float() * 0.25, -1) @ v   # fp32, outside the region

    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    report = gla.explain(fn, q, k, v, options=FAST)
    assert report.counts["attention"] == 0
    assert any("autocast" in m.reason for m in report.near_misses), str(report)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, backend="gla", options=FAST)(q, k, v), fn(q, k, v))
