"""Call plans of the attention launchers (``flash._ForwardPlan`` / ``_BackwardPlan``).

A plan makes a call's decisions once per call signature. It must be found again only for a call
its key says is alike (same shapes, strides, dtypes, alignment, scalars, switches), hold no
tensor of the call that built it, and give what deciding afresh (``flash.PLANS = False``) gives,
call after call with new tensors: on the CPU in the interpreter, on the GPU through the bound
launches (Triton's and the Gluon kernels').
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import gla.kernels  # noqa: F401  (selects the Triton interpreter without CUDA)
from gla.kernels.attention import attention_reference, flash
from gla.testing import rel_rms_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = 1e-2 if DEVICE == "cuda" else 1e-4


def _inputs(B, H, HK, T, D, gated, seed, device=DEVICE, dtype=DTYPE):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(h, last=D):
        return torch.randn(B, h, T, last, device=device, dtype=dtype, generator=gen)
    q, k, v, dout = rand(H), rand(HK), rand(HK), rand(H)
    return q, k, v, (rand(H) if gated else None), dout


def _run(q, k, v, gate, dout, **kw):
    out, lse = flash.attention_forward(q, k, v, gate, **kw)
    return (out, *flash.attention_backward(dout, q, k, v, out, lse, gate, **kw))


def _check(res, q, k, v, gate, dout, causal=True, scale=None):
    leaves = [t.double().requires_grad_() for t in (q, k, v) + ((gate,) if gate is not None
                                                               else ())]
    ref = attention_reference(*leaves[:3], gate=leaves[3] if gate is not None else None,
                              causal=causal, scale=scale)
    expect = (ref, *torch.autograd.grad(ref, leaves, dout.double()))
    for name, a, e in zip(("out", "dq", "dk", "dv", "dgate"), res, expect):
        assert rel_rms_error(a, e) <= TOL, name


def test_a_plan_is_found_again_and_holds_no_tensor():
    """The second call with new tensors of the same signature builds nothing, matches deciding
    afresh exactly and float64 closely; the first call's tensors are freed once dropped."""
    flash.clear_plans()
    first = _inputs(1, 4, 2, 37, 16, True, seed=0)
    res = _run(*first, causal=True)
    _check(res, *first)
    assert len(flash._FORWARD_PLANS) == 1 and len(flash._BACKWARD_PLANS) == 1
    alive = weakref.ref(first[0])
    del first, res
    gc.collect()
    assert alive() is None, "a plan keeps the tensors of the call that built it"
    second = _inputs(1, 4, 2, 37, 16, True, seed=1)
    res = _run(*second, causal=True)
    assert len(flash._FORWARD_PLANS) == 1 and len(flash._BACKWARD_PLANS) == 1
    _check(res, *second)
    flash.PLANS = False
    try:
        fresh = _run(*second, causal=True)
    finally:
        flash.PLANS = True
    for a, b in zip(res, fresh):
        assert torch.equal(a, b)


def _bthd(t: torch.Tensor) -> torch.Tensor:
    """The same values as a [B, H, T, D] view of a [B, T, H, D] buffer (other strides)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    view = flat[1:1 + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def test_the_key_tells_calls_apart(monkeypatch):
    """Other strides, a misaligned view, another scale, no gate, not causal and a flipped switch
    each get a plan of their own, and each answer is right."""
    flash.clear_plans()
    q, k, v, gate, dout = _inputs(1, 4, 2, 21, 16, True, seed=2)
    _check(_run(q, k, v, gate, dout, causal=True), q, k, v, gate, dout)
    n = 1
    cases = [
        (dict(q=_bthd(q), k=_bthd(k)), {}),
        (dict(v=_misaligned(v), gate=_misaligned(gate)), {}),
        ({}, dict(scale=0.3)),
        (dict(gate=None), {}),
        ({}, dict(causal=False)),
    ]
    for swap, kw in cases:
        args = {**dict(q=q, k=k, v=v, gate=gate, dout=dout), **swap}
        kw = {"causal": True, **kw}
        res = _run(args["q"], args["k"], args["v"], args["gate"], args["dout"], **kw)
        _check(res, args["q"], args["k"], args["v"], args["gate"], args["dout"], **kw)
        n += 1
        assert len(flash._FORWARD_PLANS) == n, (swap.keys(), kw)
    before = len(flash._BACKWARD_PLANS)
    monkeypatch.setattr(flash, "DKDV_SPLIT", 2)  # a switch: the GQA group split over programs
    res = _run(q, k, v, gate, dout, causal=True)
    _check(res, q, k, v, gate, dout)
    assert len(flash._BACKWARD_PLANS) == before + 1


def test_plans_start_over_past_their_bound(monkeypatch):
    """The cache is bounded: past ``_PLANS_MAX`` signatures it starts over."""
    flash.clear_plans()
    monkeypatch.setattr(flash, "_PLANS_MAX", 2)
    for t in (5, 6, 7):
        q, k, v, _, _ = _inputs(1, 2, 2, t, 16, False, seed=t)
        flash.attention_forward(q, k, v, causal=True)
    assert len(flash._FORWARD_PLANS) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["triton", "triton-gqa-split", "gluon", "gluon-gqa-split"])
def test_gpu_plans_follow_new_tensors(case, monkeypatch):
    """Bound launches (the compiled kernels run straight from a plan) read each call's tensors:
    four calls with fresh inputs of one signature, each against float64, and the kernel chosen
    is the one the case names."""
    gluon = case.startswith("gluon")
    if gluon and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    monkeypatch.setattr(flash, "GLUON", gluon)
    monkeypatch.setattr(flash, "GLUON_BACKWARD", gluon)
    monkeypatch.setattr(flash, "gluon_pays", lambda *a: True)
    monkeypatch.setattr(flash, "gluon_backward_pays", lambda *a: True)
    if case.endswith("split"):
        monkeypatch.setattr(flash, "DKDV_SPLIT", 2)
    flash.clear_plans()
    H, HK = (8, 2) if case.endswith("split") else (4, 4)
    for seed in range(4):
        q, k, v, gate, dout = _inputs(2, H, HK, 300, 64 if gluon else 40, True, seed=seed)
        res = _run(q, k, v, gate, dout, causal=True)
        _check(res, q, k, v, gate, dout)
    assert len(flash._FORWARD_PLANS) == 1 and len(flash._BACKWARD_PLANS) == 1
    fwd, bwd = next(iter(flash._FORWARD_PLANS.values())), next(iter(
        flash._BACKWARD_PLANS.values()))
    assert (fwd.gluon is not None) == gluon and (bwd.gluon is not None) == gluon
    split = (bwd.gluon or bwd).split
    assert split == (2 if case.endswith("split") else 1)
    launches = [bwd.pre] + ([] if gluon else [fwd.launch, bwd.dkdv, bwd.dq])
    assert all(b.hit is not None for b in launches)  # each ran from its plan after the first


def test_an_eager_step_asks_its_forward_plan_for_the_backward(monkeypatch):
    """An eager training step keeps its backward plans in the forward's, keyed on the output
    gradient (and the switches): steps with new tensors reuse them, a gradient of other strides
    and a switch flipped between forward and backward each get one of their own, and every
    step's gradients match float64."""
    from gla.kernels.attention import gated_attention

    flash.clear_plans()

    def step(seed, dout_layout=lambda t: t):
        q, k, v, gate, dout = _inputs(1, 4, 2, 29, 16, True, seed=seed)
        leaves = [t.requires_grad_() for t in (q, k, v, gate)]
        out = gated_attention(*leaves[:3], gate=leaves[3], causal=True, impl="triton")
        out.backward(dout_layout(dout))
        _check((out.detach(), *(t.grad for t in leaves)), q.detach(), k.detach(), v.detach(),
               gate.detach(), dout)

    step(0)
    step(1)
    assert len(flash._FORWARD_PLANS) == 1 and not flash._BACKWARD_PLANS
    plan = next(iter(flash._FORWARD_PLANS.values()))
    assert len(plan.backward_plans) == 1
    step(2, dout_layout=_bthd)
    assert len(plan.backward_plans) == 2
    step(3, dout_layout=_misaligned)
    assert len(plan.backward_plans) == 3
    monkeypatch.setattr(flash, "DKDV_SPLIT", 2)  # a switch: a forward plan of its own
    step(4)
    assert len(plan.backward_plans) == 3 and len(flash._FORWARD_PLANS) == 2
    q, k, v, gate, dout = _inputs(1, 4, 2, 29, 16, True, seed=5)
    leaves = [t.requires_grad_() for t in (q, k, v, gate)]
    out = gated_attention(*leaves[:3], gate=leaves[3], causal=True, impl="triton")
    monkeypatch.setattr(flash, "DKDV_SPLIT", 1)  # flipped after the forward
    out.backward(dout)
    _check((out.detach(), *(t.grad for t in leaves)), q.detach(), k.detach(), v.detach(),
           gate.detach(), dout)
    split_plan = flash._FORWARD_PLANS[next(reversed(flash._FORWARD_PLANS))]
    assert len(split_plan.backward_plans) == 2
    assert sorted(p.split for p in split_plan.backward_plans.values()) == [1, 2]


def test_validated_signatures_still_refuse_what_differs():
    """``gated_attention`` remembers eager signatures that passed its checks; a call differing in
    anything the checks read (a window, a bias that needs its gradient) is checked again and
    refused."""
    from gla.kernels.attention import gated_attention

    q = torch.randn(1, 2, 9, 16)
    bias = torch.randn(1, 1, 9, 9)
    gated_attention(q, q, q, bias=bias, impl="triton")
    gated_attention(q, q, q, bias=bias, impl="triton")  # remembered
    with pytest.raises(ValueError, match="window"):
        gated_attention(q, q, q, bias=bias, window=-1, impl="triton")
    with pytest.raises(ValueError, match="dbias"):
        gated_attention(q, q, q, bias=bias.requires_grad_(), impl="triton")
    with torch.no_grad():  # the same bias without grad mode: the kernel takes it
        gated_attention(q, q, q, bias=bias, impl="triton")
