import functools
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import gla
from gla.backend import gla_backend
from gla.testing import rel_rms_error


def test_entry_point_resolves_in_a_fresh_process():
    """Also the "registers nothing twice" check: if importing gla registered the backend itself, this
    lookup through the entry point fails with "duplicate name: gla" (checked by planting one)."""
    code = ("import torch; print(torch.compile(lambda x: torch.sigmoid(x) * x, backend='gla')(torch.randn(4)));"
            "import sys; assert 'gla' in torch._dynamo.list_backends(); assert 'gla.backend' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "tensor(" in out.stdout


@pytest.mark.parametrize("options, message", [
    ({"nope": 1}, "unknown gla option"),
    ({"verify": "sometimes"}, "choose one of"),
    ({"inner": "tvm"}, "choose one of"),
    ({"kernels": "cuda"}, "choose one of"),
    ({"patterns": ["attention", "mlp"]}, "unknown families"),
    ({"inductor_mode": "fast"}, "choose one of"),
])
def test_invalid_options_are_clear_errors(options, message):
    with pytest.raises(gla.ConfigError, match=message):
        gla.Config.from_options(options)


def test_inductor_mode_reaches_inductor_with_glas_options(monkeypatch):
    """torch.compile refuses mode= together with options=, so gla's options carry Inductor's
    mode; it arrives as Inductor's config patches, and a mode Inductor would not see is an error."""
    import torch._inductor.compile_fx as cfx

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    x = torch.randn(3)
    gla_backend(gm, [x], options={"inductor_mode": "reduce-overhead"})
    gla_backend(gm, [x], mode="max-autotune-no-cudagraphs")
    gla_backend(gm, [x])
    assert seen == [torch._inductor.list_mode_options("reduce-overhead"),
                    torch._inductor.list_mode_options("max-autotune-no-cudagraphs"), None]
    assert seen[0]["triton.cudagraphs"] is True
    with pytest.raises(gla.ConfigError, match="disagree"):
        gla_backend(gm, [x], options={"inductor_mode": "reduce-overhead"}, mode="max-autotune")
    with pytest.raises(gla.ConfigError, match="Inductor's"):
        gla_backend(gm, [x], options={"inductor_mode": "reduce-overhead", "inner": "aot_eager"})


def test_reduce_overhead_through_torch_compile_mode_and_through_glas_option():
    """Both spellings reach Inductor with CUDA graphs on and still rewrite; on a CPU Inductor skips
    the graphs (and counts the skip) and the model computes what eager does."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    w1, w3 = torch.randn(24, 16), torch.randn(24, 16)
    f = lambda x: F.silu(F.linear(x, w1)) * F.linear(x, w3)  # noqa: E731
    x = torch.randn(4, 16)
    for kwargs in (dict(mode="reduce-overhead"), dict(options={"inductor_mode": "reduce-overhead"})):
        torch._dynamo.reset()
        counters.clear()
        out = torch.compile(f, backend="gla", **kwargs)(x)
        assert rel_rms_error(out, f(x)) < 1e-5
        assert counters["gla"]["glu"] == 1, kwargs
        assert counters["inductor"]["cudagraph_skips"] == 1, (kwargs, dict(counters["inductor"]))


def test_linearize_is_not_silently_accepted():
    f = torch.compile(lambda x: x + 1, backend="gla", options={"mode": "linearize"})
    with pytest.raises(Exception, match="linearize"):
        f(torch.randn(3))


def fused_sigmoid_mul(x, y):
    return torch.ops.aten.mul(torch.sigmoid(x), y)


def test_user_pattern_rewrites_and_scope_cleans_up():
    def f(a, b):
        return (a.sigmoid() * b).sum(-1)

    with gla.pattern_scope():
        @gla.register_pattern(replacement=fused_sigmoid_mul)
        def my_sigmoid_mul(x, y):
            return torch.sigmoid(x) * y

        with pytest.raises(gla.PatternError, match="already registered"):
            gla.register_pattern("my_sigmoid_mul", search=my_sigmoid_mul, replacement=fused_sigmoid_mul)
        a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
        report = gla.explain(f, a, b, options={"inner": "aot_eager", "patterns": ["custom"]})
        assert report.counts.get("custom") == 1
        assert report.rewrites[0].pattern == "my_sigmoid_mul"
        assert report.rewrites[0].verification["rel_rms"] < 1e-6
    assert "my_sigmoid_mul" not in [p.name for p in gla.registered_patterns()]


def test_replacement_signature_must_fit_the_pattern():
    with gla.pattern_scope():
        with pytest.raises(gla.PatternError, match="does not fit"):
            gla.register_pattern("bad", search=lambda x, y: torch.sigmoid(x) * y, replacement=lambda x: x)


def test_replacement_with_wrong_shape_is_declined_not_applied():
    def wrong(x, y):
        return (torch.sigmoid(x) * y).sum(-1)

    with gla.pattern_scope():
        gla.register_pattern("wrong_shape", search=lambda x, y: torch.sigmoid(x) * y, replacement=wrong)
        f = lambda a, b: torch.sigmoid(a) * b
        a, b = torch.randn(3, 5), torch.randn(3, 5)
        report = gla.explain(f, a, b, options={"inner": "aot_eager", "patterns": ["custom"]})
        assert report.counts.get("custom", 0) == 0
        assert report.near_misses and "wrong_shape" == report.near_misses[0].pattern


def test_wrong_replacement_is_caught_by_verification():
    with gla.pattern_scope():
        gla.register_pattern("lies", search=lambda x, y: torch.sigmoid(x) * y,
                             replacement=lambda x, y: torch.tanh(x) * y)
        f = lambda a, b: torch.sigmoid(a) * b
        a, b = torch.randn(3, 5), torch.randn(3, 5)
        with pytest.warns(UserWarning, match="kept the original"):
            report = gla.explain(f, a, b, options={"inner": "aot_eager", "patterns": ["custom"]})
        assert report.counts.get("custom", 0) == 0
        assert "differs" in report.near_misses[0].reason
        out = torch.compile(f, backend="gla", options={"inner": "aot_eager", "patterns": ["custom"]})(a, b)
        assert torch.equal(out, f(a, b))


def test_counters_and_report_table():
    from torch._dynamo.utils import counters

    counters.clear()
    x = torch.randn(2, 16)
    w1, w3 = torch.randn(24, 16), torch.randn(24, 16)
    f = lambda x: F.silu(F.linear(x, w1)) * F.linear(x, w3)
    report = gla.explain(f, x, options={"inner": "aot_eager"})
    assert report.counts["glu"] == 1
    assert counters["gla"]["glu"] == 1
    text = str(report)
    assert "glu_silu" in text and "verified" in text


def test_dynamic_lengths_compile_once():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    calls = []

    def counting_backend(gm, ex):
        calls.append(1)
        return gla_backend(gm, ex, options={"inner": "aot_eager"})

    def attn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v

    f = torch.compile(attn, backend=counting_backend, dynamic=True)
    for t in (17, 33, 50):
        q, k, v = (torch.randn(1, 2, t, 64) for _ in range(3))
        with torch.no_grad():
            assert rel_rms_error(f(q, k, v), attn(q, k, v)) < 1e-5
    assert len(calls) == 1
    assert counters["gla"]["attention"] == 1


def test_graph_breaks_are_fine():
    def f(x, w1, w3):
        h = F.silu(F.linear(x, w1)) * F.linear(x, w3)
        print("graph break")
        y = h.sum(-1, keepdim=True) * x
        return F.silu(F.linear(y, w1)) * F.linear(y, w3)

    x, w1, w3 = torch.randn(3, 8), torch.randn(12, 8), torch.randn(12, 8)
    report = gla.explain(f, x, w1, w3, options={"inner": "aot_eager"})
    assert report.graphs == 2 and report.counts["glu"] == 2
    assert sum(report.graph_breaks.values()) == 1 and "graph breaks" in str(report)


# a library's bookkeeping, appended to by each layer it wraps (HF ``kernels``, installed with
# transformers 5.25, sets a global around each wrapped layer: the same kind of side effect)
_LAYER_CALLS: list = []


def test_report_names_the_break_that_hides_a_checkpointed_layer():
    """A side effect inside an activation-checkpointed layer makes Dynamo run the whole
    checkpoint outside any graph: nothing in it is rewritten, and the report says why, with
    Dynamo's hint. With the hint taken the checkpoint is traced and rewritten, and its gradients
    match eager."""
    w1, w3 = torch.randn(12, 8), torch.randn(12, 8)

    def layer(x):
        _LAYER_CALLS.append("layer")
        return F.silu(F.linear(x, w1)) * F.linear(x, w3)

    def f(x):
        return torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)

    x = torch.randn(3, 8, requires_grad=True)
    report = gla.explain(f, x, options={"inner": "aot_eager"})
    assert report.counts["glu"] == 0
    assert any("side effect" in reason for reason in report.graph_breaks), str(report)
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint" in str(report)
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        report = gla.explain(f, x, options={"inner": "aot_eager"})
        assert report.counts["glu"] == 1 and not report.graph_breaks, str(report)
        torch._dynamo.reset()
        out = torch.compile(f, backend="gla", options={"inner": "aot_eager"})(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expect,) = torch.autograd.grad(f(x).square().sum(), x)
    assert rel_rms_error(grad, expect) <= 1e-6
    torch._dynamo.reset()


def test_kernel_choice_on_cuda_by_option():
    """On (fake) CUDA tensors "auto" picks Triton (for GLU where Inductor does not compile the
    graph: see the next test); "pytorch" picks SDPA for attention and plain PyTorch for GLU and
    GLA, whatever Triton could do."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gla.config import Config
    from gla.lowering import attention as la, glu as lg, linear_attention as lla

    with FakeTensorMode():
        q = torch.empty(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
        x = torch.empty(4, 64, device="cuda", dtype=torch.bfloat16)
        assert la.choose_impl(Config(), q, q, q) == "triton"
        assert la.choose_impl(Config(kernels="pytorch"), q, q, q) == "sdpa"
        assert lg.choose_impl(Config(inner="aot_eager"), x, x, act="silu") == "triton"
        assert lg.choose_impl(Config(kernels="pytorch"), x, x, act="silu") == "reference"
    cuda = torch.device("cuda")
    shapes = {n: ((1, 16, 2, 64), torch.bfloat16) for n in ("q", "k", "v", "g")}
    assert lla._impl_for(Config(), cuda, shapes) == "triton"
    assert lla._impl_for(Config(kernels="pytorch"), cuda, shapes) == "reference"


def test_auto_leaves_glu_to_inductor_and_runs_glas_kernel_without_it():
    """"auto" on CUDA: a GLU or gate site compiled by Inductor stays plain PyTorch (Inductor fuses
    it as fast, without a custom-op call per site); under aot_eager/eager gla's kernel runs;
    kernels="triton" forces it everywhere, kernels="pytorch" never."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gla.config import Config
    from gla.lowering.glu import choose_impl

    with FakeTensorMode():
        a = torch.empty(4, 16, device="cuda", dtype=torch.bfloat16)
        cpu = torch.empty(4, 16, dtype=torch.bfloat16)
        assert choose_impl(Config(), a, a, act="silu") == "reference"
        assert choose_impl(Config(inner="aot_eager"), a, a, act="silu") == "triton"
        assert choose_impl(Config(inner="eager"), a, a, act="sigmoid") == "triton"
        assert choose_impl(Config(inner="aot_eager"), cpu, cpu, act="silu") == "reference"
        assert choose_impl(Config(kernels="triton"), a, a, act="silu") == "triton"
        assert choose_impl(Config(kernels="pytorch", inner="aot_eager"), a, a, act="silu") == "reference"


def test_auto_takes_sdpa_only_where_it_would_run_cudnn(monkeypatch):
    """"auto" on CUDA: SDPA for inference where PyTorch would run cuDNN's kernel for a plain or
    square-causal call; gla's Triton kernel for training, and wherever SDPA would run another kernel
    or would need a mask."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import gla.kernels.attention as ka
    from gla.config import Config
    from gla.lowering.attention import choose_impl

    asked = []

    def answer(backend):
        def sdpa_backend(q, k, v, *, causal=False, enable_gqa=False):
            asked.append((tuple(q.shape), tuple(k.shape), causal, enable_gqa))
            return backend
        monkeypatch.setattr(ka, "sdpa_backend", sdpa_backend)

    with FakeTensorMode():
        q = torch.empty(1, 4, 16, 64, device="cuda", dtype=torch.bfloat16)
        kv1 = torch.empty(1, 1, 16, 64, device="cuda", dtype=torch.bfloat16)
        k_long = torch.empty(1, 4, 32, 64, device="cuda", dtype=torch.bfloat16)
        bias = torch.empty(1, 1, 16, 16, device="cuda")
        answer("cudnn")
        assert choose_impl(Config(), q, q, q, causal=True) == "sdpa"
        assert choose_impl(Config(), q, q, q) == "sdpa"
        assert choose_impl(Config(), q, kv1, kv1, causal=True) == "sdpa"
        assert asked[-1] == ((1, 4, 16, 64), (1, 1, 16, 64), True, True)  # GQA asked as such
        n = len(asked)
        assert choose_impl(Config(), q, q, q, causal=True, window=8) == "triton"
        assert choose_impl(Config(), q, q, q, masked=True) == "triton"
        assert choose_impl(Config(), q, q, q, bias=bias) == "triton"
        assert choose_impl(Config(), q, k_long, k_long, causal=True) == "triton"  # bottom-right
        assert choose_impl(Config(kernels="triton"), q, q, q, causal=True) == "triton"
        trained = torch.empty(1, 4, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        assert choose_impl(Config(), trained, q, q, causal=True) == "triton"  # training keeps gla's kernel
        assert choose_impl(Config(), q, trained, trained, causal=True) == "triton"
        assert len(asked) == n  # none of those needed SDPA's answer
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # inference through cuDNN: no warning
            assert choose_impl(Config(kernels="pytorch"), q, q, q, causal=True) == "sdpa"
        with pytest.warns(UserWarning, match="cuDNN's backward"):  # training through cuDNN
            assert choose_impl(Config(kernels="pytorch"), trained, q, q, causal=True) == "sdpa"
        for other in ("flash", "efficient", "math", None):
            answer(other)
            assert choose_impl(Config(), q, q, q, causal=True) == "triton", other
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert choose_impl(Config(kernels="pytorch"), trained, q, q, causal=True) == "sdpa"


@pytest.mark.parametrize("grad", [False, True])
def test_lowering_sees_whether_attention_is_trained(monkeypatch, grad):
    """The rule's premise: the tensors the attention lowering chooses with carry requires_grad
    exactly when the compiled graph trains through them (Dynamo's example values)."""
    import gla.lowering.attention as la

    seen = []
    choose = la.choose_impl

    def spy(config, q, k, v, **case):
        seen.append((q.requires_grad, k.requires_grad, v.requires_grad))
        return choose(config, q, k, v, **case)

    monkeypatch.setattr(la, "choose_impl", spy)

    def attn(x, w):  # q, k, v from a projection, as in a model
        q = (x @ w).unflatten(-1, (2, 8)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    x, w = torch.randn(1, 16, 16), torch.randn(16, 16, requires_grad=grad)
    gla.explain(attn, x, w)                 # grad mode on: trains through q iff w requires grad
    torch._dynamo.reset()
    with torch.no_grad():                   # inference: no grad whatever w says
        gla.explain(attn, x, w)
    assert seen == [(grad, grad, grad), (False, False, False)], seen


@pytest.mark.gpu
def test_sdpa_backend_answers_for_fake_tensors_as_for_real_ones():
    """The lowering asks with Dynamo's FakeTensors: the answer must be what real tensors of the
    same shapes get, and the choice follows it (cuDNN takes no fp32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gla.config import Config
    from gla.kernels.attention import sdpa_backend
    from gla.lowering.attention import choose_impl

    def make(h, d, dtype, grad, bthd):
        if bthd:  # the [B, T, H, D] projections' layout
            return torch.randn(2, 256, h, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(grad)
        return torch.randn(2, h, 256, d, device="cuda", dtype=dtype, requires_grad=grad)

    for dtype, hq, hkv, d, grad, bthd in [(torch.bfloat16, 8, 8, 128, True, True), (torch.bfloat16, 8, 2, 64, False, False),
                                          (torch.bfloat16, 8, 2, 128, True, True), (torch.float16, 4, 4, 40, True, False),
                                          (torch.bfloat16, 4, 4, 256, True, True), (torch.float32, 4, 4, 64, True, False)]:
        real = [make(h, d, dtype, grad, bthd) for h in (hq, hkv, hkv)]
        want = sdpa_backend(*real, causal=True, enable_gqa=hq != hkv)
        assert want in ("cudnn", "flash", "efficient", "math"), want
        with FakeTensorMode() as mode:
            fake = [mode.from_tensor(t) for t in real]
            assert sdpa_backend(*fake, causal=True, enable_gqa=hq != hkv) == want
            impl = choose_impl(Config(), *fake, causal=True)
        assert impl == ("sdpa" if want == "cudnn" and not grad else "triton"), (dtype, hq, hkv, d, want, impl)
        if dtype == torch.float32:
            assert want != "cudnn"


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
def test_auto_kernel_choice_end_to_end_on_cuda(gated):
    """A compiled causal attention (GQA, with and without an output gate) runs the kernel the
    rule names — SDPA for inference where it runs cuDNN, gla's kernel for training — matches
    float64 in value and gradient, and says which kernel it chose."""
    from gla.kernels.attention import sdpa_backend

    torch.manual_seed(0)
    B, H, HKV, T, D = 2, 8, 2, 320, 128

    def f(q, k, v, g):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return o * torch.sigmoid(g) if gated else o

    args = [torch.randn(B, h, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for h in (H, HKV, HKV, H)]
    with torch.no_grad():
        plain = [a.detach() for a in args]
        cudnn = sdpa_backend(*plain[:3], causal=True, enable_gqa=True) == "cudnn"
        infer = [r.kernel for r in gla.explain(f, *plain).rewrites]
        assert len(infer) == 1 and ("scaled_dot_product_attention" in infer[0]) == cudnn, (cudnn, infer)
        assert ("[triton]" in infer[0]) == (not cudnn), infer
        torch._dynamo.reset()
        out = torch.compile(f, backend="gla", fullgraph=True)(*plain)
        assert rel_rms_error(out, f(*[a.double() for a in plain])) < 2e-2
    torch._dynamo.reset()
    report = gla.explain(f, *args)
    kernels = [r.kernel for r in report.rewrites]
    assert len(kernels) == 1 and "[triton]" in kernels[0], str(report)
    torch._dynamo.reset()
    ref = f(*[a.double() for a in args])
    out = torch.compile(f, backend="gla", fullgraph=True)(*args)
    assert rel_rms_error(out, ref) < 2e-2
    wrt = args if gated else args[:3]
    grads = torch.autograd.grad(out.float().square().sum(), wrt)
    ref_grads = torch.autograd.grad(ref.square().sum(), wrt)
    for g, r in zip(grads, ref_grads):
        assert rel_rms_error(g, r) < 3e-2


def _tiny_llama():
    """(TinyLlama, TinyLlamaConfig) from examples/tiny_llama.py."""
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from tiny_llama import TinyLlama, TinyLlamaConfig

    return TinyLlama, TinyLlamaConfig


@pytest.mark.gpu
def test_cuda_graphs_record_glas_kernels():
    """inductor_mode="reduce-overhead": the compiled model, gla's Triton attention and GLU ops
    included, is recorded in CUDA graphs (no skip), and replays with fresh inputs match the fp32
    model in outputs and gradients."""
    import copy

    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    TinyLlama, TinyLlamaConfig = _tiny_llama()
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(vocab_size=128, hidden=256, layers=2, heads=4, kv_heads=2, ffn=384)
    model = TinyLlama(cfg).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(model).float()  # (the example's finfo.min mask has no float64 spelling)
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(model, backend="gla",
                       options={"kernels": "triton", "inductor_mode": "reduce-overhead"})
    for _ in range(4):  # warm-up, recording, then replays
        ids = torch.randint(0, cfg.vocab_size, (2, 200), device="cuda")
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            out = fn(ids).float()  # a copy: the graph's output buffer is reused by the next replay
            want = ref(ids)
        assert rel_rms_error(out, want) < 3e-2
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (2, 200), device="cuda")
        torch.compiler.cudagraph_mark_step_begin()
        fn(ids).float().square().mean().backward()
        ref(ids).square().mean().backward()
        for p, r in zip(model.parameters(), ref.parameters()):
            assert rel_rms_error(p.grad, r.grad) < 5e-2
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    assert counters["gla"]["gated_attention"] >= 2 and counters["gla"]["glu"] >= 2, dict(counters["gla"])
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and manager.roots


@pytest.mark.parametrize("kernels", ["triton", "pytorch"])
def test_kernels_option_through_the_backend(kernels):
    """kernels="triton": the model's rewrites run the very Triton kernels GPUs run (the interpreter
    here); kernels="pytorch": the same rewrites (verified) lowered to SDPA and plain PyTorch."""
    from gla.testing import assert_rewrites

    TinyLlama, TinyLlamaConfig = _tiny_llama()

    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig(vocab_size=64, hidden=64, layers=1, heads=4, kv_heads=2, ffn=96))
    ids = torch.randint(0, 64, (1, 20))
    report = assert_rewrites(model, ids, expect={"gated_attention": 1, "glu": 1}, grad=True,
                             options={"inner": "aot_eager", "kernels": kernels})
    said = {r.kind: r.kernel for r in report.rewrites}
    if kernels == "triton":
        assert all("[triton]" in k for k in said.values()), str(report)
    else:
        assert "scaled_dot_product_attention" in said["gated_attention"], str(report)
        assert not any("triton" in k for k in said.values()), str(report)
