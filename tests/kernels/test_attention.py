"""gla.kernels.attention: every impl against a float64 reference, forward and backward.

On a machine without CUDA the Triton kernels run in Triton's interpreter, so shapes stay small.
Every buffer the Triton launchers allocate is filled with NaN first (``flash.POISON``), so an
element a kernel fails to write makes the relative error infinite.
"""
from __future__ import annotations

import math

import pytest
import torch

import gla.kernels  # noqa: F401  (selects the Triton interpreter without CUDA)
from gla.kernels.attention import (
    attention_reference,
    flash,
    gated_attention,
    resolve_impl,
    triton_unsupported_reason,
)
from gla.kernels.attention.op import attention_backward_op, attention_op
from gla.testing import rel_rms_error
from nan_poison import nan_tailed

IMPLS = ["triton", "sdpa", "reference"]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(flash, "POISON", True)


# ----------------------------------------------------------------------------------------------
# Case construction
# ----------------------------------------------------------------------------------------------
def _bias(kind, B, Tq, Tk, gen):
    if kind is None:
        return None
    if kind == "1_1_q_k":  # [1, 1, Tq, Tk]: -inf entries, finfo.min entries, a fully -inf row
        b = torch.randn(1, 1, Tq, Tk, generator=gen)
        b[..., :, 3] = NEG_INF
        b[..., 1, 5:20] = torch.finfo(torch.float32).min
        b[..., Tq // 2, :] = NEG_INF
        b[..., ::4, 9] = NEG_INF
        return b
    if kind == "b_1_1_k":  # [B, 1, 1, Tk]: alibi-like slope plus -inf entries
        b = -0.05 * torch.arange(Tk, dtype=torch.float32).flip(0).expand(B, 1, 1, Tk).clone()
        b = b + 0.1 * torch.randn(B, 1, 1, Tk, generator=gen)
        b[0, ..., 1::5] = NEG_INF
        return b
    raise ValueError(kind)


def _key_mask(kind, B, Tk, gen):
    if kind is None:
        return None
    km = torch.rand(B, Tk, generator=gen) > 0.3
    if kind == "empty_batch":  # batch 1 sees nothing: all of its rows are fully masked
        km[-1] = False
    return km


def make_case(B=1, Hq=2, Hkv=2, Tq=63, Tk=63, D=40, Dv=None, causal=False, window=0, chunk=0,
              gate=None, bias=None, key_mask=None, bthd=False, dtype=torch.float32, seed=0):
    """Fresh random inputs (gates too, never zeros) in ``dtype``; bthd: [B,T,H,D] transposed."""
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or D

    def rnd(b, h, t, d):
        if bthd:
            return nan_tailed(torch.randn(b, t, h, d, generator=gen).to(dtype)).transpose(1, 2)
        return nan_tailed(torch.randn(b, h, t, d, generator=gen).to(dtype))

    q, k, v = rnd(B, Hq, Tq, D), rnd(B, Hkv, Tk, D), rnd(B, Hkv, Tk, Dv)
    g = None
    if gate == "elementwise":
        g = nan_tailed((2 * rnd(B, Hq, Tq, Dv)).to(dtype))
    elif gate == "headwise":
        g = nan_tailed((2 * rnd(B, Hq, Tq, 1)).to(dtype))
    kw = dict(gate=g, bias=_bias(bias, B, Tq, Tk, gen), key_mask=_key_mask(key_mask, B, Tk, gen),
              causal=causal, window=window, chunk=chunk)
    dout = rnd(B, Hq, Tq, Dv)
    return q, k, v, kw, dout


CASES = {
    "odd-T-d40-plain": dict(Tq=63, Tk=63, D=40),
    "causal-gqa2-d64-elementwise": dict(Hq=4, Hkv=2, D=64, causal=True, gate="elementwise"),
    "causal-mqa4-headwise-bthd": dict(Hq=4, Hkv=1, D=40, causal=True, gate="headwise",
                                      bthd=True),
    "cross-q17-k63-keymask-empty": dict(B=2, Tq=17, Tk=63, causal=True, key_mask="empty_batch",
                                        gate="elementwise"),
    "decode-q1-gqa": dict(Hq=4, Hkv=2, Tq=1, Tk=63, D=64, causal=True, gate="headwise"),
    "window9-bias-1-1-q-k": dict(window=9, bias="1_1_q_k", gate="elementwise"),
    "causal-window16-bias-b-1-1-k": dict(B=2, Hq=2, Hkv=1, causal=True, window=16,
                                         bias="b_1_1_k", key_mask="random"),
    "causal-q63-k17-empty-rows": dict(Tq=63, Tk=17, causal=True, gate="headwise"),
    "d64-dv40-long": dict(Hq=1, Hkv=1, Tq=130, Tk=130, D=64, Dv=40, causal=True, window=50),
    # Llama 4's chunked attention: causal within aligned chunks (odd sizes cut through blocks)
    "causal-chunk20-gqa2-elementwise": dict(Hq=4, Hkv=2, causal=True, chunk=20,
                                            gate="elementwise"),
    "cross-q17-k63-chunk20-keymask": dict(B=2, Tq=17, Tk=63, causal=True, chunk=20,
                                          key_mask="random", gate="headwise"),
    "causal-chunk9-window5-bias-b-1-1-k": dict(Hq=2, Hkv=1, causal=True, chunk=9, window=5,
                                               bias="b_1_1_k"),
    "d64-chunk50-long": dict(Hq=1, Hkv=1, Tq=130, Tk=130, D=64, causal=True, chunk=50),
    "causal-q63-k17-chunk8-empty-rows": dict(Tq=63, Tk=17, causal=True, chunk=8),
}


def _reference(q, k, v, kw, dout):
    """float64 reference output and gradients (q, k, v, gate)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    g = kw["gate"]
    if g is not None:
        leaves.append(g.detach().double().requires_grad_())
    bias = kw["bias"].double() if kw["bias"] is not None else None
    out = attention_reference(leaves[0], leaves[1], leaves[2], gate=leaves[3] if g is not None
                              else None, bias=bias, key_mask=kw["key_mask"], causal=kw["causal"],
                              window=kw["window"], chunk=kw["chunk"])
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out, grads


def _run(impl, q, k, v, kw, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    g = kw["gate"]
    if g is not None:
        leaves.append(g.detach().requires_grad_())
    out = gated_attention(leaves[0], leaves[1], leaves[2],
                          gate=leaves[3] if g is not None else None, bias=kw["bias"],
                          key_mask=kw["key_mask"], causal=kw["causal"], window=kw["window"],
                          chunk=kw["chunk"],
                          impl=impl)
    grads = torch.autograd.grad(out, leaves, dout)
    return out, grads


def _fully_masked_rows(q, k, kw):
    """Bool [B, Hq, Tq]: rows with no visible key (by position, key_mask, -inf bias)."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    s = torch.zeros(B, Hq, Tq, Tk)
    if kw["bias"] is not None:
        s = s + kw["bias"]
    i = torch.arange(Tq)[:, None] + (Tk - Tq)
    j = torch.arange(Tk)[None, :]
    vis = torch.ones(Tq, Tk, dtype=torch.bool)
    if kw["causal"]:
        vis &= j <= i
    if kw["window"]:
        vis &= i - j < kw["window"]
    if kw["chunk"]:
        vis &= i // kw["chunk"] == j // kw["chunk"]
    if kw["key_mask"] is not None:
        vis = vis & kw["key_mask"][:, None, None, :]
    s = s.masked_fill(~vis, NEG_INF)
    return ~(s > NEG_INF).any(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_float64_reference(case, impl, dtype):
    q, k, v, kw, dout = make_case(dtype=dtype, **CASES[case])
    out, grads = _run(impl, q, k, v, kw, dout)
    ref, ref_grads = _reference(q, k, v, kw, dout)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype]
    names = ["dq", "dk", "dv", "dgate"]
    errs = {"out": rel_rms_error(out, ref)}
    errs.update({n: rel_rms_error(a, e) for n, a, e in zip(names, grads, ref_grads)})
    assert all(e <= tol for e in errs.values()), errs
    empty = _fully_masked_rows(q, k, kw)
    if empty.any():  # flash convention: exact zeros, zero gradients
        assert (out[empty] == 0).all()
        assert (grads[0][empty] == 0).all()


# ----------------------------------------------------------------------------------------------
# Specific behaviours
# ----------------------------------------------------------------------------------------------
def _cfg(fwd, dq, dkdv):
    c = lambda bm, bn: dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)  # noqa: E731
    return {"fwd": c(*fwd), "dq": c(*dq), "dkdv": c(*dkdv), "pre": c(16, 16)}


@pytest.mark.parametrize("cfg", [_cfg((32, 16), (16, 32), (16, 32)),
                                 _cfg((16, 32), (32, 16), (32, 16))], ids=["tall", "wide"])
@pytest.mark.parametrize("case", [dict(Tq=40, Tk=70, causal=True, window=23),
                                  dict(Tq=70, Tk=40, window=11, key_mask="random", B=2),
                                  dict(Tq=64, Tk=64, causal=True),
                                  dict(Tq=40, Tk=70, causal=True, chunk=13),
                                  dict(Tq=64, Tk=64, causal=True, chunk=32)],
                         ids=["q40-k70-causal-window", "q70-k40-window-keymask", "even-64",
                              "q40-k70-chunk13", "even-64-chunk32"])
def test_block_m_differs_from_block_n(case, cfg):
    """The GPU configs use BLOCK_M != BLOCK_N: exercise the band arithmetic with such tiles."""
    q, k, v, kw, dout = make_case(Hq=2, Hkv=1, D=32, gate="elementwise", **case)
    scale = 1 / math.sqrt(32)
    args = (kw["gate"], kw["bias"], kw["key_mask"], scale, kw["causal"], kw["window"], kw["chunk"])
    out, lse = flash.attention_forward(q, k, v, *args, config=cfg)
    grads = flash.attention_backward(dout, q, k, v, out, lse, *args, config=cfg)
    ref, ref_grads = _reference(q, k, v, kw, dout)
    errs = [rel_rms_error(out, ref)] + [rel_rms_error(a, e) for a, e in zip(grads, ref_grads)]
    assert all(e <= 1e-5 for e in errs), errs


@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("case", [
    dict(Hq=4, Hkv=1, causal=True, window=23, gate="elementwise", dtype=torch.float32),
    dict(B=2, Hq=8, Hkv=2, Tq=17, Tk=63, bias="b_1_1_k", key_mask="random", gate="headwise",
         dtype=torch.float32),
    dict(Hq=4, Hkv=1, causal=True, dtype=torch.float16)],
    ids=["gqa4-causal-window-gate", "gqa4-cross-bias-keymask", "gqa4-causal-fp16"])
def test_split_gqa_backward(case, split, monkeypatch):
    """A GQA group split over dK/dV programs (fp32 partials, then the sum kernel) matches float64
    and is deterministic: the partials are summed in a fixed order, no atomics."""
    monkeypatch.setattr(flash, "DKDV_SPLIT", split)
    q, k, v, kw, dout = make_case(**case)
    out, grads = _run("triton", q, k, v, kw, dout)
    ref, ref_grads = _reference(q, k, v, kw, dout)
    errs = [rel_rms_error(a, e) for a, e in zip(grads, ref_grads)]
    assert all(e <= TOL[case["dtype"]] for e in errs), errs
    again = _run("triton", q, k, v, kw, dout)[1]
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


def test_dkdv_split_rule(monkeypatch):
    """Split a GQA group while the unsplit dK/dV grid has fewer than 8 programs per SM, in
    powers of two that divide the group; never on the CPU or without GQA; the override wins."""
    monkeypatch.setitem(flash._SM_COUNT, 0, 132)
    cuda0 = torch.device("cuda", 0)
    assert flash.dkdv_split(4, 64, cuda0) == 4         # T=512, B*Hkv=8: 0.5 programs per SM
    assert flash.dkdv_split(4, 1024, cuda0) == 2       # T=8k: 7.8 per SM
    assert flash.dkdv_split(4, 2048, cuda0) == 1
    assert flash.dkdv_split(8, 512, cuda0) == 4
    assert flash.dkdv_split(6, 64, cuda0) == 2         # 4 does not divide 6
    assert flash.dkdv_split(1, 8, cuda0) == 1
    assert flash.dkdv_split(4, 64, torch.device("cpu")) == 1
    monkeypatch.setattr(flash, "DKDV_SPLIT", 3)
    assert flash.dkdv_split(4, 4096, cuda0) == 2 and flash.dkdv_split(6, 1, cuda0) == 3


def test_bf16_in_interpreter_runs_in_fp32():
    q, k, v, kw, dout = make_case(Hq=2, Hkv=1, causal=True, gate="elementwise",
                                  dtype=torch.bfloat16)
    out, grads = _run("triton", q, k, v, kw, dout)
    ref, ref_grads = _reference(q, k, v, kw, dout)
    assert out.dtype == torch.bfloat16
    assert rel_rms_error(out, ref) <= TOL[torch.bfloat16]
    for a, e in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16 and rel_rms_error(a, e) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_bias_gradient_on_recompute_paths(impl):
    q, k, v, kw, dout = make_case(B=2, bias="b_1_1_k", causal=True)
    bias = kw["bias"].clone().requires_grad_()
    out = gated_attention(q, k, v, bias=bias, causal=True, impl=impl)
    (dbias,) = torch.autograd.grad(out, bias, dout)
    b64 = bias.detach().double().requires_grad_()
    ref = attention_reference(q.double(), k.double(), v.double(), bias=b64, causal=True)
    (ref_dbias,) = torch.autograd.grad(ref, b64, dout.double())
    assert dbias.shape == bias.shape
    assert rel_rms_error(dbias, ref_dbias) <= 1e-5


def test_output_layout_is_bthd_and_strided_inputs_allowed():
    q, k, v, kw, dout = make_case(Hq=4, Hkv=2, bthd=True, gate="elementwise")
    for impl in IMPLS + ["auto"]:
        out = gated_attention(q, k, v, gate=kw["gate"], impl=impl)
        B, H, T, Dv = out.shape
        assert out.stride() == (T * H * Dv, Dv, H * Dv, 1), impl


def test_no_grad_forward_and_scale():
    q, k, v, kw, _ = make_case(causal=True)
    with torch.no_grad():
        out = gated_attention(q, k, v, scale=0.3, causal=True, impl="triton")
    ref = attention_reference(q.double(), k.double(), v.double(), scale=0.3, causal=True)
    assert rel_rms_error(out, ref) <= 1e-5


def test_unsupported_reasons(monkeypatch):
    q = torch.randn(1, 2, 8, 32)
    assert triton_unsupported_reason(q, q, q) is None  # interpreter on this machine
    assert "float64" in triton_unsupported_reason(q.double(), q.double(), q.double())
    big = torch.randn(1, 2, 8, 512)
    assert "head dim 512 > 256" in triton_unsupported_reason(big, big, big)
    bias = torch.zeros(1, 1, 8, 8, requires_grad=True)
    assert "dbias" in triton_unsupported_reason(q, q, q, bias=bias)
    with torch.no_grad():
        assert triton_unsupported_reason(q, q, q, bias=bias) is None
    gate = torch.zeros(1, 1, 8, 32)  # broadcasts, but the kernel wants [B, Hq, Tq, Dv|1]
    assert "gate shape" in triton_unsupported_reason(q, q, q, gate=gate)
    assert resolve_impl(q, q, q) == "sdpa"  # auto: Triton only for CUDA tensors
    assert resolve_impl(q, q, q, impl="triton") == "triton"
    meta = torch.empty(1, 2, 8, 32, device="meta")
    assert "meta" in triton_unsupported_reason(meta, meta, meta)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "cpu" in triton_unsupported_reason(q, q, q)
    with pytest.raises(ValueError, match="cpu"):
        gated_attention(q, q, q, impl="triton")


def test_forced_triton_rejects_bias_grad_and_bad_args():
    q = torch.randn(1, 2, 8, 16)
    bias = torch.zeros(1, 1, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="dbias"):
        gated_attention(q, q, q, bias=bias, impl="triton")
    with pytest.raises(ValueError, match="multiple"):
        gated_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match="key_mask"):
        gated_attention(q, q, q, key_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match="impl"):
        gated_attention(q, q, q, impl="cudnn")
    with pytest.raises(ValueError, match="needs causal"):
        gated_attention(q, q, q, chunk=4)
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        gated_attention(q, q, q, causal=True, chunk=-1)
    with pytest.raises(ValueError, match="needs causal"):  # the launchers assume it too
        flash.attention_forward(q, q, q, chunk=4)


def test_torch_compile_aot_eager_keeps_ops_opaque():
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def backend(gm, example_inputs):
        def record(g, _):
            graphs.append(g)
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    q, k, v, kw, dout = make_case(Hq=4, Hkv=2, Tq=17, Tk=24, D=16, causal=True, gate="headwise",
                                  key_mask="random", B=2)

    def fn(q, k, v, g):
        return gated_attention(q, k, v, gate=g, key_mask=kw["key_mask"], causal=True,
                               impl="reference")

    for compiled in (torch.compile(fn, backend="aot_eager", fullgraph=True),
                     torch.compile(fn, backend=backend, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, kw["gate"])]
        out = compiled(*leaves)
        grads = torch.autograd.grad(out, leaves, dout)
        eager_leaves = [t.clone().requires_grad_() for t in (q, k, v, kw["gate"])]
        eager = fn(*eager_leaves)
        eager_grads = torch.autograd.grad(eager, eager_leaves, dout)
        assert rel_rms_error(out, eager) <= 1e-6
        for a, e in zip(grads, eager_grads):
            assert rel_rms_error(a, e) <= 1e-6
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "gla.attention.default" in targets
    assert "gla.attention_backward.default" in targets


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    q, k, v, kw, dout = make_case(Hq=2, Hkv=1, Tq=9, Tk=12, D=16, causal=True,
                                  gate="elementwise", bias="1_1_q_k")
    bias = kw["bias"].clone().requires_grad_(impl != "triton")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
            kw["gate"].requires_grad_(), bias, None, 0.25, True, 0, 0, impl)
    torch.library.opcheck(attention_op, args)
    out, lse = attention_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    saved = (out if impl == "triton" else lse)
    bargs = (dout, q.detach(), k.detach(), v.detach(), saved, lse, kw["gate"], bias.detach(),
             None, 0.25, True, 0, 0, impl, impl != "triton")
    torch.library.opcheck(attention_backward_op, bargs,
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# Host-side paths: the eager fast path vs the torch.library ops, config override
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["causal-gqa2-d64-elementwise", "cross-q17-k63-keymask-empty",
                                  "causal-window16-bias-b-1-1-k"])
def test_eager_fast_path_matches_op_path(case, monkeypatch):
    """gated_attention(impl="triton") in eager skips the custom ops (autograd.Function); the op
    path (GLA_EAGER_OP=1) must give bit-identical outputs and gradients."""
    q, k, v, kw, dout = make_case(**CASES[case])
    fast, fast_grads = _run("triton", q, k, v, kw, dout)
    monkeypatch.setenv("GLA_EAGER_OP", "1")
    slow, slow_grads = _run("triton", q, k, v, kw, dout)
    assert torch.equal(fast, slow) and fast.stride() == slow.stride()
    for a, b in zip(fast_grads, slow_grads):
        assert torch.equal(a, b)


def test_dispatch_mode_sees_the_op():
    """Under a dispatch mode (tracing, fake tensors ...) the call goes through gla::attention."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, kw, dout = make_case(causal=True, gate="headwise")
    with Record():
        gated_attention(q, k, v, gate=kw["gate"], causal=True, impl="triton")
    assert "gla.attention.default" in seen


@pytest.mark.parametrize("headwise", [False, True], ids=["elementwise", "headwise"])
@pytest.mark.parametrize("force_op", [False, True], ids=["fast-path", "op"])
def test_gated_training_saves_only_the_gated_output(headwise, force_op, monkeypatch):
    """The backward works from the gated output alone (dO·O = dout·out, dgate = dout·out·σ(−g)):
    no ungated copy is written or saved. Gates span ±16 so σ(g) saturates at both ends."""
    if force_op:
        monkeypatch.setenv("GLA_EAGER_OP", "1")
    q, k, v, kw, dout = make_case(causal=True, Hq=4, Hkv=2, gate="elementwise")
    gate = kw["gate"][..., :1] if headwise else kw["gate"]
    gate = (8 * gate).detach().requires_grad_()
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gated_attention(*leaves, gate=gate, causal=True, impl="triton")
    known = {t.data_ptr() for t in leaves + [gate]}
    extra = [tuple(t.shape) for t in saved if t.dim() == 4 and t.data_ptr() not in known
             and t.data_ptr() != out.data_ptr()]
    assert not extra and out.data_ptr() in {t.data_ptr() for t in saved}, extra
    grads = torch.autograd.grad(out, leaves + [gate], dout)
    ref_in = [t.detach().double().requires_grad_() for t in leaves + [gate]]
    ref = attention_reference(*ref_in[:3], gate=ref_in[3], causal=True)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    errs = [rel_rms_error(out, ref)] + [rel_rms_error(a, e) for a, e in zip(grads, ref_grads)]
    assert all(e <= 1e-5 for e in errs), errs


def test_backward_through_out_only_materializes_nothing():
    """Autograd must not build zero grads for lse / o_ungated (no aten::zeros in the backward)."""
    q, k, v, kw, dout = make_case(causal=True, gate="elementwise", Tq=16, Tk=16, D=16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, kw["gate"])]
    out, _ = torch.ops.gla.attention(*leaves, None, None, 0.25, True, 0, 0, "triton")
    with torch.profiler.profile() as prof:
        torch.autograd.grad(out, leaves, dout)
    names = {e.name for e in prof.events()}
    assert "gla::attention_backward" in names and "aten::zeros" not in names


def test_config_override_parser(monkeypatch):
    parse = flash._parse_config_override
    assert parse(None) == {}
    got = parse("fwd=128,128,8,2; dq@64=64,32,4,3")
    assert got[("fwd", None)] == dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    assert got[("dq", 64)] == dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
    with pytest.raises(ValueError, match="GLA_ATTN_CONFIG"):
        parse("fwd=128,128")
    with pytest.raises(ValueError, match="kernel must be"):
        parse("bwd=1,2,3,4")
    monkeypatch.setattr(flash, "CONFIG_OVERRIDE", got)
    flash._configs_cached.cache_clear()
    try:
        c64 = flash.attention_configs(64, 64, torch.bfloat16, True, 4096, interpret=False)
        c128 = flash.attention_configs(128, 128, torch.bfloat16, True, 4096, interpret=False)
        assert c64["fwd"]["BLOCK_N"] == 128 and c64["dq"]["BLOCK_N"] == 32
        assert c128["fwd"]["BLOCK_N"] == 128 and c128["dq"]["BLOCK_N"] == 64
        c64["fwd"]["BLOCK_N"] = 1  # callers get copies
        assert flash.attention_configs(64, 64, torch.bfloat16, True, 4096,
                                       interpret=False)["fwd"]["BLOCK_N"] == 128
    finally:
        flash._configs_cached.cache_clear()


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
GPU_CASES = {
    "causal-d128": dict(B=2, Hq=4, Hkv=4, Tq=1000, Tk=1000, D=128, causal=True),
    "gqa-d64-gate": dict(B=2, Hq=8, Hkv=2, Tq=1000, Tk=1000, D=64, causal=True,
                         gate="elementwise"),
    "cross-d64-keymask-window": dict(B=2, Hq=4, Hkv=1, Tq=333, Tk=1000, D=64, causal=True,
                                     window=256, key_mask="random", gate="headwise"),
    "bias-d128-bthd": dict(B=2, Hq=4, Hkv=2, Tq=1000, Tk=1000, D=128, bias="b_1_1_k", bthd=True),
    "decode-d128": dict(B=2, Hq=8, Hkv=2, Tq=1, Tk=1000, D=128, causal=True),
    "chunk300-gqa-d128-gate": dict(B=2, Hq=8, Hkv=2, Tq=1000, Tk=1000, D=128, causal=True,
                                   chunk=300, gate="elementwise"),
    "cross-d64-chunk200-window": dict(B=2, Hq=4, Hkv=1, Tq=333, Tk=1000, D=64, causal=True,
                                      chunk=200, window=150, key_mask="random"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_triton_matches_float64(case, dtype):
    q, k, v, kw, dout = make_case(dtype=dtype, **GPU_CASES[case])
    to = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    q, k, v, dout = map(to, (q, k, v, dout))
    kw = {n: to(t) for n, t in kw.items()}
    out, grads = _run("triton", q, k, v, kw, dout)
    ref, ref_grads = _reference(q, k, v, kw, dout)
    errs = {"out": rel_rms_error(out, ref)}
    errs.update({n: rel_rms_error(a, e) for n, a, e in zip(["dq", "dk", "dv", "dg"], grads,
                                                          ref_grads)})
    assert all(e <= 1e-2 for e in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("few_tiles", [True, False], ids=["small-grid", "large-grid"])
@pytest.mark.parametrize("masks", ["none", "window-chunk", "window-keymask"])
def test_gpu_every_default_config(D, few_tiles, masks):
    """Each block config the table can hand out (small- and large-grid forward, the plain and
    extras variants), forced with ``config=`` at one odd shape, against float64; the plain tiles
    also with a window and a chunk (what such masks take at head dims ≤ 128)."""
    case = dict(B=2, Hq=4, Hkv=2, Tq=1000, Tk=1000, D=D, causal=True, gate="elementwise")
    extras = masks == "window-keymask"
    if masks == "window-chunk":
        case.update(window=300, chunk=256)
    if extras:
        case.update(window=300, key_mask="random")
    q, k, v, kw, dout = make_case(dtype=torch.bfloat16, **case)
    q, k, v, dout = q.cuda(), k.cuda(), v.cuda(), dout.cuda()
    kw = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    cfg = flash._configs_cached(D, D, torch.bfloat16, True, 65, extras, False, few_tiles)
    args = (kw["gate"], None, kw["key_mask"], 1 / math.sqrt(D), True, kw["window"], kw["chunk"])
    out, lse = flash.attention_forward(q, k, v, *args, config=cfg)
    grads = flash.attention_backward(dout, q, k, v, out, lse, *args, config=cfg)
    ref, ref_grads = _reference(q, k, v, kw, dout)
    errs = {"out": rel_rms_error(out, ref)}
    errs.update({n: rel_rms_error(a, e) for n, a, e in zip(["dq", "dk", "dv", "dg"], grads,
                                                          ref_grads)})
    assert all(e <= 1e-2 for e in errs.values()), (cfg, errs)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 2, 4])
def test_gpu_split_gqa_backward(split, monkeypatch):
    """Every split of a 4:1 GQA group, bf16 on the GPU, against float64."""
    monkeypatch.setattr(flash, "DKDV_SPLIT", split)
    q, k, v, kw, dout = make_case(B=2, Hq=8, Hkv=2, Tq=1000, Tk=1000, D=128, causal=True,
                                  gate="elementwise", dtype=torch.bfloat16)
    q, k, v, dout = q.cuda(), k.cuda(), v.cuda(), dout.cuda()
    kw = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    out, grads = _run("triton", q, k, v, kw, dout)
    ref, ref_grads = _reference(q, k, v, kw, dout)
    errs = [rel_rms_error(a, e) for a, e in zip(grads, ref_grads)]
    assert all(e <= 1e-2 for e in errs), errs


def test_causal_forward_takes_smaller_tiles_on_a_small_grid(monkeypatch):
    """The grid rule: few 128-row tiles per multiprocessor -> 64-row forward tiles (causal only;
    the backward's configs do not depend on the grid; CPU tensors never ask for the SM count)."""
    monkeypatch.setitem(flash._SM_COUNT, 0, 132)
    cuda0 = torch.device("cuda", 0)
    cfg = lambda t, causal=True: flash.attention_configs(  # noqa: E731
        128, 128, torch.bfloat16, causal, t, interpret=False, batch_heads=32, device=cuda0)
    small, large = cfg(4096), cfg(8192)
    assert small["fwd"]["BLOCK_M"] == 64 and large["fwd"]["BLOCK_M"] == 128
    assert small["dkdv"] == large["dkdv"] and small["dq"] == large["dq"]
    assert cfg(4096, causal=False)["fwd"]["BLOCK_M"] == 128
    assert flash.attention_configs(128, 128, torch.bfloat16, True, 4096, interpret=False,
                                   batch_heads=32, device=torch.device("cpu")) == large


def test_position_masks_keep_the_plain_tiles_up_to_head_dim_128():
    """A window or chunk compares indices only: the plain tiles (measured faster on an H200) up to
    head dim 128; a bias or key mask, or head dim 256, takes the extras tiles."""
    bias, km = torch.zeros(1, 1, 4, 4), torch.ones(1, 4, dtype=torch.bool)
    assert not flash._extra_tiles(128, 128, None, None, 300, 0)
    assert not flash._extra_tiles(64, 40, None, None, 0, 256)
    assert flash._extra_tiles(256, 256, None, None, 300, 0)
    assert flash._extra_tiles(64, 64, bias, None, 0, 0) and flash._extra_tiles(64, 64, None, km, 0, 0)
    assert not flash._extra_tiles(128, 128, None, None, 0, 0)


@pytest.mark.gpu
def test_gpu_auto_picks_triton_and_matches_sdpa():
    q, k, v, kw, dout = make_case(B=2, Hq=4, Hkv=4, Tq=512, Tk=512, D=64, causal=True,
                                  dtype=torch.bfloat16)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    assert triton_unsupported_reason(q, k, v, causal=True) is None
    a = gated_attention(q, k, v, causal=True)
    b = gated_attention(q, k, v, causal=True, impl="sdpa")
    assert rel_rms_error(a, b) <= 1e-2
    assert math.isfinite(rel_rms_error(a, b))


@pytest.mark.parametrize("impl", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("tq, tk", [(0, 5), (5, 0)])
def test_empty_queries_or_keys(impl, tq, tk):
    """No query: an empty output. No key: every row is fully masked, so 0 (flash convention)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, tq, 16, generator=gen)
    k, v = torch.randn(1, 2, tk, 16, generator=gen), torch.randn(1, 2, tk, 16, generator=gen)
    out = gated_attention(q, k, v, impl=impl)
    assert out.shape == (1, 2, tq, 16)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("force_op", [False, True])
def test_second_derivative_raises(force_op, monkeypatch):
    """A second derivative through the Triton path raises on both the eager fast path and the
    torch.library ops."""
    monkeypatch.setenv("GLA_EAGER_OP", "1" if force_op else "0")
    q, k, v, kw, _ = make_case(causal=True)
    q = q.detach().clone().requires_grad_()
    out = gated_attention(q, k, v, causal=True, impl="triton")
    (dq,) = torch.autograd.grad((out * out).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|no autograd formula"):
        dq.sum().backward()
