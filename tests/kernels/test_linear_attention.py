"""Gated linear attention: references, torch.library ops, Triton kernels (CPU: interpreter)."""
import pytest
import torch
import torch.nn.functional as F

from gla.kernels.linear_attention import (chunk_gla, fused_recurrent_gla, gla_chunk_reference,
                                          gla_recurrent_reference, triton_unsupported_reason)
from gla.testing import rel_rms_error


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
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return [cast(t) for t in (q, k, v, g)] + [None if s0 is None else s0.to(device)]


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
    """Make torch.empty in chunk.py return NaN-filled tensors: every output must be written."""
    from gla.kernels.linear_attention import chunk

    real = torch.empty

    def nan_empty(*a, **kw):
        t = real(*a, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(chunk.torch, "empty", nan_empty)


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
def test_triton_forward_matches_recurrence(case, monkeypatch):
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
