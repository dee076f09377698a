"""Fuzzing the Triton attention kernels (CPU: Triton's interpreter) against the float64 reference.

Random Tq/Tk (cross-attention, decode-like Tq=1, odd lengths), head dims (padded), GQA/MQA,
causal, sliding windows, chunks, bias kinds, key masks (a batch with no visible key), gates, and both
layouts; the output and every gradient are checked, and fully masked rows give exact zeros.
Inputs sit before NaN tails and the launchers' buffers are NaN-poisoned (``flash.POISON``).
"""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gla.lowering.verify import gradient_error  # noqa: E402
from gla.testing import rel_rms_error  # noqa: E402
from test_attention import TOL, _fully_masked_rows, _reference, _run, make_case  # noqa: E402

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
FUZZ = settings(deadline=None, derandomize=not _LONG, suppress_health_check=_HEALTH,
                print_blob=True, max_examples=15 * (25 if _LONG else 1))


@st.composite
def attention_cases(draw):
    Tq = draw(st.integers(1, 70))
    Tk = draw(st.one_of(st.just(Tq), st.integers(1, 70)))
    key_mask = draw(st.sampled_from([None, "random", "empty_batch"]))
    bias = draw(st.sampled_from([None, "1_1_q_k", "b_1_1_k"]))
    if bias == "1_1_q_k":    # its pattern writes key columns up to 19 and query row 1
        assume(Tk >= 20 and Tq >= 2)
    Hkv = draw(st.sampled_from([1, 2]))
    causal = draw(st.booleans())
    return dict(
        B=2 if key_mask == "empty_batch" else draw(st.sampled_from([1, 2])),
        Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])), Tq=Tq, Tk=Tk,
        D=draw(st.sampled_from([16, 24, 40, 64])), Dv=draw(st.sampled_from([None, 16, 40])),
        causal=causal, window=draw(st.sampled_from([0, 0, 1, 7, 33])),
        chunk=draw(st.sampled_from([0, 0, 1, 5, 16, 29])) if causal else 0,
        gate=draw(st.sampled_from([None, "elementwise", "headwise"])), bias=bias,
        key_mask=key_mask, bthd=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@FUZZ
@given(c=attention_cases())
def test_fuzz_triton_attention(c, monkeypatch):
    from gla.kernels.attention import flash

    monkeypatch.setattr(flash, "POISON", True)
    q, k, v, kw, dout = make_case(**c)
    out, grads = _run("triton", q, k, v, kw, dout)
    ref, ref_grads = _reference(q, k, v, kw, dout)
    tol = TOL[torch.float32]
    errs = {"out": rel_rms_error(out, ref)}
    # a gradient that is zero in float64 (dq, dk over a single key) is measured against the scale
    # of the others, as the compile-time verification does
    scale = max(float(e.norm()) for e in ref_grads)
    errs.update({n: gradient_error(a, e, scale, tol)
                 for n, a, e in zip(["dq", "dk", "dv", "dgate"], grads, ref_grads)})
    assert all(e <= tol for e in errs.values()), errs
    empty = _fully_masked_rows(q, k, kw)
    if empty.any():   # flash convention: exact zeros and zero gradients
        assert (out[empty] == 0).all() and (grads[0][empty] == 0).all()
