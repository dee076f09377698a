"""The Hopper (sm_90) Gluon forward and backward: where they run, and on the GPU against float64.

No interpreter runs Gluon, so the kernel's own tests are GPU tests; the CPU tests cover which calls
it takes and which it declines.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import gla.kernels  # noqa: F401  (selects the Triton interpreter without CUDA)
from gla.kernels.attention import flash, gated_attention, hopper, hopper_bwd
from gla.testing import rel_rms_error
from nan_poison import nan_tailed
from test_attention import _reference, _run, make_case

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(flash, "POISON", True)


class _Count:
    """Counts the launches of the Gluon forward (or backward) by its call plans: wraps
    ``module.forward_plan`` (``backward_plan``) and the runs the plans built from now on make
    (the plans kept so far are dropped)."""

    def __init__(self, monkeypatch, module=hopper, name="forward_plan"):
        self.calls = 0
        real = getattr(module, name)

        def counted_plan(*args, **kwargs):
            run = real(*args, **kwargs)

            def counted(*a, **kw):
                self.calls += 1
                return run(*a, **kw)
            return counted
        monkeypatch.setattr(module, name, counted_plan)
        flash.clear_plans()


# ----------------------------------------------------------------------------------------------
# CPU: what the Gluon forward takes
# ----------------------------------------------------------------------------------------------
def test_tma_rules_on_strides():
    x = torch.randn(2, 4, 63, 64)
    assert hopper._tma_ready(x)
    assert hopper._tma_ready(torch.randn(2, 63, 4, 64).transpose(1, 2))  # [B, T, H, D] view
    assert not hopper._tma_ready(x.transpose(2, 3))  # D not contiguous
    assert not hopper._tma_ready(torch.randn(2, 4, 63, 65)[..., :64])  # rows not 16-byte aligned
    assert not hopper._tma_ready(torch.randn(4, 2, 63, 64).transpose(0, 1))  # batch not outermost
    assert not hopper._tma_ready(torch.randn(2, 1, 63, 64).expand(2, 4, 63, 64))  # broadcast heads
    assert hopper._t_major(torch.randn(2, 63, 4, 64).transpose(1, 2))
    assert not hopper._t_major(x)


def test_declines_off_hopper_and_the_triton_kernel_runs(monkeypatch):
    q, k, v, kw, _ = make_case(Hq=2, Hkv=2, Tq=63, Tk=63, D=64, causal=True,
                               dtype=torch.float16)
    reason = hopper.unsupported_reason(q, k, v, None, None, None, True, 0, 0)
    assert reason is not None
    count = _Count(monkeypatch)
    out, lse = flash.attention_forward(q, k, v, causal=True)
    assert count.calls == 0 and torch.isfinite(out).all()


def test_a_compile_failure_turns_the_path_off(monkeypatch):
    """A Triton whose Gluon API moved fails at the first compile: that call and every later one
    decline (with the reason) instead of raising; the launcher then runs the Triton kernel."""
    from triton.compiler.errors import CompilationError

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise CompilationError(None, None, "no such builtin")
            return launch

    monkeypatch.setattr(hopper, "_attn_fwd_sm90", Broken())
    monkeypatch.setattr(hopper, "_on", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(hopper, "FORWARD", hopper.GluonLaunch(lambda: hopper._attn_fwd_sm90,
                                                              "the Gluon forward", 4))
    q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.float16) for _ in range(3))
    out = flash._empty_bthd(1, 2, 64, 64, torch.float16, q.device)
    lse = torch.empty(1, 2, 64)
    with pytest.warns(UserWarning, match="failed to compile"), pytest.raises(hopper.Declined):
        hopper.attention_forward(q, k, v, out, lse, None, (0, 0, 0, 0), False, 0.125, True)
    assert "failed to compile" in hopper.unsupported_reason(q, k, v, None, None, None, True, 0, 0)


def test_launch_caches_reuse_only_what_triton_would(monkeypatch):
    """The exact-key cache rebuilds descriptors on the call's own tensors; the fine key reuses a
    compiled kernel only across lengths Triton specializes alike (divisibility by 16), and a new
    specialization compiles."""
    compiled = []

    class Kernel:  # what the JIT launch returns: a compiled kernel with its launcher
        function = packed_metadata = None

        def __init__(self):
            self.runs = []

        def run(self, *args):
            self.runs.append(args)

    class Jit:
        def __getitem__(self, grid):
            def launch(*args, **consts):
                compiled.append(Kernel())
                return compiled[-1]
            return launch

    monkeypatch.setattr(hopper, "_attn_fwd_sm90", Jit())
    monkeypatch.setattr(hopper, "_on", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    monkeypatch.setattr(hopper, "FORWARD", hopper.GluonLaunch(lambda: hopper._attn_fwd_sm90,
                                                              "the Gluon forward", 4))

    def call(t, causal=True):
        q, k, v = (torch.randn(1, 2, t, 64, dtype=torch.float16) for _ in range(3))
        out = flash._empty_bthd(1, 2, t, 64, torch.float16, q.device)
        hopper.attention_forward(q, k, v, out, torch.empty(1, 2, t), None, (0, 0, 0, 0), False,
                                 0.125, causal)
        return q, out

    call(1024)
    q, out = call(1024)  # exact hit: no compile, descriptors over this call's tensors
    assert len(compiled) == 1 and len(compiled[0].runs) == 1
    descs = compiled[0].runs[-1][9:13]
    assert descs[0].base.data_ptr() == q.data_ptr() and descs[3].base.data_ptr() == out.data_ptr()
    assert descs[3].block_shape == [1, hopper.HALF, 1, 64]  # out is [B, T, H, D]
    call(1008)  # also divisible by 16: the same specialization
    assert len(compiled) == 1 and len(compiled[0].runs) == 2
    call(1000)  # not divisible by 16: Triton would compile another
    call(1024, causal=False)
    assert len(compiled) == 3


def test_backward_launch_grid_and_partials(monkeypatch):
    """The backward's launch: one program per 128 keys of each (batch, kv head), times the GQA
    split; a split writes fp32 partials (PARTIALS), an unsplit launch dK/dV, and the two are
    distinct compiled specializations."""
    launches = []

    class Kernel:
        function = packed_metadata = None

        def run(self, *args):
            launches.append(("run", args[:2]))

    class Jit:
        def __getitem__(self, grid):
            def launch(*args, **consts):
                launches.append(("compile", grid, consts, args))
                return Kernel()
            return launch

    monkeypatch.setattr(hopper_bwd, "_attn_bwd_sm90", Jit())
    monkeypatch.setattr(hopper, "_on", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    monkeypatch.setattr(hopper_bwd, "BACKWARD", hopper.GluonLaunch(
        lambda: hopper_bwd._attn_bwd_sm90, "the Gluon backward", 8))
    B, H, HK, T, D = 2, 8, 2, 300, 128
    bthd = lambda h, dt=torch.float16: torch.randn(B, T, h, D, dtype=dt).transpose(1, 2)  # noqa
    q, do, k, v = bthd(H), bthd(H), bthd(HK), bthd(HK)
    lse, delta = torch.randn(B, H, T), torch.randn(B, H, T)
    dq_acc = bthd(H, torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    parts = [torch.empty(4, B, HK, T, D) for _ in range(2)]
    hopper_bwd.attention_backward(q, k, v, do, lse, delta, dq_acc, dk, dv, 0.1, True, 4, *parts)
    kind, grid, consts, args = launches[-1]
    assert kind == "compile" and grid == (3 * B * HK * 4, 1) and consts["PARTIALS"]
    assert args[9] is parts[0] and args[10] is parts[1] and args[-2] == 4  # PART_K/V, SPLIT
    assert args[-1] % 4 == 0  # the heads scheduled together: whole GQA groups
    assert [a.block_shape[1] for a in args[:7]] == [128, 128, 64, 64, 64, 128, 128]
    hopper_bwd.attention_backward(q, k, v, do, lse, delta, dq_acc, dk, dv, 0.1, True, 4, *parts)
    assert launches[-1] == ("run", (3 * B * HK * 4, 1))  # exact hit
    hopper_bwd.attention_backward(q, k, v, do, lse, delta, dq_acc, dk, dv, 0.1, True)
    kind, grid, consts, args = launches[-1]
    assert kind == "compile" and grid == (3 * B * HK, 1) and not consts["PARTIALS"]
    assert not consts["PER_WARPGROUP"]
    # head dim 64: a partition per warpgroup, each loading (and storing) 64 of the 128 keys,
    # compiled by its own launcher (4 warps a partition)
    monkeypatch.setattr(hopper_bwd, "BACKWARD_PER_WARPGROUP", hopper.GluonLaunch(
        lambda: hopper_bwd._attn_bwd_sm90, "the Gluon backward (per warpgroup)", 4))
    q, do, k, v, dq_acc = (t[..., :64] for t in (q, do, k, v, dq_acc))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    hopper_bwd.attention_backward(q, k, v, do, lse, delta, dq_acc, dk, dv, 0.1, True)
    kind, grid, consts, args = launches[-1]
    assert kind == "compile" and grid == (3 * B * HK, 1) and consts["PER_WARPGROUP"]
    assert consts["D"] == 64 and consts["BLOCK_N"] == 128
    assert [a.block_shape[1] for a in args[:7]] == [64, 64, 64, 64, 64, 64, 64]


def _triton36_launcher(launcher, tensordesc_indices, tensordesc_meta, **attrs):
    """A stand-in for Triton 3.6's ``CudaLauncher``: its ``launch`` is a closure over the C
    launch and the descriptors' metadata, as ``wrap_handle_tensordesc`` builds it (same names)."""
    def inner(*args):  # (references what Triton's closure holds)
        return launcher, tensordesc_indices, tensordesc_meta

    import types
    defaults = dict(launch=inner, global_scratch_size=0, profile_scratch_size=0,
                    launch_cooperative_grid=False, launch_pdl=False)
    return types.SimpleNamespace(**{**defaults, **attrs})


def test_encoded_launch_encodes_each_descriptor_once_per_address(monkeypatch):
    """``hopper._EncodedLaunch`` on a launcher laid out as Triton 3.6's: the C launch gets
    Triton's 13 leading arguments, then each descriptor's encoding, then the other arguments;
    a descriptor is encoded once per (parameter, address, shape, strides); and launchers laid
    out otherwise (this machine's Triton, scratch buffers, descriptors not leading) get None."""
    import types
    monkeypatch.setattr(hopper, "_on", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 5, raising=False)
    encoded, launched = [], []

    def encode(desc, meta):
        encoded.append((desc.base.data_ptr(), meta["p"]))
        return [("map", desc.base.data_ptr(), tuple(desc.block_shape)), *desc.shape,
                *desc.strides]

    driver = types.SimpleNamespace(_BASE_ARGS_FORMAT_LEN=13, make_tensordesc_arg=encode)
    meta = [{"p": 0}, {"p": 1}]
    kernel = types.SimpleNamespace(
        run=_triton36_launcher(lambda *a: launched.append(a), {0, 1}, meta),
        function=77, packed_metadata="packed")
    fast = hopper._EncodedLaunch.make(kernel, 2, driver)
    assert fast is not None
    q = torch.randn(1, 40, 3, 64).transpose(1, 2)  # [B, T, H, D] memory
    k = torch.randn(1, 3, 40, 64)
    lse = torch.empty(1, 3, 40)
    for _ in range(3):
        fast((4, 6), 0, ((q, 64), (k, 128)), (lse, 0.5, 40), (True, 128))
    assert encoded == [(q.data_ptr(), 0), (k.data_ptr(), 1)]  # once each, not per call
    a = launched[-1]
    assert a[:13] == (4, 6, 1, 5, 77, False, False, None, None, "packed", None, None, None)
    assert a[13] == ("map", q.data_ptr(), (1, 64, 1, 64)) and list(a[14:22]) == [
        1, 40, 3, 64, *q.transpose(1, 2).stride()]
    assert a[22] == ("map", k.data_ptr(), (1, 1, 128, 64)) and a[31:] == (lse, 0.5, 40, True, 128)
    fast((4, 6), 0, ((k, 64), (q, 128)), (lse, 0.5, 40), (True, 128))  # other parameters
    q2 = torch.randn(1, 40, 3, 64).transpose(1, 2)
    fast((4, 6), 0, ((q2, 64), (k, 128)), (lse, 0.5, 40), (True, 128))  # another address
    assert encoded[2:] == [(k.data_ptr(), 0), (q.data_ptr(), 1), (q2.data_ptr(), 0)]

    def make(**attrs):
        run = _triton36_launcher(lambda *a: None, attrs.pop("indices", {0, 1}),
                                 attrs.pop("meta", meta), **attrs)
        return hopper._EncodedLaunch.make(types.SimpleNamespace(
            run=run, function=1, packed_metadata=None), 2, attrs.pop("driver", driver))
    assert make(global_scratch_size=128) is None and make(profile_scratch_size=8) is None
    assert make(indices={1, 2}) is None and make(meta=[None, None]) is None
    assert make(driver=types.SimpleNamespace(make_tensordesc_arg=encode)) is None
    assert hopper._EncodedLaunch.make(types.SimpleNamespace(run=print), 2) is None


def test_preprocess_zeroes_the_gluon_dq_accumulator():
    """The backward preprocess with ``ZERO_DQ`` (under the interpreter): every row of the Gluon
    backward's fp32 dQ buffer ([B, Tq, H, D] memory) is zeroed, ragged last block included, and
    delta is what it is without it."""
    B, H, T, D = 2, 3, 70, 64
    o, do = (torch.randn(B, T, H, D).transpose(1, 2) for _ in range(2))
    deltas = []
    for zero in (True, False):
        delta = torch.full((B, H, T), float("nan"))
        acc = torch.full((B, T, H, D), float("nan")).transpose(1, 2)
        flash._attn_bwd_preprocess[(math.ceil(T / 32), B * H)](
            o, do, o, o, delta, delta, acc, *o.stride(), *do.stride(), *(0,) * 12,
            *(acc.stride() if zero else (0,) * 4), H, T, DV=D, BLOCK_DV=D, BLOCK_M=32,
            HAS_GATE=False, GATE_HEADWISE=False, ZERO_DQ=zero, INT64=False)
        assert bool((acc == 0).all()) == zero
        deltas.append(delta)
    torch.testing.assert_close(deltas[0], (o * do).sum(-1))
    torch.testing.assert_close(deltas[0], deltas[1], rtol=0, atol=0)


def test_gluon_pays_rule():
    """The measured rule (132 SMs): head dim 128 from 128 rows with at least ~1 program per SM,
    head dim 64 from 4096 rows; never for decode-length queries."""
    assert flash.gluon_pays(128, 512, 32, 132) and flash.gluon_pays(128, 128, 128, 132)
    assert flash.gluon_pays(128, 16384, 2, 132)
    assert not flash.gluon_pays(128, 256, 32, 132)  # 64 programs
    assert not flash.gluon_pays(128, 16, 256, 132) and not flash.gluon_pays(128, 1, 256, 132)
    assert not flash.gluon_pays(64, 2048, 32, 132)
    assert flash.gluon_pays(64, 4096, 32, 132)


def test_gluon_backward_pays_rule():
    """The measured rule: head dim 128 always, head dim 64 from 2048 rows; in eager calls (not
    captured in a CUDA graph) only from B·H·Tq·Tk = 32·2048² on, below which its extra host
    time outweighed its faster kernel."""
    big, small = 32 * 2048 * 2048, 32 * 1024 * 1024
    assert flash.gluon_backward_pays(128, 2048, 1, big, False)
    assert flash.gluon_backward_pays(128, 4096, 4, 4 * big, False)
    assert not flash.gluon_backward_pays(128, 1024, 1, small, False)
    assert flash.gluon_backward_pays(128, 1024, 1, small, True)  # graph replays: GPU time
    assert flash.gluon_backward_pays(64, 2048, 1, big, True)
    assert not flash.gluon_backward_pays(64, 1024, 1, small, True)  # not timed there
    assert flash.gluon_backward_pays(64, 4096, 4, 4 * big, False)
    assert flash.gluon_backward_pays(64, 8192, 1, 16 * big, False)


def test_compiles_for_sm90_within_limits():
    """The kernels compiled ahead of time for sm_90 by this machine's Triton (a subprocess: the
    suite runs Triton's interpreter, which has no Gluon), within the H100/H200's 227 KB of
    shared memory per block. The forward does not spill; the backward at head dim 128 spills
    under 128 B per thread (scalars and addresses: 240 registers hold its four fp32 tiles)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"),
                          "--gluon"], capture_output=True, text=True, timeout=600, cwd=root)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0 and len(rows) == 8, out.stderr[-3000:]
    for r in rows:
        limit = 128 if r["kernel"].startswith("_attn_bwd") and "D=128" in r["cfg"] else 0
        assert int(r["spill"]) <= limit and r["smem"] <= 232448, r


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
def _to_gpu(t):
    """A CUDA copy that keeps ``t``'s layout, NaN past its end."""
    if not isinstance(t, torch.Tensor):
        return t
    if t.dim() == 4 and t.stride(2) > t.stride(1):  # a [B, T, H, D] buffer seen as [B, H, T, D]
        return nan_tailed(t.transpose(1, 2).contiguous().cuda()).transpose(1, 2)
    return nan_tailed(t.contiguous().cuda())


def _layouts(seed, T, B=2, D=128):
    """Makers of random bf16 [B, H, T, D] CUDA tensors: views of [B, T, H, D] buffers, and not."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def bthd(h):
        return torch.randn(B, T, h, D, device="cuda", generator=gen,
                           dtype=torch.bfloat16).transpose(1, 2)

    def bhtd(h):
        return torch.randn(B, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    return bthd, bhtd


HOPPER_CASES = {
    "causal-d128-t63": dict(Hq=2, Hkv=2, Tq=63, Tk=63, D=128, causal=True),
    "causal-gqa4-d64-t1000-gate": dict(B=2, Hq=8, Hkv=2, Tq=1000, Tk=1000, D=64, causal=True,
                                       gate="elementwise"),
    "causal-gqa2-d128-t777-headwise-bthd": dict(Hq=4, Hkv=2, Tq=777, Tk=777, D=128,
                                                causal=True, gate="headwise", bthd=True),
    "causal-cross-q200-k1000-d128": dict(B=2, Hq=2, Hkv=1, Tq=200, Tk=1000, D=128, causal=True,
                                         gate="elementwise"),
    "cross-q333-k1000-d64-bthd-gate": dict(Hq=4, Hkv=4, Tq=333, Tk=1000, D=64,
                                           gate="elementwise", bthd=True),
    "cross-q1000-k63-d128": dict(Hq=2, Hkv=1, Tq=1000, Tk=63, D=128),
    "decode-q1-k1000-d128": dict(B=3, Hq=8, Hkv=2, Tq=1, Tk=1000, D=128, causal=True,
                                 gate="headwise"),
    "causal-q64-k64-d64": dict(Hq=2, Hkv=2, Tq=64, Tk=64, D=64, causal=True),
    "causal-q129-k300-d128": dict(Hq=2, Hkv=2, Tq=129, Tk=300, D=128, causal=True),
    # head dim 64 runs a partition per warpgroup: rows that see none of the second warpgroup's
    # keys (skipped), a warpgroup without keys (Tk=63), a ragged second program, GQA partials
    "causal-q129-k300-d64": dict(Hq=2, Hkv=2, Tq=129, Tk=300, D=64, causal=True),
    "causal-gqa4-d64-t63-headwise": dict(B=2, Hq=8, Hkv=2, Tq=63, Tk=63, D=64, causal=True,
                                         gate="headwise"),
    "cross-q200-k130-d64-bthd": dict(Hq=2, Hkv=1, Tq=200, Tk=130, D=64, bthd=True),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(HOPPER_CASES), ids=list(HOPPER_CASES))
def test_gpu_gluon_forward_matches_float64(case, dtype, monkeypatch):
    """Forward (out and lse) straight from the Gluon kernel, then forward and backward through
    the op with the Gluon forward forced (the Triton backward reads its out and lse)."""
    q, k, v, kw, dout = make_case(dtype=dtype, **HOPPER_CASES[case])
    q, k, v, dout = map(_to_gpu, (q, k, v, dout))
    kw = {n: _to_gpu(t) for n, t in kw.items()}
    gate = kw["gate"]
    assert hopper.unsupported_reason(q, k, v, gate, None, None, kw["causal"], 0, 0) is None
    monkeypatch.setattr(flash, "gluon_pays", lambda *a: True)
    monkeypatch.setattr(flash, "GLUON_BACKWARD", False)  # the Triton backward after it
    count = _Count(monkeypatch)
    out, lse = flash.attention_forward(q, k, v, gate, causal=kw["causal"])
    assert count.calls == 1
    ref, ref_grads = _reference(q, k, v, kw, dout)
    assert rel_rms_error(out, ref) <= 1e-2
    # lse (base 2) from float64 scores
    kr = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = q.double() @ kr.transpose(-1, -2) / math.sqrt(q.shape[3])
    if kw["causal"]:
        tq, tk = q.shape[2], k.shape[2]
        i = torch.arange(tq, device=s.device)[:, None] + (tk - tq)
        s = s.masked_fill(torch.arange(tk, device=s.device)[None, :] > i, float("-inf"))
    lse_ref = torch.logsumexp(s, -1) / math.log(2)
    assert (lse - lse_ref).abs().max().item() <= 2e-2

    out2, grads = _run("triton", q, k, v, kw, dout)
    assert count.calls == 2
    errs = {"out": rel_rms_error(out2, ref)}
    errs.update({n: rel_rms_error(a, e) for n, a, e in zip(["dq", "dk", "dv", "dg"], grads,
                                                          ref_grads)})
    assert all(e <= 1e-2 for e in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(HOPPER_CASES), ids=list(HOPPER_CASES))
def test_gpu_gluon_backward_matches_float64(case, dtype, monkeypatch):
    """The Gluon backward through the op (after the Triton forward, so each kernel is checked on
    its own) against float64: dq, dk, dv, and dgate from the preprocess."""
    q, k, v, kw, dout = make_case(dtype=dtype, **HOPPER_CASES[case])
    q, k, v, dout = map(_to_gpu, (q, k, v, dout))
    kw = {n: _to_gpu(t) for n, t in kw.items()}
    monkeypatch.setattr(flash, "GLUON", False)
    monkeypatch.setattr(flash, "GLUON_BACKWARD", True)
    monkeypatch.setattr(flash, "gluon_backward_pays", lambda *a: True)
    count = _Count(monkeypatch, hopper_bwd, "backward_plan")
    ref, ref_grads = _reference(q, k, v, kw, dout)
    out, grads = _run("triton", q, k, v, kw, dout)
    assert count.calls == 1
    errs = {n: rel_rms_error(a, e) for n, a, e in zip(["dq", "dk", "dv", "dg"], grads,
                                                      ref_grads)}
    assert all(e <= 1e-2 for e in errs.values()), errs


def test_group_heads_takes_whole_gqa_groups_within_the_l2_budget(monkeypatch):
    monkeypatch.setattr(hopper, "L2_BUDGET", 10 << 20)
    assert hopper.group_heads(32, 1, 4 << 20) == 2  # two heads' 4 MB fit 10 MB
    assert hopper.group_heads(32, 4, 4 << 20) == 8  # two kv heads, four query heads each
    assert hopper.group_heads(32, 4, 64 << 20) == 4  # never less than one GQA group
    assert hopper.group_heads(3, 1, 1) == 3  # never more than all heads
    assert hopper.group_heads(32, 4, 4 << 20, causal=False) == 4  # a kv head at a time
    monkeypatch.setattr(hopper, "L2_BUDGET", None)
    assert hopper.group_heads(32, 4, 4 << 20) == 32


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_schedule_with_a_short_last_head_group(D, monkeypatch):
    """Both kernels take causal heads a group at a time (``hopper._schedule``); an L2 budget of
    a few heads leaves a last group with fewer heads (10 query heads in groups of 8 in the forward,
    5 kv heads in groups of 2 in the backward). Every block of every head must still run once:
    forward and backward against float64."""
    monkeypatch.setattr(flash, "gluon_pays", lambda *a: True)
    monkeypatch.setattr(flash, "gluon_backward_pays", lambda *a: True)
    T = 300
    monkeypatch.setattr(hopper, "L2_BUDGET", int(4.2 * 2 * T * D * 2))
    assert hopper.group_heads(10, 2, 2 * T * D * 2) == 8
    fwd = _Count(monkeypatch, hopper, "forward_plan")
    bwd = _Count(monkeypatch, hopper_bwd, "backward_plan")
    q, k, v, kw, dout = make_case(B=1, Hq=10, Hkv=5, Tq=T, Tk=T, D=D, causal=True,
                                  dtype=torch.bfloat16)
    q, k, v, dout = map(_to_gpu, (q, k, v, dout))
    kw = {n: _to_gpu(t) for n, t in kw.items()}
    ref, ref_grads = _reference(q, k, v, kw, dout)
    out, grads = _run("triton", q, k, v, kw, dout)
    assert fwd.calls == 1 and bwd.calls == 1
    errs = {"out": rel_rms_error(out, ref)}
    errs.update({n: rel_rms_error(a, e) for n, a, e in zip(["dq", "dk", "dv"], grads, ref_grads)})
    assert all(e <= 1e-2 for e in errs.values()), errs


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_encoded_launches_follow_the_memory(monkeypatch):
    """Calls at the same addresses reuse their encoded descriptors (on Triton 3.6, the
    device's, the encoded path must engage), and their results follow what the memory holds:
    q, k, v, dout rewritten in place between calls, every output checked against float64.
    Fresh outputs each call (no poison here), so the caching allocator repeats their
    addresses too."""
    import triton
    monkeypatch.setattr(flash, "POISON", False)
    monkeypatch.setattr(flash, "gluon_pays", lambda *a: True)
    monkeypatch.setattr(flash, "gluon_backward_pays", lambda *a: True)
    fwd = _Count(monkeypatch, hopper, "forward_plan")
    bwd = _Count(monkeypatch, hopper_bwd, "backward_plan")
    for launcher in (hopper.FORWARD, hopper_bwd.BACKWARD):  # this test's entries only
        monkeypatch.setattr(launcher, "exact", {})
    bthd, bhtd = _layouts(7, T=320)
    q, k, v, dout = bthd(4), bthd(2), bhtd(2), bthd(4)
    kw = dict(gate=None, bias=None, key_mask=None, causal=True, window=0, chunk=0)
    for step in range(4):
        for x in (q, k, v, dout):  # new contents, same addresses
            x.copy_(torch.randn_like(x))
        out, lse = flash.attention_forward(q, k, v, causal=True)
        grads = flash.attention_backward(dout, q, k, v, out, lse, causal=True)[:3]
        ref, ref_grads = _reference(q, k, v, kw, dout)
        errs = [rel_rms_error(out, ref)] + [rel_rms_error(a, e) for a, e in
                                             zip(grads, ref_grads)]
        assert all(e <= 1e-2 for e in errs), (step, errs)
    assert fwd.calls == 4 and bwd.calls == 4
    if triton.__version__.startswith("3.6."):
        for launcher, n_desc in ((hopper.FORWARD, 4), (hopper_bwd.BACKWARD, 7)):
            encoded = [e[2] for e in launcher.exact.values() if e[2] is not None]
            assert len(encoded) == 1, launcher.name  # one shape: one entry, encoded
            # calls 2-4 launched encoded; q, k, v (and dout) kept their maps across them
            assert 0 < len(encoded[0].maps) < 3 * n_desc, (launcher.name, encoded[0].maps)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_gluon_backward_of_a_sum_and_mixed_layouts(monkeypatch):
    """The gradient of a sum through the op, and a broadcast output gradient (stride 0, which
    TMA cannot read: copied, not declined) straight into the backward; q/k/v in mixed layouts;
    Gluon forward and backward together against the Triton kernels and float64."""
    H, HK = 4, 2
    bthd, bhtd = _layouts(5, T=333)
    monkeypatch.setattr(flash, "gluon_pays", lambda *a: True)
    monkeypatch.setattr(flash, "gluon_backward_pays", lambda *a: True)
    count = _Count(monkeypatch, hopper_bwd, "backward_plan")
    for q, k, v in [(bthd(H), bhtd(HK), bhtd(HK)), (bhtd(H), bthd(HK), bthd(HK))]:
        kw = dict(gate=None, bias=None, key_mask=None, causal=True, window=0, chunk=0)
        grads = {}
        for gluon in (True, False):
            monkeypatch.setattr(flash, "GLUON_BACKWARD", gluon)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = gated_attention(*leaves, causal=True, impl="triton")
            out.float().sum().backward()
            grads[gluon] = [t.grad for t in leaves]
        ref = _reference(q, k, v, kw, torch.ones_like(q))[1]
        for a, b, e in zip(grads[True], grads[False], ref):
            assert rel_rms_error(a, e) <= 1e-2 and rel_rms_error(a, b) <= 1e-2
        out, lse = flash.attention_forward(q, k, v, causal=True)
        ones = torch.ones((), device="cuda", dtype=q.dtype).expand_as(q)
        assert ones.stride() == (0, 0, 0, 0) and not hopper._tma_ready(ones)
        monkeypatch.setattr(flash, "GLUON_BACKWARD", True)
        direct = flash.attention_backward(ones, q, k, v, out, lse, causal=True)[:3]
        for a, e in zip(direct, ref):
            assert rel_rms_error(a, e) <= 1e-2
    assert count.calls == 4


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_mixed_layouts():
    """q as a [B, T, H, D] view, k and v [B, H, T, D] (a KV cache), and the other way round."""
    H, HK = 4, 2
    bthd, bhtd = _layouts(3, T=300)
    for q, k, v in [(bthd(H), bhtd(HK), bhtd(HK)), (bhtd(H), bthd(HK), bhtd(HK)),
                    (bhtd(H), bhtd(HK), bthd(HK))]:
        assert hopper.unsupported_reason(q, k, v, None, None, None, True, 0, 0) is None
        out, _ = flash.attention_forward(q, k, v, causal=True)
        kw = dict(gate=None, bias=None, key_mask=None, causal=True, window=0, chunk=0)
        ref, _ = _reference(q, k, v, kw, torch.zeros_like(q))
        assert rel_rms_error(out, ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_what_the_gluon_forward_declines(monkeypatch):
    """Masks, Tq > Tk with causal, fp32 and other head dims stay on the Triton kernel."""
    count = _Count(monkeypatch)
    monkeypatch.setattr(flash, "gluon_pays", lambda *a: True)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    q, k, v = (torch.randn(1, 2, 256, 128, **dev) for _ in range(3))
    flash.attention_forward(q, k, v, causal=True, window=64)
    flash.attention_forward(q, k, v, causal=True, chunk=64)
    flash.attention_forward(q, k, v, key_mask=torch.ones(1, 256, device="cuda", dtype=torch.bool))
    flash.attention_forward(q, k[:, :, :100], v[:, :, :100], causal=True)
    flash.attention_forward(q.float(), k.float(), v.float(), causal=True)
    q96, k96, v96 = (torch.randn(1, 2, 256, 96, **dev) for _ in range(3))
    flash.attention_forward(q96, k96, v96, causal=True)
    assert count.calls == 0
    flash.attention_forward(q, k, v, causal=True)
    assert count.calls == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_what_the_gluon_backward_declines(monkeypatch):
    """Masks, fp32 and other head dims keep the Triton backward (and its answer)."""
    monkeypatch.setattr(flash, "gluon_backward_pays", lambda *a: True)
    count = _Count(monkeypatch, hopper_bwd, "backward_plan")
    dev = dict(device="cuda", dtype=torch.bfloat16)
    q, k, v = (torch.randn(1, 2, 256, 128, **dev) for _ in range(3))
    for kwargs in (dict(window=64), dict(chunk=64)):
        out, lse = flash.attention_forward(q, k, v, causal=True, **kwargs)
        flash.attention_backward(torch.randn_like(q), q, k, v, out, lse, causal=True, **kwargs)
    q96 = torch.randn(1, 2, 256, 96, **dev)
    out, lse = flash.attention_forward(q96, q96, q96, causal=True)
    flash.attention_backward(torch.randn_like(q96), q96, q96, q96, out, lse, causal=True)
    assert count.calls == 0
    out, lse = flash.attention_forward(q, k, v, causal=True)
    flash.attention_backward(torch.randn_like(q), q, k, v, out, lse, causal=True)
    assert count.calls == 1
