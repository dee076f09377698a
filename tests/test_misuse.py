"""Misuse and odd inputs: each gets a clear error or a decline with a reason, never a crash inside the
compiled model and never a wrong answer. (Invalid options, replacement signature / shape errors and
duplicate names are covered in test_backend.py.)"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import gla
from gla.testing import assert_rewrites

OPTS = {"inner": "aot_eager"}


def compiled_and_eager(fn, *args, options=OPTS):
    with torch.no_grad():
        report = gla.explain(fn, *args, options=options)
        torch._dynamo.reset()
        out = torch.compile(fn, backend="gla", options=options)(*args)
        ref = fn(*args)
    return report, out, ref


def attn(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


def causal_attn(q, k, v):
    i = torch.arange(q.shape[-2])
    mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
    return torch.softmax(q @ k.transpose(-2, -1) * 0.1 + mask, -1) @ v


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


ATTENTIONS = {"softmax": attn, "causal": causal_attn, "sdpa": sdpa_causal}


def qkv(t=6, d=8, dtype=torch.float32, b=2, h=2):
    g = torch.Generator().manual_seed(t * 1000 + d)
    return [torch.randn(b, h, t, d, generator=g).to(dtype) for _ in range(3)]


# ------------------------------------------------------------------------------------------------
# NaN / Inf inputs: propagated like eager (verification draws its own random inputs: unaffected)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["q_nan", "q_inf", "k_nan", "v_inf"])
@pytest.mark.parametrize("form", list(ATTENTIONS))
def test_attention_propagates_nan_and_inf_like_eager(form, where):
    q, k, v = qkv()
    name, bad = where.split("_")
    t = {"q": q, "k": k, "v": v}[name]
    # position 0: a key every causal row sees (a NaN key that a mask hides poisons eager's additive
    # mask but not the kernel, which skips it: see test_nan_in_a_masked_key)
    t[0, 1, 0 if name != "q" else 3, 2] = float(bad)
    report, out, ref = compiled_and_eager(ATTENTIONS[form], q, k, v)
    assert report.counts["attention"] == 1, str(report)
    if form == "causal" and where == "k_nan":
        # causal row 0 sees only the NaN key; PyTorch's CPU SDPA (the kernel gla runs on CPUs) gives 0
        # there instead of NaN. Known, reported: compare the rows that see more than one key.
        out, ref = out[:, :, 1:], ref[:, :, 1:]
    if form != "sdpa":  # eager F.scaled_dot_product_attention on CPU itself turns NaN rows into 0
        assert not torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-4, atol=1e-5)


def test_nan_in_a_masked_key():
    """Documented difference: eager adds the -inf causal mask to a NaN score (NaN for every row); the
    kernel never reads a key hidden by a proved causal mask, as F.scaled_dot_product_attention."""
    q, k, v = qkv()
    k[0, 0, -1, 0] = float("nan")  # only the last query row sees the last key
    _, out, ref = compiled_and_eager(causal_attn, q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1)
    torch.testing.assert_close(out, sdpa, equal_nan=True, rtol=1e-4, atol=1e-5)
    assert torch.isnan(out[0, 0, -1]).all() and torch.isnan(ref[0, 0]).all()


@pytest.mark.parametrize("where", ["nan", "inf", "-inf"])
def test_glu_and_gates_propagate_nan_and_inf_like_eager(where):
    torch.manual_seed(0)
    lin1, lin3, proj = torch.nn.Linear(8, 12), torch.nn.Linear(8, 12), torch.nn.Linear(8, 8)
    x = torch.randn(3, 8)
    x[1, 2] = float(where)
    gu = torch.randn(3, 24)
    gu[0, 1], gu[2, 13] = float(where), float(where)
    cases = [
        ("glu", lambda x: F.silu(lin1(x)) * lin3(x), (x,)),
        ("glu", lambda x: F.gelu(lin1(x)) * lin3(x), (x,)),
        ("glu", lambda gu: F.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1], (gu,)),
        ("gate", lambda x, y: torch.sigmoid(proj(x)) * y, (x, torch.randn(3, 8))),
        ("gate", lambda x, y: torch.sigmoid(y) * proj(x), (x, torch.randn(3, 8))),
    ]
    for kind, fn, args in cases:
        report, out, ref = compiled_and_eager(fn, *args)
        assert report.counts[kind] == 1, str(report)
        torch.testing.assert_close(out, ref, equal_nan=True)


def test_nan_inputs_do_not_disturb_verification():
    q, k, v = qkv()
    q.fill_(float("nan"))
    report, out, ref = compiled_and_eager(attn, q, k, v)
    assert report.counts["attention"] == 1 and report.rewrites[0].verification["rel_rms"] < 1e-5
    assert torch.isnan(out).all() and torch.isnan(ref).all()


# ------------------------------------------------------------------------------------------------
# Empty sequences, huge head dims, float64
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", list(ATTENTIONS))
def test_empty_sequence_runs_and_matches(form):
    q, k, v = qkv(t=0)
    report, out, ref = compiled_and_eager(ATTENTIONS[form], q, k, v)
    assert out.shape == ref.shape == (2, 2, 0, 8)
    assert report.counts["attention"] == 1 or report.near_misses, str(report)


def test_empty_keys_and_empty_batch():
    q, k, v = qkv(t=4)
    k0, v0 = k[:, :, :0], v[:, :, :0]
    report, out, ref = compiled_and_eager(attn, q, k0, v0)  # a sum over no keys: zeros in eager
    assert report.counts["attention"] == 1 or report.near_misses, str(report)
    torch.testing.assert_close(out, ref)
    q, k, v = (t[:0] for t in qkv())
    report, out, ref = compiled_and_eager(attn, q, k, v)
    assert out.shape == ref.shape == (0, 2, 6, 8)
    lin1, lin3 = torch.nn.Linear(8, 12), torch.nn.Linear(8, 12)
    report, out, ref = compiled_and_eager(lambda x: F.silu(lin1(x)) * lin3(x), torch.randn(0, 8))
    assert out.shape == ref.shape == (0, 12) and report.counts["glu"] == 1


@pytest.mark.parametrize("form", ["softmax", "sdpa"])
def test_huge_head_dim_declines_or_runs_and_matches(form):
    q, k, v = qkv(t=5, d=512, b=1, h=1)
    report, out, ref = compiled_and_eager(ATTENTIONS[form], q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if report.counts["attention"] == 0:
        assert any("head dim 512" in m.reason for m in report.near_misses), str(report)
    # forcing the Triton kernels: a decline with the reason, and the model still runs and matches
    report, out, ref = compiled_and_eager(ATTENTIONS[form], q, k, v, options=dict(OPTS, kernels="triton"))
    assert report.counts["attention"] == 0, str(report)
    assert any("head dim 512" in m.reason for m in report.near_misses), str(report)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_float64_runs_and_matches():
    q, k, v = qkv(dtype=torch.float64)
    for form, fn in ATTENTIONS.items():
        report, out, ref = compiled_and_eager(fn, q, k, v)
        assert out.dtype == torch.float64
        assert report.counts["attention"] == 1 or report.near_misses, (form, str(report))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    lin1, lin3 = torch.nn.Linear(8, 12).double(), torch.nn.Linear(8, 12).double()
    assert_rewrites(lambda x: F.silu(lin1(x)) * lin3(x), torch.randn(3, 8, dtype=torch.float64),
                    expect={"glu": 1}, grad=True)


def test_forced_triton_on_float64_declines_with_a_reason():
    q, k, v = qkv(dtype=torch.float64)
    report, out, ref = compiled_and_eager(attn, q, k, v, options=dict(OPTS, kernels="triton"))
    assert report.counts["attention"] == 0
    assert any("float64" in m.reason for m in report.near_misses), str(report)
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------------------------------------
# Aliased inputs and re-registered names (both once let a wrong answer or a false decline through)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_same_tensor_as_q_k_and_v(dtype):
    x = torch.randn(1, 2, 5, 8).to(dtype)
    report, out, ref = compiled_and_eager(attn, x, x, x)
    assert report.counts["attention"] == 1, str(report)  # verification reads kᵀ from the same k
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_reregistered_name_is_verified_again():
    f = lambda a, b: torch.sigmoid(a) * b
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    options = dict(OPTS, patterns=["custom"])
    with gla.pattern_scope():
        gla.register_pattern("p", search=lambda x, y: torch.sigmoid(x) * y, replacement=lambda x, y: y * torch.sigmoid(x))
        assert gla.explain(f, a, b, options=options).counts.get("custom") == 1
    with gla.pattern_scope():  # same name, same signature, a wrong replacement: not "verified (cached)"
        gla.register_pattern("p", search=lambda x, y: torch.sigmoid(x) * y, replacement=lambda x, y: torch.tanh(x) * y)
        with pytest.warns(UserWarning, match="kept the original"):
            report = gla.explain(f, a, b, options=options)
        assert report.counts.get("custom", 0) == 0 and "differs" in report.near_misses[0].reason
        torch._dynamo.reset()
        assert torch.equal(torch.compile(f, backend="gla", options=options)(a, b), f(a, b))


@pytest.mark.parametrize("verify", ["once", "off"])
def test_replacement_that_raises_is_declined(verify):
    def broken(x, y):
        raise RuntimeError("boom")

    gla.register_pattern("raises", search=lambda x, y: torch.sigmoid(x) * y, replacement=broken)
    f = lambda a, b: torch.sigmoid(a) * b
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    options = dict(OPTS, patterns=["custom"], verify=verify)
    with pytest.warns(UserWarning) if verify == "once" else contextlib.nullcontext():
        report, out, ref = compiled_and_eager(f, a, b, options=options)
    assert report.counts.get("custom", 0) == 0
    assert "RuntimeError: boom" in report.near_misses[0].reason, str(report)
    assert torch.equal(out, ref)
