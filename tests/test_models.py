"""Real model code: transformers Llama / GPT-2 / BERT (tiny configs, random weights, nothing downloaded),
torch's nn.MultiheadAttention, the examples."""
import os
import subprocess
import sys

import pytest
import torch

import gla
from gla.testing import rel_rms_error

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = {"inner": "aot_eager"}


def _model(family, impl, dropout=None):
    torch.manual_seed(0)
    drop = {} if dropout is None else {"llama": {"attention_dropout": dropout},
                                       "gpt2": {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout},
                                       "bert": {"hidden_dropout_prob": dropout,
                                                "attention_probs_dropout_prob": dropout}}[family]
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **drop)
        m = transformers.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, **drop))
    else:
        m = transformers.BertModel(transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=96, **drop))
    m.set_attn_implementation(impl)
    return m


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family, glu", [("llama", 2), ("gpt2", 0), ("bert", 0)])
@pytest.mark.parametrize("batch", [1, 2])
def test_transformers_inference(family, glu, impl, batch):
    m = _model(family, impl).eval()
    ids = torch.randint(0, 128, (batch, 13))
    kwargs = {"attention_mask": torch.ones(batch, 13, dtype=torch.long)} if family == "bert" else {"use_cache": False}
    if family == "bert" and batch > 1:
        kwargs["attention_mask"][0, -4:] = 0
    fn = lambda ids: m(ids, **kwargs)[0]
    with torch.no_grad():
        report = gla.explain(fn, ids, options=OPTS)
        torch._dynamo.reset()
        out = torch.compile(fn, backend="gla", options=OPTS)(ids)
        ref = fn(ids)
    assert report.counts["attention"] == 2, str(report)
    assert report.counts["glu"] == glu, str(report)
    # the causal mask the decoders build from position ids is proved causal (the kernels skip
    # masked blocks); BERT's padding mask is runtime data and stays a bias
    want = "bias" if family == "bert" else "causal"
    assert all(want in r.kernel for r in report.rewrites if r.kind == "attention"), str(report)
    assert rel_rms_error(out, ref) <= 1e-5


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family, glu", [("llama", 2), ("gpt2", 0), ("bert", 0)])
def test_training_step_matches_eager(family, glu, impl):
    m = _model(family, impl, dropout=0.0).train()
    ids = torch.randint(0, 128, (2, 11))
    if family == "bert":
        mask = torch.ones(2, 11, dtype=torch.long)
        mask[1, -3:] = 0
        w = torch.randn(2, 11, 64)  # LayerNorm output squared is ~constant: weight it, or grads are noise
        loss_fn = lambda: (m(ids, attention_mask=mask).last_hidden_state * w).mean()
    else:
        loss_fn = lambda: m(ids, labels=ids, use_cache=False).loss
    loss_ref = loss_fn()
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    report = gla.explain(loss_fn, options=OPTS)
    assert report.counts["attention"] == 2 and report.counts["glu"] == glu, str(report)
    torch._dynamo.reset()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    loss = torch.compile(loss_fn, backend="gla", options=OPTS)()
    loss.backward()
    opt.step()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * max(1.0, abs(loss_ref.item()))
    scale = max(g.norm() for g in grads_ref.values())
    for n, p in m.named_parameters():
        if n in grads_ref:  # relative error, except for gradients that are zero up to rounding (key bias)
            err = (p.grad - grads_ref[n]).norm()
            assert err <= 1e-5 * grads_ref[n].norm() or err <= 1e-7 * scale, (n, rel_rms_error(p.grad, grads_ref[n]))


def test_training_with_gradient_checkpointing():
    """transformers' gradient checkpointing puts each layer in a checkpoint region (a higher-order
    op with its own body graph): the bodies are rewritten too, and the step matches eager."""
    m = _model("llama", "eager", dropout=0.0).train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 11))
    loss_fn = lambda: m(ids, labels=ids, use_cache=False).loss
    loss_ref = loss_fn()
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    report = gla.explain(loss_fn, options=OPTS)
    assert report.counts["attention"] == 2 and report.counts["glu"] == 2, str(report)
    torch._dynamo.reset()
    loss = torch.compile(loss_fn, backend="gla", options=OPTS)()
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for n, p in m.named_parameters():
        assert rel_rms_error(p.grad, grads_ref[n]) <= 1e-5, n


_DECODER = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_DECODER, intermediate_size=96, num_key_value_heads=2)
# family: (config class, model class, config kwargs, expected counts, what the attention kernel says)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA, {"attention": 2, "glu": 2}, "causal, GQA 2:1"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=16), {"attention": 2, "glu": 2},
              "causal, GQA 2:1"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_GQA, sliding_window=8),
                {"attention": 2, "glu": 2}, "causal, window 8"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=16), {"attention": 2, "glu": 2},
              "causal"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, pad_token_id=0), {"attention": 2, "glu": 2},
             "causal"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _GQA, {"attention": 2, "glu": 2}, "causal"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_DECODER, intermediate_size=96),
                 {"attention": 2}, "causal"),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(_DECODER, ffn_dim=96, word_embed_proj_dim=64),
            {"attention": 2}, "causal"),
    "falcon": ("FalconConfig", "FalconForCausalLM", _DECODER, {"attention": 2}, "causal"),  # MQA via SDPA
    # logit soft-capping: a look-alike, left as is with its reason; the MLP still rewrites
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_GQA, head_dim=16), {"attention": 0, "glu": 2},
               "soft-capping"),
    # keys assembled in place (new_empty + two copy_ calls into slices): the writes stay, and the
    # attention still rewrites (MLA's q/k head dim 24 ≠ v's 16)
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_DECODER, intermediate_size=96, num_key_value_heads=4, n_routed_experts=4,
                         first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=16), {"attention": 2, "glu": 2}, "causal"),
    # an output gate σ(g) on every full-attention layer: one gated attention each
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(_GQA, head_dim=16, layer_types=["full_attention"] * 2, num_experts=0,
                        mlp_only_layers=[0, 1]), {"gated_attention": 2, "glu": 2},
                   "+elementwise sigmoid gate"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_GQA, head_dim=16, sliding_window=8),
               {"attention": 2, "glu": 2}, "causal"),
    # chunked attention (causal within aligned chunks of 8), proved from transformers' overlay
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(_GQA, head_dim=16, intermediate_size_mlp=96, attention_chunk_size=8, num_local_experts=1,
                    interleave_moe_layer_step=4, moe_layers=[]), {"attention": 2, "glu": 2}, "causal, chunk 8"),
}


def _compiled_family(cfg_name, model_name, kw, call, x):
    """Build a tiny random transformers model with hand-written attention, compile ``call(m, x)``
    with gla, check it against eager; return gla's report."""
    if not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cfg_name}")
    torch.manual_seed(0)
    m = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw))
    m.set_attn_implementation("eager")
    m.eval()
    fn = lambda x: call(m, x)  # noqa: E731
    with torch.no_grad():
        report = gla.explain(fn, x, options=OPTS)
        torch._dynamo.reset()
        out = torch.compile(fn, backend="gla", options=OPTS)(x)
        ref = fn(x)
    assert rel_rms_error(out, ref) <= 1e-5
    return report


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_families(family):
    """Tiny random decoders of fourteen transformers families with hand-written ("eager") attention:
    what gla rewrites, that their position-id masks are proved causal (or the window), and that
    the compiled model computes what eager does."""
    cfg_name, model_name, kw, expect, kernel = FAMILIES[family]
    report = _compiled_family(cfg_name, model_name, kw, lambda m, ids: m(ids, use_cache=False).logits,
                              torch.randint(1, 128, (2, 24)))
    assert {k: report.counts[k] for k in expect} == expect, str(report)
    said = [r.kernel for r in report.rewrites if r.kind in ("attention", "gated_attention")] or \
        [m.reason for m in report.near_misses]
    assert said and all(kernel in s for s in said), str(report)


_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
               patch_size=8)
# family: (config class, model class, config kwargs, input, expected counts, attention kernels said)
ENCODERS = {
    "vit": ("ViTConfig", "ViTModel", _VISION, "pixels", {"attention": 2}, {"no mask"}),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", _VISION, "pixels", {"attention": 2, "gate": 2},
                    {"no mask"}),  # quick-gelu x·σ(1.702x) is a gate
    "roberta": ("RobertaConfig", "RobertaModel", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=96), "ids", {"attention": 2}, {"no mask"}),
    "t5_encoder": ("T5Config", "T5EncoderModel", dict(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                   num_heads=4), "ids", {"attention": 2}, {"bias"}),  # relative position bias: runtime data
    "bart": ("BartConfig", "BartModel", dict(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96),
             "ids", {"attention": 3}, {"causal", "no mask"}),  # encoder, causal decoder, cross-attention
    # heads flattened for bmm, the padding mask on a [B, H, T, T] view, a relative-position bias
    "deberta_v2": ("DebertaV2Config", "DebertaV2Model", dict(vocab_size=128, hidden_size=64,
                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, relative_attention=True,
                   pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=-1,
                   norm_rel_ebd="layer_norm"), "ids", {"attention": 2}, {"bias"}),
    # ``attention_scores += position_bias``: an in-place add on private scores, matched as an add
    "mpnet": ("MPNetConfig", "MPNetModel", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=96), "ids", {"attention": 2}, {"bias"}),
}


@pytest.mark.parametrize("family", list(ENCODERS))
def test_encoder_and_vision_families(family):
    """Vision transformers and encoder(-decoder)s with hand-written attention: every attention
    site rewritten (unmasked, T5's relative bias, BART's causal decoder and cross-attention)."""
    cfg_name, model_name, kw, kind, expect, kernels = ENCODERS[family]
    x = torch.randn(2, 3, 32, 32) if kind == "pixels" else torch.randint(3, 100, (2, 16))
    report = _compiled_family(cfg_name, model_name, kw, lambda m, x: m(x)[0], x)
    assert {k: report.counts[k] for k in expect} == expect, str(report)
    said = {r.kernel.split("(")[-1].split(",")[0].rstrip(")") for r in report.rewrites if r.kind == "attention"}
    assert said == kernels, str(report)


@pytest.mark.parametrize("case", ["mha", "mha_masks", "encoder_layer", "need_weights"])
def test_nn_multihead_attention(case):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    enc = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, -3:] = True
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    fn = {"mha": lambda x: mha(x, x, x, need_weights=False)[0],
          "mha_masks": lambda x: mha(x, x, x, need_weights=False, key_padding_mask=kpm, attn_mask=causal)[0],
          "encoder_layer": enc,
          "need_weights": lambda x: mha(x, x, x)[0]}[case]
    x = torch.randn(2, 9, 32, requires_grad=True)
    report = gla.explain(fn, x, options=OPTS)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="gla", options=OPTS)(x)
    ref = fn(x)
    assert rel_rms_error(out, ref) <= 1e-5
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert rel_rms_error(g, g_ref) <= 1e-5
    if case == "need_weights":
        assert report.counts["attention"] == 0
        assert any("need_weights" in m.reason for m in report.near_misses), str(report)
    else:
        assert report.counts["attention"] == 1, str(report)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["custom_pattern.py", "quickstart.py"])
def test_examples_run(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    if script == "quickstart.py":
        assert "gated_attention': 2" in out.stdout and "'glu': 2" in out.stdout


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_with_a_kv_cache(cache):
    """Greedy decoding with the model's forward compiled by gla gives eager's tokens. The static
    cache updates its buffers in place (``index_copy_``, results unused): a dead-code pass that
    drops them decodes garbage."""
    m = _model("llama", "eager").eval()
    ids = torch.randint(1, 128, (2, 9))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = m.generate(ids, **kw)
        torch._dynamo.reset()
        forward = m.forward
        m.forward = torch.compile(forward, backend="gla", options=OPTS)
        try:
            with gla.report.collect() as report:
                out = m.generate(ids, **kw)
        finally:
            m.forward = forward
    assert report.counts["attention"] >= 4, str(report)  # prefill and decode graphs both rewritten
    assert torch.equal(out, ref)


class _Called(torch.nn.Module):
    """``call(m, *args)`` as a module holding ``m``: assert_rewrites then compares the gradients of
    every parameter of the model."""

    def __init__(self, m, call):
        super().__init__()
        self.m, self.call = m, call

    def forward(self, *args):
        return self.call(self.m, *args)


def test_deberta_training_matches_eager():
    """DeBERTa-v2 with relative attention, training (dropout off): both attentions rewritten,
    every parameter's gradient as eager's (the attention's bmm views, tensor scale, bias + mask)."""
    if not hasattr(transformers, "DebertaV2Config"):
        pytest.skip(f"transformers {transformers.__version__} has no DebertaV2Config")
    cfg_name, model_name, kw = ENCODERS["deberta_v2"][:3]
    torch.manual_seed(0)
    m = getattr(transformers, model_name)(getattr(transformers, cfg_name)(
        **kw, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    m.set_attn_implementation("eager")
    ids = torch.randint(3, 100, (2, 16))
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, 11:] = 0
    hidden = _Called(m, lambda m, i, a: m(i, attention_mask=a).last_hidden_state)
    gla.testing.assert_rewrites(hidden, ids, am, expect={"attention": 2}, grad=True)


def test_llama4_chunked_attention_trains_through_the_kernel():
    """Llama 4's chunked layers (chunks of 8 at T=24) run gla's Triton kernel with its chunk
    mask (the interpreter here), forward and backward: every parameter's gradient as eager's."""
    if not hasattr(transformers, "Llama4TextConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Llama4TextConfig")
    cfg_name, model_name, kw = FAMILIES["llama4"][:3]
    torch.manual_seed(0)
    m = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw))
    m.set_attn_implementation("eager")
    logits = _Called(m, lambda m, ids: m(ids, use_cache=False).logits)
    report = gla.testing.assert_rewrites(logits, torch.randint(1, 128, (2, 24)), expect={"attention": 2},
                                         grad=True, options={"kernels": "triton"})
    kernels = [r.kernel for r in report.rewrites if r.kind == "attention"]
    assert all("gla::attention[triton] (causal, chunk 8" in k for k in kernels), str(report)
