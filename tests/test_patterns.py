"""Each family: spellings that must match (outputs equal eager) and look-alikes that must not."""
import math

import pytest
import torch
import torch.nn.functional as F

import gla
from gla.testing import rel_rms_error
from helpers import position_mask

OPTS = {"inner": "aot_eager"}


def check(fn, *args, expect: dict, miss: str | None = None, tol=1e-5):
    torch._dynamo.reset()
    with torch.no_grad():
        report = gla.explain(fn, *args, options=OPTS)
        torch._dynamo.reset()
        out = torch.compile(fn, backend="gla", options=OPTS, fullgraph=True)(*args)
        ref = fn(*args)
    for kind, n in expect.items():
        assert report.counts[kind] == n, f"{kind}: {report.counts} \n{report}"
    assert rel_rms_error(out, ref) <= tol
    if miss is not None:
        assert any(miss in m.reason for m in report.near_misses), str(report)
    return report


B, H, T, D = 2, 4, 63, 40


def qkv(h=H, hkv=H, t=T, d=D):
    return torch.randn(B, h, t, d), torch.randn(B, hkv, t, d), torch.randn(B, hkv, t, d)


@pytest.mark.parametrize("spelling", ["matmul", "div", "einsum", "bmm", "folded", "sqrt_both", "upcast"])
def test_attention_spellings(spelling):
    s = 1 / math.sqrt(D)

    def attn(q, k, v):
        if spelling == "matmul":
            w = torch.matmul(q, k.transpose(-2, -1)) * s
        elif spelling == "div":
            w = q @ k.transpose(2, 3) / math.sqrt(D)
        elif spelling == "einsum":
            w = torch.einsum("bhqd,bhkd->bhqk", q, k) * s
        elif spelling == "bmm":
            q2, k2, v2 = (x.reshape(B * H, T, D) for x in (q, k, v))
            p = torch.softmax(torch.bmm(q2, k2.transpose(1, 2)) * s, dim=-1)
            return torch.bmm(p, v2).view(B, H, T, D)
        elif spelling == "folded":
            w = (q * s) @ k.transpose(-2, -1)
        elif spelling == "sqrt_both":
            w = (q * math.sqrt(s)) @ (k * math.sqrt(s)).transpose(-2, -1)
        else:
            w = (q @ k.transpose(-2, -1) * s).float()
            return F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return torch.softmax(w, dim=-1) @ v

    check(attn, *qkv(), expect={"attention": 1})


def test_masks_and_causal_proof():
    def causal_arange(q, k, v):
        i = torch.arange(q.shape[-2])  # built in the graph: provable at every length
        mask = torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(torch.float32).min)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.1 + mask, -1) @ v

    r = check(causal_arange, *qkv(), expect={"attention": 1})
    assert "causal" in r.rewrites[0].kernel

    def window(q, k, v):
        i = torch.arange(q.shape[-2])
        keep = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 8)
        return torch.softmax((q @ k.transpose(-2, -1) * 0.1).masked_fill(~keep, float("-inf")), -1) @ v

    # ~keep is not an arange comparison: kept as a general mask, still exact
    check(window, *qkv(), expect={"attention": 1})

    buffer = torch.triu(torch.full((T, T), float("-inf")), 1)  # runtime data, not a proof of causality
    r = check(lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) + buffer, -1) @ v, *qkv(), expect={"attention": 1})
    assert "bias" in r.rewrites[0].kernel

    def bool_padding(q, k, v, pad):
        w = q @ k.transpose(-2, -1) * 0.1
        return torch.softmax(w.masked_fill(pad[:, None, None, :], torch.finfo(w.dtype).min), -1) @ v

    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -5:] = True
    check(bool_padding, *qkv(), pad, expect={"attention": 1})


@pytest.mark.parametrize("form", ["repeat_kv", "repeat_interleave", "enable_gqa"])
def test_gqa_without_repeat(form):
    def attn(q, k, v):
        n = q.shape[1] // k.shape[1]
        if form == "enable_gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if form == "repeat_kv":
            b, h, t, d = k.shape
            k = k[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)
            v = v[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)
        else:
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.2, -1) @ v

    r = check(attn, *qkv(h=8, hkv=2), expect={"attention": 1})
    if form != "enable_gqa":
        assert "GQA 4:1" in r.rewrites[0].kernel


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"scale": 0.3}, {"attn_mask": "bool"}, {"attn_mask": "float"}])
def test_sdpa(kw):
    kw = dict(kw)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(B, 1, T, T) > 0.3
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(B, H, T, T)
    check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw), *qkv(), expect={"attention": 1})


def test_must_not_match_returned_probabilities():
    def attn(q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.1, -1)
        return p @ v, p

    torch._dynamo.reset()
    with torch.no_grad():
        r = gla.explain(attn, *qkv(), options=OPTS)
    assert r.counts["attention"] == 0
    assert any("softmax output" in m.reason and "2 users" in m.reason for m in r.near_misses), str(r)


def test_must_not_match_soft_capping():
    attn = lambda q, k, v: torch.softmax(torch.tanh(q @ k.transpose(-2, -1) * 0.1 / 30.0) * 30.0, -1) @ v
    check(attn, *qkv(), expect={"attention": 0}, miss="soft-capping")


def test_must_not_match_soft_capping_with_a_mask():
    """Gemma 2's spelling: scores / cap → tanh → · cap, then the mask, then softmax."""
    i = torch.arange(T)
    mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
    attn = lambda q, k, v: torch.softmax(  # noqa: E731
        torch.tanh(q @ k.transpose(-2, -1) * 0.1 / 50.0) * 50.0 + mask, -1, dtype=torch.float32) @ v
    check(attn, *qkv(), expect={"attention": 0}, miss="soft-capping")


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_with_one_kv_head_broadcast(is_causal):
    """MQA written as SDPA broadcasting one kv head over the query heads (Falcon)."""
    q, k, v = qkv(hkv=1)
    r = check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), q, k, v,
              expect={"attention": 1})
    assert ("causal" in r.rewrites[0].kernel) == is_causal
    k2 = torch.randn(1, 1, T, D)  # a batch broadcast is declined with its reason, eager runs
    check(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k2, k2, expect={"attention": 0},
          miss="broadcast over the batch")


def test_must_not_match_sigmoid_attention():
    attn = lambda q, k, v: torch.sigmoid(q @ k.transpose(-2, -1) * 0.1) @ v
    check(attn, *qkv(), expect={"attention": 0}, miss="sigmoid attention")


def test_must_not_match_softmax_over_other_dim():
    attn = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.1, dim=-2) @ v
    check(attn, *qkv(), expect={"attention": 0}, miss="softmax with argument -1")


def test_must_not_match_data_dependent_scale():
    attn = lambda q, k, v, t: torch.softmax(q @ k.transpose(-2, -1) * t, -1) @ v
    check(attn, *qkv(), torch.rand(H, 1, 1) + 0.5, expect={"attention": 0}, miss="tensor")


@pytest.mark.parametrize("act", ["silu", "silu_mul", "gelu", "gelu_tanh", "sigmoid", "relu"])
def test_glu_separate(act):
    fn = {"silu": F.silu, "silu_mul": lambda t: t * torch.sigmoid(t), "gelu": F.gelu,
          "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "sigmoid": torch.sigmoid, "relu": F.relu}[act]
    lin1, lin3, down = torch.nn.Linear(40, 72), torch.nn.Linear(40, 72, bias=False), torch.nn.Linear(72, 40)
    check(lambda x: down(fn(lin1(x)) * lin3(x)), torch.randn(3, 7, 40), expect={"glu": 1, "gate": 0})


@pytest.mark.parametrize("split", ["chunk", "split", "glu"])
def test_glu_packed(split):
    lin = torch.nn.Linear(40, 144)

    def mlp(x):
        gu = lin(x)
        if split == "glu":
            return F.glu(gu, dim=-1)
        g, u = gu.chunk(2, dim=-1) if split == "chunk" else gu.split(72, dim=-1)
        return F.silu(g) * u

    check(mlp, torch.randn(5, 40), expect={"glu": 1})


def test_glu_with_reused_intermediate_is_untouched():
    lin1, lin3 = torch.nn.Linear(16, 24), torch.nn.Linear(16, 24)

    def mlp(x):
        h = F.silu(lin1(x))
        return h * lin3(x) + h

    check(mlp, torch.randn(4, 16), expect={"glu": 0, "gate": 0}, miss="users")


def test_gates():
    proj = torch.nn.Linear(16, 16)
    se = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 8))

    check(lambda x, y: torch.sigmoid(proj(x)) * y, torch.randn(4, 16), torch.randn(4, 16), expect={"gate": 1})
    check(lambda x: torch.sigmoid(se(x.mean((2, 3)))[:, :, None, None]) * x, torch.randn(2, 8, 5, 5),
          expect={"gate": 1})
    norm = torch.nn.RMSNorm(16)
    check(lambda o, g: norm(o) * F.silu(g), torch.randn(4, 16), torch.randn(4, 16), expect={"gate": 1})


@pytest.mark.parametrize("gate_form", ["flat", "bthd", "headwise"])
def test_gated_attention(gate_form):
    def block(q, k, v, g):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        if gate_form == "flat":
            return o.reshape(B, T, H * D) * torch.sigmoid(g.reshape(B, T, H * D))
        return o * torch.sigmoid(g)

    g = torch.randn(B, T, H, 1 if gate_form == "headwise" else D)
    r = check(block, *qkv(), g, expect={"gated_attention": 1, "attention": 0, "gate": 0})
    assert ("headwise" if gate_form == "headwise" else "elementwise") in r.rewrites[0].kernel


def test_causal_proof_through_masked_fill():
    def attn(q, k, v):
        i = torch.arange(q.shape[-2])
        w = (q @ k.transpose(-2, -1) * 0.1).masked_fill(i[None, :] > i[:, None], float("-inf"))
        return torch.softmax(w, -1) @ v

    r = check(attn, *qkv(), expect={"attention": 1})
    assert "causal" in r.rewrites[0].kernel


def test_rows_eager_leaves_undefined_do_not_block_the_rewrite():
    # tiny T: random masks in verification often mask a whole row, where eager gives NaN
    def attn(q, k, v, pad):
        w = (q @ k.transpose(-2, -1)).masked_fill(pad[:, None, None, :], float("-inf"))
        return torch.softmax(w, -1) @ v

    q, k, v = (torch.randn(1, 2, 2, 8) for _ in range(3))
    pad = torch.tensor([[False, True]])
    r = check(attn, q, k, v, pad, expect={"attention": 1})
    assert r.rewrites[0].verification["rel_rms"] <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("form", ["masked_fill", "where"])
def test_rows_with_every_key_masked_by_a_finite_fill(form, dtype):
    """A row whose every score is replaced by finfo.min is a uniform softmax: the mean of v. As an
    additive bias the scores' differences survive (fp16's min is only -65504), so gla sets those
    rows explicitly; batch 1 is all padding, GQA 2:1."""
    def attn(q, k, v, pad):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        w = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        fill = torch.finfo(w.dtype).min
        if form == "masked_fill":
            w = w.masked_fill(pad[:, None, None, :], fill)
        else:
            w = torch.where(~pad[:, None, None, :], w, fill)
        return torch.softmax(w, -1) @ v

    q, k, v = (x.to(dtype) for x in qkv(h=4, hkv=2, t=7))
    pad = torch.rand(B, 7) < 0.4
    pad[0, 0], pad[1] = False, True
    r = check(attn, q, k, v, pad, expect={"attention": 1}, tol=1e-5 if dtype == torch.float32 else 2e-3)
    assert "bias" in r.rewrites[0].kernel


def test_sdpa_bool_mask_rows_with_no_key_stay_as_sdpa_gives_them():
    """The -inf counterpart of the test above: SDPA's boolean mask leaves a row with no visible key
    to SDPA's convention (0), not the mean of v."""
    def attn(q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)

    q, k, v = qkv(h=4, hkv=2, t=7)
    keep = torch.rand(B, 7) > 0.4
    keep[0, 0], keep[1] = True, False
    check(attn, q, k, v, keep, expect={"attention": 1})


def test_gated_attention_gate_split_per_kv_group():
    """The paper's layout: q_proj columns grouped per KV head as [q heads of the group | their gates]."""
    hkv, n_rep, d, t = 2, 2, 16, 11
    h = hkv * n_rep
    q_proj = torch.nn.Linear(32, 2 * h * d, bias=False)
    k_proj, v_proj = torch.nn.Linear(32, hkv * d, bias=False), torch.nn.Linear(32, hkv * d, bias=False)

    def block(x):
        b = x.shape[0]
        qg = q_proj(x).view(b, t, hkv, 2 * n_rep * d)
        q, g = torch.split(qg, [n_rep * d, n_rep * d], dim=-1)
        q = q.reshape(b, t, h, d).transpose(1, 2)
        g = g.reshape(b, t, h * d)
        k = k_proj(x).view(b, t, hkv, d).transpose(1, 2)
        v = v_proj(x).view(b, t, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2).reshape(b, t, h * d) * torch.sigmoid(g)

    check(block, torch.randn(2, t, 32), expect={"gated_attention": 1, "gate": 0})


def test_gate_indexed_after_the_activation():
    se = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 8))
    check(lambda x: torch.sigmoid(se(x.mean((2, 3))))[:, :, None, None] * x, torch.randn(2, 8, 5, 5),
          expect={"gate": 1})
    check(lambda g, y: torch.sigmoid(g).unsqueeze(-1) * y, torch.randn(3, 4), torch.randn(3, 4, 6), expect={"gate": 1})


@pytest.mark.parametrize("form", ["triu_full", "tril_ones_keep"])
def test_causal_proof_from_triangular_masks_built_in_the_graph(form):
    def attn(q, k, v):
        t = q.shape[-2]
        w = q @ k.transpose(-2, -1) * 0.1
        if form == "triu_full":
            w = w + torch.triu(torch.full((t, t), float("-inf")), 1)
        else:
            w = torch.where(torch.tril(torch.ones(t, t, dtype=torch.bool)), w, float("-inf"))
        return torch.softmax(w, -1) @ v

    r = check(attn, *qkv(), expect={"attention": 1})
    assert "causal" in r.rewrites[0].kernel


@pytest.mark.parametrize("spelling", ["operators", "methods", "functions"])
def test_causal_proof_of_a_mask_built_from_position_ids(spelling):
    def attn(q, k, v):
        positions = (torch.arange(q.shape[-2]) + 0).unsqueeze(0).expand(q.shape[0], -1)
        mask = position_mask(positions, spelling=spelling)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.1 + mask[:, :, :, : k.shape[-2]], -1) @ v

    r = check(attn, *qkv(), expect={"attention": 1})
    assert "causal" in r.rewrites[0].kernel, str(r)


@pytest.mark.parametrize("spelling", ["operators", "methods"])
@pytest.mark.parametrize("case", ["positions_given", "positions_restart", "prepend_without_shift",
                                  "negative_index"])
def test_position_masks_that_are_not_provably_causal_stay_a_bias(case, spelling):
    """Look-alikes: runtime position ids (packed sequences), positions that restart (not affine),
    a prepend that makes the first diff 0 (the packed ids are not all equal), and index tensors
    that reach -1 (which would wrap around). Each stays an exact general bias."""
    q, k, v = qkv()
    given = torch.arange(T).unsqueeze(0).expand(B, -1).clone()
    given[1, 40:] -= 40  # two packed sequences in batch 1

    def attn(q, k, v, given):
        t = q.shape[-2]
        if case == "positions_given":
            mask = position_mask(given, spelling=spelling)
        elif case == "positions_restart":
            mask = position_mask((torch.arange(t) % 40).unsqueeze(0).expand(q.shape[0], -1), spelling=spelling)
        elif case == "prepend_without_shift":
            mask = position_mask(torch.arange(t).unsqueeze(0).expand(q.shape[0], -1), prepend_shift=0,
                                 spelling=spelling)
        else:  # positions[-1] is the last position: row 0 sees every key, not a causal mask
            mask = position_mask(torch.arange(t).unsqueeze(0).expand(q.shape[0], -1), index_shift=-1,
                                 spelling=spelling)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.1 + mask, -1) @ v

    r = check(attn, q, k, v, given, expect={"attention": 1})
    assert "causal" not in r.rewrites[0].kernel, str(r)


@pytest.mark.parametrize("spelling", ["operators", "methods", "functions"])
def test_chunked_causal_proof_of_a_mask_built_like_llama4(spelling):
    """Llama 4's chunked attention: causal within aligned chunks of 16 positions, proved from the
    overlay transformers builds; at T ≤ 16 the same mask is plain causal."""
    def attn(q, k, v):
        positions = torch.arange(q.shape[-2]).unsqueeze(0).expand(q.shape[0], -1)
        mask = position_mask(positions, spelling=spelling, chunk=16)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.1 + mask, -1) @ v

    r = check(attn, *qkv(), expect={"attention": 1})
    assert "causal, chunk 16" in r.rewrites[0].kernel, str(r)
    r = check(attn, *qkv(t=16), expect={"attention": 1})
    assert "causal" in r.rewrites[0].kernel and "chunk" not in r.rewrites[0].kernel, str(r)


@pytest.mark.parametrize("case", ["shifted_positions", "other_key_divisor", "padding_given",
                                  "no_causal"])
def test_chunk_masks_that_are_not_provably_aligned_stay_a_bias(case):
    """Look-alikes of the chunked overlay: positions starting at 3 (chunks no longer aligned with
    the key index), another divisor on the key side, left padding from the data, and chunks
    without the causal constraint. Each stays an exact general bias."""
    q, k, v = qkv()
    pad = torch.tensor([0, 5])

    def attn(q, k, v, pad):
        t = q.shape[-2]
        positions = torch.arange(t).unsqueeze(0).expand(q.shape[0], -1)
        if case == "shifted_positions":
            mask = position_mask(positions + 3, chunk=16)
        elif case == "other_key_divisor":
            mask = position_mask(positions, chunk=16, key_chunk=8)
        elif case == "padding_given":
            mask = position_mask(positions, chunk=16, left_padding=pad)
        else:
            i = torch.arange(t)
            mask = torch.where(i[None, :] // 16 == i[:, None] // 16, 0.0, float("-inf"))
        return torch.softmax(q @ k.transpose(-2, -1) * 0.1 + mask, -1) @ v

    r = check(attn, q, k, v, pad, expect={"attention": 1})
    assert "causal" not in r.rewrites[0].kernel and "chunk" not in r.rewrites[0].kernel, str(r)


def test_verify_once_caches_per_subgraph_not_per_shape():
    """``verify="once"`` reuses a verification only for a site that computes alike (a repeated
    layer), never for another subgraph with the same shapes and the same replacement: a second
    line of defence behind the mask proofs."""
    def block(mask_of):
        def attn(q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.1 + mask_of(q.shape[-2]), -1) @ v
        return attn

    le = lambda t: torch.where(torch.arange(t)[None, :] <= torch.arange(t)[:, None], 0.0, -1e9)  # noqa: E731
    ge = lambda t: torch.where(torch.arange(t)[:, None] >= torch.arange(t)[None, :], 0.0, -1e9)  # noqa: E731
    two_layers = lambda q, k, v: block(le)(block(le)(q, k, v), k, v)  # noqa: E731
    rep = check(two_layers, *qkv(), expect={"attention": 2})
    first, second = (r.verification["summary"] for r in rep.rewrites)
    assert "(cached)" not in first and "(cached)" in second, str(rep)
    r = check(block(ge), *qkv(), expect={"attention": 1})
    assert "causal" in r.rewrites[0].kernel and "(cached)" not in r.rewrites[0].verification["summary"]


def test_causal_proof_holds_under_dynamic_shapes():
    def attn(q, k, v):
        i = torch.arange(q.shape[-2])
        mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
        return torch.softmax(q @ k.transpose(-2, -1) * 0.1 + mask, -1) @ v

    import functools

    from gla.backend import gla_backend
    from gla.report import collect

    with collect() as rep, torch.no_grad():
        f = torch.compile(attn, backend=functools.partial(gla_backend, options=OPTS), dynamic=True)
        for t in (17, 40):
            q, k, v = (torch.randn(1, 2, t, 16) for _ in range(3))
            assert rel_rms_error(f(q, k, v), attn(q, k, v)) <= 1e-5
    assert len(rep.rewrites) == 1 and "causal" in rep.rewrites[0].kernel, str(rep)


def test_single_key_attention_training_is_rewritten():
    """T=1 in training: dq and dk are exactly zero; the rewrite is verified (fwd and bwd) and the
    compiled gradients match eager."""
    def fn(q, k, v, bias):
        return (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias).softmax(-1) @ v

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 8, 1, 16, generator=gen).requires_grad_() for _ in range(3))
    bias = torch.randn(2, 1, 1, 1, generator=gen)
    report = gla.explain(fn, q, k, v, bias, options=OPTS)
    assert report.counts["attention"] == 1, str(report)
    out = torch.compile(fn, backend="gla", options=OPTS, fullgraph=True)(q, k, v, bias)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(fn(q, k, v, bias).sum(), (q, k, v))
    assert rel_rms_error(out, fn(q, k, v, bias)) < 1e-5
    assert rel_rms_error(grads[2], ref[2]) < 1e-5
    assert grads[0].abs().max() < 1e-5 and grads[1].abs().max() < 1e-5


def test_verification_measures_zero_gradients_against_the_gradient_scale():
    """A gradient that is zero in float64 (dq, dk of attention over one key) cannot be matched
    relatively in fp32: its noise is measured against the largest input gradient. A nonzero
    gradient is still compared relatively, and a wrong one still fails."""
    from gla.lowering.verify import gradient_error

    gen = torch.Generator().manual_seed(0)
    zero = torch.zeros(4, 16, dtype=torch.float64)
    noise = 1e-7 * torch.randn(4, 16, generator=gen)
    assert gradient_error(noise, zero, scale=8.0, tol=1e-5) < 1e-6          # ‖noise‖ ≈ 8e-7
    assert gradient_error(torch.full((4, 16), float("nan")), zero, scale=8.0, tol=1e-5) == math.inf
    assert gradient_error(0.5 * torch.ones(4, 16), zero, scale=8.0, tol=1e-5) > 1e-2
    small = 1e-3 * torch.randn(4, 16, generator=gen, dtype=torch.float64)   # above tol · scale
    assert gradient_error((2 * small).float(), small, scale=8.0, tol=1e-5) > 0.5


def test_a_masked_out_mask_is_verified_with_gradients():
    """``masked_fill(pad, -inf)`` with ``pad`` an input: verification draws boolean masks mostly
    True, which for this polarity masks whole rows; their NaN would reach every gradient and fail
    the check. It draws the masks the other way round instead, and the rewrite is proved."""
    def fn(q, k, v, pad):
        s = q @ k.transpose(-2, -1) * 0.25
        return torch.softmax(s.masked_fill(pad, float("-inf")), -1) @ v

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    pad = torch.rand(2, 1, 9, 9) > 0.7
    pad[..., 0] = False
    r = gla.testing.assert_rewrites(fn, q, k, v, pad, expect={"attention": 1}, grad=True)
    assert "bwd" in r.rewrites[0].verification["summary"], str(r)


# --- attention on flattened heads: bmm on [B·H, T, D], the mask applied on a [B, H, T, T] view --------
@pytest.mark.parametrize("form", ["deberta", "deberta_relative", "fairseq"])
def test_flattened_heads_with_the_mask_on_a_four_d_view(form):
    """DeBERTa divides kᵀ by a tensor ``sqrt(d)``, masks a [B, H, T, T] view of the bmm scores and
    views the probabilities back for the second bmm (its relative-position bias is added to the
    flat scores first); fairseq's MultiheadAttention adds a 2-d mask in place, masks padded keys on
    the 4-d view and takes the softmax on the flat one. Each is one attention, outputs and
    gradients as eager's."""
    b, h, t, d = 2, 4, 17, 40

    def attn(q, k, v, keep, rel, pad):  # q, k, v: [B·H, T, D]
        if form == "fairseq":
            w = torch.bmm(q * d ** -0.5, k.transpose(1, 2))
            w += rel[0]  # a [T, T] additive mask
            w = w.view(b, h, t, t).masked_fill(pad[:, None, None, :], float("-inf")).view(b * h, t, t)
            return torch.bmm(torch.softmax(w, dim=-1), v)
        scale = torch.sqrt(torch.tensor(d, dtype=torch.float))
        w = torch.bmm(q, k.transpose(-1, -2) / scale.to(q.dtype))
        if form == "deberta_relative":
            w = w + rel
        w = w.view(-1, h, t, t).masked_fill(~keep, torch.finfo(q.dtype).min)
        p = F.dropout(torch.softmax(w, dim=-1), 0.1, training=False)
        return torch.bmm(p.view(-1, t, t), v).view(-1, h, t, d)

    torch.manual_seed(0)
    q, k, v = (torch.randn(b * h, t, d) for _ in range(3))
    am = torch.ones(b, t)
    am[1, 12:] = 0
    keep = (am[:, None, :, None] * am[:, None, None, :]).bool()  # DeBERTa's [B, 1, T, T] mask
    rel = torch.randn(b * h, t, t)
    gla.testing.assert_rewrites(attn, q, k, v, keep, rel, am == 0, expect={"attention": 1}, grad=True)


def test_a_view_round_trip_through_a_copy_stays():
    """``x.transpose(1, 2).reshape(8, ...).reshape(2, 4, ...)`` copies on the way, so the result
    is not the transposed x (whose strides a later ``view`` cannot take): it is left as written."""
    def fn(x):
        y = x.transpose(1, 2).reshape(8, 16, 16).reshape(2, 4, 16, 16)
        return y.view(2, -1).sum(-1)

    x = torch.randn(2, 16, 4, 16)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="gla", options=OPTS, fullgraph=True)(x)
    assert torch.allclose(out, fn(x))


def test_must_not_match_flattened_heads_whose_probabilities_are_returned():
    b, h, t, d = 2, 2, 9, 16

    def attn(q, k, v):
        w = torch.bmm(q, k.transpose(1, 2)).view(b, h, t, t) * 0.25
        p = torch.softmax(w, -1)
        return torch.bmm(p.view(b * h, t, t), v), p

    torch._dynamo.reset()
    with torch.no_grad():
        r = gla.explain(attn, *(torch.randn(b * h, t, d) for _ in range(3)), options=OPTS)
    assert r.counts["attention"] == 0, str(r)


@pytest.mark.parametrize("form", ["fill", "keep", "scaled_fill"])
def test_a_bias_and_a_mask_together(form):
    """``where(mask, fill, q·kᵀ·s + bias)``: a relative-position bias and a padding mask in one
    attention (DeBERTa, T5-style models with padding): the mask folds into the bias."""
    def attn(q, k, v, bias, keep):
        s = q @ k.transpose(-2, -1)
        if form == "scaled_fill":
            return torch.softmax(torch.where(~keep, float("-inf"), s * 0.125 + bias), -1) @ v
        s = s + bias
        if form == "fill":
            return torch.softmax(s.masked_fill(~keep, torch.finfo(s.dtype).min), -1) @ v
        return torch.softmax(torch.where(keep, s, float("-inf")), -1) @ v

    torch.manual_seed(0)
    q, k, v = qkv()
    keep = torch.rand(B, 1, 1, T) > 0.3
    keep[..., 0] = True
    gla.testing.assert_rewrites(attn, q, k, v, torch.randn(B, H, T, T), keep,
                                expect={"attention": 1}, grad=True)
