"""Gated linear attention: references, torch.library ops, Triton kernels (CPU: interpreter)."""
import pytest
import torch
import torch.nn.functional as F

from gla.kernels.linear_attention import (chunk_gla, fused_recurrent_gla, gla_chunk_reference,
                                          gla_recurrent_reference, triton_unsupported_reason)
from gla.testing import rel_rms_error
from nan_poison import nan_tailed, poison_torch_empty


def _inputs(B, T, Hq, H, K, V, gate="channel", n=1.0, dtype=torch.float32, h0=False, seed=0,
            device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = r(B, T, Hq, K), r(B, T, H, K), r(B, T, H, V)
    if gate == "channel":
        g = F.logsigmoid(r(B, T, H, K)) / n
    elif gate == "scalar":
        g = F.logsigmoid(r(B, T, H)) / n
    else:
        g = None
    N = B
    s0 = r(N, H, K, V) if h0 else None
    def cast(t):   # at the front of a buffer whose tail is NaN: reads past the end show
        return None if t is None else nan_tailed(t.to(device=device, dtype=dtype))

    return [cast(t) for t in (q, k, v, g)] + [None if s0 is None else s0.to(device)]


@pytest.fixture(params=["parallel", "sequential"])
def kernel(request, monkeypatch):
    """Runs a test with each chunked implementation (``GLA_LINEAR_KERNEL``)."""
    monkeypatch.setenv("GLA_LINEAR_KERNEL", request.param)
    return request.param


def _fp64(ts):
    return [None if t is None else t.detach().double() for t in ts]


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["channel", "scalar", None])
@pytest.mark.parametrize("n", [0.1, 1.0, 10.0])
def test_chunk_reference_matches_recurrence(gate, n):
    q, k, v, g, h0 = _inputs(2, 70, 4, 2, 8, 6, gate=gate, n=n, dtype=torch.float64, h0=True)
    o1, s1 = gla_recurrent_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    o2, s2 = gla_chunk_reference(q, k, v, g, initial_state=h0, output_final_state=True)
    assert rel_rms_error(o2, o1) < 1e-12
    assert rel_rms_error(s2, s1) < 1e-12


def test_chunk_reference_cu_seqlens():
    q, k, v, g, _ = _inputs(1, 150, 2, 2, 8, 6, dtype=torch.float64)
    cu = torch.tensor([0, 10, 90, 150])
    h0 = torch.randn(3, 2, 8, 6, dtype=torch.float64)
    o1, s1 = gla_recurrent_reference(q, k, v, g, initial_state=h0, output_final_state=True,
                                     cu_seqlens=cu)
    o2, s2 = gla_chunk_reference(q, k, v, g, initial_state=h0, output_final_state=True,
                                 cu_seqlens=cu)
    assert rel_rms_error(o2, o1) < 1e-12 and rel_rms_error(s2, s1) < 1e-12
    # the state resets at each boundary: sequence 1 alone gives the same
    o3, s3 = gla_recurrent_reference(q[:, 10:90], k[:, 10:90], v[:, 10:90], g[:, 10:90],
                                     initial_state=h0[1:2], output_final_state=True)
    assert rel_rms_error(o1[:, 10:90], o3) < 1e-14 and rel_rms_error(s1[1:2], s3) < 1e-14


def test_reference_op_compiles_with_grads():
    ins = [t.requires_grad_() for t in _inputs(2, 70, 4, 2, 8, 6, h0=True, seed=1)]

    def fn(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                         impl="reference")

    o, ht = torch.compile(fn, backend="aot_eager", fullgraph=True)(*ins)
    wo, wh = torch.randn_like(o), torch.randn_like(ht)
    ((o * wo).sum() + (ht * wh).sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in ins]
    o2, h2 = gla_recurrent_reference(*ref[:4], initial_state=ref[4], output_final_state=True)
    ((o2 * wo.double()).sum() + (h2 * wh.double()).sum()).backward()
    assert rel_rms_error(o, o2) < 1e-5 and rel_rms_error(ht, h2) < 1e-5
    for a, b in zip(ins, ref):
        assert rel_rms_error(a.grad, b.grad) < 1e-5


def test_unsupported_reason():
    q, k, v, g, _ = _inputs(1, 4, 2, 2, 8, 8)
    assert triton_unsupported_reason(q, k, v, g) is None  # TRITON_INTERPRET=1 on CPU
    big = torch.zeros(1, 4, 2, 512)
    assert "512" in triton_unsupported_reason(big, big, big)
    assert "float64" in triton_unsupported_reason(q.double(), k.double(), v.double())


# ----------------------------------------------------------------------------------------------
# Triton forward (CPU: interpreter)
# ----------------------------------------------------------------------------------------------
def _poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors followed by NaN: every output must be written and
    nothing read past a tensor's end."""
    poison_torch_empty(monkeypatch)


FWD_CASES = [
    # B, T, Hq, H, K, V, gate, n
    (1, 63, 2, 2, 40, 40, "channel", 1.0),
    (2, 65, 2, 1, 32, 32, "channel", 0.1),
    (1, 65, 2, 2, 32, 40, "scalar", 10.0),
    (1, 1, 2, 2, 40, 32, None, 1.0),
    (1, 20, 4, 2, 32, 32, None, 1.0),
    (1, 33, 2, 2, 40, 40, "scalar", 0.1),
]


@pytest.mark.parametrize("case", FWD_CASES)
def test_triton_forward_matches_recurrence(case, kernel, monkeypatch):
    B, T, Hq, H, K, V, gate, n = case
    q, k, v, g, h0 = _inputs(B, T, Hq, H, K, V, gate=gate, n=n, h0=True, seed=FWD_CASES.index(case))
    h0 = h0.float()
    _poisoned_empty(monkeypatch)
    o, ht = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, impl="triton")
    o2, h2 = gla_recurrent_reference(*_fp64([q, k, v, g]), initial_state=h0.double(),
                                     output_final_state=True)
    assert o.dtype == v.dtype and ht.dtype == torch.float32
    assert rel_rms_error(o, o2) < 1e-5
    assert rel_rms_error(ht, h2) < 1e-5


def test_triton_forward_no_state_and_column_loop(monkeypatch):
    """The GPU's column-by-column diagonal path, run in the interpreter."""
    from gla.kernels.linear_attention import chunk

    monkeypatch.setattr(chunk, "DIAG_3D_OVERRIDE", False)
    q, k, v, g, _ = _inputs(1, 40, 2, 2, 16, 16, gate="channel", n=0.1, seed=5)
    o, ht = chunk_gla(q, k, v, g, impl="triton")
    assert ht is None
    o2, _ = gla_recurrent_reference(*_fp64([q, k, v, g]))
    assert rel_rms_error(o, o2) < 1e-5


def test_triton_forward_fp16():
    q, k, v, g, _ = _inputs(1, 50, 2, 2, 32, 32, gate="channel", dtype=torch.float16, seed=7)
    o, _ = chunk_gla(q, k, v, g, impl="triton")
    assert o.dtype == torch.float16
    o2, _ = gla_recurrent_reference(*_fp64([q, k, v, g]))
    assert rel_rms_error(o, o2) < 1e-2


# ----------------------------------------------------------------------------------------------
# Triton backward
# ----------------------------------------------------------------------------------------------
def _check_grads(ins, cu=None, tol=1e-4, final=True, impl="triton"):
    """ins = [q, k, v, g, h0]; compares o, final state and all grads with the fp64 recurrence."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ins]
    q, k, v, g, h0 = leaves
    o, ht = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=final, cu_seqlens=cu,
                      impl=impl)
    gen = torch.Generator().manual_seed(123)
    wo = torch.randn(o.shape, generator=gen).to(o.device, o.dtype)
    loss = (o.float() * wo.float()).sum()
    if final:
        wh = torch.randn(ht.shape, generator=gen).to(ht.device)
        loss = loss + (ht * wh).sum()
    loss.backward()
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in ins]
    o2, h2 = gla_recurrent_reference(*ref[:4], initial_state=ref[4], output_final_state=final,
                                     cu_seqlens=cu)
    loss2 = (o2 * wo.double()).sum()
    if final:
        loss2 = loss2 + (h2 * wh.double()).sum()
    loss2.backward()
    assert rel_rms_error(o, o2) < tol
    if final:
        assert rel_rms_error(ht, h2) < tol
    for name, a, b in zip("q k v g h0".split(), leaves, ref):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype, name
            err = rel_rms_error(a.grad, b.grad)
            assert err < tol, f"d{name}: {err}"


BWD_CASES = [
    # B, T, Hq, H, K, V, gate, n, h0, final
    (1, 63, 2, 2, 40, 40, "channel", 1.0, True, True),
    (1, 65, 4, 2, 32, 32, "channel", 0.1, True, False),
    (2, 65, 2, 2, 32, 40, "scalar", 0.1, False, True),
    (1, 17, 2, 2, 16, 80, "scalar", 10.0, True, True),   # 2 V-blocks
    (1, 1, 2, 1, 40, 32, None, 1.0, True, True),
    (1, 30, 2, 2, 32, 32, None, 1.0, False, False),
    (1, 20, 2, 2, 80, 40, "channel", 1.0, True, True),  # K > 64: BV = 32, 2 V-blocks
]


@pytest.mark.parametrize("case", BWD_CASES)
def test_triton_backward_matches_recurrence(case, kernel, monkeypatch):
    B, T, Hq, H, K, V, gate, n, h0, final = case
    ins = _inputs(B, T, Hq, H, K, V, gate=gate, n=n, h0=h0, seed=50 + BWD_CASES.index(case))
    if ins[4] is not None:
        ins[4] = ins[4].float()
    _poisoned_empty(monkeypatch)
    _check_grads(ins, final=final)


def test_triton_backward_column_loop(kernel, monkeypatch):
    from gla.kernels.linear_attention import chunk

    monkeypatch.setattr(chunk, "DIAG_3D_OVERRIDE", False)
    ins = _inputs(1, 40, 2, 1, 16, 16, gate="channel", n=0.1, h0=True, seed=9)
    ins[4] = ins[4].float()
    _check_grads(ins)


def test_triton_backward_fp16():
    ins = _inputs(1, 40, 2, 2, 32, 32, gate="channel", dtype=torch.float16, seed=11)
    _check_grads(ins, tol=1e-2, final=False)


def test_triton_compiled_aot_eager():
    ins = _inputs(1, 20, 2, 2, 16, 16, gate="channel", h0=True, seed=12)
    ins[4] = ins[4].float()
    leaves = [t.requires_grad_() for t in ins]

    def fn(q, k, v, g, h0):
        o, ht = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, impl="triton")
        return o.sum() + ht.sum()

    torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves).backward()
    ref = [t.detach().double().requires_grad_() for t in ins]
    o2, h2 = gla_recurrent_reference(*ref[:4], initial_state=ref[4], output_final_state=True)
    (o2.sum() + h2.sum()).backward()
    for a, b in zip(leaves, ref):
        assert rel_rms_error(a.grad, b.grad) < 1e-4


@pytest.mark.parametrize("cu", [None, [0, 7, 7, 40, 100]])
def test_parallel_small_blocks_column_loop(cu, monkeypatch):
    """The chunk-parallel kernels with several K/V blocks (masked tails: 40 = 32 + 8 = 16 + 16 + 8),
    the GPU's column-loop diagonal, GQA, per-channel gates, initial and final states, all grads."""
    from gla.kernels.linear_attention import chunk, chunk_parallel

    monkeypatch.setenv("GLA_LINEAR_KERNEL", "parallel")
    if cu is None:   # the column loop is slow in the interpreter: once is enough
        monkeypatch.setattr(chunk, "DIAG_3D_OVERRIDE", False)
    monkeypatch.setattr(chunk_parallel, "BLOCK_OVERRIDE", (32, 16))
    ins = _inputs(1, 100, 4, 2, 40, 40, gate="channel", n=0.3, h0=True, seed=13)
    N = 1 if cu is None else len(cu) - 1
    ins[4] = torch.randn(N, 2, 40, 40)
    _poisoned_empty(monkeypatch)
    _check_grads(ins, cu=None if cu is None else torch.tensor(cu))


def _mixed_span_inputs(T=150, seed=14):
    """Per-channel gates whose chunk spans straddle ``SPAN_MAX``: chunk 0 gentle (≈ 3 nats),
    chunk 1 with one channel at 39 nats (just inside the one-dot form: its factors reach
    exp(±39)), chunk 2 steep (≈ 500 nats: the sub-block form)."""
    ins = _inputs(1, T, 4, 2, 40, 24, gate="channel", n=1.0, h0=True, seed=seed)
    g = ins[3]
    g[:, :64] = g[:, :64] / 16
    g[:, 64:128] = g[:, 64:128] / 16
    g[:, 64:128, 0, 3] = -39.0 / 63        # span b_first − b_last = 63 steps · 39/63
    g[:, 128:] = g[:, 128:] * 10
    ins[4] = ins[4].float()
    return ins


@pytest.mark.parametrize("span_max", [None, -1.0])
def test_parallel_one_dot_and_sub_block_forms(span_max, monkeypatch):
    """Both exact intra-chunk forms (chosen per chunk from the gate span) against the fp64
    recurrence, forward and every grad; span_max=-1 forces the sub-block form everywhere."""
    from gla.kernels.linear_attention import chunk_parallel

    monkeypatch.setenv("GLA_LINEAR_KERNEL", "parallel")
    if span_max is not None:
        monkeypatch.setattr(chunk_parallel, "SPAN_MAX", span_max)
    ins = _mixed_span_inputs()
    _poisoned_empty(monkeypatch)
    _check_grads(ins)


def test_parallel_one_dot_form_runs(monkeypatch):
    """The default takes the one-dot form on gentle chunks: its sums run in another order than
    the sub-block form's, so the outputs differ in the last bits (both are checked above)."""
    from gla.kernels.linear_attention import chunk_parallel

    monkeypatch.setenv("GLA_LINEAR_KERNEL", "parallel")
    q, k, v, g, _ = _inputs(1, 64, 2, 2, 16, 16, gate="channel", n=16.0, seed=15)
    o_fast, _ = chunk_gla(q, k, v, g, impl="triton")
    monkeypatch.setattr(chunk_parallel, "SPAN_MAX", -1.0)
    o_sub, _ = chunk_gla(q, k, v, g, impl="triton")
    o_ref, _ = gla_recurrent_reference(*_fp64([q, k, v, g]))
    assert not torch.equal(o_fast, o_sub)
    assert rel_rms_error(o_fast, o_ref) < 1e-5 and rel_rms_error(o_sub, o_ref) < 1e-5


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_closed_gates_reset_the_state(impl, kernel, monkeypatch):
    """g = −inf (decay 0: a state reset, e.g. at a document boundary) in some channels, and in
    every channel of one head at one step: outputs, final state and every grad match the fp64
    recurrence (the chunked forms take −inf as LOG_GATE_MIN; −inf − (−inf) would be NaN)."""
    ins = _inputs(1, 130, 4, 2, 16, 16, gate="channel", n=4.0, h0=True, seed=18)
    g = ins[3]
    g[:, 10, :, :3] = float("-inf")
    g[:, 70, 0, :] = float("-inf")
    g[:, 100:103, 1, 5] = float("-inf")
    ins[4] = ins[4].float()
    _poisoned_empty(monkeypatch)
    _check_grads(ins, impl=impl)


def test_positive_gates_are_loud_in_the_kernels(kernel):
    """A positive log gate (growth, outside the kernels' decay contract) gives NaN in the Triton
    outputs it reaches, never a silently clamped decay; the reference computes it exactly."""
    q, k, v, g, _ = _inputs(1, 80, 2, 2, 16, 16, gate="channel", n=4.0, seed=19)
    g[:, 10, :, :3] = 0.3
    o, _ = chunk_gla(q, k, v, g, impl="triton")
    assert torch.isnan(o[:, 10:]).any() and not torch.isnan(o[:, :10]).any()
    o_dec, _ = fused_recurrent_gla(q, k, v, g, impl="triton")
    assert torch.isnan(o_dec[:, 10:]).any()
    o_ref, _ = chunk_gla(q, k, v, g, impl="reference")
    o_rec, _ = gla_recurrent_reference(*_fp64([q, k, v, g]))
    assert rel_rms_error(o_ref, o_rec) < 1e-5


def test_int32_offsets_bound_the_triton_path():
    """Sizes whose element offsets reach 2^31 are declined with the reason (auto falls back to
    the reference; a forced triton raises) instead of wrapping int32 offsets. Expanded views
    stand in for the large tensors: only shapes are read."""
    from gla.kernels.linear_attention import triton_unsupported_reason

    big = torch.zeros(1, 1, 1, 128).expand(1, 2**20, 16, 128)
    small = torch.zeros(1, 8, 16, 128)
    assert triton_unsupported_reason(small, small, small) is None
    reason = triton_unsupported_reason(big, big, big)
    assert reason is not None and "2^31" in reason
    with pytest.raises(ValueError, match="2\\^31"):
        chunk_gla(big, big, big, None, impl="triton")


def _grads_of(ins, use_final, monkeypatch, force_op, cu=None):
    if force_op:
        monkeypatch.setenv("GLA_EAGER_OP", "1")
    else:
        monkeypatch.delenv("GLA_EAGER_OP", raising=False)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in ins]
    o, ht = chunk_gla(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                      cu_seqlens=cu, impl="triton")
    gen = torch.Generator().manual_seed(5)
    loss = (o * torch.randn(o.shape, generator=gen)).sum()
    if use_final:   # else the final state is requested but left unused
        loss = loss + (ht * torch.randn(ht.shape, generator=gen)).sum()
    loss.backward()
    return [o] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("use_final", [False, True])
@pytest.mark.parametrize("kernel_name", ["parallel", "sequential"])
def test_eager_fast_path_matches_op_path(kernel_name, use_final, monkeypatch):
    """chunk_gla(impl="triton") in plain eager skips the custom ops (an autograd.Function); the
    op path (GLA_EAGER_OP=1) gives bit-identical outputs and gradients, also with a final state
    requested but unused (no zero gradient materialized for it)."""
    monkeypatch.setenv("GLA_LINEAR_KERNEL", kernel_name)
    ins = _inputs(1, 40, 4, 2, 16, 24, gate="channel", n=2.0, h0=True, seed=16)
    ins[4] = ins[4].float()
    cu = None
    if use_final:   # also with packed sequences: one initial/final state per sequence
        cu = torch.tensor([0, 30, 40], dtype=torch.int32)
        ins[4] = torch.randn(2, 2, 16, 24)
    fast = _grads_of(ins, use_final, monkeypatch, force_op=False, cu=cu)
    slow = _grads_of(ins, use_final, monkeypatch, force_op=True, cu=cu)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_dispatch_mode_sees_the_ops():
    """Under a dispatch mode (tracing, fake tensors ...) the calls go through gla::chunk_gla and
    gla::fused_recurrent_gla; outside one, the no-grad decode (a direct launch) is still right."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v, g, _ = _inputs(1, 8, 2, 2, 16, 16, seed=17)
    with Record():
        chunk_gla(q, k, v, g, impl="triton")
        fused_recurrent_gla(q[:, :1], k[:, :1], v[:, :1], g[:, :1], impl="triton")
    assert "gla.chunk_gla.default" in seen and "gla.fused_recurrent_gla.default" in seen
    with torch.no_grad():
        o, _ = fused_recurrent_gla(q[:, :1], k[:, :1], v[:, :1], g[:, :1], impl="triton")
    o2, _ = gla_recurrent_reference(*_fp64([q[:, :1], k[:, :1], v[:, :1], g[:, :1]]))
    assert rel_rms_error(o, o2) < 1e-5


def test_kernel_and_dot_env(monkeypatch):
    from gla.kernels.linear_attention import chunk, chunk_parallel

    q, k, v, g, _ = _inputs(1, 8, 2, 2, 16, 16, seed=41)
    monkeypatch.setenv("GLA_LINEAR_KERNEL", "nope")
    with pytest.raises(ValueError, match="GLA_LINEAR_KERNEL"):
        chunk_gla(q, k, v, g, impl="triton")
    monkeypatch.setenv("GLA_LINEAR_KERNEL", "parallel")
    monkeypatch.setenv("GLA_LINEAR_DOT", "dqk=tf32x3,o=tf32")
    modes = chunk_parallel._dot_modes()
    assert modes["dqk"] == "tf32x3" and modes["o"] == "tf32" and modes["h"] == "native"
    monkeypatch.setenv("GLA_LINEAR_DOT", "ieee")
    assert set(chunk_parallel._dot_modes().values()) == {"ieee"}
    monkeypatch.setenv("GLA_LINEAR_DOT", "o=fast")
    with pytest.raises(ValueError, match="GLA_LINEAR_DOT"):
        chunk_gla(q, k, v, g, impl="triton")
    assert chunk.kernel_choice() == "parallel"


# ----------------------------------------------------------------------------------------------
# Variable-length sequences (cu_seqlens): forward and backward both through Triton
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_triton_cu_seqlens_one_dot_form(gate, monkeypatch):
    """Gentle gates (the one-dot intra-chunk form) with packed sequences, partial chunks, an
    empty sequence, GQA and initial states: forward and every grad."""
    monkeypatch.setenv("GLA_LINEAR_KERNEL", "parallel")
    cu = torch.tensor([0, 70, 70, 75, 150], dtype=torch.int32)
    ins = _inputs(1, 150, 4, 2, 24, 16, gate=gate, n=16.0, seed=23)
    ins[4] = torch.randn(4, 2, 24, 16)
    _poisoned_empty(monkeypatch)
    _check_grads(ins, cu=cu)


@pytest.mark.parametrize("gate", ["channel", "scalar", None])
def test_triton_cu_seqlens(gate, kernel, monkeypatch):
    cu = torch.tensor([0, 5, 5, 75, 100], dtype=torch.int32)   # includes an empty sequence
    ins = _inputs(1, 100, 2, 1, 16, 16, gate=gate, n=0.5, seed=21)
    ins[4] = torch.randn(4, 1, 16, 16)
    _poisoned_empty(monkeypatch)
    _check_grads(ins, cu=cu)


def test_triton_cu_seqlens_matches_separate_calls():
    cu = torch.tensor([0, 30, 100])
    q, k, v, g, _ = _inputs(1, 100, 2, 2, 16, 16, seed=22)
    o, ht = chunk_gla(q, k, v, g, cu_seqlens=cu, output_final_state=True, impl="triton")
    for n in range(2):
        s, e = int(cu[n]), int(cu[n + 1])
        o1, h1 = chunk_gla(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], output_final_state=True,
                           impl="triton")
        assert rel_rms_error(o[:, s:e], o1) < 1e-6 and rel_rms_error(ht[n:n + 1], h1) < 1e-6


# ----------------------------------------------------------------------------------------------
# Decode: fused_recurrent_gla
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["channel", "scalar", None])
def test_fused_recurrent_matches_recurrence(gate, monkeypatch):
    from gla.kernels.linear_attention import fused_recurrent

    q, k, v, g, h0 = _inputs(2, 5, 4, 2, 40, 48, gate=gate, n=0.5, h0=True, seed=31)
    h0 = h0.float()
    monkeypatch.setattr(fused_recurrent.torch, "empty",
                        lambda *a, **kw: torch.full(a if len(a) != 1 else a[0], float("nan"),
                                                    **kw))
    o, ht = fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                impl="triton")
    o2, h2 = gla_recurrent_reference(*_fp64([q, k, v, g]), initial_state=h0.double(),
                                     output_final_state=True)
    assert rel_rms_error(o, o2) < 1e-5 and rel_rms_error(ht, h2) < 1e-5


@pytest.mark.parametrize("config", ["16,1", "32,2", "64,8"])
def test_decode_configs(config, monkeypatch):
    """Every GLA_DECODE_CONFIG (BV, warps) gives the recurrence: several V-blocks, GQA, state."""
    monkeypatch.setenv("GLA_DECODE_CONFIG", config)
    q, k, v, g, h0 = _inputs(2, 3, 4, 2, 40, 72, gate="channel", h0=True, seed=25)
    o, ht = fused_recurrent_gla(q, k, v, g, initial_state=h0.float(), output_final_state=True,
                                impl="triton")
    o2, h2 = gla_recurrent_reference(*_fp64([q, k, v, g]), initial_state=h0.double(),
                                     output_final_state=True)
    assert rel_rms_error(o, o2) < 1e-5 and rel_rms_error(ht, h2) < 1e-5


def test_decode_config_env_is_checked(monkeypatch):
    q, k, v, g, _ = _inputs(1, 1, 2, 2, 16, 16, seed=26)
    monkeypatch.setenv("GLA_DECODE_CONFIG", "24,4")
    with pytest.raises(ValueError, match="GLA_DECODE_CONFIG"):
        fused_recurrent_gla(q, k, v, g, impl="triton")


@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_prefill_then_decode_equals_full_sequence(gate):
    q, k, v, g, _ = _inputs(1, 41, 2, 1, 32, 32, gate=gate, seed=32)
    _, h = chunk_gla(q[:, :40], k[:, :40], v[:, :40], g[:, :40], output_final_state=True,
                     impl="triton")
    o1, h1 = fused_recurrent_gla(q[:, 40:], k[:, 40:], v[:, 40:], g[:, 40:], initial_state=h,
                                 output_final_state=True, impl="triton")
    o_full, h_full = chunk_gla(q, k, v, g, output_final_state=True, impl="triton")
    assert rel_rms_error(o1, o_full[:, 40:]) < 1e-5
    assert rel_rms_error(h1, h_full) < 1e-5


def test_fused_recurrent_grads_via_op():
    ins = _inputs(1, 3, 2, 2, 16, 16, gate="channel", h0=True, seed=33)
    ins[4] = ins[4].float()
    leaves = [t.detach().clone().requires_grad_() for t in ins]
    o, ht = fused_recurrent_gla(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                impl="triton")
    (o.sum() + ht.sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in ins]
    o2, h2 = gla_recurrent_reference(*ref[:4], initial_state=ref[4], output_final_state=True)
    (o2.sum() + h2.sum()).backward()
    for a, b in zip(leaves, ref):
        assert rel_rms_error(a.grad, b.grad) < 1e-4


# ----------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------
def test_api_validation_and_auto():
    q, k, v, g, _ = _inputs(1, 8, 2, 2, 16, 16, seed=40)
    o_auto, _ = chunk_gla(q, k, v, g)           # CPU: auto -> reference
    o_ref, _ = gla_chunk_reference(q, k, v, g)
    assert torch.equal(o_auto, o_ref)
    with pytest.raises(ValueError):
        chunk_gla(q, k, v, g, impl="nope")
    with pytest.raises(ValueError):
        chunk_gla(q, k[:, :, :1].expand(1, 8, 3, 16), v, g)
    with pytest.raises(ValueError):
        chunk_gla(q, k, v, g[..., :3])
    with pytest.raises(ValueError):
        chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 8]), initial_state=torch.zeros(2, 2,
                                                                                         16, 16))
    with pytest.raises(ValueError):
        chunk_gla(q.double(), k.double(), v.double(), impl="triton")


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 10, 4, 16)
        k = torch.empty(1, 10, 2, 16)
        v = torch.empty(1, 10, 2, 24)
        g = torch.empty(1, 10, 2)
        assert triton_unsupported_reason(q, k, v, g) is None
        o, ht = chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 3, 10]),
                          output_final_state=True, impl="triton")
        assert o.shape == (1, 10, 4, 24) and ht.shape == (2, 2, 16, 24)
        assert ht.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ----------------------------------------------------------------------------------------------
def _gpu_check(B, T, Hq, H, D, gate, dtype=torch.bfloat16, tol=5e-3, cu=None, h0=True, n=1.0):
    ins = _inputs(B, T, Hq, H, D, D, gate=gate, dtype=dtype, h0=h0, seed=T + D, device="cuda",
                  n=n)
    if ins[4] is not None:
        ins[4] = ins[4].float()
    _check_grads(ins, cu=cu, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gate", ["channel", "scalar", None])
def test_gpu_bf16_long(D, gate):
    _gpu_check(2, 1000, 4, 2, D, gate)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gate", ["channel", "scalar"])
def test_gpu_bf16_one_dot_form(D, gate):
    """Gentle gates (logsigmoid / 16, GLA's own): every chunk takes the one-dot form."""
    _gpu_check(2, 1000, 4, 2, D, gate, n=16.0)


@pytest.mark.gpu
def test_gpu_fp32_tf32_free():
    _gpu_check(1, 300, 2, 2, 64, "channel", dtype=torch.float32, tol=1e-4)


@pytest.mark.gpu
def test_gpu_cu_seqlens_bf16():
    cu = torch.tensor([0, 100, 101, 700, 1000], device="cuda", dtype=torch.int32)
    ins = _inputs(1, 1000, 4, 2, 64, 64, gate="channel", dtype=torch.bfloat16, device="cuda",
                  seed=3)
    ins[4] = torch.randn(4, 2, 64, 64, device="cuda")
    _check_grads(ins, cu=cu, tol=5e-3)


@pytest.mark.gpu
def test_gpu_decode_cuda_graph():
    q, k, v, g, _ = _inputs(2, 257, 4, 4, 128, 128, gate="channel", dtype=torch.bfloat16,
                            device="cuda", seed=4)
    _, h = chunk_gla(q[:, :256], k[:, :256], v[:, :256], g[:, :256], output_final_state=True)
    args = [t[:, 256:].clone() for t in (q, k, v, g)]
    fused_recurrent_gla(*args, initial_state=h, output_final_state=True)   # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o1, h1 = fused_recurrent_gla(*args, initial_state=h, output_final_state=True)
    graph.replay()
    torch.cuda.synchronize()
    o2, h2 = gla_recurrent_reference(*_fp64([q, k, v, g]), output_final_state=True)
    assert rel_rms_error(o1, o2[:, 256:]) < 5e-3 and rel_rms_error(h1, h2) < 5e-3


@pytest.mark.gpu
def test_gpu_inductor_fullgraph():
    ins = _inputs(1, 200, 2, 2, 64, 64, gate="channel", dtype=torch.bfloat16, device="cuda",
                  seed=5)
    leaves = [t.requires_grad_() for t in ins[:4]]

    def fn(q, k, v, g):
        return chunk_gla(q, k, v, g)[0]

    o = torch.compile(fn, fullgraph=True)(*leaves)
    o.float().square().sum().backward()
    o2, _ = gla_recurrent_reference(*_fp64(ins[:4]))
    assert rel_rms_error(o, o2) < 5e-3


def test_kernels_work_when_triton_was_imported_first():
    """triton.language's @jit helpers (tl.sum, tl.zeros, ...) are fixed at triton's import;
    torch._dynamo imports triton, so our kernels must not depend on them under the interpreter."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("interpreter-only concern")
    code = ("import torch._dynamo, torch\n"
            "import torch.nn.functional as F\n"
            "from gla.kernels.linear_attention import chunk_gla, fused_recurrent_gla, chunk\n"
            "for d3 in (True, False):\n"
            "    chunk.DIAG_3D_OVERRIDE = d3\n"
            "    q = torch.randn(1, 20, 2, 16, requires_grad=True)\n"
            "    k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16)\n"
            "    g = F.logsigmoid(torch.randn(1, 20, 2, 16))\n"
            "    o, h = chunk_gla(q, k, v, g, output_final_state=True, impl='triton')\n"
            "    o.sum().backward()\n"
            "    chunk_gla(q, k, v, None, cu_seqlens=torch.tensor([0, 5, 20]), impl='triton')\n"
            "    fused_recurrent_gla(q.detach(), k, v, g, impl='triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("force_op", ["0", "1"])
def test_second_derivative_raises(force_op, monkeypatch):
    """The backward is not itself differentiable: a second derivative raises on both paths (the
    eager autograd.Function and the torch.library ops) instead of returning something silent."""
    monkeypatch.setenv("GLA_EAGER_OP", force_op)
    q, k, v, g, _ = _inputs(1, 20, 2, 2, 16, 16, seed=24)
    q = q.detach().clone().requires_grad_()
    o, _ = chunk_gla(q, k, v, g, impl="triton")
    (dq,) = torch.autograd.grad((o * o).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|no autograd formula"):
        dq.sum().backward()
